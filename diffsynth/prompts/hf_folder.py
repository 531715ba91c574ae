"""Shared pieces of the prompt models (translator, BeautifulPrompt): reading a Hugging Face model
folder from disk only, and running `generate` without touching the caller's random streams.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Iterator

import torch

from ..models.errors import ModelFileError

# Weight files transformers' from_pretrained reads, in its order of preference.
HF_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def model_folder_of(path: str | os.PathLike) -> str:
    """The model folder for `path`: the folder itself, or the folder holding a weight file."""
    path = os.fspath(path)
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def folder_architecture(folder: str) -> str | None:
    """The first entry of `architectures` in the folder's config.json; None without a config.json."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(config_path, f"cannot be read as JSON ({exc}).", "Download the model folder's config.json again.") from exc
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return architectures[0] if isinstance(architectures, list) and architectures else None


def check_weights_present(folder: str, link: str) -> None:
    if not any(os.path.isfile(os.path.join(folder, name)) for name in HF_WEIGHT_NAMES):
        raise ModelFileError(folder, f"holds no weight file (expected one of: {', '.join(HF_WEIGHT_NAMES)}).", f"Download every file of {link} into this folder.")


def load_pretrained(loader, folder: str, what: str, link: str):
    """`loader.from_pretrained(folder)` from local files only; a failure names the folder and the download link.

    Pickled weights (pytorch_model.bin) are read by transformers with weights_only=True.
    """
    try:
        return loader.from_pretrained(folder, local_files_only=True)
    except ImportError as exc:
        raise ImportError(f"loading the {what} in {folder} needs a package that is not installed: {exc}. "
                          "For MarianMT translators: pip install sentencepiece") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:  # TypeError: transformers' reaction to a missing tokenizer file
        raise ModelFileError(folder, f"could not be loaded as a {what} ({type(exc).__name__}: {exc}).",
                             f"Download every file of {link} (config, tokenizer and weights) into this folder.") from exc


@contextmanager
def isolated_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Run a block with the CPU RNG (and the CUDA RNG of `device`) seeded with `seed`, then restore them.

    transformers' sampling draws from the global RNG of the logits' device and accepts no generator;
    forking keeps the pipeline's noise independent of whether, and how much, a prompt model sampled.
    """
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def seed_from(seed: int | None, generator: torch.Generator | None) -> int:
    """An explicit seed; else one drawn from `generator`; else the next draw of the global CPU RNG, which is not advanced.

    The last case makes `torch.manual_seed(s)` decide the result, as in the original (which sampled
    from the global RNG), while the global stream itself stays untouched.
    """
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0 or None, got {seed!r}")
        return seed
    if generator is not None:
        return int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        return int(torch.randint(0, 2**62, (1,)))
