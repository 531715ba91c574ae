"""SDXL networks and files: parity with diffusers / transformers on the same tiny random weights,
single-file key mapping checked by diffusers' own converters, loading, detection, refiner refusal."""
from __future__ import annotations

import os

import pytest
import torch

from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from diffsynth import ModelFileError, ModelManager
from diffsynth.models import convert
from diffsynth.models.detect import detect
from diffsynth.models.sdxl_text_encoder import (
    SDXLTextEncoder2,
    convert_hf_text_to_open_clip,
    convert_open_clip_text_to_hf,
    infer_text_encoder_2_config,
)
from diffsynth.models.sdxl_unet import SDXL_UNET_CONFIG, SDXLUNet, add_time_ids, sdxl_added_condition
from diffsynth.models.state_dict import load_state_dict, read_header
from diffsynth.prompts import load_clip_tokenizer, load_sdxl_tokenizer_2, tokenize_long_prompt
from diffsynth.testing import factory

TOL = 1e-4
PREFIX = factory.SDXL_LDM_PREFIX


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a - b).abs().max().item()
    assert diff <= TOL and diff <= 1e-3 * a.abs().max().item(), (diff, a.abs().max().item())


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b), (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    bad = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


def hf_state(model, sd: dict) -> dict:
    """Our ``text_model.*`` names for a transformers model (>= 5.6 flattens CLIPTextModel)."""
    return sd if hasattr(model, "text_model") else {k.removeprefix("text_model."): v for k, v in sd.items()}


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    return factory.write_sdxl_checkpoint(str(tmp_path_factory.mktemp("sdxl") / "tiny_sdxl.safetensors"), seed=1)


@pytest.fixture(scope="module")
def manager(sdxl_file):
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([sdxl_file])
    return mm


@pytest.fixture(scope="module")
def raw(sdxl_file):
    return load_state_dict(sdxl_file)


def prompt_ids(tokenizer, prompts):
    return torch.cat([tokenize_long_prompt(tokenizer, p) for p in prompts])


PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, highly detailed", ""]


# --------------------------------------------------------------------------- single-file key mapping


def test_single_file_mapping_equals_diffusers_converters(manager, raw):
    """Every component we load from an SDXL single file, renamed to diffusers/transformers names,
    equals what diffusers' own LDM converters make of the same file, tensor for tensor."""
    ucfg = {k: v for k, v in factory.diffusers_sdxl_unet_config(factory.TINY_SDXL_UNET).items() if not k.startswith("_")}
    ref_unet = convert_ldm_unet_checkpoint(raw, dict(ucfg, upcast_attention=False))
    assert_same_state(convert.convert_unet_to_diffusers(manager.unet.state_dict(), manager.unet.config), ref_unet)

    vcfg = {k: v for k, v in factory.diffusers_vae_config(factory.TINY_SDXL_VAE).items() if not k.startswith("_")}
    ref_vae = convert_ldm_vae_checkpoint(raw, vcfg)
    ours_vae = {**manager.vae_encoder.state_dict(), **manager.vae_decoder.state_dict()}
    assert_same_state(convert.convert_vae_to_diffusers(ours_vae, manager.vae_decoder.config), ref_vae)

    ref_te1 = convert_ldm_clip_checkpoint(raw, remove_prefix=PREFIX["text_encoder"])
    ref_te1 = {k: v for k, v in ref_te1.items() if not k.endswith("position_ids")}
    assert_same_state(manager.text_encoder.state_dict(), ref_te1)

    te2 = CLIPTextModelWithProjection(HFCLIPTextConfig(**factory.clip_text_2_hf_config(factory.TINY_SDXL_TEXT_2)))
    ref_te2 = convert_open_clip_checkpoint(te2, raw, prefix=PREFIX["text_encoder_2"])
    assert_same_state(manager.text_encoder_2.state_dict(), ref_te2)


def test_open_clip_layout_round_trip_and_strictness(manager):
    hf = manager.text_encoder_2.state_dict()
    oc = convert_hf_text_to_open_clip(hf)
    assert oc["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 128, 128)
    assert oc["text_projection"].shape == (128, 96)  # stored [width, projection], applied as x @ P
    assert_same_state(convert_open_clip_text_to_hf(dict(oc, logit_scale=torch.tensor(4.6))), hf)
    assert infer_text_encoder_2_config(hf) == factory.TINY_SDXL_TEXT_2
    with pytest.raises(ModelFileError, match="lacks the OpenCLIP text-encoder entry 'ln_final.bias'") as err:
        convert_open_clip_text_to_hf({k: v for k, v in oc.items() if k != "ln_final.bias"}, source="x.safetensors")
    assert "x.safetensors" in str(err.value)
    with pytest.raises(ModelFileError, match="not part of an OpenCLIP text encoder.*visual.proj"):
        convert_open_clip_text_to_hf(dict(oc, **{"visual.proj": torch.zeros(1)}))


# --------------------------------------------------------------------------- numerical parity


def test_unet_matches_diffusers_text_time(manager, raw):
    """Our UNet + added condition vs diffusers UNet2DConditionModel(addition_embed_type="text_time"),
    the latter loaded through diffusers' own converter; a square and a 16:9 latent."""
    ucfg = {k: v for k, v in factory.diffusers_sdxl_unet_config(factory.TINY_SDXL_UNET).items() if not k.startswith("_")}
    ref = UNet2DConditionModel(**ucfg).eval()
    ref.load_state_dict(convert_ldm_unet_checkpoint(raw, dict(ucfg, upcast_attention=False)), strict=True)
    gen = torch.Generator().manual_seed(3)
    for h, w in ((8, 8), (9, 16)):
        x = torch.randn(2, 4, h, w, generator=gen)
        ctx = torch.randn(2, 77, factory.TINY_SDXL_UNET.context_dim, generator=gen)
        pooled = torch.randn(2, factory.TINY_SDXL_TEXT_2.projection_dim, generator=gen)
        time_ids = torch.cat([add_time_ids(h * 8, w * 8), torch.tensor([[768.0, 1344, 16, 8, 1024, 1024]])])
        with torch.no_grad():
            for t in (999, 3):
                ours = manager.unet(x, t, ctx, y=sdxl_added_condition(pooled, time_ids, manager.unet.config))
                theirs = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
                assert ours.std() > 0.05
                assert_close(ours, theirs)


def test_text_encoder_1_is_clip_l_penultimate(manager):
    """SDXL's first encoder = transformers CLIPTextModel hidden_states[-1 - clip_skip], no final LayerNorm."""
    ref = CLIPTextModel(HFCLIPTextConfig(**factory.clip_text_hf_config(factory.TINY_SDXL_TEXT))).eval()
    ref.load_state_dict(hf_state(ref, manager.text_encoder.state_dict()), strict=True)
    ids = prompt_ids(load_clip_tokenizer(), PROMPTS)
    with torch.no_grad():
        hs = ref(ids, output_hidden_states=True).hidden_states
        assert_close(manager.text_encoder(ids), hs[-2])
        assert_close(manager.text_encoder(ids, clip_skip=2), hs[-3])
    with pytest.raises(ValueError, match="clip_skip must be an int between 1 and 2"):
        manager.text_encoder(ids, clip_skip=3)


def test_text_encoder_2_is_bigg_with_projection(manager, raw):
    """SDXL's second encoder = transformers CLIPTextModelWithProjection (weights by diffusers' OpenCLIP
    converter): hidden_states[-clip_skip] without LayerNorm, and text_embeds as the pooled output."""
    ref = CLIPTextModelWithProjection(HFCLIPTextConfig(**factory.clip_text_2_hf_config(factory.TINY_SDXL_TEXT_2))).eval()
    ref.load_state_dict(convert_open_clip_checkpoint(ref, raw, prefix=PREFIX["text_encoder_2"]), strict=True)
    ids = prompt_ids(load_sdxl_tokenizer_2(), PROMPTS)
    assert (ids == 0).any()  # padded with "!" (id 0), so argmax and first-EOS agree
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        pooled, hidden = manager.text_encoder_2(ids)
        assert_close(hidden, out.hidden_states[-2])
        assert_close(pooled, out.text_embeds)
        _, hidden_3 = manager.text_encoder_2(ids, clip_skip=3)
        assert_close(hidden_3, out.hidden_states[-3])
        # clip_skip=1: the last layer, still without the final LayerNorm
        assert_close(manager.text_encoder_2(ids, clip_skip=1)[1], out.hidden_states[-1])


def test_pooled_position_of_a_chunk_without_end_token(manager):
    """The first chunk of a long prompt has no EOS: pooled at its largest id (DiffSynth-Studio's argmax)."""
    ids = tokenize_long_prompt(load_sdxl_tokenizer_2(), "a red car " * 40)[:1]
    assert not (ids == 49407).any()
    te2 = manager.text_encoder_2
    with torch.no_grad():
        pooled, _ = te2(ids)
        x = te2.hidden_states(ids, te2.config.num_layers)
        expected = te2.text_projection(te2.text_model.final_layer_norm(x)[0, ids[0].argmax()])
    assert_close(pooled[0], expected)


def test_full_size_defaults_are_sdxl():
    with torch.device("meta"):
        unet = SDXLUNet()
        te2 = SDXLTextEncoder2()
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # diffusers' SDXL base UNet
    assert sum(p.numel() for p in te2.parameters()) == 694_659_840  # bigG text tower + projection
    assert SDXL_UNET_CONFIG.adm_in_channels == 2816 and SDXL_UNET_CONFIG.context_dim == 2048


# --------------------------------------------------------------------------- loading and detection


def test_sdxl_file_is_detected_and_loaded_completely(sdxl_file, manager):
    assert detect(read_header(sdxl_file), sdxl_file).family == "sdxl_checkpoint"
    assert set(manager.model) == {"unet", "text_encoder", "text_encoder_2", "vae_encoder", "vae_decoder"}
    ref = factory.build_sdxl_state_dicts(seed=1)
    assert_same_state(manager.unet.state_dict(), ref["unet"])
    assert_same_state(manager.text_encoder.state_dict(), ref["text_encoder"])
    assert_same_state(manager.text_encoder_2.state_dict(), ref["text_encoder_2"])
    assert manager.vae_decoder.config.scaling_factor == manager.vae_encoder.config.scaling_factor == 0.13025


def test_half_precision_manager_keeps_the_sdxl_vae_in_float32(sdxl_file):
    mm = ModelManager(torch_dtype=torch.float16, device="cpu")
    mm.load_models([sdxl_file])
    assert mm.unet.dtype == mm.text_encoder_2.dtype == torch.float16
    assert mm.vae_decoder.dtype == mm.vae_encoder.dtype == torch.float32


def test_diffusers_folder_loads_like_the_single_file(tmp_path, manager):
    folder = factory.write_sdxl_diffusers_folder(str(tmp_path / "tiny_sdxl_diffusers"), seed=1)
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([folder])
    assert set(mm.model) == set(manager.model)
    for name in manager.model:
        assert type(mm.model[name]) is type(manager.model[name]), name
        assert_same_state(mm.model[name].state_dict(), manager.model[name].state_dict())
    assert mm.unet.config == manager.unet.config and mm.vae_decoder.config == manager.vae_decoder.config
    # one component folder on its own
    mm2 = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm2.load_models([os.path.join(folder, "text_encoder_2")])
    assert set(mm2.model) == {"text_encoder_2"}


def test_standalone_vae_after_an_sdxl_checkpoint_gets_sdxl_scaling(tmp_path, sdxl_file):
    vae = factory.write_vae(str(tmp_path / "sdxl_vae.safetensors"), seed=4)
    mm = ModelManager(torch_dtype=torch.float16, device="cpu")
    mm.load_models([sdxl_file, vae])
    assert mm.model_path["vae_decoder"] == vae
    assert mm.vae_decoder.config.scaling_factor == 0.13025 and mm.vae_decoder.dtype == torch.float32


def _save(path, sd):
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return str(path)


def test_refiner_is_refused_with_a_clear_error(tmp_path):
    unet = {f"model.diffusion_model.{k}": torch.zeros(1) for k in ("input_blocks.0.0.weight", "label_emb.0.0.weight", "input_blocks.9.0.in_layers.0.weight")}
    full = dict(unet, **{"conditioner.embedders.0.model.ln_final.weight": torch.zeros(1), "first_stage_model.decoder.conv_in.weight": torch.zeros(1)})
    for name, sd in (("refiner.safetensors", full), ("refiner_unet_only.safetensors", unet)):
        path = _save(tmp_path / name, sd)
        assert detect(read_header(path), path).family == "sdxl_refiner"
        with pytest.raises(ModelFileError, match="SDXL refiner is not supported.*SDXL base or SDXL Turbo") as err:
            ModelManager(device="cpu").load_models([path])
        assert name in str(err.value)


def test_lora_for_sdxl_is_detected_and_needs_both_encoders(tmp_path, sdxl_file):
    lora = factory.write_sdxl_lora(str(tmp_path / "sdxl_lora.safetensors"))
    assert detect(read_header(lora), lora).family == "lora"
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([sdxl_file])
    del mm.model["text_encoder_2"]
    with pytest.raises(ValueError, match="text_encoder_2 weights.*lora_te2_"):
        mm.load_lora(lora, 1.0)


def test_sdxl_side_files_match_their_families(tmp_path):
    """SDXL LoRA, SDXL embeddings and the diffusers SDXL component files are recognised by content."""
    folder = factory.write_sdxl_diffusers_folder(str(tmp_path / "xl"))
    expected = {
        factory.write_sdxl_lora(str(tmp_path / "l.safetensors")): "lora",
        factory.write_sdxl_textual_inversion(str(tmp_path / "ti.safetensors")): "textual_inversion",
        os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"): "unet_diffusers",
        os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"): "vae_diffusers",
        os.path.join(folder, "text_encoder", "model.safetensors"): "clip_text",
        os.path.join(folder, "text_encoder_2", "model.safetensors"): "clip_text",
    }
    for path, family in expected.items():
        assert detect(read_header(path), path).family == family, path
    # a CLIPTextModelWithProjection file on its own is SDXL's second encoder, projection included
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([os.path.join(folder, "text_encoder_2", "model.safetensors")])
    assert set(mm.model) == {"text_encoder_2"} and "text_projection.weight" in mm.text_encoder_2.state_dict()
