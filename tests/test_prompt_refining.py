"""Translator and BeautifulPrompt: loading and detection, templates, sampling, RNG isolation, prompter order.

The models are tiny random-weight MarianMT / BLOOM folders with tokenizers trained offline
(`diffsynth.testing.prompt_model_files`); their text is gibberish, so the tests check plumbing,
templates, determinism and isolation, not translation quality.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from diffsynth import BeautifulPrompt, ModelFileError, ModelManager, SDImagePipeline, Translator
from diffsynth.models.detect import detect
from diffsynth.models.state_dict import read_header
from diffsynth.prompts import SDPrompter
from diffsynth.prompts.beautiful_prompt import GENERATION_SETTINGS, TEMPLATE_V1, TEMPLATE_V2
from diffsynth.testing.prompt_model_files import write_beautiful_prompt_folder, write_translator_folder



@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_models")
    return {
        "translator": write_translator_folder(str(root / "translator" / "opus-mt-zh-en")),
        "v1": write_beautiful_prompt_folder(str(root / "BeautifulPrompt" / "pai-bloom-1b1-text2prompt-sd")),
        "v2": write_beautiful_prompt_folder(str(root / "BeautifulPrompt" / "pai-bloom-1b1-text2prompt-sd-v2"), seed=1),
    }


@pytest.fixture(scope="module")
def manager(folders):
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([folders["translator"], folders["v1"]])
    return mm


class GenerateSpy:
    """Records what `generate` got and returned, then defers to the real one."""

    def __init__(self, model):
        self.real, self.calls = model.generate, []

    def __call__(self, **kwargs):
        output = self.real(**kwargs)
        self.calls.append((kwargs, output))
        return output


# --- loading and detection ----------------------------------------------------------------


def test_folders_load_through_the_model_manager(manager, folders):
    assert isinstance(manager.translator, Translator) and isinstance(manager.beautiful_prompt, BeautifulPrompt)
    assert manager.model_path == {"translator": folders["translator"], "beautiful_prompt": folders["v1"]}
    assert manager.translator.device.type == "cpu" and manager.beautiful_prompt.device.type == "cpu"
    assert type(manager.translator.model).__name__ == "MarianMTModel"
    assert type(manager.beautiful_prompt.model).__name__ == "BloomForCausalLM"


def test_weight_files_are_detected_by_keys_and_load_their_folder(folders):
    translator_file = os.path.join(folders["translator"], "model.safetensors")
    bloom_file = os.path.join(folders["v2"], "model.safetensors")
    assert detect(read_header(translator_file)).family == "translator"
    assert detect(read_header(bloom_file)).family == "beautiful_prompt"
    mm = ModelManager(torch_dtype=torch.bfloat16, device="cpu")
    mm.load_models([translator_file, bloom_file])
    assert mm.get_model_with_model_path(bloom_file) is mm.beautiful_prompt
    assert mm.beautiful_prompt.template == TEMPLATE_V2  # the folder name ends in -v2
    assert mm.beautiful_prompt.model.dtype == torch.bfloat16  # the manager's dtype
    assert mm.translator.model.dtype == torch.float32  # the translator stays fp32, as the original
    mm.to("cpu")  # both are modules the manager can move


def test_templates_are_the_originals():
    assert TEMPLATE_V1 == "Instruction: Give a simple description of the image to generate a drawing prompt.\nInput: {raw_prompt}\nOutput:"
    assert TEMPLATE_V2.startswith("Converts a simple image description into a prompt. Prompts are formatted as multiple related tags")
    assert "or use a number to specify the weight. You should add" in TEMPLATE_V2
    assert TEMPLATE_V2.endswith("correlation between the input and output.\n### Input: {raw_prompt}\n### Output:")
    assert GENERATION_SETTINGS == {"max_new_tokens": 384, "do_sample": True, "temperature": 0.9, "top_k": 50, "top_p": 0.95,
                                   "repetition_penalty": 1.1, "num_return_sequences": 1}


@pytest.mark.parametrize("version,template", [("v1", TEMPLATE_V1), ("v2", TEMPLATE_V2)])
def test_model_sees_the_template_and_only_new_tokens_are_appended(folders, monkeypatch, version, template):
    bp = BeautifulPrompt.from_folder(folders[version])
    assert bp.template == template
    spy = GenerateSpy(bp.model)
    monkeypatch.setattr(bp.model, "generate", spy)
    result = bp("a small cat", seed=3)
    (kwargs, output), = spy.calls
    prompt_ids = kwargs["input_ids"]
    assert bp.tokenizer.decode(prompt_ids[0]) == template.format(raw_prompt="a small cat")
    assert {k: kwargs[k] for k in GENERATION_SETTINGS} == GENERATION_SETTINGS
    assert torch.equal(output[:, : prompt_ids.shape[1]], prompt_ids)
    continuation = bp.tokenizer.decode(output[0, prompt_ids.shape[1]:], skip_special_tokens=True).strip()
    assert continuation and result == "a small cat, " + continuation
    assert "Instruction" not in continuation and "### Input" not in result


# --- determinism and RNG isolation ----------------------------------------------------------


def test_refining_is_reproducible_under_a_seed(manager):
    bp = manager.beautiful_prompt
    first = bp("a girl", seed=5)
    assert bp("a girl", seed=5) == first
    assert len({bp("a girl", seed=s) for s in range(4)}) > 1
    assert bp("a girl", generator=torch.Generator().manual_seed(1)) == bp("a girl", generator=torch.Generator().manual_seed(1))
    bp.seed = 5
    try:
        assert bp("a girl") == first
    finally:
        bp.seed = None


def test_refining_never_moves_the_global_rng_and_follows_manual_seed(manager):
    bp, translator = manager.beautiful_prompt, manager.translator
    torch.manual_seed(11)
    state = torch.get_rng_state()
    refined = bp("a girl")
    translated = translator("一个漂亮的女孩")
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(11)
    assert bp("a girl") == refined  # without a seed, torch.manual_seed decides it (as the original)
    assert translator("一个漂亮的女孩") == translated
    assert translated and "</s>" not in translated and "<pad>" not in translated


def test_pipeline_image_does_not_depend_on_refining_randomness(tiny_sd_file, folders):
    """Two images in a row after one manual_seed: the second one's noise comes after the first one's refining."""
    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([tiny_sd_file, folders["translator"], folders["v1"]])
    refining = SDImagePipeline.from_model_manager(mm)
    assert refining.prompter.translator is mm.translator and refining.prompter.beautiful_prompt is mm.beautiful_prompt
    mm.beautiful_prompt.seed = 2  # a fixed refinement, so the stub below can return the same text
    refined = refining.prompter.refine_prompt("一个漂亮的女孩")
    assert refined != "一个漂亮的女孩"

    fixed = SDImagePipeline.from_model_manager(mm)
    fixed.prompter.translator = fixed.prompter.beautiful_prompt = None
    fixed.prompter.add_prompt_refiner(lambda prompt: refined)  # same text, no randomness at all

    def render(pipe):
        torch.manual_seed(0)
        kwargs = dict(prompt="一个漂亮的女孩", height=64, width=64, num_inference_steps=2, progress_bar_cmd=None)
        images = [np.asarray(pipe(**kwargs)) for _ in range(2)]
        return images, torch.rand(4)

    (a1, a2), after_a = render(refining)
    (b1, b2), after_b = render(fixed)
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    torch.testing.assert_close(after_a, after_b, rtol=0, atol=0)


# --- the prompter: order, polarity, keywords, logging ----------------------------------------


class Recorder:
    def __init__(self, name, calls, result):
        self.name, self.calls, self.result = name, calls, result

    def __call__(self, prompt):
        self.calls.append((self.name, prompt))
        return self.result(prompt)


@pytest.fixture
def stub_prompter():
    prompter = SDPrompter()
    calls = []
    prompter.translator = Recorder("translate", calls, lambda p: f"EN[{p}]")
    prompter.beautiful_prompt = Recorder("refine", calls, lambda p: p + ", detailed")
    return prompter, calls


def test_positive_prompts_are_translated_then_refined_negative_untouched(stub_prompter, caplog):
    prompter, calls = stub_prompter
    with caplog.at_level(logging.INFO, logger="diffsynth"):
        assert prompter.process_prompt("一个女孩") == "EN[一个女孩], detailed"
    assert calls == [("translate", "一个女孩"), ("refine", "EN[一个女孩]")]
    assert "EN[一个女孩], detailed" in caplog.text
    calls.clear()
    assert prompter.process_prompt("模糊", positive=False) == "模糊"
    assert calls == []


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_blank_prompts_pass_through_untouched(stub_prompter, manager, prompt):
    prompter, calls = stub_prompter
    assert prompter.process_prompt(prompt) == prompt and calls == []
    assert manager.translator(prompt) == prompt and manager.beautiful_prompt(prompt) == prompt


def test_textual_inversion_keywords_are_not_translated(stub_prompter):
    prompter, calls = stub_prompter
    prompter.add_textual_inversion("mystyle", 2)
    result = prompter.process_prompt("一个mystyle风格的女孩, mystyles")
    assert [c for c in calls if c[0] == "translate"] == [("translate", "一个"), ("translate", "风格的女孩, mystyles")]
    assert result == "EN[一个]  mystyle_0 mystyle_1  EN[风格的女孩, mystyles], detailed"


def test_real_models_keep_keywords_and_replace_them_last(manager):
    prompter = SDPrompter()
    prompter.fetch_prompt_models(manager)
    prompter.add_textual_inversion("mystyle", 1)
    manager.beautiful_prompt.seed = 0
    try:
        result = prompter.process_prompt("mystyle, 一个漂亮的女孩")
    finally:
        manager.beautiful_prompt.seed = None
    assert result.startswith(" mystyle_0 ")
    assert prompter.process_prompt("mystyle", positive=False) == " mystyle_0 "


# --- bad input -------------------------------------------------------------------------------


def test_a_folder_that_is_neither_model_is_refused(tmp_path, folders):
    other = tmp_path / "t5"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    with pytest.raises(ModelFileError, match=r"t5.*T5ForConditionalGeneration.*MarianMTModel"):
        ModelManager(device="cpu").load_models([str(other)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFileError, match=r"empty.*not a diffusers model folder.*translator or BeautifulPrompt folder needs its config.json"):
        ModelManager(device="cpu").load_models([str(empty)])


def test_incomplete_prompt_model_folders_name_the_folder_and_the_download(tmp_path, folders):
    no_tokenizer = shutil.copytree(folders["translator"], tmp_path / "opus-mt-zh-en")
    os.remove(no_tokenizer / "source.spm")
    with pytest.raises(ModelFileError, match=r"opus-mt-zh-en.*could not be loaded as a translator tokenizer.*Helsinki-NLP/opus-mt-zh-en"):
        ModelManager(device="cpu").load_models([str(no_tokenizer)])
    no_weights = shutil.copytree(folders["v1"], tmp_path / "bp")
    os.remove(no_weights / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"bp: holds no weight file.*alibaba-pai/pai-bloom-1b1-text2prompt-sd"):
        ModelManager(device="cpu").load_models([str(no_weights)])


def test_weight_file_in_a_folder_of_another_kind_is_refused(tmp_path, folders):
    mixed = shutil.copytree(folders["translator"], tmp_path / "mixed")
    shutil.copy(os.path.join(folders["v1"], "model.safetensors"), mixed / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"mixed: should be a beautiful_prompt folder but has class 'MarianMTModel'"):
        ModelManager(device="cpu").load_models([str(mixed / "model.safetensors")])


@pytest.mark.gpu
def test_cuda_refining_is_reproducible_and_leaves_cuda_rng_alone(folders):
    mm = ModelManager(device="cuda")  # fp16 for BeautifulPrompt, fp32 for the translator
    mm.load_models([folders["translator"], folders["v2"]])
    assert mm.beautiful_prompt.device.type == "cuda" and mm.beautiful_prompt.model.dtype == torch.float16
    cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state()
    first = mm.beautiful_prompt(mm.translator("一个漂亮的女孩"), seed=4)
    assert mm.beautiful_prompt(mm.translator("一个漂亮的女孩"), seed=4) == first
    assert torch.equal(torch.get_rng_state(), cpu_state) and torch.equal(torch.cuda.get_rng_state(), cuda_state)
