"""Tokenization, long prompts, textual inversion keywords and prompt encoding."""

from .beautiful_prompt import BeautifulPrompt
from .long_prompt import tokenize_long_prompt
from .prompter import Prompter, SDPrompter
from .sdxl_prompter import SDXLPrompter
from .tokenizer import load_clip_tokenizer, load_sdxl_tokenizer_2
from .translator import Translator

__all__ = ["BeautifulPrompt", "Translator", "Prompter", "SDPrompter", "SDXLPrompter", "load_clip_tokenizer", "load_sdxl_tokenizer_2", "tokenize_long_prompt"]
