"""Stable Diffusion XL's UNet and VAE: the SD networks with SDXL's configuration.

The SDXL UNet is ``SDUNet`` with three levels (320, 640, 1280 channels), no attention at
the first level, 2 and 10 transformer blocks at the others (10 in the middle block),
64-channel heads, linear projections, a 2048-wide context (CLIP-L 768 + bigG 1280) and the
*add embedding* (LDM ``label_emb``, diffusers ``add_embedding`` of ``addition_embed_type
"text_time"``): ``[pooled text (1280), sinusoid(256) of each of the 6 size/crop ids]`` →
Linear 2816→1280 → SiLU → Linear, added to the time embedding (Podell et al. 2023,
"SDXL", arXiv 2307.01952, §2.2 "micro-conditioning").

The SDXL VAE has the SD 1.x architecture and the latent scaling factor 0.13025.
"""
from __future__ import annotations

import torch

from .blocks import timestep_embedding
from .sd_unet import SDUNet, SDUNetConfig
from .sd_vae import SDVAEConfig, SDVAEDecoder, SDVAEEncoder

__all__ = [
    "SDXL_ADD_TIME_DIM",
    "SDXL_UNET_CONFIG",
    "SDXL_VAE_CONFIG",
    "SDXL_VAE_SCALING_FACTOR",
    "SDXLUNet",
    "SDXLVAEDecoder",
    "SDXLVAEEncoder",
    "add_time_ids",
    "is_sdxl_unet_config",
    "sdxl_added_condition",
]

SDXL_ADD_TIME_DIM = 256  # sinusoid width per size/crop id (diffusers: addition_time_embed_dim)
SDXL_VAE_SCALING_FACTOR = 0.13025

SDXL_UNET_CONFIG = SDUNetConfig(
    model_channels=320,
    channel_mult=(1, 2, 4),
    num_res_blocks=2,
    transformer_depth=(0, 2, 10),
    mid_transformer_depth=10,
    num_heads=None,
    num_head_channels=64,
    context_dim=2048,
    use_linear_in_transformer=True,
    adm_in_channels=1280 + 6 * SDXL_ADD_TIME_DIM,
)
SDXL_VAE_CONFIG = SDVAEConfig(scaling_factor=SDXL_VAE_SCALING_FACTOR)


def is_sdxl_unet_config(config: SDUNetConfig) -> bool:
    """An SDXL-layout UNet takes the added condition (pooled text + size ids)."""
    return config.adm_in_channels is not None


class SDXLUNet(SDUNet):
    """``SDUNet`` whose default configuration is SDXL base/Turbo (2.57 B parameters)."""

    def __init__(self, config: SDUNetConfig = SDXL_UNET_CONFIG):
        if not is_sdxl_unet_config(config):
            raise ValueError("an SDXL UNet config needs adm_in_channels (the pooled text + size-id embedding width)")
        super().__init__(config)


class SDXLVAEEncoder(SDVAEEncoder):
    """The SD VAE encoder with SDXL's latent scaling (0.13025) by default."""

    def __init__(self, config: SDVAEConfig = SDXL_VAE_CONFIG):
        super().__init__(config)


class SDXLVAEDecoder(SDVAEDecoder):
    """The SD VAE decoder with SDXL's latent scaling (0.13025) by default."""

    def __init__(self, config: SDVAEConfig = SDXL_VAE_CONFIG):
        super().__init__(config)


def add_time_ids(height: int, width: int) -> torch.Tensor:
    """SDXL's size/crop conditioning for a ``height``×``width`` image: ``[[H, W, 0, 0, H, W]]``.

    Original size = target size = the generated size, crop (0, 0), as DiffSynth-Studio.
    """
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)


def sdxl_added_condition(pooled: torch.Tensor, time_ids: torch.Tensor, config: SDUNetConfig) -> torch.Tensor:
    """The UNet's added condition ``y = [pooled, sinusoid(time_ids)]``, shape ``(B, adm_in_channels)``.

    The sinusoid width per id is what the UNet's ``adm_in_channels`` leaves after the
    pooled embedding, divided by 6 (256 for SDXL); sgm's ``ConcatTimestepEmbedderND``.
    """
    if not is_sdxl_unet_config(config):
        raise ValueError("this UNet has no added condition (adm_in_channels is None); it is not an SDXL UNet")
    if pooled.dim() != 2 or time_ids.dim() != 2 or time_ids.shape[1] != 6 or pooled.shape[0] != time_ids.shape[0]:
        raise ValueError(f"expected pooled (B, D) and time_ids (B, 6), got {tuple(pooled.shape)} and {tuple(time_ids.shape)}")
    rest = config.adm_in_channels - pooled.shape[1]
    if rest <= 0 or rest % 6:
        raise ValueError(
            f"the UNet's added condition is {config.adm_in_channels} wide, which does not fit a pooled text embedding of "
            f"{pooled.shape[1]} plus 6 size ids; do the UNet and the second text encoder come from the same SDXL model?"
        )
    ids = timestep_embedding(time_ids.reshape(-1).to(pooled.device), rest // 6).reshape(pooled.shape[0], rest)
    return torch.cat([pooled.float(), ids], dim=1)
