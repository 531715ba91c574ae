"""The KL autoencoder of Stable Diffusion (LDM ``Encoder``/``Decoder`` layout).

``SDVAEEncoder`` holds ``encoder.*`` and ``quant_conv.*``; ``SDVAEDecoder``
holds ``decoder.*`` and ``post_quant_conv.*``: exactly the checkpoint keys after
``first_stage_model.``. Both take ``tiled=True`` to run tile by tile with
seamless blending (any size, any tile/stride), for images too large for memory.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import GroupNorm32, attention
from .tiler import tiled_forward


@dataclass(frozen=True)
class SDVAEConfig:
    """Architecture of the autoencoder. Defaults are SD 1.x (scaling 0.18215)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    scaling_factor: float = 0.18215

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels, eps=1e-6)


class VAEResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class VAEAttention(nn.Module):
    """Single-head self-attention over pixels; 1×1 conv projections as in the LDM checkpoints."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        # contiguous NCHW: the reshaped transpose would be a channels-last view that slows every later conv
        out = attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b, c, h, w).contiguous()
        return x + self.proj_out(out)


class VAEDownsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3×3 conv without padding (LDM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class VAEUpsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = F.interpolate(x.float() if dtype == torch.bfloat16 else x, scale_factor=2.0, mode="nearest").to(dtype)
        return self.conv(x)


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = VAEResnetBlock(channels, channels)
        self.attn_1 = VAEAttention(channels)
        self.block_2 = VAEResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ``block`` list plus an optional ``downsample``/``upsample``."""

    def __init__(self, blocks: list[nn.Module], resample: tuple[str, nn.Module] | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            setattr(self, resample[0], resample[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.block:
            x = b(x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


class Encoder(nn.Module):
    def __init__(self, c: SDVAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        levels = []
        ch = c.ch
        for i, mult in enumerate(c.ch_mult):
            out = c.ch * mult
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(VAEResnetBlock(ch, out))
                ch = out
            levels.append(_Level(blocks, ("downsample", VAEDownsample(ch)) if i != len(c.ch_mult) - 1 else None))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(ch)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, 2 * c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, c: SDVAEConfig):
        super().__init__()
        ch = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, ch, 3, padding=1)
        self.mid = _Mid(ch)
        levels = [None] * len(c.ch_mult)
        for i in reversed(range(len(c.ch_mult))):
            out = c.ch * c.ch_mult[i]
            blocks = []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(VAEResnetBlock(ch, out))
                ch = out
            levels[i] = _Level(blocks, ("upsample", VAEUpsample(ch)) if i != 0 else None)
        self.up = nn.ModuleList(levels)  # indexed by level like the LDM keys; run from the deepest
        self.norm_out = _norm(ch)  # eps 1e-6 as the LDM decoder (the original used 1e-5 here)
        self.conv_out = nn.Conv2d(ch, c.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class SDVAEEncoder(nn.Module):
    """Image in [-1, 1], ``(B,3,H,W)`` → scaled latent mean ``(B,4,H/8,W/8)`` (no sampling)."""

    def __init__(self, config: SDVAEConfig = SDVAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.quant_conv(self.encoder(x))
        return moments[:, : self.config.embed_dim]

    def forward(self, x: torch.Tensor, tiled: bool = False, tile_size: int = 64, tile_stride: int = 32) -> torch.Tensor:
        """``tile_size``/``tile_stride`` are in latent cells (×8 pixels), as for the decoder."""
        _check_multiple(x, self.config.downscale, "image")
        x = x.to(self.dtype)
        if tiled:
            f = self.config.downscale
            mean = tiled_forward(self._encode, x, tile_size * f, tile_stride * f, out_scale=1 / f, out_channels=self.config.embed_dim)
        else:
            mean = self._encode(x)
        return mean * self.config.scaling_factor


class SDVAEDecoder(nn.Module):
    """Scaled latent ``(B,4,h,w)`` → image in about [-1, 1], ``(B,3,8h,8w)``."""

    def __init__(self, config: SDVAEConfig = SDVAEConfig()):
        super().__init__()
        self.config = config
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, latents: torch.Tensor, tiled: bool = False, tile_size: int = 64, tile_stride: int = 32) -> torch.Tensor:
        z = (latents / self.config.scaling_factor).to(self.dtype)
        if tiled:
            return tiled_forward(self._decode, z, tile_size, tile_stride, out_scale=self.config.downscale, out_channels=self.config.out_ch)
        return self._decode(z)


def _check_multiple(x: torch.Tensor, factor: int, what: str) -> None:
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(
            f"{what} size {w}x{h} is not a multiple of {factor}; nearest valid: {round(w / factor) * factor or factor}x{round(h / factor) * factor or factor}"
        )


def infer_vae_config(sd: dict[str, torch.Tensor], scaling_factor: float = 0.18215) -> SDVAEConfig:
    """Architecture of an autoencoder from its (``first_stage_model.``-stripped) keys and shapes.

    Works with an encoder-only or decoder-only dict as well.
    """
    if "encoder.conv_in.weight" in sd:
        ch = sd["encoder.conv_in.weight"].shape[0]
        n_levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
        mults = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(n_levels)]
        n_res = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
        z = sd["encoder.conv_out.weight"].shape[0] // 2
        in_ch = sd["encoder.conv_in.weight"].shape[1]
    else:
        ch = sd["decoder.conv_out.weight"].shape[1]
        n_levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up."))
        mults = [sd[f"decoder.up.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(n_levels)]
        n_res = max(int(k.split(".")[4]) for k in sd if k.startswith("decoder.up.0.block."))
        z = sd["decoder.conv_in.weight"].shape[1]
        in_ch = 3
    embed = sd["post_quant_conv.weight"].shape[0] if "post_quant_conv.weight" in sd else sd["quant_conv.weight"].shape[0] // 2
    out_ch = sd["decoder.conv_out.weight"].shape[0] if "decoder.conv_out.weight" in sd else 3
    return SDVAEConfig(ch=ch, ch_mult=tuple(mults), num_res_blocks=n_res, z_channels=z, embed_dim=embed, in_channels=in_ch, out_ch=out_ch, scaling_factor=scaling_factor)
