"""Textual inversion: file formats, folder rules, and wiring into tokenizer + text encoder."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.models.errors import ModelFileError
from diffsynth.models.sd_text_encoder import CLIPTextConfig, SDTextEncoder
from diffsynth.models.textual_inversion import (
    apply_textual_inversions,
    load_textual_inversion,
    load_textual_inversion_sdxl,
    load_textual_inversions,
)
from diffsynth.prompts import SDPrompter, load_clip_tokenizer, tokenize_long_prompt

DIM = 128  # width of the tiny text encoder
TINY_CLIP = CLIPTextConfig(hidden_size=DIM, num_layers=2, intermediate_size=64)  # full CLIP vocabulary


def vectors(n: int, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def save_a1111_pt(path, vecs: torch.Tensor) -> None:
    """The structure A1111 writes (the parameter still requires grad)."""
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vecs.clone().requires_grad_(True)},
            "name": path.stem,
            "step": 3000,
            "sd_checkpoint": "81761151",
            "sd_checkpoint_name": "v1-5-pruned-emaonly",
        },
        path,
    )


# --------------------------------------------------------------------------- file formats


def test_a1111_pt_multi_vector(tmp_path):
    vecs = vectors(3)
    save_a1111_pt(tmp_path / "mystyle.pt", vecs)
    keyword, loaded = load_textual_inversion(tmp_path / "mystyle.pt", expected_dim=DIM)
    assert keyword == "mystyle"
    assert loaded.dtype == torch.float32 and not loaded.requires_grad
    assert torch.equal(loaded, vecs)


def test_a1111_safetensors_emb_params_fp16(tmp_path):
    vecs = vectors(2, seed=1).half()
    save_file({"emb_params": vecs}, str(tmp_path / "neg-embed.safetensors"))
    keyword, loaded = load_textual_inversion(tmp_path / "neg-embed.safetensors", expected_dim=DIM)
    assert keyword == "neg-embed" and loaded.shape == (2, DIM)
    assert torch.equal(loaded, vecs.float())


def test_diffusers_learned_embeds_single_vector(tmp_path):
    vec = vectors(1, seed=2)[0]
    torch.save({"<cat-toy>": vec}, tmp_path / "learned_embeds.bin")
    keyword, loaded = load_textual_inversion(tmp_path / "learned_embeds.bin", expected_dim=DIM)
    assert keyword == "learned_embeds"
    assert torch.equal(loaded, vec[None])


def test_sdxl_file_gives_the_half_of_the_requested_width(tmp_path):
    clip_l, clip_g = vectors(2, 768, seed=3), vectors(2, 1280, seed=4)
    path = tmp_path / "xl_style.safetensors"
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(path))

    assert torch.equal(load_textual_inversion(path, expected_dim=768)[1], clip_l)
    assert torch.equal(load_textual_inversion(path, expected_dim=1280)[1], clip_g)
    keyword, l_part, g_part = load_textual_inversion_sdxl(path)
    assert keyword == "xl_style" and torch.equal(l_part, clip_l) and torch.equal(g_part, clip_g)
    with pytest.raises(ModelFileError, match="SDXL embedding.*expected_dim"):
        load_textual_inversion(path)
    with pytest.raises(ModelFileError, match="width 768.*expects width 1024"):
        load_textual_inversion(path, expected_dim=1024)


def test_sdxl_loader_rejects_single_encoder_file(tmp_path):
    save_file({"emb_params": vectors(1, 768)}, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(ModelFileError, match="not an SDXL one"):
        load_textual_inversion_sdxl(tmp_path / "sd15.safetensors")


def test_wrong_width_names_file_and_both_widths(tmp_path):
    path = tmp_path / "sd2thing.safetensors"
    save_file({"emb_params": vectors(2, 1024)}, str(path))
    with pytest.raises(ModelFileError) as info:
        load_textual_inversion(path, expected_dim=768)
    message = str(info.value)
    assert "sd2thing.safetensors" in message and "1024" in message and "768" in message and "SD 2.x" in message


def test_non_embedding_contents_are_errors(tmp_path):
    (tmp_path / "noise.bin").write_bytes(b"\x00garbage that is not a checkpoint")
    with pytest.raises(ModelFileError, match="noise.bin"):
        load_textual_inversion(tmp_path / "noise.bin")

    save_file({"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFileError, match=r"model.safetensors.*not a textual-inversion embedding.*'a.weight'"):
        load_textual_inversion(tmp_path / "model.safetensors")

    save_file({"emb_params": torch.full((1, DIM), float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ModelFileError, match="NaN"):
        load_textual_inversion(tmp_path / "nan.safetensors")


# --------------------------------------------------------------------------- folders


def test_folder_sorted_skips_notes_and_warns_on_other_files(tmp_path, caplog):
    for i, name in enumerate(["zeta", "Alpha", "mid_1"]):
        save_file({"emb_params": vectors(i + 1, seed=i)}, str(tmp_path / f"{name}.safetensors"))
    save_a1111_pt(tmp_path / "beta.pt", vectors(3, seed=9))
    (tmp_path / "README.md").write_text("notes")
    (tmp_path / "zeta.txt").write_text("trigger words")
    (tmp_path / ".hidden.pt").write_bytes(b"junk")
    (tmp_path / "preview.png").write_bytes(b"\x89PNG")
    (tmp_path / "old").mkdir()

    with caplog.at_level(logging.WARNING, logger="diffsynth"):
        embeddings = load_textual_inversions(tmp_path, expected_dim=DIM)

    assert list(embeddings) == ["Alpha", "beta", "mid_1", "zeta"]
    assert [v.shape[0] for v in embeddings.values()] == [2, 3, 3, 1]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "preview.png" in warned and "old" in warned
    assert "README.md" not in warned and ".hidden.pt" not in warned


def test_folder_raises_for_junk_with_an_embedding_extension(tmp_path):
    save_file({"emb_params": vectors(1)}, str(tmp_path / "good.safetensors"))
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "training_state.pt")
    with pytest.raises(ModelFileError, match="training_state.pt"):
        load_textual_inversions(tmp_path, expected_dim=DIM)


def test_folder_wrong_width_and_duplicate_keywords(tmp_path):
    save_file({"emb_params": vectors(1, 768)}, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(ModelFileError, match="sd15.safetensors.*width 768.*expects width 1280"):
        load_textual_inversions(tmp_path, expected_dim=1280)

    save_a1111_pt(tmp_path / "SD15.pt", vectors(1, 768))
    with pytest.raises(ModelFileError, match="'sd15' is already used by .*SD15.pt"):
        load_textual_inversions(tmp_path, expected_dim=768)


def test_missing_folder_is_named(tmp_path):
    missing = tmp_path / "embeddings"
    with pytest.raises(FileNotFoundError, match="embeddings"):
        load_textual_inversions(missing)


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def text_encoder():
    torch.manual_seed(0)
    return SDTextEncoder(TINY_CLIP)


def test_keyword_tokens_address_the_appended_rows(tmp_path, text_encoder):
    save_a1111_pt(tmp_path / "mystyle.pt", vectors(3, seed=5))
    save_file({"emb_params": vectors(1, seed=6)}, str(tmp_path / "badhands.safetensors"))
    embeddings = load_textual_inversions(tmp_path, expected_dim=DIM)
    prompter = SDPrompter(load_clip_tokenizer())

    ids = apply_textual_inversions(embeddings, text_encoder, prompter)

    assert ids == {"badhands": [49408], "mystyle": [49409, 49410, 49411]}
    table = text_encoder.text_model.embeddings.token_embedding.weight
    for keyword, token_ids in ids.items():
        assert torch.equal(table[token_ids], embeddings[keyword])
    prompt_ids = tokenize_long_prompt(prompter.tokenizer, prompter.process_prompt("a photo in mystyle, badhands"))
    row = prompt_ids[0].tolist()
    start = row.index(49409)
    assert row[start : start + 3] == [49409, 49410, 49411] and 49408 in row
    assert prompter.encode_prompt(text_encoder, "mystyle cat").shape == (1, 77, DIM)


def test_misaligned_vocabularies_are_refused_before_any_change(text_encoder):
    tokenizer = load_clip_tokenizer()
    tokenizer.add_tokens(["<stray>"])
    prompter = SDPrompter(tokenizer)
    with pytest.raises(RuntimeError, match="49409 tokens but the text encoder has 49408"):
        apply_textual_inversions({"kw": vectors(1)}, text_encoder, prompter)
    assert prompter.textual_inversions == {}
    assert text_encoder.text_model.embeddings.token_embedding.num_embeddings == 49408


def test_wrong_width_and_duplicate_keywords_refused_before_any_change(text_encoder):
    prompter = SDPrompter(load_clip_tokenizer())
    with pytest.raises(ValueError, match=r"'wide' has shape \(1, 768\)"):
        apply_textual_inversions({"ok": vectors(1), "wide": vectors(1, 768)}, text_encoder, prompter)
    apply_textual_inversions({"ok": vectors(1)}, text_encoder, prompter)
    with pytest.raises(ValueError, match="'OK' is given twice or already loaded"):
        apply_textual_inversions({"OK": vectors(1)}, text_encoder, prompter)
    assert list(prompter.textual_inversions) == ["ok"]
