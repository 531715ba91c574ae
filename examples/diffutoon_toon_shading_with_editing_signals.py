"""Diffutoon with editing signals (arXiv 2401.16224), as DiffSynth-Studio's example of the same name:
two passes of the config runner.

Pass 1 (editing signals): re-colours the input video at 512x512 without AnimateDiff (softedge + depth
ControlNets, cross-frame attention, image-to-image at strength 0.9, FastBlend on the final frames)
into `data/examples/diffutoon_edit/color_video/video.mp4`.
Pass 2 (toon shading): the Diffutoon config at 1536x1536, except that the tile ControlNet reads pass
1's video instead of the input video, so the colours of pass 1 steer the result. Output:
`data/examples/diffutoon_edit/output/`.

Both templates below are deep-copied before use. (DiffSynth-Studio's notebook version copied them
shallowly, so its nested dicts were shared, and ran the plain toon config in its second pass; here
pass 2 runs `config_stage_2` with the tile unit on pass 1's video.) Each pass resumes on its own:
rerun the same command after an interruption and finished work is reused.

Usage: python examples/diffutoon_toon_shading_with_editing_signals.py [--video FILE] [--output FOLDER]
           [--frames N] [--edit-size PIXELS] [--size PIXELS] [--edit-steps N] [--steps N] [--device cuda|cpu]

Input video: data/examples/diffutoon_edit/input_video.mp4 (the original example used
https://www.bilibili.com/video/BV1zu4y1s7Ec/).

Model files (paths relative to where you run the script; download each from its link):
  models/stable_diffusion/aingdiffusion_v12.safetensors
      https://civitai.com/api/download/models/229575
  models/AnimateDiff/mm_sd_v15_v2.ckpt
      https://huggingface.co/guoyww/animatediff/resolve/main/mm_sd_v15_v2.ckpt
  models/ControlNet/control_v11p_sd15_lineart.pth
      https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11p_sd15_lineart.pth
  models/ControlNet/control_v11f1e_sd15_tile.pth
      https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11f1e_sd15_tile.pth
  models/ControlNet/control_v11f1p_sd15_depth.pth
      https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11f1p_sd15_depth.pth
  models/ControlNet/control_v11p_sd15_softedge.pth
      https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11p_sd15_softedge.pth
  models/Annotators/dpt_hybrid-midas-501f0c75.pt
      https://huggingface.co/lllyasviel/Annotators/resolve/main/dpt_hybrid-midas-501f0c75.pt
  models/Annotators/ControlNetHED.pth
      https://huggingface.co/lllyasviel/Annotators/resolve/main/ControlNetHED.pth
  models/Annotators/sk_model.pth
      https://huggingface.co/lllyasviel/Annotators/resolve/main/sk_model.pth
  models/textual_inversion/verybadimagenegative_v1.3.pt
      https://civitai.com/api/download/models/25820?type=Model&format=PickleTensor&size=full&fp=fp16
(The original also lists models/Annotators/sk_model2.pth, the coarse lineart model, which these
configs do not use: https://huggingface.co/lllyasviel/Annotators/resolve/main/sk_model2.pth)
"""
from __future__ import annotations

import argparse
import copy
import os

from diffsynth import SDVideoPipelineRunner
from diffsynth.utils.model_files import require_model_files

MODEL_FILES = {
    "models/stable_diffusion/aingdiffusion_v12.safetensors": "https://civitai.com/api/download/models/229575",
    "models/AnimateDiff/mm_sd_v15_v2.ckpt": "https://huggingface.co/guoyww/animatediff/resolve/main/mm_sd_v15_v2.ckpt",
    "models/ControlNet/control_v11p_sd15_lineart.pth": "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11p_sd15_lineart.pth",
    "models/ControlNet/control_v11f1e_sd15_tile.pth": "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11f1e_sd15_tile.pth",
    "models/ControlNet/control_v11f1p_sd15_depth.pth": "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11f1p_sd15_depth.pth",
    "models/ControlNet/control_v11p_sd15_softedge.pth": "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11p_sd15_softedge.pth",
    "models/Annotators/dpt_hybrid-midas-501f0c75.pt": "https://huggingface.co/lllyasviel/Annotators/resolve/main/dpt_hybrid-midas-501f0c75.pt",
    "models/Annotators/ControlNetHED.pth": "https://huggingface.co/lllyasviel/Annotators/resolve/main/ControlNetHED.pth",
    "models/Annotators/sk_model.pth": "https://huggingface.co/lllyasviel/Annotators/resolve/main/sk_model.pth",
    "models/textual_inversion/verybadimagenegative_v1.3.pt": "https://civitai.com/api/download/models/25820?type=Model&format=PickleTensor&size=full&fp=fp16",
}

VIDEO = "data/examples/diffutoon_edit/input_video.mp4"
OUTPUT = "data/examples/diffutoon_edit"


def _frames(video: str, size: int, start, end) -> dict:
    return {"video_file": video, "image_folder": None, "height": size, "width": size, "start_frame_id": start, "end_frame_id": end}


# Pass 1: the editing signals (a re-coloured video).
config_stage_1 = {
    "models": {
        "model_list": [
            "models/stable_diffusion/aingdiffusion_v12.safetensors",
            "models/ControlNet/control_v11p_sd15_softedge.pth",
            "models/ControlNet/control_v11f1p_sd15_depth.pth",
        ],
        "textual_inversion_folder": "models/textual_inversion",
        "device": "cuda",
        "lora_alphas": [],
        "controlnet_units": [
            {"processor_id": "softedge", "model_path": "models/ControlNet/control_v11p_sd15_softedge.pth", "scale": 0.5},
            {"processor_id": "depth", "model_path": "models/ControlNet/control_v11f1p_sd15_depth.pth", "scale": 0.5},
        ],
    },
    "data": {
        "input_frames": _frames(VIDEO, 512, 0, 30),
        "controlnet_frames": [_frames(VIDEO, 512, 0, 30), _frames(VIDEO, 512, 0, 30)],
        "output_folder": f"{OUTPUT}/color_video",
        "fps": 25,
    },
    "smoother_configs": [
        {"processor_type": "FastBlend", "config": {}},
    ],
    "pipeline": {
        "seed": 0,
        "pipeline_inputs": {
            "prompt": "best quality, perfect anime illustration, orange clothes, night, a girl is dancing, smile, solo, black silk stockings",
            "negative_prompt": "verybadimagenegative_v1.3",
            "cfg_scale": 7.0,
            "clip_skip": 1,
            "denoising_strength": 0.9,
            "num_inference_steps": 20,
            "animatediff_batch_size": 8,
            "animatediff_stride": 4,
            "unet_batch_size": 8,
            "controlnet_batch_size": 8,
            "cross_frame_attention": True,
            "smoother_progress_ids": [-1],
            # Overwritten by the runner from `data`; you do not need to edit these.
            "input_frames": [],
            "num_frames": 30,
            "width": 512,
            "height": 512,
            "controlnet_frames": [],
        },
    },
}

# Pass 2: toon shading; the tile unit's frames are replaced by pass 1's video in `stage_2_config`.
config_stage_2 = {
    "models": {
        "model_list": [
            "models/stable_diffusion/aingdiffusion_v12.safetensors",
            "models/AnimateDiff/mm_sd_v15_v2.ckpt",
            "models/ControlNet/control_v11f1e_sd15_tile.pth",
            "models/ControlNet/control_v11p_sd15_lineart.pth",
        ],
        "textual_inversion_folder": "models/textual_inversion",
        "device": "cuda",
        "lora_alphas": [],
        "controlnet_units": [
            {"processor_id": "tile", "model_path": "models/ControlNet/control_v11f1e_sd15_tile.pth", "scale": 0.5},
            {"processor_id": "lineart", "model_path": "models/ControlNet/control_v11p_sd15_lineart.pth", "scale": 0.5},
        ],
    },
    "data": {
        "input_frames": _frames(VIDEO, 1536, 0, 30),
        "controlnet_frames": [_frames(VIDEO, 1536, 0, 30), _frames(VIDEO, 1536, 0, 30)],
        "output_folder": f"{OUTPUT}/output",
        "fps": 30,
    },
    "pipeline": {
        "seed": 0,
        "pipeline_inputs": {
            "prompt": "best quality, perfect anime illustration, light, a girl is dancing, smile, solo",
            "negative_prompt": "verybadimagenegative_v1.3",
            "cfg_scale": 7.0,
            "clip_skip": 2,
            "denoising_strength": 1.0,
            "num_inference_steps": 10,
            "animatediff_batch_size": 16,
            "animatediff_stride": 8,
            "unet_batch_size": 1,
            "controlnet_batch_size": 1,
            "cross_frame_attention": False,
            # Overwritten by the runner from `data`; you do not need to edit these.
            "input_frames": [],
            "num_frames": 30,
            "width": 1536,
            "height": 1536,
            "controlnet_frames": [],
        },
    },
}


def _customize(template: dict, video, output, frames, size, steps, device) -> dict:
    """A deep copy of ``template`` (never modified) with the given settings replaced."""
    result = copy.deepcopy(template)
    data = result["data"]
    for spec in [data["input_frames"], *data["controlnet_frames"]]:
        if video is not None:
            spec["video_file"] = video
        if size is not None:
            spec["height"] = spec["width"] = size
        if frames is not None:
            spec["start_frame_id"], spec["end_frame_id"] = 0, frames
    if output is not None:
        data["output_folder"] = output
    if steps is not None:
        result["pipeline"]["pipeline_inputs"]["num_inference_steps"] = steps
    if device is not None:
        result["models"]["device"] = device
    return result


def stage_1_config(video=None, output=None, frames=None, size=None, steps=None, device=None) -> dict:
    """Pass 1's config: a deep copy of ``config_stage_1`` with the given settings."""
    return _customize(config_stage_1, video, None if output is None else os.path.join(output, "color_video"), frames, size, steps, device)


def stage_2_config(color_video: str, video=None, output=None, frames=None, size=None, steps=None, device=None) -> dict:
    """Pass 2's config: a deep copy of ``config_stage_2`` whose tile unit reads ``color_video`` (all its frames, resized)."""
    config = _customize(config_stage_2, video, None if output is None else os.path.join(output, "output"), frames, size, steps, device)
    height, width = config["data"]["input_frames"]["height"], config["data"]["input_frames"]["width"]
    config["data"]["controlnet_frames"][0] = {
        "video_file": color_video, "image_folder": None, "height": height, "width": width, "start_frame_id": None, "end_frame_id": None,
    }
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", default=None, help=f"input video (default {VIDEO})")
    parser.add_argument("--output", default=None, help=f"parent folder of color_video/ and output/ (default {OUTPUT})")
    parser.add_argument("--frames", type=int, default=None, help="render frames [0, N) (default 30)")
    parser.add_argument("--edit-size", type=int, default=None, help="pass 1 height and width, a multiple of 64 (default 512)")
    parser.add_argument("--size", type=int, default=None, help="pass 2 height and width, a multiple of 64 (default 1536)")
    parser.add_argument("--edit-steps", type=int, default=None, help="pass 1 denoising steps (default 20)")
    parser.add_argument("--steps", type=int, default=None, help="pass 2 denoising steps (default 10)")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (very slow)")
    args = parser.parse_args(argv)
    require_model_files(MODEL_FILES)

    runner = SDVideoPipelineRunner()
    stage_1 = stage_1_config(args.video, args.output, args.frames, args.edit_size, args.edit_steps, args.device)
    runner.run(stage_1)
    color_video = os.path.join(stage_1["data"]["output_folder"], "video.mp4")
    stage_2 = stage_2_config(color_video, args.video, args.output, args.frames, args.size, args.steps, args.device)
    return runner.run(stage_2)


if __name__ == "__main__":
    main()
