"""Toon shading in plain Python (no runner config), as DiffSynth-Studio's example of the same name:
ModelManager + SDVideoPipeline with AnimateDiff, lineart + tile ControlNets fed the input video (no
image-to-image), then the RIFE smoother on the rendered frames. 60 frames (2400-2459) at 1024x1024,
10 steps, AnimateDiff windows of 32 with stride 16 (about 20 GB of VRAM).

Every per-frame artifact of the render goes to `output/toon_shading/` (pass --work-folder to move it),
so memory stays flat however many frames you render, and running the same command again after an
interruption continues where it stopped. The result is `output_video.mp4` at 60 fps.

Usage: python examples/sd_toon_shading.py [--video FILE] [--start N] [--frames N] [--size PIXELS]
                                         [--steps N] [--device cuda|cpu] [--output FILE] [--work-folder FOLDER]

Input video: data/examples/bilibili/BV19w411A7YJ.mp4 (https://www.bilibili.com/video/BV19w411A7YJ/).

Model files (paths relative to where you run the script; download each from its link):
  models/stable_diffusion/flat2DAnimerge_v45Sharp.safetensors
      https://civitai.com/api/download/models/266360?type=Model&format=SafeTensor&size=pruned&fp=fp16
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
  models/RIFE/flownet.pkl
      https://drive.google.com/file/d/1APIzVeI-4ZZCEuIRE1m6WYfSCaOsi_7_/view?usp=sharing
(The original also lists models/Annotators/sk_model2.pth, the coarse lineart model, which is not
used here: https://huggingface.co/lllyasviel/Annotators/resolve/main/sk_model2.pth)
"""
from __future__ import annotations

import argparse

import torch

from diffsynth import ControlNetConfigUnit, ModelManager, SDVideoPipeline, VideoData, save_video
from diffsynth.extensions.RIFE import RIFESmoother
from diffsynth.utils.model_files import require_model_files

CHECKPOINT = "models/stable_diffusion/flat2DAnimerge_v45Sharp.safetensors"
MOTION = "models/AnimateDiff/mm_sd_v15_v2.ckpt"
LINEART = "models/ControlNet/control_v11p_sd15_lineart.pth"
TILE = "models/ControlNet/control_v11f1e_sd15_tile.pth"
RIFE = "models/RIFE/flownet.pkl"
MODEL_FILES = {
    CHECKPOINT: "https://civitai.com/api/download/models/266360?type=Model&format=SafeTensor&size=pruned&fp=fp16",
    MOTION: "https://huggingface.co/guoyww/animatediff/resolve/main/mm_sd_v15_v2.ckpt",
    LINEART: "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11p_sd15_lineart.pth",
    TILE: "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11f1e_sd15_tile.pth",
    "models/Annotators/sk_model.pth": "https://huggingface.co/lllyasviel/Annotators/resolve/main/sk_model.pth",
    "models/textual_inversion/verybadimagenegative_v1.3.pt": "https://civitai.com/api/download/models/25820?type=Model&format=PickleTensor&size=full&fp=fp16",
    RIFE: "https://drive.google.com/file/d/1APIzVeI-4ZZCEuIRE1m6WYfSCaOsi_7_/view?usp=sharing",
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", default="data/examples/bilibili/BV19w411A7YJ.mp4", help="input video")
    parser.add_argument("--start", type=int, default=40 * 60, help="first frame (default 2400)")
    parser.add_argument("--frames", type=int, default=60, help="number of frames (default 60)")
    parser.add_argument("--size", type=int, default=1024, help="height and width, a multiple of 64 (default 1024)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: CUDA when available)")
    parser.add_argument("--output", default="output_video.mp4", help="the video written (default output_video.mp4)")
    parser.add_argument("--work-folder", default="output/toon_shading", help="where the per-frame files live (default output/toon_shading)")
    args = parser.parse_args(argv)
    require_model_files(MODEL_FILES)

    # Load models (fp16 on CUDA, fp32 on the CPU)
    model_manager = ModelManager(device=args.device)
    model_manager.load_textual_inversions("models/textual_inversion")
    model_manager.load_models([CHECKPOINT, MOTION, LINEART, TILE, RIFE])
    pipe = SDVideoPipeline.from_model_manager(
        model_manager,
        [
            ControlNetConfigUnit(processor_id="lineart", model_path=LINEART, scale=0.5),
            ControlNetConfigUnit(processor_id="tile", model_path=TILE, scale=0.5),
        ],
    )
    smoother = RIFESmoother.from_model_manager(model_manager)
    # To deflicker with FastBlend instead (no model file needed), use
    # diffsynth.processors.FastBlend.FastBlendSmoother(cache_folder=args.work_folder) and call it
    # as smoother(output_video, original_frames=input_video).

    # Load video: a lazy range, decoded (cropped and resized) when the pipeline reads each frame
    video = VideoData(video_file=args.video, height=args.size, width=args.size)
    input_video = video.range(args.start, args.start + args.frames)

    # Toon shading
    torch.manual_seed(0)
    output_video = pipe(
        prompt="best quality, perfect anime illustration, light, a girl is dancing, smile, solo",
        negative_prompt="verybadimagenegative_v1.3",
        cfg_scale=3, clip_skip=2,
        controlnet_frames=input_video, num_frames=len(input_video),
        num_inference_steps=args.steps, height=args.size, width=args.size,
        animatediff_batch_size=32, animatediff_stride=16,
        vram_limit_level=0,
        output_folder=args.work_folder,
    )
    output_video = smoother(output_video)

    # Save video (frames are streamed from the work folder through the smoother)
    save_video(output_video, args.output, fps=60)
    return output_video


if __name__ == "__main__":
    main()
