"""The CLIP BPE tokenizer, built offline from the merges file shipped in this package.

Stable Diffusion 1.x and both SDXL text encoders use OpenAI CLIP's byte-level BPE
(49,408 tokens). Instead of shipping HF `vocab.json` / `merges.txt` (1.5 MB) we ship the
original compressed merges file (`data/bpe_simple_vocab_16e6.txt.gz`, MIT, see
`data/LICENSE-CLIP.txt`) and derive the vocabulary in memory the way CLIP's own tokenizer
does. The result is content-identical to the `tokenizer/` folder of real SD checkpoints
(checked in reference/test_assets.md §1.1).
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

from transformers import CLIPTokenizer

MERGES_RESOURCE = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77  # positions of the CLIP text transformer
# CLIP uses the first 49152 - 256 - 2 merges of the file (after its header line): together
# with 512 byte tokens and 2 special tokens that makes exactly 49408 entries.
NUM_MERGES = 49152 - 256 - 2


def byte_to_unicode_table() -> dict[int, str]:
    """Map each byte 0..255 to a printable unicode character (byte-level BPE alphabet).

    Printable Latin-1 bytes map to themselves; the 68 others (controls, space, ...) map, in
    byte order, to code points 256, 257, ... so every byte has a visible, unique symbol.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def parse_merges(text: str) -> tuple[tuple[str, str], ...]:
    """Parse CLIP's merges file (header line, then "left right" pairs) into the pairs CLIP uses."""
    lines = text.split("\n")[1 : NUM_MERGES + 1]
    merges = tuple(tuple(line.split()) for line in lines)
    malformed = [line for line, pair in zip(lines, merges) if len(pair) != 2]
    if len(merges) != NUM_MERGES or malformed:
        raise ValueError(
            f"CLIP merges file is damaged: expected {NUM_MERGES} 'left right' lines, got {len(merges)} "
            f"({len(malformed)} malformed, e.g. {malformed[:3]}); reinstall the package"
        )
    return merges


def build_vocab(merges: tuple[tuple[str, str], ...]) -> dict[str, int]:
    """Token -> id in CLIP's order: 256 byte symbols, the same with "</w>", one token per merge, BOS, EOS."""
    symbols = list(byte_to_unicode_table().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"built a CLIP vocabulary of {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Read the packaged merges file once and return (vocab, merges). Callers must not mutate vocab."""
    packed = resources.files("diffsynth.prompts").joinpath("data").joinpath(MERGES_RESOURCE).read_bytes()
    merges = parse_merges(gzip.decompress(packed).decode("utf-8"))
    return build_vocab(merges), merges


def load_clip_tokenizer(pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """Return a fresh CLIP tokenizer (SD 1.x, SDXL tokenizer 1) with model_max_length 77.

    Each call returns a new object, so adding textual-inversion tokens to one tokenizer does
    not leak into another. Nothing is downloaded.
    """
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        # copies: the cached vocabulary is shared between all tokenizers built here
        vocab=dict(vocab),
        merges=list(merges),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=CLIP_MAX_LENGTH,
    )


def load_sdxl_tokenizer_2() -> CLIPTokenizer:
    """SDXL's second tokenizer: the same vocabulary, padded with "!" (id 0) as in SDXL's tokenizer_2."""
    return load_clip_tokenizer(pad_token="!")
