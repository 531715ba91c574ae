"""``SDImagePipeline``: Stable Diffusion 1.x text-to-image and image-to-image.

Semantics follow DiffSynth-Studio so a seed gives the same image: DDIM with the
``EnhancedDDIMScheduler`` timesteps, initial noise ``randn(1,4,h,w)`` drawn on the
CPU from the global RNG (or a given generator) — for img2img after the VAE
encode —, classifier-free guidance as two UNet passes
``ε = ε_neg + cfg·(ε_pos − ε_neg)``, and decoding
``uint8(clip(x/2 + 0.5, 0, 1)·255)`` (truncation).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..controlnets import Annotator, ControlNetConfigUnit, ControlNetUnit, MultiControlNetManager
from ..controlnets.units import fit_control_image
from ..models.model_manager import ModelManager
from ..models.sd_controlnet import SDControlNet
from ..progress import ProgressCallback, track
from ..prompts import SDPrompter
from ..schedulers import EnhancedDDIMScheduler
from ..schedulers.base import make_sampler

LATENT_FACTOR = 8


def check_size(height: int, width: int, multiple: int = LATENT_FACTOR) -> None:
    """Raise a ``ValueError`` naming the nearest valid size unless both sides are positive multiples of ``multiple``."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or value <= 0 or value % multiple:
            nearest = max(multiple, int(round(float(value) / multiple)) * multiple) if isinstance(value, (int, float, np.integer)) else multiple
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}; nearest valid: {nearest}")


def preprocess_image(image: Image.Image) -> torch.Tensor:
    """PIL RGB → ``(1, 3, H, W)`` float32 in [-1, 1] (``x·2/255 − 1``)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * (2 / 255) - 1


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` in [-1, 1] → PIL images, ``uint8(clip(x/2+0.5)·255)`` (truncation, as the original)."""
    x = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
    return [Image.fromarray(a) for a in x]


def draw_noise(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise drawn on the CPU in fp32, so a seed means the same noise on every device."""
    return torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")


class LatentImagePipeline:
    """What the SD and SDXL image pipelines share: device/dtype, the DDIM scheduler, the VAE ends."""

    def __init__(self, device: str | torch.device, torch_dtype: torch.dtype):
        self.device = torch.device(device)
        self.torch_dtype = torch_dtype
        self.scheduler = EnhancedDDIMScheduler()
        self.text_encoder = None
        self.unet = None
        self.vae_decoder = None
        self.vae_encoder = None

    def use_sampler(self, name: str) -> None:
        """Sample with ``name`` from now on (``diffsynth.schedulers``: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lcm)."""
        if getattr(self.scheduler, "name", None) != name:
            self.scheduler = make_sampler(name, beta_schedule=self.scheduler.beta_schedule)

    def encode_image(self, image: Image.Image, tiled: bool = False, tile_size: int = 64, tile_stride: int = 32) -> torch.Tensor:
        if self.vae_encoder is None:
            raise ValueError("img2img needs a VAE encoder, and the loaded checkpoint/VAE has none")
        x = preprocess_image(image).to(self.device, self.vae_encoder.dtype)
        return self.vae_encoder(x, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride).to(self.torch_dtype)

    def decode_image(self, latents: torch.Tensor, tiled: bool = False, tile_size: int = 64, tile_stride: int = 32) -> Image.Image:
        """Decode in the VAE's own dtype (the SDXL VAE stays float32 whatever the pipeline's dtype)."""
        latents = latents.to(self.device, self.vae_decoder.dtype)
        return tensor_to_images(self.vae_decoder(latents, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride))[0]


class SDImagePipeline(LatentImagePipeline):
    """Text-to-image / image-to-image with an SD 1.x model set from a ``ModelManager``."""

    def __init__(self, device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32):
        super().__init__(device, torch_dtype)
        self.prompter = SDPrompter()
        self.controlnet = None

    @staticmethod
    def from_model_manager(
        model_manager: ModelManager, controlnet_config_units: Sequence[ControlNetConfigUnit] = (), annotator_folder: str = "models/Annotators"
    ) -> "SDImagePipeline":
        """A pipeline over the manager's models; ControlNet units need their ControlNet files loaded in the manager."""
        pipe = SDImagePipeline(device=model_manager.device, torch_dtype=model_manager.torch_dtype)
        pipe.fetch_main_models(model_manager)
        pipe.fetch_prompter(model_manager)
        pipe.fetch_controlnet_models(model_manager, controlnet_config_units, annotator_folder)
        return pipe

    def fetch_controlnet_models(self, model_manager: ModelManager, units: Sequence[ControlNetConfigUnit], annotator_folder: str) -> None:
        self.controlnet = build_controlnet_manager(model_manager, units, annotator_folder)

    def fetch_main_models(self, model_manager: ModelManager) -> None:
        missing = [name for name in ("text_encoder", "unet", "vae_decoder") if not model_manager.has(name)]
        if missing:
            raise ValueError(
                f"the model manager lacks {', '.join(missing)} (loaded: {', '.join(sorted(model_manager.model)) or 'nothing'}): "
                "load a Stable Diffusion 1.x checkpoint (and a VAE file if the checkpoint has none) before building the pipeline"
            )
        if model_manager.unet.config.adm_in_channels is not None:
            raise ValueError(
                f"the UNet loaded from {model_manager.model_path.get('unet')} is an SDXL UNet: build SDXLImagePipeline.from_model_manager(mm) "
                "for SDXL and SDXL Turbo; SDImagePipeline is for Stable Diffusion 1.x"
            )
        self.text_encoder = model_manager.text_encoder
        self.unet = model_manager.unet
        self.vae_decoder = model_manager.vae_decoder
        self.vae_encoder = model_manager.model.get("vae_encoder")

    def fetch_prompter(self, model_manager: ModelManager) -> None:
        """Textual inversions, and the translator / BeautifulPrompt models when the manager holds them."""
        self.prompter.fetch_prompt_models(model_manager)
        for keyword, vectors in model_manager.textual_inversion_dict.items():
            ids = self.prompter.add_textual_inversion(keyword, vectors.shape[0])
            expected = model_manager.textual_inversion_ids.get(keyword)
            if expected is not None and list(ids) != list(expected):
                raise RuntimeError(
                    f"textual inversion {keyword!r}: tokenizer ids {ids} differ from the text encoder rows {expected}; "
                    "load textual inversions into a fresh ModelManager"
                )

    # ------------------------------------------------------------------ pieces
    def predict_noise(self, latents, timestep, prompt_emb, conditionings, tiled: bool, tile_size: int, tile_stride: int) -> torch.Tensor:
        """ε for ``latents``; ``conditionings`` ``(units, 1, 3, H, W)`` adds the ControlNet residuals."""
        tile = (tile_size, tile_stride) if tiled else None
        down = mid = None
        if conditionings is not None:
            down, mid = self.controlnet(latents, timestep, prompt_emb, conditionings, attention_tile=tile)
        return self.unet(latents, timestep, prompt_emb, down_residuals=down, mid_residual=mid, attention_tile=tile)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        cfg_scale: float = 7.5,
        clip_skip: int = 1,
        input_image: Image.Image | None = None,
        controlnet_image: Image.Image | None = None,
        denoising_strength: float = 1.0,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 20,
        tiled: bool = False,
        tile_size: int = 64,
        tile_stride: int = 32,
        progress_bar_cmd: Callable | None = tqdm,
        progress_bar_st=None,
        progress_callback: ProgressCallback | None = None,
        generator: torch.Generator | None = None,
        sampler: str = "ddim",
    ) -> Image.Image:
        """Render one image. ``progress_bar_st`` is accepted for compatibility; UIs pass ``progress_callback``.
        ``sampler``: ddim (the original's), euler, euler_a, dpmpp_2m, dpmpp_2m_karras or lcm."""
        latents = initial_latents(self, input_image, denoising_strength, num_inference_steps, height, width, tiled, tile_size, tile_stride, generator,
                                  sampler)

        prompt_emb_posi = self.prompter.encode_prompt(self.text_encoder, prompt, clip_skip=clip_skip, device=self.device, positive=True)
        prompt_emb_nega = None
        if cfg_scale != 1.0:
            prompt_emb_nega = self.prompter.encode_prompt(self.text_encoder, negative_prompt, clip_skip=clip_skip, device=self.device, positive=False)

        conditionings = None
        if controlnet_image is not None:
            if self.controlnet is None:
                raise ValueError("controlnet_image was given but the pipeline has no ControlNet units; pass controlnet_config_units to from_model_manager")
            image = fit_control_image(controlnet_image, width, height)
            conditionings = self.controlnet.process_image(image).unsqueeze(1)

        predict = lambda x, t, emb: self.predict_noise(x, t, emb, conditionings, tiled, tile_size, tile_stride)  # noqa: E731
        latents = denoise(self, latents, predict, prompt_emb_posi, prompt_emb_nega, cfg_scale, progress_bar_cmd, progress_callback, progress_bar_st,
                          generator)
        return self.decode_image(latents, tiled, tile_size, tile_stride)


def initial_latents(pipe, input_image: Image.Image | None, denoising_strength: float, num_inference_steps: int, height: int, width: int,
                    tiled: bool, tile_size: int, tile_stride: int, generator: torch.Generator | None, sampler: str = "ddim") -> torch.Tensor:
    """Choose ``pipe.scheduler`` (the ``sampler``), set its timesteps and return the starting latents of an image pipeline.

    Text-to-image: noise ``randn(1, 4, h, w)`` from the CPU RNG (or ``generator``): every sampler
    starts from it (``diffsynth.schedulers.base``: diffusers' noise times its initial sigma, in our
    convention). Image-to-image: the encoded ``input_image`` noised to the first step's level, the
    noise drawn after the encode (as the original, so a seed gives the original's image).
    """
    check_size(height, width)
    if not 0 < denoising_strength <= 1:
        raise ValueError(f"denoising_strength must be in (0, 1], got {denoising_strength}")
    pipe.use_sampler(sampler)
    pipe.scheduler.set_timesteps(num_inference_steps, denoising_strength)
    shape = (1, 4, height // LATENT_FACTOR, width // LATENT_FACTOR)
    if input_image is None:
        return draw_noise(shape, generator).to(pipe.device, pipe.torch_dtype)
    if input_image.size != (width, height):
        raise ValueError(
            f"input_image is {input_image.size[0]}x{input_image.size[1]} but width x height is {width}x{height}; "
            "resize the image or pass its size"
        )
    latents = pipe.encode_image(input_image, tiled, tile_size, tile_stride)
    noise = draw_noise(shape, generator).to(pipe.device, pipe.torch_dtype)
    return pipe.scheduler.add_noise(latents, noise, pipe.scheduler.timesteps[0])


def denoise(pipe, latents: torch.Tensor, predict: Callable, positive, negative, cfg_scale: float,
            progress_bar_cmd: Callable | None, progress_callback: ProgressCallback | None, progress_bar_st=None,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """The sampling loop of an image pipeline: ``predict(latents, t, prompt)`` per timestep, classifier-free
    guidance as two passes (one when ``negative`` is None, i.e. ``cfg_scale == 1``).

    A multistep sampler gets the previous step's x0 prediction; a stochastic one fresh noise each step,
    drawn on the CPU from ``generator`` (the global RNG without one) after the step's model calls, as
    diffusers draws it: a seed gives diffusers' image with the same scheduler.
    """
    sampler = pipe.scheduler
    timesteps = sampler.timesteps
    previous = None
    for timestep in track(timesteps, "denoising", len(timesteps), progress_bar_cmd, progress_callback):
        t = timestep.to(pipe.device)
        noise_pred = predict(latents, t, positive)
        if negative is not None:
            noise_nega = predict(latents, t, negative)
            noise_pred = noise_nega + cfg_scale * (noise_pred - noise_nega)
        noise = draw_noise(tuple(latents.shape), generator).to(latents.device, latents.dtype) if sampler.needs_noise else None
        current = sampler.x0(noise_pred, timestep, latents) if sampler.needs_previous else None
        latents = sampler.step(noise_pred, timestep, latents, previous=previous, noise=noise)
        previous = current
        if progress_bar_st is not None:
            progress_bar_st.progress(float((timesteps == timestep).nonzero()[0, 0] + 1) / len(timesteps))
    return latents


def build_controlnet_manager(model_manager: ModelManager, units: Sequence[ControlNetConfigUnit], annotator_folder: str) -> MultiControlNetManager | None:
    """``MultiControlNetManager`` for the config units (annotators on the manager's device, fp32), or None without units."""
    built = []
    for unit in units:
        model = model_manager.get_model_with_model_path(unit.model_path)
        if not isinstance(model, SDControlNet):
            raise ValueError(
                f"ControlNet unit {unit.processor_id!r}: {unit.model_path} was loaded as a {type(model).__name__}, not a ControlNet; "
                "give the path of a ControlNet file (e.g. models/ControlNet/control_v11p_sd15_lineart.pth)"
            )
        annotator = Annotator(unit.processor_id, model_path=annotator_folder, device=model_manager.device)
        built.append(ControlNetUnit(annotator, model, unit.scale))
    return MultiControlNetManager(built) if built else None
