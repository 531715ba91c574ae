"""Progress reporting without a UI: small typed events and adapters.

The engine calls ``callback(ProgressEvent(...))``; a terminal gets a tqdm bar
through ``progress_bar_cmd``, the WebUI adapts the same events to its widgets.
"""
from __future__ import annotations

from dataclasses import dataclass
import inspect
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` units of ``stage`` are finished."""

    stage: str
    done: int
    total: int
    eta: float | None = None  # seconds left, when the run knows (the video runner: estimate, then measured rates)


ProgressCallback = Callable[[ProgressEvent], None]


def track(items: Iterable[T], stage: str, total: int, progress_bar_cmd=None, callback: ProgressCallback | None = None) -> Iterator[T]:
    """Iterate ``items`` through ``progress_bar_cmd`` (e.g. tqdm; None = no bar), emitting an event after each item."""
    wrapped = wrap_progress_bar(progress_bar_cmd, items, total, stage)
    if callback is not None:
        callback(ProgressEvent(stage, 0, total))
    for i, item in enumerate(wrapped):
        yield item
        if callback is not None:
            callback(ProgressEvent(stage, i + 1, total))


def wrap_progress_bar(progress_bar_cmd, items: Iterable[T], total: int, stage: str) -> Iterable[T]:
    """``progress_bar_cmd(items, total=, desc=)``; a one-argument command (the original's examples pass
    ``lambda x: x`` or a Streamlit adapter taking only the iterable) gets the iterable alone."""
    if progress_bar_cmd is None:
        return items
    if _accepts_total_and_desc(progress_bar_cmd):
        return progress_bar_cmd(items, total=total, desc=stage)
    return progress_bar_cmd(items)


def _accepts_total_and_desc(command) -> bool:
    try:
        params = inspect.signature(command).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: give it the bare iterable
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return True
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return {"total", "desc"} <= names
