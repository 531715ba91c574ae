"""Accurate mode: all frames of the window remapped onto the target together, against their mean.

For target ``t``: the sources ``[t − w, t + w] ∩ [0, N)``, *including* ``t``, in chunks of
``batch_size``, each chunk one engine call with the target guide repeated and
``use_mean_target_style`` (the style error is measured against the chunk's mean remapped
style, so the sources agree with each other). The result is the mean of all remapped frames
(DiffSynth-Studio ``runners/accurate.py``). Quality is best with ``batch_size >= 2w + 1``
(one chunk: every source sees the whole window's mean).

Memory: the sum of one target's chunks and the LRU of decoded inputs (``2w + 1`` frames span
a window), the original held ``2w + 1`` float32 frames per target plus every frame.
"""
from __future__ import annotations

from typing import Any

from ....cache import Store, WriteBehind, image_store
from .common import (BatchLoader, EngineSettings, FrameReader, MatcherFactory, Progress, RunStats, check_output_store,
                     derive_seed, engine_device, open_inputs, prefetched, remap, save_original_style, to_output_frame)

__all__ = ["accurate_blend", "accurate_plan", "AccurateModeRunner"]


def accurate_plan(n: int, window_size: int, batch_size: int, targets):
    """For each target ``t`` in ``targets``: ``("batch", (t, (s, ...)))`` per chunk of sources, then ``("done", t)``."""
    for t in targets:
        left, right = max(t - window_size, 0), min(t + window_size + 1, n)
        for start in range(left, right, batch_size):
            yield "batch", (t, tuple(range(start, min(start + batch_size, right))))
        yield "done", t


def accurate_blend(guide: Any, style: Any, out: Store | None = None, *, window_size: int = 60, batch_size: int = 8,
                   matcher_factory: MatcherFactory | None = None, seed: int = 0, frame_cache: int | None = None,
                   progress_bar_cmd=None, progress_callback=None, stats: RunStats | None = None,
                   span: tuple[int, int] | None = None) -> Store:
    """Deflicker ``style`` guided by ``guide`` in accurate mode into ``out`` (default: in memory); returns ``out``.

    Frames already in ``out`` are kept (a rerun computes the missing ones, identically).
    ``span=(a, b)``: only the frames ``a <= t < b`` (one process's share), each as the whole call gives it.
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
    capacity = min(n, frame_cache if frame_cache is not None else 2 * window_size + batch_size + 2)
    readers = {"guide": FrameReader(guide, (width, height), capacity, "guide"),
               "style": FrameReader(style, (width, height), capacity, "style")}
    factory = matcher_factory if matcher_factory is not None else EngineSettings()
    matcher = factory(height, width, use_mean_target_style=True)
    device = engine_device(matcher)
    stats = stats if stats is not None else RunStats()

    def needs(event):
        kind, value = event
        if kind == "done":
            return []
        t, sources = value
        return [("guide", t)] + [(name, s) for s in sources for name in ("guide", "style")]

    bar = Progress("FastBlend accurate", len(missing), progress_bar_cmd, progress_callback)
    total = None
    events = accurate_plan(n, window_size, batch_size, missing)
    with WriteBehind(out, max_pending=2) as writer, prefetched(BatchLoader(readers, needs), events) as stream:
        for (kind, value), frames in stream:
            if kind == "batch":
                t, sources = value
                results = remap(matcher, device, [frames["guide", s] for s in sources], [frames["guide", t]] * len(sources),
                                [frames["style", s] for s in sources], derive_seed(seed, "accurate", t, sources[0]))
                stats.engine_calls += 1
                stats.remaps += len(sources)
                chunk = results.sum(dim=0)
                total = chunk if total is None else total + chunk
                stats.held(0, 1)
            else:
                t = value
                count = min(t + window_size + 1, n) - max(t - window_size, 0)
                writer.put(t, to_output_frame(total / count))
                total = None
                stats.frames_written += 1
                bar.update()
    bar.close()
    return out


class AccurateModeRunner:
    """The original's runner interface: ``run(frames_guide, frames_style, batch_size, window_size, ebsynth_config, desc=..., save_path=None)``."""

    def run(self, frames_guide, frames_style, batch_size, window_size, ebsynth_config, desc="Accurate Mode", save_path=None, **kwargs):
        out = accurate_blend(frames_guide, frames_style, window_size=window_size, batch_size=batch_size,
                             matcher_factory=EngineSettings(**ebsynth_config), **kwargs)
        save_original_style(out, save_path)
        return out
