"""DiskStore only: file names and formats, atomic writes, corruption detection, resume, flat memory."""

from __future__ import annotations

import errno
import gc
import logging
import os
import sys
import tracemalloc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.cache import CorruptItem, DiskStore, ImageCodec, MissingItem, TensorCodec, image_store, tensor_store

SIZE = (32, 16)  # (width, height)


def _image(seed: int, size=SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _names(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture
def images(tmp_path):
    return image_store(tmp_path / "frames", 4, size=SIZE)


@pytest.fixture
def latents(tmp_path):
    return tensor_store(tmp_path / "latents", 4, shape=(4, 6, 8), dtype=torch.float32)


# --------------------------------------------------------------------------- names and formats


@pytest.mark.parametrize(
    ("length", "index", "name"),
    [
        (1, 0, "000000.npy"),
        (10, 3, "000003.npy"),
        (1_000_000, 7, "000007.npy"),
        (1_000_001, 7, "0000007.npy"),
        (12_345_678, 12_345_677, "12345677.npy"),
    ],
)
def test_names_are_zero_padded_with_at_least_six_digits(tmp_path, length, index, name):
    store = tensor_store(tmp_path, length)
    assert store.path(index) == os.path.join(str(tmp_path), name)
    assert store.path(-1).endswith(f"{length - 1:0{max(6, len(str(length - 1)))}d}.npy")


def test_files_are_png_and_npy_named_by_index(images, latents):
    images.put(2, _image(0))
    latents.put(-1, torch.ones(4, 6, 8))
    assert _names(images.folder) == ["000002.png"] and _names(latents.folder) == ["000003.npy"]
    with Image.open(images.path(2)) as png:
        assert png.format == "PNG" and png.mode == "RGB" and png.size == SIZE
    assert latents.nbytes() == os.path.getsize(latents.path(3))


def test_npy_files_are_plain_numpy_and_memory_mappable(latents):
    value = torch.randn(4, 6, 8)
    latents.put(0, value)
    mapped = np.load(latents.path(0), mmap_mode="r", allow_pickle=False)
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, value.numpy())


def test_bfloat16_is_stored_as_its_bits_under_a_named_numpy_dtype(tmp_path):
    store = tensor_store(tmp_path, 1, dtype=torch.bfloat16)
    value = torch.randn(3, 5).to(torch.bfloat16)
    store.put(0, value)
    raw = np.load(store.path(0), allow_pickle=False)
    assert raw.dtype.names == ("bfloat16",)
    assert np.array_equal(raw["bfloat16"].view(np.int16), value.view(torch.int16).numpy())
    assert torch.equal(store[0], value) and store[0].dtype == torch.bfloat16


def test_disk_store_needs_a_codec(tmp_path):
    with pytest.raises(TypeError, match="ImageCodec or TensorCodec"):
        DiskStore(tmp_path, 3, None)


# --------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("fixture", ["images", "latents"])
def test_failed_write_leaves_the_previous_item_and_no_temp_file(request, fixture, monkeypatch):
    store = request.getfixturevalue(fixture)
    old = _image(1) if fixture == "images" else torch.full((4, 6, 8), 7.0)
    new = _image(2) if fixture == "images" else torch.zeros(4, 6, 8)
    store.put(1, old)
    real_write = store.codec.write

    def write_half_then_fail(value, f):
        real_write(value, f)
        f.truncate(f.tell() // 2)
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(store.codec, "write", write_half_then_fail)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        store.put(1, new)
    with pytest.raises(RuntimeError):
        store.put(2, new)
    assert _names(store.folder) == [os.path.basename(store.path(1))]  # no temp, no partial item 2
    monkeypatch.undo()
    restored = store[1]
    assert restored.tobytes() == old.tobytes() if fixture == "images" else torch.equal(restored, old)
    assert store.missing() == [0, 2, 3]


def test_disk_full_names_the_folder(latents, monkeypatch):
    def no_space(value, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(latents.codec, "write", no_space)
    with pytest.raises(OSError, match="No space left") as caught:
        latents.put(0, torch.zeros(4, 6, 8))
    assert caught.value.errno == errno.ENOSPC and latents.folder in str(caught.value)
    assert _names(latents.folder) == []


# --------------------------------------------------------------------------- corruption


def _truncate(path: str, keep: float = 0.5) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def _flip_byte(path: str, at: float = 0.5) -> None:
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[int(len(data) * at)] ^= 0xFF
        f.seek(0)
        f.write(data)


def _fill(store) -> None:
    for i in range(len(store)):
        store.put(i, _image(i) if isinstance(store.codec, ImageCodec) else torch.full((4, 6, 8), float(i)))


def _assert_detected_on_read(store, index, caplog, reason):
    path = store.path(index)
    with caplog.at_level(logging.WARNING, logger="diffsynth"):
        with pytest.raises(CorruptItem, match=reason) as caught:
            store[index]
    assert isinstance(caught.value, MissingItem) and caught.value.path == path and caught.value.index == index
    assert path in str(caught.value) and path in caplog.text and "recomputed" in caplog.text
    assert not os.path.exists(path), "an unusable file must be deleted so that it gets recomputed"
    assert index in store.missing()


def _assert_detected_by_has(store, index, caplog):
    path = store.path(index)
    with caplog.at_level(logging.WARNING, logger="diffsynth"):
        assert not store.has(index)
    assert path in caplog.text and not os.path.exists(path)
    with pytest.raises(MissingItem):
        store[index]


@pytest.mark.parametrize("fixture", ["images", "latents"])
@pytest.mark.parametrize("keep", [0.0, 0.2, 0.99])
def test_truncated_file_is_detected_on_read(request, fixture, keep, caplog):
    store = request.getfixturevalue(fixture)
    _fill(store)
    _truncate(store.path(2), keep)
    _assert_detected_on_read(store, 2, caplog, "truncated|bytes")
    assert store.missing() == [2]
    _fill(store)  # and it can be recomputed
    assert store.complete()


@pytest.mark.parametrize("fixture", ["images", "latents"])
def test_truncated_file_is_detected_by_has_and_missing(request, fixture, caplog):
    store = request.getfixturevalue(fixture)
    _fill(store)
    _truncate(store.path(1), 0.7)
    _assert_detected_by_has(store, 1, caplog)
    _truncate(store.path(3), 0.7)
    assert store.missing() == [1, 3] and not os.path.exists(store.path(3))


def test_damaged_png_data_is_caught_by_its_crc_on_read(images, caplog):
    _fill(images)
    _flip_byte(images.path(0), at=0.5)  # inside the image data: same length, same header
    assert images.has(0)  # the cheap check reads header and end only
    _assert_detected_on_read(images, 0, caplog, "CRC")


def test_garbage_and_empty_files_are_detected(images, latents, caplog):
    for store in (images, latents):
        _fill(store)
        with open(store.path(0), "wb") as f:
            f.write(b"definitely not an item" * 10)
        open(store.path(1), "wb").close()
        _assert_detected_by_has(store, 0, caplog)
        _assert_detected_on_read(store, 1, caplog, None)


def test_png_of_the_wrong_size_is_detected(images, caplog):
    _image(0, size=(SIZE[0], SIZE[1] * 2)).save(images.path(1))
    _image(0, size=(8, 8)).save(images.path(2))
    _assert_detected_by_has(images, 1, caplog)
    _assert_detected_on_read(images, 2, caplog, "8x8")


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros((4, 6, 9), np.float32), r"shape is \(4, 6, 9\)"),
        (np.zeros((4, 6, 8), np.float16), "dtype is torch.float16"),
        (np.zeros((4, 6, 8), np.float32).T, "Fortran"),
        (np.array(["a", "b"]), "dtype"),
    ],
)
def test_npy_of_the_wrong_shape_or_dtype_is_detected(latents, array, reason, caplog):
    np.save(latents.path(0), array)
    _assert_detected_on_read(latents, 0, caplog, reason)


def test_trailing_bytes_after_npy_data_are_detected(latents, caplog):
    _fill(latents)
    with open(latents.path(2), "ab") as f:
        f.write(b"\0" * 8)
    _assert_detected_on_read(latents, 2, caplog, "trailing")


def test_a_file_replaced_while_being_read_is_not_deleted(latents, monkeypatch):
    """A concurrent put may commit a good file while a reader finds the old one bad: keep the good one."""
    _fill(latents)
    _truncate(latents.path(0))
    real_read = latents.codec.read

    def read_then_someone_rewrites(f, size):
        try:
            return real_read(f, size)
        finally:
            monkeypatch.setattr(latents.codec, "read", real_read)
            latents.put(0, torch.full((4, 6, 8), 5.0))

    monkeypatch.setattr(latents.codec, "read", read_then_someone_rewrites)
    with pytest.raises(CorruptItem, match="new file was kept"):
        latents[0]
    assert torch.equal(latents[0], torch.full((4, 6, 8), 5.0))


# --------------------------------------------------------------------------- temp files, resume, clear


def test_leftover_temp_files_are_ignored_and_cleaned_on_open(tmp_path):
    folder = tmp_path / "latents"
    folder.mkdir()
    own_temp = folder / ".000003.npy.0123abcd.tmp"
    foreign = [folder / ".000003.png.0123abcd.tmp", folder / ".config.json.89abcdef.tmp", folder / "notes.txt"]
    for path in (own_temp, *foreign):
        path.write_bytes(b"partial")
    kept = tensor_store(folder, 5, clean_temps=False)
    assert kept.missing() == list(range(5)) and own_temp.exists()
    store = tensor_store(folder, 5)
    assert not own_temp.exists() and all(path.exists() for path in foreign)
    assert store.missing() == list(range(5))


def test_reopened_store_resumes_from_what_was_committed(tmp_path):
    first = tensor_store(tmp_path, 6, shape=(2,), dtype=torch.int64)
    for i in (0, 2, 5):
        first.put(i, torch.tensor([i, i * i]))
    first.close()
    again = tensor_store(tmp_path, 6, shape=(2,), dtype=torch.int64)
    assert again.missing() == [1, 3, 4]
    assert all(torch.equal(again[i], torch.tensor([i, i * i])) for i in (0, 2, 5))


def test_clear_removes_only_this_stores_files(tmp_path):
    frames = image_store(tmp_path, 3, size=SIZE)
    latents = tensor_store(tmp_path, 3)
    frames.put(0, _image(0))
    latents.put(0, torch.zeros(1))
    (tmp_path / ".000001.png.0123abcd.tmp").write_bytes(b"partial")
    (tmp_path / "manifest.json").write_text("{}")
    frames.clear()
    assert _names(tmp_path) == ["000000.npy", "manifest.json"]


# --------------------------------------------------------------------------- memory stays flat


def test_store_holds_no_items(tmp_path):
    """200 frames of 256x256 through a DiskStore: nothing it was given or gave out stays alive."""
    count, side = 200, 256
    frames = image_store(tmp_path / "frames", count, size=(side, side), fsync=False)
    latents = tensor_store(tmp_path / "latents", count, shape=(side, side), dtype=torch.float32, fsync=False)
    ramp = np.broadcast_to(np.arange(side, dtype=np.uint8)[:, None, None], (side, side, 3))  # compresses fast
    alive = []
    for i in range(count):
        image, tensor = Image.fromarray(ramp), torch.full((side, side), float(i))
        frames.put(i, image)
        latents.put(i, tensor)
        alive += [weakref.ref(image), weakref.ref(tensor)]
        del image, tensor
    for store in (frames, latents):
        for item in store:
            alive.append(weakref.ref(item))
    del item
    gc.collect()
    assert not any(ref() is not None for ref in alive)
    assert sum(sys.getsizeof(v) for v in vars(frames).values()) < 10_000

    tracemalloc.start()  # NumPy reports its buffers to tracemalloc: 200 latents are 52 MB
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            latents.put(i, np.full((side, side), i, np.float32))  # shares the NumPy buffer
            assert latents[i][0, 0] == i  # read into a NumPy buffer
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 1_000_000
