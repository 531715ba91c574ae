"""Random-weight annotator files in the real on-disk formats (``models/Annotators``).

Unlike ``factory``'s tiny models these keep the real architectures, key names,
shapes and storage dtypes, so a file written here is interchangeable with the one
downloaded from ``https://huggingface.co/lllyasviel/Annotators``: the loaders and
their strictness are tested on exactly what users have. Random weights can only
check structure and the pre/post-processing, never learned behaviour.

Each writer takes the target file path, or an existing folder (the real file name is
then used inside it), and returns the path written.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from ..utils.atomic import atomic_torch_save


def _annotator_target(path: str, filename: str) -> str:
    """``path`` itself, or ``path/filename`` when ``path`` is an existing folder; parent folders are created."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, filename)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


# --------------------------------------------------------------------------- lineart, lineart_anime, softedge (HED)


def _edge_random_state_dict(model: nn.Module, seed: int, gain: float = 1.0, input_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Seeded fan-in-scaled weights for a network of (transposed) convolutions, built on any device (``meta`` is fine).

    A weight gets std ``gain / sqrt(fan_in)``, where the fan-in of a transposed
    convolution is what one output pixel sees (``in * kh * kw / stride**2``); the first
    convolution is further divided by ``input_scale`` (for networks fed 0..255 pixels).
    Biases get std 0.05. Tensors are drawn in module order, so a seed fixes the file.
    """
    generator = torch.Generator().manual_seed(seed)
    state_dict: dict[str, torch.Tensor] = {}
    first = True
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            continue
        weight = module.weight
        kernel = weight.shape[2] * weight.shape[3]
        if isinstance(module, nn.ConvTranspose2d):
            fan_in = module.in_channels * kernel / (module.stride[0] * module.stride[1])
        else:
            fan_in = module.in_channels // module.groups * kernel
        std = gain / math.sqrt(fan_in) / (input_scale if first else 1.0)
        first = False
        state_dict[f"{name}.weight"] = torch.randn(weight.shape, generator=generator) * std
        if module.bias is not None:
            state_dict[f"{name}.bias"] = torch.randn(module.bias.shape, generator=generator) * 0.05
    return state_dict


def write_lineart_file(path: str, seed: int = 0, coarse: bool = False) -> str:
    """An ``sk_model.pth`` (``coarse``: ``sk_model2.pth``) lineart generator file: fp32, no prefix, 17.2 MB.

    The two real files share one architecture and differ in weights only; here
    ``coarse`` picks the default file name and a different random stream.
    """
    from ..controlnets.annotators.lineart import LINEART_COARSE_FILE, LINEART_FILE, LineartGenerator

    target = _annotator_target(path, LINEART_COARSE_FILE if coarse else LINEART_FILE)
    with torch.device("meta"):
        model = LineartGenerator()
    atomic_torch_save(_edge_random_state_dict(model, 2 * seed + int(coarse)), target)
    return target


def write_lineart_anime_file(path: str, seed: int = 0, *, data_parallel_prefix: bool = True) -> str:
    """A ``netG.pth`` anime-lineart U-Net file: fp32, keys ``module.model.model...``, 217.6 MB.

    ``data_parallel_prefix=False`` writes the keys without ``module.`` (also accepted by the loader).
    """
    from ..controlnets.annotators.lineart_anime import LINEART_ANIME_FILE, LineartAnimeGenerator

    target = _annotator_target(path, LINEART_ANIME_FILE)
    with torch.device("meta"):
        model = LineartAnimeGenerator()
    state_dict = _edge_random_state_dict(model, seed)
    if data_parallel_prefix:
        state_dict = {f"module.{k}": v for k, v in state_dict.items()}
    atomic_torch_save(state_dict, target)
    return target


def write_hed_file(path: str, seed: int = 0) -> str:
    """A ``ControlNetHED.pth`` softedge file: fp16 as the real one, no prefix, 29.4 MB.

    He-scaled convolutions (ReLU network) with the first one divided by 64, since the
    network reads raw 0..255 pixels minus ``norm`` (drawn around a mean pixel value), so
    the side outputs are of order one and the edge map is neither all black nor all white.
    """
    from ..controlnets.annotators.hed import HED_FILE, ControlNetHED

    target = _annotator_target(path, HED_FILE)
    with torch.device("meta"):
        model = ControlNetHED()
    state_dict = _edge_random_state_dict(model, seed, gain=math.sqrt(2.0), input_scale=64.0)
    generator = torch.Generator().manual_seed(seed + 7919)
    state_dict = {"norm": 100.0 + 40.0 * torch.rand(model.norm.shape, generator=generator), **state_dict}
    atomic_torch_save({k: v.half() for k, v in state_dict.items()}, target)
    return target
