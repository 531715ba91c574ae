"""What every annotator (ControlNet condition detector) shares.

A *detector* is a callable ``detector(image) -> map``: ``image`` is an RGB
``uint8`` array ``(h, w, 3)`` already resized to the detection resolution, the
result a ``uint8`` array ``(h, w)`` or ``(h, w, 3)`` of the same size. Neural
detectors are built by ``from_folder(folder, device, dtype)``, which loads their
weight files (``weights_only=True``) from the annotator folder. ``Annotator``
(in ``__init__``) does the resizing around them, as controlnet_aux 0.0.7 did for
DiffSynth-Studio.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
import torch

ANNOTATOR_URL = "https://huggingface.co/lllyasviel/Annotators/resolve/main/{}"


def require_annotator_file(folder: str, filename: str) -> str:
    """Path of ``folder/filename``; ``FileNotFoundError`` naming the file, the folder and its download link otherwise."""
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"annotator weight file {filename} not found in {os.path.abspath(folder)}. "
            f"Download it from {ANNOTATOR_URL.format(filename)} and put it in that folder."
        )
    return path


def hwc3(x: np.ndarray) -> np.ndarray:
    """Any ``uint8`` map (gray, RGB or RGBA over white) as ``(h, w, 3)``."""
    if x.dtype != np.uint8:
        raise ValueError(f"annotator maps must be uint8, got {x.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    channels = x.shape[2]
    if channels == 3:
        return x
    if channels == 1:
        return np.repeat(x, 3, axis=2)
    if channels == 4:
        alpha = x[:, :, 3:4].astype(np.float32) / 255.0
        return (x[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    raise ValueError(f"annotator maps must have 1, 3 or 4 channels, got {channels}")


def detection_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """``(h, w)`` with the short side scaled to ``resolution`` and both sides rounded to multiples of 64.

    Sides are at least 64 (controlnet_aux produced an empty image, and crashed, for
    frames or resolutions under 32 pixels).
    """
    if resolution < 1:
        raise ValueError(f"detect resolution must be a positive number of pixels, got {resolution}")
    k = float(resolution) / min(height, width)
    new_h = max(64, int(np.round(height * k / 64.0)) * 64)
    new_w = max(64, int(np.round(width * k / 64.0)) * 64)
    return new_h, new_w


def resize_for_detection(image: np.ndarray, resolution: int) -> np.ndarray:
    """Short side to ``resolution``, both sides rounded to multiples of 64 (Lanczos up, area down).

    The resizing controlnet_aux 0.0.7 applies before and after each detector.
    """
    h, w = image.shape[:2]
    new_h, new_w = detection_size(h, w, resolution)
    upscale = resolution > min(h, w)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LANCZOS4 if upscale else cv2.INTER_AREA)


def check_image(image: np.ndarray, who: str) -> None:
    """The detector contract's input: an RGB ``uint8`` array of shape ``(h, w, 3)``."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{who} takes an RGB uint8 array of shape (h, w, 3), got {got}")


class NetworkDetector:
    """A detector around one torch network (``self.model``): device/dtype handling shared by the neural annotators."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """Move (and optionally cast) the network; returns ``self``."""
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
