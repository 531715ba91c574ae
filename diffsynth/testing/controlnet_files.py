"""Tiny random-weight ControlNets written in the real on-disk formats.

``TINY_CONTROLNET`` is the ControlNet of ``factory.TINY_UNET`` (same channels,
levels, heads and context width), so its residuals fit the tiny UNet. The hint
encoder keeps the real channels and the ×8 downsampling. Files:

* ``layout="ldm"``: lllyasviel's v1.1 layout, a flat ``{"control_model.*": tensor}``
  dict saved with ``torch.save`` (``.pth``) or as ``.safetensors``;
* ``layout="ldm_bare"``: the same keys without ``control_model.`` (some safetensors exports);
* ``layout="diffusers"``: a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors``.

All weights, the hint encoder and the zero convolutions included, are
fan-in-scaled noise (``factory.randomize_``): real zero convolutions start at
zero, which would make every residual vanish and hide mapping bugs.
"""
from __future__ import annotations

import json
import os

import torch

from ..models.convert_controlnet import CONTROLNET_PREFIX, convert_controlnet_to_diffusers
from ..models.sd_controlnet import ControlNetConfig, SDControlNet
from ..utils.atomic import atomic_save_safetensors, atomic_write_text
from .factory import DTYPES, TINY_UNET, _cast, _save, diffusers_unet_config, randomize_

__all__ = ["TINY_CONTROLNET", "build_controlnet_state_dict", "diffusers_controlnet_config", "write_controlnet"]

TINY_CONTROLNET = ControlNetConfig(unet=TINY_UNET)
HINT_GAIN = 1.8


def build_controlnet_state_dict(seed: int = 0, config: ControlNetConfig = TINY_CONTROLNET) -> dict[str, torch.Tensor]:
    """Seeded random ``SDControlNet`` weights in our (LDM, unprefixed) names."""
    g = torch.Generator().manual_seed(seed)
    sd = dict(randomize_(SDControlNet(config), g).state_dict())
    # Plain fan-in scaling loses about half the signal's power at each SiLU, so after the hint
    # encoder's 8 convolutions the control image barely moved the residuals (features of std 0.05
    # next to a conv_in output of std 0.9). A gain of 1.8 per convolution (measured) gives hint
    # features of std ~1, so a test notices a hint that is ignored or misrouted.
    for k, v in sd.items():
        if k.startswith("input_hint_block.") and k.endswith(".weight"):
            sd[k] = v * HINT_GAIN
    return sd


def diffusers_controlnet_config(c: ControlNetConfig) -> dict:
    """``config.json`` of a diffusers ``ControlNetModel`` folder for this config."""
    hint = c.hint_block_channels
    if list(hint[1::2]) != list(hint[0:-1:2]):
        raise ValueError(f"hint_block_channels {hint} have no diffusers equivalent (each stride-1 conv must keep its channels)")
    cfg = diffusers_unet_config(c.unet)
    for decoder_only in ("up_block_types", "out_channels", "sample_size"):
        del cfg[decoder_only]
    cfg.update(
        _class_name="ControlNetModel",
        conditioning_channels=c.hint_channels,
        conditioning_embedding_out_channels=list(hint[0::2]),
        controlnet_conditioning_channel_order="rgb",
        global_pool_conditions=False,
    )
    return cfg


def write_controlnet(path: str, seed: int = 0, layout: str = "ldm", dtype: str = "fp32", config: ControlNetConfig = TINY_CONTROLNET) -> str:
    """Write a tiny ControlNet to ``path`` (a ``.pth``/``.safetensors`` file, or a folder for ``layout="diffusers"``)."""
    sd = _cast(build_controlnet_state_dict(seed, config), DTYPES[dtype])
    if layout == "diffusers":
        os.makedirs(path, exist_ok=True)
        atomic_write_text(os.path.join(path, "config.json"), json.dumps(diffusers_controlnet_config(config), indent=2))
        atomic_save_safetensors(convert_controlnet_to_diffusers(sd, config), os.path.join(path, "diffusion_pytorch_model.safetensors"))
        return path
    if layout == "ldm":
        sd = {CONTROLNET_PREFIX + k: v for k, v in sd.items()}
    elif layout != "ldm_bare":
        raise ValueError(f"layout must be 'ldm', 'ldm_bare' or 'diffusers', got {layout!r}")
    if not path.endswith((".pth", ".safetensors")):
        raise ValueError(f"a ControlNet file is a .pth or .safetensors file, got {path!r}")
    return _save(sd, path)
