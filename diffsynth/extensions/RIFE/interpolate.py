"""Frame interpolation: each iteration puts RIFE's middle frame between every two neighbours.

With ``num_iter = k`` the ``N`` input frames become ``2^k (N - 1) + 1`` (k=1: 2N - 1; 3 iterations
on 64 frames: 505), input frame ``i`` landing at position ``2^k i``. The frames strictly between
inputs ``i`` and ``i + 1`` depend on those two inputs only (each iteration pairs neighbours, so a
"segment" never mixes with the next), which is what lets the result stream: a chunk of
``batch_size`` segments is computed at a time, keeping its intermediate levels in float as the
original did between iterations, and the whole video is never held as float tensors.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...progress import ProgressCallback, track
from .frames import check_scale, frame_arrays, midpoints, resolve_device, to_image, to_rgb_image, to_tensor
from .lazy import ChunkedFrames, check_positive_int
from .loading import rife_from_model_manager

__all__ = ["RIFEInterpolater", "InterpolatedFrames"]


class InterpolatedFrames(ChunkedFrames):
    """The lazy result of :meth:`RIFEInterpolater.interpolate_lazy` (see the module docstring).

    Input frames come back unchanged (as RGB PIL images); frame ``j`` between inputs reads only
    inputs ``j // 2^k`` .. ``j // 2^k + batch_size`` (its chunk), computed on first use.
    """

    def __init__(self, frames: Sequence[Any], model: torch.nn.Module, device: torch.device, scale: float, batch_size: int, num_iter: int):
        self._frames = frames
        self._inputs = len(frames)
        self._step = 2**num_iter
        super().__init__((self._inputs - 1) * self._step + 1 if self._inputs else 0)
        self._model, self._device, self._scale = model, device, scale
        self._batch_size, self._num_iter = batch_size, num_iter

    def _locate(self, j: int) -> tuple[int, int] | None:
        segment, offset = divmod(j, self._step)
        if offset == 0:
            return None
        chunk, first = divmod(segment, self._batch_size)
        return chunk, first * (self._step - 1) + offset - 1

    def _passthrough(self, j: int):
        return to_rgb_image(self._frames[j // self._step], j // self._step)

    def _compute(self, chunk: int) -> list:
        first = chunk * self._batch_size
        last = min(first + self._batch_size, self._inputs - 1)  # segments first .. last-1
        inputs = to_tensor(frame_arrays(self._frames, range(first, last + 1)))
        levels = [[inputs[s], inputs[s + 1]] for s in range(last - first)]
        for _ in range(self._num_iter):
            pairs = [(s, k) for s, level in enumerate(levels) for k in range(len(level) - 1)]
            middle: dict[tuple[int, int], torch.Tensor] = {}
            for b in range(0, len(pairs), self._batch_size):
                batch = pairs[b : b + self._batch_size]
                left = torch.stack([levels[s][k] for s, k in batch])
                right = torch.stack([levels[s][k + 1] for s, k in batch])
                middle.update(zip(batch, midpoints(self._model, left, right, self._scale, self._device)))
            levels = [_interleave(level, [middle[s, k] for k in range(len(level) - 1)]) for s, level in enumerate(levels)]
        return [to_image(frame) for level in levels for frame in level[1:-1]]


def _interleave(frames: list, between: list) -> list:
    out = [frames[0]]
    for mid, frame in zip(between, frames[1:]):
        out += [mid, frame]
    return out


class RIFEInterpolater:
    """Frame interpolation with a loaded :class:`IFNet` (``device=None``: where the model is)."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device | None = None):
        self.model = model
        self.device = resolve_device(model, device)
        self.torch_dtype = torch.float32  # IFNet does not work in half precision

    @staticmethod
    def from_model_manager(model_manager) -> RIFEInterpolater:
        return RIFEInterpolater(rife_from_model_manager(model_manager, "RIFEInterpolater"), device=model_manager.device)

    def interpolate_lazy(self, images: Sequence[Any], scale: float = 1.0, batch_size: int = 4, num_iter: int = 1) -> InterpolatedFrames:
        """``images`` (a list, store, ``VideoData``, ...) with ``num_iter`` rounds of middle frames, computed on read."""
        check_scale(scale)
        batch_size = check_positive_int("batch_size", batch_size)
        num_iter = check_positive_int("num_iter", num_iter, minimum=0)
        return InterpolatedFrames(images, self.model, self.device, scale, batch_size, num_iter)

    def interpolate(
        self,
        images: Sequence[Any],
        scale: float = 1.0,
        batch_size: int = 4,
        num_iter: int = 1,
        progress_bar_cmd: Callable | None = None,
        *,
        output_store=None,
        progress_callback: ProgressCallback | None = None,
        progress_bar: Callable | None = None,
    ):
        """Interpolate ``images``: ``N`` frames become ``2^num_iter (N - 1) + 1``, inputs at multiples of ``2^num_iter``.

        * ``output_store=None``: returns a list of PIL images, as the original. That holds the
          whole result (as uint8), which suits short clips; for long videos pass a store.
        * ``output_store`` (e.g. ``image_store(folder, n)`` with ``n`` the result length): each
          frame is ``put`` as soon as its chunk is done, frames the store already holds are
          skipped (a rerun continues an interrupted one), and the store is returned.
        * :meth:`interpolate_lazy` gives the lazy sequence itself.

        ``scale`` is RIFE's (0.5 for 4K; one of 0.25, 0.5, 1, 2, 4). Progress counts output
        frames; ``progress_bar`` (a callable taking only an iterable) is the original's spelling.
        """
        frames = self.interpolate_lazy(images, scale, batch_size, num_iter)
        if progress_bar_cmd is None and progress_bar is not None:
            progress_bar_cmd = lambda items, total, desc: progress_bar(items)  # noqa: E731
        if output_store is None:
            return list(track(frames, "RIFE interpolation", len(frames), progress_bar_cmd, progress_callback))
        if len(output_store) != len(frames):
            raise ValueError(
                f"output_store has {len(output_store)} slots but {len(images)} frames with num_iter={num_iter} "
                f"give {len(frames)}; create it with that length"
            )
        for j in track(range(len(frames)), "RIFE interpolation", len(frames), progress_bar_cmd, progress_callback):
            if not output_store.has(j):
                output_store.put(j, frames[j])
        return output_store
