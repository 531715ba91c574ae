"""``lineart``: the line-drawing generator of "informative drawings" (ControlNet v1.1 lineart annotator).

Network: the generator of Chan, Durand & Isola, "Learning to generate line drawings
that convey geometry and semantics" (CVPR 2022), itself the ResNet image-to-image
generator of Johnson et al. 2016 / CycleGAN: a 7x7 stem, two stride-2 convolutions,
residual blocks, two transposed convolutions back to full size and a 7x7 head with a
sigmoid. Every convolution but the head is followed by an instance norm without
affine parameters or running statistics, so the weight files hold convolutions only.

Weights: ``sk_model.pth`` ("fine", the one DiffSynth-Studio used through controlnet_aux
0.0.7 with ``coarse=False``) and ``sk_model2.pth`` ("coarse"), both from
``lllyasviel/Annotators``: plain ``torch.save`` state dicts, fp32, no prefix, 3 residual
blocks, 4,290,945 parameters (17.2 MB). Key layout (from the ``nn.Sequential`` indices)::

    model0.1                  7x7 conv, 3 -> 64          (reflection pad at .0)
    model1.0, model1.3        3x3 stride-2 convs, 64 -> 128 -> 256
    model2.{i}.conv_block.1   first 3x3 conv of residual block i (.5 the second)
    model3.0, model3.3        3x3 stride-2 transposed convs, 256 -> 128 -> 64
    model4.1                  7x7 conv, 64 -> 1          (sigmoid at .2)

Processing, as controlnet_aux 0.0.7 ``LineartDetector.__call__``: RGB / 255 -> network ->
``(line * 255).clip(0, 255)`` truncated to uint8 -> ``255 - map`` (white lines on
black). controlnet_aux inverts *after* its resize to the image resolution; DiffSynth
called it with equal detect and image resolutions, where that resize is the identity,
so inverting here gives the same map (for other resolutions the two orders differ
only on exact rounding ties of OpenCV's fixed-point bilinear resize).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...models.loading import instantiate
from ...models.state_dict import load_state_dict
from .base import NetworkDetector, check_image, require_annotator_file

__all__ = ["LINEART_FILE", "LINEART_COARSE_FILE", "LineartConfig", "LineartGenerator", "LineartDetector"]

LINEART_FILE = "sk_model.pth"
LINEART_COARSE_FILE = "sk_model2.pth"


@dataclass(frozen=True)
class LineartConfig:
    """Generator shape; the defaults are the annotator files' architecture."""

    in_channels: int = 3
    out_channels: int = 1
    base_channels: int = 64
    num_downsamplings: int = 2
    num_residual_blocks: int = 3  # the paper's generator allows 9; the published files have 3

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this for the output to match the input size."""
        return 2**self.num_downsamplings


def _padded_conv(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    """Reflection padding then an unpadded convolution: same-size output, no zero border."""
    return [nn.ReflectionPad2d(kernel_size // 2), nn.Conv2d(in_channels, out_channels, kernel_size)]


def _norm(channels: int) -> nn.Module:
    # No affine parameters, no running statistics: normalises each image on its own and adds no keys.
    return nn.InstanceNorm2d(channels)


class LineartResidualBlock(nn.Module):
    """``x + (conv -> norm -> relu -> conv -> norm)(x)``, 3x3 convs with reflection padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            *_padded_conv(channels, channels, 3), _norm(channels), nn.ReLU(),
            *_padded_conv(channels, channels, 3), _norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartGenerator(nn.Module):
    """Image ``(n, 3, h, w)`` in [0, 1] -> line map ``(n, 1, h, w)`` in [0, 1] (lines dark, paper bright).

    ``h`` and ``w`` must be multiples of ``config.size_multiple`` (4) for the output to
    have the input's size.
    """

    def __init__(self, config: LineartConfig = LineartConfig()):
        super().__init__()
        self.config = config
        channels = config.base_channels
        self.model0 = nn.Sequential(*_padded_conv(config.in_channels, channels, 7), _norm(channels), nn.ReLU())
        down: list[nn.Module] = []
        for _ in range(config.num_downsamplings):
            down += [nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), _norm(2 * channels), nn.ReLU()]
            channels *= 2
        self.model1 = nn.Sequential(*down)
        self.model2 = nn.Sequential(*(LineartResidualBlock(channels) for _ in range(config.num_residual_blocks)))
        up: list[nn.Module] = []
        for _ in range(config.num_downsamplings):
            # kernel 3, stride 2, padding 1, output_padding 1: exactly doubles the size.
            up += [nn.ConvTranspose2d(channels, channels // 2, 3, stride=2, padding=1, output_padding=1), _norm(channels // 2), nn.ReLU()]
            channels //= 2
        self.model3 = nn.Sequential(*up)
        self.model4 = nn.Sequential(*_padded_conv(channels, config.out_channels, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in (self.model0, self.model1, self.model2, self.model3, self.model4):
            x = stage(x)
        return x




class LineartDetector(NetworkDetector):
    """``detector(rgb uint8 (h, w, 3)) -> uint8 (h, w)``: white lines on black.

    ``h`` and ``w`` must be multiples of 4 (the Annotator front end gives multiples of 64).
    """

    @classmethod
    def from_folder(
        cls, folder: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, coarse: bool = False
    ) -> "LineartDetector":
        """Load ``sk_model.pth`` (or ``sk_model2.pth`` when ``coarse``) from ``folder``; only that one file is read."""
        path = require_annotator_file(folder, LINEART_COARSE_FILE if coarse else LINEART_FILE)
        what = "lineart generator (informative drawings)"
        model = instantiate(LineartGenerator, load_state_dict(path), source=path, what=what, device=device, dtype=dtype)
        return cls(model)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        check_image(image, "LineartDetector")
        h, w = image.shape[:2]
        multiple = self.model.config.size_multiple
        if h % multiple or w % multiple:
            raise ValueError(f"lineart needs height and width that are multiples of {multiple}, got {w}x{h}")
        with torch.inference_mode():
            x = torch.from_numpy(image).to(self.device, torch.float32).div(255.0)
            x = x.permute(2, 0, 1)[None].to(self.dtype)
            line = self.model(x)[0, 0].float().cpu().numpy()
        line = (line * 255.0).clip(0, 255).astype(np.uint8)
        return 255 - line
