"""Per-index stores: the one way frames, control images and latents cross a stage (STYLE 6).

A store has a fixed number of slots (``len(store)``, e.g. the number of frames); each slot is
empty or holds one item. Every store answers the same interface:

=========================  ==========================================================
``len(store)``             number of slots, fixed at creation
``store[i]``               the item (negative ``i`` counts from the end; a slice gives a
                           list). ``IndexError`` out of range, :class:`MissingItem` for an
                           empty slot, :class:`CorruptItem` for an unusable file
``store.put(i, value)``    commit an item (atomically on disk)
``i in store``/``has(i)``  the slot holds a committed, valid item (``False`` out of range)
``store.missing()``        sorted indices of empty slots; ``complete()`` is ``not missing()``
``store.delete(i)``        empty a slot (no error if it is already empty); ``clear()``: all
``iter(store)``            every item in index order (``MissingItem`` at the first gap)
``store.close()``          release resources; also ``with store: ...``
=========================  ==========================================================

Backends: :class:`MemoryStore` (short clips, tests), :class:`DiskStore` (one file per slot, the
default for videos) and :class:`ListView` (read-only adapter so public APIs accept lists). Items
are typed by a codec (:mod:`diffsynth.cache.codecs`); :func:`image_store` and
:func:`tensor_store` build the usual ones. A reader gets an item it may modify freely: both
writable backends hand out a fresh copy on every read, so results never depend on the backend.
"""

from __future__ import annotations

import abc
import logging
import operator
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..utils.atomic import atomic_open, is_temp_name
from .codecs import Codec, ImageCodec, InvalidFile, Shape, TensorCodec

__all__ = [
    "MissingItem",
    "CorruptItem",
    "Store",
    "MemoryStore",
    "DiskStore",
    "ListView",
    "as_store",
    "image_store",
    "tensor_store",
]

logger = logging.getLogger("diffsynth")

_MIN_NAME_DIGITS = 6


class MissingItem(KeyError):
    """Slot ``index`` holds no (valid) item: it was never written, or was deleted.

    A ``KeyError`` so that "not there yet" is told apart from ``IndexError`` (no such slot).
    ``path`` is the file that was looked for (``None`` for in-memory stores).
    """

    def __init__(self, message: str, *, index: int, path: str | None = None):
        super().__init__(message)
        self.index = index
        self.path = path

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class CorruptItem(MissingItem):
    """Slot ``index`` had a file, but it was unusable (``reason``); it has been deleted.

    A :class:`MissingItem`, so code that recomputes missing items also recomputes this one.
    """

    def __init__(self, message: str, *, index: int, path: str, reason: str):
        super().__init__(message, index=index, path=path)
        self.reason = reason


class Store(abc.ABC):
    """The store interface (see the module docstring); subclasses implement the ``_`` methods.

    Public methods validate the index and the open state, then call ``_get``, ``_has``,
    ``_put`` and ``_delete`` with a slot number in ``range(len(self))``.
    """

    writable = True

    def __init__(self, length: int, codec: Codec | None):
        length = operator.index(length)
        if length < 0:
            raise ValueError(f"a store needs a length >= 0 (the number of slots), got {length}")
        self._length = length
        self.codec = codec
        self._closed = False

    # ------------------------------------------------------------------ interface

    def __len__(self) -> int:
        return self._length

    def slot(self, i: int) -> int:
        """The slot number for index ``i`` (negative counts from the end).

        Raises ``TypeError`` for a non-integer and ``IndexError`` out of range.
        """
        self._check_open()
        try:
            index = operator.index(i)
        except TypeError:
            raise TypeError(f"store indices must be integers, got {type(i).__name__}") from None
        slot = index + self._length if index < 0 else index
        if not 0 <= slot < self._length:
            raise IndexError(f"index {index} is out of range for {self!r} with {self._length} slots")
        return slot

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            self._check_open()
            return [self._get(slot) for slot in range(*key.indices(self._length))]
        return self._get(self.slot(key))

    def has(self, i: int) -> bool:
        """True if slot ``i`` holds a committed, valid item; ``False`` when out of range."""
        try:
            slot = self.slot(i)
        except IndexError:
            return False
        return self._has(slot)

    def __contains__(self, i: object) -> bool:
        try:
            operator.index(i)
        except TypeError:
            return False
        return self.has(i)

    def put(self, i: int, value: Any) -> None:
        """Commit ``value`` to slot ``i``, replacing what was there."""
        self._check_writable("put")
        self._put(self.slot(i), value)

    def delete(self, i: int) -> None:
        """Empty slot ``i``; an empty slot stays empty (no error)."""
        self._check_writable("delete")
        self._delete(self.slot(i))

    def missing(self) -> list[int]:
        """Sorted indices of the slots that hold no valid item."""
        self._check_open()
        return [slot for slot in range(self._length) if not self._has(slot)]

    def complete(self) -> bool:
        """True when every slot holds a valid item."""
        return not self.missing()

    def __iter__(self) -> Iterator[Any]:
        self._check_open()
        for slot in range(self._length):
            yield self._get(slot)

    def prepare(self, value: Any) -> Any:
        """Validate ``value`` and return an independent copy in canonical form.

        ``put(i, prepare(v))`` stores the same as ``put(i, v)``; the copy lets a caller hand a
        value to a background writer and keep modifying its own. Raises what ``put`` would
        for a value that does not fit the store.
        """
        return value if self.codec is None else self.codec.canonical(value, copy=True)

    @abc.abstractmethod
    def clear(self) -> None:
        """Empty every slot."""

    def close(self) -> None:
        """Release resources; later use raises ``ValueError``. Closing twice is fine."""
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ backend hooks

    @abc.abstractmethod
    def _get(self, slot: int) -> Any: ...

    @abc.abstractmethod
    def _has(self, slot: int) -> bool: ...

    @abc.abstractmethod
    def _put(self, slot: int, value: Any) -> None: ...

    @abc.abstractmethod
    def _delete(self, slot: int) -> None: ...

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self!r} is closed")

    def _check_writable(self, action: str) -> None:
        if not self.writable:
            raise TypeError(
                f"{type(self).__name__} is read-only and cannot {action}; to change items, copy them into a "
                "store first, e.g. s = tensor_store(folder, len(view)); s.put(i, view[i]) for each i"
            )


class _Empty:
    """Marker of an empty slot in a :class:`MemoryStore` (``None`` can be a legitimate item)."""

    def __repr__(self) -> str:
        return "<empty>"


_EMPTY = _Empty()


class MemoryStore(Store):
    """Items kept in RAM, with the same interface and copy semantics as :class:`DiskStore`.

    With a codec, ``put`` validates and copies the value and every read returns a fresh copy;
    with ``codec=None`` any object is stored and returned as is (no copies). ``close()``
    drops the items.
    """

    def __init__(self, length: int, codec: Codec | None = None):
        super().__init__(length, codec)
        self._items: list[Any] = [_EMPTY] * self._length

    def __repr__(self) -> str:
        return f"MemoryStore(length={self._length}, codec={self.codec!r})"

    def _get(self, slot: int) -> Any:
        item = self._items[slot]
        if item is _EMPTY:
            raise MissingItem(f"item {slot} of {self!r} was never written", index=slot)
        return item if self.codec is None else self.codec.copy(item)

    def _has(self, slot: int) -> bool:
        return self._items[slot] is not _EMPTY

    def _put(self, slot: int, value: Any) -> None:
        self._items[slot] = self.prepare(value)

    def _delete(self, slot: int) -> None:
        self._items[slot] = _EMPTY

    def clear(self) -> None:
        self._check_open()
        self._items = [_EMPTY] * self._length

    def close(self) -> None:
        super().close()
        self._items = []


_other_writers = 0  # > 0 while other processes may be writing into the stores' folders (several processes, one render)


class other_writers:
    """``with other_writers():`` — stores opened inside do not remove temporary files on open.

    A temporary file in a store's folder may then be another process's write in progress;
    the run's rank 0 sweeps the leftovers of killed runs once, before the processes start.
    """

    def __enter__(self) -> "other_writers":
        global _other_writers
        _other_writers += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        global _other_writers
        _other_writers -= 1


class DiskStore(Store):
    """One file per slot in ``folder``: ``000123.png``, ``000123.npy``, ... (DESIGN §3).

    - Names are the zero-padded index with at least 6 digits (more when ``length`` needs them)
      and the codec's suffix. One store per (folder, suffix): two stores of the same item type
      must not share a folder.
    - Writes are atomic (temporary ``.<name>.<random>.tmp`` in the same folder, then rename);
      with ``fsync=True`` (default) the data and the rename are durable before ``put``
      returns, so a journal written afterwards never points at lost data. ``fsync=False``
      still survives a killed process, not a power cut: for scratch data.
    - Nothing is cached in RAM: every read goes to the file, and the object holds no items,
      so memory does not grow with the number of frames. It holds no open files either, and
      several threads (prefetch, write-behind) may use it at once.
    - A file that fails validation (truncated, damaged, wrong size/shape/dtype) is logged as a
      warning on the ``diffsynth`` logger and deleted, ``has()`` is ``False`` and a read raises
      :class:`CorruptItem`, so the item is recomputed (STYLE 8). ``has()``/``missing()`` use the
      codec's cheap structural check; a full read validates completely.
    - ``clean_temps=True`` removes this store's leftover temporary files (from a killed run) on
      open; they are ignored in any case. Pass ``False`` when other processes may be writing
      into the same folder right now (``with other_writers():`` does so for every store).
    - Reopening a folder sees every item committed before (that is how a run resumes). The
      name width depends on ``length`` only, so reopen with the same length.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        length: int,
        codec: Codec,
        *,
        fsync: bool = True,
        clean_temps: bool = True,
    ):
        if not isinstance(codec, Codec):
            raise TypeError(
                f"DiskStore needs a codec to write files (ImageCodec or TensorCodec), got {type(codec).__name__}"
            )
        super().__init__(length, codec)
        self.folder = os.path.abspath(os.fspath(folder))
        self.fsync = fsync
        self._digits = max(_MIN_NAME_DIGITS, len(str(max(self._length - 1, 0))))
        self._item_name = re.compile(r"[0-9]+" + re.escape(codec.suffix))
        os.makedirs(self.folder, exist_ok=True)
        if clean_temps and not _other_writers:
            self.remove_temp_files()

    def __repr__(self) -> str:
        return f"DiskStore({self.folder!r}, length={self._length}, codec={self.codec!r})"

    def path(self, i: int) -> str:
        """The file that holds (or will hold) item ``i``."""
        return self._path(self.slot(i))

    def missing(self) -> list[int]:
        self._check_open()
        present = set(os.listdir(self.folder))
        return [slot for slot in range(self._length) if self._name(slot) not in present or not self._has(slot)]

    def clear(self) -> None:
        """Delete every item file of this store's type in the folder (any index) and its temp files."""
        self._check_open()
        for name in os.listdir(self.folder):
            if self._item_name.fullmatch(name) or self._is_own_temp(name):
                _remove_if_present(os.path.join(self.folder, name))

    def remove_temp_files(self) -> int:
        """Delete temporary files this store's writers left behind (e.g. after a kill); return how many."""
        removed = 0
        for name in os.listdir(self.folder):
            if self._is_own_temp(name):
                removed += _remove_if_present(os.path.join(self.folder, name))
        if removed:
            logger.info("removed %d unfinished temporary file(s) from %s", removed, self.folder)
        return removed

    def nbytes(self) -> int:
        """Bytes taken by the committed item files in range (for the manifest's disk report)."""
        self._check_open()
        names = {self._name(slot) for slot in range(self._length)}
        with os.scandir(self.folder) as entries:
            return sum(entry.stat().st_size for entry in entries if entry.name in names)

    # ------------------------------------------------------------------ backend hooks

    def _name(self, slot: int) -> str:
        return f"{slot:0{self._digits}d}{self.codec.suffix}"

    def _path(self, slot: int) -> str:
        return os.path.join(self.folder, self._name(slot))

    def _is_own_temp(self, name: str) -> bool:
        # atomic.py names temps ".<target name>.<random>.tmp"
        return is_temp_name(name) and bool(self._item_name.fullmatch(name[1:].rsplit(".", 2)[0]))

    def _get(self, slot: int) -> Any:
        path = self._path(slot)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            message = f"item {slot} of {self!r} was never written (no file {path})"
            raise MissingItem(message, index=slot, path=path) from None
        with f:
            stat = os.fstat(f.fileno())
            try:
                return self.codec.read(f, stat.st_size)
            except InvalidFile as bad:
                reason = bad.reason
        raise self._discard(slot, path, stat, reason)

    def _has(self, slot: int) -> bool:
        path = self._path(slot)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return False
        with f:
            stat = os.fstat(f.fileno())
            try:
                self.codec.check(f, stat.st_size)
                return True
            except InvalidFile as bad:
                reason = bad.reason
        self._discard(slot, path, stat, reason)
        return False

    def _put(self, slot: int, value: Any) -> None:
        value = self.codec.canonical(value, copy=False)
        with atomic_open(self._path(slot), "wb", fsync=self.fsync) as f:
            self.codec.write(value, f)

    def _delete(self, slot: int) -> None:
        _remove_if_present(self._path(slot))

    def _discard(self, slot: int, path: str, stat: os.stat_result, reason: str) -> CorruptItem:
        """Delete an unusable file (unless a writer replaced it meanwhile), warn, and return the error to raise."""
        outcome = _remove_if_unchanged(path, stat)
        logger.warning("cache file %s is unusable (%s); %s, so the item will be recomputed", path, reason, outcome)
        return CorruptItem(
            f"cache file {path} (item {slot}) is unusable: {reason}; {outcome}. Compute the item again and put() it.",
            index=slot,
            path=path,
            reason=reason,
        )


def _remove_if_present(path: str) -> int:
    """Remove ``path``; return 1 if it was removed, 0 if it was already gone."""
    try:
        os.remove(path)
    except FileNotFoundError:
        return 0
    return 1


def _remove_if_unchanged(path: str, seen: os.stat_result) -> str:
    """Remove ``path`` if it is still the file described by ``seen``; say what happened.

    A concurrent ``put`` may have replaced the bad file with a good one since it was read;
    that one must stay. (A replacement between this stat and the remove is not excluded.)
    """
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return "it was already deleted"
    identity = ("st_dev", "st_ino", "st_size", "st_mtime_ns")
    if any(getattr(now, field) != getattr(seen, field) for field in identity):
        return "it was replaced by a new file while being read; the new file was kept"
    try:
        os.remove(path)
    except FileNotFoundError:
        return "it was already deleted"
    except OSError as exc:
        return f"it could not be deleted ({exc})"
    return "the file was deleted"


class ListView(Store):
    """A read-only store over a sequence (list of PIL images or tensors, lazy video reader, ...).

    Every index of the sequence counts as present (``missing()`` is empty); items come back as
    the sequence returns them, passed through ``codec.canonical`` when a codec is given (so
    e.g. RGBA or grayscale images arrive as RGB and sizes are checked). The length is taken
    once, at construction. ``put``, ``delete`` and ``clear`` raise ``TypeError``. Do not modify
    the items in place: they may be the caller's own objects.
    """

    writable = False

    def __init__(self, sequence: Any, codec: Codec | None = None):
        super().__init__(len(sequence), codec)
        self._sequence = sequence

    def __repr__(self) -> str:
        return f"ListView({type(self._sequence).__name__} of {self._length}, codec={self.codec!r})"

    def _get(self, slot: int) -> Any:
        item = self._sequence[slot]
        return item if self.codec is None else self.codec.canonical(item, copy=False)

    def _has(self, slot: int) -> bool:
        return True

    def _put(self, slot: int, value: Any) -> None:
        self._check_writable("put")

    def _delete(self, slot: int) -> None:
        self._check_writable("delete")

    def clear(self) -> None:
        self._check_writable("clear")


def as_store(obj: Any, codec: Codec | None = None) -> Store:
    """``obj`` as a store: a store is returned unchanged; a list, tuple or any object with
    ``len()`` and ``[i]`` (a lazy video reader, a batched tensor) is wrapped in a :class:`ListView`
    (with ``codec``, if given, applied to its items)."""
    if isinstance(obj, Store):
        return obj
    if isinstance(obj, (str, bytes, bytearray, Mapping)):
        raise TypeError(f"expected a store or a sequence of items, got a {type(obj).__name__}")
    if hasattr(obj, "__len__") and hasattr(obj, "__getitem__"):
        return ListView(obj, codec)
    raise TypeError(
        f"expected a store, a list/tuple of items or a sequence with len() and [i], got {type(obj).__name__}"
    )


def image_store(
    folder: str | os.PathLike | None,
    length: int,
    size: tuple[int, int] | None = None,
    *,
    compress_level: int = 1,
    fsync: bool = True,
    clean_temps: bool = True,
) -> Store:
    """A store of RGB images (PNG files in ``folder``, or in memory when ``folder`` is None).

    ``size=(width, height)`` is checked on every put and read. ``compress_level`` is zlib's
    0-9 (see :class:`ImageCodec`); ``fsync`` and ``clean_temps`` are :class:`DiskStore`'s.
    """
    codec = ImageCodec(size, compress_level=compress_level)
    if folder is None:
        return MemoryStore(length, codec)
    return DiskStore(folder, length, codec, fsync=fsync, clean_temps=clean_temps)


def tensor_store(
    folder: str | os.PathLike | None,
    length: int,
    shape: Shape | None = None,
    dtype: torch.dtype | None = None,
    *,
    fsync: bool = True,
    clean_temps: bool = True,
) -> Store:
    """A store of CPU tensors (``.npy`` files in ``folder``, or in memory when ``folder`` is None).

    ``shape`` (``None`` entries match any size) and ``dtype`` are checked on every put and read;
    ``fsync`` and ``clean_temps`` are :class:`DiskStore`'s.
    """
    codec = TensorCodec(shape, dtype)
    if folder is None:
        return MemoryStore(length, codec)
    return DiskStore(folder, length, codec, fsync=fsync, clean_temps=clean_temps)

