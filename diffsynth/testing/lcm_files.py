"""Tiny LCM-LoRA and AnimateLCM files in their real layouts, for the tiny SD 1.5 and SDXL models.

What the real files hold (sources in ``diffsynth/models/lora.py`` and ``detect.py``):

* **LCM-LoRA** (latent-consistency/lcm-lora-sdv1-5, lcm-lora-sdxl): a UNet-only LoRA trained by
  diffusers' ``examples/consistency_distillation/train_lcm_distill_lora_*`` scripts with PEFT,
  rank 64, ``target_modules`` = :data:`LCM_TARGET_MODULES` and PEFT's default ``lora_alpha`` 8
  (the scripts of Nov. 2023 set no alpha). The scripts export it in the kohya layout with
  ``.alpha`` keys (``get_module_kohya_state_dict``: ``lora_unet_<diffusers path>``), and save
  PEFT state dicts through ``save_lora_weights`` (``unet.<path>.lora_A.weight``; the later SDXL
  script first applies ``convert_state_dict_to_diffusers``, giving ``.lora.down`` names for the
  attention projections). :func:`write_lcm_lora` writes any of the three layouts.
* **AnimateLCM's LoRA** (``AnimateLCM_sd15_t2v_lora.safetensors``): the same kind of LoRA in
  the kohya layout (AnimateLCM's ``convert_lcm_lora`` reads ``lora_unet_*.lora_down.weight``
  and merges with a fixed 1/8, i.e. alpha 8 at rank 64).
* **AnimateLCM's motion module** (``AnimateLCM_sd15_t2v.ckpt``): AnimateDiff v2 keys without
  the ``pos_encoder.pe`` tables (64 positions, computed).

Tiny files keep the real ratios where they matter: rank 8 with alpha 1 is the real 1/8 scale.
Factors are random, the up factor included (trained files have non-zero ones), so a merge
visibly changes the output. The factors depend only on the seed and the module list, never on
the layout, so the same seed gives the same LoRA in every layout.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..models import convert
from ..models.detect import ANIMATELCM_POSITIONS
from ..models.sd_motion import MotionModuleConfig
from ..models.sd_text_encoder import SDTextEncoder
from ..models.sd_unet import SDUNet
from ..models.sdxl_text_encoder import SDXLTextEncoder, SDXLTextEncoder2
from ..models.sdxl_unet import SDXLUNet
from ..utils.atomic import atomic_save_safetensors
from .factory import DTYPES, TINY_UNET, TinySD, TinySDXL, _cast, _save
from .motion_files import build_motion_state_dict

__all__ = [
    "LAYOUTS",
    "LCM_TARGET_MODULES",
    "LoRATarget",
    "TINY_ANIMATELCM",
    "lcm_lora_targets",
    "lora_state_dict",
    "write_animatelcm_lora",
    "write_animatelcm_motion_module",
    "write_lcm_lora",
]

# The LoraConfig(target_modules=...) of diffusers' LCM-LoRA scripts (train_lcm_distill_lora_sd_wds.py,
# train_lcm_distill_lora_sdxl_wds.py, commit db2d8e76f8 "Add LCM Scripts", 2023-11-09). PEFT adapts a
# module whose name equals an entry or ends with "." + entry.
LCM_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)
LAYOUTS = ("kohya", "peft", "diffusers")

# diffusers' PEFT_TO_DIFFUSERS renames (diffusers/utils/state_dict_utils.py): attention projections
# of the UNet get LoRALinearLayer names, those of the text encoders lora_linear_layer names.
_UNET_DIFFUSERS_NAMES = ("to_q", "to_k", "to_v", "to_out.0")
_TEXT_DIFFUSERS_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj")

TINY_ANIMATELCM = MotionModuleConfig.for_unet(TINY_UNET, version="v2", max_positions=ANIMATELCM_POSITIONS)


@dataclass(frozen=True)
class LoRATarget:
    """One module a LoRA adapts: its component, its diffusers / Hugging Face path and its weight shape."""

    component: str  # "unet", "text_encoder" or "text_encoder_2"
    path: str  # e.g. "down_blocks.0.resnets.0.time_emb_proj", "text_model.encoder.layers.0.self_attn.q_proj"
    shape: tuple[int, ...]


def _peft_targets(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _weight_shape(module: nn.Module) -> tuple[int, ...] | None:
    return tuple(module.weight.shape) if isinstance(module, (nn.Linear, nn.Conv2d)) else None


def lcm_lora_targets(model: str = "sd15", configs: TinySD | TinySDXL | None = None, text_encoders: bool = False) -> list[LoRATarget]:
    """The UNet modules an LCM-LoRA adapts in the tiny model (``model`` ``"sd15"`` or ``"sdxl"``).

    ``text_encoders`` adds the text encoders' attention and MLP projections, which the real
    LCM-LoRAs do not have; tests use it to cover text-encoder keys in every layout.
    """
    if model not in ("sd15", "sdxl"):
        raise ValueError(f"model must be 'sd15' or 'sdxl', got {model!r}")
    configs = configs or (TinySD() if model == "sd15" else TinySDXL())
    with torch.device("meta"):
        unet = (SDUNet if model == "sd15" else SDXLUNet)(configs.unet)
        encoders = [("text_encoder", SDTextEncoder(configs.text) if model == "sd15" else SDXLTextEncoder(configs.text))]
        if model == "sdxl":
            encoders.append(("text_encoder_2", SDXLTextEncoder2(configs.text_2)))
    out = []
    for diffusers_path, ldm_path in convert.unet_module_map(configs.unet).items():
        shape = _weight_shape(unet.get_submodule(ldm_path))
        if shape is not None and _peft_targets(diffusers_path, LCM_TARGET_MODULES):
            out.append(LoRATarget("unet", diffusers_path, shape))
    if text_encoders:
        for component, encoder in encoders:
            for path, module in encoder.named_modules():
                if isinstance(module, nn.Linear) and (".self_attn." in path or ".mlp." in path):
                    out.append(LoRATarget(component, path, tuple(module.weight.shape)))
    return out


def _factors(targets: list[LoRATarget], seed: int, rank: int) -> list[tuple[LoRATarget, torch.Tensor, torch.Tensor]]:
    """``(target, down, up)`` per target: down ``[r, in(, kh, kw)]``, up ``[out, r(, 1, 1)]``, fan-in scaled."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in targets:
        fout, fin, *kernel = t.shape
        down = torch.randn((rank, fin, *kernel), generator=g) / math.sqrt(fin * math.prod(kernel))
        up = torch.randn((fout, rank, *([1, 1] if kernel else [])), generator=g) / math.sqrt(rank)
        out.append((t, down, up))
    return out


def _kohya_prefix(component: str, model: str) -> str:
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder_2":
        return "lora_te2_"
    return "lora_te_" if model == "sd15" else "lora_te1_"


def _dotted_names(t: LoRATarget, layout: str) -> tuple[str, str]:
    """The (down, up) suffixes of a PEFT or diffusers key after ``<component>.<path>.``."""
    if layout == "diffusers" and t.component == "unet" and any(t.path.endswith("." + n) for n in _UNET_DIFFUSERS_NAMES):
        return "lora.down.weight", "lora.up.weight"
    if layout == "diffusers" and t.component != "unet" and t.path.rsplit(".", 1)[-1] in _TEXT_DIFFUSERS_NAMES:
        return "lora_linear_layer.down.weight", "lora_linear_layer.up.weight"
    return "lora_A.weight", "lora_B.weight"


def lora_state_dict(
    targets: list[LoRATarget], layout: str = "kohya", *, model: str = "sd15", seed: int = 0, rank: int = 8, alpha: float | None = 1.0
) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """``(tensors, safetensors metadata)`` of a LoRA over ``targets`` in ``layout`` (one of :data:`LAYOUTS`).

    ``alpha``: kohya files store it as ``.alpha`` keys; PEFT and diffusers files as diffusers
    writes it since 0.35, in the ``lora_adapter_metadata`` JSON (``"unet.lora_alpha"``,
    ``"unet.r"``, …). ``None`` stores none (scale 1), as the LCM scripts' PEFT exports.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    tensors: dict[str, torch.Tensor] = {}
    for t, down, up in _factors(targets, seed, rank):
        if layout == "kohya":
            stem = _kohya_prefix(t.component, model) + t.path.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = down
            tensors[f"{stem}.lora_up.weight"] = up
            if alpha is not None:
                tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
        else:
            down_name, up_name = _dotted_names(t, layout)
            tensors[f"{t.component}.{t.path}.{down_name}"] = down
            tensors[f"{t.component}.{t.path}.{up_name}"] = up
    metadata = None
    if layout != "kohya" and alpha is not None:
        config = {}
        for component in sorted({t.component for t in targets}):
            paths = sorted({t.path for t in targets if t.component == component})
            config.update({
                f"{component}.r": rank, f"{component}.lora_alpha": alpha, f"{component}.rank_pattern": {},
                f"{component}.alpha_pattern": {}, f"{component}.use_rslora": False, f"{component}.use_dora": False,
                f"{component}.target_modules": paths,
            })
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}
    return tensors, metadata


def write_lcm_lora(
    path: str,
    model: str = "sd15",
    layout: str = "kohya",
    *,
    seed: int = 0,
    rank: int = 8,
    alpha: float | None = 1.0,
    text_encoders: bool = False,
    dtype: str = "fp16",
    configs: TinySD | TinySDXL | None = None,
) -> str:
    """A tiny LCM-LoRA for the tiny SD 1.5 (``model="sd15"``) or SDXL model in ``layout`` (``.safetensors``)."""
    if not path.endswith(".safetensors"):
        raise ValueError(f"LCM-LoRA files are .safetensors files, got {path!r}")
    targets = lcm_lora_targets(model, configs, text_encoders)
    tensors, metadata = lora_state_dict(targets, layout, model=model, seed=seed, rank=rank, alpha=alpha)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_save_safetensors(_cast(tensors, DTYPES[dtype]), path, metadata=metadata)
    return path


def write_animatelcm_lora(path: str, seed: int = 0, rank: int = 8, dtype: str = "fp16") -> str:
    """A tiny ``AnimateLCM_sd15_t2v_lora.safetensors``: kohya layout, UNet only, alpha/rank = 1/8."""
    return write_lcm_lora(path, "sd15", "kohya", seed=seed, rank=rank, alpha=rank / 8, dtype=dtype)


def write_animatelcm_motion_module(path: str, seed: int = 0, dtype: str = "fp32") -> str:
    """A tiny ``AnimateLCM_sd15_t2v.ckpt``: AnimateDiff v2 keys (middle module included), no ``pos_encoder.pe``."""
    if not path.endswith((".ckpt", ".pth", ".pt", ".safetensors")):
        raise ValueError(f"a motion-module file is a .ckpt, .pth, .pt or .safetensors file, got {path!r}")
    sd = {k: v for k, v in build_motion_state_dict(seed, TINY_ANIMATELCM).items() if ".pos_encoder." not in k}
    return _save(_cast(sd, DTYPES[dtype]), path)
