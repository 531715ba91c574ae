"""``ModelManager``: find out what each model file is, load it, hold the models.

API-compatible with DiffSynth-Studio's manager (``load_models``,
``load_textual_inversions``, ``get_model_with_model_path``, ``to``, attribute
access ``mm.unet``), with its traps fixed: files are recognised by fingerprint
(keys and shapes, never names), unknown files raise instead of being ignored,
the caller's ``lora_alphas`` list is not consumed, text-encoder LoRA is
applied, textual inversions may be loaded before or after the checkpoint, and
pickles are read with ``weights_only=True``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable

import torch
from torch import nn

from . import convert
from .detect import ANIMATELCM_POSITIONS, Fingerprint, detect, is_animatelcm_motion_module
from .errors import ModelFileError
from .convert_controlnet import controlnet_config_from_diffusers, convert_controlnet_from_diffusers, split_controlnet_checkpoint
from .loading import infer_config, instantiate
from .lora import apply_lora, load_lora
from .sd_controlnet import SDControlNet, infer_controlnet_config
from .sd_motion import build_motion_model, sinusoid_table
from .sd_text_encoder import SDTextEncoder, infer_clip_text_config
from .sd_unet import SDUNet, infer_unet_config
from .sd_vae import SDVAEDecoder, SDVAEEncoder, infer_vae_config
from .sdxl_text_encoder import SDXLTextEncoder, SDXLTextEncoder2, convert_open_clip_text_to_hf, convert_text_encoder_2_from_hf, infer_text_encoder_2_config
from .sdxl_unet import SDXL_VAE_SCALING_FACTOR, SDXLUNet, SDXLVAEDecoder, SDXLVAEEncoder, is_sdxl_unet_config
from ..utils.device import default_device
from .state_dict import load_state_dict, read_header
from .textual_inversion import folder_holds_sdxl_embeddings, load_textual_inversions, load_textual_inversions_sdxl

logger = logging.getLogger("diffsynth")

SD_COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
SDXL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")

_DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
    "pytorch_model.bin",
    "pytorch_model.fp16.bin",
)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp16 on CUDA (as DiffSynth-Studio), fp32 elsewhere (fp16 convolutions are slow or missing on CPUs)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def read_keys(path: str) -> list[str]:
    """Tensor names of a model file, reading only its header where the format allows."""
    return list(read_header(path))


class ModelManager:
    """Loads model files and keeps the models by component name.

    ``torch_dtype``/``device`` default to fp16 on CUDA when a GPU is present and
    fp32 on the CPU otherwise. Loaded models live in ``self.model`` and are
    reachable as attributes (``mm.unet``); ``self.model_path`` records where
    each came from.
    """

    def __init__(self, torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None):
        self.device = str(device) if device is not None else default_device()
        self.torch_dtype = torch_dtype if torch_dtype is not None else default_dtype(self.device)
        self.model: dict[str, Any] = {}
        self.model_path: dict[str, Any] = {}
        self.textual_inversion_dict: dict[str, torch.Tensor] = {}
        self.textual_inversion_ids: dict[str, list[int]] = {}
        # SDXL embeddings: the clip_l halves are in textual_inversion_dict, the clip_g halves here.
        self.textual_inversion_dict_2: dict[str, torch.Tensor] = {}
        self.textual_inversion_ids_2: dict[str, list[int]] = {}
        self.textual_inversion_folder: str | None = None

    # ------------------------------------------------------------------ access
    def __getattr__(self, name: str) -> Any:
        model = self.__dict__.get("model")
        if model is not None and name in model:
            return model[name]
        raise AttributeError(f"ModelManager has no model or attribute {name!r}; loaded components: {sorted(model or {})}")

    def has(self, name: str) -> bool:
        return name in self.model

    # ------------------------------------------------------------------ loading
    def load_models(self, file_path_list: Iterable[str], lora_alphas: Iterable[float] | None = None) -> None:
        """Load each file in order. LoRA files take their strengths from ``lora_alphas`` in order.

        The list is read, never consumed: a saved config keeps its alphas.
        """
        alphas = list(lora_alphas or [])
        paths = list(file_path_list)
        n_lora = 0
        for path in paths:
            kind = self.identify(path)
            if kind.family == "lora":
                if n_lora >= len(alphas):
                    raise ValueError(f"no strength for LoRA file {path}: lora_alphas has {len(alphas)} entries; give one alpha per LoRA file, in order")
                self.load_lora(path, alphas[n_lora])
                n_lora += 1
            else:
                self.load_model(path)
        if len(alphas) > n_lora:
            raise ValueError(f"lora_alphas has {len(alphas)} entries but the model list holds {n_lora} LoRA file(s); give one alpha per LoRA file")

    def identify(self, path: str) -> Fingerprint:
        """The detected kind of a model file or diffusers folder."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"model file not found: {path}. Put it there (see models/README.md for where each file comes from) or fix the path.")
        if os.path.isdir(path):
            return Fingerprint("diffusers_folder", "diffusers model folder", required=())
        return detect(read_keys(path), source=path)

    def load_model(self, file_path: str, components: Iterable[str] | None = None, lora_alpha: float = 1.0) -> None:
        """Load one file or folder; its kind is detected from its contents."""
        kind = self.identify(file_path)
        if not kind.supported:
            raise ModelFileError(file_path, f"is a {kind.description}.", kind.note)
        loader = {
            "sd1_checkpoint": self._load_sd1_checkpoint,
            "sdxl_checkpoint": self._load_sdxl_checkpoint,
            "vae": self._load_vae_ldm,
            "vae_diffusers": self._load_vae_diffusers_file,
            "unet_diffusers": self._load_unet_diffusers_file,
            "clip_text": self._load_clip_text_file,
            "controlnet": self._load_controlnet,
            "controlnet_diffusers": self._load_controlnet_diffusers_file,
            "motion_module": self._load_motion_module,
            "rife": self._load_rife,
            "translator": lambda p, c: self._load_prompt_model(p, c, expected="translator"),
            "beautiful_prompt": lambda p, c: self._load_prompt_model(p, c, expected="beautiful_prompt"),
            "diffusers_folder": self._load_diffusers_folder,
        }.get(kind.family)
        if kind.family == "lora":
            self.load_lora(file_path, lora_alpha)
            return
        if kind.family == "textual_inversion":
            raise ModelFileError(
                file_path,
                "is a textual inversion embedding, not a model.",
                "Put it in a folder and load it with load_textual_inversions(folder) (config: models.textual_inversion_folder).",
            )
        if loader is None:
            raise ModelFileError(file_path, f"is a {kind.description}, which this program cannot load yet.", "Remove it from the model list.")
        loader(file_path, set(components) if components is not None else None)

    def load_lora(self, file_path: str, alpha: float = 1.0) -> None:
        if "unet" not in self.model:
            raise ValueError(f"cannot apply LoRA {file_path}: load a Stable Diffusion checkpoint first (list it before the LoRA files)")
        lora = load_lora(file_path)
        unet = self.model["unet"]
        apply_lora(
            lora,
            unet=unet,
            text_encoder=self.model.get("text_encoder"),
            strength=alpha,
            unet_module_map=convert.unet_module_map(unet.config),
            text_encoder_2=self.model.get("text_encoder_2"),
        )
        self.model_path.setdefault("lora", []).append(file_path)

    def load_textual_inversions(self, folder_path: str) -> None:
        """Read every embedding in ``folder_path``; usable in prompts by file stem.

        With an SDXL model loaded (or, before any model, when the folder holds SDXL
        embeddings) the folder must hold SDXL embeddings: their ``clip_l`` vectors go to
        ``text_encoder`` and their ``clip_g`` vectors to ``text_encoder_2``.
        """
        text_encoder = self.model.get("text_encoder")
        text_encoder_2 = self.model.get("text_encoder_2")
        if isinstance(text_encoder, SDXLTextEncoder) or (text_encoder is None and folder_holds_sdxl_embeddings(folder_path)):
            dims = tuple(m.config.hidden_size if m is not None else None for m in (text_encoder, text_encoder_2))
            pairs = load_textual_inversions_sdxl(folder_path, expected_dims=dims)
            self.textual_inversion_dict = {kw: clip_l for kw, (clip_l, _) in pairs.items()}
            self.textual_inversion_dict_2 = {kw: clip_g for kw, (_, clip_g) in pairs.items()}
        else:
            width = text_encoder.config.hidden_size if text_encoder is not None else None
            self.textual_inversion_dict = load_textual_inversions(folder_path, expected_dim=width)
            self.textual_inversion_dict_2 = {}
        self.textual_inversion_folder = folder_path
        self.textual_inversion_ids, self.textual_inversion_ids_2 = {}, {}
        if text_encoder is not None:
            self._apply_textual_inversions(text_encoder)
        if text_encoder_2 is not None:
            self._apply_textual_inversions_2(text_encoder_2)

    def _apply_textual_inversions(self, text_encoder: SDTextEncoder) -> None:
        sdxl_vectors, sdxl_model = bool(self.textual_inversion_dict_2), isinstance(text_encoder, SDXLTextEncoder)
        if sdxl_vectors != sdxl_model:
            raise ValueError(
                f"the textual inversions in {self.textual_inversion_folder} are {'SDXL' if sdxl_vectors else 'SD 1.x'} embeddings, "
                f"but the loaded text encoder is {'SDXL' if sdxl_model else 'SD 1.x'}'s; use an embeddings folder made for this model family"
            )
        self.textual_inversion_ids = {kw: text_encoder.add_token_embeddings(vec) for kw, vec in self.textual_inversion_dict.items()}

    def _apply_textual_inversions_2(self, text_encoder_2: SDXLTextEncoder2) -> None:
        self.textual_inversion_ids_2 = {kw: text_encoder_2.add_token_embeddings(vec) for kw, vec in self.textual_inversion_dict_2.items()}

    # ------------------------------------------------------------------ per kind
    def _put(self, name: str, model: nn.Module, path: str) -> None:
        self.model[name] = model
        self.model_path[name] = path
        if name == "text_encoder" and self.textual_inversion_dict:
            self._apply_textual_inversions(model)
        if name == "text_encoder_2" and self.textual_inversion_dict_2:
            self._apply_textual_inversions_2(model)

    def _build_unet(self, sd: dict, path: str) -> SDUNet:
        config = infer_config(infer_unet_config, sd, source=path, what="SD 1.x UNet")
        return instantiate(lambda: SDUNet(config), sd, source=path, what="SD 1.x UNet", device=self.device, dtype=self.torch_dtype)

    def _sdxl_loaded(self) -> bool:
        unet = self.model.get("unet")
        return unet is not None and is_sdxl_unet_config(unet.config)

    def _build_vae(self, sd: dict, path: str, components: set[str] | None, config=None, sdxl: bool | None = None) -> None:
        """VAE encoder/decoder from an LDM-layout dict; ``config`` (e.g. from a diffusers config.json) carries the scaling factor.

        An SDXL VAE (``sdxl``, by default: an SDXL UNet is loaded) gets SDXL's scaling factor
        when ``config`` is not given and is kept in float32 whatever the manager's dtype: in
        fp16 it overflows to NaN (as DiffSynth-Studio, which forced float32 too).
        """
        sdxl = self._sdxl_loaded() if sdxl is None else sdxl
        if config is None:
            scaling = SDXL_VAE_SCALING_FACTOR if sdxl else 0.18215
            config = infer_config(lambda s: infer_vae_config(s, scaling_factor=scaling), sd, source=path, what="VAE")
        dtype = torch.float32 if sdxl else self.torch_dtype
        encoder_cls, decoder_cls = (SDXLVAEEncoder, SDXLVAEDecoder) if sdxl else (SDVAEEncoder, SDVAEDecoder)
        if (components is None or "vae_encoder" in components) and "encoder.conv_in.weight" in sd:
            enc = {k: v for k, v in sd.items() if k.startswith(("encoder.", "quant_conv."))}
            self._put("vae_encoder", instantiate(lambda: encoder_cls(config), enc, source=path, what="VAE encoder", device=self.device, dtype=dtype), path)
        if (components is None or "vae_decoder" in components) and "decoder.conv_in.weight" in sd:
            dec = {k: v for k, v in sd.items() if k.startswith(("decoder.", "post_quant_conv."))}
            self._put("vae_decoder", instantiate(lambda: decoder_cls(config), dec, source=path, what="VAE decoder", device=self.device, dtype=dtype), path)

    def _build_text_encoder(self, sd: dict, path: str) -> SDTextEncoder:
        config = infer_config(infer_clip_text_config, sd, source=path, what="CLIP text encoder")
        return instantiate(lambda: SDTextEncoder(config), sd, source=path, what="CLIP text encoder", device=self.device, dtype=self.torch_dtype)

    def _load_sd1_checkpoint(self, path: str, components: set[str] | None) -> None:
        parts = convert.split_ldm_checkpoint(load_state_dict(path, self.torch_dtype), source=path)
        wanted = set(SD_COMPONENTS) if components is None else components
        if "unet" in wanted:
            self._put("unet", self._build_unet(parts["unet"], path), path)
        if wanted & {"vae_encoder", "vae_decoder"}:
            if parts.get("vae"):
                self._build_vae(parts["vae"], path, wanted)
            else:
                logger.warning("%s holds no VAE; add a VAE file to the model list", path)
        if "text_encoder" in wanted:
            if parts.get("text_encoder"):
                self._put("text_encoder", self._build_text_encoder(parts["text_encoder"], path), path)
            else:
                logger.warning("%s holds no text encoder", path)

    def _load_sdxl_checkpoint(self, path: str, components: set[str] | None) -> None:
        """SDXL base or Turbo single file: UNet, VAE (float32), CLIP-L and OpenCLIP bigG text encoders."""
        parts = convert.split_ldm_checkpoint(load_state_dict(path, self.torch_dtype), source=path)
        wanted = set(SDXL_COMPONENTS) if components is None else components
        if "unet" in wanted:
            sd = parts["unet"]
            config = infer_config(lambda s: infer_unet_config(s, num_heads=None, num_head_channels=64), sd, source=path, what="SDXL UNet")
            self._put("unet", instantiate(lambda: SDXLUNet(config), sd, source=path, what="SDXL UNet", device=self.device, dtype=self.torch_dtype), path)
        if wanted & {"vae_encoder", "vae_decoder"}:
            if parts.get("vae"):
                self._build_vae(parts["vae"], path, wanted, sdxl=True)
            else:
                logger.warning("%s holds no VAE; add an SDXL VAE file to the model list", path)
        if "text_encoder" in wanted:
            if parts.get("text_encoder"):
                self._put("text_encoder", self._build_sdxl_text_encoder(parts["text_encoder"], path), path)
            else:
                logger.warning("%s holds no CLIP-L text encoder (conditioner.embedders.0)", path)
        if "text_encoder_2" in wanted:
            if parts.get("text_encoder_2"):
                sd = convert_open_clip_text_to_hf(parts["text_encoder_2"], source=path)
                self._put("text_encoder_2", self._build_text_encoder_2(sd, path), path)
            else:
                logger.warning("%s holds no OpenCLIP bigG text encoder (conditioner.embedders.1)", path)

    def _build_sdxl_text_encoder(self, sd: dict, path: str) -> SDXLTextEncoder:
        config = infer_config(infer_clip_text_config, sd, source=path, what="SDXL CLIP-L text encoder")
        return instantiate(lambda: SDXLTextEncoder(config), sd, source=path, what="SDXL CLIP-L text encoder", device=self.device, dtype=self.torch_dtype)

    def _build_text_encoder_2(self, sd: dict, path: str) -> SDXLTextEncoder2:
        config = infer_config(infer_text_encoder_2_config, sd, source=path, what="SDXL OpenCLIP bigG text encoder")
        return instantiate(lambda: SDXLTextEncoder2(config), sd, source=path, what="SDXL OpenCLIP bigG text encoder", device=self.device, dtype=self.torch_dtype)

    def _load_vae_ldm(self, path: str, components: set[str] | None) -> None:
        sd = load_state_dict(path, self.torch_dtype)
        sd = {k.removeprefix("first_stage_model."): v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}
        self._build_vae(convert.fit_ldm_vae_attention(sd, source=path), path, components)

    def _load_vae_diffusers_file(self, path: str, components: set[str] | None, config_json: dict | None = None, sdxl: bool | None = None) -> None:
        sd = load_state_dict(path, self.torch_dtype)
        config = convert.vae_config_from_diffusers(config_json, source=path) if config_json else None
        self._build_vae(convert.convert_vae_from_diffusers(sd, config, source=path), path, components, config, sdxl=sdxl)

    def _load_unet_diffusers_file(self, path: str, components: set[str] | None, config_json: dict | None = None) -> None:
        if config_json is None:
            config_json = _read_json(os.path.join(os.path.dirname(path), "config.json"), path)
        config = convert.unet_config_from_diffusers(config_json, source=path)
        sd = convert.convert_unet_from_diffusers(load_state_dict(path, self.torch_dtype), config, source=path)
        cls, what = (SDXLUNet, "SDXL UNet") if is_sdxl_unet_config(config) else (SDUNet, "SD 1.x UNet")
        self._put("unet", instantiate(lambda: cls(config), sd, source=path, what=what, device=self.device, dtype=self.torch_dtype), path)

    def _add_controlnet(self, sd: dict, config, path: str) -> None:
        model = instantiate(lambda: SDControlNet(config), sd, source=path, what="ControlNet", device=self.device, dtype=self.torch_dtype)
        self.model.setdefault("controlnet", []).append(model)
        self.model_path.setdefault("controlnet", []).append(path)

    def _load_controlnet(self, path: str, components: set[str] | None) -> None:
        sd = split_controlnet_checkpoint(load_state_dict(path, self.torch_dtype), source=path)
        self._add_controlnet(sd, infer_config(infer_controlnet_config, sd, source=path, what="ControlNet"), path)

    def _load_controlnet_diffusers_file(self, path: str, components: set[str] | None, config_json: dict | None = None) -> None:
        if config_json is None:
            config_json = _read_json(os.path.join(os.path.dirname(path), "config.json"), path)
        config = controlnet_config_from_diffusers(config_json, source=path)
        sd = convert_controlnet_from_diffusers(load_state_dict(path, self.torch_dtype), config, source=path)
        self._add_controlnet(sd, config, path)

    def _load_motion_module(self, path: str, components: set[str] | None) -> None:
        """AnimateDiff v1/v2 (told apart by the mid-block module and the position table length), or AnimateLCM."""
        sd = load_state_dict(path, self.torch_dtype)
        if is_animatelcm_motion_module(sd):
            sd = _with_animatelcm_positions(sd)
        model = build_motion_model(sd, source=path, device=self.device, dtype=self.torch_dtype)
        if "unet" in self.model:
            try:
                model.config.check_unet(self.model["unet"].config)
            except ValueError as exc:
                raise ModelFileError(path, f"does not fit the loaded UNet ({exc}).", "Use an SD 1.5 motion module with an SD 1.5 checkpoint.") from exc
        self._put("motion_modules", model, path)

    def _load_rife(self, path: str, components: set[str] | None) -> None:
        """RIFE's IFNet, always fp32 (as the original; it is not fp16-safe)."""
        from ..extensions.RIFE import build_rife_model  # the extension depends on models, not the other way

        self._put("RIFE", build_rife_model(load_state_dict(path), source=path, device=self.device), path)

    def _load_prompt_model(self, path: str, components: set[str] | None, expected: str | None = None) -> None:
        """A translator or BeautifulPrompt Hugging Face folder, or a weight file inside one (the folder loads).

        ``expected``: the component a weight file's keys showed; its folder's config.json must agree.
        """
        from ..prompts.prompt_models import load_prompt_model  # prompts wraps transformers; imported on use

        name, model = load_prompt_model(path, device=self.device, torch_dtype=self.torch_dtype, expected=expected)
        self._put(name, model, path)

    def _load_clip_text_file(self, path: str, components: set[str] | None, sdxl: bool | None = None) -> None:
        """A CLIP text encoder file; ``sdxl`` (default: an SDXL UNet is loaded) reads it as SDXL's
        first encoder (penultimate layer, no final LayerNorm)."""
        sdxl = self._sdxl_loaded() if sdxl is None else sdxl
        raw = load_state_dict(path, self.torch_dtype)
        if "text_projection.weight" in raw and not any(k.startswith("vision_model.") for k in raw):
            # a CLIPTextModelWithProjection on its own: SDXL's second text encoder
            self._put("text_encoder_2", self._build_text_encoder_2(convert_text_encoder_2_from_hf(raw, source=path), path), path)
            return
        sd = convert.convert_clip_text_from_hf(raw)
        self._put("text_encoder", self._build_sdxl_text_encoder(sd, path) if sdxl else self._build_text_encoder(sd, path), path)

    def _load_text_encoder_2_file(self, path: str, components: set[str] | None) -> None:
        sd = convert_text_encoder_2_from_hf(load_state_dict(path, self.torch_dtype), source=path)
        self._put("text_encoder_2", self._build_text_encoder_2(sd, path), path)

    def _load_diffusers_folder(self, path: str, components: set[str] | None) -> None:
        """A diffusers pipeline folder (``unet/``, ``vae/``, ``text_encoder/``) or one component folder."""
        from ..prompts.prompt_models import prompt_model_component

        if prompt_model_component(path) is not None:  # models/translator/<folder>, models/BeautifulPrompt/<folder>
            self._load_prompt_model(path, components)
            return
        subfolders = {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
        present = {name: os.path.join(path, sub) for name, sub in subfolders.items() if os.path.isdir(os.path.join(path, sub))}
        sdxl = "text_encoder_2" in present  # an SDXL pipeline folder (StableDiffusionXLPipeline)
        if not present:
            if os.path.isfile(os.path.join(path, "config.json")):
                config_json = _read_json(os.path.join(path, "config.json"), path)
                if _component_of_config(config_json, path) == "controlnet":
                    self._load_controlnet_diffusers_file(_find_weights(path), components, config_json)
                    self.model_path["controlnet"][-1] = path
                    return
                present = {_component_of_config(config_json, path): path}
            else:
                raise ModelFileError(
                    path, "is a folder but not a diffusers model folder (no unet/, vae/ or text_encoder/ sub-folder, no config.json).", "Point to the checkpoint file or the diffusers folder itself; a translator or BeautifulPrompt folder needs its config.json."
                )
        for name, folder in present.items():
            weights = _find_weights(folder)
            config_json = _read_json(os.path.join(folder, "config.json"), folder)
            if name == "unet" and (components is None or "unet" in components):
                self._load_unet_diffusers_file(weights, components, config_json)
            elif name == "vae" and (components is None or components & {"vae_encoder", "vae_decoder"}):
                self._load_vae_diffusers_file(weights, components, config_json, sdxl=sdxl or None)
            elif name == "text_encoder" and (components is None or "text_encoder" in components):
                self._load_clip_text_file(weights, components, sdxl=sdxl or None)
            elif name == "text_encoder_2" and (components is None or "text_encoder_2" in components):
                self._load_text_encoder_2_file(weights, components)

    # ------------------------------------------------------------------ misc API
    def get_model_with_model_path(self, model_path: str) -> Any:
        """The model loaded from ``model_path`` (single components first, then list entries)."""
        target = _same_path_key(model_path)
        for name, path in self.model_path.items():
            paths = path if isinstance(path, list) else [path]
            models = self.model[name] if isinstance(self.model.get(name), list) else [self.model.get(name)] * len(paths)
            for p, m in zip(paths, models):
                if m is not None and _same_path_key(p) == target:
                    return m
        raise ValueError(f"no model was loaded from {model_path}; load it with load_models([...]) before you use it (loaded: {self.model_path})")

    def to(self, device: str | torch.device) -> "ModelManager":
        for value in self.model.values():
            for m in value if isinstance(value, list) else [value]:
                if isinstance(m, nn.Module):
                    m.to(device)
        self.device = str(device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self


def _same_path_key(path: str) -> str:
    return os.path.normcase(os.path.realpath(os.path.abspath(path)))


def _with_animatelcm_positions(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AnimateLCM's motion module with the positional tables its file leaves out: the 64-position
    sinusoid AnimateLCM computes (detect.py cites the sources), one per attention block, as the
    original AnimateDiff files store them (``….attention_blocks.{i}.pos_encoder.pe``, ``(1, 64, C)``).
    """
    out = dict(sd)
    for key, value in sd.items():
        if key.endswith(".to_q.weight") and ".attention_blocks." in key:
            out[key[: -len("to_q.weight")] + "pos_encoder.pe"] = sinusoid_table(ANIMATELCM_POSITIONS, value.shape[1], value.dtype)
    return out


def _read_json(path: str, source: str) -> dict:
    if not os.path.isfile(path):
        raise ModelFileError(source, f"has no {os.path.basename(path)} next to its weights.", "Copy the whole diffusers folder, including its config.json files.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _find_weights(folder: str) -> str:
    for name in _DIFFUSERS_WEIGHT_NAMES:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    raise ModelFileError(folder, "holds no weight file.", f"Expected one of: {', '.join(_DIFFUSERS_WEIGHT_NAMES)}.")


def _component_of_config(config_json: dict, source: str) -> str:
    cls = config_json.get("_class_name") or (config_json.get("architectures") or [None])[0]
    table = {
        "UNet2DConditionModel": "unet",
        "AutoencoderKL": "vae",
        "CLIPTextModel": "text_encoder",
        "CLIPTextModelWithProjection": "text_encoder_2",
        "ControlNetModel": "controlnet",
    }
    if cls not in table:
        from ..prompts.prompt_models import PROMPT_MODEL_CLASSES  # folders of these load before this table is asked

        supported = ", ".join([*table, *PROMPT_MODEL_CLASSES])
        raise ModelFileError(source, f"is a diffusers/transformers folder of class {cls!r}.", f"Supported component classes: {supported}.")
    return table[cls]
