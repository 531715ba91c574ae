"""The Stable Diffusion UNet (LDM ``openaimodel.UNetModel`` layout).

One class covers SD 1.x (the defaults), and through its config SD 2.x-style
linear projections and SDXL (``adm_in_channels``, per-level transformer depth,
64-channel heads). Parameter names equal the LDM checkpoint keys after
``model.diffusion_model.``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, asdict

import torch
from torch import nn

from .blocks import Downsample, GroupNorm32, ResBlock, SpatialTransformer, TimestepSequential, Upsample, timestep_embedding


@dataclass(frozen=True)
class SDUNetConfig:
    """Architecture of a UNet. Defaults are SD 1.5.

    ``transformer_depth[l]`` is the number of transformer blocks of the
    attention layers at level ``l`` (0 = that level has no attention).
    Heads: ``num_heads`` fixed heads (SD 1.x: 8) unless ``num_head_channels``
    is set (SD 2.x/SDXL: 64 channels per head).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    mid_transformer_depth: int = 1
    num_heads: int | None = 8
    num_head_channels: int | None = None
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None
    norm_groups: int = 32

    def __post_init__(self):
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(
                f"transformer_depth has {len(self.transformer_depth)} entries but channel_mult has {len(self.channel_mult)}; give one depth per level"
            )
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ValueError("set exactly one of num_heads and num_head_channels")

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, dim_head) of an attention layer with ``channels`` channels."""
        if self.num_head_channels is not None:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def to_dict(self) -> dict:
        return asdict(self)


class SDUNet(nn.Module):
    """Noise predictor ``ε(x_t, t, context)``.

    ``forward`` also takes ControlNet residuals: ``down_residuals`` (one per
    skip connection, in push order) are added to the skips and ``mid_residual``
    to the middle block's output.
    """

    def __init__(self, config: SDUNetConfig = SDUNetConfig()):
        super().__init__()
        self.config = c = config
        ted = c.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        if c.adm_in_channels is not None:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(c.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))

        def attention(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = c.heads_for(ch)
            return SpatialTransformer(ch, heads, dim_head, depth, c.context_dim, c.use_linear_in_transformer, c.norm_groups)

        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1))])
        skip_channels = [c.model_channels]
        ch = c.model_channels
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [ResBlock(ch, ted, c.model_channels * mult, c.norm_groups)]
                ch = c.model_channels * mult
                if c.transformer_depth[level]:
                    layers.append(attention(ch, c.transformer_depth[level]))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_channels.append(ch)
        self.skip_channels = tuple(skip_channels)

        self.middle_block = TimestepSequential(
            ResBlock(ch, ted, ch, c.norm_groups), attention(ch, c.mid_transformer_depth), ResBlock(ch, ted, ch, c.norm_groups)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ted, c.model_channels * mult, c.norm_groups)]
                ch = c.model_channels * mult
                if c.transformer_depth[level]:
                    layers.append(attention(ch, c.transformer_depth[level]))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(c.norm_groups, ch), nn.SiLU(), nn.Conv2d(c.model_channels, c.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.out[2].weight.dtype

    def time_embedding(self, timestep: torch.Tensor, batch: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """Time (plus SDXL add-) embedding broadcast to ``batch`` rows."""
        t_emb = timestep_embedding(timestep, self.config.model_channels).to(self.out[2].weight.device, self.dtype)
        emb = self.time_embed(t_emb)
        if emb.shape[0] == 1 and batch > 1:
            emb = emb.expand(batch, -1)
        if self.config.adm_in_channels is not None:
            if y is None:
                raise ValueError("this UNet (SDXL layout) needs the added condition `y` (pooled text embedding + time ids)")
            emb = emb + self.label_emb(y.to(emb.dtype))
        return emb

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | int | float,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        down_residuals: list[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
        attention_tile: tuple[int, int] | None = None,
        motion=None,
        frame_chunk: int | None = None,
        cross_frame_attention: bool = False,
        offload_skips: bool = False,
    ) -> torch.Tensor:
        """ε for ``x``. Image options: ``attention_tile=(size, stride)`` tiles the attention layers.

        Video options (the batch is a window of frames of one video):
        ``motion(block_id, h) -> h`` runs a motion module inside each block
        (ids ``("input", i)``, ``("middle", 0)``, ``("output", i)``; see
        ``TimestepSequential.motion_position``) on all frames at once;
        ``frame_chunk`` runs the spatial layers that many frames at a time
        (``unet_batch_size``); ``cross_frame_attention`` lets a chunk's frames
        attend to each other; ``offload_skips`` keeps skip connections in CPU
        RAM between their use (``vram_limit_level >= 1``).
        """
        emb = self.time_embedding(torch.as_tensor(timestep), x.shape[0], y)
        context = context.to(x.dtype)
        options = dict(attention_tile=attention_tile, chunk=frame_chunk, cross_frame=cross_frame_attention)

        def hook_for(block_id):
            return None if motion is None else (lambda h: motion(block_id, h))

        def park(t: torch.Tensor) -> torch.Tensor:
            return t.to("cpu", non_blocking=True) if offload_skips else t

        skips = []
        h = x
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context, hook=hook_for(("input", i)), **options)
            skips.append(park(h))
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"got {len(down_residuals)} ControlNet down residuals, the UNet has {len(skips)} skip connections")
            skips = [park(s.to(r.device) + r.to(s.dtype)) for s, r in zip(skips, down_residuals)]
        h = self.middle_block(h, emb, context, hook=hook_for(("middle", 0)), **options)
        if mid_residual is not None:
            h = h + mid_residual.to(h.dtype)
        for i, block in enumerate(self.output_blocks):
            h = torch.cat([h, skips.pop().to(h.device)], dim=1)
            size = skips[-1].shape[-2:] if skips else None
            h = block(h, emb, context, upsample_size=size, hook=hook_for(("output", i)), **options)
        return self.out(h)


_INPUT_RES = re.compile(r"^input_blocks\.(\d+)\.0\.in_layers\.2\.weight$")
_ATTN_DEPTH = re.compile(r"^input_blocks\.(\d+)\.1\.transformer_blocks\.(\d+)\.norm1\.weight$")
_MID_DEPTH = re.compile(r"^middle_block\.1\.transformer_blocks\.(\d+)\.norm1\.weight$")


def infer_unet_config(sd: dict[str, torch.Tensor], *, num_heads: int | None = 8, num_head_channels: int | None = None) -> SDUNetConfig:
    """Read a UNet's architecture off its (prefix-stripped, LDM-layout) state dict.

    Channels, levels, blocks per level, transformer depths, context width and
    projection kind come from key names and shapes. What shapes cannot tell
    (the number of heads) is the caller's family rule: SD 1.x 8 heads,
    SD 2.x/SDXL 64 channels per head.
    """
    conv_in = sd["input_blocks.0.0.weight"]
    model_channels = conv_in.shape[0]
    # Each input block index is a ResBlock (has in_layers) or a Downsample (has op).
    block_out = {}
    for k, v in sd.items():
        m = _INPUT_RES.match(k)
        if m:
            block_out[int(m.group(1))] = v.shape[0]
    downs = sorted(int(k.split(".")[1]) for k in sd if re.match(r"^input_blocks\.\d+\.0\.op\.weight$", k))
    n_levels = len(downs) + 1
    num_res_blocks = (downs[0] - 1) if downs else len(block_out)
    channel_mult = []
    depths = []
    depth_per_block = {}
    for k in sd:
        m = _ATTN_DEPTH.match(k)
        if m:
            b = int(m.group(1))
            depth_per_block[b] = max(depth_per_block.get(b, 0), int(m.group(2)) + 1)
    for level in range(n_levels):
        first = 1 + level * (num_res_blocks + 1)
        channel_mult.append(block_out[first] // model_channels)
        depths.append(depth_per_block.get(first, 0))
    mid_depth = 1 + max((int(m.group(1)) for m in map(_MID_DEPTH.match, sd) if m), default=0)
    attn_key = next((k for k in sd if k.endswith("transformer_blocks.0.attn2.to_k.weight")), None)
    if attn_key is None:
        raise ValueError("the UNet state dict has no cross-attention layers (no '...attn2.to_k.weight' key)")
    context_dim = sd[attn_key].shape[1]
    proj = next(k for k in sd if k.endswith(".1.proj_in.weight") or k == "middle_block.1.proj_in.weight")
    use_linear = sd[proj].dim() == 2
    adm = sd["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in sd else None
    return SDUNetConfig(
        in_channels=conv_in.shape[1],
        out_channels=sd["out.2.weight"].shape[0],
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        transformer_depth=tuple(depths),
        mid_transformer_depth=mid_depth,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        context_dim=context_dim,
        use_linear_in_transformer=use_linear,
        adm_in_channels=adm,
    )

