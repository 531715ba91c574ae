"""Counts of work, from a config alone: what each stage will call, for the estimates of time (DESIGN §3).

The stage table (``stages.py``) reports its stages' work through these helpers: UNet and
ControlNet calls and the frames they process, VAE encodes and decodes, annotator frames, the
smoother's patch matches (FastBlend, from the same plan the engine runs) and RIFE passes. A
count is what the pipeline calls for a whole render from nothing; the tests hook the models
and check each one against a real run.
"""
from __future__ import annotations

from ..extensions.FastBlend.runners.fast import _RIGHT_ORIGIN
from ..extensions.FastBlend.runners.fenwick import TableBatch, WindowBatch, fast_pass_plan
from ..processors.FastBlend import DEFAULT_WINDOW_SIZE, default_block_frames
from .sd_video import sliding_windows


def denoise_pass(inputs: dict, n: int, units: int) -> dict[str, int]:
    """One pass over the sliding windows (a denoising step, or the x0 pass of a smoothed step)."""
    windows = sliding_windows(n, inputs.get("animatediff_batch_size", 16), inputs.get("animatediff_stride", 8))
    branches = 2 if inputs.get("cfg_scale", 7.5) != 1.0 else 1  # positive and negative prompt
    chunk = max(1, int(inputs.get("controlnet_batch_size", 1)))
    frames = sum(w.end - w.start for w in windows)
    return {"UNet calls": len(windows) * branches, "UNet frames": frames * branches,
            "ControlNet calls": branches * units * sum(-(-(w.end - w.start) // chunk) for w in windows),
            "ControlNet frames": frames * branches * units}


def fastblend_passes(n: int, window_size: int, batch_size: int, block_frames: int) -> tuple[int, int]:
    """Patch matches of fast mode's left and right passes over ``n`` frames, block by block as the processor runs them."""
    block = block_frames or n
    left = right = 0
    for first in range(0, n, max(block, 1)):
        stop = min(first + block, n)
        for forward in (True, False):
            lo = max(first - window_size, 0) if forward else _RIGHT_ORIGIN - min(stop + window_size, n)
            end = stop if forward else _RIGHT_ORIGIN - first
            resume = (first if forward else _RIGHT_ORIGIN - stop) - lo
            count = sum(len(e.tasks) for e in fast_pass_plan(end - lo, window_size, batch_size, resume, lo)
                        if isinstance(e, (TableBatch, WindowBatch)))
            if forward:
                left += count
            else:
                right += count
    return left, right


def smoother_work(configs, n: int) -> list[dict[str, int]]:
    """Per processor of a ``smoother_configs`` chain, its work on ``n`` frames (FastBlend fast mode: left and right apart)."""
    work = []
    for entry in configs or []:
        kind = entry.get("processor_type") if isinstance(entry, dict) else None
        options = (entry.get("config") or {}) if isinstance(entry, dict) else {}
        if kind == "FastBlend":
            w, batch = int(options.get("window_size", DEFAULT_WINDOW_SIZE)), int(options.get("batch_size", 8))
            mode = options.get("inference_mode", "fast")
            span = [min(t + w, n - 1) - max(t - w, 0) + 1 for t in range(n)]  # frames of each target's window
            if mode == "fast":
                block = options.get("block_frames")
                left, right = fastblend_passes(n, w, batch, default_block_frames(w) if block is None else int(block))
                work.append({"FastBlend remaps (left pass)": left, "FastBlend remaps (right pass)": right})
            elif mode == "balanced":  # a remap here costs about half of fast mode's (estimate/costs.py)
                work.append({"FastBlend remaps (balanced)": sum(s - 1 for s in span)})
            elif mode == "accurate":
                work.append({"FastBlend remaps (accurate)": sum(span)})
            else:
                work.append({})
        elif kind == "RIFE":
            work.append({"RIFE frames": max(n - 2, 0)})  # every inner frame, one pass (two interpolations each)
        else:
            work.append({"edited frames": n} if kind in ("Contrast", "Sharpness") else {})
    return work


def merged(*counts: dict[str, int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for key, value in count.items():
            total[key] = total.get(key, 0) + value
    return {key: value for key, value in total.items() if value}
