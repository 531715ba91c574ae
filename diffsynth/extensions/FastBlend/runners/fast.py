"""Fast mode: two streaming Fenwick passes (left, then right, merging as it goes), DESIGN §3 stages 6-7.

1. left pass: ``L_t`` (the window ``[t - w, t]`` blended onto frame ``t``) into ``left``;
2. right pass: the same on the reversed sequence, ``R_t`` for ``[t, t + w]``, merged as soon as it
   is ready: ``F_t = (w_L·L_t + w_R·R_t − style_t) / (w_L + w_R − 1)`` (the centre frame is in
   both halves, so it is taken out once), clipped and truncated to uint8, into ``out``.

``R_t`` is never stored: the right pass writes through :class:`MergingStore`, whose ``put(t, R_t)``
reads ``L_t`` and ``style_t`` and commits ``F_t``, and whose ``missing()`` is ``out.missing()``, so
the right pass resumes after the longest run of final frames committed from its start. That
saves a partial file per frame on disk (the output folder's peak at 1280×768: issue #4) and a
separate merge pass over three stores. A caller that wants ``R_t`` kept passes a ``right``
store: then the right pass stores it and :func:`merge_partials` merges afterwards, with the
same numbers (the tests compare the two routes).

The weights are counts, ``w_L = t − max(t − w, 0) + 1`` and ``w_R = min(t + w, N − 1) − t + 1``,
so the partial files hold only the frame. They are float16 by default (``partial_dtype``): half
the disk of float32, and the merge moves by at most ~0.07 of a level (float16 keeps 11 bits;
values are at most 255), below the uint8 step. ``R_t`` is rounded to ``partial_dtype`` too, stored
or not, so both routes give the same frames. Pass ``torch.float32`` to keep them exact.

Memory: the nodes alive (about ``w + 1`` float32 frames, see :mod:`.fenwick`), the table
accumulators of the frames in the current table batch, the window accumulators of the targets
in the current window batch, and an LRU of recently read uint8 frames; nothing grows with N.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch

from ....cache import Prefetcher, Store, TensorCodec, WriteBehind, image_store, tensor_store
from .common import (BatchLoader, EngineSettings, FrameReader, MatcherFactory, Progress, RunStats, check_output_store,
                     derive_seed, engine_device, open_inputs, prefetched, remap, save_original_style, to_output_frame)
from .fenwick import NodeReady, TableBatch, WindowBatch, fast_pass_plan

__all__ = ["fast_blend", "fast_pass", "merge_partials", "MergingStore", "FastModeRunner"]

logger = logging.getLogger("diffsynth")

_RIGHT_ORIGIN = 1 << 40  # the right pass's positions count down from here (see fast_pass): any video is shorter


def fast_blend(guide: Any, style: Any, out: Store | None = None, *, window_size: int = 60, batch_size: int = 8,
               matcher_factory: MatcherFactory | None = None, seed: int = 0, left: Store | None = None,
               right: Store | None = None, partial_dtype: torch.dtype = torch.float16, frame_cache: int | None = None,
               progress_bar_cmd=None, progress_callback=None, stats: RunStats | None = None, keep_left: bool = True,
               span: tuple[int, int] | None = None) -> Store:
    """Deflicker ``style`` guided by ``guide`` (stores or frame sequences) in fast mode; returns ``out``.

    ``out`` is a writable image store of ``N`` slots (default: in memory); ``left`` is a tensor
    store of ``N`` slots for the left pass's partial results (default: in memory; pass a disk
    store, e.g. ``tensor_store("out/smoother/left", N)``, for long videos and resuming). The
    right pass merges each frame into ``out`` as soon as its ``R_t`` is ready; pass a ``right``
    store only to keep the ``R_t`` (they are then merged in a third pass, same frames).
    Everything already committed in ``out``/``left``/``right`` is kept; a rerun computes only
    what is missing and gives the same frames as an uninterrupted run. The stores must hold
    results of these same inputs and settings (``FastBlendSmoother`` keys its cache folder so).
    ``frame_cache`` is how many decoded frames of each input to keep (default
    ``window_size + batch_size + 2``, about one read per frame and pass). ``keep_left=False``
    deletes each ``L_t`` as soon as ``F_t`` is committed (the disk then holds about one partial
    or final file per frame at a time, not both); a rerun computes no ``L_t`` of a final frame.
    ``span=(a, b)``: only the frames ``a <= t < b`` (one process's share; it reads ``window_size``
    frames more on each side); each is the frame the whole call gives, since a frame's result
    depends only on the frames of its window and the seed.
    """
    guide, style, n, (width, height) = open_inputs(guide, style)
    if window_size < 0 or batch_size < 1:
        raise ValueError(f"window_size must be >= 0 and batch_size >= 1, got {window_size} and {batch_size}")
    out = check_output_store(out if out is not None else image_store(None, n, size=(width, height)), n, "result")
    span = _check_span(span, n)
    if not [t for t in out.missing() if span[0] <= t < span[1]]:
        return out
    shape = (height, width, 3)
    left = check_output_store(left if left is not None else tensor_store(None, n, shape=shape, dtype=partial_dtype), n, "left")
    if right is not None:
        right = check_output_store(right, n, "right")
    capacity = min(n, frame_cache if frame_cache is not None else window_size + batch_size + 2)
    readers = {"guide": FrameReader(guide, (width, height), capacity, "guide"),
               "style": FrameReader(style, (width, height), capacity, "style")}
    factory = matcher_factory if matcher_factory is not None else EngineSettings()
    matcher = factory(height, width)
    device = engine_device(matcher)
    stats = stats if stats is not None else RunStats()
    progress = (progress_bar_cmd, progress_callback)
    if right is None:  # the default: merge each frame as soon as its R_t is ready
        right_out = MergingStore(left, readers["style"].store, out, window_size, size=(width, height), dtype=partial_dtype,
                                 release_left=not keep_left)
    else:
        right_out = right
    for direction, partial in (("left", left), ("right", right_out)):
        fast_pass(direction, readers, partial, matcher, device, window_size=window_size, batch_size=batch_size, seed=seed,
                  partial_dtype=partial_dtype, progress=progress, stats=stats, final=out if direction == "left" else None, span=span)
    if right is not None:
        merge_partials(left, right, readers["style"].store, out, window_size, size=(width, height), progress=progress)
    return out


def fast_pass(direction: str, readers: dict[str, FrameReader], partial: Store, matcher, device, *, window_size: int,
              batch_size: int, seed: int, partial_dtype: torch.dtype = torch.float16, progress=(None, None),
              stats: RunStats | None = None, final: Store | None = None, span: tuple[int, int] | None = None) -> None:
    """One pass (``"left"`` or ``"right"``) of fast mode, writing ``L_t`` (or ``R_t``) of every missing frame into ``partial``.

    ``final``: the output store; frames already in it are not missing (their partial is not needed).
    ``span=(a, b)``: only the frames ``a <= t < b`` (see :func:`fast_blend`).

    The right pass is the left pass on the reversed sequence: frame ``t`` is pass position
    ``ORIGIN − 1 − t`` for a fixed ``ORIGIN`` (``2**40``), not ``N − 1 − t``, so the Fenwick nodes
    (anchored at absolute positions) and the task seeds (derived from frame numbers) of a frame
    do not depend on the length of the video: a frame's result depends only on the frames of its
    window and the seed. It resumes after the longest committed run of frames from its start.
    """
    if direction not in ("left", "right"):
        raise ValueError(f"direction must be 'left' or 'right', got {direction!r}")
    n = len(partial)
    first, stop = _check_span(span, n)
    missing = [i for i in partial.missing() if first <= i < stop]
    if final is not None:  # frames already final need no partial (their L_t may have been released after the merge)
        missing = [i for i in missing if i not in final]
    if not missing:
        return
    forward = direction == "left"
    # The pass runs over the positions of the span's windows: [a - w, b) forward, [a, b + w) backward (clipped to the video).
    lo = max(first - window_size, 0) if forward else _RIGHT_ORIGIN - min(stop + window_size, n)  # the first pass position
    end = stop if forward else _RIGHT_ORIGIN - first

    def frame(k: int) -> int:
        return k if forward else _RIGHT_ORIGIN - 1 - k

    resume_from = (missing[0] if forward else _RIGHT_ORIGIN - 1 - missing[-1]) - lo  # relative to lo
    if resume_from and span is None:
        logger.info("FastBlend %s pass: resuming at frame %d of %d", direction, frame(lo + resume_from), n)
    stats = stats if stats is not None else RunStats()

    def needs(event):
        if isinstance(event, TableBatch):
            return [(kind, frame(k)) for task in event.tasks
                    for kind, k in (("guide", task.source), ("guide", task.target), ("style", task.source))]
        if isinstance(event, WindowBatch):
            return [("guide", frame(k)) for task in event.tasks for k in (task.source, task.target)]
        if isinstance(event, NodeReady):
            return [("style", frame(event.frame))]
        return []

    nodes: dict[tuple[int, int], torch.Tensor] = {}  # (frame, level) -> float32 node, alive until its last user
    free_after: dict[int, list[tuple[int, int]]] = defaultdict(list)  # last user -> nodes to free then
    table_sums: dict[int, dict[int, list]] = {}  # frame -> level -> [sum of remaps, count]
    window_sums: dict[int, torch.Tensor] = {}  # target -> sum of 2**level · remapped node

    def held() -> None:
        accumulators = sum(len(levels) for levels in table_sums.values()) + len(window_sums)
        stats.held(len(nodes), len(nodes) + accumulators)

    bar = Progress(f"FastBlend {direction} pass", end - lo - resume_from, *progress)
    events = fast_pass_plan(end - lo, window_size, batch_size, resume_from, lo)
    with WriteBehind(partial, max_pending=2) as writer, prefetched(BatchLoader(readers, needs), events) as stream:
        for event, frames in stream:
            if isinstance(event, TableBatch):
                tasks = event.tasks
                seeds = [derive_seed(seed, "fast", direction, "table", frame(t.source), frame(t.target), t.level) for t in tasks]
                results = remap(matcher, device, [frames["guide", frame(t.source)] for t in tasks],
                                [frames["guide", frame(t.target)] for t in tasks],
                                [frames["style", frame(t.source)] for t in tasks], seeds)
                stats.engine_calls += 1
                stats.remaps += len(tasks)
                for task, result in zip(tasks, results):
                    if task.keep:
                        acc = table_sums.setdefault(task.target, {}).setdefault(task.level, [0.0, 0])
                        acc[0] = acc[0] + result
                        acc[1] += 1
                held()
            elif isinstance(event, NodeReady):
                sums = table_sums.pop(event.frame, {})
                keep = dict(event.levels)
                node = frames["style", frame(event.frame)].to(torch.float32)
                for level in range(event.top + 1):
                    if level:  # B[s][k] = (B[s][k-1] + T[s][k]) / 2, both halves weigh 2**(k-1)
                        total, count = sums[level]
                        node = (node + total / count) / 2
                    if level in keep:
                        nodes[event.frame, level] = node
                        free_after[keep[level]].append((event.frame, level))
                held()
            elif isinstance(event, WindowBatch):
                tasks = event.tasks
                seeds = [derive_seed(seed, "fast", direction, "window", frame(t.source), t.level, frame(t.target)) for t in tasks]
                results = remap(matcher, device, [frames["guide", frame(t.source)] for t in tasks],
                                [frames["guide", frame(t.target)] for t in tasks],
                                [nodes[t.source, t.level] for t in tasks], seeds)
                stats.engine_calls += 1
                stats.remaps += len(tasks)
                for task, result in zip(tasks, results):
                    if task.keep:
                        weighted = result * float(1 << task.level)
                        window_sums[task.target] = window_sums[task.target] + weighted if task.target in window_sums else weighted
                held()
            else:  # TargetReady
                t = event.target
                if event.keep:
                    value = nodes[t, event.level] * float(1 << event.level)
                    remapped = window_sums.pop(t, None)
                    if remapped is not None:
                        value = value + remapped
                    writer.put(frame(t), (value / event.weight).to(partial_dtype))
                    stats.frames_written += 1
                    bar.update()
                for key in free_after.pop(t, ()):
                    del nodes[key]
    bar.close()


def _check_span(span: tuple[int, int] | None, n: int) -> tuple[int, int]:
    if span is None:
        return 0, n
    first, stop = span
    if not 0 <= first <= stop <= n:
        raise ValueError(f"span must be (a, b) with 0 <= a <= b <= {n} (the number of frames), got {span}")
    return first, stop


def merge_frame(t: int, n: int, window_size: int, left_t: torch.Tensor, right_t: torch.Tensor, style_t: torch.Tensor):
    """``F_t = (w_L·L_t + w_R·R_t − style_t) / (w_L + w_R − 1)`` as a uint8 frame (see the module docstring)."""
    weight_left = t - max(t - window_size, 0) + 1
    weight_right = min(t + window_size, n - 1) - t + 1
    blended = left_t.to(torch.float32) * weight_left + right_t.to(torch.float32) * weight_right - style_t.to(torch.float32)
    return to_output_frame(blended / (weight_left + weight_right - 1))


class MergingStore(Store):
    """The right pass's output when ``R_t`` is not kept: ``put(t, R_t)`` commits ``F_t`` into ``out``.

    ``put`` reads ``left[t]`` (committed by the left pass) and the style frame ``t``, merges
    (:func:`merge_frame`) and puts the result into ``out``; it runs on the pass's write-behind
    thread, so it reads the style frames through a reader of its own. ``missing()`` is
    ``out.missing()`` (the pass resumes after the final frames committed from its start) and
    nothing can be read back: ``R_t`` is gone once merged. With ``release_left`` the merged
    frame's ``L_t`` is deleted too, so the left partials shrink as the final frames grow.
    """

    def __init__(self, left: Store, style: Store, out: Store, window_size: int, *, size: tuple[int, int],
                 dtype: torch.dtype, release_left: bool = False):
        width, height = size
        super().__init__(len(out), TensorCodec((height, width, 3), dtype))  # validates and snapshots R_t on put
        self.left, self.out, self.window_size, self.release_left = left, out, window_size, release_left
        self._style = FrameReader(style, size, 1, "style")  # the writer thread's own: FrameReader is not thread-safe

    def missing(self) -> list[int]:
        return self.out.missing()

    def _has(self, slot: int) -> bool:
        return self.out.has(slot)

    def _get(self, slot: int):
        raise TypeError(f"a MergingStore keeps no R_t (slot {slot} was merged into {self.out!r}); pass a right= store to keep them")

    def _put(self, slot: int, value) -> None:
        right_t = self.codec.canonical(value, copy=False)
        self.out.put(slot, merge_frame(slot, len(self), self.window_size, self.left[slot], right_t, self._style[slot]))
        if self.release_left:  # F_t is committed: L_t is never read again (a rerun skips the left pass for final frames)
            self.left.delete(slot)

    def _delete(self, slot: int) -> None:
        self.out.delete(slot)

    def clear(self) -> None:
        self.out.clear()

    def __repr__(self) -> str:
        return f"MergingStore(into {self.out!r})"


class _Zip:
    """``zip[i] -> (a[i], b[i], c[i])``, a duck-typed store for one Prefetcher over three stores."""

    def __init__(self, *stores):
        self.stores = stores

    def __getitem__(self, i):
        return tuple(store[i] for store in self.stores)


def merge_partials(left: Store, right: Store, style: Store, out: Store, window_size: int, *, size: tuple[int, int],
                   progress=(None, None)) -> None:
    """Write ``F_t`` of every frame missing from ``out`` from stored ``L_t`` and ``R_t`` (only when ``R_t`` were kept)."""
    n = len(out)
    todo = out.missing()
    if not todo:
        return
    bar = Progress("FastBlend merge", len(todo), *progress)
    style_frames = FrameReader(style, size, 1, "style")  # used on the prefetch thread only
    with WriteBehind(out, max_pending=2) as writer:
        for t, (left_t, right_t, style_t) in Prefetcher(_Zip(left, right, style_frames), todo):
            writer.put(t, merge_frame(t, n, window_size, left_t, right_t, style_t))
            bar.update()
    bar.close()


class FastModeRunner:
    """The original's runner interface: ``FastModeRunner().run(frames_guide, frames_style, batch_size, window_size, ebsynth_config, save_path=None)``.

    Returns the result store (frames also saved as ``save_path/%05d.png`` when given, as the original).
    """

    def run(self, frames_guide, frames_style, batch_size, window_size, ebsynth_config, save_path=None, **kwargs):
        out = fast_blend(frames_guide, frames_style, window_size=window_size, batch_size=batch_size,
                         matcher_factory=EngineSettings(**ebsynth_config), **kwargs)
        save_original_style(out, save_path)
        return out
