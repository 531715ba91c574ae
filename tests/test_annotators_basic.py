"""Annotator front end, canny and tile on real photographs (scikit-image's bundled public-domain samples)."""
from __future__ import annotations

import importlib.util
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from diffsynth.controlnets import PROCESSOR_IDS, Annotator
from diffsynth.controlnets.annotators.base import detection_size, resize_for_detection


def photo(name: str) -> Image.Image:
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        pytest.skip("scikit-image (test extra) provides the sample photographs")
    return Image.open(os.path.join(spec.submodule_search_locations[0], "data", name)).convert("RGB")


def test_unknown_processor_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        Annotator("scribble")
    for pid in PROCESSOR_IDS:
        assert pid in str(e.value)


def test_tile_is_the_identity():
    img = photo("astronaut.png")
    assert np.array_equal(np.asarray(Annotator("tile")(img)), np.asarray(img))


@pytest.mark.parametrize("name,detect_resolution", [("astronaut.png", None), ("chelsea.png", None), ("coffee.png", 256)])
def test_canny_matches_opencv_with_controlnet_aux_resizing(name, detect_resolution):
    """Expected output computed with OpenCV directly, following controlnet_aux 0.0.7's recipe step by step."""
    img = photo(name)
    w, h = img.size
    arr = np.asarray(img)
    res = detect_resolution or min(w, h)
    k = res / min(h, w)
    dh, dw = int(np.round(h * k / 64)) * 64, int(np.round(w * k / 64)) * 64
    small = cv2.resize(arr, (dw, dh), interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)
    edges = cv2.Canny(small, 100, 200)
    k2 = min(h, w) / min(dh, dw)
    th, tw = int(np.round(dh * k2 / 64)) * 64, int(np.round(dw * k2 / 64)) * 64
    edges = cv2.resize(np.repeat(edges[:, :, None], 3, axis=2), (tw, th), interpolation=cv2.INTER_LINEAR)
    expected = np.asarray(Image.fromarray(edges).resize((w, h)))
    got = np.asarray(Annotator("canny", detect_resolution=detect_resolution)(img))
    assert got.shape == (h, w, 3) and got.dtype == np.uint8
    assert np.array_equal(got, expected)
    assert 0.01 < (got > 127).mean() < 0.5  # a real photo has edges, not everywhere


def test_detection_size_rounds_to_64():
    assert detection_size(300, 451, 512) == (512, 768)
    assert detection_size(720, 1280, 720) == (704, 1280)
    assert detection_size(32, 48, 32) == (64, 64)  # at least 64 per side (controlnet_aux crashed here)
    with pytest.raises(ValueError, match="positive"):
        detection_size(100, 100, 0)
    arr = np.zeros((300, 451, 3), np.uint8)
    assert resize_for_detection(arr, 512).shape == (512, 768, 3)


def test_neural_annotator_missing_weights_name_file_folder_and_link(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        Annotator("lineart", model_path=str(tmp_path))
    msg = str(e.value)
    assert "sk_model.pth" in msg and str(tmp_path) in msg and "https://huggingface.co/lllyasviel/Annotators/resolve/main/sk_model.pth" in msg


def test_every_neural_annotator_through_the_front_end(tmp_path):
    """Tiny/structurally identical random-weight files in the real formats, through ``Annotator``."""
    from diffsynth.testing.annotator_files import write_hed_file, write_lineart_file
    from diffsynth.testing.depth_files import write_midas_file
    from diffsynth.testing.openpose_files import TINY_WIDTH, write_openpose_files

    folder = str(tmp_path)
    write_lineart_file(folder)
    write_hed_file(folder)
    write_midas_file(os.path.join(folder, "dpt_hybrid-midas-501f0c75.pt"))
    write_openpose_files(folder, width=TINY_WIDTH)
    img = photo("chelsea.png").resize((150, 100))
    for pid in ("lineart", "softedge", "depth", "openpose"):
        out = Annotator(pid, model_path=folder, detect_resolution=128)(img)
        assert out.size == img.size and out.mode == "RGB", pid
