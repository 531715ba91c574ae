"""Reading model files: formats, unwrapping, dtype casts, corruption and pickle safety."""

import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffsynth.models import state_dict as sd_module
from diffsynth.models.errors import ModelFileError
from diffsynth.models.state_dict import (
    FORMAT_SAFETENSORS,
    FORMAT_TORCH_LEGACY,
    FORMAT_TORCH_ZIP,
    detect_file_format,
    iter_safetensors_keys,
    load_raw,
    load_state_dict,
    read_header,
    read_safetensors_metadata,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "text.position_ids": torch.arange(7, dtype=torch.int64)[None],
    }


def _assert_same(loaded, expected):
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), key


# --------------------------------------------------------------------------- formats


def test_safetensors_roundtrip(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), path)
    assert detect_file_format(path) == FORMAT_SAFETENSORS
    _assert_same(load_state_dict(path), _tensors())


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("target", [torch.float16, torch.bfloat16, torch.float32])
def test_safetensors_dtype_cast_keeps_integers(tmp_path, stored, target):
    tensors = {k: (v.to(stored) if v.is_floating_point() else v) for k, v in _tensors().items()}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    loaded = load_state_dict(path, dtype=target)
    assert loaded["conv.weight"].dtype == target
    assert torch.equal(loaded["conv.weight"], tensors["conv.weight"].to(target))
    assert loaded["text.position_ids"].dtype == torch.int64


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_flat_zip_checkpoint(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save(_tensors(), path)
    assert detect_file_format(path) == FORMAT_TORCH_ZIP
    _assert_same(load_state_dict(path), _tensors())


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module"])
def test_wrapped_checkpoint_is_unwrapped_and_metadata_dropped(tmp_path, wrapper):
    path = tmp_path / "model.ckpt"
    torch.save({wrapper: _tensors(), "global_step": 840000, "epoch": 6, "pytorch-lightning_version": "1.4.2"}, path)
    _assert_same(load_state_dict(path), _tensors())


def test_ldm_style_checkpoint_with_non_tensor_entries_inside(tmp_path):
    path = tmp_path / "model.ckpt"
    inner = dict(_tensors(), note="not a tensor", step=3)
    torch.save({"state_dict": inner, "global_step": 1}, path)
    _assert_same(load_state_dict(path), _tensors())


def test_legacy_non_zip_checkpoint(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": _tensors(), "global_step": 3}, path, _use_new_zipfile_serialization=False)
    assert detect_file_format(path) == FORMAT_TORCH_LEGACY
    _assert_same(load_state_dict(path), _tensors())


def test_pickle_dtype_cast(tmp_path):
    path = tmp_path / "control.pth"
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in _tensors().items()}, path)
    loaded = load_state_dict(path, torch.float32)
    assert loaded["conv.weight"].dtype == torch.float32
    assert loaded["text.position_ids"].dtype == torch.int64
    assert torch.equal(loaded["conv.weight"], _tensors()["conv.weight"].half().float())


def test_upstream_torch_dtype_keyword(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), path)
    assert load_state_dict(path, torch_dtype=torch.float16)["conv.bias"].dtype == torch.float16
    with pytest.raises(TypeError, match="either dtype or torch_dtype"):
        load_state_dict(path, torch.float16, torch_dtype=torch.float16)


@pytest.mark.parametrize("bad", ["float16", torch.int8])
def test_bad_dtype_is_explained(tmp_path, bad):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), path)
    with pytest.raises((TypeError, ValueError), match="dtype"):
        load_state_dict(path, bad)


def test_format_is_detected_from_content_not_name(tmp_path):
    path = tmp_path / "misnamed.ckpt"
    save_file(_tensors(), path)
    _assert_same(load_state_dict(path), _tensors())


def test_textual_inversion_a1111_raw_and_flat(tmp_path):
    path = tmp_path / "concept.pt"
    emb = torch.randn(2, 8, requires_grad=True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": emb}, "name": "concept", "step": 3000}, path)
    raw = load_raw(path)
    assert raw["name"] == "concept"
    assert torch.equal(raw["string_to_param"]["*"], emb)
    flat = load_state_dict(path)
    assert list(flat) == ["string_to_param.*"]
    assert not flat["string_to_param.*"].requires_grad


def test_load_raw_safetensors_is_flat_dict(tmp_path):
    path = tmp_path / "emb.safetensors"
    save_file({"emb_params": torch.ones(2, 8)}, path)
    assert torch.equal(load_raw(path)["emb_params"], torch.ones(2, 8))


def test_never_uses_weights_only_false(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for name, kwargs in (("z.ckpt", {}), ("l.ckpt", {"_use_new_zipfile_serialization": False})):
        torch.save(_tensors(), tmp_path / name, **kwargs)
        load_state_dict(tmp_path / name)
        load_raw(tmp_path / name)
    assert calls and all(c.get("weights_only") is True for c in calls)
    assert [c["mmap"] for c in calls] == [True, True, False, False]


# --------------------------------------------------------------------------- headers


def test_read_header_safetensors_without_loading(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    tensors = {"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.zeros(5, dtype=torch.float16)}
    save_file(tensors, path, metadata={"ss_network_alpha": "8"})
    monkeypatch.setattr(sd_module, "_load_safetensors", None)  # any data read would crash
    assert read_header(path) == {"a": ((2, 3), torch.bfloat16), "b": ((5,), torch.float16)}
    assert sorted(iter_safetensors_keys(path)) == ["a", "b"]
    assert read_safetensors_metadata(path) == {"ss_network_alpha": "8"}


def test_read_header_checkpoint_unwraps(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": _tensors(), "epoch": 1}, path)
    header = read_header(path)
    assert header["conv.weight"] == ((4, 3, 3, 3), torch.float32)
    assert header["text.position_ids"] == ((1, 7), torch.int64)


def test_iter_safetensors_keys_refuses_checkpoints(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save(_tensors(), path)
    with pytest.raises(ValueError, match="read_header"):
        iter_safetensors_keys(path)


# --------------------------------------------------------------------------- errors


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_state_dict(path)


def test_folder_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match="folder"):
        load_state_dict(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.999, 20, 4])
def test_truncated_safetensors(tmp_path, keep):
    good = tmp_path / "good.safetensors"
    save_file(_tensors(), good)
    data = good.read_bytes()
    cut = int(len(data) * keep) if keep < 1 else keep
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut])
    for reader in (load_state_dict, read_header):
        with pytest.raises(ModelFileError, match="cut.safetensors") as info:
            reader(path)
        assert "truncated" in str(info.value)
        assert "Download the file again" in str(info.value)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("keep", [0.5, 0.97, 100])
def test_truncated_checkpoint(tmp_path, legacy, keep):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": _tensors()}, good, _use_new_zipfile_serialization=not legacy)
    data = good.read_bytes()
    cut = int(len(data) * keep) if keep < 1 else keep
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[:cut])
    with pytest.raises(ModelFileError, match="cut.ckpt") as info:
        load_state_dict(path)
    assert "truncated" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert info.value.path == str(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        load_state_dict(path)


def test_git_lfs_pointer_is_explained(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(ModelFileError, match="Git LFS"):
        load_state_dict(path)


def test_html_page_is_explained(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_text("<!DOCTYPE html><html><body>Please log in</body></html>")
    with pytest.raises(ModelFileError, match="HTML"):
        load_state_dict(path)


def test_checkpoint_without_tensors(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"global_step": 3, "name": "x"}, path)
    with pytest.raises(ModelFileError, match="no tensors.*global_step"):
        load_state_dict(path)


class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_without_running(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.zeros(2)}, "payload": _Payload(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    for reader in (load_state_dict, load_raw, read_header):
        with pytest.raises(ModelFileError, match="evil.ckpt") as info:
            reader(path)
        message = str(info.value)
        assert "system" in message  # the offending global is named
        assert "refuse to execute code" in message
        assert ".safetensors" in message
        assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()


def test_numpy_objects_are_listed(tmp_path):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "np": np.arange(3)}, path)
    with pytest.raises(ModelFileError, match="numpy") as info:
        load_state_dict(path)
    assert "ndarray" in str(info.value)
