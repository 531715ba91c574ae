"""Tokenization, long prompts, textual inversion keywords and prompt encoding."""

from .long_prompt import tokenize_long_prompt
from .prompter import Prompter, SDPrompter
from .tokenizer import load_clip_tokenizer, load_sdxl_tokenizer_2

__all__ = ["Prompter", "SDPrompter", "load_clip_tokenizer", "load_sdxl_tokenizer_2", "tokenize_long_prompt"]
