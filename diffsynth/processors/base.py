"""What every video processor (a "smoother" step) shares.

A processor is called as ``processor(rendered_frames, original_frames=None, **kwargs)`` and
returns the processed frames: a sequence of PIL images of the same length (``len``, ``[i]``,
iteration). Inputs may be any such sequence (a list, a store, ``VideoData``, the pipeline's
``VideoFrames``). Results are lazy wherever the work allows, so a chain over a long video holds
a few frames, not the video: per-frame edits return a :class:`MappedFrames` view.
"""
from __future__ import annotations

import abc
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["VideoProcessor", "MappedFrames"]


class VideoProcessor(abc.ABC):
    """Base of the processors; ``from_model_manager(mm, **config)`` builds one for a model set."""

    @abc.abstractmethod
    def __call__(self, rendered_frames: Sequence[Any], original_frames: Sequence[Any] | None = None, **kwargs: Any) -> Sequence[Any]:
        """The processed frames; ``original_frames`` is the guide video for processors that use one."""

    @classmethod
    def from_model_manager(cls, model_manager, **config: Any) -> VideoProcessor:
        """A processor that needs no model: ``cls(**config)``."""
        return cls(**config)


class MappedFrames(Sequence):
    """``function(frames[i])`` for every ``i``, computed when read (a slice gives a list).

    Reading frame ``i`` reads input frame ``i`` only, once per read: nothing is cached, so a
    consumer that reads a frame twice computes it twice.
    """

    def __init__(self, frames: Sequence[Any], function: Callable[[Any], Any]):
        self._frames = frames
        self._function = function
        self._length = len(frames)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            return [self._function(self._frames[i]) for i in range(*key.indices(self._length))]
        index = operator.index(key)
        i = index + self._length if index < 0 else index
        if not 0 <= i < self._length:
            raise IndexError(f"frame {index} is out of range for {self._length} frames")
        return self._function(self._frames[i])

    def __iter__(self) -> Iterator[Any]:
        for i in range(self._length):
            yield self._function(self._frames[i])

    def __repr__(self) -> str:
        return f"MappedFrames({self._length} frames, {getattr(self._function, '__qualname__', self._function)!r})"
