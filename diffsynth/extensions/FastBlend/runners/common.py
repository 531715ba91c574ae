"""What every FastBlend mode shares: engine settings, per-call seeds, frame reading, batching, progress.

The modes (``fast``, ``balanced``, ``accurate``, ``interpolation``) are written as a *plan*
(a pure generator of batches and completion events, decided by the frame count, the window
and the batch size only) and an *executor* that runs the plan against stores. Because a
batch's composition and its seed never depend on what was already computed, a resumed run
gives the same numbers as an uninterrupted one (DESIGN §3, "Same result").

Frames travel as ``uint8`` CPU tensors ``(H, W, 3)``; the engine gets float32 ``(B, H, W, 3)``
stacks on its device and returns float32 ones, which come back to the CPU at once.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from ....cache import Prefetcher, Store, StoreFrames, as_store  # StoreFrames: re-exported, the smoother's result type
from ....progress import ProgressCallback, ProgressEvent
from ....utils.atomic import atomic_save_image
from ....utils.device import default_device

__all__ = [
    "EngineSettings",
    "Matcher",
    "MatcherFactory",
    "derive_seed",
    "FrameReader",
    "BatchLoader",
    "to_uint8_frame",
    "remap",
    "engine_device",
    "chunk_with_completion",
    "Progress",
    "StoreFrames",
    "to_output_frame",
    "RunStats",
    "open_inputs",
    "check_output_store",
    "save_original_style",
]

logger = logging.getLogger("diffsynth")


class Matcher(Protocol):
    """The patch-match engine's contract (``PyramidPatchMatcher.estimate_nnf``)."""

    def estimate_nnf(self, source_guide: torch.Tensor, target_guide: torch.Tensor, source_style: torch.Tensor,
                     seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...


MatcherFactory = Callable[..., Matcher]
"""``factory(height, width, use_mean_target_style=False, use_pairwise_patch_error=False) -> Matcher``."""


@dataclass(frozen=True)
class EngineSettings:
    """The original's ``ebsynth_config`` plus where the engine runs; a :data:`MatcherFactory`.

    Defaults are DiffSynth-Studio's. ``device=None`` means CUDA when available, else the CPU
    (decided when the settings are used, never at import); ``backend`` is the engine's
    (``"auto"``: cupy on CUDA when installed, torch otherwise).
    """

    minimum_patch_size: int = 5
    threads_per_block: int = 8
    num_iter: int = 5
    gpu_id: int = 0
    guide_weight: float = 10.0
    initialize: str = "identity"
    tracking_window_size: int = 0
    device: str | None = None
    backend: str = "auto"

    def __post_init__(self):
        if self.minimum_patch_size < 1 or self.minimum_patch_size % 2 == 0:
            raise ValueError(f"minimum_patch_size must be an odd number >= 1 (a patch has a centre pixel), got {self.minimum_patch_size}")
        if self.num_iter < 1:
            raise ValueError(f"num_iter must be >= 1, got {self.num_iter}")
        if self.initialize not in ("identity", "random"):
            raise ValueError(f"initialize must be 'identity' or 'random', got {self.initialize!r}")
        if self.tracking_window_size < 0:
            raise ValueError(f"tracking_window_size must be >= 0, got {self.tracking_window_size}")

    @property
    def resolved_device(self) -> str:
        if self.device is not None:
            return str(self.device)
        return default_device()

    def as_dict(self) -> dict[str, Any]:
        """The settings that change results (for cache keys); the device and backend do not belong here."""
        return dict(minimum_patch_size=self.minimum_patch_size, num_iter=self.num_iter, guide_weight=self.guide_weight,
                    initialize=self.initialize, tracking_window_size=self.tracking_window_size)

    def __call__(self, height: int, width: int, use_mean_target_style: bool = False,
                 use_pairwise_patch_error: bool = False) -> Matcher:
        from ..patch_match import PyramidPatchMatcher  # the engine; imported only when a run needs it

        return PyramidPatchMatcher(
            height, width, channel=3, minimum_patch_size=self.minimum_patch_size,
            threads_per_block=self.threads_per_block, num_iter=self.num_iter, gpu_id=self.gpu_id,
            guide_weight=self.guide_weight, use_mean_target_style=use_mean_target_style,
            use_pairwise_patch_error=use_pairwise_patch_error, tracking_window_size=self.tracking_window_size,
            initialize=self.initialize, device=self.resolved_device, backend=self.backend,
        )


@dataclass
class RunStats:
    """Counters a run fills in when given one (tests and benchmarks): what it computed and held."""

    engine_calls: int = 0
    remaps: int = 0
    peak_nodes: int = 0
    peak_float_frames: int = 0
    frames_written: int = 0

    def held(self, nodes: int, float_frames: int) -> None:
        self.peak_nodes = max(self.peak_nodes, nodes)
        self.peak_float_frames = max(self.peak_float_frames, float_frames)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from a tuple of ints and strings (smoother seed, mode, direction, task indices).

    Every engine call gets its own seed derived from what it computes, never from how many
    calls ran before, so skipping committed work on a resume changes no number.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def to_uint8_frame(frame: Any, size: tuple[int, int] | None = None, what: str = "frame") -> torch.Tensor:
    """A frame (PIL image, ``(H, W, 3)`` uint8 array or tensor) as a uint8 CPU tensor ``(H, W, 3)``.

    With ``size=(width, height)`` a frame of another size is resized (PIL bicubic, as the
    original's ``VideoData.set_shape``); callers log that once.
    """
    if isinstance(frame, Image.Image):
        if frame.mode != "RGB":
            frame = frame.convert("RGB")
        if size is not None and frame.size != tuple(size):
            frame = frame.resize(tuple(size), Image.BICUBIC)
        return torch.from_numpy(np.array(frame, dtype=np.uint8))
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu().numpy()
    if isinstance(frame, np.ndarray):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"{what} must be an RGB image or a uint8 array of shape (H, W, 3), got {frame.dtype} {tuple(frame.shape)}")
        if size is not None and (frame.shape[1], frame.shape[0]) != tuple(size):
            return to_uint8_frame(Image.fromarray(frame), size, what)
        return torch.from_numpy(np.ascontiguousarray(frame))
    raise TypeError(f"{what} must be a PIL image or a uint8 (H, W, 3) array, got {type(frame).__name__}")


def frame_size(frame: Any) -> tuple[int, int]:
    """``(width, height)`` of a PIL image, array or tensor frame."""
    if isinstance(frame, Image.Image):
        return frame.size
    shape = tuple(frame.shape)
    return shape[1], shape[0]


def open_inputs(guide: Any, style: Any) -> tuple[Store, Store, int, tuple[int, int]]:
    """``(guide_store, style_store, n, (width, height))`` from two frame sequences or stores.

    ``n`` is the number of style frames; the guide must have at least that many (extra guide
    frames are ignored, as the pipeline passes its whole input video). The size is the first
    style frame's (the first one present: a process smoothing a span of a video may keep only
    the frames around its span); guide frames of another size are resized to it.
    """
    style = as_store(style)
    n = len(style)
    if n == 0:
        raise ValueError("FastBlend needs at least one style frame, got an empty sequence")
    guide = as_store(guide)
    if len(guide) < n:
        raise ValueError(f"FastBlend needs a guide frame for every style frame: {len(guide)} guide frames for {n} style frames")
    return guide, style, n, frame_size(style[first_present(style)])


def first_present(store: Store) -> int:
    """The first index that ``store`` holds (0 when it holds none: reading it then says what is missing)."""
    return next((i for i in range(len(store)) if i in store), 0)


def check_output_store(store: Store, n: int, what: str) -> Store:
    """``store`` if it is a writable store of ``n`` slots; otherwise a ``ValueError``/``TypeError`` saying why."""
    if not isinstance(store, Store) or not store.writable:
        raise TypeError(f"the {what} store must be a writable store (image_store/tensor_store), got {store!r}")
    if len(store) != n:
        raise ValueError(f"the {what} store has {len(store)} slots, but there are {n} frames")
    return store


def to_output_frame(value: torch.Tensor) -> np.ndarray:
    """A float frame in 0..255 as uint8: clipped, then truncated like the original's ``astype("uint8")``."""
    return value.clamp(0, 255).to(torch.uint8).numpy()


class FrameReader:
    """Frames of one store as uint8 tensors of one size, with a small LRU cache.

    The cache holds at most ``capacity`` frames (uint8), so memory does not depend on the
    number of frames; a frame evicted and asked for again is simply read again. Not
    thread-safe: one thread (the batch loader's) uses it.
    """

    def __init__(self, frames: Any, size: tuple[int, int], capacity: int, name: str):
        self.store: Store = as_store(frames)
        self.size = size
        self.capacity = max(1, int(capacity))
        self.name = name
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._resized_logged = False
        self.reads = 0

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> torch.Tensor:
        cached = self._cache.get(i)
        if cached is not None:
            self._cache.move_to_end(i)
            return cached
        raw = self.store[i]
        self.reads += 1
        if not self._resized_logged and frame_size(raw) != tuple(self.size):
            logger.info("FastBlend: %s frames are %dx%d; resizing them to %dx%d", self.name, *frame_size(raw), *self.size)
            self._resized_logged = True
        frame = to_uint8_frame(raw, self.size, f"{self.name} frame {i}")
        self._cache[i] = frame
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return frame


class BatchLoader:
    """Duck-typed store for :class:`~diffsynth.cache.Prefetcher`: ``loader[event]`` reads what the event needs.

    ``needs(event)`` returns ``[(reader_name, index), ...]``; the payload is a dict keyed the
    same way. Reading happens on the prefetch thread, one or two batches ahead of compute.
    """

    def __init__(self, readers: dict[str, FrameReader], needs: Callable[[Any], Iterable[tuple[str, int]]]):
        self.readers = readers
        self.needs = needs

    def __getitem__(self, event: Any) -> dict[tuple[str, int], torch.Tensor]:
        return {(name, i): self.readers[name][i] for name, i in self.needs(event)}


def prefetched(loader: BatchLoader, events: Iterable[Any], depth: int = 2) -> Prefetcher:
    """``(event, payload)`` for every event, payloads read ``depth`` events ahead on a thread."""
    return Prefetcher(loader, events, depth=depth)  # type: ignore[arg-type]  # any object with [] works


def engine_device(matcher: Matcher) -> torch.device | str:
    """Where the engine wants its inputs (its ``device`` attribute; the CPU for engines without one)."""
    return getattr(matcher, "device", "cpu")


def remap(matcher: Matcher, device: str | torch.device, source_guide: Sequence[torch.Tensor],
          target_guide: Sequence[torch.Tensor], source_style: Sequence[torch.Tensor], seed: int | Sequence[int]) -> torch.Tensor:
    """One engine call: stacks the frames, runs ``estimate_nnf`` and returns the remapped styles, float32 on the CPU.

    ``seed``: one per task (its result then depends on nothing else in the batch), or one int for the call.
    """

    def stack(frames):
        return torch.stack([f.to(device=device, dtype=torch.float32) for f in frames])

    _, target_style = matcher.estimate_nnf(stack(source_guide), stack(target_guide), stack(source_style), seed=seed)
    return target_style.detach().to("cpu", torch.float32)


def chunk_with_completion(stream: Iterable[tuple[Any, Sequence[Any]]], batch_size: int) -> Iterator[tuple[str, Any]]:
    """Cut the tasks of a stream of ``(item, tasks)`` into batches of ``batch_size``, in order.

    Yields ``("batch", tasks_tuple)`` and ``("done", item)``: an item is done right after the
    batch holding its last task (at once for an item without tasks, when nothing is pending).
    Batches are full except the last; so the cut is a function of the stream alone.
    """
    buffer: list[Any] = []
    waiting: list[Any] = []
    for item, tasks in stream:
        for task in tasks:
            buffer.append(task)
            if len(buffer) == batch_size:
                yield "batch", tuple(buffer)
                buffer = []
                for done in waiting:
                    yield "done", done
                waiting = []
        if buffer:
            waiting.append(item)
        else:
            yield "done", item
    if buffer:
        yield "batch", tuple(buffer)
    for done in waiting:
        yield "done", done


class Progress:
    """Progress of one stage: a tqdm-like bar (``bar_cmd``, optional) and ``ProgressEvent`` callbacks."""

    def __init__(self, stage: str, total: int, bar_cmd: Callable | None = None, callback: ProgressCallback | None = None):
        self.stage, self.total, self.callback = stage, total, callback
        self.done = 0
        self.bar = bar_cmd(total=total, desc=stage) if bar_cmd is not None and total else None
        if callback is not None:
            callback(ProgressEvent(stage, 0, total))

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if self.callback is not None:
            self.callback(ProgressEvent(self.stage, self.done, self.total))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def save_original_style(out: Store, save_path: str | os.PathLike | None) -> None:
    """Save every frame of ``out`` as ``save_path/%05d.png`` (the original runners' ``save_path``), atomically."""
    if save_path is None:
        return
    os.makedirs(save_path, exist_ok=True)
    for i, image in Prefetcher(out, range(len(out))):
        atomic_save_image(image, os.path.join(save_path, "%05d.png" % i))
