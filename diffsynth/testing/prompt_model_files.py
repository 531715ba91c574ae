"""Tiny random-weight prompt models saved as real Hugging Face folders, with tokenizers trained offline.

`write_translator_folder` builds a MarianMT folder (two sentencepiece models + vocab.json, exactly the
files of Helsinki-NLP/opus-mt-zh-en, with safetensors weights); `write_beautiful_prompt_folder` builds a
BLOOM causal-LM folder (a byte-level BPE tokenizer.json, as alibaba-pai's models). Both are made in well
under a second; their outputs are gibberish (random weights), fit for plumbing and determinism tests.
Needs `sentencepiece` (Marian) and `tokenizers` (installed with transformers).
"""
from __future__ import annotations

import io
import json
import os

import torch

# Chinese and English so that both tokenizers cover the prompts the tests and examples use.
_CORPUS = (
    ["一个漂亮的女孩", "a beautiful girl", "一只小猫在草地上", "a small cat on the grass", "风景, 日落, 山", "landscape, sunset, mountains",
     "best quality, masterpiece, detailed", "Instruction: Give a simple description of the image to generate a drawing prompt.",
     "Converts a simple image description into a prompt.", "### Input: ### Output:"] * 10
    + [f"picture number {i} 图片 {i}" for i in range(60)]
)


def _train_sentencepiece(path: str, vocab_size: int) -> None:
    import sentencepiece as spm

    buffer = io.BytesIO()
    # No bos/eos/pad pieces: Marian's vocab.json holds </s>, <unk>, <pad> itself.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS), model_writer=buffer, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, pad_id=-1, bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(buffer.getvalue())


def write_translator_folder(folder: str, seed: int = 0, vocab_size: int = 80) -> str:
    """A tiny MarianMT zh->en folder at `folder` (created); returns `folder`."""
    import sentencepiece as spm
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    os.makedirs(folder, exist_ok=True)
    for name in ("source.spm", "target.spm"):
        _train_sentencepiece(os.path.join(folder, name), vocab_size)
    pieces = spm.SentencePieceProcessor(model_file=os.path.join(folder, "source.spm"))
    vocab = {"</s>": 0, "<unk>": 1, "<pad>": 2}
    for i in range(pieces.get_piece_size()):
        vocab.setdefault(pieces.id_to_piece(i), len(vocab))
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    tokenizer = MarianTokenizer(
        source_spm=os.path.join(folder, "source.spm"), target_spm=os.path.join(folder, "target.spm"),
        vocab=os.path.join(folder, "vocab.json"), source_lang="zh", target_lang="en", model_max_length=64,
    )
    config = MarianConfig(
        vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, forced_eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MarianMTModel(config).eval()
    # opus-mt ships beam search (num_beams 4, max_length 512) in its generation config; smaller here for speed.
    model.generation_config.update(num_beams=2, max_length=24)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_beautiful_prompt_folder(folder: str, seed: int = 0, vocab_size: int = 300) -> str:
    """A tiny BLOOM causal-LM folder at `folder` (created); returns `folder`.

    Name the folder `...-v2` to have ModelManager pick the v2 template, as for the real models.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import BloomConfig, BloomForCausalLM, PreTrainedTokenizerFast

    os.makedirs(folder, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=16, n_layer=2, n_head=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BloomForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
