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
from dataclasses import dataclass

import torch
from torch import nn

from ..models import convert
from ..models.sd_text_encoder import CLIPTextConfig, SDTextEncoder
from ..models.sd_unet import SDUNet, SDUNetConfig
from ..models.sd_vae import SDVAEConfig, SDVAEDecoder, SDVAEEncoder
from ..models.sdxl_text_encoder import OpenCLIPTextConfig, SDXLTextEncoder, SDXLTextEncoder2, convert_hf_text_to_open_clip
from ..models.sdxl_unet import SDXL_ADD_TIME_DIM, SDXL_VAE_SCALING_FACTOR, SDXLUNet, SDXLVAEDecoder, SDXLVAEEncoder
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
    items = {
        "unet": (convert.convert_unet_to_diffusers(parts["unet"], configs.unet), diffusers_unet_config(configs.unet), "diffusion_pytorch_model.safetensors"),
        "vae": (convert.convert_vae_to_diffusers(parts["vae"], configs.vae), diffusers_vae_config(configs.vae), "diffusion_pytorch_model.safetensors"),
        "text_encoder": (parts["text_encoder"], clip_text_hf_config(configs.text), "model.safetensors"),
    }
    index = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]}
    return _write_pipeline_folder(path, items, DTYPES[dtype], "StableDiffusionPipeline", index)


def _write_pipeline_folder(path: str, items: dict, dtype, class_name: str, index: dict) -> str:
    """Component folders ``path/<sub>/`` (config.json + weights) and ``model_index.json``."""
    for sub, (sd, config, weights) in items.items():
        folder = os.path.join(path, sub)
        os.makedirs(folder, exist_ok=True)
        atomic_write_text(os.path.join(folder, "config.json"), json.dumps(config, indent=2))
        atomic_save_safetensors(_cast(sd, dtype), os.path.join(folder, weights))
    atomic_write_text(os.path.join(path, "model_index.json"), json.dumps({"_class_name": class_name, **index}, indent=2))
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


# --------------------------------------------------------------------------- SDXL
#
# Every structural rule of SDXL holds: no attention at the first level, two transformer
# blocks per attention layer (and in the middle block), 64-channel heads, linear
# projections, the context = CLIP-L width + bigG width, the added condition = pooled
# projection + 6 × 256 size-id sinusoids, a bigG-style second encoder (exact GELU,
# projection of another width than the hidden size so a missed transposition fails), the
# SDXL latent scaling factor.

TINY_SDXL_TEXT = CLIPTextConfig(hidden_size=64, num_layers=3, intermediate_size=128)
TINY_SDXL_TEXT_2 = OpenCLIPTextConfig(hidden_size=128, num_layers=3, intermediate_size=256, projection_dim=96)
TINY_SDXL_UNET = SDUNetConfig(
    model_channels=64,
    channel_mult=(1, 2),
    num_res_blocks=1,
    transformer_depth=(0, 2),
    mid_transformer_depth=2,
    num_heads=None,
    num_head_channels=64,
    context_dim=TINY_SDXL_TEXT.hidden_size + TINY_SDXL_TEXT_2.hidden_size,
    use_linear_in_transformer=True,
    adm_in_channels=TINY_SDXL_TEXT_2.projection_dim + 6 * SDXL_ADD_TIME_DIM,
)
TINY_SDXL_VAE = SDVAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, scaling_factor=SDXL_VAE_SCALING_FACTOR)

SDXL_LDM_PREFIX = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}


@dataclass(frozen=True)
class TinySDXL:
    """The four configs of a tiny SDXL model set."""

    unet: SDUNetConfig = TINY_SDXL_UNET
    vae: SDVAEConfig = TINY_SDXL_VAE
    text: CLIPTextConfig = TINY_SDXL_TEXT
    text_2: OpenCLIPTextConfig = TINY_SDXL_TEXT_2


def build_sdxl_state_dicts(seed: int = 0, configs: TinySDXL = TinySDXL()) -> dict[str, dict[str, torch.Tensor]]:
    """Seeded random state dicts in our layout: ``{"unet", "vae", "text_encoder", "text_encoder_2"}``
    (the second encoder in Hugging Face names)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "unet": dict(randomize_(SDXLUNet(configs.unet), g).state_dict()),
        "vae": {**randomize_(SDXLVAEEncoder(configs.vae), g).state_dict(), **randomize_(SDXLVAEDecoder(configs.vae), g).state_dict()},
        "text_encoder": dict(randomize_(SDXLTextEncoder(configs.text), g).state_dict()),
        "text_encoder_2": dict(randomize_(SDXLTextEncoder2(configs.text_2), g).state_dict()),
    }


def write_sdxl_checkpoint(
    path: str,
    seed: int = 0,
    dtype: str = "fp32",
    *,
    include_vae: bool = True,
    include_text_encoders: bool = True,
    configs: TinySDXL = TinySDXL(),
) -> str:
    """A single-file SDXL checkpoint as Stability's ``sd_xl_base_1.0`` / ``sd_xl_turbo_1.0`` files:
    the second text encoder in OpenCLIP layout (fused ``in_proj``), with ``logit_scale`` and position ids."""
    parts = build_sdxl_state_dicts(seed, configs)
    sd = {SDXL_LDM_PREFIX["unet"] + k: v for k, v in parts["unet"].items()}
    if include_vae:
        sd.update({SDXL_LDM_PREFIX["vae"] + k: v for k, v in parts["vae"].items()})
    if include_text_encoders:
        sd.update({SDXL_LDM_PREFIX["text_encoder"] + k: v for k, v in parts["text_encoder"].items()})
        sd[SDXL_LDM_PREFIX["text_encoder"] + "text_model.embeddings.position_ids"] = torch.arange(configs.text.max_positions)[None]
        open_clip = convert_hf_text_to_open_clip(parts["text_encoder_2"])
        sd.update({SDXL_LDM_PREFIX["text_encoder_2"] + k: v for k, v in open_clip.items()})
        sd[SDXL_LDM_PREFIX["text_encoder_2"] + "logit_scale"] = torch.tensor(4.6052)
    return _save(_cast(sd, DTYPES[dtype]), path, nested=path.endswith(".ckpt"))


def diffusers_sdxl_unet_config(c: SDUNetConfig) -> dict:
    """``unet/config.json`` of a diffusers SDXL folder (``addition_embed_type: "text_time"``)."""
    levels = len(c.channel_mult)
    channels = [c.model_channels * m for m in c.channel_mult]
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": channels,
        "layers_per_block": c.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if c.transformer_depth[i] else "DownBlock2D" for i in range(levels)],
        "up_block_types": ["CrossAttnUpBlock2D" if c.transformer_depth[i] else "UpBlock2D" for i in reversed(range(levels))],
        "transformer_layers_per_block": [max(d, 1) for d in c.transformer_depth[:-1]] + [c.mid_transformer_depth],
        "cross_attention_dim": c.context_dim,
        "attention_head_dim": [ch // c.num_head_channels for ch in channels],  # diffusers' name for the head count
        "use_linear_projection": c.use_linear_in_transformer,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": SDXL_ADD_TIME_DIM,
        "projection_class_embeddings_input_dim": c.adm_in_channels,
        "norm_num_groups": c.norm_groups,
        "sample_size": 128,
    }


def clip_text_2_hf_config(c: OpenCLIPTextConfig) -> dict:
    """``text_encoder_2/config.json`` (transformers ``CLIPTextModelWithProjection``)."""
    return {
        **clip_text_hf_config(c),
        "architectures": ["CLIPTextModelWithProjection"],
        "projection_dim": c.projection_dim,
        "pad_token_id": 0,
    }


def write_sdxl_diffusers_folder(path: str, seed: int = 0, dtype: str = "fp32", configs: TinySDXL = TinySDXL()) -> str:
    """A diffusers SDXL pipeline folder (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``)."""
    parts = build_sdxl_state_dicts(seed, configs)
    items = {
        "unet": (convert.convert_unet_to_diffusers(parts["unet"], configs.unet), diffusers_sdxl_unet_config(configs.unet), "diffusion_pytorch_model.safetensors"),
        "vae": (convert.convert_vae_to_diffusers(parts["vae"], configs.vae), diffusers_vae_config(configs.vae), "diffusion_pytorch_model.safetensors"),
        "text_encoder": (parts["text_encoder"], clip_text_hf_config(configs.text), "model.safetensors"),
        "text_encoder_2": (parts["text_encoder_2"], clip_text_2_hf_config(configs.text_2), "model.safetensors"),
    }
    index = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    }
    return _write_pipeline_folder(path, items, DTYPES[dtype], "StableDiffusionXLPipeline", index)


def sdxl_lora_targets(configs: TinySDXL = TinySDXL()) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """kohya name → (in, out, kernel) of what an SDXL LoRA trains: UNet attention/projections/FF and
    both text encoders' attention and MLP (``lora_te1_``, ``lora_te2_``)."""
    unet = SDXLUNet(configs.unet)
    targets = {}
    for diff_name, ldm_name in convert.unet_module_map(configs.unet).items():
        if any(s in diff_name for s in (".attn1.to_", ".attn2.to_", "proj_in", "proj_out", "ff.net")):
            module = unet.get_submodule(ldm_name)
            targets["lora_unet_" + diff_name.replace(".", "_")] = (module.in_features, module.out_features, ())
    for prefix, encoder in (("lora_te1_", SDXLTextEncoder(configs.text)), ("lora_te2_", SDXLTextEncoder2(configs.text_2))):
        for name, module in encoder.named_modules():
            if isinstance(module, nn.Linear) and (".self_attn." in name or ".mlp." in name):
                targets[prefix + name.replace(".", "_")] = (module.in_features, module.out_features, ())
    return targets


def write_sdxl_lora(path: str, seed: int = 0, rank: int = 4, alpha: float = 2.0, dtype: str = "fp16", configs: TinySDXL = TinySDXL()) -> str:
    """A kohya SDXL LoRA (``lora_unet_*``, ``lora_te1_*``, ``lora_te2_*`` with ``.alpha``) for the tiny SDXL model."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (fin, fout, _) in sdxl_lora_targets(configs).items():
        sd[f"{name}.lora_down.weight"] = torch.randn((rank, fin), generator=g) / math.sqrt(fin)
        sd[f"{name}.lora_up.weight"] = torch.randn((fout, rank), generator=g) / math.sqrt(rank)
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return _save(_cast(sd, DTYPES[dtype]), path)


def write_sdxl_textual_inversion(path: str, seed: int = 0, num_vectors: int = 2, configs: TinySDXL = TinySDXL()) -> str:
    """An SDXL embedding as A1111/civitai write it: ``{"clip_l": (n, 768), "clip_g": (n, 1280)}`` (tiny widths)."""
    g = torch.Generator().manual_seed(seed)
    vectors = {
        "clip_l": torch.randn((num_vectors, configs.text.hidden_size), generator=g) * 0.5,
        "clip_g": torch.randn((num_vectors, configs.text_2.hidden_size), generator=g) * 0.5,
    }
    return _save(vectors, path)
