"""Prompt processing (textual inversion keywords, refiners) and SD 1.x prompt encoding.

Follows DiffSynth-Studio's `Prompter`/`SDPrompter` (upstream_spec §5.2) with deliberate changes:
- a textual-inversion keyword is replaced only where it stands as a whole word. The original
  replaced substrings, so a keyword "cat" also rewrote "catdog" and "concatenate";
- translation and refining see the prompt as the user wrote it, keywords included, and the
  keywords are replaced by their token names last. The original replaced them first, so the
  translator mangled "cat_0 cat_1" and BeautifulPrompt continued from token names;
- keywords are kept out of translation (the text between them is translated piece by piece);
- the prompt after translation and refining goes to the "diffsynth" logger, not to print.
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
# CJK and Hangul characters do not continue a word: those scripts write no spaces, so in
# "一个mystyle风格的女孩" the keyword "mystyle" stands on its own.
_WORD_CHAR = r"[^\W\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff]"
_WORD_START = rf"(?<!{_WORD_CHAR})(?<!{_WORD_CHAR}[.\-])"
_WORD_END = rf"(?!{_WORD_CHAR})(?![.\-]{_WORD_CHAR})"


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

    Positive prompts go through `translator` (a `Translator`, or any str -> str), then
    `beautiful_prompt` (a `BeautifulPrompt`, or any str -> str), then the extra `prompt_refiners`
    in order; all are optional. Negative prompts skip them. Textual-inversion keywords are
    replaced by their tokens last, in both polarities.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.textual_inversions: dict[str, list[str]] = {}
        self.translator: PromptRefiner | None = None
        self.beautiful_prompt: PromptRefiner | None = None
        self.prompt_refiners: list[PromptRefiner] = []
        self._keyword_regex: re.Pattern | None = None

    def fetch_prompt_models(self, model_manager) -> None:
        """Use the manager's `translator` and `beautiful_prompt` models, where it holds them (None otherwise)."""
        self.translator = model_manager.model.get("translator")
        self.beautiful_prompt = model_manager.model.get("beautiful_prompt")

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
        """Append a str -> str callable, applied to positive prompts after translation and BeautifulPrompt."""
        if not callable(refiner):
            raise TypeError(f"a prompt refiner must be callable (str -> str), got {refiner!r}")
        self.prompt_refiners.append(refiner)

    def process_prompt(self, prompt: str, positive: bool = True) -> str:
        """Refine a positive prompt (`refine_prompt`), then replace textual-inversion keywords (both polarities)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
        refined = self.refine_prompt(prompt) if positive else prompt
        replacements = {kw: " " + " ".join(tokens) + " " for kw, tokens in self.textual_inversions.items()}
        processed = replace_keywords(refined, self._keyword_regex, replacements)
        logger.debug("Final %s prompt: %s", "positive" if positive else "negative", processed)
        return processed

    def refine_prompt(self, prompt: str) -> str:
        """translate -> BeautifulPrompt -> extra refiners. A blank prompt is returned untouched.

        The result is logged (logger "diffsynth", INFO) whenever a step ran. Textual-inversion
        keywords are not translated.
        """
        steps = [("translated", self._translate)] if self.translator is not None else []
        if self.beautiful_prompt is not None:
            steps.append(("refined by BeautifulPrompt", self.beautiful_prompt))
        steps += [(f"refined by {getattr(refiner, '__name__', type(refiner).__name__)}", refiner) for refiner in self.prompt_refiners]
        if not prompt.strip() or not steps:
            return prompt
        refined = prompt
        for label, step in steps:
            refined = step(refined)
            if not isinstance(refined, str):
                raise TypeError(f"prompt refiner {step!r} returned {type(refined).__name__}, expected str")
            logger.debug("Prompt %s: %s", label, refined)
        logger.info("Prompt after translation/refining: %s", refined)
        return refined

    def _translate(self, prompt: str) -> str:
        """Translate the text around textual-inversion keywords; the keywords stay as they are.

        Pieces without a letter or digit (commas, spaces) are kept, not translated. The translated
        pieces and keywords are joined with single spaces.
        """
        if self._keyword_regex is None:
            return self.translator(prompt)
        pieces, start = [], 0
        for match in self._keyword_regex.finditer(prompt):
            pieces += [self._translate_piece(prompt[start:match.start()]), match.group(0)]
            start = match.end()
        pieces.append(self._translate_piece(prompt[start:]))
        return " ".join(piece for piece in pieces if piece)

    def _translate_piece(self, text: str) -> str:
        text = text.strip()
        if not re.search(r"[^\W_]", text):
            return text
        translated = self.translator(text)
        if not isinstance(translated, str):
            raise TypeError(f"translator {self.translator!r} returned {type(translated).__name__}, expected str")
        return translated.strip()


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
