"""The Image Creator's engine side: model types, one loaded model per browser session, generation with progress."""
from __future__ import annotations

import gc
import io
import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..progress import ProgressEvent


@dataclass(frozen=True)
class ModelType:
    folder: str  # under the models root
    pipeline: str  # class name in diffsynth.pipelines
    fixed: dict = field(default_factory=dict)  # call arguments the type fixes (their widgets are hidden)


MODEL_TYPES = {
    "Stable Diffusion": ModelType("stable_diffusion", "SDImagePipeline"),
    "Stable Diffusion XL": ModelType("stable_diffusion_xl", "SDXLImagePipeline"),
    # SDXL Turbo is distilled for one step without guidance at 512x512 (as the original page fixed it).
    "Stable Diffusion XL Turbo": ModelType(
        "stable_diffusion_xl_turbo", "SDXLImagePipeline",
        {"negative_prompt": "", "cfg_scale": 1.0, "num_inference_steps": 1, "height": 512, "width": 512},
    ),
}


def pipeline_class(name: str):
    """The pipeline class ``diffsynth.pipelines.<name>``; a clear error if this install has none."""
    from .. import pipelines

    cls = getattr(pipelines, name, None)
    if cls is None:
        raise ValueError(f"this version of diffsynth has no {name} (diffsynth.pipelines lacks it); choose another model type")
    return cls


class ImageModels:
    """The one model set a browser session has loaded: loaded when first needed, kept across reruns,
    released (moved off the GPU, dropped) when the session switches to another file, type or device."""

    def __init__(self):
        self.key: tuple | None = None
        self.model_manager = None
        self.pipeline = None

    def pipeline_for(self, model_type: str, path: str, device: str):
        key = (model_type, path, device)
        if key != self.key:
            self.release()
            from ..models.model_manager import ModelManager

            manager = ModelManager(device=device)
            manager.load_model(path)
            self.pipeline = pipeline_class(MODEL_TYPES[model_type].pipeline).from_model_manager(manager)
            self.model_manager, self.key = manager, key
        return self.pipeline

    def release(self) -> None:
        if self.model_manager is not None:
            self.model_manager.to("cpu")  # empties the CUDA cache too
        self.key = self.model_manager = self.pipeline = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def step_progress(update: Callable[[float, str], None], label: str) -> Callable[[ProgressEvent], None]:
    """An engine progress callback that drives a UI bar: ``update(fraction, text)`` after every step."""

    def callback(event: ProgressEvent) -> None:
        fraction = event.done / event.total if event.total else 1.0
        update(fraction, f"{label}: {event.stage} {event.done}/{event.total}")

    return callback


@dataclass
class ImageRequest:
    prompt: str
    negative_prompt: str = ""
    cfg_scale: float = 7.5
    num_inference_steps: int = 20
    height: int = 512
    width: int = 512
    num_images: int = 2
    seed: int | None = 0  # None: a random seed per image
    input_image: Image.Image | None = None
    denoising_strength: float = 0.7
    repetition: int = 1
    sampler: str = "ddim"  # diffsynth.schedulers: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lcm


def plan_seeds(request: ImageRequest) -> list[int]:
    """Seed ``seed + i`` for image i (fixed), or a fresh random seed per image."""
    total = request.num_images * (request.repetition if request.input_image is not None else 1)
    if request.seed is None:
        return [random.randrange(0, 10**9) for _ in range(total)]
    return [request.seed + i for i in range(total)]


def generate(pipe, request: ImageRequest, fixed: dict, progress: Callable[[int], Callable[[ProgressEvent], None]] | None = None) -> list[tuple[Image.Image, int]]:
    """``num_images`` images, then with an input image ``repetition - 1`` more rounds, each one's input the
    image ``num_images`` before it (img2img chaining, as the original). Returns ``(image, seed)`` pairs.
    ``progress(i)`` gives the callback for image i. Without an input image the strength is 1 (text-to-image)."""
    seeds = plan_seeds(request)
    args = dict(prompt=request.prompt, negative_prompt=request.negative_prompt, cfg_scale=request.cfg_scale,
                num_inference_steps=request.num_inference_steps, height=request.height, width=request.width, sampler=request.sampler)
    args.update(fixed)
    outputs: list[tuple[Image.Image, int]] = []
    for i, seed in enumerate(seeds):
        source = request.input_image if i < request.num_images else outputs[i - request.num_images][0]
        if source is not None:
            source = source.convert("RGB").resize((args["width"], args["height"]), Image.LANCZOS)
        torch.manual_seed(seed)  # the pipelines draw their noise on the CPU from the global RNG: same seed, same image on any device
        image = pipe(**args, input_image=source, denoising_strength=request.denoising_strength if source is not None else 1.0,
                     progress_bar_cmd=None, progress_callback=progress(i) if progress is not None else None)
        outputs.append((image, seed))
    return outputs


def compose_drawing(image: Image.Image, rgba: np.ndarray | None) -> Image.Image:
    """The canvas strokes (``H x W x 4`` uint8, any size) alpha-composited over ``image``: ``rgb·α + image·(1−α)``."""
    if rgba is None or rgba.size == 0 or not rgba[..., 3].any():
        return image
    strokes = Image.fromarray(np.ascontiguousarray(rgba, dtype=np.uint8), "RGBA").resize(image.size, Image.LANCZOS)
    return Image.alpha_composite(image.convert("RGBA"), strokes).convert("RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
