"""Which kind of model a state dict holds: a fingerprint table.

A fingerprint is a set of key patterns that must all be present and a set that
must be absent. A state dict matches exactly one fingerprint or none; the
test suite checks that no two fingerprints accept the same tiny file. File
names never matter to the family; the LCM section at the end is the one place a
name is read, and says why.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

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
        "AnimateDiff motion module (v1: mm_sd_v15.ckpt, v2: mm_sd_v15_v2.ckpt; AnimateLCM_sd15_t2v.ckpt)",
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
    # Kohya names (lora_unet_*, lora_te_*, lora_te1_*/lora_te2_* in SDXL files) or the diffusers/PEFT
    # layouts (unet.*, text_encoder.*, text_encoder_2.* with lora_A/lora_B, lora.down/lora.up or
    # lora_linear_layer.down/up); lora.py documents where each comes from.
    Fingerprint(
        "lora",
        "LoRA (kohya/civitai, diffusers or PEFT format)",
        required=(
            r"^(lora_(unet|te[12]?)_[^.]*\.lora_(up|down)\.weight"
            r"|(unet|text_encoder(_2)?)\..+\.(lora_[AB]\.weight|lora\.(up|down)\.weight|lora_linear_layer\.(up|down)\.weight))$",
        ),
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


# --------------------------------------------------------------------------- LCM models
#
# The "lcm" sampler needs a model distilled for it. Which model files are LCM models:
#
# * AnimateLCM's motion module (wangfuyun/AnimateLCM AnimateLCM_sd15_t2v.ckpt) is recognised by
#   content: the AnimateDiff v2 key layout (a middle-block module) without any positional table,
#   because AnimateLCM computes a 64-position sinusoid instead of storing it (G-U-N/AnimateLCM,
#   animatelcm/models/motion_module.py, PositionalEncoding: max_length = 64). The AnimateDiff
#   loaders tell it apart the same way: sd-webui-animatediff's MotionModuleType.get_mm_type
#   ("mid_block" keys and no "pe" key -> AnimateLCM, 64 positions) and
#   ComfyUI-AnimateDiff-Evolved's is_animatelcm (no "pos_encoder" key -> AnimateLCM, 64).
# * The LCM-LoRAs (latent-consistency/lcm-lora-sdv1-5, lcm-lora-sdxl) and AnimateLCM's LoRA are
#   ordinary LoRA files: nothing in their tensors or safetensors metadata marks them as LCM
#   (diffusers' LCM scripts write rank-64 UNet LoRAs over the same module kinds a kohya LoCon
#   trains, and save with {"format": "pt"} metadata only). They are recognised by the names the
#   download catalogue (diffsynth/download.py) saves them under, and only when the file is a LoRA.
#   A checkpoint with an LCM-LoRA merged into it cannot be recognised at all.

ANIMATELCM_POSITIONS = 64  # AnimateLCM's PositionalEncoding max_length

_MM_PROJ_IN = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.motion_modules\.\d+\.temporal_transformer\.proj_in\.weight$")


@dataclass(frozen=True)
class LCMFile:
    """A known LCM model file: ``kind``, the catalogue ``filename``, the model family it is for and its role."""

    kind: str
    filename: str
    family: str  # "sd1" or "sdxl"
    role: str  # "lora" or "motion_module"
    description: str


LCM_FILES: tuple[LCMFile, ...] = (
    LCMFile("lcm_lora_sd15", "lcm-lora-sdv1-5.safetensors", "sd1", "lora", "the LCM-LoRA for SD 1.5"),
    LCMFile("lcm_lora_sdxl", "lcm-lora-sdxl.safetensors", "sdxl", "lora", "the LCM-LoRA for SDXL"),
    LCMFile("animatelcm_lora", "AnimateLCM_sd15_t2v_lora.safetensors", "sd1", "lora", "AnimateLCM's LoRA"),
    LCMFile("animatelcm_motion_module", "AnimateLCM_sd15_t2v.ckpt", "sd1", "motion_module", "AnimateLCM's motion module"),
)

_LCM_FAMILIES = {"sd1": "sd1", "sd15": "sd1", "sd1_checkpoint": "sd1", "sdxl": "sdxl", "sdxl_checkpoint": "sdxl"}


def is_animatelcm_motion_module(keys: Iterable[str]) -> bool:
    """True for AnimateLCM's motion module: AnimateDiff layout with a middle-block module and no ``pos_encoder`` keys."""
    keys = list(keys)
    return (
        any(_MM_PROJ_IN.match(k) for k in keys)
        and any(k.startswith("mid_block.motion_modules.") for k in keys)
        and not any(".pos_encoder." in k for k in keys)
    )


def lcm_file_kind(path: str, header: Iterable[str] | None = None) -> str | None:
    """Which LCM model ``path`` is (``LCMFile.kind``), or None; see the notes above for how each is recognised.

    ``header``: the file's tensor names when already read (else only the header is read).
    A missing path or a folder is not an LCM file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    if header is None:
        from .state_dict import read_header  # detection itself needs no file access; this helper does

        header = read_header(path)
    keys = list(header)
    if is_animatelcm_motion_module(keys):
        return "animatelcm_motion_module"
    name = os.path.basename(path).lower()
    entry = next((f for f in LCM_FILES if f.role == "lora" and f.filename.lower() == name), None)
    if entry is not None and any(f.family == "lora" for f in FINGERPRINTS if f.matches(keys)):
        return entry.kind
    return None


def lcm_files(paths: Iterable[str], headers: Mapping[str, Iterable[str]] | None = None) -> list[str]:
    """The paths among ``paths`` (in order) that are LCM models: an LCM-LoRA, AnimateLCM's LoRA or motion module.

    ``headers`` maps paths to tensor names already read (the pre-flight checks keep them).
    """
    headers = headers or {}
    return [p for p in paths if lcm_file_kind(p, headers.get(p)) is not None]


def lcm_missing_message(family_sd: str, *, video: bool = False, models_dir: str = "models") -> str:
    """The warning for LCM sampling without an LCM model: which file to download, from where, and where to put it.

    ``family_sd``: ``"sd1"`` (also ``"sd15"``, ``"sd1_checkpoint"``) or ``"sdxl"`` (``"sdxl_checkpoint"``);
    ``video``: also name AnimateLCM (SD 1.5 only), made for AnimateDiff video.
    """
    family = _LCM_FAMILIES.get(family_sd)
    if family is None:
        raise ValueError(f"family_sd must be one of {', '.join(_LCM_FAMILIES)}, got {family_sd!r}")
    from ..download import CATALOGUE  # the catalogue holds the links; models do not otherwise depend on it

    def where(kind: str) -> tuple[str, str, str]:
        entry = CATALOGUE[next(f.filename for f in LCM_FILES if f.kind == kind)]
        return entry.filename, entry.url, os.path.join(models_dir, entry.folder) + os.sep

    lora_name, lora_url, lora_dir = where("lcm_lora_sd15" if family == "sd1" else "lcm_lora_sdxl")
    model = "SD 1.5" if family == "sd1" else "SDXL"
    text = (
        f"The LCM sampler needs an LCM model, and none of the model files is one. Download the LCM-LoRA for {model}, "
        f"{lora_name}, from {lora_url}, put it in {lora_dir} under that name (Hugging Face calls it "
        f"pytorch_lora_weights.safetensors; the name is how it is recognised) and add it to the model list after the "
        f"checkpoint with LoRA strength 1.0. `diffsynth download {lora_name} --to {models_dir}` does the download and the naming."
    )
    if video and family == "sd1":
        mm_name, mm_url, mm_dir = where("animatelcm_motion_module")
        al_name, al_url, al_dir = where("animatelcm_lora")
        text += (
            f" For AnimateDiff video, AnimateLCM is made for this sampler: its motion module {mm_name} from {mm_url} in "
            f"{mm_dir} in place of the motion module, with its LoRA {al_name} from {al_url} in {al_dir}."
        )
    return text + " (A checkpoint with an LCM-LoRA merged into it cannot be recognised; if yours is one, ignore this.)"


def lcm_warning(
    paths: Iterable[str], family_sd: str, *, video: bool = False, models_dir: str = "models", headers: Mapping[str, Iterable[str]] | None = None
) -> str | None:
    """:func:`lcm_missing_message` when no file of ``paths`` is an LCM model, else None."""
    return None if lcm_files(paths, headers) else lcm_missing_message(family_sd, video=video, models_dir=models_dir)
