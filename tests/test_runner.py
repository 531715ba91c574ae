"""SDVideoPipelineRunner: the 10 stages, manifest and last_process_id, reuse and recompute by cache key, validation."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from diffsynth.pipelines.runner import SDVideoPipelineRunner
from diffsynth.testing.runner_files import write_tiny_project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return write_tiny_project(str(tmp_path_factory.mktemp("project")), frames=10, smoother=False)


def _run(config, counter=None):
    runner = SDVideoPipelineRunner(progress_bar_cmd=None)
    return runner.run(config)


def _frames(out):
    from PIL import Image

    names = sorted(os.listdir(os.path.join(out, "frames")))
    return np.stack([np.asarray(Image.open(os.path.join(out, "frames", n))) for n in names])


def _mtimes(folder):
    return {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in sorted(os.listdir(folder))}


def test_full_run_writes_every_stage_and_reruns_for_free(project, tmp_path):
    config = copy.deepcopy(project)
    out = str(tmp_path / "out")
    config["data"]["output_folder"] = out
    frames = _run(config)
    assert len(frames) == 10 and frames[0].size == (64, 64)
    assert open(os.path.join(out, "last_process_id.txt")).read() == "9"
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert [manifest["stages"][str(i)]["status"] for i in range(10)] == ["done"] * 10
    for folder in ("source_images", "controlnet_caches/0", "controlnet_caches/1", "frames"):
        assert len(os.listdir(os.path.join(out, folder))) == 10, folder
    assert os.path.getsize(os.path.join(out, "video.mp4")) > 0
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["pipeline"]["pipeline_inputs"]["input_frames"] == [] and saved["models"]["lora_alphas"] == []
    before = _mtimes(os.path.join(out, "frames"))
    _run(config)
    assert _mtimes(os.path.join(out, "frames")) == before  # nothing recomputed


def test_prompt_change_reuses_frames_and_annotations(project, tmp_path):
    config = copy.deepcopy(project)
    out = str(tmp_path / "out")
    config["data"]["output_folder"] = out
    _run(config)
    first = _frames(out)
    source, cn = _mtimes(os.path.join(out, "source_images")), _mtimes(os.path.join(out, "controlnet_caches", "0"))
    config["pipeline"]["pipeline_inputs"]["prompt"] = "a robot is dancing"
    _run(config)
    assert _mtimes(os.path.join(out, "source_images")) == source
    assert _mtimes(os.path.join(out, "controlnet_caches", "0")) == cn
    assert not np.array_equal(first, _frames(out))


def test_range_change_recomputes_everything(project, tmp_path):
    config = copy.deepcopy(project)
    out = str(tmp_path / "out")
    config["data"]["output_folder"] = out
    _run(config)
    for spec in [config["data"]["input_frames"], *config["data"]["controlnet_frames"]]:
        spec["start_frame_id"], spec["end_frame_id"] = 2, 8
    frames = _run(config)
    assert len(frames) == 6
    assert len(os.listdir(os.path.join(out, "source_images"))) == 6


def test_same_result_as_a_fresh_run_after_deleting_half_the_frames(project, tmp_path):
    config = copy.deepcopy(project)
    out = str(tmp_path / "out")
    config["data"]["output_folder"] = out
    _run(config)
    reference = _frames(out)
    for name in sorted(os.listdir(os.path.join(out, "frames")))[5:]:
        os.remove(os.path.join(out, "frames", name))
    os.remove(os.path.join(out, "video.mp4"))
    _run(config)
    assert np.array_equal(reference, _frames(out))


def test_inputs_are_validated_before_models_load(project, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(SDVideoPipelineRunner, "_load_pipeline", lambda self, config: calls.append(1))
    bad = copy.deepcopy(project)
    bad["data"]["input_frames"]["height"] = 70
    with pytest.raises(ValueError, match="multiple of 8.*nearest valid: 72"):
        _run(bad)
    bad = copy.deepcopy(project)
    bad["data"]["input_frames"]["start_frame_id"] = 50
    with pytest.raises(ValueError, match=r"data.input_frames.start_frame_id/end_frame_id: \[50, 10\) is not a frame range"):
        _run(bad)
    bad = copy.deepcopy(project)
    bad["data"]["input_frames"]["start_frame_id"], bad["data"]["input_frames"]["end_frame_id"] = 4, 4
    with pytest.raises(ValueError, match=r"\[4, 4\) is not a frame range"):
        _run(bad)
    bad = copy.deepcopy(project)
    bad["data"]["controlnet_frames"][1]["end_frame_id"] = 5
    with pytest.raises(ValueError, match="same length"):
        _run(bad)
    bad = copy.deepcopy(project)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    bad["data"]["input_frames"]["video_file"] = str(broken)
    with pytest.raises(ValueError, match="video_file: ffmpeg cannot read it as a video: .*Invalid data found when processing input(.|\n)*broken.mp4"):
        _run(bad)
    assert calls == []


# ---------------------------------------------------------------------- the smoother's stages, keys and progress


@pytest.fixture(scope="module")
def smooth_project(tmp_path_factory):
    config = write_tiny_project(str(tmp_path_factory.mktemp("smooth_project")), frames=8, smoother=True, steps=2)
    config["pipeline"]["pipeline_inputs"].update(animatediff_batch_size=4, animatediff_stride=2, unet_batch_size=4, controlnet_batch_size=4)
    return config


class _CountingRunner(SDVideoPipelineRunner):
    """Counts UNet forward calls (a forward hook; no module is patched)."""

    def __init__(self, **kwargs):
        super().__init__(progress_bar_cmd=kwargs.pop("progress_bar_cmd", None), **kwargs)
        self.unet_calls = 0

    def _load_pipeline(self, config):
        pipe, model_manager = super()._load_pipeline(config)
        pipe.unet.register_forward_hook(lambda *args: setattr(self, "unet_calls", self.unet_calls + 1))
        return pipe, model_manager


def _with_out(config, out):
    config = copy.deepcopy(config)
    config["data"]["output_folder"] = str(out)
    return config


def _keys(config):
    return SDVideoPipelineRunner.stage_keys(SDVideoPipelineRunner(progress_bar_cmd=None).prepare(config))


def test_only_an_in_loop_smoother_is_part_of_the_denoising_key(smooth_project, tmp_path):
    config = _with_out(smooth_project, tmp_path / "out")
    changed = copy.deepcopy(config)
    changed["smoother_configs"][0]["config"]["window_size"] = 2
    assert _keys(config)[4] == _keys(changed)[4]  # final-only smoothing: denoising is unaffected
    assert _keys(config)[6] != _keys(changed)[6]
    for c in (config, changed):
        c["pipeline"]["pipeline_inputs"]["smoother_progress_ids"] = [0, -1]
    assert _keys(config)[4] != _keys(changed)[4]  # smoothed inside the loop at step 0: it is


def test_where_and_in_what_blocks_fastblend_stores_its_files_key_nothing(smooth_project, tmp_path):
    config = _with_out(smooth_project, tmp_path / "out")
    changed = copy.deepcopy(config)
    changed["smoother_configs"][0]["config"].update(block_frames=2, cache_folder=str(tmp_path / "elsewhere"))
    assert _keys(config) == _keys(changed)  # the same frames: nothing to recompute


def test_changing_a_final_smoother_parameter_reuses_the_denoising(smooth_project, tmp_path):
    out = tmp_path / "out"
    first_runner = _CountingRunner()
    first_runner.run(_with_out(smooth_project, out))
    assert first_runner.unet_calls == 12  # 2 steps x 3 windows x (positive, negative)
    first = _frames(str(out))
    denoised = json.load(open(out / "manifest.json"))["stages"]["4"]
    changed = copy.deepcopy(smooth_project)
    changed["smoother_configs"][0]["config"]["window_size"] = 1
    rerun = _CountingRunner()
    rerun.run(_with_out(changed, out))
    assert rerun.unet_calls == 0, "the denoised latents were recomputed"
    assert json.load(open(out / "manifest.json"))["stages"]["4"] == denoised
    fresh = tmp_path / "fresh"
    SDVideoPipelineRunner(progress_bar_cmd=None).run(_with_out(changed, fresh))
    assert np.array_equal(_frames(str(out)), _frames(str(fresh)))  # smoothing was redone with the new parameter
    assert not np.array_equal(first, _frames(str(out)))


def test_fastblend_works_in_the_output_folder_and_drives_stages_6_to_8(smooth_project, tmp_path):
    """Stage 6 = left pass, 7 = right pass merging each frame straight into frames/ (no right-pass files, no
    second copy of the frames in smoother/blended), 8 = nothing left to write for FastBlend alone."""
    from diffsynth.cli import stage_table

    out = tmp_path / "out"
    config = _with_out(smooth_project, out)
    config["data"]["keep_intermediates"] = True
    events = []
    SDVideoPipelineRunner(progress_bar_cmd=None, progress_callback=events.append).run(config)
    assert len([f for f in os.listdir(out / "smoother" / "left") if f[0].isdigit()]) == 8  # smoother/ of the run, not a temporary folder
    assert not os.path.exists(out / "smoother" / "right")  # R_t is merged at once, never stored
    assert not os.path.exists(out / "smoother" / "blended")  # merged into frames/ directly
    stages = json.load(open(out / "manifest.json"))["stages"]
    assert stages["6"]["bytes"] > 0 and stages["7"]["bytes"] > 0 and "note" not in stages["6"]
    assert stages["7"]["bytes"] == sum(os.path.getsize(out / "frames" / f) for f in os.listdir(out / "frames"))
    assert stages["8"]["bytes"] == 0 and "stage 7" in stages["8"]["note"]  # frames/ counted once
    # stages 6 and 7 reported their frames one by one, in order 6, 7, then 8
    per_stage = [int(e.stage.split()[0]) for e in events if e.stage.split()[0] in ("6", "7", "8")]
    assert per_stage == sorted(per_stage) and all(per_stage.count(s) >= 8 for s in (6, 7)) and 8 in per_stage, per_stage
    rows = {r["id"]: r for r in stage_table(str(out))["rows"]}
    assert [rows[s]["status"] for s in (6, 7, 8)] == ["done"] * 3
    assert rows[6]["frames"] == rows[7]["frames"] == "8/8" and rows[6]["bytes"] > rows[7]["bytes"] > 0

    chained = tmp_path / "chained"  # FastBlend followed by another processor: stage 8 writes its output into frames/
    config = _with_out(smooth_project, chained)
    config["smoother_configs"] = config["smoother_configs"] + [{"processor_type": "Contrast", "config": {"rate": 1.0}}]
    config["data"]["keep_intermediates"] = True
    SDVideoPipelineRunner(progress_bar_cmd=None).run(config)
    assert len([f for f in os.listdir(chained / "smoother" / "blended") if f[0].isdigit()]) == 8
    assert np.array_equal(_frames(str(chained)), _frames(str(out)))  # contrast 1.0 changes nothing

    plain = tmp_path / "plain"  # without keep_intermediates the smoother's files go once frames/ is written
    SDVideoPipelineRunner(progress_bar_cmd=None).run(_with_out(smooth_project, plain))
    assert not os.path.exists(plain / "smoother") and not os.path.exists(plain / "latents" / "decoded")
    assert np.array_equal(_frames(str(plain)), _frames(str(out)))


class _Stop(Exception):
    pass


class _Bar:
    """A tqdm stand-in recording the bar's position."""

    def __init__(self, total, initial=0, **kwargs):
        self.total, self.n = total, initial

    def update(self, n):
        self.n += n

    def set_description(self, text):
        pass

    def close(self):
        pass


def test_the_overall_progress_ends_at_its_total_fresh_and_after_a_resume(smooth_project, tmp_path):
    bars = []

    def bar(**kwargs):
        bars.append(_Bar(**kwargs))
        return bars[-1]

    fresh = []
    SDVideoPipelineRunner(progress_bar_cmd=bar, progress_callback=fresh.append).run(_with_out(smooth_project, tmp_path / "fresh"))
    total = fresh[-1].total
    assert (fresh[-1].done, bars[-1].n, bars[-1].total) == (total, total, total)
    assert [e.done for e in fresh] == sorted(e.done for e in fresh)  # never goes back

    out = tmp_path / "out"

    def stop_in_the_right_pass(event):
        if event.stage.startswith("7 ") and event.done > 0:
            stop_in_the_right_pass.seen += 1
            if stop_in_the_right_pass.seen == 3:
                raise _Stop()

    stop_in_the_right_pass.seen = 0
    with pytest.raises(_Stop):
        SDVideoPipelineRunner(progress_bar_cmd=bar, progress_callback=stop_in_the_right_pass).run(_with_out(smooth_project, out))
    resumed = []
    SDVideoPipelineRunner(progress_bar_cmd=bar, progress_callback=resumed.append).run(_with_out(smooth_project, out))
    assert resumed[0].done >= total - 3 * 8  # starts at the work on disk: only stages 7-9 were left (at most 3 x 8 frames)
    assert (resumed[-1].done, resumed[-1].total, bars[-1].n) == (total, total, total)
    assert [e.done for e in resumed] == sorted(e.done for e in resumed)
    assert np.array_equal(_frames(str(out)), _frames(str(tmp_path / "fresh")))


def test_the_annotation_key_follows_weight_files_only(project, tmp_path):
    from diffsynth.testing.annotator_files import write_lineart_file

    config = copy.deepcopy(project)
    config["models"]["controlnet_units"][1]["processor_id"] = "lineart"  # a unit that reads annotator weights
    folder = tmp_path / "Annotators"
    folder.mkdir()
    config["models"]["annotator_folder"] = str(folder)
    write_lineart_file(str(folder / "sk_model.pth"), seed=0)
    before = _keys(config)
    (folder / "README.md").write_text("where to download the files")
    (folder / "netG.pth").write_bytes(b"a file the lineart unit does not read")
    assert _keys(config) == before  # editing a note or another annotator's file does not invalidate the annotations
    write_lineart_file(str(folder / "sk_model.pth"), seed=1)
    assert _keys(config)[1] != before[1]


def test_beautiful_prompt_refines_with_the_pipeline_seed_and_the_seed_keys_the_prompt_stage(project, tmp_path, caplog):
    """The prompt stage gives BeautifulPrompt ``pipeline.seed``: recomputing it (any global RNG state before) refines
    the prompt the same way, and a changed seed recomputes it. Without BeautifulPrompt the seed keys stage 3 only."""
    from diffsynth.testing.prompt_model_files import write_beautiful_prompt_folder

    config = copy.deepcopy(project)
    config["models"]["model_list"].append(write_beautiful_prompt_folder(str(tmp_path / "models" / "BeautifulPrompt" / "tiny-bloom")))
    reseeded = copy.deepcopy(config)
    reseeded["pipeline"]["seed"] = config["pipeline"].get("seed", 0) + 1
    assert _keys(config)[2] != _keys(reseeded)[2]
    plain_reseeded = copy.deepcopy(project)
    plain_reseeded["pipeline"]["seed"] = reseeded["pipeline"]["seed"]
    assert _keys(project)[2] == _keys(plain_reseeded)[2] and _keys(project)[3] != _keys(plain_reseeded)[3]

    def stop_after_the_prompt_stage(event):
        if event.stage.startswith("3 "):
            raise _Stop()

    def refined_prompt(out, global_seed):
        torch.manual_seed(global_seed)  # what ran before in the process: must not matter
        caplog.clear()
        with caplog.at_level("INFO", logger="diffsynth"), pytest.raises(_Stop):
            SDVideoPipelineRunner(progress_bar_cmd=None, progress_callback=stop_after_the_prompt_stage).run(_with_out(config, out))
        refined = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Prompt after translation/refining")]
        assert len(refined) == 1, refined
        return refined[0], open(os.path.join(out, "prompt", "embeddings.safetensors"), "rb").read()

    first = refined_prompt(tmp_path / "a", 1)
    assert first[0] != f"Prompt after translation/refining: {config['pipeline']['pipeline_inputs']['prompt']}"  # it did refine
    assert refined_prompt(tmp_path / "b", 2) == first
