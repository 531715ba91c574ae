"""Stable Diffusion 1.5 text-to-image, then step-by-step upscaling by image-to-image
(512² → 1024² → 2048² → 4096²; the two largest with the tiled high-resolution path).

As DiffSynth-Studio's example of the same name. Its tile + lineart ControlNet units
join once ControlNet support lands; this script runs without them.

Model files (put them at these paths, relative to where you run the script):
  models/stable_diffusion/aingdiffusion_v12.safetensors
      https://civitai.com/api/download/models/229575?type=Model&format=SafeTensor&size=full&fp=fp16
  models/textual_inversion/  (optional embeddings, e.g. verybadimagenegative_v1.3.pt:
      https://civitai.com/api/download/models/25820?type=Model&format=PickleTensor&size=full&fp=fp16)
"""
import os

import torch

from diffsynth import ModelManager, SDImagePipeline
from diffsynth.utils.model_files import require_model_files

CHECKPOINT = "models/stable_diffusion/aingdiffusion_v12.safetensors"
require_model_files({CHECKPOINT: "https://civitai.com/api/download/models/229575?type=Model&format=SafeTensor&size=full&fp=fp16"})

model_manager = ModelManager(torch_dtype=torch.float16 if torch.cuda.is_available() else torch.float32)
if os.path.isdir("models/textual_inversion"):
    model_manager.load_textual_inversions("models/textual_inversion")
model_manager.load_models([CHECKPOINT])
pipe = SDImagePipeline.from_model_manager(model_manager)

prompt = "masterpiece, best quality, solo, long hair, wavy hair, silver hair, blue eyes, blue dress, medium breasts, dress, underwater, air bubble, floating hair, refraction, portrait,"
negative_prompt = "worst quality, low quality, monochrome, zombie, interlocked fingers, Aissist, cleavage, nsfw,"

torch.manual_seed(0)
image = pipe(prompt=prompt, negative_prompt=negative_prompt, cfg_scale=7.5, clip_skip=1, height=512, width=512, num_inference_steps=80)
image.save("512.jpg")

image = pipe(
    prompt=prompt, negative_prompt=negative_prompt, cfg_scale=7.5, clip_skip=1,
    input_image=image.resize((1024, 1024)), height=1024, width=1024, num_inference_steps=40, denoising_strength=0.7,
)
image.save("1024.jpg")

image = pipe(
    prompt=prompt, negative_prompt=negative_prompt, cfg_scale=7.5, clip_skip=1,
    input_image=image.resize((2048, 2048)), height=2048, width=2048, num_inference_steps=20, denoising_strength=0.7,
    tiled=True,
)
image.save("2048.jpg")

image = pipe(
    prompt=prompt, negative_prompt=negative_prompt, cfg_scale=7.5, clip_skip=1,
    input_image=image.resize((4096, 4096)), height=4096, width=4096, num_inference_steps=10, denoising_strength=0.5,
    tiled=True, tile_size=128, tile_stride=64,
)
image.save("4096.jpg")
