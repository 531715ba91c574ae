"""UNet speed vs diffusers, and peak RAM of loading a full-size checkpoint.

1. Our ``SDUNet`` and diffusers' ``UNet2DConditionModel`` with the full SD 1.5 config and
   the same random weights (ours converted with our own key map), fp32 on the CPU,
   64×64 latent, batch 2, runs interleaved (A B B A ...) so machine noise hits both alike.
   Prints each median and the ratio ours/diffusers (target ≤ 1.0).
2. A full-size SD 1.5 single-file checkpoint (UNet + VAE + CLIP text, random weights) is
   written, then loaded by ``ModelManager`` in a fresh subprocess; its peak RSS growth is
   compared with the loaded parameters' size in the target dtype (target ≤ 1.3).

Usage: python bench/unet_speed.py [--rounds 3] [--dtype fp16] [--skip-speed] [--skip-load]
Needs diffusers (test extra). Takes ~3 minutes and ~8 GB RAM on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def full_sd15_unet_pair(seed: int = 0):
    from diffusers import UNet2DConditionModel

    from diffsynth.models.convert import convert_unet_to_diffusers
    from diffsynth.models.sd_unet import SDUNet, SDUNetConfig
    from diffsynth.testing.factory import diffusers_unet_config

    config = SDUNetConfig()
    with torch.device("meta"):
        ours = SDUNet(config)
    ours = ours.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02, generator=g)
    ours.eval().requires_grad_(False)
    dcfg = {k: v for k, v in diffusers_unet_config(config).items() if not k.startswith("_")}
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**dcfg)
    theirs.load_state_dict(convert_unet_to_diffusers(ours.state_dict(), config), strict=True, assign=True)
    return ours, theirs.eval().requires_grad_(False)


def bench_speed(rounds: int) -> dict:
    ours, theirs = full_sd15_unet_pair()
    x = torch.randn(2, 4, 64, 64)
    ctx = torch.randn(2, 77, 768)
    t = torch.tensor(500)
    runs = {"ours": lambda: ours(x, t, ctx), "diffusers": lambda: theirs(x, t.expand(2), encoder_hidden_states=ctx).sample}
    times = {name: [] for name in runs}
    with torch.inference_mode():
        diff = (runs["ours"]() - runs["diffusers"]()).abs().max().item()  # also a warm-up of both
        for i in range(rounds):
            order = ["ours", "diffusers"] if i % 2 == 0 else ["diffusers", "ours"]
            for name in order:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"max_abs_diff": diff, "ours_s": med["ours"], "diffusers_s": med["diffusers"], "ratio": med["ours"] / med["diffusers"], "runs": times}


_LOAD_CHILD = r"""
import json, sys, torch
from diffsynth import ModelManager
def status_kb(field):
    # VmHWM is this process image's peak RSS; ru_maxrss would carry over the forking parent's peak across exec
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
dtype = {"fp16": torch.float16, "fp32": torch.float32}[sys.argv[2]]
base = status_kb("VmRSS")
mm = ModelManager(torch_dtype=dtype, device="cpu")
mm.load_models([sys.argv[1]])
peak = status_kb("VmHWM")
params = sum(p.numel() * p.element_size() for m in mm.model.values() for p in m.parameters())
print(json.dumps({"base_kb": base, "peak_kb": peak, "param_bytes": params}))
"""


def bench_load(dtype: str) -> dict:
    from diffsynth.models.sd_text_encoder import CLIPTextConfig
    from diffsynth.models.sd_unet import SDUNetConfig
    from diffsynth.models.sd_vae import SDVAEConfig
    from diffsynth.testing.factory import TinySD, write_sd_checkpoint

    full = TinySD(unet=SDUNetConfig(), vae=SDVAEConfig(), text=CLIPTextConfig())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sd15_random.safetensors")
        start = time.perf_counter()
        write_sd_checkpoint(path, seed=0, dtype=dtype, configs=full)
        written = time.perf_counter() - start
        out = subprocess.run([sys.executable, "-c", _LOAD_CHILD, path, dtype], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        size = os.path.getsize(path)
    growth = (r["peak_kb"] - r["base_kb"]) * 1024
    return {"file_bytes": size, "param_bytes": r["param_bytes"], "peak_growth_bytes": growth, "ratio": growth / r["param_bytes"], "write_s": written}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-load", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_speed:
        s = bench_speed(args.rounds)
        print(f"UNet SD1.5 fp32 CPU, batch 2, 64x64 latent, {args.rounds} interleaved rounds (max |diff| {s['max_abs_diff']:.1e}):")
        print(f"  ours      median {s['ours_s']:.2f} s  runs {[round(v, 2) for v in s['runs']['ours']]}")
        print(f"  diffusers median {s['diffusers_s']:.2f} s  runs {[round(v, 2) for v in s['runs']['diffusers']]}")
        print(f"  time ratio ours/diffusers = {s['ratio']:.3f}  (target <= 1.0)")
    if not args.skip_load:
        r = bench_load(args.dtype)
        print(f"Loading a full-size SD1.5 checkpoint ({args.dtype}, {r['file_bytes'] / 2**30:.2f} GiB file) with ModelManager:")
        print(f"  loaded parameters {r['param_bytes'] / 2**30:.2f} GiB, peak RSS growth {r['peak_growth_bytes'] / 2**30:.2f} GiB")
        print(f"  peak RSS / parameter size = {r['ratio']:.3f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
