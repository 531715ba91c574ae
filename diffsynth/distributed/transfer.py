"""Frames from a rank that has them to the ranks that need them (machines without a shared folder).

:func:`fill` is collective: every rank calls it with the frames it wants; each one it lacks comes
from a rank that has it, through the process group, a few frames per round so that nothing the
size of the video is ever in memory. That is how a rank gets the latents of the
frames around its share (the smoother's halo, the next step's boundary frames) and how rank 0's
folder ends with every final frame.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image

from .cluster import Cluster, ClusterError


def _encode(value) -> torch.Tensor:
    if isinstance(value, Image.Image):
        return torch.from_numpy(np.asarray(value.convert("RGB"), dtype=np.uint8).copy())
    return torch.as_tensor(value).contiguous()


def _decode(tensor: torch.Tensor, like_image: bool):
    return Image.fromarray(tensor.numpy()) if like_image else tensor.clone()


def fill(cluster: Cluster, store, wanted: Iterable[int], *, shape: tuple[int, ...], dtype: torch.dtype, image: bool,
         chunk: int = 8) -> int:
    """Copy into ``store`` the frames of ``wanted`` it lacks, each from the lowest other rank that has it; returns how many came.

    ``shape``/``dtype``: one frame as sent (an image goes as ``(H, W, 3)`` uint8, ``image=True``).
    Any rank may hold a frame (its owner, a neighbour that read it, the layout of an earlier run
    with another number of processes); a wanted frame that no rank holds stops every rank.
    """
    me = cluster.rank
    lacking = [i for i in wanted if i not in store]
    requests = cluster.all_gather(lacking)
    asked = sorted({i for q, frames in enumerate(requests) if q != me for i in frames})
    haves = [set(h) for h in cluster.all_gather([i for i in asked if i in store])]

    def provider(q: int, i: int) -> int | None:
        return next((r for r in range(cluster.world) if r != q and i in haves[r]), None)

    gone = sorted({i for q, frames in enumerate(requests) for i in frames if provider(q, i) is None})
    if gone:
        raise ClusterError(f"frames {gone[:8]}{' ...' if len(gone) > 8 else ''} of {getattr(store, 'folder', store)} are needed but on no "
                           "machine (their files were deleted, or only an earlier run's layout had them). Run with the same number of "
                           "processes as before, or clean the output folders (`diffsynth clean`) to recompute them")
    pairs = [(q, i, provider(q, i)) for q, frames in enumerate(requests) for i in frames]  # the same list on every rank
    received = 0
    for start in range(0, len(pairs), chunk):
        sends: dict[int, list[int]] = {}
        expect: dict[int, list[int]] = {}
        for q, i, source in pairs[start:start + chunk]:
            if source == me:
                sends.setdefault(q, []).append(i)
            if q == me:
                expect.setdefault(source, []).append(i)
        out = {q: torch.stack([_encode(store[i]) for i in frames]) for q, frames in sends.items()}
        into = {source: torch.empty((len(frames), *shape), dtype=dtype) for source, frames in expect.items()}
        cluster.exchange(out, into)
        for source, frames in expect.items():
            for i, tensor in zip(frames, into[source]):
                store.put(i, _decode(tensor, image))
                received += 1
    return received


def frames_present(cluster: Cluster, present: list[list[int]], n: int) -> list[bool]:
    """For each candidate (e.g. a latent generation), given the frames this rank holds: whether all ``n`` are on some rank (collective)."""
    found = [set() for _ in present]
    for theirs in cluster.all_gather(present):
        for k, frames in enumerate(theirs):
            found[k].update(frames)
    return [len(frames) == n for frames in found]
