"""``lineart_anime``: the pix2pix U-Net generator with Anime2Sketch weights (ControlNet v1.1 anime lineart).

Network: the U-Net generator of Isola et al., "Image-to-Image Translation with
Conditional Adversarial Networks" (pix2pix, CVPR 2017), as in junyanz/pytorch-CycleGAN-
and-pix2pix, with the options Anime2Sketch (Xiang et al. 2021) trained ``netG.pth``
with: 8 levels, 64 base channels (64-128-256-512-512-512-512-512), instance norm without
affine parameters or running statistics (so every convolution has a bias), no dropout.

Each level halves the size with a 4x4 stride-2 convolution, runs the inner levels,
and doubles it back with a 4x4 stride-2 transposed convolution; inner levels return
``cat([skip, up])``. One property of the reference code is kept on purpose: its
``LeakyReLU(0.2, inplace=True)`` overwrites the level's input *before* it is
concatenated, so the skip connection carries ``leaky_relu(x)``, not ``x``. The weights
were trained that way, so :class:`UNetLevel` does the same explicitly.

Weights: ``netG.pth`` from ``lllyasviel/Annotators``, fp32, 32 tensors, 54,405,505
parameters (217.6 MB). Its keys carry the ``module.`` prefix of ``nn.DataParallel``
(which is why controlnet_aux and Anime2Sketch strip ``module.`` before loading); we
accept the file with or without it. Key layout: ``[module.]model.model.0`` is the
outermost down convolution and ``...model.3`` its up convolution; level ``k`` (k >= 1)
sits at ``model.model.1`` followed by ``.model.3`` repeated ``k - 1`` times, with its
down convolution at ``.model.1`` and its up convolution at ``.model.5`` (``.model.3`` in
the innermost level, which has no norm after its down convolution).

Processing, as controlnet_aux 0.0.7 ``LineartAnimeDetector.__call__``: the image is
*resized* (bicubic, not padded) up to multiples of 256, mapped to [-1, 1]
(``x / 127.5 - 1``), run, mapped back (``y * 127.5 + 127.5``), resized (bicubic, float)
to the input size, clipped and truncated to uint8, and inverted (``255 - map``: white
lines on black). The inversion happens after controlnet_aux's resize to the image
resolution; as for ``lineart`` (see lineart.py) the orders agree for DiffSynth's use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from ...models.loading import instantiate
from ...models.state_dict import load_state_dict
from .base import NetworkDetector, check_image, require_annotator_file

__all__ = ["LINEART_ANIME_FILE", "LineartAnimeConfig", "UNetLevel", "LineartAnimeGenerator", "LineartAnimeDetector", "strip_data_parallel_prefix"]

LINEART_ANIME_FILE = "netG.pth"
_DATA_PARALLEL_PREFIX = "module."


@dataclass(frozen=True)
class LineartAnimeConfig:
    """U-Net shape; the defaults are ``netG.pth``'s architecture."""

    in_channels: int = 3
    out_channels: int = 1
    num_levels: int = 8  # pix2pix's num_downs
    base_channels: int = 64
    max_channel_mult: int = 8

    def __post_init__(self):
        if self.num_levels < 2:
            raise ValueError(f"the U-Net needs at least 2 levels, got num_levels={self.num_levels}")

    @property
    def widths(self) -> list[int]:
        """Channels after each level's down convolution, outermost first."""
        return [self.base_channels * min(2**i, self.max_channel_mult) for i in range(self.num_levels)]

    @property
    def size_multiple(self) -> int:
        """Every level halves the size: inputs must be multiples of ``2 ** num_levels`` (256)."""
        return 2**self.num_levels


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels)  # affine=False, no running statistics: adds no keys


class UNetLevel(nn.Module):
    """One U-Net level: down conv, the inner level (if any), up conv.

    ``outer`` is the channel count this level returns to (before its skip
    concatenation), ``inner`` the count after its down convolution. The outermost
    level reads ``in_channels`` (the image), ends in ``tanh`` and has no skip.
    """

    def __init__(self, outer: int, inner: int, inner_level: "UNetLevel | None", *, in_channels: int | None = None, outermost: bool = False):
        super().__init__()
        self.outermost = outermost
        innermost = inner_level is None
        down = nn.Conv2d(in_channels or outer, inner, kernel_size=4, stride=2, padding=1)
        # Inner levels hand back cat([skip, up]): twice their width.
        up = nn.ConvTranspose2d(inner if innermost else 2 * inner, outer, kernel_size=4, stride=2, padding=1)
        if outermost:
            layers = [down, inner_level, nn.ReLU(), up, nn.Tanh()]
        elif innermost:
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(), up, _norm(outer)]
        else:
            layers = [nn.LeakyReLU(0.2), down, _norm(inner), inner_level, nn.ReLU(), up, _norm(outer)]
        # The Sequential indices are the file's key names (model.0, model.1, ...).
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        activated = self.model[0](x)  # leaky ReLU; the skip carries it (see the module docstring)
        return torch.cat([activated, self.model[1:](activated)], dim=1)


class LineartAnimeGenerator(nn.Module):
    """Image ``(n, 3, h, w)`` in [-1, 1] -> line map ``(n, 1, h, w)`` in [-1, 1]; ``h, w`` multiples of 256."""

    def __init__(self, config: LineartAnimeConfig = LineartAnimeConfig()):
        super().__init__()
        self.config = config
        widths = config.widths
        level = None
        for k in range(config.num_levels - 1, 0, -1):  # innermost first
            level = UNetLevel(widths[k - 1], widths[k], level)
        self.model = UNetLevel(config.out_channels, widths[0], level, in_channels=config.in_channels, outermost=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def strip_data_parallel_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the leading ``module.`` that ``nn.DataParallel`` training leaves on every key."""
    return {k[len(_DATA_PARALLEL_PREFIX):] if k.startswith(_DATA_PARALLEL_PREFIX) else k: v for k, v in state_dict.items()}




class LineartAnimeDetector(NetworkDetector):
    """``detector(rgb uint8 (h, w, 3)) -> uint8 (h, w)``: white lines on black, any size."""

    @classmethod
    def from_folder(
        cls, folder: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "LineartAnimeDetector":
        """Load ``netG.pth`` from ``folder`` (keys with or without ``module.``)."""
        path = require_annotator_file(folder, LINEART_ANIME_FILE)
        state_dict = strip_data_parallel_prefix(load_state_dict(path))
        what = "anime lineart U-Net (Anime2Sketch netG)"
        model = instantiate(LineartAnimeGenerator, state_dict, source=path, what=what, device=device, dtype=dtype)
        return cls(model)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        check_image(image, "LineartAnimeDetector")
        h, w = image.shape[:2]
        multiple = self.model.config.size_multiple
        fed_size = (multiple * math.ceil(w / multiple), multiple * math.ceil(h / multiple))  # (width, height) for cv2
        fed = cv2.resize(image, fed_size, interpolation=cv2.INTER_CUBIC)
        with torch.inference_mode():
            x = torch.from_numpy(fed).to(self.device, torch.float32) / 127.5 - 1.0
            x = x.permute(2, 0, 1)[None].to(self.dtype)
            line = (self.model(x)[0, 0].float() * 127.5 + 127.5).cpu().numpy()
        line = cv2.resize(line, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
        return 255 - line
