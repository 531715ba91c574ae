"""The command line: info, txt2img, demo, and its error messages."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffsynth.cli import main
from diffsynth.testing import factory


def test_info_reports_family_dtype_and_parameters(tiny_sd_file, capsys):
    assert main(["info", tiny_sd_file]) == 0
    out = capsys.readouterr().out
    assert "sd1_checkpoint" in out and "float32" in out
    n = sum(v.numel() for part in factory.build_sd_state_dicts(0).values() for v in part.values())
    assert f"{n + 77:,}" in out  # + the text encoder's position_ids buffer stored in the file


def test_info_on_fp16_lora(tmp_path, capsys):
    path = factory.write_lora(str(tmp_path / "style.safetensors"), dtype="fp16")
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "float16" in out


def test_txt2img_writes_the_image_atomically(tiny_sd_file, tmp_path):
    out = tmp_path / "sub" / "cat.png"
    args = ["txt2img", "--model", tiny_sd_file, "--prompt", "a photo of a cat", "--out", str(out), "--steps", "2", "--height", "64", "--width", "64", "--device", "cpu"]
    assert main(args) == 0
    first = np.asarray(Image.open(out))
    assert first.shape == (64, 64, 3)
    assert [p.name for p in out.parent.iterdir()] == ["cat.png"]  # no temporary files left behind
    assert main(args) == 0
    assert np.array_equal(first, np.asarray(Image.open(out)))  # same seed, same image


def test_txt2img_renders_sdxl_checkpoints_with_the_sdxl_pipeline(tmp_path, capsys):
    path = factory.write_sdxl_checkpoint(str(tmp_path / "sdxl.safetensors"))
    out = tmp_path / "xl.png"
    args = ["txt2img", "--model", path, "--prompt", "a cat", "--out", str(out), "--steps", "1", "--height", "64", "--width", "64", "--device", "cpu"]
    assert main(args) == 0
    assert Image.open(out).size == (64, 64)


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    code = main(["txt2img", "--model", str(tmp_path / "missing.safetensors"), "--prompt", "x", "--out", str(tmp_path / "o.png"), "--device", "cpu"])
    assert code == 2
    assert "missing.safetensors" in capsys.readouterr().err


def test_demo_renders(tmp_path, capsys):
    out = tmp_path / "demo" / "demo.png"
    assert main(["demo", "--out", str(out)]) == 0
    assert "NOT ART" in capsys.readouterr().out
    assert np.asarray(Image.open(out)).std() > 0
