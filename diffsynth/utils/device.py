"""The one default-device rule: CUDA when a GPU is present, else the CPU (chosen at call time, never at import)."""
from __future__ import annotations

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
