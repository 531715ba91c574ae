"""The CLIP ViT-L/14 text tower used by Stable Diffusion 1.x.

Parameter names are Hugging Face's ``CLIPTextModel`` names (``text_model.*``),
which are also the keys of SD 1.x single-file checkpoints after
``cond_stage_model.transformer.`` and of diffusers ``text_encoder/`` folders.
Written here rather than wrapping transformers so the clip-skip semantics and
the textual-inversion vocabulary growth are ours, and so the layout does not
move with transformers releases (5.6 flattened ``CLIPTextModel``).
"""
from __future__ import annotations

from dataclasses import dataclass, asdict

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import sdpa_heads


@dataclass(frozen=True)
class CLIPTextConfig:
    """Defaults are CLIP ViT-L/14's text tower (SD 1.x); heads are 64 channels wide."""

    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    intermediate_size: int = 3072
    max_positions: int = 77
    head_dim: int = 64
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_size % self.head_dim:
            raise ValueError(f"CLIP hidden_size {self.hidden_size} is not a multiple of the head width {self.head_dim}")

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unknown CLIP activation {name!r}; expected 'quick_gelu' or 'gelu'")


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(sdpa_heads(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, is_causal=True))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(c.hidden_size, c.num_heads)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c.hidden_size, c.intermediate_size, c.activation)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_positions, c.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class _Encoder(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.num_layers))


class _TextModel(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.embeddings = _Embeddings(c)
        self.encoder = _Encoder(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class SDTextEncoder(nn.Module):
    """Token ids ``(k, 77)`` → hidden states ``(k, 77, hidden)``."""

    def __init__(self, config: CLIPTextConfig = CLIPTextConfig()):
        super().__init__()
        self.config = config
        self.text_model = _TextModel(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.final_layer_norm.weight.device

    def hidden_states(self, input_ids: torch.Tensor, num_layers: int) -> torch.Tensor:
        """Output of the first ``num_layers`` transformer layers, before the final LayerNorm."""
        if input_ids.max() >= self.text_model.embeddings.token_embedding.num_embeddings:
            raise ValueError(
                f"token id {int(input_ids.max())} is outside the text encoder's vocabulary "
                f"({self.text_model.embeddings.token_embedding.num_embeddings}); was a textual inversion added to the tokenizer but not to the encoder?"
            )
        x = self.text_model.embeddings(input_ids.to(self.device))
        for layer in self.text_model.encoder.layers[:num_layers]:
            x = layer(x)
        return x

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """``clip_skip`` = 1 uses every layer; 2 stops one layer early (A1111 "CLIP skip 2").

        The final LayerNorm is applied in every case, as in A1111 and the original.
        """
        n = self.config.num_layers
        if not 1 <= clip_skip <= n:
            raise ValueError(f"clip_skip must be between 1 and {n} for this text encoder, got {clip_skip}")
        return self.text_model.final_layer_norm(self.hidden_states(input_ids, n - clip_skip + 1))

    def add_token_embeddings(self, vectors: torch.Tensor) -> list[int]:
        """Append rows to the token embedding (textual inversion); returns their ids."""
        emb = self.text_model.embeddings.token_embedding
        if vectors.dim() != 2 or vectors.shape[1] != emb.embedding_dim:
            raise ValueError(f"embedding vectors must have shape (n, {emb.embedding_dim}), got {tuple(vectors.shape)}")
        old = emb.weight.data
        first = old.shape[0]
        new = nn.Embedding(first + vectors.shape[0], emb.embedding_dim, device=old.device, dtype=old.dtype)
        with torch.no_grad():
            new.weight[:first] = old
            new.weight[first:] = vectors.to(old.device, old.dtype)
        new.requires_grad_(emb.weight.requires_grad)  # loaded models are frozen; a fresh Embedding would track grads
        self.text_model.embeddings.token_embedding = new
        return list(range(first, first + vectors.shape[0]))


def infer_clip_text_config(sd: dict[str, torch.Tensor]) -> CLIPTextConfig:
    """CLIP text architecture from a (``text_model.``-prefixed) state dict; 64-channel heads, quick-GELU (the ViT-L rule)."""
    tok = sd["text_model.embeddings.token_embedding.weight"]
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers."))
    return CLIPTextConfig(
        vocab_size=tok.shape[0],
        hidden_size=tok.shape[1],
        num_layers=layers,
        intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        max_positions=sd["text_model.embeddings.position_embedding.weight"].shape[0],
    )
