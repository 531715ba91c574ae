"""``SDVideoPipelineRunner``: a config-driven, resumable video render (Diffutoon and friends).

Accepts DiffSynth-Studio's config dict unchanged (``models``, ``data``, ``pipeline``,
``smoother_configs``) plus two keys with safe defaults:

* ``data.clear_output_folder`` (default ``False``): ``True`` wipes the output folder
  first (the seed edition's behaviour); ``False`` reuses whatever is still valid.
* ``data.keep_intermediates`` (default ``False``): keep decoded-but-unsmoothed frames
  and the smoother's partial results after the final frames are written.

FastBlend entries of ``smoother_configs`` keep their cache in the output folder
(``smoother/left``, and ``smoother/blended`` when processors follow FastBlend) unless the
entry gives a ``cache_folder``, so a killed smoothing pass resumes. When smoothing applies
to the final frames, FastBlend's fast mode *is* stages 6-7: its left pass is stage 6, its
right pass stage 7 (which merges each frame as soon as it is ready, so no right-pass partial
result is ever stored: straight into ``frames/`` when FastBlend is the whole chain, deleting
the frame's left partial result then), each reported frame by frame; stage 8 writes the
smoothed frames through any processors chained after it into ``frames/``. Other
smoothers (balanced/accurate modes, RIFE, PIL edits) have no left/right passes: stages 6
and 7 then finish at once, marked so in the manifest, and all the smoothing is stage 8.

The run is 10 stages (DESIGN.md §3). Each has a cache key — a hash of everything its
result depends on, not of batch sizes or the device — and is journalled in
``manifest.json``; ``last_process_id.txt`` holds the last finished stage. Rerunning
the same config continues where it stopped; a changed key recomputes that stage
and everything after it. The stages themselves are a table (``stages.py``). Pre-flight checks of every path, file and range in the config
(``preflight.py``) run before anything is written; a finished render that a changed config
would delete is moved to ``previous/`` (``cache/previous.py``).
"""
from __future__ import annotations

import copy
import errno
import json
import logging
import os
import shutil
import time
from typing import Any, Callable

import torch
from tqdm import tqdm

from ..cache import image_store
from ..cache.stores import other_writers
from ..cache.identity import IDENTITY_VERSION, content_identity, legacy_identity, save_fingerprints
from ..cache.manifest import STAGES, Manifest, stable_hash
from ..cache.previous import PREVIOUS_FOLDER, keep_previous
from ..data.output import VIDEO_FILE_NAMES
from ..controlnets import ControlNetConfigUnit
from ..distributed import Cluster, ClusterError, Layout, rank_share
from ..estimate.meter import Meter
from ..estimate.learn import learn_from_run
from ..models.model_manager import ModelManager
from ..progress import ProgressCallback, ProgressEvent
from ..prompts.prompt_models import prompt_model_component
from ..utils.atomic import DiskFullError, atomic_write_text, is_temp_name
from ..utils.sizes import count_frame_files, human_bytes, human_seconds, path_bytes
from .config_paths import resolve_config_paths
from .preflight import PreflightError, check_config
from .sd_video import SDVideoPipeline, VideoFrames, sliding_windows
from .stages import STAGE_TABLE, RunContext, SmootherStages, StageView, denoising_plan, reports_passes, writes_frames

logger = logging.getLogger("diffsynth")

# Parameters of pipeline_inputs that change denoising results (batch sizes and vram options do not;
# smoother_progress_ids count only through the steps smoothed inside the loop, see stage_keys).
_DENOISE_PARAMS = ("cfg_scale", "denoising_strength", "num_inference_steps", "animatediff_batch_size", "animatediff_stride", "cross_frame_attention")

# The progress events of the pipeline methods each stage calls that count as that stage's work
# (the in-loop smoother's decode/encode inside stage 4, for one, do not).
_STAGE_EVENTS = {1: "annotate", 3: "initial latents", 4: "denoise", 5: "decode"}

class RunError(RuntimeError):
    """A run stopped; the message says which stage, what it was doing and how to continue."""


class _Progress:
    """One tqdm bar over all stages' work, with ``ProgressEvent``s for a UI.

    Each stage has a fixed weight in work units (frames; frames × windows × steps for
    denoising). Work reported inside a stage counts up to its weight and finishing a stage
    tops it up, so the bar ends at exactly ``total`` on a complete run, fresh or resumed;
    a resumed run starts at the work already on disk.
    """

    def __init__(self, weights: dict[int, int], done: dict[int, int], bar_cmd, callback: ProgressCallback | None, scale: int = 1,
                 predicted: dict[int, float] | None = None):
        """``scale``: units counted per unit reported (the world size: rank 0 reports its share and stands for all).

        ``predicted``: the estimate's seconds per stage: the time left (``eta``) is each stage's units left at its
        measured rate once this run has done enough of it to tell (:meth:`rate`), at the predicted rate before.
        """
        self.weights = weights
        self.scale = scale
        self.counted = {sid: min(done.get(sid, 0), w) for sid, w in weights.items()}
        self.predicted_rates = {sid: predicted[sid] / w for sid, w in weights.items() if predicted and predicted.get(sid) and w}
        self.run_units = {sid: 0 for sid in weights}  # counted in this run
        self.run_seconds = {sid: 0.0 for sid in weights}
        self._clock = time.monotonic()
        self.total = sum(weights.values())
        self.callback = callback
        self.bar = bar_cmd(total=self.total, initial=self.done, desc="render", unit="unit") if bar_cmd is not None else None
        self.stage = "setup"
        self.stage_id: int | None = None

    @property
    def done(self) -> int:
        return sum(self.counted.values())

    def rate(self, stage_id: int) -> float | None:
        """Seconds per unit of ``stage_id``: measured in this run after 2% of the stage (and a second of it), else predicted."""
        units, seconds = self.run_units[stage_id], self.run_seconds[stage_id]
        if units and units >= 0.02 * self.weights[stage_id] and seconds >= 1.0:
            return seconds / units
        return self.predicted_rates.get(stage_id)

    def eta(self) -> float | None:
        """Seconds left for the whole render, or None while a stage with work left has no rate yet."""
        left = 0.0
        for sid, weight in self.weights.items():
            units = weight - self.counted[sid]
            if units > 0:
                rate = self.rate(sid)
                if rate is None:
                    return None
                left += units * rate
        return left

    def _tick(self) -> None:
        """The time since the last tick belongs to the current stage."""
        now = time.monotonic()
        if self.stage_id is not None:
            self.run_seconds[self.stage_id] += now - self._clock
        self._clock = now

    def set_stage(self, stage_id: int, name: str) -> None:
        self._tick()
        self.stage_id = stage_id
        self.stage = f"{stage_id} {name}"
        if self.bar is not None:
            self.bar.set_description(f"stage {stage_id}: {name}")
        self._emit()

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        """The pipeline methods' callback: counts only the events that are the current stage's work."""
        if _STAGE_EVENTS.get(self.stage_id) == stage:
            self.advance(done)

    def advance(self, n: int) -> None:
        """``n`` units of the current stage finished (capped at the stage's weight); always emits an event."""
        if self.stage_id is not None:
            self._count(self.stage_id, n)
        self._emit()

    def advance_in(self, stage_id: int, n: int) -> None:
        """``n`` units of stage ``stage_id`` finished, current or not (FastBlend's passes alternate by block); always emits."""
        self._count(stage_id, n)
        self._emit()

    def finish_stage(self, stage_id: int) -> None:
        """Top the stage up to its weight (a resumed or skipped stage); emits only if that changed the count."""
        if self._count(stage_id, self.weights[stage_id]):
            self._emit()

    def each(self, items, total=None, desc=None):
        """A ``progress_bar_cmd`` for ``save_video``: one unit per frame as it is consumed."""
        for item in items:
            yield item
            self.advance(1)

    def _count(self, stage_id: int, n: int) -> int:
        step = max(0, min(n * self.scale, self.weights[stage_id] - self.counted[stage_id]))
        self.counted[stage_id] += step
        if n > 0 and stage_id == self.stage_id:
            self.run_units[stage_id] += step
        if step and self.bar is not None:
            self.bar.update(step)
        return step

    def _emit(self) -> None:
        self._tick()
        eta = self.eta()
        postfix = getattr(self.bar, "set_postfix_str", None)  # tqdm's; a caller's own bar may have none
        if postfix is not None and eta is not None:
            postfix(f"eta {human_seconds(eta)}", refresh=False)
        if self.callback is not None:
            self.callback(ProgressEvent(self.stage, self.done, self.total, eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors", ".onnx", ".json")


def _weights_identity(folder: str) -> dict | None:
    """The first manifests' identity of the annotator folder: its weight (and model config) files only (legacy keys)."""
    identity = legacy_identity(folder)
    if identity is not None and "files" in identity:
        identity["files"] = [entry for entry in identity["files"] if entry[0].lower().endswith(_WEIGHT_SUFFIXES)]
    return identity


def _smoother_for_key(configs) -> list | None:
    """``smoother_configs`` as far as they change results: FastBlend's ``cache_folder`` says only where files go, its
    ``block_frames`` only how much is stored at once."""
    if not configs:
        return None
    entries = copy.deepcopy(list(configs))
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("config"), dict):
            entry["config"].pop("cache_folder", None)
            entry["config"].pop("block_frames", None)
    return entries


def _io_error(where: str, out: str, exc: OSError, num_frames: int | None = None) -> RunError:
    """The message of a run stopped by an I/O error; a full disk gets the folder, the bytes and what is still needed."""
    remedy = "run the same config again: finished work is kept and the run continues."
    if exc.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        name = os.path.abspath(os.fsdecode(exc.filename)) if exc.filename else None
        if name is not None and (name + os.sep).startswith(os.path.abspath(out) + os.sep):
            return RunError(f"{where} stopped on an I/O error in the output folder, at {name}: {exc.strerror or exc}. Fix the folder and {remedy}")
        return RunError(f"{where} stopped: {exc}. Nothing in {out} was lost; fix that and {remedy}")
    path = os.path.abspath(exc.filename) if exc.filename else None
    folder = os.path.dirname(path) if path else os.path.abspath(out)
    nbytes = exc.nbytes if isinstance(exc, DiskFullError) else None
    writing = os.path.basename(path) if path else "a file"
    if nbytes is not None:
        writing += f" ({human_bytes(nbytes)} written of it when the disk filled)"
    # What the folder being written still needs: its missing frame files at the size of those committed.
    need = ""
    if num_frames and path and os.path.basename(path).split(".")[0].isdigit():
        committed = count_frame_files(folder)
        per_file = path_bytes(folder) / committed if committed else (nbytes or 0)
        left = max(num_frames - committed, 1)
        if per_file:
            need = f"; that folder still needs about {human_bytes(per_file * left)} ({left} more frame files of ~{human_bytes(per_file)})"
    try:
        free = f"{human_bytes(shutil.disk_usage(folder if os.path.isdir(folder) else out).free)} free now"
    except OSError as usage_error:
        free = f"free space unknown: {usage_error}"
    return RunError(f"{where} stopped: {os.strerror(exc.errno)} ({free}) while writing {writing} into {folder}{need}. "
                    f"Free disk space there and {remedy}")


_FINAL_OUTPUT = ("frames", *VIDEO_FILE_NAMES)  # a finished render: never deleted by a rerun, only moved to previous/


def _keep_previous(out: str, manifest: Manifest, names: list[str]) -> str | None:
    """Move a finished render's ``names`` to ``out/previous/<time>/`` (``cache.previous``).

    Finished: its video (``video.mp4``, or another ``data.output`` format's) exists or stage 8 finished writing ``frames/``; an unfinished
    render's frames are intermediates of the abandoned config and are deleted as such.
    """
    finished = (any(os.path.isfile(os.path.join(out, name)) for name in VIDEO_FILE_NAMES)
                or manifest.data["stages"].get("8", {}).get("status") == "done")
    return keep_previous(out, names, finished)


def _remove_temp_files_below(out: str) -> None:
    """Delete every temporary file a killed run left in ``out`` (not in ``previous/``): stores stop doing it on open."""
    for root, dirs, files in os.walk(out):
        if root == out and PREVIOUS_FOLDER in dirs:
            dirs.remove(PREVIOUS_FOLDER)
        for name in files:
            if is_temp_name(name):
                os.remove(os.path.join(root, name))


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RunError("models.device is 'cuda' but no CUDA device is available; set models.device to 'cpu' (slow) or run on a GPU machine")


class SDVideoPipelineRunner:
    def __init__(self, in_streamlit: bool = False, progress_callback: ProgressCallback | None = None, progress_bar_cmd: Callable | None = tqdm,
                 cluster: Cluster | None = None, estimate: bool = False, force: bool = False, on_estimate: Callable | None = None,
                 keep_models: bool = False):
        """``cluster``: the processes of a run on several (``Cluster.from_env()`` under torchrun); None: one process.

        ``estimate``: estimate disk, RAM, device memory and time first (``diffsynth.estimate``; the CLI and the
        WebUI do), hand it to ``on_estimate`` and keep it in the manifest; a disk estimate over the free space
        stops the run before anything is written unless ``force``. A config with ``vram_limit_level: "auto"``
        is always estimated (that is how the setting is chosen). Every run measures itself either way.

        ``keep_models``: keep the loaded models (on their device) after a run, for the next run of this runner with the
        same ``models`` section (many clips, one config: ``pipelines.batch``); :meth:`release_models` lets them go.
        """
        self.in_streamlit = in_streamlit
        self.keep_models = keep_models
        self._loaded: tuple[str, SDVideoPipeline, ModelManager] | None = None  # (models section's hash, pipeline, manager)
        self.estimate, self.force, self.on_estimate = estimate, force, on_estimate
        self.last_estimate = None
        self.last_plan: dict | None = None  # the last run's plan (its output file name, frame rate, audio)
        self.cluster = cluster if cluster is not None else Cluster.solo()
        self.progress_callback = progress_callback if self.cluster.rank == 0 else None
        self.progress_bar_cmd = progress_bar_cmd if self.cluster.rank == 0 else None

    # ------------------------------------------------------------------ validation (no models)
    def prepare(self, config: dict, config_dir: str | None = None) -> dict:
        """Resolve the config's paths and run every pre-flight check; returns the normalised plan.

        Relative paths resolve against ``config_dir`` (the config file's folder) when that
        finds them, else the working directory (``config_paths``). Every problem is reported
        at once in a :class:`~diffsynth.pipelines.preflight.PreflightError` (a ValueError)
        before anything is written. Nothing here loads a model.
        """
        written = copy.deepcopy(config)
        config, origins = resolve_config_paths(written, config_dir)
        checked = check_config(config, origins)
        if checked.problems:
            raise PreflightError(checked.problems, (config.get("data") or {}).get("output_folder"))
        source = checked.source
        width, height = source[0].size
        config["pipeline"]["pipeline_inputs"].update(num_frames=len(source), width=width, height=height)
        written["pipeline"]["pipeline_inputs"].update(num_frames=len(source), width=width, height=height)
        return {"config": config, "written": written, "origins": origins, "annotator_files": checked.annotator_files,
                "source": source, "controls": checked.controls, "families": checked.families, "headers": checked.headers, "width": width, "height": height, "num_frames": len(source),
                "media": checked.media, "fps": checked.fps, "output": checked.output, "audio": checked.audio, "notes": checked.notes}

    # ------------------------------------------------------------------ keys
    @staticmethod
    def stage_keys(plan: dict, legacy: bool = False) -> dict[int, str]:
        """Each stage's cache key: a hash of everything its result depends on.

        Files are identified by content (``cache.identity``), never by where they lie, so
        moving the models folder or re-downloading a file keeps every key. ``legacy=True``
        gives the keys the first manifests recorded (absolute path, size and mtime, the
        config as written), only so that ``run`` can recognise and migrate them.
        """
        config = plan["written"] if legacy else plan["config"]
        identity = legacy_identity if legacy else content_identity
        models, data, pipeline = config["models"], config["data"], config["pipeline"]
        inputs = pipeline["pipeline_inputs"]
        # A range is keyed by the frames it selects: "to the end" (end_frame_id null) and the explicit end are the same.
        frames_id = lambda spec: {  # noqa: E731
            "source": identity(spec.get("video_file") or spec.get("image_folder")),
            "range": [spec.get("start_frame_id") or 0, spec.get("end_frame_id") if legacy else (spec.get("start_frame_id") or 0) + plan["num_frames"]],
            "size": [plan["height"], plan["width"]],
        }
        model_ids = [identity(p) for p in models["model_list"]]
        # BeautifulPrompt samples its continuation with the run's seed (stage 2): then the seed is part of the prompt.
        refines = any(prompt_model_component(p) == "beautiful_prompt" for p in models["model_list"])
        ti = identity(models.get("textual_inversion_folder")) if models.get("textual_inversion_folder") else None
        k0 = stable_hash({"stage": 0, "input": frames_id(data["input_frames"])})
        specs = data.get("controlnet_frames") or [data["input_frames"]] * len(models.get("controlnet_units", []))
        units = [{"processor": u["processor_id"], "frames": frames_id(s)} for u, s in zip(models.get("controlnet_units", []), specs)]
        if legacy:
            neural = any(u["processor_id"] not in ("tile", "canny") for u in models.get("controlnet_units", []))  # these two read no weights
            annotators = _weights_identity(models.get("annotator_folder", "models/Annotators")) if neural else None
            unit_ids = models.get("controlnet_units", [])
            smoother = config.get("smoother_configs") or None
        else:  # only the annotator files stage 1 reads; a unit's ControlNet by content; no cache folders (they change nothing)
            annotators = {name: content_identity(path) for name, path in sorted(plan["annotator_files"].items())} or None
            unit_ids = [{**u, "model_path": content_identity(u["model_path"])} for u in models.get("controlnet_units", [])]
            smoother = _smoother_for_key(config.get("smoother_configs"))
        k1 = stable_hash({"stage": 1, "units": units, "annotators": annotators})
        k2 = stable_hash({"stage": 2, "models": model_ids, "alphas": models.get("lora_alphas", []), "ti": ti,
                          "prompt": inputs.get("prompt"), "negative": inputs.get("negative_prompt", ""), "clip_skip": inputs.get("clip_skip", 1),
                          **({"beautiful_prompt_seed": pipeline.get("seed", 0)} if refines else {})})
        # The sampler makes the schedule (and img2img's first noise level): keyed from stage 3 on, except DDIM (the keys before samplers)
        sampler = {"sampler": inputs["sampler"]} if inputs.get("sampler", "ddim") != "ddim" else {}
        k3 = stable_hash({"stage": 3, "k0": k0, "models": model_ids, "seed": pipeline.get("seed", 0), "n": plan["num_frames"],
                          "size": [plan["height"], plan["width"]], "strength": inputs.get("denoising_strength", 1.0), "steps": inputs.get("num_inference_steps", 20),
                          **sampler})
        # The smoother enters denoising only through the steps it smooths inside the loop: a smoother
        # that only smooths the final frames (stages 6-8) must not invalidate the denoised latents.
        denoise = denoising_plan(inputs, plan["num_frames"])
        in_loop = denoise["in_loop"] if smoother else []
        final = bool(smoother) and denoise["final"]
        k4 = stable_hash({"stage": 4, "k1": k1, "k2": k2, "k3": k3, "units": unit_ids,
                          "params": {p: inputs.get(p) for p in _DENOISE_PARAMS}, "in_loop": in_loop, "smoother": smoother if in_loop else None})
        k5 = stable_hash({"stage": 5, "k4": k4, "final_smoothing": final})
        k6 = stable_hash({"stage": 6, "k5": k5, "k0": k0, "smoother": smoother if final else None})
        k7 = stable_hash({"stage": 7, "k6": k6})
        k8 = stable_hash({"stage": 8, "k7": k7})
        if legacy:
            k9 = stable_hash({"stage": 9, "k8": k8, "fps": data.get("fps", 30)})
        else:  # the finished video: its rate, format and audio (changing only these re-encodes it, nothing else)
            audio = plan["audio"].as_key(content_identity) if plan.get("audio") is not None else None
            k9 = stable_hash({"stage": 9, "k8": k8, "fps": str(plan["fps"]), "output": plan["output"].as_key(), "audio": audio})
        if not legacy:
            save_fingerprints()
        return {0: k0, 1: k1, 2: k2, 3: k3, 4: k4, 5: k5, 6: k6, 7: k7, 8: k8, 9: k9}

    # ------------------------------------------------------------------ run
    def run(self, config: dict, config_dir: str | None = None) -> VideoFrames:
        """Render ``config``; rerunning it continues where it stopped.

        ``config_dir``: the folder of the config file, against which relative paths resolve
        first (see ``config_paths``). Pre-flight checks run before anything is written; a
        stage is invalidated only when an input that exists has really changed, and a
        finished render that a changed config would delete is moved to ``OUT/previous/``.
        """
        cluster = self.cluster
        plan = self._prepare_everywhere(config, config_dir)
        self.last_plan = plan
        config = plan["config"]
        data = config["data"]
        out = data["output_folder"]
        keys = self._keys_everywhere(plan)
        if cluster.rank == 0:
            for note in plan["notes"]:
                logger.warning("%s", note)
        estimate = self._estimate_first(plan, keys)
        try:  # these write too: a full disk here is reported like one inside a stage
            os.makedirs(out, exist_ok=True)
            if cluster.world > 1:
                self._detect_storage(out)
            if cluster.folder_leader:  # one process per folder sets it up: rank 0, and on machines without a shared disk each machine's first
                manifest = Manifest(out)
                self._migrate_keys(manifest, plan, keys)
                if data.get("clear_output_folder", False):
                    self._clear(manifest, out)
                    manifest = Manifest(out)
                else:
                    self._invalidate_changed(manifest, keys, out)
                self._save_config(config, out)
                self._record_source(manifest, plan)
                if cluster.world > 1:
                    _remove_temp_files_below(out)  # a killed run's; from now on other processes write here too
                    self._record_shares(manifest, plan)
                else:
                    manifest.data.pop("distributed", None)
        except OSError as exc:
            raise _io_error("setup", out, exc) from exc
        if cluster.world > 1:
            cluster.barrier("the setup of the output folders")
            manifest = Manifest(out, writable=cluster.folder_leader)
            manifest.data = cluster.broadcast(manifest.data)  # rank 0's record decides, on every rank
        frames = image_store(os.path.join(out, "frames"), plan["num_frames"], size=(plan["width"], plan["height"]))
        video = plan["output"].file_name
        finished = manifest.is_done(9, keys[9]) and (video is None or os.path.isfile(os.path.join(out, video))) and frames.complete()
        if cluster.broadcast(finished):  # rank 0's folder holds the render
            logger.info("%s is complete and up to date; nothing to do", out)
            if self.progress_callback is not None:
                total = sum(self._stage_weights(plan).values())
                self.progress_callback(ProgressEvent("9 video encode", total, total))
            return VideoFrames(frames)
        if estimate is not None and cluster.folder_leader:
            self._keep_estimate(manifest, estimate)
        weights = self._stage_weights(plan)
        predicted = {s.id: s.seconds for s in estimate.stages} if estimate is not None else None
        progress = _Progress(weights, self._work_done(manifest, keys, plan), self.progress_bar_cmd, self.progress_callback, scale=cluster.world,
                             predicted=predicted)
        meter = Meter(out, cluster.device(config["models"].get("device")), disk=cluster.folder_leader)
        done_before = {sid for sid in keys if manifest.is_done(sid, keys[sid])}
        try:
            with meter:
                if cluster.world == 1:
                    result = self._run_stages(plan, manifest, keys, progress, meter)
                else:
                    with other_writers():
                        result = self._run_stages(plan, manifest, keys, progress, meter)
        except OSError as exc:
            raise _io_error(f"stage {progress.stage}", out, exc, plan["num_frames"]) from exc
        finally:
            progress.close()
            self._record_measured(manifest, meter, done_before)
        if cluster.rank == 0:
            learn_from_run(manifest, plan, keys, done_before)
        return result

    # Inference only. The stages call the pipeline's methods, not its no_grad __call__, and a textual
    # inversion leaves the token embedding requiring grad: without this, every UNet call would keep
    # its activations alive in an autograd graph for as long as a window's noise is held (GiBs at 1280x768).
    @torch.no_grad()
    def _run_stages(self, plan: dict, manifest: Manifest, keys: dict[int, str], progress: _Progress, meter: Meter | None = None) -> VideoFrames:
        """Every stage of the table, in order (each skips what is already on disk under its key)."""
        ctx = RunContext(self, plan, manifest, keys, progress, self.cluster, meter=meter)
        for stage in STAGE_TABLE:
            if meter is not None:
                meter.switch(stage.id)
            stage.run(ctx)
            if meter is not None:
                meter.sample()
        if ctx.model_manager is not None and not self.keep_models:
            ctx.model_manager.to("cpu")
        return VideoFrames(ctx.frames)

    def release_models(self) -> None:
        """Let go of models kept loaded by ``keep_models`` (moved to the CPU first, freeing the device's memory)."""
        if self._loaded is not None:
            self._loaded[2].to("cpu")
            self._loaded = None

    # ------------------------------------------------------------------ estimates
    def _estimate_first(self, plan: dict, keys: dict[int, str]):
        """The estimate (rank 0; ``vram_limit_level: "auto"`` resolved on every rank); a disk that cannot hold the render stops here."""
        cluster = self.cluster
        inputs = plan["config"]["pipeline"]["pipeline_inputs"]
        auto = inputs.get("vram_limit_level") == "auto"
        estimate, refusal, failure = None, None, None
        if cluster.rank == 0 and (self.estimate or auto):
            try:
                estimate = self._estimate(plan, keys)
            except (RunError, ValueError, OSError) as exc:  # told to the other ranks (waiting for the result) before it is raised
                failure = exc
        if cluster.world > 1:
            failed = cluster.broadcast(None if failure is None else str(failure))
            if failed is not None and failure is None:
                raise ClusterError(f"{cluster.members[0]} could not estimate the run, so no rank starts: {failed}")
        if failure is not None:
            raise failure
        if estimate is not None:
            out = plan["config"]["data"]["output_folder"]
            self.last_estimate = estimate
            if self.on_estimate is not None:
                self.on_estimate(estimate)
            disk = estimate.fits.get("disk")
            if disk is not None and not disk["fits"] and not self.force:
                refusal = (f"the output folder {out} would need {human_bytes(disk['needed_bytes'])} more "
                           f"at its peak, and its disk has {human_bytes(estimate.free_disk)} free: {human_bytes(disk['missing_bytes'])} missing. "
                           "Nothing was written. Free that much space, choose an output folder on a larger disk "
                           "(--output-folder), or run anyway with --force (the run then stops when the disk fills; a rerun continues)")
            memory = estimate.fits.get("device memory")
            if memory is not None and not memory["fits"]:
                logger.warning("device memory may not suffice: %s; %s", memory["reason"], memory.get("advice", ""))
        settings = cluster.broadcast(estimate.settings if estimate is not None else None)
        refusal = cluster.broadcast(refusal)
        if refusal is not None:
            raise RunError(refusal)
        if auto:
            for name in ("vram_limit_level", "unet_batch_size", "controlnet_batch_size"):
                inputs[name] = settings[name]  # batch sizes and vram options change no result: no key moves
        return estimate

    def _estimate(self, plan: dict, keys: dict[int, str]):
        from ..estimate import estimate_plan

        out = plan["config"]["data"]["output_folder"]
        device = str(self.cluster.device(plan["config"]["models"].get("device")))
        _check_device(device)  # before estimating for a device that is not there
        return estimate_plan(plan, device=device, world=self.cluster.world, manifest=Manifest(out, writable=False), keys=keys)

    @staticmethod
    def _record_source(manifest: Manifest, plan: dict) -> None:
        """What the input holds and how the video is written, in the manifest (``diffsynth status`` shows it): frames that
        decode vs the header's claim, the exact rates, the audio, and the notes the run warned about."""
        from ..data.media import rate_text

        media, audio, output = plan["media"], plan["audio"], plan["output"]
        record = {"frames": plan["num_frames"], "fps": str(plan["fps"]), "fps_text": rate_text(plan["fps"]),
                  "video": output.file_name, "codec": output.codec, "notes": list(plan["notes"]),
                  "audio": None if audio is None else {"file": os.path.basename(audio.path), "start": float(audio.start), "duration": float(audio.duration)}}
        if media is not None:  # file names, not paths: a moved project is the same render (its keys are by content)
            record["input"] = {"file": os.path.basename(media.path), "decoded_frames": media.decoded_frames, "header_frames": media.header_frames,
                               "rate": None if media.rate is None else str(media.rate), "variable": media.variable,
                               "audio_streams": [stream.describe() for stream in media.audio]}
        if manifest.data.get("source") != record:  # a rerun with nothing to do leaves the manifest as it was
            manifest.data["source"] = record
            manifest.save()

    @staticmethod
    def _keep_estimate(manifest: Manifest, estimate) -> None:
        """The estimate of a run that will work, in the manifest; a stage done before keeps the prediction it was made under."""
        record = estimate.as_json()
        earlier = (manifest.data.get("estimate") or {}).get("stages") or {}
        for sid, stage in record["stages"].items():
            if stage["done"] and sid in earlier:
                record["stages"][sid] = earlier[sid]
        manifest.data["estimate"] = record
        manifest.save()

    def _record_measured(self, manifest: Manifest, meter: Meter, done_before: set[int]) -> None:
        """This run's measurements of the stages it worked on into the manifest (seconds added to earlier runs', peaks the
        largest); a stage that was done before keeps the figures of the run that did it."""
        if not manifest.writable:
            return
        for sid, measured in meter.results().items():
            if sid in done_before:
                continue
            record = manifest.stage(sid).setdefault("measured", {})
            record["seconds"] = round(record.get("seconds", 0.0) + measured["seconds"], 3)
            for name in ("disk_peak_bytes", "ram_peak_bytes", "device_peak_bytes"):
                if measured[name] is not None:
                    record[name] = max(record.get(name) or 0, measured[name])
        try:
            manifest.save()
        except OSError as exc:
            logger.warning("could not record the run's measurements in %s: %s", manifest.path, exc)

    # ------------------------------------------------------------------ several processes
    def _prepare_everywhere(self, config: dict, config_dir: str | None) -> dict:
        """:meth:`prepare` on every rank; a rank whose checks fail stops them all, named with its host (one process: prepare)."""
        cluster = self.cluster
        if cluster.world == 1:
            return self.prepare(config, config_dir)
        plan, failure = None, None
        try:
            plan = self.prepare(config, config_dir)
        except (ValueError, OSError) as exc:  # PreflightError is a ValueError: every problem, each with its fix
            failure = exc
        reports = cluster.all_gather(None if failure is None else str(failure))
        failed = [(cluster.members[rank], report) for rank, report in enumerate(reports) if report is not None]
        if failure is not None:
            if isinstance(failure, PreflightError):
                raise PreflightError(failure.problems, failure.out, where=str(cluster.me)) from None
            raise ValueError(f"{cluster.me}: {failure}") from failure
        if failed:
            member, report = failed[0]
            raise ClusterError(f"{member} cannot start, so no rank does: {report}")
        return plan

    def _keys_everywhere(self, plan: dict) -> dict[int, str]:
        """The stage keys, which every rank must agree on (the same config and inputs everywhere)."""
        keys = self.stage_keys(plan)
        if self.cluster.world > 1:
            others = self.cluster.all_gather(keys)
            for member, theirs in zip(self.cluster.members, others):
                differing = [sid for sid in sorted(keys) if keys[sid] != theirs[sid]]
                if differing:
                    raise ClusterError(f"{member} renders something else than {self.cluster.me}: its cache key of stage {differing[0]} "
                                       f"({STAGES[differing[0]][1]}) differs. Every process must run the same config on the same "
                                       "model files and input video (copy them unchanged to every machine)")
        return keys

    def _detect_storage(self, out: str) -> None:
        """Which ranks write into one folder: all of them (a shared or network disk) or each machine its own.

        Every rank leaves a marker in its output folder and looks for the others'. When every
        rank sees rank 0's, the folder is shared; otherwise each group of ranks seeing one
        folder works in it (folders local to each machine) and its lowest rank sets it up.
        """
        cluster = self.cluster
        token = cluster.broadcast(os.urandom(8).hex() if cluster.rank == 0 else None)
        marker = os.path.join(out, f".cluster_{token}_{cluster.rank}")
        atomic_write_text(marker, token)
        cluster.barrier("the output folder check")
        seen = [rank for rank in range(cluster.world) if os.path.isfile(os.path.join(out, f".cluster_{token}_{rank}"))]
        groups = cluster.all_gather(seen)
        cluster.barrier("the output folder check")
        os.remove(marker)
        for rank, group in enumerate(groups):
            if any(groups[other] != group for other in group):
                raise ClusterError(f"{cluster.members[rank]} sees the markers of ranks {group} in its output folder but they do not all see "
                                   "the same: give every process an output folder that is either shared by all or its machine's own")
        cluster.shared_folder = all(0 in group for group in groups)
        cluster.folder_leader = min(groups[cluster.rank]) == cluster.rank
        if not cluster.shared_folder and cluster.rank == 0:
            logger.info("output folders are local to each machine (%d folders): the final frames are gathered in %s",
                        len({tuple(g) for g in groups}), out)

    def _record_shares(self, manifest: Manifest, plan: dict) -> None:
        """The manifest's record of who did what: world size, and each rank's host, frames and denoising windows."""
        cluster, n = self.cluster, plan["num_frames"]
        inputs = plan["config"]["pipeline"]["pipeline_inputs"]
        windows = sliding_windows(n, inputs.get("animatediff_batch_size", 16), inputs.get("animatediff_stride", 8))
        layout = Layout.of(n, windows, cluster.world)
        ranks = []
        for member in cluster.members:
            share = rank_share(layout, member.rank, cluster.world, cluster.shared_folder)
            own = [k for k, r in enumerate(layout.owners) if r == member.rank]
            ranks.append({"rank": member.rank, "host": member.host, "frames": [share.start, share.stop],
                          "windows": [own[0], own[-1] + 1] if own else [0, 0]})
        manifest.data["distributed"] = {"world_size": cluster.world, "windows": len(windows), "ranks": ranks,
                                        "shared_folder": cluster.shared_folder}
        manifest.save()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _save_config(config: dict, out: str) -> None:
        saved = copy.deepcopy(config)
        saved["pipeline"]["pipeline_inputs"]["input_frames"] = []
        saved["pipeline"]["pipeline_inputs"]["controlnet_frames"] = []
        atomic_write_text(os.path.join(out, "config.json"), json.dumps(saved, indent=4, default=str))

    @staticmethod
    def _invalidate_changed(manifest: Manifest, keys: dict[int, str], out: str) -> None:
        """The first stage whose recorded key differs is recomputed, and everything after it: delete their files.

        Keys are recomputed only from inputs that exist (the pre-flight checks refuse missing
        ones), so a differing key means a real change. A finished render among the files to
        delete (``frames/``, ``video.mp4``) is moved to ``previous/`` instead.
        """
        for sid, _ in STAGES:
            recorded = manifest.key_of(sid)
            if recorded is not None and recorded != keys[sid]:
                logger.info("stage %d's inputs changed: recomputing it and every later stage", sid)
                stale = {name for stage in STAGE_TABLE if stage.id >= sid for name in stage.deletes}
                _keep_previous(out, manifest, [name for name in _FINAL_OUTPUT if name in stale])
                for name in sorted(stale):
                    path = os.path.join(out, name)
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    elif os.path.isfile(path):
                        os.remove(path)
                manifest.invalidate_from(sid)
                return

    @staticmethod
    def _clear(manifest: Manifest, out: str) -> None:
        """``data.clear_output_folder``: everything goes, except a finished render, which is moved to ``previous/`` first."""
        _keep_previous(out, manifest, list(_FINAL_OUTPUT))
        for name in os.listdir(out):
            if name != PREVIOUS_FOLDER:
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    def _migrate_keys(self, manifest: Manifest, plan: dict, keys: dict[int, str]) -> None:
        """A manifest of the first releases keyed files by path and time: rewrite the keys it still matches to content keys.

        So upgrading reuses every stage whose inputs did not change (a moved file, whose old
        key named its old path, is recomputed once, as it was then).
        """
        if manifest.data.get("identity") == IDENTITY_VERSION:
            return
        if manifest.data["stages"]:
            old = self.stage_keys(plan, legacy=True)
            migrated = [sid for sid, _ in STAGES if manifest.key_of(sid) is not None and manifest.key_of(sid) == old[sid]]
            for sid in migrated:
                manifest.stage(sid)["key"] = keys[sid]
            logger.info("%s: cache keys upgraded to content identities (%d of %d stages kept)", manifest.folder, len(migrated), len(manifest.data["stages"]))
        manifest.data["identity"] = IDENTITY_VERSION
        manifest.save()

    @staticmethod
    def _stage_weights(plan: dict) -> dict[int, int]:
        """Work units per stage for the progress bar (the table's weights)."""
        view = StageView(plan["config"], plan["num_frames"], plan["config"]["data"]["output_folder"])
        return {stage.id: stage.weight(view) for stage in STAGE_TABLE}

    @staticmethod
    def _work_done(manifest: Manifest, keys: dict[int, str], plan: dict) -> dict[int, int]:
        """Work already on disk per stage: whole stages that are done, committed frames or steps of partial ones."""
        view = StageView(plan["config"], plan["num_frames"], plan["config"]["data"]["output_folder"])
        return {stage.id: stage.units_done(view, manifest, keys[stage.id]) for stage in STAGE_TABLE}

    def _load_pipeline(self, config: dict) -> tuple[SDVideoPipeline, ModelManager]:
        """The pipeline of ``config["models"]``: loaded, or (``keep_models``) the one the last run loaded from the same section."""
        models = config["models"]
        key = stable_hash({"models": models, "identities": [content_identity(p) for p in models["model_list"]]}) if self.keep_models else None
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1], self._loaded[2]
        self.release_models()
        pipe, model_manager = self._build_pipeline(config)
        if self.keep_models:
            self._loaded = (key, pipe, model_manager)
        return pipe, model_manager

    def _build_pipeline(self, config: dict) -> tuple[SDVideoPipeline, ModelManager]:
        models = config["models"]
        device = self.cluster.device(models.get("device"))  # cuda -> cuda:LOCAL_RANK on several processes
        _check_device(str(device))
        model_manager = ModelManager(torch_dtype=None, device=device)
        if models.get("textual_inversion_folder") and os.path.isdir(models["textual_inversion_folder"]):
            model_manager.load_textual_inversions(models["textual_inversion_folder"])
        model_manager.load_models(models["model_list"], lora_alphas=models.get("lora_alphas", []))
        units = [ControlNetConfigUnit(**u) for u in models.get("controlnet_units", [])]
        pipe = SDVideoPipeline.from_model_manager(model_manager, units, annotator_folder=models.get("annotator_folder", "models/Annotators"))
        return pipe, model_manager

    @staticmethod
    def _load_smoother(config: dict, model_manager: ModelManager, stages: SmootherStages) -> tuple[Any, bool]:
        """The ``smoother_configs`` chain (or None) and whether its cache folder is the run's ``smoother/``.

        FastBlend entries without a ``cache_folder`` get the output folder (the first such
        entry; later ones ``smoother/processor_<k>``, so two in one chain do not share files)
        and ``keep_partials`` from ``data.keep_intermediates``. The chain's first fast-mode
        FastBlend reports its passes to ``stages`` (stages 6-7). Only the built processors
        get these; ``config.json`` keeps the user's entries.
        """
        configs = config.get("smoother_configs")
        stages.installed = False
        stages.direct = None
        if not configs:
            return None, False
        from ..processors import SequencialProcessor

        out = config["data"]["output_folder"]
        entries, owns_cache = [], False
        for k, entry in enumerate(configs):
            entry = copy.deepcopy(entry)
            if isinstance(entry, dict) and entry.get("processor_type") == "FastBlend":
                options = dict(entry.get("config") or {})
                if "cache_folder" not in options:
                    options["cache_folder"] = out if not owns_cache else os.path.join(out, "smoother", f"processor_{k}")
                    owns_cache = True
                options.setdefault("keep_partials", config["data"].get("keep_intermediates", False))
                if not stages.installed and reports_passes(entry):
                    options["progress_callback"] = stages
                    stages.installed = True
                entry["config"] = options
            entries.append(entry)
        chain = SequencialProcessor.from_model_manager(model_manager, entries)
        if writes_frames(configs):
            stages.direct = chain.processors[0]
        return chain, owns_cache
