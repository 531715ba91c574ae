"""The stage table: one row per stage, read by the runner, ``diffsynth status`` and invalidation."""
from __future__ import annotations

import copy

import pytest

from diffsynth.cache.manifest import STAGE_NAMES
from diffsynth.pipelines.stages import STAGE_TABLE, StageView, denoising_plan


def _config(smoother_configs=None, final=True, units=2):
    return {
        "models": {"controlnet_units": [{"processor_id": "tile", "model_path": "x", "scale": 0.5}] * units},
        "data": {"output_folder": "out"},
        "pipeline": {"pipeline_inputs": {"num_inference_steps": 4, "denoising_strength": 1.0, "animatediff_batch_size": 4,
                                         "animatediff_stride": 2, "smoother_progress_ids": [-1] if final else []}},
        "smoother_configs": smoother_configs,
    }


FASTBLEND = [{"processor_type": "FastBlend", "config": {"window_size": 3}}]
CHAIN = FASTBLEND + [{"processor_type": "Contrast", "config": {"rate": 1.1}}]


def test_one_row_per_stage_in_order():
    assert [stage.id for stage in STAGE_TABLE] == list(range(10))
    assert [stage.name for stage in STAGE_TABLE] == [STAGE_NAMES[i] for i in range(10)]


def test_weights_are_frames_annotations_and_window_frames_per_step():
    view = StageView(_config(FASTBLEND), 10, "/nowhere")
    weights = {stage.id: stage.weight(view) for stage in STAGE_TABLE}
    plan = denoising_plan(view.inputs, 10)
    assert weights[1] == 20 and weights[4] == plan["steps"] * plan["window_frames"] == 4 * 16
    assert all(weights[i] == 10 for i in (0, 2, 3, 5, 6, 7, 8, 9))


@pytest.mark.parametrize("smoother, final, frames_stage", [(FASTBLEND, True, 7), (CHAIN, True, 8), (None, False, 5), (FASTBLEND, False, 5),
                                                           ([{"processor_type": "FastBlend", "config": {"inference_mode": "balanced"}}], True, 8)])
def test_frames_belong_to_the_stage_that_writes_them(smoother, final, frames_stage, tmp_path):
    view = StageView(_config(copy.deepcopy(smoother), final), 10, str(tmp_path))
    owners = [stage.id for stage in STAGE_TABLE if "frames" in stage.files(view)]
    assert owners == [frames_stage]
    blended = [stage.id for stage in STAGE_TABLE if "smoother/blended" in stage.files(view)]
    assert blended == ([7] if smoother is CHAIN else [])


@pytest.mark.parametrize("smoother, final", [(FASTBLEND, True), (CHAIN, True), (None, False), (FASTBLEND, False)])
def test_invalidating_a_stage_deletes_every_file_it_owns(smoother, final, tmp_path):
    (tmp_path / "latents" / "step_001").mkdir(parents=True)
    view = StageView(_config(copy.deepcopy(smoother), final), 10, str(tmp_path))
    for stage in STAGE_TABLE:
        deleted = {name for later in STAGE_TABLE if later.id >= stage.id for name in later.deletes}
        for path in stage.files(view):
            assert path.split("/")[0] in deleted, (stage.id, path)


# ---------------------------------------------------------------------- counts of work


class _WorkCounter:
    """Counts what a real render calls: model forwards (hooks), FastBlend's patch matches, files the stages write."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, kind: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n

    def runner(self):
        from diffsynth.pipelines.runner import SDVideoPipelineRunner

        counter = self

        class CountingRunner(SDVideoPipelineRunner):
            def _load_pipeline(self, config):
                pipe, model_manager = super()._load_pipeline(config)

                def frames(kind):
                    def hook(module, args, output):  # returns None: the output stays as it is
                        counter.add(f"{kind} calls")
                        counter.add(f"{kind} frames", args[0].shape[0])
                    return hook

                pipe.unet.register_forward_hook(frames("UNet"))
                for unit in pipe.controlnet.units:
                    unit.model.register_forward_hook(frames("ControlNet"))
                pipe.vae_decoder_fp32.register_forward_hook(lambda module, args, output: counter.add("VAE decodes", args[0].shape[0]))
                pipe.vae_encoder.register_forward_hook(lambda module, args, output: counter.add("VAE encodes", args[0].shape[0]))
                pipe.text_encoder.register_forward_hook(lambda *args: counter.add("text encoder calls"))
                return pipe, model_manager

            @staticmethod
            def _load_smoother(config, model_manager, stages):
                chain, owns = SDVideoPipelineRunner._load_smoother(config, model_manager, stages)
                for processor in chain.processors:
                    dispatch = processor._dispatch

                    def counted(guide, style, keyframe_indices, stores, stats, span=None, dispatch=dispatch):
                        dispatch(guide, style, keyframe_indices, stores, stats, span)
                        counter.add("FastBlend remaps", stats.remaps)

                    processor._dispatch = counted
                return chain, owns

        return CountingRunner(progress_bar_cmd=None)


def test_the_tables_counts_of_work_are_what_a_render_calls(tmp_path):
    """UNet/ControlNet calls and frames, VAE encodes and decodes, text encoder calls, FastBlend's patch matches (inside the loop
    and on the final frames, in blocks), annotated, source and encoded frames: the table's counts, summed over the stages."""
    import os

    from diffsynth.data import VideoData
    from diffsynth.pipelines.stages import STAGE_TABLE, StageView
    from diffsynth.pipelines.workload import merged
    from diffsynth.testing.runner_files import write_tiny_project

    config = write_tiny_project(str(tmp_path / "project"), frames=11, smoother=True, steps=2)
    config["pipeline"]["pipeline_inputs"].update(animatediff_batch_size=4, animatediff_stride=2, controlnet_batch_size=3,
                                                 smoother_progress_ids=[0, -1])
    config["smoother_configs"][0]["config"]["block_frames"] = 4  # fast mode in blocks: their halos are counted too
    out = str(tmp_path / "out")
    config["data"]["output_folder"] = out
    counter = _WorkCounter()
    counter.runner().run(config)
    view = StageView(config, 11, out)
    predicted = merged(*(stage.work(view) for stage in STAGE_TABLE))
    files = lambda folder: len(os.listdir(os.path.join(out, folder)))  # noqa: E731
    measured = merged(counter.counts, {"annotator frames (tile)": files("controlnet_caches/0"), "annotator frames (canny)": files("controlnet_caches/1"),
                                       "source frames": files("source_images"),
                                       "frames encoded": len(VideoData(video_file=os.path.join(out, "video.mp4")))})
    assert predicted == measured
    assert predicted["ControlNet calls"] > predicted["UNet calls"] * 2  # windows of 4 frames in chunks of 3: two calls per unit


def test_the_manifest_records_the_seconds_spent_on_each_stage_across_runs(tmp_path):
    import time

    from diffsynth.cache.manifest import Manifest
    from diffsynth.cli import format_stage_table, stage_table

    manifest = Manifest(str(tmp_path))
    manifest.begin(4, "k")
    time.sleep(0.05)
    manifest.update(4, steps_done=1)  # a killed run's time counts up to its last save
    first = Manifest(str(tmp_path)).data["stages"]["4"]["seconds"]
    assert first >= 0.05
    resumed = Manifest(str(tmp_path))  # another process continues the stage
    resumed.begin(4, "k")
    time.sleep(0.05)
    resumed.finish(4, "k")
    resumed.finish(3, "k", note="consumed by denoising")  # finished without work in this process: no time
    record = Manifest(str(tmp_path)).data["stages"]
    assert record["4"]["seconds"] >= first + 0.05 and "seconds" not in record["3"]
    manifest.begin(4, "other key")  # a new key starts the count afresh
    assert "seconds" not in manifest.data["stages"]["4"]
    text = format_stage_table(stage_table(str(tmp_path), check_keys=False))
    assert " time " in text.splitlines()[1]
