"""One render on several processes (torch.distributed, gloo on the CPU): the result is one process's, bit for bit.

Real multi-process runs, started as users start them: ``diffsynth run --nproc-per-node N``
(torchrun's elastic launcher on this machine), torch's launcher twice as two "nodes" on
127.0.0.1, and ``diffsynth.testing.dist_child`` (the runner with a UNet hook that kills a rank)
under the same launcher. Every process has one thread: a single-process run of the same
config is then the reference for ``frames/`` (PNG bytes) and ``video.mp4`` (decoded frames).

The project: SD 1.x + AnimateDiff + two ControlNet units, 11 frames of 64x64, 2 steps,
windows of 4 with stride 2 (5 windows, the last one of 3 frames: they do not divide evenly),
FastBlend inside the loop at step 1 and on the final frames.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from diffsynth.distributed import frame_share, window_owners
from diffsynth.pipelines.sd_video import sliding_windows
from diffsynth.testing.runner_files import write_tiny_project

FRAMES = 11
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
CHILD = ["-m", "diffsynth.testing.dist_child"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    config = write_tiny_project(str(root / "project"), frames=FRAMES, smoother=True, steps=2)
    config["pipeline"]["pipeline_inputs"].update(animatediff_batch_size=4, animatediff_stride=2, smoother_progress_ids=[0, -1])
    path = root / "config.json"
    path.write_text(json.dumps(config))
    return {"root": root, "config": config, "path": str(path)}


def _run(argv, timeout=240, cwd=None):
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _diffsynth(*args, timeout=240):
    return _run([sys.executable, "-m", "diffsynth", *args], timeout=timeout)


def _ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-6000:]}"
    return result


def _frames(out) -> dict[str, bytes]:
    folder = os.path.join(out, "frames")
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def _video(out) -> np.ndarray:
    from diffsynth.data import VideoData

    return np.stack([np.asarray(frame) for frame in VideoData(video_file=os.path.join(out, "video.mp4"))])


def _calls(log_dir, attempt=None) -> int:
    if not os.path.isdir(log_dir):
        return 0
    return sum(os.path.getsize(os.path.join(log_dir, name)) for name in os.listdir(log_dir)
               if name.startswith("unet.") and (attempt is None or name.endswith(f".attempt{attempt}")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(project):
    """The single-process render, and its UNet calls."""
    out, logs = str(project["root"] / "one"), str(project["root"] / "one.logs")
    _ok(_run([sys.executable, *CHILD, project["path"], "--output-folder", out, "--log-dir", logs]))
    return {"out": out, "frames": _frames(out), "video": _video(out), "calls": _calls(logs)}


def _assert_same_render(out, reference):
    assert _frames(out) == reference["frames"]
    assert np.array_equal(_video(out), reference["video"])
    assert not os.path.exists(os.path.join(out, "latents", "step_001"))  # intermediates cleaned as one process does


# ---------------------------------------------------------------------- who does what


@pytest.mark.parametrize("n,world", [(11, 2), (11, 3), (3667, 8), (5, 8)])
def test_frame_shares_are_contiguous_balanced_and_cover_every_frame(n, world):
    shares = [frame_share(n, r, world) for r in range(world)]
    assert [i for share in shares for i in share] == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("n,batch,stride,world", [(11, 4, 2, 2), (11, 4, 2, 3), (3667, 16, 8, 4), (40, 16, 8, 8)])
def test_window_owners_are_contiguous_runs_balanced_by_frames(n, batch, stride, world):
    windows = sliding_windows(n, batch, stride)
    owners = window_owners([w.end - w.start for w in windows], world)
    assert owners == sorted(owners) and owners[0] == 0 and owners[-1] == min(world, len(windows)) - 1
    assert len(set(owners)) == min(world, len(windows))  # nobody idles while there are windows enough
    load = [sum(w.end - w.start for w, r in zip(windows, owners) if r == rank) for rank in range(world)]
    if len(windows) >= world:
        assert max(load) - min(load) <= 2 * batch  # within two windows of each other


# ---------------------------------------------------------------------- identical output


@pytest.mark.parametrize("world", [2, 3])
def test_several_processes_render_the_single_process_frames_and_video(project, reference, world, tmp_path):
    out = str(tmp_path / "out")
    result = _ok(_diffsynth("run", project["path"], "--output-folder", out, "--nproc-per-node", str(world)))
    assert f"done: {FRAMES} frames" in result.stdout
    _assert_same_render(out, reference)
    record = json.load(open(os.path.join(out, "manifest.json")))["distributed"]
    assert record["world_size"] == world and [r["rank"] for r in record["ranks"]] == list(range(world))
    assert [i for r in record["ranks"] for i in range(*r["frames"])] == list(range(FRAMES))
    status = _ok(_diffsynth("status", out)).stdout
    assert f"on {world} processes" in status and "rank 1 on " in status


def test_two_launchers_as_two_nodes_on_localhost(project, reference, tmp_path):
    """``torchrun --nnodes=2 --node-rank=R --rdzv-endpoint=HOST:PORT -m diffsynth run``, one launcher per "node", one shared folder."""
    out = str(tmp_path / "out")
    codes, logs = _two_nodes([project["path"]] * 2, [out, out])
    assert codes == [0, 0], logs
    _assert_same_render(out, reference)
    assert json.load(open(os.path.join(out, "manifest.json")))["distributed"]["shared_folder"] is True


def _two_nodes(configs, outs, timeout=240, procs=(1, 1), workers=None):
    """Torch's launcher twice, as two "nodes" on 127.0.0.1 (node ``R`` runs ``configs[R]`` into ``outs[R]``); their exit codes and logs.

    ``workers[R]``: ``(module argv before the config, arguments after the output folder)``; default ``diffsynth run``.
    """
    port = _free_port()
    workers = workers or [(["-m", "diffsynth", "run"], [])] * 2
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes=2", f"--node-rank={rank}", f"--nproc-per-node={procs[rank]}",
                               f"--rdzv-endpoint=127.0.0.1:{port}", *workers[rank][0], configs[rank], "--output-folder", outs[rank],
                               *workers[rank][1]],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [node.communicate(timeout=timeout)[0] for node in nodes]
    return [node.returncode for node in nodes], logs


def test_two_nodes_without_a_shared_folder_gather_the_render_in_rank_0s(project, reference, tmp_path):
    """Each "node" renders into a folder of its own (node 0 with two processes in one folder, node 1 with one): rank 0's
    folder ends with every frame and the video, identical; node 1's keeps only the frames around its share."""
    outs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    codes, logs = _two_nodes([project["path"]] * 2, outs, procs=(2, 1))
    assert codes == [0, 0], logs
    _assert_same_render(outs[0], reference)
    record = json.load(open(os.path.join(outs[0], "manifest.json")))["distributed"]
    assert record["shared_folder"] is False and record["world_size"] == 3
    kept = sorted(os.listdir(os.path.join(outs[1], "frames")))
    own = record["ranks"][2]["frames"]
    assert kept == [f"{i:06d}.png" for i in range(*own)]  # its share only: the rest went to rank 0
    assert not os.path.exists(os.path.join(outs[1], "video.mp4"))
    assert len(os.listdir(os.path.join(outs[1], "source_images"))) < FRAMES  # its frames and their halo, not the whole video
    assert "output folders local to each machine" in _ok(_diffsynth("status", outs[0])).stdout


def test_two_nodes_without_a_shared_folder_resume_with_fewer_processes_after_one_dies(project, reference, tmp_path):
    """Node 1's process (rank 2 of 3) is killed inside step 2; node 0's two stop (their peer went silent). Rerun with one
    process per node: the latents each now needs come from the folder that has them, and the render is the same."""
    outs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    workers = [(CHILD, ["--dist-timeout", "5"]), (CHILD, ["--dist-timeout", "5", "--kill-rank", "2", "--kill-after-unet", "6"])]
    codes, logs = _two_nodes([project["path"]] * 2, outs, procs=(2, 1), workers=workers)
    assert codes[0] != 0 and codes[1] != 0, logs
    assert os.path.isdir(os.path.join(outs[1], "latents", "step_002"))  # it died inside step 2
    codes, logs = _two_nodes([project["path"]] * 2, outs)
    assert codes == [0, 0], logs
    _assert_same_render(outs[0], reference)


# ---------------------------------------------------------------------- faults and resume


def test_a_rank_killed_in_the_middle_of_a_step_is_restarted_and_the_result_is_identical(project, reference, tmp_path):
    """Rank 1 SIGKILLs itself after its 9th UNet call (step 2: a window and a half in); torchrun restarts the group once."""
    out, logs = str(tmp_path / "out"), str(tmp_path / "logs")
    result = _ok(_run([*TORCHRUN, "--standalone", "--nproc-per-node=2", "--max-restarts=1", *CHILD, project["path"],
                       "--output-folder", out, "--log-dir", logs, "--kill-rank", "1", "--kill-after-unet", "9"]))
    assert os.path.getsize(os.path.join(logs, "unet.rank1.attempt0")) == 9  # it was killed there
    assert os.path.exists(os.path.join(logs, "times.rank0.attempt1.json")), result.stderr[-3000:]  # and the group ran again
    _assert_same_render(out, reference)
    # the restart reused the committed windows: at most one window (2 calls) per rank was lost
    assert _calls(logs) <= reference["calls"] + 2 * 2


def _windows_left(out) -> int:
    """Windows of step 2 a rerun must run: those covering a frame not yet in latents/step_002 that have no committed file."""
    windows = sliding_windows(FRAMES, 4, 2)
    done = {int(name[:6]) for name in os.listdir(os.path.join(out, "latents", "step_002")) if name.endswith(".npy")}
    journal = os.path.join(out, "latents", "step_002_journal")
    names = os.listdir(journal) if os.path.isdir(journal) else []  # a kill may leave a temporary file too: not a commit
    committed = {int(name[len("contrib_"):-len(".safetensors")]) for name in names if name.startswith("contrib_") and name.endswith(".safetensors")}
    needed = {k for k, w in enumerate(windows) if any(i not in done for i in range(w.start, w.end))}
    return len(needed - committed)


@pytest.mark.parametrize("rerun_world", [2, 1])
def test_a_three_process_run_resumes_with_fewer_processes(project, reference, rerun_world, tmp_path):
    """Killed (rank 2, in step 2, no restarts), then rerun with 2 processes or 1: the same render; every frame and window
    committed before the kill is reused (the rerun runs exactly the windows with neither)."""
    out, logs = str(tmp_path / "out"), str(tmp_path / "logs")
    killed = _run([*TORCHRUN, "--standalone", "--nproc-per-node=3", "--max-restarts=0", *CHILD, project["path"], "--output-folder", out,
                   "--log-dir", logs, "--kill-rank", "2", "--kill-after-unet", "7"])
    assert killed.returncode != 0
    assert os.path.isdir(os.path.join(out, "latents", "step_002"))  # killed inside step 2
    left = _windows_left(out)
    rerun_logs = str(tmp_path / "rerun.logs")
    if rerun_world == 1:
        _ok(_run([sys.executable, *CHILD, project["path"], "--output-folder", out, "--log-dir", rerun_logs]))
    else:
        _ok(_run([*TORCHRUN, "--standalone", f"--nproc-per-node={rerun_world}", *CHILD, project["path"], "--output-folder", out,
                  "--log-dir", rerun_logs]))
    _assert_same_render(out, reference)
    assert _calls(rerun_logs) == 2 * left  # a positive and a negative call per window


def test_a_missing_model_on_one_node_stops_every_rank_promptly_with_its_name(project, tmp_path):
    """Node 1's copy of the config names a model file that is not there: both nodes exit non-zero, within 60 s, saying which."""
    broken = json.loads(json.dumps(project["config"]))
    missing = os.path.join(str(tmp_path), "models", "stable_diffusion", "gone.safetensors")
    broken["models"]["model_list"][0] = missing
    broken_path = tmp_path / "node1.json"
    broken_path.write_text(json.dumps(broken))
    out = str(tmp_path / "out")
    started = time.monotonic()
    codes, logs = _two_nodes([project["path"], str(broken_path)], [out, out], timeout=120)
    assert time.monotonic() - started < 60
    assert all(code != 0 for code in codes), logs
    assert "gone.safetensors" in logs[1] and "rank 1" in logs[1]
    assert "rank 1" in logs[0] and "cannot start" in logs[0] and "gone.safetensors" in logs[0]
    assert not os.path.exists(os.path.join(out, "frames"))


def test_a_rank_that_stops_answering_is_given_up_after_the_timeout_with_its_name(project, tmp_path):
    """Rank 1 freezes (SIGSTOP) inside a step; rank 0, waiting for it, stops after --dist-timeout 4 s naming it."""
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*TORCHRUN, "--standalone", "--nproc-per-node=2", *CHILD, project["path"], "--output-folder",
                                 str(tmp_path / "out"), "--kill-rank", "1", "--freeze-after-unet", "3", "--dist-timeout", "4"],
                                env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def message():
            text = log_path.read_text()
            return "has not answered for 4 s" in text and text
        text = _wait_for(message, 120)
        assert "rank 1 (host" in text and "rank 0" in text and "--dist-timeout" in text
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the frozen rank cannot be stopped politely
        proc.wait(timeout=30)
        _kill_leftovers(str(tmp_path))


def _kill_leftovers(marker: str) -> None:
    """Kill the workers of a test's run still alive: the launcher starts them in sessions of their own, so the frozen
    (SIGSTOPped) rank outlives the launcher's process group and would hold its memory until the machine ends."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in process.info["cmdline"] or []):
            process.kill()


def _wait_for(condition, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s")


def test_a_smoother_chain_with_rife_and_contrast_splits_exactly(project, tmp_path):
    """FastBlend, then RIFE, then Contrast, inside the loop and on the final frames: each rank its share, the same frames."""
    from diffsynth.testing.rife_files import write_rife_file

    config = json.loads(json.dumps(project["config"]))
    config["models"]["model_list"].append(write_rife_file(str(tmp_path / "models" / "RIFE" / "flownet.pkl")))
    config["smoother_configs"] = [{"processor_type": "FastBlend", "config": {"window_size": 3, "minimum_patch_size": 3, "num_iter": 2}},
                                  {"processor_type": "RIFE", "config": {"batch_size": 3}},
                                  {"processor_type": "Contrast", "config": {"rate": 1.2}}]
    path = tmp_path / "chain.json"
    path.write_text(json.dumps(config))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _ok(_diffsynth("run", str(path), "--output-folder", one))
    _ok(_diffsynth("run", str(path), "--output-folder", two, "--nproc-per-node", "2"))
    assert _frames(two) == _frames(one)
    assert np.array_equal(_video(two), _video(one))


def test_only_the_boundary_frames_predictions_cross_ranks_once_per_step(project, reference, tmp_path):
    """Bytes each rank sent in the denoising exchanges: exactly the boundary frames' predictions, one exchange per pass
    (the in-loop smoother's x0 pass and step 2), ε+ and ε− of each holder's windows to every other holder."""
    out, logs = str(tmp_path / "out"), str(tmp_path / "logs")
    _ok(_run([*TORCHRUN, "--standalone", "--nproc-per-node=2", *CHILD, project["path"], "--output-folder", out, "--log-dir", logs]))
    assert _frames(out) == reference["frames"]
    windows = sliding_windows(FRAMES, 4, 2)
    owners = window_owners([w.end - w.start for w in windows], 2)
    latent_bytes = 4 * 8 * 8 * 4  # a 64x64 frame's latent, float32
    sent = [0, 0]
    for i in range(FRAMES):
        covering = [k for k, w in enumerate(windows) if w.start <= i < w.end]
        holders = {owners[k] for k in covering}
        if len(holders) > 1:
            for k in covering:
                sent[owners[k]] += 2 * latent_bytes  # to the one other holder
    assert sum(sent) > 0 and sent[0] < FRAMES * 2 * latent_bytes  # a boundary, not the video
    measured = [json.load(open(os.path.join(logs, f"times.rank{r}.attempt0.json")))["bytes_exchanged"] for r in (0, 1)]
    assert measured == [2 * s for s in sent]  # two denoising passes


def test_a_multistep_sampler_renders_the_same_frames_on_two_nodes_without_a_shared_folder(project, tmp_path):
    """DPM-Solver++ 2M Karras keeps each frame's previous x0 beside the latents: with a folder per machine the boundary
    frames' states travel like their latents, and rank 0's folder ends with the single process's render."""
    config = dict(project["config"])
    config["pipeline"] = dict(config["pipeline"], pipeline_inputs=dict(config["pipeline"]["pipeline_inputs"], sampler="dpmpp_2m_karras",
                                                                        num_inference_steps=3))
    path = str(tmp_path / "config.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    single = str(tmp_path / "single")
    _ok(_diffsynth("run", path, "--output-folder", single))
    outs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    codes, logs = _two_nodes([path] * 2, outs)
    assert codes == [0, 0], logs
    assert _frames(outs[0]) == _frames(single)
    latents = os.path.join(outs[0], "latents")
    assert not os.path.isdir(latents) or not [name for name in os.listdir(latents) if name.startswith("previous_")]  # cleaned up
