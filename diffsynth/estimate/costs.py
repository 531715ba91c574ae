"""Seconds per unit of work: probed defaults, calibration on the device, and the traced model calls they scale.

A unit is a key of the stages' counts of work (``pipelines/workload.py``) or one the estimate adds
(``denoise frames``: one frame of one window in one step, both prompt branches and every ControlNet;
``latent files``: a latent written and read back; ``model loading``: the whole load, once).

Three sources, in order of preference (the estimate says which one each figure used):

- **calibrated**: ``--calibrate`` loads the real models and times a few real units at the run's size on
  the chosen device (one window, one decode and encode, each annotator on one frame, FastBlend on three
  frames, a short video encode): seconds, not minutes. Kept in the history for later estimates.
- **history**: the calibration of an earlier estimate of the same device, models and size, and the
  measured ÷ predicted ratio per stage of earlier runs (applied by the estimate).
- **default**: the model calls traced on the meta device (FLOPs and operator count) divided by this
  device's matrix-product rate and per-operator overhead, probed in a fraction of a second; file I/O and
  PNG encoding probed on a few real frames of the input; the rest from per-megapixel constants measured
  on a 2-core CPU (FastBlend, RIFE, neural annotators, the video encoder), deliberately on the slow side.
"""
from __future__ import annotations

import io
import os
import tempfile
import time

import torch

from .trace import Traced

# Per-megapixel constants measured on the 2-core development CPU (bench/estimate.py reports how defaults fare).
_CPU_SECONDS_PER_MEGAPIXEL = {
    "FastBlend remaps": 28.0,        # one patch-match remap (5 iterations, the default patch sizes), at 0.1 MP and up
    "RIFE frames": 1.2,
    "neural annotator frames": 2.0,  # depth, softedge, lineart, openpose at their own working size
    "frames encoded": 0.02,          # libx264 near-lossless (quality 9)
    "edited frames": 0.01,
    "video decode": 0.01,
}
# A remap of balanced and accurate modes (as workload counts them) against fast mode's: measured at 64 and 128 px.
BALANCED_REMAP = 0.5
ACCURATE_REMAP = 1.0
_CUDA_SPEEDUP = 20.0  # GPU kernels of FastBlend, RIFE and annotators against the CPU constants


# Video bytes per frame of each data.output codec at its defaults, relative to the default H.264 (crf 5), measured by
# bench/finish.py on 60 frames of 1280x720 testsrc2 (h264 36.3 KiB/frame): rough, content moves them. A crf away from the
# codec's default scales the size by 2^(-delta/6) (x264's rule of thumb: 6 crf steps halve or double the bytes).
_VIDEO_BYTES_VS_H264 = {"h264": 1.0, "h265": 1.02, "vp9": 0.62, "prores": 5.5, "gif": 2.05, "png": 0.0}


def video_bytes_factor(output) -> float:
    """The finished video's bytes per frame under ``output`` (``OutputOptions``) relative to the default H.264 (1.0; png: 0)."""
    from ..data.output import crf_range

    if output is None:
        return 1.0
    factor = _VIDEO_BYTES_VS_H264[output.codec]
    limits = crf_range(output.codec)
    if limits is not None and output.crf is not None:
        factor *= 2.0 ** ((limits[2] - output.crf) / 6.0)
    return factor


def _timed(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# A device the estimate cannot probe (``--device cuda`` on a machine without one): a mid-range consumer GPU in fp16.
ASSUMED_GPU = {"flops_per_second": 40e12, "seconds_per_op": 15e-6, "assumed": True}


def probe_device(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """This device's matrix-product rate (FLOP/s) and per-operator overhead (s), measured in well under a second
    (:data:`ASSUMED_GPU` for a CUDA device this machine does not have)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return dict(ASSUMED_GPU)
    size = 1024 if device.type == "cuda" else 384
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    (a @ b).sum().item()
    repeat = 50 if device.type == "cuda" else 8
    _sync(device)
    seconds = _timed(lambda: a @ b, repeat)
    _sync(device)
    small = torch.zeros(8, device=device, dtype=dtype)
    _sync(device)
    op = _timed(lambda: small.add(1.0), 400)
    _sync(device)
    return {"flops_per_second": 2 * size ** 3 / max(seconds, 1e-9), "seconds_per_op": op}


def traced_seconds(traced: Traced, probe: dict[str, float]) -> float:
    """A traced call's default time: its FLOPs at the probed rate plus its operators at the probed overhead.

    Convolutions and attention at small sizes run well below the peak matrix rate; the factor 2 keeps
    the default on the slow side (the estimate is for planning: late by half is worse than early)."""
    return 2.0 * traced.flops / probe["flops_per_second"] + traced.ops * probe["seconds_per_op"]


_CPU_SECONDS_AT_LEAST = {"FastBlend remaps": 0.06}  # small frames: the fixed cost of a remap


def per_megapixel(unit: str, device: torch.device, width: int, height: int) -> float:
    seconds = max(_CPU_SECONDS_PER_MEGAPIXEL[unit] * width * height / 1e6, _CPU_SECONDS_AT_LEAST.get(unit, 0.0))
    return seconds / _CUDA_SPEEDUP if device.type == "cuda" and unit not in ("frames encoded", "video decode") else seconds


def probe_files(folder: str, frames, width: int, height: int) -> dict[str, float]:
    """Seconds to write (atomically, fsynced) and read back one PNG frame and one latent, and the source's PNG bytes.

    ``frames``: a few real input frames (PIL). Written to a temporary folder next to the output
    folder (same file system), removed after."""
    from ..cache import image_store, tensor_store

    parent = folder
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent) or "."
    with tempfile.TemporaryDirectory(prefix=".diffsynth_estimate_", dir=parent) as tmp:
        images = image_store(os.path.join(tmp, "images"), len(frames), size=(width, height))
        start = time.perf_counter()
        for i, frame in enumerate(frames):
            images.put(i, frame)
        png_write = (time.perf_counter() - start) / len(frames)
        png_bytes = images.nbytes() / len(frames)
        start = time.perf_counter()
        for i in range(len(frames)):
            images[i]
        png_read = (time.perf_counter() - start) / len(frames)
        latents = tensor_store(os.path.join(tmp, "latents"), 4, shape=(4, height // 8, width // 8), dtype=torch.float32)
        value = torch.randn(4, height // 8, width // 8)
        start = time.perf_counter()
        for i in range(4):
            latents.put(i, value)
        for i in range(4):
            latents[i]
        latent_io = (time.perf_counter() - start) / 4
    return {"png write": png_write, "png read": png_read, "png bytes": png_bytes, "latent io": latent_io}


def png_bytes_of(frames) -> float:
    """Mean bytes of ``frames`` (PIL) as the stores write them (PNG, zlib level 1)."""
    from ..cache.codecs import ImageCodec

    codec = ImageCodec()
    total = 0
    for frame in frames:
        buffer = io.BytesIO()
        codec.write(codec.canonical(frame, copy=False), buffer)
        total += buffer.tell()
    return total / max(len(frames), 1)
