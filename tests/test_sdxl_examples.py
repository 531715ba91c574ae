"""The SDXL example scripts run end to end with tiny random-weight SDXL models at their documented paths."""
from __future__ import annotations

import os
import subprocess
import sys

from PIL import Image

from diffsynth.testing import factory

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _run(script: str, cwd, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_missing_sdxl_files_are_listed_with_links(tmp_path):
    result = _run("sdxl_turbo.py", tmp_path)
    assert result.returncode != 0
    assert "models/stable_diffusion_xl_turbo/sd_xl_turbo_1.0_fp16.safetensors" in result.stderr
    assert "https://huggingface.co/stabilityai/sdxl-turbo/resolve/main/sd_xl_turbo_1.0_fp16.safetensors" in result.stderr
    with open(os.path.join(EXAMPLES, "sdxl_text_to_image.py"), encoding="utf-8") as f:
        assert "require_model_files({CHECKPOINT: \"https://civitai.com/api/download/models/245614" in f.read()


def test_sdxl_examples_run(tmp_path):
    factory.write_sdxl_checkpoint(str(tmp_path / "models/stable_diffusion_xl/bluePencilXL_v200.safetensors"))
    factory.write_sdxl_checkpoint(str(tmp_path / "models/stable_diffusion_xl_turbo/sd_xl_turbo_1.0_fp16.safetensors"), dtype="fp16")
    result = _run("sdxl_text_to_image.py", tmp_path, "64", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "64.jpg").size == (64, 64) and Image.open(tmp_path / "128.jpg").size == (128, 128)
    result = _run("sdxl_turbo.py", tmp_path, "64")
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "black_car_to_red_car.jpg").size == (64, 64)
