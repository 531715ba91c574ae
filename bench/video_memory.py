"""Flat memory of the streaming video pipeline, disk vs memory store speed, and cache bytes per frame.

Tiny random-weight models (SD 1.x + AnimateDiff v2 + 2 ControlNet units: tile and canny, which
need no annotator weights), video-to-video at 64×64 from a synthetic video file read lazily.

1. Peak RSS of the whole process for N frames, each N in a fresh subprocess
   (default N = 100, 500, 1000, 2000); prints RSS(2000)/RSS(100) (target <= 1.05).
2. Wall time of the same job (N=100) with the disk stores and with the in-memory stores,
   interleaved; prints the ratio disk/memory (target <= 1.10).
3. Peak bytes of the output folder per frame for a job at 1280×768 (target <= 16 MB/frame).

Usage: python bench/video_memory.py [--sizes 100,500,1000,2000] [--steps 2] [--skip-rss] [--skip-speed] [--skip-disk]
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

CHILD = r"""
import json, os, sys, time
import torch
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
from diffsynth import ControlNetConfigUnit, ModelManager, SDVideoPipeline, VideoData
args = json.loads(sys.argv[1])
mm = ModelManager(torch_dtype=torch.float32, device="cpu")
mm.load_models([args["sd"], args["mm"], args["cn1"], args["cn2"]])
pipe = SDVideoPipeline.from_model_manager(mm, [ControlNetConfigUnit("tile", args["cn1"], 0.5), ControlNetConfigUnit("canny", args["cn2"], 0.5)])
video = VideoData(video_file=args["video"], height=args["height"], width=args["width"]).range(0, args["frames"])
peak_bytes = [0]
def walk(event):
    if args.get("measure_disk"):
        total = 0
        for root, _, files in os.walk(args["out"]):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        peak_bytes[0] = max(peak_bytes[0], total)
torch.manual_seed(0)
start = time.perf_counter()
frames = pipe("a dancing girl", negative_prompt="blurry", num_frames=len(video), input_frames=video, controlnet_frames=video,
              denoising_strength=0.8, height=args["height"], width=args["width"], num_inference_steps=args["steps"],
              animatediff_batch_size=16, animatediff_stride=8, unet_batch_size=16, controlnet_batch_size=16,
              progress_bar_cmd=None, progress_callback=walk,
              output_folder=None if args["memory"] else args["out"], in_memory=args["memory"])
checksum = sum(int(frames[i].getpixel((0, 0))[0]) for i in range(len(frames)))
def peak_rss_kb():
    # VmHWM: this process image's peak RSS (ru_maxrss would inherit the forking parent's peak across exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_kb": peak_rss_kb(), "seconds": time.perf_counter() - start,
                  "peak_folder_bytes": peak_bytes[0], "checksum": checksum}))
"""


def write_models(folder: str) -> dict:
    from diffsynth.testing.controlnet_files import write_controlnet
    from diffsynth.testing.factory import write_sd_checkpoint
    from diffsynth.testing.motion_files import write_motion_module

    return {
        "sd": write_sd_checkpoint(os.path.join(folder, "sd.safetensors")),
        "mm": write_motion_module(os.path.join(folder, "mm.ckpt")),
        "cn1": write_controlnet(os.path.join(folder, "cn1.pth"), seed=1),
        "cn2": write_controlnet(os.path.join(folder, "cn2.safetensors"), seed=2),
    }


def write_video(path: str, frames: int, width: int, height: int) -> str:
    from diffsynth import save_video

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    save_video((np.roll(base, i % width, axis=1) for i in range(frames)), path, fps=30, quality=5)
    return path


def run(job: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,500,1000,2000")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--speed-rounds", type=int, default=2)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-disk", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        models = write_models(tmp)
        video = write_video(os.path.join(tmp, "input.mp4"), max(sizes + [100]), 64, 64)
        base = dict(models, video=video, height=64, width=64, steps=args.steps, memory=False)
        if not args.skip_rss:
            print(f"Peak RSS of a video-to-video job (tiny models, 2 ControlNet units, 64x64, {args.steps} steps), disk stores:")
            rss = {}
            for n in sizes:
                r = run(dict(base, frames=n, out=os.path.join(tmp, f"out_{n}")))
                rss[n] = r["peak_rss_kb"]
                print(f"  N={n:5d}: peak RSS {r['peak_rss_kb'] / 1024:7.1f} MiB, {r['seconds']:7.1f} s")
            print(f"  RSS({sizes[-1]})/RSS({sizes[0]}) = {rss[sizes[-1]] / rss[sizes[0]]:.3f}  (target <= 1.05)")
        if not args.skip_speed:
            times = {"disk": [], "memory": []}
            sums = {}
            for i in range(args.speed_rounds):
                for kind in (["disk", "memory"] if i % 2 == 0 else ["memory", "disk"]):
                    r = run(dict(base, frames=100, memory=kind == "memory", out=os.path.join(tmp, f"speed_{kind}_{i}")))
                    times[kind].append(r["seconds"])
                    sums[kind] = r["checksum"]
            d, m = min(times["disk"]), min(times["memory"])
            print(f"Same job, N=100: disk stores {d:.1f} s, memory stores {m:.1f} s (best of {args.speed_rounds}, interleaved); "
                  f"ratio disk/memory = {d / m:.3f}  (target <= 1.10); identical frames: {sums['disk'] == sums['memory']}")
        if not args.skip_disk:
            frames = 24
            big = write_video(os.path.join(tmp, "big.mp4"), frames, 1280, 768)
            r = run(dict(base, video=big, frames=frames, height=768, width=1280, steps=1, measure_disk=True, out=os.path.join(tmp, "out_big")))
            print(f"Output folder at 1280x768 ({frames} frames, 2 units): peak {r['peak_folder_bytes'] / frames / 2**20:.2f} MiB per frame  (target <= 16)")


if __name__ == "__main__":
    main()
