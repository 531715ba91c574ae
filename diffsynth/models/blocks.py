"""Building blocks shared by the UNets, ControlNets and VAEs.

Module and parameter names follow the original CompVis/Stability LDM code, so a
single-file checkpoint's state dict loads without renaming (only its prefix is
stripped). Diffusers-format folders are renamed onto this layout by
``diffsynth.models.convert``.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.nn.functional as F
from torch import nn

from .tiler import tiled_forward


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype.

    The LDM code does the same; fp16 GroupNorm over large feature maps loses
    enough precision to change images visibly.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t·f), sin(t·f)]`` with ``f_i = max_period^(-i/half)``.

    Cosine first (diffusers' ``flip_sin_to_cos=True, freq_shift=0``), as the
    LDM UNet. ``timesteps`` is 0-d or 1-d; the result is ``(len(t), dim)`` fp32.
    """
    timesteps = torch.as_tensor(timesteps).reshape(-1).float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResBlock(nn.Module):
    """UNet residual block conditioned on the time embedding (LDM ``ResBlock``)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        # in-place SiLU and adds below: each acts on a fresh intermediate, and skipping the extra
        # allocations is what keeps this UNet as fast as diffusers' on the CPU
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels, eps=eps), nn.SiLU(inplace=True), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels, eps=eps), nn.SiLU(inplace=True), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h += self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        out = self.out_layers(h)
        out += self.skip_connection(x)
        return out


class Downsample(nn.Module):
    """Stride-2 3×3 convolution (odd sizes round up, as ``ceil(n/2)``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest upsampling then a 3×3 convolution.

    ``size`` is the spatial size of the skip connection the result is joined
    with. The original doubled blindly, so latents whose side was not a multiple
    of 8 (e.g. 1280×720 → 160×90) crashed at the skip concatenation.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            size = (x.shape[-2] * 2, x.shape[-1] * 2)
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest upsampling has no bf16 kernel on some torch builds
            x = x.float()
        x = F.interpolate(x, size=tuple(size), mode="nearest").to(dtype)
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention``.

    ``to_q/to_k/to_v`` have no bias, ``to_out.0`` has one (LDM ``CrossAttention``).
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out(sdpa_heads(q, k, v, self.heads))


_ATTENTION: contextvars.ContextVar = contextvars.ContextVar("diffsynth_attention", default=None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention``, unless this thread traces the models (``estimate/trace.py`` sets a stand-in that
    allocates what the memory-efficient kernels do: on the meta device the real call would be the full matrix)."""
    stand_in = _ATTENTION.get()
    if stand_in is not None:
        return stand_in(q, k, v, is_causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


@contextlib.contextmanager
def attention_stand_in(function):
    token = _ATTENTION.set(function)
    try:
        yield
    finally:
        _ATTENTION.reset(token)


def sdpa_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, is_causal: bool = False) -> torch.Tensor:
    """Split ``(B, L, heads·d)`` projections into heads, attend, merge back."""
    b, lq, inner = q.shape
    d = inner // heads
    q = q.view(b, lq, heads, d).transpose(1, 2)
    k = k.view(b, k.shape[1], heads, d).transpose(1, 2)
    v = v.view(b, v.shape[1], heads, d).transpose(1, 2)
    out = attention(q, k, v, is_causal=is_causal)
    return out.transpose(1, 2).reshape(b, lq, inner)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(x)


class FeedForward(nn.Module):
    """GEGLU feed-forward, ``dim → 4·dim → dim`` (keys ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention on the text context, GEGLU MLP; pre-LN with residuals."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)).add_(x)
        x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class SpatialTransformer(nn.Module):
    """GroupNorm, ``proj_in``, ``depth`` transformer blocks over the pixels, ``proj_out``, residual.

    SD 1.x uses 1×1 convolutions for the projections; SD 2.x/SDXL use linear
    layers (``use_linear=True``). Both key layouts are kept as in the LDM code.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool = False, groups: int = 32):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))

    def forward(self, x: torch.Tensor, context: torch.Tensor, tile: tuple[int, int] | None = None, cross_frame: bool = False) -> torch.Tensor:
        """``tile=(size, stride)`` runs the transformer blocks tile by tile (in this level's cells).

        Attention cost grows with the square of the pixel count; tiling bounds
        it for very large images (the original's high-resolution path).
        ``cross_frame`` treats the batch's frames as one image: self-attention
        spans all of them and the text context is their mean (the original's
        cross-frame attention, used for consistency without motion modules).
        """
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if self.use_linear and tile is None and not (cross_frame and b > 1):
            # SDXL's usual path stays in token layout from proj_in to proj_out: one copy in, one out
            # (a linear layer on a transposed view runs as a slower batched matmul)
            tokens = self.proj_in(x.flatten(2).transpose(1, 2).contiguous())
            for block in self.transformer_blocks:
                tokens = block(tokens, context)
            return self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w).contiguous().add_(residual)
        if self.use_linear:
            x = self.proj_in(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
        else:
            x = self.proj_in(x)
        if cross_frame and b > 1:
            # frames side by side: one (1, inner, h, b*w) image attending across all frames
            wide = x.reshape(b, -1, h, w).permute(1, 2, 0, 3).reshape(1, -1, h, b * w)
            ctx = context.mean(dim=0, keepdim=True) if context.shape[0] > 1 else context
            wide = self._blocks(wide, ctx) if tile is None else tiled_forward(lambda t: self._blocks(t, ctx), wide, tile[0], tile[1])
            x = wide.reshape(-1, h, b, w).permute(2, 0, 1, 3).contiguous()
        elif tile is None:
            x = self._blocks(x, context)
        else:
            x = tiled_forward(lambda t: self._blocks(t, context), x, tile[0], tile[1])
        if self.use_linear:
            x = self.proj_out(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w).contiguous()
        else:
            x = self.proj_out(x)
        return x + residual

    def _blocks(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Transformer blocks over the pixels of an image-layout ``(B, C, h, w)`` tensor."""
        b, c, h, w = x.shape
        # contiguous tokens: LayerNorm and the residual adds are markedly slower on the transposed view
        x = x.flatten(2).transpose(1, 2).contiguous()
        for block in self.transformer_blocks:
            x = block(x, context)
        # .contiguous(): the reshaped transpose is a channels-last view, and channels-last
        # activations make every later convolution pick a slower oneDNN path (~5% per UNet call)
        return x.transpose(1, 2).reshape(b, c, h, w).contiguous()


class TimestepSequential(nn.Sequential):
    """A UNet block: layers called with the arguments each kind needs (LDM ``TimestepEmbedSequential``).

    Video options: ``hook`` (a motion module) runs on the whole batch of frames at
    :attr:`motion_position`; ``chunk`` runs the other layers on at most that many
    frames at a time (``unet_batch_size``); ``cross_frame`` lets each chunk's frames
    attend to each other.
    """

    @property
    def motion_position(self) -> int | None:
        """Index of the layer after which a motion module runs: the last attention layer, else the last ResBlock."""
        attn = [i for i, layer in enumerate(self) if isinstance(layer, SpatialTransformer)]
        res = [i for i, layer in enumerate(self) if isinstance(layer, ResBlock)]
        return attn[-1] if attn else (res[-1] if res else None)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        upsample_size: tuple[int, int] | None = None,
        attention_tile: tuple[int, int] | None = None,
        hook=None,
        chunk: int | None = None,
        cross_frame: bool = False,
    ):
        layers = list(self)
        split = self.motion_position if hook is not None else None
        segments = [layers] if split is None else [layers[: split + 1], layers[split + 1 :]]
        for n, segment in enumerate(segments):
            x = _run_chunked(segment, x, emb, context, upsample_size, attention_tile, chunk, cross_frame)
            if n == 0 and split is not None:
                x = hook(x)
        return x


def _run_layers(layers, x, emb, context, upsample_size, attention_tile, cross_frame):
    for layer in layers:
        if isinstance(layer, ResBlock):
            x = layer(x, emb)
        elif isinstance(layer, SpatialTransformer):
            x = layer(x, context, attention_tile, cross_frame)
        elif isinstance(layer, Upsample):
            x = layer(x, upsample_size)
        else:
            x = layer(x)
    return x


def _run_chunked(layers, x, emb, context, upsample_size, attention_tile, chunk, cross_frame):
    """``layers`` over the batch, ``chunk`` rows at a time (embeddings of batch 1 are shared)."""
    batch = x.shape[0]
    if not layers:
        return x
    if chunk is None or chunk >= batch:
        return _run_layers(layers, x, emb, context, upsample_size, attention_tile, cross_frame)
    pieces = []
    for start in range(0, batch, chunk):
        end = min(start + chunk, batch)
        e = emb[start:end] if emb.shape[0] == batch else emb
        c = context[start:end] if context.shape[0] == batch else context
        pieces.append(_run_layers(layers, x[start:end], e, c, upsample_size, attention_tile, cross_frame))
    return torch.cat(pieces)
