"""Progress reporting without a UI: small typed events and adapters.

The engine calls ``callback(ProgressEvent(...))``; a terminal gets a tqdm bar
through ``progress_bar_cmd``, the WebUI adapts the same events to its widgets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` units of ``stage`` are finished."""

    stage: str
    done: int
    total: int


ProgressCallback = Callable[[ProgressEvent], None]


def track(items: Iterable[T], stage: str, total: int, progress_bar_cmd=None, callback: ProgressCallback | None = None) -> Iterator[T]:
    """Iterate ``items`` through ``progress_bar_cmd`` (e.g. tqdm; None = no bar), emitting an event after each item."""
    wrapped = progress_bar_cmd(items, total=total, desc=stage) if progress_bar_cmd is not None else items
    if callback is not None:
        callback(ProgressEvent(stage, 0, total))
    for i, item in enumerate(wrapped):
        yield item
        if callback is not None:
            callback(ProgressEvent(stage, i + 1, total))
