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


def test_manifest_of_the_first_releases_is_migrated_without_recomputing(project, monkeypatch):
    """Keys of the first manifests named files by absolute path and time; a rerun after upgrading reuses everything."""
    from diffsynth.cache.manifest import Manifest
    from diffsynth.pipelines.runner import SDVideoPipelineRunner

    out = os.path.join(project, "output")
    monkeypatch.chdir(project)  # the legacy identity resolved relative paths against the working directory
    runner = SDVideoPipelineRunner(progress_bar_cmd=None)
    plan = runner.prepare(_load(project), config_dir=project)
    legacy = runner.stage_keys(plan, legacy=True)
    assert legacy != runner.stage_keys(plan)
    manifest = Manifest(out)
    for sid in range(10):
        manifest.stage(sid)["key"] = legacy[sid]
    del manifest.data["identity"]
    manifest.save()
    before = _snapshot(out)
    result = _cli(["run", "config.json"], cwd=project)
    assert result.returncode == 0, result.stderr
    assert "cache keys upgraded to content identities (10 of 10 stages kept)" in result.stderr
    assert "nothing to do" in result.stderr
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k not in ("config.json", "manifest.json")} == \
           {k: v for k, v in before.items() if k not in ("config.json", "manifest.json")}
    assert not os.path.exists(os.path.join(out, "previous"))


def test_a_move_to_previous_killed_halfway_is_completed_by_the_next_run(project):
    from diffsynth.testing.controlnet_files import write_controlnet

    out = os.path.join(project, "output")
    before = _snapshot(out)
    write_controlnet(os.path.join(project, "models", "ControlNet", "control_tiny_tile.pth"), seed=9)
    # what a kill between two renames leaves: frames/ already in previous/.incoming, video.mp4 not yet
    incoming = os.path.join(out, "previous", ".incoming")
    os.makedirs(incoming)
    shutil.copy(os.path.join(out, "config.json"), incoming)
    os.replace(os.path.join(out, "frames"), os.path.join(incoming, "frames"))
    result = _cli(["run", "config.json"], cwd=project)
    assert result.returncode == 0, result.stderr
    (kept,) = os.listdir(os.path.join(out, "previous"))
    old = _snapshot(os.path.join(out, "previous", kept))
    for name, digest in before.items():
        if name.startswith("frames") or name in ("video.mp4", "config.json"):
            assert old[name] == digest, name


def test_an_annotator_file_of_the_wrong_kind_is_named(project):
    from diffsynth.pipelines.preflight import PreflightError
    from diffsynth.pipelines.runner import SDVideoPipelineRunner
    from diffsynth.testing.annotator_files import write_lineart_anime_file

    folder = os.path.join(project, "models", "Annotators")
    write_lineart_anime_file(os.path.join(folder, "sk_model.pth"))  # netG.pth's layout under lineart's name
    config = _load(project)
    config["models"]["controlnet_units"][1]["processor_id"] = "lineart"
    with pytest.raises(PreflightError) as info:
        SDVideoPipelineRunner(progress_bar_cmd=None).prepare(config, config_dir=project)
    message = str(info.value)
    assert "models.annotator_folder (lineart needs sk_model.pth)" in message
    assert "is a anime lineart annotator U-Net (Anime2Sketch), not the lineart annotator generator" in message.replace("an anime", "a anime")
    assert len(info.value.problems) == 1


def test_read_errors_are_not_reported_as_writing(tmp_path):
    from diffsynth.pipelines.runner import _io_error

    out = str(tmp_path / "out")
    outside = _io_error("stage 1 ControlNet annotations", out, FileNotFoundError(2, "No such file or directory", "/mnt/models/x.pth"))
    assert "while writing" not in str(outside) and "I/O error" not in str(outside)
    assert "/mnt/models/x.pth" in str(outside) and f"Nothing in {out} was lost" in str(outside)
    inside = _io_error("stage 5 VAE decode", out, PermissionError(13, "Permission denied", os.path.join(out, "frames", "000001.png")))
    assert "I/O error in the output folder" in str(inside) and "000001.png" in str(inside)


def test_content_identity_follows_content_not_place(tmp_path, monkeypatch):
    from diffsynth.cache import identity

    data = bytes(range(256)) * 4096  # 1 MiB: sampled, not hashed whole
    a = tmp_path / "a" / "model.safetensors"
    b = tmp_path / "b" / "renamed.safetensors"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(data)
    os.utime(b, (1_000_000_000, 1_000_000_000))
    assert identity.content_identity(str(a)) == identity.content_identity(str(b))
    changed = bytearray(data)
    changed[64 * 1024 + (len(data) - 128 * 1024) // 9] ^= 0xFF  # inside the first sampled block
    b.write_bytes(bytes(changed))
    assert identity.content_identity(str(a)) != identity.content_identity(str(b))
    with pytest.raises(FileNotFoundError):
        identity.content_identity(str(tmp_path / "missing.safetensors"))
    # an unchanged file (path, size, mtime) is read once: the fingerprint comes from the memo afterwards
    calls = []
    real = identity._sampled_sha256
    monkeypatch.setattr(identity, "_sampled_sha256", lambda p, s: calls.append(p) or real(p, s))
    c = tmp_path / "c.bin"
    c.write_bytes(data)
    first = identity.content_identity(str(c))
    identity.save_fingerprints()
    assert identity.content_identity(str(c)) == first and calls == [str(c)]
    with open(os.path.join(os.environ["DIFFSYNTH_CACHE_DIR"], "file_fingerprints.json"), encoding="utf-8") as f:
        assert str(c) in json.load(f)["entries"]


def test_cli_version_info_on_annotator_files_and_download_names(tmp_path):
    from diffsynth import __version__
    from diffsynth.download import lookup
    from diffsynth.testing.annotator_files import write_hed_file
    from diffsynth.testing.openpose_files import write_openpose_files

    result = _cli(["--version"], cwd=str(tmp_path))
    assert result.returncode == 0 and f"diffsynth {__version__}" in result.stdout
    hed = write_hed_file(str(tmp_path / "ControlNetHED.pth"))
    info = _cli(["info", hed], cwd=str(tmp_path))
    assert info.returncode == 0, info.stderr
    assert "soft edge annotator (HED)" in info.stdout and "'softedge'" in info.stdout
    face = write_openpose_files(str(tmp_path / "pose"))["face"]
    assert "OpenPose face network" in _cli(["info", face], cwd=str(tmp_path)).stdout
    for name in ("ControlNet/control_v11p_sd15_lineart.pth", "models/ControlNet/control_v11p_sd15_lineart.pth", "control_v11p_sd15_lineart"):
        assert lookup(name).filename == "control_v11p_sd15_lineart.pth"
    with pytest.raises(KeyError, match="belongs in ControlNet/, not Annotators/"):
        lookup("Annotators/control_v11p_sd15_lineart.pth")


def test_to_the_end_of_a_video_whose_header_lies_warns_once_and_counts(project):
    """A header that promises more frames than decode: one warning (though three specs read the file) and the count in the summary."""
    import imageio_ffmpeg
    import numpy as np

    full = os.path.join(project, "full.mp4")
    writer = imageio_ffmpeg.write_frames(full, (64, 64), fps=8, quality=8, macro_block_size=1,
                                         output_params=["-movflags", "+faststart", "-bf", "0"])
    writer.send(None)
    rng = np.random.default_rng(0)
    for _ in range(40):
        writer.send(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8).tobytes())
    writer.close()
    with open(full, "rb") as f:
        data = f.read()
    with open(os.path.join(project, "cut.mp4"), "wb") as f:
        f.write(data[: int(len(data) * 0.6)])
    config = _load(project)
    for spec in [config["data"]["input_frames"], *config["data"]["controlnet_frames"]]:
        spec.update(video_file="cut.mp4", end_frame_id=None)
    config["data"]["output_folder"] = "cut_output"
    _save(project, config)
    result = _cli(["run", "config.json"], cwd=project)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("header suggests about 40 frames") == 1, result.stderr
    rendered = len(os.listdir(os.path.join(project, "cut_output", "frames")))
    assert 0 < rendered < 40 and f"done: {rendered} frames in" in result.stdout


def test_output_folder_option_overrides_the_config(project, tmp_path):
    other = tmp_path / "second_render"
    result = _cli(["run", "config.json", "--output-folder", str(other)], cwd=project)
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(other / "frames")) == FRAMES and (other / "video.mp4").is_file()
    assert _load(str(other))["data"]["output_folder"] == str(other)
    assert _snapshot(other / "frames") == _snapshot(os.path.join(project, "output", "frames"))  # same config, same frames
