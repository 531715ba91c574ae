"""Prompts longer than CLIP's 77 positions, split into independent 77-token chunks.

DiffSynth-Studio behaviour (upstream_spec §5.1): the prompt is tokenized once, without
truncation, to length L (BOS and EOS included); the ids are padded to the next multiple of
77 and cut into k rows. BOS therefore only starts chunk 0, EOS only follows the last real
token, and middle chunks are bare slices of the prompt. Each row is encoded on its own and
the embeddings are concatenated along the sequence (see `SDPrompter.encode_prompt`).
"""

from __future__ import annotations

import torch

# A larger chunk means the tokenizer was built without model_max_length and reports its
# "unlimited" sentinel (1e30), which would create absurd padding rather than 77-token rows.
MAX_SENSIBLE_CHUNK = 4096


def chunk_length_of(tokenizer) -> int:
    """The row width: the tokenizer's model_max_length (77 for every CLIP tokenizer)."""
    length = tokenizer.model_max_length
    if not 1 <= length <= MAX_SENSIBLE_CHUNK:
        raise ValueError(
            f"tokenizer.model_max_length is {length}, not a text-encoder context length; build the "
            "tokenizer with model_max_length=77 (diffsynth.prompts.load_clip_tokenizer does)"
        )
    return int(length)


def tokenize_long_prompt(tokenizer, prompt: str) -> torch.LongTensor:
    """Token ids of `prompt` as a LongTensor of shape (k, 77), k = ceil(L / 77), k >= 1.

    The tokenizer is not modified: we tokenize without truncation (and without its
    "sequence too long" warning, since long prompts are expected here) and pad by hand.
    The empty prompt gives one row [BOS, EOS, pad, ...].
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
    width = chunk_length_of(tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; give it one (CLIP uses '<|endoftext|>', SDXL's second '!')")
    ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
    num_chunks = max(1, -(-len(ids) // width))
    ids = ids + [pad_id] * (num_chunks * width - len(ids))
    return torch.tensor(ids, dtype=torch.long).reshape(num_chunks, width)
