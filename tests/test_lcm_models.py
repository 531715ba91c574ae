"""LCM-LoRA (SD 1.5, SDXL; kohya, PEFT and diffusers layouts) and AnimateLCM (motion module and LoRA).

The tiny files come from ``diffsynth.testing.lcm_files`` in the real layouts. Every layout of one
seed holds the same factors, so loading them must merge into the same weights as the kohya file,
bit for bit. diffusers 0.42.1 is the reference for the layouts (its converters turn one into the
other) and for which module each key names (its UNet's own module tree).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.download import CATALOGUE
from diffsynth.models import convert
from diffsynth.models.detect import (
    ANIMATELCM_POSITIONS,
    FINGERPRINTS,
    LCM_FILES,
    detect,
    is_animatelcm_motion_module,
    lcm_file_kind,
    lcm_files,
    lcm_missing_message,
    lcm_warning,
)
from diffsynth.models.errors import ModelFileError
from diffsynth.models.lora import is_lora_state_dict, load_lora, parse_lora_state_dict
from diffsynth.models.model_manager import ModelManager
from diffsynth.models.sd_motion import sinusoid_table
from diffsynth.models.state_dict import load_state_dict, read_header
from diffsynth.testing import factory
from diffsynth.testing.lcm_files import (
    LAYOUTS,
    LCM_TARGET_MODULES,
    lcm_lora_targets,
    lora_state_dict,
    write_animatelcm_lora,
    write_animatelcm_motion_module,
    write_lcm_lora,
)
from diffsynth.testing.motion_files import write_motion_module

RANK = 8
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def base_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lcm_base")
    return {
        "sd15": factory.write_sd_checkpoint(str(d / "sd15.safetensors"), seed=3),
        "sdxl": factory.write_sdxl_checkpoint(str(d / "sdxl.safetensors"), seed=4),
    }


def _load(files, strength=1.0):
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    loras = [f for f in files if os.path.isfile(f) and detect(read_header(f)).family == "lora"]
    mm.load_models(files, lora_alphas=[strength] * len(loras))
    return mm


def _weights(mm) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c in COMPONENTS if mm.has(c) for k, v in mm.model[c].state_dict().items()}


def _family(path: str) -> list[str]:
    keys = list(read_header(path))
    return [f.family for f in FINGERPRINTS if f.matches(keys)]


# --------------------------------------------------------------------------- LCM-LoRA layouts


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_every_layout_merges_into_the_same_weights_as_kohya(tmp_path, base_files, model):
    """kohya (alpha keys), PEFT and diffusers (alpha in diffusers' adapter metadata) of one LoRA: identical merges,
    text encoders included; without an alpha anywhere, PEFT equals kohya with alpha = rank."""
    base = _weights(_load([base_files[model]]))
    merged = {}
    for layout in LAYOUTS:
        path = write_lcm_lora(str(tmp_path / f"{layout}.safetensors"), model, layout, seed=1, rank=RANK, alpha=1.0, text_encoders=True)
        assert _family(path) == ["lora"]
        merged[layout] = _weights(_load([base_files[model], path]))
    for layout in ("peft", "diffusers"):
        assert merged[layout].keys() == merged["kohya"].keys()
        different = [k for k in merged["kohya"] if not torch.equal(merged[layout][k], merged["kohya"][k])]
        assert different == [], (layout, different[:5])

    changed = {k for k in base if not torch.equal(base[k], merged["kohya"][k])}
    targets = lcm_lora_targets(model, text_encoders=True)
    assert len(changed) == len(targets)  # one weight per adapted module, nothing else
    assert {k.split(".", 1)[0] for k in changed} == ({"unet", "text_encoder"} if model == "sd15" else set(COMPONENTS))

    no_alpha = {}
    for layout, alpha in (("peft", None), ("kohya", None), ("kohya", float(RANK))):
        path = write_lcm_lora(str(tmp_path / f"{layout}_{alpha}.safetensors"), model, layout, seed=2, rank=RANK, alpha=alpha)
        no_alpha[(layout, alpha)] = _weights(_load([base_files[model], path]))
    reference = no_alpha[("kohya", float(RANK))]
    for key, got in no_alpha.items():
        assert all(torch.equal(got[k], reference[k]) for k in reference), key


def test_merge_follows_the_kohya_formula_for_the_lcm_module_kinds(tmp_path, base_files):
    """W + strength * alpha/rank * up @ down for a time embedding projection, a 3x3 downsampler and a shortcut."""
    path = write_lcm_lora(str(tmp_path / "peft.safetensors"), "sd15", "diffusers", seed=5, rank=RANK, alpha=1.0)
    lora = load_lora(path)
    base = _weights(_load([base_files["sd15"]]))
    after = _weights(_load([base_files["sd15"], path], strength=0.75))
    module_map = convert.unet_module_map(factory.TINY_UNET)
    for diffusers_path in ("down_blocks.0.resnets.0.time_emb_proj", "down_blocks.0.downsamplers.0.conv", "down_blocks.1.resnets.0.conv_shortcut"):
        weight = lora.unet[diffusers_path.replace(".", "_")]
        assert weight.alpha == 1.0 and weight.rank == RANK
        name = f"unet.{module_map[diffusers_path]}.weight"
        up, down = weight.up.double().flatten(1), weight.down.double().flatten(1)
        want = base[name].double() + (0.75 / RANK * (up @ down)).reshape(base[name].shape)
        torch.testing.assert_close(after[name].double(), want, rtol=1e-6, atol=1e-6, msg=name)


def test_lcm_lora_changes_the_unet_output(tmp_path, base_files):
    path = write_lcm_lora(str(tmp_path / "lcm-lora-sdv1-5.safetensors"), "sd15", "kohya", seed=6)
    x, ctx = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 5, 128)
    with torch.no_grad():
        before = _load([base_files["sd15"]]).unet(x, 500, ctx)
        after = _load([base_files["sd15"], path]).unet(x, 500, ctx)
    assert (after - before).abs().mean() > 1e-3 * before.abs().mean()


def test_lcm_lora_targets_are_the_lcm_scripts_module_kinds():
    kinds = {t.path for t in lcm_lora_targets("sd15")}
    # one of each target kind exists in the tiny SD 1.5 UNet (its first level has attention, a downsampler, ...)
    for target in LCM_TARGET_MODULES:
        assert any(p.endswith("." + target) for p in kinds), target
    assert all(t.component == "unet" for t in lcm_lora_targets("sdxl"))


# --------------------------------------------------------------------------- diffusers as the reference


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_layouts_are_what_diffusers_converters_make_and_read(model):
    """PEFT -> diffusers via convert_state_dict_to_diffusers gives our diffusers layout; diffusers' kohya reader
    turns our kohya layout into our PEFT names with the file's alpha."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    targets = lcm_lora_targets(model, text_encoders=True)
    peft, _ = lora_state_dict(targets, "peft", model=model, seed=7)
    ours, _ = lora_state_dict(targets, "diffusers", model=model, seed=7)
    theirs = convert_state_dict_to_diffusers(dict(peft), original_type=StateDictType.PEFT)
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)

    unet_only = lcm_lora_targets(model)
    kohya, _ = lora_state_dict(unet_only, "kohya", model=model, seed=7, alpha=1.0)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    unet_peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    peft_unet, _ = lora_state_dict(unet_only, "peft", model=model, seed=7)
    assert {f"unet.{k}" for k in unet_peft} == set(peft_unet)
    assert all(torch.equal(unet_peft[k.removeprefix("unet.")], v) for k, v in peft_unet.items())
    assert len(alphas) == len(unet_only) and set(alphas.values()) == {1.0}


def test_merged_weights_match_a_merge_into_the_diffusers_unet(tmp_path):
    """The PEFT file's keys, merged into diffusers' UNet2DConditionModel by its own module paths, give our merged UNet."""
    from diffusers import UNet2DConditionModel

    folder = factory.write_diffusers_folder(str(tmp_path / "pipe"), seed=8)
    path = write_lcm_lora(str(tmp_path / "lcm.safetensors"), "sd15", "peft", seed=9, rank=RANK, alpha=None, dtype="fp32")
    ours = _load([folder, path], strength=0.5).unet

    theirs = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval()
    sd = load_state_dict(path)
    with torch.no_grad():
        for key, down in sd.items():
            if key.endswith(".lora_A.weight"):
                module = theirs.get_submodule(key.removeprefix("unet.").removesuffix(".lora_A.weight"))
                up = sd[key.replace(".lora_A.", ".lora_B.")]
                module.weight += (0.5 * (up.flatten(1) @ down.flatten(1))).reshape(module.weight.shape)
    ours_diffusers = convert.convert_unet_to_diffusers(ours.state_dict(), ours.config)
    theirs_sd = theirs.state_dict()
    for key, value in ours_diffusers.items():
        torch.testing.assert_close(value, theirs_sd[key], rtol=1e-6, atol=1e-6, msg=key)


# --------------------------------------------------------------------------- parsing details


def test_dotted_alpha_keys_and_metadata_alpha():
    targets = lcm_lora_targets("sd15")[:3]
    peft, _ = lora_state_dict(targets, "peft", seed=10)
    with_keys = dict(peft)
    for t in targets:
        with_keys[f"unet.{t.path}.alpha"] = torch.tensor(2.0)  # diffusers' network_alphas naming
    lora = parse_lora_state_dict(with_keys, "mem")
    assert {w.alpha for w in lora.unet.values()} == {2.0}
    assert {w.scale for w in lora.unet.values()} == {2.0 / RANK}

    meta = {"lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": 4, "unet.rank_pattern": {}})}
    assert {w.alpha for w in parse_lora_state_dict(peft, "mem", metadata=meta).unet.values()} == {4.0}
    assert {w.alpha for w in parse_lora_state_dict(peft, "mem").unet.values()} == {None}
    for bad, message in (
        ({"unet.r": RANK, "unet.lora_alpha": 4, "unet.alpha_pattern": {"to_q": 2}}, "alpha_pattern"),
        ({"unet.r": RANK, "unet.lora_alpha": 4, "unet.use_rslora": True}, "use_rslora"),
        ({"unet.r": 16, "unet.lora_alpha": 4}, "rank 16"),
    ):
        with pytest.raises(ModelFileError, match=message):
            parse_lora_state_dict(peft, "mem", metadata={"lora_adapter_metadata": json.dumps(bad)})


def test_layout_fingerprint():
    for layout in LAYOUTS:
        sd, _ = lora_state_dict(lcm_lora_targets("sdxl", text_encoders=True), layout, model="sdxl", seed=11)
        assert is_lora_state_dict(sd), layout
        assert [f.family for f in FINGERPRINTS if f.matches(sd)] == ["lora"], layout
    assert not is_lora_state_dict({"unet.conv_in.weight": torch.zeros(1)})
    assert not is_lora_state_dict({"unet.conv_in.lora_A.weight": torch.zeros(1)})  # no up factor


def test_one_module_in_two_layouts_is_an_error():
    path = "down_blocks.0.attentions.0.proj_in"
    a, b = torch.randn(RANK, 64, 1, 1), torch.randn(64, RANK, 1, 1)
    twice = {f"unet.{path}.lora_A.weight": a, f"unet.{path}.lora_B.weight": b, f"unet.{path}.lora.down.weight": a, f"unet.{path}.lora.up.weight": b}
    with pytest.raises(ModelFileError, match="both hold the down factor"):
        parse_lora_state_dict(twice, "mem")
    mixed = {f"unet.{path}.lora_A.weight": a, f"unet.{path}.lora_B.weight": b,
             f"lora_unet_{path.replace('.', '_')}.lora_down.weight": a, f"lora_unet_{path.replace('.', '_')}.lora_up.weight": b}
    with pytest.raises(ModelFileError, match="adapt the same module"):
        parse_lora_state_dict(mixed, "mem")


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector", "DoRA"),
        ("unet.down_blocks.0.attentions.0.proj_in.lora_A.default.weight", "unknown suffix"),
        ("base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight", "PEFT training checkpoint"),
    ],
)
def test_unusable_dotted_keys_are_named(key, message):
    sd, _ = lora_state_dict(lcm_lora_targets("sd15")[:2], "peft", seed=12)
    with pytest.raises(ModelFileError, match=message):
        parse_lora_state_dict({**sd, key: torch.zeros(2, 2)}, "mem")


def test_a_dotted_key_naming_no_module_stays_an_error(tmp_path, base_files):
    sd, _ = lora_state_dict(lcm_lora_targets("sd15")[:2], "peft", seed=13)
    sd["unet.down_blocks.5.attentions.0.proj_in.lora_A.weight"] = torch.randn(RANK, 64, 1, 1)
    sd["unet.down_blocks.5.attentions.0.proj_in.lora_B.weight"] = torch.randn(64, RANK, 1, 1)
    path = str(tmp_path / "too_deep.safetensors")
    save_file(sd, path)
    with pytest.raises(ModelFileError, match=r"unet\.down_blocks\.5\.attentions\.0\.proj_in"):
        _load([base_files["sd15"], path])


# --------------------------------------------------------------------------- AnimateLCM


def test_animatelcm_motion_module_loads_as_a_v2_module_with_64_computed_positions(tmp_path, base_files):
    path = write_animatelcm_motion_module(str(tmp_path / "AnimateLCM_sd15_t2v.ckpt"), seed=14)
    keys = list(read_header(path))
    assert _family(path) == ["motion_module"] and is_animatelcm_motion_module(keys)
    assert not any("pos_encoder" in k for k in keys)

    mm = _load([base_files["sd15"], path])
    motion = mm.motion_modules
    assert motion.config.mid_block and motion.config.max_positions == ANIMATELCM_POSITIONS
    loaded = motion.state_dict()
    file_sd = load_state_dict(path)
    assert all(torch.equal(loaded[k], v) for k, v in file_sd.items())
    tables = {k: v for k, v in loaded.items() if k.endswith(".pos_encoder.pe")}
    assert len(tables) == 2 * len(motion.config.modules())  # two attention blocks per module
    assert all(torch.equal(v, sinusoid_table(ANIMATELCM_POSITIONS, v.shape[2])) for v in tables.values())

    # the same weights in an AnimateDiff file that stores the 64-position tables load to the same model
    stored = factory._save({**file_sd, **tables}, str(tmp_path / "with_pe.ckpt"))
    assert not is_animatelcm_motion_module(read_header(stored))
    twin = _load([base_files["sd15"], stored]).motion_modules.state_dict()
    assert twin.keys() == loaded.keys() and all(torch.equal(twin[k], loaded[k]) for k in loaded)

    x, ctx = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(3, 5, 128)
    with torch.no_grad():
        still = mm.unet(x, 500, ctx)
        moving = mm.unet(x, 500, ctx, motion=motion)
    assert (moving - still).abs().mean() > 1e-3 * still.abs().mean()


def test_animatelcm_lora_merges_with_a_scale_of_one_eighth(tmp_path, base_files):
    path = write_animatelcm_lora(str(tmp_path / "AnimateLCM_sd15_t2v_lora.safetensors"), seed=15, rank=RANK)
    lora = load_lora(path)
    assert lora.text_encoder == {} and {w.scale for w in lora.unet.values()} == {1 / 8}
    motion = write_animatelcm_motion_module(str(tmp_path / "AnimateLCM_sd15_t2v.ckpt"), seed=16)
    base = _weights(_load([base_files["sd15"]]))
    after = _weights(_load([base_files["sd15"], motion, path], strength=0.8))
    name = "down_blocks.0.resnets.0.conv1"
    weight = lora.unet[name.replace(".", "_")]
    key = f"unet.{convert.unet_module_map(factory.TINY_UNET)[name]}.weight"
    want = base[key].double() + (0.8 / 8 * weight.up.double().flatten(1) @ weight.down.double().flatten(1)).reshape(base[key].shape)
    torch.testing.assert_close(after[key].double(), want, rtol=1e-6, atol=1e-6)
    assert sum(not torch.equal(base[k], after[k]) for k in base) == len(lora.unet)


# --------------------------------------------------------------------------- recognising LCM models


def test_lcm_files_recognises_animatelcm_by_content_and_lcm_loras_by_catalogue_name(tmp_path, base_files):
    files = {
        "lcm_lora_sd15": write_lcm_lora(str(tmp_path / "lcm-lora-sdv1-5.safetensors"), "sd15", "kohya"),
        "lcm_lora_sdxl": write_lcm_lora(str(tmp_path / "LCM-LoRA-SDXL.safetensors"), "sdxl", "peft", alpha=None),  # names compare case-blind
        "animatelcm_lora": write_animatelcm_lora(str(tmp_path / "AnimateLCM_sd15_t2v_lora.safetensors")),
        "animatelcm_motion_module": write_animatelcm_motion_module(str(tmp_path / "renamed_motion.safetensors")),
    }
    for kind, path in files.items():
        assert lcm_file_kind(path) == kind, path
    not_lcm = [
        base_files["sd15"],
        write_motion_module(str(tmp_path / "mm_sd_v15_v2.ckpt")),
        write_lcm_lora(str(tmp_path / "pytorch_lora_weights.safetensors"), "sd15", "peft"),  # the name on Hugging Face says nothing
        factory.write_vae(str(tmp_path / "lora" / "lcm-lora-sdv1-5.safetensors")),  # the name alone is not enough
        str(tmp_path / "missing.safetensors"),
        str(tmp_path),
    ]
    assert [lcm_file_kind(p) for p in not_lcm] == [None] * len(not_lcm)
    mixed = [not_lcm[0], files["animatelcm_motion_module"], not_lcm[1], files["lcm_lora_sd15"]]
    assert lcm_files(mixed) == [files["animatelcm_motion_module"], files["lcm_lora_sd15"]]
    assert lcm_files(mixed, headers={p: read_header(p) for p in mixed if os.path.isfile(p)}) == lcm_files(mixed)
    assert lcm_warning(mixed, "sd1") is None
    assert lcm_warning(not_lcm[:2], "sd1", video=True) == lcm_missing_message("sd1", video=True)


def test_lcm_missing_message_names_file_source_and_folder():
    for entry in LCM_FILES:
        assert entry.filename in CATALOGUE
        assert CATALOGUE[entry.filename].folder == ("AnimateDiff" if entry.role == "motion_module" else "lora")
    sd1 = lcm_missing_message("sd1")
    assert "lcm-lora-sdv1-5.safetensors" in sd1 and os.path.join("models", "lora") + os.sep in sd1
    assert "https://huggingface.co/latent-consistency/lcm-lora-sdv1-5/resolve/main/pytorch_lora_weights.safetensors" in sd1
    assert "AnimateLCM" not in sd1
    video = lcm_missing_message("sd1_checkpoint", video=True, models_dir="M")
    for name in ("lcm-lora-sdv1-5.safetensors", "AnimateLCM_sd15_t2v.ckpt", "AnimateLCM_sd15_t2v_lora.safetensors"):
        assert name in video and CATALOGUE[name].url in video
    assert os.path.join("M", "AnimateDiff") + os.sep in video and os.path.join("M", "lora") + os.sep in video
    sdxl = lcm_missing_message("sdxl", video=True)
    assert "lcm-lora-sdxl.safetensors" in sdxl and CATALOGUE["lcm-lora-sdxl.safetensors"].url in sdxl and "AnimateLCM" not in sdxl
    with pytest.raises(ValueError, match="family_sd"):
        lcm_missing_message("sd2")


def test_lcm_files_load_from_headers_alone(tmp_path, base_files):
    """The estimates build the models on the meta device from file headers (state_dict.meta_tensors_only):
    alpha tensors and computed positional tables must not need values there."""
    from diffsynth.models.state_dict import meta_tensors_only, read_file_header

    files = [
        base_files["sd15"],
        write_animatelcm_motion_module(str(tmp_path / "AnimateLCM_sd15_t2v.ckpt")),
        write_lcm_lora(str(tmp_path / "kohya.safetensors"), "sd15", "kohya", alpha=1.0),
        write_lcm_lora(str(tmp_path / "peft.safetensors"), "sd15", "peft", alpha=1.0),
    ]
    with meta_tensors_only(read_file_header):
        mm = ModelManager(torch_dtype=torch.float16, device="meta")
        mm.load_models(files, lora_alphas=[1.0, 1.0])
    assert mm.unet.input_blocks[1][0].in_layers[2].weight.is_meta
    assert mm.motion_modules.config.max_positions == ANIMATELCM_POSITIONS
