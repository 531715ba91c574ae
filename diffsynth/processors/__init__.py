"""Video post-processors ("smoothers"): FastBlend, RIFE, PIL contrast/sharpness, and their chain.

``FastBlendSmoother`` is imported on first use (``diffsynth.processors.FastBlendSmoother`` or
``from diffsynth.processors.FastBlend import FastBlendSmoother``).
"""
from .base import MappedFrames, VideoProcessor
from .PILEditor import ContrastEditor, SharpnessEditor
from .RIFE import RIFESmoother
from .sequential import PROCESSOR_TYPES, AutoVideoProcessor, SequencialProcessor, SequentialProcessor

__all__ = [
    "VideoProcessor",
    "MappedFrames",
    "SequencialProcessor",
    "SequentialProcessor",
    "AutoVideoProcessor",
    "PROCESSOR_TYPES",
    "ContrastEditor",
    "SharpnessEditor",
    "RIFESmoother",
]  # FastBlendSmoother is left out so that `import *` does not import FastBlend


def __getattr__(name: str):
    if name == "FastBlendSmoother":
        from .FastBlend import FastBlendSmoother

        return FastBlendSmoother
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
