"""Small helpers shared by the engine's layers (standard library only at import time)."""

from .atomic import (
    atomic_open,
    atomic_path,
    atomic_save_image,
    atomic_save_safetensors,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    is_temp_name,
)

__all__ = [
    "atomic_open",
    "atomic_path",
    "atomic_save_image",
    "atomic_save_safetensors",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "is_temp_name",
]
