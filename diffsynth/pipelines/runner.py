"""``SDVideoPipelineRunner``: a config-driven, resumable video render (Diffutoon and friends).

Accepts DiffSynth-Studio's config dict unchanged (``models``, ``data``, ``pipeline``,
``smoother_configs``) plus two keys with safe defaults:

* ``data.clear_output_folder`` (default ``False``): ``True`` wipes the output folder
  first (the seed edition's behaviour); ``False`` reuses whatever is still valid.
* ``data.keep_intermediates`` (default ``False``): keep decoded-but-unsmoothed frames
  and the smoother's partial results after the final frames are written.

FastBlend entries of ``smoother_configs`` keep their cache in the output folder
(``smoother/left``, ``smoother/blended``) unless the entry gives a ``cache_folder``, so
a killed smoothing pass resumes. When smoothing applies to the final frames, FastBlend's
fast mode *is* stages 6-7: its left pass is stage 6, its right pass stage 7 (which merges
each frame into ``smoother/blended`` as soon as it is ready, so no right-pass partial
result is ever stored), each reported frame by frame; stage 8 writes the smoothed frames
(through any processors chained after it) into ``frames/``, also frame by frame. Other
smoothers (balanced/accurate modes, RIFE, PIL edits) have no left/right passes: stages 6
and 7 then finish at once, marked so in the manifest, and all the smoothing is stage 8.

The run is 10 stages (DESIGN.md §3). Each has a cache key — a hash of everything its
result depends on, not of batch sizes or the device — and is journalled in
``manifest.json``; ``last_process_id.txt`` holds the last finished stage. Rerunning
the same config continues where it stopped; a changed key recomputes that stage
and everything after it. Pre-flight checks of every path, file and range in the config
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
from typing import Any, Callable

import torch
from tqdm import tqdm

from ..cache import image_store, tensor_store
from ..cache.identity import IDENTITY_VERSION, content_identity, legacy_identity, save_fingerprints
from ..cache.manifest import STAGE_NAMES, STAGES, Manifest, stable_hash
from ..cache.previous import PREVIOUS_FOLDER, keep_previous
from ..controlnets import ControlNetConfigUnit
from ..data import save_video
from ..models.model_manager import ModelManager
from ..progress import ProgressCallback, ProgressEvent
from ..prompts import BeautifulPrompt
from ..prompts.prompt_models import prompt_model_component
from ..schedulers.ddim import ddim_timesteps
from ..utils.atomic import DiskFullError, atomic_save_safetensors, atomic_write_text, is_temp_name
from ..utils.sizes import count_frame_files, human_bytes, path_bytes
from .config_paths import resolve_config_paths
from .preflight import PreflightError, check_config
from .sd_video import SDVideoPipeline, VideoFrames, WindowJournal, _put_all, _remove_store, sliding_windows

logger = logging.getLogger("diffsynth")

# Parameters of pipeline_inputs that change denoising results (batch sizes and vram options do not;
# smoother_progress_ids count only through the steps smoothed inside the loop, see stage_keys).
_DENOISE_PARAMS = ("cfg_scale", "denoising_strength", "num_inference_steps", "animatediff_batch_size", "animatediff_stride", "cross_frame_attention")

# The progress events of the pipeline methods each stage calls that count as that stage's work
# (the in-loop smoother's decode/encode inside stage 4, for one, do not).
_STAGE_EVENTS = {1: "annotate", 3: "initial latents", 4: "denoise", 5: "decode"}

# FastBlend fast mode's progress stages (extensions/FastBlend/runners/fast.py) -> runner stages. The right
# pass merges as it goes; a separate "FastBlend merge" pass runs only for a caller's own right= store.
_FASTBLEND_STAGES = {"FastBlend left pass": 6, "FastBlend right pass": 7}


def _writes_frames(configs) -> bool:
    """The smoother chain is one FastBlend: it writes its result straight into ``frames/`` (no copy in ``smoother/blended``)."""
    return (isinstance(configs, (list, tuple)) and len(configs) == 1 and isinstance(configs[0], dict)
            and configs[0].get("processor_type") == "FastBlend")


def _pass_folders(writes_frames: bool) -> dict[int, str]:
    """Where stages 6-7's files are, relative to the output folder (the right pass's are the merged frames)."""
    return {6: "smoother/left", 7: "frames" if writes_frames else "smoother/blended"}


def denoising_plan(inputs: dict, num_frames: int) -> dict:
    """What the denoising loop will do, from ``pipeline_inputs`` alone (no models).

    ``steps``: timesteps actually run (fewer than ``num_inference_steps`` when
    ``denoising_strength`` < 1); ``in_loop``: the step indices smoothed inside the loop;
    ``final``: whether the decoded frames are smoothed (``-1`` or ``num_inference_steps``
    in ``smoother_progress_ids``, as the original); ``window_frames``: frames summed over
    one step's sliding windows (the unit of stage 4's progress).
    """
    num_inference_steps = inputs.get("num_inference_steps", 20)
    steps = len(ddim_timesteps(num_inference_steps, inputs.get("denoising_strength", 1.0)))
    ids = set(inputs.get("smoother_progress_ids", []))
    windows = sliding_windows(num_frames, inputs.get("animatediff_batch_size", 16), inputs.get("animatediff_stride", 8))
    return {"steps": steps, "in_loop": sorted(i for i in ids if 0 <= i < steps),
            "final": -1 in ids or num_inference_steps in ids, "window_frames": sum(w.end - w.start for w in windows)}


def _remove_temp_files(folder: str, name: str) -> None:
    """Remove the temporary files of ``name`` that a killed run left in ``folder``.

    A killed video encode leaves the most: its ffmpeg keeps running until its input
    pipe closes and completes a partial video under the temporary name.
    """
    for entry in os.listdir(folder):
        if is_temp_name(entry) and entry.startswith(f".{name}."):
            os.remove(os.path.join(folder, entry))


class RunError(RuntimeError):
    """A run stopped; the message says which stage, what it was doing and how to continue."""


class _Progress:
    """One tqdm bar over all stages' work, with ``ProgressEvent``s for a UI.

    Each stage has a fixed weight in work units (frames; frames × windows × steps for
    denoising). Work reported inside a stage counts up to its weight and finishing a stage
    tops it up, so the bar ends at exactly ``total`` on a complete run, fresh or resumed;
    a resumed run starts at the work already on disk.
    """

    def __init__(self, weights: dict[int, int], done: dict[int, int], bar_cmd, callback: ProgressCallback | None):
        self.weights = weights
        self.counted = {sid: min(done.get(sid, 0), w) for sid, w in weights.items()}
        self.total = sum(weights.values())
        self.callback = callback
        self.bar = bar_cmd(total=self.total, initial=self.done, desc="render", unit="unit") if bar_cmd is not None else None
        self.stage = "setup"
        self.stage_id: int | None = None

    @property
    def done(self) -> int:
        return sum(self.counted.values())

    def set_stage(self, stage_id: int, name: str) -> None:
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
        step = max(0, min(n, self.weights[stage_id] - self.counted[stage_id]))
        self.counted[stage_id] += step
        if step and self.bar is not None:
            self.bar.update(step)
        return step

    def _emit(self) -> None:
        if self.callback is not None:
            self.callback(ProgressEvent(self.stage, self.done, self.total))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _SmootherStages:
    """Turns the final smoothing into stages 6-8: FastBlend's pass events begin and finish stages 6-7.

    Installed as the ``progress_callback`` of the chain's first fast-mode FastBlend. Its
    events count only while :meth:`activate` is in effect (the final smoothing); inside
    the denoising loop the same smoother's work belongs to stage 4.
    """

    def __init__(self):
        self.target = None
        self.installed = False  # set by _load_smoother when a fast-mode FastBlend reports here
        self.direct = None  # set by _load_smoother: the chain's only processor, a FastBlend writing into frames/
        self.folders: dict[int, str] = {}
        self.current: int | None = None
        self.counted: dict[int, int] = {}

    def activate(self, manifest: Manifest, keys: dict[int, str], progress: _Progress, out: str, folders: dict[int, str]) -> None:
        self.target = (manifest, keys, progress, out)
        self.folders = folders
        self.current: int | None = None
        self.counted: dict[int, int] = {}

    def deactivate(self) -> None:
        self.target = None

    def enter(self, stage_id: int) -> None:
        """Finish every smoother stage before ``stage_id`` not yet finished, then begin ``stage_id``."""
        manifest, keys, progress, out = self.target
        for sid in range(6, stage_id):
            if not manifest.is_done(sid, keys[sid]):
                manifest.finish(sid, keys[sid], bytes=path_bytes(os.path.join(out, self.folders[sid])))
            progress.finish_stage(sid)
        if self.current != stage_id:
            self.current = stage_id
            if not manifest.is_done(stage_id, keys[stage_id]):
                manifest.begin(stage_id, keys[stage_id])
            progress.set_stage(stage_id, STAGE_NAMES[stage_id])

    def __call__(self, event: ProgressEvent) -> None:
        stage_id = _FASTBLEND_STAGES.get(event.stage)
        if self.target is None or stage_id is None or (self.current is not None and stage_id < self.current):
            return
        self.enter(stage_id)
        if event.done == 0:
            self.counted[stage_id] = 0  # a pass announces itself with done=0
            return
        progress = self.target[2]
        progress.advance(event.done - self.counted.get(stage_id, 0))
        self.counted[stage_id] = event.done


def _reports_passes(entry) -> bool:
    """A ``smoother_configs`` entry whose passes become stages 6-7: a fast-mode FastBlend that reports to no one else."""
    options = (entry.get("config") or {}) if isinstance(entry, dict) else {}
    return (isinstance(entry, dict) and entry.get("processor_type") == "FastBlend"
            and options.get("inference_mode", "fast") == "fast" and "progress_callback" not in options)


_WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors", ".onnx", ".json")


def _weights_identity(folder: str) -> dict | None:
    """The first manifests' identity of the annotator folder: its weight (and model config) files only (legacy keys)."""
    identity = legacy_identity(folder)
    if identity is not None and "files" in identity:
        identity["files"] = [entry for entry in identity["files"] if entry[0].lower().endswith(_WEIGHT_SUFFIXES)]
    return identity


def _smoother_for_key(configs) -> list | None:
    """``smoother_configs`` as far as they change results: FastBlend's ``cache_folder`` says only where files go."""
    if not configs:
        return None
    entries = copy.deepcopy(list(configs))
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("config"), dict):
            entry["config"].pop("cache_folder", None)
    return entries


def _load_embeddings(path: str) -> dict | None:
    """The cached prompt embeddings, or None (with a warning, the file deleted) when unusable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        embs = load_file(path)
        reason = None if {"posi", "nega"} <= set(embs) else f"it holds {sorted(embs)}, not posi and nega"
    except (SafetensorError, OSError) as exc:
        reason = str(exc)
    if reason is None:
        return embs
    logger.warning("cache file %s is unusable (%s); deleted, so the prompt embeddings will be recomputed", path, reason)
    os.remove(path)
    return None


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


# Files and folders of each stage under the output folder, deleted when the stage is invalidated.
_STAGE_FILES = {0: ["source_images"], 1: ["controlnet_caches"], 2: ["prompt"], 3: [], 4: ["latents", "smoothed"], 5: ["latents"],
                6: ["smoother"], 7: ["smoother"], 8: ["smoother", "frames"], 9: ["video.mp4"]}
_FINAL_OUTPUT = ("frames", "video.mp4")  # a finished render: never deleted by a rerun, only moved to previous/


def _keep_previous(out: str, manifest: Manifest, names: list[str]) -> str | None:
    """Move a finished render's ``names`` to ``out/previous/<time>/`` (``cache.previous``).

    Finished: ``video.mp4`` exists or stage 8 finished writing ``frames/``; an unfinished
    render's frames are intermediates of the abandoned config and are deleted as such.
    """
    finished = os.path.isfile(os.path.join(out, "video.mp4")) or manifest.data["stages"].get("8", {}).get("status") == "done"
    return keep_previous(out, names, finished)


class SDVideoPipelineRunner:
    def __init__(self, in_streamlit: bool = False, progress_callback: ProgressCallback | None = None, progress_bar_cmd: Callable | None = tqdm):
        self.in_streamlit = in_streamlit
        self.progress_callback = progress_callback
        self.progress_bar_cmd = progress_bar_cmd

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
                "source": source, "controls": checked.controls, "width": width, "height": height, "num_frames": len(source)}

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
        k3 = stable_hash({"stage": 3, "k0": k0, "models": model_ids, "seed": pipeline.get("seed", 0), "n": plan["num_frames"],
                          "size": [plan["height"], plan["width"]], "strength": inputs.get("denoising_strength", 1.0), "steps": inputs.get("num_inference_steps", 20)})
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
        k9 = stable_hash({"stage": 9, "k8": k8, "fps": data.get("fps", 30)})
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
        plan = self.prepare(config, config_dir)
        config = plan["config"]
        data = config["data"]
        out = data["output_folder"]
        keys = self.stage_keys(plan)
        try:  # these write too: a full disk here is reported like one inside a stage
            os.makedirs(out, exist_ok=True)
            manifest = Manifest(out)
            self._migrate_keys(manifest, plan, keys)
            if data.get("clear_output_folder", False):
                self._clear(manifest, out)
                manifest = Manifest(out)
            else:
                self._invalidate_changed(manifest, keys, out)
            self._save_config(config, out)
        except OSError as exc:
            raise _io_error("setup", out, exc) from exc
        frames = image_store(os.path.join(out, "frames"), plan["num_frames"], size=(plan["width"], plan["height"]))
        if manifest.is_done(9, keys[9]) and os.path.isfile(os.path.join(out, "video.mp4")) and frames.complete():
            logger.info("%s is complete and up to date; nothing to do", out)
            if self.progress_callback is not None:
                total = sum(self._stage_weights(plan).values())
                self.progress_callback(ProgressEvent("9 video encode", total, total))
            return VideoFrames(frames)
        weights = self._stage_weights(plan)
        progress = _Progress(weights, self._work_done(manifest, keys, plan, weights), self.progress_bar_cmd, self.progress_callback)
        try:
            return self._run_stages(plan, manifest, keys, progress)
        except OSError as exc:
            raise _io_error(f"stage {progress.stage}", out, exc, plan["num_frames"]) from exc
        finally:
            progress.close()

    # Inference only. The stages call the pipeline's methods, not its no_grad __call__, and a textual
    # inversion leaves the token embedding requiring grad: without this, every UNet call would keep
    # its activations alive in an autograd graph for as long as a window's noise is held (GiBs at 1280x768).
    @torch.no_grad()
    def _run_stages(self, plan: dict, manifest: Manifest, keys: dict[int, str], progress: _Progress) -> VideoFrames:
        config = plan["config"]
        data, inputs = config["data"], config["pipeline"]["pipeline_inputs"]
        out = data["output_folder"]
        n, width, height = plan["num_frames"], plan["width"], plan["height"]
        keep = data.get("keep_intermediates", False)

        # stage 0: source frames (lazy reader -> PNG per frame)
        progress.set_stage(0, "source frames")
        source = image_store(os.path.join(out, "source_images"), n, size=(width, height))
        if not manifest.is_done(0, keys[0]) or not source.complete():
            manifest.begin(0, keys[0])
            from ..cache import Prefetcher, WriteBehind

            with WriteBehind(source) as writer:
                for i, frame in Prefetcher(plan["source"], source.missing()):
                    writer.put(i, frame)
                    progress.advance(1)
            manifest.finish(0, keys[0], frames=n, bytes=source.nbytes())
        progress.finish_stage(0)

        pipe, model_manager = self._load_pipeline(config)
        smoother_stages = _SmootherStages()
        smoother, owns_cache = self._load_smoother(config, model_manager, smoother_stages)
        root = out

        # stage 1: ControlNet annotations
        progress.set_stage(1, "ControlNet annotations")
        cond_stores = []
        if pipe.controlnet is not None:
            if not manifest.is_done(1, keys[1]):
                manifest.begin(1, keys[1])
            cond_stores = pipe.annotate(plan["controls"], n, width, height, root, progress)
            manifest.finish(1, keys[1], bytes=sum(s.nbytes() for s in cond_stores))
        else:
            manifest.finish(1, keys[1], skipped="no ControlNet units")
        progress.finish_stage(1)

        # stage 2: prompt embeddings
        progress.set_stage(2, "prompt embeddings")
        emb_path = os.path.join(out, "prompt", "embeddings.safetensors")
        embs = _load_embeddings(emb_path) if manifest.is_done(2, keys[2]) and os.path.isfile(emb_path) else None
        if embs is None:
            manifest.begin(2, keys[2])
            if isinstance(pipe.prompter.beautiful_prompt, BeautifulPrompt):
                # Sample with the run's seed, not a draw from the global RNG (which depends on what ran
                # before in this process): a recomputed prompt stage refines the prompt identically.
                pipe.prompter.beautiful_prompt.seed = int(config["pipeline"].get("seed", 0))
            # Both, always: whether denoising uses the negative one depends on cfg_scale, which is not in this stage's key.
            embs = {"posi": pipe.prompter.encode_prompt(pipe.text_encoder, inputs["prompt"], clip_skip=inputs.get("clip_skip", 1), device=pipe.device).cpu().contiguous(),
                    "nega": pipe.prompter.encode_prompt(
                        pipe.text_encoder, inputs.get("negative_prompt", ""), clip_skip=inputs.get("clip_skip", 1), device=pipe.device, positive=False
                    ).cpu().contiguous()}
            os.makedirs(os.path.dirname(emb_path), exist_ok=True)
            atomic_save_safetensors(embs, emb_path)
            manifest.finish(2, keys[2])
        progress.advance(n)
        emb_posi = embs["posi"].to(pipe.device, pipe.torch_dtype)
        emb_nega = embs["nega"].to(pipe.device, pipe.torch_dtype) if inputs.get("cfg_scale", 7.5) != 1.0 else None

        # stage 3 + 4: initial latents, denoising
        strength = inputs.get("denoising_strength", 1.0)
        steps = inputs.get("num_inference_steps", 20)
        pipe.scheduler.set_timesteps(steps, strength)
        num_steps = len(pipe.scheduler.timesteps)
        final_latents = tensor_store(os.path.join(out, "latents", f"step_{num_steps:03d}"), n)
        need_denoise = not (manifest.is_done(4, keys[4]) and final_latents.complete())
        if need_denoise:
            progress.set_stage(3, "initial latents")
            current = self._current_generation(out, n, num_steps) if manifest.key_of(4) == keys[4] else 0
            if current == 0:
                manifest.begin(3, keys[3])
                generator = torch.Generator().manual_seed(int(config["pipeline"].get("seed", 0)))
                input_frames = source if strength < 1.0 else None
                latents = pipe.initial_latents(input_frames, n, width, height, strength, root, generator, progress)
                manifest.finish(3, keys[3], bytes=latents.nbytes())
            else:
                latents = tensor_store(os.path.join(out, "latents", f"step_{current:03d}"), n)
                manifest.finish(3, keys[3], note="consumed by denoising")
            progress.finish_stage(3)
            progress.set_stage(4, "denoising")
            manifest.begin(4, keys[4])
            options = dict(cfg_scale=inputs.get("cfg_scale", 7.5), animatediff_batch_size=inputs.get("animatediff_batch_size", 16),
                           animatediff_stride=inputs.get("animatediff_stride", 8), unet_batch_size=inputs.get("unet_batch_size", 1),
                           controlnet_batch_size=inputs.get("controlnet_batch_size", 1), cross_frame_attention=inputs.get("cross_frame_attention", False),
                           vram_limit_level=inputs.get("vram_limit_level", 0))
            smoother_ids = set(inputs.get("smoother_progress_ids", []))
            shape = latents[0].shape
            for g in range(current):  # what a kill between two steps left: older generations, journals of finished steps
                _remove_store(tensor_store(os.path.join(out, "latents", f"step_{g:03d}"), n))
                WindowJournal(os.path.join(out, "latents", f"step_{g + 1:03d}_journal")).remove()
            for step in range(current, num_steps):
                nxt = tensor_store(os.path.join(out, "latents", f"step_{step + 1:03d}"), n, shape=shape, dtype=torch.float32)
                journal = WindowJournal(os.path.join(out, "latents", f"step_{step + 1:03d}_journal"))
                if not nxt.complete():
                    if smoother is not None and step in smoother_ids:
                        pipe._smoothed_step(step, latents, nxt, cond_stores, emb_posi, emb_nega, options, progress, smoother, source, root, shape)
                    else:
                        pipe.denoise_step(step, latents, nxt, cond_stores, emb_posi, emb_nega, options, progress, journal=journal)
                journal.remove()  # denoise_step removes it too, unless a kill came between the step's last commit and that
                _remove_store(latents)
                latents = nxt
                manifest.update(4, steps_done=step + 1, steps=num_steps)
            manifest.finish(4, keys[4], steps_done=num_steps, bytes=latents.nbytes())
        elif not manifest.is_done(3, keys[3]):
            manifest.finish(3, keys[3], note="consumed by denoising")
        progress.finish_stage(3)
        progress.finish_stage(4)

        # stage 5: VAE decode (fp32)
        progress.set_stage(5, "VAE decode")
        final_smoothing = smoother is not None and denoising_plan(inputs, n)["final"]  # as the original: only when asked for
        frames = image_store(os.path.join(out, "frames"), n, size=(width, height))
        decoded = image_store(os.path.join(out, "latents", "decoded"), n, size=(width, height)) if final_smoothing else frames
        smoothed = final_smoothing and manifest.is_done(8, keys[8]) and frames.complete()
        if not smoothed and not (manifest.is_done(5, keys[5]) and decoded.complete()):
            manifest.begin(5, keys[5])
            pipe.decode(final_latents, decoded, progress)
            manifest.finish(5, keys[5], bytes=decoded.nbytes())
        progress.finish_stage(5)

        # stages 6-8: the smoother (FastBlend's left pass, right pass + merge, frames/), streaming through smoother/
        if final_smoothing:
            if not smoothed:
                self._smooth(smoother, smoother_stages, decoded, source, frames, manifest, keys, progress, out)
            for sid in (6, 7, 8):
                progress.finish_stage(sid)
            if not keep:  # the smoothed frames are in frames/: the unsmoothed ones are no longer needed
                _remove_store(decoded)
        else:
            for sid in (6, 7, 8):
                manifest.finish(sid, keys[sid], skipped="no smoother" if smoother is None else "the smoother runs only inside the denoising loop")
                progress.finish_stage(sid)
        if not keep and owns_cache and os.path.isdir(os.path.join(out, "smoother")):
            shutil.rmtree(os.path.join(out, "smoother"))  # FastBlend's cache: its results are in frames/ (or the latents)

        # stage 9: video encode
        progress.set_stage(9, "video encode")
        video_path = os.path.join(out, "video.mp4")
        if not (manifest.is_done(9, keys[9]) and os.path.isfile(video_path)):
            manifest.begin(9, keys[9])
            _remove_temp_files(out, "video.mp4")
            save_video(VideoFrames(frames), video_path, fps=data.get("fps", 30), progress_bar_cmd=progress.each)
            manifest.finish(9, keys[9], bytes=os.path.getsize(video_path))
        progress.finish_stage(9)
        model_manager.to("cpu")
        return VideoFrames(frames)

    @staticmethod
    def _smooth(smoother, stages: "_SmootherStages", decoded, source, frames, manifest: Manifest, keys: dict[int, str], progress: _Progress, out: str) -> None:
        """Stages 6-8 on the decoded frames, into ``frames/``.

        With a fast-mode FastBlend in the chain its pass events move stages 6 and 7 along
        (:class:`_SmootherStages`); a pass already complete on disk reports nothing, and
        the next pass's first event (or the end) finishes it. Stage 8 writes the result
        (through any processors chained after FastBlend) into ``frames/``, one unit per
        frame. Without a fast-mode FastBlend, stages 6 and 7 finish at once and all the
        smoothing is stage 8. A chain of FastBlend alone writes ``frames/`` itself (fast mode:
        its right pass merges each frame straight into it), so no second copy of the frames
        is ever on disk and stage 8 has nothing left to write.
        """
        def smooth_into_frames():
            if stages.direct is not None:  # FastBlend alone writes frames/ itself: no second copy in smoother/blended
                stages.direct.smooth(source, VideoFrames(decoded), result_folder=frames.folder)
                return None
            return smoother(VideoFrames(decoded), original_frames=source)

        if stages.installed:
            stages.activate(manifest, keys, progress, out, _pass_folders(stages.direct is not None))
            try:
                stages.enter(6)
                result = smooth_into_frames()
                stages.enter(8)  # finishes 6 and 7 too when their frames were all on disk already
                if result is not None:
                    _put_all(frames, progress.each(result))
            finally:
                stages.deactivate()
        else:
            for sid in (6, 7):
                manifest.finish(sid, keys[sid], note="no left/right passes: this smoother runs in stage 8")
                progress.finish_stage(sid)
            progress.set_stage(8, STAGE_NAMES[8])
            manifest.begin(8, keys[8])
            result = smooth_into_frames()
            if result is not None:
                _put_all(frames, progress.each(result))
        manifest.finish(8, keys[8], bytes=frames.nbytes())

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
                stale = {name for later, _ in STAGES if later >= sid for name in _STAGE_FILES[later]}
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
    def _current_generation(out: str, n: int, num_steps: int) -> int:
        """The newest complete latent generation on disk (0 if none)."""
        for g in range(num_steps, -1, -1):
            folder = os.path.join(out, "latents", f"step_{g:03d}")
            if os.path.isdir(folder) and tensor_store(folder, n).complete():
                return g
        return 0

    @staticmethod
    def _stage_weights(plan: dict) -> dict[int, int]:
        """Work units per stage for the progress bar: frames, and frames summed over every step's windows for denoising."""
        config = plan["config"]
        n = plan["num_frames"]
        units = len(config["models"].get("controlnet_units", []))
        denoise = denoising_plan(config["pipeline"]["pipeline_inputs"], n)
        return {0: n, 1: n * units, 2: n, 3: n, 4: denoise["steps"] * denoise["window_frames"], 5: n, 6: n, 7: n, 8: n, 9: n}

    @staticmethod
    def _work_done(manifest: Manifest, keys: dict[int, str], plan: dict, weights: dict[int, int]) -> dict[int, int]:
        """Work already on disk per stage: whole stages that are done, committed frames or steps of partial ones."""
        out = plan["config"]["data"]["output_folder"]
        n = plan["num_frames"]
        done = {}
        for sid, weight in weights.items():
            if manifest.is_done(sid, keys[sid]):
                done[sid] = weight
            elif manifest.key_of(sid) == keys[sid]:  # partial, under the same key
                if sid == 0:
                    done[sid] = count_frame_files(os.path.join(out, "source_images"))
                elif sid == 1:
                    units = len(plan["config"]["models"].get("controlnet_units", []))
                    done[sid] = sum(count_frame_files(os.path.join(out, "controlnet_caches", str(k))) for k in range(units))
                elif sid == 4:
                    steps = manifest.data["stages"]["4"].get("steps_done", 0)
                    done[sid] = steps * weight // max(denoising_plan(plan["config"]["pipeline"]["pipeline_inputs"], n)["steps"], 1)
                elif sid in (6, 7):  # stage 8 rewrites frames/ whole: a partial one counts nothing
                    done[sid] = count_frame_files(os.path.join(out, _pass_folders(_writes_frames(plan["config"].get("smoother_configs")))[sid]))
        return done

    def _load_pipeline(self, config: dict) -> tuple[SDVideoPipeline, ModelManager]:
        models = config["models"]
        device = models.get("device")
        if device == "cuda" and not torch.cuda.is_available():
            raise RunError("models.device is 'cuda' but no CUDA device is available; set models.device to 'cpu' (slow) or run on a GPU machine")
        model_manager = ModelManager(torch_dtype=None, device=device)
        if models.get("textual_inversion_folder") and os.path.isdir(models["textual_inversion_folder"]):
            model_manager.load_textual_inversions(models["textual_inversion_folder"])
        model_manager.load_models(models["model_list"], lora_alphas=models.get("lora_alphas", []))
        units = [ControlNetConfigUnit(**u) for u in models.get("controlnet_units", [])]
        pipe = SDVideoPipeline.from_model_manager(model_manager, units, annotator_folder=models.get("annotator_folder", "models/Annotators"))
        return pipe, model_manager

    @staticmethod
    def smoother_writes_frames(config: dict) -> bool:
        """Whether the final smoothing writes ``frames/`` itself (the chain is one FastBlend) instead of stage 8 copying into it."""
        return _writes_frames(config.get("smoother_configs"))

    @staticmethod
    def smoother_has_passes(config: dict) -> bool:
        """Whether the final smoothing has stages 6-7 of its own: the chain holds a fast-mode FastBlend (see ``_load_smoother``)."""
        return any(_reports_passes(entry) for entry in config.get("smoother_configs") or [])

    @staticmethod
    def _load_smoother(config: dict, model_manager: ModelManager, stages: _SmootherStages) -> tuple[Any, bool]:
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
                if not stages.installed and _reports_passes(entry):
                    options["progress_callback"] = stages
                    stages.installed = True
                entry["config"] = options
            entries.append(entry)
        chain = SequencialProcessor.from_model_manager(model_manager, entries)
        if _writes_frames(configs):
            stages.direct = chain.processors[0]
        return chain, owns_cache
