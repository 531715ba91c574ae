"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

Every writer follows the same recipe (DESIGN.md §3, "Atomic"):

1. write to a temporary file in the *same folder* as the target, named
   ``.<target name>.<random>.tmp`` (hidden, recognisable by :func:`is_temp_name`);
2. flush and ``fsync`` it, so the bytes are on disk before the name points at them;
3. ``os.replace`` it over the target (atomic on POSIX and Windows);
4. ``fsync`` the folder (POSIX), so the rename itself survives a power cut.

If anything fails, the temporary file is removed and the target is untouched.
``fsync=False`` skips steps 2 and 4: still atomic against a killed process, but
not against a power loss; useful for scratch data that is cheap to recompute.

Only the standard library is imported at module level; torch, PIL and
safetensors are imported by the functions that need them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator, Mapping
from typing import IO, Any

__all__ = [
    "DiskFullError",
    "TEMP_PREFIX",
    "TEMP_SUFFIX",
    "is_temp_name",
    "atomic_path",
    "scratch_path",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_save_image",
    "atomic_save_safetensors",
    "atomic_torch_save",
]

TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"
_MAX_NAME_STEM = 180  # keeps ".{stem}.{8 hex}.tmp" under the usual 255-byte name limit


def is_temp_name(name: str) -> bool:
    """True for names made by this module's writers (``.*.tmp``), e.g. left behind by a kill."""
    base = os.path.basename(name)
    return base.startswith(TEMP_PREFIX) and base.endswith(TEMP_SUFFIX)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``.

    For writers that want a file name rather than a file object
    (``safetensors.torch.save_file``, ``numpy.save``, ffmpeg). The temporary
    file exists (empty) when the body starts; the body may overwrite it.
    On an exception inside the body the temporary file is deleted and ``path``
    is left as it was.
    """
    target = os.fspath(path)
    folder = _existing_folder(target)
    tmp = _create_temp(folder, os.path.basename(target))
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        written = _size_if_present(tmp)
        _remove_if_present(tmp)
        _raise_disk_full_clearly(exc, target, written)
        raise
    if fsync:
        _fsync_folder(folder)


@contextlib.contextmanager
def scratch_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path`` (a name :func:`is_temp_name` knows), removed at the end whatever happens.

    For a step before the final file (a video encoded before its audio is muxed in): it never
    replaces anything, and a kill leaves a name that cleaning up recognises.
    """
    target = os.fspath(path)
    tmp = _create_temp(_existing_folder(target), os.path.basename(target))
    try:
        yield tmp
    finally:
        _remove_if_present(tmp)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike,
    mode: str = "wb",
    *,
    encoding: str | None = None,
    fsync: bool = True,
) -> Iterator[IO[Any]]:
    """Open a file for writing that appears at ``path`` only when the block ends without error.

    ``mode`` is ``"wb"`` (default), ``"w"`` or ``"wt"``; text modes default to UTF-8.
    """
    if mode not in ("wb", "w", "wt"):
        raise ValueError(f"atomic_open supports the write modes 'wb', 'w' and 'wt', got {mode!r}")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = True) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8 unless told otherwise)."""
    with atomic_open(path, "w", encoding=encoding, fsync=fsync) as f:
        f.write(text)


def atomic_save_image(img, path: str | os.PathLike, format: str | None = None, *, fsync: bool = True, **params) -> None:
    """Save a PIL image atomically; ``format`` defaults to the one ``path``'s extension names.

    Extra keyword arguments go to ``PIL.Image.Image.save`` (e.g. ``compress_level=1``).
    """
    fmt = format or _image_format_for(path)
    with atomic_open(path, "wb", fsync=fsync) as f:
        img.save(f, format=fmt, **params)


def atomic_save_safetensors(
    tensors: Mapping[str, Any],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    fsync: bool = True,
) -> None:
    """Save a ``{name: tensor}`` dict as safetensors atomically (written straight to disk, no extra copy)."""
    from safetensors.torch import save_file

    with atomic_path(path, fsync=fsync) as tmp:
        save_file(dict(tensors), tmp, metadata=dict(metadata) if metadata is not None else None)


def atomic_torch_save(obj: Any, path: str | os.PathLike, *, fsync: bool = True) -> None:
    """``torch.save`` atomically (zip format, readable with ``weights_only=True`` for plain data)."""
    import torch

    with atomic_open(path, "wb", fsync=fsync) as f:
        torch.save(obj, f)


# --------------------------------------------------------------------------- helpers


def _existing_folder(target: str) -> str:
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, "Cannot write: the folder does not exist (create it first)", folder)
    return folder


def _create_temp(folder: str, name: str) -> str:
    """Create a new empty temp file with the default permissions (unlike mkstemp's 0600)."""
    stem = name[:_MAX_NAME_STEM]
    while True:
        tmp = os.path.join(folder, f"{TEMP_PREFIX}{stem}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue  # another writer drew the same random name; draw again
        os.close(fd)
        return tmp


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDWR)  # Windows' fsync needs a writable handle
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable. Windows cannot open folders; its rename is journalled."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_if_present(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


class DiskFullError(OSError):
    """ENOSPC/EDQUOT while writing ``filename`` atomically (``errno`` kept).

    ``nbytes`` is the size the temporary file had when the write failed: the whole item
    when the final rename failed, the part that fitted when a write did (so the item
    needs at least that much); None if it could not be measured.
    """

    def __init__(self, errno_: int, message: str, filename: str, nbytes: int | None):
        super().__init__(errno_, message, filename)
        self.nbytes = nbytes


def _size_if_present(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _raise_disk_full_clearly(exc: BaseException, target: str, written: int | None = None) -> None:
    """Re-raise ENOSPC/EDQUOT as a ``DiskFullError`` naming the file, its folder, the bytes and a remedy."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        folder = os.path.dirname(os.path.abspath(target))
        size = "" if written is None else f" ({written} bytes written of it when the write failed)"
        raise DiskFullError(
            exc.errno,
            f"No space left while writing {os.path.basename(target)}{size} in {folder}; "
            "free some space there and run the same command again (finished work is kept)",
            target,
            written,
        ) from exc


def _image_format_for(path: str | os.PathLike) -> str:
    from PIL import Image

    ext = os.path.splitext(os.fspath(path))[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise ValueError(
            f"cannot tell the image format from the extension {ext!r} of {os.fspath(path)}; "
            "use .png/.jpg/.webp or pass format='PNG'"
        )
    return fmt
