"""SDVideoPipelineRunner: the 10 stages, manifest and last_process_id, reuse and recompute by cache key, validation."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from diffsynth.pipelines.runner import SDVideoPipelineRunner
from diffsynth.testing.runner_files import write_tiny_project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return write_tiny_project(str(tmp_path_factory.mktemp("project")), frames=10, smoother=False)


def _run(config, counter=None):
    runner = SDVideoPipelineRunner(progress_bar_cmd=None)
    return runner.run(config)


def _frames(out):
    from PIL import Image

    names = sorted(os.listdir(os.path.join(out, "frames")))
    return np.stack([np.asarray(Image.open(os.path.join(out, "frames", n))) for n in names])


def _mtimes(folder):
    return {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in sorted(os.listdir(folder))}


def test_full_run_writes_every_stage_and_reruns_for_free(project, tmp_path):
    config = copy.deepcopy(project)
    out = str(tmp_path / "out")
    config["data"]["output_folder"] = out
    frames = _run(config)
    assert len(frames) == 10 and frames[0].size == (64, 64)
    assert open(os.path.join(out, "last_process_id.txt")).read() == "9"
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert [manifest["stages"][str(i)]["status"] for i in range(10)] == ["done"] * 10
    for folder in ("source_images", "controlnet_caches/0", "controlnet_caches/1", "frames"):
        assert len(os.listdir(os.path.join(out, folder))) == 10, folder
    assert os.path.getsize(os.path.join(out, "video.mp4")) > 0
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["pipeline"]["pipeline_inputs"]["input_frames"] == [] and saved["models"]["lora_alphas"] == []
    before = _mtimes(os.path.join(out, "frames"))
    _run(config)
    assert _mtimes(os.path.join(out, "frames")) == before  # nothing recomputed


def test_prompt_change_reuses_frames_and_annotations(project, tmp_path):
    config = copy.deepcopy(project)
    out = str(tmp_path / "out")
    config["data"]["output_folder"] = out
    _run(config)
    first = _frames(out)
    source, cn = _mtimes(os.path.join(out, "source_images")), _mtimes(os.path.join(out, "controlnet_caches", "0"))
    config["pipeline"]["pipeline_inputs"]["prompt"] = "a robot is dancing"
    _run(config)
    assert _mtimes(os.path.join(out, "source_images")) == source
    assert _mtimes(os.path.join(out, "controlnet_caches", "0")) == cn
    assert not np.array_equal(first, _frames(out))


def test_range_change_recomputes_everything(project, tmp_path):
    config = copy.deepcopy(project)
    out = str(tmp_path / "out")
    config["data"]["output_folder"] = out
    _run(config)
    for spec in [config["data"]["input_frames"], *config["data"]["controlnet_frames"]]:
        spec["start_frame_id"], spec["end_frame_id"] = 2, 8
    frames = _run(config)
    assert len(frames) == 6
    assert len(os.listdir(os.path.join(out, "source_images"))) == 6


def test_same_result_as_a_fresh_run_after_deleting_half_the_frames(project, tmp_path):
    config = copy.deepcopy(project)
    out = str(tmp_path / "out")
    config["data"]["output_folder"] = out
    _run(config)
    reference = _frames(out)
    for name in sorted(os.listdir(os.path.join(out, "frames")))[5:]:
        os.remove(os.path.join(out, "frames", name))
    os.remove(os.path.join(out, "video.mp4"))
    _run(config)
    assert np.array_equal(reference, _frames(out))


def test_inputs_are_validated_before_models_load(project, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(SDVideoPipelineRunner, "_load_pipeline", lambda self, config: calls.append(1))
    bad = copy.deepcopy(project)
    bad["data"]["input_frames"]["height"] = 70
    with pytest.raises(ValueError, match="multiple of 8.*nearest valid: 72"):
        _run(bad)
    bad = copy.deepcopy(project)
    bad["data"]["input_frames"]["start_frame_id"] = 50
    with pytest.raises(ValueError, match="data.input_frames: start_frame_id=50"):
        _run(bad)
    bad = copy.deepcopy(project)
    bad["data"]["input_frames"]["start_frame_id"], bad["data"]["input_frames"]["end_frame_id"] = 4, 4
    with pytest.raises(ValueError, match="holds no frames"):
        _run(bad)
    bad = copy.deepcopy(project)
    bad["data"]["controlnet_frames"][1]["end_frame_id"] = 5
    with pytest.raises(ValueError, match="same length"):
        _run(bad)
    bad = copy.deepcopy(project)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    bad["data"]["input_frames"]["video_file"] = str(broken)
    with pytest.raises(OSError, match="broken.mp4"):
        _run(bad)
    assert calls == []
