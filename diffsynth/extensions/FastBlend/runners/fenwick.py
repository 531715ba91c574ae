"""Fast mode's Fenwick-tree bookkeeping as pure functions, and the streaming plan of one pass.

FastBlend (arXiv 2311.09265, §3.3; DiffSynth-Studio ``runners/fast.py``, ``TableManager``) blends,
for every target ``t``, the style frames of the window ``[t - w, t]`` remapped onto ``t``. Doing
that directly costs ``w`` patch-match calls per frame; the Fenwick scheme costs ``O(log w)``:

- a *node* ``(s, l)`` (``s + 1`` a multiple of ``2**l``) is the mean of ``style_i`` remapped onto
  frame ``s`` for ``i`` in ``[s - 2**l + 1, s]``, with weight ``2**l``. It is built level by
  level: ``B[s][0] = style_s``, ``B[s][k] = (B[s][k-1] + T[s][k]) / 2`` where ``T[s][k]`` is the
  mean of ``R(i -> s)`` over the left half ``i in [s - 2**k + 1, s - 2**(k-1)]`` (the original's
  remapping and blending tables);
- the window ``[max(t - w, 0), t]`` is cut greedily from the right into nodes
  (:func:`fenwick_nodes`); node ``(t, l)`` counts as it is, every other node ``(s, l)`` is
  remapped once more, from frame ``s`` onto ``t``; the weighted mean is ``L_t`` with weight
  ``w_L = t - max(t - w, 0) + 1``.

Differences from the original, both about cost and memory, none about the numbers:

- Only nodes some window uses are built: their level is at most ``log2(w + 1)``, where the
  original built every level up to ``log2(N)`` (``N/2`` patch-match calls per extra level).
- The pass streams (:func:`fast_pass_plan`): frame ``s``'s node is built when the targets
  reach it and is freed right after its last user, the largest ``t`` whose window uses it
  (at most ``s + w``); at most about ``w + 1`` nodes are alive at once (the original held
  every level of every frame: ``~2N`` float32 frames per direction).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from .common import chunk_with_completion

__all__ = [
    "fenwick_nodes",
    "window_nodes",
    "original_task_list",
    "node_users",
    "frame_levels",
    "table_tasks",
    "TableTask",
    "WindowTask",
    "TableBatch",
    "WindowBatch",
    "NodeReady",
    "TargetReady",
    "fast_pass_plan",
]


def fenwick_nodes(left: int, right: int) -> list[tuple[int, int]]:
    """The nodes ``(k, level)`` that tile ``[left, right]``, greedily from the right (the original's ``tree_query``).

    At index ``k`` the level grows while bit ``level`` of ``k`` is set and the node
    ``[k - 2**(level+1) + 1, k]`` still starts at or after ``left``; then ``k -= 2**level``.
    """
    nodes = []
    k = right
    while k >= left:
        level = 0
        while (k >> level) & 1 and k - (1 << (level + 1)) + 1 >= left:
            level += 1
        nodes.append((k, level))
        k -= 1 << level
    return nodes


@lru_cache(maxsize=4096)
def window_nodes(t: int, window_size: int, lo: int = 0) -> tuple[tuple[int, int], ...]:
    """Nodes of target ``t``'s left window ``[max(t - w, lo), t]``; the first one is ``(t, level)``.

    ``lo`` is the first position of the pass (0, or the right pass's origin, see ``fast_pass``).
    """
    return tuple(fenwick_nodes(max(t - window_size, lo), t))


def original_task_list(n: int) -> list[tuple[int, int, int]]:
    """The original's remapping-table tasks ``(source, target, level)`` for ``n`` frames, sorted by level.

    For every ``i`` and every zero bit ``l`` of ``i``: ``j = i | (2**(l+1) - 1)`` (bits ``0..l``
    set, stopping at the first ``j >= n``) gets ``R(i -> j)`` at table level ``l + 1``.
    Kept as the reference :func:`table_tasks` is tested against.
    """
    tasks = []
    max_level = 1
    while (1 << max_level) <= n:
        max_level += 1
    for i in range(n):
        j = i
        for level in range(max_level):
            if i & (1 << level):
                continue
            j |= 1 << level
            if j >= n:
                break
            tasks.append((i, j, level + 1))
    tasks.sort(key=lambda task: task[2])  # stable, as the original's cmp_to_key sort
    return tasks


@lru_cache(maxsize=4096)
def node_users(s: int, n: int, window_size: int, lo: int = 0) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """For position ``s``: ``((level, (t, ...)), ...)``, each node ``(s, level)`` some window uses, with its users, sorted.

    Positions run over ``[lo, n)``; users lie in ``[s, min(n - 1, s + w)]``: a window reaches ``w`` frames back.
    """
    users: dict[int, list[int]] = {}
    for t in range(s, min(n - 1, s + window_size) + 1):
        for source, level in window_nodes(t, window_size, lo):
            if source == s:
                users.setdefault(level, []).append(t)
    return tuple((level, tuple(ts)) for level, ts in sorted(users.items()))


def frame_levels(s: int, n: int, window_size: int, lo: int = 0) -> tuple[int, ...]:
    """The levels of the nodes at position ``s`` that some window uses (never empty: target ``s`` uses one)."""
    return tuple(level for level, _ in node_users(s, n, window_size, lo))


def table_tasks(s: int, top: int) -> list[tuple[int, int, int]]:
    """The remaps ``(source, s, level)`` that build frame ``s``'s node up to level ``top``.

    Level ``k`` holds the left half of the node ``[s - 2**k + 1, s]``: sources
    ``s - 2**k + 1 .. s - 2**(k-1)``, in increasing order (the original's order).
    """
    return [(i, s, k) for k in range(1, top + 1) for i in range(s - (1 << k) + 1, s - (1 << (k - 1)) + 1)]


@dataclass(frozen=True)
class TableTask:
    """Remap ``style[source]`` onto frame ``target`` for table level ``level``; ``keep=False``: computed, discarded."""

    source: int
    target: int
    level: int
    keep: bool


@dataclass(frozen=True)
class WindowTask:
    """Remap node ``(source, level)`` onto frame ``target`` (weight ``2**level``); ``keep=False``: discarded."""

    source: int
    level: int
    target: int
    keep: bool


@dataclass(frozen=True)
class TableBatch:
    tasks: tuple[TableTask, ...]


@dataclass(frozen=True)
class WindowBatch:
    tasks: tuple[WindowTask, ...]


@dataclass(frozen=True)
class NodeReady:
    """Every table task of ``frame`` ran: build its node levels; keep ``levels`` (``{level: last user}``)."""

    frame: int
    levels: tuple[tuple[int, int], ...]

    @property
    def top(self) -> int:
        return max(level for level, _ in self.levels)


@dataclass(frozen=True)
class TargetReady:
    """Every window task of ``target`` ran: ``L_t`` = (node ``(target, level)`` · 2**level + the remaps) / ``weight``.

    ``keep=False``: the result is already committed; only free the nodes whose last user is ``target``.
    """

    target: int
    level: int
    weight: int
    keep: bool


def _table_stream(lo: int, end: int, window_size: int) -> Iterator[tuple[int, list[tuple[int, int, int]]]]:
    for s in range(lo, end):
        yield s, table_tasks(s, max(frame_levels(s, end, window_size, lo)))


def _window_stream(lo: int, end: int, window_size: int) -> Iterator[tuple[int, list[tuple[int, int, int]]]]:
    for t in range(lo, end):
        yield t, [(s, level, t) for s, level in window_nodes(t, window_size, lo)[1:]]


def fast_pass_plan(n: int, window_size: int, batch_size: int, resume_from: int = 0, lo: int = 0
                   ) -> Iterator[TableBatch | NodeReady | WindowBatch | TargetReady]:
    """The events of one left-to-right pass over ``n`` frames at positions ``lo .. lo + n - 1``, in execution order.

    Nodes are anchored at absolute positions (node ``(s, l)`` has ``s + 1`` a multiple of
    ``2**l``), so which remaps a target's window needs depends on its position and ``lo`` only,
    never on ``n`` (except that no window reaches past the last position).

    Two task streams are each cut into fixed batches (:func:`chunk_with_completion`): the
    table remaps, frame by frame, and the window remaps, target by target. Window batches
    drive the pass; before one runs, table batches run until every frame up to its last
    target has its node (so a node is built at most one table batch ahead of its first use).

    ``resume_from``: targets ``< resume_from`` are committed. Window batches holding only
    such targets are skipped; the first one run may hold earlier targets (their results are
    discarded, ``keep=False``, but their nodes are still built, since the batch must be the
    same batch as in an uninterrupted run). Table batches run when they hold a task for a
    node some remaining window uses. Batches are never re-cut, so results do not change.
    """
    if n < 1 or resume_from >= n:
        return
    if window_size < 0 or batch_size < 1:
        raise ValueError(f"window_size must be >= 0 and batch_size >= 1, got {window_size} and {batch_size}")
    end = lo + n
    resume_from += lo
    windows = chunk_with_completion(_window_stream(lo, end, window_size), batch_size)

    # Skip window batches (and targets) before the first one that holds a target >= resume_from.
    first_event = None
    for kind, value in windows:
        if kind == "batch" and any(t >= resume_from for _, _, t in value):
            first_event = (kind, value)
            break
        if kind == "done" and value >= resume_from:
            first_event = (kind, value)
            break
    if first_event is None:
        return
    kind, value = first_event
    first_target = min(t for _, _, t in value) if kind == "batch" else value

    keep_levels: dict[int, tuple[tuple[int, int], ...]] = {}

    def levels_to_keep(s: int) -> tuple[tuple[int, int], ...]:
        """``{level: last user}`` of the nodes at ``s`` that a target >= first_target uses."""
        if s not in keep_levels:
            kept = []
            for level, users in node_users(s, end, window_size, lo):
                if users[-1] >= first_target:
                    kept.append((level, users[-1]))
            keep_levels[s] = tuple(kept)
        return keep_levels[s]

    tables = chunk_with_completion(_table_stream(lo, end, window_size), batch_size)
    complete = lo  # positions < complete have all their table tasks run (or skipped)

    def tables_through(frame: int) -> Iterator[TableBatch | NodeReady]:
        nonlocal complete
        while complete <= frame:
            kind, value = next(tables)
            if kind == "batch":
                tasks = []
                for source, target, level in value:
                    kept = levels_to_keep(target)
                    tasks.append(TableTask(source, target, level, bool(kept) and level <= max(lv for lv, _ in kept)))
                if any(task.keep for task in tasks):
                    yield TableBatch(tuple(tasks))
            else:
                kept = levels_to_keep(value)
                keep_levels.pop(value)
                if kept:
                    yield NodeReady(value, kept)
                complete = value + 1

    def emit(kind, value) -> Iterator[TableBatch | NodeReady | WindowBatch | TargetReady]:
        if kind == "batch":
            yield from tables_through(max(t for _, _, t in value))
            yield WindowBatch(tuple(WindowTask(s, level, t, t >= resume_from) for s, level, t in value))
        else:
            t = value
            yield from tables_through(t)
            level = window_nodes(t, window_size, lo)[0][1]
            yield TargetReady(t, level, t - max(t - window_size, lo) + 1, t >= resume_from)

    yield from emit(kind, value)
    for kind, value in windows:
        yield from emit(kind, value)
