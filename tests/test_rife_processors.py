"""RIFE (IFNet loading, padding, interpolation, smoothing) and the video processor chain."""
from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from diffsynth.cache import image_store
from diffsynth.extensions.RIFE import (
    IFNet,
    RIFEInterpolater,
    RIFESmoother,
    build_rife_model,
    load_rife_model,
    load_rife_state_dict,
    rife_fingerprint,
    warp,
)
from diffsynth.extensions.RIFE.frames import to_image, to_tensor
from diffsynth.models.detect import FINGERPRINTS
from diffsynth.models.errors import ModelFileError
from diffsynth.processors import (
    AutoVideoProcessor,
    ContrastEditor,
    SequencialProcessor,
    SequentialProcessor,
    SharpnessEditor,
    VideoProcessor,
)
from diffsynth.testing.rife_files import TINY_RIFE, build_rife_state_dict, write_rife_file


# --------------------------------------------------------------------------- helpers


class BlendStub(torch.nn.Module):
    """Stands in for IFNet: the "middle" frame is ``a * img0 + (1 - a) * img1``; records input shapes."""

    def __init__(self, a: float = 0.5):
        super().__init__()
        self.a = a
        self.shapes: list[tuple[int, ...]] = []
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, scale_list):
        self.shapes.append(tuple(x.shape))
        self.inputs.append(x)
        merged = self.a * x[:, :3] + (1 - self.a) * x[:, 3:]
        return [], None, [merged, merged, merged]


class Recording:
    """A lazy source of ``n`` solid frames that records which indices were read."""

    def __init__(self, n: int, size=(40, 24)):
        self.n, self.size, self.read = n, size, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.read.append(i)
        return Image.new("RGB", self.size, (i % 256, (3 * i) % 256, 255 - i % 256))


def solid(value, size=(100, 72)):
    return Image.new("RGB", size, value if isinstance(value, tuple) else (value,) * 3)


def noise_frames(n, size=(100, 72), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def pixels(img):
    return np.asarray(img).astype(np.int32)


@pytest.fixture(scope="module")
def rife_file(tmp_path_factory):
    """A full-size (width 90) random-weight flownet.pkl in the published format."""
    return write_rife_file(tmp_path_factory.mktemp("rife") / "flownet.pkl", seed=0)


@pytest.fixture(scope="module")
def tiny_model():
    return build_rife_model(build_rife_state_dict(1, TINY_RIFE))


# --------------------------------------------------------------------------- key layout and loading


def test_ifnet_key_layout_is_the_flownet_pkl_layout():
    sd = IFNet().state_dict()
    assert len(sd) == 160 and sum(v.numel() for v in sd.values()) == 3_038_015
    assert {k.split(".")[0] for k in sd} == {"block0", "block1", "block2", "block_tea"}
    shapes = {
        "block0.conv0.0.0.weight": (45, 11, 3, 3),  # img0, img1, mask, 4 flow channels
        "block_tea.conv0.0.0.weight": (45, 14, 3, 3),  # + the ground-truth middle frame
        "block0.conv0.1.1.weight": (90,),  # PReLU
        "block2.convblock3.1.0.weight": (90, 90, 3, 3),
        "block_tea.convblock3.0.1.weight": (90,),  # DiffSynth-Studio's detection sentinel
        "block1.conv1.0.weight": (90, 45, 4, 4),  # ConvTranspose: (in, out, k, k)
        "block1.conv1.2.weight": (45, 4, 4, 4),
        "block1.conv2.2.bias": (1,),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_real_format_file_loads_strictly_in_fp32(rife_file):
    raw = torch.load(rife_file, weights_only=True)
    assert all(k.startswith("module.") for k in raw) and len(raw) == 160
    model = load_rife_model(rife_file)
    assert isinstance(model, IFNet) and not model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    expected = build_rife_state_dict(0)
    got = model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_legacy_pickle_and_fp16_weights_load_as_fp32(tmp_path):
    legacy = write_rife_file(tmp_path / "legacy.pkl", seed=2, config=TINY_RIFE, legacy_format=True)
    assert load_rife_model(legacy).block0.conv0[0][0].weight.dtype == torch.float32
    half = {f"module.{k}": v.half() for k, v in build_rife_state_dict(3, TINY_RIFE).items()}
    sd = load_rife_state_dict(half, "half.pkl")
    assert all(v.dtype == torch.float32 for v in sd.values())
    unprefixed = build_rife_model(build_rife_state_dict(3, TINY_RIFE))  # keys without module. load too
    assert unprefixed.config == TINY_RIFE


def test_missing_key_names_the_file_and_the_key(tmp_path):
    sd = {f"module.{k}": v for k, v in build_rife_state_dict(0, TINY_RIFE).items()}
    del sd["module.block1.convblock2.0.1.weight"]
    sd["module.block9.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pkl"
    torch.save(sd, path)
    with pytest.raises(ModelFileError) as info:
        load_rife_model(path)
    message = str(info.value)
    assert str(path) in message and info.value.path == str(path)
    assert "block1.convblock2.0.1.weight" in message and "block9.extra.weight" in message


def test_misshaped_and_ambiguous_keys_are_refused():
    sd = build_rife_state_dict(0, TINY_RIFE)
    sd["block2.conv2.2.weight"] = torch.zeros(8, 2, 4, 4)
    with pytest.raises(ModelFileError, match=r"x\.pkl.*block2\.conv2\.2\.weight"):
        load_rife_state_dict(sd, "x.pkl")
    sd = build_rife_state_dict(0, TINY_RIFE)
    sd["module.block0.conv1.0.bias"] = sd["block0.conv1.0.bias"]
    with pytest.raises(ModelFileError, match="both with and without"):
        load_rife_state_dict(sd, "y.pkl")


def test_fingerprint_matches_rife_keys_only():
    keys = list(build_rife_state_dict(0, TINY_RIFE))
    for candidate in (keys, [f"module.{k}" for k in keys]):
        assert all(any(re.search(p, k) for k in candidate) for p in rife_fingerprint)
        assert [f.family for f in FINGERPRINTS if f.matches(candidate)] == ["rife"]  # exactly the RIFE fingerprint
    assert not any(re.search(p, k) for p in rife_fingerprint for k in (f"module.{k}" for k in IFNet().block0.state_dict()))


def test_missing_model_file_names_the_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="drive.google.com"):
        load_rife_model(tmp_path / "flownet.pkl")


# --------------------------------------------------------------------------- the network


def test_warp_moves_pixels_by_the_flow_and_repeats_edges():
    image = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).view(2, 3, 5, 7)
    zero = torch.zeros(2, 2, 5, 7)
    torch.testing.assert_close(warp(image, zero), image)
    right = zero.clone()
    right[:, 0] = 1.0  # sample one pixel to the right
    expected = torch.cat((image[..., 1:], image[..., -1:]), -1)
    torch.testing.assert_close(warp(image, right), expected, atol=1e-4, rtol=0)


def test_ifnet_is_symmetric_in_its_two_frames(tiny_model):
    # Every stage averages the prediction for (a, b) with the swapped one for (b, a): a swapped
    # flow channel or a wrong mask sign breaks this.
    a, b = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).unbind(0)
    with torch.no_grad():
        ab = tiny_model(torch.cat((a, b))[None])[2][2]
        ba = tiny_model(torch.cat((b, a))[None])[2][2]
    assert (ab - ba).abs().max() < 1e-5
    assert (ab - (a + b) / 2).abs().max() > 1e-3  # and it is not a plain average


def test_full_ifnet_runs_on_sizes_not_divisible_by_32(rife_file):
    model = load_rife_model(rife_file)
    interpolater = RIFEInterpolater(model)
    # A solid colour stays itself whatever the flow (border sampling) and the mask: this fails
    # for garbage such as the original's resize to ceil(side/32) pixels, or a channel mix-up.
    frames = [solid((200, 30, 90)), solid((200, 30, 90))]
    out = interpolater.interpolate(frames)
    assert [f.size for f in out] == [(100, 72)] * 3
    assert np.abs(pixels(out[1]) - pixels(frames[0])).max() <= 1
    textured = noise_frames(2)
    middle = interpolater.interpolate(textured)[1]
    assert middle.size == (100, 72)
    x = to_tensor([np.asarray(f) for f in textured]).flatten(0, 1)[None]  # (1, 6, 72, 100): img0, img1
    padded = torch.nn.functional.pad(x, (0, 28, 0, 24), mode="replicate")
    with torch.no_grad():
        direct = model(padded, [4.0, 2.0, 1.0])[2][2][0, :, :72, :100].clamp(0, 1)
    assert np.array_equal(np.asarray(middle), np.asarray(to_image(direct)))


# --------------------------------------------------------------------------- padding


def test_frames_are_padded_to_multiples_of_32_and_cropped_back_exactly():
    stub = BlendStub()
    frames = noise_frames(1) * 2 + noise_frames(1, seed=5)
    out = RIFEInterpolater(stub).interpolate(frames, batch_size=4)
    assert stub.shapes == [(2, 6, 96, 128)]
    x = stub.inputs[0]
    assert torch.equal(x[..., 72:, :], x[..., 71:72, :].expand_as(x[..., 72:, :]))  # edge replication
    assert torch.equal(x[..., :, 100:], x[..., :, 99:100].expand_as(x[..., :, 100:]))
    assert [f.size for f in out] == [(100, 72)] * 5
    assert np.array_equal(np.asarray(out[1]), np.asarray(frames[0]))  # average of two equal frames: pixel exact
    expected = (pixels(frames[1]) + pixels(frames[2])) / 2
    assert np.abs(pixels(out[3]) - expected).max() <= 0.5


@pytest.mark.parametrize("scale,shape", [(1.0, (96, 160)), (0.5, (128, 192)), (0.25, (128, 256)), (2.0, (96, 160))])
def test_padding_multiple_follows_the_scale(scale, shape):
    stub = BlendStub()
    out = RIFEInterpolater(stub).interpolate([solid(0, (136, 72)), solid(8, (136, 72))], scale=scale)
    assert stub.shapes[0][-2:] == shape and out[1].size == (136, 72)


def test_invalid_arguments_teach():
    interpolater = RIFEInterpolater(BlendStub())
    with pytest.raises(ValueError, match=r"one of 0\.25, 0\.5, 1\.0, 2\.0, 4\.0"):
        interpolater.interpolate([solid(0)] * 2, scale=0.7)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        interpolater.interpolate([solid(0)] * 2, batch_size=0)
    with pytest.raises(ValueError, match="frame 1 is 64x40 but frame 0 is 100x72"):
        interpolater.interpolate([solid(0), solid(0, (64, 40))])
    with pytest.raises(ValueError, match=r"fp32 only.*float16"):
        RIFEInterpolater(IFNet(TINY_RIFE).half())
    with pytest.raises(ValueError, match="model.to"):
        RIFESmoother(IFNet(TINY_RIFE), device="cuda")


# --------------------------------------------------------------------------- interpolation


@pytest.mark.parametrize("num_iter,batch_size", [(1, 4), (2, 3), (3, 2)])
def test_interpolate_inserts_midpoints_in_order(num_iter, batch_size):
    values = [0, 40, 200, 120, 16]  # multiples of 8: every level's midpoint is an exact integer
    frames = [solid(v, (40, 24)) for v in values]
    out = RIFEInterpolater(BlendStub()).interpolate(frames, batch_size=batch_size, num_iter=num_iter)
    step = 2**num_iter
    assert len(out) == step * (len(frames) - 1) + 1
    for i, frame in enumerate(frames):
        assert out[step * i] is frame  # inputs come back untouched
    levels = [pixels(f)[0, 0, 0] for f in out]
    expected = np.interp(np.arange(len(out)) / step, np.arange(len(values)), values)
    assert np.array_equal(levels, expected)


def test_interpolate_with_a_real_model_doubles_minus_one(tiny_model):
    frames = noise_frames(4, size=(50, 36))
    out = RIFEInterpolater(tiny_model).interpolate(frames, batch_size=2)
    assert len(out) == 7 and all(f.size == (50, 36) for f in out)
    assert all(out[2 * i] is frames[i] for i in range(4))
    lazy = RIFEInterpolater(tiny_model).interpolate_lazy(frames, batch_size=2)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(lazy, out))


def test_interpolate_into_a_store_skips_committed_frames():
    frames = [solid(v, (40, 24)) for v in (0, 80, 160, 240)]
    store = image_store(None, 7)
    store.put(3, solid(1, (40, 24)))  # already there from an interrupted run
    stub = BlendStub()
    events = []
    assert RIFEInterpolater(stub).interpolate(frames, batch_size=1, output_store=store, progress_callback=events.append) is store
    assert store.complete() and pixels(store[3])[0, 0, 0] == 1 and pixels(store[5])[0, 0, 0] == 200
    assert len(stub.shapes) == 2  # the segment holding frame 3 was never computed
    assert events[-1].done == events[-1].total == 7
    with pytest.raises(ValueError, match="create it with that length"):
        RIFEInterpolater(stub).interpolate(frames, output_store=image_store(None, 4))


def test_interpolate_accepts_the_original_progress_bar():
    seen = []

    def bar(items):
        seen.append(True)
        return items

    out = RIFEInterpolater(BlendStub()).interpolate([solid(0, (40, 24))] * 3, progress_bar=bar)
    assert len(out) == 5 and seen


# --------------------------------------------------------------------------- smoother


@pytest.mark.parametrize("interpolate", [True, False])
def test_smoother_blends_inner_frames_and_keeps_the_ends(interpolate):
    values = [0, 64, 128, 32, 96, 160]
    frames = [solid(v, (40, 24)) for v in values]
    out = RIFESmoother(BlendStub(a=0.25), batch_size=3, interpolate=interpolate)(frames, original_frames=frames)
    assert len(out) == len(frames) and out[0] is frames[0] and out[-1] is frames[-1]
    for i in range(1, len(values) - 1):
        mid = 0.25 * values[i - 1] + 0.75 * values[i + 1]
        want = 0.25 * values[i] + 0.75 * mid if interpolate else (values[i] + mid) / 2
        assert abs(pixels(out[i])[0, 0, 0] - want) <= 0.5


def test_smoother_with_a_real_model_and_short_videos(tiny_model):
    frames = noise_frames(5, size=(50, 36))
    out = RIFESmoother(tiny_model)(frames)
    assert len(out) == 5 and out[0] is frames[0] and out[4] is frames[4]
    assert all(f.size == (50, 36) for f in out)
    assert not np.array_equal(np.asarray(out[2]), np.asarray(frames[2]))
    assert list(RIFESmoother(tiny_model)(frames[:2])) == frames[:2]  # nothing inner to smooth
    twice = RIFESmoother(BlendStub())([solid(v, (40, 24)) for v in (0, 0, 128, 0, 0)], num_iter=2, batch_size=1)
    assert [pixels(f)[0, 0, 0] for f in twice] == [0, 32, 48, 32, 0]  # 0,32,64,32,0 after one pass


def test_smoother_processor_factory():
    stub = BlendStub()
    mm = types.SimpleNamespace(RIFE=stub, device="cpu")
    smoother = RIFESmoother.from_model_manager(mm, batch_size=2, interpolate=False)
    assert smoother.model is stub and smoother.batch_size == 2 and not smoother.interpolate
    assert isinstance(smoother, VideoProcessor)
    from diffsynth.processors.RIFE import RIFESmoother as original_path

    assert original_path is RIFESmoother


# --------------------------------------------------------------------------- laziness


def test_processors_touch_only_the_frames_read():
    source = Recording(1000)
    contrast = ContrastEditor()(source)
    assert len(contrast) == 1000 and source.read == []
    contrast[500]
    assert source.read == [500]

    source = Recording(1000)
    stub = BlendStub()
    smoothed = RIFESmoother(stub, batch_size=4)(source)
    assert len(smoothed) == 1000 and source.read == []
    smoothed[500]  # inner frames 497..500 form its chunk
    assert sorted(set(source.read)) == list(range(496, 502)) and len(stub.shapes) == 2

    source = Recording(1000)
    interpolated = RIFEInterpolater(BlendStub()).interpolate_lazy(source, num_iter=2)
    assert len(interpolated) == 3997
    interpolated[2001]  # between inputs 500 and 501; chunk = segments 500..503
    assert sorted(set(source.read)) == list(range(500, 505))


def test_in_order_reading_computes_each_chunk_once():
    source = Recording(50)
    stub = BlendStub()
    chain = SequencialProcessor([RIFESmoother(stub, batch_size=4), RIFESmoother(stub, batch_size=4), SharpnessEditor()])
    out = list(chain(source))
    assert len(out) == 50
    assert len(stub.shapes) == 2 * 2 * 12  # two passes x 12 chunks of the 48 inner frames x 2 model calls


# --------------------------------------------------------------------------- PIL editors and the chain


@pytest.mark.parametrize("editor,enhancer", [(ContrastEditor, ImageEnhance.Contrast), (SharpnessEditor, ImageEnhance.Sharpness)])
def test_pil_editors_equal_imageenhance(editor, enhancer):
    frames = noise_frames(3, size=(33, 21))
    for rate in (None, 0.7):
        processor = editor() if rate is None else editor(rate=rate)
        out = processor(frames, original_frames=None, unused=1)
        want = [enhancer(f).enhance(1.5 if rate is None else rate) for f in frames]
        assert [np.asarray(f).tobytes() for f in out] == [np.asarray(f).tobytes() for f in want]
        assert [np.asarray(f).tobytes() for f in out[-2:]] == [np.asarray(f).tobytes() for f in want[-2:]]


def test_chain_runs_in_order_and_passes_original_frames_through():
    log = []

    class Tag(VideoProcessor):
        def __init__(self, name):
            self.name = name

        def __call__(self, rendered_frames, original_frames=None, **kwargs):
            log.append((self.name, original_frames, kwargs))
            return [f + self.name for f in rendered_frames]

    guide = ["g0", "g1"]
    chain = SequencialProcessor([Tag("a"), Tag("b"), Tag("c")])
    assert chain(["x", "y"], original_frames=guide, step=3) == ["xabc", "yabc"]
    assert [name for name, _, _ in log] == ["a", "b", "c"]
    assert all(orig is guide and kw == {"step": 3} for _, orig, kw in log)
    assert SequentialProcessor is SequencialProcessor and SequencialProcessor()(["x"]) == ["x"]


def test_chain_from_model_manager():
    mm = types.SimpleNamespace(RIFE=BlendStub(), device="cpu")
    configs = [
        {"processor_type": "Contrast", "config": {"rate": 1.2}},
        {"processor_type": "Sharpness", "config": {}},
        {"processor_type": "RIFE", "config": {"batch_size": 2}},
        {"processor_type": "Contrast"},
    ]
    snapshot = [dict(c) for c in configs]
    chain = SequencialProcessor.from_model_manager(mm, configs)
    assert configs == snapshot
    assert [type(p).__name__ for p in chain.processors] == ["ContrastEditor", "SharpnessEditor", "RIFESmoother", "ContrastEditor"]
    assert chain.processors[0].rate == 1.2 and chain.processors[1].rate == 1.5 and chain.processors[2].batch_size == 2
    frames = [solid(v, (40, 24)) for v in (0, 100, 200)]
    assert len(chain(frames, original_frames=frames)) == 3


def test_chain_config_errors_teach():
    mm = types.SimpleNamespace(device="cpu")
    with pytest.raises(ValueError, match="valid types: FastBlend, Contrast, Sharpness, RIFE"):
        SequencialProcessor.from_model_manager(mm, [{"processor_type": "Blur", "config": {}}])
    with pytest.raises(ValueError, match=r"models/RIFE/flownet\.pkl"):
        SequencialProcessor.from_model_manager(mm, [{"processor_type": "RIFE", "config": {}}])
    with pytest.raises(ValueError, match="unknown keys"):
        SequencialProcessor.from_model_manager(mm, [{"processor_type": "Contrast", "configs": {}}])
    with pytest.raises(TypeError, match="strength"):
        SequencialProcessor.from_model_manager(mm, [{"processor_type": "Contrast", "config": {"strength": 2}}])


def test_fastblend_is_built_lazily_through_its_factory(monkeypatch):
    calls = []

    class FakeFastBlend:
        @staticmethod
        def from_model_manager(model_manager, **config):
            calls.append((model_manager, config))
            return "fastblend"

    module = types.ModuleType("diffsynth.processors.FastBlend")
    module.FastBlendSmoother = FakeFastBlend
    monkeypatch.setitem(sys.modules, "diffsynth.processors.FastBlend", module)
    mm = types.SimpleNamespace(device="cpu")
    assert AutoVideoProcessor.from_model_manager(mm, "FastBlend", window_size=30) == "fastblend"
    assert calls == [(mm, {"window_size": 30})]


# --------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_full_model_on_a_720p_frame_pair(rife_file):
    model = load_rife_model(rife_file)
    frames = [solid((10, 200, 60), (1280, 720))] * 2
    out = RIFEInterpolater(model).interpolate(frames)
    assert out[1].size == (1280, 720) and np.abs(pixels(out[1]) - pixels(frames[0])).max() <= 1


@pytest.mark.gpu
def test_cuda_matches_cpu():
    sd = build_rife_state_dict(4)
    frames = noise_frames(3, size=(100, 72))
    cpu = RIFEInterpolater(build_rife_model(sd)).interpolate(frames)
    cuda = RIFEInterpolater(build_rife_model(sd, device="cuda")).interpolate(frames)
    assert max(np.abs(pixels(a) - pixels(b)).max() for a, b in zip(cpu, cuda)) <= 2


def test_model_manager_loads_rife_as_mm_RIFE(tmp_path, tiny_sd_file):
    from diffsynth import ModelManager
    from diffsynth.extensions.RIFE import rife_fingerprint
    from diffsynth.models.detect import FINGERPRINTS
    from diffsynth.processors.sequencial_processor import SequencialProcessor
    from diffsynth.testing.rife_files import write_rife_file

    assert next(f for f in FINGERPRINTS if f.family == "rife").required == rife_fingerprint
    path = write_rife_file(str(tmp_path / "flownet.pkl"))
    mm = ModelManager(torch_dtype=torch.float16, device="cpu")
    mm.load_models([tiny_sd_file, path])
    assert next(mm.RIFE.parameters()).dtype == torch.float32
    chain = SequencialProcessor.from_model_manager(mm, [{"processor_type": "RIFE", "config": {}}, {"processor_type": "Contrast", "config": {"rate": 1.1}}])
    assert len(chain.processors) == 2
