"""Stable Diffusion XL text-to-image at 1024², then image-to-image to 2048² on the tiled
high-resolution path. As DiffSynth-Studio's example of the same name.

Usage: python examples/sdxl_text_to_image.py [SIZE] [STEPS]   (defaults 1024 and 60; the second
image is 2·SIZE)

Model files (paths relative to where you run the script; download each from its link):
  models/stable_diffusion_xl/bluePencilXL_v200.safetensors
      https://civitai.com/api/download/models/245614?type=Model&format=SafeTensor&size=pruned&fp=fp16
Any SDXL base checkpoint works in its place, e.g. sd_xl_base_1.0.safetensors from
https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors
"""
import sys

import torch

from diffsynth import ModelManager, SDXLImagePipeline
from diffsynth.utils.model_files import require_model_files

CHECKPOINT = "models/stable_diffusion_xl/bluePencilXL_v200.safetensors"
size = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 60
require_model_files({CHECKPOINT: "https://civitai.com/api/download/models/245614?type=Model&format=SafeTensor&size=pruned&fp=fp16"})

model_manager = ModelManager()  # fp16 on CUDA, fp32 on the CPU; the SDXL VAE always runs in fp32
model_manager.load_models([CHECKPOINT])
pipe = SDXLImagePipeline.from_model_manager(model_manager)

prompt = "masterpiece, best quality, solo, long hair, wavy hair, silver hair, blue eyes, blue dress, medium breasts, dress, underwater, air bubble, floating hair, refraction, portrait,"
negative_prompt = "worst quality, low quality, monochrome, zombie, interlocked fingers, Aissist, cleavage, nsfw,"

torch.manual_seed(0)
image = pipe(prompt=prompt, negative_prompt=negative_prompt, cfg_scale=6, height=size, width=size, num_inference_steps=steps)
image.save(f"{size}.jpg")

image = pipe(
    prompt=prompt, negative_prompt=negative_prompt, cfg_scale=6,
    input_image=image.resize((2 * size, 2 * size)), height=2 * size, width=2 * size,
    num_inference_steps=steps, denoising_strength=0.5, tiled=True,
)
image.save(f"{2 * size}.jpg")
