"""``FastBlendSmoother``: the FastBlend deflicker (arXiv 2311.09265) as a video processor, streaming through a cache.

Called as ``smoother(rendered_frames, original_frames=guide)`` (by ``SDVideoPipeline`` at
``smoother_progress_ids`` or as a final pass, or in a ``SequencialProcessor`` chain); returns a
lazy sequence of PIL frames. The modes and their math are in
:mod:`diffsynth.extensions.FastBlend.runners`.

Where the intermediate results live (``cache_folder``):

- a folder: ``cache_folder/smoother/left/`` (fast mode's left-pass partial results, ``.npy``;
  its right pass merges each frame at once and stores no partial result) and ``blended/``
  (result PNGs), plus ``key.json``. Every file is committed
  atomically; calling again with the same inputs and settings continues where a killed run
  stopped, and returns the same frames as an uninterrupted run. The key hashes the settings
  and the pixels of every input frame (one extra read of the inputs), so different inputs,
  e.g. the next denoising step's frames, never reuse stale results: the folder is emptied
  and recomputed.
- ``None``: in memory when the clip is short (fast mode's float16 partial results and the
  frames take at most :attr:`FastBlendSmoother.in_memory_limit` bytes, 256 MiB: about 110
  frames at 512²), else a temporary folder (under ``$TMPDIR``), removed when the returned
  frames are garbage-collected. ``in_memory=`` forces either. For long videos give a folder
  on a real disk: ``/tmp`` is RAM on many systems, and a temporary folder does not resume.

``left/`` (and a ``right/`` left by an earlier version) is emptied once ``blended/`` is complete
unless ``keep_partials=True`` (DESIGN §3, "Disk budget").
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from ..cache import Prefetcher, Store, as_store, image_store, tensor_store
from ..utils.device import default_device
from ..extensions.FastBlend.runners import (EngineSettings, StoreFrames, accurate_blend, balanced_blend, fast_blend,
                                            interpolate_keyframes)
from ..extensions.FastBlend.runners.common import RunStats, first_present, frame_size, open_inputs, to_uint8_frame
from ..utils.atomic import atomic_write_text
from .base import VideoProcessor

__all__ = ["FastBlendSmoother", "INFERENCE_MODES", "DEFAULT_WINDOW_SIZE", "default_block_frames"]

logger = logging.getLogger("diffsynth")

INFERENCE_MODES = ("fast", "balanced", "accurate", "interpolation")
"""Valid ``inference_mode`` values."""

DEFAULT_WINDOW_SIZE = 60
"""``window_size`` when a config gives none (the original's default)."""


def default_block_frames(window_size: int) -> int:
    """Fast mode's block when none is given: long enough that each block's halo costs only a few percent."""
    return max(8 * window_size, 256)


_KEY_VERSION = 2  # bump when the numbers a mode computes change (2: per-task seeds, right pass anchored at absolute frames)
_SUBFOLDERS = ("left", "right", "blended")


class FastBlendSmoother(VideoProcessor):
    """FastBlend deflicker with DiffSynth-Studio's parameters and defaults.

    ``inference_mode``: ``"fast"`` (Fenwick tables, ``O(log w)`` patch matches per frame),
    ``"balanced"`` (``2w`` per frame), ``"accurate"`` (``2w + 1`` per frame, matched against the
    window's mean) or ``"interpolation"`` (render every guide frame from a few stylized
    keyframes; see :meth:`__call__`). ``window_size`` is ``w`` (frames each side),
    ``batch_size`` the patch matches per engine call; the engine settings are the original's
    ``ebsynth_config``. ``device=None``: CUDA when available, else the CPU. ``seed`` makes
    ``initialize="random"`` and the random search reproducible: every patch match draws from its
    own seed, derived from this one and the frames it matches, so a frame's result depends only
    on the frames of its window and the seed, not on the length of the clip (in fast and
    balanced modes not on how matches are batched either: ``batch_size`` changes speed only;
    accurate mode's chunks of ``batch_size`` sources are part of its method). Hence a video can
    be smoothed in spans, one per process (:meth:`smooth`).

    Keyword-only extras: ``backend`` (engine backend, ``"auto"``/``"torch"``/``"cupy"``),
    ``partial_dtype`` (fast mode's partial files, float16 by default, see
    :mod:`...runners.fast`), ``keep_partials``, ``in_memory`` (``None``: decide by size),
    ``frame_cache`` (decoded uint8 frames kept per input; default: a window's worth),
    ``matcher_factory`` (another engine, e.g. a stand-in in tests), ``block_frames`` (fast
    mode works through the video in blocks of this many frames, each block's left pass then its
    merging right pass, so at most a block's left partial results are stored: default
    ``max(8 * window_size, 256)``, a few percent more patch matches for the window of frames
    each block reads on each side, the same frames; 0: one block), ``progress_bar_cmd``
    (e.g. ``tqdm``) and ``progress_callback`` (``ProgressEvent``s).
    """

    in_memory_limit = 256 * 2**20

    def __init__(self, inference_mode: str = "fast", batch_size: int = 8, window_size: int = DEFAULT_WINDOW_SIZE,
                 minimum_patch_size: int = 5, threads_per_block: int = 8, num_iter: int = 5, gpu_id: int = 0,
                 guide_weight: float = 10.0, initialize: str = "identity", tracking_window_size: int = 0,
                 device: str | torch.device | None = None, cache_folder: str | os.PathLike | None = None, seed: int = 0,
                 *, backend: str = "auto", partial_dtype: torch.dtype = torch.float16, keep_partials: bool = False,
                 in_memory: bool | None = None, frame_cache: int | None = None, matcher_factory=None, block_frames: int | None = None,
                 progress_bar_cmd=None, progress_callback=None):
        if inference_mode not in INFERENCE_MODES:
            raise ValueError(f"unknown inference_mode {inference_mode!r}; valid modes: {', '.join(INFERENCE_MODES)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0 (frames on each side), got {window_size}")
        if partial_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"partial_dtype must be torch.float16 or torch.float32, got {partial_dtype}")
        self.inference_mode = inference_mode
        self.batch_size = batch_size
        self.window_size = window_size
        self.device = str(device) if device is not None else default_device()
        self.engine = EngineSettings(minimum_patch_size=minimum_patch_size, threads_per_block=threads_per_block,
                                     num_iter=num_iter, gpu_id=gpu_id, guide_weight=guide_weight, initialize=initialize,
                                     tracking_window_size=tracking_window_size, device=self.device, backend=backend)
        # absolute: _check_key tells its own subfolders from stale ones by comparing with the stores' (absolute) folders
        self.cache_folder = None if cache_folder is None else os.path.abspath(os.fspath(cache_folder))
        self.seed = int(seed)
        self.partial_dtype = partial_dtype
        self.keep_partials = keep_partials
        if block_frames is not None and block_frames < 0:
            raise ValueError(f"block_frames must be >= 0 (0: the whole video in one block), got {block_frames}")
        self.block_frames = default_block_frames(window_size) if block_frames is None else block_frames
        self.in_memory = in_memory
        self.frame_cache = frame_cache
        self.matcher_factory = matcher_factory
        self.progress_bar_cmd = progress_bar_cmd
        self.progress_callback = progress_callback
        self.last_stats: RunStats | None = None

    @classmethod
    def from_model_manager(cls, model_manager, **config: Any) -> "FastBlendSmoother":
        """``FastBlendSmoother(**config)`` on the model manager's device unless ``config`` names one."""
        config.setdefault("device", getattr(model_manager, "device", None))
        return cls(**config)

    def __repr__(self) -> str:
        return (f"FastBlendSmoother(inference_mode={self.inference_mode!r}, window_size={self.window_size}, "
                f"batch_size={self.batch_size}, device={self.device!r}, cache_folder={self.cache_folder!r})")

    # ------------------------------------------------------------------ call

    def __call__(self, rendered_frames, original_frames=None, keyframe_indices=None, **kwargs: Any) -> StoreFrames:
        """The deflickered frames, a lazy sequence of PIL images backed by the cache.

        ``rendered_frames`` is the style (the frames to deflicker), ``original_frames`` the
        guide video (motion comes from it). Without ``original_frames`` the rendered frames
        guide themselves (logged; the original crashed). Other keywords a processor chain
        passes along are accepted and unused.

        Interpolation mode: ``rendered_frames`` are the keyframes, a mapping
        ``{frame index: image}``, a store of ``len(original_frames)`` slots holding only the
        keyframes, or a sequence with ``keyframe_indices``; ``original_frames`` is required
        and every one of its frames is rendered.
        """
        if self.inference_mode == "interpolation":
            if original_frames is None:
                raise ValueError("interpolation renders the frames of original_frames (the guide video) from the keyframes "
                                 "in rendered_frames; original_frames is required")
            return self._run(as_store(original_frames), rendered_frames, keyframe_indices)
        if original_frames is None:
            logger.info("FastBlend: no original_frames given, so the rendered frames guide themselves "
                        "(motion is estimated from the flickering frames)")
            original_frames = rendered_frames
        if keyframe_indices is not None:
            raise ValueError(f"keyframe_indices is for inference_mode='interpolation', not {self.inference_mode!r}")
        guide, style, _, _ = open_inputs(original_frames, rendered_frames)
        return self._run(guide, style, None)

    def smooth(self, guide, style, result_folder: str | os.PathLike | None = None, keyframe_indices=None,
               span: tuple[int, int] | None = None) -> StoreFrames:
        """Like ``__call__(style, original_frames=guide)``, with the result frames in ``result_folder`` (the CLI's ``out/frames``).

        ``span=(a, b)``: only frames ``a <= t < b``, each the frame the whole call gives
        (every mode but interpolation, :attr:`SPAN_MODES`): one process's share of a render split
        across several. The caller runs :meth:`prepare` once first (it checks the cache's key
        and empties a stale cache) and :meth:`release_partials` once after every span is done.
        """
        if span is not None and self.inference_mode not in self.SPAN_MODES:
            raise ValueError(f"FastBlend's {self.inference_mode!r} mode smooths whole videos only; spans need one of {self.SPAN_MODES}")
        if self.inference_mode != "interpolation":
            guide, style, _, _ = open_inputs(guide, style)
        else:
            guide = as_store(guide)
        return self._run(guide, style, keyframe_indices, result_folder, span)

    SPAN_MODES = ("fast", "balanced", "accurate")
    """Modes in which a frame's result depends only on the frames of its window (and the seed): :meth:`smooth` takes a span."""

    def prepare(self, guide, style, result_folder: str | os.PathLike | None) -> None:
        """Check the cache folder's key against these inputs (emptying it when stale), before spans run (:meth:`smooth`)."""
        guide, style, n, size = open_inputs(guide, style)
        root, _ = self._root(n, size, result_folder)
        if root is not None:
            self._check_key(root, self._stores(root, n, size, result_folder), guide, style, None, n, size)

    def release_partials(self, n: int, size: tuple[int, int], everything: bool = False) -> None:
        """After every span is done: delete fast mode's left partials (unless ``keep_partials``), as a whole call does.

        ``everything=True``: empty the cache folder (partials, cached results, key) whatever
        ``keep_partials`` says, to start spans afresh where no process can check the key (it
        reads every frame).
        """
        root, _ = self._root(n, size, None) if self.cache_folder is not None else (None, None)
        if root is None:
            return
        stores = self._stores(root, n, size, None)
        if everything:
            for store in stores.values():
                store.clear()
            key = os.path.join(root, "key.json")
            if os.path.isfile(key):
                os.remove(key)
        elif not self.keep_partials and "left" in stores:
            stores["left"].clear()
        self._remove_old_right(root)

    # ------------------------------------------------------------------ internals

    def _run(self, guide: Store, style, keyframe_indices, result_folder=None, span=None) -> StoreFrames:
        interpolation = self.inference_mode == "interpolation"
        n = len(guide) if interpolation else len(style)
        size = self._size(style, keyframe_indices) if interpolation else frame_size(style[first_present(style)])
        root, keepalive = self._root(n, size, result_folder)
        stores = self._stores(root, n, size, result_folder)
        if span is not None:
            if root is None:
                raise ValueError("FastBlend spans need a cache_folder (the spans of several processes meet in it)")
        elif root is not None:
            self._check_key(root, stores, guide, style, keyframe_indices, n, size)
        elif result_folder is not None:  # nothing records what made its files: start afresh
            stores["result"].clear()
        out = stores["result"]
        first, stop = span if span is not None else (0, n)
        if any(first <= t < stop for t in out.missing()):
            stats = RunStats()
            self._dispatch(guide, style, keyframe_indices, stores, stats, span)
            self.last_stats = stats
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()  # the original freed CuPy's pools here: give the VRAM back to the pipeline
        if span is None and not self.keep_partials and "left" in stores and root is not None:
            stores["left"].clear()
            self._remove_old_right(root)
        return StoreFrames(out, keepalive)

    def _dispatch(self, guide, style, keyframe_indices, stores, stats, span=None) -> None:
        common = dict(batch_size=self.batch_size, matcher_factory=self.matcher_factory or self.engine, seed=self.seed,
                      frame_cache=self.frame_cache,
                      progress_bar_cmd=self.progress_bar_cmd, progress_callback=self.progress_callback, stats=stats)
        mode = self.inference_mode
        if mode == "fast":
            # In blocks: each block's left pass, then its right pass merging and releasing its partials, so at most a
            # block's left partial results are on disk (each block reads a window of frames more on each side: a few
            # percent more patch matches, the same frames).
            first, stop = span if span is not None else (0, len(stores["result"]))
            block = self.block_frames if self.block_frames and not self.keep_partials else max(stop - first, 1)
            for start in range(first, stop, block):
                fast_blend(guide, style, stores["result"], window_size=self.window_size, left=stores["left"],
                           partial_dtype=self.partial_dtype, keep_left=self.keep_partials, span=(start, min(start + block, stop)), **common)
        elif mode == "balanced":
            balanced_blend(guide, style, stores["result"], window_size=self.window_size, span=span, **common)
        elif mode == "accurate":
            accurate_blend(guide, style, stores["result"], window_size=self.window_size, span=span, **common)
        elif mode == "interpolation":
            interpolate_keyframes(guide, style, stores["result"], keyframe_indices=keyframe_indices,
                                  tracking_window_size=self.engine.tracking_window_size, **common)
        else:  # __init__ validated the mode; this guards a later edit of INFERENCE_MODES
            raise ValueError(f"unknown inference_mode {mode!r}; valid modes: {', '.join(INFERENCE_MODES)}")

    @staticmethod
    def _size(keyframes, keyframe_indices) -> tuple[int, int]:
        if isinstance(keyframes, Mapping):
            if not keyframes:
                raise ValueError("interpolation needs at least one keyframe, got an empty mapping")
            return frame_size(keyframes[min(keyframes)])
        store = as_store(keyframes)
        if keyframe_indices is not None:
            if len(store) == 0:
                raise ValueError("interpolation needs at least one keyframe, got none")
            return frame_size(store[0])
        present = [i for i in range(len(store)) if i in store]
        if not present:
            raise ValueError("interpolation needs at least one keyframe; the keyframe store holds none")
        return frame_size(store[present[0]])

    def _root(self, n: int, size: tuple[int, int], result_folder):
        """``(folder or None, keepalive)``: where the stores live (see the module docstring)."""
        if self.cache_folder is not None:
            return os.path.join(self.cache_folder, "smoother"), None
        in_memory = self.in_memory
        if in_memory is None:
            width, height = size
            per_frame = width * height * 3 * (1 + (self.partial_dtype.itemsize if self.inference_mode == "fast" else 0))
            in_memory = n * per_frame <= self.in_memory_limit and result_folder is None
        if in_memory:
            return None, None
        keepalive = tempfile.TemporaryDirectory(prefix="diffsynth_fastblend_")
        return keepalive.name, keepalive

    def _stores(self, root, n, size, result_folder) -> dict[str, Store]:
        width, height = size

        def sub(name):
            return None if root is None else os.path.join(root, name)

        result = result_folder if result_folder is not None else sub("blended")
        stores = {"result": image_store(None if result is None else os.fspath(result), n, size=size)}
        if self.inference_mode == "fast":
            stores["left"] = tensor_store(sub("left"), n, shape=(height, width, 3), dtype=self.partial_dtype)
        return stores

    @staticmethod
    def _remove_old_right(root: str) -> None:
        """Remove ``root/right/``: versions before the merging right pass stored ``R_t`` there; nothing reads it now."""
        folder = os.path.join(root, "right")
        if os.path.isdir(folder):
            shutil.rmtree(folder)

    def _check_key(self, root, stores, guide, style, keyframe_indices, n, size) -> None:
        """Empty the stores unless ``root/key.json`` says they were computed from these inputs and settings."""
        key = self._key(guide, style, keyframe_indices, n, size)
        path = os.path.join(root, "key.json")
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f).get("key")
        except (OSError, ValueError):
            old = None
        if old == key:
            return
        if old is not None or any(len(store) - len(store.missing()) for store in stores.values()):
            logger.info("FastBlend: the inputs or settings changed since %s was written; recomputing", root)
        for store in stores.values():
            store.clear()
        for name in _SUBFOLDERS:  # another mode's files (e.g. fast's partials before a switch to balanced)
            folder = os.path.join(root, name)
            if os.path.isdir(folder) and folder not in {getattr(store, "folder", None) for store in stores.values()}:
                shutil.rmtree(folder)
        os.makedirs(root, exist_ok=True)
        atomic_write_text(path, json.dumps({"key": key, "mode": self.inference_mode, "frames": n,
                                            "size": list(size)}, indent=1))

    def _key(self, guide, style, keyframe_indices, n, size) -> str:
        settings = dict(version=_KEY_VERSION, mode=self.inference_mode, window_size=self.window_size,
                        batch_size=self.batch_size, seed=self.seed, engine=self.engine.as_dict(),
                        partial_dtype=str(self.partial_dtype), frames=n, size=list(size),
                        engine_factory=_name_of(self.matcher_factory))
        digest = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16)
        digest.update(_fingerprint(guide, range(n), size))
        if self.inference_mode != "interpolation":
            digest.update(_fingerprint(as_store(style), range(n), size))
        elif isinstance(style, Mapping):
            digest.update(repr(sorted(style)).encode())
            digest.update(_fingerprint(_MappingView(style), sorted(style), size))
        else:
            store = as_store(style)
            indices = list(range(len(store))) if keyframe_indices is not None else [i for i in range(len(store)) if i in store]
            digest.update(repr((keyframe_indices, indices)).encode())
            digest.update(_fingerprint(store, indices, size))
        return digest.hexdigest()


def _name_of(factory) -> str | None:
    """A stable name of a custom matcher factory for the key (a repr may hold a memory address)."""
    if factory is None:
        return None
    return getattr(factory, "__qualname__", type(factory).__qualname__)


class _MappingView:
    def __init__(self, mapping):
        self.mapping = mapping

    def __getitem__(self, i):
        return self.mapping[i]


def _fingerprint(frames, indices, size) -> bytes:
    """A hash of the pixels of ``frames[i]`` for ``i`` in ``indices`` (read ahead on a thread)."""
    digest = hashlib.blake2b(digest_size=16)
    for i, frame in Prefetcher(frames, indices):
        digest.update(i.to_bytes(8, "little"))
        digest.update(to_uint8_frame(frame, size).numpy().tobytes())
    return digest.digest()
