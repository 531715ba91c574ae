"""Crash safety of SDVideoPipelineRunner (DESIGN §3 and §5): real processes killed with SIGKILL, then rerun.

Every child is a separate process forked from a pre-imported server
(``diffsynth.testing.crash_child.ForkServer``); it kills itself at a progress event of a
given stage or right after the k-th UNet forward call. The rerun is a plain run of the
same config. Each resumed output (PNG bytes of ``frames/`` and the decoded frames of
``video.mp4``) must equal an uninterrupted run's, and the UNet calls of the killed run
plus the rerun may exceed the uninterrupted run's by at most one window (2 calls with
classifier-free guidance). Also: an injected full disk (ENOSPC), corrupt cache files
and changed configs.

Project: ``write_tiny_project`` (SD 1.x, AnimateDiff, 2 ControlNet units, FastBlend on the final
frames) with 8 frames of 64x64, 2 steps, AnimateDiff windows of 4 with stride 2, so each step is
3 windows ([0,4) [2,6) [4,8)) of 2 UNet calls: UNet calls 1-6 are step 1, 7-12 step 2.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import signal
from dataclasses import dataclass

import numpy as np
import pytest

from diffsynth.utils.sizes import human_bytes
from diffsynth.testing.runner_files import write_tiny_project
from diffsynth.utils.atomic import is_temp_name

WINDOW_CALLS = 2  # a positive and a negative UNet call per window (cfg_scale != 1)
CALLS_PER_STEP = 3 * WINDOW_CALLS


# ---------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    config = write_tiny_project(str(tmp_path_factory.mktemp("crash_project")), frames=8, smoother=True, steps=2)
    config["pipeline"]["pipeline_inputs"].update(animatediff_batch_size=4, animatediff_stride=2, unet_batch_size=4, controlnet_batch_size=4)
    return config


@dataclass
class Render:
    rc: int
    log: str
    unet_calls: int


def _render(server, config, out, *kill) -> Render:
    """Run ``config`` into ``out`` in a child (killed as ``kill`` says); return its exit code, log and UNet calls."""
    config = copy.deepcopy(config)
    config["data"]["output_folder"] = str(out)
    work = f"{out}.child"
    os.makedirs(work, exist_ok=True)
    n = len([f for f in os.listdir(work) if f.endswith(".json")])
    path, unet_log, log = (os.path.join(work, f"run{n}{ext}") for ext in (".json", ".unet", ".log"))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    result = server.run([path, "--unet-log", unet_log, *kill], log)
    calls = os.path.getsize(unet_log) if os.path.exists(unet_log) else 0
    return Render(result.rc, result.log, calls)


def _frame_bytes(out) -> dict[str, bytes]:
    folder = os.path.join(out, "frames")
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def _video_frames(out) -> np.ndarray:
    from diffsynth.data import VideoData

    return np.stack([np.asarray(frame) for frame in VideoData(video_file=os.path.join(out, "video.mp4"))])


def _last_done(out) -> int:
    path = os.path.join(out, "last_process_id.txt")
    return int(open(path).read()) if os.path.exists(path) else -1


def _temp_files(out) -> list[str]:
    return [os.path.join(root, name) for root, dirs, files in os.walk(out) for name in files + dirs if is_temp_name(name)]


def _tree_state(out) -> dict[str, tuple[int, str]]:
    """mtime and content hash of every file: what "nothing was recomputed" compares."""
    state = {}
    for root, _, files in os.walk(out):
        for name in files:
            path = os.path.join(root, name)
            state[os.path.relpath(path, out)] = (os.stat(path).st_mtime_ns, hashlib.sha256(open(path, "rb").read()).hexdigest())
    return state


def _files(out) -> set[str]:
    return {os.path.relpath(os.path.join(root, name), out) for root, _, files in os.walk(out) for name in files}


@dataclass
class Reference:
    out: str
    frames: dict[str, bytes]
    video: np.ndarray
    unet_calls: int
    files: set[str]


@pytest.fixture(scope="module")
def reference(server, project, tmp_path_factory) -> Reference:
    """One uninterrupted run per module, which every resumed run must reproduce."""
    out = str(tmp_path_factory.mktemp("reference") / "out")
    run = _render(server, project, out)
    assert run.rc == 0, run.log
    assert run.unet_calls == 2 * CALLS_PER_STEP, run.log
    assert "12 UNet calls, 0 with an autograd graph" in run.log, run.log  # a graph would hold every activation (bounded memory)
    assert _last_done(out) == 9
    return Reference(out, _frame_bytes(out), _video_frames(out), run.unet_calls, _files(out))


def _assert_same_output(out, reference: Reference) -> None:
    assert _last_done(out) == 9
    frames = _frame_bytes(out)
    assert list(frames) == list(reference.frames)
    differing = [name for name in frames if frames[name] != reference.frames[name]]
    assert not differing, f"frames differ from the uninterrupted run's: {differing}"
    assert np.array_equal(_video_frames(out), reference.video), "video.mp4 decodes to other frames than the uninterrupted run's"
    assert not _temp_files(out), _temp_files(out)
    assert _files(out) == reference.files, f"left behind: {sorted(_files(out) - reference.files)}, missing: {sorted(reference.files - _files(out))}"


# ---------------------------------------------------------------------- kill anywhere, rerun, same result


@dataclass(frozen=True)
class KillPoint:
    id: str
    name: str
    kill: tuple[str, ...]
    last_done: int  # last_process_id.txt right after the kill: proves the kill landed in the stage named
    denoising: bool = False  # may cost repeated UNet calls (at most one window's)
    slow: bool = False  # covered in kind by another point: run with `-m slow`


def _at_event(stage: int, n: int) -> tuple[str, ...]:
    return ("--kill-at-event", f"{stage}:{n}")


def _after_unet(k: int) -> tuple[str, ...]:
    return ("--kill-after-unet", str(k))


# The first event of a stage announces it; each later one follows a finished unit
# (a frame; a window in stage 4, after the window's journal commit).
KILL_POINTS = [
    KillPoint("0-source", "0 source frames: after 3 frames", _at_event(0, 4), -1),
    KillPoint("1-annotations", "1 annotations: after 6 of 16 images", _at_event(1, 7), 0),
    KillPoint("2-prompt", "2 prompt embeddings: before encoding", _at_event(2, 1), 1),
    KillPoint("3-latents", "3 initial latents: after 3 frames", _at_event(3, 4), 2),
    KillPoint("4-mid-window", "4 denoising: mid-window (after its positive UNet call)", _after_unet(3), 3, denoising=True),
    KillPoint("4-between-windows", "4 denoising: between windows (after a commit)", _at_event(4, 2), 3, denoising=True),
    KillPoint("4-between-steps", "4 denoising: between steps (step 1's last window committed)", _at_event(4, 4), 3, denoising=True),
    KillPoint("4-step-2-first-call", "4 denoising: first UNet call of step 2", _after_unet(CALLS_PER_STEP + 1), 3, denoising=True, slow=True),
    KillPoint("5-decode", "5 VAE decode: after 3 frames", _at_event(5, 4), 4),
    # FastBlend's fast mode is stages 6-7 (left pass; right pass merging each frame into smoother/blended),
    # each reporting per frame, so a kill there resumes; stage 8 writes frames/, also per frame.
    KillPoint("6-smoother-left", "6 smoother left pass: after 3 frames", _at_event(6, 4), 5),
    KillPoint("7-smoother-right", "7 smoother right pass + merge: after 3 frames", _at_event(7, 4), 6),
    KillPoint("7-smoother-right-last", "7 smoother right pass + merge: after 7 of 8 frames", _at_event(7, 8), 6, slow=True),
    # FastBlend alone merges every frame straight into frames/ in stage 7: stage 8 only records that (no copy to kill).
    KillPoint("8-smoother-output", "8 smoother output: announced, every frame merged into frames/, not yet recorded", _at_event(8, 1), 7),
    KillPoint("7-smoother-timed", "7 smoother right pass + merge: 0.05 s in (an arbitrary instant)", ("--kill-in-stage", "7:0.05"), 6, slow=True),
    KillPoint("9-video", "9 video encode: after 3 frames sent to ffmpeg", _at_event(9, 4), 8),
]


@pytest.mark.parametrize("point", [pytest.param(p, id=p.id, marks=[pytest.mark.slow] if p.slow else []) for p in KILL_POINTS])
def test_a_kill_anywhere_then_a_rerun_gives_the_uninterrupted_output(point, server, project, reference, tmp_path):
    out = str(tmp_path / "out")
    killed = _render(server, project, out, *point.kill)
    assert killed.rc == -signal.SIGKILL, f"the child was not killed at {point.name}: {killed.log}"
    assert _last_done(out) == point.last_done, f"the kill did not land in the intended stage ({point.name})"
    json.load(open(os.path.join(out, "manifest.json")))  # the journal is always valid JSON
    resumed = _render(server, project, out)
    assert resumed.rc == 0, resumed.log
    _assert_same_output(out, reference)
    extra = killed.unet_calls + resumed.unet_calls - reference.unet_calls
    # a kill loses at most the window being computed; outside denoising it loses no UNet work at all
    assert extra <= (WINDOW_CALLS if point.denoising else 0), (point.name, killed.unet_calls, resumed.unet_calls)


def test_two_kills_in_one_step_each_lose_at_most_their_window(server, project, reference, tmp_path):
    """Kill when a window is computed but not committed (the most a kill can lose), resume, kill again
    inside the resumed part of the same step: the journal chains."""
    out = str(tmp_path / "out")
    first = _render(server, project, out, *_after_unet(4))  # window 2 of step 1 computed, not yet committed
    second = _render(server, project, out, *_after_unet(3))  # resumed at window 2: killed inside window 3
    assert first.rc == second.rc == -signal.SIGKILL, (first.log, second.log)
    last = _render(server, project, out)
    assert last.rc == 0, last.log
    _assert_same_output(out, reference)
    assert first.unet_calls + second.unet_calls + last.unet_calls - reference.unet_calls <= 2 * WINDOW_CALLS


def test_a_kill_inside_a_smoothed_denoising_step_loses_at_most_one_window(server, project, tmp_path):
    """FastBlend inside the loop at step 2 (``smoother_progress_ids: [1, -1]``): its x0 pass is journalled per window too."""
    config = copy.deepcopy(project)
    config["pipeline"]["pipeline_inputs"]["smoother_progress_ids"] = [1, -1]
    ref_out = str(tmp_path / "reference")
    ref = _render(server, config, ref_out)
    assert ref.rc == 0, ref.log
    reference = Reference(ref_out, _frame_bytes(ref_out), _video_frames(ref_out), ref.unet_calls, _files(ref_out))
    out = str(tmp_path / "out")
    killed = _render(server, config, out, *_after_unet(CALLS_PER_STEP + 4))  # step 2's 2nd window computed, not committed
    assert killed.rc == -signal.SIGKILL, killed.log
    assert os.path.isdir(os.path.join(out, "smoothed", "step_001", "x0_journal"))
    resumed = _render(server, config, out)
    assert resumed.rc == 0, resumed.log
    _assert_same_output(out, reference)
    assert killed.unet_calls + resumed.unet_calls - ref.unet_calls <= WINDOW_CALLS


# ---------------------------------------------------------------------- full disk


def test_a_full_disk_stops_with_a_clear_message_and_the_rerun_completes(server, project, reference, tmp_path):
    """ENOSPC injected into every commit after the first 55 (mid-denoising): stop, name the folder, keep the journal valid."""
    out = str(tmp_path / "out")
    full = _render(server, project, out, "--enospc-after", "55")
    assert full.rc == 3, full.log  # a RunError, not a crash
    message = next(line for line in full.log.splitlines() if line.startswith("error:"))
    assert "No space left" in message and out in message and "run the same config again" in message, message
    assert "stage 4 denoising" in message, message
    # which file and folder, how many bytes it was, and how much the folder still needs
    found = re.search(r"while writing (\d{6})\.npy \((.+?) written of it when the disk filled\) into (\S+); "
                      r"that folder still needs about (.+?) \((\d+) more frame files of ~(.+?)\)", message)
    assert found, message
    index, size, folder, _, left, per_file = found.groups()
    latent_bytes = os.path.getsize(os.path.join(reference.out, "latents", "step_002", "000000.npy"))
    assert size == per_file == human_bytes(latent_bytes), message
    assert os.path.dirname(folder) == os.path.join(out, "latents") and int(left) == 8 - int(index), message
    assert "free now" in message, message
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["stages"]["4"]["status"] == "running" and _last_done(out) == 3
    resumed = _render(server, project, out)
    assert resumed.rc == 0, resumed.log
    _assert_same_output(out, reference)


# ---------------------------------------------------------------------- corrupt cache files


def _truncate(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def test_corrupt_cache_files_are_detected_warned_and_recomputed(server, project, reference, tmp_path):
    out = str(tmp_path / "out")
    killed = _render(server, project, out, *_after_unet(CALLS_PER_STEP + 3))  # step 2, window 2
    assert killed.rc == -signal.SIGKILL, killed.log
    latent = os.path.join(out, "latents", "step_001", "000003.npy")
    source = os.path.join(out, "source_images", "000002.png")
    prompt = os.path.join(out, "prompt", "embeddings.safetensors")
    for path in (latent, source, prompt):
        _truncate(path)
    resumed = _render(server, project, out)
    assert resumed.rc == 0, resumed.log
    warnings = [line for line in resumed.log.splitlines() if line.startswith("WARNING")]
    for path in (latent, source, prompt):
        assert any(path in line for line in warnings), (path, resumed.log)
    _assert_same_output(out, reference)
    assert open(source, "rb").read() == open(os.path.join(reference.out, "source_images", "000002.png"), "rb").read()


# ---------------------------------------------------------------------- changed configs


def test_a_changed_config_recomputes_from_the_first_stage_it_affects(server, project, reference, tmp_path):
    """cfg_scale 7 -> 1 after a kill mid-denoising, and 1 -> 7 on a finished render: each result equals a
    fresh run of its config (no stale journal, latent or prompt embedding is used), and stages 0-2 are
    reused untouched."""
    plain = copy.deepcopy(project)
    plain["pipeline"]["pipeline_inputs"]["cfg_scale"] = 1.0  # no negative prompt: one UNet call per window
    fresh = str(tmp_path / "fresh")
    first = _render(server, plain, fresh)
    assert first.rc == 0 and first.unet_calls == CALLS_PER_STEP, first.log

    out = str(tmp_path / "out")
    assert _render(server, project, out, *_after_unet(CALLS_PER_STEP + 3)).rc == -signal.SIGKILL  # a journal of step 2 exists
    before = json.load(open(os.path.join(out, "manifest.json")))["stages"]
    kept = {k: v for k, v in _tree_state(out).items() if k.split(os.sep)[0] in ("source_images", "controlnet_caches", "prompt")}
    rerun = _render(server, plain, out)
    assert rerun.rc == 0, rerun.log
    after = json.load(open(os.path.join(out, "manifest.json")))["stages"]
    assert [after[str(s)]["key"] == before[str(s)]["key"] for s in (0, 1, 2, 3, 4)] == [True, True, True, True, False]
    assert {k: v for k, v in _tree_state(out).items() if k in kept} == kept, "stages 0-2 were recomputed"
    assert rerun.unet_calls == CALLS_PER_STEP  # denoising redone from scratch, without the negative prompt
    assert _frame_bytes(out) == _frame_bytes(fresh)

    cfg1_frames = _frame_bytes(fresh)
    back = _render(server, project, fresh)  # 1 -> 7: the cached prompt stage must hold the negative prompt too
    assert back.rc == 0 and back.unet_calls == 2 * CALLS_PER_STEP, back.log
    (kept,) = os.listdir(os.path.join(fresh, "previous"))  # the finished cfg 1 render was moved aside, not deleted
    assert _frame_bytes(os.path.join(fresh, "previous", kept)) == cfg1_frames
    shutil.rmtree(os.path.join(fresh, "previous"))
    _assert_same_output(fresh, reference)


def test_batch_sizes_and_device_do_not_invalidate_anything(server, project, reference, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(reference.out, out)
    config = copy.deepcopy(project)
    inputs = config["pipeline"]["pipeline_inputs"]
    inputs["unet_batch_size"], inputs["controlnet_batch_size"] = 1, 2
    config["models"]["device"] = "cuda"  # loading a model would fail on a machine without CUDA: nothing may load
    before = _tree_state(out)
    rerun = _render(server, config, out)
    assert rerun.rc == 0, rerun.log
    assert rerun.unet_calls == 0
    after = _tree_state(out)
    after.pop("config.json"), before.pop("config.json")  # the config as given is saved on every run
    assert after == before
