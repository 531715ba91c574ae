"""Samplers in long, resumable videos: a multistep solver's state and an ancestral sampler's noise live per frame on disk.

Real processes killed with SIGKILL mid-step (``diffsynth.testing.crash_child``), then rerun: each
sampler's resumed render equals its uninterrupted one bit for bit, and the sampler's per-frame
files (``latents/previous_<g>``) are gone at the end. Project as tests/test_runner_crash.py:
8 frames of 64x64, AnimateDiff windows of 4 with stride 2 (3 windows, 2 UNet calls each per step).
"""
from __future__ import annotations

import copy
import json
import os
import signal

import numpy as np
import pytest
import torch

from diffsynth.pipelines.runner import SDVideoPipelineRunner
from diffsynth.pipelines.stages import denoising_plan
from diffsynth.schedulers.base import frame_step_noise
from diffsynth.testing.runner_files import write_tiny_project

CALLS_PER_STEP = 6


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    config = write_tiny_project(str(tmp_path_factory.mktemp("sampler_project")), frames=8, smoother=False, steps=3)
    config["pipeline"]["pipeline_inputs"].update(animatediff_batch_size=4, animatediff_stride=2)
    return config


def _render(server, config, out, *kill):
    config = copy.deepcopy(config)
    config["data"]["output_folder"] = str(out)
    work = f"{out}.child"
    os.makedirs(work, exist_ok=True)
    n = len([f for f in os.listdir(work) if f.endswith(".json")])
    path, log = os.path.join(work, f"run{n}.json"), os.path.join(work, f"run{n}.log")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return server.run([path, *kill], log)


def _frames(out) -> dict[str, bytes]:
    folder = os.path.join(out, "frames")
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def _files(out) -> set[str]:
    return {os.path.relpath(os.path.join(root, name), out) for root, _, names in os.walk(out) for name in names}


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm"])
def test_a_kill_mid_step_resumes_identically(server, project, sampler, tmp_path):
    config = copy.deepcopy(project)
    config["pipeline"]["pipeline_inputs"]["sampler"] = sampler
    reference = tmp_path / "reference"
    assert _render(server, config, reference).rc == 0
    ddim = tmp_path / "ddim"
    assert _render(server, project, ddim).rc == 0
    assert _frames(reference) != _frames(ddim)  # the sampler is in use
    for kill in (CALLS_PER_STEP + 3, 2 * CALLS_PER_STEP + 5):  # inside step 2's second window; inside step 3's last
        out = tmp_path / f"killed_{kill}"
        killed = _render(server, config, out, "--kill-after-unet", str(kill))
        assert killed.rc == -signal.SIGKILL, killed.log
        if sampler == "dpmpp_2m_karras":  # the multistep state of the generation it stopped in is on disk
            assert any(name.startswith("previous_") for name in os.listdir(out / "latents"))
        resumed = _render(server, config, out)
        assert resumed.rc == 0, resumed.log
        assert _frames(out) == _frames(reference), (sampler, kill)
        assert _files(out) == _files(reference)  # no sampler file left behind
    assert not [name for name in _files(reference) if "previous_" in name]


def test_sampler_is_keyed_and_sets_the_step_count(project, tmp_path):
    runner = SDVideoPipelineRunner(progress_bar_cmd=None)
    config = copy.deepcopy(project)
    config["data"]["output_folder"] = str(tmp_path / "out")
    keys = runner.stage_keys(runner.prepare(config))
    config["pipeline"]["pipeline_inputs"]["sampler"] = "ddim"
    assert runner.stage_keys(runner.prepare(config)) == keys  # "ddim" spelled out: the keys of renders before samplers
    config["pipeline"]["pipeline_inputs"]["sampler"] = "euler"
    changed = runner.stage_keys(runner.prepare(config))
    assert [changed[s] == keys[s] for s in range(4)] == [True, True, True, False]  # from the initial latents on
    inputs = dict(config["pipeline"]["pipeline_inputs"], num_inference_steps=6, sampler="lcm")
    assert denoising_plan(inputs, 8)["steps"] == 6
    config["pipeline"]["pipeline_inputs"]["sampler"] = "dpm"
    with pytest.raises(ValueError, match=r"(?s)pipeline_inputs\.sampler: is 'dpm', which is not a sampler.*use one of ddim, "):
        runner.prepare(config)


def test_frame_noise_depends_only_on_seed_frame_and_step():
    a = frame_step_noise(7, 3, 2, (4, 8, 8))
    assert torch.equal(a, frame_step_noise(7, 3, 2, (4, 8, 8)))
    others = [frame_step_noise(8, 3, 2, (4, 8, 8)), frame_step_noise(7, 4, 2, (4, 8, 8)), frame_step_noise(7, 3, 1, (4, 8, 8))]
    assert all(not torch.equal(a, b) for b in others)
    assert abs(float(a.std()) - 1) < 0.2 and np.isfinite(a.numpy()).all()


def test_lcm_without_an_lcm_model_is_warned_naming_the_file(project, tmp_path, caplog):
    import logging

    from diffsynth.testing.lcm_files import write_animatelcm_motion_module

    runner = SDVideoPipelineRunner(progress_bar_cmd=None)
    config = copy.deepcopy(project)
    config["data"]["output_folder"] = str(tmp_path / "out")
    config["pipeline"]["pipeline_inputs"].update(sampler="lcm", num_inference_steps=2, cfg_scale=1.5)
    notes = runner.prepare(config)["notes"]
    assert len(notes) == 1 and "lcm-lora-sdv1-5.safetensors" in notes[0] and "AnimateLCM_sd15_t2v.ckpt" in notes[0]
    with caplog.at_level(logging.WARNING, logger="diffsynth"):
        runner.run(config)
    assert any("The LCM sampler needs an LCM model" in r.getMessage() for r in caplog.records)
    # AnimateLCM's motion module in place of AnimateDiff's: no warning, and the render changes
    motion = write_animatelcm_motion_module(str(tmp_path / "AnimateLCM_sd15_t2v.ckpt"), seed=5)
    with_lcm = copy.deepcopy(config)
    with_lcm["models"]["model_list"] = [motion if "AnimateDiff" in p else p for p in config["models"]["model_list"]]
    with_lcm["data"]["output_folder"] = str(tmp_path / "lcm")
    assert runner.prepare(with_lcm)["notes"] == []
    runner.run(with_lcm)
    first = lambda out: open(os.path.join(out, "frames", sorted(os.listdir(os.path.join(out, "frames")))[0]), "rb").read()  # noqa: E731
    assert first(tmp_path / "lcm") != first(tmp_path / "out")
