"""Random-weight RIFE ``flownet.pkl`` files in the published format.

The real file is a flat ``{key: tensor}`` pickle of fp32 tensors whose keys carry the
``module.`` prefix of ``DistributedDataParallel`` (``module.block0.conv0.0.0.weight``); see
:mod:`diffsynth.extensions.RIFE.ifnet` for the layout. ``width`` defaults to the real 90
(3.0 M parameters, 12 MB); :data:`TINY_RIFE` is a narrow variant for fast tests.

Weights are seeded fan-in-scaled noise with PReLU slopes near PyTorch's (and the trained
model's) 0.25, so the network is clearly non-linear and produces flows of a few pixels.
For a transposed convolution the fan-in of an output pixel is ``in * k^2 / stride^2``, not the
``out * k^2`` of the weight's first slice that a generic initialiser would use.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from ..extensions.RIFE.ifnet import IFNet, IFNetConfig
from ..utils.atomic import atomic_open

__all__ = ["TINY_RIFE", "build_rife_state_dict", "write_rife_file"]

TINY_RIFE = IFNetConfig(width=16)


def _randomize(model: nn.Module, generator: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.PReLU):
                module.weight.copy_(0.25 + 0.05 * torch.randn(module.weight.shape, generator=generator))
            elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                k = module.kernel_size[0] * module.kernel_size[1]
                if isinstance(module, nn.ConvTranspose2d):
                    fan_in = module.in_channels * k / (module.stride[0] * module.stride[1])
                else:
                    fan_in = module.in_channels * k
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / math.sqrt(fan_in))
                module.bias.copy_(0.05 * torch.randn(module.bias.shape, generator=generator))
    return model


def build_rife_state_dict(seed: int = 0, config: IFNetConfig = IFNetConfig()) -> dict[str, torch.Tensor]:
    """Seeded random IFNet weights under our (prefix-free) key names."""
    return dict(_randomize(IFNet(config), torch.Generator().manual_seed(seed)).state_dict())


def write_rife_file(
    path: str | os.PathLike,
    seed: int = 0,
    *,
    config: IFNetConfig = IFNetConfig(),
    prefix: str = "module.",
    legacy_format: bool = False,
) -> str:
    """Write a ``flownet.pkl``-style file (``torch.save`` of a flat dict, keys ``prefix + name``).

    ``legacy_format=True`` writes the pre-1.6 non-zip pickle (``_use_new_zipfile_serialization=False``).
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensors = {prefix + key: value.contiguous() for key, value in build_rife_state_dict(seed, config).items()}
    with atomic_open(path, "wb") as f:
        torch.save(tensors, f, _use_new_zipfile_serialization=not legacy_format)
    return path
