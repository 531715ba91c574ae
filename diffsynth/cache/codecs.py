"""Codecs: how one item of a store becomes one file, and how that file is checked and read back.

A codec knows one item type. It gives every store the same four answers:

- :meth:`Codec.canonical` turns what a caller passes to ``put`` into the one form the store
  keeps (and says clearly when the value does not fit: wrong type, size, shape or dtype);
- :meth:`Codec.write` writes a canonical value to an open binary file;
- :meth:`Codec.check` is a cheap structural check of a file (a few header bytes and the file
  size), used by ``has``/``missing`` so that scanning thousands of frames stays fast;
- :meth:`Codec.read` reads and fully validates a file and returns the item.

``check`` and ``read`` raise :class:`InvalidFile` with a reason; the store turns that into a
warning, deletes the file and reports the item as missing, so it gets recomputed (STYLE 8).

Formats (DESIGN §3: tensors compact and mmap-friendly, images PNG):

- :class:`ImageCodec`: 8-bit RGB PNG. ``check`` reads the signature, the IHDR chunk (its CRC,
  width and height) and the final IEND chunk, so a truncated file or one of the wrong size is
  caught without decoding. ``read`` verifies the CRC of every chunk, then decodes.
- :class:`TensorCodec`: NumPy ``.npy`` (format 1.0, C order, native byte order, header padded
  to 64 bytes so the data can be memory-mapped). ``check``/``read`` parse the header and
  require ``file size == header + prod(shape) * itemsize``. NumPy has no bfloat16, so a
  bfloat16 tensor is stored as its raw 16-bit words with the structured dtype
  ``[('bfloat16', '<u2')]``: the file stays a valid ``.npy`` that any NumPy reads, and the
  field name records what the bits are. ``.npy`` has no checksum: a truncated file or a
  wrong shape is detected, a flipped bit inside the data is not.
"""

from __future__ import annotations

import abc
import io
import math
import struct
import zlib
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

__all__ = ["InvalidFile", "Codec", "ImageCodec", "TensorCodec"]


class InvalidFile(Exception):
    """A file that does not hold a complete, valid item; ``reason`` says what is wrong."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Codec(abc.ABC):
    """One item type of a store and its file format. Subclasses set :attr:`suffix`."""

    suffix: str = ""

    @abc.abstractmethod
    def canonical(self, value: Any, *, copy: bool) -> Any:
        """Return ``value`` in the store's canonical form, or raise ``TypeError``/``ValueError``.

        With ``copy=True`` the result shares no memory with ``value``, so the caller may
        change ``value`` afterwards (memory store, write-behind queue).
        """

    @abc.abstractmethod
    def write(self, value: Any, f: BinaryIO) -> None:
        """Write a canonical ``value`` to the binary file ``f``."""

    @abc.abstractmethod
    def check(self, f: BinaryIO, size: int) -> None:
        """Cheap structural check of an open file of ``size`` bytes; raise :class:`InvalidFile`."""

    @abc.abstractmethod
    def read(self, f: BinaryIO, size: int) -> Any:
        """Read, fully validate and return the item in the open file; raise :class:`InvalidFile`."""

    def copy(self, value: Any) -> Any:
        """An independent copy of a canonical value (what a memory store hands out)."""
        return self.canonical(value, copy=True)


# --------------------------------------------------------------------------- images

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_HEAD_BYTES = 8 + 8 + 13 + 4  # signature, IHDR length + type, IHDR data, IHDR CRC
_PNG_IEND = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


class ImageCodec(Codec):
    """RGB images as 8-bit PNG files; items are ``PIL.Image.Image`` in mode ``"RGB"``.

    ``size=(width, height)`` (PIL's order) makes every put and read check the size; ``None``
    accepts any size. ``put`` takes a PIL image of any mode (converted to RGB, so alpha is
    dropped) or a ``uint8`` array of shape ``(H, W, 3)``. ``compress_level`` is zlib's 0-9:
    1 (default) is several times faster than PIL's default 6 for a few percent more bytes,
    the right trade for a cache that is written once and read a few times.
    """

    suffix = ".png"

    def __init__(self, size: tuple[int, int] | None = None, *, compress_level: int = 1):
        if size is not None:
            width, height = size
            if int(width) <= 0 or int(height) <= 0:
                raise ValueError(f"image size must be (width, height) with positive numbers, got {size!r}")
            size = (int(width), int(height))
        if not 0 <= compress_level <= 9:
            raise ValueError(f"compress_level is zlib's 0-9, got {compress_level}")
        self.size = size
        self.compress_level = compress_level

    def __repr__(self) -> str:
        return f"ImageCodec(size={self.size!r})"

    def canonical(self, value: Any, *, copy: bool) -> Image.Image:
        if isinstance(value, Image.Image):
            image = value if value.mode == "RGB" else value.convert("RGB")
            if copy and image is value:
                image = value.copy()
        elif isinstance(value, np.ndarray):
            image = Image.fromarray(_rgb_array(value).copy() if copy else _rgb_array(value), "RGB")
        else:
            raise TypeError(
                f"an image store takes a PIL image or a uint8 array of shape (H, W, 3), got {type(value).__name__}"
            )
        self._check_size(image.size, error=ValueError)
        return image

    def write(self, value: Image.Image, f: BinaryIO) -> None:
        value.save(f, format="PNG", compress_level=self.compress_level)

    def check(self, f: BinaryIO, size: int) -> None:
        self._check_size(_png_size(f.read(_PNG_HEAD_BYTES)), error=InvalidFile)
        if size < _PNG_HEAD_BYTES + len(_PNG_IEND):
            raise InvalidFile(f"truncated: only {size} bytes")
        f.seek(size - len(_PNG_IEND))
        if f.read(len(_PNG_IEND)) != _PNG_IEND:
            raise InvalidFile("truncated or damaged: the file does not end with the PNG IEND chunk")

    def read(self, f: BinaryIO, size: int) -> Image.Image:
        data = f.read()
        if len(data) != size:
            raise InvalidFile(f"read {len(data)} bytes, but the file has {size} (changed while being read?)")
        self._check_size(_png_size(data[:_PNG_HEAD_BYTES]), error=InvalidFile)
        _verify_png_chunks(data)
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                # a plain Image that does not keep the file's bytes alive
                return image.convert("RGB") if image.mode != "RGB" else image.copy()
        except (OSError, SyntaxError, ValueError, zlib.error) as exc:
            raise InvalidFile(f"PIL cannot decode it: {exc}") from exc

    def _check_size(self, size: tuple[int, int], *, error: type[Exception]) -> None:
        if self.size is not None and tuple(size) != self.size:
            raise error(f"image is {size[0]}x{size[1]}, but this store holds {self.size[0]}x{self.size[1]} images")


def _rgb_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"an image array must be uint8 of shape (H, W, 3), got {array.dtype} of shape {tuple(array.shape)}"
        )
    return np.ascontiguousarray(array)


def _png_size(head: bytes) -> tuple[int, int]:
    """(width, height) from the first 33 bytes of a PNG file, after checking signature and IHDR CRC."""
    if len(head) < _PNG_HEAD_BYTES:
        raise InvalidFile(f"truncated: only {len(head)} bytes")
    if head[:8] != _PNG_SIGNATURE:
        raise InvalidFile("not a PNG file (bad signature)")
    length, kind = struct.unpack(">I4s", head[8:16])
    if kind != b"IHDR" or length != 13:
        raise InvalidFile("damaged PNG: the first chunk is not a 13-byte IHDR")
    (crc,) = struct.unpack(">I", head[29:33])
    if zlib.crc32(head[12:29]) != crc:
        raise InvalidFile("damaged PNG: the IHDR chunk fails its CRC")
    return struct.unpack(">II", head[16:24])


def _verify_png_chunks(data: bytes) -> None:
    """Walk every chunk after the signature: each must be complete and pass its CRC, and IEND must end the file."""
    view = memoryview(data)
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", view[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise InvalidFile(f"truncated: chunk {kind!r} at byte {pos} needs {end - len(data)} more bytes")
        (crc,) = struct.unpack(">I", view[end - 4 : end])
        if zlib.crc32(view[pos + 4 : end - 4]) != crc:
            raise InvalidFile(f"damaged: chunk {kind!r} at byte {pos} fails its CRC")
        if kind == b"IEND":
            if end != len(data):
                raise InvalidFile(f"{len(data) - end} unexpected bytes after the IEND chunk")
            return
        pos = end
    raise InvalidFile("truncated: the file ends before the PNG IEND chunk")


# --------------------------------------------------------------------------- tensors

_BF16_NUMPY = np.dtype([("bfloat16", "<u2")])
_TORCH_TO_NUMPY: dict[torch.dtype, np.dtype] = {
    torch.float16: np.dtype(np.float16),
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.bfloat16: _BF16_NUMPY,
    torch.uint8: np.dtype(np.uint8),
    torch.int8: np.dtype(np.int8),
    torch.int16: np.dtype(np.int16),
    torch.int32: np.dtype(np.int32),
    torch.int64: np.dtype(np.int64),
    torch.bool: np.dtype(np.bool_),
    torch.complex64: np.dtype(np.complex64),
    torch.complex128: np.dtype(np.complex128),
}
_SUPPORTED = ", ".join(str(d).removeprefix("torch.") for d in _TORCH_TO_NUMPY)

Shape = tuple[int | None, ...]


class TensorCodec(Codec):
    """Tensors as ``.npy`` files; items are contiguous CPU ``torch.Tensor``.

    ``shape`` (entries may be ``None`` for "any") and ``dtype`` (a ``torch.dtype``) are checked
    on every put and read; ``None`` accepts any. ``put`` takes a tensor on any device (copied to
    the CPU, detached) or a NumPy array. No dtype is converted silently: a float16 tensor put
    into a float32 store is an error, so cast it yourself. Supported dtypes: float16/32/64,
    bfloat16 (see the module docstring), (u)int8, int16/32/64, bool, complex64/128.
    """

    suffix = ".npy"

    def __init__(self, shape: Shape | None = None, dtype: torch.dtype | None = None):
        if shape is not None:
            shape = tuple(None if n is None else int(n) for n in shape)
            if any(n is not None and n < 0 for n in shape):
                raise ValueError(f"tensor shape entries must be >= 0 or None, got {shape!r}")
        if dtype is not None and dtype not in _TORCH_TO_NUMPY:
            raise ValueError(f"a tensor store cannot hold {dtype}; supported: {_SUPPORTED}")
        self.shape = shape
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"TensorCodec(shape={self.shape!r}, dtype={self.dtype})"

    def canonical(self, value: Any, *, copy: bool) -> torch.Tensor:
        if isinstance(value, np.ndarray):
            value = _tensor_from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"a tensor store takes a torch.Tensor (or a NumPy array), got {type(value).__name__}")
        if value.layout != torch.strided:
            raise TypeError(f"a tensor store takes dense tensors, got layout {value.layout}; call .to_dense() first")
        problem = self._mismatch(tuple(value.shape), value.dtype)
        if problem:
            raise ValueError(f"cannot put this tensor: {problem}")
        tensor = value.detach()
        tensor = tensor.to("cpu", copy=True) if copy else tensor.cpu()
        return tensor.contiguous()

    def write(self, value: torch.Tensor, f: BinaryIO) -> None:
        if value.dtype == torch.bfloat16:
            array = value.view(torch.int16).numpy().view(_BF16_NUMPY)
        else:
            array = value.resolve_conj().resolve_neg().numpy()
        np.lib.format.write_array(f, array, version=(1, 0), allow_pickle=False)

    def check(self, f: BinaryIO, size: int) -> None:
        self._read_header(f, size)

    def read(self, f: BinaryIO, size: int) -> torch.Tensor:
        shape, np_dtype, dtype = self._read_header(f, size)
        count = math.prod(shape)
        array = np.fromfile(f, dtype=np_dtype, count=count)
        if array.size != count:
            raise InvalidFile(f"truncated while being read: {array.size} of {count} values")
        if dtype == torch.bfloat16:
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).reshape(shape)
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        return torch.from_numpy(array).reshape(shape)

    def _read_header(self, f: BinaryIO, size: int) -> tuple[tuple[int, ...], np.dtype, torch.dtype]:
        """Parse and validate the header; leaves ``f`` at the first data byte."""
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, np_dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran_order, np_dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise InvalidFile(f".npy format version {version} is not supported (1.0 and 2.0 are)")
        except (ValueError, SyntaxError, EOFError) as exc:
            raise InvalidFile(f"not a valid .npy header ({exc})") from exc
        if fortran_order and len(shape) > 1:
            raise InvalidFile("the array is stored in Fortran order; this store writes C order")
        dtype = _torch_dtype_of(np_dtype)
        expected = f.tell() + math.prod(shape) * np_dtype.itemsize
        if size != expected:
            what = "truncated" if size < expected else "unexpected trailing bytes"
            raise InvalidFile(f"{what}: {size} bytes, expected {expected} for {np_dtype.str} data of shape {shape}")
        problem = self._mismatch(shape, dtype)
        if problem:
            raise InvalidFile(problem)
        return shape, np_dtype, dtype

    def _mismatch(self, shape: tuple[int, ...], dtype: torch.dtype) -> str:
        """Why ``shape``/``dtype`` do not fit this codec, or "" when they do."""
        if dtype not in _TORCH_TO_NUMPY:
            return f"dtype {dtype} is not supported; supported: {_SUPPORTED}"
        if self.dtype is not None and dtype != self.dtype:
            return f"dtype is {dtype}, but this store holds {self.dtype} (cast it explicitly)"
        if self.shape is not None and not _shape_fits(self.shape, shape):
            return f"shape is {tuple(shape)}, but this store holds {_shape_text(self.shape)}"
        return ""


def _tensor_from_numpy(array: np.ndarray) -> torch.Tensor:
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # e.g. np.load(mmap_mode="r"); torch warns about sharing those
        array = array.copy()
    try:
        return torch.from_numpy(array)
    except TypeError as exc:
        raise TypeError(
            f"a tensor store cannot hold a NumPy array of dtype {array.dtype}; supported: {_SUPPORTED}"
        ) from exc


def _torch_dtype_of(np_dtype: np.dtype) -> torch.dtype:
    if np_dtype == _BF16_NUMPY:
        return torch.bfloat16
    if np_dtype.fields is None:
        for torch_dtype, candidate in _TORCH_TO_NUMPY.items():
            if candidate == np_dtype.newbyteorder("="):
                return torch_dtype
    raise InvalidFile(f"holds NumPy dtype {np_dtype}, which no tensor store writes")


def _shape_fits(declared: Shape, shape: tuple[int, ...]) -> bool:
    return len(declared) == len(shape) and all(d is None or d == n for d, n in zip(declared, shape))


def _shape_text(shape: Shape) -> str:
    return "(" + ", ".join("*" if n is None else str(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"
