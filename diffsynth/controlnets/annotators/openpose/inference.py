"""Run the OpenPose networks on images and bring their maps back to image size.

Pre- and post-processing of controlnet_aux 0.0.7: BGR input scaled to
``pixel / 256 - 0.5``; resizing by OpenCV with area averaging when the result is
smaller and Lanczos when it is larger; images padded right and bottom with grey
(128) to a multiple of the network stride 8; maps upsampled by the stride, the
padding cut off, then resized to the input size.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STRIDE = 8
PAD_VALUE = 128
BODY_BOX_SIZE = 368  # the body network sees the image at half of this height (one scale, as controlnet_aux)
BODY_SCALE = 0.5
HAND_BOX_SIZE = 368
HAND_SCALES = (0.5, 1.0, 1.5, 2.0)  # hand crops are seen as squares of 184, 368, 552 and 736 pixels
HAND_MAP_SIZE = 128  # the hand heatmaps of all scales are averaged on this grid
HAND_BLUR_SIGMA = 0.8
FACE_INPUT_SIZE = 384


def resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """``cv2.resize`` to (height, width): area averaging if height + width shrinks, else Lanczos.

    Images (3 channels) are resized at once; maps one channel at a time, because
    OpenCV's area resize takes at most 4 channels and its multi-channel kernels
    round differently in the last bit.
    """
    interpolation = cv2.INTER_AREA if height + width < x.shape[0] + x.shape[1] else cv2.INTER_LANCZOS4
    size = (int(width), int(height))
    if x.ndim == 2 or x.shape[2] == 3:
        return cv2.resize(x, size, interpolation=interpolation)
    return np.stack([cv2.resize(np.ascontiguousarray(x[:, :, c]), size, interpolation=interpolation) for c in range(x.shape[2])], axis=2)


def pad_right_bottom(image: np.ndarray, stride: int = STRIDE, value: int = PAD_VALUE) -> tuple[np.ndarray, tuple[int, int]]:
    """``image`` padded to multiples of ``stride``; returns it and the (bottom, right) padding."""
    h, w = image.shape[:2]
    bottom, right = -h % stride, -w % stride
    padded = np.pad(image, ((0, bottom), (0, right), (0, 0)), constant_values=value)
    return padded, (bottom, right)


def _to_input(image: np.ndarray, net: nn.Module) -> torch.Tensor:
    """(h, w, 3) uint8 BGR -> (1, 3, h, w) on the network's device and dtype, ``/256 - 0.5``."""
    p = next(net.parameters())
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))[None].astype(np.float32) / 256.0 - 0.5)
    return x.to(device=p.device, dtype=p.dtype)


def _to_maps(out: torch.Tensor) -> np.ndarray:
    """(1, C, h, w) -> (h, w, C) float32 numpy on the CPU."""
    return out[0].float().permute(1, 2, 0).cpu().numpy()


def _back_to_size(maps: np.ndarray, pad: tuple[int, int], height: int, width: int) -> np.ndarray:
    """Upsample network maps by the stride, cut the padding, resize to (height, width)."""
    h, w = maps.shape[:2]
    up = resize(maps, h * STRIDE, w * STRIDE)
    up = up[: up.shape[0] - pad[0], : up.shape[1] - pad[1]]
    return resize(up, height, width)


@torch.no_grad()
def body_maps(net: nn.Module, image_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Part heatmaps (H, W, 19) and PAFs (H, W, 38), float64, for a BGR ``uint8`` image (H, W, 3)."""
    h, w = image_bgr.shape[:2]
    scale = BODY_SCALE * BODY_BOX_SIZE / h
    scaled = resize(image_bgr, int(h * scale), int(w * scale))
    padded, pad = pad_right_bottom(scaled)
    pafs, heatmaps = net(_to_input(padded, net))
    heatmaps = _back_to_size(_to_maps(heatmaps), pad, h, w).astype(np.float64)
    pafs = _back_to_size(_to_maps(pafs), pad, h, w).astype(np.float64)
    return heatmaps, pafs


@torch.no_grad()
def hand_maps(net: nn.Module, crop_bgr: np.ndarray, scales: Sequence[float] = HAND_SCALES) -> np.ndarray:
    """Hand heatmaps (128, 128, 22), float64, averaged over ``scales``, for a BGR ``uint8`` crop."""
    blurred = cv2.GaussianBlur(crop_bgr, (0, 0), HAND_BLUR_SIGMA)
    total = np.zeros((HAND_MAP_SIZE, HAND_MAP_SIZE, net.out_channels), dtype=np.float64)
    for s in scales:
        side = int(s * HAND_BOX_SIZE)
        padded, pad = pad_right_bottom(resize(blurred, side, side))
        maps = _back_to_size(_to_maps(net(_to_input(padded, net))), pad, HAND_MAP_SIZE, HAND_MAP_SIZE)
        total += maps / len(scales)
    return total


@torch.no_grad()
def face_maps(net: nn.Module, crop_bgr: np.ndarray) -> np.ndarray:
    """Face heatmaps (71, h, w), float32, for a BGR ``uint8`` crop (h, w, 3): bilinear, corners aligned."""
    h, w = crop_bgr.shape[:2]
    out = net(_to_input(resize(crop_bgr, FACE_INPUT_SIZE, FACE_INPUT_SIZE), net))
    return F.interpolate(out.float(), (h, w), mode="bilinear", align_corners=True)[0].cpu().numpy()
