"""Estimates of a render before it starts (disk, RAM, device memory, time) and the measurements that check them."""
from .core import Estimate, StageEstimate, estimate_plan

__all__ = ["Estimate", "StageEstimate", "estimate_plan"]
