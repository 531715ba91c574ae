"""The packaged CLIP tokenizer against golden ids and open_clip's reference implementation."""

import importlib.util
import os
from importlib import resources

import pytest

from diffsynth.prompts import load_clip_tokenizer, load_sdxl_tokenizer_2
from diffsynth.prompts.tokenizer import clip_vocab_and_merges

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.fixture(scope="module")
def open_clip_reference():
    """open_clip's SimpleTokenizer, loaded from its file: `import open_clip` would need torchvision."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch (installed with --no-deps) is the reference tokenizer")
    path = os.path.join(spec.submodule_search_locations[0], "tokenizer.py")
    module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


def test_golden_ids(tokenizer):
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS


def test_vocabulary_size_and_special_tokens(tokenizer):
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (49406, 49407, 49407)
    assert tokenizer.model_max_length == 77


def test_vocabulary_spot_checks_against_real_sd_tokenizer():
    # entries of a real SD `tokenizer/vocab.json` (reference/test_assets.md §1.1)
    vocab, merges = clip_vocab_and_merges()
    expected = {"!!": 1443, "'s</w>": 568, "aaaah</w>": 49151, "abhcosmetics</w>": 49189,
                "!!!!!!!!!!!</w>": 49339, "<|startoftext|>": 49406, "<|endoftext|>": 49407}
    assert {token: vocab[token] for token in expected} == expected
    assert len(merges) == 48894 and all(isinstance(pair, tuple) and len(pair) == 2 for pair in merges)


def test_vocabulary_equals_open_clip(open_clip_reference):
    vocab, _ = clip_vocab_and_merges()
    reference = dict(open_clip_reference.encoder)
    # open_clip spells the special tokens differently; their ids are the same
    reference["<|startoftext|>"] = reference.pop("<start_of_text>")
    reference["<|endoftext|>"] = reference.pop("<end_of_text>")
    assert vocab == reference


@pytest.mark.parametrize(
    "text",
    [
        "a photo of a cat",
        "A PHOTO of an astronaut riding a horse, 8k, masterpiece!!!",
        "(masterpiece:1.2), best quality, <lora:foo:0.8> [cat|dog] café naïve 日本語 emoji 🐱",
        "  multiple   spaces\nnewline\ttab  ",
        "don't can't won't it's",
        "1234567890 3.14 #hashtag @user",
        "embedding:myconcept, photo-realistic",
    ],
)
def test_agrees_with_open_clip(tokenizer, open_clip_reference, text):
    assert tokenizer(text).input_ids == [49406, *open_clip_reference.encode(text), 49407]


def test_padding_tokens():
    first = load_clip_tokenizer()(["a photo of a cat"], padding="max_length", max_length=77).input_ids[0]
    second = load_sdxl_tokenizer_2()(["a photo of a cat"], padding="max_length", max_length=77).input_ids[0]
    assert first[:7] == second[:7] == CAT_IDS
    assert set(first[7:]) == {49407}  # SD 1.x pads with EOS
    assert set(second[7:]) == {0}  # SDXL tokenizer 2 pads with "!"
    assert load_sdxl_tokenizer_2().pad_token == "!"


def test_vocabulary_is_built_once_and_tokenizers_are_independent():
    clip_vocab_and_merges()
    hits = clip_vocab_and_merges.cache_info().hits
    a, b = load_clip_tokenizer(), load_clip_tokenizer()
    assert clip_vocab_and_merges.cache_info().hits == hits + 2
    a.add_tokens(["mykeyword_0"])
    assert len(a) == 49409 and len(b) == 49408
    assert len(clip_vocab_and_merges()[0]) == 49408  # the cached vocabulary was not touched


def test_merges_file_is_package_data():
    data = resources.files("diffsynth.prompts").joinpath("data")
    assert data.joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()[:2] == b"\x1f\x8b"  # gzip magic
    assert "Copyright (c) 2021 OpenAI" in data.joinpath("LICENSE-CLIP.txt").read_text(encoding="utf-8")
