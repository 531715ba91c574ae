"""Frames in and out of IFNet: PIL <-> BGR tensors, padding to valid sizes, one batched midpoint call.

Padding rule. IFNet downsamples by ``4 / scale`` and then by 4 more inside each block, so a side
must be a multiple of ``16 / scale`` to come back at its own size. As RIFE's ``inference_video.py``
we pad to multiples of ``max(32, 32 / scale)`` (32 for scale >= 1, 64 for 0.5, 128 for 0.25),
on the right and bottom, by repeating the edge pixels (a zero border would show up as a black
band moving with the flow near the edges), and crop the result back to the frame size.
DiffSynth-Studio instead *resized* such frames to ``ceil(side / 32)`` pixels (a typo for
``ceil(side / 32) * 32``) and scaled the tiny result back up: garbage for every size that is
not a multiple of 32.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "SCALES",
    "check_scale",
    "scale_list",
    "pad_multiple",
    "pad_frames",
    "frame_array",
    "frame_arrays",
    "resolve_device",
    "to_rgb_image",
    "to_tensor",
    "to_image",
    "midpoints",
]

# The scales RIFE's own scripts accept ("try 0.5 for 4K"); others give sizes that do not divide.
SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


def check_scale(scale: float) -> float:
    if scale not in SCALES:
        raise ValueError(f"RIFE scale must be one of {', '.join(map(str, SCALES))} (0.5 for 4K video), got {scale!r}")
    return float(scale)


def scale_list(scale: float) -> list[float]:
    """The downscale of each of IFNet's three stages (coarse to fine)."""
    return [4.0 / scale, 2.0 / scale, 1.0 / scale]


def pad_multiple(scale: float) -> int:
    """Frame sides are padded up to a multiple of this (see the module docstring)."""
    return max(32, int(32 / check_scale(scale)))


def pad_frames(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``(B, C, H, W)`` padded on the right and bottom to multiples of ``multiple`` by edge replication."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


def frame_array(frame: Any, index: int) -> np.ndarray:
    """Frame ``index`` (a PIL image or a uint8 ``(H, W, 3)`` array) as an RGB uint8 array."""
    if isinstance(frame, Image.Image):
        return np.asarray(frame if frame.mode == "RGB" else frame.convert("RGB"))
    array = np.asarray(frame)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise TypeError(
            f"frame {index}: expected a PIL image or a uint8 (height, width, 3) array, "
            f"got {type(frame).__name__} of shape {getattr(array, 'shape', None)}"
        )
    return array


def frame_arrays(frames: Sequence[Any], indices: range) -> list[np.ndarray]:
    """Frames ``indices`` of ``frames`` as RGB uint8 arrays, checked to share one size."""
    arrays = [frame_array(frames[i], i) for i in indices]
    for i, array in zip(indices, arrays):
        if array.shape != arrays[0].shape:
            raise ValueError(
                f"frame {i} is {array.shape[1]}x{array.shape[0]} but frame {indices[0]} is "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; all frames of a video must have one size"
            )
    return arrays


def resolve_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """The device to run ``model`` on: where its weights are, checked against ``device`` if given.

    Also checks the weights are fp32: IFNet does not work in half precision (the original's note).
    """
    params = list(model.parameters())
    if any(p.dtype != torch.float32 for p in params):
        dtypes = sorted({str(p.dtype) for p in params})
        raise ValueError(f"RIFE runs in fp32 only, but the model holds {', '.join(dtypes)} weights; convert it with model.float()")
    where = params[0].device if params else torch.device("cpu")
    if device is None:
        return where
    wanted = torch.device(device)
    if params and (wanted.type != where.type or (wanted.index is not None and wanted.index != where.index)):
        raise ValueError(f"the RIFE model is on {where} but device={wanted} was asked for; move it first with model.to({str(wanted)!r})")
    return wanted if not params else where


def to_rgb_image(frame: Any, index: int) -> Image.Image:
    """A frame handed back unchanged, as an RGB PIL image."""
    if isinstance(frame, Image.Image):
        return frame if frame.mode == "RGB" else frame.convert("RGB")
    return Image.fromarray(frame_array(frame, index))


def to_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """RGB uint8 arrays -> ``(B, 3, H, W)`` float32 BGR in [0, 1] (RIFE was trained on OpenCV's BGR)."""
    batch = np.stack([a[:, :, ::-1] for a in arrays])
    return torch.from_numpy(batch).permute(0, 3, 1, 2).to(torch.float32) / 255.0


def to_image(x: torch.Tensor) -> Image.Image:
    """One ``(3, H, W)`` BGR tensor in [0, 1] -> RGB PIL image.

    Rounded to the nearest level; the original truncated, which darkens by half a level on
    average and turned unchanged frames' 255 into 254 on float round-off.
    """
    rgb = x.detach().to("cpu", torch.float32)[[2, 1, 0]].permute(1, 2, 0)
    return Image.fromarray(rgb.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).numpy())


@torch.no_grad()
def midpoints(model: torch.nn.Module, first: torch.Tensor, second: torch.Tensor, scale: float, device: torch.device | str) -> torch.Tensor:
    """IFNet's middle frames of the pairs ``(first[k], second[k])``, clipped to [0, 1], on the CPU.

    Inputs are ``(B, 3, H, W)`` BGR tensors of any size: padded here, cropped back after.
    """
    h, w = first.shape[-2:]
    x = pad_frames(torch.cat((first, second), 1), pad_multiple(scale))
    x = x.to(device=device, dtype=torch.float32)
    merged = model(x, scale_list(scale))[2][-1]
    return merged[..., :h, :w].clamp(0.0, 1.0).to("cpu")
