"""Frames from the rank that has them to the ranks that need them (machines without a shared folder).

:func:`fill` is collective: every rank calls it with the frames it wants; each one it lacks comes
from the rank that owns it (``owner_of``), through the process group, a few frames per round so
that nothing the size of the video is ever in memory. That is how a rank gets the latents of the
frames around its share (the smoother's halo, the next step's boundary frames) and how rank 0's
folder ends with every final frame.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

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


def fill(cluster: Cluster, store, wanted: Iterable[int], owner_of: Callable[[int], int], *, shape: tuple[int, ...],
         dtype: torch.dtype, image: bool, chunk: int = 8) -> int:
    """Copy into ``store`` the frames of ``wanted`` it lacks, each from rank ``owner_of(i)``; returns how many came.

    ``shape``/``dtype``: one frame as sent (an image goes as ``(H, W, 3)`` uint8, ``image=True``).
    A wanted frame that its owner lacks too is on no machine: every rank stops with its number.
    """
    me = cluster.rank
    lacking = [i for i in wanted if i not in store]
    requests = cluster.all_gather(lacking)
    asked_of_me = sorted({i for q, frames in enumerate(requests) if q != me for i in frames if owner_of(i) == me})
    gone = [i for i in asked_of_me if i not in store]
    gone += [i for i in lacking if owner_of(i) == me]  # I own it and lack it myself
    reports = cluster.all_gather(gone)
    if any(reports):
        where = "; ".join(f"{cluster.members[r]} lacks frames {frames[:8]}" for r, frames in enumerate(reports) if frames)
        raise ClusterError(f"frames needed by another process are on no machine ({where}) in {getattr(store, 'folder', store)}: "
                           "their files were deleted. Run with the same number of processes as before, or clean the output "
                           "folders (`diffsynth clean`) to recompute them")
    pairs = [(q, i) for q, frames in enumerate(requests) for i in frames]  # the same list on every rank
    received = 0
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        sends: dict[int, list[int]] = {}
        expect: dict[int, list[int]] = {}
        for q, i in part:
            owner = owner_of(i)
            if owner == me:
                sends.setdefault(q, []).append(i)
            if q == me:
                expect.setdefault(owner, []).append(i)
        out = {q: torch.stack([_encode(store[i]) for i in frames]) for q, frames in sends.items()}
        into = {owner: torch.empty((len(frames), *shape), dtype=dtype) for owner, frames in expect.items()}
        cluster.exchange(out, into)
        for owner, frames in expect.items():
            for i, tensor in zip(frames, into[owner]):
                store.put(i, _decode(tensor, image))
                received += 1
    return received
