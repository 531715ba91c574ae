"""Toon shading of a single picture: the picture only steers tile + lineart ControlNets (no
image-to-image), as each frame of DiffSynth-Studio's toon-shading video examples.

Usage: python examples/sd_toon_shading_image.py INPUT.jpg OUTPUT.png [SIZE]

Model files (paths relative to where you run the script):
  models/stable_diffusion/flat2DAnimerge_v45Sharp.safetensors
      https://civitai.com/api/download/models/266360?type=Model&format=SafeTensor&size=pruned&fp=fp16
  models/ControlNet/control_v11f1e_sd15_tile.pth
      https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11f1e_sd15_tile.pth
  models/ControlNet/control_v11p_sd15_lineart.pth
      https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11p_sd15_lineart.pth
  models/Annotators/sk_model.pth
      https://huggingface.co/lllyasviel/Annotators/resolve/main/sk_model.pth
  models/textual_inversion/verybadimagenegative_v1.3.pt
      https://civitai.com/api/download/models/25820?type=Model&format=PickleTensor&size=full&fp=fp16
"""
import sys

import torch
from PIL import Image

from diffsynth import ControlNetConfigUnit, ModelManager, SDImagePipeline
from diffsynth.utils.model_files import require_model_files

CHECKPOINT = "models/stable_diffusion/flat2DAnimerge_v45Sharp.safetensors"
TILE = "models/ControlNet/control_v11f1e_sd15_tile.pth"
LINEART = "models/ControlNet/control_v11p_sd15_lineart.pth"

if len(sys.argv) < 3:
    raise SystemExit(__doc__)
source, output = sys.argv[1], sys.argv[2]
size = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
require_model_files({
    CHECKPOINT: "https://civitai.com/api/download/models/266360?type=Model&format=SafeTensor&size=pruned&fp=fp16",
    TILE: "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11f1e_sd15_tile.pth",
    LINEART: "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11p_sd15_lineart.pth",
    "models/Annotators/sk_model.pth": "https://huggingface.co/lllyasviel/Annotators/resolve/main/sk_model.pth",
    "models/textual_inversion/verybadimagenegative_v1.3.pt": "https://civitai.com/api/download/models/25820?type=Model&format=PickleTensor&size=full&fp=fp16",
})

model_manager = ModelManager()
model_manager.load_textual_inversions("models/textual_inversion")
model_manager.load_models([CHECKPOINT, LINEART, TILE])
pipe = SDImagePipeline.from_model_manager(
    model_manager,
    [
        ControlNetConfigUnit(processor_id="lineart", model_path=LINEART, scale=0.5),
        ControlNetConfigUnit(processor_id="tile", model_path=TILE, scale=0.5),
    ],
)

# Crop to a square and resize, as the video examples' frame loader does.
image = Image.open(source).convert("RGB")
side = min(image.size)
left, top = (image.width - side) // 2, (image.height - side) // 2
image = image.crop((left, top, left + side, top + side)).resize((size, size))

torch.manual_seed(0)
result = pipe(
    prompt="best quality, perfect anime illustration, light, a girl is dancing, smile, solo",
    negative_prompt="verybadimagenegative_v1.3",
    cfg_scale=3, clip_skip=2, controlnet_image=image, height=size, width=size, num_inference_steps=10,
)
result.save(output)
print(f"wrote {output}")
