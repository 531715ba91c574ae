"""A tiny, complete runner project: models, an input clip and a DiffSynth-Studio-style config.

Used by ``diffsynth demo``, the runner's tests and ``bench/resume.py``. Also
:func:`write_documented_models`: tiny random-weight stand-ins at the paths the example
scripts document (``models/stable_diffusion/...``), so the examples run end to end in tests.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

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


def _documented_writer(path: str):
    """The writer of a tiny file in the format of the documented model file ``path`` (``models/<kind>/<name>``)."""
    from .annotator_files import write_hed_file, write_lineart_file
    from .depth_files import write_midas_file
    from .rife_files import write_rife_file

    kind, name = os.path.basename(os.path.dirname(path)), os.path.basename(path)
    by_name = {
        "mm_sd_v15_v2.ckpt": write_motion_module,
        "sk_model.pth": write_lineart_file,
        "ControlNetHED.pth": write_hed_file,
        "dpt_hybrid-midas-501f0c75.pt": write_midas_file,
        "flownet.pkl": write_rife_file,
    }
    if name in by_name:
        return by_name[name]
    if kind == "stable_diffusion":
        return write_sd_checkpoint
    if kind == "ControlNet":
        seed = sum(name.encode()) % 1000  # each ControlNet its own weights
        return lambda target: write_controlnet(target, seed=seed)
    if kind == "textual_inversion":
        return write_textual_inversion
    raise ValueError(f"no tiny stand-in is known for {path}; add a writer for it in diffsynth/testing/runner_files.py")


def write_documented_models(root: str, paths: Iterable[str]) -> list[str]:
    """Write a tiny random-weight file at ``root/path`` for each documented model path (e.g. an example's ``MODEL_FILES``).

    Each file has the real on-disk format of the file it stands in for, so the example loads it
    through the same detection and loaders as the downloaded one. Returns the files written.
    """
    written = []
    for path in paths:
        target = os.path.join(root, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _documented_writer(path)(target)
        written.append(target)
    return written
