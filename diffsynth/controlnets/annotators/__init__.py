"""``Annotator``: turns a frame into a ControlNet condition image.

Same interface and resizing as DiffSynth-Studio's annotator (which wrapped
controlnet_aux 0.0.7): the frame is resized so its short side equals the detect
resolution with both sides rounded to multiples of 64, the detector runs, its map
is resized to the image resolution's multiple-of-64 size (bilinear), then back to
the frame size (PIL bicubic). Weights come from a local folder and run on the
given device; nothing is downloaded.
"""
from __future__ import annotations

import importlib
from typing import Callable

import cv2
import numpy as np
import torch
from PIL import Image

from .base import ANNOTATOR_URL, detection_size, hwc3, require_annotator_file, resize_for_detection

PROCESSOR_IDS = ("canny", "depth", "softedge", "lineart", "lineart_anime", "openpose", "tile")

# processor id -> (module, class, extra from_folder options). Detectors return maps in their final polarity
# (lineart maps are already inverted to white lines on black).
_NEURAL = {
    "depth": ("depth", "DepthDetector", {}),
    "softedge": ("hed", "HEDDetector", {}),
    "lineart": ("lineart", "LineartDetector", {"coarse": False}),
    "lineart_anime": ("lineart_anime", "LineartAnimeDetector", {}),
    "openpose": ("openpose", "OpenposeDetector", {"include_body": True, "include_hand": True, "include_face": True}),
}


def canny(image: np.ndarray, low_threshold: int = 100, high_threshold: int = 200) -> np.ndarray:
    """OpenCV Canny edges (white on black) with controlnet_aux's default thresholds."""
    return cv2.Canny(image, low_threshold, high_threshold)


def check_processor_id(processor_id: str) -> str:
    if processor_id not in PROCESSOR_IDS:
        raise ValueError(f"unsupported processor_id {processor_id!r}; valid ones: {', '.join(PROCESSOR_IDS)}")
    return processor_id


class Annotator:
    """``Annotator(processor_id, model_path="models/Annotators", detect_resolution=None, device=..., torch_dtype=...)``.

    ``tile`` passes the frame through unchanged; ``canny`` needs no weights; the
    others load their weight files from ``model_path`` when constructed (a
    missing file is an error naming it, the folder and its download link).
    """

    def __init__(
        self,
        processor_id: str,
        model_path: str = "models/Annotators",
        detect_resolution: int | None = None,
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype = torch.float32,
    ):
        self.processor_id = check_processor_id(processor_id)
        self.detect_resolution = detect_resolution
        self.device = device
        self.detector: Callable[[np.ndarray], np.ndarray] | None
        if processor_id == "tile":
            self.detector = None
        elif processor_id == "canny":
            self.detector = canny
        else:
            module, cls, options = _NEURAL[processor_id]
            detector_cls = getattr(importlib.import_module(f"{__name__}.{module}"), cls)
            self.detector = detector_cls.from_folder(model_path, device=device, dtype=torch_dtype, **options)

    def to(self, device: str | torch.device) -> "Annotator":
        if hasattr(self.detector, "to"):
            self.detector.to(device)
        self.device = device
        return self

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if self.detector is None:
            return image.convert("RGB")
        frame = hwc3(np.asarray(image.convert("RGB"), dtype=np.uint8))
        detect_input = resize_for_detection(frame, self.detect_resolution or min(width, height))
        detected = hwc3(self.detector(detect_input))
        # controlnet_aux sizes the map like the (already resized) input at the image resolution
        target_h, target_w = detection_size(*detect_input.shape[:2], min(width, height))
        detected = cv2.resize(detected, (target_w, target_h), interpolation=cv2.INTER_LINEAR)
        return Image.fromarray(detected).resize((width, height))


__all__ = ["ANNOTATOR_URL", "Annotator", "PROCESSOR_IDS", "canny", "check_processor_id", "require_annotator_file"]
