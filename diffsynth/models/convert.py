"""State-dict conversion between our layout and the diffusers / Hugging Face layouts.

Our networks use the parameter names of the original single-file (LDM)
checkpoints, so those load once their prefix is stripped
(:func:`split_ldm_checkpoint`). Diffusers folders (``unet/``, ``vae/``,
``text_encoder/``) are renamed onto that layout here.

* Key maps are generated from a model config by the rules written out below
  (one table of names per building block), never typed out key by key.
* Converters are pure functions ``state dict -> state dict``: the input is not
  modified and tensors are shared, not copied (a 1×1 projection that changes
  rank between ``Linear`` and ``Conv2d`` becomes a reshaped view).
* Conversion is strict: a key the map does not know, or a mapped key the input
  lacks, raises :class:`ModelFileError` naming the source and the first few
  missing and unexpected keys. Shapes are checked when the result is loaded
  (``loading.check_state_dict``).

The maps were checked key for key and tensor for tensor against diffusers'
own single-file converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, diffusers
0.42.1) in ``tests/test_convert.py``; that module is a test-only dependency and
is never imported here.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ModelFileError
from .sd_text_encoder import CLIPTextConfig, infer_clip_text_config
from .sd_unet import SDUNetConfig
from .sd_vae import SDVAEConfig, infer_vae_config

__all__ = [
    "CLIP_TEXT_IGNORED",
    "LDM_COMPONENT_PREFIXES",
    "LDM_IGNORED",
    "clip_text_config_from_hf",
    "clip_text_key_names",
    "convert_clip_text_from_hf",
    "convert_unet_from_diffusers",
    "convert_unet_to_diffusers",
    "convert_vae_from_diffusers",
    "convert_vae_to_diffusers",
    "fit_ldm_vae_attention",
    "read_diffusers_config",
    "split_ldm_checkpoint",
    "split_vae_state_dict",
    "unet_config_from_diffusers",
    "unet_key_map",
    "unet_module_map",
    "vae_config_from_diffusers",
    "vae_key_map",
]

StateDict = dict[str, torch.Tensor]

_WB = ("weight", "bias")
_W = ("weight",)


@dataclass(frozen=True)
class _Module:
    """One module with parameters, under its diffusers and its LDM path.

    ``ranks`` is ``(diffusers, ldm)`` rank of the weight for 1×1 projections
    that are a ``Linear`` in one layout and a ``Conv2d`` in the other (or whose
    kind depends on the config); ``None`` means "same tensor in both".
    """

    diffusers: str
    ldm: str
    params: tuple[str, ...] = _WB
    ranks: tuple[int, int] | None = None


# --------------------------------------------------------------------------- building-block name tables

# UNet ResBlock, (diffusers, LDM). The 1×1 shortcut exists only when the block changes the channel count.
UNET_RESNET_NAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
)
UNET_RESNET_SHORTCUT = ("conv_shortcut", "skip_connection")

# Inside a BasicTransformerBlock both layouts use the same names; q/k/v have no bias.
TRANSFORMER_BLOCK_PARAMS = (
    ("norm1", _WB),
    ("attn1.to_q", _W),
    ("attn1.to_k", _W),
    ("attn1.to_v", _W),
    ("attn1.to_out.0", _WB),
    ("norm2", _WB),
    ("attn2.to_q", _W),
    ("attn2.to_k", _W),
    ("attn2.to_v", _W),
    ("attn2.to_out.0", _WB),
    ("norm3", _WB),
    ("ff.net.0.proj", _WB),
    ("ff.net.2", _WB),
)

# VAE ResnetBlock, (diffusers, LDM).
VAE_RESNET_NAMES = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"))
VAE_RESNET_SHORTCUT = ("conv_shortcut", "nin_shortcut")
# VAE mid-block attention, (diffusers, LDM, is a 1×1 projection: Linear in diffusers, Conv2d in LDM).
VAE_ATTENTION_NAMES = (
    ("group_norm", "norm", False),
    ("to_q", "q", True),
    ("to_k", "k", True),
    ("to_v", "v", True),
    ("to_out.0", "proj_out", True),
)
# diffusers < 0.14 named the VAE attention projections differently; such files are still common.
VAE_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# --------------------------------------------------------------------------- UNet


def _unet_modules(c: SDUNetConfig) -> list[_Module]:
    """Every parameter-holding module of the UNet, in LDM block order."""
    out: list[_Module] = []
    proj_rank = 2 if c.use_linear_in_transformer else 4  # the same in both layouts for a given config

    def add(d: str, l: str, params: tuple[str, ...] = _WB, ranks: tuple[int, int] | None = None) -> None:
        out.append(_Module(d, l, params, ranks))

    def resnet(d: str, l: str, ch_in: int, ch_out: int) -> None:
        for dn, ln in UNET_RESNET_NAMES:
            add(f"{d}.{dn}", f"{l}.{ln}")
        if ch_in != ch_out:
            add(f"{d}.{UNET_RESNET_SHORTCUT[0]}", f"{l}.{UNET_RESNET_SHORTCUT[1]}")

    def transformer(d: str, l: str, depth: int) -> None:
        add(f"{d}.norm", f"{l}.norm")
        add(f"{d}.proj_in", f"{l}.proj_in", ranks=(proj_rank, proj_rank))
        for k in range(depth):
            for name, params in TRANSFORMER_BLOCK_PARAMS:
                add(f"{d}.transformer_blocks.{k}.{name}", f"{l}.transformer_blocks.{k}.{name}", params)
        add(f"{d}.proj_out", f"{l}.proj_out", ranks=(proj_rank, proj_rank))

    add("conv_in", "input_blocks.0.0")
    add("time_embedding.linear_1", "time_embed.0")
    add("time_embedding.linear_2", "time_embed.2")
    if c.adm_in_channels is not None:  # SDXL: pooled text + size/crop embedding (diffusers "text_time")
        add("add_embedding.linear_1", "label_emb.0.0")
        add("add_embedding.linear_2", "label_emb.0.2")

    n = c.num_res_blocks
    last = len(c.channel_mult) - 1
    ch = c.model_channels
    skips = [ch]
    # Down path: LDM input block 1 + level·(n+1) + j is resnet j of level `level`
    # (with its attention as sub-module 1); the block after a level's resnets is its downsampler.
    for level, mult in enumerate(c.channel_mult):
        ch_out = c.model_channels * mult
        depth = c.transformer_depth[level]
        for j in range(n):
            block = 1 + level * (n + 1) + j
            resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{block}.0", ch, ch_out)
            ch = ch_out
            if depth:
                transformer(f"down_blocks.{level}.attentions.{j}", f"input_blocks.{block}.1", depth)
            skips.append(ch)
        if level != last:
            add(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{1 + level * (n + 1) + n}.0.op")
            skips.append(ch)

    resnet("mid_block.resnets.0", "middle_block.0", ch, ch)
    transformer("mid_block.attentions.0", "middle_block.1", c.mid_transformer_depth)
    resnet("mid_block.resnets.1", "middle_block.2", ch, ch)

    # Up path: diffusers up block i is level last-i; LDM output block i·(n+1) + j is its resnet j.
    # The upsampler follows the last resnet's attention (sub-module 2) or the resnet itself (1).
    for i, level in enumerate(reversed(range(len(c.channel_mult)))):
        ch_out = c.model_channels * c.channel_mult[level]
        depth = c.transformer_depth[level]
        for j in range(n + 1):
            block = i * (n + 1) + j
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{block}.0", ch + skips.pop(), ch_out)
            ch = ch_out
            if depth:
                transformer(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{block}.1", depth)
        if level != 0:
            add(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{i * (n + 1) + n}.{2 if depth else 1}.conv")

    add("conv_norm_out", "out.0")
    add("conv_out", "out.2")
    return out


def unet_module_map(config: SDUNetConfig) -> dict[str, str]:
    """``{diffusers module path: LDM module path}`` for every UNet module with parameters.

    Covers every ``Linear``, ``Conv2d``, ``GroupNorm`` and ``LayerNorm``, e.g.
    ``"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"`` ->
    ``"input_blocks.1.1.transformer_blocks.0.attn1.to_q"`` (LoRA files name
    modules the diffusers way).
    """
    return {m.diffusers: m.ldm for m in _unet_modules(config)}


def unet_key_map(config: SDUNetConfig) -> dict[str, str]:
    """``{diffusers parameter name: our (LDM) parameter name}`` for a UNet of this config."""
    return {f"{m.diffusers}.{p}": f"{m.ldm}.{p}" for m in _unet_modules(config) for p in m.params}


def convert_unet_from_diffusers(sd: Mapping[str, torch.Tensor], config: SDUNetConfig, *, source: str = "<state dict>") -> StateDict:
    """A diffusers ``UNet2DConditionModel`` state dict renamed to our ``SDUNet`` names (strict)."""
    return _convert(sd, _unet_modules(config), to_ldm=True, source=source, what="diffusers UNet")


def convert_unet_to_diffusers(sd: Mapping[str, torch.Tensor], config: SDUNetConfig, *, source: str = "<state dict>") -> StateDict:
    """Our ``SDUNet`` state dict renamed to diffusers ``UNet2DConditionModel`` names (strict)."""
    return _convert(sd, _unet_modules(config), to_ldm=False, source=source, what="UNet (LDM layout)")


# diffusers UNet2DConditionModel defaults (0.42.1 signature) for entries a config.json may omit.
DIFFUSERS_UNET_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 1280,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "use_linear_projection": False,
    "norm_num_groups": 32,
    "addition_embed_type": None,
    "projection_class_embeddings_input_dim": None,
}

# Options our SDUNet implements with one value only; a config asking for another is refused.
# (Not listed, because they do not change the weights or fp32 results: sample_size, dropout,
# upcast_attention, addition_time_embed_dim (the pipeline builds the SDXL size embedding),
# addition_embed_type_num_heads.)
DIFFUSERS_UNET_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "attention_type": "default",
    "cross_attention_norm": None,
}

_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"


def unet_config_from_diffusers(config_json: Mapping[str, Any], *, source: str = "config.json") -> SDUNetConfig:
    """Our ``SDUNetConfig`` from a diffusers ``unet/config.json`` (as a dict).

    Heads follow diffusers' naming quirk: for SD 1.x/2.x ``attention_head_dim``
    holds the number of *heads* per level (SD 1.5: 8; SD 2.x: [5, 10, 20, 20],
    i.e. 64-channel heads), unless ``num_attention_heads`` is given. A constant
    head count becomes ``num_heads``, a constant head width ``num_head_channels``.
    Raises :class:`ModelFileError` (naming ``source``) for an architecture
    ``SDUNet`` cannot represent.
    """
    cfg = {**DIFFUSERS_UNET_DEFAULTS, **config_json}

    def refuse(problem: str) -> ModelFileError:
        return ModelFileError(source, f"describes a UNet this program cannot build: {problem}.", "Only SD 1.x, SD 2.x and SDXL UNet layouts are supported.")

    _check_fixed(cfg, DIFFUSERS_UNET_FIXED, refuse)
    boc = [int(c) for c in cfg["block_out_channels"]]
    n_levels = len(boc)
    model_channels = boc[0]
    if any(c % model_channels for c in boc):
        raise refuse(f"block_out_channels {boc} are not multiples of the first level's {model_channels}")
    num_res_blocks = _uniform(cfg["layers_per_block"], n_levels, "layers_per_block", refuse)
    context_dim = _uniform(cfg["cross_attention_dim"], n_levels, "cross_attention_dim", refuse)

    down = list(cfg["down_block_types"])
    up = list(cfg["up_block_types"])
    if len(down) != n_levels or len(up) != n_levels:
        raise refuse(f"{len(down)} down and {len(up)} up block types for {n_levels} levels")
    unknown = sorted({t for t in down if t not in (_CROSS_DOWN, _PLAIN_DOWN)} | {t for t in up if t not in (_CROSS_UP, _PLAIN_UP)})
    if unknown:
        raise refuse(f"block types {unknown}")
    has_attn = [t == _CROSS_DOWN for t in down]
    if [t == _CROSS_UP for t in up] != has_attn[::-1]:
        raise refuse(f"up_block_types {up} do not mirror down_block_types {down}")

    layers = _per_level(cfg["transformer_layers_per_block"], n_levels, "transformer_layers_per_block", refuse)
    reverse = cfg["reverse_transformer_layers_per_block"]
    if reverse is not None and _per_level(reverse, n_levels, "reverse_transformer_layers_per_block", refuse) != layers[::-1]:
        raise refuse("reverse_transformer_layers_per_block differs from the down path's depths")
    if any(a and d < 1 for d, a in zip(layers, has_attn)):
        raise refuse(f"transformer_layers_per_block {layers} gives a cross-attention level no transformer block")
    depths = tuple(d if a else 0 for d, a in zip(layers, has_attn))
    mid_depth = layers[-1]  # diffusers builds the mid block with the last level's depth

    heads_cfg = cfg["num_attention_heads"] if cfg["num_attention_heads"] is not None else cfg["attention_head_dim"]
    heads = _per_level(heads_cfg, n_levels, "attention heads", refuse)
    attn = [(heads[l], boc[l]) for l in range(n_levels) if depths[l]] + [(heads[-1], boc[-1])]  # + mid block
    if any(ch % h for h, ch in attn):
        raise refuse(f"attention channels {[ch for _, ch in attn]} not divisible by heads {[h for h, _ in attn]}")
    # When every attention layer has the same width both readings fit; follow the family
    # convention then: one number = SD 1.x head count, a list per level = SD 2.x/SDXL head width.
    num_heads = num_head_channels = None
    same_count, same_width = len({h for h, _ in attn}) == 1, len({ch // h for h, ch in attn}) == 1
    if same_count and not (same_width and isinstance(heads_cfg, (list, tuple))):
        num_heads = attn[0][0]
    elif same_width:
        num_head_channels = attn[0][1] // attn[0][0]
    else:
        raise refuse(f"attention heads {[h for h, _ in attn]} for channels {[ch for _, ch in attn]}: neither the head count nor the head width is constant")

    adm = None
    if cfg["addition_embed_type"] == "text_time":
        adm = cfg["projection_class_embeddings_input_dim"]
        if not isinstance(adm, int):
            raise refuse("addition_embed_type 'text_time' without an integer projection_class_embeddings_input_dim")
    elif cfg["addition_embed_type"] is not None:
        raise refuse(f"addition_embed_type {cfg['addition_embed_type']!r}")

    return SDUNetConfig(
        in_channels=int(cfg["in_channels"]),
        out_channels=int(cfg["out_channels"]),
        model_channels=model_channels,
        channel_mult=tuple(c // model_channels for c in boc),
        num_res_blocks=num_res_blocks,
        transformer_depth=depths,
        mid_transformer_depth=mid_depth,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        context_dim=context_dim,
        use_linear_in_transformer=bool(cfg["use_linear_projection"]),
        adm_in_channels=adm,
        norm_groups=int(cfg["norm_num_groups"]),
    )


def read_diffusers_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a diffusers/transformers model folder, as a dict.

    Raises :class:`ModelFileError` naming the folder when the file is missing or not JSON.
    """
    folder = os.fspath(folder)
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ModelFileError(
            folder,
            "has no config.json, so the model's architecture is unknown.",
            "A diffusers model folder (unet/, vae/, text_encoder/) holds config.json next to the weights; download it too.",
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(path, f"is not valid JSON ({exc}).", "Download the file again.") from exc
    if not isinstance(data, dict):
        raise ModelFileError(path, f"holds a JSON {type(data).__name__}, not an object.", "Download the file again.")
    return data


# --------------------------------------------------------------------------- VAE


def _vae_modules(c: SDVAEConfig) -> list[_Module]:
    out: list[_Module] = []

    def add(d: str, l: str, ranks: tuple[int, int] | None = None) -> None:
        out.append(_Module(d, l, _WB, ranks))

    def resnet(d: str, l: str, ch_in: int, ch_out: int) -> None:
        for dn, ln in VAE_RESNET_NAMES:
            add(f"{d}.{dn}", f"{l}.{ln}")
        if ch_in != ch_out:
            add(f"{d}.{VAE_RESNET_SHORTCUT[0]}", f"{l}.{VAE_RESNET_SHORTCUT[1]}")

    def mid(d: str, l: str, ch: int) -> None:
        resnet(f"{d}.resnets.0", f"{l}.block_1", ch, ch)
        for dn, ln, projection in VAE_ATTENTION_NAMES:
            add(f"{d}.attentions.0.{dn}", f"{l}.attn_1.{ln}", (2, 4) if projection else None)
        resnet(f"{d}.resnets.1", f"{l}.block_2", ch, ch)

    n_levels = len(c.ch_mult)
    add("encoder.conv_in", "encoder.conv_in")
    ch = c.ch
    for i, mult in enumerate(c.ch_mult):
        for j in range(c.num_res_blocks):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", ch, c.ch * mult)
            ch = c.ch * mult
        if i != n_levels - 1:
            add(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
    mid("encoder.mid_block", "encoder.mid", ch)
    add("encoder.conv_norm_out", "encoder.norm_out")
    add("encoder.conv_out", "encoder.conv_out")
    add("quant_conv", "quant_conv")

    add("post_quant_conv", "post_quant_conv")
    add("decoder.conv_in", "decoder.conv_in")
    mid("decoder.mid_block", "decoder.mid", ch)
    # diffusers numbers decoder blocks in execution order (deepest first); LDM by level.
    for i in range(n_levels):
        level = n_levels - 1 - i
        for j in range(c.num_res_blocks + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", ch, c.ch * c.ch_mult[level])
            ch = c.ch * c.ch_mult[level]
        if level != 0:
            add(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv")
    add("decoder.conv_norm_out", "decoder.norm_out")
    add("decoder.conv_out", "decoder.conv_out")
    return out


def vae_key_map(config: SDVAEConfig) -> dict[str, str]:
    """``{diffusers AutoencoderKL parameter name: our (LDM) parameter name}``."""
    return {f"{m.diffusers}.{p}": f"{m.ldm}.{p}" for m in _vae_modules(config) for p in m.params}


def convert_vae_from_diffusers(
    sd: Mapping[str, torch.Tensor], config: SDVAEConfig | None = None, *, source: str = "<state dict>"
) -> StateDict:
    """A diffusers ``AutoencoderKL`` state dict renamed to our layout (``encoder.*``,
    ``quant_conv.*``, ``decoder.*``, ``post_quant_conv.*``; strict).

    Attention projections become 1×1 convolutions. Pre-0.14 diffusers names
    (``query``/``key``/``value``/``proj_attn``) are accepted. Without
    ``config`` the architecture is read off the keys and shapes.
    """
    sd = {_modern_vae_attention_name(k): v for k, v in sd.items()}
    if config is None:
        config = _vae_config_from_diffusers_state_dict(sd, source)
    return _convert(sd, _vae_modules(config), to_ldm=True, source=source, what="diffusers VAE")


def convert_vae_to_diffusers(
    sd: Mapping[str, torch.Tensor], config: SDVAEConfig | None = None, *, source: str = "<state dict>"
) -> StateDict:
    """Our VAE state dict (encoder and decoder halves) renamed to diffusers ``AutoencoderKL`` names (strict)."""
    if config is None:
        config = infer_vae_config(sd)
    return _convert(sd, _vae_modules(config), to_ldm=False, source=source, what="VAE (LDM layout)")


def split_vae_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict]:
    """``(encoder part, decoder part)`` of a VAE state dict in our layout, for ``SDVAEEncoder``/``SDVAEDecoder``."""
    enc = {k: v for k, v in sd.items() if k.startswith(("encoder.", "quant_conv."))}
    dec = {k: v for k, v in sd.items() if k.startswith(("decoder.", "post_quant_conv."))}
    return enc, dec


def _modern_vae_attention_name(key: str) -> str:
    m = re.match(r"^((?:en|de)coder\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)$", key)
    return f"{m.group(1)}.{VAE_LEGACY_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}" if m else key


DIFFUSERS_VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "latent_channels": 4,
    "scaling_factor": 0.18215,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
}
# Options our VAE implements with one value only. shift_factor / latents_mean / latents_std
# belong to other latent normalisations (SD3, Flux, Playground) that the pipelines do not apply.
DIFFUSERS_VAE_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "norm_num_groups": 32,
    "mid_block_add_attention": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}


def vae_config_from_diffusers(config_json: Mapping[str, Any], *, source: str = "config.json") -> SDVAEConfig:
    """Our ``SDVAEConfig`` from a diffusers ``vae/config.json`` (as a dict), scaling factor included."""
    cfg = {**DIFFUSERS_VAE_DEFAULTS, **config_json}

    def refuse(problem: str) -> ModelFileError:
        return ModelFileError(source, f"describes a VAE this program cannot build: {problem}.", "Only the Stable Diffusion KL autoencoder layout is supported.")

    _check_fixed(cfg, DIFFUSERS_VAE_FIXED, refuse)
    boc = [int(c) for c in cfg["block_out_channels"]]
    ch = boc[0]
    if any(c % ch for c in boc):
        raise refuse(f"block_out_channels {boc} are not multiples of the first level's {ch}")
    if list(cfg["down_block_types"]) != ["DownEncoderBlock2D"] * len(boc) or list(cfg["up_block_types"]) != ["UpDecoderBlock2D"] * len(boc):
        raise refuse(f"block types {list(cfg['down_block_types'])} / {list(cfg['up_block_types'])} (expected DownEncoderBlock2D / UpDecoderBlock2D per level)")
    latent = int(cfg["latent_channels"])
    return SDVAEConfig(
        ch=ch,
        ch_mult=tuple(c // ch for c in boc),
        num_res_blocks=int(cfg["layers_per_block"]),
        z_channels=latent,
        embed_dim=latent,
        in_channels=int(cfg["in_channels"]),
        out_ch=int(cfg["out_channels"]),
        scaling_factor=float(cfg["scaling_factor"]),
    )


def _vae_config_from_diffusers_state_dict(sd: Mapping[str, torch.Tensor], source: str) -> SDVAEConfig:
    """Architecture of a diffusers AutoencoderKL from its keys and shapes (scaling factor: SD 1.x default)."""
    if "encoder.conv_in.weight" not in sd or "post_quant_conv.weight" not in sd:
        raise ModelFileError(
            source,
            f"is not a diffusers AutoencoderKL (no encoder.conv_in / post_quant_conv weights; top-level names: {_prefixes(sd)}).",
            "Pass a VAE file, or give its config.json.",
        )
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks."))
    n_res = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down_blocks.0.resnets."))
    ch = sd["encoder.conv_in.weight"].shape[0]
    mults = tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] // ch for i in range(levels))
    return SDVAEConfig(
        ch=ch,
        ch_mult=mults,
        num_res_blocks=n_res,
        z_channels=sd["post_quant_conv.weight"].shape[0],
        embed_dim=sd["post_quant_conv.weight"].shape[1],
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_ch=sd["decoder.conv_out.weight"].shape[0] if "decoder.conv_out.weight" in sd else 3,
    )


# --------------------------------------------------------------------------- CLIP text encoder

# Entries of Hugging Face CLIP files that are not weights of our text encoder; dropped.
CLIP_TEXT_IGNORED: tuple[tuple[str, str], ...] = (
    ("text_model.embeddings.position_ids", "the buffer 0..76; some merged checkpoints even hold it corrupted as floats"),
    ("text_projection.", "image-text projection of CLIPModel / CLIPTextModelWithProjection, unused by SD 1.x"),
    ("vision_model.", "the image tower of a full CLIPModel file"),
    ("visual_projection.", "the image tower's projection of a full CLIPModel file"),
    ("logit_scale", "CLIPModel's contrastive temperature"),
)

_CLIP_FLAT_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
_CLIP_LAYER_PARAMS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "layer_norm1",
    "mlp.fc1",
    "mlp.fc2",
    "layer_norm2",
)


def clip_text_key_names(config: CLIPTextConfig) -> list[str]:
    """Parameter names of ``SDTextEncoder(config)`` (Hugging Face ``text_model.*`` names)."""
    keys = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"]
    for i in range(config.num_layers):
        keys += [f"text_model.encoder.layers.{i}.{m}.{p}" for m in _CLIP_LAYER_PARAMS for p in _WB]
    keys += ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]
    return keys


def _with_text_model_prefix(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers >= 5.6 and some old LDM files store the text tower without ``text_model.``."""
    return {("text_model." + k if k.startswith(_CLIP_FLAT_ROOTS) else k): v for k, v in sd.items()}


def convert_clip_text_from_hf(sd: Mapping[str, torch.Tensor], *, source: str = "<state dict>") -> StateDict:
    """A Hugging Face ``CLIPTextModel`` (or ``CLIPModel``) state dict in ``SDTextEncoder`` names.

    Accepts ``text_model.*`` keys and the flattened transformers >= 5.6 layout
    (``embeddings.*``, ``encoder.*``, ``final_layer_norm.*``); drops the entries
    of :data:`CLIP_TEXT_IGNORED`. Anything else that is not a parameter of the
    encoder the file describes, or a missing parameter, raises :class:`ModelFileError`.
    """
    sd = {k: v for k, v in _with_text_model_prefix(sd).items() if not _ignored(k, CLIP_TEXT_IGNORED)}
    if "text_model.embeddings.token_embedding.weight" not in sd or not any(k.startswith("text_model.encoder.layers.") for k in sd):
        raise ModelFileError(
            source,
            f"is not a CLIP text encoder (no text_model.embeddings.token_embedding.weight or encoder layers; top-level names: {_prefixes(sd)}).",
            "Pass the text_encoder weights of a Stable Diffusion 1.x model.",
        )
    try:
        config = infer_clip_text_config(sd)
    except KeyError as exc:
        raise ModelFileError(source, f"is an incomplete CLIP text encoder ({exc.args[0]} is missing).", "Download the file again.") from exc
    _check_keys(sd.keys(), clip_text_key_names(config), source, "CLIP text encoder")
    return sd


# transformers CLIPTextConfig defaults for entries a config.json may omit.
HF_CLIP_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def clip_text_config_from_hf(config_json: Mapping[str, Any], *, source: str = "config.json") -> CLIPTextConfig:
    """Our ``CLIPTextConfig`` from a transformers ``text_encoder/config.json`` (a ``CLIPTextConfig``,
    or a full ``CLIPConfig`` whose ``text_config`` is used)."""
    raw = config_json.get("text_config") or config_json
    cfg = {**HF_CLIP_TEXT_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if hidden % heads or cfg["hidden_act"] not in ("quick_gelu", "gelu"):
        raise ModelFileError(
            source,
            f"describes a CLIP text encoder this program cannot build (hidden_size {hidden}, {heads} heads, activation {cfg['hidden_act']!r}).",
            "Expected a CLIP text tower with quick_gelu or gelu and a hidden size divisible by the head count.",
        )
    return CLIPTextConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(cfg["num_hidden_layers"]),
        intermediate_size=int(cfg["intermediate_size"]),
        max_positions=int(cfg["max_position_embeddings"]),
        head_dim=hidden // heads,
        activation=cfg["hidden_act"],
        layer_norm_eps=float(cfg["layer_norm_eps"]),
    )


# --------------------------------------------------------------------------- LDM single files

# Where each component lives in a single-file checkpoint (CompVis/Stability/sgm/civitai).
LDM_COMPONENT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "unet"),
    ("first_stage_model.", "vae"),
    ("cond_stage_model.transformer.", "text_encoder"),  # SD 1.x: CLIP ViT-L/14, Hugging Face names
    ("conditioner.embedders.0.transformer.", "text_encoder"),  # SDXL: the same CLIP ViT-L/14
    ("conditioner.embedders.1.model.", "text_encoder_2"),  # SDXL: OpenCLIP ViT-bigG/14, raw open_clip names
)

_SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "lvlb_weights",
)

# Entries of single-file checkpoints that are not weights we use; dropped. An entry ending in "."
# is a prefix, any other an exact key.
LDM_IGNORED: tuple[tuple[str, str], ...] = (
    ("model_ema.", "EMA copy of the UNet (and model_ema.decay / model_ema.num_updates); model.diffusion_model. holds the weights to use"),
    *((name, "noise-schedule buffer of the LDM DDPM class; our schedulers compute it") for name in _SCHEDULE_BUFFERS),
    ("logvar", "per-timestep loss weight of LDM training"),
    ("scale_factor", "latent scale buffer of LDM (scale_by_std); the VAE config holds the scaling factor"),
    ("cond_stage_model.transformer.text_model.embeddings.position_ids", "the buffer 0..76; some merges hold it corrupted as floats"),
    ("cond_stage_model.transformer.embeddings.position_ids", "the same buffer in old files without text_model."),
    ("conditioner.embedders.0.transformer.text_model.embeddings.position_ids", "the same buffer in SDXL files"),
    ("first_stage_model.loss.", "VAE training loss (LPIPS, discriminator) kept by some exports"),
)


def split_ldm_checkpoint(sd: Mapping[str, torch.Tensor], *, source: str = "<state dict>") -> dict[str, StateDict]:
    """Split a single-file checkpoint into ``{component: state dict in our names}``.

    Components and prefixes: :data:`LDM_COMPONENT_PREFIXES` (only those present
    are returned); entries of :data:`LDM_IGNORED` are dropped. The text encoder
    comes out with ``text_model.*`` names also from old files that lack them.
    A key matching neither table raises :class:`ModelFileError` listing the
    unrecognised key prefixes.
    """
    parts: dict[str, StateDict] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if _ignored(key, LDM_IGNORED):
            continue
        for prefix, component in LDM_COMPONENT_PREFIXES:
            if key.startswith(prefix):
                parts.setdefault(component, {})[key[len(prefix):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ModelFileError(
            source,
            f"holds {len(unknown)} entries this program does not recognise as part of a Stable Diffusion checkpoint "
            f"(by prefix: {_prefixes(unknown)}; e.g. {_few(sorted(unknown))}).",
            "Is this a checkpoint of another model family (SD 2.x, SD3, Flux, ...) or a merge with extra modules?",
        )
    if not parts:
        raise ModelFileError(source, "holds no Stable Diffusion components (no model.diffusion_model. / first_stage_model. keys).", "Is this a model checkpoint?")
    if "text_encoder" in parts:
        parts["text_encoder"] = _with_text_model_prefix(parts["text_encoder"])
    if "vae" in parts:
        parts["vae"] = fit_ldm_vae_attention(parts["vae"], source=source)
    return parts


_LDM_VAE_ATTENTION_WEIGHT = re.compile(r"^(?:en|de)coder\.mid\.attn_1\.(?:q|k|v|proj_out)\.weight$")


def fit_ldm_vae_attention(sd: Mapping[str, torch.Tensor], *, source: str = "<state dict>") -> StateDict:
    """An LDM-layout VAE state dict with its mid-block attention weights as 1×1 convolutions.

    Checkpoints written back from diffusers sometimes store them as ``Linear``
    matrices ``[C, C]``; the LDM layout (and ours) has ``[C, C, 1, 1]``.
    """
    return {k: (_fit_rank(v, 4, k, source) if _LDM_VAE_ATTENTION_WEIGHT.match(k) else v) for k, v in sd.items()}


# --------------------------------------------------------------------------- shared helpers


def _convert(sd: Mapping[str, torch.Tensor], modules: list[_Module], *, to_ldm: bool, source: str, what: str) -> StateDict:
    """Rename ``sd`` along ``modules`` (diffusers -> LDM when ``to_ldm``), fitting projection ranks."""
    rename: dict[str, tuple[str, int | None]] = {}
    for m in modules:
        src, dst = (m.diffusers, m.ldm) if to_ldm else (m.ldm, m.diffusers)
        rank = None if m.ranks is None else m.ranks[1 if to_ldm else 0]
        for p in m.params:
            rename[f"{src}.{p}"] = (f"{dst}.{p}", rank if p == "weight" else None)
    _check_keys(sd.keys(), rename.keys(), source, what)
    out: StateDict = {}
    for key, tensor in sd.items():
        new, rank = rename[key]
        out[new] = tensor if rank is None else _fit_rank(tensor, rank, key, source)
    return out


def _fit_rank(t: torch.Tensor, rank: int, key: str, source: str) -> torch.Tensor:
    """A 1×1 projection weight as ``Linear`` (rank 2) or ``Conv2d`` (rank 4)."""
    if t.dim() == rank:
        return t
    if t.dim() == 4 and rank == 2 and t.shape[2:] == (1, 1):
        return t.reshape(t.shape[0], t.shape[1])
    if t.dim() == 2 and rank == 4:
        return t.reshape(t.shape[0], t.shape[1], 1, 1)
    raise ModelFileError(
        source,
        f"tensor {key!r} has shape {tuple(t.shape)}; a 1x1 projection weight of rank 2 or 4 was expected.",
        "The file is corrupt or of another model family.",
    )


def _check_keys(have: Iterable[str], want: Iterable[str], source: str, what: str) -> None:
    have, want = set(have), set(want)
    missing, unexpected = sorted(want - have), sorted(have - want)
    if not (missing or unexpected):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
    hint = f" The input's top-level names are {_prefixes(have)}." if not have & want else ""
    raise ModelFileError(
        source,
        f"does not match the {what} layout: " + "; ".join(parts) + "." + hint,
        "Check that the weights and their config.json belong together and that the file is complete and of a supported model family.",
    )


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def _prefixes(keys: Iterable[str], depth: int = 2) -> str:
    """``"a.b.* (12), c (1)"``: what a key set holds, for error messages."""

    def head(key: str) -> str:
        parts = key.split(".")
        return ".".join(parts[:depth]) + ".*" if len(parts) > depth else key

    counts = Counter(head(k) for k in keys)
    return ", ".join(f"{p} ({n})" for p, n in sorted(counts.items())[:8]) or "none"


def _ignored(key: str, table: tuple[tuple[str, str], ...]) -> bool:
    return any(key.startswith(entry) if entry.endswith(".") else key == entry for entry, _ in table)


def _check_fixed(cfg: Mapping[str, Any], fixed: Mapping[str, Any], refuse) -> None:
    """Refuse a config whose entry differs from ``fixed`` (a tuple there lists the allowed values;
    a list in the config, one value per level, must hold allowed values only)."""
    for name, allowed in fixed.items():
        if name not in cfg:
            continue
        value = cfg[name]
        options = allowed if isinstance(allowed, tuple) else (allowed,)
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(v in options for v in values):
            raise refuse(f"{name} = {value!r} (supported: {' or '.join(repr(o) for o in options)})")


def _per_level(value: Any, n_levels: int, name: str, refuse) -> list[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != n_levels or not all(isinstance(v, int) for v in value):
            raise refuse(f"{name} {list(value)} (expected one integer per level, {n_levels} levels)")
        return [int(v) for v in value]
    if not isinstance(value, int):
        raise refuse(f"{name} {value!r} (expected an integer or one per level)")
    return [value] * n_levels


def _uniform(value: Any, n_levels: int, name: str, refuse) -> int:
    values = _per_level(value, n_levels, name, refuse)
    if len(set(values)) != 1:
        raise refuse(f"{name} {values} differs between levels")
    return values[0]
