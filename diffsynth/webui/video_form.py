"""The Video Creator's form and the runner config it becomes (upstream_spec §6.7, §10.2).

Fixes three bugs of the original page: a ControlNet unit's own video path is used (the
original reused the input video's), an empty input path is a message instead of a crash
inside the runner, and a ControlNet without a processor is refused before anything runs.
Paths in the config are absolute, so ``diffsynth run OUTPUT/config.json`` resumes the
render from any working directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..controlnets.annotators import PROCESSOR_IDS
from .choices import snap_to_8


@dataclass
class ControlNetUnitForm:
    """One ControlNet tab. ``use_input_video=False`` reads ``video_path`` (a file or an image folder) instead."""

    model_path: str | None = None
    processor_id: str | None = None
    scale: float = 0.5
    use_input_video: bool = True
    video_path: str = ""
    start_frame_id: int = 0
    end_frame_id: int | None = 16


@dataclass
class VideoForm:
    sd_model: str | None = None
    animatediff_model: str | None = None
    lora_model: str | None = None
    lora_alpha: float = 1.0
    input_path: str = ""
    width: int = 1024
    height: int = 1024
    start_frame_id: int = 0
    end_frame_id: int | None = 16
    output_folder: str = "output"
    fps: int = 60
    controlnet_units: list[ControlNetUnitForm] = field(default_factory=list)
    seed: int = 0
    prompt: str = ""
    negative_prompt: str = ""
    cfg_scale: float = 7.0
    clip_skip: int = 1
    num_inference_steps: int = 10
    denoising_strength: float = 1.0
    animatediff_batch_size: int = 16
    animatediff_stride: int = 8
    unet_batch_size: int = 1
    controlnet_batch_size: int = 1
    cross_frame_attention: bool = False
    device: str = "cpu"


def _frames_spec(path: str, what: str, width: int, height: int, start: int, end: int | None) -> dict:
    path = path.strip()
    if not path:
        raise ValueError(f"{what}: give the path of a video file or of a folder of images")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise ValueError(f"{what}: {path} does not exist")
    if end is not None and end <= start:
        raise ValueError(f"{what}: the end frame id ({end}) must be greater than the start frame id ({start})")
    is_folder = os.path.isdir(path)
    return {"video_file": None if is_folder else path, "image_folder": path if is_folder else None,
            "height": height, "width": width, "start_frame_id": start, "end_frame_id": end}


def build_video_config(form: VideoForm, models_root: str) -> dict:
    """A runner config (the shape ``diffsynth run`` reads) from the form; ``ValueError`` with a user-facing message when incomplete."""
    if not form.sd_model:
        raise ValueError(f"choose a Stable Diffusion model (files in {os.path.join(models_root, 'stable_diffusion')})")
    if not form.prompt.strip():
        raise ValueError("write a positive prompt")
    width, height = snap_to_8(form.width), snap_to_8(form.height)
    source = _frames_spec(form.input_path, "Input video", width, height, form.start_frame_id, form.end_frame_id)
    model_list = [os.path.abspath(form.sd_model)]
    if form.animatediff_model:
        model_list.append(os.path.abspath(form.animatediff_model))
    lora_alphas = []
    if form.lora_model:
        model_list.append(os.path.abspath(form.lora_model))
        lora_alphas.append(float(form.lora_alpha))
    units, unit_frames = [], []
    for k, unit in enumerate(form.controlnet_units):
        if not unit.model_path:
            continue
        if unit.processor_id not in PROCESSOR_IDS:
            raise ValueError(f"ControlNet unit {k + 1}: choose a processor for {os.path.basename(unit.model_path)} (one of {', '.join(PROCESSOR_IDS)})")
        path = os.path.abspath(unit.model_path)
        model_list.append(path)
        units.append({"processor_id": unit.processor_id, "model_path": path, "scale": float(unit.scale)})
        if unit.use_input_video:
            unit_frames.append(dict(source))
        else:
            # Same size as the input: the runner feeds both to one UNet, frame by frame.
            spec = _frames_spec(unit.video_path, f"ControlNet unit {k + 1} video", width, height, unit.start_frame_id, unit.end_frame_id)
            n_source = None if source["end_frame_id"] is None else source["end_frame_id"] - source["start_frame_id"]
            n_unit = None if spec["end_frame_id"] is None else spec["end_frame_id"] - spec["start_frame_id"]
            if n_source is not None and n_unit is not None and n_source != n_unit:
                raise ValueError(f"ControlNet unit {k + 1} video: its frame range holds {n_unit} frames but the input video's holds {n_source}; give ranges of the same length")
            unit_frames.append(spec)
    stride = max(1, min(int(form.animatediff_stride), int(form.animatediff_batch_size)))
    return {
        "models": {
            "model_list": model_list,
            "textual_inversion_folder": os.path.abspath(os.path.join(models_root, "textual_inversion")),
            "annotator_folder": os.path.abspath(os.path.join(models_root, "Annotators")),
            "device": form.device,
            "lora_alphas": lora_alphas,
            "controlnet_units": units,
        },
        "data": {
            "input_frames": source,
            "controlnet_frames": unit_frames,
            "output_folder": os.path.abspath(os.path.expanduser(form.output_folder.strip() or "output")),
            "fps": int(form.fps),
        },
        "pipeline": {
            "seed": int(form.seed),
            "pipeline_inputs": {
                "prompt": form.prompt,
                "negative_prompt": form.negative_prompt,
                "cfg_scale": float(form.cfg_scale),
                "clip_skip": int(form.clip_skip),
                "denoising_strength": float(form.denoising_strength),
                "num_inference_steps": int(form.num_inference_steps),
                "animatediff_batch_size": int(form.animatediff_batch_size),
                "animatediff_stride": stride,
                "unet_batch_size": int(form.unet_batch_size),
                "controlnet_batch_size": int(form.controlnet_batch_size),
                "cross_frame_attention": bool(form.cross_frame_attention),
                # the runner fills these from data (as the original's runner did)
                "input_frames": [],
                "num_frames": None,
                "width": width,
                "height": height,
                "controlnet_frames": [],
            },
        },
    }
