"""SDVideoPipeline on tiny models: streaming window average vs an all-in-memory reference of the
original's formula, disk vs memory stores, text-to-video, video-to-video with 2 ControlNet units,
16:9 frames, shared noise without motion modules, smoother in the loop, resume within a step."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth import ModelManager
from diffsynth.controlnets import ControlNetConfigUnit
from diffsynth.pipelines.sd_video import SDVideoPipeline, Window, sliding_windows
from diffsynth.testing.controlnet_files import write_controlnet
from diffsynth.testing.motion_files import write_motion_module


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_sd_file):
    d = tmp_path_factory.mktemp("video_models")
    return {
        "sd": tiny_sd_file,
        "mm": write_motion_module(str(d / "mm_sd_v15_v2.ckpt"), version="v2"),
        "cn1": write_controlnet(str(d / "cn_tile.pth"), seed=1),
        "cn2": write_controlnet(str(d / "cn_canny.safetensors"), seed=2),
    }


@pytest.fixture(scope="module")
def animatediff_pipe(files):
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([files["sd"], files["mm"]])
    return SDVideoPipeline.from_model_manager(mm)


@pytest.fixture(scope="module")
def controlnet_pipe(files):
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([files["sd"], files["mm"], files["cn1"], files["cn2"]])
    units = [ControlNetConfigUnit("tile", files["cn1"], 0.5), ControlNetConfigUnit("canny", files["cn2"], 0.5)]
    return SDVideoPipeline.from_model_manager(mm, units)


def _frames(n, width=64, height=64, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    return [Image.fromarray(np.roll(base, 2 * i, axis=1)) for i in range(n)]


def _array(frames):
    return np.stack([np.asarray(f) for f in frames])


def test_window_schedule_matches_the_original():
    assert [(w.start, w.end) for w in sliding_windows(20, 8, 4)] == [(0, 8), (4, 12), (8, 16), (12, 20)]
    assert [(w.start, w.end) for w in sliding_windows(21, 8, 4)] == [(0, 8), (4, 12), (8, 16), (12, 20), (16, 21)]
    assert [(w.start, w.end) for w in sliding_windows(5, 16, 8)] == [(0, 5)]
    w = Window(4, 12)
    assert w.weight(7) == pytest.approx(1 - 0.5 / (7.01 / 2)) and w.weight(4) == pytest.approx(max(1 - 3.5 / 3.505, 0.01))
    with pytest.raises(ValueError, match="animatediff_stride"):
        sliding_windows(10, 4, 0)


def reference_denoise(pipe, prompt, negative, num_frames, steps, cfg, batch, stride, seed, height=64, width=64):
    """All frames in memory, the original's lets_dance_with_long_video running mean, same UNet calls."""
    torch.manual_seed(seed)
    pipe.scheduler.set_timesteps(steps)
    latents = torch.randn((num_frames, 4, height // 8, width // 8))
    posi = pipe.prompter.encode_prompt(pipe.text_encoder, prompt)
    nega = pipe.prompter.encode_prompt(pipe.text_encoder, negative, positive=False)
    for t in pipe.scheduler.timesteps:
        outs = []
        for emb in (posi, nega):
            acc = [(torch.zeros_like(latents[0]), 0.0) for _ in range(num_frames)]
            for s in range(0, num_frames, stride):
                e = min(s + batch, num_frames)
                out = pipe.unet(latents[s:e], t, emb.expand(e - s, -1, -1), motion=pipe.motion_modules)
                for j, i in enumerate(range(s, e)):
                    bias = max(1 - abs(i - (s + e - 1) / 2) / ((e - s - 1 + 0.01) / 2), 0.01)
                    value, weight = acc[i]
                    acc[i] = (value * (weight / (weight + bias)) + out[j] * (bias / (weight + bias)), weight + bias)
                if e == num_frames:
                    break
            outs.append(torch.stack([a[0] for a in acc]))
        eps = outs[1] + cfg * (outs[0] - outs[1])
        latents = pipe.scheduler.step(eps, t, latents)
    return latents


@torch.no_grad()
def test_streaming_average_equals_the_all_in_memory_reference(animatediff_pipe, tmp_path):
    n, steps, batch, stride = 11, 2, 4, 2
    ref = reference_denoise(animatediff_pipe, "a cat", "blurry", n, steps, 7.5, batch, stride, seed=3)
    # unet_batch_size = window: the reference runs each window as one batch (frame chunks change rounding,
    # which random weights and cfg 7.5 amplify to ~1e-3 in two steps)
    torch.manual_seed(3)
    animatediff_pipe("a cat", negative_prompt="blurry", num_frames=n, num_inference_steps=steps, height=64, width=64,
                     animatediff_batch_size=batch, animatediff_stride=stride, unet_batch_size=batch, output_folder=str(tmp_path), progress_bar_cmd=None)
    # the final step's latents stay in the output folder (earlier generations are deleted)
    from diffsynth.cache import tensor_store

    final = tensor_store(str(tmp_path / "latents" / f"step_{steps:03d}"), n)
    got = torch.stack([final[i] for i in range(n)])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_text_to_video_disk_and_memory_identical(animatediff_pipe, tmp_path):
    kw = dict(negative_prompt="blurry", num_frames=7, num_inference_steps=2, height=64, width=64, animatediff_batch_size=4, animatediff_stride=2, progress_bar_cmd=None)
    torch.manual_seed(0)
    disk = animatediff_pipe("a dancing girl", output_folder=str(tmp_path / "out"), **kw)
    torch.manual_seed(0)
    memory = animatediff_pipe("a dancing girl", in_memory=True, **kw)
    assert len(disk) == len(memory) == 7
    a, b = _array(disk), _array(memory)
    assert a.shape == (7, 64, 64, 3)
    assert np.array_equal(a, b)
    assert sorted(os.listdir(tmp_path / "out" / "frames"))[0] == "000000.png"
    assert not (tmp_path / "out" / "latents" / "step_000").exists()  # earlier generations are deleted
    assert len({f.tobytes() for f in a}) == 7  # independent noise per frame with motion modules


@torch.no_grad()
def test_without_motion_modules_frames_share_the_noise(tiny_sd_file):
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([tiny_sd_file])
    pipe = SDVideoPipeline.from_model_manager(mm)
    assert pipe.scheduler.alphas_cumprod[999] != pytest.approx(float(torch.cumprod(1 - torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64), 0)[999]))
    torch.manual_seed(1)
    out = _array(pipe("a cat", num_frames=3, num_inference_steps=2, height=64, width=64, in_memory=True, progress_bar_cmd=None))
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])


@torch.no_grad()
def test_video_to_video_with_two_controlnet_units_16_9(controlnet_pipe, tmp_path):
    frames = _frames(6, width=128, height=72)
    kw = dict(num_frames=6, input_frames=frames, controlnet_frames=[frames, frames[::-1]], denoising_strength=0.6, height=72, width=128,
              num_inference_steps=2, animatediff_batch_size=4, animatediff_stride=2, controlnet_batch_size=2, unet_batch_size=2, progress_bar_cmd=None)
    torch.manual_seed(2)
    disk = _array(controlnet_pipe("a winter scene", output_folder=str(tmp_path / "v2v"), **kw))
    torch.manual_seed(2)
    memory = _array(controlnet_pipe("a winter scene", in_memory=True, **kw))
    assert disk.shape == (6, 72, 128, 3)
    assert np.array_equal(disk, memory)
    for k in (0, 1):
        assert len(os.listdir(tmp_path / "v2v" / "controlnet_caches" / str(k))) == 6
    # the input frames steer the result
    torch.manual_seed(2)
    other = _array(controlnet_pipe("a winter scene", in_memory=True, **dict(kw, input_frames=_frames(6, 128, 72, seed=5))))
    assert not np.array_equal(disk, other)


@torch.no_grad()
def test_smoother_inside_the_loop_and_at_the_end(animatediff_pipe):
    seen = []

    def smoother(frames, original_frames=None):
        seen.append(len(frames))
        return [f.transpose(Image.FLIP_LEFT_RIGHT) for f in frames]

    kw = dict(num_frames=4, num_inference_steps=3, height=64, width=64, animatediff_batch_size=4, animatediff_stride=2, in_memory=True, progress_bar_cmd=None)
    torch.manual_seed(4)
    plain = _array(animatediff_pipe("x", **kw))
    torch.manual_seed(4)
    smoothed = _array(animatediff_pipe("x", smoother=smoother, smoother_progress_ids=[1, -1], **kw))
    assert seen == [4, 4]
    assert not np.array_equal(plain, smoothed)


@torch.no_grad()
def test_rerun_resumes_and_gives_the_same_frames(animatediff_pipe, tmp_path):
    kw = dict(num_frames=6, num_inference_steps=2, height=64, width=64, animatediff_batch_size=4, animatediff_stride=2, progress_bar_cmd=None)
    torch.manual_seed(9)
    full = _array(animatediff_pipe("x", output_folder=str(tmp_path / "a"), **kw))
    # simulate a crash: frames 3.. of the result are missing
    for name in sorted(os.listdir(tmp_path / "a" / "frames"))[3:]:
        os.remove(tmp_path / "a" / "frames" / name)
    torch.manual_seed(9)
    again = _array(animatediff_pipe("x", output_folder=str(tmp_path / "a"), **kw))
    assert np.array_equal(full, again)


def test_bad_input(animatediff_pipe, controlnet_pipe):
    with pytest.raises(ValueError, match="num_frames is required"):
        animatediff_pipe("x", in_memory=True)
    with pytest.raises(ValueError, match="exceeds"):
        animatediff_pipe("x", num_frames=40, animatediff_batch_size=40, in_memory=True)
    with pytest.raises(ValueError, match="pass controlnet_frames"):
        controlnet_pipe("x", num_frames=2, height=64, width=64, in_memory=True, progress_bar_cmd=None)
    with pytest.raises(ValueError, match="input frame 0 is 64x64 but the video is 72x64"):
        animatediff_pipe("x", num_frames=2, input_frames=_frames(2), denoising_strength=0.5, height=64, width=72, in_memory=True, progress_bar_cmd=None)


class _Crash(Exception):
    pass


@torch.no_grad()
def test_a_crash_inside_denoising_loses_at_most_one_window(animatediff_pipe, tmp_path):
    """Exception after k UNet calls, rerun: same frames, and at most one window's UNet calls are repeated."""
    kw = dict(num_frames=10, num_inference_steps=2, height=64, width=64, animatediff_batch_size=4, animatediff_stride=2, unet_batch_size=4, progress_bar_cmd=None)
    calls = []
    handle = animatediff_pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        torch.manual_seed(5)
        reference = _array(animatediff_pipe("x", output_folder=str(tmp_path / "ref"), **kw))
        uninterrupted = len(calls)
        per_window = 2  # cfg: a positive and a negative UNet call per window

        def crash_after(n):
            def hook(*args):
                if len(calls) >= n:
                    raise _Crash()
            return hook

        calls.clear()
        crash = animatediff_pipe.unet.register_forward_hook(crash_after(uninterrupted // 2 + 1))
        with pytest.raises(_Crash):
            torch.manual_seed(5)
            animatediff_pipe("x", output_folder=str(tmp_path / "run"), **kw)
        crash.remove()
        torch.manual_seed(5)
        resumed = _array(animatediff_pipe("x", output_folder=str(tmp_path / "run"), **kw))
    finally:
        handle.remove()
    assert np.array_equal(reference, resumed)
    assert len(calls) <= uninterrupted + per_window, (len(calls), uninterrupted)


@torch.no_grad()
def test_a_different_call_in_the_same_folder_does_not_reuse_stale_frames(animatediff_pipe, tmp_path):
    kw = dict(num_frames=4, num_inference_steps=2, height=64, width=64, animatediff_batch_size=4, animatediff_stride=2,
              output_folder=str(tmp_path / "out"), progress_bar_cmd=None)
    torch.manual_seed(0)
    a = _array(animatediff_pipe("a cat", **kw))
    torch.manual_seed(0)
    b = _array(animatediff_pipe("a dog", **kw))
    torch.manual_seed(0)
    fresh = _array(animatediff_pipe("a dog", **dict(kw, output_folder=str(tmp_path / "fresh"))))
    assert not np.array_equal(a, b) and np.array_equal(b, fresh)
    # the first call's finished frames were moved aside, not deleted
    (kept,) = os.listdir(tmp_path / "out" / "previous")
    frames = sorted(os.listdir(tmp_path / "out" / "previous" / kept / "frames"))
    assert len(frames) == 4
    assert np.array_equal(np.stack([np.asarray(Image.open(tmp_path / "out" / "previous" / kept / "frames" / f).convert("RGB")) for f in frames]), a)


@torch.no_grad()
def test_a_one_argument_progress_bar_cmd_sees_every_step(tiny_sd_file):
    """The original's examples pass one-argument commands (``lambda x: x``, a Streamlit adapter): the
    denoising bar is such a command wrapped around ``range(steps)``, every step's item taken."""
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([tiny_sd_file])
    pipe = SDVideoPipeline.from_model_manager(mm)
    taken = []

    def one_argument_bar(items):
        for item in items:
            taken.append(item)
            yield item

    kw = dict(num_frames=2, num_inference_steps=3, height=64, width=64, in_memory=True)
    torch.manual_seed(0)
    with_bar = _array(pipe("a cat", progress_bar_cmd=one_argument_bar, **kw))
    assert taken == [0, 1, 2]
    torch.manual_seed(0)
    assert np.array_equal(_array(pipe("a cat", progress_bar_cmd=lambda x: x, **kw)), with_bar)
