"""Long-prompt chunking, textual-inversion keywords, refiners and SDPrompter.encode_prompt."""

import logging

import pytest
import torch
from torch import nn

from diffsynth.prompts import SDPrompter, load_clip_tokenizer, load_sdxl_tokenizer_2, tokenize_long_prompt

BOS, EOS, CAT = 49406, 49407, 2368


class ToyTextEncoder(nn.Module):
    """Stand-in for SDTextEncoder: (k, 77) ids -> (k, 77, 8), mixing tokens within a row only (like attention)."""

    def __init__(self, extra_tokens=0, hidden=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(49408 + extra_tokens, hidden)
        self.calls = []

    def forward(self, input_ids, clip_skip=1):
        self.calls.append((input_ids.clone(), clip_skip))
        h = self.embed(input_ids)
        return (h + h.mean(dim=1, keepdim=True)) * clip_skip


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def tokenizer_2():
    return load_sdxl_tokenizer_2()  # pads with id 0, so EOS and padding can be told apart


@pytest.fixture
def prompter():
    return SDPrompter()


# --- tokenize_long_prompt ----------------------------------------------------------------


def test_short_prompt_is_one_padded_chunk(tokenizer):
    ids = tokenize_long_prompt(tokenizer, "a photo of a cat")
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [BOS, 320, 1125, 539, 320, CAT, EOS]
    assert set(ids[0, 7:].tolist()) == {EOS}


def test_empty_prompt_is_one_chunk(tokenizer, tokenizer_2):
    assert tokenize_long_prompt(tokenizer, "").tolist() == [[BOS] + [EOS] * 76]
    assert tokenize_long_prompt(tokenizer_2, "").tolist() == [[BOS, EOS] + [0] * 75]


def test_hundred_word_prompt_makes_two_chunks(tokenizer_2):
    ids = tokenize_long_prompt(tokenizer_2, "cat " * 100)  # 100 tokens + BOS + EOS = 102
    assert ids.shape == (2, 77)
    flat = ids.flatten().tolist()
    assert flat[0] == BOS and flat.count(BOS) == 1  # BOS only at the start of chunk 0
    assert ids[1, 0].item() == CAT  # chunk 1 is a bare slice of the prompt
    assert flat[1:101] == [CAT] * 100
    assert flat[101] == EOS and flat.count(EOS) == 1  # EOS right after the last real token
    assert flat[102:] == [0] * (154 - 102)


@pytest.mark.parametrize("words, chunks", [(75, 1), (76, 2), (152, 2), (153, 3)])
def test_chunk_count_is_ceil_of_length(tokenizer, words, chunks):
    prompt = "cat " * words
    ids = tokenize_long_prompt(tokenizer, prompt)
    assert ids.shape == (chunks, 77)
    assert ids.flatten()[: words + 2].tolist() == tokenizer(prompt, verbose=False).input_ids


def test_tokenizer_is_not_modified(tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        tokenize_long_prompt(tokenizer, "cat " * 200)
    assert tokenizer.model_max_length == 77
    assert "longer than the specified maximum" not in caplog.text  # long prompts are expected here


def test_tokenizer_without_context_length_is_refused():
    unlimited = load_clip_tokenizer()
    unlimited.model_max_length = int(1e30)
    with pytest.raises(ValueError, match="model_max_length is 1000000000000000019884624838656.*=77"):
        tokenize_long_prompt(unlimited, "a cat")


def test_prompt_must_be_text(tokenizer):
    with pytest.raises(TypeError, match="prompt must be a str, got list"):
        tokenize_long_prompt(tokenizer, ["a cat"])


# --- textual inversion keywords ----------------------------------------------------------


def test_textual_inversion_ids_are_new_and_in_order(prompter):
    assert prompter.add_textual_inversion("mycat", 3) == [49408, 49409, 49410]
    assert prompter.add_textual_inversion("verybadimagenegative_v1.3", 1) == [49411]
    ids = tokenize_long_prompt(prompter.tokenizer, prompter.process_prompt("a mycat, verybadimagenegative_v1.3"))
    assert ids[0, :8].tolist() == [BOS, 320, 49408, 49409, 49410, 267, 49411, EOS]


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a cat", "a  cat_0 cat_1 "),
        ("catdog and concatenate", "catdog and concatenate"),  # substrings are not keywords
        ("a cat.", "a  cat_0 cat_1 ."),  # sentence-final period is punctuation
        ("(cat:1.2), cat", "( cat_0 cat_1 :1.2),  cat_0 cat_1 "),
        ("cat-like cat_0 cats", "cat-like cat_0 cats"),
    ],
)
def test_keywords_replaced_as_whole_words(prompter, prompt, expected):
    prompter.add_textual_inversion("cat", 2)
    assert prompter.process_prompt(prompt) == expected


def test_keyword_with_dot_and_negative_prompt(prompter):
    prompter.add_textual_inversion("verybadimagenegative_v1.3", 2)
    replaced = " verybadimagenegative_v1.3_0 verybadimagenegative_v1.3_1 "
    assert prompter.process_prompt("verybadimagenegative_v1.3, blurry", positive=False) == replaced + ", blurry"
    assert prompter.process_prompt("verybadimagenegative_v1.35", positive=False) == "verybadimagenegative_v1.35"
    assert prompter.process_prompt("verybadimagenegative_v1", positive=False) == "verybadimagenegative_v1"


def test_longer_keyword_wins_and_replacements_are_not_rewritten(prompter):
    prompter.add_textual_inversion("neg", 1)
    prompter.add_textual_inversion("neg_v2", 1)
    assert prompter.process_prompt("neg neg_v2") == " neg_0   neg_v2_0 "


@pytest.mark.parametrize(
    "keyword, num_vectors, match",
    [
        ("", 1, "non-empty word without spaces, got ''"),
        ("two words", 1, "without spaces, got 'two words'"),
        ("kw", 0, "num_vectors must be an int >= 1, got 0"),
        ("Taken", 1, "'Taken' is already registered"),
    ],
)
def test_bad_textual_inversions_rejected(prompter, keyword, num_vectors, match):
    prompter.add_textual_inversion("taken", 1)
    with pytest.raises(ValueError, match=match):
        prompter.add_textual_inversion(keyword, num_vectors)
    assert len(prompter.tokenizer) == 49409  # nothing was added by the failed call


# --- refiners ----------------------------------------------------------------------------


def test_refiners_apply_to_positive_prompts_before_keywords(prompter, caplog):
    prompter.add_textual_inversion("cat", 1)
    seen = []
    prompter.add_prompt_refiner(lambda p: seen.append(p) or p.strip() + ", masterpiece")
    with caplog.at_level(logging.INFO, logger="diffsynth"):
        assert prompter.process_prompt("cat") == " cat_0 , masterpiece"
    assert seen == ["cat"]  # refiners see the keyword as typed, never the token names
    assert "cat, masterpiece" in caplog.text
    assert prompter.process_prompt("cat", positive=False) == " cat_0 "
    assert seen == ["cat"]


def test_refiner_must_return_text(prompter):
    prompter.add_prompt_refiner(lambda p: None)
    with pytest.raises(TypeError, match="returned NoneType, expected str"):
        prompter.process_prompt("a cat")
    with pytest.raises(TypeError, match="must be callable"):
        prompter.add_prompt_refiner("not a function")


# --- encode_prompt -----------------------------------------------------------------------


def test_encode_short_prompt_shape(prompter):
    encoder = ToyTextEncoder()
    embeddings = prompter.encode_prompt(encoder, "a photo of a cat")
    assert embeddings.shape == (1, 77, 8)
    assert encoder.calls[0][0].shape == (1, 77)


def test_encode_long_prompt_chunks_independently(prompter):
    encoder = ToyTextEncoder()
    prompt = "a photo of a cat, " * 20  # 120 tokens -> 2 chunks
    embeddings = prompter.encode_prompt(encoder, prompt, clip_skip=2)
    ids = tokenize_long_prompt(prompter.tokenizer, prompt)
    assert embeddings.shape == (1, 154, 8)
    assert encoder.calls[-1][1] == 2  # clip_skip reaches the encoder
    with torch.no_grad():
        torch.testing.assert_close(embeddings[0, :77], encoder(ids[0:1], clip_skip=2)[0])
        torch.testing.assert_close(embeddings[0, 77:], encoder(ids[1:2], clip_skip=2)[0])


def test_encode_uses_textual_inversion_ids(prompter):
    ids = prompter.add_textual_inversion("mystyle", 2)
    encoder = ToyTextEncoder(extra_tokens=2)
    prompter.encode_prompt(encoder, "mystyle", positive=False)
    assert encoder.calls[0][0][0, :4].tolist() == [BOS, *ids, EOS]


@pytest.mark.parametrize("clip_skip", [0, -1, 1.5, True])
def test_encode_validates_clip_skip(prompter, clip_skip):
    with pytest.raises(ValueError, match="clip_skip must be an int >= 1"):
        prompter.encode_prompt(ToyTextEncoder(), "a cat", clip_skip=clip_skip)


def test_encode_checks_encoder_output_shape(prompter):
    with pytest.raises(ValueError, match=r"text encoder returned shape \(1, 8\).*expected \(1, 77, hidden\)"):
        prompter.encode_prompt(lambda ids, clip_skip: torch.zeros(1, 8), "a cat")
