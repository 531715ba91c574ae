"""Random-weight MiDaS DPT-hybrid files in the layout of ``dpt_hybrid-midas-501f0c75.pt``.

The real file is a plain ``torch.save``'d state dict (no wrapper; controlnet_aux's
``BaseModel.load`` would unwrap ``{"model": ..., "optimizer": ...}`` but the
released file is not wrapped). Key names and shapes come from
:func:`diffsynth.controlnets.annotators.midas_convert.midas_layout`; the tiny
config keeps every structural rule (3 ResNet stages, downsampling first blocks,
32 GroupNorm groups, 64-wide heads, two ViT taps, 4 fusion blocks).
"""
from __future__ import annotations

import math

import torch

from ..controlnets.annotators.midas_convert import MIDAS_HYBRID, TINY_MIDAS_HYBRID, MidasHybridConfig, midas_layout
from ..utils.atomic import atomic_torch_save

__all__ = ["build_midas_state_dict", "write_midas_file", "MIDAS_HYBRID", "TINY_MIDAS_HYBRID"]


def build_midas_state_dict(seed: int = 0, config: MidasHybridConfig = TINY_MIDAS_HYBRID) -> dict[str, torch.Tensor]:
    """Seeded random fp32 tensors for every key of the MiDaS layout.

    Fan-in-scaled weights so every path carries signal; norm scales around 1 and
    non-zero biases so that a swapped weight/bias or q/k/v changes the output.
    """
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in midas_layout(config).items():
        if key.endswith(("cls_token", "pos_embed")):
            value = 0.5 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            value = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith(".weight"):  # GroupNorm / LayerNorm scales
            value = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            value = 0.05 * torch.randn(shape, generator=g)
        sd[key] = value
    return sd


def write_midas_file(path: str, seed: int = 0, config: MidasHybridConfig = TINY_MIDAS_HYBRID, wrapped: bool = False) -> str:
    """Write a random-weight MiDaS DPT-hybrid ``.pt`` to ``path`` (atomically) and return ``path``.

    ``config=MIDAS_HYBRID`` gives the full-size file (~470 MB, 123 M parameters).
    ``wrapped=True`` writes ``{"model": sd, "optimizer": {}}``, the training-checkpoint
    form MiDaS's loader also accepts.
    """
    sd = build_midas_state_dict(seed, config)
    atomic_torch_save({"model": sd, "optimizer": {}} if wrapped else sd, path)
    return path
