"""Prompt translation and refining: a Chinese prompt is translated to English by a MarianMT model,
expanded into a detailed drawing prompt by BeautifulPrompt, then rendered with SDXL at four seeds.
As DiffSynth-Studio's example of the same name (its translator link pointed to opus-mt-en-zh, the
wrong direction; the model needed is opus-mt-zh-en).

Usage: python examples/sd_prompt_refining.py [SIZE] [STEPS]      (defaults: 1024, 30)

Model files (paths relative to where you run the script; the two prompt models are whole
Hugging Face folders: download every file of the linked repository into the folder):
  models/stable_diffusion_xl/sd_xl_base_1.0.safetensors
      https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors
  models/BeautifulPrompt/pai-bloom-1b1-text2prompt-sd/
      https://huggingface.co/alibaba-pai/pai-bloom-1b1-text2prompt-sd
      (or pai-bloom-1b1-text2prompt-sd-v2/; a folder name ending in "v2" selects the v2 template)
  models/translator/opus-mt-zh-en/
      https://huggingface.co/Helsinki-NLP/opus-mt-zh-en
  models/textual_inversion/  (optional embeddings, used in prompts by file name; never translated)

The translated and refined prompt is logged (logger "diffsynth", INFO). Refining samples text; its
randomness follows torch.manual_seed but never changes the image noise drawn from it.
"""
import logging
import os
import sys

import torch

from diffsynth import ModelManager, SDXLImagePipeline
from diffsynth.utils.model_files import require_model_files

CHECKPOINT = "models/stable_diffusion_xl/sd_xl_base_1.0.safetensors"
BEAUTIFUL_PROMPT = "models/BeautifulPrompt/pai-bloom-1b1-text2prompt-sd"
TRANSLATOR = "models/translator/opus-mt-zh-en"

size = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 30
require_model_files({
    CHECKPOINT: "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
    BEAUTIFUL_PROMPT: "https://huggingface.co/alibaba-pai/pai-bloom-1b1-text2prompt-sd (every file, into this folder)",
    TRANSLATOR: "https://huggingface.co/Helsinki-NLP/opus-mt-zh-en (every file, into this folder)",
})
logging.basicConfig(level=logging.WARNING, format="%(message)s")
logging.getLogger("diffsynth").setLevel(logging.INFO)  # shows the prompt after translation and refining

model_manager = ModelManager()  # fp16 on CUDA, fp32 on the CPU
if os.path.isdir("models/textual_inversion"):
    model_manager.load_textual_inversions("models/textual_inversion")
model_manager.load_models([CHECKPOINT, BEAUTIFUL_PROMPT, TRANSLATOR])
pipe = SDXLImagePipeline.from_model_manager(model_manager)  # picks up the translator and BeautifulPrompt

prompt = "一个漂亮的女孩"
negative_prompt = ""

for seed in range(4):
    torch.manual_seed(seed)
    image = pipe(prompt=prompt, negative_prompt=negative_prompt, height=size, width=size, num_inference_steps=steps)
    image.save(f"{seed}.jpg")
