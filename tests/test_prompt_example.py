"""examples/sd_prompt_refining.py runs end to end with tiny models at its documented paths."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

from diffsynth.testing import factory
from diffsynth.testing.prompt_model_files import write_beautiful_prompt_folder, write_translator_folder


SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "sd_prompt_refining.py")


def _run(cwd, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_missing_prompt_models_are_listed_with_the_right_links(tmp_path):
    result = _run(tmp_path)
    assert result.returncode != 0
    assert "models/translator/opus-mt-zh-en" in result.stderr
    assert "https://huggingface.co/Helsinki-NLP/opus-mt-zh-en" in result.stderr
    assert "opus-mt-en-zh" not in result.stderr
    assert "https://huggingface.co/alibaba-pai/pai-bloom-1b1-text2prompt-sd" in result.stderr
    assert "models/stable_diffusion_xl/sd_xl_base_1.0.safetensors" in result.stderr


def test_example_translates_refines_and_renders(tmp_path):
    factory.write_sdxl_checkpoint(str(tmp_path / "models/stable_diffusion_xl/sd_xl_base_1.0.safetensors"))
    write_translator_folder(str(tmp_path / "models/translator/opus-mt-zh-en"))
    write_beautiful_prompt_folder(str(tmp_path / "models/BeautifulPrompt/pai-bloom-1b1-text2prompt-sd"))
    result = _run(tmp_path, "64", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Prompt after translation/refining:") == 4  # one per seed, logged not printed
    for seed in range(4):
        assert Image.open(tmp_path / f"{seed}.jpg").size == (64, 64)
