"""Estimates of a render (``diffsynth.estimate``): the mechanics, not the timings.

Checked: models built from headers are the run's models (same bytes per component); the tracer's
live-bytes bookkeeping; the disk model against a real render's files; the CLI's table and ``--json``
schema; the refusal when the disk cannot hold the render (and ``--force``); the manifest's
predicted-vs-measured record and ``diffsynth status``; the history (recorded after a run, used by the
next estimate) and ``--calibrate``; ``vram_limit_level: "auto"``; several processes; the ETA.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from diffsynth.cli import main
from diffsynth.estimate import estimate_plan
from diffsynth.estimate.history import History
from diffsynth.estimate.trace import meta_models, module_bytes, trace
from diffsynth.pipelines.runner import SDVideoPipelineRunner
from diffsynth.pipelines.stages import STAGE_TABLE, StageView
from diffsynth.testing.runner_files import write_tiny_project

STAGE_KEYS = {"disk_peak_bytes", "ram_peak_bytes", "device_peak_bytes", "seconds"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    config = write_tiny_project(str(tmp_path_factory.mktemp("estimate_project")), frames=10, smoother=True)
    config["smoother_configs"][0]["config"]["window_size"] = 2
    return config


@pytest.fixture()
def history_dir(tmp_path, monkeypatch):
    """A history of this test only."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DIFFSYNTH_CACHE_DIR", str(folder))
    return folder


def _config(project, out) -> dict:
    config = copy.deepcopy(project)
    config["data"]["output_folder"] = str(out)
    return config


def _write(config, path) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return str(path)


def _plan(config):
    return SDVideoPipelineRunner(progress_bar_cmd=None).prepare(config)


def test_models_from_headers_are_the_runs_models(project):
    """Bytes per component of the meta-built models equal those of the models the run loads."""
    from diffsynth.models.model_manager import ModelManager

    paths = project["models"]["model_list"]
    meta = meta_models(paths, torch.float32)
    real = ModelManager(torch_dtype=torch.float32, device="cpu")
    real.load_models(paths)
    for name in ("unet", "motion_modules", "text_encoder", "vae_decoder", "vae_encoder", "controlnet"):
        assert module_bytes(getattr(meta, name)) == module_bytes(getattr(real, name)) > 0, name
    assert all(p.is_meta for p in meta.unet.parameters())
    half = meta_models(paths, torch.float16)
    assert module_bytes(half.unet) * 2 == module_bytes(meta.unet)


def test_tracer_follows_every_tensor_until_it_dies():
    def call(x):
        a = x * 2  # 4 KiB
        b = a + 1  # 4 KiB: 8 alive
        del a
        c = b.view(-1)  # a view: no new bytes
        d = torch.cat([c, c])  # 8 KiB: 12 alive (b, d)
        return d.sum()

    traced = trace(call, torch.zeros(1024, device="meta"))
    assert traced.peak_bytes == 4096 + 8192 + 4  # b, d and the sum at the end (a died before d was made)
    assert traced.ops >= 5
    mm = trace(lambda a, b: a @ b, torch.zeros(8, 16, device="meta"), torch.zeros(16, 4, device="meta"))
    assert mm.flops == 2 * 8 * 16 * 4


def test_disk_estimate_matches_a_real_render(project, tmp_path, history_dir, monkeypatch):
    """Stage by stage the folder holds what the model says; the final folder within 10% (rendered PNGs are the unknown)."""
    from diffsynth.cache.stores import DiskStore
    from diffsynth.estimate import meter as meter_module

    running, enter, put = [], meter_module.Meter.__enter__, DiskStore._put

    def remember(self):
        running.append(self)
        return enter(self)

    def commit_and_sample(self, slot, value):  # every committed file is followed by a sample: the measured peak is the peak
        put(self, slot, value)
        if running:
            running[-1].sample()

    monkeypatch.setattr(meter_module.Meter, "__enter__", remember)
    monkeypatch.setattr(DiskStore, "_put", commit_and_sample)
    config = _config(project, tmp_path / "out")
    runner = SDVideoPipelineRunner(progress_bar_cmd=None, estimate=True)
    runner.run(config)
    estimate = runner.last_estimate
    out = config["data"]["output_folder"]
    from diffsynth.utils.sizes import path_bytes

    final = path_bytes(out)
    assert 0.9 < final / estimate.final_bytes < 1.1
    latents = os.path.join(out, "latents", "step_002")  # the final generation, kept: exact bytes
    n = len(os.listdir(latents))
    assert path_bytes(latents) == n * (128 + 4 * 8 * 8 * 4)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    measured_peak = max(s["measured"]["disk_peak_bytes"] for s in manifest["stages"].values())
    assert 0.8 < measured_peak / estimate.total["disk_peak_bytes"] < 1.1


def test_estimate_counts_are_the_stage_tables(project, tmp_path):
    plan = _plan(_config(project, tmp_path / "out"))
    estimate = estimate_plan(plan, use_history=False)
    view = StageView(plan["config"], plan["num_frames"], str(tmp_path / "out"))
    for stage, est in zip(STAGE_TABLE, estimate.stages):
        assert est.id == stage.id
        assert {k: v for k, v in est.work.items() if k in stage.work(view)} == stage.work(view)
    assert estimate.stages[4].work["denoise frames"] == StageView(plan["config"], 10, "").denoise["window_frames"] * 2
    assert all(s.seconds > 0 for s in estimate.stages if s.id in (1, 4, 5))


def test_cli_estimate_table_and_json(project, tmp_path, capsys, history_dir):
    path = _write(_config(project, tmp_path / "out"), tmp_path / "config.json")
    assert main(["estimate", path]) == 0
    table = capsys.readouterr().out
    for words in ("denoising", "total", "disk peak", "RAM peak", "output folder: peak", "disk: fits", "time from: default"):
        assert words in table, words
    assert main(["estimate", path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["stages"]) == {str(i) for i in range(10)}
    for stage in data["stages"].values():
        assert STAGE_KEYS <= set(stage) and stage["device_peak_bytes"] is None  # the CPU: its memory is the RAM
    assert STAGE_KEYS | {"disk_final_bytes"} <= set(data["total"])
    assert data["total"]["disk_peak_bytes"] == max(s["disk_peak_bytes"] for s in data["stages"].values())
    assert isinstance(data["fits"]["disk"]["fits"], bool) and isinstance(data["fits"]["RAM"]["fits"], bool)
    assert not os.path.exists(tmp_path / "out")  # an estimate writes nothing


def test_run_refuses_a_disk_too_small_and_force_runs_anyway(project, tmp_path, capsys, monkeypatch, history_dir):
    import diffsynth.estimate.core as core

    monkeypatch.setattr(core, "_free_disk", lambda out: 50_000)  # 50 kB free: far less than the render's peak
    out = tmp_path / "out"
    path = _write(_config(project, out), tmp_path / "config.json")
    assert main(["run", path]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and "--force" in err and "Nothing was written" in err
    assert not os.path.exists(out)  # stopped before anything was written
    assert main(["run", path, "--force"]) == 0
    assert os.path.isfile(out / "video.mp4")
    assert main(["run", path]) == 0  # a finished render needs no more space: its rerun is never refused


def test_manifest_holds_predicted_and_measured_and_status_shows_both(project, tmp_path, capsys, history_dir):
    out = tmp_path / "out"
    path = _write(_config(project, out), tmp_path / "config.json")
    assert main(["run", path]) == 0
    printed = capsys.readouterr().out
    assert "estimate for cpu" in printed  # the estimate comes first
    manifest = json.load(open(out / "manifest.json"))
    assert set(manifest["estimate"]["stages"]) == {str(i) for i in range(10)}
    for sid, record in manifest["stages"].items():
        measured = record["measured"]
        assert {"seconds", "disk_peak_bytes", "ram_peak_bytes"} <= set(measured), sid
        assert measured["ram_peak_bytes"] > 100 * 2**20  # a Python process with torch
    assert manifest["stages"]["4"]["measured"]["seconds"] > 0
    assert main(["status", str(out)]) == 0
    status = capsys.readouterr().out
    assert "est." in status and "measured" in status
    # A rerun that does nothing adds no time, and keeps the record.
    assert main(["run", path]) == 0
    again = json.load(open(out / "manifest.json"))
    assert again["stages"]["4"]["measured"]["seconds"] == manifest["stages"]["4"]["measured"]["seconds"]


def test_history_is_recorded_after_a_run_and_used_by_the_next_estimate(project, tmp_path, history_dir):
    config = _config(project, tmp_path / "out")
    config["pipeline"]["pipeline_inputs"]["num_inference_steps"] = 8  # a denoising stage long enough to be a rate (>= 0.2 s)
    runner = SDVideoPipelineRunner(progress_bar_cmd=None, estimate=True)
    runner.run(config)
    first = runner.last_estimate
    history = History()
    key = first.learn["runs_key"]
    recorded = {name.split(":")[0]: name for name in history.data["runs"][key]}
    assert "4" in recorded and "2" not in recorded  # stages computed whole in that run; not those of a few milliseconds
    assert recorded["4"].startswith("4:") and "denoise frames" in recorded["4"]  # by number and kinds of work
    assert history.frame_ratios(first.learn["signature"])["frame"] > 0
    manifest = json.load(open(os.path.join(config["data"]["output_folder"], "manifest.json")))
    ratio = manifest["stages"]["4"]["measured"]["seconds"] / manifest["estimate"]["stages"]["4"]["base_seconds"]
    assert history.data["runs"][key][recorded["4"]] == [round(ratio, 4)]
    # The next estimate of the same models and size (another clip length) uses it.
    other = _config(project, tmp_path / "other")
    for spec in [other["data"]["input_frames"], *other["data"]["controlnet_frames"]]:
        spec["end_frame_id"] = 8
    second = estimate_plan(_plan(other))
    assert "history" in second.stages[4].source
    assert second.stages[4].seconds == pytest.approx(second.stages[4].base_seconds * ratio, rel=1e-3)
    assert "measured by earlier runs" in second.sources["disk"]
    without = estimate_plan(_plan(other), use_history=False)
    assert without.stages[4].source == "default"


def test_calibrate_times_real_units_and_is_remembered(project, tmp_path, history_dir):
    plan = _plan(_config(project, tmp_path / "out"))
    calibrated = estimate_plan(plan, calibrate=True)
    assert calibrated.sources["time"].startswith("calibrated now")
    assert calibrated.stages[4].seconds > 0 and calibrated.stages[1].seconds > 0
    history = History()
    costs = history.calibration(calibrated.learn["calibration_key"])["costs"]
    assert {"denoise frames", "VAE decodes", "FastBlend remaps", "model loading", "annotator frames (canny)"} <= set(costs)
    later = estimate_plan(plan)
    assert "(history)" in later.sources["time"]
    assert later.stages[4].seconds == pytest.approx(calibrated.stages[4].seconds, rel=1e-6)


def test_vram_limit_level_auto(project, tmp_path, history_dir):
    """On the CPU (no device memory) auto is the fastest setting; with little device memory the smaller ones; keys never move."""
    import diffsynth.estimate.core as core

    config = _config(project, tmp_path / "out")
    config["pipeline"]["pipeline_inputs"]["vram_limit_level"] = "auto"
    plan = _plan(config)
    estimate = estimate_plan(plan)
    assert estimate.settings == {"vram_limit_level": 0, "unet_batch_size": 8, "controlnet_batch_size": 8}
    models = core._Models(plan["config"], torch.device("cpu"), torch.float32, plan["families"])
    inputs = plan["config"]["pipeline"]["pipeline_inputs"]
    fast = sum(models.weights.values()) + models.window(8, 64, 64, inputs, 0, 8).peak_bytes
    level, chosen = core._auto_vram(models, inputs, 8, 64, 64, fast - 1)  # just too little for the fastest
    assert level == 1 and chosen["vram_limit_level"] == 1
    level, chosen = core._auto_vram(models, inputs, 8, 64, 64, 1)
    assert chosen["unet_batch_size"] == chosen["controlnet_batch_size"] == 1 and "nothing fits" in chosen["note"]
    # A run with "auto" renders, with the same keys as the fastest explicit setting.
    runner = SDVideoPipelineRunner(progress_bar_cmd=None)
    runner.run(config)
    explicit = _config(project, tmp_path / "out")
    explicit["pipeline"]["pipeline_inputs"]["vram_limit_level"] = 0
    keys = SDVideoPipelineRunner.stage_keys(_plan(explicit))
    manifest = json.load(open(os.path.join(config["data"]["output_folder"], "manifest.json")))
    assert [manifest["stages"][str(i)]["key"] for i in range(10)] == [keys[i] for i in range(10)]


def test_several_processes_split_the_time(project, tmp_path):
    plan = _plan(_config(project, tmp_path / "out"))
    one = estimate_plan(plan, use_history=False)
    two = estimate_plan(plan, world=2, use_history=False)
    assert len(two.ranks) == 2 and sum(r["frames"] for r in two.ranks) == 10
    assert two.total["seconds"] < one.total["seconds"]
    assert two.total["disk_peak_bytes"] == one.total["disk_peak_bytes"]  # a shared folder holds the same files


def test_eta_uses_the_estimate_then_measured_rates(monkeypatch):
    """The time left: predicted rates until this run has done enough of a stage, its measured rate after."""
    import diffsynth.pipelines.runner as runner_module
    from diffsynth.pipelines.runner import _Progress

    clock = [100.0]
    monkeypatch.setattr(runner_module.time, "monotonic", lambda: clock[0])
    events = []
    progress = _Progress({0: 10, 1: 100}, {}, None, events.append, predicted={0: 5.0, 1: 50.0})
    assert progress.eta() == pytest.approx(55.0)  # nothing measured: 0.5 s per unit everywhere
    progress.set_stage(0, "a")
    clock[0] += 20.0  # the first stage is slower than predicted: 2 s per unit
    progress.advance(10)
    assert events[-1].eta == pytest.approx(50.0)  # stage 0 done; stage 1 still at its prediction
    progress.set_stage(1, "b")
    clock[0] += 1.0
    progress.advance(2)  # 2 of 100 units in 1 s: 0.5 s per unit measured
    assert events[-1].eta == pytest.approx(98 * 0.5)
    clock[0] += 9.0
    progress.advance(8)  # 10 units in 10 s: 1 s per unit measured now
    assert events[-1].eta == pytest.approx(90 * 1.0)
    unknown = _Progress({0: 10}, {}, None, None)
    assert unknown.eta() is None  # no estimate and nothing measured yet


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the estimate for a CUDA device on a machine without one")
def test_estimate_for_a_gpu_this_machine_does_not_have(project, tmp_path, capsys, history_dir):
    """Planning on a laptop for a GPU box: device memory from the headers and the trace, times at an assumed GPU's speed, said so."""
    path = _write(_config(project, tmp_path / "out"), tmp_path / "config.json")
    assert main(["estimate", path, "--device", "cuda", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    weights = data["stages"]["2"]["device_peak_bytes"]  # the text encoder's stage: the weights alone
    assert weights > 0 and data["stages"]["4"]["device_peak_bytes"] > weights and data["stages"]["5"]["device_peak_bytes"] > weights
    assert "assumed GPU" in data["sources"]["time"] and "device memory" not in data["fits"]  # no free memory to compare with


def test_bytes_of_a_folder_that_changes_while_it_is_counted(tmp_path, monkeypatch):
    """The run's meter and `diffsynth status` count folders that a run changes under them: vanished files count nothing."""
    from diffsynth.utils import sizes

    folder = tmp_path / "latents"
    (folder / "step_001").mkdir(parents=True)
    for i in range(3):
        (folder / "step_001" / f"{i:06d}.npy").write_bytes(b"x" * 100)
    (folder / "kept.npy").write_bytes(b"y" * 10)
    scandir = os.scandir

    def racing(path):  # another process deletes step_001 between the listing and the stat
        entries = list(scandir(path))
        if str(path).endswith("step_001"):
            for entry in entries[:2]:
                os.remove(entry.path)
        return _Entries(entries)

    monkeypatch.setattr(sizes.os, "scandir", racing)
    assert sizes.path_bytes(str(folder)) == 10 + 100
    assert sizes.path_bytes(str(tmp_path / "gone")) == 0


class _Entries(list):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_too_little_device_memory_names_the_setting_that_fits(project, tmp_path, monkeypatch, history_dir):
    """A device-memory estimate over the free memory is a warning with the setting that fits (the CPU has none: simulated)."""
    import diffsynth.estimate.core as core

    config = _config(project, tmp_path / "out")
    for spec in [config["data"]["input_frames"], *config["data"]["controlnet_frames"]]:
        spec.update(height=256, width=256)  # large enough for the frame batches to set the peak
    plan = _plan(config)
    roomy = estimate_plan(plan, device="cuda")  # this machine has none: no free memory to compare with
    peak = roomy.total["device_peak_bytes"]
    monkeypatch.setattr(core, "_device_free", lambda device: peak - 1)  # just too little for the configured setting
    tight = estimate_plan(plan, device="cuda")
    verdict = tight.fits["device memory"]
    assert verdict["fits"] is False and "vram_limit_level to 1" in verdict["advice"]
    assert "controlnet_batch_size to 4" in verdict["advice"]  # the configured 8 halved: the ControlNets' hints at full size


def test_building_from_headers_touches_no_other_thread(project):
    """The WebUI server estimates in one session while another loads models: only the estimating thread gets meta tensors."""
    import threading

    from diffsynth.models.blocks import attention, attention_stand_in
    from diffsynth.models.state_dict import load_state_dict, meta_tensors_only, read_file_header

    path = project["models"]["model_list"][0]
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def other_session():
        inside.wait()
        seen["tensor"] = next(iter(load_state_dict(path).values()))
        q = torch.ones(1, 1, 2, 4)
        seen["attention"] = attention(q, q, q)
        done.set()

    thread = threading.Thread(target=other_session)
    thread.start()
    with meta_tensors_only(read_file_header), attention_stand_in(lambda q, k, v, is_causal: torch.zeros(1)):
        assert next(iter(load_state_dict(path).values())).is_meta
        inside.set()
        done.wait(30)
    thread.join()
    assert not seen["tensor"].is_meta and seen["attention"].shape == (1, 1, 2, 4)
