"""A read-only lazy frame sequence that computes its frames a chunk (one model batch) at a time.

RIFE's outputs depend only on a few neighbouring input frames, so a result sequence need not
exist all at once: frame ``i`` is computed when it is read, together with the rest of its chunk
(one batch for the model), and the last few chunks are kept. Reading in order therefore runs the
model once per chunk and holds O(chunk) frames, however long the video. Random access works
too, recomputing a chunk that has been dropped.
"""
from __future__ import annotations

import abc
import operator
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image

__all__ = ["ChunkedFrames", "check_positive_int"]


def check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class ChunkedFrames(Sequence, abc.ABC):
    """``len``, ``[i]`` (negative counts from the end; a slice gives a list) and in-order iteration.

    Subclasses implement :meth:`_locate` (the chunk and position that hold a computed frame, or
    None for an input frame handed through), :meth:`_passthrough` and :meth:`_compute` (all
    frames of one chunk). Three chunks are
    kept: a consumer reading in order, or a stacked sequence reading a window around each of
    its own chunks, never recomputes one.
    """

    cached_chunks = 3

    def __init__(self, length: int):
        self._length = length
        self._cache: OrderedDict[int, list[Image.Image]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            return [self._frame(i) for i in range(*key.indices(self._length))]
        try:
            index = operator.index(key)
        except TypeError:
            raise TypeError(f"frame indices must be integers or slices, got {type(key).__name__}") from None
        i = index + self._length if index < 0 else index
        if not 0 <= i < self._length:
            raise IndexError(f"frame {index} is out of range for {self._length} frames")
        return self._frame(i)

    def __iter__(self) -> Iterator[Any]:
        for i in range(self._length):
            yield self._frame(i)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._length} frames, lazy)"

    def _frame(self, i: int) -> Any:
        where = self._locate(i)
        if where is None:
            return self._passthrough(i)
        chunk, position = where
        return self._chunk(chunk)[position]

    def _chunk(self, chunk: int) -> list[Image.Image]:
        with self._lock:  # one computation per chunk even if two threads read at once
            frames = self._cache.get(chunk)
            if frames is None:
                frames = self._compute(chunk)
                self._cache[chunk] = frames
                while len(self._cache) > self.cached_chunks:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(chunk)
            return frames

    @abc.abstractmethod
    def _locate(self, i: int) -> tuple[int, int] | None:
        """``(chunk, position)`` of computed frame ``i``; None when frame ``i`` is an input frame."""

    @abc.abstractmethod
    def _passthrough(self, i: int) -> Image.Image:
        """Output frame ``i`` when it is an input frame handed through unchanged."""

    @abc.abstractmethod
    def _compute(self, chunk: int) -> list[Image.Image]:
        """Every computed frame of ``chunk``, in order."""
