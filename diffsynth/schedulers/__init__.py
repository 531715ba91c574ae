"""Noise schedules and sampler steps (pure functions of tensors and floats)."""

from .ddim import EnhancedDDIMScheduler

__all__ = ["EnhancedDDIMScheduler"]
