"""Diffutoon toon shading (arXiv 2401.16224) driven by a config dict, as DiffSynth-Studio's example
of the same name: AnimateDiff + tile and lineart ControlNets (both fed the input video), 30 frames
at 1536x1536, 10 steps. Edit `config` below to change anything.

The render streams through `data/examples/diffutoon/output/` (frames, ControlNet maps, latents of
every step; see the README's "Resume" section). If it stops (crash, Ctrl-C, full disk), run the
same command again: it continues where it stopped. `diffsynth status data/examples/diffutoon/output`
shows the stages.

Usage: python examples/diffutoon_toon_shading.py [--video FILE] [--output FOLDER] [--frames N]
                                                [--size PIXELS] [--steps N] [--device cuda|cpu]

Input video: data/examples/diffutoon/input_video.mp4 (the original example used
https://www.bilibili.com/video/BV1iG411a7sQ/). DiffSynth-Studio's notes: 1536x1536 needs about 22 GB of
VRAM; its Colab notebook rendered 1024x1024 (--size 1024) on a 16 GB T4.

Model files (paths relative to where you run the script; download each from its link):
  models/stable_diffusion/aingdiffusion_v12.safetensors
      https://civitai.com/api/download/models/229575
  models/AnimateDiff/mm_sd_v15_v2.ckpt
      https://huggingface.co/guoyww/animatediff/resolve/main/mm_sd_v15_v2.ckpt
  models/ControlNet/control_v11p_sd15_lineart.pth
      https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11p_sd15_lineart.pth
  models/ControlNet/control_v11f1e_sd15_tile.pth
      https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11f1e_sd15_tile.pth
  models/Annotators/sk_model.pth
      https://huggingface.co/lllyasviel/Annotators/resolve/main/sk_model.pth
  models/textual_inversion/verybadimagenegative_v1.3.pt
      https://civitai.com/api/download/models/25820?type=Model&format=PickleTensor&size=full&fp=fp16
(The original also lists models/Annotators/sk_model2.pth, the coarse lineart model, which this
config does not use: https://huggingface.co/lllyasviel/Annotators/resolve/main/sk_model2.pth)
"""
from __future__ import annotations

import argparse
import copy

from diffsynth import SDVideoPipelineRunner
from diffsynth.utils.model_files import require_model_files

MODEL_FILES = {
    "models/stable_diffusion/aingdiffusion_v12.safetensors": "https://civitai.com/api/download/models/229575",
    "models/AnimateDiff/mm_sd_v15_v2.ckpt": "https://huggingface.co/guoyww/animatediff/resolve/main/mm_sd_v15_v2.ckpt",
    "models/ControlNet/control_v11p_sd15_lineart.pth": "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11p_sd15_lineart.pth",
    "models/ControlNet/control_v11f1e_sd15_tile.pth": "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11f1e_sd15_tile.pth",
    "models/Annotators/sk_model.pth": "https://huggingface.co/lllyasviel/Annotators/resolve/main/sk_model.pth",
    "models/textual_inversion/verybadimagenegative_v1.3.pt": "https://civitai.com/api/download/models/25820?type=Model&format=PickleTensor&size=full&fp=fp16",
}


def _frames(video: str, size: int, start, end) -> dict:
    return {"video_file": video, "image_folder": None, "height": size, "width": size, "start_frame_id": start, "end_frame_id": end}


VIDEO = "data/examples/diffutoon/input_video.mp4"

config = {
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
        "output_folder": "data/examples/diffutoon/output",
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


def make_config(template: dict, video: str | None = None, output: str | None = None, frames: int | None = None,
                size: int | None = None, steps: int | None = None, device: str | None = None) -> dict:
    """A deep copy of ``template`` (never modified) with the given settings replaced in every place they occur."""
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


def parse_args(argv=None, description: str = __doc__.split("\n\n")[0]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--video", default=None, help=f"input video (default {VIDEO})")
    parser.add_argument("--output", default=None, help="output folder (default data/examples/diffutoon/output)")
    parser.add_argument("--frames", type=int, default=None, help="render frames [0, N) (default 30)")
    parser.add_argument("--size", type=int, default=None, help="height and width, a multiple of 64 (default 1536)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 10)")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (very slow)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    require_model_files(MODEL_FILES)
    run_config = make_config(config, args.video, args.output, args.frames, args.size, args.steps, args.device)
    return SDVideoPipelineRunner().run(run_config)


if __name__ == "__main__":
    main()
