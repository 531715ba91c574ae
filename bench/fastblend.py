"""FastBlend deflicker: speed per mode on the CPU, flat memory with a disk cache, torch vs cupy on a GPU.

A synthetic clip, generated lazily frame by frame (nothing of it is held for the whole clip):
guide = a textured background with a square and a disc moving across it; style = the guide with
a random brightness gain and colour shift per frame (the flicker FastBlend removes).

1. Speed per mode (fast, balanced, accurate) at 512x512 on the CPU with the default engine
   settings (minimum_patch_size 5, num_iter 5, guide_weight 10, batch_size 8, identity init),
   in-memory stores, all modes in one fresh subprocess after a small warm-up call. The clip is
   short and the window small so that every mode does little work (default 2 frames, window 1:
   accurate mode re-evaluates the whole image per candidate: about a minute per frame at 512x512
   on 2 cores). Prints frames/s, engine calls, remaps and seconds per remap of each mode; the
   work per frame grows with the window (fast ~log w, balanced 2w, accurate 2w+1 remaps per frame),
   so figures for other windows follow from s/remap.
2. Peak RSS (VmHWM from /proc/self/status, each N in a fresh subprocess; ru_maxrss would carry
   the parent's peak over exec) of fast mode with a disk cache folder for N = 50 and 500 frames
   at a small size (32x32, minimum_patch_size 3, num_iter 2, window 4, batch 8), the result frames
   read back; prints RSS(500)/RSS(50) (target <= 1.05: memory independent of the clip length).
4. Disk of fast mode in blocks (``block_frames``), side by side with one block: N frames (default
   600, 32x32, window 4) with a disk cache folder, the cache and result folders' bytes sampled
   during the run; prints the peak of the left partial results and of everything, per frame,
   the remaps and seconds of both, and whether the frames are identical.
5. With CUDA: frames/s per mode of the torch and the cupy engine backends at 512x512 (6 frames,
   window 2), each backend in its own subprocess after a warm-up at the same size, and the largest
   pixel difference between the two backends' results. Skipped with a message without CUDA;
   the cupy side is skipped with a message when cupy is not installed or sees no device.

Usage: python bench/fastblend.py [--quick] [--size 512] [--frames 2] [--window 1] [--modes fast,balanced,accurate]
                                 [--rss-sizes 50,500] [--rss-size 32] [--rss-window 4] [--gpu-size 512] [--gpu-frames 6]
                                 [--gpu-window 2] [--gpu-rounds 1] [--cache-dir DIR] [--skip-speed] [--skip-rss] [--skip-gpu]
                                 [--blocks-frames 600] [--blocks-size 32] [--blocks-window 4] [--skip-blocks]
``--quick`` shrinks everything (128x128 speed clip, N = 20 and 200, 256x256 on the GPU) for a smoke run.
Default run: about 3 minutes on 2 idle CPU cores (most of it accurate mode), several times that when they are shared.
``--rss-size 64`` makes part 2 more sensitive to a per-frame leak (a frame weighs 4x more) at ~5x its time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

MODES = ("fast", "balanced", "accurate")


# --------------------------------------------------------------------------- the synthetic clip


class SyntheticClip:
    """``clip[t]``: frame ``t`` of the guide (``kind="guide"``) or of the flickering style (``"style"``), uint8 (H, W, 3).

    Frames are computed on demand from ``(seed, t)``, so the clip costs memory for one background only.
    """

    def __init__(self, frames: int, size: int, kind: str, seed: int = 0):
        self.frames, self.size, self.kind, self.seed = frames, size, kind, seed
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        scale = size / 64.0  # the texture and shapes scale with the frame
        background = np.stack([64 + 40 * np.sin(xx / (3.0 * scale)), 96 + 40 * np.cos(yy / (4.0 * scale)),
                               128 + 30 * np.sin((xx + yy) / (5.0 * scale))], -1)
        background += np.random.default_rng(seed).normal(0, 6, background.shape).astype(np.float32)
        self.background = background.astype(np.float32)
        self.scale = scale

    def __len__(self) -> int:
        return self.frames

    def __getitem__(self, t: int) -> np.ndarray:
        if not 0 <= t < self.frames:
            raise IndexError(t)
        s, size = self.scale, self.size
        frame = self.background.copy()
        side = max(2, int(10 * s))
        x0 = int(4 * s + t * max(1, s)) % max(1, size - side)
        y0 = int(8 * s)
        frame[y0:y0 + side, x0:x0 + side] = (220, 60, 40)
        yy, xx = np.ogrid[0:size, 0:size]
        cy, cx, r = int(44 * s), (size - int(8 * s) - t * max(1, int(s)) // 2) % size, 4 * s
        frame[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (40, 200, 90)
        if self.kind == "style":
            rng = np.random.default_rng([self.seed + 1, t])
            frame = frame * (1 + rng.uniform(-0.15, 0.15)) + rng.uniform(-30, 30, size=3)
        return np.clip(frame, 0, 255).astype(np.uint8)


def temporal_difference(frames) -> float:
    """Mean absolute frame-to-frame difference (the flicker measure), streamed two frames at a time."""
    total, count, prev = 0.0, 0, None
    for frame in frames:
        frame = np.asarray(frame, dtype=np.float32)
        if prev is not None:
            total += float(np.abs(frame - prev).mean())
            count += 1
        prev = frame
    return total / max(count, 1)


# --------------------------------------------------------------------------- the children


def _status_kb(field: str) -> int:
    # VmHWM: this process image's peak RSS (ru_maxrss would inherit the forking parent's peak across exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _smoother(job: dict, mode: str, **extra):
    from diffsynth.processors.FastBlend import FastBlendSmoother

    return FastBlendSmoother(mode, batch_size=job["batch_size"], window_size=job["window"],
                             minimum_patch_size=job["patch"], num_iter=job["iters"], device=job["device"],
                             backend=job.get("backend", "auto"), **extra)


def child_speed(job: dict) -> dict:
    """Every mode of ``job["modes"]`` on one clip, after a warm-up; frames/s and engine counters per mode."""
    import torch

    guide = SyntheticClip(job["frames"], job["size"], "guide")
    style = SyntheticClip(job["frames"], job["size"], "style")
    warm = job["warmup_size"]
    if warm:
        # A short clip of the same settings per mode (threads, code paths, on CUDA the context and the kernels)
        for mode in job["modes"]:
            frames = list(_smoother(job, mode, in_memory=True)(SyntheticClip(2, warm, "style"),
                                                               original_frames=SyntheticClip(2, warm, "guide")))
        del frames
    results = {}
    for mode in job["modes"]:
        smoother = _smoother(job, mode, in_memory=True)
        if job["device"].startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = smoother(style, original_frames=guide)
        frames = [np.asarray(out[i]) for i in range(len(out))]  # the results, read back
        seconds = time.perf_counter() - start
        stats = smoother.last_stats
        if job.get("save"):
            np.save(os.path.join(job["save"], f"{mode}.npy"), np.stack(frames))
        results[mode] = {"seconds": seconds, "engine_calls": stats.engine_calls, "remaps": stats.remaps,
                         "flicker_before": temporal_difference(style), "flicker_after": temporal_difference(frames)}
    return {"modes": results, "threads": torch.get_num_threads(), "peak_rss_kb": _status_kb("VmHWM")}


def child_rss(job: dict) -> dict:
    """Fast mode with a disk cache folder on ``job["frames"]`` frames; peak RSS of this process."""
    guide = SyntheticClip(job["frames"], job["size"], "guide")
    style = SyntheticClip(job["frames"], job["size"], "style")
    smoother = _smoother(job, "fast", cache_folder=job["cache"])
    base = _status_kb("VmRSS")
    start = time.perf_counter()
    out = smoother(style, original_frames=guide)
    checksum = 0
    for frame in out:  # read every result back, as a pipeline would
        checksum += int(np.asarray(frame, dtype=np.int64).sum())
    seconds = time.perf_counter() - start
    stats = smoother.last_stats
    return {"peak_rss_kb": _status_kb("VmHWM"), "base_rss_kb": base, "seconds": seconds, "checksum": checksum,
            "remaps": stats.remaps, "peak_float_frames": stats.peak_float_frames, "peak_nodes": stats.peak_nodes}


def child_blocks(job: dict) -> dict:
    """Fast mode over one clip with ``block_frames`` = ``job["block"]`` (0: one block); peaks of the folders' bytes."""
    guide = SyntheticClip(job["frames"], job["size"], "guide")
    style = SyntheticClip(job["frames"], job["size"], "style")
    cache, result = os.path.join(job["cache"], "smoother"), os.path.join(job["cache"], "frames")
    peaks = {"left": 0, "all": 0}
    events = [0]

    def folder_bytes(folder: str) -> int:
        total = 0
        for entry in os.scandir(folder) if os.path.isdir(folder) else ():
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                continue  # a temporary file renamed (or a partial released) since the listing
        return total

    def sample(event) -> None:
        events[0] += 1
        if events[0] % 5:
            return
        left = folder_bytes(os.path.join(cache, "left"))
        peaks["left"] = max(peaks["left"], left)
        peaks["all"] = max(peaks["all"], left + folder_bytes(result))

    smoother = _smoother(job, "fast", cache_folder=job["cache"], block_frames=job["block"], progress_callback=sample)
    start = time.perf_counter()
    out = smoother.smooth(guide, style, result_folder=result)
    seconds = time.perf_counter() - start
    digest = __import__("hashlib").sha256(b"".join(np.asarray(frame).tobytes() for frame in out)).hexdigest()
    return {"seconds": seconds, "remaps": smoother.last_stats.remaps, "peak_left": peaks["left"], "peak_all": peaks["all"],
            "digest": digest, "block": smoother.block_frames}


def run_child(kind: str, job: dict) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, json.dumps(job)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the parts


def bench_speed(args) -> None:
    job = dict(frames=args.frames, size=args.size, window=args.window, batch_size=8, patch=5, iters=5, device="cpu",
               modes=args.modes, warmup_size=64)
    print(f"1. FastBlend speed per mode on the CPU, {args.size}x{args.size}, {args.frames} frames, window_size {args.window}, "
          f"default engine settings (batch_size 8, minimum_patch_size 5, num_iter 5, guide_weight 10, identity init), "
          f"in-memory stores, one fresh subprocess after a 64x64 warm-up:", flush=True)
    start = time.perf_counter()
    r = run_child("speed", job)
    print(f"   torch threads: {r['threads']}; subprocess peak RSS {r['peak_rss_kb'] / 1024:.0f} MiB; "
          f"part took {time.perf_counter() - start:.0f} s")
    fps = {}
    for mode in args.modes:
        m = r["modes"][mode]
        fps[mode] = args.frames / m["seconds"]
        print(f"   {mode:9s} {m['seconds']:8.1f} s  {fps[mode]:8.4f} frames/s  ({m['engine_calls']} engine calls, "
              f"{m['remaps']} remaps, {m['seconds'] / max(m['remaps'], 1):.1f} s/remap; flicker "
              f"{m['flicker_before']:.1f} -> {m['flicker_after']:.1f})")
    if "fast" in fps:
        print("   speed relative to fast: " + ", ".join(f"{mode} {fps[mode] / fps['fast']:.3f}" for mode in args.modes))


def bench_rss(args, tmp: str) -> None:
    sizes = args.rss_sizes
    print(f"2. Peak RSS of fast mode with a disk cache folder, {args.rss_size}x{args.rss_size}, window_size {args.rss_window}, "
          f"batch_size 8, minimum_patch_size 3, num_iter 2, CPU, results read back, each N in a fresh subprocess:", flush=True)
    rss, growth = {}, {}
    for n in sizes:
        job = dict(frames=n, size=args.rss_size, window=args.rss_window, batch_size=8, patch=3, iters=2, device="cpu",
                   cache=os.path.join(tmp, f"rss_{n}"))
        r = run_child("rss", job)
        rss[n] = r["peak_rss_kb"]
        growth[n] = r["peak_rss_kb"] - r["base_rss_kb"]
        print(f"   N={n:5d}: peak RSS {r['peak_rss_kb'] / 1024:7.1f} MiB (before the run {r['base_rss_kb'] / 1024:6.1f} MiB), "
              f"{r['seconds']:6.1f} s, {r['remaps']} remaps, at most {r['peak_float_frames']} float frames held", flush=True)
    print(f"   RSS({sizes[-1]})/RSS({sizes[0]}) = {rss[sizes[-1]] / rss[sizes[0]]:.3f}  (target <= 1.05); growth over the "
          f"pre-run RSS {growth[sizes[0]] / 1024:.1f} MiB vs {growth[sizes[-1]] / 1024:.1f} MiB")


def bench_blocks(args, tmp: str) -> None:
    n = args.blocks_frames
    print(f"4. Disk of fast mode in blocks vs one block, {n} frames of {args.blocks_size}x{args.blocks_size}, window_size "
          f"{args.blocks_window}, minimum_patch_size 3, num_iter 2, disk cache, each in a fresh subprocess:", flush=True)
    runs = {}
    for label, block in (("one block", 0), ("blocks", None)):
        job = dict(frames=n, size=args.blocks_size, window=args.blocks_window, batch_size=8, patch=3, iters=2, device="cpu",
                   cache=os.path.join(tmp, f"blocks_{label.replace(' ', '_')}"), block=block)
        r = runs[label] = run_child("blocks", job)
        print(f"   {label:9s} (block_frames {r['block'] or n}): left partials peak {r['peak_left'] / n / 1024:6.2f} KiB/frame, "
              f"left partials + result frames peak {r['peak_all'] / n / 1024:6.2f} KiB/frame, {r['remaps']} remaps, {r['seconds']:.1f} s",
              flush=True)
    one, blocks = runs["one block"], runs["blocks"]
    print(f"   blocks / one block: left partials peak {blocks['peak_left'] / one['peak_left']:.3f}, remaps "
          f"{blocks['remaps'] / one['remaps']:.3f}, time {blocks['seconds'] / one['seconds']:.3f}; identical frames: "
          f"{blocks['digest'] == one['digest']}")


def bench_gpu(args, tmp: str) -> None:
    import torch

    if args.gpu_device.startswith("cuda") and not torch.cuda.is_available():
        print("5. torch vs cupy backends on a GPU: skipped (CUDA is not available on this machine)")
        return
    name = torch.cuda.get_device_name(0) if args.gpu_device.startswith("cuda") else args.gpu_device
    print(f"5. Engine backends on {name}, {args.gpu_size}x{args.gpu_size}, {args.gpu_frames} frames, "
          f"window_size {args.gpu_window}, default engine settings, warm-up at the same size, best of {args.gpu_rounds}:", flush=True)
    base = dict(frames=args.gpu_frames, size=args.gpu_size, window=args.gpu_window, batch_size=8, patch=5, iters=5,
                device=args.gpu_device, modes=list(MODES), warmup_size=args.gpu_size)
    times = {"torch": {}, "cupy": {}}
    skipped = None
    for i in range(args.gpu_rounds):
        for backend in (["torch", "cupy"] if i % 2 == 0 else ["cupy", "torch"]):
            if backend == "cupy" and skipped:
                continue
            save = os.path.join(tmp, f"gpu_{backend}")
            os.makedirs(save, exist_ok=True)
            try:
                r = run_child("speed", dict(base, backend=backend, save=save))
            except RuntimeError as e:
                if backend != "cupy":
                    raise
                skipped = str(e).strip().splitlines()[-1]
                continue
            for mode, m in r["modes"].items():
                times[backend][mode] = min(times[backend].get(mode, float("inf")), m["seconds"])
    for mode in MODES:
        t = times["torch"][mode]
        line = f"   {mode:9s} torch {args.gpu_frames / t:8.2f} frames/s"
        if not skipped:
            c = times["cupy"][mode]
            a = np.load(os.path.join(tmp, "gpu_torch", f"{mode}.npy")).astype(np.int16)
            b = np.load(os.path.join(tmp, "gpu_cupy", f"{mode}.npy")).astype(np.int16)
            line += (f"   cupy {args.gpu_frames / c:8.2f} frames/s   speed cupy/torch = {t / c:.3f}   "
                     f"results: max |diff| {int(np.abs(a - b).max())}, mean |diff| {float(np.abs(a - b).mean()):.3f} levels")
        print(line)
    if skipped:
        print(f"   cupy backend: skipped ({skipped})")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, job = sys.argv[2], json.loads(sys.argv[3])
        result = {"speed": child_speed, "rss": child_rss, "blocks": child_blocks}[kind](job)
        print(json.dumps(result))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes everywhere (a smoke run of a couple of minutes)")
    ap.add_argument("--size", type=int, default=None, help="speed clip side (default 512; --quick 128)")
    ap.add_argument("--frames", type=int, default=2, help="speed clip frames (default 2)")
    ap.add_argument("--window", type=int, default=1, help="speed clip window_size (default 1)")
    ap.add_argument("--modes", default=",".join(MODES), help="modes of part 1 (default fast,balanced,accurate)")
    ap.add_argument("--rss-sizes", default=None, help="frame counts of part 2 (default 50,500; --quick 20,200)")
    ap.add_argument("--rss-size", type=int, default=32, help="frame side of part 2 (default 32)")
    ap.add_argument("--rss-window", type=int, default=4, help="window_size of part 2 (default 4)")
    ap.add_argument("--gpu-size", type=int, default=None, help="frame side of part 3 (default 512; --quick 256)")
    ap.add_argument("--gpu-frames", type=int, default=6)
    ap.add_argument("--gpu-window", type=int, default=2)
    ap.add_argument("--gpu-rounds", type=int, default=1, help="interleaved rounds per backend, best kept (default 1)")
    ap.add_argument("--gpu-device", default="cuda", help=argparse.SUPPRESS)  # "cpu": a dry run of part 3's code
    ap.add_argument("--cache-dir", default=None, help="parent folder of the disk caches (default: a temporary folder)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-gpu", action="store_true")
    ap.add_argument("--blocks-frames", type=int, default=600, help="frames of part 4 (default 600; --quick 300)")
    ap.add_argument("--blocks-size", type=int, default=32)
    ap.add_argument("--blocks-window", type=int, default=4)
    ap.add_argument("--skip-blocks", action="store_true")
    args = ap.parse_args()
    args.size = args.size or (128 if args.quick else 512)
    args.gpu_size = args.gpu_size or (256 if args.quick else 512)
    args.rss_sizes = [int(s) for s in (args.rss_sizes or ("20,200" if args.quick else "50,500")).split(",")]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in args.modes:
        if mode not in MODES:
            ap.error(f"unknown mode {mode!r}; part 1 measures {', '.join(MODES)}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_fastblend_", dir=args.cache_dir) as tmp:
        if not args.skip_speed:
            bench_speed(args)
        if not args.skip_rss:
            bench_rss(args, tmp)
        if not args.skip_blocks:
            if args.quick:
                args.blocks_frames = min(args.blocks_frames, 300)
            bench_blocks(args, tmp)
        if not args.skip_gpu:
            bench_gpu(args, tmp)
    print(f"Total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
