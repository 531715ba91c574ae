"""Read model files into flat dicts of tensors, safely.

Supported formats, recognised by their first bytes rather than by file name
(civitai downloads are often misnamed):

* ``safetensors``: read lazily with ``safe_open``.
* PyTorch zip checkpoints (``torch.save`` since 1.6; ``.ckpt/.pt/.pth/.bin/.pkl``):
  ``torch.load(weights_only=True, mmap=True)``.
* PyTorch legacy (pre-zip) checkpoints: ``torch.load(weights_only=True)``; these
  cannot be memory-mapped and are read whole.

Memory (measured on torch 2.13 / safetensors 0.8): for the first two formats,
tensors returned without a cast share pages with the file (copy-on-write: writing
to them never touches the file), so loading costs no anonymous RAM; with a cast,
tensors are converted one at a time and the extra RAM is the size of the result.

Pickled files are never unpickled with ``weights_only=False``: a model file must
not be able to run code (upstream_spec §12.6). A file that needs more than
tensors, containers and numbers is refused with a :class:`ModelFileError`
that lists the Python objects it asks for.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .errors import ModelFileError

__all__ = [
    "FORMAT_SAFETENSORS",
    "FORMAT_TORCH_ZIP",
    "FORMAT_TORCH_LEGACY",
    "detect_file_format",
    "load_state_dict",
    "load_raw",
    "read_header",
    "read_safetensors_metadata",
    "iter_safetensors_keys",
    "load_state_dict_from_safetensors",
    "load_state_dict_from_bin",
]

FORMAT_SAFETENSORS = "safetensors"
FORMAT_TORCH_ZIP = "torch_zip"
FORMAT_TORCH_LEGACY = "torch_legacy"

# Wrappers that training frameworks put around the real state dict, in the
# order we look for them: LDM/Lightning `.ckpt` use "state_dict", some
# ControlNet/RIFE exports use "model" or "module".
_WRAPPER_KEYS = ("state_dict", "model", "module")

# safetensors refuses headers above 100 MB; a bigger claim means garbage.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_REDOWNLOAD = "Download the file again (compare its size with the one the site lists) and retry."
_CONVERT = (
    "We refuse to execute code from model files. If you trust this file, convert it "
    "to .safetensors once (in a separate Python session: obj = torch.load(path, "
    "weights_only=False), then safetensors.torch.save_file(<its tensors>, 'model.safetensors')) "
    "and load the .safetensors file instead."
)

HeaderEntry = tuple[tuple[int, ...], torch.dtype]


# --------------------------------------------------------------------------- public API


def load_state_dict(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Read a model file into a flat ``{name: tensor}`` dict on the CPU.

    * ``dtype`` casts floating-point tensors (integer and bool tensors such as
      ``position_ids`` keep their type). ``torch_dtype`` is the DiffSynth-Studio
      spelling of the same argument.
    * Checkpoints that wrap the weights (``{"state_dict": {...}, "global_step": 3}``,
      ``{"model": {...}}``, ``{"module": {...}}``) are unwrapped; nested dicts of
      tensors are flattened with ``.``; non-tensor entries (step counters, names,
      version strings) are dropped.

    Raises ``FileNotFoundError`` for a missing file and :class:`ModelFileError`
    for a truncated, corrupt, unsafe or tensor-less one.
    """
    dtype = _resolve_dtype(dtype, torch_dtype)
    headers = _HEADERS_ONLY.get()
    if headers is not None:  # an estimate building the models from headers (meta_tensors_only): no weight is read
        return {key: torch.empty(shape, dtype=dtype if dtype is not None and dt.is_floating_point else dt, device="meta")
                for key, (shape, dt) in headers(os.fspath(path)).items()}
    path = _check_file(path)
    fmt = detect_file_format(path)
    if fmt == FORMAT_SAFETENSORS:
        return _load_safetensors(path, dtype)
    raw = _torch_load(path, fmt)
    flat = _flatten_tensors(path, _unwrap(raw))
    return {key: _cast(value, dtype) for key, value in flat.items()}


_HEADERS_ONLY: contextvars.ContextVar = contextvars.ContextVar("diffsynth_headers_only", default=None)


@contextlib.contextmanager
def meta_tensors_only(header):
    """In this thread (and context), :func:`load_state_dict` returns meta tensors of the shapes and dtypes ``header(path)``
    gives, reading no weight: how the estimates build a run's models (``estimate/trace.py``). Other threads load as usual."""
    token = _HEADERS_ONLY.set(header)
    try:
        yield
    finally:
        _HEADERS_ONLY.reset(token)


def load_raw(path: str | os.PathLike) -> Any:
    """Read a model file without unwrapping or flattening it.

    For files whose structure carries meaning, e.g. A1111 textual inversion
    ``.pt`` files (``{"string_to_param": {"*": tensor}, "name": ..., "step": ...}``).
    A safetensors file is returned as its flat ``{name: tensor}`` dict.
    Same errors as :func:`load_state_dict`.
    """
    path = _check_file(path)
    fmt = detect_file_format(path)
    if fmt == FORMAT_SAFETENSORS:
        return _load_safetensors(path, None)
    return _torch_load(path, fmt)


def read_header(path: str | os.PathLike) -> dict[str, HeaderEntry]:
    """:func:`read_file_header`, or the header already known while the models are built from headers (meta_tensors_only)."""
    headers = _HEADERS_ONLY.get()
    if headers is not None:
        return headers(os.fspath(path))
    return read_file_header(path)


def read_file_header(path: str | os.PathLike) -> dict[str, HeaderEntry]:
    """Return ``{name: (shape, dtype)}`` for every tensor, without reading the data.

    For safetensors only the JSON header is parsed (and checked against the file
    size, so a truncated file is reported here already). Zip checkpoints are
    memory-mapped, so their tensor data is not read either; legacy checkpoints
    have to be read whole. Keys follow the same unwrapping as
    :func:`load_state_dict`.
    """
    path = _check_file(path)
    fmt = detect_file_format(path)
    if fmt == FORMAT_SAFETENSORS:
        header = _read_safetensors_header(path)
        return {key: _header_entry(path, key, entry) for key, entry in header.items()}
    flat = _flatten_tensors(path, _unwrap(_torch_load(path, fmt)))
    return {key: (tuple(value.shape), value.dtype) for key, value in flat.items()}


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Return the free-form ``__metadata__`` strings of a safetensors file ({} if none)."""
    path = _check_file(path)
    _require_safetensors(path, "read_safetensors_metadata")
    return dict(_read_safetensors_header(path, keep_metadata=True).get("__metadata__", {}))


def iter_safetensors_keys(path: str | os.PathLike) -> Iterator[str]:
    """Iterate over the tensor names of a safetensors file in header order.

    Only the header is read, and it is read (and checked) before this returns.
    """
    path = _check_file(path)
    _require_safetensors(path, "iter_safetensors_keys")
    return iter(list(_read_safetensors_header(path)))


def load_state_dict_from_safetensors(file_path, torch_dtype=None) -> dict[str, torch.Tensor]:
    """DiffSynth-Studio name for :func:`load_state_dict` on a safetensors file."""
    return load_state_dict(file_path, torch_dtype)


def load_state_dict_from_bin(file_path, torch_dtype=None) -> dict[str, torch.Tensor]:
    """DiffSynth-Studio name for :func:`load_state_dict` on a pickled checkpoint."""
    return load_state_dict(file_path, torch_dtype)


def detect_file_format(path: str | os.PathLike) -> str:
    """Tell the container format from the file's first bytes.

    Returns one of ``FORMAT_SAFETENSORS``, ``FORMAT_TORCH_ZIP``, ``FORMAT_TORCH_LEGACY``.
    Raises :class:`ModelFileError` for an empty file, a Git LFS pointer, an HTML
    page saved instead of the weights, or anything else unrecognised.
    """
    path = _check_file(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise ModelFileError(path, "the file is empty (0 bytes).", _REDOWNLOAD)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return FORMAT_TORCH_ZIP
    if head[:1] == b"\x80":  # pickle protocol >= 2 opcode, how legacy torch.save starts
        return FORMAT_TORCH_LEGACY
    if len(head) >= 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
        return FORMAT_SAFETENSORS
    if len(head) < 9 and path.lower().endswith(".safetensors"):
        return FORMAT_SAFETENSORS  # too short to tell: let the safetensors reader explain
    raise ModelFileError(path, _describe_unknown_head(head), _REDOWNLOAD)


# --------------------------------------------------------------------------- file checks


def _check_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "Model file not found", path)
    if os.path.isdir(path):
        raise IsADirectoryError(
            errno.EISDIR,
            "Expected a model file but got a folder; pass one weights file inside it "
            "(e.g. diffusion_pytorch_model.safetensors)",
            path,
        )
    return path


def _require_safetensors(path: str, caller: str) -> None:
    fmt = detect_file_format(path)
    if fmt != FORMAT_SAFETENSORS:
        raise ValueError(
            f"{caller}() reads safetensors files only, but {path} is a PyTorch checkpoint "
            f"({fmt}); use read_header() for those."
        )


def _describe_unknown_head(head: bytes) -> str:
    if head.startswith(b"version https://git-lfs"):
        return (
            "this is a Git LFS pointer (a small text file), not the weights; "
            "the repository was cloned without `git lfs`."
        )
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<!doctype", b"<html")):
        return "this is an HTML page (probably a login or error page saved by a failed download), not model weights."
    return (
        f"unrecognised file format (first bytes {head[:16]!r}); expected .safetensors or a "
        "PyTorch checkpoint (.ckpt/.pt/.pth/.bin)."
    )


# --------------------------------------------------------------------------- safetensors


def _load_safetensors(path: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Read tensor by tensor with plain reads into fresh buffers (no memory map).

    A memory-mapped read would keep every touched page of the file resident in
    this process next to the copies, doubling peak RAM while a model loads.
    The header was validated against the file size, so a short read means the
    file changed under us.
    """
    header = _read_safetensors_header(path)
    with open(path, "rb") as f:
        f.seek(0)
        data_start = 8 + int.from_bytes(f.read(8), "little")
        out = {}
        for key, entry in sorted(header.items(), key=lambda kv: int(kv[1]["data_offsets"][0])):
            shape, file_dtype = _header_entry(path, key, entry)
            begin, end = (int(v) for v in entry["data_offsets"])
            tensor = torch.empty(shape, dtype=file_dtype)
            buffer = tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else None
            if buffer is not None and buffer.nbytes != end - begin:
                raise ModelFileError(path, f"tensor {key!r} has {end - begin} bytes in the file but its shape and dtype need {buffer.nbytes}.", _REDOWNLOAD)
            if buffer is not None:
                f.seek(data_start + begin)
                if f.readinto(memoryview(buffer)) != end - begin:
                    raise ModelFileError(path, f"the file ended while reading tensor {key!r}: truncated.", _REDOWNLOAD)
            out[key] = _cast(tensor, dtype)
    return out


def _read_safetensors_header(path: str, keep_metadata: bool = False) -> dict[str, Any]:
    """Parse and sanity-check the JSON header; returns it in file order."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        length_bytes = f.read(8)
        if len(length_bytes) < 8:
            raise ModelFileError(path, f"the safetensors file is only {size} bytes long: truncated.", _REDOWNLOAD)
        length = int.from_bytes(length_bytes, "little")
        if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise ModelFileError(
                path,
                f"the safetensors header claims {length} bytes but the file has {size - 8} after "
                "the length field: truncated or not a safetensors file.",
                _REDOWNLOAD,
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(path, f"the safetensors header is not valid JSON ({exc}).", _REDOWNLOAD) from exc
    if not isinstance(header, dict):
        raise ModelFileError(path, "the safetensors header is not a JSON object.", _REDOWNLOAD)
    metadata = header.pop("__metadata__", None)
    data_end = max((_data_end(path, key, entry) for key, entry in header.items()), default=0)
    if 8 + length + data_end > size:
        raise ModelFileError(
            path,
            f"the file is {size} bytes but its header describes {8 + length + data_end}: truncated.",
            _REDOWNLOAD,
        )
    if keep_metadata and metadata is not None:
        header["__metadata__"] = metadata
    return header


def _data_end(path: str, key: str, entry: Any) -> int:
    try:
        return int(entry["data_offsets"][1])
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise ModelFileError(path, f"header entry {key!r} has no valid data_offsets.", _REDOWNLOAD) from exc


def _header_entry(path: str, key: str, entry: dict) -> HeaderEntry:
    name = entry.get("dtype")
    if name not in _SAFETENSORS_DTYPES:
        raise ModelFileError(
            path,
            f"tensor {key!r} has dtype {name!r}, which this version cannot read "
            f"(known: {', '.join(_SAFETENSORS_DTYPES)}).",
            "Convert the file to fp16/bf16/fp32 safetensors.",
        )
    return tuple(int(d) for d in entry.get("shape", ())), _SAFETENSORS_DTYPES[name]


# --------------------------------------------------------------------------- pickled checkpoints


def _torch_load(path: str, fmt: str) -> Any:
    """``torch.load`` with ``weights_only=True``; every failure becomes a ModelFileError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=fmt == FORMAT_TORCH_ZIP)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path, fmt, exc)
        if unsafe:
            raise ModelFileError(
                path,
                "the file contains Python objects other than tensors "
                f"({', '.join(unsafe)}); unpickling them could run code from the file.",
                _CONVERT,
            ) from exc
        raise _corrupt_checkpoint(path, fmt, exc) from exc
    except (PermissionError, IsADirectoryError, FileNotFoundError):
        raise
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        # Truncated zips surface as RuntimeError ("failed finding central directory")
        # or even OSError(EINVAL); truncated legacy pickles as EOFError/RuntimeError.
        raise _corrupt_checkpoint(path, fmt, exc) from exc


def _unsafe_globals(path: str, fmt: str, exc: Exception) -> list[str]:
    """Names of the non-allow-listed globals that made ``weights_only`` refuse the file."""
    if fmt == FORMAT_TORCH_ZIP:
        try:
            found = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except (RuntimeError, OSError, ValueError, pickle.UnpicklingError):
            found = []  # unreadable archive: the message parsed below is all we have
        if found:
            return found
    # Legacy files are not supported by get_unsafe_globals_in_checkpoint; the
    # weights-only unpickler names the first offending global in its message.
    return sorted(set(re.findall(r"GLOBAL (\S+?)(?: whose|\s|$)", str(exc))))


def _corrupt_checkpoint(path: str, fmt: str, exc: BaseException) -> ModelFileError:
    if fmt == FORMAT_TORCH_ZIP and not zipfile.is_zipfile(path):
        problem = "the zip archive has no central directory: the file is truncated."
    else:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        problem = f"the PyTorch checkpoint is truncated or corrupt ({reason})."
    return ModelFileError(path, problem, _REDOWNLOAD)


# --------------------------------------------------------------------------- dict shaping


def _unwrap(obj: Any) -> Any:
    """Descend through ``state_dict`` / ``model`` / ``module`` wrappers."""
    while isinstance(obj, Mapping):
        inner = next(
            (obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and _holds_tensors(obj[k])),
            None,
        )
        if inner is None:
            return obj
        obj = inner
    return obj


def _holds_tensors(mapping: Mapping) -> bool:
    return any(isinstance(value, torch.Tensor) for value in mapping.values())


def _flatten_tensors(path: str, obj: Any) -> dict[str, torch.Tensor]:
    """Flatten nested dicts of tensors to dotted keys; drop everything that is not a tensor."""
    if not isinstance(obj, Mapping):
        raise ModelFileError(
            path,
            f"the checkpoint holds a {type(obj).__name__}, not a dict of tensors.",
            "Is this a model file?",
        )
    out: dict[str, torch.Tensor] = {}
    _collect(path, obj, "", out)
    if not out:
        seen = ", ".join(str(k) for k in list(obj)[:10]) or "nothing"
        raise ModelFileError(path, f"the checkpoint holds no tensors (top-level entries: {seen}).", "Is this a model file?")
    return out


def _collect(path: str, mapping: Mapping, prefix: str, out: dict[str, torch.Tensor]) -> None:
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _collect(path, value, name + ".", out)
            continue
        if not isinstance(value, torch.Tensor):
            continue  # metadata such as global_step, epoch, names, version strings
        if name in out:
            raise ModelFileError(path, f"tensor name {name!r} occurs twice once nested dicts are flattened.", "Is this a model file?")
        out[name] = value


def _resolve_dtype(dtype: torch.dtype | None, torch_dtype: torch.dtype | None) -> torch.dtype | None:
    if dtype is not None and torch_dtype is not None:
        raise TypeError("pass either dtype or torch_dtype, not both")
    dtype = dtype if dtype is not None else torch_dtype
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float16, got {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type (float16, bfloat16, float32), got {dtype}")
    return dtype


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Cast floating-point tensors; integer/bool tensors (e.g. position_ids) keep their type."""
    if tensor.requires_grad:  # textual-inversion files store trainable parameters
        tensor = tensor.detach()
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor
