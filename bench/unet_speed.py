"""UNet speed vs diffusers, and peak RAM of loading a full-size checkpoint.

1. Our ``SDUNet`` and diffusers' ``UNet2DConditionModel`` with the full SD 1.5 config and
   the same random weights (ours converted with our own key map), fp32 on the CPU,
   64×64 latent, batch 2, runs interleaved (A B B A ...) so machine noise hits both alike.
   Prints each median and the ratio ours/diffusers (target ≤ 1.0).
2. A full-size SD 1.5 single-file checkpoint (UNet + VAE + CLIP text, random weights) is
   written, then loaded by ``ModelManager`` in a fresh subprocess; its peak RSS growth is
   compared with the loaded parameters' size in the target dtype (target ≤ 1.3).

3. ``--model sdxl``: our SDXL UNet (``SDXLUNet``, 2.57 B parameters) vs diffusers'
   ``UNet2DConditionModel(addition_embed_type="text_time")`` with the full SDXL config, fp32 on
   the CPU, 64×64 latent, batch 2, the added condition of a 1024² image; interleaved rounds.
   The two models share one set of weight tensors (diffusers' is assigned our converted
   tensors, which are views), so the pair needs ~10.3 GB, not twice that; the script checks the
   sharing. ``--reduced`` runs the same code on the tiny test config (a smoke test).

Usage: python bench/unet_speed.py [--model sd15|sdxl] [--rounds 3] [--dtype fp16] [--skip-speed] [--skip-load] [--reduced]
Needs diffusers (test extra). SD 1.5: ~3 minutes and ~8 GB RAM on 2 cores; SDXL: ~11 GB RAM and
tens of seconds per forward pass on 2 cores.
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


def unet_pair(model_cls, config, diffusers_config: dict, seed: int = 0):
    """Our UNet with seeded random weights and diffusers' ``UNet2DConditionModel`` over the same tensors."""
    from diffusers import UNet2DConditionModel

    from diffsynth.models.convert import convert_unet_to_diffusers

    with torch.device("meta"):
        ours = model_cls(config)
    ours = ours.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02, generator=g)
    ours.eval().requires_grad_(False)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**{k: v for k, v in diffusers_config.items() if not k.startswith("_")})
    theirs.load_state_dict(convert_unet_to_diffusers(ours.state_dict(), config), strict=True, assign=True)
    theirs.eval().requires_grad_(False)
    if theirs.conv_in.weight.data_ptr() != ours.input_blocks[0][0].weight.data_ptr():
        raise RuntimeError("the diffusers UNet did not take over our weight tensors; the pair would need twice the memory")
    return ours, theirs


def time_interleaved(runs: dict, rounds: int) -> dict:
    """Median seconds of ``runs["ours"]`` and ``runs["diffusers"]`` in A B B A order, their ratio and max difference."""
    times = {name: [] for name in runs}
    with torch.inference_mode():
        diff = (runs["ours"]() - runs["diffusers"]()).abs().max().item()  # also a warm-up of both
        for i in range(rounds):
            for name in (["ours", "diffusers"] if i % 2 == 0 else ["diffusers", "ours"]):
                begin = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - begin)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"max_abs_diff": diff, "ours_s": med["ours"], "diffusers_s": med["diffusers"], "ratio": med["ours"] / med["diffusers"], "runs": times}


def bench_speed(rounds: int) -> dict:
    from diffsynth.models.sd_unet import SDUNet, SDUNetConfig
    from diffsynth.testing.factory import diffusers_unet_config

    config = SDUNetConfig()
    ours, theirs = unet_pair(SDUNet, config, diffusers_unet_config(config))
    x = torch.randn(2, 4, 64, 64)
    ctx = torch.randn(2, 77, 768)
    t = torch.tensor(500)
    return time_interleaved({"ours": lambda: ours(x, t, ctx), "diffusers": lambda: theirs(x, t.expand(2), encoder_hidden_states=ctx).sample}, rounds)


def bench_sdxl_speed(rounds: int, reduced: bool) -> dict:
    from diffsynth.models.sdxl_unet import SDXL_UNET_CONFIG, SDXLUNet, add_time_ids, sdxl_added_condition
    from diffsynth.testing.factory import TINY_SDXL_TEXT_2, TINY_SDXL_UNET, diffusers_sdxl_unet_config

    config = TINY_SDXL_UNET if reduced else SDXL_UNET_CONFIG
    pooled_dim = TINY_SDXL_TEXT_2.projection_dim if reduced else 1280
    size = 8 if reduced else 64
    start = time.perf_counter()
    ours, theirs = unet_pair(SDXLUNet, config, diffusers_sdxl_unet_config(config))
    built = time.perf_counter() - start
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size, size, generator=g)
    ctx = torch.randn(2, 77, config.context_dim, generator=g)
    pooled = torch.randn(2, pooled_dim, generator=g)
    time_ids = add_time_ids(1024, 1024).expand(2, -1)
    y = sdxl_added_condition(pooled, time_ids, config)
    t = torch.tensor(500)
    runs = {
        "ours": lambda: ours(x, t, ctx, y=y),
        "diffusers": lambda: theirs(x, t.expand(2), encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample,
    }
    params = sum(p.numel() for p in ours.parameters())
    return {"params": params, "build_s": built, "latent": size, **time_interleaved(runs, rounds)}


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


def print_timing(s: dict) -> None:
    print(f"  ours      median {s['ours_s']:.2f} s  runs {[round(v, 2) for v in s['runs']['ours']]}")
    print(f"  diffusers median {s['diffusers_s']:.2f} s  runs {[round(v, 2) for v in s['runs']['diffusers']]}")
    print(f"  time ratio ours/diffusers = {s['ratio']:.3f}  (target <= 1.0)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--model", default="sd15", choices=["sd15", "sdxl"], help="sdxl: the SDXL UNet speed comparison only")
    ap.add_argument("--reduced", action="store_true", help="with --model sdxl: the tiny test config (a smoke test of the script)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.model == "sdxl":
        s = bench_sdxl_speed(args.rounds, args.reduced)
        which = "tiny test config" if args.reduced else "full config"
        print(f"UNet SDXL ({which}, {s['params'] / 1e9:.2f} B parameters, built in {s['build_s']:.1f} s) fp32 CPU, batch 2, "
              f"{s['latent']}x{s['latent']} latent, {args.rounds} interleaved rounds (max |diff| {s['max_abs_diff']:.1e}):")
        print_timing(s)
        return
    if not args.skip_speed:
        s = bench_speed(args.rounds)
        print(f"UNet SD1.5 fp32 CPU, batch 2, 64x64 latent, {args.rounds} interleaved rounds (max |diff| {s['max_abs_diff']:.1e}):")
        print_timing(s)
    if not args.skip_load:
        r = bench_load(args.dtype)
        print(f"Loading a full-size SD1.5 checkpoint ({args.dtype}, {r['file_bytes'] / 2**30:.2f} GiB file) with ModelManager:")
        print(f"  loaded parameters {r['param_bytes'] / 2**30:.2f} GiB, peak RSS growth {r['peak_growth_bytes'] / 2**30:.2f} GiB")
        print(f"  peak RSS / parameter size = {r['ratio']:.3f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
