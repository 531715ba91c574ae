"""Key maps and converters of ``diffsynth.models.convert``.

Two independent checks, so that our maps and a reference cannot be wrong together:

* names: our maps reproduce diffusers' own single-file converters
  (``convert_ldm_unet_checkpoint`` & co., diffusers 0.42.1) key for key and
  tensor for tensor, in both directions;
* numbers: our networks give the outputs of the original LDM code
  (``stable-diffusion-sdkit``), of diffusers fed our converted weights, and of
  transformers' ``CLIPTextModel``, on tiny random weights.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from ldm.modules.diffusionmodules.model import Decoder as LDMDecoder
from ldm.modules.diffusionmodules.model import Encoder as LDMEncoder
from ldm.modules.diffusionmodules.openaimodel import UNetModel as LDMUNet
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel

from diffsynth.models import convert
from diffsynth.models.blocks import timestep_embedding
from diffsynth.models.errors import ModelFileError
from diffsynth.models.sd_text_encoder import SDTextEncoder, infer_clip_text_config
from diffsynth.models.sd_unet import SDUNet, SDUNetConfig, infer_unet_config
from diffsynth.models.sd_vae import SDVAEConfig, SDVAEDecoder, SDVAEEncoder, infer_vae_config

TOL = 1e-4
ADM_T, POOLED = 8, 32  # SDXL-layout tiny: 6 size/crop ids x 8 channels + pooled text 32
ADM = POOLED + 6 * ADM_T

# SD 1.x layout: attention on all but the deepest level, 1x1-conv projections, fixed head count.
SD1 = SDUNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, transformer_depth=(1, 1, 0), num_heads=4, context_dim=32)
# SDXL layout: no attention at level 0, per-level depth, linear projections, 16-channel heads, label_emb.
SDXL = SDUNetConfig(
    model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, transformer_depth=(0, 1, 2), mid_transformer_depth=2,
    num_heads=None, num_head_channels=16, context_dim=48, use_linear_in_transformer=True, adm_in_channels=ADM,
)
VAE = SDVAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2)  # 4 levels: the x8 downsampling stays


# --------------------------------------------------------------------------- helpers


def randomize(module: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """All parameters ~ N(0, std): LDM zero-initialises out/proj_out layers, which would hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module.eval()


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """<= 1e-4 absolute (fp32; ~1e-7 seen), and small next to the output itself so tiny outputs prove something."""
    diff = maxdiff(a, b)
    assert diff <= TOL and diff <= 1e-3 * a.abs().max().item(), (diff, a.abs().max().item())


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b), (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    bad = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


def our_unet(config: SDUNetConfig, seed: int = 0) -> SDUNet:
    return randomize(SDUNet(config), seed=seed)


def ldm_unet_params(c: SDUNetConfig, depth: int | list[int]) -> dict:
    """sdkit ``UNetModel`` / LDM yaml parameters for our config (attention where depth > 0)."""
    return dict(
        image_size=8, in_channels=c.in_channels, out_channels=c.out_channels, model_channels=c.model_channels,
        attention_resolutions=[2**l for l, d in enumerate(c.transformer_depth) if d], num_res_blocks=c.num_res_blocks,
        channel_mult=list(c.channel_mult), use_spatial_transformer=True, transformer_depth=depth, context_dim=c.context_dim,
        use_linear_in_transformer=c.use_linear_in_transformer, legacy=False,
        **({"num_heads": c.num_heads} if c.num_heads else {"num_head_channels": c.num_head_channels}),
    )


def diffusers_unet_config(c: SDUNetConfig, sd: dict) -> dict:
    """diffusers' own config for an LDM UNet (its single-file path), SDXL 'text_time' forced for tiny sizes."""
    depths = {d for d in c.transformer_depth if d} | {c.mid_transformer_depth}
    if len(depths) == 1:
        params = ldm_unet_params(c, depths.pop())  # SD 1.x yaml: one depth for every attention layer
    else:
        assert c.transformer_depth[-1] == c.mid_transformer_depth  # SDXL yaml: per level, the mid block takes the last
        params = ldm_unet_params(c, list(c.transformer_depth))
    if c.adm_in_channels is not None:
        params.update(num_classes="sequential", adm_in_channels=c.adm_in_channels)
    oc = {"model": {"params": {"unet_config": {"params": params}, "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    cfg = create_unet_diffusers_config_from_ldm(oc, {"model.diffusion_model." + k: v for k, v in sd.items()})
    if c.adm_in_channels is not None:  # auto-detected only for context_dim 2048/1280 (test_assets §2.4)
        cfg.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=ADM_T)
    return cfg


def unet_inputs(c: SDUNetConfig, h: int, w: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, h, w, generator=gen)
    ctx = torch.randn(2, 7, c.context_dim, generator=gen)
    ts = torch.tensor([999, 3])
    pooled = torch.randn(2, POOLED, generator=gen)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 8, 1024, 1024]])
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), ADM_T).reshape(2, -1)], dim=1)  # sgm ConcatTimestepEmbedderND
    return x, ts, ctx, pooled, time_ids, y


def run_diffusers_unet(d, c, x, ts, ctx, pooled, time_ids):
    extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}} if c.adm_in_channels is not None else {}
    return d(x, ts, encoder_hidden_states=ctx, **extra).sample


def diffusers_unet_from_ours(c: SDUNetConfig, sd: dict) -> UNet2DConditionModel:
    d = UNet2DConditionModel(**diffusers_unet_config(c, sd)).eval()
    d.load_state_dict(convert.convert_unet_to_diffusers(sd, c), strict=True)
    return d


# --------------------------------------------------------------------------- UNet: names


@pytest.mark.parametrize("config", [SD1, SDXL], ids=["sd1", "sdxl"])
def test_unet_map_equals_diffusers_converter_both_ways(config):
    sd = our_unet(config).state_dict()
    ckpt = {"model.diffusion_model." + k: v for k, v in sd.items()}
    reference = convert_ldm_unet_checkpoint(ckpt, diffusers_unet_config(config, sd))
    ours = convert.convert_unet_to_diffusers(sd, config)
    assert_same_state(ours, reference)
    assert_same_state(convert.convert_unet_from_diffusers(reference, config), sd)


@pytest.mark.parametrize("config", [SD1, SDXL], ids=["sd1", "sdxl"])
def test_unet_key_and_module_maps_cover_both_models(config):
    d = UNet2DConditionModel(**diffusers_unet_config(config, SDUNet(config).state_dict()))
    ours = SDUNet(config)
    key_map = convert.unet_key_map(config)
    assert set(key_map) == set(d.state_dict())
    assert set(key_map.values()) == set(ours.state_dict())
    module_map = convert.unet_module_map(config)
    layers = (nn.Linear, nn.Conv2d)
    assert {n for n, m in d.named_modules() if isinstance(m, layers)} <= set(module_map)
    assert {n for n, m in ours.named_modules() if isinstance(m, layers)} <= set(module_map.values())
    for dk, lk in key_map.items():  # the two maps agree
        dm, _, p = dk.rpartition(".")
        assert f"{module_map[dm]}.{p}" == lk


def test_unet_module_map_examples():
    m = convert.unet_module_map(SDUNetConfig())  # SD 1.5 (upstream_spec §3.2)
    assert m["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert m["down_blocks.1.downsamplers.0.conv"] == "input_blocks.6.0.op"
    assert m["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"
    assert m["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert m["up_blocks.3.attentions.2.proj_out"] == "output_blocks.11.1.proj_out"
    assert m["mid_block.resnets.1.time_emb_proj"] == "middle_block.2.emb_layers.1"
    assert m["conv_norm_out"] == "out.0"
    assert len(convert.unet_key_map(SDUNetConfig())) == 686  # LDM key count of SD 1.5
    xl = convert.unet_module_map(
        SDUNetConfig(channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), mid_transformer_depth=10, num_heads=None,
                     num_head_channels=64, context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816)
    )
    assert xl["add_embedding.linear_2"] == "label_emb.0.2"
    assert xl["down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2"] == "input_blocks.8.1.transformer_blocks.9.ff.net.2"
    assert xl["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert "up_blocks.2.attentions.0.norm" not in xl and xl["up_blocks.2.resnets.2.conv2"] == "output_blocks.8.0.out_layers.3"


def test_unet_projection_rank_is_fitted_to_the_config():
    sd = our_unet(SD1).state_dict()
    dsd = convert.convert_unet_to_diffusers(sd, SD1)
    key = "down_blocks.0.attentions.0.proj_in.weight"
    assert dsd[key].dim() == 4
    squeezed = {k: (v[:, :, 0, 0] if k.endswith(("proj_in.weight", "proj_out.weight")) else v) for k, v in dsd.items()}
    assert_same_state(convert.convert_unet_from_diffusers(squeezed, SD1), sd)
    broken = dict(dsd, **{key: torch.zeros(32, 32, 1)})
    with pytest.raises(ModelFileError, match="proj_in.weight"):
        convert.convert_unet_from_diffusers(broken, SD1, source="unet/x.safetensors")


def test_unet_conversion_is_strict_and_explains():
    dsd = convert.convert_unet_to_diffusers(our_unet(SD1).state_dict(), SD1)
    missing = {k: v for k, v in dsd.items() if k != "up_blocks.2.resnets.1.conv2.bias"}
    with pytest.raises(ModelFileError) as err:
        convert.convert_unet_from_diffusers(missing, SD1, source="/m/unet/diffusion_pytorch_model.safetensors")
    msg = str(err.value)
    assert "/m/unet/diffusion_pytorch_model.safetensors" in msg and "1 missing" in msg and "up_blocks.2.resnets.1.conv2.bias" in msg
    extra = dict(dsd, **{"down_blocks.0.resnets.0.bogus.weight": torch.zeros(1)})
    with pytest.raises(ModelFileError, match="1 unexpected keys .down_blocks.0.resnets.0.bogus.weight"):
        convert.convert_unet_from_diffusers(extra, SD1)
    # a config that does not fit the weights: the SDXL map on SD 1.x weights
    with pytest.raises(ModelFileError, match="missing keys .*unexpected keys"):
        convert.convert_unet_from_diffusers(dsd, SDXL)
    with pytest.raises(ModelFileError, match="top-level names are .*text_model"):
        convert.convert_unet_from_diffusers({"text_model.final_layer_norm.weight": torch.zeros(1)}, SD1)


# --------------------------------------------------------------------------- UNet: numbers


def _ldm_unet(config: SDUNetConfig, sd: dict, depth: int) -> LDMUNet:
    params = ldm_unet_params(config, depth)
    params["context_dim"] = [config.context_dim] * depth  # sdkit's SpatialTransformer indexes it per block
    if config.adm_in_channels is not None:
        params["num_classes"] = "continuous"
    m = LDMUNet(**params)
    if config.adm_in_channels is not None:  # SDXL's 'sequential' label_emb (test_assets §2.4)
        ted = config.time_embed_dim
        m.label_emb = nn.Sequential(nn.Sequential(nn.Linear(config.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))
    m.load_state_dict(sd, strict=True)
    return m.eval()


# sdkit's UNetModel takes one transformer depth for all levels (and the mid block).
SDXL_UNIFORM = SDUNetConfig(**{**SDXL.to_dict(), "transformer_depth": (0, 2, 2), "mid_transformer_depth": 2})


@pytest.mark.parametrize("config", [SD1, SDXL_UNIFORM], ids=["sd1", "sdxl"])
def test_unet_matches_original_ldm_code(config):
    ours = our_unet(config)
    ldm = _ldm_unet(config, ours.state_dict(), depth=max(config.transformer_depth))
    x, ts, ctx, _, _, y = unet_inputs(config, 16, 24)
    y = y if config.adm_in_channels is not None else None
    with torch.no_grad():
        a = ours(x, ts, ctx, y=y)
        b = ldm(x, timesteps=ts, context=[ctx] * max(config.transformer_depth), y=y)  # sdkit: one context per block
    assert a.std() > 0.01
    assert_close(a, b)


@pytest.mark.parametrize("config", [SD1, SDXL], ids=["sd1", "sdxl"])
@pytest.mark.parametrize("size", [(16, 24), (18, 32)], ids=["16x24", "18x32"])
def test_unet_matches_diffusers_through_our_converter(config, size):
    ours = our_unet(config)
    d = diffusers_unet_from_ours(config, ours.state_dict())
    x, ts, ctx, pooled, time_ids, y = unet_inputs(config, *size)
    with torch.no_grad():
        a = ours(x, ts, ctx, y=y if config.adm_in_channels is not None else None)
        b = run_diffusers_unet(d, config, x, ts, ctx, pooled, time_ids)
    assert a.shape == x.shape
    assert_close(a, b)


# --------------------------------------------------------------------------- UNet: diffusers folders

DIFFUSERS_UNETS = {
    # SD 1.x: attention_head_dim is the head count (8 in SD 1.5)
    "sd1": (dict(block_out_channels=(32, 64, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4),
            dict(num_heads=4)),
    # SD 2.x: per-level head counts giving constant head width, linear projections
    "sd2": (dict(block_out_channels=(32, 64, 64), down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32, attention_head_dim=(2, 4, 4),
                 use_linear_projection=True),
            dict(num_heads=None, num_head_channels=16)),
    # SDXL: no attention at level 0, depths (-, 1, 2), text_time add-embedding
    "sdxl": (dict(block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                  up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), cross_attention_dim=48, transformer_layers_per_block=(1, 1, 2),
                  attention_head_dim=(2, 4, 4), use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=ADM_T, projection_class_embeddings_input_dim=ADM),
             dict(num_heads=None, num_head_channels=16)),
}


@pytest.mark.parametrize("name", list(DIFFUSERS_UNETS))
def test_diffusers_unet_folder_round_trip(name, tmp_path):
    kwargs, heads = DIFFUSERS_UNETS[name]
    d = randomize(UNet2DConditionModel(sample_size=8, layers_per_block=2, norm_num_groups=32, **kwargs))
    d.save_config(tmp_path)
    config = convert.unet_config_from_diffusers(convert.read_diffusers_config(tmp_path))
    assert config == convert.unet_config_from_diffusers(d.config)
    sd = convert.convert_unet_from_diffusers(d.state_dict(), config)
    assert config == infer_unet_config(sd, **heads)
    assert_same_state(convert.convert_unet_to_diffusers(sd, config), d.state_dict())
    ours = SDUNet(config)
    ours.load_state_dict(sd, strict=True)
    ours.eval()
    x, ts, ctx, pooled, time_ids, y = unet_inputs(config, 18, 32)
    with torch.no_grad():
        a = ours(x, ts, ctx, y=y if config.adm_in_channels is not None else None)
        b = run_diffusers_unet(d, config, x, ts, ctx, pooled, time_ids)
    assert_close(a, b)


def test_unet_config_from_real_diffusers_configs():
    sd15 = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False, "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
            "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    assert convert.unet_config_from_diffusers(sd15) == SDUNetConfig()
    sd2 = dict(sd15, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True)
    c2 = convert.unet_config_from_diffusers(sd2)
    assert (c2.num_heads, c2.num_head_channels, c2.context_dim, c2.use_linear_in_transformer) == (None, 64, 1024, True)
    xl = dict(sd15, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
              down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 2, 10],
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=2816, num_attention_heads=None)
    cx = convert.unet_config_from_diffusers(xl)
    assert (cx.channel_mult, cx.transformer_depth, cx.mid_transformer_depth, cx.num_head_channels, cx.adm_in_channels) == (
        (1, 2, 4), (0, 2, 10), 10, 64, 2816)


DIFFUSERS_UNET_SD15 = {"cross_attention_dim": 768}  # everything else: diffusers' defaults (= SD 1.5)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"class_embed_type": "projection"}, "class_embed_type"),
        ({"addition_embed_type": "image"}, "addition_embed_type"),
        ({"time_cond_proj_dim": 256}, "time_cond_proj_dim"),  # LCM-distilled UNets with guidance embedding
        ({"layers_per_block": [2, 1, 2, 2]}, "layers_per_block"),
        ({"attention_head_dim": [8, 8, 20, 20]}, "neither the head count nor the head width"),
        ({"up_block_types": ["UpBlock2D"] * 4}, "do not mirror"),
        ({"mid_block_type": None}, "mid_block_type"),
        ({"transformer_layers_per_block": [1, 0, 1, 1]}, "no transformer block"),
    ],
)
def test_unet_config_refuses_what_sdunet_cannot_build(change, words):
    with pytest.raises(ModelFileError, match=words) as err:
        convert.unet_config_from_diffusers({**DIFFUSERS_UNET_SD15, **change}, source="/m/unet/config.json")
    assert "/m/unet/config.json" in str(err.value)



def test_read_diffusers_config_errors_name_the_folder(tmp_path):
    with pytest.raises(ModelFileError, match="no config.json") as err:
        convert.read_diffusers_config(tmp_path)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        convert.read_diffusers_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"a": 1}))
    assert convert.read_diffusers_config(tmp_path) == {"a": 1}


# --------------------------------------------------------------------------- VAE


class LDMVAE(nn.Module):
    """Original LDM encoder/decoder plus quant convs, with the checkpoint's key layout."""

    def __init__(self, c: SDVAEConfig):
        super().__init__()
        ddconfig = ldm_ddconfig(c)
        self.encoder, self.decoder = LDMEncoder(**ddconfig), LDMDecoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)

    def encode_mean(self, x):
        return torch.chunk(self.quant_conv(self.encoder(x)), 2, dim=1)[0]

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def ldm_ddconfig(c: SDVAEConfig) -> dict:
    return dict(double_z=True, z_channels=c.z_channels, resolution=64, in_channels=c.in_channels, out_ch=c.out_ch, ch=c.ch,
                ch_mult=list(c.ch_mult), num_res_blocks=c.num_res_blocks, attn_resolutions=[], dropout=0.0)


def diffusers_vae_config(c: SDVAEConfig, sd: dict) -> dict:
    oc = {"model": {"params": {"scale_factor": c.scaling_factor, "first_stage_config": {"params": {"embed_dim": c.embed_dim, "ddconfig": ldm_ddconfig(c)}}}}}
    return create_vae_diffusers_config_from_ldm(oc, {"first_stage_model." + k: v for k, v in sd.items()})


@pytest.fixture(scope="module")
def vae_models():
    enc, dec = randomize(SDVAEEncoder(VAE), seed=1), randomize(SDVAEDecoder(VAE), seed=2)
    sd = {**enc.state_dict(), **dec.state_dict()}
    ldm = LDMVAE(VAE)
    ldm.load_state_dict(sd, strict=True)
    return enc, dec, sd, ldm.eval()


def test_vae_map_equals_diffusers_converter_both_ways(vae_models):
    *_, sd, _ = vae_models
    reference = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in sd.items()}, diffusers_vae_config(VAE, sd))
    assert_same_state(convert.convert_vae_to_diffusers(sd, VAE), reference)
    assert_same_state(convert.convert_vae_from_diffusers(reference, VAE), sd)
    assert_same_state(convert.convert_vae_from_diffusers(reference), sd)  # architecture read off the keys
    assert set(convert.vae_key_map(VAE)) == set(reference)


def test_vae_matches_original_ldm_code_and_diffusers(vae_models):
    enc, dec, sd, ldm = vae_models
    d = AutoencoderKL(**diffusers_vae_config(VAE, sd)).eval()
    d.load_state_dict(convert.convert_vae_to_diffusers(sd, VAE), strict=True)
    gen = torch.Generator().manual_seed(3)
    img = torch.randn(1, 3, 64, 96, generator=gen)
    z = torch.randn(1, 4, 8, 12, generator=gen)
    sf = VAE.scaling_factor
    with torch.no_grad():
        mean = enc(img) / sf
        image = dec(z * sf)
        assert mean.shape == (1, 4, 8, 12) and image.shape == (1, 3, 64, 96)
        assert_close(mean, ldm.encode_mean(img))
        assert_close(image, ldm.decode(z))
        assert_close(mean, d.encode(img).latent_dist.mean)
        assert_close(image, d.decode(z).sample)


def test_vae_accepts_legacy_diffusers_attention_names(vae_models):
    *_, sd, _ = vae_models
    modern = convert.convert_vae_to_diffusers(sd, VAE)
    names = {v: k for k, v in convert.VAE_LEGACY_ATTENTION_NAMES.items()}
    legacy = {}
    for k, v in modern.items():
        for new, old in names.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[k] = v[:, :, None, None] if k.endswith(("query.weight", "proj_attn.weight")) else v  # also 4-D in old conversions
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert_same_state(convert.convert_vae_from_diffusers(legacy, VAE), sd)


def test_diffusers_vae_folder_round_trip(tmp_path):
    d = randomize(AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4, scaling_factor=0.13025))
    d.save_config(tmp_path)
    config = convert.vae_config_from_diffusers(convert.read_diffusers_config(tmp_path))
    sd = convert.convert_vae_from_diffusers(d.state_dict(), config)
    assert config == infer_vae_config(sd, scaling_factor=0.13025)
    assert config.scaling_factor == 0.13025 and config.downscale == 8
    enc, dec = convert.split_vae_state_dict(sd)
    assert_same_state({**enc, **dec}, sd)
    e, g = SDVAEEncoder(config), SDVAEDecoder(config)
    e.load_state_dict(enc, strict=True)
    g.load_state_dict(dec, strict=True)
    assert_same_state(convert.convert_vae_to_diffusers(sd, config), d.state_dict())
    with pytest.raises(ModelFileError, match="shift_factor"):
        convert.vae_config_from_diffusers({**d.config, "shift_factor": 0.1159})
    with pytest.raises(ModelFileError, match="1 missing keys .decoder.conv_out.bias"):
        convert.convert_vae_from_diffusers({k: v for k, v in d.state_dict().items() if k != "decoder.conv_out.bias"}, config)


# --------------------------------------------------------------------------- CLIP text encoder


@pytest.fixture(scope="module")
def hf_clip():
    cfg = HFCLIPTextConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                           max_position_embeddings=77, hidden_act="quick_gelu")
    torch.manual_seed(0)
    return randomize(CLIPTextModel(cfg), std=0.05, seed=4)


def test_clip_text_matches_transformers(hf_clip):
    hf_sd = hf_clip.state_dict()
    config = convert.clip_text_config_from_hf(hf_clip.config.to_dict())
    sd = convert.convert_clip_text_from_hf(hf_sd)
    assert config == infer_clip_text_config(sd) and config.num_heads == 2
    assert set(sd) == set(convert.clip_text_key_names(config)) == set(SDTextEncoder(config).state_dict())
    ours = SDTextEncoder(config)
    ours.load_state_dict(sd, strict=True)
    ours.eval()
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = hf_clip(ids, output_hidden_states=True)
        final_ln = getattr(hf_clip, "text_model", hf_clip).final_layer_norm
        assert_close(ours(ids), out.last_hidden_state)
        assert_close(ours(ids, clip_skip=2), final_ln(out.hidden_states[-2]))


def test_clip_text_layouts_agree_with_diffusers(hf_clip):
    hf_sd = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in hf_clip.state_dict().items()}
    ours = convert.convert_clip_text_from_hf(hf_sd)
    flat = {k.removeprefix("text_model."): v for k, v in hf_sd.items()}  # transformers >= 5.6
    assert_same_state(convert.convert_clip_text_from_hf(flat), ours)
    ldm = {"cond_stage_model.transformer." + k: v for k, v in hf_sd.items()}
    reference = {k: v for k, v in convert_ldm_clip_checkpoint(ldm).items() if not k.endswith("position_ids")}
    assert_same_state(reference, ours)
    full_clip = dict(hf_sd, **{"text_model.embeddings.position_ids": torch.arange(77)[None], "logit_scale": torch.tensor(2.6),
                               "text_projection.weight": torch.zeros(8, 128), "vision_model.post_layernorm.weight": torch.ones(8)})
    assert_same_state(convert.convert_clip_text_from_hf(full_clip), ours)


def test_clip_text_conversion_is_strict(hf_clip):
    sd = convert.convert_clip_text_from_hf(hf_clip.state_dict())
    with pytest.raises(ModelFileError, match="unexpected keys .text_model.encoder.layers.0.mlp.fc3.weight") as err:
        convert.convert_clip_text_from_hf(dict(sd, **{"text_model.encoder.layers.0.mlp.fc3.weight": torch.zeros(1)}), source="te.bin")
    assert "te.bin" in str(err.value)
    with pytest.raises(ModelFileError, match="missing keys .text_model.encoder.layers.1.layer_norm2.bias"):
        convert.convert_clip_text_from_hf({k: v for k, v in sd.items() if k != "text_model.encoder.layers.1.layer_norm2.bias"})
    with pytest.raises(ModelFileError, match="not a CLIP text encoder"):
        convert.convert_clip_text_from_hf({"conv_in.weight": torch.zeros(1)})
    with pytest.raises(ModelFileError, match="cannot build"):
        convert.clip_text_config_from_hf({"hidden_size": 100, "num_attention_heads": 3})
    nested = convert.clip_text_config_from_hf({"model_type": "clip", "text_config": {"hidden_size": 768, "num_attention_heads": 12}})
    assert nested.hidden_size == 768 and nested.head_dim == 64


# --------------------------------------------------------------------------- single-file splitting


def test_split_ldm_checkpoint(hf_clip, vae_models):
    unet_sd = our_unet(SD1).state_dict()
    *_, vae_sd, _ = vae_models
    te_sd = convert.convert_clip_text_from_hf(hf_clip.state_dict())
    ckpt = {
        **{"model.diffusion_model." + k: v for k, v in unet_sd.items()},
        **{"first_stage_model." + k: v for k, v in vae_sd.items()},
        **{"cond_stage_model.transformer." + k: v for k, v in te_sd.items()},
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77.0)[None],
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(10),
        "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(1),
        **{name: torch.zeros(1000) for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                                                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                                                 "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                                                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")},
    }
    parts = convert.split_ldm_checkpoint(ckpt, source="m.ckpt")
    assert set(parts) == {"unet", "vae", "text_encoder"}
    assert_same_state(parts["unet"], unet_sd)
    assert_same_state(parts["vae"], vae_sd)
    assert_same_state(parts["text_encoder"], te_sd)

    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v for k, v in ckpt.items()}
    assert_same_state(convert.split_ldm_checkpoint(old)["text_encoder"], te_sd)

    with pytest.raises(ModelFileError, match=r"cond_stage_model\.model\.\* \(1\)") as err:
        convert.split_ldm_checkpoint(dict(ckpt, **{"cond_stage_model.model.ln_final.weight": torch.zeros(1)}), source="sd2.safetensors")
    assert "sd2.safetensors" in str(err.value)
    with pytest.raises(ModelFileError, match="no Stable Diffusion components"):
        convert.split_ldm_checkpoint({"betas": torch.zeros(3)})
    # VAE attention stored as Linear matrices (files written back from diffusers) comes out as 1x1 convs
    linear_attn = {k: (v[:, :, 0, 0] if ".attn_1." in k and k.endswith(("q.weight", "proj_out.weight")) else v) for k, v in ckpt.items()}
    assert linear_attn["first_stage_model.decoder.mid.attn_1.q.weight"].dim() == 2
    assert_same_state(convert.split_ldm_checkpoint(linear_attn)["vae"], vae_sd)
    only_unet = convert.split_ldm_checkpoint({"model.diffusion_model." + k: v for k, v in unet_sd.items()})
    assert set(only_unet) == {"unet"}


def test_ignore_tables_are_documented():
    for table in (convert.LDM_IGNORED, convert.CLIP_TEXT_IGNORED):
        assert all(isinstance(entry, str) and reason for entry, reason in table)
    ignored = {entry for entry, _ in convert.LDM_IGNORED}
    assert not any(prefix.startswith(tuple(ignored)) for prefix, _ in convert.LDM_COMPONENT_PREFIXES)


# --------------------------------------------------------------------------- full size


@pytest.mark.slow
def test_full_size_sd15_unet_matches_diffusers():
    config = SDUNetConfig()
    with torch.device("meta"):
        ours = SDUNet(config)
    ours.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02, generator=gen)
    ours.eval()
    dcfg = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    with torch.device("meta"):
        d = UNet2DConditionModel(**dcfg)
    assert convert.unet_config_from_diffusers(d.config) == config
    d.load_state_dict(convert.convert_unet_to_diffusers(ours.state_dict(), config), strict=True, assign=True)
    d.eval()
    x = torch.randn(1, 4, 64, 64, generator=gen)
    ctx = torch.randn(1, 77, 768, generator=gen)
    with torch.inference_mode():
        a = ours(x, 500, ctx)
        b = d(x, 500, encoder_hidden_states=ctx).sample
    assert_close(a, b)
