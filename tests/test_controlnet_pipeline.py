"""ControlNet units in ModelManager and SDImagePipeline: loading, detection, txt2img/img2img/tiled, bad input."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth import ModelManager, SDImagePipeline
from diffsynth.controlnets import ControlNetConfigUnit
from diffsynth.models.detect import FINGERPRINTS
from diffsynth.models.sd_controlnet import SDControlNet
from diffsynth.models.state_dict import read_header
from diffsynth.testing import factory
from diffsynth.testing.controlnet_files import write_controlnet


@pytest.fixture(scope="module")
def cn_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cn")
    return {
        "pth": write_controlnet(str(d / "control_tiny_tile.pth"), seed=1),
        "safetensors": write_controlnet(str(d / "control_tiny_canny.safetensors"), seed=2),
        "diffusers": write_controlnet(str(d / "control_tiny_diffusers"), seed=3, layout="diffusers"),
    }


@pytest.fixture(scope="module")
def cn_manager(tiny_sd_file, cn_files):
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([tiny_sd_file, cn_files["pth"], cn_files["safetensors"], cn_files["diffusers"]])
    return mm


def _control_image(seed=0, size=(64, 64)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _render(pipe, seed=0, **kw):
    kw.setdefault("height", 64)
    kw.setdefault("width", 64)
    kw.setdefault("num_inference_steps", 2)
    torch.manual_seed(seed)
    return np.asarray(pipe("a photo of a cat", negative_prompt="blurry", progress_bar_cmd=None, **kw))


def test_controlnets_are_detected_and_listed(cn_manager, cn_files):
    assert len(cn_manager.controlnet) == 3 and all(isinstance(m, SDControlNet) for m in cn_manager.controlnet)
    for key in ("pth", "safetensors", "diffusers"):
        assert isinstance(cn_manager.get_model_with_model_path(cn_files[key]), SDControlNet)
    for key in ("pth", "safetensors"):
        hits = [f.family for f in FINGERPRINTS if f.matches(read_header(cn_files[key]))]
        assert hits == ["controlnet"]


def test_v10_controlnet_with_embedded_sd_model_is_a_controlnet(tmp_path, tiny_sd_file):
    """ControlNet v1.0 files (control_sd15_*.pth) carry the whole SD model next to control_model.*."""
    from diffsynth.models.state_dict import load_state_dict

    sd = load_state_dict(write_controlnet(str(tmp_path / "cn.pth")))
    sd.update({k: v for k, v in load_state_dict(tiny_sd_file).items() if k.startswith("model.diffusion_model.")})
    path = str(tmp_path / "control_sd15_tiny.pth")
    torch.save(sd, path)
    assert [f.family for f in FINGERPRINTS if f.matches(read_header(path))] == ["controlnet"]


def test_scale_zero_equals_no_controlnet(cn_manager, cn_files):
    plain = SDImagePipeline.from_model_manager(cn_manager)
    zero = SDImagePipeline.from_model_manager(cn_manager, [ControlNetConfigUnit("tile", cn_files["pth"], 0.0)])
    full = SDImagePipeline.from_model_manager(cn_manager, [ControlNetConfigUnit("tile", cn_files["pth"], 1.0)])
    image = _control_image()
    base = _render(plain)
    assert np.array_equal(base, _render(zero, controlnet_image=image))
    with_cn = _render(full, controlnet_image=image)
    assert not np.array_equal(base, with_cn)
    assert not np.array_equal(with_cn, _render(full, controlnet_image=_control_image(seed=1)))  # the hint matters
    assert np.array_equal(base, _render(full))  # units but no controlnet_image: ControlNet unused, as the original


def test_several_units_and_all_paths(cn_manager, cn_files):
    units = [ControlNetConfigUnit("tile", cn_files["pth"], 0.5), ControlNetConfigUnit("canny", cn_files["diffusers"], 0.7)]
    pipe = SDImagePipeline.from_model_manager(cn_manager, units)
    image = _control_image(size=(72, 128))
    cond = pipe.controlnet.process_image(image)
    assert cond.shape == (2, 3, 128, 72) and 0 <= cond.min() and cond.max() <= 1
    assert pipe.controlnet.process_image(image, processor_id="canny").shape == (1, 3, 128, 72)
    txt = _render(pipe, controlnet_image=image, height=128, width=72)
    img2img = _render(pipe, controlnet_image=image, input_image=image, denoising_strength=0.5, height=128, width=72)
    tiled = _render(pipe, controlnet_image=image, input_image=image, denoising_strength=0.5, height=128, width=72, tiled=True, tile_size=6, tile_stride=4)
    assert txt.shape == img2img.shape == tiled.shape == (128, 72, 3)
    assert not np.array_equal(img2img, tiled)


def test_control_image_of_another_size_is_resized_with_a_warning(cn_manager, cn_files, caplog):
    pipe = SDImagePipeline.from_model_manager(cn_manager, [ControlNetConfigUnit("tile", cn_files["pth"], 1.0)])
    with caplog.at_level(logging.WARNING, logger="diffsynth"):
        out = _render(pipe, controlnet_image=_control_image(size=(100, 90)))
    assert out.shape == (64, 64, 3)
    assert "resizing" in caplog.text and "100x90" in caplog.text


def test_wrong_files_in_the_wrong_places(cn_manager, cn_files, tiny_sd_file, tmp_path):
    with pytest.raises(ValueError, match="not a ControlNet"):
        SDImagePipeline.from_model_manager(cn_manager, [ControlNetConfigUnit("tile", tiny_sd_file, 1.0)])
    only_cn = ModelManager(torch_dtype=torch.float32, device="cpu")
    only_cn.load_models([cn_files["pth"]])
    with pytest.raises(ValueError, match="loaded: controlnet"):
        SDImagePipeline.from_model_manager(only_cn)
    with pytest.raises(ValueError, match="no ControlNet units"):
        _render(SDImagePipeline.from_model_manager(cn_manager), controlnet_image=_control_image())
    with pytest.raises(ValueError, match="no model was loaded"):
        SDImagePipeline.from_model_manager(cn_manager, [ControlNetConfigUnit("tile", str(tmp_path / "other.pth"), 1.0)])
