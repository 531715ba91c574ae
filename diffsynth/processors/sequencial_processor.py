"""The original's import path: ``from diffsynth.processors.sequencial_processor import SequencialProcessor``."""
from .sequential import SequencialProcessor, SequentialProcessor

__all__ = ["SequencialProcessor", "SequentialProcessor"]
