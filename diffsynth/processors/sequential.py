"""A chain of processors, built from ``smoother_configs``.

``SequencialProcessor.from_model_manager(mm, configs)`` takes the config runner's list::

    [{"processor_type": "FastBlend", "config": {"inference_mode": "fast"}},
     {"processor_type": "Contrast", "config": {"rate": 1.2}}]

and builds each processor from :data:`PROCESSOR_TYPES`. Calling the chain runs the processors in
order, each on the previous one's output, and hands every one the same ``original_frames`` (the
guide video FastBlend needs) and keywords. ``SequencialProcessor`` keeps DiffSynth-Studio's
spelling; ``SequentialProcessor`` is the same class.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .base import VideoProcessor

__all__ = ["PROCESSOR_TYPES", "AutoVideoProcessor", "SequencialProcessor", "SequentialProcessor"]


def _fastblend(model_manager, config: dict[str, Any]) -> VideoProcessor:
    try:
        from .FastBlend import FastBlendSmoother
    except ImportError as exc:
        raise ImportError(f"the FastBlend processor (diffsynth/processors/FastBlend.py) could not be imported: {exc}") from exc
    build = getattr(FastBlendSmoother, "from_model_manager", None)
    return build(model_manager, **config) if build is not None else FastBlendSmoother(**config)


def _contrast(model_manager, config: dict[str, Any]) -> VideoProcessor:
    from .PILEditor import ContrastEditor

    return ContrastEditor.from_model_manager(model_manager, **config)


def _sharpness(model_manager, config: dict[str, Any]) -> VideoProcessor:
    from .PILEditor import SharpnessEditor

    return SharpnessEditor.from_model_manager(model_manager, **config)


def _rife(model_manager, config: dict[str, Any]) -> VideoProcessor:
    from .RIFE import RIFESmoother

    return RIFESmoother.from_model_manager(model_manager, **config)


# processor_type -> builder(model_manager, config). Imports are deferred so that a chain without
# FastBlend never imports it.
PROCESSOR_TYPES: dict[str, Callable[[Any, dict[str, Any]], VideoProcessor]] = {
    "FastBlend": _fastblend,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "RIFE": _rife,
}


class AutoVideoProcessor:
    """The original's factory: ``AutoVideoProcessor.from_model_manager(mm, "Contrast", rate=1.2)``."""

    @staticmethod
    def from_model_manager(model_manager, processor_type: str, **config: Any) -> VideoProcessor:
        builder = PROCESSOR_TYPES.get(processor_type)
        if builder is None:
            raise ValueError(f"unknown processor_type {processor_type!r}; valid types: {', '.join(PROCESSOR_TYPES)}")
        return builder(model_manager, dict(config))


_CONFIG_KEYS = {"processor_type", "config"}


def _processor_from_config(model_manager, entry: Any, index: int) -> VideoProcessor:
    if not isinstance(entry, Mapping):
        raise TypeError(f"smoother config {index} must be a dict like {{'processor_type': 'Contrast', 'config': {{'rate': 1.5}}}}, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _CONFIG_KEYS)
    if "processor_type" not in entry or unknown:
        problem = f"has unknown keys {unknown}" if unknown else "has no 'processor_type'"
        raise ValueError(f"smoother config {index} {problem}; an entry holds 'processor_type' (one of {', '.join(PROCESSOR_TYPES)}) and 'config' (keyword arguments)")
    config = entry.get("config") or {}
    if not isinstance(config, Mapping):
        raise TypeError(f"smoother config {index}: 'config' must be a dict of keyword arguments, got {type(config).__name__}")
    return AutoVideoProcessor.from_model_manager(model_manager, entry["processor_type"], **config)


class SequencialProcessor(VideoProcessor):
    """Runs ``processors`` in order; every one gets the same ``original_frames`` and keywords."""

    def __init__(self, processors: Iterable[Callable[..., Sequence[Any]]] = ()):
        self.processors = list(processors)

    @staticmethod
    def from_model_manager(model_manager, configs: Iterable[Mapping[str, Any]]) -> SequencialProcessor:
        """The chain described by ``configs`` (see the module docstring); the list is only read."""
        return SequencialProcessor([_processor_from_config(model_manager, entry, i) for i, entry in enumerate(configs)])

    def __call__(self, rendered_frames: Sequence[Any], original_frames: Sequence[Any] | None = None, **kwargs: Any) -> Sequence[Any]:
        for processor in self.processors:
            rendered_frames = processor(rendered_frames, original_frames=original_frames, **kwargs)
        return rendered_frames

    def __repr__(self) -> str:
        return f"SequencialProcessor({self.processors!r})"


SequentialProcessor = SequencialProcessor
