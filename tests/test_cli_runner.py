"""The command line of the video runner: ``diffsynth run | status | clean | demo``."""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.cli import main
from diffsynth.testing.runner_files import write_tiny_project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    config = write_tiny_project(str(tmp_path_factory.mktemp("cli_project")), frames=6, smoother=False, steps=2)
    config["pipeline"]["pipeline_inputs"].update(animatediff_batch_size=4, animatediff_stride=2)
    return config


def _write_config(config, path, out) -> str:
    config = copy.deepcopy(config)
    config["data"]["output_folder"] = str(out)
    with open(path, "w", encoding="utf-8") as f:
        if str(path).endswith(".json"):
            json.dump(config, f)
        else:
            import yaml

            yaml.safe_dump(config, f)
    return str(path)


@pytest.fixture(scope="module")
def rendered(project, tmp_path_factory):
    """A complete render made with ``diffsynth run``: (config path, output folder)."""
    folder = tmp_path_factory.mktemp("rendered")
    path = _write_config(project, folder / "config.json", folder / "out")
    assert main(["run", path]) == 0
    return path, str(folder / "out")


def _mtimes(folder):
    return {os.path.relpath(os.path.join(r, f), folder): os.stat(os.path.join(r, f)).st_mtime_ns
            for r, _, files in os.walk(folder) for f in files}


def _rows(text):
    """``{stage id: row fields}`` of a printed stage table."""
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0].isdigit() and len(parts) > 3:
            rows[int(parts[0])] = line
    return rows


def _copy_render(rendered, project, tmp_path):
    """The rendered output copied elsewhere (times kept), and a config pointing at the copy."""
    out = tmp_path / "out"
    shutil.copytree(rendered[1], out)
    return _write_config(project, tmp_path / "config.json", out), str(out)


# ---------------------------------------------------------------------- run


def test_run_renders_and_yaml_is_the_same_config(rendered, project, tmp_path, capsys):
    path, out = rendered
    assert len(os.listdir(os.path.join(out, "frames"))) == 6 and os.path.getsize(os.path.join(out, "video.mp4")) > 0
    assert open(os.path.join(out, "last_process_id.txt")).read() == "9"
    json_path, copy_out = _copy_render(rendered, project, tmp_path)
    yaml_path = _write_config(project, tmp_path / "config.yaml", copy_out)
    before = _mtimes(copy_out)
    capsys.readouterr()
    assert main(["run", yaml_path]) == 0  # same keys as the JSON config: nothing to recompute
    after = _mtimes(copy_out)
    after.pop("config.json"), before.pop("config.json")
    assert after == before
    assert "done:" in capsys.readouterr().out


def test_run_config_errors_are_messages(tmp_path, project, monkeypatch, capsys):
    bad = tmp_path / "config.txt"
    bad.write_text("{}")
    assert main(["run", str(bad)]) == 2
    assert ".json or .yaml" in capsys.readouterr().err
    not_runner = tmp_path / "other.json"
    not_runner.write_text(json.dumps({"models": {}}))
    assert main(["run", str(not_runner)]) == 2
    assert "models, data and pipeline" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["run", str(broken)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    path = _write_config(project, tmp_path / "config.yaml", tmp_path / "out")
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML not installed
    assert main(["run", path]) == 2
    assert "pip install pyyaml" in capsys.readouterr().err
    monkeypatch.undo()
    config = copy.deepcopy(project)
    config["data"]["input_frames"]["height"] = 58
    assert main(["run", _write_config(config, tmp_path / "size.json", tmp_path / "out")]) == 2
    assert "nearest valid: 56" in capsys.readouterr().err  # input errors come before any model loads


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_stopped_run_exits_1_with_the_runners_message(project, tmp_path, capsys):
    config = copy.deepcopy(project)
    config["models"]["device"] = "cuda"
    assert main(["run", _write_config(config, tmp_path / "c.json", tmp_path / "out")]) == 1
    assert "no CUDA device" in capsys.readouterr().err


def test_ctrl_c_stops_cleanly_and_status_shows_where_the_rerun_continues(project, tmp_path, capsys):
    """A real ``diffsynth run`` process interrupted with SIGINT (Ctrl-C) once stage 0 is done, then status, then resume."""
    out = str(tmp_path / "out")
    path = _write_config(project, tmp_path / "config.json", out)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # A shell that starts a job with `&` (as CI may) makes it ignore SIGINT, and Python keeps an ignored SIGINT
    # ignored; the child restores Ctrl-C's usual meaning so this test does not depend on how it was started.
    child = "import signal, sys, torch; signal.signal(signal.SIGINT, signal.default_int_handler); torch.set_num_threads(1); from diffsynth.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", child, "run", path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    manifest = os.path.join(out, "manifest.json")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.load(open(manifest))["stages"]["0"]["status"] == "done":
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout, stderr)
    assert "interrupted" in stderr and f"diffsynth run {path}` again" in stderr, stderr
    assert "Traceback" not in stderr

    capsys.readouterr()
    assert main(["status", out]) == 0
    text = capsys.readouterr().out
    rows = _rows(text)
    assert "done" in rows[0] and "6/6" in rows[0] and "valid" in rows[0], text
    assert all("done" not in rows[s] for s in range(5, 10)), text
    assert "diffsynth run" in text  # says how to continue

    changed = copy.deepcopy(project)
    changed["data"]["output_folder"] = out
    changed["data"]["input_frames"]["end_frame_id"] = 5
    for spec in changed["data"]["controlnet_frames"]:
        spec["end_frame_id"] = 5
    other = tmp_path / "changed.json"
    other.write_text(json.dumps(changed))
    assert main(["status", out, "--config", str(other)]) == 0
    assert "stale" in _rows(capsys.readouterr().out)[0]

    assert main(["run", path]) == 0
    capsys.readouterr()
    assert main(["status", out]) == 0
    text = capsys.readouterr().out
    rows = _rows(text)
    assert all("done" in rows[s] and "valid" in rows[s] for s in range(10)), text
    assert "6/6" in rows[5] and "2/2 steps" in rows[4], text
    assert "diffsynth run" not in text


# ---------------------------------------------------------------------- status and clean


def test_status_of_a_partial_render(project, tmp_path, capsys):
    """Stopped inside denoising (an exception from the progress callback): stage 4 partial with its step and frames."""
    from diffsynth.pipelines.runner import SDVideoPipelineRunner

    class Stop(Exception):
        pass

    seen = []

    def stop_after_first_window(event):
        seen.append(event.stage)
        if seen.count("4 denoising") == 2:
            raise Stop

    config = copy.deepcopy(project)
    out = str(tmp_path / "out")
    config["data"]["output_folder"] = out
    with pytest.raises(Stop):
        SDVideoPipelineRunner(progress_bar_cmd=None, progress_callback=stop_after_first_window).run(config)
    assert main(["status", out]) == 0
    rows = _rows(capsys.readouterr().out)
    assert "partial" in rows[4] and "0/2 steps, 2/6 of step 1" in rows[4], rows[4]
    assert "pending" in rows[5] and "pending" in rows[9]
    assert "done" in rows[1] and "12/12" in rows[1] and "valid" in rows[1]

    config["data"]["input_frames"]["video_file"] = str(tmp_path / "moved.mp4")  # the input is gone: keys cannot be checked
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(config))
    assert main(["status", out, "--config", str(moved)]) == 0
    text = capsys.readouterr().out
    assert "keys not checked" in text and "moved.mp4" in text
    assert "done" in _rows(text)[0] and "6/6" in _rows(text)[0]  # the frame count comes from the manifest then


def test_clean_keep_final_keeps_a_complete_render(rendered, project, tmp_path, capsys):
    path, out = _copy_render(rendered, project, tmp_path)
    frames = _mtimes(os.path.join(out, "frames"))
    video = os.stat(os.path.join(out, "video.mp4")).st_mtime_ns
    assert main(["clean", out, "--keep-final"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "frames", "last_process_id.txt", "manifest.json", "video.mp4"]
    assert "freed" in capsys.readouterr().out
    assert main(["run", path]) == 0  # still complete: nothing is recomputed
    assert _mtimes(os.path.join(out, "frames")) == frames and os.stat(os.path.join(out, "video.mp4")).st_mtime_ns == video
    capsys.readouterr()
    assert main(["status", out]) == 0
    rows = _rows(capsys.readouterr().out)
    assert "done" in rows[9] and "done" in rows[0] and "deleted" in rows[0]

    assert main(["clean", out]) == 0
    assert os.listdir(out) == ["config.json"]
    capsys.readouterr()
    assert main(["status", out]) == 0
    rows = _rows(capsys.readouterr().out)
    assert all("pending" in rows[s] for s in range(10))


def test_clean_refuses_a_folder_that_is_not_a_render(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    (tmp_path / "frames").mkdir()
    assert main(["clean", str(tmp_path)]) == 2
    assert "not a runner output folder" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["frames", "precious.txt"]
    assert main(["status", str(tmp_path)]) == 2


# ---------------------------------------------------------------------- demo


def test_demo_runs_the_ten_stages_and_a_rerun_resumes(tmp_path, capsys):
    png = tmp_path / "demo" / "demo.png"
    args = ["demo", "--out", str(png), "--frames", "6", "--steps", "2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "NOT ART" in text and "Ctrl-C" in text and "diffsynth demo" in text
    rows = _rows(text)
    assert sorted(rows) == list(range(10)) and all("done" in r for r in rows.values()), text
    image = np.asarray(Image.open(png))
    assert image.shape == (64, 64, 3) and image.std() > 0
    out = tmp_path / "demo" / "output"
    assert np.array_equal(image, np.asarray(Image.open(out / "frames" / "000000.png")))
    models = _mtimes(tmp_path / "demo" / "models")
    frames = _mtimes(out / "frames")
    assert main(args) == 0  # the project is reused (same model files), so the render is complete already
    assert _mtimes(tmp_path / "demo" / "models") == models and _mtimes(out / "frames") == frames
