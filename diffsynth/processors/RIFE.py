"""``diffsynth.processors.RIFE.RIFESmoother``, the original import path of the RIFE smoother.

The class lives in :mod:`diffsynth.extensions.RIFE` (one class serves both of the original's
variants); it is registered here as a :class:`VideoProcessor` so ``isinstance`` checks hold
without the extension importing the processors package.
"""
from ..extensions.RIFE import RIFESmoother
from .base import VideoProcessor

__all__ = ["RIFESmoother"]

VideoProcessor.register(RIFESmoother)
