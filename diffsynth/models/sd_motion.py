"""AnimateDiff motion modules for the SD 1.x UNet (guoyww ``mm_sd_v15.ckpt`` v1, ``mm_sd_v15_v2.ckpt`` v2).

A motion module is a transformer whose attention runs along the *frame* axis:
every pixel of a window of frames is a sequence of ``F`` tokens (arXiv 2307.04725).
One sits after each resnet(+attention) pair of the UNet's down and up levels,
and (v2) one in the middle block between the attention and the second resnet.

Parameter and buffer names equal the keys of the original files, so a file
loads without renaming::

    down_blocks.{i}.motion_modules.{j}.temporal_transformer.…   (j < layers_per_block)
    mid_block.motion_modules.0.temporal_transformer.…           (v2 only)
    up_blocks.{i}.motion_modules.{j}.temporal_transformer.…     (j ≤ layers_per_block; i = 0 deepest)
    ….{norm, proj_in, proj_out,
       transformer_blocks.{d}.{attention_blocks.{0,1}.{to_q, to_k, to_v, to_out.0, pos_encoder.pe},
                               norms.{0,1}, ff.net.0.proj, ff.net.2, ff_norm}}

Semantics follow the original AnimateDiff code (as DiffSynth-Studio, A1111 and
ComfyUI run it), which differs from diffusers' ``AnimateDiffTransformer3D`` in
one place: the GroupNorm before ``proj_in`` normalises **each frame on its
own**; diffusers normalises over all frames of the window, which changes
images visibly (facts.md). The rest matches diffusers: per attention block,
LayerNorm → add ``pe[:, :F]`` → self-attention over frames → residual; then
LayerNorm → GEGLU feed-forward → residual; ``proj_out``; plus the input.

``pos_encoder.pe`` is a persistent buffer ``(1, max_positions, C)`` read from
the file (real files store the standard sinusoid in every attention block; a
fresh model starts with it too). diffusers recomputes it and drops the keys.

The model is itself the ``motion`` callable that ``SDUNet.forward(..., motion=)``
takes: ``motion_model(block_id, h)`` runs the module registered for that UNet
block on the window ``h`` of shape ``(F, C, h, w)`` (the whole batch is the
frames of one video) and returns ``h`` unchanged for blocks without one.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .blocks import Attention, FeedForward, GroupNorm32
from .loading import infer_config, instantiate
from .sd_unet import SDUNetConfig

__all__ = [
    "MotionModuleConfig",
    "SDMotionModel",
    "build_motion_model",
    "convert_motion_from_diffusers",
    "convert_motion_to_diffusers",
    "infer_motion_config",
    "sinusoid_table",
]

BlockId = tuple[str, int]


@dataclass(frozen=True)
class MotionModuleConfig:
    """Architecture of a set of motion modules. Defaults are AnimateDiff v2 for SD 1.5.

    ``block_out_channels`` are the UNet's channels per level;
    ``layers_per_block`` is the UNet's ``num_res_blocks``: that many modules per
    down level and one more per up level. v1 is ``mid_block=False,
    max_positions=24`` (``MotionModuleConfig.v1()``). ``max_positions`` bounds
    the window (frames per call). Heads and norm groups cannot be read from a
    file's shapes: AnimateDiff uses 8 heads and 32 groups throughout.
    """

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    mid_block: bool = True
    max_positions: int = 32
    num_heads: int = 8
    norm_groups: int = 32
    norm_eps: float = 1e-6
    transformer_depth: int = 1

    def __post_init__(self):
        for ch in self.block_out_channels:
            if ch % self.num_heads or ch % self.norm_groups:
                raise ValueError(
                    f"motion-module channels must be multiples of num_heads ({self.num_heads}) and norm_groups ({self.norm_groups}), "
                    f"got {ch} in block_out_channels={self.block_out_channels}"
                )
        if self.layers_per_block < 1 or self.transformer_depth < 1 or self.max_positions < 1:
            raise ValueError(
                f"layers_per_block, transformer_depth and max_positions must be ≥ 1, got "
                f"{self.layers_per_block}, {self.transformer_depth}, {self.max_positions}"
            )

    @classmethod
    def v1(cls, **overrides) -> "MotionModuleConfig":
        """AnimateDiff v1 (``mm_sd_v15.ckpt``): no middle-block module, 24 positions."""
        return cls(**{"mid_block": False, "max_positions": 24, **overrides})

    @classmethod
    def v2(cls, **overrides) -> "MotionModuleConfig":
        """AnimateDiff v2 (``mm_sd_v15_v2.ckpt``): a middle-block module, 32 positions."""
        return cls(**overrides)

    @classmethod
    def for_unet(cls, unet: SDUNetConfig, *, version: str = "v2", **overrides) -> "MotionModuleConfig":
        """The motion modules that fit ``unet`` (its levels, channels and resnets per level)."""
        if version not in ("v1", "v2"):
            raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
        layout = dict(
            block_out_channels=tuple(unet.model_channels * m for m in unet.channel_mult),
            layers_per_block=unet.num_res_blocks,
            norm_groups=unet.norm_groups,
        )
        return getattr(cls, version)(**{**layout, **overrides})

    @property
    def version(self) -> str:
        """``"v2"`` with a middle-block module, else ``"v1"`` (the layout, whatever the size)."""
        return "v2" if self.mid_block else "v1"

    def modules(self) -> list[tuple[str, BlockId, int]]:
        """``(module name, UNet block id, channels)`` of every motion module, in file order.

        Block ids are those ``SDUNet`` passes to its ``motion`` hook: down level
        ``i`` module ``j`` follows ``input_blocks[1 + i·(L+1) + j]`` (each level is
        ``L`` resnet blocks and a downsampler), the middle one ``middle_block``,
        up level ``i`` (deepest first) module ``j`` ``output_blocks[i·(L+1) + j]``.
        """
        per_down, per_up = self.layers_per_block, self.layers_per_block + 1
        out = []
        for i, ch in enumerate(self.block_out_channels):
            for j in range(per_down):
                out.append((f"down_blocks.{i}.motion_modules.{j}", ("input", 1 + i * (per_down + 1) + j), ch))
        if self.mid_block:
            out.append(("mid_block.motion_modules.0", ("middle", 0), self.block_out_channels[-1]))
        for i, ch in enumerate(reversed(self.block_out_channels)):
            for j in range(per_up):
                out.append((f"up_blocks.{i}.motion_modules.{j}", ("output", i * per_up + j), ch))
        return out

    def check_unet(self, unet: SDUNetConfig) -> None:
        """Raise ``ValueError`` unless these modules fit ``unet``'s levels, channels and resnets."""
        want = MotionModuleConfig.for_unet(unet)
        if (want.block_out_channels, want.layers_per_block) != (self.block_out_channels, self.layers_per_block):
            raise ValueError(
                f"these motion modules are for a UNet with channels {self.block_out_channels} and {self.layers_per_block} resnets "
                f"per level, the UNet has {want.block_out_channels} and {want.layers_per_block}; AnimateDiff SD 1.5 motion modules "
                f"need an SD 1.x UNet"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def sinusoid_table(length: int, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(1, length, dim)`` Transformer sinusoid: ``sin`` at even channels, ``cos`` at odd (arXiv 1706.03762 §3.5).

    What AnimateDiff's ``PositionalEncoding`` computes and its files store.
    """
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(position * div)
    pe[0, :, 1::2] = torch.cos(position * div)[:, : dim // 2]
    return pe.to(dtype)


class PositionalEncoding(nn.Module):
    """Adds ``pe[:, :F]`` to ``(N, F, C)`` frame sequences; ``pe`` is loaded from the file."""

    def __init__(self, dim: int, max_positions: int):
        super().__init__()
        self.register_buffer("pe", sinusoid_table(max_positions, dim), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.shape[1]].to(x.dtype)


class TemporalAttention(Attention):
    """Self-attention along the frame axis, after adding the frame positions (original ``VersatileAttention``)."""

    def __init__(self, dim: int, heads: int, max_positions: int):
        super().__init__(dim, heads, dim // heads)
        self.pos_encoder = PositionalEncoding(dim, max_positions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pos_encoder(x))


class TemporalTransformerBlock(nn.Module):
    """Two temporal self-attentions and a GEGLU feed-forward, each pre-LayerNorm with a residual."""

    def __init__(self, dim: int, heads: int, max_positions: int):
        super().__init__()
        # Attribute order = the original's, so state dicts list keys in file order.
        self.attention_blocks = nn.ModuleList(TemporalAttention(dim, heads, max_positions) for _ in range(2))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms):
            x = attention(norm(x)) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    """GroupNorm per frame, ``proj_in``, transformer blocks over each pixel's frames, ``proj_out``, residual."""

    def __init__(self, channels: int, c: MotionModuleConfig):
        super().__init__()
        self.max_positions = c.max_positions
        # (F, C, h, w) with the frames as the batch: the GroupNorm statistics are per frame,
        # as in the original AnimateDiff ("b c f h w -> (b f) c h w" before self.norm).
        self.norm = GroupNorm32(c.norm_groups, channels, eps=c.norm_eps)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(TemporalTransformerBlock(channels, c.num_heads, c.max_positions) for _ in range(c.transformer_depth))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames, channels, height, width = x.shape
        if frames > self.max_positions:
            raise ValueError(
                f"a motion-module window of {frames} frames is longer than the {self.max_positions} frame positions these motion "
                f"modules encode; use windows of at most {self.max_positions} frames (animatediff_batch_size <= {self.max_positions})"
            )
        h = self.norm(x)
        h = h.permute(2, 3, 0, 1).reshape(height * width, frames, channels)  # one sequence of frames per pixel
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h)
        h = self.proj_out(h)
        return x + h.reshape(height, width, frames, channels).permute(2, 3, 0, 1)  # x first: the sum takes x's contiguous layout


class MotionModule(nn.Module):
    """Key level ``motion_modules.{j}``: the original wraps the transformer as ``temporal_transformer``."""

    def __init__(self, channels: int, c: MotionModuleConfig):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal_transformer(x)


class _Level(nn.Module):
    """Key level ``down_blocks.{i}`` / ``mid_block`` / ``up_blocks.{i}``."""

    def __init__(self, channels: int, count: int, c: MotionModuleConfig):
        super().__init__()
        self.motion_modules = nn.ModuleList(MotionModule(channels, c) for _ in range(count))


class SDMotionModel(nn.Module):
    """AnimateDiff motion modules; call as ``motion_model(block_id, h)`` (the ``SDUNet`` ``motion`` hook).

    ``h`` is ``(F, C, h, w)``: the ``F`` frames of one video window, at most
    ``config.max_positions``. Blocks without a module get ``h`` back unchanged.
    """

    def __init__(self, config: MotionModuleConfig = MotionModuleConfig()):
        super().__init__()
        self.config = c = config
        per_down, per_up = c.layers_per_block, c.layers_per_block + 1
        self.down_blocks = nn.ModuleList(_Level(ch, per_down, c) for ch in c.block_out_channels)
        self.mid_block = _Level(c.block_out_channels[-1], 1, c) if c.mid_block else None  # v1 has none
        self.up_blocks = nn.ModuleList(_Level(ch, per_up, c) for ch in reversed(c.block_out_channels))
        self._names = {block_id: name for name, block_id, _ in c.modules()}

    @property
    def dtype(self) -> torch.dtype:
        return self.down_blocks[0].motion_modules[0].temporal_transformer.proj_in.weight.dtype

    def module_for(self, block_id: BlockId) -> MotionModule | None:
        """The module that follows UNet block ``block_id`` (e.g. ``("input", 1)``), or None."""
        name = self._names.get(tuple(block_id))
        return None if name is None else self.get_submodule(name)

    def forward(self, block_id: BlockId, h: torch.Tensor) -> torch.Tensor:
        module = self.module_for(block_id)
        if module is None:
            return h
        channels = module.temporal_transformer.proj_in.in_features
        if h.dim() != 4 or h.shape[1] != channels:
            raise ValueError(
                f"the motion module after UNet block {block_id} takes (frames, {channels}, h, w) features, got {tuple(h.shape)}; "
                f"do these motion modules fit this UNet? (they are for channels {self.config.block_out_channels})"
            )
        return module(h)


_PROJ_IN = re.compile(r"^(?:down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\.motion_modules\.(\d+)\.temporal_transformer\.proj_in\.weight$")
_DEPTH = re.compile(r"^down_blocks\.0\.motion_modules\.0\.temporal_transformer\.transformer_blocks\.(\d+)\.")
_PE = re.compile(r"\.attention_blocks\.\d+\.pos_encoder\.pe$")


def infer_motion_config(sd: dict[str, torch.Tensor], *, num_heads: int = 8, norm_groups: int = 32) -> MotionModuleConfig:
    """Read a motion-module file's architecture off its (original-layout) state dict.

    Levels, channels (``proj_in`` shapes), modules per level (indices), depth,
    the middle module (v2) and ``max_positions`` (``pe`` length: 24 in v1, 32
    in v2) come from the keys; heads and norm groups are the family's rule.
    A file without ``pe`` keys gets the version's length, and strict loading
    then lists the missing keys. Inconsistent layouts raise ``ValueError``
    (``loading.infer_config`` turns it into a ``ModelFileError`` naming the file).
    """
    down: dict[int, dict[int, int]] = {}
    up: dict[int, dict[int, int]] = {}
    mid: int | None = None
    for k, v in sd.items():
        m = _PROJ_IN.match(k)
        if not m:
            continue
        if m.group(1) is not None:
            down.setdefault(int(m.group(1)), {})[int(m.group(3))] = v.shape[1]
        elif m.group(2) is not None:
            up.setdefault(int(m.group(2)), {})[int(m.group(3))] = v.shape[1]
        else:
            mid = v.shape[1]
    if not down:
        raise ValueError(
            "no 'down_blocks.{i}.motion_modules.{j}.temporal_transformer.proj_in.weight' keys: not an AnimateDiff motion-module file"
        )
    levels = len(down)
    if sorted(down) != list(range(levels)) or sorted(up) != list(range(levels)):
        raise ValueError(f"motion modules at down levels {sorted(down)} and up levels {sorted(up)}; expected levels 0..{levels - 1} on both sides")
    per_down = len(down[0])
    channels = []
    for i in range(levels):
        if sorted(down[i]) != list(range(per_down)) or len(set(down[i].values())) != 1:
            raise ValueError(
                f"down level {i} has motion modules {sorted(down[i])} of widths {sorted(set(down[i].values()))}; expected {per_down} of one width"
            )
        channels.append(down[i][0])
    for i, ch in enumerate(reversed(channels)):
        if sorted(up[i]) != list(range(per_down + 1)) or set(up[i].values()) != {ch}:
            raise ValueError(
                f"up level {i} has motion modules {sorted(up[i])} of widths {sorted(set(up[i].values()))}; expected {per_down + 1} of width {ch}"
            )
    if mid is not None and mid != channels[-1]:
        raise ValueError(f"the middle-block motion module is {mid} wide, the deepest level {channels[-1]}")
    depth = 1 + max((int(m.group(1)) for m in map(_DEPTH.match, sd) if m), default=0)
    pe = next((v for k, v in sd.items() if _PE.search(k)), None)
    max_positions = pe.shape[1] if pe is not None else (32 if mid is not None else 24)
    return MotionModuleConfig(
        block_out_channels=tuple(channels),
        layers_per_block=per_down,
        mid_block=mid is not None,
        max_positions=max_positions,
        num_heads=num_heads,
        norm_groups=norm_groups,
        transformer_depth=depth,
    )


def build_motion_model(
    sd: dict[str, torch.Tensor], *, source: str = "<state dict>", device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> SDMotionModel:
    """An ``SDMotionModel`` from an original-layout state dict: architecture inferred, strict load, eval mode."""
    config = infer_config(infer_motion_config, sd, source=source, what="AnimateDiff motion-module set")
    return instantiate(lambda: SDMotionModel(config), sd, source=source, what="AnimateDiff motion-module set", device=device, dtype=dtype)


# Original ↔ diffusers (MotionAdapter) names: a pure rename inside each module, plus the
# ".temporal_transformer" level the original has and diffusers drops. diffusers keeps one
# "pos_embed.pe" per transformer block (recomputed, never read from files); the original one
# "pos_encoder.pe" per attention block.
_RENAMES = (
    (".norms.0.", ".norm1."),
    (".norms.1.", ".norm2."),
    (".ff_norm.", ".norm3."),
    (".attention_blocks.0.", ".attn1."),
    (".attention_blocks.1.", ".attn2."),
)


def convert_motion_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-layout keys → diffusers ``MotionAdapter`` keys (the ``pe`` tables are dropped, as diffusers does)."""
    out = {}
    for k, v in sd.items():
        if _PE.search(k):
            continue
        k = k.replace(".temporal_transformer.", ".")
        for old, new in _RENAMES:
            k = k.replace(old, new)
        out[k] = v
    return out


def convert_motion_from_diffusers(sd: dict[str, torch.Tensor], max_positions: int = 32) -> dict[str, torch.Tensor]:
    """diffusers ``MotionAdapter`` keys → original layout, with the sinusoid ``pe`` tables the original files carry.

    ``max_positions`` is the adapter's ``motion_max_seq_length`` (24 for v1, 32 for v2).
    """
    out = {}
    for k, v in sd.items():
        if k.endswith(".pos_embed.pe"):
            continue
        k = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", k)
        for new, old in _RENAMES:
            k = k.replace(old, new)
        out[k] = v
        if k.endswith(".attention_blocks.0.to_q.weight") or k.endswith(".attention_blocks.1.to_q.weight"):
            out[k[: -len("to_q.weight")] + "pos_encoder.pe"] = sinusoid_table(max_positions, v.shape[1], v.dtype)
    return out
