"""Per-frame PIL enhancements: ``ImageEnhance.Contrast`` and ``ImageEnhance.Sharpness``.

``rate`` is PIL's enhancement factor: 1.0 leaves the frame unchanged, 1.5 (the default, as
DiffSynth-Studio) increases contrast / sharpness by half. The result is a lazy view.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageEnhance

from .base import MappedFrames, VideoProcessor

__all__ = ["PILEditor", "ContrastEditor", "SharpnessEditor"]


class PILEditor(VideoProcessor):
    """Applies ``enhancer(frame).enhance(rate)`` to every frame; subclasses name the enhancer."""

    enhancer: type  # an ImageEnhance class

    def __init__(self, rate: float = 1.5):
        self.rate = float(rate)

    def edit(self, frame: Image.Image) -> Image.Image:
        return self.enhancer(frame).enhance(self.rate)

    def __call__(self, rendered_frames: Sequence[Any], original_frames: Sequence[Any] | None = None, **kwargs: Any) -> MappedFrames:
        return MappedFrames(rendered_frames, self.edit)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rate={self.rate})"


class ContrastEditor(PILEditor):
    enhancer = ImageEnhance.Contrast


class SharpnessEditor(PILEditor):
    enhancer = ImageEnhance.Sharpness
