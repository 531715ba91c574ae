"""ControlNet model, key maps, files (``sd_controlnet``, ``convert_controlnet``, ``testing.controlnet_files``).

Numbers come from two independent references fed the same tiny random weights:
diffusers' ``ControlNetModel`` (through our converter) and lllyasviel's
``cldm.ControlNet`` layout assembled from the original LDM code
(``stable-diffusion-sdkit``), which loads our state dict as is. Names are checked
against diffusers' own original-format converter ``convert_controlnet_checkpoint``.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_controlnet_checkpoint,
    create_controlnet_diffusers_config_from_ldm,
    create_unet_diffusers_config_from_ldm,
)
from ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential
from ldm.modules.diffusionmodules.openaimodel import UNetModel as LDMUNet
from ldm.modules.diffusionmodules.util import timestep_embedding as ldm_timestep_embedding

from diffsynth.models import convert
from diffsynth.models.convert_controlnet import (
    controlnet_config_from_diffusers,
    controlnet_key_map,
    controlnet_module_map,
    convert_controlnet_from_diffusers,
    convert_controlnet_to_diffusers,
    split_controlnet_checkpoint,
)
from diffsynth.models.errors import ModelFileError
from diffsynth.models.loading import infer_config, instantiate
from diffsynth.models.sd_controlnet import ControlNetConfig, SDControlNet, infer_controlnet_config
from diffsynth.models.sd_unet import SDUNet, SDUNetConfig
from diffsynth.models.state_dict import load_state_dict
from diffsynth.testing.controlnet_files import TINY_CONTROLNET, build_controlnet_state_dict, diffusers_controlnet_config, write_controlnet
from diffsynth.testing.factory import TINY_UNET, build_sd_state_dicts, diffusers_unet_config

TOL = 1e-4
# SD 1.5's block structure shrunk: 4 levels, 2 resnets each, attention on the first 3 -> 12 skips, 13 zero convs.
# 64 channels at level 0: with 32 (TINY_UNET) each GroupNorm group is one channel, which erases the
# per-channel time-embedding shift, so that level is blind to the timestep and its emb_layers untested.
SD15_SHAPED = ControlNetConfig(
    unet=SDUNetConfig(model_channels=64, channel_mult=(1, 1, 2, 2), num_res_blocks=2, transformer_depth=(1, 1, 1, 0), num_heads=4, context_dim=32)
)
CONFIGS = {"tiny": TINY_CONTROLNET, "sd15_shaped": SD15_SHAPED}


# --------------------------------------------------------------------------- helpers


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """<= 1e-4 absolute (fp32), and small next to the output so that tiny outputs prove something."""
    diff = maxdiff(a, b)
    assert diff <= TOL and diff <= 1e-4 * a.abs().max().item(), (diff, a.abs().max().item())


def assert_residuals_close(ours, theirs) -> None:
    (down_a, mid_a), (down_b, mid_b) = ours, theirs
    assert len(down_a) == len(down_b)
    for a, b in zip([*down_a, mid_a], [*down_b, mid_b]):
        assert a.std() > 0.05  # signal everywhere: a wrong map could not hide behind zeros
        assert_close(a, b)


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b), (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


def our_controlnet(c: ControlNetConfig, sd: dict) -> SDControlNet:
    return instantiate(lambda: SDControlNet(c), sd, source="<test>", what="ControlNet", device="cpu", dtype=torch.float32)


def inputs(c: ControlNetConfig, h: int, w: int, seed: int = 1):
    """Latents, per-row timesteps, text context and a [0, 1] hint at 8x the latent size."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, h, w, generator=gen)
    ctx = torch.randn(2, 7, c.unet.context_dim, generator=gen)
    hint = torch.rand(2, 3, 8 * h, 8 * w, generator=gen)
    return x, torch.tensor([999, 3]), ctx, hint


def ldm_params(u: SDUNetConfig) -> dict:
    """sdkit ``UNetModel`` parameters (LDM yaml ``unet_config.params``) for an SD 1.x-layout config."""
    depth = max(u.transformer_depth)
    assert {d for d in u.transformer_depth if d} == {depth} == {u.mid_transformer_depth}  # sdkit takes one depth
    return dict(
        image_size=8, in_channels=u.in_channels, out_channels=u.out_channels, model_channels=u.model_channels,
        attention_resolutions=[2**l for l, d in enumerate(u.transformer_depth) if d], num_res_blocks=u.num_res_blocks,
        channel_mult=list(u.channel_mult), num_heads=u.num_heads, use_spatial_transformer=True, transformer_depth=depth,
        context_dim=u.context_dim, legacy=False,
    )


def diffusers_config(c: ControlNetConfig, ckpt: dict) -> dict:
    """diffusers' ControlNetModel config for an LDM ControlNet, via its single-file helpers."""
    params = ldm_params(c.unet)
    oc = {"model": {"params": {"unet_config": {"params": params}, "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
                               "control_stage_config": {"params": dict(params, hint_channels=c.hint_channels)}}}}
    try:
        return create_controlnet_diffusers_config_from_ldm(oc, ckpt)
    except TypeError:  # diffusers 0.42.1 calls create_unet_diffusers_config_from_ldm without `checkpoint` (test_assets §2.4)
        u = create_unet_diffusers_config_from_ldm(oc, ckpt)
        keep = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
                "use_linear_projection", "class_embed_type", "addition_embed_type", "addition_time_embed_dim",
                "projection_class_embeddings_input_dim", "transformer_layers_per_block")
        return {**{k: u[k] for k in keep}, "conditioning_channels": c.hint_channels}


def prefixed(sd: dict) -> dict:
    return {"control_model." + k: v for k, v in sd.items()}


class LDMControlNet(nn.Module):
    """lllyasviel's ``cldm.ControlNet`` (v1.0/v1.1 key layout) assembled from the original LDM code."""

    def __init__(self, c: ControlNetConfig):
        super().__init__()
        unet = LDMUNet(**ldm_params(c.unet))
        self.mc = c.unet.model_channels
        self.time_embed, self.input_blocks, self.middle_block = unet.time_embed, unet.input_blocks, unet.middle_block
        with torch.no_grad():  # the output channels of each input block, probed
            h, emb, ctx = torch.zeros(1, c.unet.in_channels, 8, 8), torch.zeros(1, 4 * self.mc), torch.zeros(1, 1, c.unet.context_dim)
            chans = []
            for block in self.input_blocks:
                h = block(h, emb, ctx)
                chans.append(h.shape[1])

        def conv(i, o, k=3, s=1):
            return nn.Conv2d(i, o, k, stride=s, padding=k // 2)

        self.input_hint_block = TimestepEmbedSequential(
            conv(3, 16), nn.SiLU(), conv(16, 16), nn.SiLU(), conv(16, 32, s=2), nn.SiLU(), conv(32, 32), nn.SiLU(),
            conv(32, 96, s=2), nn.SiLU(), conv(96, 96), nn.SiLU(), conv(96, 256, s=2), nn.SiLU(), conv(256, self.mc),
        )
        self.zero_convs = nn.ModuleList(TimestepEmbedSequential(conv(ch, ch, k=1)) for ch in chans)
        self.middle_block_out = TimestepEmbedSequential(conv(chans[-1], chans[-1], k=1))

    def forward(self, x, hint, timesteps, context):
        emb = self.time_embed(ldm_timestep_embedding(timesteps, self.mc, repeat_only=False))
        guided = self.input_hint_block(hint, emb, context)
        outs, h = [], x
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided
            outs.append(zero_conv(h, emb, context))
        return outs, self.middle_block_out(self.middle_block(h, emb, context), emb, context)


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request):
    """(config, our state dict, our model, diffusers ControlNetModel loaded through our converter)."""
    c = CONFIGS[request.param]
    sd = build_controlnet_state_dict(seed=0, config=c)
    d = ControlNetModel(**diffusers_config(c, prefixed(sd))).eval()
    d.load_state_dict(convert_controlnet_to_diffusers(sd, c), strict=True)
    return c, sd, our_controlnet(c, sd), d


# --------------------------------------------------------------------------- structure and names


def test_encoder_is_the_unets_encoder():
    """Same names and shapes as SDUNet's time embedding, input blocks and middle block."""
    cn = SDControlNet(TINY_CONTROLNET).state_dict()
    unet = SDUNet(TINY_UNET).state_dict()
    shared = {k: tuple(v.shape) for k, v in unet.items() if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}
    assert shared == {k: tuple(v.shape) for k, v in cn.items() if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}
    assert SDControlNet(TINY_CONTROLNET).dtype == torch.float32
    rest = sorted({".".join(k.split(".")[:2]) for k in cn if k not in shared})
    assert rest == sorted(["input_hint_block." + str(i) for i in range(0, 15, 2)] + [f"zero_convs.{k}" for k in range(4)] + ["middle_block_out.0"])


def test_sd15_key_map_and_config():
    """SD 1.5 (built on the meta device: no memory): 340 keys as in control_v11*_sd15_*.pth, examples from upstream_spec §3.6."""
    c = ControlNetConfig(unet=SDUNetConfig())
    km = controlnet_key_map(c)
    with torch.device("meta"):
        sd = SDControlNet(c).state_dict()
    assert len(km) == len(sd) == 340 and set(km.values()) == set(sd)
    assert km["controlnet_cond_embedding.conv_in.weight"] == "input_hint_block.0.weight"
    assert km["controlnet_cond_embedding.blocks.5.bias"] == "input_hint_block.12.bias"
    assert km["controlnet_cond_embedding.conv_out.weight"] == "input_hint_block.14.weight"
    assert km["controlnet_down_blocks.11.bias"] == "zero_convs.11.0.bias"
    assert km["controlnet_mid_block.bias"] == "middle_block_out.0.bias"
    assert km["down_blocks.3.resnets.1.conv2.weight"] == "input_blocks.11.0.out_layers.3.weight"
    assert km["mid_block.attentions.0.proj_in.weight"] == "middle_block.1.proj_in.weight"
    assert controlnet_module_map(c)["time_embedding.linear_2"] == "time_embed.2"
    assert not any(k.startswith(("up_blocks", "conv_norm_out", "conv_out")) for k in km)
    assert tuple(sd["input_hint_block.14.weight"].shape) == (320, 256, 3, 3) and tuple(sd["zero_convs.11.0.weight"].shape) == (1280, 1280, 1, 1)
    assert infer_controlnet_config(sd) == c
    assert c.hint_downscale == 8


@pytest.mark.parametrize("name", list(CONFIGS))
def test_key_map_equals_diffusers_converter_both_ways(name):
    c = CONFIGS[name]
    sd = build_controlnet_state_dict(seed=0, config=c)
    cfg = diffusers_config(c, prefixed(sd))
    reference = convert_controlnet_checkpoint(prefixed(sd), cfg)
    assert set(reference) == set(ControlNetModel(**cfg).state_dict())
    assert_same_state(convert_controlnet_to_diffusers(sd, c), reference)
    assert_same_state(convert_controlnet_from_diffusers(reference, c), sd)
    assert infer_controlnet_config(sd, num_heads=c.unet.num_heads) == c


def test_diffusers_conversion_is_strict_and_names_the_source():
    dsd = convert_controlnet_to_diffusers(build_controlnet_state_dict(), TINY_CONTROLNET)
    extra = dict(dsd, **{"controlnet_down_blocks.9.weight": torch.zeros(1)})
    with pytest.raises(ModelFileError, match="unexpected keys .controlnet_down_blocks.9.weight") as err:
        convert_controlnet_from_diffusers(extra, TINY_CONTROLNET, source="/m/cn/diffusion_pytorch_model.safetensors")
    assert "/m/cn/diffusion_pytorch_model.safetensors" in str(err.value)
    missing = {k: v for k, v in dsd.items() if k != "controlnet_mid_block.bias"}
    with pytest.raises(ModelFileError, match="1 missing keys .controlnet_mid_block.bias"):
        convert_controlnet_from_diffusers(missing, TINY_CONTROLNET)
    with pytest.raises(ModelFileError, match="missing keys .*unexpected keys"):  # weights of another architecture
        convert_controlnet_from_diffusers(dsd, SD15_SHAPED)


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("size", [(16, 24), (18, 32)], ids=["16x24", "18x32"])
def test_residuals_match_diffusers(models, size):
    c, _, ours, d = models
    x, ts, ctx, hint = inputs(c, *size)
    with torch.no_grad():
        a = ours(x, ts, ctx, hint, scale=0.7)
        b = d(x, ts, encoder_hidden_states=ctx, controlnet_cond=hint, conditioning_scale=0.7, return_dict=False)
    assert [r.shape[-2:] for r in a[0]][0] == size
    assert_residuals_close(a, b)


def test_residuals_match_original_ldm_code(models):
    c, sd, ours, _ = models
    ldm = LDMControlNet(c)
    ldm.load_state_dict(sd, strict=True)  # our names are the cldm names: no conversion
    x, ts, ctx, hint = inputs(c, 16, 24)
    with torch.no_grad():
        assert_residuals_close(ours(x, ts, ctx, hint), ldm.eval()(x, hint, ts, ctx))


def test_hint_and_timestep_reach_the_residuals(models):
    """Fan-in-scaled test weights: changing the hint or the timestep changes every residual clearly."""
    c, _, ours, _ = models
    x, ts, ctx, hint = inputs(c, 16, 24)
    with torch.no_grad():
        base = ours(x, ts, ctx, hint)
        other_hint = ours(x, ts, ctx, torch.rand_like(hint))
        other_time = ours(x, ts.flip(0), ctx, hint)
    for j, (a, b, t) in enumerate(zip([*base[0], base[1]], [*other_hint[0], other_hint[1]], [*other_time[0], other_time[1]])):
        assert maxdiff(a, b) > 0.05 * a.abs().max()
        if j == 0:  # conv_in output + hint features: no time embedding yet
            assert torch.equal(a, t)
        elif a.shape[1] > c.unet.norm_groups:  # one channel per group (TINY_UNET level 0) normalises the time shift away
            assert maxdiff(a, t) > 0.05 * a.abs().max()


def test_unet_with_our_residuals_matches_diffusers_unet_with_theirs():
    c = TINY_CONTROLNET
    sd = build_controlnet_state_dict(seed=3)
    ours = our_controlnet(c, sd)
    dcn = ControlNetModel(**diffusers_config(c, prefixed(sd))).eval()
    dcn.load_state_dict(convert_controlnet_to_diffusers(sd, c), strict=True)
    unet_sd = build_sd_state_dicts(seed=4)["unet"]
    unet = instantiate(lambda: SDUNet(TINY_UNET), unet_sd, source="<test>", what="UNet", device="cpu", dtype=torch.float32)
    dunet = UNet2DConditionModel(**{k: v for k, v in diffusers_unet_config(TINY_UNET).items() if not k.startswith("_")}).eval()
    dunet.load_state_dict(convert.convert_unet_to_diffusers(unet_sd, TINY_UNET), strict=True)
    x, ts, ctx, hint = inputs(c, 18, 32)
    with torch.no_grad():
        down, mid = ours(x, ts, ctx, hint, scale=0.8)
        a = unet(x, ts, ctx, down_residuals=down, mid_residual=mid)
        d_down, d_mid = dcn(x, ts, encoder_hidden_states=ctx, controlnet_cond=hint, conditioning_scale=0.8, return_dict=False)
        b = dunet(x, ts, encoder_hidden_states=ctx, down_block_additional_residuals=d_down, mid_block_additional_residual=d_mid).sample
        plain = unet(x, ts, ctx)
    assert maxdiff(a, plain) > 0.1 * plain.abs().max()  # the control is felt
    assert_close(a, b)


def test_every_zero_conv_bias_is_loaded_and_used():
    """Upstream kept 3 of the 13 SD 1.5 zero-conv biases; here bias k moves residual k, and only it, by exactly its change."""
    c = TINY_CONTROLNET
    sd = build_controlnet_state_dict()
    x, ts, ctx, hint = inputs(c, 8, 8)
    with torch.no_grad():
        base = [*(r := our_controlnet(c, sd)(x, ts, ctx, hint, scale=0.5))[0], r[1]]
        names = [f"zero_convs.{k}.0.bias" for k in range(len(base) - 1)] + ["middle_block_out.0.bias"]
        for k, name in enumerate(names):
            bumped = dict(sd, **{name: sd[name] + 1.0})
            down, mid = our_controlnet(c, bumped)(x, ts, ctx, hint, scale=0.5)
            for j, (a, b) in enumerate(zip(base, [*down, mid])):
                if j == k:
                    torch.testing.assert_close(b - a, torch.full_like(a, 0.5), atol=1e-5, rtol=0)
                else:
                    assert torch.equal(a, b), (name, j)


def test_scale_multiplies_residuals(models):
    c, _, ours, _ = models
    x, ts, ctx, hint = inputs(c, 8, 16)
    with torch.no_grad():
        one = ours(x, ts, ctx, hint)
        half = ours(x, ts, ctx, hint, scale=0.5)
        zero = ours(x, ts, ctx, hint, scale=0.0)
    for a, b, z in zip([*one[0], one[1]], [*half[0], half[1]], [*zero[0], zero[1]]):
        assert torch.equal(a * 0.5, b)
        assert not z.any()


def test_batch_rows_are_independent_and_hint_broadcasts(models):
    """Pure batch semantics (controlnet_batch_size may split a batch anywhere)."""
    c, _, ours, _ = models
    gen = torch.Generator().manual_seed(5)
    x, ctx, hint = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 7, c.unet.context_dim, generator=gen), torch.rand(3, 3, 64, 64, generator=gen)
    ts = torch.tensor([999, 500, 1])
    with torch.no_grad():
        down, mid = ours(x, ts, ctx, hint)
        for i in range(3):
            d1, m1 = ours(x[i : i + 1], ts[i : i + 1], ctx[i : i + 1], hint[i : i + 1])
            for a, b in zip([*down, mid], [*d1, m1]):
                torch.testing.assert_close(a[i : i + 1], b, atol=1e-4, rtol=1e-4)
        shared = ours(x, torch.tensor(10), ctx, hint[:1])
        repeated = ours(x, torch.tensor([10, 10, 10]), ctx, hint[:1].expand(3, -1, -1, -1))
    for a, b in zip([*shared[0], shared[1]], [*repeated[0], repeated[1]]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bad_hint_is_refused_with_the_expected_shape(models):
    c, _, ours, _ = models
    x, ts, ctx, _ = inputs(c, 8, 12)
    for bad in (torch.rand(2, 3, 64, 64), torch.rand(2, 1, 64, 96), torch.rand(3, 3, 64, 96)):
        with pytest.raises(ValueError, match=r"\(2 or 1, 3, 64, 96\).*8x the latent size"):
            ours(x, ts, ctx, bad)


# --------------------------------------------------------------------------- configs


SD15_CONTROLNET_JSON = {  # lllyasviel/control_v11p_sd15_canny config.json (diffusers 0.16)
    "_class_name": "ControlNetModel", "_diffusers_version": "0.16.0.dev0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "class_embed_type": None, "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False, "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default", "upcast_attention": False, "use_linear_projection": False,
}


def test_controlnet_config_from_diffusers():
    assert controlnet_config_from_diffusers(SD15_CONTROLNET_JSON) == ControlNetConfig()
    for c in CONFIGS.values():
        assert controlnet_config_from_diffusers(diffusers_controlnet_config(c)) == c
    sd21 = dict(SD15_CONTROLNET_JSON, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True)
    c21 = controlnet_config_from_diffusers(sd21)
    assert (c21.unet.num_head_channels, c21.unet.context_dim, c21.unet.use_linear_in_transformer) == (64, 1024, True)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"global_pool_conditions": True}, "global_pool_conditions"),
        ({"controlnet_conditioning_channel_order": "bgr"}, "controlnet_conditioning_channel_order"),
        ({"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": 2816}, "addition_embed_type"),
        ({"conditioning_embedding_out_channels": []}, "conditioning_embedding_out_channels"),
        ({"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["SimpleDownBlock"]}, "ControlNet config whose encoder .*SimpleDownBlock"),
    ],
)
def test_controlnet_config_refuses_what_we_cannot_build(change, words):
    with pytest.raises(ModelFileError, match=words) as err:
        controlnet_config_from_diffusers({**SD15_CONTROLNET_JSON, **change}, source="/m/cn/config.json")
    assert str(err.value).startswith("/m/cn/config.json: ")


def test_config_validation():
    with pytest.raises(ValueError, match="odd number"):
        ControlNetConfig(hint_block_channels=(16, 32))
    with pytest.raises(ValueError, match="SDXL"):
        ControlNetConfig(unet=SDUNetConfig(adm_in_channels=2816))
    with pytest.raises(ValueError, match="no diffusers equivalent"):
        diffusers_controlnet_config(ControlNetConfig(hint_block_channels=(16, 8, 32)))


# --------------------------------------------------------------------------- files


def load_controlnet_file(path: str) -> SDControlNet:
    """What the model manager does with a ControlNet file or diffusers folder."""
    if os.path.isdir(path):
        config = controlnet_config_from_diffusers(convert.read_diffusers_config(path), source=os.path.join(path, "config.json"))
        weights = os.path.join(path, "diffusion_pytorch_model.safetensors")
        sd = convert_controlnet_from_diffusers(load_state_dict(weights), config, source=weights)
    else:
        sd = split_controlnet_checkpoint(load_state_dict(path), source=path)
        config = infer_config(infer_controlnet_config, sd, source=path, what="ControlNet")
    return instantiate(lambda: SDControlNet(config), sd, source=path, what="ControlNet", device="cpu", dtype=torch.float32)


@pytest.mark.parametrize(
    "name, layout, dtype",
    [
        ("control_v11p_sd15_canny.pth", "ldm", "fp32"),
        ("control_v11p_sd15_canny_fp16.safetensors", "ldm", "fp16"),
        ("control_bare.safetensors", "ldm_bare", "fp32"),
        ("control_diffusers", "diffusers", "fp32"),
    ],
)
def test_write_controlnet_round_trips(tmp_path, name, layout, dtype):
    path = write_controlnet(str(tmp_path / name), seed=7, layout=layout, dtype=dtype)
    model = load_controlnet_file(path)
    assert model.config == TINY_CONTROLNET
    expected = {k: v.half().float() if dtype == "fp16" else v for k, v in build_controlnet_state_dict(seed=7).items()}
    assert_same_state(model.state_dict(), expected)
    if name.endswith(".pth"):  # lllyasviel's format: a flat pickled dict of control_model.* tensors, safe to load
        raw = torch.load(path, weights_only=True)
        assert all(k.startswith("control_model.") for k in raw) and len(raw) == len(expected)
    if layout == "diffusers":  # a real diffusers folder
        d = ControlNetModel.from_pretrained(path)
        assert_same_state(d.state_dict(), convert_controlnet_to_diffusers(expected, TINY_CONTROLNET))
    with pytest.raises(ValueError, match="layout"):
        write_controlnet(str(tmp_path / "x.pth"), layout="kohya")


def test_split_drops_v10_extras_and_explains_the_rest():
    sd = build_controlnet_state_dict()
    v10 = {**prefixed(sd), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "first_stage_model.decoder.conv_in.weight": torch.zeros(1),
           "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1), "betas": torch.zeros(3), "alphas_cumprod": torch.zeros(3)}
    assert_same_state(split_controlnet_checkpoint(v10, "control_sd15_canny.pth"), sd)
    assert_same_state(split_controlnet_checkpoint(sd, "bare.safetensors"), sd)
    with pytest.raises(ModelFileError, match=r"1 entries that are not part of a ControlNet .*lora_unet_x.*") as err:
        split_controlnet_checkpoint({**prefixed(sd), "lora_unet_x.alpha": torch.zeros(())}, "/m/x.pth")
    assert str(err.value).startswith("/m/x.pth: ")
    with pytest.raises(ModelFileError, match="mixes"):
        split_controlnet_checkpoint({**prefixed(sd), "zero_convs.0.0.weight": torch.zeros(1)}, "/m/x.pth")
    with pytest.raises(ModelFileError, match="is a Stable Diffusion checkpoint"):
        split_controlnet_checkpoint({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "betas": torch.zeros(3)}, "/m/sd15.safetensors")
    with pytest.raises(ModelFileError, match=r"holds no ControlNet .*time_embed"):
        split_controlnet_checkpoint({"time_embed.0.weight": torch.zeros(1)}, "/m/x.safetensors")


def test_strict_errors_name_the_file(tmp_path):
    path = str(tmp_path / "control_v11p_sd15_broken.pth")
    sd = build_controlnet_state_dict()
    truncated = {k: v for k, v in sd.items() if k != "zero_convs.2.0.bias"}
    with pytest.raises(ModelFileError, match=r"1 missing keys: zero_convs\.2\.0\.bias") as err:
        instantiate(lambda: SDControlNet(TINY_CONTROLNET), truncated, source=path, what="ControlNet", device="cpu", dtype=torch.float32)
    assert str(err.value).startswith(path + ": ")
    width = sd["middle_block_out.0.bias"].shape[0]
    misshaped = dict(sd, **{"middle_block_out.0.bias": torch.zeros(width // 2)})
    with pytest.raises(ModelFileError, match=rf"wrong shape: middle_block_out\.0\.bias \(file \({width // 2},\), model \({width},\)\)"):
        instantiate(lambda: SDControlNet(TINY_CONTROLNET), misshaped, source=path, what="ControlNet", device="cpu", dtype=torch.float32)
    no_hint = {k: v for k, v in sd.items() if not k.startswith("input_hint_block.")}
    with pytest.raises(ModelFileError, match="architecture cannot be read") as err:
        infer_config(infer_controlnet_config, no_hint, source=path, what="ControlNet")
    assert path in str(err.value)
    # a whole file with a key cut off, through the loader
    write_controlnet(path)
    raw = torch.load(path, weights_only=True)
    del raw["control_model.input_hint_block.14.weight"]
    torch.save(raw, path)
    with pytest.raises(ModelFileError, match=r"input_hint_block\.14\.weight missing") as err:
        load_controlnet_file(path)
    assert path in str(err.value)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps(dict(diffusers_controlnet_config(TINY_CONTROLNET), global_pool_conditions=True)))
    with pytest.raises(ModelFileError, match="global_pool_conditions") as err:
        load_controlnet_file(str(tmp_path / "d"))
    assert os.path.join(str(tmp_path / "d"), "config.json") in str(err.value)
