"""Prompt processing (textual inversion keywords, refiners) and SD 1.x prompt encoding.

Follows DiffSynth-Studio's `Prompter`/`SDPrompter` (upstream_spec §5.2) with one deliberate
change: a textual-inversion keyword is replaced only where it stands as a whole word. The
original replaced substrings, so a keyword "cat" also rewrote "catdog" and "concatenate".
"""

from __future__ import annotations

import logging
import numbers
import re
from collections.abc import Callable, Iterable

import torch

from .long_prompt import tokenize_long_prompt
from .tokenizer import load_clip_tokenizer

logger = logging.getLogger("diffsynth")

PromptRefiner = Callable[[str], str]

# A keyword is a whole word when it is not glued to a word character, nor to a "." or "-"
# that itself continues a word: "v1.3" and "photo-realistic" are single words, but a
# sentence-final "cat." or a parenthesised "(cat:1.2)" still contain the word "cat".
_WORD_START = r"(?<!\w)(?<!\w[.\-])"
_WORD_END = r"(?!\w)(?![.\-]\w)"


def keyword_pattern(keywords: Iterable[str]) -> re.Pattern | None:
    """One regex matching any of `keywords` as a whole word (None when there are none).

    Longer keywords come first so that "neg_v2" wins over "neg" where both could match; a
    single pass also guarantees that inserted token names are never rewritten again.
    """
    ordered = sorted(set(keywords), key=len, reverse=True)
    if not ordered:
        return None
    alternatives = "|".join(re.escape(keyword) for keyword in ordered)
    return re.compile(f"{_WORD_START}(?:{alternatives}){_WORD_END}")


def replace_keywords(prompt: str, pattern: re.Pattern | None, replacements: dict[str, str]) -> str:
    """Replace every whole-word occurrence matched by `pattern` with `replacements[keyword]`."""
    if pattern is None:
        return prompt
    return pattern.sub(lambda match: replacements[match.group(0)], prompt)


def textual_inversion_tokens(keyword: str, num_vectors: int) -> list[str]:
    """The placeholder tokens of a textual inversion: keyword_0 ... keyword_{n-1}."""
    return [f"{keyword}_{i}" for i in range(num_vectors)]


class Prompter:
    """Turns a user prompt into the prompt the tokenizer sees. Shared by the SD and SDXL prompters.

    `prompt_refiners` are callables str -> str (translator, prompt extender...) applied in order
    to positive prompts only; the list is empty by default.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.textual_inversions: dict[str, list[str]] = {}
        self.prompt_refiners: list[PromptRefiner] = []
        self._keyword_regex: re.Pattern | None = None

    def add_textual_inversion(self, keyword: str, num_vectors: int) -> list[int]:
        """Register a textual-inversion keyword and return the ids of its new tokens, in order.

        The tokenizer gets tokens keyword_0 .. keyword_{n-1}; the caller appends the n
        embedding rows to the text encoder in the same order, so row i belongs to id[i].
        The tokenizer is modified in place.
        """
        self._check_new_keyword(keyword, num_vectors)
        tokens = textual_inversion_tokens(keyword, num_vectors)
        first_new_id = len(self.tokenizer)
        added = self.tokenizer.add_tokens(tokens)
        ids = self.tokenizer.convert_tokens_to_ids(tokens)
        expected = list(range(first_new_id, first_new_id + num_vectors))
        if added != num_vectors or ids != expected:
            # The pre-checks make this unreachable with CLIP tokenizers; a foreign tokenizer
            # that merges or renumbers added tokens would silently misalign embedding rows.
            raise RuntimeError(
                f"tokenizer assigned ids {ids} to the tokens of {keyword!r}, expected {expected}; "
                "its added-token handling is incompatible with textual inversion"
            )
        self.textual_inversions[keyword] = tokens
        self._keyword_regex = keyword_pattern(self.textual_inversions)
        return ids

    def _check_new_keyword(self, keyword: str, num_vectors: int) -> None:
        if not isinstance(keyword, str) or not keyword or re.search(r"\s", keyword):
            raise ValueError(f"textual inversion keyword must be a non-empty word without spaces, got {keyword!r}")
        if isinstance(num_vectors, bool) or not isinstance(num_vectors, numbers.Integral) or num_vectors < 1:
            raise ValueError(f"num_vectors must be an int >= 1, got {num_vectors!r} (for keyword {keyword!r})")
        # CLIP lower-cases text before matching tokens, so keywords differing only in case collide.
        taken = {existing.lower() for existing in self.textual_inversions}
        if keyword.lower() in taken:
            raise ValueError(f"textual inversion keyword {keyword!r} is already registered (case-insensitively)")
        vocab = {token.lower() for token in self.tokenizer.get_vocab()}
        clashes = [token for token in textual_inversion_tokens(keyword, num_vectors) if token.lower() in vocab]
        if clashes:
            raise ValueError(
                f"textual inversion keyword {keyword!r} would create tokens that already exist: {clashes[:3]}; "
                "rename the embedding file"
            )

    def add_prompt_refiner(self, refiner: PromptRefiner) -> None:
        """Append a str -> str callable applied to positive prompts after keyword replacement."""
        if not callable(refiner):
            raise TypeError(f"a prompt refiner must be callable (str -> str), got {refiner!r}")
        self.prompt_refiners.append(refiner)

    def process_prompt(self, prompt: str, positive: bool = True) -> str:
        """Replace textual-inversion keywords (both polarities), then run refiners (positive only)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
        replacements = {kw: " " + " ".join(tokens) + " " for kw, tokens in self.textual_inversions.items()}
        processed = replace_keywords(prompt, self._keyword_regex, replacements)
        if positive and self.prompt_refiners:
            for refiner in self.prompt_refiners:
                processed = refiner(processed)
                if not isinstance(processed, str):
                    raise TypeError(f"prompt refiner {refiner!r} returned {type(processed).__name__}, expected str")
            logger.info("Prompt after refiners: %s", processed)
        logger.debug("Final %s prompt: %s", "positive" if positive else "negative", processed)
        return processed


def _check_clip_skip(clip_skip) -> int:
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, numbers.Integral) or clip_skip < 1:
        raise ValueError(f"clip_skip must be an int >= 1 (1 = last layer, 2 = penultimate), got {clip_skip!r}")
    return int(clip_skip)


class SDPrompter(Prompter):
    """Prompter for Stable Diffusion 1.x: one CLIP tokenizer and text encoder."""

    def __init__(self, tokenizer=None):
        super().__init__(tokenizer if tokenizer is not None else load_clip_tokenizer())

    def encode_prompt(
        self,
        text_encoder,
        prompt: str,
        clip_skip: int = 1,
        device: str | torch.device = "cpu",
        positive: bool = True,
    ) -> torch.Tensor:
        """Embeddings of `prompt`, shape (1, 77 * k, hidden), k = number of 77-token chunks.

        `text_encoder(input_ids[k, 77], clip_skip=...)` must return (k, 77, hidden); each
        chunk is encoded on its own (as a batch row) and the rows are laid end to end.
        """
        clip_skip = _check_clip_skip(clip_skip)
        input_ids = tokenize_long_prompt(self.tokenizer, self.process_prompt(prompt, positive=positive))
        embeddings = text_encoder(input_ids.to(device), clip_skip=clip_skip)
        if embeddings.ndim != 3 or tuple(embeddings.shape[:2]) != tuple(input_ids.shape):
            raise ValueError(
                f"text encoder returned shape {tuple(embeddings.shape)} for input ids of shape "
                f"{tuple(input_ids.shape)}; expected ({input_ids.shape[0]}, {input_ids.shape[1]}, hidden)"
            )
        return embeddings.reshape(1, -1, embeddings.shape[-1])
