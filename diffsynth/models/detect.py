"""Which kind of model a state dict holds: a fingerprint table.

A fingerprint is a set of key patterns that must all be present and a set that
must be absent. A state dict matches exactly one fingerprint or none; the
test suite checks that no two fingerprints accept the same tiny file. File
names never matter.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from .errors import ModelFileError


@dataclass(frozen=True)
class Fingerprint:
    family: str
    description: str
    required: tuple[str, ...]
    forbidden: tuple[str, ...] = ()
    supported: bool = True
    note: str = ""

    def matches(self, keys: Iterable[str]) -> bool:
        keys = list(keys)
        return all(any(re.search(p, k) for k in keys) for p in self.required) and not any(
            re.search(p, k) for p in self.forbidden for k in keys
        )


_SD_UNET = r"^model\.diffusion_model\.input_blocks\.0\.0\.weight$"
_SDXL_LABEL_EMB = r"^model\.diffusion_model\.label_emb\.0\.0\.weight$"
_REFINER_LEVEL = r"^model\.diffusion_model\.input_blocks\.9\."
_CLIP_L = r"^cond_stage_model\.transformer\.(text_model\.)?embeddings\.token_embedding\.weight$"

FINGERPRINTS: tuple[Fingerprint, ...] = (
    Fingerprint(
        "sd1_checkpoint",
        "Stable Diffusion 1.x checkpoint (single file: UNet, and usually VAE and CLIP text encoder)",
        required=(_SD_UNET,),
        forbidden=(r"^conditioner\.", r"^cond_stage_model\.model\.", r"^model\.diffusion_model\.label_emb\.", r"^control_model\."),
    ),
    Fingerprint(
        "sd2_checkpoint",
        "Stable Diffusion 2.x checkpoint (OpenCLIP text encoder)",
        required=(_SD_UNET, r"^cond_stage_model\.model\."),
        supported=False,
        note="Stable Diffusion 2.x is not supported; use an SD 1.x or SDXL checkpoint.",
    ),
    # SDXL base and Turbo share one layout: a 3-level UNet with the add embedding (label_emb),
    # CLIP-L under conditioner.embedders.0 and OpenCLIP bigG under conditioner.embedders.1.
    Fingerprint(
        "sdxl_checkpoint",
        "Stable Diffusion XL base/Turbo checkpoint",
        required=(_SD_UNET, _SDXL_LABEL_EMB),
        forbidden=(r"^cond_stage_model\.", r"^conditioner\.embedders\.0\.model\.", _REFINER_LEVEL, r"^control_model\."),
    ),
    # The refiner: bigG alone under conditioner.embedders.0, and a 4-level UNet (input_blocks.9 exists;
    # SDXL base has input blocks 0-8 only), so UNet-only refiner exports are recognised too.
    Fingerprint(
        "sdxl_refiner",
        "Stable Diffusion XL refiner checkpoint",
        required=(_SD_UNET, _SDXL_LABEL_EMB, _REFINER_LEVEL),
        supported=False,
        note="The SDXL refiner is not supported (it is a second-stage img2img model with its own text conditioning); "
        "use an SDXL base or SDXL Turbo checkpoint.",
    ),
    Fingerprint(
        "vae",
        "Stable Diffusion VAE (LDM layout)",
        required=(r"^(first_stage_model\.)?(encoder|decoder)\.conv_in\.weight$",),
        forbidden=(r"^model\.diffusion_model\.", r"^(encoder|decoder)\.(down|up)_blocks\.", r"^control_model\."),
    ),
    Fingerprint(
        "vae_diffusers",
        "Stable Diffusion VAE (diffusers layout)",
        required=(r"^(encoder|decoder)\.conv_in\.weight$", r"^(encoder\.down|decoder\.up)_blocks\."),
    ),
    Fingerprint(
        "unet_diffusers",
        "Stable Diffusion UNet (diffusers layout)",
        required=(r"^time_embedding\.linear_1\.weight$", r"^down_blocks\.0\.resnets\.0\.conv1\.weight$", r"^conv_in\.weight$"),
        forbidden=(r"^controlnet_", r"motion_modules\."),
    ),
    Fingerprint(
        "clip_text",
        "CLIP text encoder (Hugging Face layout)",
        required=(r"^(text_model\.)?embeddings\.token_embedding\.weight$", r"^(text_model\.)?encoder\.layers\.0\.self_attn\.q_proj\.weight$"),
        forbidden=(r"^cond_stage_model\.", r"^conditioner\."),
    ),
    Fingerprint(
        "controlnet",
        "ControlNet (v1.x layout, e.g. lllyasviel's control_v11*.pth)",
        required=(r"^(control_model\.)?input_hint_block\.0\.weight$",),
    ),
    Fingerprint(
        "controlnet_diffusers",
        "ControlNet (diffusers layout)",
        required=(r"^controlnet_cond_embedding\.conv_in\.weight$",),
    ),
    Fingerprint(
        "motion_module",
        "AnimateDiff motion module (v1: mm_sd_v15.ckpt, v2: mm_sd_v15_v2.ckpt)",
        required=(r"^down_blocks\.0\.motion_modules\.0\.temporal_transformer\.proj_in\.weight$",),
    ),
    Fingerprint(
        "rife",
        "RIFE frame interpolation model (flownet.pkl)",
        required=(r"^(module\.)?block_tea\.convblock3\.0\.1\.weight$", r"^(module\.)?block0\.conv0\.0\.0\.weight$"),
    ),
    # Weight files inside Hugging Face folders; the folder (config.json, tokenizer) is what loads.
    Fingerprint(
        "translator",
        "MarianMT translation model (weights of a Hugging Face folder such as opus-mt-zh-en)",
        required=(r"^model\.encoder\.layers\.0\.self_attn_layer_norm\.weight$", r"^model\.decoder\.layers\.0\.encoder_attn\.k_proj\.weight$"),
    ),
    Fingerprint(
        "beautiful_prompt",
        "BeautifulPrompt BLOOM language model (weights of a Hugging Face folder such as pai-bloom-1b1-text2prompt-sd)",
        required=(r"^(transformer\.)?h\.0\.self_attention\.query_key_value\.weight$", r"^(transformer\.)?word_embeddings_layernorm\.weight$"),
    ),
    Fingerprint(
        "lora",
        "LoRA (kohya/civitai format)",
        required=(r"^lora_(unet|te)_.*\.lora_(up|down)\.weight$",),
    ),
    Fingerprint(
        "textual_inversion",
        "Textual inversion embedding (A1111 / diffusers)",
        required=(r"^(string_to_param\.|emb_params$|clip_[lg]$)",),
        forbidden=(r"^model\.diffusion_model\.", r"^lora_"),
    ),
)


def _prefix_summary(keys: list[str], n: int = 8) -> str:
    counts = Counter(".".join(k.split(".")[:2]) for k in keys)
    return ", ".join(f"{p}.* ({c})" for p, c in counts.most_common(n)) or "no keys at all"


def detect(keys: Iterable[str], source: str = "<state dict>") -> Fingerprint:
    """The one fingerprint these keys match; ``ModelFileError`` naming what was found otherwise."""
    keys = list(keys)
    hits = [f for f in FINGERPRINTS if f.matches(keys)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ModelFileError(
            source,
            f"is not a model this program knows (it matches no known layout; its keys start with: {_prefix_summary(keys)}).",
            "Check that the file is a Stable Diffusion 1.x or SDXL checkpoint, VAE, LoRA or embedding, and that it is complete.",
        )
    raise ModelFileError(
        source,
        f"matches several model layouts ({', '.join(h.family for h in hits)}).",
        "This is a bug in the fingerprint table; please report it with the file's key list (`diffsynth info`).",
    )
