"""End-to-end parity: our pipeline vs an independent re-implementation of DiffSynth-Studio's
semantics on diffusers/transformers modules fed the same weights (converted by diffusers' own
LDM converters, not ours)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint  # noqa: E402

from diffsynth.prompts import load_clip_tokenizer, tokenize_long_prompt  # noqa: E402
from diffsynth.testing import factory  # noqa: E402


@pytest.fixture(scope="module")
def reference_modules():
    parts = factory.build_sd_state_dicts(seed=0)
    ucfg = {k: v for k, v in factory.diffusers_unet_config(factory.TINY_UNET).items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**ucfg).eval()
    ckpt = {"model.diffusion_model." + k: v for k, v in parts["unet"].items()}
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, dict(ucfg, upcast_attention=False)), strict=True)
    vcfg = {k: v for k, v in factory.diffusers_vae_config(factory.TINY_VAE).items() if not k.startswith("_")}
    vae = AutoencoderKL(**vcfg).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in parts["vae"].items()}, vcfg), strict=True)
    tcfg = factory.clip_text_hf_config(factory.TINY_TEXT)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**{k: v for k, v in tcfg.items() if k not in ("architectures",)})).eval()
    sd = parts["text_encoder"]
    if not hasattr(text, "text_model"):  # transformers >= 5.6 flattens the module
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    text.load_state_dict(sd, strict=True)
    return unet, vae, text


def reference_render(modules, prompt, negative, seed, steps, cfg, height, width, clip_skip=1, input_image=None, strength=1.0):
    """DiffSynth-Studio semantics written out longhand (upstream_spec §4, §6.2; facts.md)."""
    unet, vae, text = modules
    tok = load_clip_tokenizer()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0).tolist()
    t_max = max(round(1000 * strength) - 1, 0)
    n = min(steps, t_max + 1)
    timesteps = [t_max] if n == 1 else [round(t_max - i * t_max / (n - 1)) for i in range(n)]

    def encode(p):
        ids = tokenize_long_prompt(tok, p)
        out = text(ids, output_hidden_states=True)
        final_ln = getattr(text, "text_model", text).final_layer_norm
        h = final_ln(out.hidden_states[-clip_skip])
        return h.reshape(1, -1, h.shape[-1])

    with torch.no_grad():
        torch.manual_seed(seed)
        if input_image is None:
            x = torch.randn((1, 4, height // 8, width // 8))
        else:
            img = torch.from_numpy(np.asarray(input_image, dtype=np.float32)).permute(2, 0, 1)[None] * (2 / 255) - 1
            z = vae.encode(img).latent_dist.mean * 0.18215
            noise = torch.randn((1, 4, height // 8, width // 8))
            a = alphas[timesteps[0]]
            x = a**0.5 * z + (1 - a) ** 0.5 * noise
        pos, neg = encode(prompt), encode(negative)
        for i, t in enumerate(timesteps):
            e_pos = unet(x, t, encoder_hidden_states=pos).sample
            e_neg = unet(x, t, encoder_hidden_states=neg).sample
            eps = e_neg + cfg * (e_pos - e_neg)
            a = alphas[t]
            a_next = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
            x = (a_next / a) ** 0.5 * x + ((1 - a_next) ** 0.5 - (a_next * (1 - a) / a) ** 0.5) * eps
        img = vae.decode(x / 0.18215).sample
    return ((img[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).numpy().astype(np.uint8)


def _compare(ours, ref):
    diff = np.abs(ours.astype(int) - ref.astype(int))
    # identical up to float rounding flipping a truncation boundary
    assert diff.max() <= 1, diff.max()
    assert (diff > 0).mean() < 0.01
    assert ref.std() > 5  # the image is not saturated: the comparison is sensitive


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_txt2img_matches_reference(tiny_pipe, reference_modules, clip_skip):
    kw = dict(prompt="a photo of a cat", negative="blurry", seed=7, steps=4, cfg=7.5, height=64, width=80, clip_skip=clip_skip)
    ref = reference_render(reference_modules, **kw)
    torch.manual_seed(7)
    ours = np.asarray(tiny_pipe(kw["prompt"], negative_prompt="blurry", cfg_scale=7.5, clip_skip=clip_skip, height=64, width=80, num_inference_steps=4, progress_bar_cmd=None))
    _compare(ours, ref)


def test_img2img_matches_reference(tiny_pipe, reference_modules):
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    ref = reference_render(reference_modules, "a dog", "", seed=5, steps=5, cfg=5.0, height=64, width=64, input_image=image, strength=0.6)
    torch.manual_seed(5)
    ours = np.asarray(tiny_pipe("a dog", cfg_scale=5.0, input_image=image, denoising_strength=0.6, height=64, width=64, num_inference_steps=5, progress_bar_cmd=None))
    _compare(ours, ref)


# SD 1.5's scheduler config, as a diffusers user gets it with the model (scheduler/scheduler_config.json)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon")


@pytest.mark.parametrize("sampler, scheduler, extra, steps", [
    ("euler", "EulerDiscreteScheduler", {}, 6),
    ("euler_a", "EulerAncestralDiscreteScheduler", {}, 6),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {}, 6),
    ("dpmpp_2m_karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, 6),
    ("lcm", "LCMScheduler", {}, 4),
])
def test_samplers_match_diffusers_pipeline(tiny_pipe, reference_modules, sampler, scheduler, extra, steps):
    """A seed gives diffusers' StableDiffusionPipeline's image with the matching scheduler (same weights, same generator)."""
    unet, vae, text = reference_modules
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=load_clip_tokenizer(), unet=unet,
                                             scheduler=getattr(diffusers, scheduler).from_config({**SD15_SCHEDULER, **extra}),
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(negative_prompt="blurry", height=64, width=80, num_inference_steps=steps)
    with torch.no_grad():
        ref = pipe("a photo of a cat", guidance_scale=7.5, generator=torch.Generator().manual_seed(11), output_type="np", **kw).images[0]
    ref = (ref * 255).astype(np.uint8)  # truncation, as ours (and the original) converts
    ours = np.asarray(tiny_pipe("a photo of a cat", cfg_scale=7.5, generator=torch.Generator().manual_seed(11), sampler=sampler,
                                progress_bar_cmd=None, **kw))
    _compare(ours, ref)
    ddim = np.asarray(tiny_pipe("a photo of a cat", cfg_scale=7.5, generator=torch.Generator().manual_seed(11), progress_bar_cmd=None, **kw))
    assert np.abs(ddim.astype(int) - ours.astype(int)).max() > 3  # the sampler changed the image
