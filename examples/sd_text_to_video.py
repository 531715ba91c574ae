"""Text → image → 64-frame video with AnimateDiff → RIFE ×8 frame interpolation (505 frames at
120 fps), as DiffSynth-Studio's example of the same name.

The image is rendered by the image pipeline, then animated: the 64 input frames are that image,
denoised from strength 0.9 with a sliding window of 16 frames and stride 1. Every per-frame
artifact is written under `output/text_to_video/`; RAM stays flat however many frames you ask for.

Model files (paths relative to where you run the script):
  models/stable_diffusion/dreamshaper_8.safetensors
      https://civitai.com/api/download/models/128713?type=Model&format=SafeTensor&size=pruned&fp=fp16
  models/AnimateDiff/mm_sd_v15_v2.ckpt
      https://huggingface.co/guoyww/animatediff/resolve/main/mm_sd_v15_v2.ckpt
  models/RIFE/flownet.pkl
      https://drive.google.com/file/d/1APIzVeI-4ZZCEuIRE1m6WYfSCaOsi_7_/view?usp=sharing

Options (defaults: the original's settings): --frames 64 --height 512 --width 768
--image-steps 30 --video-steps 10 --device (default: CUDA if present, else the CPU).
"""
import argparse

import torch

from diffsynth import ModelManager, SDImagePipeline, SDVideoPipeline, save_video
from diffsynth.cache import image_store
from diffsynth.extensions.RIFE import RIFEInterpolater
from diffsynth.utils.model_files import require_model_files

parser = argparse.ArgumentParser(description="text -> image -> AnimateDiff video -> RIFE x8")
parser.add_argument("--frames", type=int, default=64)
parser.add_argument("--height", type=int, default=512)
parser.add_argument("--width", type=int, default=768)
parser.add_argument("--image-steps", type=int, default=30)
parser.add_argument("--video-steps", type=int, default=10)
parser.add_argument("--device", default=None)
args = parser.parse_args()

CHECKPOINT = "models/stable_diffusion/dreamshaper_8.safetensors"
MOTION = "models/AnimateDiff/mm_sd_v15_v2.ckpt"
RIFE = "models/RIFE/flownet.pkl"
require_model_files({
    RIFE: "https://drive.google.com/file/d/1APIzVeI-4ZZCEuIRE1m6WYfSCaOsi_7_/view?usp=sharing",
    CHECKPOINT: "https://civitai.com/api/download/models/128713?type=Model&format=SafeTensor&size=pruned&fp=fp16",
    MOTION: "https://huggingface.co/guoyww/animatediff/resolve/main/mm_sd_v15_v2.ckpt",
})

model_manager = ModelManager(device=args.device)
model_manager.load_models([CHECKPOINT, MOTION, RIFE])
pipe_image = SDImagePipeline.from_model_manager(model_manager)
pipe_video = SDVideoPipeline.from_model_manager(model_manager)

prompt = "lightning storm, sea"
negative_prompt = ""

torch.manual_seed(0)
image = pipe_image(prompt=prompt, negative_prompt=negative_prompt, cfg_scale=7.5, num_inference_steps=args.image_steps,
                   height=args.height, width=args.width)
image.save("image.png")

torch.manual_seed(0)
frames = pipe_video(
    prompt=prompt, negative_prompt=negative_prompt, cfg_scale=7.5,
    num_frames=args.frames, input_frames=[image] * args.frames, denoising_strength=0.9,
    height=args.height, width=args.width, num_inference_steps=args.video_steps,
    animatediff_batch_size=16, animatediff_stride=1, vram_limit_level=0,
    output_folder="output/text_to_video",
)
# ×8 frame interpolation, streamed to disk (64 → 505 frames); a rerun skips frames already written
interpolated = RIFEInterpolater.from_model_manager(model_manager).interpolate(
    frames, num_iter=3, output_store=image_store("output/text_to_video/interpolated", 8 * (len(frames) - 1) + 1))
save_video(interpolated, "output/text_to_video/video.mp4", fps=120)
