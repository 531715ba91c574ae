"""``SDVideoPipelineRunner``: a config-driven, resumable video render (Diffutoon and friends).

Accepts DiffSynth-Studio's config dict unchanged (``models``, ``data``, ``pipeline``,
``smoother_configs``) plus two keys with safe defaults:

* ``data.clear_output_folder`` (default ``False``): ``True`` wipes the output folder
  first (the seed edition's behaviour); ``False`` reuses whatever is still valid.
* ``data.keep_intermediates`` (default ``False``): keep decoded-but-unsmoothed frames
  and the smoother's partial results after the final frames are written.

The run is 10 stages (DESIGN.md §3). Each has a cache key — a hash of everything its
result depends on, not of batch sizes or the device — and is journalled in
``manifest.json``; ``last_process_id.txt`` holds the last finished stage. Rerunning
the same config continues where it stopped; a changed key recomputes that stage
and everything after it. Validation of the inputs happens before any model loads.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from typing import Any, Callable

import torch
from tqdm import tqdm

from ..cache import image_store, tensor_store
from ..cache.manifest import STAGES, Manifest, file_identity, stable_hash
from ..controlnets import ControlNetConfigUnit
from ..data import VideoData, save_video
from ..models.model_manager import ModelManager
from ..progress import ProgressCallback, ProgressEvent
from ..utils.atomic import atomic_save_safetensors, atomic_write_text, is_temp_name
from .sd_video import SDVideoPipeline, VideoFrames, WindowJournal, _remove_store

logger = logging.getLogger("diffsynth")

# Parameters of pipeline_inputs that change results (batch sizes and vram options do not).
_DENOISE_PARAMS = ("cfg_scale", "denoising_strength", "num_inference_steps", "animatediff_batch_size", "animatediff_stride", "cross_frame_attention", "smoother_progress_ids")


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
    """One tqdm bar over all stages' work units (frames), with events for a UI; resumes count what is done."""

    def __init__(self, total: int, done: int, bar_cmd, callback: ProgressCallback | None):
        self.total = total
        self.done = done
        self.callback = callback
        self.bar = bar_cmd(total=total, initial=done, desc="render", unit="frame") if bar_cmd is not None else None
        self.stage = "setup"

    def set_stage(self, stage_id: int, name: str) -> None:
        self.stage = f"{stage_id} {name}"
        if self.bar is not None:
            self.bar.set_description(f"stage {stage_id}: {name}")
        self._emit()

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        self.done += done
        if self.bar is not None:
            self.bar.update(done)
        self._emit()

    def advance(self, n: int) -> None:
        self(self.stage, n, None)

    def each(self, items, total=None, desc=None):
        """A ``progress_bar_cmd`` for ``save_video``: one unit per frame as it is consumed."""
        for item in items:
            yield item
            self.advance(1)

    def _emit(self) -> None:
        if self.callback is not None:
            self.callback(ProgressEvent(self.stage, min(self.done, self.total), self.total))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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


def _io_error(where: str, out: str, exc: OSError) -> RunError:
    return RunError(
        f"{where} stopped on an I/O error while writing into {out}: {exc}. "
        "Free disk space (or fix the folder) and run the same config again: finished work is kept and the run continues."
    )


class SDVideoPipelineRunner:
    def __init__(self, in_streamlit: bool = False, progress_callback: ProgressCallback | None = None, progress_bar_cmd: Callable | None = tqdm):
        self.in_streamlit = in_streamlit
        self.progress_callback = progress_callback
        self.progress_bar_cmd = progress_bar_cmd

    # ------------------------------------------------------------------ validation (no models)
    @staticmethod
    def open_frames(spec: dict, what: str) -> VideoData:
        """A lazy, cropped/resized frame range from a ``{video_file|image_folder, height, width, start_frame_id, end_frame_id}`` dict."""
        height, width = spec.get("height"), spec.get("width")
        for name, value in (("height", height), ("width", width)):
            if value is not None and (not isinstance(value, int) or value <= 0 or value % 8):
                nearest = max(8, round(value / 8) * 8) if isinstance(value, (int, float)) else 8
                raise ValueError(f"{what}: {name} must be a positive multiple of 8, got {value!r}; nearest valid: {nearest}")
        video = VideoData(video_file=spec.get("video_file"), image_folder=spec.get("image_folder"), height=height, width=width)
        start = spec.get("start_frame_id") or 0
        end = spec.get("end_frame_id")
        try:
            frames = video.range(start, end)
        except ValueError as exc:
            raise ValueError(f"{what}: start_frame_id={start}, end_frame_id={end} is not a valid range: {exc}") from exc
        if len(frames) == 0:
            raise ValueError(f"{what}: the frame range [{start}, {end}) of {spec.get('video_file') or spec.get('image_folder')} holds no frames (the source has {len(video)})")
        return frames

    def prepare(self, config: dict) -> dict:
        """Check everything that can be checked without models; returns the normalised plan."""
        config = copy.deepcopy(config)
        data = config["data"]
        inputs = config["pipeline"]["pipeline_inputs"]
        source = self.open_frames(data["input_frames"], "data.input_frames")
        width, height = source[0].size
        for name, value in (("height", height), ("width", width)):
            if value % 8:
                raise ValueError(f"data.input_frames: frames are {width}x{height}; {name} must be a multiple of 8 (nearest valid: {round(value / 8) * 8}); set height/width")
        units = config["models"].get("controlnet_units", [])
        control_specs = data.get("controlnet_frames") or []
        if control_specs and len(control_specs) != len(units):
            raise ValueError(f"data.controlnet_frames has {len(control_specs)} entries but models.controlnet_units has {len(units)}; give one per unit")
        controls = []
        for k, spec in enumerate(control_specs):
            frames = self.open_frames(spec, f"data.controlnet_frames[{k}]")
            if len(frames) != len(source):
                raise ValueError(f"data.controlnet_frames[{k}] has {len(frames)} frames but data.input_frames has {len(source)}; the ranges must have the same length")
            if frames[0].size != (width, height):
                raise ValueError(f"data.controlnet_frames[{k}] frames are {frames[0].size[0]}x{frames[0].size[1]}, input frames {width}x{height}; give the same height and width")
            controls.append(frames)
        if units and not controls:
            controls = [source] * len(units)  # the original fed each unit the input video when no frames were listed
        inputs.update(num_frames=len(source), width=width, height=height)
        return {"config": config, "source": source, "controls": controls, "width": width, "height": height, "num_frames": len(source)}

    # ------------------------------------------------------------------ keys
    @staticmethod
    def stage_keys(plan: dict) -> dict[int, str]:
        config = plan["config"]
        models, data, pipeline = config["models"], config["data"], config["pipeline"]
        inputs = pipeline["pipeline_inputs"]
        frames_id = lambda spec: {  # noqa: E731
            "source": file_identity(spec.get("video_file") or spec.get("image_folder")),
            "range": [spec.get("start_frame_id") or 0, spec.get("end_frame_id")],
            "size": [plan["height"], plan["width"]],
        }
        model_ids = [file_identity(p) for p in models["model_list"]]
        ti = file_identity(models.get("textual_inversion_folder")) if models.get("textual_inversion_folder") else None
        k0 = stable_hash({"stage": 0, "input": frames_id(data["input_frames"])})
        specs = data.get("controlnet_frames") or [data["input_frames"]] * len(models.get("controlnet_units", []))
        units = [{"processor": u["processor_id"], "frames": frames_id(s)} for u, s in zip(models.get("controlnet_units", []), specs)]
        k1 = stable_hash({"stage": 1, "units": units, "annotators": file_identity(models.get("annotator_folder", "models/Annotators"))})
        k2 = stable_hash({"stage": 2, "models": model_ids, "alphas": models.get("lora_alphas", []), "ti": ti,
                          "prompt": inputs.get("prompt"), "negative": inputs.get("negative_prompt", ""), "clip_skip": inputs.get("clip_skip", 1)})
        k3 = stable_hash({"stage": 3, "k0": k0, "models": model_ids, "seed": pipeline.get("seed", 0), "n": plan["num_frames"],
                          "size": [plan["height"], plan["width"]], "strength": inputs.get("denoising_strength", 1.0), "steps": inputs.get("num_inference_steps", 20)})
        k4 = stable_hash({"stage": 4, "k1": k1, "k2": k2, "k3": k3, "units": models.get("controlnet_units", []),
                          "params": {p: inputs.get(p) for p in _DENOISE_PARAMS}, "smoother": config.get("smoother_configs")})
        k5 = stable_hash({"stage": 5, "k4": k4})
        smooth = {"k0": k0, "smoother": config.get("smoother_configs")}
        k6 = stable_hash({"stage": 6, "k5": k5, **smooth})
        k7 = stable_hash({"stage": 7, "k6": k6})
        k8 = stable_hash({"stage": 8, "k7": k7})
        k9 = stable_hash({"stage": 9, "k8": k8, "fps": data.get("fps", 30)})
        return {0: k0, 1: k1, 2: k2, 3: k3, 4: k4, 5: k5, 6: k6, 7: k7, 8: k8, 9: k9}

    # ------------------------------------------------------------------ run
    def run(self, config: dict) -> VideoFrames:
        plan = self.prepare(config)
        config = plan["config"]
        data = config["data"]
        out = data["output_folder"]
        keys = self.stage_keys(plan)
        try:  # these write too: a full disk here is reported like one inside a stage
            if data.get("clear_output_folder", False) and os.path.isdir(out):
                shutil.rmtree(out)
            os.makedirs(out, exist_ok=True)
            self._save_config(config, out)
            manifest = Manifest(out)
            self._invalidate_changed(manifest, keys, out)
        except OSError as exc:
            raise _io_error("setup", out, exc) from exc
        frames = image_store(os.path.join(out, "frames"), plan["num_frames"], size=(plan["width"], plan["height"]))
        if manifest.is_done(9, keys[9]) and os.path.isfile(os.path.join(out, "video.mp4")) and frames.complete():
            logger.info("%s is complete and up to date; nothing to do", out)
            return VideoFrames(frames)
        n = plan["num_frames"]
        steps = config["pipeline"]["pipeline_inputs"].get("num_inference_steps", 20)
        units = len(config["models"].get("controlnet_units", []))
        total = n * (1 + units + 1 + steps + 1 + 3 + 1) + 1
        progress = _Progress(total, self._work_done(manifest, keys, n, units, steps), self.progress_bar_cmd, self.progress_callback)
        try:
            return self._run_stages(plan, manifest, keys, progress)
        except OSError as exc:
            raise _io_error(f"stage {progress.stage}", out, exc) from exc
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

        pipe, model_manager = self._load_pipeline(config)
        smoother = self._load_smoother(config, model_manager)
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

        # stage 2: prompt embeddings
        progress.set_stage(2, "prompt embeddings")
        emb_path = os.path.join(out, "prompt", "embeddings.safetensors")
        embs = _load_embeddings(emb_path) if manifest.is_done(2, keys[2]) and os.path.isfile(emb_path) else None
        if embs is None:
            manifest.begin(2, keys[2])
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

        # stage 5: VAE decode (fp32)
        progress.set_stage(5, "VAE decode")
        ids = set(inputs.get("smoother_progress_ids", []))
        final_smoothing = smoother is not None and (-1 in ids or num_steps in ids)  # as the original: only when asked for
        decoded_folder = os.path.join(out, "latents", "decoded") if final_smoothing else os.path.join(out, "frames")
        decoded = image_store(decoded_folder, n, size=(width, height))
        frames = image_store(os.path.join(out, "frames"), n, size=(width, height))
        if not (manifest.is_done(5, keys[5]) and (decoded.complete() or frames.complete())):
            manifest.begin(5, keys[5])
            pipe.decode(final_latents, decoded, progress)
            manifest.finish(5, keys[5], bytes=decoded.nbytes())

        # stages 6-8: the smoother (FastBlend's left pass, right pass, blend), streaming through smoother/
        if final_smoothing:
            for sid, name in ((6, "smoother left pass"), (7, "smoother right pass")):
                progress.set_stage(sid, name)
                manifest.finish(sid, keys[sid], note="part of the streaming smoother (stage 8)")
            progress.set_stage(8, "smoother blend")
            if not (manifest.is_done(8, keys[8]) and frames.complete()):
                manifest.begin(8, keys[8])
                result = smoother(VideoFrames(decoded), original_frames=source)
                from .sd_video import _put_all

                _put_all(frames, result)
                manifest.finish(8, keys[8], bytes=frames.nbytes())
                if not config["data"].get("keep_intermediates", False):
                    _remove_store(decoded)
        else:
            for sid, name in ((6, "smoother left pass"), (7, "smoother right pass"), (8, "smoother blend")):
                manifest.finish(sid, keys[sid], skipped="no smoother")

        # stage 9: video encode
        progress.set_stage(9, "video encode")
        video_path = os.path.join(out, "video.mp4")
        if not (manifest.is_done(9, keys[9]) and os.path.isfile(video_path)):
            manifest.begin(9, keys[9])
            _remove_temp_files(out, "video.mp4")
            save_video(VideoFrames(frames), video_path, fps=data.get("fps", 30), progress_bar_cmd=progress.each)
            manifest.finish(9, keys[9], bytes=os.path.getsize(video_path))
        else:
            progress.advance(n)
        model_manager.to("cpu")
        return VideoFrames(frames)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _save_config(config: dict, out: str) -> None:
        saved = copy.deepcopy(config)
        saved["pipeline"]["pipeline_inputs"]["input_frames"] = []
        saved["pipeline"]["pipeline_inputs"]["controlnet_frames"] = []
        atomic_write_text(os.path.join(out, "config.json"), json.dumps(saved, indent=4, default=str))

    @staticmethod
    def _invalidate_changed(manifest: Manifest, keys: dict[int, str], out: str) -> None:
        """The first stage whose recorded key differs is recomputed, and everything after it: delete their files."""
        for sid, _ in STAGES:
            recorded = manifest.key_of(sid)
            if recorded is not None and recorded != keys[sid]:
                logger.info("stage %d's inputs changed: recomputing it and every later stage", sid)
                folders = {0: ["source_images"], 1: ["controlnet_caches"], 2: ["prompt"], 3: [], 4: ["latents", "smoothed"], 5: ["latents"],
                           6: ["smoother"], 7: ["smoother"], 8: ["smoother", "frames"], 9: []}
                stale = {name for later, _ in STAGES if later >= sid for name in folders[later]}
                for name in sorted(stale):
                    if os.path.isdir(os.path.join(out, name)):
                        shutil.rmtree(os.path.join(out, name))
                if os.path.isfile(os.path.join(out, "video.mp4")):
                    os.remove(os.path.join(out, "video.mp4"))
                manifest.invalidate_from(sid)
                return

    @staticmethod
    def _current_generation(out: str, n: int, num_steps: int) -> int:
        """The newest complete latent generation on disk (0 if none)."""
        for g in range(num_steps, -1, -1):
            folder = os.path.join(out, "latents", f"step_{g:03d}")
            if os.path.isdir(folder) and tensor_store(folder, n).complete():
                return g
        return 0

    @staticmethod
    def _work_done(manifest: Manifest, keys: dict[int, str], n: int, units: int, steps: int) -> int:
        weights = {0: n, 1: n * units, 2: n, 3: n, 4: n * steps, 5: n, 6: n, 7: n, 8: n, 9: n}
        done = sum(w for sid, w in weights.items() if manifest.is_done(sid, keys[sid]))
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
    def _load_smoother(config: dict, model_manager: ModelManager):
        configs = config.get("smoother_configs")
        if not configs:
            return None
        from ..processors import SequencialProcessor

        return SequencialProcessor.from_model_manager(model_manager, configs)
