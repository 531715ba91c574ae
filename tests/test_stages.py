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
