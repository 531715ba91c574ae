"""MiDaS DPT-hybrid checkpoint layout and its conversion to transformers' DPT.

``dpt_hybrid-midas-501f0c75.pt`` (MiDaS v3.0, the file controlnet_aux 0.0.7's
``MidasDetector`` loads) is a plain ``torch.save``'d state dict of MiDaS's
``DPTDepthModel(backbone="vitb_rn50_384", readout="project")``: timm's
``vit_base_resnet50_384`` under ``pretrained.model.*`` plus the DPT decoder under
``pretrained.act_postprocess{3,4}.*`` and ``scratch.*``. Layout facts (read from
controlnet_aux 0.0.7 ``midas/{vit,blocks,dpt_depth}.py`` and timm's ResNetV2 /
VisionTransformer):

* ``pretrained.model.patch_embed.backbone``: ResNetV2 *without* pre-activation
  (BiT "bottleneck" blocks), ``StdConv2dSame`` convolutions (weight standardisation,
  TF "SAME" padding), GroupNorm with 32 groups. Stem ``stem.conv`` 7x7/2 64 ch +
  ``stem.norm`` + 3x3/2 max pool; stages ``stages.{0,1,2}`` of 3, 4, 9 blocks,
  256/512/1024 ch, strides 1/2/2 (so 1/16 resolution); each block
  ``conv1 norm1 conv2 norm2 conv3 norm3`` and, in block 0, ``downsample.{conv,norm}``.
* ``patch_embed.proj``: 1x1 conv 1024 -> 768 (one token per 16x16 pixels),
  ``cls_token``, ``pos_embed`` (1, 1 + 24*24, 768) for the 384x384 training size,
  12 ViT-B blocks (``norm1 attn.qkv attn.proj norm2 mlp.fc1 mlp.fc2``, fused qkv
  rows in q, k, v order), final ``norm`` (unused by DPT: it taps block outputs).
  ``head`` is timm's 1000-class ImageNet classifier; MiDaS never runs it, it is
  simply left in the file.
* DPT taps: ResNet stages 0 and 1 (used as they are: ``act_postprocess1/2`` are
  identities without weights) and ViT blocks 8 and 11, each through a "project"
  readout (``act_postprocess{3,4}.0.project.0``: Linear 1536 -> 768 + GELU), a 1x1
  conv (``.3``) and, for block 11, a 3x3/2 conv (``act_postprocess4.4``).
* ``scratch.layer{1..4}_rn``: 3x3 convs without bias to 256 ch; ``scratch.refinenet{4..1}``
  fusion blocks (``resConfUnit{1,2}.conv{1,2}``, ``out_conv``), refinenet4 first;
  ``scratch.output_conv.{0,2,4}``: the depth head (conv, x2 upsample, conv, ReLU,
  conv, ReLU).

The same network exists in transformers as ``DPTForDepthEstimation`` with
``DPTConfig(is_hybrid=True)`` and a BiT backbone (transformers converted this very
file into ``Intel/dpt-hybrid-midas``). :func:`midas_key_map` renames every tensor;
the only non-rename is the fused ``qkv`` projection, split into query/key/value.
The map is generated from a :class:`MidasHybridConfig` so that a tiny test file
with the same key structure converts by the same rules.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "MidasHybridConfig",
    "MIDAS_HYBRID",
    "TINY_MIDAS_HYBRID",
    "HEAD_DIM",
    "PATCH",
    "midas_layout",
    "midas_key_map",
    "midas_ignored_keys",
    "convert_midas_state_dict",
    "infer_midas_config",
    "is_midas_hybrid",
    "to_dpt_config",
]

PATCH = 16  # total stride of the ResNet stem + stages; one ViT token per 16x16 pixels
HEAD_DIM = 64  # ViT-B head width; the head count is not stored in the weights, so it is hidden // 64
GN_GROUPS = 32  # timm ResNetV2 GroupNorm groups; not stored in the weights either

_VIT = "pretrained.model."
_RESNET = _VIT + "patch_embed.backbone."
_T_BIT = "dpt.embeddings.backbone.bit."
_T_VIT = "dpt.encoder.layer."


@dataclass(frozen=True)
class MidasHybridConfig:
    """Sizes of a MiDaS DPT-hybrid network; the defaults are the real ``dpt_hybrid-midas-501f0c75.pt``."""

    stem_width: int = 64
    stage_widths: tuple[int, ...] = (256, 512, 1024)
    stage_depths: tuple[int, ...] = (3, 4, 9)
    hidden_size: int = 768
    num_layers: int = 12
    mlp_size: int = 3072
    image_size: int = 384  # training size; fixes the position-embedding grid (image_size // 16)
    features: int = 256  # width of the DPT fusion path
    num_classes: int = 1000  # timm's unused ImageNet head, kept in the file; 0 = absent

    def __post_init__(self):
        if len(self.stage_widths) != 3 or len(self.stage_depths) != 3:
            raise ValueError(f"a DPT-hybrid ResNet has exactly 3 stages, got widths {self.stage_widths} and depths {self.stage_depths}")
        if self.hidden_size % HEAD_DIM:
            raise ValueError(f"hidden_size must be a multiple of the {HEAD_DIM}-wide ViT heads, got {self.hidden_size}")
        if self.num_layers < 4:
            raise ValueError(f"DPT taps ViT blocks num_layers-4 and num_layers-1, so at least 4 blocks are needed, got {self.num_layers}")
        channels = (self.stem_width, *self.stage_widths, *(w // 4 for w in self.stage_widths))
        if any(c % GN_GROUPS for c in channels):
            raise ValueError(f"ResNet widths (stem, stages and their 1/4 bottlenecks) must be multiples of {GN_GROUPS} (GroupNorm groups), got {channels}")

    @property
    def num_heads(self) -> int:
        return self.hidden_size // HEAD_DIM

    @property
    def vit_taps(self) -> tuple[int, int]:
        """ViT blocks whose outputs DPT reads: (8, 11) for ViT-B/12, i.e. the last one and the one 3 before it."""
        return (self.num_layers - 4, self.num_layers - 1)

    @property
    def neck_sizes(self) -> tuple[int, int, int, int]:
        """Channels entering ``scratch.layer{1..4}_rn``: ResNet stages 0 and 1, then two ViT taps."""
        return (self.stage_widths[0], self.stage_widths[1], self.hidden_size, self.hidden_size)


MIDAS_HYBRID = MidasHybridConfig()
# Same key structure (3 stages, a downsampling first block, >1 blocks in the last stage,
# two ViT taps, 4 fusion blocks) with ~1.5 M parameters.
TINY_MIDAS_HYBRID = MidasHybridConfig(
    stem_width=32,
    stage_widths=(128, 256, 512),
    stage_depths=(1, 1, 2),
    hidden_size=64,
    num_layers=4,
    mlp_size=128,
    image_size=64,
    features=32,
    num_classes=10,
)


# --------------------------------------------------------------------------- layout of the MiDaS file


def midas_layout(cfg: MidasHybridConfig = MIDAS_HYBRID) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of every tensor in a MiDaS DPT-hybrid file, in the file's (module) order."""
    out: dict[str, tuple[int, ...]] = {}

    def norm(prefix: str, c: int) -> None:
        out[prefix + ".weight"] = (c,)
        out[prefix + ".bias"] = (c,)

    def linear(prefix: str, cout: int, cin: int) -> None:
        out[prefix + ".weight"] = (cout, cin)
        out[prefix + ".bias"] = (cout,)

    def conv(prefix: str, cout: int, cin: int, k: int, bias: bool = True) -> None:
        out[prefix + ".weight"] = (cout, cin, k, k)
        if bias:
            out[prefix + ".bias"] = (cout,)

    d, f = cfg.hidden_size, cfg.features
    out[_VIT + "cls_token"] = (1, 1, d)
    out[_VIT + "pos_embed"] = (1, 1 + (cfg.image_size // PATCH) ** 2, d)
    conv(_RESNET + "stem.conv", cfg.stem_width, 3, 7, bias=False)
    norm(_RESNET + "stem.norm", cfg.stem_width)
    cin = cfg.stem_width
    for s, (width, depth) in enumerate(zip(cfg.stage_widths, cfg.stage_depths)):
        mid = width // 4
        for b in range(depth):
            p = f"{_RESNET}stages.{s}.blocks.{b}."
            if b == 0:
                conv(p + "downsample.conv", width, cin, 1, bias=False)
                norm(p + "downsample.norm", width)
            conv(p + "conv1", mid, cin if b == 0 else width, 1, bias=False)
            norm(p + "norm1", mid)
            conv(p + "conv2", mid, mid, 3, bias=False)
            norm(p + "norm2", mid)
            conv(p + "conv3", width, mid, 1, bias=False)
            norm(p + "norm3", width)
        cin = width
    conv(_VIT + "patch_embed.proj", d, cfg.stage_widths[-1], 1)
    for i in range(cfg.num_layers):
        p = f"{_VIT}blocks.{i}."
        norm(p + "norm1", d)
        linear(p + "attn.qkv", 3 * d, d)
        linear(p + "attn.proj", d, d)
        norm(p + "norm2", d)
        linear(p + "mlp.fc1", cfg.mlp_size, d)
        linear(p + "mlp.fc2", d, cfg.mlp_size)
    norm(_VIT + "norm", d)
    if cfg.num_classes:
        linear(_VIT + "head", cfg.num_classes, d)
    sizes = cfg.neck_sizes
    for n in (3, 4):
        p = f"pretrained.act_postprocess{n}."
        linear(p + "0.project.0", d, 2 * d)
        conv(p + "3", sizes[n - 1], d, 1)
    conv("pretrained.act_postprocess4.4", sizes[3], sizes[3], 3)
    for k in range(1, 5):
        conv(f"scratch.layer{k}_rn", f, sizes[k - 1], 3, bias=False)
    for k in (1, 2, 3, 4):
        p = f"scratch.refinenet{k}."
        conv(p + "out_conv", f, f, 1)
        for unit in (1, 2):
            for c in (1, 2):
                conv(f"{p}resConfUnit{unit}.conv{c}", f, f, 3)
    conv("scratch.output_conv.0", f // 2, f, 3)
    conv("scratch.output_conv.2", 32, f // 2, 3)
    conv("scratch.output_conv.4", 1, 32, 1)
    return out


# --------------------------------------------------------------------------- key map


def midas_key_map(cfg: MidasHybridConfig = MIDAS_HYBRID) -> dict[str, tuple[str, ...]]:
    """MiDaS key -> transformers ``DPTForDepthEstimation`` key(s).

    One target is a rename; several targets mean "split the tensor into that many
    equal chunks along dim 0" (the fused ``attn.qkv`` -> query, key, value).
    Covers every key of :func:`midas_layout` except :func:`midas_ignored_keys`.
    """
    m: dict[str, tuple[str, ...]] = {}

    def same_suffixes(src: str, dst: str, suffixes=("weight", "bias")) -> None:
        for s in suffixes:
            m[f"{src}.{s}"] = (f"{dst}.{s}",)

    # ResNet (timm ResNetV2) -> BiT: stem and stages; block parts keep their names.
    m[_RESNET + "stem.conv.weight"] = (_T_BIT + "embedder.convolution.weight",)
    same_suffixes(_RESNET + "stem.norm", _T_BIT + "embedder.norm")
    for s, depth in enumerate(cfg.stage_depths):
        for b in range(depth):
            src, dst = f"{_RESNET}stages.{s}.blocks.{b}.", f"{_T_BIT}encoder.stages.{s}.layers.{b}."
            parts = ["conv1", "conv2", "conv3"] + (["downsample.conv"] if b == 0 else [])
            for part in parts:
                m[src + part + ".weight"] = (dst + part + ".weight",)
            for part in ["norm1", "norm2", "norm3"] + (["downsample.norm"] if b == 0 else []):
                same_suffixes(src + part, dst + part)

    # ViT embeddings and blocks.
    m[_VIT + "cls_token"] = ("dpt.embeddings.cls_token",)
    m[_VIT + "pos_embed"] = ("dpt.embeddings.position_embeddings",)
    same_suffixes(_VIT + "patch_embed.proj", "dpt.embeddings.projection")
    block_parts = {
        "norm1": "layernorm_before",
        "attn.proj": "attention.output.dense",
        "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    for i in range(cfg.num_layers):
        src, dst = f"{_VIT}blocks.{i}.", f"{_T_VIT}{i}."
        for a, b in block_parts.items():
            same_suffixes(src + a, dst + b)
        for s in ("weight", "bias"):
            m[f"{src}attn.qkv.{s}"] = tuple(f"{dst}attention.attention.{qkv}.{s}" for qkv in ("query", "key", "value"))
    same_suffixes(_VIT + "norm", "dpt.layernorm")

    # DPT reassemble: MiDaS act_postprocessN (N = 3, 4) is transformers' stage N-1.
    for n in (3, 4):
        stage = n - 1
        same_suffixes(f"pretrained.act_postprocess{n}.0.project.0", f"neck.reassemble_stage.readout_projects.{stage}.0")
        same_suffixes(f"pretrained.act_postprocess{n}.3", f"neck.reassemble_stage.layers.{stage}.projection")
    same_suffixes("pretrained.act_postprocess4.4", "neck.reassemble_stage.layers.3.resize")

    # DPT fusion: scratch.layerK_rn -> convs.K-1; refinenetK -> fusion_stage.layers.4-K
    # (transformers numbers fusion blocks in the order they run, deepest first).
    for k in range(1, 5):
        m[f"scratch.layer{k}_rn.weight"] = (f"neck.convs.{k - 1}.weight",)
        src, dst = f"scratch.refinenet{k}.", f"neck.fusion_stage.layers.{4 - k}."
        same_suffixes(src + "out_conv", dst + "projection")
        for unit in (1, 2):
            for c in (1, 2):
                same_suffixes(f"{src}resConfUnit{unit}.conv{c}", f"{dst}residual_layer{unit}.convolution{c}")

    # Depth head: same Sequential indices.
    for i in (0, 2, 4):
        same_suffixes(f"scratch.output_conv.{i}", f"head.head.{i}")
    return m


def midas_ignored_keys(cfg: MidasHybridConfig = MIDAS_HYBRID) -> frozenset[str]:
    """Keys dropped on conversion: timm's ImageNet classifier, which MiDaS never runs."""
    return frozenset({_VIT + "head.weight", _VIT + "head.bias"})


def convert_midas_state_dict(sd: Mapping[str, torch.Tensor], cfg: MidasHybridConfig = MIDAS_HYBRID) -> dict[str, torch.Tensor]:
    """MiDaS DPT-hybrid state dict -> transformers ``DPTForDepthEstimation`` state dict.

    Pure: ``sd`` is not modified; split tensors are views. Ignored keys are dropped;
    keys the map does not know are passed through unchanged, so that a strict load
    reports them as unexpected under their own name.
    """
    key_map, ignored = midas_key_map(cfg), midas_ignored_keys(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in ignored:
            continue
        targets = key_map.get(key, (key,))
        chunks = value.chunk(len(targets), dim=0) if len(targets) > 1 else (value,)
        out.update(zip(targets, chunks))
    return out


# --------------------------------------------------------------------------- detection and config


_FINGERPRINT = (_RESNET + "stem.conv.weight", _VIT + "pos_embed", "scratch.output_conv.4.weight")


def is_midas_hybrid(keys) -> bool:
    """Whether a set of keys looks like a MiDaS DPT-hybrid checkpoint (ResNet stem + ViT + DPT head)."""
    keys = set(keys)
    return all(k in keys for k in _FINGERPRINT)


def infer_midas_config(sd: Mapping[str, torch.Tensor]) -> MidasHybridConfig:
    """Read the sizes of a MiDaS DPT-hybrid network from its tensors' shapes.

    The head count (hidden // 64) and GroupNorm groups (32) are not stored in the
    weights and are taken from ViT-B / timm. Raises ``KeyError``/``ValueError`` on an
    incomplete file (see ``diffsynth.models.loading.infer_config``).
    """
    def count(fmt: str) -> int:
        n = 0
        while fmt.format(n) in sd:
            n += 1
        return n

    depths = tuple(count(f"{_RESNET}stages.{s}.blocks.{{}}.conv1.weight") for s in range(3))
    if count(_RESNET + "stages.{}.blocks.0.conv1.weight") != 3 or 0 in depths:
        raise ValueError(f"expected 3 ResNet stages with at least one block each, found blocks per stage {depths}")
    grid = sd[_VIT + "pos_embed"].shape[1] - 1
    side = math.isqrt(grid)
    if side * side != grid:
        raise ValueError(f"pos_embed holds {grid} patch positions, not a square grid")
    head = sd.get(_VIT + "head.weight")
    return MidasHybridConfig(
        stem_width=sd[_RESNET + "stem.conv.weight"].shape[0],
        stage_widths=tuple(sd[f"{_RESNET}stages.{s}.blocks.0.conv3.weight"].shape[0] for s in range(3)),
        stage_depths=depths,
        hidden_size=sd[_VIT + "cls_token"].shape[-1],
        num_layers=count(_VIT + "blocks.{}.attn.qkv.weight"),
        mlp_size=sd[_VIT + "blocks.0.mlp.fc1.weight"].shape[0],
        image_size=side * PATCH,
        features=sd["scratch.layer1_rn.weight"].shape[0],
        num_classes=0 if head is None else head.shape[0],
    )


def to_dpt_config(cfg: MidasHybridConfig = MIDAS_HYBRID):
    """The transformers ``DPTConfig`` of the same network.

    Differences from ``Intel/dpt-hybrid-midas``'s config.json, both towards MiDaS:
    ``layer_norm_eps`` is timm's 1e-6 (Intel's says 1e-12), and
    ``backbone_out_indices`` names the real taps ``(0, 1, 8, 11)`` (entries 0 and 1
    are unused in hybrid mode: those features come from ResNet stages 0 and 1).
    """
    from transformers import BitConfig, DPTConfig

    backbone = BitConfig(
        num_channels=3,
        embedding_size=cfg.stem_width,
        hidden_sizes=list(cfg.stage_widths),
        depths=list(cfg.stage_depths),
        layer_type="bottleneck",  # ResNetV2 with preact=False
        global_padding="same",  # StdConv2dSame
        embedding_dynamic_padding=True,  # "same" max pool in the stem
        num_groups=GN_GROUPS,
        hidden_act="relu",
        out_features=["stage1", "stage2", "stage3"],
    )
    grid = cfg.image_size // PATCH
    return DPTConfig(
        is_hybrid=True,
        backbone_config=backbone,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_size,
        hidden_act="gelu",  # timm nn.GELU (erf)
        layer_norm_eps=1e-6,  # timm ViT
        image_size=cfg.image_size,
        patch_size=PATCH,
        qkv_bias=True,
        backbone_out_indices=[0, 1, *cfg.vit_taps],
        readout_type="project",
        reassemble_factors=[1, 1, 1, 0.5],
        neck_hidden_sizes=list(cfg.neck_sizes),
        fusion_hidden_size=cfg.features,
        backbone_featmap_shape=[1, cfg.stage_widths[-1], grid, grid],
        use_batch_norm_in_fusion_residual=False,
        use_bias_in_fusion_residual=True,
        add_projection=False,
    )
