"""Background reads and writes with bounded memory, so compute does not wait on the disk (DESIGN §3, "Fast").

- :class:`Prefetcher` reads items ahead on a thread and yields them in order.
- :class:`WriteBehind` writes items on a thread; ``put`` returns at once unless too many
  writes are pending.

Both hold at most a fixed number of items (``depth``, ``max_pending``), whatever the number of
frames. Errors raised on the background thread reach the caller, with the original exception
type and traceback (an ``OSError`` for a full disk stays an ``OSError``). The threads hold no
reference to the object that owns them, so an abandoned Prefetcher or WriteBehind is stopped
when it is garbage-collected (an abandoned WriteBehind still finishes its queued writes).

The store is used from the background thread and the caller's thread at once; the stores of
:mod:`diffsynth.cache.stores` allow that. A sequence wrapped in a ``ListView`` must too.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from .stores import Store

__all__ = ["Prefetcher", "WriteBehind"]

logger = logging.getLogger("diffsynth")

_ITEM, _ERROR, _END = "item", "error", "end"


class Prefetcher:
    """Iterate ``(i, store[i])`` for ``i`` in ``indices``, in order, reading ahead on a thread.

    At most ``depth`` items are read (or being read) and not yet taken by the consumer.
    ``depth=0`` reads in the consumer's thread (no thread; handy when debugging). An exception
    from a read is raised by ``next()`` at the position of the failing index, after the items
    before it; iteration then ends. Stopping early is safe: ``close()`` (or leaving a ``with``
    block, or dropping the iterator) stops the thread; a read already in progress finishes.
    Example::

        with Prefetcher(latents, range(start, end), depth=4) as window:
            for i, latent in window:
                ...
    """

    def __init__(self, store: Store, indices: Iterable[int], depth: int = 2):
        if depth < 0:
            raise ValueError(f"depth is how many items to read ahead (>= 0), got {depth}")
        self._store = store
        self._done = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if depth == 0:
            self._indices = iter(indices)
            return
        self._slots = threading.Semaphore(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_prefetch_loop,
            args=(store, indices, self._queue, self._slots, self._stop),
            name="diffsynth-prefetch",
            daemon=True,
        )
        self._thread.start()
        self._finalizer = weakref.finalize(self, _signal_stop, self._stop, self._slots)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple[int, Any]:
        if self._done:
            raise StopIteration
        if self._thread is None:
            return self._next_inline()
        kind, payload, item = self._queue.get()
        if kind == _ITEM:
            self._slots.release()
            return payload, item
        self.close()
        if kind == _ERROR:
            raise payload
        raise StopIteration

    def _next_inline(self) -> tuple[int, Any]:
        try:
            i = next(self._indices)
            return i, self._store[i]
        except BaseException:
            self._done = True
            raise

    def close(self) -> None:
        """Stop reading ahead and wait for the thread to end; items read but not taken are dropped."""
        if self._done:
            return
        self._done = True
        if self._thread is None:
            return
        self._finalizer.detach()
        _signal_stop(self._stop, self._slots)
        if self._thread is not threading.current_thread():
            self._thread.join()
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _prefetch_loop(
    store: Store, indices: Iterable[int], out: queue.SimpleQueue, slots: threading.Semaphore, stop: threading.Event
) -> None:
    try:
        for i in indices:
            slots.acquire()
            if stop.is_set():
                return
            out.put((_ITEM, i, store[i]))
    except BaseException as exc:  # handed to the consumer, which re-raises it
        out.put((_ERROR, exc, None))
        return
    out.put((_END, None, None))


def _signal_stop(stop: threading.Event, slots: threading.Semaphore) -> None:
    stop.set()
    slots.release()  # wakes a reader waiting for a free slot, so it sees the stop


class WriteBehind:
    """Put items into ``store`` on a background thread, with at most ``max_pending`` writes queued.

    ``put(i, value)`` validates the index and the value, snapshots the value (so the caller
    may modify its tensor right after) and returns at once, unless ``max_pending`` writes are
    pending (queued or being written): then it blocks until one finishes, which bounds memory.
    Writes happen in ``put`` order on one thread, so two writes to the same index land in order.
    Read an item back only after ``flush()``.

    ``flush()`` waits for every pending write and re-raises the first write error (e.g. the
    ``OSError`` of a full disk, naming the folder). After an error the WriteBehind is failed:
    writes still queued are dropped (never committed, so a rerun recomputes them) and every
    later ``put``/``flush``/``close`` raises the same error. Leaving a ``with`` block flushes;
    if the block itself raised, its exception wins and a write error is only logged.
    """

    def __init__(self, store: Store, max_pending: int = 4):
        if max_pending < 1:
            raise ValueError(f"max_pending is how many writes may be queued (>= 1), got {max_pending}")
        if not store.writable:
            raise TypeError(f"cannot write behind into the read-only {store!r}")
        self._store = store
        self._state = _WriterState(max_pending)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        thread = threading.Thread(
            target=_write_loop, args=(store, self._queue, self._state), name="diffsynth-write-behind", daemon=True
        )
        thread.start()
        self._thread = thread
        self._finalizer = weakref.finalize(
            self, _finish_abandoned_writer, self._queue, thread, self._state, repr(store)
        )

    @property
    def pending(self) -> int:
        """Writes queued or in progress."""
        return self._state.pending

    def put(self, i: int, value: Any) -> None:
        """Queue ``value`` for slot ``i`` (blocks while ``max_pending`` writes are pending)."""
        if self._closed:
            raise ValueError(f"this WriteBehind into {self._store!r} is closed")
        self._state.raise_error()
        slot = self._store.slot(i)
        prepared = self._store.prepare(value)
        self._state.acquire()
        self._queue.put((slot, prepared))

    def flush(self) -> None:
        """Wait until every queued write is committed; re-raise the first write error."""
        self._state.wait_idle()

    def close(self) -> None:
        """``flush()``, then stop the thread. Closing twice is fine (but re-raises a write error)."""
        if self._closed:
            self._state.raise_error()
            return
        self._closed = True
        self._finalizer.detach()
        try:
            self._state.wait_idle()
        finally:
            self._queue.put(None)
            self._thread.join()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except BaseException as write_error:
            if write_error is not exc:
                logger.warning("writing in the background into %r also failed: %s", self._store, write_error)


class _WriterState:
    """Pending-write count and the first write error, shared by a WriteBehind and its thread."""

    def __init__(self, max_pending: int):
        self._changed = threading.Condition()
        self._max_pending = max_pending
        self.pending = 0
        self.error: BaseException | None = None

    def acquire(self) -> None:
        with self._changed:
            while self.pending >= self._max_pending and self.error is None:
                self._changed.wait()
            self.raise_error()
            self.pending += 1

    def finished_one(self, error: BaseException | None) -> None:
        with self._changed:
            self.pending -= 1
            if error is not None and self.error is None:
                self.error = error
            self._changed.notify_all()

    def wait_idle(self) -> None:
        with self._changed:
            while self.pending:
                self._changed.wait()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def _write_loop(store: Store, jobs: queue.SimpleQueue, state: _WriterState) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        slot, value = job
        del job
        error = None
        if state.error is None:  # after a failure, the rest is dropped: the caller is told by the error
            try:
                store.put(slot, value)
            except BaseException as exc:  # handed to the caller, which re-raises it
                _add_note(exc, f"(while writing item {slot} into {store!r} in the background)")
                error = exc
        del value
        state.finished_one(error)


def _add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` (Python 3.11+); on 3.10 the note is kept in ``__notes__`` but not printed."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]


def _finish_abandoned_writer(
    jobs: queue.SimpleQueue, thread: threading.Thread, state: _WriterState, where: str
) -> None:
    """A WriteBehind was dropped without close(): finish its writes, and do not lose its error silently."""
    jobs.put(None)
    if thread is not threading.current_thread():
        thread.join()
    if state.error is not None:
        logger.error("a WriteBehind into %s was dropped without flush(); a write failed: %s", where, state.error)
