"""Video re-rendering without AnimateDiff: depth + soft-edge ControlNets steer each frame and
cross-frame attention keeps frames consistent, as DiffSynth-Studio's example of the same name.
Its FastBlend smoother inside the denoising loop joins when FastBlend lands.

Usage: python examples/sd_video_rerender.py INPUT.mp4 [NUM_FRAMES]

Model files (paths relative to where you run the script):
  models/stable_diffusion/dreamshaper_8.safetensors
      https://civitai.com/api/download/models/128713?type=Model&format=SafeTensor&size=pruned&fp=fp16
  models/ControlNet/control_v11f1p_sd15_depth.pth
      https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11f1p_sd15_depth.pth
  models/ControlNet/control_v11p_sd15_softedge.pth
      https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11p_sd15_softedge.pth
  models/Annotators/dpt_hybrid-midas-501f0c75.pt
      https://huggingface.co/lllyasviel/Annotators/resolve/main/dpt_hybrid-midas-501f0c75.pt
  models/Annotators/ControlNetHED.pth
      https://huggingface.co/lllyasviel/Annotators/resolve/main/ControlNetHED.pth
"""
import sys

import torch

from diffsynth import ControlNetConfigUnit, ModelManager, SDVideoPipeline, VideoData, save_video
from diffsynth.utils.model_files import require_model_files

CHECKPOINT = "models/stable_diffusion/dreamshaper_8.safetensors"
DEPTH = "models/ControlNet/control_v11f1p_sd15_depth.pth"
SOFTEDGE = "models/ControlNet/control_v11p_sd15_softedge.pth"

if len(sys.argv) < 2:
    raise SystemExit(__doc__)
num_frames = int(sys.argv[2]) if len(sys.argv) > 2 else 128
require_model_files({
    CHECKPOINT: "https://civitai.com/api/download/models/128713?type=Model&format=SafeTensor&size=pruned&fp=fp16",
    DEPTH: "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11f1p_sd15_depth.pth",
    SOFTEDGE: "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11p_sd15_softedge.pth",
    "models/Annotators/dpt_hybrid-midas-501f0c75.pt": "https://huggingface.co/lllyasviel/Annotators/resolve/main/dpt_hybrid-midas-501f0c75.pt",
    "models/Annotators/ControlNetHED.pth": "https://huggingface.co/lllyasviel/Annotators/resolve/main/ControlNetHED.pth",
})

model_manager = ModelManager()
model_manager.load_models([CHECKPOINT, DEPTH, SOFTEDGE])
pipe = SDVideoPipeline.from_model_manager(
    model_manager,
    [
        ControlNetConfigUnit(processor_id="depth", model_path=DEPTH, scale=0.5),
        ControlNetConfigUnit(processor_id="softedge", model_path=SOFTEDGE, scale=0.5),
    ],
)

video = VideoData(video_file=sys.argv[1], height=512, width=768)
frames = video.range(0, min(num_frames, len(video)))  # lazy: frames are decoded when the pipeline reads them

torch.manual_seed(0)
output = pipe(
    prompt="winter, ice, snow, water, river", negative_prompt="", cfg_scale=7,
    input_frames=frames, controlnet_frames=frames, num_frames=len(frames),
    num_inference_steps=20, height=512, width=768,
    animatediff_batch_size=8, animatediff_stride=4, unet_batch_size=8, cross_frame_attention=True,
    output_folder="output/video_rerender",
)
save_video(output, "output/video_rerender/video.mp4", fps=30)
