"""Neural edge annotators: ``lineart`` (sk_model*.pth), ``lineart_anime`` (netG.pth), ``softedge`` (ControlNetHED.pth).

The weight files are random but written in the real format (key names, full shapes,
storage dtype), so strict loading is tested on what users download. Random weights
cannot validate learned behaviour: a wrong-but-plausible network would still draw
*some* lines. What catches a wrong architecture here is (a) each network compared
with an independent functional re-statement of its published architecture, computed
straight from the state dict, and (b) exact outputs of the pre/post-processing on
networks whose last layer is set to a constant.
"""
from __future__ import annotations

import math
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffsynth.controlnets.annotators.hed import HED_FILE, ControlNetHED, HEDConfig, HEDDetector
from diffsynth.controlnets.annotators.lineart import LINEART_COARSE_FILE, LINEART_FILE, LineartConfig, LineartDetector, LineartGenerator
from diffsynth.controlnets.annotators.lineart_anime import (
    LINEART_ANIME_FILE,
    LineartAnimeConfig,
    LineartAnimeDetector,
    LineartAnimeGenerator,
    strip_data_parallel_prefix,
)
from diffsynth.models.errors import ModelFileError
from diffsynth.models.state_dict import load_state_dict, read_header
from diffsynth.testing.annotator_files import write_hed_file, write_lineart_anime_file, write_lineart_file
from diffsynth.utils.atomic import atomic_torch_save

URL = "https://huggingface.co/lllyasviel/Annotators/resolve/main/{}"


@pytest.fixture(scope="module")
def annotators(tmp_path_factory):
    """``models/Annotators`` with all four files (284 MB in all, netG.pth 218 MB): written once, removed after."""
    folder = tmp_path_factory.mktemp("Annotators")
    write_lineart_file(str(folder), seed=0)
    write_lineart_file(str(folder), seed=0, coarse=True)
    write_lineart_anime_file(str(folder), seed=0)
    write_hed_file(str(folder), seed=0)
    yield str(folder)
    shutil.rmtree(folder, ignore_errors=True)  # pytest keeps old temp folders; don't keep 284 MB each time


@pytest.fixture(scope="module")
def image():
    """A 128x192 detect-size frame: smooth noise with a bright rectangle (some structure to draw)."""
    rng = np.random.default_rng(0)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (128, 192, 3), dtype=np.uint8), (0, 0), 3)
    frame[40:80, 50:130] = 255
    return frame


DETECTORS = {
    "lineart": (LineartDetector, {}),
    "lineart_coarse": (LineartDetector, {"coarse": True}),
    "lineart_anime": (LineartAnimeDetector, {}),
    "softedge": (HEDDetector, {}),
}


@pytest.fixture(scope="module")
def detectors(annotators):
    return {name: cls.from_folder(annotators, **options) for name, (cls, options) in DETECTORS.items()}


# --------------------------------------------------------------------------- file format

# Expected layouts. Parameter counts follow from the published architectures and agree
# with the published file sizes on huggingface.co/lllyasviel/Annotators: sk_model*.pth
# 17.2 MB = 4,290,945 x 4 bytes; netG.pth 218 MB = 54,405,505 x 4; ControlNetHED.pth
# 29.4 MB = 14,716,168 x 2 (fp16: the fp32 VGG-16 HED network-bsds500.pth is 58.9 MB).
LAYOUTS = {
    LINEART_FILE: dict(keys=24, params=4_290_945, dtype=torch.float32, key="model4.1.weight", shape=(1, 64, 7, 7)),
    LINEART_COARSE_FILE: dict(keys=24, params=4_290_945, dtype=torch.float32, key="model2.2.conv_block.5.weight", shape=(256, 256, 3, 3)),
    # The innermost level's down convolution: the eighth level, seven nestings deep.
    LINEART_ANIME_FILE: dict(
        keys=32, params=54_405_505, dtype=torch.float32, key="module.model.model.1" + ".model.3" * 6 + ".model.1.weight", shape=(512, 512, 4, 4)
    ),
    HED_FILE: dict(keys=37, params=14_716_168, dtype=torch.float16, key="norm", shape=(1, 3, 1, 1)),
}


@pytest.mark.parametrize("filename", list(LAYOUTS))
def test_written_files_have_the_real_layout(annotators, filename):
    path = os.path.join(annotators, filename)
    layout = LAYOUTS[filename]
    header = read_header(path)
    assert len(header) == layout["keys"]
    assert sum(math.prod(shape) for shape, _ in header.values()) == layout["params"]
    assert {dtype for _, dtype in header.values()} == {layout["dtype"]}
    assert header[layout["key"]][0] == layout["shape"]
    expected_bytes = layout["params"] * (2 if layout["dtype"] == torch.float16 else 4)
    assert expected_bytes <= os.path.getsize(path) < expected_bytes * 1.01
    if filename == LINEART_ANIME_FILE:
        assert all(k.startswith("module.model.model.") for k in header)  # nn.DataParallel prefix


def test_writers_are_seeded(tmp_path, annotators):
    again = load_state_dict(write_lineart_file(str(tmp_path / "a.pth"), seed=0))
    original = load_state_dict(os.path.join(annotators, LINEART_FILE))
    coarse = load_state_dict(os.path.join(annotators, LINEART_COARSE_FILE))
    assert all(torch.equal(again[k], original[k]) for k in original)
    assert not torch.equal(coarse["model0.1.weight"], original["model0.1.weight"])


def _resave_without(src: str, folder, filename: str, drop: str) -> str:
    sd = dict(load_state_dict(src))
    del sd[drop]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, filename)
    atomic_torch_save(sd, path)
    return path


@pytest.mark.parametrize(
    "cls, options, filename, drop",
    [
        (LineartDetector, {}, LINEART_FILE, "model4.1.bias"),
        (LineartDetector, {"coarse": True}, LINEART_COARSE_FILE, "model1.3.weight"),
        (HEDDetector, {}, HED_FILE, "block5.projection.bias"),
    ],
)
def test_missing_key_names_file_and_key(tmp_path, annotators, cls, options, filename, drop):
    path = _resave_without(os.path.join(annotators, filename), tmp_path, filename, drop)
    with pytest.raises(ModelFileError) as err:
        cls.from_folder(str(tmp_path), **options)
    assert path in str(err.value) and drop in str(err.value) and "missing" in str(err.value)


def test_incomplete_anime_file_names_file_and_keys(tmp_path):
    # Only the outermost level's four tensors: rewriting 218 MB minus one key would be slow.
    outer = {
        "module.model.model.0.weight": torch.zeros(64, 3, 4, 4),
        "module.model.model.0.bias": torch.zeros(64),
        "module.model.model.3.weight": torch.zeros(128, 1, 4, 4),
        "module.model.model.3.bias": torch.zeros(1),
    }
    path = str(tmp_path / LINEART_ANIME_FILE)
    atomic_torch_save(outer, path)
    with pytest.raises(ModelFileError) as err:
        LineartAnimeDetector.from_folder(str(tmp_path))
    message = str(err.value)
    assert path in message and "28 missing keys" in message and "model.model.1.model.1.bias" in message


def test_misshaped_key_is_reported(tmp_path, annotators):
    sd = dict(load_state_dict(os.path.join(annotators, LINEART_FILE)))
    sd["model4.1.weight"] = torch.zeros(3, 64, 7, 7)  # an RGB head: another model
    atomic_torch_save(sd, str(tmp_path / LINEART_FILE))
    with pytest.raises(ModelFileError, match=r"model4\.1\.weight \(file \(3, 64, 7, 7\), model \(1, 64, 7, 7\)\)"):
        LineartDetector.from_folder(str(tmp_path))


@pytest.mark.parametrize(
    "cls, options, filename",
    [
        (LineartDetector, {}, LINEART_FILE),
        (LineartDetector, {"coarse": True}, LINEART_COARSE_FILE),
        (LineartAnimeDetector, {}, LINEART_ANIME_FILE),
        (HEDDetector, {}, HED_FILE),
    ],
)
def test_missing_file_names_file_folder_and_url(tmp_path, cls, options, filename):
    with pytest.raises(FileNotFoundError) as err:
        cls.from_folder(str(tmp_path), **options)
    message = str(err.value)
    assert filename in message and os.path.abspath(tmp_path) in message and URL.format(filename) in message


def test_lineart_reads_only_the_file_it_needs(tmp_path, annotators, image):
    os.link(os.path.join(annotators, LINEART_COARSE_FILE), tmp_path / LINEART_COARSE_FILE)
    coarse = LineartDetector.from_folder(str(tmp_path), coarse=True)
    with pytest.raises(FileNotFoundError, match=LINEART_FILE):
        LineartDetector.from_folder(str(tmp_path))
    fine = LineartDetector.from_folder(annotators)
    assert not np.array_equal(coarse(image), fine(image))


def test_data_parallel_prefix_is_optional():
    sd = {"module.model.model.0.weight": 1, "model.model.0.bias": 2}
    assert strip_data_parallel_prefix(sd) == {"model.model.0.weight": 1, "model.model.0.bias": 2}


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("name", list(DETECTORS))
def test_output_shape_dtype_and_determinism(detectors, image, name):
    first = detectors[name](image)
    assert first.shape == image.shape[:2] and first.dtype == np.uint8
    assert first.std() > 5  # not a constant map: the random weights carry the image through
    assert np.array_equal(first, detectors[name](image))


def test_loading_twice_gives_the_same_map(annotators, detectors, image):
    assert np.array_equal(HEDDetector.from_folder(annotators)(image), detectors["softedge"](image))


@pytest.mark.parametrize("name", ["lineart", "softedge"])
def test_dtype_and_device_parameters(annotators, detectors, image, name):
    cls, options = DETECTORS[name]
    bf16 = cls.from_folder(annotators, device=torch.device("cpu"), dtype=torch.bfloat16, **options)
    assert bf16.dtype == torch.bfloat16 and bf16.device == torch.device("cpu")
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    out = bf16(image)
    assert out.shape == image.shape[:2] and out.dtype == np.uint8
    difference = np.abs(out.astype(int) - detectors[name](image).astype(int))
    assert difference.mean() < 8  # bf16 keeps ~3 significant digits
    assert bf16.to("cpu", torch.float32) is bf16 and bf16.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(DETECTORS))
def test_cuda_matches_cpu(annotators, detectors, image, name):
    cls, options = DETECTORS[name]
    cuda = cls.from_folder(annotators, device="cuda", dtype=torch.float32, **options)
    assert cuda.device.type == "cuda"
    difference = np.abs(cuda(image).astype(int) - detectors[name](image).astype(int))
    assert difference.max() <= 2


@pytest.mark.parametrize(
    "detector, bad",
    [
        (LineartDetector(LineartGenerator(LineartConfig(base_channels=4, num_residual_blocks=1))), np.zeros((64, 66, 3), np.uint8)),
        (LineartDetector(LineartGenerator(LineartConfig(base_channels=4, num_residual_blocks=1))), np.zeros((64, 64, 3), np.float32)),
        (LineartAnimeDetector(LineartAnimeGenerator(LineartAnimeConfig(base_channels=4, num_levels=3))), np.zeros((64, 64), np.uint8)),
        (HEDDetector(ControlNetHED(HEDConfig(widths=(4, 4, 4, 4, 4)))), np.zeros((8, 64, 3), np.uint8)),
    ],
)
def test_bad_input_is_rejected(detector, bad):
    with pytest.raises(ValueError):
        detector(bad)


# --------------------------------------------------------------------------- architecture


def _conv(sd, key, x, **kwargs):
    return F.conv2d(x, sd[key + ".weight"], sd[key + ".bias"], **kwargs)


def _reflect(x, pad):
    return F.pad(x, [pad] * 4, mode="reflect")


def lineart_reference(sd, x, num_blocks=3):
    """Chan et al. 2022's generator as one function of the state dict (instance norms without affine)."""
    h = F.relu(F.instance_norm(_conv(sd, "model0.1", _reflect(x, 3))))
    for i in (0, 3):
        h = F.relu(F.instance_norm(_conv(sd, f"model1.{i}", h, stride=2, padding=1)))
    for b in range(num_blocks):
        r = F.relu(F.instance_norm(_conv(sd, f"model2.{b}.conv_block.1", _reflect(h, 1))))
        h = h + F.instance_norm(_conv(sd, f"model2.{b}.conv_block.5", _reflect(r, 1)))
    for i in (0, 3):
        h = F.conv_transpose2d(h, sd[f"model3.{i}.weight"], sd[f"model3.{i}.bias"], stride=2, padding=1, output_padding=1)
        h = F.relu(F.instance_norm(h))
    return torch.sigmoid(_conv(sd, "model4.1", _reflect(h, 3)))


def unet_reference(sd, x, levels, level=0, prefix="model.model."):
    """The pix2pix U-Net as one recursive function of the state dict (level 0 is the outermost)."""
    up = lambda h, k: F.conv_transpose2d(F.relu(h), sd[prefix + k + ".weight"], sd[prefix + k + ".bias"], stride=2, padding=1)
    if level == 0:
        inner = unet_reference(sd, _conv(sd, prefix + "0", x, stride=2, padding=1), levels, 1, prefix + "1.model.")
        return torch.tanh(up(inner, "3"))
    skip = F.leaky_relu(x, 0.2)  # pix2pix's in-place LeakyReLU also overwrites the skip
    h = _conv(sd, prefix + "1", skip, stride=2, padding=1)
    if level == levels - 1:
        h = F.instance_norm(up(h, "3"))
    else:
        h = F.instance_norm(up(unet_reference(sd, F.instance_norm(h), levels, level + 1, prefix + "3.model."), "5"))
    return torch.cat([skip, h], dim=1)


def hed_reference(sd, x, depths=(2, 2, 3, 3, 3)):
    """VGG-16 stages with 1x1 side projections, input minus the learned ``norm``."""
    h, sides = x - sd["norm"], []
    for b, depth in enumerate(depths, start=1):
        if b > 1:
            h = F.max_pool2d(h, 2)
        for i in range(depth):
            h = F.relu(_conv(sd, f"block{b}.convs.{i}", h, padding=1))
        sides.append(_conv(sd, f"block{b}.projection", h))
    return sides


def test_lineart_network_matches_reference(annotators, detectors, image):
    sd = {k: v.float() for k, v in load_state_dict(os.path.join(annotators, LINEART_FILE)).items()}
    x = torch.from_numpy(image[:64, :96]).float().permute(2, 0, 1)[None] / 255.0
    with torch.inference_mode():
        expected = lineart_reference(sd, x)
        torch.testing.assert_close(detectors["lineart"].model(x), expected, atol=1e-5, rtol=1e-4)
    # End to end: x255, clip, truncate, invert; a float-rounding flip may move a pixel by one level.
    mapped = 255 - (expected[0, 0].numpy() * 255.0).clip(0, 255).astype(np.uint8)
    assert np.abs(detectors["lineart"](image[:64, :96]).astype(int) - mapped).max() <= 1


def test_unet_matches_reference_and_pix2pix_inplace_skip():
    torch.manual_seed(0)
    config = LineartAnimeConfig(base_channels=4, num_levels=5)  # widths 4, 8, 16, 32, 32: the x8 cap is hit
    net = LineartAnimeGenerator(config).eval()
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(net(x), unet_reference(net.state_dict(), x, config.num_levels), atol=1e-5, rtol=1e-4)
    # The pix2pix original: LeakyReLU(inplace=True) and forward = cat([x, model(x)]), where
    # the in-place activation overwrites x before cat reads it. Our explicit version agrees.
    level = net.model.model[1]
    h = torch.randn(1, 4, 32, 48)
    with torch.inference_mode():
        ours = level(h.clone())
        level.model[0].inplace = True
        try:
            literal = torch.cat([h, level.model(h)], dim=1)
        finally:
            level.model[0].inplace = False
    torch.testing.assert_close(ours, literal)


def test_lineart_anime_end_to_end_matches_reference(image):
    # Stretch (bicubic) to multiples of 2**levels, [-1, 1] in and out, bicubic back, truncate, invert.
    torch.manual_seed(1)
    config = LineartAnimeConfig(base_channels=4, num_levels=5)
    net = LineartAnimeGenerator(config).eval()
    frame = image[:40, :72]
    fed = cv2.resize(frame, (96, 64), interpolation=cv2.INTER_CUBIC)
    with torch.inference_mode():
        y = unet_reference(net.state_dict(), torch.from_numpy(fed).float().permute(2, 0, 1)[None] / 127.5 - 1.0, config.num_levels)
    line = cv2.resize(y[0, 0].numpy() * 127.5 + 127.5, (72, 40), interpolation=cv2.INTER_CUBIC)
    expected = 255 - line.clip(0, 255).astype(np.uint8)
    out = LineartAnimeDetector(net)(frame)
    assert out.shape == (40, 72) and out.std() > 1
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


def test_hed_network_and_postprocessing_match_reference(annotators, detectors, image):
    sd = {k: v.float() for k, v in load_state_dict(os.path.join(annotators, HED_FILE)).items()}
    x = torch.from_numpy(image).float().permute(2, 0, 1)[None]
    with torch.inference_mode():
        sides = hed_reference(sd, x)
        for ours, theirs in zip(detectors["softedge"].model(x), sides):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # Post-processing restated with torch: bilinear (half-pixel) upsampling, mean, then sigmoid.
    upsampled = torch.cat([F.interpolate(s, size=image.shape[:2], mode="bilinear", align_corners=False) for s in sides], dim=1)
    expected = (torch.sigmoid(upsampled.mean(dim=1)[0]).double().numpy() * 255.0).astype(np.uint8)
    assert np.abs(detectors["softedge"](image).astype(int) - expected.astype(int)).max() <= 1


# --------------------------------------------------------------------------- pre/post-processing, exactly


@pytest.mark.parametrize("bias, expected", [(0.0, 128), (2.0, 31)])
def test_lineart_scaling_and_inversion(bias, expected):
    # Constant head: sigmoid(bias) * 255 truncated, then inverted (255 - 127 = 128; 255 - 224 = 31).
    net = LineartGenerator(LineartConfig(base_channels=4, num_residual_blocks=1)).eval()
    with torch.no_grad():
        net.model4[1].weight.zero_()
        net.model4[1].bias.fill_(bias)
    out = LineartDetector(net)(np.full((32, 48, 3), 90, np.uint8))
    assert out.shape == (32, 48) and (out == expected).all()


@pytest.mark.parametrize("bias, expected", [(0.0, 128), (0.5, 69)])
def test_lineart_anime_scaling_resizing_and_inversion(bias, expected):
    # tanh(bias) * 127.5 + 127.5 truncated, then inverted: 127.5 -> 128; tanh(0.5) -> 186.4 -> 69.
    # 40x72 is resized up to 64x96 (multiples of 2**5) and the map back to 40x72.
    net = LineartAnimeGenerator(LineartAnimeConfig(base_channels=4, num_levels=5)).eval()
    with torch.no_grad():
        net.model.model[3].weight.zero_()
        net.model.model[3].bias.fill_(bias)
    out = LineartAnimeDetector(net)(np.full((40, 72, 3), 200, np.uint8))
    assert out.shape == (40, 72) and (out == expected).all()


@pytest.mark.parametrize("safe, expected", [(False, 164), (True, 127)])
def test_hed_sigmoid_of_the_mean(safe, expected):
    # Side-output logits 3, 0, 0, 0, 0: sigmoid(mean) = sigmoid(0.6) -> 164. The mean of the
    # sigmoids would give 150. safe_step: int(3 * 0.6457) / 2 = 0.5 -> 127.
    net = ControlNetHED(HEDConfig(widths=(4, 4, 8, 8, 8))).eval()
    with torch.no_grad():
        for k, stage in enumerate(net.stages()):
            stage.projection.weight.zero_()
            stage.projection.bias.fill_(3.0 if k == 0 else 0.0)
    out = HEDDetector(net, safe=safe)(np.full((48, 80, 3), 60, np.uint8))
    assert out.shape == (48, 80) and (out == expected).all()
