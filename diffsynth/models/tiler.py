"""Apply a convolutional network tile by tile and blend the tiles without seams.

Used for tiled VAE encode/decode and tiled UNet attention on images too large
to process at once. Replaces DiffSynth-Studio's ``TileWorker`` (upstream_spec §6.5),
which fixed two of its faults:

* it covered only ``dim >= tile`` with ``(dim - tile) % stride == 0`` and left
  NaN borders otherwise. Here the tile is clamped to the image and the last tile
  is placed flush with the far edge, so every size is covered;
* its blend mask ramped down at the image borders too, so border pixels relied on
  a single, strongly down-weighted tile. Here the mask is flat (1) on tile edges
  that lie on the image border and ramps only towards inner edges.

Blending: each tile's output is multiplied by a separable weight mask
``w_y(y) * w_x(x)`` that ramps linearly from near 0 to 1 over ``border`` pixels
from each inner edge; the sums of ``output * mask`` and of ``mask`` are
accumulated in float32 and divided at the end. The mask is positive everywhere,
so the division is always defined.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["tiled_forward", "tile_starts", "axis_blend_weights"]

_INTEGRAL_TOLERANCE = 1e-6


def tiled_forward(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile_size: int | Sequence[int],
    tile_stride: int | Sequence[int],
    *,
    out_scale: float = 1.0,
    out_channels: int | None = None,
    tile_batch_size: int = 1,
    border: float | Sequence[float] | None = None,
) -> torch.Tensor:
    """Compute ``fn(x)`` tile by tile and blend the tiles.

    Args:
        fn: maps a batch of tiles ``(k*B, C, th, tw)`` to ``(k*B, C_out, th*out_scale, tw*out_scale)``.
            It must treat batch entries independently (tiles are stacked on the batch axis).
        x: input ``(B, C, H, W)``.
        tile_size, tile_stride: tile edge and step in input pixels, an int or ``(h, w)``;
            ``0 < tile_stride <= tile_size``. A tile larger than the input is clamped to it.
        out_scale: output pixels per input pixel (8 for a VAE decoder, 1/8 for an encoder).
            Tile positions and sizes times ``out_scale`` must be whole numbers.
        out_channels: if given, ``fn``'s channel count is checked against it.
        tile_batch_size: how many tiles go through ``fn`` in one call.
        border: width of the blend ramp in input pixels (default ``tile_stride / 2``), an int or ``(h, w)``.

    Returns:
        ``(B, C_out, H*out_scale, W*out_scale)`` in ``fn``'s output dtype, on its output device.

    Only the output accumulators are image-sized; each call of ``fn`` sees a copy
    of ``tile_batch_size`` tiles.
    """
    _check_input(x)
    tile_h, tile_w = _pair(tile_size, "tile_size")
    stride_h, stride_w = _pair(tile_stride, "tile_stride")
    for axis, tile, stride in (("height", tile_h, stride_h), ("width", tile_w, stride_w)):
        _check_tile_and_stride(axis, tile, stride)
    border_h, border_w = _pair(border, "border") if border is not None else (stride_h / 2, stride_w / 2)
    _check_scale_and_batch(out_scale, tile_batch_size, border_h, border_w)

    rows = _AxisLayout.build("height", x.shape[2], tile_h, stride_h, border_h, out_scale)
    cols = _AxisLayout.build("width", x.shape[3], tile_w, stride_w, border_w, out_scale)
    tiles = [(r, c) for r in range(len(rows.starts)) for c in range(len(cols.starts))]

    blender: _Blender | None = None
    for first in range(0, len(tiles), tile_batch_size):
        group = tiles[first : first + tile_batch_size]
        batch = torch.cat([_slice(x, rows, cols, r, c) for r, c in group], dim=0)
        result = fn(batch)
        _check_output(result, len(group) * x.shape[0], out_channels, rows.out_tile, cols.out_tile)
        if blender is None:
            blender = _Blender(x.shape[0], result.shape[1], rows.out_size, cols.out_size, result)
        for i, (r, c) in enumerate(group):
            blender.add(result[i * x.shape[0] : (i + 1) * x.shape[0]], rows, cols, r, c)
    assert blender is not None  # there is always at least one tile
    return blender.result()


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis: ``0, s, 2s, ...`` plus ``size - t`` so the far edge is covered.

    ``t = min(tile, size)``; consecutive starts are at most ``stride`` apart and
    every index in ``[0, size)`` lies in at least one tile.
    """
    tile = min(tile, size)
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def axis_blend_weights(length: int, border: float, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """1-D blend weights of one tile along one axis (float32, all in ``(0, 1]``).

    Pixel ``i`` gets ``min(1, (i + 0.5) / border)`` from an inner start edge and
    the mirror image from an inner end edge; an edge on the image border
    (``ramp_* = False``) keeps weight 1 so border pixels are not down-weighted.
    """
    weights = torch.ones(length, dtype=torch.float32)
    if border <= 0:
        return weights
    ramp = ((torch.arange(length, dtype=torch.float32) + 0.5) / border).clamp_(max=1.0)
    if ramp_start:
        weights = torch.minimum(weights, ramp)
    if ramp_end:
        weights = torch.minimum(weights, ramp.flip(0))
    return weights


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _AxisLayout:
    """Where the tiles lie along one axis, in input and output pixels."""

    tile: int
    starts: list[int]
    out_size: int
    out_tile: int
    out_starts: list[int]
    weights: list[torch.Tensor]  # one 1-D blend mask per tile, output pixels

    @classmethod
    def build(cls, axis: str, size: int, tile: int, stride: int, border: float, out_scale: float) -> "_AxisLayout":
        tile = min(tile, size)
        starts = tile_starts(size, tile, stride)
        out_tile = _to_output(tile, out_scale, f"tile size along {axis}")
        out_starts = [_to_output(s, out_scale, f"tile position along {axis}") for s in starts]
        weights = [
            axis_blend_weights(out_tile, border * out_scale, ramp_start=s > 0, ramp_end=s + tile < size)
            for s in starts
        ]
        out_size = _to_output(size, out_scale, f"input {axis}")
        return cls(tile, starts, out_size, out_tile, out_starts, weights)


def _to_output(value: int, out_scale: float, what: str) -> int:
    scaled = value * out_scale
    nearest = round(scaled)
    if abs(scaled - nearest) > _INTEGRAL_TOLERANCE:
        hint = ""
        if out_scale < 1:
            hint = f"; with out_scale {out_scale:g} use sizes, tile sizes and strides that are multiples of {1 / out_scale:g}"
        raise ValueError(f"{what} {value} × out_scale {out_scale:g} = {scaled:g} is not a whole number of output pixels{hint}")
    return nearest


def _slice(x: torch.Tensor, rows: _AxisLayout, cols: _AxisLayout, r: int, c: int) -> torch.Tensor:
    y0, x0 = rows.starts[r], cols.starts[c]
    return x[:, :, y0 : y0 + rows.tile, x0 : x0 + cols.tile]


# --------------------------------------------------------------------------- accumulation


class _Blender:
    """Float accumulators for ``sum(out * mask)`` and ``sum(mask)``."""

    def __init__(self, batch: int, channels: int, height: int, width: int, like: torch.Tensor):
        self.out_dtype = like.dtype
        acc_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        self.values = torch.zeros(batch, channels, height, width, dtype=acc_dtype, device=like.device)
        self.weights = torch.zeros(height, width, dtype=acc_dtype, device=like.device)

    def add(self, tile: torch.Tensor, rows: _AxisLayout, cols: _AxisLayout, r: int, c: int) -> None:
        device, dtype = self.values.device, self.values.dtype
        mask = rows.weights[r].to(device, dtype)[:, None] * cols.weights[c].to(device, dtype)[None, :]
        y0, x0 = rows.out_starts[r], cols.out_starts[c]
        region = (slice(y0, y0 + rows.out_tile), slice(x0, x0 + cols.out_tile))
        self.values[(..., *region)] += tile.to(self.values.dtype) * mask
        self.weights[region] += mask

    def result(self) -> torch.Tensor:
        if not bool((self.weights > 0).all()):  # guaranteed by tile_starts; cheap to verify
            raise RuntimeError("internal error: tiled_forward left pixels uncovered")
        return self.values.div_(self.weights).to(self.out_dtype)


# --------------------------------------------------------------------------- validation


def _pair(value, name: str) -> tuple:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return value, value
    if isinstance(value, Sequence) and len(value) == 2:
        return value[0], value[1]
    raise TypeError(f"{name} must be a number or a (height, width) pair, got {value!r}")


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"tiled_forward expects a (B, C, H, W) tensor, got {shape}")
    if min(x.shape) == 0:
        raise ValueError(f"tiled_forward got an empty tensor of shape {tuple(x.shape)}")


def _check_tile_and_stride(axis: str, tile, stride) -> None:
    if not isinstance(tile, numbers.Integral) or tile <= 0:
        raise ValueError(f"tile_size must be a positive integer, got {tile!r} along {axis}")
    if not isinstance(stride, numbers.Integral) or not 0 < stride <= tile:
        raise ValueError(
            f"tile_stride must be an integer with 0 < tile_stride <= tile_size ({tile}), got {stride!r} along {axis}"
        )


def _check_scale_and_batch(out_scale: float, tile_batch_size: int, border_h: float, border_w: float) -> None:
    if not (isinstance(out_scale, numbers.Real) and math.isfinite(out_scale) and out_scale > 0):
        raise ValueError(f"out_scale must be a positive number (8 for a VAE decoder, 1/8 for an encoder), got {out_scale!r}")
    if not isinstance(tile_batch_size, numbers.Integral) or tile_batch_size < 1:
        raise ValueError(f"tile_batch_size must be a positive integer, got {tile_batch_size!r}")
    if min(border_h, border_w) < 0:
        raise ValueError(f"border must be >= 0 (0 = hard seams), got {(border_h, border_w)}")


def _check_output(result, batch: int, out_channels: int | None, out_h: int, out_w: int) -> None:
    if not isinstance(result, torch.Tensor) or result.ndim != 4:
        got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        raise ValueError(f"the tiled function must return a (B, C, H, W) tensor, got {got}")
    expected_channels = result.shape[1] if out_channels is None else out_channels
    expected = (batch, expected_channels, out_h, out_w)
    if tuple(result.shape) != expected:
        raise ValueError(
            f"the tiled function returned {tuple(result.shape)} for a batch of tiles; expected {expected} "
            "(check out_scale and out_channels)"
        )
