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


def test_device_memory_estimate_of_a_render_is_within_20_percent(tmp_path):
    """The estimate's device peak (weights from headers + traced activations) against torch's measured peak, fp16 on CUDA.

    At a size where activations matter (256×256, a window of 8 frames, AnimateDiff, two ControlNet units)."""
    from diffsynth.pipelines.runner import SDVideoPipelineRunner
    from diffsynth.testing.runner_files import write_tiny_project

    config = write_tiny_project(str(tmp_path / "project"), frames=8, size=256, smoother=False, steps=2)
    config["models"]["device"] = "cuda"
    config["data"]["output_folder"] = str(tmp_path / "out")
    runner = SDVideoPipelineRunner(progress_bar_cmd=None, estimate=True)
    runner.run(config)
    import json
    import os

    manifest = json.load(open(os.path.join(config["data"]["output_folder"], "manifest.json")))
    measured = max(s["measured"].get("device_peak_bytes") or 0 for s in manifest["stages"].values())
    predicted = runner.last_estimate.total["device_peak_bytes"]
    assert 0.8 < measured / predicted < 1.2, (measured, predicted)
