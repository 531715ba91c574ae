"""ControlNet state dicts: v1.x single files and diffusers ``ControlNetModel`` folders.

Our ``SDControlNet`` uses the names of lllyasviel's ControlNet files after
``control_model.`` (:func:`split_controlnet_checkpoint` strips it). Diffusers
names are mapped by rules, as the UNet's in ``convert``: the encoder (time
embedding, down blocks, mid block) is the UNet's own map restricted to those
modules, plus three ControlNet-only parts:

====================================================  ==========================================
diffusers ``ControlNetModel``                         ours (LDM ``cldm.ControlNet``)
====================================================  ==========================================
``controlnet_cond_embedding.conv_in``                 ``input_hint_block.0``
``controlnet_cond_embedding.blocks.{i}``              ``input_hint_block.{2i+2}``
``controlnet_cond_embedding.conv_out``                ``input_hint_block.{2n}`` (n hint convs; 14)
``controlnet_down_blocks.{k}``                        ``zero_convs.{k}.0``
``controlnet_mid_block``                              ``middle_block_out.0``
====================================================  ==========================================

Checked key for key and tensor for tensor against diffusers' own
``convert_controlnet_checkpoint`` (0.42.1) in ``tests/test_controlnet_model.py``;
diffusers is a test-only dependency and is never imported here.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .convert import LDM_IGNORED, _check_fixed, _convert, _few, _ignored, _Module, _prefixes, _unet_modules, unet_config_from_diffusers
from .errors import ModelFileError
from .sd_controlnet import ControlNetConfig

__all__ = [
    "CONTROLNET_IGNORED",
    "CONTROLNET_PREFIX",
    "CONTROLNET_ROOTS",
    "controlnet_config_from_diffusers",
    "controlnet_key_map",
    "controlnet_module_map",
    "convert_controlnet_from_diffusers",
    "convert_controlnet_to_diffusers",
    "split_controlnet_checkpoint",
]

StateDict = dict[str, torch.Tensor]

CONTROLNET_PREFIX = "control_model."
# First name component of every ControlNet parameter (ours = LDM layout, prefix stripped).
CONTROLNET_ROOTS = ("time_embed.", "input_blocks.", "middle_block.", "input_hint_block.", "zero_convs.", "middle_block_out.")
_ENCODER_ROOTS = ("time_embed.", "input_blocks.", "middle_block.")

# Entries of ControlNet files that are not ControlNet weights; dropped. ControlNet v1.0 files
# (control_sd15_*.pth, 5.7 GB) are whole ControlLDM checkpoints: besides control_model.* they
# hold the SD 1.5 model they were trained on and the DDPM buffers. v1.1 files hold control_model.* only.
CONTROLNET_IGNORED: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "the SD 1.5 UNet inside ControlNet v1.0 files; the pipeline uses the UNet of the SD checkpoint it is given"),
    ("first_stage_model.", "the SD 1.5 VAE inside ControlNet v1.0 files"),
    ("cond_stage_model.", "the CLIP text encoder inside ControlNet v1.0 files"),
    *LDM_IGNORED,  # DDPM schedule buffers, model_ema.*, logvar, scale_factor, ...
)


# --------------------------------------------------------------------------- key maps


def _controlnet_modules(c: ControlNetConfig) -> list[_Module]:
    """Every parameter-holding module of the ControlNet, (diffusers path, our path)."""
    encoder = [m for m in _unet_modules(c.unet) if m.ldm.startswith(_ENCODER_ROOTS)]
    n_skips = 1 + max(int(m.ldm.split(".")[1]) for m in encoder if m.ldm.startswith("input_blocks."))
    n_hint = len(c.hint_block_channels)
    hint = [_Module("controlnet_cond_embedding.conv_in", "input_hint_block.0")]
    hint += [_Module(f"controlnet_cond_embedding.blocks.{i}", f"input_hint_block.{2 * i + 2}") for i in range(n_hint - 1)]
    hint.append(_Module("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * n_hint}"))
    zero = [_Module(f"controlnet_down_blocks.{k}", f"zero_convs.{k}.0") for k in range(n_skips)]
    zero.append(_Module("controlnet_mid_block", "middle_block_out.0"))
    return encoder + hint + zero


def controlnet_module_map(config: ControlNetConfig) -> dict[str, str]:
    """``{diffusers module path: our module path}`` for every ControlNet module with parameters."""
    return {m.diffusers: m.ldm for m in _controlnet_modules(config)}


def controlnet_key_map(config: ControlNetConfig) -> dict[str, str]:
    """``{diffusers ControlNetModel parameter name: our (LDM) parameter name}``."""
    return {f"{m.diffusers}.{p}": f"{m.ldm}.{p}" for m in _controlnet_modules(config) for p in m.params}


def convert_controlnet_from_diffusers(sd: Mapping[str, torch.Tensor], config: ControlNetConfig, *, source: str = "<state dict>") -> StateDict:
    """A diffusers ``ControlNetModel`` state dict renamed to our ``SDControlNet`` names (strict, tensors shared)."""
    return _convert(sd, _controlnet_modules(config), to_ldm=True, source=source, what="diffusers ControlNet")


def convert_controlnet_to_diffusers(sd: Mapping[str, torch.Tensor], config: ControlNetConfig, *, source: str = "<state dict>") -> StateDict:
    """Our ``SDControlNet`` state dict renamed to diffusers ``ControlNetModel`` names (strict, tensors shared)."""
    return _convert(sd, _controlnet_modules(config), to_ldm=False, source=source, what="ControlNet (LDM layout)")


# --------------------------------------------------------------------------- diffusers config.json

DIFFUSERS_CONTROLNET_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": (16, 32, 96, 256),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
}
# Options SDControlNet implements with one value only (the UNet's own fixed options are checked
# by unet_config_from_diffusers). global_pool_conditions is set by "shuffle"-style ControlNets.
DIFFUSERS_CONTROLNET_FIXED: dict[str, Any] = {
    "controlnet_conditioning_channel_order": "rgb",
    "global_pool_conditions": False,
    "addition_embed_type": None,
}
_MIRROR = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


def controlnet_config_from_diffusers(config_json: Mapping[str, Any], *, source: str = "config.json") -> ControlNetConfig:
    """Our ``ControlNetConfig`` from a diffusers ``ControlNetModel`` ``config.json`` (as a dict).

    The encoder is read by ``unet_config_from_diffusers`` (same head rules);
    ``conditioning_embedding_out_channels`` ``(16, 32, 96, 256)`` becomes the
    LDM hint chain ``(16, 16, 32, 32, 96, 96, 256)``. Raises
    :class:`ModelFileError` naming ``source`` for what ``SDControlNet`` cannot build.
    """
    cfg = {**DIFFUSERS_CONTROLNET_DEFAULTS, **config_json}

    def refuse(problem: str) -> ModelFileError:
        return ModelFileError(
            source, f"describes a ControlNet this program cannot build: {problem}.", "Only SD 1.x/2.x ControlNets (no SDXL, no global pooling) are supported."
        )

    _check_fixed(cfg, DIFFUSERS_CONTROLNET_FIXED, refuse)
    # A ControlNet config has no decoder entries; give unet_config_from_diffusers the mirror image
    # of the encoder, so that only the encoder's description decides.
    down = list(cfg["down_block_types"])
    unet_json = {**cfg, "up_block_types": [_MIRROR.get(t, t) for t in reversed(down)], "out_channels": cfg["in_channels"]}
    try:
        unet = unet_config_from_diffusers(unet_json, source=source)
    except ModelFileError as exc:
        raise ModelFileError(source, "is a ControlNet config whose encoder " + exc.problem, exc.remedy) from exc
    outs = cfg["conditioning_embedding_out_channels"]
    if not isinstance(outs, (list, tuple)) or not outs or not all(isinstance(c, int) and c > 0 for c in outs):
        raise refuse(f"conditioning_embedding_out_channels {outs!r} (expected a list of channel counts)")
    hint = [outs[0]]
    for a, b in zip(outs[:-1], outs[1:]):  # diffusers block pair: conv a->a, then conv a->b with stride 2
        hint += [a, b]
    return ControlNetConfig(unet=unet, hint_channels=int(cfg["conditioning_channels"]), hint_block_channels=tuple(int(c) for c in hint))


# --------------------------------------------------------------------------- single files


def split_controlnet_checkpoint(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> StateDict:
    """The ControlNet of a v1.x file (``.pth``/``.safetensors``), in our names.

    Accepts ``control_model.*`` keys (lllyasviel's files) and files that store the
    same keys bare (``input_hint_block.*``, ``zero_convs.*``, ...; some
    safetensors exports). Entries of :data:`CONTROLNET_IGNORED` are dropped (the
    SD model and DDPM buffers that v1.0 files carry). Anything else, a mix of
    prefixed and bare keys, or a file with no ControlNet raises
    :class:`ModelFileError` naming ``source`` and saying what it holds.
    Completeness is checked when the result is loaded (``loading.instantiate``).
    """
    prefixed: StateDict = {}
    bare: StateDict = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, value in sd.items():
        if key.startswith(CONTROLNET_PREFIX):
            prefixed[key[len(CONTROLNET_PREFIX):]] = value
        elif _ignored(key, CONTROLNET_IGNORED):
            dropped.append(key)
        elif key.startswith(CONTROLNET_ROOTS):
            bare[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ModelFileError(
            source,
            f"holds {len(unknown)} entries that are not part of a ControlNet (by prefix: {_prefixes(unknown)}; e.g. {_few(sorted(unknown))}).",
            "Expected a ControlNet v1.x file (control_model.* keys) or a diffusers ControlNet folder with its config.json.",
        )
    if prefixed and bare:
        raise ModelFileError(
            source,
            f"mixes {len(prefixed)} control_model.* keys with {len(bare)} unprefixed ControlNet keys (e.g. {_few(sorted(bare))}).",
            "The file is not a ControlNet as published; download it again.",
        )
    result = prefixed or bare
    if not any(k.startswith(("input_hint_block.", "zero_convs.")) for k in result):
        if any(k.startswith("model.diffusion_model.") for k in dropped):
            problem = "is a Stable Diffusion checkpoint (model.diffusion_model.* keys), not a ControlNet."
        else:
            problem = f"holds no ControlNet (no control_model.*, input_hint_block.* or zero_convs.* keys; top-level names: {_prefixes(sd)})."
        raise ModelFileError(source, problem, "Pass a ControlNet file (e.g. control_v11p_sd15_canny.pth) where a ControlNet is expected.")
    return result
