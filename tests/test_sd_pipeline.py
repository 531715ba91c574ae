"""SDImagePipeline end to end on a tiny random model: semantics, determinism, sizes, tiling, TI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth import ModelManager, SDImagePipeline
from diffsynth.pipelines.sd_image import check_size
from diffsynth.progress import ProgressEvent
from diffsynth.testing import factory


def _render(pipe, seed=0, **kw):
    kw.setdefault("height", 64)
    kw.setdefault("width", 64)
    kw.setdefault("num_inference_steps", 3)
    kw.setdefault("progress_bar_cmd", None)
    torch.manual_seed(seed)
    return np.asarray(pipe(kw.pop("prompt", "a photo of a cat"), **kw))


def test_seed_determinism_and_sensitivity(tiny_pipe):
    a = _render(tiny_pipe, seed=1, negative_prompt="blurry")
    b = _render(tiny_pipe, seed=1, negative_prompt="blurry")
    c = _render(tiny_pipe, seed=2, negative_prompt="blurry")
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # a passed generator gives the same noise as the global RNG after manual_seed
    g = torch.Generator().manual_seed(1)
    d = np.asarray(tiny_pipe("a photo of a cat", negative_prompt="blurry", height=64, width=64, num_inference_steps=3, progress_bar_cmd=None, generator=g))
    assert np.array_equal(a, d)


def test_prompt_cfg_and_clip_skip_matter(tiny_pipe):
    base = _render(tiny_pipe)
    assert not np.array_equal(base, _render(tiny_pipe, prompt="an astronaut riding a horse"))
    assert not np.array_equal(base, _render(tiny_pipe, clip_skip=2))
    assert not np.array_equal(base, _render(tiny_pipe, cfg_scale=3.0))


@pytest.mark.parametrize("height,width", [(72, 128), (40, 64), (64, 24)])
def test_any_multiple_of_8_works(tiny_pipe, height, width):
    """16:9 and sizes whose latent is odd at some UNet level (the original crashed on 1280x720)."""
    img = _render(tiny_pipe, height=height, width=width, num_inference_steps=2)
    assert img.shape == (height, width, 3)


def test_bad_sizes_name_the_nearest_valid(tiny_pipe):
    with pytest.raises(ValueError, match="nearest valid: 720"):
        check_size(721, 1280)
    with pytest.raises(ValueError, match="width must be a positive multiple of 8"):
        tiny_pipe("x", height=64, width=60, progress_bar_cmd=None)


def test_img2img_follows_the_input(tiny_pipe):
    rng = np.random.default_rng(0)
    img_a = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    img_b = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    a = _render(tiny_pipe, input_image=img_a, denoising_strength=0.3)
    b = _render(tiny_pipe, input_image=img_b, denoising_strength=0.3)
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="input_image is 64x64"):
        _render(tiny_pipe, input_image=img_a, height=72, width=64)


def test_tiled_high_resolution_path(tiny_pipe):
    """The tiled path (VAE and attention by tiles) runs at sizes where (size - tile) % stride != 0."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (88, 104, 3), dtype=np.uint8))
    out = _render(tiny_pipe, input_image=img, height=88, width=104, denoising_strength=0.5, tiled=True, tile_size=6, tile_stride=4)
    assert out.shape == (88, 104, 3)
    untiled = _render(tiny_pipe, input_image=img, height=88, width=104, denoising_strength=0.5)
    assert not np.array_equal(out, untiled)  # the tiled path was really taken


def test_progress_events(tiny_pipe):
    events = []
    torch.manual_seed(0)
    tiny_pipe("x", height=64, width=64, num_inference_steps=3, progress_bar_cmd=None, progress_callback=events.append)
    assert events[0] == ProgressEvent("denoising", 0, 3) and events[-1] == ProgressEvent("denoising", 3, 3)


def test_textual_inversion_by_file_stem(tmp_path, tiny_sd_file):
    folder = tmp_path / "ti"
    factory.write_textual_inversion(str(folder / "verybadimagenegative_v1.3.pt"), num_vectors=2)
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_textual_inversions(str(folder))
    mm.load_models([tiny_sd_file])
    pipe = SDImagePipeline.from_model_manager(mm)
    with_ti = _render(pipe, negative_prompt="verybadimagenegative_v1.3")
    without = _render(pipe, negative_prompt="")
    assert not np.array_equal(with_ti, without)
    emb = pipe.prompter.encode_prompt(pipe.text_encoder, "verybadimagenegative_v1.3", positive=False)
    assert emb.shape == (1, 77, factory.TINY_TEXT.hidden_size)


def test_missing_components_are_explained(tmp_path):
    vae = factory.write_vae(str(tmp_path / "vae.safetensors"))
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([vae])
    with pytest.raises(ValueError, match="text_encoder, unet"):
        SDImagePipeline.from_model_manager(mm)
