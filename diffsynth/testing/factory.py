"""Tiny random-weight models written in the real on-disk formats.

One factory for the test suite and ``diffsynth demo``: every loader, converter
and pipeline runs for real on files a user could have, in milliseconds on a
CPU. Shapes are tiny but every structural rule of the real families holds
(4 VAE levels for the ×8 downsampling, 32 norm groups, 8 UNet heads, 64-wide
CLIP heads, the full 49408-token CLIP vocabulary).

Weights use fan-in scaling so that every path carries signal (with tiny
embedding weights a swapped sin/cos in the time embedding changed no pixel).
The UNet has 64 channels at its first level: with 32 channels and the family's
32 norm groups every GroupNorm would normalise single channels and erase the
time embedding's per-channel shift there.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models import convert
from ..models.sd_text_encoder import CLIPTextConfig, SDTextEncoder
from ..models.sd_unet import SDUNet, SDUNetConfig
from ..models.sd_vae import SDVAEConfig, SDVAEDecoder, SDVAEEncoder
from ..utils.atomic import atomic_save_safetensors, atomic_torch_save, atomic_write_text

TINY_UNET = SDUNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 0), context_dim=128)
TINY_VAE = SDVAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
TINY_TEXT = CLIPTextConfig(hidden_size=128, num_layers=2, intermediate_size=256)

LDM_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.transformer."}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TinySD:
    """The three configs of a tiny SD 1.x model set."""

    unet: SDUNetConfig = TINY_UNET
    vae: SDVAEConfig = TINY_VAE
    text: CLIPTextConfig = TINY_TEXT


def randomize_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Fill every parameter with seeded fan-in-scaled noise (norm scales around 1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                std = 1.0 / math.sqrt(fan_in)
                if "embedding" in name:
                    std = 0.5
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            elif name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return module


def build_sd_state_dicts(seed: int = 0, configs: TinySD = TinySD()) -> dict[str, dict[str, torch.Tensor]]:
    """Seeded random state dicts in our (LDM) layout: ``{"unet", "vae", "text_encoder"}``."""
    g = torch.Generator().manual_seed(seed)
    unet = randomize_(SDUNet(configs.unet), g)
    enc = randomize_(SDVAEEncoder(configs.vae), g)
    dec = randomize_(SDVAEDecoder(configs.vae), g)
    text = randomize_(SDTextEncoder(configs.text), g)
    return {
        "unet": dict(unet.state_dict()),
        "vae": {**enc.state_dict(), **dec.state_dict()},
        "text_encoder": dict(text.state_dict()),
    }


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype).contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()}


def _save(tensors: dict, path: str, nested: bool = False) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        atomic_save_safetensors(tensors, path)
    else:
        atomic_torch_save({"state_dict": tensors, "global_step": 1, "epoch": 0} if nested else tensors, path)
    return path


def write_sd_checkpoint(
    path: str,
    seed: int = 0,
    dtype: str = "fp32",
    *,
    nested: bool | None = None,
    ema: bool = False,
    include_vae: bool = True,
    include_text_encoder: bool = True,
    configs: TinySD = TinySD(),
) -> str:
    """A single-file LDM/civitai SD 1.x checkpoint (``.safetensors``, ``.ckpt``, ``.pt`` or ``.pth``).

    ``nested`` wraps pickles in ``{"state_dict": ...}`` as Lightning ``.ckpt`` files do
    (default for ``.ckpt``); ``ema`` adds ``model_ema.*`` copies and schedule buffers.
    """
    parts = build_sd_state_dicts(seed, configs)
    sd = {LDM_PREFIX["unet"] + k: v for k, v in parts["unet"].items()}
    if include_vae:
        sd.update({LDM_PREFIX["vae"] + k: v for k, v in parts["vae"].items()})
    if include_text_encoder:
        sd.update({LDM_PREFIX["text_encoder"] + k: v for k, v in parts["text_encoder"].items()})
        sd[LDM_PREFIX["text_encoder"] + "text_model.embeddings.position_ids"] = torch.arange(configs.text.max_positions)[None]
    if ema:
        sd.update({"model_ema." + k.replace("model.diffusion_model.", "diffusion_model").replace(".", ""): v.clone() for k, v in sd.items() if k.startswith("model.diffusion_model.")})
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
        sd["alphas_cumprod"] = torch.linspace(0.999, 0.01, 1000)
        sd["betas"] = torch.linspace(0.00085, 0.012, 1000)
    if nested is None:
        nested = path.endswith(".ckpt")
    return _save(_cast(sd, DTYPES[dtype]), path, nested=nested)


def write_vae(path: str, seed: int = 0, layout: str = "ldm", dtype: str = "fp32", configs: TinySD = TinySD()) -> str:
    """A standalone VAE file: ``layout="ldm"`` (e.g. vae-ft-mse-840000-ema-pruned) or ``"diffusers"``."""
    vae = build_sd_state_dicts(seed, configs)["vae"]
    if layout == "diffusers":
        vae = convert.convert_vae_to_diffusers(vae, configs.vae)
    elif layout != "ldm":
        raise ValueError(f"layout must be 'ldm' or 'diffusers', got {layout!r}")
    return _save(_cast(vae, DTYPES[dtype]), path)


def diffusers_unet_config(c: SDUNetConfig) -> dict:
    """``unet/config.json`` of a diffusers folder for an SD 1.x-layout UNet config."""
    levels = len(c.channel_mult)
    down = ["CrossAttnDownBlock2D" if c.transformer_depth[i] else "DownBlock2D" for i in range(levels)]
    up = ["CrossAttnUpBlock2D" if c.transformer_depth[i] else "UpBlock2D" for i in reversed(range(levels))]
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": [c.model_channels * m for m in c.channel_mult],
        "layers_per_block": c.num_res_blocks,
        "down_block_types": down,
        "up_block_types": up,
        "cross_attention_dim": c.context_dim,
        "attention_head_dim": c.num_heads,
        "use_linear_projection": c.use_linear_in_transformer,
        "norm_num_groups": c.norm_groups,
        "sample_size": 64,
    }


def diffusers_vae_config(c: SDVAEConfig) -> dict:
    n = len(c.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": c.in_channels,
        "out_channels": c.out_ch,
        "block_out_channels": [c.ch * m for m in c.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": c.num_res_blocks,
        "latent_channels": c.embed_dim,
        "norm_num_groups": 32,
        "scaling_factor": c.scaling_factor,
        "sample_size": 512,
    }


def clip_text_hf_config(c: CLIPTextConfig) -> dict:
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "max_position_embeddings": c.max_positions,
        "hidden_act": c.activation,
        "layer_norm_eps": c.layer_norm_eps,
        "projection_dim": c.hidden_size,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


def write_diffusers_folder(path: str, seed: int = 0, dtype: str = "fp32", configs: TinySD = TinySD()) -> str:
    """A diffusers pipeline folder (``unet/``, ``vae/``, ``text_encoder/`` with config.json files)."""
    parts = build_sd_state_dicts(seed, configs)
    d = DTYPES[dtype]
    items = {
        "unet": (convert.convert_unet_to_diffusers(parts["unet"], configs.unet), diffusers_unet_config(configs.unet), "diffusion_pytorch_model.safetensors"),
        "vae": (convert.convert_vae_to_diffusers(parts["vae"], configs.vae), diffusers_vae_config(configs.vae), "diffusion_pytorch_model.safetensors"),
        "text_encoder": (parts["text_encoder"], clip_text_hf_config(configs.text), "model.safetensors"),
    }
    for sub, (sd, config, weights) in items.items():
        folder = os.path.join(path, sub)
        os.makedirs(folder, exist_ok=True)
        atomic_write_text(os.path.join(folder, "config.json"), json.dumps(config, indent=2))
        atomic_save_safetensors(_cast(sd, d), os.path.join(folder, weights))
    atomic_write_text(
        os.path.join(path, "model_index.json"),
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]}, indent=2),
    )
    return path


def lora_targets(configs: TinySD = TinySD()) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """kohya name → (in, out, kernel) of the modules a typical SD LoRA trains (attention, proj, text encoder)."""
    unet = SDUNet(configs.unet)
    module_map = convert.unet_module_map(configs.unet)
    targets = {}
    for diff_name, ldm_name in module_map.items():
        if not any(s in diff_name for s in (".attn1.to_", ".attn2.to_", "proj_in", "proj_out", "ff.net")):
            continue
        module = unet.get_submodule(ldm_name)
        if isinstance(module, nn.Linear):
            targets["lora_unet_" + diff_name.replace(".", "_")] = (module.in_features, module.out_features, ())
        elif isinstance(module, nn.Conv2d):
            targets["lora_unet_" + diff_name.replace(".", "_")] = (module.in_channels, module.out_channels, tuple(module.kernel_size))
    text = SDTextEncoder(configs.text)
    for name, module in text.named_modules():
        if isinstance(module, nn.Linear) and (".self_attn." in name or ".mlp." in name):
            targets["lora_te_" + name.replace(".", "_")] = (module.in_features, module.out_features, ())
    return targets


def write_lora(path: str, seed: int = 0, rank: int = 4, alpha: float = 2.0, dtype: str = "fp16", configs: TinySD = TinySD()) -> str:
    """A kohya/civitai LoRA (``lora_unet_*``/``lora_te_*`` with ``.alpha``) for the tiny model."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (fin, fout, kernel) in lora_targets(configs).items():
        if kernel:
            down = torch.randn((rank, fin, *kernel), generator=g) / math.sqrt(fin)
            up = torch.randn((fout, rank, 1, 1), generator=g) / math.sqrt(rank)
        else:
            down = torch.randn((rank, fin), generator=g) / math.sqrt(fin)
            up = torch.randn((fout, rank), generator=g) / math.sqrt(rank)
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = up
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return _save(_cast(sd, DTYPES[dtype]), path)


def write_textual_inversion(path: str, seed: int = 0, num_vectors: int = 2, dim: int = TINY_TEXT.hidden_size) -> str:
    """An A1111 embedding: ``.pt`` with ``string_to_param`` or ``.safetensors`` with ``emb_params``."""
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn((num_vectors, dim), generator=g) * 0.5
    if path.endswith(".safetensors"):
        return _save({"emb_params": vectors}, path)
    name = os.path.splitext(os.path.basename(path))[0]
    obj = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name, "step": 100}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_torch_save(obj, path)
    return path
