"""IFNet, the flow network of RIFE (Huang et al., "Real-Time Intermediate Flow Estimation for
Video Frame Interpolation", ECCV 2022, arXiv 2011.06294), in the "HDv3" layout of the
``flownet.pkl`` that DiffSynth-Studio uses (hzwer's ``train_log/IFNet_HDv3.py``, RIFE v3.x HD).

Three coarse-to-fine :class:`IFBlock` stages estimate two half-way flows (t=0.5 -> frame 0 and
t=0.5 -> frame 1) and a fusion mask; each stage sees the frames warped by the flow so far and adds
a residual. Every stage runs on both input orders and averages the two predictions, so
``IFNet(a, b)`` and ``IFNet(b, a)`` give the same frame. A fourth block, ``block_tea`` (the
privileged-distillation teacher of training), is never run: it exists so the file loads strictly.

Key layout of ``flownet.pkl`` after stripping the ``module.`` prefix that ``DistributedDataParallel``
added, for each of ``block0``, ``block1``, ``block2``, ``block_tea`` (``c`` = width = 90)::

    conv0.0.0.{weight,bias}  3x3 stride-2 conv, in -> c/2   conv0.0.1.weight  PReLU(c/2)
    conv0.1.0.{weight,bias}  3x3 stride-2 conv, c/2 -> c    conv0.1.1.weight  PReLU(c)
    convblock{0..3}.{0,1}.0.{weight,bias}  3x3 conv c -> c  convblock{k}.{j}.1.weight  PReLU(c)
    conv1.0.{weight,bias}    4x4 stride-2 deconv, c -> c/2  conv1.1.weight    PReLU(c/2)
    conv1.2.{weight,bias}    4x4 stride-2 deconv, c/2 -> 4  (the two flows)
    conv2.*                  as conv1, ending in 1 channel  (the fusion mask)

``in`` is 11 for the students (img0, img1, mask, 4 flow channels) and 14 for the teacher (which
also saw the ground-truth middle frame). 4 blocks x 40 = 160 tensors, 3,038,015 parameters
(12.2 MB in fp32). The layout follows from the module tree alone; it is the one DiffSynth-Studio
loaded with a strict ``load_state_dict`` after ``k.replace("module.", "")``, and its
ModelManager recognised the file by ``block_tea.convblock3.0.1.weight``.

Inputs are fp32, BGR, in [0, 1], with sides that are multiples of ``16 / scale`` (callers pad;
see :mod:`.frames`). fp16 is not supported: the original notes that IFNet breaks in half precision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IFNetConfig", "IFBlock", "IFNet", "warp"]

STUDENT_IN_CHANNELS = 7 + 4  # img0 (3) + img1 (3) + mask logit (1) + flows (4)
TEACHER_IN_CHANNELS = 10 + 4  # ... + the ground-truth middle frame (3)
NUM_RESIDUAL_PAIRS = 4


@dataclass(frozen=True)
class IFNetConfig:
    """IFNet shape; the default is the published ``flownet.pkl`` (width 90 in every block)."""

    width: int = 90

    def __post_init__(self):
        if self.width < 2 or self.width % 2:
            raise ValueError(f"IFNet width must be an even number >= 2 (the heads use width/2), got {self.width}")


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv with bias, then a per-channel PReLU (keys ``.0.weight``, ``.0.bias``, ``.1.weight``)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=True), nn.PReLU(out_channels))


def _head(width: int, out_channels: int) -> nn.Sequential:
    """Two stride-2 transposed convs back to the block's input resolution (x4)."""
    half = width // 2
    return nn.Sequential(nn.ConvTranspose2d(width, half, 4, 2, 1), nn.PReLU(half), nn.ConvTranspose2d(half, out_channels, 4, 2, 1))


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp: ``out(p) = image(p + flow(p))``, bilinear, edge pixels repeated outside.

    ``flow`` is ``(B, 2, H, W)`` in pixels (x then y). As RIFE: ``grid_sample`` with
    ``align_corners=True``, so pixel centres sit at -1 .. 1 and one pixel is ``2 / (side - 1)``.
    """
    b, _, h, w = flow.shape
    xs = torch.linspace(-1.0, 1.0, w, device=flow.device, dtype=flow.dtype).view(1, 1, w).expand(b, h, w)
    ys = torch.linspace(-1.0, 1.0, h, device=flow.device, dtype=flow.dtype).view(1, h, 1).expand(b, h, w)
    grid = torch.stack((xs + flow[:, 0] / ((w - 1.0) / 2.0), ys + flow[:, 1] / ((h - 1.0) / 2.0)), dim=-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    # scale_factor (not size) as the original, so the sampling grid is the same for exact sizes.
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False, recompute_scale_factor=False)


class IFBlock(nn.Module):
    """One refinement stage: at ``1/scale`` resolution, predict a flow update and a mask update."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.conv0 = nn.Sequential(_conv(in_channels, width // 2, stride=2), _conv(width // 2, width, stride=2))
        self.convblock0 = nn.Sequential(_conv(width, width), _conv(width, width))
        self.convblock1 = nn.Sequential(_conv(width, width), _conv(width, width))
        self.convblock2 = nn.Sequential(_conv(width, width), _conv(width, width))
        self.convblock3 = nn.Sequential(_conv(width, width), _conv(width, width))
        self.conv1 = _head(width, 4)
        self.conv2 = _head(width, 1)

    def forward(self, x: torch.Tensor, flow: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        x = _resize(x, 1.0 / scale)
        flow = _resize(flow, 1.0 / scale) / scale  # flows are in pixels: shrink them with the image
        feat = self.conv0(torch.cat((x, flow), 1))
        for residual in (self.convblock0, self.convblock1, self.convblock2, self.convblock3):
            feat = residual(feat) + feat
        flow = _resize(self.conv1(feat), scale) * scale
        mask = _resize(self.conv2(feat), scale)
        return flow, mask


# Channel order that swaps the two half-way flows (to frame 0: 0:2, to frame 1: 2:4).
_SWAP_FLOWS = [2, 3, 0, 1]


class IFNet(nn.Module):
    """The RIFE HDv3 flow network; ``forward`` keeps the original's inputs and outputs."""

    def __init__(self, config: IFNetConfig = IFNetConfig()):
        super().__init__()
        self.config = config
        self.block0 = IFBlock(STUDENT_IN_CHANNELS, config.width)
        self.block1 = IFBlock(STUDENT_IN_CHANNELS, config.width)
        self.block2 = IFBlock(STUDENT_IN_CHANNELS, config.width)
        self.block_tea = IFBlock(TEACHER_IN_CHANNELS, config.width)

    def forward(
        self, x: torch.Tensor, scale_list: Sequence[float] = (4.0, 2.0, 1.0)
    ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """``x`` = ``cat(img0, img1)`` on channels, ``(B, 6, H, W)``; ``scale_list`` = the three stages' downscales.

        Returns ``(flows, mask, merged)`` as the original: the accumulated flow after each stage,
        the final mask after the sigmoid, and the blended frame after each stage; the
        interpolated frame is ``merged[2]`` (not clipped).
        """
        if x.dim() != 4 or x.shape[1] != 6:
            raise ValueError(f"IFNet takes (batch, 6, height, width) = two BGR frames on channels, got {tuple(x.shape)}")
        if len(scale_list) != 3:
            raise ValueError(f"IFNet has three stages, so scale_list needs three entries, got {list(scale_list)}")
        img0, img1 = x[:, :3], x[:, 3:]
        batch = x.shape[0]
        flow = x.new_zeros(batch, 4, x.shape[2], x.shape[3])
        mask = x.new_zeros(batch, 1, x.shape[2], x.shape[3])
        warped0, warped1 = img0, img1
        flows, masks, merged = [], [], []
        for block, scale in zip((self.block0, self.block1, self.block2), scale_list):
            # The original calls the block twice (frames in order, then swapped with the mask
            # negated and the flows exchanged); one call on a doubled batch is the same per sample.
            inputs = torch.cat((torch.cat((warped0, warped1, mask), 1), torch.cat((warped1, warped0, -mask), 1)), 0)
            flow_in = torch.cat((flow, flow[:, _SWAP_FLOWS]), 0)
            delta_flow, delta_mask = block(inputs, flow_in, scale=scale)
            forward_flow, swapped_flow = delta_flow[:batch], delta_flow[batch:]
            flow = flow + (forward_flow + swapped_flow[:, _SWAP_FLOWS]) / 2
            mask = mask + (delta_mask[:batch] - delta_mask[batch:]) / 2
            warped0 = warp(img0, flow[:, :2])
            warped1 = warp(img1, flow[:, 2:4])
            flows.append(flow)
            masks.append(mask)
            merged.append((warped0, warped1))
        blended = []
        for (w0, w1), logit in zip(merged, masks):
            weight = torch.sigmoid(logit)
            blended.append(w0 * weight + w1 * (1 - weight))
        return flows, torch.sigmoid(masks[-1]), blended
