"""``SDXLImagePipeline``: Stable Diffusion XL and SDXL Turbo text-to-image and image-to-image.

Semantics follow DiffSynth-Studio's SDXL pipeline (upstream_spec §6.4) so a seed gives the
same image, and the SD pipeline's conventions otherwise: DDIM with the
``EnhancedDDIMScheduler`` timesteps, initial noise ``randn(1, 4, h, w)`` drawn on the CPU from
the global RNG (or a given generator), for img2img after the VAE encode; classifier-free
guidance as two UNet passes (one pass when ``cfg_scale == 1``); the UNet's added condition
from the pooled text embedding and ``[H, W, 0, 0, H, W]``; VAE in float32 (the manager loads
the SDXL VAE in float32; decoding follows the VAE's own dtype).

SDXL Turbo (adversarial diffusion distillation, Sauer et al. 2023, arXiv 2311.17042) is
sampled with ``num_inference_steps=1, cfg_scale=1``: the schedule is then the single
timestep 999 (``ddim_timesteps``), and the DDIM step from there goes straight to the
predicted clean latent (alpha 1), which is the "trailing" one-step sampling Turbo was
distilled for. Image-to-image with Turbo starts at ``round(1000·strength) − 1``
(strength 0.7 → t = 699) and likewise ends at the clean latent.
"""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from tqdm import tqdm

from ..models.model_manager import ModelManager
from ..models.sdxl_text_encoder import SDXLTextEncoder, SDXLTextEncoder2
from ..models.sdxl_unet import add_time_ids, is_sdxl_unet_config, sdxl_added_condition
from ..progress import ProgressCallback
from ..prompts import SDXLPrompter
from .sd_image import LatentImagePipeline, denoise, initial_latents


class SDXLImagePipeline(LatentImagePipeline):
    """Text-to-image / image-to-image with an SDXL (base or Turbo) model set from a ``ModelManager``."""

    def __init__(self, device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32):
        super().__init__(device, torch_dtype)
        self.prompter = SDXLPrompter()
        self.text_encoder_2 = None

    @staticmethod
    def from_model_manager(model_manager: ModelManager) -> "SDXLImagePipeline":
        """A pipeline over the manager's SDXL models (an SDXL base or Turbo checkpoint must be loaded)."""
        pipe = SDXLImagePipeline(device=model_manager.device, torch_dtype=model_manager.torch_dtype)
        pipe.fetch_main_models(model_manager)
        pipe.fetch_prompter(model_manager)
        return pipe

    def fetch_main_models(self, model_manager: ModelManager) -> None:
        loaded = ", ".join(sorted(model_manager.model)) or "nothing"
        missing = [name for name in ("text_encoder", "text_encoder_2", "unet", "vae_decoder") if not model_manager.has(name)]
        if missing:
            raise ValueError(
                f"the model manager lacks {', '.join(missing)} (loaded: {loaded}): load an SDXL base or SDXL Turbo checkpoint "
                "(e.g. models/stable_diffusion_xl/sd_xl_base_1.0.safetensors) before building SDXLImagePipeline"
            )
        unet, text_encoder, text_encoder_2 = model_manager.unet, model_manager.text_encoder, model_manager.text_encoder_2
        if not is_sdxl_unet_config(unet.config) or not isinstance(text_encoder, SDXLTextEncoder) or not isinstance(text_encoder_2, SDXLTextEncoder2):
            raise ValueError(
                f"the loaded models are not an SDXL set (UNet from {model_manager.model_path.get('unet')}, text encoder "
                f"{type(text_encoder).__name__}): SDXLImagePipeline needs an SDXL base/Turbo checkpoint; for SD 1.x use SDImagePipeline"
            )
        self.text_encoder, self.text_encoder_2, self.unet = text_encoder, text_encoder_2, unet
        self.vae_decoder = model_manager.vae_decoder
        self.vae_encoder = model_manager.model.get("vae_encoder")

    def fetch_prompter(self, model_manager: ModelManager) -> None:
        """Register the manager's textual inversions; their token ids must address the rows appended to both encoders."""
        for keyword, vectors in model_manager.textual_inversion_dict.items():
            ids = self.prompter.add_textual_inversion(keyword, vectors.shape[0])
            for rows in (model_manager.textual_inversion_ids.get(keyword), model_manager.textual_inversion_ids_2.get(keyword)):
                if rows is None or list(rows) != list(ids):
                    raise RuntimeError(
                        f"textual inversion {keyword!r}: tokenizer ids {ids} differ from the text encoder rows {rows}; "
                        "load textual inversions into a fresh ModelManager, together with the SDXL checkpoint"
                    )
        self.prompter.fetch_prompt_models(model_manager)

    # ------------------------------------------------------------------ pieces
    def encode_prompt(self, prompt: str, clip_skip: int, clip_skip_2: int, positive: bool, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(context (1, 77k, 2048), added condition (1, adm))`` for one prompt at one size."""
        pooled, context = self.prompter.encode_prompt(
            self.text_encoder, self.text_encoder_2, prompt, clip_skip=clip_skip, clip_skip_2=clip_skip_2, positive=positive, device=self.device
        )
        added = sdxl_added_condition(pooled, add_time_ids(height, width), self.unet.config)
        return context.to(self.torch_dtype), added.to(self.device, self.torch_dtype)

    def predict_noise(self, latents, timestep, prompt, tiled: bool, tile_size: int, tile_stride: int) -> torch.Tensor:
        context, added = prompt
        return self.unet(latents, timestep, context, y=added, attention_tile=(tile_size, tile_stride) if tiled else None)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        cfg_scale: float = 7.5,
        clip_skip: int = 1,
        clip_skip_2: int = 2,
        input_image: Image.Image | None = None,
        denoising_strength: float = 1.0,
        height: int = 1024,
        width: int = 1024,
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
        """Render one image (``sampler``: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lcm). ``clip_skip`` applies to the CLIP-L encoder (1 = its penultimate layer),
        ``clip_skip_2`` to the bigG encoder (2 = penultimate). SDXL Turbo: ``num_inference_steps=1,
        cfg_scale=1`` at 512×512. ``tiled`` runs the attention layers and the VAE by tiles (2048² and
        up). ``progress_bar_st`` is accepted for compatibility; UIs pass ``progress_callback``."""
        latents = initial_latents(self, input_image, denoising_strength, num_inference_steps, height, width, tiled, tile_size, tile_stride, generator,
                                  sampler)

        prompt_posi = self.encode_prompt(prompt, clip_skip, clip_skip_2, True, height, width)
        prompt_nega = None
        if cfg_scale != 1.0:
            prompt_nega = self.encode_prompt(negative_prompt, clip_skip, clip_skip_2, False, height, width)

        predict = lambda x, t, emb: self.predict_noise(x, t, emb, tiled, tile_size, tile_stride)  # noqa: E731
        latents = denoise(self, latents, predict, prompt_posi, prompt_nega, cfg_scale, progress_bar_cmd, progress_callback, progress_bar_st,
                          generator)
        return self.decode_image(latents, tiled, tile_size, tile_stride)
