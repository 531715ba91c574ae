"""`Translator`: a MarianMT model that turns a (Chinese) prompt into English (upstream_spec §5.3).

Intended model: Helsinki-NLP/opus-mt-zh-en (the original's README and example linked opus-mt-en-zh,
which translates the other way). Generation uses the model folder's own generation config, as the
original did (opus-mt: beam search, no sampling).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .hf_folder import check_weights_present, isolated_rng, load_pretrained, model_folder_of

TRANSLATOR_LINK = "https://huggingface.co/Helsinki-NLP/opus-mt-zh-en"


class Translator(nn.Module):
    """`translator(prompt) -> str`: the translation, special tokens dropped, surrounding spaces stripped.

    A prompt that is empty or only whitespace is returned unchanged (a random-weight or real model
    would otherwise invent text for it).
    """

    def __init__(self, model: nn.Module, tokenizer, folder: str = ""):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.folder = folder

    @classmethod
    def from_folder(cls, path: str | os.PathLike, device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32) -> "Translator":
        """Load a Marian model folder (or the folder of a weight file given as `path`), from local files only.

        The model runs in `torch_dtype`; ModelManager passes fp32, as the original kept its
        translator in fp32 (it is small, and fp16 gains nothing worth the risk of overflow).
        """
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        folder = model_folder_of(path)
        check_weights_present(folder, TRANSLATOR_LINK)
        tokenizer = load_pretrained(AutoTokenizer, folder, "translator tokenizer", TRANSLATOR_LINK)
        model = load_pretrained(AutoModelForSeq2SeqLM, folder, "translator model", TRANSLATOR_LINK)
        return cls(model.to(device=device, dtype=torch_dtype), tokenizer, folder)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, prompt: str) -> str:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
        if not prompt.strip():
            return prompt
        inputs = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        # Seeded and forked only in case a folder's generation config samples; opus-mt does not.
        with isolated_rng(self.device, 0):
            output_ids = self.model.generate(**inputs)
        return self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()
