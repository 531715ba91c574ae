"""A lazy, read-only sequence of PIL frames backed by a store: what pipelines and smoothers return."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Iterator

from PIL import Image

from .io import Prefetcher
from .stores import Store


class StoreFrames(Sequence):
    """``len``, indexing (slices give lists) and prefetched iteration over a store's frames.

    ``keepalive`` is kept as long as the frames are (e.g. a temporary folder to remove afterwards).
    """

    def __init__(self, store: Store, keepalive: Any = None):
        self._store = store
        self._keepalive = keepalive

    def __len__(self) -> int:
        return len(self._store)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._store[j] for j in range(*i.indices(len(self)))]
        return self._store[i]

    def __iter__(self) -> Iterator[Image.Image]:
        for _, frame in Prefetcher(self._store, range(len(self))):
            yield frame

    @property
    def store(self) -> Store:
        return self._store

    @property
    def folder(self) -> str | None:
        return getattr(self._store, "folder", None)
