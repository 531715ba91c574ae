"""ControlNet for the SD 1.x UNet (lllyasviel's ``cldm.ControlNet`` layout, v1.0/v1.1).

A ControlNet is a trainable copy of the UNet's encoder (time embedding, input
blocks, middle block) plus a small *hint encoder* that turns the control image
into features added to the first input block's output. The output of every
input block and of the middle block goes through a 1×1 "zero convolution"; the
results are the residuals that ``SDUNet.forward`` adds to its skip connections
(``down_residuals``) and to its middle block (``mid_residual``).

Parameter names equal the keys of ControlNet v1.1 files after ``control_model.``
(``time_embed.*``, ``input_blocks.*``, ``middle_block.*``,
``input_hint_block.{0,2,…,14}.*``, ``zero_convs.{k}.0.*``, ``middle_block_out.0.*``),
so such a file loads without renaming; diffusers ``ControlNetModel`` folders are
renamed onto it by ``convert_controlnet``.

Differences from DiffSynth-Studio (upstream_spec §3.6), on purpose:

* every zero convolution has and uses its own bias (upstream kept only three,
  each overwritten by whichever file key it met last, and dropped the rest);
* the attention layers use the UNet's GroupNorm eps 1e-6 (upstream: 1e-5), as the
  original ControlNet code and diffusers do;
* residuals come back already multiplied by ``scale``, in the form
  ``SDUNet.forward`` takes (upstream returned 13 tensors for the caller to scale).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .blocks import TimestepSequential, timestep_embedding
from .sd_unet import SDUNet, SDUNetConfig, infer_unet_config

__all__ = ["ControlNetConfig", "SDControlNet", "infer_controlnet_config"]


@dataclass(frozen=True)
class ControlNetConfig:
    """Architecture of a ControlNet. Defaults are SD 1.5 ControlNet v1.0/v1.1.

    ``unet`` describes the copied UNet encoder (its decoder-side fields,
    ``out_channels``, are unused). The hint encoder is a chain of 3×3
    convolutions, ``hint_channels`` -> ``hint_block_channels[0]`` -> … ->
    ``hint_block_channels[-1]`` -> ``unet.model_channels``, with SiLU between
    them; the 2nd, 4th, 6th, … convolution after the first has stride 2, so the
    default 7 entries downsample ×8 (the VAE's factor: the hint is an image at
    the output's pixel size, the residuals live at latent size).
    """

    unet: SDUNetConfig = field(default_factory=SDUNetConfig)
    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = (16, 16, 32, 32, 96, 96, 256)

    def __post_init__(self):
        if len(self.hint_block_channels) % 2 != 1:
            raise ValueError(
                f"hint_block_channels needs an odd number of entries (a first conv, then pairs of a stride-1 and a stride-2 conv), "
                f"got {len(self.hint_block_channels)}: {self.hint_block_channels}"
            )
        if self.unet.adm_in_channels is not None:
            raise ValueError("SDXL-layout ControlNets (unet.adm_in_channels set) are not supported; only SD 1.x/2.x layouts")

    @property
    def hint_downscale(self) -> int:
        """Pixel size of the hint per latent cell (8 for the default hint encoder)."""
        return 2 ** (len(self.hint_block_channels) // 2)

    def to_dict(self) -> dict:
        return asdict(self)


def _hint_encoder(c: ControlNetConfig) -> nn.Sequential:
    """LDM ``input_hint_block``: conv, SiLU, conv, SiLU, …, conv (convs at the even indices)."""
    layers: list[nn.Module] = []
    ch = c.hint_channels
    for i, out in enumerate(c.hint_block_channels):
        stride = 2 if i and i % 2 == 0 else 1
        layers += [nn.Conv2d(ch, out, 3, stride=stride, padding=1), nn.SiLU()]
        ch = out
    layers.append(nn.Conv2d(ch, c.unet.model_channels, 3, padding=1))
    return nn.Sequential(*layers)


def _zero_conv(channels: int) -> nn.Sequential:
    """1×1 convolution wrapped as LDM's ``TimestepEmbedSequential(conv)`` (keys ``….0.weight``/``….0.bias``)."""
    return nn.Sequential(nn.Conv2d(channels, channels, 1))


def _unet_encoder(config: SDUNetConfig) -> tuple[nn.Sequential, nn.ModuleList, TimestepSequential, tuple[int, ...]]:
    """``(time_embed, input_blocks, middle_block, skip_channels)`` of an ``SDUNet`` of this config.

    Taken from an ``SDUNet`` itself, so the ControlNet's encoder is the UNet's by
    construction (no second copy of the block-building code). The UNet is built
    on the meta device, so its decoder half costs nothing; the parts kept are
    then given storage on the current default device and their modules'
    default initialisation (inside ``loading.instantiate`` that device is
    ``meta`` and this step is free too).
    """
    with torch.device("meta"):
        unet = SDUNet(config)
    parts = nn.ModuleList([unet.time_embed, unet.input_blocks, unet.middle_block])
    device = torch.get_default_device()
    if device.type != "meta":
        parts.to_empty(device=device)
        for module in parts.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            elif next(module.parameters(recurse=False), None) is not None:  # would keep uninitialised memory
                raise TypeError(f"{type(module).__name__} holds parameters but has no reset_parameters(); give it one")
    return unet.time_embed, unet.input_blocks, unet.middle_block, unet.skip_channels


class SDControlNet(nn.Module):
    """ControlNet: ``(x_t, t, context, hint) -> (down_residuals, mid_residual)`` for ``SDUNet.forward``.

    Pure batch semantics: each row of the batch is computed independently, so
    running a batch in chunks (``controlnet_batch_size``) gives the same result.
    """

    def __init__(self, config: ControlNetConfig = ControlNetConfig()):
        super().__init__()
        self.config = config
        time_embed, input_blocks, middle_block, skip_channels = _unet_encoder(config.unet)
        # Attribute order = cldm.ControlNet's, so state dicts (and files we write) list keys as v1.1 files do.
        self.time_embed = time_embed
        self.input_blocks = input_blocks
        self.zero_convs = nn.ModuleList(_zero_conv(ch) for ch in skip_channels)
        self.input_hint_block = _hint_encoder(config)
        self.middle_block = middle_block
        self.middle_block_out = _zero_conv(skip_channels[-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.middle_block_out[0].weight.dtype

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | int | float,
        context: torch.Tensor,
        hint: torch.Tensor,
        scale: float = 1.0,
        attention_tile: tuple[int, int] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Residuals for ``SDUNet.forward(..., down_residuals=, mid_residual=)``, multiplied by ``scale``.

        ``x``: latents ``(B, 4, h, w)``; ``timestep``: 0-d or ``(B,)``;
        ``context``: text embedding ``(B, L, context_dim)``; ``hint``: control
        image ``(B or 1, 3, 8h, 8w)`` with values in [0, 1] (a batch of 1 is
        used for every row). ``attention_tile=(size, stride)`` tiles the
        attention layers as in ``SDUNet``.
        Returns one residual per UNet skip connection (push order: the
        ``conv_in`` output first; 12 for SD 1.5) and the middle-block residual.
        """
        c = self.config
        b, _, height, width = x.shape
        want = (height * c.hint_downscale, width * c.hint_downscale)
        if hint.dim() != 4 or hint.shape[1] != c.hint_channels or tuple(hint.shape[-2:]) != want or hint.shape[0] not in (1, b):
            raise ValueError(
                f"the ControlNet hint must be ({b} or 1, {c.hint_channels}, {want[0]}, {want[1]}) for latents of shape {tuple(x.shape)} "
                f"({c.hint_downscale}x the latent size, i.e. the output image's size), got {tuple(hint.shape)}"
            )
        dtype = self.dtype
        emb = self.time_embed(timestep_embedding(torch.as_tensor(timestep), c.unet.model_channels).to(x.device, dtype))
        if emb.shape[0] == 1 and b > 1:
            emb = emb.expand(b, -1)
        context = context.to(dtype)
        guided = self.input_hint_block(hint.to(dtype))

        down: list[torch.Tensor] = []
        h = x.to(dtype)
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context, attention_tile=attention_tile)
            if i == 0:  # the hint joins right after conv_in, as in cldm.ControlNet
                h = h + guided
            down.append(zero_conv(h) * scale)
        h = self.middle_block(h, emb, context, attention_tile=attention_tile)
        return down, self.middle_block_out(h) * scale


_HINT_CONV = re.compile(r"^input_hint_block\.(\d+)\.weight$")


def infer_controlnet_config(sd: dict[str, torch.Tensor], *, num_heads: int | None = 8, num_head_channels: int | None = None) -> ControlNetConfig:
    """Read a ControlNet's architecture off its (prefix-stripped, LDM-layout) state dict.

    The encoder part is read by ``infer_unet_config``; heads follow the same
    family rule (SD 1.x: 8 heads; SD 2.x ControlNets: ``num_head_channels=64``).
    A missing key raises ``KeyError``/``ValueError`` (``loading.infer_config``
    turns those into a ``ModelFileError`` naming the file).
    """
    in_channels = sd["input_blocks.0.0.weight"].shape[1]
    # A ControlNet has no output layer; infer_unet_config reads only the shape of
    # "out.2.weight" from it (for out_channels, unused here), so a shape-only
    # stand-in with out_channels = in_channels is enough.
    stand_in = torch.empty((in_channels,), device="meta")
    unet = infer_unet_config({**sd, "out.2.weight": stand_in}, num_heads=num_heads, num_head_channels=num_head_channels)
    convs = sorted(int(m.group(1)) for m in map(_HINT_CONV.match, sd) if m)
    if not convs or convs != list(range(0, 2 * len(convs), 2)):
        raise ValueError(f"input_hint_block convolutions at indices {convs}; expected 0, 2, 4, …")
    last = sd[f"input_hint_block.{convs[-1]}.weight"]
    if last.shape[0] != unet.model_channels:
        raise ValueError(
            f"the hint encoder's last convolution, input_hint_block.{convs[-1]}, has {last.shape[0]} output channels where the "
            f"encoder has {unet.model_channels} (is input_hint_block.{convs[-1] + 2}.weight missing?)"
        )
    return ControlNetConfig(
        unet=unet,
        hint_channels=sd["input_hint_block.0.weight"].shape[1],
        hint_block_channels=tuple(sd[f"input_hint_block.{i}.weight"].shape[0] for i in convs[:-1]),
    )
