"""``softedge``: ControlNet's Apache-2.0 HED re-implementation (``ControlNetHED.pth``).

Network: holistically-nested edge detection (Xie & Tu, "Holistically-Nested Edge
Detection", ICCV 2015) as re-implemented and retrained by lllyasviel for ControlNet 1.1
under the Apache-2.0 licence (``ControlNetHED_Apache2``): the five VGG-16 convolution
stages (2, 2, 3, 3, 3 convs of 64, 128, 256, 512, 512 channels, 3x3, ReLU after each,
2x2 max pooling before stages 2-5), each with a 1x1 "side output" projection to one
channel. Unlike the original HED it reads RGB in 0..255 and subtracts a learned
per-channel offset ``norm`` instead of a fixed BGR mean.

Weights: ``ControlNetHED.pth`` from ``lllyasviel/Annotators``: a plain state dict, no
prefix, stored in **fp16** (14,716,168 parameters, 29.4 MB; an fp32 VGG-16 HED such as
``network-bsds500.pth`` is twice that). Keys: ``norm`` ``(1, 3, 1, 1)``,
``block{1..5}.convs.{i}.{weight,bias}``, ``block{1..5}.projection.{weight,bias}``.

Processing, as controlnet_aux 0.0.7 ``HEDdetector.__call__`` (``safe=False``, the path
DiffSynth used): raw RGB 0..255 -> network -> each side output resized (bilinear,
float32) to the input size -> mean of the five -> sigmoid (float64) -> ``* 255``
clipped and truncated to uint8. No inversion: white edges on black.
``safe=True`` quantises the probabilities to {0, 0.5, 1} first (controlnet_aux's
``safe_step``), the "softedge_hedsafe" preprocessor.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...models.loading import instantiate
from ...models.state_dict import load_state_dict
from .base import NetworkDetector, check_image, require_annotator_file

__all__ = ["HED_FILE", "HEDConfig", "HEDStage", "ControlNetHED", "HEDDetector"]

HED_FILE = "ControlNetHED.pth"


@dataclass(frozen=True)
class HEDConfig:
    """Stage widths and depths; the defaults are VGG-16's, as in ``ControlNetHED.pth``."""

    in_channels: int = 3
    widths: tuple[int, ...] = (64, 128, 256, 512, 512)
    depths: tuple[int, ...] = (2, 2, 3, 3, 3)

    def __post_init__(self):
        if len(self.widths) != len(self.depths) or not self.widths:
            raise ValueError(f"widths and depths must be non-empty and of equal length, got {self.widths} and {self.depths}")


class HEDStage(nn.Module):
    """``depth`` 3x3 conv+ReLU layers, and a 1x1 projection of the result to one side-output channel."""

    def __init__(self, in_channels: int, channels: int, depth: int):
        super().__init__()
        self.convs = nn.Sequential(*(nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1) for i in range(depth)))
        self.projection = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class ControlNetHED(nn.Module):
    """RGB ``(n, 3, h, w)`` in 0..255 -> list of side-output logits ``(n, 1, h / 2**k, w / 2**k)``, k = 0..4."""

    def __init__(self, config: HEDConfig = HEDConfig()):
        super().__init__()
        self.config = config
        self.norm = nn.Parameter(torch.zeros(1, config.in_channels, 1, 1))
        in_channels = config.in_channels
        for k, (width, depth) in enumerate(zip(config.widths, config.depths), start=1):
            self.add_module(f"block{k}", HEDStage(in_channels, width, depth))
            in_channels = width

    def stages(self) -> list[HEDStage]:
        return [getattr(self, f"block{k}") for k in range(1, len(self.config.widths) + 1)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        sides = []
        for k, stage in enumerate(self.stages()):
            if k > 0:
                h = F.max_pool2d(h, kernel_size=2, stride=2)
            h, side = stage(h)
            sides.append(side)
        return sides




class HEDDetector(NetworkDetector):
    """``detector(rgb uint8 (h, w, 3)) -> uint8 (h, w)``: soft edges, white on black, any size >= 16."""

    def __init__(self, model: ControlNetHED, safe: bool = False):
        super().__init__(model)
        self.safe = safe

    @classmethod
    def from_folder(
        cls, folder: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, safe: bool = False
    ) -> "HEDDetector":
        """Load ``ControlNetHED.pth`` from ``folder``. controlnet_aux always ran it in fp32; other dtypes are ours."""
        path = require_annotator_file(folder, HED_FILE)
        what = "HED edge network (ControlNetHED_Apache2)"
        model = instantiate(ControlNetHED, load_state_dict(path), source=path, what=what, device=device, dtype=dtype)
        return cls(model, safe=safe)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        check_image(image, "HEDDetector")
        h, w = image.shape[:2]
        smallest = 2 ** (len(self.model.config.widths) - 1)
        if min(h, w) < smallest:
            raise ValueError(f"softedge needs at least {smallest}x{smallest} pixels (one per deepest side output), got {w}x{h}")
        with torch.inference_mode():
            x = torch.from_numpy(image).to(self.device, torch.float32).permute(2, 0, 1)[None].to(self.dtype)
            sides = [side[0, 0].float().cpu().numpy() for side in self.model(x)]
        upsampled = np.stack([cv2.resize(side, (w, h), interpolation=cv2.INTER_LINEAR) for side in sides], axis=2)
        probability = 1.0 / (1.0 + np.exp(-upsampled.mean(axis=2).astype(np.float64)))
        if self.safe:
            # controlnet_aux safe_step(x, 2): int(3x) / 2, i.e. 0, 0.5 or 1 (1.5 only at exactly x == 1).
            probability = (probability.astype(np.float32) * 3.0).astype(np.int32).astype(np.float32) / 2.0
        return (probability * 255.0).clip(0, 255).astype(np.uint8)
