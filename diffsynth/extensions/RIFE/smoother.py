"""The RIFE smoother: replace every inner frame by a blend with what its neighbours predict.

One pass, for every inner frame ``i`` (using the input neighbours throughout the pass)::

    mid_i = RIFE(f[i-1], f[i+1])              # the frame the neighbours imply
    out_i = RIFE(f[i], mid_i)                 # interpolate=True (default)
    out_i = (f[i] + mid_i) / 2                # interpolate=False

The first and last frames are handed back unchanged. Output frame ``i`` needs input frames
``i-1 .. i+1`` only, so the result is a lazy sequence computed ``batch_size`` frames at a time.

DiffSynth-Studio had two variants: ``extensions.RIFE.RIFESmoother(model, device)`` called as
``smoother(frames, scale, batch_size, num_iter)`` and ``processors.RIFE.RIFESmoother(model, device,
scale, batch_size, interpolate)`` called as ``smoother(frames, **kwargs)``. This one class serves
both: call-time ``scale``/``batch_size`` override the constructor's, and ``num_iter`` passes are
stacked. Between passes the original kept float frames; here each pass reads the previous pass's
8-bit frames (at most half a level of difference per pass).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .frames import check_scale, frame_arrays, midpoints, resolve_device, to_image, to_rgb_image, to_tensor
from .lazy import ChunkedFrames, check_positive_int
from .loading import rife_from_model_manager

__all__ = ["RIFESmoother", "SmoothedFrames"]


class SmoothedFrames(ChunkedFrames):
    """The lazy result of one smoothing pass over ``frames`` (see the module docstring)."""

    def __init__(self, frames: Sequence[Any], model: torch.nn.Module, device: torch.device, scale: float, batch_size: int, interpolate: bool):
        super().__init__(len(frames))
        self._frames = frames
        self._model, self._device, self._scale = model, device, scale
        self._batch_size, self._interpolate = batch_size, interpolate

    def _locate(self, i: int) -> tuple[int, int] | None:
        if i == 0 or i == self._length - 1:
            return None
        return divmod(i - 1, self._batch_size)

    def _passthrough(self, i: int):
        return to_rgb_image(self._frames[i], i)

    def _compute(self, chunk: int) -> list:
        first = 1 + chunk * self._batch_size
        stop = min(first + self._batch_size, self._length - 1)  # inner frames first .. stop-1
        window = to_tensor(frame_arrays(self._frames, range(first - 1, stop + 1)))
        previous, current, following = window[:-2], window[1:-1], window[2:]
        middle = midpoints(self._model, previous, following, self._scale, self._device)
        if self._interpolate:
            out = midpoints(self._model, current, middle, self._scale, self._device)
        else:
            out = (current + middle) / 2
        return [to_image(frame) for frame in out]


class RIFESmoother:
    """Temporal smoothing with a loaded :class:`IFNet` (``device=None``: where the model is).

    ``smoother(frames, original_frames=None, **kwargs)`` returns a lazy sequence of PIL frames
    of the same length; ``original_frames`` and unknown keywords are ignored (the processor
    chain hands every processor the same keywords).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: str | torch.device | None = None,
        scale: float = 1.0,
        batch_size: int = 4,
        interpolate: bool = True,
    ):
        self.model = model
        self.device = resolve_device(model, device)
        self.torch_dtype = torch.float32  # IFNet does not work in half precision
        self.scale = check_scale(scale)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.interpolate = bool(interpolate)

    @staticmethod
    def from_model_manager(model_manager, **config) -> RIFESmoother:
        """``RIFESmoother(model_manager.RIFE, device=model_manager.device, **config)``."""
        config = {"device": model_manager.device, **config}
        return RIFESmoother(rife_from_model_manager(model_manager, "the RIFE smoother"), **config)

    def __call__(
        self,
        rendered_frames: Sequence[Any],
        original_frames: Sequence[Any] | None = None,
        *,
        scale: float | None = None,
        batch_size: int | None = None,
        num_iter: int = 1,
        **kwargs: Any,
    ) -> Sequence[Any]:
        scale = self.scale if scale is None else check_scale(scale)
        batch_size = self.batch_size if batch_size is None else check_positive_int("batch_size", batch_size)
        frames: Sequence[Any] = rendered_frames
        for _ in range(check_positive_int("num_iter", num_iter)):
            frames = SmoothedFrames(frames, self.model, self.device, scale, batch_size, self.interpolate)
        return frames
