"""Depth annotator (MiDaS DPT-hybrid via transformers' DPT): key map, loading, numerics, errors.

The numerical reference is ``midas_forward`` below: a plain functional forward of
MiDaS DPT-hybrid written from the architecture (timm ResNetV2 + ViT, MiDaS DPT
decoder) that reads the *original* MiDaS keys, so it shares no code or naming with
the converter or transformers. Agreement on random weights means the key map and
our forward orchestration reproduce MiDaS.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffsynth.controlnets.annotators.depth import MIDAS_FILENAME, DepthDetector, depth_to_uint8, find_transformers_dpt_folder
from diffsynth.controlnets.annotators.midas_convert import (
    MIDAS_HYBRID,
    TINY_MIDAS_HYBRID,
    MidasHybridConfig,
    convert_midas_state_dict,
    infer_midas_config,
    midas_ignored_keys,
    midas_key_map,
    midas_layout,
    to_dpt_config,
)
from diffsynth.models.errors import ModelFileError
from diffsynth.testing.depth_files import build_midas_state_dict, write_midas_file


# --------------------------------------------------------------------------- independent MiDaS reference


def _pad_same(x, k, s, value=0.0):
    """TensorFlow "SAME" padding (extra pixel at the end), as timm's *Same layers."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def _std_conv(x, w, stride=1):
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return F.conv2d(_pad_same(x, w.shape[-1], stride), (w - mean) / torch.sqrt(var + 1e-8), stride=stride)


def midas_forward(sd, cfg: MidasHybridConfig, x):
    """MiDaS ``DPTDepthModel(backbone="vitb_rn50_384", readout="project")`` on MiDaS keys; returns (b, h, w)."""
    def gn(t, p, act=True):
        t = F.group_norm(t, 32, sd[p + ".weight"], sd[p + ".bias"], 1e-5)
        return F.relu(t) if act else t

    def conv(t, p, **kw):
        return F.conv2d(t, sd[p + ".weight"], sd.get(p + ".bias"), **kw)

    def lin(t, p):
        return F.linear(t, sd[p + ".weight"], sd[p + ".bias"])

    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-6)

    r = "pretrained.model.patch_embed.backbone."
    t = gn(_std_conv(x, sd[r + "stem.conv.weight"], 2), r + "stem.norm")
    t = F.max_pool2d(_pad_same(t, 3, 2, value=float("-inf")), 3, 2)
    stages = []
    for s, depth in enumerate(cfg.stage_depths):
        for b in range(depth):
            p = f"{r}stages.{s}.blocks.{b}."
            stride = 2 if (s > 0 and b == 0) else 1
            short = gn(_std_conv(t, sd[p + "downsample.conv.weight"], stride), p + "downsample.norm", act=False) if b == 0 else t
            y = gn(_std_conv(t, sd[p + "conv1.weight"]), p + "norm1")
            y = gn(_std_conv(y, sd[p + "conv2.weight"], stride), p + "norm2")
            y = gn(_std_conv(y, sd[p + "conv3.weight"]), p + "norm3", act=False)
            t = F.relu(y + short)
        stages.append(t)

    v = "pretrained.model."
    tok = conv(stages[-1], v + "patch_embed.proj")
    b, d, gh, gw = tok.shape
    tok = torch.cat([sd[v + "cls_token"].expand(b, -1, -1), tok.flatten(2).transpose(1, 2)], 1)
    pos = sd[v + "pos_embed"]
    side = math.isqrt(pos.shape[1] - 1)
    grid = F.interpolate(pos[0, 1:].reshape(1, side, side, d).permute(0, 3, 1, 2), size=(gh, gw), mode="bilinear")
    tok = tok + torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)
    heads, taps = d // 64, {}
    for i in range(cfg.num_layers):
        p = f"{v}blocks.{i}."
        q, k, val = lin(ln(tok, p + "norm1"), p + "attn.qkv").reshape(b, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ val
        tok = tok + lin(att.transpose(1, 2).reshape(b, -1, d), p + "attn.proj")
        tok = tok + lin(F.gelu(lin(ln(tok, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
        taps[i] = tok

    def reassemble(n, t):
        p = f"pretrained.act_postprocess{n}."
        feats = t[:, 1:]
        feats = F.gelu(lin(torch.cat([feats, t[:, :1].expand_as(feats)], -1), p + "0.project.0"))
        return conv(feats.transpose(1, 2).reshape(b, d, gh, gw), p + "3")

    layers = [stages[0], stages[1], reassemble(3, taps[cfg.vit_taps[0]]), reassemble(4, taps[cfg.vit_taps[1]])]
    layers[3] = conv(layers[3], "pretrained.act_postprocess4.4", stride=2, padding=1)
    layers = [conv(t, f"scratch.layer{k + 1}_rn", padding=1) for k, t in enumerate(layers)]

    def rcu(t, p):
        return t + conv(F.relu(conv(F.relu(t), p + ".conv1", padding=1)), p + ".conv2", padding=1)

    path = None
    for k in (4, 3, 2, 1):
        p = f"scratch.refinenet{k}."
        out = layers[k - 1] if path is None else path + rcu(layers[k - 1], p + "resConfUnit1")
        out = F.interpolate(rcu(out, p + "resConfUnit2"), scale_factor=2, mode="bilinear", align_corners=True)
        path = conv(out, p + "out_conv")
    h = conv(path, "scratch.output_conv.0", padding=1)
    h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True)
    h = F.relu(conv(h, "scratch.output_conv.2", padding=1))
    return F.relu(conv(h, "scratch.output_conv.4")).squeeze(1)


def _image(h, w, seed=0):
    """A smooth colour pattern plus noise, uint8 RGB."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(xx / 17.0), 128 + 100 * np.cos(yy / 11.0), 255 * xx / w], -1)
    noise = np.random.RandomState(seed).normal(0, 20, (h, w, 3))
    return (base + noise).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def midas_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("annotators_depth")
    write_midas_file(str(folder / MIDAS_FILENAME), seed=0)
    return folder


@pytest.fixture(scope="module")
def detector(midas_folder):
    return DepthDetector.from_folder(str(midas_folder))


# --------------------------------------------------------------------------- key map (pure units)


@pytest.mark.parametrize("cfg", [MIDAS_HYBRID, TINY_MIDAS_HYBRID], ids=["full", "tiny"])
def test_key_map_covers_layout_and_matches_transformers_shapes(cfg):
    from transformers import DPTForDepthEstimation

    layout = midas_layout(cfg)
    key_map, ignored = midas_key_map(cfg), midas_ignored_keys(cfg)
    assert set(key_map) | (ignored & set(layout)) == set(layout)
    sd = {k: torch.empty(s, device="meta") for k, s in layout.items()}
    converted = convert_midas_state_dict(sd, cfg)
    with torch.device("meta"):
        model = DPTForDepthEstimation(to_dpt_config(cfg))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in converted.items()}
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert {k: s for k, s in got.items() if expected[k] != s} == {}
    targets = [t for ts in key_map.values() for t in ts]
    assert len(targets) == len(set(targets)), "two MiDaS keys map onto one transformers key"


def test_full_size_layout_facts():
    layout = midas_layout(MIDAS_HYBRID)
    # 123 M parameters, ~470 MB in fp32: the size of dpt_hybrid-midas-501f0c75.pt.
    assert sum(math.prod(s) for s in layout.values()) == 123_146_985
    assert len(layout) == 368
    assert layout["pretrained.model.pos_embed"] == (1, 577, 768)  # 24x24 patches of 384 + cls
    assert layout["pretrained.model.patch_embed.proj.weight"] == (768, 1024, 1, 1)
    assert layout["pretrained.model.head.weight"] == (1000, 768)  # timm classifier, dropped on conversion
    assert layout["scratch.layer2_rn.weight"] == (256, 512, 3, 3)
    assert MIDAS_HYBRID.vit_taps == (8, 11) and MIDAS_HYBRID.num_heads == 12
    key_map = midas_key_map(MIDAS_HYBRID)
    assert key_map["scratch.refinenet4.out_conv.weight"] == ("neck.fusion_stage.layers.0.projection.weight",)
    assert key_map["pretrained.model.blocks.3.attn.qkv.bias"] == tuple(
        f"dpt.encoder.layer.3.attention.attention.{n}.bias" for n in ("query", "key", "value")
    )


def test_qkv_split_order_and_purity():
    sd = build_midas_state_dict(0, TINY_MIDAS_HYBRID)
    before = {k: v.clone() for k, v in sd.items()}
    out = convert_midas_state_dict(sd, TINY_MIDAS_HYBRID)
    qkv = sd["pretrained.model.blocks.1.attn.qkv.weight"]
    d = TINY_MIDAS_HYBRID.hidden_size
    p = "dpt.encoder.layer.1.attention.attention."
    assert torch.equal(out[p + "query.weight"], qkv[:d]) and torch.equal(out[p + "key.weight"], qkv[d : 2 * d])
    assert torch.equal(out[p + "value.weight"], qkv[2 * d :])
    assert "pretrained.model.head.weight" not in out
    assert set(sd) == set(before) and all(torch.equal(sd[k], before[k]) for k in sd)


def test_infer_config_round_trip():
    sd = {k: torch.empty(s, device="meta") for k, s in midas_layout(MIDAS_HYBRID).items()}
    assert infer_midas_config(sd) == MIDAS_HYBRID
    tiny = {k: torch.empty(s, device="meta") for k, s in midas_layout(TINY_MIDAS_HYBRID).items()}
    assert infer_midas_config(tiny) == TINY_MIDAS_HYBRID


# --------------------------------------------------------------------------- tiny file: loading and numerics


def test_tiny_file_gives_stretched_uint8_map(detector):
    image = _image(128, 192)
    out = detector(image)
    assert out.shape == (128, 192) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) > 50  # a real map, not two levels
    # Same stretch as controlnet_aux: d -= min; d /= max; (d * 255).clip().astype(uint8).
    raw = detector.estimate(image)
    raw = raw - raw.min()
    expected = ((raw / raw.max()).numpy() * 255.0).clip(0, 255).astype(np.uint8)
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("size", [(128, 192), (64, 64), (96, 160)])
def test_matches_independent_midas_forward(detector, size):
    image = _image(*size, seed=1)
    sd = build_midas_state_dict(0, TINY_MIDAS_HYBRID)
    x = torch.from_numpy(image).float().div(127.5).sub(1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        want = midas_forward(sd, TINY_MIDAS_HYBRID, x)[0]
    got = detector.estimate(image)
    assert got.shape == want.shape == size
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_wrapped_checkpoint_loads_too(tmp_path, detector):
    write_midas_file(str(tmp_path / MIDAS_FILENAME), seed=0, wrapped=True)
    image = _image(64, 128)
    assert np.array_equal(DepthDetector.from_folder(str(tmp_path))(image), detector(image))


def test_input_checks(detector):
    with pytest.raises(ValueError, match=r"multiples of 32, got 100x64; nearest valid: 96x64"):
        detector(np.zeros((64, 100, 3), np.uint8))
    with pytest.raises(ValueError, match=r"RGB uint8 array"):
        detector(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"RGB uint8 array"):
        detector(np.zeros((64, 64), np.uint8))


def test_stretch_edge_cases():
    assert not depth_to_uint8(torch.full((4, 6), 3.5)).any()
    assert depth_to_uint8(torch.zeros(4, 6)).dtype == np.uint8
    assert depth_to_uint8(torch.tensor([[0.0, 1.0, 2.0]])).tolist() == [[0, 127, 255]]  # truncation, as astype(uint8)
    with pytest.raises(RuntimeError, match="NaN/inf"):
        depth_to_uint8(torch.tensor([[0.0, float("nan")]]))


# --------------------------------------------------------------------------- transformers folder


def test_transformers_folder_gives_same_map(tmp_path, detector):
    sub = tmp_path / "dpt-hybrid-midas"
    detector.model.save_pretrained(str(sub))
    assert find_transformers_dpt_folder(str(tmp_path)) == str(sub)
    loaded = DepthDetector.from_folder(str(tmp_path))
    assert loaded.model is not detector.model
    image = _image(96, 128, seed=2)
    assert np.array_equal(loaded(image), detector(image))
    # The folder itself is accepted as well.
    assert np.array_equal(DepthDetector.from_folder(str(sub))(image), detector(image))


def test_midas_file_wins_over_transformers_folder(tmp_path, detector):
    write_midas_file(str(tmp_path / MIDAS_FILENAME), seed=5)
    (tmp_path / "dpt").mkdir()
    (tmp_path / "dpt" / "config.json").write_text('{"model_type": "dpt"}')  # would fail to load if chosen
    image = _image(64, 64)
    other = DepthDetector.from_folder(str(tmp_path))
    assert not np.array_equal(other.estimate(image).numpy(), detector.estimate(image).numpy())


def test_plain_vit_dpt_folder_runs_non_square(tmp_path):
    from transformers import DPTConfig, DPTForDepthEstimation

    cfg = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=64,
                    backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16)
    torch.manual_seed(0)
    DPTForDepthEstimation(cfg).save_pretrained(str(tmp_path / "dpt-tiny"))
    out = DepthDetector.from_folder(str(tmp_path))(_image(64, 96))
    assert out.shape == (64, 96) and out.dtype == np.uint8


# --------------------------------------------------------------------------- errors


def test_missing_file_names_file_folder_and_url(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        DepthDetector.from_folder(str(tmp_path))
    msg = str(info.value)
    assert MIDAS_FILENAME in msg and str(tmp_path) in msg
    assert f"https://huggingface.co/lllyasviel/Annotators/resolve/main/{MIDAS_FILENAME}" in msg


def test_truncated_file_names_the_file(tmp_path, midas_folder):
    data = (midas_folder / MIDAS_FILENAME).read_bytes()
    path = tmp_path / MIDAS_FILENAME
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError) as info:
        DepthDetector.from_folder(str(tmp_path))
    assert str(path) in str(info.value)


def test_mismatched_file_lists_keys_and_names_the_file(tmp_path):
    sd = build_midas_state_dict(0, TINY_MIDAS_HYBRID)
    sd["scratch.layer2_rn.weight"] = torch.zeros(32, 7, 3, 3)
    del sd["scratch.refinenet2.out_conv.bias"]
    sd["scratch.extra.weight"] = torch.zeros(1)
    path = tmp_path / MIDAS_FILENAME
    torch.save(sd, path)
    with pytest.raises(ModelFileError) as info:
        DepthDetector.from_folder(str(tmp_path))
    msg = str(info.value)
    assert str(path) in msg
    assert "scratch.refinenet2.out_conv.bias" in msg and "scratch.extra.weight" in msg
    assert "scratch.layer2_rn.weight (file (32, 7, 3, 3), expected (32, 256, 3, 3))" in msg


def test_other_model_file_is_named_as_such(tmp_path):
    path = tmp_path / MIDAS_FILENAME
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, path)
    with pytest.raises(ModelFileError, match=r"not a MiDaS DPT-hybrid checkpoint.*model\.diffusion_model") as info:
        DepthDetector.from_folder(str(tmp_path))
    assert str(path) in str(info.value)


def test_ambiguous_transformers_folders(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"model_type": "dpt"}')
    with pytest.raises(ValueError, match="several transformers DPT folders"):
        DepthDetector.from_folder(str(tmp_path))


# --------------------------------------------------------------------------- full size


@pytest.mark.slow
def test_full_size_file_loads_and_matches_midas(tmp_path):
    write_midas_file(str(tmp_path / MIDAS_FILENAME), seed=0, config=MIDAS_HYBRID)
    assert os.path.getsize(tmp_path / MIDAS_FILENAME) > 450e6
    det = DepthDetector.from_folder(str(tmp_path))
    assert sum(p.numel() for p in det.model.parameters()) == 123_146_985 - 769_000
    image = _image(384, 448)
    t0 = time.perf_counter()
    got = det.estimate(image)
    out = det(image)
    print(f"full-size 384x448: {time.perf_counter() - t0:.1f} s for two calls")
    assert out.shape == (384, 448) and out.min() == 0 and out.max() == 255
    sd = build_midas_state_dict(0, MIDAS_HYBRID)
    x = torch.from_numpy(image).float().div(127.5).sub(1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        want = midas_forward(sd, MIDAS_HYBRID, x)[0]
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
