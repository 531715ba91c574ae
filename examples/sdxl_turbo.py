"""SDXL Turbo: an image in one denoising step, then image-to-image in one step.
As DiffSynth-Studio's example of the same name.

Usage: python examples/sdxl_turbo.py [SIZE]   (default 512, the size Turbo was trained at)

Model file (path relative to where you run the script):
  models/stable_diffusion_xl_turbo/sd_xl_turbo_1.0_fp16.safetensors
      https://huggingface.co/stabilityai/sdxl-turbo/resolve/main/sd_xl_turbo_1.0_fp16.safetensors
"""
import sys

import torch

from diffsynth import ModelManager, SDXLImagePipeline
from diffsynth.utils.model_files import require_model_files

CHECKPOINT = "models/stable_diffusion_xl_turbo/sd_xl_turbo_1.0_fp16.safetensors"
size = int(sys.argv[1]) if len(sys.argv) > 1 else 512
require_model_files({CHECKPOINT: "https://huggingface.co/stabilityai/sdxl-turbo/resolve/main/sd_xl_turbo_1.0_fp16.safetensors"})

model_manager = ModelManager()
model_manager.load_models([CHECKPOINT])
pipe = SDXLImagePipeline.from_model_manager(model_manager)

# Turbo needs exactly these settings: one step (timestep 999, straight to the clean image) and no
# classifier-free guidance (cfg_scale=1: one UNet pass, the negative prompt is not used).
turbo = dict(cfg_scale=1, height=size, width=size, num_inference_steps=1, progress_bar_cmd=None)

torch.manual_seed(0)
image = pipe(prompt="black car", **turbo)
image.save("black_car.jpg")

torch.manual_seed(0)
image = pipe(prompt="red car", input_image=image, denoising_strength=0.7, **turbo)  # one step from t = 699
image.save("black_car_to_red_car.jpg")
