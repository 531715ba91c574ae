"""The example scripts run end to end with tiny random-weight models placed at their documented paths."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffsynth.testing import factory
from diffsynth.testing.annotator_files import write_lineart_file
from diffsynth.testing.controlnet_files import write_controlnet
from diffsynth.testing.motion_files import write_motion_module

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _run(script: str, cwd, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_missing_model_files_are_listed_with_links(tmp_path):
    result = _run("sd_text_to_image.py", tmp_path)
    assert result.returncode != 0
    assert "models/stable_diffusion/aingdiffusion_v12.safetensors" in result.stderr
    assert "https://civitai.com/api/download/models/229575" in result.stderr


def test_toon_shading_example_runs(tmp_path):
    factory.write_sd_checkpoint(str(tmp_path / "models/stable_diffusion/flat2DAnimerge_v45Sharp.safetensors"))
    write_controlnet(str(tmp_path / "models/ControlNet/control_v11f1e_sd15_tile.pth"), seed=1)
    write_controlnet(str(tmp_path / "models/ControlNet/control_v11p_sd15_lineart.pth"), seed=2)
    write_lineart_file(str(tmp_path / "models/Annotators/sk_model.pth"))
    factory.write_textual_inversion(str(tmp_path / "models/textual_inversion/verybadimagenegative_v1.3.pt"))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    result = _run("sd_toon_shading_image.py", tmp_path, "in.png", "out.png", "64")
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "out.png").size == (64, 64)


@pytest.mark.slow
def test_text_to_video_example_runs(tmp_path):
    factory.write_sd_checkpoint(str(tmp_path / "models/stable_diffusion/dreamshaper_8.safetensors"))
    write_motion_module(str(tmp_path / "models/AnimateDiff/mm_sd_v15_v2.ckpt"))
    from diffsynth.testing.rife_files import write_rife_file

    os.makedirs(tmp_path / "models/RIFE", exist_ok=True)
    write_rife_file(str(tmp_path / "models/RIFE/flownet.pkl"))
    result = _run("sd_text_to_video.py", tmp_path, timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.getsize(tmp_path / "output/text_to_video/video.mp4") > 0
