"""Kohya LoRA: parsing, name resolution and the merge math on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.models.convert import unet_module_map
from diffsynth.models.errors import ModelFileError
from diffsynth.models.lora import LoRA, apply_lora, apply_loras, is_lora_state_dict, load_lora
from diffsynth.models.sd_text_encoder import CLIPTextConfig, SDTextEncoder
from diffsynth.models.sd_unet import SDUNet, SDUNetConfig

RANK = 4
ALPHA = 2.0
TINY_UNET = SDUNetConfig(model_channels=32, channel_mult=(1, 2), transformer_depth=(1, 0), context_dim=32, num_res_blocks=1)
TINY_CLIP = CLIPTextConfig(vocab_size=1000, hidden_size=128, num_layers=2, intermediate_size=64)

# kohya key stem -> (component, our module path, weight shape). The shapes are those of the
# tiny models; for SD 1.x proj_in/proj_out are 1x1 convolutions, resnet conv1 is 3x3 (LoCon).
TARGETS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ("unet", "input_blocks.1.1.transformer_blocks.0.attn1.to_q", (32, 32)),
    "lora_unet_down_blocks_0_attentions_0_proj_in": ("unet", "input_blocks.1.1.proj_in", (32, 32, 1, 1)),
    "lora_unet_down_blocks_0_resnets_0_conv1": ("unet", "input_blocks.1.0.in_layers.2", (32, 32, 3, 3)),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": ("unet", "middle_block.1.transformer_blocks.0.attn2.to_k", (64, 32)),
    "lora_unet_mid_block_attentions_0_proj_out": ("unet", "middle_block.1.proj_out", (64, 64, 1, 1)),
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0": ("unet", "output_blocks.2.1.transformer_blocks.0.attn1.to_out.0", (32, 32)),
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj": ("unet", "output_blocks.2.1.transformer_blocks.0.ff.net.0.proj", (256, 32)),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", (128, 128)),
    "lora_te_text_model_encoder_layers_1_mlp_fc1": ("text_encoder", "text_model.encoder.layers.1.mlp.fc1", (64, 128)),
}
NO_ALPHA = "lora_unet_mid_block_attentions_0_proj_out"  # stored without .alpha: scale 1


def lora_factors(shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Kohya factor shapes: up [out, r(,1,1)], down [r, in(, kh, kw)]."""
    out, inp, *kernel = shape
    up = torch.randn(out, RANK, *([1, 1] if kernel else []), generator=generator)
    down = torch.randn(RANK, inp, *kernel, generator=generator)
    return up, down


def kohya_state_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for stem, (_, _, shape) in TARGETS.items():
        up, down = lora_factors(shape, g)
        sd[f"{stem}.lora_up.weight"] = up
        sd[f"{stem}.lora_down.weight"] = down
        if stem != NO_ALPHA:
            sd[f"{stem}.alpha"] = torch.tensor(ALPHA)
    return sd


def write_lora(tmp_path, name: str, sd: dict[str, torch.Tensor]) -> str:
    path = str(tmp_path / name)
    save_file(sd, path)
    return path


def expected_delta(sd: dict[str, torch.Tensor], stem: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Hand computation in float64: alpha/r * up @ down, reshaped like the weight."""
    up = sd[f"{stem}.lora_up.weight"].double().reshape(shape[0], RANK)
    down = sd[f"{stem}.lora_down.weight"].double().reshape(RANK, -1)
    scale = 1.0 if stem == NO_ALPHA else ALPHA / RANK
    return (scale * up @ down).reshape(shape)


@pytest.fixture
def models():
    torch.manual_seed(0)
    return {"unet": SDUNet(TINY_UNET), "text_encoder": SDTextEncoder(TINY_CLIP)}


def weights(models) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c, m in models.items() for k, v in m.state_dict().items()}


def test_merge_matches_hand_computation(tmp_path, models):
    sd = kohya_state_dict(seed=1)
    path = write_lora(tmp_path, "style.safetensors", sd)
    before = weights(models)

    touched = apply_lora(load_lora(path), unet=models["unet"], text_encoder=models["text_encoder"], strength=0.75)

    after = weights(models)
    expected_names = {f"{c}.{p}.weight" for c, p, _ in TARGETS.values()}
    assert set(touched) == expected_names
    for stem, (component, module, shape) in TARGETS.items():
        name = f"{component}.{module}.weight"
        want = before[name].double() + 0.75 * expected_delta(sd, stem, shape)
        torch.testing.assert_close(after[name].double(), want, rtol=1e-6, atol=1e-6, msg=name)
    unchanged = [n for n in before if n not in expected_names and not torch.equal(before[n], after[n])]
    assert unchanged == []


def test_two_files_with_different_strengths_and_inputs_left_alone(tmp_path, models):
    sd1, sd2 = kohya_state_dict(seed=1), kohya_state_dict(seed=2)
    lora1 = load_lora(write_lora(tmp_path, "a.safetensors", sd1))
    path2 = write_lora(tmp_path, "b.safetensors", sd2)
    lora1_copy = copy.deepcopy(lora1)
    strengths = [0.5, -1.25]
    before = weights(models)

    apply_loras([lora1, path2], strengths, unet=models["unet"], text_encoder=models["text_encoder"])

    assert strengths == [0.5, -1.25]  # upstream popped its lora_alphas list
    for component in ("unet", "text_encoder"):
        for stem, weight in lora1.group(component).items():
            twin = lora1_copy.group(component)[stem]
            assert torch.equal(weight.up, twin.up) and torch.equal(weight.down, twin.down) and weight.alpha == twin.alpha
    after = weights(models)
    for stem, (component, module, shape) in TARGETS.items():
        name = f"{component}.{module}.weight"
        want = before[name].double() + 0.5 * expected_delta(sd1, stem, shape) - 1.25 * expected_delta(sd2, stem, shape)
        torch.testing.assert_close(after[name].double(), want, rtol=1e-6, atol=1e-6, msg=name)


def test_fp16_weights_merge_in_float32_and_round_once(tmp_path, models):
    sd = kohya_state_dict(seed=3)
    unet = models["unet"].half()
    name = "input_blocks.1.1.proj_in.weight"
    w0 = unet.state_dict()[name].clone()
    lora = load_lora(write_lora(tmp_path, "h.safetensors", sd))

    apply_lora(lora, unet=unet, text_encoder=models["text_encoder"])

    delta = expected_delta(sd, "lora_unet_down_blocks_0_attentions_0_proj_in", (32, 32, 1, 1)).float()
    assert unet.state_dict()[name].dtype == torch.float16
    assert torch.equal(unet.state_dict()[name], (w0.float() + delta).half())


def test_ldm_named_unet_keys_are_accepted(tmp_path, models):
    g = torch.Generator().manual_seed(4)
    up, down = lora_factors((32, 32), g)
    sd = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_v.lora_up.weight": up,
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_v.lora_down.weight": down,
    }
    touched = apply_lora(load_lora(write_lora(tmp_path, "ldm.safetensors", sd)), unet=models["unet"])
    assert touched == ["unet.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"]


def test_unknown_module_is_an_error_naming_file_and_key_and_changes_nothing(tmp_path, models):
    sd = kohya_state_dict(seed=5)
    bad = "lora_unet_down_blocks_3_attentions_0_proj_in"  # the tiny UNet has 2 levels
    sd[f"{bad}.lora_up.weight"] = torch.randn(32, RANK, 1, 1)
    sd[f"{bad}.lora_down.weight"] = torch.randn(RANK, 32, 1, 1)
    path = write_lora(tmp_path, "too_deep.safetensors", sd)
    before = weights(models)

    with pytest.raises(ModelFileError, match=bad) as info:
        apply_lora(load_lora(path), unet=models["unet"], text_encoder=models["text_encoder"])

    assert info.value.path == path and "too_deep.safetensors" in str(info.value)
    after = weights(models)
    assert all(torch.equal(before[n], after[n]) for n in before)  # checked before any merge


def test_shape_mismatch_is_an_error(tmp_path, models):
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    sd = {f"{stem}.lora_up.weight": torch.randn(40, RANK), f"{stem}.lora_down.weight": torch.randn(RANK, 32)}
    with pytest.raises(ModelFileError, match=r"does not fit .*attn1\.to_k\.weight \(32, 32\)"):
        apply_lora(load_lora(write_lora(tmp_path, "sdxl.safetensors", sd)), unet=models["unet"])


def test_text_encoder_weights_need_a_text_encoder(tmp_path, models):
    path = write_lora(tmp_path, "te.safetensors", kohya_state_dict(seed=6))
    with pytest.raises(ValueError, match="text_encoder weights .* no text_encoder"):
        apply_lora(load_lora(path), unet=models["unet"])


@pytest.mark.parametrize(
    ("suffix", "message"),
    [("hada_w1_a", "LoHa"), ("lora_mid.weight", "lora_mid"), ("weird.weight", "unknown suffix")],
)
def test_other_adapter_kinds_are_named(tmp_path, suffix, message):
    sd = kohya_state_dict(seed=7)
    sd[f"lora_unet_down_blocks_0_attentions_0_proj_in.{suffix}"] = torch.zeros(2, 2)
    with pytest.raises(ModelFileError, match=message):
        load_lora(write_lora(tmp_path, "lyco.safetensors", sd))


def test_unpaired_factor_is_an_error(tmp_path):
    sd = kohya_state_dict(seed=8)
    del sd["lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight"]
    with pytest.raises(ModelFileError, match="lora_te_text_model_encoder_layers_1_mlp_fc1.*lora_down"):
        load_lora(write_lora(tmp_path, "half.safetensors", sd))


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(ModelFileError, match="no LoRA weights"):
        load_lora(write_lora(tmp_path, "empty.safetensors", {}))


def test_parse_groups_and_alpha():
    from diffsynth.models.lora import parse_lora_state_dict

    lora = parse_lora_state_dict(kohya_state_dict(seed=9), "mem")
    assert isinstance(lora, LoRA) and len(lora) == len(TARGETS)
    assert set(lora.text_encoder) == {"text_model_encoder_layers_0_self_attn_q_proj", "text_model_encoder_layers_1_mlp_fc1"}
    assert lora.unet["down_blocks_0_attentions_0_proj_in"].scale == ALPHA / RANK
    assert lora.unet["mid_block_attentions_0_proj_out"].scale == 1.0


def test_fingerprint(models):
    sd = kohya_state_dict(seed=10)
    assert is_lora_state_dict(sd)
    assert is_lora_state_dict(list(sd))
    assert not is_lora_state_dict(models["unet"].state_dict())
    assert not is_lora_state_dict({"emb_params": torch.zeros(1, 768)})
    assert not is_lora_state_dict({**sd, "model.diffusion_model.out.2.bias": torch.zeros(4)})
    assert not is_lora_state_dict({})


def test_diffusers_converter_targets_the_same_modules():
    """diffusers' kohya reader (string fix-ups, then PEFT names) and our resolution agree on each module."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    converted, _ = _convert_non_diffusers_lora_to_diffusers(dict(kohya_state_dict(seed=11)))
    unet_part = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in converted.items() if k.startswith("unet.")})
    te_old = {k[len("text_encoder."):]: v for k, v in converted.items() if k.startswith("text_encoder.")}
    # diffusers sniffs the legacy "to_q_lora" naming from a "to_out_lora" key, which this small file lacks.
    te_part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te_old, original_type=StateDictType.DIFFUSERS_OLD))
    theirs = {("unet", k.removesuffix(".lora_A.weight")) for k in unet_part if k.endswith(".lora_A.weight")}
    theirs |= {("text_encoder", k.removesuffix(".lora_A.weight")) for k in te_part if k.endswith(".lora_A.weight")}

    to_diffusers = {ldm: diffusers for diffusers, ldm in unet_module_map(TINY_UNET).items()}
    ours = {(c, to_diffusers[m] if c == "unet" else m) for c, m, _ in TARGETS.values()}
    assert theirs == ours
