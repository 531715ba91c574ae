"""Stable Diffusion 1.5 text-to-image, then step-by-step upscaling by image-to-image steered by
tile + lineart ControlNets (512² → 1024² → 2048² → 4096²; the two largest with the tiled
high-resolution path). As DiffSynth-Studio's example of the same name.

Model files (paths relative to where you run the script; download each from its link):
  models/stable_diffusion/aingdiffusion_v12.safetensors
      https://civitai.com/api/download/models/229575?type=Model&format=SafeTensor&size=full&fp=fp16
  models/ControlNet/control_v11f1e_sd15_tile.pth
      https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11f1e_sd15_tile.pth
  models/ControlNet/control_v11p_sd15_lineart.pth
      https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11p_sd15_lineart.pth
  models/Annotators/sk_model.pth
      https://huggingface.co/lllyasviel/Annotators/resolve/main/sk_model.pth
  models/textual_inversion/  (optional embeddings, used in prompts by file name)
"""
import os

import torch

from diffsynth import ControlNetConfigUnit, ModelManager, SDImagePipeline
from diffsynth.utils.model_files import require_model_files

CHECKPOINT = "models/stable_diffusion/aingdiffusion_v12.safetensors"
TILE = "models/ControlNet/control_v11f1e_sd15_tile.pth"
LINEART = "models/ControlNet/control_v11p_sd15_lineart.pth"
require_model_files({
    CHECKPOINT: "https://civitai.com/api/download/models/229575?type=Model&format=SafeTensor&size=full&fp=fp16",
    TILE: "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11f1e_sd15_tile.pth",
    LINEART: "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11p_sd15_lineart.pth",
    "models/Annotators/sk_model.pth": "https://huggingface.co/lllyasviel/Annotators/resolve/main/sk_model.pth",
})

model_manager = ModelManager()  # fp16 on CUDA, fp32 on the CPU
if os.path.isdir("models/textual_inversion"):
    model_manager.load_textual_inversions("models/textual_inversion")
model_manager.load_models([CHECKPOINT, TILE, LINEART])
pipe = SDImagePipeline.from_model_manager(
    model_manager,
    [
        ControlNetConfigUnit(processor_id="tile", model_path=TILE, scale=0.5),
        ControlNetConfigUnit(processor_id="lineart", model_path=LINEART, scale=0.7),
    ],
)

prompt = "masterpiece, best quality, solo, long hair, wavy hair, silver hair, blue eyes, blue dress, medium breasts, dress, underwater, air bubble, floating hair, refraction, portrait,"
negative_prompt = "worst quality, low quality, monochrome, zombie, interlocked fingers, Aissist, cleavage, nsfw,"

torch.manual_seed(0)
image = pipe(prompt=prompt, negative_prompt=negative_prompt, cfg_scale=7.5, clip_skip=1, height=512, width=512, num_inference_steps=80)
image.save("512.jpg")

image = pipe(
    prompt=prompt, negative_prompt=negative_prompt, cfg_scale=7.5, clip_skip=1,
    input_image=image.resize((1024, 1024)), controlnet_image=image.resize((1024, 1024)),
    height=1024, width=1024, num_inference_steps=40, denoising_strength=0.7,
)
image.save("1024.jpg")

image = pipe(
    prompt=prompt, negative_prompt=negative_prompt, cfg_scale=7.5, clip_skip=1,
    input_image=image.resize((2048, 2048)), controlnet_image=image.resize((2048, 2048)),
    height=2048, width=2048, num_inference_steps=20, denoising_strength=0.7, tiled=True,
)
image.save("2048.jpg")

image = pipe(
    prompt=prompt, negative_prompt=negative_prompt, cfg_scale=7.5, clip_skip=1,
    input_image=image.resize((4096, 4096)), controlnet_image=image.resize((4096, 4096)),
    height=4096, width=4096, num_inference_steps=10, denoising_strength=0.5,
    tiled=True, tile_size=128, tile_stride=64,
)
image.save("4096.jpg")
