"""A rerun never destroys finished work: pre-flight checks, safe invalidation, stable paths, clear errors.

Each scenario runs ``python -m diffsynth`` in a real subprocess on a copy of one finished
render whose config uses relative ``models/...`` paths, as the examples do, and checks that
a failing rerun leaves every file of the render byte-identical.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from diffsynth.testing.runner_files import write_tiny_project

FRAMES = 6


def _cli(args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "diffsynth", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def _snapshot(folder) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _relative(config: dict, root: str) -> dict:
    """The config with every path under ``root`` written relative to it (as the examples write ``models/...``)."""
    return json.loads(json.dumps(config).replace(root.rstrip("/") + "/", ""))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A project folder (config.json with relative paths, models/, input.mp4) rendered to the end by a subprocess."""
    root = str(tmp_path_factory.mktemp("finished_project"))
    config = write_tiny_project(root, frames=FRAMES, smoother=True, steps=2)
    config["pipeline"]["pipeline_inputs"].update(animatediff_batch_size=4, animatediff_stride=2)
    with open(os.path.join(root, "config.json"), "w", encoding="utf-8") as f:
        json.dump(_relative(config, root), f, indent=1)
    result = _cli(["run", "config.json"], cwd=root)
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(os.path.join(root, "output", "frames"))) == FRAMES
    return root


@pytest.fixture
def project(finished, tmp_path):
    """A private copy of the finished project (times kept) and its output snapshot."""
    root = str(tmp_path / "project")
    shutil.copytree(finished, root)
    return root


def _load(root):
    with open(os.path.join(root, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def _save(root, config, name="config.json"):
    with open(os.path.join(root, name), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)


def _assert_untouched(result, root, before):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert _snapshot(os.path.join(root, "output")) == before


def test_renamed_models_folder_is_an_error_that_changes_nothing(project):
    before = _snapshot(os.path.join(project, "output"))
    os.rename(os.path.join(project, "models"), os.path.join(project, "models_unmounted"))
    result = _cli(["run", "config.json"], cwd=project)
    _assert_untouched(result, project, before)
    err = result.stderr
    # every missing file, each with its key, the path as written and the remedy, in one message
    for i in range(4):
        assert f"models.model_list[{i}]: model file not found" in err
    assert "models.textual_inversion_folder: folder not found" in err
    assert "path as written: models/stable_diffusion/tiny_sd15.safetensors" in err
    assert os.path.join(project, "models", "stable_diffusion", "tiny_sd15.safetensors") in err
    assert "I/O error" not in err and "while writing" not in err
    # the drive is back: nothing to do, nothing changed but the saved config's timestamp-free content
    os.rename(os.path.join(project, "models_unmounted"), os.path.join(project, "models"))
    result = _cli(["run", "config.json"], cwd=project)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stderr
    after = _snapshot(os.path.join(project, "output"))
    assert {k: v for k, v in after.items() if k != "config.json"} == {k: v for k, v in before.items() if k != "config.json"}


def test_relative_paths_from_another_working_directory(project, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = _snapshot(os.path.join(project, "output"))
    result = _cli(["run", os.path.join(project, "config.json")], cwd=str(elsewhere))
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stderr
    assert not os.path.exists(elsewhere / "output")  # the output folder resolved next to the config, where it exists
    after = _snapshot(os.path.join(project, "output"))
    assert {k: v for k, v in after.items() if k != "config.json"} == {k: v for k, v in before.items() if k != "config.json"}
    # OUT/config.json records absolute paths: it runs, and status checks keys, from anywhere
    saved = _load(os.path.join(project, "output"))
    assert all(os.path.isabs(p) for p in saved["models"]["model_list"])
    assert os.path.isabs(saved["data"]["input_frames"]["video_file"]) and os.path.isabs(saved["data"]["output_folder"])
    status = _cli(["status", os.path.join(project, "output")], cwd=str(elsewhere))
    assert status.returncode == 0, status.stderr
    rows = [line.split() for line in status.stdout.splitlines() if line[:2].strip().isdigit()]
    assert len(rows) == 10 and all("done" in row and "valid" in row for row in rows), status.stdout
    assert "stale" not in status.stdout and "to continue" not in status.stdout
    again = _cli(["run", os.path.join(project, "output", "config.json")], cwd=str(elsewhere))
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr


def test_moved_and_redownloaded_models_reuse_everything(project, tmp_path):
    before = _snapshot(os.path.join(project, "output"))
    moved = tmp_path / "other_drive" / "models"
    shutil.move(os.path.join(project, "models"), moved)
    sd = moved / "stable_diffusion" / "tiny_sd15.safetensors"
    data = sd.read_bytes()  # "downloaded again": same bytes, a new file with a new time
    sd.unlink()
    sd.write_bytes(data)
    os.utime(sd, (1_900_000_000, 1_900_000_000))
    config = _load(project)
    config["models"]["model_list"] = [str(tmp_path / "other_drive" / p) for p in config["models"]["model_list"]]
    for unit in config["models"]["controlnet_units"]:
        unit["model_path"] = str(tmp_path / "other_drive" / unit["model_path"])
    config["models"]["textual_inversion_folder"] = str(moved / "textual_inversion")
    _save(project, config)
    result = _cli(["run", "config.json"], cwd=project)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stderr
    after = _snapshot(os.path.join(project, "output"))
    assert {k: v for k, v in after.items() if k != "config.json"} == {k: v for k, v in before.items() if k != "config.json"}


def test_a_real_model_change_keeps_the_old_render_in_previous(project):
    from diffsynth.testing.controlnet_files import write_controlnet

    out = os.path.join(project, "output")
    before = _snapshot(out)
    write_controlnet(os.path.join(project, "models", "ControlNet", "control_tiny_tile.pth"), seed=7)  # different weights
    result = _cli(["run", "config.json"], cwd=project)
    assert result.returncode == 0, result.stderr
    assert "was moved, not deleted" in result.stderr
    kept = [d for d in os.listdir(os.path.join(out, "previous"))]
    assert len(kept) == 1
    previous = os.path.join(out, "previous", kept[0])
    old = _snapshot(previous)
    for name, digest in before.items():  # the finished render, byte for byte, with the config and manifest that made it
        if name.startswith("frames") or name in ("video.mp4", "config.json", "manifest.json"):
            assert old[name] == digest, name
    new = _snapshot(out)
    assert len([n for n in new if n.startswith("frames" + os.sep)]) == FRAMES
    assert any(new[f"frames{os.sep}{i:06d}.png"] != before[f"frames{os.sep}{i:06d}.png"] for i in range(FRAMES))
    assert "source_images" + os.sep + "000000.png" in new  # stage 0 did not depend on the ControlNet: reused
    status = _cli(["status", out], cwd=project)
    assert "previous render kept: " + previous in status.stdout
    # a second real change: one generation is kept, the newest
    write_controlnet(os.path.join(project, "models", "ControlNet", "control_tiny_tile.pth"), seed=8)
    result = _cli(["run", "config.json"], cwd=project)
    assert result.returncode == 0, result.stderr
    kept2 = os.listdir(os.path.join(out, "previous"))
    assert len(kept2) == 1
    assert _snapshot(os.path.join(out, "previous", kept2[0]))[f"frames{os.sep}000000.png"] == new[f"frames{os.sep}000000.png"]
    clean = _cli(["clean", out, "--previous"], cwd=project)
    assert clean.returncode == 0 and not os.path.exists(os.path.join(out, "previous"))
    assert len(os.listdir(os.path.join(out, "frames"))) == FRAMES and os.path.isfile(os.path.join(out, "video.mp4"))


@pytest.mark.parametrize("content", [b"", b"this is a text file, not a video\n"], ids=["zero-byte", "text"])
def test_unreadable_input_video_is_one_clear_line(project, content):
    before = _snapshot(os.path.join(project, "output"))
    with open(os.path.join(project, "input.mp4"), "wb") as f:
        f.write(content)
    result = _cli(["run", "config.json"], cwd=project)
    _assert_untouched(result, project, before)
    lines = [line for line in result.stderr.splitlines() if "data.input_frames.video_file" in line]
    assert lines and "ffmpeg cannot read it as a video" in lines[0]
    assert "Invalid data found when processing input" in lines[0] or "moov atom not found" in lines[0]
    assert "ffmpeg version" not in result.stderr and "configuration:" not in result.stderr


def test_a_range_past_the_readable_end_names_the_count(project):
    before = _snapshot(os.path.join(project, "output"))
    config = _load(project)
    config["data"]["input_frames"]["end_frame_id"] = 50
    _save(project, config)
    result = _cli(["run", "config.json"], cwd=project)
    _assert_untouched(result, project, before)
    assert "data.input_frames.end_frame_id: is 50, past the readable end" in result.stderr
    assert f"it has {FRAMES} readable frames" in result.stderr
    assert f"set end_frame_id to {FRAMES} or less" in result.stderr


def test_to_the_end_renders_what_is_readable_and_says_how_many(project):
    config = _load(project)
    for spec in [config["data"]["input_frames"], *config["data"]["controlnet_frames"]]:
        spec["end_frame_id"] = None
    _save(project, config)
    result = _cli(["run", "config.json"], cwd=project)
    assert result.returncode == 0, result.stderr
    assert f"done: {FRAMES} frames in" in result.stdout
    assert "nothing to do" in result.stderr  # the same frames: ranges are keyed by the frames they select


def test_every_problem_is_reported_together(project):
    before = _snapshot(os.path.join(project, "output"))
    config = _load(project)
    config["models"]["model_list"][1] = "models/AnimateDiff/missing_motion_module.ckpt"
    config["models"]["controlnet_units"].append({"processor_id": "lineart", "model_path": "models/ControlNet/control_tiny_tile.pth", "scale": 0.5})
    config["data"]["controlnet_frames"].append(dict(config["data"]["input_frames"]))
    config["data"]["input_frames"]["height"] = 60
    config["models"]["lora_alphas"] = [0.5]
    _save(project, config)
    result = _cli(["run", "config.json"], cwd=project)
    _assert_untouched(result, project, before)
    err = result.stderr
    assert "models.model_list[1]: model file not found" in err
    assert "annotator weight file sk_model.pth not found" in err and "https://huggingface.co/lllyasviel/Annotators/resolve/main/sk_model.pth" in err
    assert "data.input_frames.height: must be a positive multiple of 8, got 60; nearest valid: 64" in err
    assert "models.lora_alphas" not in err  # the list is judged only once every entry is recognised
    assert err.count("\n     fix: ") >= 3


def test_clear_output_folder_keeps_the_finished_render(project):
    out = os.path.join(project, "output")
    before = _snapshot(out)
    config = _load(project)
    config["data"]["clear_output_folder"] = True
    _save(project, config)
    result = _cli(["run", "config.json"], cwd=project)
    assert result.returncode == 0, result.stderr
    (kept,) = os.listdir(os.path.join(out, "previous"))
    old = _snapshot(os.path.join(out, "previous", kept))
    assert all(old[name] == digest for name, digest in before.items() if name.startswith("frames") or name == "video.mp4")


def test_clear_output_folder_refuses_a_folder_that_is_not_a_render(project, tmp_path):
    foreign = tmp_path / "my_videos"
    foreign.mkdir()
    (foreign / "holiday.mp4").write_bytes(b"precious")
    config = _load(project)
    config["data"]["clear_output_folder"] = True
    config["data"]["output_folder"] = str(foreign)
    _save(project, config)
    result = _cli(["run", "config.json"], cwd=project)
    assert result.returncode != 0
    assert "data.clear_output_folder" in result.stderr and "would delete everything in it" in result.stderr
    assert (foreign / "holiday.mp4").read_bytes() == b"precious" and os.listdir(foreign) == ["holiday.mp4"]
