"""SDXLImagePipeline end to end on a tiny random SDXL model: parity with DiffSynth-Studio's semantics
written out on diffusers/transformers modules, determinism, 16:9, img2img, tiling, Turbo, TI, LoRA."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from diffsynth import ModelManager, SDImagePipeline, SDXLImagePipeline
from diffsynth.models.state_dict import load_state_dict
from diffsynth.progress import ProgressEvent
from diffsynth.prompts import load_clip_tokenizer, load_sdxl_tokenizer_2, tokenize_long_prompt
from diffsynth.testing import factory


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    return factory.write_sdxl_checkpoint(str(tmp_path_factory.mktemp("sdxl_pipe") / "tiny_sdxl.safetensors"), seed=2)


@pytest.fixture(scope="module")
def pipe(sdxl_file):
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([sdxl_file])
    return SDXLImagePipeline.from_model_manager(mm)


def _render(pipe, seed=0, **kw):
    kw.setdefault("height", 64)
    kw.setdefault("width", 64)
    kw.setdefault("num_inference_steps", 3)
    kw.setdefault("progress_bar_cmd", None)
    torch.manual_seed(seed)
    return np.asarray(pipe(kw.pop("prompt", "a photo of a cat"), **kw))


# --------------------------------------------------------------------------- reference


@pytest.fixture(scope="module")
def reference_modules(sdxl_file):
    """diffusers/transformers modules loaded from the same file through diffusers' own converters."""
    raw = load_state_dict(sdxl_file)
    ucfg = {k: v for k, v in factory.diffusers_sdxl_unet_config(factory.TINY_SDXL_UNET).items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**ucfg).eval()
    unet.load_state_dict(convert_ldm_unet_checkpoint(raw, dict(ucfg, upcast_attention=False)), strict=True)
    vcfg = {k: v for k, v in factory.diffusers_vae_config(factory.TINY_SDXL_VAE).items() if not k.startswith("_")}
    vae = AutoencoderKL(**vcfg).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(raw, vcfg), strict=True)
    te1 = CLIPTextModel(HFCLIPTextConfig(**factory.clip_text_hf_config(factory.TINY_SDXL_TEXT))).eval()
    sd1 = {k: v for k, v in convert_ldm_clip_checkpoint(raw, remove_prefix=factory.SDXL_LDM_PREFIX["text_encoder"]).items() if not k.endswith("position_ids")}
    te1.load_state_dict(sd1 if hasattr(te1, "text_model") else {k.removeprefix("text_model."): v for k, v in sd1.items()}, strict=True)
    te2 = CLIPTextModelWithProjection(HFCLIPTextConfig(**factory.clip_text_2_hf_config(factory.TINY_SDXL_TEXT_2))).eval()
    te2.load_state_dict(convert_open_clip_checkpoint(te2, raw, prefix=factory.SDXL_LDM_PREFIX["text_encoder_2"]), strict=True)
    return unet, vae, te1, te2


def reference_render(modules, prompt, negative, seed, steps, cfg, height, width, input_image=None, strength=1.0):
    """DiffSynth-Studio's SDXL semantics (upstream_spec §3.5, §4, §6.4) written out longhand."""
    unet, vae, te1, te2 = modules
    tok1, tok2 = load_clip_tokenizer(), load_sdxl_tokenizer_2()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0).tolist()
    t_max = max(round(1000 * strength) - 1, 0)
    n = min(steps, t_max + 1)
    timesteps = [t_max] if n == 1 else [round(t_max - i * t_max / (n - 1)) for i in range(n)]
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)

    def encode(p):
        h1 = te1(tokenize_long_prompt(tok1, p), output_hidden_states=True).hidden_states[-2]
        out2 = te2(tokenize_long_prompt(tok2, p), output_hidden_states=True)
        emb = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
        return emb.reshape(1, -1, emb.shape[-1]), out2.text_embeds[0:1]

    with torch.no_grad():
        torch.manual_seed(seed)
        shape = (1, 4, height // 8, width // 8)
        if input_image is None:
            x = torch.randn(shape)
        else:
            img = torch.from_numpy(np.asarray(input_image, dtype=np.float32)).permute(2, 0, 1)[None] * (2 / 255) - 1
            z = vae.encode(img).latent_dist.mean * 0.13025
            a = alphas[timesteps[0]]
            x = a**0.5 * z + (1 - a) ** 0.5 * torch.randn(shape)
        (pos, pos_pooled), (neg, neg_pooled) = encode(prompt), encode(negative)
        for i, t in enumerate(timesteps):
            def eps_of(ctx, pooled):
                return unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            e_pos = eps_of(pos, pos_pooled)
            eps = e_pos if cfg == 1 else eps_of(neg, neg_pooled) + cfg * (e_pos - eps_of(neg, neg_pooled))
            a = alphas[t]
            a_next = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
            x = (a_next / a) ** 0.5 * x + ((1 - a_next) ** 0.5 - (a_next * (1 - a) / a) ** 0.5) * eps
        img = vae.decode(x / 0.13025).sample
    return ((img[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).numpy().astype(np.uint8)


def _compare(ours, ref):
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1, diff.max()  # identical up to float rounding flipping a truncation boundary
    assert (diff > 0).mean() < 0.01
    assert ref.std() > 5  # not saturated: the comparison is sensitive


def test_txt2img_16_9_matches_reference(pipe, reference_modules):
    kw = dict(prompt="a photo of a cat", negative="blurry", seed=7, steps=3, cfg=6.0, height=72, width=128)
    ref = reference_render(reference_modules, **kw)
    ours = _render(pipe, seed=7, prompt=kw["prompt"], negative_prompt="blurry", cfg_scale=6.0, height=72, width=128)
    assert ours.shape == (72, 128, 3)
    _compare(ours, ref)


def test_img2img_matches_reference(pipe, reference_modules):
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    ref = reference_render(reference_modules, "a dog", "", seed=5, steps=4, cfg=5.0, height=64, width=64, input_image=image, strength=0.6)
    _compare(_render(pipe, seed=5, prompt="a dog", cfg_scale=5.0, input_image=image, denoising_strength=0.6, num_inference_steps=4), ref)


def test_turbo_one_step_cfg_1_matches_reference_with_one_unet_pass(pipe, reference_modules):
    calls = []
    hook = pipe.unet.register_forward_hook(lambda module, args, out: calls.append(int(args[1])))
    try:
        ours = _render(pipe, seed=3, prompt="a black car", cfg_scale=1.0, num_inference_steps=1)
        image = Image.fromarray(ours)
        ours_i2i = _render(pipe, seed=3, prompt="a red car", cfg_scale=1.0, num_inference_steps=1, input_image=image, denoising_strength=0.7)
    finally:
        hook.remove()
    assert calls == [999, 699]  # one pass each: trailing timestep 999, img2img at strength 0.7
    _compare(ours, reference_render(reference_modules, "a black car", "", seed=3, steps=1, cfg=1.0, height=64, width=64))
    ref_i2i = reference_render(reference_modules, "a red car", "", seed=3, steps=1, cfg=1.0, height=64, width=64, input_image=image, strength=0.7)
    _compare(ours_i2i, ref_i2i)


# --------------------------------------------------------------------------- behaviour


def test_seed_determinism_and_generator(pipe):
    a = _render(pipe, seed=1, negative_prompt="blurry")
    assert np.array_equal(a, _render(pipe, seed=1, negative_prompt="blurry"))
    assert not np.array_equal(a, _render(pipe, seed=2, negative_prompt="blurry"))
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(99)  # the global RNG is not used when a generator is given
    b = np.asarray(pipe("a photo of a cat", negative_prompt="blurry", height=64, width=64, num_inference_steps=3, progress_bar_cmd=None, generator=g))
    assert np.array_equal(a, b)


def test_prompts_cfg_and_both_clip_skips_matter(pipe):
    base = _render(pipe)
    for change in (dict(prompt="an astronaut riding a horse"), dict(clip_skip=2), dict(clip_skip_2=1), dict(cfg_scale=3.0), dict(negative_prompt="ugly")):
        assert not np.array_equal(base, _render(pipe, **change)), change


def test_long_prompt_pools_the_first_chunk(pipe):
    long = "a red car on a mountain road at sunset, " * 12
    pooled, emb = pipe.prompter.encode_prompt(pipe.text_encoder, pipe.text_encoder_2, long)
    assert emb.shape == (1, 77 * 2, factory.TINY_SDXL_UNET.context_dim)
    first, _ = pipe.prompter.encode_prompt(pipe.text_encoder, pipe.text_encoder_2, long)
    assert pooled.shape == (1, factory.TINY_SDXL_TEXT_2.projection_dim) and torch.equal(pooled, first)
    assert _render(pipe, prompt=long, num_inference_steps=2).shape == (64, 64, 3)


def test_tiled_high_resolution_path(pipe):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (88, 104, 3), dtype=np.uint8))
    tiled = _render(pipe, input_image=image, height=88, width=104, denoising_strength=0.5, tiled=True, tile_size=6, tile_stride=4, num_inference_steps=2)
    untiled = _render(pipe, input_image=image, height=88, width=104, denoising_strength=0.5, num_inference_steps=2)
    assert tiled.shape == (88, 104, 3) and not np.array_equal(tiled, untiled)


def test_progress_events_and_size_errors(pipe):
    events = []
    torch.manual_seed(0)
    pipe("x", height=64, width=64, num_inference_steps=2, progress_bar_cmd=None, progress_callback=events.append)
    assert events[0] == ProgressEvent("denoising", 0, 2) and events[-1] == ProgressEvent("denoising", 2, 2)
    with pytest.raises(ValueError, match="nearest valid: 1024"):
        pipe("x", height=1021, width=1024, progress_bar_cmd=None)


def test_prompt_refiners_apply_to_sdxl_positive_prompts(pipe):
    seen = []
    pipe.prompter.add_prompt_refiner(lambda p: seen.append(p) or p + ", masterpiece")
    try:
        pipe.prompter.encode_prompt(pipe.text_encoder, pipe.text_encoder_2, "a cat", positive=True)
        pipe.prompter.encode_prompt(pipe.text_encoder, pipe.text_encoder_2, "blurry", positive=False)
    finally:
        pipe.prompter.prompt_refiners.clear()
    assert seen == ["a cat"]


@pytest.mark.parametrize("order", ["before", "after"])
def test_sdxl_textual_inversion_uses_both_encoders(tmp_path, sdxl_file, pipe, order):
    folder = tmp_path / "ti"
    factory.write_sdxl_textual_inversion(str(folder / "mystyle.safetensors"), num_vectors=3)
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    if order == "before":
        mm.load_textual_inversions(str(folder))
    mm.load_models([sdxl_file])
    if order == "after":
        mm.load_textual_inversions(str(folder))
    assert mm.textual_inversion_ids == mm.textual_inversion_ids_2 == {"mystyle": [49408, 49409, 49410]}
    ti_pipe = SDXLImagePipeline.from_model_manager(mm)
    with_ti = _render(ti_pipe, prompt="a photo in mystyle")
    assert not np.array_equal(with_ti, _render(ti_pipe, prompt="a photo in"))
    pooled, _ = ti_pipe.prompter.encode_prompt(ti_pipe.text_encoder, ti_pipe.text_encoder_2, "mystyle")
    plain, _ = pipe.prompter.encode_prompt(pipe.text_encoder, pipe.text_encoder_2, "mystyle")
    assert not torch.equal(pooled, plain)


def test_wrong_family_embeddings_are_refused(tmp_path, sdxl_file):
    folder = tmp_path / "sd15_ti"
    factory.write_textual_inversion(str(folder / "old.pt"))
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([sdxl_file])
    with pytest.raises(ValueError, match="old.pt.*not an SDXL one"):
        mm.load_textual_inversions(str(folder))
    before = ModelManager(torch_dtype=torch.float32, device="cpu")
    before.load_textual_inversions(str(folder))
    with pytest.raises(ValueError, match="SD 1.x embeddings, but the loaded text encoder is SDXL's"):
        before.load_models([sdxl_file])


def test_sdxl_lora_changes_unet_and_both_text_encoders(tmp_path, sdxl_file, pipe):
    lora = factory.write_sdxl_lora(str(tmp_path / "style.safetensors"), rank=4, alpha=2.0)
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([sdxl_file, lora], lora_alphas=[0.5])
    key = "text_model.encoder.layers.1.self_attn.q_proj.weight"
    sd = load_state_dict(lora)
    stem = "lora_te2_text_model_encoder_layers_1_self_attn_q_proj"
    delta = 0.5 * (2.0 / 4) * (sd[f"{stem}.lora_up.weight"].float() @ sd[f"{stem}.lora_down.weight"].float())
    torch.testing.assert_close(mm.text_encoder_2.state_dict()[key], pipe.text_encoder_2.state_dict()[key] + delta)
    assert not torch.equal(mm.text_encoder.state_dict()[key], pipe.text_encoder.state_dict()[key])
    unet_key = "input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight"
    assert not torch.equal(mm.unet.state_dict()[unet_key], pipe.unet.state_dict()[unet_key])
    assert not np.array_equal(_render(SDXLImagePipeline.from_model_manager(mm)), _render(pipe))


def test_wrong_or_missing_models_are_explained(tmp_path, tiny_sd_file):
    sd15 = ModelManager(torch_dtype=torch.float32, device="cpu")
    sd15.load_models([tiny_sd_file])
    with pytest.raises(ValueError, match="lacks text_encoder_2.*SDXL base or SDXL Turbo checkpoint"):
        SDXLImagePipeline.from_model_manager(sd15)
    with pytest.raises(ValueError, match="lacks text_encoder, text_encoder_2, unet, vae_decoder"):
        SDXLImagePipeline.from_model_manager(ModelManager(device="cpu"))


def test_sd_pipeline_refuses_sdxl_models(pipe, sdxl_file):
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([sdxl_file])
    with pytest.raises(ValueError, match="SDXLImagePipeline"):  # refused when built, not at the first UNet call
        SDImagePipeline.from_model_manager(mm)
