"""CUDA/fp16 smoke tests (marked ``gpu``; skipped without a CUDA device)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffsynth import ModelManager, SDImagePipeline, SDVideoPipeline
from diffsynth.testing.motion_files import write_motion_module

pytestmark = pytest.mark.gpu


def test_image_pipeline_fp16_cuda_matches_cpu_noise(tiny_sd_file):
    mm = ModelManager(torch_dtype=torch.float16, device="cuda")
    mm.load_models([tiny_sd_file])
    pipe = SDImagePipeline.from_model_manager(mm)
    torch.manual_seed(0)
    image = np.asarray(pipe("a cat", height=64, width=64, num_inference_steps=3, progress_bar_cmd=None))
    assert image.shape == (64, 64, 3) and image.std() > 0


def test_video_pipeline_fp16_cuda_has_no_black_frames(tiny_sd_file, tmp_path):
    mm = ModelManager(torch_dtype=torch.float16, device="cuda")
    mm.load_models([tiny_sd_file, write_motion_module(str(tmp_path / "mm.ckpt"))])
    pipe = SDVideoPipeline.from_model_manager(mm)
    assert pipe.vae_decoder_fp32.dtype == torch.float32
    torch.manual_seed(0)
    frames = pipe("a cat", num_frames=6, height=64, width=64, num_inference_steps=2, animatediff_batch_size=4, animatediff_stride=2,
                  output_folder=str(tmp_path / "out"), progress_bar_cmd=None)
    for frame in frames:
        assert np.asarray(frame).max() > 0
