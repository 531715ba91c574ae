"""Prompt encoding for Stable Diffusion XL: two tokenizers, two text encoders.

DiffSynth-Studio's `SDXLPrompter` (upstream_spec §5.2): the prompt goes through the shared
`Prompter.process_prompt` (translation and refining for positive prompts, then the
textual-inversion keywords become their tokens) once, and the result is tokenized for both encoders as 77-token chunks (tokenizer 2
pads with "!"). The conditioning is CLIP-L's penultimate layer (768) next to bigG's
(1280), 2048 wide per token; the pooled vector is bigG's projected end-of-text embedding of
the *first* chunk only.

Textual inversions get the same new token ids in both tokenizers (they share the CLIP
vocabulary), matching the rows appended to both text encoders; the original added them to the
first tokenizer only and crashed on the second encoder.
"""

from __future__ import annotations

import numbers

import torch

from .long_prompt import tokenize_long_prompt
from .prompter import Prompter
from .tokenizer import load_clip_tokenizer, load_sdxl_tokenizer_2


def _check_clip_skip(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


class SDXLPrompter(Prompter):
    """Prompter for SDXL: CLIP-L tokenizer + encoder and OpenCLIP bigG tokenizer + encoder."""

    def __init__(self, tokenizer=None, tokenizer_2=None):
        super().__init__(tokenizer if tokenizer is not None else load_clip_tokenizer())
        self.tokenizer_2 = tokenizer_2 if tokenizer_2 is not None else load_sdxl_tokenizer_2()

    def add_textual_inversion(self, keyword: str, num_vectors: int) -> list[int]:
        """Register the keyword in both tokenizers; the ids are the same in both (checked)."""
        if len(self.tokenizer_2) != len(self.tokenizer):
            raise RuntimeError(
                f"the SDXL tokenizers have {len(self.tokenizer)} and {len(self.tokenizer_2)} tokens; textual inversion ids "
                "would differ between them. Use fresh tokenizers (SDXLPrompter())."
            )
        ids = super().add_textual_inversion(keyword, num_vectors)
        tokens = self.textual_inversions[keyword]
        self.tokenizer_2.add_tokens(tokens)
        ids_2 = self.tokenizer_2.convert_tokens_to_ids(tokens)
        if list(ids_2) != list(ids):
            raise RuntimeError(f"textual inversion {keyword!r}: tokenizer 2 assigned ids {ids_2}, tokenizer 1 assigned {ids}")
        return ids

    def encode_prompt(
        self,
        text_encoder,
        text_encoder_2,
        prompt: str,
        clip_skip: int = 1,
        clip_skip_2: int = 2,
        positive: bool = True,
        device: str | torch.device = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled (1, projection), embeddings (1, 77·k, hidden_1 + hidden_2))`` for ``prompt``.

        `text_encoder(ids, clip_skip=)` returns ``(k, 77, hidden_1)``; `text_encoder_2(ids,
        clip_skip=)` returns ``(pooled (k, projection), hidden (k, 77, hidden_2))``.
        """
        clip_skip, clip_skip_2 = _check_clip_skip("clip_skip", clip_skip), _check_clip_skip("clip_skip_2", clip_skip_2)
        processed = self.process_prompt(prompt, positive=positive)
        ids_1 = tokenize_long_prompt(self.tokenizer, processed)
        ids_2 = tokenize_long_prompt(self.tokenizer_2, processed)
        if ids_1.shape != ids_2.shape:
            raise RuntimeError(f"the two SDXL tokenizers split the prompt differently ({tuple(ids_1.shape)} vs {tuple(ids_2.shape)})")
        hidden_1 = text_encoder(ids_1.to(device), clip_skip=clip_skip)
        pooled, hidden_2 = text_encoder_2(ids_2.to(device), clip_skip=clip_skip_2)
        if hidden_1.shape[:2] != ids_1.shape or hidden_2.shape[:2] != ids_2.shape:
            raise ValueError(
                f"the text encoders returned {tuple(hidden_1.shape)} and {tuple(hidden_2.shape)} for ids of shape {tuple(ids_1.shape)}"
            )
        embeddings = torch.cat([hidden_1, hidden_2.to(hidden_1.dtype)], dim=-1)
        return pooled[0:1], embeddings.reshape(1, -1, embeddings.shape[-1])
