"""Balanced mode: every frame of the window remapped directly onto the target, then averaged.

For target ``t``: the mean of ``style_t`` and ``R(s -> t)`` for every ``s`` in
``[t − w, t + w] ∩ [0, N)``, ``s ≠ t`` (DiffSynth-Studio ``runners/balanced.py``). ``2w``
patch-match calls per frame, no tables. The tasks are ordered by target and cut into batches
of ``batch_size``; only the targets with a task in flight have an accumulator, so memory is
``O(batch + window)`` frames (the LRU of decoded inputs spans the window).

Bug fixed: the original wrote a frame when its count reached the window size but wrote the
mean from *before* adding that last contribution, so every frame missed one source. Here a
frame is written only after its last batch has been added (its ``done`` event).
"""
from __future__ import annotations

from typing import Any

import torch

from ....cache import Store, WriteBehind, image_store
from .common import (BatchLoader, EngineSettings, FrameReader, MatcherFactory, Progress, RunStats, check_output_store,
                     chunk_with_completion, derive_seed, engine_device, open_inputs, prefetched, remap, save_original_style,
                     to_output_frame)

__all__ = ["balanced_blend", "balanced_plan", "BalancedModeRunner"]


def balanced_plan(n: int, window_size: int, batch_size: int, todo: bytes | bytearray | None = None):
    """``("batch", ((source, target), ...))`` and ``("done", target)`` events, in order.

    ``todo[t]`` true: frame ``t`` is to be computed (default: all). A batch runs when it holds
    a task of such a frame; batches are cut from the whole task list, so they do not change
    with ``todo`` (same batches, same seeds, same numbers).
    """

    def stream():
        for t in range(n):
            yield t, [(s, t) for s in range(max(t - window_size, 0), min(t + window_size + 1, n)) if s != t]

    for kind, value in chunk_with_completion(stream(), batch_size):
        if kind == "batch":
            if todo is None or any(todo[t] for _, t in value):
                yield kind, value
        elif todo is None or todo[value]:
            yield kind, value


def balanced_blend(guide: Any, style: Any, out: Store | None = None, *, window_size: int = 60, batch_size: int = 8,
                   matcher_factory: MatcherFactory | None = None, seed: int = 0, frame_cache: int | None = None,
                   progress_bar_cmd=None, progress_callback=None, stats: RunStats | None = None,
                   span: tuple[int, int] | None = None) -> Store:
    """Deflicker ``style`` guided by ``guide`` in balanced mode into ``out`` (default: in memory); returns ``out``.

    Frames already in ``out`` are kept; a rerun computes the missing ones, identically.
    ``span=(a, b)``: only the frames ``a <= t < b`` (one process's share), each as the whole call gives it.
    ``frame_cache``: decoded frames kept per input (default ``2·window_size + batch_size + 2``).
    """
    guide, style, n, (width, height) = open_inputs(guide, style)
    if window_size < 0 or batch_size < 1:
        raise ValueError(f"window_size must be >= 0 and batch_size >= 1, got {window_size} and {batch_size}")
    out = check_output_store(out if out is not None else image_store(None, n, size=(width, height)), n, "result")
    first, stop = span if span is not None else (0, n)
    if not 0 <= first <= stop <= n:
        raise ValueError(f"span must be (a, b) with 0 <= a <= b <= {n} (the number of frames), got {span}")
    missing = [t for t in out.missing() if first <= t < stop]
    if not missing:
        return out
    todo = bytearray(n)
    for t in missing:
        todo[t] = 1
    capacity = min(n, frame_cache if frame_cache is not None else 2 * window_size + batch_size + 2)
    readers = {"guide": FrameReader(guide, (width, height), capacity, "guide"),
               "style": FrameReader(style, (width, height), capacity, "style")}
    factory = matcher_factory if matcher_factory is not None else EngineSettings()
    matcher = factory(height, width)
    device = engine_device(matcher)
    stats = stats if stats is not None else RunStats()

    def needs(event):
        kind, value = event
        if kind == "batch":
            return [(name, i) for s, t in value for name, i in (("guide", s), ("guide", t), ("style", s))]
        return [("style", value)]

    sums: dict[int, torch.Tensor] = {}
    bar = Progress("FastBlend balanced", len(missing), progress_bar_cmd, progress_callback)
    events = balanced_plan(n, window_size, batch_size, todo)
    with WriteBehind(out, max_pending=2) as writer, prefetched(BatchLoader(readers, needs), events) as stream:
        for (kind, value), frames in stream:
            if kind == "batch":
                results = remap(matcher, device, [frames["guide", s] for s, _ in value], [frames["guide", t] for _, t in value],
                                [frames["style", s] for s, _ in value], [derive_seed(seed, "balanced", s, t) for s, t in value])
                stats.engine_calls += 1
                stats.remaps += len(value)
                for (_, t), result in zip(value, results):
                    if todo[t]:
                        sums[t] = sums[t] + result if t in sums else result
                stats.held(0, len(sums))
            else:
                # Every contribution of t is in: write now. (The original wrote when the count reached the
                # window size but wrote the mean from before adding that last remap: the early-emit bug.)
                t = value
                count = min(t + window_size + 1, n) - max(t - window_size, 0)
                total = frames["style", t].to(torch.float32)
                remapped = sums.pop(t, None)
                if remapped is not None:
                    total = total + remapped
                writer.put(t, to_output_frame(total / count))
                stats.frames_written += 1
                bar.update()
    bar.close()
    return out


class BalancedModeRunner:
    """The original's runner interface: ``run(frames_guide, frames_style, batch_size, window_size, ebsynth_config, desc=..., save_path=None)``."""

    def run(self, frames_guide, frames_style, batch_size, window_size, ebsynth_config, desc="Balanced Mode", save_path=None, **kwargs):
        out = balanced_blend(frames_guide, frames_style, window_size=window_size, batch_size=batch_size,
                             matcher_factory=EngineSettings(**ebsynth_config), **kwargs)
        save_original_style(out, save_path)
        return out
