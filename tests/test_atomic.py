"""Atomic writes: complete file or old file, never a torn one; no temp files left behind."""

import errno
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from diffsynth.utils import atomic
from diffsynth.utils.atomic import (
    atomic_open,
    atomic_path,
    atomic_save_image,
    atomic_save_safetensors,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    is_temp_name,
)


def _names(folder):
    return sorted(os.listdir(folder))


def test_write_bytes_creates_and_replaces(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert _names(tmp_path) == ["a.bin"]


def test_write_text_is_utf8(tmp_path):
    path = tmp_path / "config.json"
    atomic_write_text(path, "一个漂亮的女孩 ✓")
    assert path.read_bytes().decode("utf-8") == "一个漂亮的女孩 ✓"


def test_failure_inside_block_keeps_old_file_and_removes_temp(tmp_path):
    path = tmp_path / "frame.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(path) as f:
            f.write(b"partial new content")
            assert any(is_temp_name(n) for n in _names(tmp_path))  # written aside, not in place
            assert path.read_bytes() == b"old"
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert _names(tmp_path) == ["frame.png"]


def test_failed_rename_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "x.txt"

    def broken_replace(src, dst):
        raise PermissionError(errno.EACCES, "denied", dst)

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(PermissionError):
        atomic_write_text(path, "x")
    assert _names(tmp_path) == []


def test_temp_name_is_hidden_in_same_folder(tmp_path):
    with atomic_path(tmp_path / "latent_00001.npy") as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        name = os.path.basename(tmp)
        assert name.startswith(".latent_00001.npy.") and name.endswith(".tmp")
        assert is_temp_name(tmp)
        with open(tmp, "wb") as f:
            np.save(f, np.arange(3))
    assert np.array_equal(np.load(tmp_path / "latent_00001.npy"), np.arange(3))
    assert not is_temp_name("latent_00001.npy")


def test_very_long_name_still_works(tmp_path):
    name = "f" * 250
    atomic_write_bytes(tmp_path / name, b"1")
    assert (tmp_path / name).read_bytes() == b"1"


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a", b"1")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        atomic_write_bytes(tmp_path / "missing" / "a.bin", b"1")
    assert info.value.filename == str(tmp_path / "missing")


@pytest.mark.parametrize("fsync, expected", [(True, 2), (False, 0)])
def test_fsync_of_file_and_folder(tmp_path, monkeypatch, fsync, expected):
    calls = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    atomic_write_bytes(tmp_path / "a", b"1", fsync=fsync)
    assert len(calls) == expected  # the data, then the folder entry


def test_disk_full_names_folder_and_keeps_errno(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"old")
    with pytest.raises(OSError) as info:
        with atomic_open(path) as f:
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC
    assert str(tmp_path) in str(info.value) and "free some space" in str(info.value)
    assert path.read_bytes() == b"old"
    assert _names(tmp_path) == ["big.bin"]


def test_bad_mode():
    with pytest.raises(ValueError, match="write modes"):
        with atomic_open("x", "ab"):
            pass


@pytest.mark.parametrize("ext, fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP")])
def test_save_image_infers_format_from_target(tmp_path, ext, fmt):
    img = Image.fromarray(np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3))
    path = tmp_path / f"frame{ext}"
    atomic_save_image(img, path)
    with Image.open(path) as back:
        assert back.format == fmt and back.size == (64, 48)
        if fmt == "PNG":
            assert np.array_equal(np.asarray(back), np.asarray(img))
    assert _names(tmp_path) == [f"frame{ext}"]


def test_save_image_explicit_format_and_params(tmp_path):
    img = Image.new("RGB", (8, 8), (1, 2, 3))
    atomic_save_image(img, tmp_path / "frame.data", format="PNG", compress_level=1)
    with Image.open(tmp_path / "frame.data") as back:
        assert back.format == "PNG"


def test_save_image_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="format='PNG'"):
        atomic_save_image(Image.new("RGB", (2, 2)), tmp_path / "frame.xyz")
    assert _names(tmp_path) == []


def test_save_safetensors_with_metadata(tmp_path):
    path = tmp_path / "latents.safetensors"
    tensors = {"x": torch.randn(2, 4, 8, 8), "t": torch.tensor([999])}
    atomic_save_safetensors(tensors, path, metadata={"step": "3"})
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"step": "3"}
        assert torch.equal(f.get_tensor("x"), tensors["x"])
    assert _names(tmp_path) == ["latents.safetensors"]


def test_save_safetensors_failure_leaves_nothing(tmp_path):
    shared = torch.zeros(4)
    with pytest.raises(Exception):
        atomic_save_safetensors({"a": shared, "b": shared}, tmp_path / "bad.safetensors")
    assert _names(tmp_path) == []


def test_torch_save_roundtrip(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"w": torch.arange(4), "step": 3}, path)
    back = torch.load(path, weights_only=True)
    assert back["step"] == 3 and torch.equal(back["w"], torch.arange(4))
