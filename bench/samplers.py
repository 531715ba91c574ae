"""Fewer steps: UNet calls and wall time of one tiny Diffutoon job with DDIM 10 steps vs DPM-Solver++ 2M Karras 6 vs LCM 4.

The job is ``diffsynth demo``'s project (SD 1.x + AnimateDiff + 2 ControlNet units, FastBlend on the
final frames; tiny random-weight models; LCM with AnimateLCM's motion module, at cfg 1.5), ``--frames`` frames of ``--size`` px, windows of 8 frames
with stride 4, rendered once per sampler into a fresh folder, one after the other in this process
(the models are loaded by each render, as a user's run does). Prints per sampler the UNet calls
(counted at the UNet's forward), the wall time of the whole render and of its denoising stage
(from the manifest), and the ratios to DDIM. Random weights: the images are noise; this measures
cost, not quality (the samplers' numerics are checked against diffusers in tests/test_samplers.py).

Usage: OMP_NUM_THREADS=2 python bench/samplers.py [--frames 16] [--size 64]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

JOBS = (("ddim", 10), ("dpmpp_2m_karras", 6), ("lcm", 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    from diffsynth.models.sd_unet import SDUNet
    from diffsynth.pipelines.runner import SDVideoPipelineRunner
    from diffsynth.testing.lcm_files import write_animatelcm_motion_module
    from diffsynth.testing.runner_files import write_tiny_project

    calls = [0]
    forward = SDUNet.forward

    def counting(self, *a, **k):
        calls[0] += 1
        return forward(self, *a, **k)

    SDUNet.forward = counting
    with tempfile.TemporaryDirectory() as tmp:
        base = write_tiny_project(os.path.join(tmp, "project"), frames=args.frames, size=args.size, smoother=True)
        animatelcm = write_animatelcm_motion_module(os.path.join(tmp, "project", "models", "AnimateDiff", "AnimateLCM_sd15_t2v.ckpt"))
        base["pipeline"]["pipeline_inputs"].update(animatediff_batch_size=8, animatediff_stride=4)
        results = []
        for sampler, steps in JOBS:
            config = copy.deepcopy(base)
            config["data"]["output_folder"] = os.path.join(tmp, f"out_{sampler}")
            config["pipeline"]["pipeline_inputs"].update(sampler=sampler, num_inference_steps=steps, cfg_scale=1.5 if sampler == "lcm" else 7.5)
            if sampler == "lcm":  # LCM renders with AnimateLCM's motion module in place of AnimateDiff's (same size: same cost)
                config["models"]["model_list"] = [animatelcm if "AnimateDiff" in p else p for p in config["models"]["model_list"]]
            calls[0] = 0
            began = time.perf_counter()
            SDVideoPipelineRunner(progress_bar_cmd=None).run(config)
            seconds = time.perf_counter() - began
            with open(os.path.join(config["data"]["output_folder"], "manifest.json"), encoding="utf-8") as f:
                denoise = json.load(f)["stages"]["4"]["seconds"]
            results.append((sampler, steps, calls[0], seconds, denoise))
    SDUNet.forward = forward
    ddim = results[0]
    print(f"{args.frames} frames of {args.size}x{args.size}, windows of 8 (stride 4), tiny models, CPU")
    print(f"{'sampler':<18}{'steps':>6}{'UNet calls':>12}{'render s':>10}{'denoise s':>11}{'calls / DDIM':>14}{'render / DDIM':>15}")
    for sampler, steps, n, seconds, denoise in results:
        print(f"{sampler:<18}{steps:>6}{n:>12}{seconds:>10.1f}{denoise:>11.1f}{n / ddim[2]:>14.3f}{seconds / ddim[3]:>15.3f}")


if __name__ == "__main__":
    main()
