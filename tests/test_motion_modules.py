"""AnimateDiff motion modules (``models.sd_motion``, ``testing.motion_files``).

Reference: diffusers 0.42.1 (``MotionAdapter``, ``AnimateDiffTransformer3D``,
``UNetMotionModel``, ``convert_animatediff_checkpoint_to_diffusers``) fed the
same tiny random weights. diffusers' motion modules apply their GroupNorm to
``(B, C, F, H, W)``, i.e. over all frames of the window; the original
AnimateDiff (and DiffSynth-Studio, A1111, ComfyUI) normalises each frame on its
own. For parity the tests swap each diffusers motion module's ``norm`` for
:class:`PerFrameGroupNorm`, which applies *the same* ``nn.GroupNorm`` (same
weights) to each frame; one test shows that without the swap the outputs
differ, so the swap is what the parity depends on.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
from diffusers.models.embeddings import SinusoidalPositionalEmbedding

from diffsynth.models import convert
from diffsynth.models.errors import ModelFileError
from diffsynth.models.loading import instantiate
from diffsynth.models.sd_motion import (
    MotionModuleConfig,
    SDMotionModel,
    build_motion_model,
    convert_motion_from_diffusers,
    convert_motion_to_diffusers,
    infer_motion_config,
    sinusoid_table,
)
from diffsynth.models.sd_unet import SDUNet, SDUNetConfig
from diffsynth.models.state_dict import load_state_dict
from diffsynth.testing.factory import TINY_UNET, build_sd_state_dicts, diffusers_unet_config
from diffsynth.testing.motion_files import TINY_MOTION, TINY_MOTION_V1, build_motion_state_dict, write_motion_module

KEY = re.compile(
    r"^(down_blocks\.[0-3]\.motion_modules\.[01]|mid_block\.motion_modules\.0|up_blocks\.[0-3]\.motion_modules\.[0-2])"
    r"\.temporal_transformer\.(norm|proj_in|proj_out|transformer_blocks\.0\.(attention_blocks\.[01]\.(to_q|to_k|to_v|to_out\.0|pos_encoder)"
    r"|norms\.[01]|ff\.net\.0\.proj|ff\.net\.2|ff_norm))\.(weight|bias|pe)$"
)
PER_MODULE = 28  # norm 2, proj_in 2, 2 × (q, k, v, out w+b, pe) 12, norms 4, ff 4, ff_norm 2, proj_out 2


class PerFrameGroupNorm(nn.Module):
    """The original's norm for diffusers' motion modules: the wrapped ``GroupNorm`` applied to each frame.

    diffusers calls ``norm`` on ``(B, C, F, H, W)``; this folds the frames into
    the batch, ``(B·F, C, H, W)``, so each frame gets its own statistics.
    """

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.inner = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        y = self.inner(x.transpose(1, 2).reshape(b * f, c, h, w))
        return y.reshape(b, f, c, h, w).transpose(1, 2)


def per_frame_norms_(model: nn.Module) -> nn.Module:
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    for module in model.modules():
        if isinstance(module, AnimateDiffTransformer3D) and not isinstance(module.norm, PerFrameGroupNorm):
            module.norm = PerFrameGroupNorm(module.norm)
    return model


def diffusers_adapter(config: MotionModuleConfig, sd: dict) -> MotionAdapter:
    """A diffusers ``MotionAdapter`` of ``config`` holding ``sd`` (original layout), loaded through diffusers' converter."""
    adapter = MotionAdapter(
        block_out_channels=config.block_out_channels,
        motion_layers_per_block=config.layers_per_block,
        motion_transformer_layers_per_block=config.transformer_depth,
        motion_num_attention_heads=config.num_heads,
        motion_norm_num_groups=config.norm_groups,
        motion_max_seq_length=config.max_positions,
        use_motion_mid_block=config.mid_block,
    ).eval()
    theirs = convert_animatediff_checkpoint_to_diffusers(sd)
    pe = {k: v for k, v in adapter.state_dict().items() if k.endswith("pos_embed.pe")}  # diffusers' recomputed tables
    adapter.load_state_dict({**theirs, **pe}, strict=True)
    return adapter


def ours(config: MotionModuleConfig, sd: dict) -> SDMotionModel:
    return instantiate(lambda: SDMotionModel(config), sd, source="<test>", what="motion modules", device="cpu", dtype=torch.float32)


def frames_with_varied_statistics(frames: int, channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Features whose per-frame mean and scale differ a lot, so per-frame and per-window norms disagree."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(frames, channels, h, w, generator=g)
    return x * torch.linspace(0.5, 3.0, frames)[:, None, None, None] + torch.linspace(-1.0, 2.0, frames)[:, None, None, None]


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def tiny_sd():
    return build_motion_state_dict(seed=1)


# ---- layout and names -------------------------------------------------------------------------


@pytest.mark.parametrize("version, modules, positions", [("v2", 21, 32), ("v1", 20, 24)])
def test_full_size_keys_and_shapes_follow_the_original_files(version, modules, positions):
    config = getattr(MotionModuleConfig, version)()
    with torch.device("meta"):
        sd = SDMotionModel(config).state_dict()
    assert len(sd) == modules * PER_MODULE
    assert [k for k in sd if not KEY.match(k)] == []
    assert any(k.startswith("mid_block.") for k in sd) == (version == "v2")
    # module widths in file order (upstream_spec §3.7): 320 ×2, 640 ×2, 1280 ×(4 + mid + 3 + 3), 640 ×3, 320 ×3
    widths = [sd[f"{name}.temporal_transformer.proj_in.weight"].shape[1] for name, _, _ in config.modules()]
    mid = [1280] if version == "v2" else []
    assert widths == [320] * 2 + [640] * 2 + [1280] * 4 + mid + [1280] * 6 + [640] * 3 + [320] * 3
    p = "up_blocks.3.motion_modules.2.temporal_transformer."
    assert sd[p + "transformer_blocks.0.attention_blocks.1.pos_encoder.pe"].shape == (1, positions, 320)
    assert sd[p + "transformer_blocks.0.ff.net.0.proj.weight"].shape == (2560, 320)
    assert sd[p + "transformer_blocks.0.ff.net.2.weight"].shape == (320, 1280)
    assert p + "transformer_blocks.0.attention_blocks.0.to_q.bias" not in sd  # q/k/v without bias, as the files
    assert p + "transformer_blocks.0.attention_blocks.0.to_out.0.bias" in sd


def test_sd15_block_ids_are_the_originals_call_positions():
    """``call_block_id`` (upstream_spec §3.7) in LDM block terms: after input blocks 1,2,4,5,7,8,10,11, mid, every output block."""
    ids = [block_id for _, block_id, _ in MotionModuleConfig().modules()]
    assert ids == [("input", i) for i in (1, 2, 4, 5, 7, 8, 10, 11)] + [("middle", 0)] + [("output", i) for i in range(12)]
    v1 = [block_id for _, block_id, _ in MotionModuleConfig.v1().modules()]
    assert ("middle", 0) not in v1 and len(v1) == 20
    assert MotionModuleConfig.for_unet(SDUNetConfig()) == MotionModuleConfig()
    assert MotionModuleConfig.for_unet(SDUNetConfig(), version="v1") == MotionModuleConfig.v1()


def test_tiny_config_fits_the_tiny_unet_and_every_module_is_called():
    assert TINY_MOTION.block_out_channels == (64, 128) and TINY_MOTION.layers_per_block == 1
    assert [b for _, b, _ in TINY_MOTION.modules()] == [("input", 1), ("input", 3), ("middle", 0)] + [("output", i) for i in range(4)]
    TINY_MOTION.check_unet(TINY_UNET)
    with pytest.raises(ValueError, match="resnets per level"):
        MotionModuleConfig().check_unet(TINY_UNET)
    # the UNet's hook reaches every module's block id, with that module's width
    seen = {}

    def record(block_id, h):
        seen[block_id] = h.shape[1]
        return h

    with torch.no_grad():
        SDUNet(TINY_UNET).eval()(torch.randn(2, 4, 8, 8), 10, torch.randn(2, 5, 128), motion=record)
    assert {b: ch for _, b, ch in TINY_MOTION.modules()}.items() <= seen.items()


def test_real_files_pe_is_the_sinusoid_diffusers_recomputes(tiny_sd):
    pe = tiny_sd["down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"]
    torch.testing.assert_close(pe, SinusoidalPositionalEmbedding(128, 32).pe, atol=0, rtol=0)
    torch.testing.assert_close(sinusoid_table(24, 320), SinusoidalPositionalEmbedding(320, 24).pe, atol=0, rtol=0)


# ---- conversion and files ---------------------------------------------------------------------


def test_round_trip_through_diffusers_converter(tiny_sd):
    theirs = convert_animatediff_checkpoint_to_diffusers(dict(tiny_sd))
    adapter = diffusers_adapter(TINY_MOTION, tiny_sd)
    want = {k: v for k, v in adapter.state_dict().items() if not k.endswith("pos_embed.pe")}
    assert set(theirs) == set(want)
    assert all(torch.equal(theirs[k], want[k]) for k in want)
    # our own converters agree with diffusers' and invert each other (pe tables restored as the sinusoid)
    mine = convert_motion_to_diffusers(tiny_sd)
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    back = convert_motion_from_diffusers(dict(adapter.state_dict()), max_positions=32)
    assert set(back) == set(tiny_sd) and all(torch.equal(back[k], tiny_sd[k]) for k in tiny_sd)


@pytest.mark.parametrize("version, name", [("v2", "mm_tiny_v2.ckpt"), ("v1", "mm_tiny_v1.safetensors")])
def test_v1_and_v2_files_are_read_back(tmp_path, version, name):
    path = write_motion_module(str(tmp_path / name), seed=2, version=version)
    sd = load_state_dict(path)
    config = infer_motion_config(sd)
    assert config == (TINY_MOTION if version == "v2" else TINY_MOTION_V1)
    assert config.version == version and config.max_positions == (32 if version == "v2" else 24)
    model = build_motion_model(sd, source=path)
    assert (model.module_for(("middle", 0)) is None) == (version == "v1")
    assert model.module_for(("input", 2)) is None  # a downsampler: no module
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_full_size_layouts_are_inferred():
    for config in (MotionModuleConfig(), MotionModuleConfig.v1()):
        with torch.device("meta"):
            sd = SDMotionModel(config).state_dict()
        assert infer_motion_config(sd) == config


def test_incomplete_or_foreign_files_are_explained(tiny_sd):
    broken = {k: v for k, v in tiny_sd.items() if not k.startswith("up_blocks.1.motion_modules.1.temporal_transformer.transformer_blocks")}
    with pytest.raises(ModelFileError, match=r"mm\.ckpt.*missing keys: up_blocks\.1\.motion_modules\.1\."):
        build_motion_model(broken, source="mm.ckpt")
    no_level = {k: v for k, v in tiny_sd.items() if not k.startswith("up_blocks.1.")}
    with pytest.raises(ModelFileError, match="up levels"):
        build_motion_model(no_level, source="mm.ckpt")
    with pytest.raises(ModelFileError, match="not an AnimateDiff motion-module file"):
        build_motion_model({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, source="other.ckpt")


# ---- numerics ---------------------------------------------------------------------------------


def test_each_module_matches_diffusers_with_a_per_frame_norm(tiny_sd):
    model = ours(TINY_MOTION, tiny_sd)
    adapter = per_frame_norms_(diffusers_adapter(TINY_MOTION, tiny_sd))
    frames = 12
    for name, block_id, ch in TINY_MOTION.modules():
        x = frames_with_varied_statistics(frames, ch, 4, 6, seed=len(name))
        with torch.no_grad():
            a = model(block_id, x)
            b = adapter.get_submodule(name)(x, num_frames=frames)
        assert maxdiff(a, x) > 0.1 * x.abs().max(), name  # the module does something
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_diffusers_window_norm_differs_from_the_originals_per_frame_norm(tiny_sd):
    """Why the parity tests patch diffusers: its norm over the whole window gives other numbers."""
    model = ours(TINY_MOTION, tiny_sd)
    plain = diffusers_adapter(TINY_MOTION, tiny_sd)
    x = frames_with_varied_statistics(8, 64, 4, 4)
    with torch.no_grad():
        a = model(("input", 1), x)
        b = plain.down_blocks[0].motion_modules[0](x, num_frames=8)
    assert maxdiff(a, b) > 0.05 * (a - x).abs().max()


def test_group_norm_statistics_are_per_frame(tiny_sd):
    """Changing frame 2 leaves frame 0's normalised features alone (while attention still mixes the frames)."""
    model = ours(TINY_MOTION, tiny_sd)
    module = model.module_for(("input", 1)).temporal_transformer
    normed = []
    handle = module.norm.register_forward_hook(lambda _m, _i, out: normed.append(out))
    x = frames_with_varied_statistics(4, 64, 4, 4)
    y = x.clone()
    y[2] = frames_with_varied_statistics(1, 64, 4, 4, seed=9)[0] * 5.0 + 3.0
    try:
        with torch.no_grad():
            out_x, out_y = model(("input", 1), x), model(("input", 1), y)
    finally:
        handle.remove()
    torch.testing.assert_close(normed[0][0], normed[1][0], atol=0, rtol=0)
    assert maxdiff(normed[0][3], normed[1][3]) == 0.0 and maxdiff(normed[0][2], normed[1][2]) > 0.1
    assert maxdiff(out_x[0], out_y[0]) > 1e-3  # frame 0's output sees frame 2 through the temporal attention


def test_pe_comes_from_the_file(tiny_sd):
    x = frames_with_varied_statistics(6, 128, 2, 2)
    edited = dict(tiny_sd)
    key = "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"
    edited[key] = torch.zeros_like(edited[key])
    with torch.no_grad():
        a = ours(TINY_MOTION, tiny_sd)(("middle", 0), x)
        b = ours(TINY_MOTION, edited)(("middle", 0), x)
    assert maxdiff(a, b) > 1e-3


def test_window_longer_than_the_positions_is_refused(tiny_sd):
    model = ours(TINY_MOTION, tiny_sd)
    with torch.no_grad():
        assert model(("input", 1), torch.randn(32, 64, 2, 2)).shape == (32, 64, 2, 2)
        with pytest.raises(ValueError, match=r"window of 33 frames .* 32 frame positions"):
            model(("input", 1), torch.randn(33, 64, 2, 2))
        assert model(("input", 2), torch.randn(33, 64, 2, 2)).shape[0] == 33  # no module there: untouched
    v1 = ours(TINY_MOTION_V1, build_motion_state_dict(seed=1, config=TINY_MOTION_V1))
    with torch.no_grad(), pytest.raises(ValueError, match=r"window of 25 frames .* 24 frame positions"):
        v1(("input", 1), torch.randn(25, 64, 2, 2))


def test_bf16_model_runs_close_to_fp32(tiny_sd):
    x = frames_with_varied_statistics(8, 128, 4, 4)
    with torch.no_grad():
        a = build_motion_model(tiny_sd)(("output", 1), x)
        b = build_motion_model(tiny_sd, dtype=torch.bfloat16)(("output", 1), x.bfloat16())
    assert b.dtype == torch.bfloat16
    assert maxdiff(a, b.float()) < 0.05 * a.abs().max()


def test_features_of_the_wrong_width_are_refused(tiny_sd):
    with pytest.raises(ValueError, match=r"after UNet block \('input', 3\) takes \(frames, 128, h, w\)"):
        ours(TINY_MOTION, tiny_sd)(("input", 3), torch.randn(4, 64, 2, 2))


def test_unet_with_motion_matches_diffusers_unet_motion_model(tiny_sd):
    unet_sd = build_sd_state_dicts(seed=4)["unet"]
    unet = instantiate(lambda: SDUNet(TINY_UNET), unet_sd, source="<test>", what="UNet", device="cpu", dtype=torch.float32)
    dunet = UNet2DConditionModel(**{k: v for k, v in diffusers_unet_config(TINY_UNET).items() if not k.startswith("_")}).eval()
    dunet.load_state_dict(convert.convert_unet_to_diffusers(unet_sd, TINY_UNET), strict=True)
    dmotion = per_frame_norms_(UNetMotionModel.from_unet2d(dunet, diffusers_adapter(TINY_MOTION, tiny_sd)).eval())
    motion = ours(TINY_MOTION, tiny_sd)

    frames = 10
    g = torch.Generator().manual_seed(5)
    x = torch.randn(frames, 4, 8, 12, generator=g)
    ctx = torch.randn(1, 7, 128, generator=g).expand(frames, -1, -1)
    with torch.no_grad():
        a = unet(x, 421, ctx, motion=motion)
        plain = unet(x, 421, ctx)
        b = dmotion(x.transpose(0, 1)[None], torch.tensor([421]), encoder_hidden_states=ctx).sample[0].transpose(0, 1)
    assert maxdiff(a, plain) > 0.1 * plain.abs().max()  # the motion modules are felt
    assert maxdiff(a, b) <= 1e-4 * max(1.0, b.abs().max().item())


def test_model_manager_detects_and_loads_v1_and_v2(tmp_path, tiny_sd_file):
    from diffsynth import ModelManager
    from diffsynth.testing.motion_files import write_motion_module

    for version, positions in (("v1", 24), ("v2", 32)):
        path = write_motion_module(str(tmp_path / f"mm_{version}.ckpt"), version=version)
        mm = ModelManager(torch_dtype=torch.float32, device="cpu")
        mm.load_models([tiny_sd_file, path])
        assert mm.motion_modules.config.max_positions == positions
        assert mm.motion_modules.config.mid_block == (version == "v2")
        assert mm.model_path["motion_modules"] == path
