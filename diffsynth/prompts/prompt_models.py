"""Which prompt model a Hugging Face folder holds, and loading it for `ModelManager`.

A folder is recognised by the class in its config.json (`architectures`), never by its name; a
weight file inside such a folder is recognised by its keys (see `models/detect.py`) and loads its
folder. The component names are the original's: `translator` and `beautiful_prompt`.
"""
from __future__ import annotations

import os

import torch

from ..models.errors import ModelFileError
from .beautiful_prompt import BeautifulPrompt
from .hf_folder import folder_architecture, model_folder_of
from .translator import Translator

# architectures[0] of config.json -> ModelManager component.
PROMPT_MODEL_CLASSES = {"MarianMTModel": "translator", "BloomForCausalLM": "beautiful_prompt"}


def prompt_model_component(path: str | os.PathLike) -> str | None:
    """"translator" / "beautiful_prompt" when `path` is (a weight file in) such a model folder, else None."""
    return PROMPT_MODEL_CLASSES.get(folder_architecture(model_folder_of(path)))


def load_prompt_model(path: str | os.PathLike, device: str | torch.device, torch_dtype: torch.dtype,
                      expected: str | None = None) -> tuple[str, Translator | BeautifulPrompt]:
    """(component name, loaded model) for a translator or BeautifulPrompt folder or weight file.

    `expected` is the component a weight file's keys pointed to; the folder's config.json must agree.
    The translator runs in fp32 whatever `torch_dtype` is (see `Translator.from_folder`).
    """
    folder = model_folder_of(path)
    architecture = folder_architecture(folder)
    component = PROMPT_MODEL_CLASSES.get(architecture)
    if component is None or (expected is not None and component != expected):
        found = "no config.json" if architecture is None and not os.path.isfile(os.path.join(folder, "config.json")) else f"class {architecture!r} in config.json"
        wanted = f"a {expected} folder" if expected else "a translator or BeautifulPrompt folder"
        raise ModelFileError(
            folder,
            f"should be {wanted} but has {found} (known: {', '.join(f'{cls} = {name}' for cls, name in PROMPT_MODEL_CLASSES.items())}).",
            "Put the whole Hugging Face model folder under models/translator/ (Helsinki-NLP/opus-mt-zh-en) or "
            "models/BeautifulPrompt/ (alibaba-pai/pai-bloom-1b1-text2prompt-sd), with its config.json and tokenizer files.",
        )
    if component == "translator":
        return component, Translator.from_folder(folder, device=device, torch_dtype=torch.float32)
    return component, BeautifulPrompt.from_folder(folder, device=device, torch_dtype=torch_dtype)
