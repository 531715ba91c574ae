"""Tiny random-weight AnimateDiff motion-module files in the original (guoyww) format.

``TINY_MOTION`` fits ``factory.TINY_UNET`` (levels of 64 and 128 channels, one
resnet per level, so one module per down level and two per up level). Files
are flat ``{key: tensor}`` dicts as ``mm_sd_v15.ckpt`` / ``mm_sd_v15_v2.ckpt``:
``torch.save`` for ``.ckpt``/``.pth``/``.pt``, or ``.safetensors``.

Weights are fan-in-scaled noise (``factory.randomize_``), ``proj_out`` included:
real AnimateDiff training starts ``proj_out`` at zero, which would make every
module an identity and hide mapping bugs. ``pos_encoder.pe`` is the true
sinusoid, as real files store it.
"""
from __future__ import annotations

import torch

from ..models.sd_motion import MotionModuleConfig, SDMotionModel
from .factory import DTYPES, TINY_UNET, _cast, _save, randomize_

__all__ = ["TINY_MOTION", "TINY_MOTION_V1", "build_motion_state_dict", "write_motion_module"]

TINY_MOTION = MotionModuleConfig.for_unet(TINY_UNET, version="v2")
TINY_MOTION_V1 = MotionModuleConfig.for_unet(TINY_UNET, version="v1")


def build_motion_state_dict(seed: int = 0, config: MotionModuleConfig = TINY_MOTION) -> dict[str, torch.Tensor]:
    """Seeded random motion-module weights in the original key layout (``pe`` buffers = the sinusoid)."""
    g = torch.Generator().manual_seed(seed)
    return dict(randomize_(SDMotionModel(config), g).state_dict())  # randomize_ touches parameters only


def write_motion_module(
    path: str, seed: int = 0, version: str = "v2", config: MotionModuleConfig | None = None, dtype: str = "fp32"
) -> str:
    """Write a tiny motion-module file (``.ckpt``/``.pth``/``.pt`` via ``torch.save``, or ``.safetensors``).

    ``version`` picks the v1 (no middle module, 24 positions) or v2 (middle
    module, 32 positions) layout of ``TINY_MOTION``; ``config`` overrides it.
    """
    if config is None:
        if version not in ("v1", "v2"):
            raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
        config = TINY_MOTION if version == "v2" else TINY_MOTION_V1
    if not path.endswith((".ckpt", ".pth", ".pt", ".safetensors")):
        raise ValueError(f"a motion-module file is a .ckpt, .pth, .pt or .safetensors file, got {path!r}")
    return _save(_cast(build_motion_state_dict(seed, config), DTYPES[dtype]), path)
