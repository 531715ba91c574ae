"""What a kill costs the resumable runner, and what its cache costs on disk.

1. Resume cost. The tiny Diffutoon project of ``diffsynth demo`` (SD 1.x + AnimateDiff + 2
   ControlNet units, FastBlend on the final frames; 12 frames of 64x64, 2 steps, windows of 4
   frames with stride 2: 5 windows of 2 UNet calls per step) is rendered once uninterrupted and
   then, for each kill point, killed with SIGKILL (``diffsynth.testing.crash_child``) and rerun.
   Prints the UNet calls of killed + resumed vs uninterrupted, the extra work in windows
   (target <= 1 per kill) and the wall time of killed + resumed vs uninterrupted (the resumed
   run loads the models again: that is part of the price). All runs are forked from one
   pre-imported server, one at a time, with one torch thread.
2. Cache bytes. The runner at 1280x768 (tiny models, 6 frames, 1 step, in this process):
   the peak bytes of each folder of the output, sampled at every progress event and after
   every per-frame file commit, in MiB per frame. Transient folders (a step's latents, the
   denoising journal) count at their peak. Also the simultaneous peak: the largest total of
   the whole folder at any of those samples (what the disk must hold), which is below the
   sum of the per-folder peaks because intermediates are deleted once used.

Usage: OMP_NUM_THREADS=1 python bench/resume.py [--frames 12] [--skip-resume] [--skip-disk] [--disk-frames 6]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import threading
import time

WINDOW_CALLS = 2  # positive + negative UNet call per window (cfg_scale != 1)


def _project(folder: str, frames: int, size: int, steps: int) -> dict:
    from diffsynth.testing.runner_files import write_tiny_project

    config = write_tiny_project(folder, frames=frames, size=size, smoother=True, steps=steps)
    config["pipeline"]["pipeline_inputs"].update(animatediff_batch_size=4, animatediff_stride=2, unet_batch_size=4, controlnet_batch_size=4)
    return config


def _render(server, config: dict, out: str, work: str, name: str, *kill: str) -> tuple[int, int, float]:
    """(exit code, UNet calls, wall seconds) of one child run."""
    config = copy.deepcopy(config)
    config["data"]["output_folder"] = out
    path = os.path.join(work, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    unet_log = os.path.join(work, f"{name}.unet")
    start = time.perf_counter()
    result = server.run([path, "--unet-log", unet_log, *kill], os.path.join(work, f"{name}.log"))
    seconds = time.perf_counter() - start
    return result.rc, (os.path.getsize(unet_log) if os.path.exists(unet_log) else 0), seconds


def resume_cost(frames: int) -> None:
    from diffsynth.pipelines.sd_video import sliding_windows
    from diffsynth.testing.crash_child import ForkServer

    steps = 2
    windows = len(sliding_windows(frames, 4, 2))
    per_step = windows * WINDOW_CALLS
    middle = windows // 2 * WINDOW_CALLS  # UNet calls before the middle window of step 1
    points = [
        ("0 source frames, mid", ("--kill-at-event", "0:5")),
        ("3 initial latents, mid", ("--kill-at-event", "3:5")),
        ("4 mid-window (after its 1st UNet call)", ("--kill-after-unet", str(middle + 1))),
        ("4 window computed, not committed", ("--kill-after-unet", str(middle + 2))),
        ("4 between windows (after a commit)", ("--kill-at-event", f"4:{windows // 2 + 1}")),
        ("4 between steps", ("--kill-at-event", f"4:{windows + 1}")),
        ("4 step 2, mid-window", ("--kill-after-unet", str(per_step + 3))),
        ("5 VAE decode, mid", ("--kill-at-event", "5:5")),
        ("6 smoother left pass, mid", ("--kill-at-event", "6:5")),
        ("7 smoother right pass + merge, mid", ("--kill-at-event", "7:5")),
        ("8 smoother output (frames/), mid", ("--kill-at-event", "8:5")),
        ("9 video encode, mid", ("--kill-at-event", "9:5")),
    ]

    with tempfile.TemporaryDirectory(prefix="bench_resume_") as tmp, ForkServer(timeout=600) as server:
        config = _project(os.path.join(tmp, "project"), frames, 64, steps)
        work = os.path.join(tmp, "work")
        os.makedirs(work)
        _render(server, config, os.path.join(tmp, "warmup"), work, "warmup")  # page cache, lazy imports
        rc, ref_calls, ref_seconds = _render(server, config, os.path.join(tmp, "reference"), work, "reference")
        assert rc == 0, open(os.path.join(work, "reference.log")).read()
        print(f"resume cost: {frames} frames 64x64, {steps} steps, {windows} windows/step, {ref_calls} UNet calls, "
              f"FastBlend on the final frames; uninterrupted run {ref_seconds:.2f} s")
        print(f"{'kill point':<42} {'UNet calls':>10} {'extra':>6} {'windows':>8} {'wall s':>8} {'vs ref':>7}")
        for i, (name, kill) in enumerate(points):
            out = os.path.join(tmp, f"run{i}")
            rc1, calls1, s1 = _render(server, config, out, work, f"run{i}_killed", *kill)
            rc2, calls2, s2 = _render(server, config, out, work, f"run{i}_resumed")
            if rc1 != -9 or rc2 != 0:
                print(f"{name:<42} FAILED: killed rc={rc1}, resumed rc={rc2} (logs in {work})")
                continue
            extra = calls1 + calls2 - ref_calls
            print(f"{name:<42} {calls1 + calls2:>10} {extra:>6} {extra / WINDOW_CALLS:>8.1f} {s1 + s2:>8.2f} {(s1 + s2) / ref_seconds:>6.2f}x")


def cache_bytes(frames: int, width: int = 1280, height: int = 768, fastblend_block: int | None = None) -> None:
    import torch

    from diffsynth.cache.stores import DiskStore
    from diffsynth.pipelines.runner import SDVideoPipelineRunner
    from diffsynth.utils.atomic import is_temp_name

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        from diffsynth.testing.runner_files import write_tiny_project

        config = write_tiny_project(tmp, frames=frames, size=64, smoother=True, steps=1)
        if fastblend_block is not None:  # FastBlend's blocks (the default block is longer than this clip)
            config["smoother_configs"][0]["config"]["block_frames"] = fastblend_block
        # one frame per UNet/ControlNet call keeps this process near 1 GiB at 1280x768 (shared machines)
        config["pipeline"]["pipeline_inputs"].update(animatediff_batch_size=4, animatediff_stride=2, unet_batch_size=1, controlnet_batch_size=1)
        # the clip is 64x64; the runner crops and resizes it to 1280x768 as it reads it
        for spec in [config["data"]["input_frames"], *config["data"]["controlnet_frames"]]:
            spec["height"], spec["width"] = height, width
        out = config["data"]["output_folder"]
        peak: dict[str, int] = {}
        simultaneous = [0]
        lock = threading.Lock()  # commits are sampled on the write-behind threads too

        def sample(event) -> None:
            sizes: dict[str, int] = {}
            for root, _, files in os.walk(out):
                rel = os.path.relpath(root, out)
                parts = rel.split(os.sep)
                group = "/".join(parts[:2]) if parts[0] in ("latents", "controlnet_caches", "smoother", "smoothed") else parts[0]
                for name in files:
                    if is_temp_name(name):
                        continue
                    key = name if group == "." else group
                    try:
                        sizes[key] = sizes.get(key, 0) + os.path.getsize(os.path.join(root, name))
                    except FileNotFoundError:  # deleted by the runner meanwhile (a consumed step)
                        pass
            with lock:
                for key, size in sizes.items():
                    peak[key] = max(peak.get(key, 0), size)
                simultaneous[0] = max(simultaneous[0], sum(sizes.values()))

        # A measuring hook, not a change of behaviour: every per-frame commit (the moments the folder
        # grows) is followed by a sample, so the simultaneous peak is not missed between two events.
        commit = DiskStore._put

        def commit_and_sample(self, slot, value):
            commit(self, slot, value)
            if os.path.commonpath([os.path.abspath(self.folder), os.path.abspath(out)]) == os.path.abspath(out):
                sample(None)

        start = time.perf_counter()
        DiskStore._put = commit_and_sample
        try:
            SDVideoPipelineRunner(progress_bar_cmd=None, progress_callback=sample).run(config)
        finally:
            DiskStore._put = commit
        sample(None)
        seconds = time.perf_counter() - start
        mib = 2**20
        print(f"\ncache bytes at {width}x{height}: {frames} frames, 1 step, render {seconds:.0f} s; peak per folder")
        print(f"{'folder':<28} {'MiB/frame':>10}")
        for key in sorted(peak, key=lambda k: -peak[k]):
            print(f"{key:<28} {peak[key] / frames / mib:>10.3f}")
        total = sum(peak.values())
        print(f"{'sum of peaks':<28} {total / frames / mib:>10.3f}")
        print(f"{'simultaneous peak':<28} {simultaneous[0] / frames / mib:>10.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--disk-frames", type=int, default=6)
    p.add_argument("--skip-resume", action="store_true")
    p.add_argument("--skip-disk", action="store_true")
    p.add_argument("--fastblend-block", type=int, default=None, help="FastBlend's block_frames in the disk run (default: its own)")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not args.skip_resume:
        resume_cost(args.frames)
    if not args.skip_disk:
        cache_bytes(args.disk_frames, fastblend_block=args.fastblend_block)


if __name__ == "__main__":
    main()
