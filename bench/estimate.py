"""How close ``diffsynth estimate`` comes: each job's estimates side by side with the measured run.

Jobs: tiny and larger random-weight SD 1.x model sets, sizes 64-192, 12-48 frames, 0-2 ControlNet units,
no smoother, FastBlend fast (final frames, in the loop, in blocks), balanced mode, FastBlend+Contrast.
Each job is estimated in one fresh process (the default, then ``--calibrate``, then from the history of
the earlier jobs when one of the same models and size ran before) and rendered in another fresh process,
whose run measures itself (the manifest's ``measured``: seconds per stage, the output folder's peak bytes
sampled after every file the stores commit, the process's peak resident memory) and keeps the estimate it
made itself, as ``diffsynth run`` does ("in the run": with the calibration and history of what ran before).
Prints, per job and source, measured ÷ predicted for disk peak, RAM peak (of the run's own estimate: the
others were made in another process) and time, and the worst of each over all jobs.

Targets (issue 15): disk within ±10%, RAM within ±20%, time within ±25% with --calibrate or history,
within a factor of 3 from the defaults.

Usage: python bench/estimate.py [--quick] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

LARGER_UNET = dict(model_channels=128, channel_mult=(1, 2, 2), num_res_blocks=2, transformer_depth=(1, 1, 0), context_dim=128)


def _jobs(quick: bool) -> list[dict]:
    fast = [{"processor_type": "FastBlend", "config": {"window_size": 3}}]
    blocks = [{"processor_type": "FastBlend", "config": {"window_size": 2, "block_frames": 6}}]
    jobs = [  # in pairs of the same models and size where the second can use the first's history
        dict(name="tiny 64px 12f, 2 units, FastBlend", size=64, frames=12, units=2, smoother=fast),
        dict(name="tiny 64px 36f, 2 units, FastBlend", size=64, frames=36, units=2, smoother=fast),
        dict(name="tiny 128px 12f, 1 unit, no smoother", size=128, frames=12, units=1, smoother=None),
        dict(name="tiny 128px 24f, 1 unit, no smoother", size=128, frames=24, units=1, smoother=None),
        dict(name="tiny 192px 16f, FastBlend in blocks", size=192, frames=16, units=0, smoother=blocks),
        dict(name="tiny 192px 24f, FastBlend in blocks", size=192, frames=24, units=0, smoother=blocks),
        dict(name="tiny 192px 24f, balanced + Contrast", size=192, frames=24, units=0,
             smoother=[{"processor_type": "FastBlend", "config": {"window_size": 2, "inference_mode": "balanced"}},
                       {"processor_type": "Contrast", "config": {"rate": 1.1}}]),
        dict(name="tiny 128px 16f, 2 units, FastBlend in the loop", size=128, frames=16, units=2, smoother=fast, in_loop=True),
        dict(name="tiny 128px 24f, 2 units, FastBlend in the loop", size=128, frames=24, units=2, smoother=fast, in_loop=True),
        dict(name="larger 128px 12f, no smoother", size=128, frames=12, units=0, smoother=None, larger=True),
        dict(name="larger 128px 24f, FastBlend", size=128, frames=24, units=0, smoother=fast, larger=True),
        dict(name="larger 128px 36f, FastBlend", size=128, frames=36, units=0, smoother=fast, larger=True),
    ]
    return jobs[:3] if quick else jobs


def _project(folder: str, job: dict) -> dict:
    from diffsynth.testing.runner_files import write_tiny_project

    config = write_tiny_project(folder, frames=job["frames"], size=job["size"], smoother=bool(job["smoother"]), steps=3)
    models = config["models"]
    if job.get("larger"):
        from diffsynth.models.sd_unet import SDUNetConfig
        from diffsynth.testing.factory import TinySD, write_sd_checkpoint

        larger = os.path.join(folder, "models", "stable_diffusion", "larger_sd15.safetensors")
        if not os.path.isfile(larger):
            write_sd_checkpoint(larger, configs=TinySD(unet=SDUNetConfig(**LARGER_UNET)))
        models["model_list"] = [larger]
        models["controlnet_units"] = []
    units = models["controlnet_units"][:job["units"]]
    dropped = [u["model_path"] for u in models["controlnet_units"][job["units"]:]]
    models["controlnet_units"] = units
    models["model_list"] = [p for p in models["model_list"] if p not in dropped]
    config["data"]["controlnet_frames"] = config["data"]["controlnet_frames"][:len(units)]
    config["smoother_configs"] = job["smoother"] or []
    inputs = config["pipeline"]["pipeline_inputs"]
    inputs.update(animatediff_batch_size=8, animatediff_stride=4, smoother_progress_ids=[1] if job.get("in_loop") else [-1])
    return config


# ---------------------------------------------------------------------- children (fresh processes)


def _child_estimate(config_path: str, result_path: str) -> None:
    from diffsynth.estimate.core import current_rss, estimate_plan
    from diffsynth.pipelines.runner import SDVideoPipelineRunner

    base = current_rss()
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    plan = SDVideoPipelineRunner(progress_bar_cmd=None).prepare(config)
    results = {}
    for source, kwargs in (("default", dict(use_history=False)), ("history", dict(use_history=True)), ("calibrated", dict(calibrate=True))):
        start = time.perf_counter()
        estimate = estimate_plan(plan, base_rss=base, **kwargs)
        results[source] = dict(estimate.as_json(), took=time.perf_counter() - start)
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(results, f)


def _child_run(config_path: str, result_path: str) -> None:
    import resource

    from diffsynth.cache.stores import DiskStore
    from diffsynth.estimate import meter as meter_module
    from diffsynth.pipelines.runner import SDVideoPipelineRunner

    running = []
    enter = meter_module.Meter.__enter__

    def remember(self):
        running.append(self)
        return enter(self)

    put = DiskStore._put

    def commit_and_sample(self, slot, value):  # every committed file is followed by a sample: no peak is missed
        put(self, slot, value)
        if running:
            running[-1].sample()

    meter_module.Meter.__enter__ = remember
    DiskStore._put = commit_and_sample
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    start = time.perf_counter()
    SDVideoPipelineRunner(progress_bar_cmd=None, estimate=True).run(config)  # as `diffsynth run` does
    wall = time.perf_counter() - start
    with open(os.path.join(config["data"]["output_folder"], "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    measured = {sid: record.get("measured", {}) for sid, record in manifest["stages"].items()}
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump({"measured": measured, "wall": wall, "estimate": manifest["estimate"], "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, f)


def _has_history(estimate: dict) -> bool:
    """Whether the estimate's costliest stage was scaled by earlier runs (else the 'history' estimate is a calibration or default)."""
    costliest = max(estimate["stages"].values(), key=lambda stage: stage["seconds"])
    return "× history" in costliest["source"]


def _child(mode: str, config_path: str, result_path: str) -> None:
    (_child_estimate if mode == "estimate" else _child_run)(config_path, result_path)


def _spawn(mode: str, config_path: str, result_path: str, env: dict) -> dict:
    subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, config_path, result_path], check=True, env=env)
    with open(result_path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="three jobs only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the children (default: torch's)")
    parser.add_argument("--details", action="store_true", help="per stage: measured and predicted seconds of the run's own estimate")
    parser.add_argument("--only", type=int, nargs="*", default=None, help="only the jobs with these numbers (0-based; history then has fewer runs)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    worst: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_estimate_") as tmp:
        env["DIFFSYNTH_CACHE_DIR"] = os.path.join(tmp, "cache")  # a history of this bench only, grown job by job
        print(f"{'job':<46} {'source':<10} {'disk m/p':>9} {'RAM m/p':>9} {'time m/p':>9}   measured: disk, RAM, time")
        for k, job in enumerate(_jobs(args.quick)):
            if args.only is not None and k not in args.only:
                continue
            folder = os.path.join(tmp, f"project_{job['size']}_{'larger' if job.get('larger') else 'tiny'}_{job['frames']}")
            config = _project(folder, job)
            config["data"]["output_folder"] = os.path.join(tmp, f"out_{k}")
            config_path = os.path.join(tmp, f"job_{k}.json")
            with open(config_path, "w", encoding="utf-8") as f:
                json.dump(config, f)
            estimates = _spawn("estimate", config_path, os.path.join(tmp, f"estimate_{k}.json"), env)
            run = _spawn("run", config_path, os.path.join(tmp, f"run_{k}.json"), env)
            estimates = {"in the run": dict(run["estimate"], took=0.0), **estimates}
            measured_disk = max(m.get("disk_peak_bytes", 0) for m in run["measured"].values())
            measured_ram = run["maxrss"]
            measured_seconds = sum(m.get("seconds", 0.0) for m in run["measured"].values())
            for source, estimate in estimates.items():
                if source == "history" and not _has_history(estimate):
                    continue  # no earlier run of these models at this size with stages of the same kinds
                total = estimate["total"]
                ratios = {"disk": measured_disk / total["disk_peak_bytes"], "time": measured_seconds / max(total["seconds"], 1e-9)}
                if source == "in the run":  # the RAM estimate is of its own process: only the run's own says it
                    ratios["RAM"] = measured_ram / total["ram_peak_bytes"]
                for what, ratio in ratios.items():
                    entry = worst.setdefault(source, {})
                    if what not in entry or abs(ratio - 1) > abs(entry[what] - 1):
                        entry[what] = ratio
                ram = f"{ratios['RAM']:>9.3f}" if "RAM" in ratios else f"{'-':>9}"
                print(f"{job['name']:<46} {source:<10} {ratios['disk']:>9.3f} {ram} {ratios['time']:>9.3f}   "
                      f"{measured_disk / 2**20:.2f} MiB, {measured_ram / 2**20:.0f} MiB, {measured_seconds:.1f} s "
                      f"(estimate took {estimate['took']:.1f} s)")
            if args.details:
                predicted = run["estimate"]["stages"]
                print("    " + "  ".join(f"{sid}: {run['measured'][sid].get('seconds', 0):.2f}/{predicted[sid]['seconds']:.2f}"
                                         for sid in sorted(predicted, key=int)) + f"   ({predicted['4']['source']})")
    print("\nworst measured ÷ predicted over the jobs (1.000 = exact; 'in the run': the estimate `diffsynth run` makes and keeps,\n"
          "with the calibration and history the jobs before it left; 'history': only where the job's costliest stage had one):")
    for source, entry in worst.items():
        ram = f"   RAM {entry['RAM']:.3f}" if "RAM" in entry else ""
        print(f"  {source:<10} disk {entry['disk']:.3f}{ram}   time {entry['time']:.3f}")


if __name__ == "__main__":
    main()
