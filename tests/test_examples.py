"""The example scripts run end to end with tiny random-weight models placed at their documented paths."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffsynth.testing import factory
from diffsynth.testing.annotator_files import write_lineart_file
from diffsynth.testing.controlnet_files import write_controlnet
from diffsynth.testing.motion_files import write_motion_module
from diffsynth.testing.runner_files import write_documented_models, write_input_clip

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _run(script: str, cwd, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_missing_model_files_are_listed_with_links(tmp_path):
    result = _run("sd_text_to_image.py", tmp_path)
    assert result.returncode != 0
    assert "models/stable_diffusion/aingdiffusion_v12.safetensors" in result.stderr
    assert "https://civitai.com/api/download/models/229575" in result.stderr


def test_toon_shading_example_runs(tmp_path):
    factory.write_sd_checkpoint(str(tmp_path / "models/stable_diffusion/flat2DAnimerge_v45Sharp.safetensors"))
    write_controlnet(str(tmp_path / "models/ControlNet/control_v11f1e_sd15_tile.pth"), seed=1)
    write_controlnet(str(tmp_path / "models/ControlNet/control_v11p_sd15_lineart.pth"), seed=2)
    write_lineart_file(str(tmp_path / "models/Annotators/sk_model.pth"))
    factory.write_textual_inversion(str(tmp_path / "models/textual_inversion/verybadimagenegative_v1.3.pt"))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    result = _run("sd_toon_shading_image.py", tmp_path, "in.png", "out.png", "64")
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "out.png").size == (64, 64)


def test_text_to_video_example_runs(tmp_path):
    factory.write_sd_checkpoint(str(tmp_path / "models/stable_diffusion/dreamshaper_8.safetensors"))
    write_motion_module(str(tmp_path / "models/AnimateDiff/mm_sd_v15_v2.ckpt"))
    from diffsynth.testing.rife_files import write_rife_file

    os.makedirs(tmp_path / "models/RIFE", exist_ok=True)
    write_rife_file(str(tmp_path / "models/RIFE/flownet.pkl"))
    args = ("--frames", "4", "--height", "64", "--width", "96", "--image-steps", "1", "--video-steps", "1", "--device", "cpu")
    result = _run("sd_text_to_video.py", tmp_path, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "image.png").size == (96, 64)
    interpolated = sorted(os.listdir(tmp_path / "output/text_to_video/interpolated"))
    assert len(interpolated) == 8 * (4 - 1) + 1  # RIFE x8 between 4 frames
    assert os.path.getsize(tmp_path / "output/text_to_video/video.mp4") > 0


# ---------------------------------------------------------------------- Diffutoon and toon shading, in-process

VIDEO_EXAMPLES = ("diffutoon_toon_shading", "diffutoon_toon_shading_with_editing_signals", "sd_toon_shading")
TINY = ["--frames", "4", "--device", "cpu"]  # 4 frames of 64x64, 1 step: the configs' shape, at test size


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pngs(folder) -> np.ndarray:
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    return np.stack([np.asarray(Image.open(os.path.join(folder, n)).convert("RGB")) for n in names])


@pytest.fixture(scope="module")
def example_root(tmp_path_factory):
    """Tiny random-weight files at every path the three video examples document, and a 6-frame 64x64 clip."""
    root = tmp_path_factory.mktemp("example_root")
    paths = sorted({path for name in VIDEO_EXAMPLES for path in _load_example(name).MODEL_FILES})
    write_documented_models(str(root), paths)
    write_input_clip(str(root / "input.mp4"), frames=6, width=64, height=64)
    return root


@pytest.mark.parametrize("name", VIDEO_EXAMPLES)
def test_video_examples_import_without_side_effects(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = _load_example(name)
    assert callable(module.main) and module.MODEL_FILES
    assert os.listdir(tmp_path) == []  # nothing written, nothing loaded, no model files required at import
    with pytest.raises(FileNotFoundError, match="model file\\(s\\) missing") as missing:
        module.main(["--device", "cpu"])
    assert all(path in str(missing.value) and url in str(missing.value) for path, url in module.MODEL_FILES.items())


def test_diffutoon_toon_shading_example_runs(example_root, monkeypatch):
    monkeypatch.chdir(example_root)
    example = _load_example("diffutoon_toon_shading")
    template = copy.deepcopy(example.config)
    frames = example.main(["--video", "input.mp4", "--output", "toon", "--size", "64", "--steps", "1", *TINY])
    assert example.config == template  # the module's config is a template: runs use a deep copy
    assert len(frames) == 4 and frames[0].size == (64, 64)
    out = example_root / "toon"
    assert open(out / "last_process_id.txt").read() == "9" and os.path.getsize(out / "video.mp4") > 0
    saved = json.load(open(out / "config.json"))
    inputs = saved["pipeline"]["pipeline_inputs"]
    assert (inputs["prompt"], inputs["negative_prompt"], inputs["clip_skip"], inputs["num_inference_steps"]) == (
        template["pipeline"]["pipeline_inputs"]["prompt"], "verybadimagenegative_v1.3", 2, 1)
    assert [u["processor_id"] for u in saved["models"]["controlnet_units"]] == ["tile", "lineart"]
    assert saved["data"]["input_frames"]["end_frame_id"] == 4 and saved["data"]["input_frames"]["height"] == 64


def test_diffutoon_with_editing_signals_feeds_pass_1_into_pass_2s_tile_unit(example_root, monkeypatch):
    monkeypatch.chdir(example_root)
    example = _load_example("diffutoon_toon_shading_with_editing_signals")
    templates = copy.deepcopy((example.config_stage_1, example.config_stage_2))
    example.main(["--video", "input.mp4", "--output", "edit", "--edit-size", "64", "--size", "64",
                  "--edit-steps", "1", "--steps", "1", *TINY])
    assert (example.config_stage_1, example.config_stage_2) == templates  # deep copies, not the templates, were run
    color, toon = example_root / "edit" / "color_video", example_root / "edit" / "output"
    for out in (color, toon):
        assert open(out / "last_process_id.txt").read() == "9" and os.path.getsize(out / "video.mp4") > 0
    first, second = json.load(open(color / "config.json")), json.load(open(toon / "config.json"))
    # pass 1 is the editing-signal config (FastBlend on the final frames), pass 2 the toon config
    assert [u["processor_id"] for u in first["models"]["controlnet_units"]] == ["softedge", "depth"]
    assert first["smoother_configs"][0]["processor_type"] == "FastBlend"
    assert first["pipeline"]["pipeline_inputs"]["smoother_progress_ids"] == [-1]
    assert json.load(open(color / "manifest.json"))["stages"]["6"].get("skipped") is None  # the smoother ran
    assert [u["processor_id"] for u in second["models"]["controlnet_units"]] == ["tile", "lineart"]
    tile_spec = second["data"]["controlnet_frames"][0]
    # saved with absolute paths (the example ran in example_root with relative ones)
    assert tile_spec["video_file"] == str(example_root / "edit" / "color_video" / "video.mp4")
    assert (tile_spec["start_frame_id"], tile_spec["end_frame_id"]) == (None, None)
    assert second["data"]["controlnet_frames"][1]["video_file"] == str(example_root / "input.mp4")
    # the tile unit (an identity annotator) saw pass 1's video frames, the lineart unit the input video
    from diffsynth.data import VideoData

    color_frames = np.stack([np.asarray(f) for f in VideoData(video_file=str(color / "video.mp4"), height=64, width=64)])
    assert np.array_equal(_pngs(toon / "controlnet_caches" / "0"), color_frames)


def test_sd_toon_shading_example_runs(example_root, monkeypatch):
    monkeypatch.chdir(example_root)
    example = _load_example("sd_toon_shading")
    smoothed = example.main(["--video", "input.mp4", "--start", "1", "--size", "64", "--steps", "1",
                             "--output", "toon_native.mp4", "--work-folder", "toon_native", *TINY])
    from diffsynth.data import VideoData

    assert len(VideoData(video_file=str(example_root / "toon_native.mp4"))) == 4
    rendered = _pngs(example_root / "toon_native" / "frames")  # the pipeline's frames, before the smoother
    result = np.stack([np.asarray(f) for f in smoothed])
    assert rendered.shape == result.shape == (4, 64, 64, 3)
    # RIFE smoothing keeps the first and last frames and replaces the inner ones
    assert np.array_equal(result[0], rendered[0]) and np.array_equal(result[-1], rendered[-1])
    assert not np.array_equal(result[1:-1], rendered[1:-1])
