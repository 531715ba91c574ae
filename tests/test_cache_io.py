"""Prefetcher and WriteBehind: order, bounded memory, errors reach the caller, no hangs.

Threads are coordinated with events, never with sleeps; the few ``wait(timeout=...)`` calls
only turn a hang into a failure (or, where noted, give a buggy implementation time to misbehave).
"""

from __future__ import annotations

import errno
import gc
import logging
import threading

import pytest
import torch

from diffsynth.cache import MemoryStore, MissingItem, Prefetcher, TensorCodec, WriteBehind, image_store, tensor_store

HANG = 10  # seconds after which a wait means the code under test hangs


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


@pytest.fixture(autouse=True)
def no_leaked_threads():
    yield
    threads = _threads("diffsynth-prefetch") + _threads("diffsynth-write-behind")
    if threads:
        gc.collect()  # a dropped Prefetcher/WriteBehind stops its thread when collected
    for thread in threads:
        thread.join(HANG)
        assert not thread.is_alive(), f"{thread.name} still running after the test"


@pytest.fixture(params=["memory", "disk"])
def store(request, tmp_path):
    folder = None if request.param == "memory" else tmp_path
    return tensor_store(folder, 8, shape=(3,), dtype=torch.float32)


def _value(i: int) -> torch.Tensor:
    return torch.full((3,), float(i))


class ProbeStore(MemoryStore):
    """A memory store that lets a test watch and hold up reads and writes."""

    def __init__(self, length: int, *, fail_at: int | None = None, error: Exception | None = None):
        super().__init__(length, TensorCodec((3,)))
        self.fail_at = fail_at
        self.error = error or OSError(errno.EIO, "simulated I/O error")
        self.write_gate = threading.Event()
        self.write_gate.set()
        self.events: list[tuple[str, int]] = []
        self.allowed_reads: int | None = None  # reads beyond this count are noted in over_limit
        self.over_limit: list[int] = []
        self.changed = threading.Condition()
        for i in range(length):
            super()._put(i, _value(i))

    def _record(self, event: str, slot: int) -> None:
        with self.changed:
            self.events.append((event, slot))
            self.changed.notify_all()

    def count(self, event: str) -> int:
        return sum(1 for name, _ in self.events if name == event)

    def wait_for(self, predicate, timeout: float | None = None) -> bool:
        """Wait until ``predicate(events)``; without ``timeout``, not getting there fails the test."""
        with self.changed:
            reached = self.changed.wait_for(lambda: predicate(self.events), timeout=timeout or HANG)
        assert reached or timeout, self.events
        return reached

    def _get(self, slot):
        self._record("read", slot)
        if self.allowed_reads is not None and self.count("read") > self.allowed_reads:
            self.over_limit.append(slot)
        if slot == self.fail_at:
            raise self.error
        return super()._get(slot)

    def _put(self, slot, value):
        self._record("write-start", slot)
        assert self.write_gate.wait(HANG)
        if slot == self.fail_at:
            raise self.error
        super()._put(slot, value)
        self._record("write-done", slot)


# --------------------------------------------------------------------------- Prefetcher


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_yields_in_the_given_order(store, depth):
    for i in range(len(store)):
        store.put(i, _value(i))
    order = [5, 0, -1, 3, 3]
    got = list(Prefetcher(store, order, depth=depth))
    assert [i for i, _ in got] == order
    assert all(torch.equal(item, store[i]) for i, item in got)


def test_prefetch_reads_ahead_but_at_most_depth_items():
    depth, length = 3, 12
    store = ProbeStore(length)
    with Prefetcher(store, range(length), depth=depth) as window:
        for requested in range(length):
            # It reads ahead without being asked...
            store.wait_for(lambda events: store.count("read") >= min(requested + depth, length))
            if requested == 0:  # (gives an unbounded reader time to go further; a correct one never does)
                assert not store.wait_for(lambda events: store.count("read") > depth, timeout=0.3)
            # ...but never more than depth items past what the consumer has asked for.
            store.allowed_reads = requested + 1 + depth
            i, item = next(window)
            assert i == requested and torch.equal(item, _value(i))
        assert store.over_limit == []
        with pytest.raises(StopIteration):
            next(window)


def test_prefetch_reraises_a_read_error_in_the_consumer_after_the_items_before_it():
    store = ProbeStore(6, fail_at=3)
    window = Prefetcher(store, range(6), depth=2)
    assert [i for i, _ in (next(window), next(window), next(window))] == [0, 1, 2]
    with pytest.raises(OSError, match="simulated I/O error"):
        next(window)
    with pytest.raises(StopIteration):
        next(window)


def test_prefetch_of_a_missing_item_raises_missing_item(store):
    store.put(0, _value(0))
    with pytest.raises(MissingItem):
        list(Prefetcher(store, range(3)))


def test_prefetch_error_from_the_indices_reaches_the_consumer():
    def indices():
        yield 0
        raise RuntimeError("bad index source")

    with pytest.raises(RuntimeError, match="bad index source"):
        list(Prefetcher(ProbeStore(2), indices()))


def test_prefetch_stopping_early_ends_the_thread():
    store = ProbeStore(100)
    with Prefetcher(store, range(100), depth=4) as window:
        for i, _ in window:
            if i == 1:
                break
    assert not _threads("diffsynth-prefetch")
    assert sum(1 for event, _ in store.events if event == "read") <= 2 + 4 + 1

    for i, _ in Prefetcher(store, range(100), depth=4):  # no with, no close: dropped
        break
    # the fixture checks that the dropped prefetcher's thread ends


def test_prefetch_rejects_a_negative_depth(store):
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(store, range(3), depth=-1)


# --------------------------------------------------------------------------- WriteBehind


def test_write_behind_commits_everything_on_flush(store):
    with WriteBehind(store, max_pending=2) as writer:
        for i in reversed(range(len(store))):
            writer.put(i, _value(i))
        writer.flush()
        assert writer.pending == 0 and store.complete()
    assert all(torch.equal(store[i], _value(i)) for i in range(len(store)))


def test_write_behind_keeps_the_order_of_writes_to_one_index(store):
    with WriteBehind(store, max_pending=3) as writer:
        for version in range(20):
            writer.put(-1, _value(version))
    assert torch.equal(store[-1], _value(19))


def test_write_behind_snapshots_the_value(store):
    value = _value(1)
    with WriteBehind(store) as writer:
        writer.put(0, value)
        value.fill_(-1)  # the caller reuses its buffer right away
    assert torch.equal(store[0], _value(1))


def test_write_behind_blocks_once_max_pending_writes_are_queued():
    store = ProbeStore(8)
    store.write_gate.clear()  # the disk is stuck
    writer = WriteBehind(store, max_pending=2)
    returned = threading.Event()

    def third_put():
        writer.put(2, _value(12))
        store._record("put-returned", 2)
        returned.set()

    try:
        writer.put(0, _value(10))
        store.wait_for(lambda events: ("write-start", 0) in events)
        writer.put(1, _value(11))  # second pending write: still returns at once
        helper = threading.Thread(target=third_put)
        helper.start()
        # Gives a queue without a bound time to let put() return; a correct one never does here.
        assert not returned.wait(timeout=0.3), "put() returned with max_pending writes already pending"
        assert writer.pending == 2
    finally:
        store.write_gate.set()
    helper.join(HANG)
    assert returned.is_set()
    assert store.events.index(("write-done", 0)) < store.events.index(("put-returned", 2))
    writer.close()
    assert [torch.equal(store[i], _value(10 + i)) for i in range(3)] == [True] * 3


def test_write_error_is_reraised_by_flush_and_later_puts():
    store = ProbeStore(8, fail_at=2)
    store.write_gate.clear()  # queue everything before the failure happens
    writer = WriteBehind(store, max_pending=8)
    for i in range(6):
        writer.put(i, _value(20 + i))
    store.write_gate.set()
    with pytest.raises(OSError, match="simulated I/O error") as caught:
        writer.flush()
    assert any("item 2" in note for note in caught.value.__notes__)
    with pytest.raises(OSError):
        writer.put(6, _value(0))
    with pytest.raises(OSError):
        writer.close()
    written = {slot for event, slot in store.events if event == "write-done"}
    assert written == {0, 1}, "writes queued after the failure are dropped, not committed out of order"


def test_disk_full_in_the_background_names_the_folder(tmp_path, monkeypatch):
    store = image_store(tmp_path, 4)

    def no_space(value, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.codec, "write", no_space)
    with pytest.raises(OSError) as caught:
        with WriteBehind(store) as writer:
            writer.put(0, torch.zeros(4, 4, 3, dtype=torch.uint8).numpy())
    assert caught.value.errno == errno.ENOSPC and str(tmp_path) in str(caught.value)


def test_leaving_with_on_an_exception_finishes_writes_and_keeps_that_exception(store, caplog):
    with pytest.raises(KeyboardInterrupt):
        with WriteBehind(store) as writer:
            writer.put(0, _value(1))
            raise KeyboardInterrupt
    assert torch.equal(store[0], _value(1))

    failing = ProbeStore(2, fail_at=0)
    with caplog.at_level(logging.WARNING, logger="diffsynth"), pytest.raises(ValueError, match="body failed"):
        with WriteBehind(failing) as writer:
            writer.put(0, _value(1))
            raise ValueError("body failed")
    assert "simulated I/O error" in caplog.text


def test_write_behind_checks_index_and_value_in_the_caller(store):
    with WriteBehind(store) as writer:
        with pytest.raises(IndexError):
            writer.put(len(store), _value(0))
        with pytest.raises(ValueError, match="shape"):
            writer.put(0, torch.zeros(4))
        assert writer.pending == 0
    with pytest.raises(ValueError, match="closed"):
        writer.put(0, _value(0))


def test_write_behind_refuses_read_only_stores_and_bad_bounds(store):
    from diffsynth.cache import ListView

    with pytest.raises(TypeError, match="read-only"):
        WriteBehind(ListView([1, 2]))
    with pytest.raises(ValueError, match="max_pending"):
        WriteBehind(store, max_pending=0)


def test_dropped_write_behind_still_commits_its_writes(store):
    writer = WriteBehind(store)
    for i in range(3):
        writer.put(i, _value(i))
    del writer
    gc.collect()
    assert store.missing() == list(range(3, len(store)))
