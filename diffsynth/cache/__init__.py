"""The disk layer (DESIGN §3): per-index stores of frames and latents, their file formats,
and background prefetch / write-behind.

Only the standard library, numpy, torch and PIL are imported here (DESIGN §2).
"""

from .frames import StoreFrames
from .codecs import Codec, ImageCodec, InvalidFile, TensorCodec
from .io import Prefetcher, WriteBehind
from .stores import (
    CorruptItem,
    DiskStore,
    ListView,
    MemoryStore,
    MissingItem,
    Store,
    as_store,
    image_store,
    tensor_store,
)

__all__ = [
    "StoreFrames",
    "Codec",
    "ImageCodec",
    "TensorCodec",
    "InvalidFile",
    "Store",
    "MemoryStore",
    "DiskStore",
    "ListView",
    "as_store",
    "image_store",
    "tensor_store",
    "MissingItem",
    "CorruptItem",
    "Prefetcher",
    "WriteBehind",
]
