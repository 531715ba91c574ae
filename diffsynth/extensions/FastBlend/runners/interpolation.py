"""Interpolation mode: render every frame of the guide video from a few stylized keyframes.

Several keyframes (DiffSynth-Studio ``InterpolationModeRunner``): each frame ``m`` between
consecutive keyframes ``l < r`` gets ``R(l -> m)`` and ``R(r -> m)`` in one engine call as a
pair (``use_pairwise_patch_error``: the two remaps are also matched against each other), and
``F_m = w_l·R(l -> m) + w_r·R(r -> m)`` with ``w_l = |m − r| / (|m − r| + |m − l|)``,
``w_r = |m − l| / (...)``. Before the first and after the last keyframe ``l = r`` and the
weights are 0.5/0.5. Tasks are batched within each span between keyframes.

One keyframe (``InterpolationModeSingleFrameRunner``): the keyframe is remapped onto every
frame in batches of ``batch_size`` consecutive targets that overlap by ``2·tracking`` frames
(step ``batch_size − 2·tracking_window_size``), so that each written frame had tracking
neighbours on both sides in its batch; needs ``batch_size > 2·tracking_window_size``.

Keyframes are given as a mapping ``{frame index: image}``, as a store of ``N`` slots holding
only the keyframes (e.g. a disk store of the few rendered frames), or as a sequence of images
with ``keyframe_indices``. Output frames go to ``out`` as soon as they are computed; a rerun
skips the committed ones.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ....cache import Store, WriteBehind, as_store, image_store
from .common import (BatchLoader, EngineSettings, FrameReader, MatcherFactory, Progress, RunStats, check_output_store,
                     derive_seed, engine_device, frame_size, prefetched, remap, save_original_style, to_output_frame)

__all__ = [
    "interpolate_keyframes",
    "interpolation_groups",
    "interpolation_weights",
    "single_keyframe_batches",
    "InterpolationModeRunner",
    "InterpolationModeSingleFrameRunner",
]


def interpolation_weights(l: int, m: int, r: int) -> tuple[float, float]:
    """``(w_l, w_r)`` of frame ``m`` between keyframes ``l`` and ``r``: the nearer keyframe weighs more; 0.5/0.5 when ``l == r``."""
    weight_l, weight_r = abs(m - r), abs(m - l)
    if weight_l + weight_r == 0:
        return 0.5, 0.5
    return weight_l / (weight_l + weight_r), weight_r / (weight_l + weight_r)


def interpolation_groups(keyframes: list[int], n: int) -> list[list[tuple[int, int, int]]]:
    """Tasks ``(l, m, r)`` per span: before the first keyframe, between each pair, from the last one to the end."""
    keys = sorted(keyframes)
    groups = []
    if keys[0] > 0:
        groups.append([(keys[0], m, keys[0]) for m in range(keys[0])])
    for l, r in zip(keys[:-1], keys[1:]):
        groups.append([(l, m, r) for m in range(l, r)])
    groups.append([(keys[-1], m, keys[-1]) for m in range(keys[-1], n)])
    return groups


def single_keyframe_batches(n: int, batch_size: int, tracking_window_size: int) -> list[tuple[int, int, int, int]]:
    """``(l, r, first, end)``: targets ``[l, r)`` in one engine call, of which ``[first, end)`` are written.

    The original's loop: batch starts step by ``batch_size − 2·tracking``; the last batch is
    ``[max(n − batch_size, 0), n)``; a batch writes the next unwritten frames up to
    ``r − tracking`` (up to ``n`` for the last one). Batches that would write nothing are dropped.
    """
    if batch_size <= 2 * tracking_window_size:
        raise ValueError(f"single-keyframe interpolation needs batch_size > 2 * tracking_window_size, "
                         f"got batch_size={batch_size}, tracking_window_size={tracking_window_size}")
    batches = []
    written = 0
    for i in range(0, n, batch_size - 2 * tracking_window_size):
        l, r = (max(n - batch_size, 0), n) if i + batch_size > n else (i, i + batch_size)
        end = n if r >= n else max(r - tracking_window_size, written)
        if end > written:
            batches.append((l, r, written, end))
            written = end
    return batches


def _keyframe_source(keyframes: Any, keyframe_indices, n: int):
    """``(sorted indices, store-like with [index] -> image)`` from the accepted keyframe forms."""
    if isinstance(keyframes, Mapping):
        if keyframe_indices is not None:
            raise ValueError("keyframe_indices is for a sequence of keyframes; a mapping already names its frames")
        indices = sorted(keyframes)
        source = keyframes
    elif keyframe_indices is not None:
        indices = [int(i) for i in keyframe_indices]
        frames = as_store(keyframes)
        if len(frames) != len(indices):
            raise ValueError(f"{len(indices)} keyframe indices for {len(frames)} keyframes")
        order = dict(zip(indices, range(len(indices))))
        if len(order) != len(indices):
            raise ValueError(f"keyframe indices repeat: {sorted(indices)}")
        source = {i: _Lazy(frames, j) for i, j in order.items()}
        indices = sorted(order)
    else:
        frames = as_store(keyframes)
        if len(frames) != n:
            raise ValueError(f"a keyframe store needs one slot per guide frame ({n}), got {len(frames)} slots; "
                             "or pass keyframe_indices, or a mapping {frame index: image}")
        missing = set(frames.missing())
        indices = [i for i in range(n) if i not in missing]
        source = frames
    if not indices:
        raise ValueError("interpolation needs at least one keyframe, got none")
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise ValueError(f"keyframe indices {bad[:5]} are outside the guide video's frames 0..{n - 1}")
    return indices, _Resolved(source, n)


class _Lazy:
    def __init__(self, store, j):
        self.store, self.j = store, j


class _Resolved:
    """Keyframe ``i`` (a frame index) of a mapping whose values may be :class:`_Lazy` references, or of a store."""

    def __init__(self, source, n: int):
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        value = self.source[i]
        return value.store[value.j] if isinstance(value, _Lazy) else value


def interpolate_keyframes(guide: Any, keyframes: Any, out: Store | None = None, *, keyframe_indices=None,
                          batch_size: int = 8, matcher_factory: MatcherFactory | None = None, seed: int = 0,
                          tracking_window_size: int | None = None, frame_cache: int | None = None,
                          progress_bar_cmd=None, progress_callback=None, stats: RunStats | None = None) -> Store:
    """Render all ``len(guide)`` frames from the stylized ``keyframes`` into ``out`` (default: in memory); returns ``out``.

    The output size is the keyframes'; guide frames of another size are resized.
    ``tracking_window_size`` (single keyframe) defaults to the matcher factory's setting.
    """
    guide = as_store(guide)
    n = len(guide)
    if n == 0:
        raise ValueError("interpolation needs a guide video with at least one frame")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    indices, keys = _keyframe_source(keyframes, keyframe_indices, n)
    width, height = frame_size(keys[indices[0]])
    out = check_output_store(out if out is not None else image_store(None, n, size=(width, height)), n, "result")
    missing = out.missing()
    if not missing:
        return out
    todo = bytearray(n)
    for m in missing:
        todo[m] = 1
    factory = matcher_factory if matcher_factory is not None else EngineSettings()
    if tracking_window_size is None:
        tracking_window_size = getattr(factory, "tracking_window_size", 0)
    capacity = min(n, frame_cache if frame_cache is not None else 2 * batch_size + 4)
    readers = {"guide": FrameReader(guide, (width, height), capacity, "guide"),
               "key": FrameReader(keys, (width, height), max(2, min(len(indices), 4)), "keyframe")}
    stats = stats if stats is not None else RunStats()
    bar = Progress("FastBlend interpolation", len(missing), progress_bar_cmd, progress_callback)
    if len(indices) == 1:
        matcher = factory(height, width)
        _single(guide, readers, indices[0], out, todo, matcher, engine_device(matcher), batch_size, tracking_window_size,
                seed, bar, stats)
    else:
        matcher = factory(height, width, use_pairwise_patch_error=True)
        _pairs(readers, indices, n, out, todo, matcher, engine_device(matcher), batch_size, seed, bar, stats)
    bar.close()
    return out


def _pairs(readers, indices, n, out, todo, matcher, device, batch_size, seed, bar, stats) -> None:
    def events():
        for group in interpolation_groups(indices, n):
            for start in range(0, len(group), batch_size):
                batch = tuple(group[start:start + batch_size])
                if any(todo[m] for _, m, _ in batch):
                    yield batch

    def needs(batch):
        return [need for l, m, r in batch for need in (("guide", l), ("guide", r), ("guide", m), ("key", l), ("key", r))]

    with WriteBehind(out, max_pending=2) as writer, prefetched(BatchLoader(readers, needs), events()) as stream:
        for batch, frames in stream:
            source_guide, target_guide, source_style = [], [], []
            for l, m, r in batch:  # pairs (l -> m, r -> m) at even/odd positions, as the pairwise error expects
                source_guide += [frames["guide", l], frames["guide", r]]
                target_guide += [frames["guide", m], frames["guide", m]]
                source_style += [frames["key", l], frames["key", r]]
            results = remap(matcher, device, source_guide, target_guide, source_style, derive_seed(seed, "interpolation", batch))
            stats.engine_calls += 1
            stats.remaps += len(source_guide)
            for (l, m, r), from_left, from_right in zip(batch, results[0::2], results[1::2]):
                if todo[m]:
                    weight_l, weight_r = interpolation_weights(l, m, r)
                    writer.put(m, to_output_frame(from_left * weight_l + from_right * weight_r))
                    stats.frames_written += 1
                    bar.update()


def _single(guide, readers, key, out, todo, matcher, device, batch_size, tracking, seed, bar, stats) -> None:
    batches = [b for b in single_keyframe_batches(len(guide), batch_size, tracking) if any(todo[b[2]:b[3]])]

    def needs(batch):
        l, r, _, _ = batch
        return [("guide", key), ("key", key)] + [("guide", i) for i in range(l, r)]

    with WriteBehind(out, max_pending=2) as writer, prefetched(BatchLoader(readers, needs), batches) as stream:
        for (l, r, first, end), frames in stream:
            results = remap(matcher, device, [frames["guide", key]] * (r - l), [frames["guide", i] for i in range(l, r)],
                            [frames["key", key]] * (r - l), derive_seed(seed, "single keyframe", key, l, r))
            stats.engine_calls += 1
            stats.remaps += r - l
            for i in range(first, end):
                if todo[i]:
                    writer.put(i, to_output_frame(results[i - l]))
                    stats.frames_written += 1
                    bar.update()


class InterpolationModeRunner:
    """The original's interface: ``run(frames_guide, frames_style, index_style, batch_size, ebsynth_config, save_path=None)``."""

    def run(self, frames_guide, frames_style, index_style, batch_size, ebsynth_config, save_path=None, **kwargs):
        settings = EngineSettings(**ebsynth_config)
        out = interpolate_keyframes(frames_guide, frames_style, keyframe_indices=index_style, batch_size=batch_size,
                                    matcher_factory=settings, **kwargs)
        save_original_style(out, save_path)
        return out


InterpolationModeSingleFrameRunner = InterpolationModeRunner
"""One keyframe is a case of :class:`InterpolationModeRunner` here (the original had two classes)."""
