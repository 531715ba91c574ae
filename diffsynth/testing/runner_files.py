"""A tiny, complete runner project: models, an input clip and a DiffSynth-Studio-style config.

Used by ``diffsynth demo``, the runner's tests and ``bench/resume.py``.
"""
from __future__ import annotations

import os

import numpy as np

from ..data import save_video
from .controlnet_files import write_controlnet
from .factory import write_sd_checkpoint, write_textual_inversion
from .motion_files import write_motion_module


def write_input_clip(path: str, frames: int = 12, width: int = 64, height: int = 64, seed: int = 0) -> str:
    """A short synthetic clip: a textured background with a square moving across it."""
    rng = np.random.default_rng(seed)
    background = rng.integers(40, 200, (height, width, 3), dtype=np.uint8)

    def frame(i: int) -> np.ndarray:
        f = background.copy()
        x = (i * 3) % max(1, width - 16)
        f[height // 3 : height // 3 + 16, x : x + 16] = (250, 60, 60)
        return f

    save_video((frame(i) for i in range(frames)), path, fps=8, quality=8)
    return path


def write_tiny_project(folder: str, frames: int = 12, size: int = 64, smoother: bool = True, steps: int = 2) -> dict:
    """Write tiny models and an input clip under ``folder``; return a runner config using them.

    The config has the original Diffutoon shape: SD checkpoint + AnimateDiff + tile and lineart-free
    units (tile and canny need no annotator weights), a textual inversion used in the negative
    prompt, and a FastBlend smoother on the final frames when ``smoother``.
    """
    models = os.path.join(folder, "models")
    os.makedirs(models, exist_ok=True)
    ti_folder = os.path.join(models, "textual_inversion")
    write_textual_inversion(os.path.join(ti_folder, "verybadimagenegative_v1.3.pt"))
    sd = write_sd_checkpoint(os.path.join(models, "stable_diffusion", "tiny_sd15.safetensors"))
    mm = write_motion_module(os.path.join(models, "AnimateDiff", "mm_tiny_v2.ckpt"))
    tile = write_controlnet(os.path.join(models, "ControlNet", "control_tiny_tile.pth"), seed=1)
    canny = write_controlnet(os.path.join(models, "ControlNet", "control_tiny_canny.safetensors"), seed=2)
    clip = write_input_clip(os.path.join(folder, "input.mp4"), frames=frames, width=size, height=size)
    frames_spec = {"video_file": clip, "image_folder": None, "height": size, "width": size, "start_frame_id": 0, "end_frame_id": frames}
    config = {
        "models": {
            "model_list": [sd, mm, tile, canny],
            "textual_inversion_folder": ti_folder,
            "device": "cpu",
            "lora_alphas": [],
            "controlnet_units": [
                {"processor_id": "tile", "model_path": tile, "scale": 0.5},
                {"processor_id": "canny", "model_path": canny, "scale": 0.5},
            ],
        },
        "data": {
            "input_frames": dict(frames_spec),
            "controlnet_frames": [dict(frames_spec), dict(frames_spec)],
            "output_folder": os.path.join(folder, "output"),
            "fps": 8,
        },
        "pipeline": {
            "seed": 0,
            "pipeline_inputs": {
                "prompt": "best quality, perfect anime illustration, a girl is dancing",
                "negative_prompt": "verybadimagenegative_v1.3",
                "cfg_scale": 7.0,
                "clip_skip": 2,
                "denoising_strength": 0.9,
                "num_inference_steps": steps,
                "animatediff_batch_size": 8,
                "animatediff_stride": 4,
                "unet_batch_size": 8,
                "controlnet_batch_size": 8,
                "cross_frame_attention": False,
                "smoother_progress_ids": [-1] if smoother else [],
                # the original's runner overwrites these from data:
                "input_frames": [],
                "num_frames": frames,
                "width": size,
                "height": size,
                "controlnet_frames": [],
            },
        },
    }
    if smoother:
        config["smoother_configs"] = [{"processor_type": "FastBlend", "config": {"window_size": 3, "minimum_patch_size": 3, "num_iter": 2}}]
    return config
