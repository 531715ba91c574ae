"""Loading every supported format through ModelManager, detection, and strict errors."""
from __future__ import annotations

import os

import pytest
import torch

from diffsynth import ModelFileError, ModelManager
from diffsynth.models.detect import FINGERPRINTS, detect
from diffsynth.models.state_dict import load_state_dict, read_header
from diffsynth.testing import factory


def _reference(seed=0):
    return factory.build_sd_state_dicts(seed)


def _assert_loaded_equal(mm: ModelManager, seed=0, dtype=torch.float32, atol=0.0):
    ref = _reference(seed)
    for name, part, prefix in (("unet", "unet", ""), ("text_encoder", "text_encoder", "")):
        got = mm.model[name].state_dict()
        for k, v in ref[part].items():
            assert got[k].dtype == dtype, k
            torch.testing.assert_close(got[k].float(), v.to(dtype).float(), atol=atol, rtol=0)
    enc = mm.vae_encoder.state_dict()
    dec = mm.vae_decoder.state_dict()
    for k, v in ref["vae"].items():
        target = enc if k.startswith(("encoder.", "quant_conv.")) else dec
        torch.testing.assert_close(target[k].float(), v.to(dtype).float(), atol=atol, rtol=0)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("model.safetensors", {}),
        ("model.ckpt", {}),  # nested {"state_dict": ...} as Lightning writes
        ("model.pt", {"nested": False}),
        ("model.pth", {"dtype": "fp16"}),
        ("model_bf16.safetensors", {"dtype": "bf16"}),
        ("model_ema.ckpt", {"ema": True}),
    ],
)
def test_single_file_checkpoints_load_exactly(tmp_path, name, kwargs):
    path = factory.write_sd_checkpoint(str(tmp_path / name), seed=3, **kwargs)
    assert detect(read_header(path), path).family == "sd1_checkpoint"
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([path])
    # fp16/bf16 files: values equal the reference rounded to that dtype
    file_dtype = factory.DTYPES[kwargs.get("dtype", "fp32")]
    ref = _reference(3)
    got = mm.unet.state_dict()
    for k, v in ref["unet"].items():
        torch.testing.assert_close(got[k], v.to(file_dtype).float(), atol=0, rtol=0)
    assert set(mm.model) == {"unet", "text_encoder", "vae_encoder", "vae_decoder"}
    assert mm.model_path["unet"] == path


def test_load_in_half_precision(tiny_sd_file):
    mm = ModelManager(torch_dtype=torch.float16, device="cpu")
    mm.load_models([tiny_sd_file])
    _assert_loaded_equal(mm, dtype=torch.float16)


def test_diffusers_folder_loads_like_the_single_file(tmp_path):
    folder = factory.write_diffusers_folder(str(tmp_path / "tiny_diffusers"), seed=5)
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([folder])
    _assert_loaded_equal(mm, seed=5)
    # a single component folder works too
    mm2 = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm2.load_models([os.path.join(folder, "vae")])
    assert set(mm2.model) == {"vae_encoder", "vae_decoder"}


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_standalone_vae_overrides_the_checkpoint_vae(tmp_path, tiny_sd_file, layout):
    vae = factory.write_vae(str(tmp_path / f"vae_{layout}.safetensors"), seed=9, layout=layout)
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([tiny_sd_file, vae])
    ref = _reference(9)["vae"]
    torch.testing.assert_close(mm.vae_decoder.state_dict()["decoder.conv_out.weight"], ref["decoder.conv_out.weight"], atol=0, rtol=0)
    assert mm.model_path["vae_decoder"] == vae


def test_fingerprints_do_not_collide(tmp_path):
    files = {
        "sd1_checkpoint": factory.write_sd_checkpoint(str(tmp_path / "a.safetensors")),
        "sdxl_checkpoint": factory.write_sdxl_checkpoint(str(tmp_path / "xl.safetensors")),
        "vae": factory.write_vae(str(tmp_path / "v.safetensors")),
        "vae_diffusers": factory.write_vae(str(tmp_path / "vd.safetensors"), layout="diffusers"),
        "lora": factory.write_lora(str(tmp_path / "l.safetensors")),
        "textual_inversion": factory.write_textual_inversion(str(tmp_path / "ti.pt")),
    }
    from diffsynth.testing.controlnet_files import write_controlnet

    files["controlnet"] = write_controlnet(str(tmp_path / "cn.pth"))
    cn_folder = write_controlnet(str(tmp_path / "cn_diffusers"), layout="diffusers")
    files["controlnet_diffusers"] = os.path.join(cn_folder, "diffusion_pytorch_model.safetensors")
    from diffsynth.testing.motion_files import write_motion_module

    files["motion_module"] = write_motion_module(str(tmp_path / "mm.ckpt"))
    from diffsynth.testing.rife_files import write_rife_file

    files["rife"] = write_rife_file(str(tmp_path / "flownet.pkl"))
    folder = factory.write_diffusers_folder(str(tmp_path / "d"))
    files["unet_diffusers"] = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    files["clip_text"] = os.path.join(folder, "text_encoder", "model.safetensors")
    from diffsynth.testing.prompt_model_files import write_beautiful_prompt_folder, write_translator_folder

    files["translator"] = os.path.join(write_translator_folder(str(tmp_path / "opus-mt")), "model.safetensors")
    files["beautiful_prompt"] = os.path.join(write_beautiful_prompt_folder(str(tmp_path / "bloom")), "model.safetensors")
    assert set(files) == {f.family for f in FINGERPRINTS if f.supported}
    for family, path in files.items():
        keys = list(read_header(path))
        hits = [f.family for f in FINGERPRINTS if f.matches(keys)]
        assert hits == [family], (path, hits)


def test_unsupported_families_are_named(tmp_path):
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "conditioner.embedders.0.model.ln_final.weight": torch.zeros(1)}
    with pytest.raises(ModelFileError, match="refiner"):
        ModelManager(device="cpu").load_model(_save(tmp_path / "refiner.safetensors", sd))
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "cond_stage_model.model.ln_final.weight": torch.zeros(1)}
    with pytest.raises(ModelFileError, match="2.x is not supported"):
        ModelManager(device="cpu").load_model(_save(tmp_path / "sd2.safetensors", sd))


def _save(path, sd):
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return str(path)


def test_unknown_file_names_what_it_saw(tmp_path):
    path = _save(tmp_path / "weird.safetensors", {"foo.bar.weight": torch.zeros(2), "foo.baz": torch.zeros(1)})
    with pytest.raises(ModelFileError) as e:
        ModelManager(device="cpu").load_models([path])
    assert "weird.safetensors" in str(e.value) and "foo.bar" in str(e.value)


def test_incomplete_checkpoint_lists_missing_keys(tmp_path):
    good = load_state_dict(factory.write_sd_checkpoint(str(tmp_path / "full.safetensors")))
    del good["model.diffusion_model.out.2.weight"]
    path = _save(tmp_path / "broken.safetensors", good)
    with pytest.raises(ModelFileError) as e:
        ModelManager(torch_dtype=torch.float32, device="cpu").load_models([path])
    msg = str(e.value)
    assert "broken.safetensors" in msg and "out.2.weight" in msg


def test_truncated_file_is_an_error(tmp_path, tiny_sd_file):
    data = open(tiny_sd_file, "rb").read()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated.safetensors"):
        ModelManager(device="cpu").load_models([str(path)])


def test_missing_file_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        ModelManager(device="cpu").load_models([str(tmp_path / "nothere.safetensors")])


def test_lora_alphas_are_not_consumed(tmp_path, tiny_sd_file):
    lora = factory.write_lora(str(tmp_path / "l.safetensors"))
    alphas = [0.5]
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([tiny_sd_file, lora], lora_alphas=alphas)
    assert alphas == [0.5]
    assert mm.model_path["lora"] == [lora]
    with pytest.raises(ValueError, match="lora_alphas"):
        ModelManager(torch_dtype=torch.float32, device="cpu").load_models([tiny_sd_file, lora], lora_alphas=[])


def test_lora_changes_unet_and_text_encoder(tmp_path, tiny_sd_file):
    lora = factory.write_lora(str(tmp_path / "l.safetensors"))
    base = ModelManager(torch_dtype=torch.float32, device="cpu")
    base.load_models([tiny_sd_file])
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([tiny_sd_file, lora], lora_alphas=[1.0])
    key_u = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    key_t = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base.unet.state_dict()[key_u], mm.unet.state_dict()[key_u])
    assert not torch.equal(base.text_encoder.state_dict()[key_t], mm.text_encoder.state_dict()[key_t])


def test_textual_inversion_before_or_after_checkpoint(tmp_path, tiny_sd_file):
    folder = tmp_path / "ti"
    factory.write_textual_inversion(str(folder / "mystyle.pt"), num_vectors=3)
    a = ModelManager(torch_dtype=torch.float32, device="cpu")
    a.load_textual_inversions(str(folder))
    a.load_models([tiny_sd_file])
    b = ModelManager(torch_dtype=torch.float32, device="cpu")
    b.load_models([tiny_sd_file])
    b.load_textual_inversions(str(folder))
    assert a.textual_inversion_ids == b.textual_inversion_ids == {"mystyle": [49408, 49409, 49410]}
    torch.testing.assert_close(a.text_encoder.state_dict()["text_model.embeddings.token_embedding.weight"], b.text_encoder.state_dict()["text_model.embeddings.token_embedding.weight"])


def test_get_model_with_model_path_and_attribute_errors(tiny_sd_file, tmp_path):
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([tiny_sd_file])
    assert mm.get_model_with_model_path(tiny_sd_file) is mm.unet
    with pytest.raises(ValueError, match="no model was loaded"):
        mm.get_model_with_model_path(str(tmp_path / "other.safetensors"))
    with pytest.raises(AttributeError, match="controlnet"):
        mm.controlnet


def test_loading_makes_no_needless_copies(tmp_path, tiny_sd_file):
    """The state dict's tensors become the parameters (assigned, not copied)."""
    from diffsynth.models.loading import instantiate
    from diffsynth.models.sd_unet import SDUNet, infer_unet_config

    sd = {k.removeprefix("model.diffusion_model."): v for k, v in load_state_dict(tiny_sd_file).items() if k.startswith("model.diffusion_model.")}
    unet = instantiate(lambda: SDUNet(infer_unet_config(sd)), sd, source="x", what="UNet", device="cpu", dtype=torch.float32)
    assert unet.out[2].weight.data_ptr() == sd["out.2.weight"].data_ptr()


def test_textual_inversion_keeps_the_text_encoder_frozen(tmp_path, tiny_sd_file):
    """A trainable embedding row would make every UNet call keep an autograd graph (RAM grew to GBs)."""
    factory.write_textual_inversion(str(tmp_path / "ti" / "kw.pt"))
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([tiny_sd_file])
    mm.load_textual_inversions(str(tmp_path / "ti"))
    assert not any(p.requires_grad for p in mm.text_encoder.parameters())
