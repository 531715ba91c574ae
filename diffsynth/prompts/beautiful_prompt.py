"""`BeautifulPrompt`: a causal LM (alibaba-pai's BLOOM-1b1 text2prompt models) that expands a short
prompt into a detailed drawing prompt (upstream_spec §5.4; arXiv 2311.06752).

The templates and sampling settings are the original's. The model continues the template; only the
newly generated tokens are decoded, and the result is `raw_prompt + ", " + continuation`.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .hf_folder import check_weights_present, isolated_rng, load_pretrained, model_folder_of, seed_from

BEAUTIFUL_PROMPT_LINK = "https://huggingface.co/alibaba-pai/pai-bloom-1b1-text2prompt-sd"

# Prompt formats the two model versions were fine-tuned on (text as in DiffSynth-Studio).
TEMPLATE_V1 = "Instruction: Give a simple description of the image to generate a drawing prompt.\nInput: {raw_prompt}\nOutput:"
TEMPLATE_V2 = (
    "Converts a simple image description into a prompt. Prompts are formatted as multiple related tags separated by commas, "
    "plus you can use () to increase the weight, [] to decrease the weight, or use a number to specify the weight. "
    "You should add appropriate words to make the images described in the prompt more aesthetically pleasing, "
    "but make sure there is a correlation between the input and output.\n### Input: {raw_prompt}\n### Output:"
)
TEMPLATES = {"v1": TEMPLATE_V1, "v2": TEMPLATE_V2}

GENERATION_SETTINGS = {
    "max_new_tokens": 384,
    "do_sample": True,
    "temperature": 0.9,
    "top_k": 50,
    "top_p": 0.95,
    "repetition_penalty": 1.1,
    "num_return_sequences": 1,
}


def template_version_of(folder: str) -> str:
    """"v2" for a folder named like pai-bloom-1b1-text2prompt-sd-v2, else "v1" (the original's rule).

    The weights of both versions have the same layout, so only the name can tell them apart.
    """
    name = os.path.basename(os.path.normpath(folder)).lower()
    return "v2" if name.endswith("v2") else "v1"


class BeautifulPrompt(nn.Module):
    """`beautiful_prompt(raw_prompt, seed=None, generator=None) -> str`.

    Sampling is reproducible and leaves every global RNG as it found it. The seed is, in order:
    the call's `seed`, a draw from the call's `generator`, this object's `seed` attribute, or the
    next draw of the global CPU RNG without advancing it (so `torch.manual_seed(s)` before a pipeline
    call decides the refined prompt, as in the original, while the pipeline's noise is unaffected).
    An empty or whitespace-only prompt is returned unchanged.
    """

    def __init__(self, model: nn.Module, tokenizer, template: str = TEMPLATE_V1, seed: int | None = None,
                 generation_settings: dict | None = None, folder: str = ""):
        super().__init__()
        if "{raw_prompt}" not in template:
            raise ValueError(f"a BeautifulPrompt template must contain '{{raw_prompt}}', got {template!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.seed = seed
        self.generation_settings = dict(GENERATION_SETTINGS if generation_settings is None else generation_settings)
        self.folder = folder

    @classmethod
    def from_folder(cls, path: str | os.PathLike, device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32,
                    template: str | None = None, seed: int | None = None) -> "BeautifulPrompt":
        """Load a causal-LM folder (or the folder of a weight file given as `path`) from local files only.

        Without `template`, the folder name picks v1 or v2 (see `template_version_of`).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = model_folder_of(path)
        check_weights_present(folder, BEAUTIFUL_PROMPT_LINK)
        tokenizer = load_pretrained(AutoTokenizer, folder, "BeautifulPrompt tokenizer", BEAUTIFUL_PROMPT_LINK)
        model = load_pretrained(AutoModelForCausalLM, folder, "BeautifulPrompt model", BEAUTIFUL_PROMPT_LINK)
        template = TEMPLATES[template_version_of(folder)] if template is None else template
        return cls(model.to(device=device, dtype=torch_dtype), tokenizer, template, seed=seed, folder=folder)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, raw_prompt: str, seed: int | None = None, generator: torch.Generator | None = None) -> str:
        if not isinstance(raw_prompt, str):
            raise TypeError(f"prompt must be a str, got {type(raw_prompt).__name__}: {raw_prompt!r}")
        if not raw_prompt.strip():
            return raw_prompt
        seed = seed_from(seed if seed is not None or generator is not None else self.seed, generator)
        inputs = self.tokenizer(self.template.format(raw_prompt=raw_prompt), return_tensors="pt").to(self.device)
        with isolated_rng(self.device, seed):
            output_ids = self.model.generate(**inputs, **self.generation_settings)
        new_tokens = output_ids[:, inputs["input_ids"].shape[1]:]
        continuation = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()
        # The original appended ", " even to an empty continuation; a prompt ending in a comma helps nobody.
        return f"{raw_prompt}, {continuation}" if continuation else raw_prompt
