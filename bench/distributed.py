"""Benchmark: one render on 1 process × 1 thread vs 2 processes × 1 thread (gloo, this machine), side by side in one run.

    python bench/distributed.py [--frames 36] [--size 192] [--steps 6] [--seconds-per-frame S]

The job: the tiny Diffutoon-shaped project (SD 1.x + AnimateDiff + two ControlNet units,
random weights) at a size where the UNet and ControlNets dominate, AnimateDiff windows of 8 with
stride 4. Both runs start as users start them (the 2-process one under torch's launcher,
``diffsynth.testing.dist_child`` as the worker, which only adds a UNet hook for timing) and
must give the same ``frames/``, bit for bit. Printed:

- denoising speed-up (first to last UNet call, across ranks, wall clock) and end to end (the
  whole command, launcher and imports included), 1 process over 2;
- bytes exchanged per step (the boundary frames' predictions) over the video's latent bytes,
  and what the plan says they should be;
- each rank's split of its time: UNet calls, waiting at barriers, the rest;
- the measured time to exchange one 1280×768 boundary between two processes (gloo on loopback);
- a projection, labelled as a model, of a 3,667-frame 1280×768 Diffutoon render on 1, 2, 4 and
  8 GPUs, with its assumptions printed (see ``project``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffsynth.distributed import window_owners  # noqa: E402
from diffsynth.pipelines.sd_video import sliding_windows  # noqa: E402

CHILD = ["-m", "diffsynth.testing.dist_child"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def run(argv, env) -> float:
    started = time.monotonic()
    result = subprocess.run(argv, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return time.monotonic() - started


def times(log_dir: str) -> list[dict]:
    names = sorted(n for n in os.listdir(log_dir) if n.startswith("times.rank"))
    return [json.load(open(os.path.join(log_dir, n))) for n in names]


def frames_of(out: str) -> dict[str, bytes]:
    folder = os.path.join(out, "frames")
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def boundary_predictions(n: int, batch: int, stride: int, world: int) -> int:
    """Predictions (one per window and boundary frame) the plan sends per step, all ranks together."""
    windows = sliding_windows(n, batch, stride)
    owners = window_owners([w.end - w.start for w in windows], world)
    sent = 0
    for i in range(n):
        covering = [k for k, w in enumerate(windows) if w.start <= i < w.end]
        ranks = {owners[k] for k in covering}
        if len(ranks) > 1:
            sent += len(covering) * (len(ranks) - 1)  # each holder's own predictions go to every other holder
    return sent


def probe_exchange() -> None:
    """Worker of the exchange probe (under torch's launcher): one 1280x768 boundary each way, timed."""
    import torch
    import torch.distributed as dist

    from diffsynth.distributed import Cluster

    cluster = Cluster.from_env(device="cpu")
    peer = 1 - cluster.rank
    send = torch.randn(16, 2, 4, 96, 160)  # 8 boundary frames × 2 windows each, ε_pos and ε_neg: stride 8 of batch 16
    receive = torch.empty_like(send)
    cluster.exchange({peer: send}, {peer: receive})  # warm-up
    repeats = 5
    dist.barrier()
    started = time.monotonic()
    for _ in range(repeats):
        cluster.exchange({peer: send}, {peer: receive})
    seconds = (time.monotonic() - started) / repeats
    if cluster.rank == 0:
        print(json.dumps({"seconds": seconds, "bytes": send.numel() * 4}))
    cluster.close()


PROJECTED = dict(n=3667, steps=10, batch=16, stride=8)


def project(seconds_per_frame: float, exchange_seconds: float, other_fraction: float, serial_fraction: float) -> tuple[float, list[str]]:
    """The model: a 3,667-frame 1280×768 Diffutoon render (10 steps, windows of 16, stride 8) on N GPUs.

    T1 = frames × seconds_per_frame on one GPU, of which (1 − other − serial) is denoising:
    steps × windows × window_seconds. On N GPUs: T(N) = steps × (the most windows a rank has ×
    window_seconds + one exchange) + other × T1 / N (annotation, decode, FastBlend: split
    evenly) + serial × T1 (video encode, prompt: not split). Returns window_seconds and the table.
    """
    n, steps, batch, stride = PROJECTED["n"], PROJECTED["steps"], PROJECTED["batch"], PROJECTED["stride"]
    windows = sliding_windows(n, batch, stride)
    total1 = n * seconds_per_frame
    window_seconds = (1 - other_fraction - serial_fraction) * total1 / (steps * len(windows))
    lines = [f"{'GPUs':>4}  {'windows/rank':>12}  {'hours':>7}  {'speed-up':>8}"]
    for world in (1, 2, 4, 8):
        owners = window_owners([w.end - w.start for w in windows], world)
        most = max(owners.count(r) for r in range(world))
        t = steps * (most * window_seconds + (exchange_seconds if world > 1 else 0.0)) + other_fraction * total1 / world + serial_fraction * total1
        lines.append(f"{world:>4}  {most:>12}  {t / 3600:>7.1f}  {total1 / t:>7.2f}×")
    return window_seconds, lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=36)
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seconds-per-frame", type=float, default=20.0,
                   help="the projection's single-GPU cost of a 1280x768 Diffutoon frame, whole render (default 20: the low end of "
                        "the 20-65 s users report on an RTX 4090)")
    p.add_argument("--probe-exchange", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe_exchange:
        probe_exchange()
        return
    from diffsynth.testing.runner_files import write_tiny_project

    env = dict(os.environ, OMP_NUM_THREADS="1")
    batch, stride = 8, 4
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as root:
        config = write_tiny_project(os.path.join(root, "project"), frames=args.frames, size=args.size, smoother=False, steps=args.steps)
        config["pipeline"]["pipeline_inputs"].update(animatediff_batch_size=batch, animatediff_stride=stride, unet_batch_size=batch,
                                                     controlnet_batch_size=batch)
        path = os.path.join(root, "config.json")
        with open(path, "w") as f:
            json.dump(config, f)
        runs = {}
        for world in (1, 2):
            out, logs = os.path.join(root, f"out{world}"), os.path.join(root, f"logs{world}")
            launcher = [sys.executable] if world == 1 else [*TORCHRUN, f"--nproc-per-node={world}"]
            wall = run([*launcher, *CHILD, path, "--output-folder", out, "--log-dir", logs], env)
            ranks = times(logs)
            denoise = max(r["last_unet_at"] for r in ranks) - min(r["first_unet_at"] for r in ranks)
            runs[world] = {"wall": wall, "denoise": denoise, "ranks": ranks, "frames": frames_of(out)}
        identical = runs[1]["frames"] == runs[2]["frames"]
        exchange = json.loads(subprocess.run([*TORCHRUN, "--nproc-per-node=2", os.path.abspath(__file__), "--probe-exchange"], env=env,
                                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])

    n, latent = args.frames, 4 * (args.size // 8) ** 2 * 4
    sent = sum(r["bytes_exchanged"] for r in runs[2]["ranks"])
    steps = args.steps  # denoising_strength 0.9 of the tiny project runs every step at this count
    predicted = boundary_predictions(n, batch, stride, 2) * 2 * latent  # ε_pos and ε_neg
    windows = sliding_windows(n, batch, stride)
    print(f"job: {n} frames of {args.size}x{args.size}, {args.steps} steps, {len(windows)} windows of {batch} (stride {stride}) per step, "
          f"2 ControlNet units, cfg; 1 thread per process, {os.cpu_count()} cores")
    print(f"frames/ identical to the single process: {identical}")
    print(f"denoising: {runs[1]['denoise']:.1f} s on 1 process, {runs[2]['denoise']:.1f} s on 2: speed-up {runs[1]['denoise'] / runs[2]['denoise']:.2f}× (target >= 1.8×)")
    print(f"end to end: {runs[1]['wall']:.1f} s on 1 process, {runs[2]['wall']:.1f} s on 2: speed-up {runs[1]['wall'] / runs[2]['wall']:.2f}× (target >= 1.6×)")
    print(f"exchanged per step: {sent / steps / 1024:.1f} KiB = {sent / steps / (n * latent):.3f} of the video's latents ({n * latent / 1024:.0f} KiB); "
          f"the plan's boundary predictions: {predicted / 1024:.1f} KiB per step")
    for world in (1, 2):
        for rank, r in enumerate(runs[world]["ranks"]):
            rest = r["total_seconds"] - r["unet_seconds"] - r["wait_seconds"]
            print(f"  {world} process{'es' if world > 1 else ''}, rank {rank}: {r['total_seconds']:.1f} s = UNet {r['unet_seconds']:.1f} s "
                  f"({r['unet_calls']} calls) + waiting {r['wait_seconds']:.2f} s + the rest {rest:.1f} s (imports, models, ControlNets, stages)")
    print(f"exchange of one 1280x768 boundary ({exchange['bytes'] / 2**20:.1f} MiB each way, gloo on loopback): {exchange['seconds'] * 1000:.0f} ms")
    print()
    tiny_window = runs[1]["denoise"] / (len(windows) * steps)
    window_seconds, table = project(args.seconds_per_frame, exchange["seconds"], other_fraction=0.14, serial_fraction=0.01)
    print(f"measured here: {tiny_window * 1000:.0f} ms per window of this tiny job on one CPU thread")
    print("PROJECTION (a model, not a measurement): 3,667 frames at 1280x768, Diffutoon (10 steps, windows of 16, stride 8, "
          f"{len(sliding_windows(PROJECTED['n'], PROJECTED['batch'], PROJECTED['stride']))} per step)")
    print(f"assumed: {args.seconds_per_frame:.0f} s per frame on one GPU for the whole render (--seconds-per-frame), of which "
          f"denoising is 85% ({window_seconds:.1f} s per window of 16 frames), annotation/decode/FastBlend 14% (split evenly), "
          f"video encode and prompt 1% (not split); one exchange per step of {exchange['seconds'] * 1000:.0f} ms (measured above on "
          "loopback; a network between machines is slower); identical GPUs")
    for line in table:
        print("  " + line)


if __name__ == "__main__":
    main()
