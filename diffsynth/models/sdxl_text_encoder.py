"""The two text encoders of Stable Diffusion XL, and the OpenCLIP key layout of the second.

* :class:`SDXLTextEncoder` is OpenAI CLIP ViT-L/14's text tower (the SD 1.x encoder, all
  12 layers and the final LayerNorm are loaded) read the SDXL way: the hidden states of
  the *penultimate* layer, without the final LayerNorm. ``clip_skip`` counts from there
  (1 = penultimate, as in DiffSynth-Studio, whose class only built 11 layers).
* :class:`SDXLTextEncoder2` is OpenCLIP ViT-bigG/14's text tower (32 layers, width 1280,
  exact GELU) with its ``text_projection``; it returns the pooled, projected embedding
  (the conditioning vector the UNet adds to its time embedding) and the hidden states of
  layer ``32 - clip_skip`` (default 2: penultimate, no LayerNorm).

Parameter names are Hugging Face's (``CLIPTextModelWithProjection``: ``text_model.*`` and
``text_projection.weight``), the layout of diffusers ``text_encoder_2/`` folders and of
kohya ``lora_te2_`` names. Single-file SDXL checkpoints store the second encoder in
OpenCLIP's own layout under ``conditioner.embedders.1.model.``;
:func:`convert_open_clip_text_to_hf` and :func:`convert_hf_text_to_open_clip` translate
(checked against diffusers' ``convert_open_clip_checkpoint`` in ``tests/test_sdxl_models.py``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModelFileError
from .sd_text_encoder import CLIPTextConfig, SDTextEncoder

__all__ = [
    "OPEN_CLIP_IGNORED",
    "OpenCLIPTextConfig",
    "SDXLTextEncoder",
    "SDXLTextEncoder2",
    "convert_hf_text_to_open_clip",
    "convert_open_clip_text_to_hf",
    "convert_text_encoder_2_from_hf",
    "infer_text_encoder_2_config",
    "text_encoder_2_key_names",
]

StateDict = dict[str, torch.Tensor]

CLIP_EOS_TOKEN_ID = 49407


def _check_clip_skip(clip_skip: int, layers: int) -> None:
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= layers:
        raise ValueError(f"clip_skip must be an int between 1 and {layers} for this text encoder, got {clip_skip!r}")


class SDXLTextEncoder(SDTextEncoder):
    """CLIP ViT-L/14 text tower as SDXL uses it: token ids ``(k, 77)`` → hidden ``(k, 77, 768)``.

    Output = the hidden states after ``num_layers - clip_skip`` layers, without the final
    LayerNorm (``clip_skip=1``: the penultimate layer, SDXL's conditioning).
    """

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        n = self.config.num_layers
        _check_clip_skip(clip_skip, n - 1)
        return self.hidden_states(input_ids, n - clip_skip)


@dataclass(frozen=True)
class OpenCLIPTextConfig(CLIPTextConfig):
    """Defaults are OpenCLIP ViT-bigG/14's text tower (SDXL's second encoder)."""

    hidden_size: int = 1280
    num_layers: int = 32
    intermediate_size: int = 5120
    activation: str = "gelu"
    projection_dim: int = 1280
    eos_token_id: int = CLIP_EOS_TOKEN_ID


class SDXLTextEncoder2(SDTextEncoder):
    """OpenCLIP ViT-bigG/14 text tower with projection: ids ``(k, 77)`` → ``(pooled (k, 1280), hidden (k, 77, 1280))``."""

    def __init__(self, config: OpenCLIPTextConfig = OpenCLIPTextConfig()):
        super().__init__(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden`` = output of layer ``num_layers - clip_skip`` (0-based) without LayerNorm.

        ``pooled`` = ``text_projection(final_layer_norm(last layer)[eos])`` where ``eos`` is
        each row's first end-of-text token. A row without one (the first chunk of a
        prompt longer than 77 tokens) uses the position of its largest token id, which is
        what DiffSynth-Studio's ``argmax(input_ids)`` picked for such rows.
        """
        n = self.config.num_layers
        _check_clip_skip(clip_skip, n)
        keep = n - clip_skip + 1
        hidden = x = self.hidden_states(input_ids, keep)
        for layer in self.text_model.encoder.layers[keep:]:
            x = layer(x)
        ids = input_ids.to(x.device)
        is_eos = ids == self.config.eos_token_id
        position = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), ids.argmax(dim=1))
        last = self.text_model.final_layer_norm(x)
        pooled = self.text_projection(last[torch.arange(ids.shape[0], device=x.device), position])
        return pooled, hidden


# --------------------------------------------------------------------------- key layouts

# OpenCLIP text-tower names -> Hugging Face names, per transformer block. "attn.in_proj_*"
# (q, k and v stacked along dim 0) is split separately.
_OPEN_CLIP_BLOCK_NAMES = (
    ("ln_1", "layer_norm1"),
    ("attn.out_proj", "self_attn.out_proj"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)
_HF_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

# Entries of the OpenCLIP text model that are not weights of the encoder; dropped.
OPEN_CLIP_IGNORED: tuple[tuple[str, str], ...] = (
    ("logit_scale", "OpenCLIP's contrastive temperature"),
    ("attn_mask", "the causal mask buffer of older open_clip versions; it is rebuilt"),
)


def _layers(sd: Mapping[str, torch.Tensor], prefix: str, source: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    if not ids:
        raise ModelFileError(source, f"holds no text-encoder layers (no {prefix}N.* keys).", "The file is incomplete or of another model family.")
    return max(ids) + 1


def convert_open_clip_text_to_hf(sd: Mapping[str, torch.Tensor], *, source: str = "<state dict>") -> StateDict:
    """An OpenCLIP text tower (keys after ``conditioner.embedders.1.model.``) in Hugging Face names.

    ``attn.in_proj_weight/bias`` are cut into thirds (q, k, v), ``positional_embedding``
    becomes ``text_model.embeddings.position_embedding.weight`` and ``text_projection``
    (stored ``[width, projection]``, applied as ``x @ P``) is transposed into a ``Linear``
    weight. Unknown or missing entries raise :class:`ModelFileError` naming ``source``.
    Tensors are views of the input where no transposition is needed.
    """
    sd = {k: v for k, v in sd.items() if k not in {name for name, _ in OPEN_CLIP_IGNORED}}
    out: StateDict = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ModelFileError(source, f"lacks the OpenCLIP text-encoder entry {key!r}.", "The file is incomplete; download it again.")
        used.add(key)
        return sd[key]

    n = _layers(sd, "transformer.resblocks.", source)
    out["text_model.embeddings.token_embedding.weight"] = take("token_embedding.weight")
    out["text_model.embeddings.position_embedding.weight"] = take("positional_embedding")
    for i in range(n):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for param in ("weight", "bias"):
            fused = take(f"{src}attn.in_proj_{param}")
            if fused.shape[0] % 3:
                raise ModelFileError(source, f"{src}attn.in_proj_{param} has shape {tuple(fused.shape)}; q, k and v stacked need a multiple of 3 rows.", "The file is corrupt.")
            for name, part in zip(_HF_QKV, fused.chunk(3, dim=0)):
                out[f"{dst}{name}.{param}"] = part
            for oc, hf in _OPEN_CLIP_BLOCK_NAMES:
                out[f"{dst}{hf}.{param}"] = take(f"{src}{oc}.{param}")
    out["text_model.final_layer_norm.weight"] = take("ln_final.weight")
    out["text_model.final_layer_norm.bias"] = take("ln_final.bias")
    out["text_projection.weight"] = take("text_projection").t().contiguous()
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise ModelFileError(
            source,
            f"holds {len(unexpected)} entries that are not part of an OpenCLIP text encoder (e.g. {', '.join(unexpected[:5])}).",
            "Is the file a checkpoint of another model family (SDXL refiner, SD 2.x)?",
        )
    return out


def convert_hf_text_to_open_clip(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """The inverse of :func:`convert_open_clip_text_to_hf` (used to write SDXL single files)."""
    out: StateDict = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].t().contiguous(),
    }
    for i in range(_layers(sd, "text_model.encoder.layers.", "<state dict>")):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{param}"] = torch.cat([sd[f"{src}{name}.{param}"] for name in _HF_QKV], dim=0)
            for oc, hf in _OPEN_CLIP_BLOCK_NAMES:
                out[f"{dst}{oc}.{param}"] = sd[f"{src}{hf}.{param}"]
    return out


def infer_text_encoder_2_config(sd: Mapping[str, torch.Tensor]) -> OpenCLIPTextConfig:
    """bigG-style architecture from a Hugging Face-named state dict (64-wide heads, exact GELU)."""
    tok = sd["text_model.embeddings.token_embedding.weight"]
    return OpenCLIPTextConfig(
        vocab_size=tok.shape[0],
        hidden_size=tok.shape[1],
        num_layers=_layers(sd, "text_model.encoder.layers.", "<state dict>"),
        intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        max_positions=sd["text_model.embeddings.position_embedding.weight"].shape[0],
        projection_dim=sd["text_projection.weight"].shape[0],
    )


def text_encoder_2_key_names(config: OpenCLIPTextConfig) -> list[str]:
    """Parameter names of ``SDXLTextEncoder2(config)``."""
    from .convert import clip_text_key_names  # convert imports the SD 1.x encoder; keep this module importable on its own

    return clip_text_key_names(config) + ["text_projection.weight"]


def convert_text_encoder_2_from_hf(sd: Mapping[str, torch.Tensor], *, source: str = "<state dict>") -> StateDict:
    """A diffusers ``text_encoder_2`` (transformers ``CLIPTextModelWithProjection``) state dict in our names (strict).

    Accepts the flattened transformers >= 5.6 text-model names too.
    """
    from .convert import convert_clip_text_from_hf

    if "text_projection.weight" not in sd:
        raise ModelFileError(
            source,
            "has no text_projection.weight, so it is not SDXL's second text encoder (CLIPTextModelWithProjection).",
            "Use the text_encoder_2 folder of an SDXL model.",
        )
    projection = sd["text_projection.weight"]
    text = convert_clip_text_from_hf({k: v for k, v in sd.items() if k != "text_projection.weight"}, source=source)
    return {**text, "text_projection.weight": projection}
