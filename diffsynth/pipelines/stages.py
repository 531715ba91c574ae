"""The runner's 10 stages as a table: one object per stage (DESIGN.md §3, "Stages as data").

Each :class:`Stage` knows its name, the files it owns in the output folder (what ``diffsynth
status`` measures and what invalidation deletes), its work units (the progress weight; the
unit of the estimates), how many of them are already on disk, and how to run. The runner,
``diffsynth status`` and the tools after them read this table; a stage's facts are written
only here. Cache keys are computed in one place too (``SDVideoPipelineRunner.stage_keys``).

Stages run in order over a :class:`RunContext` (what they share in one run: stores, the
pipeline, the embeddings, the latents). Stages 6-8 are one smoothing call: FastBlend's pass
events move them along (:class:`SmootherStages`); stage 6 runs it, 8 cleans up.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import torch

from ..cache import Prefetcher, WriteBehind, image_store, tensor_store
from ..cache.manifest import STAGE_NAMES, Manifest
from ..data import save_video
from ..data.media import rate_text
from ..data.output import VIDEO_FILE_NAMES
from ..progress import ProgressEvent
from ..prompts import BeautifulPrompt
from ..schedulers.base import check_sampler_name, make_sampler, sampler_class
from ..utils.atomic import atomic_save_safetensors, is_temp_name
from ..utils.sizes import count_frame_files, path_bytes
from ..distributed import Cluster, ClusterError, Layout, rank_share
from .sd_video import VideoFrames, WindowJournal, _put_all, _remove_store, _within, previous_folder, sliding_windows
from ..processors.FastBlend import DEFAULT_WINDOW_SIZE
from .workload import denoise_pass, merged, smoother_work

logger = logging.getLogger("diffsynth")

# FastBlend fast mode's progress stages (extensions/FastBlend/runners/fast.py) -> runner stages. The right
# pass merges as it goes; a separate "FastBlend merge" pass runs only for a caller's own right= store.
_FASTBLEND_STAGES = {"FastBlend left pass": 6, "FastBlend right pass": 7}
_FAST_PASSES = ("FastBlend remaps (left pass)", "FastBlend remaps (right pass)")  # fast mode's work (workload.smoother_work)


# ---------------------------------------------------------------------- what a config says about the stages


def smooths_final_frames(inputs: dict) -> bool:
    """Whether ``smoother_progress_ids`` asks for the decoded frames to be smoothed (``-1`` or ``num_inference_steps``, as the original)."""
    ids = set(inputs.get("smoother_progress_ids", []))
    return -1 in ids or inputs.get("num_inference_steps", 20) in ids


def denoising_plan(inputs: dict, num_frames: int) -> dict:
    """What the denoising loop will do, from ``pipeline_inputs`` alone (no models).

    ``steps``: timesteps actually run (fewer than ``num_inference_steps`` when
    ``denoising_strength`` < 1); ``in_loop``: the step indices smoothed inside the loop;
    ``final``: whether the decoded frames are smoothed (``-1`` or ``num_inference_steps``
    in ``smoother_progress_ids``, as the original); ``window_frames``: frames summed over
    one step's sliding windows (the unit of stage 4's progress).
    """
    num_inference_steps = inputs.get("num_inference_steps", 20)
    sampler = make_sampler(inputs.get("sampler", "ddim"))
    sampler.set_timesteps(num_inference_steps, inputs.get("denoising_strength", 1.0))
    steps = len(sampler.timesteps)
    ids = set(inputs.get("smoother_progress_ids", []))
    windows = sliding_windows(num_frames, inputs.get("animatediff_batch_size", 16), inputs.get("animatediff_stride", 8))
    return {"steps": steps, "in_loop": sorted(i for i in ids if 0 <= i < steps),
            "final": smooths_final_frames(inputs), "window_frames": sum(w.end - w.start for w in windows)}


def reports_passes(entry) -> bool:
    """A ``smoother_configs`` entry whose passes become stages 6-7: a fast-mode FastBlend that reports to no one else."""
    options = (entry.get("config") or {}) if isinstance(entry, dict) else {}
    return (isinstance(entry, dict) and entry.get("processor_type") == "FastBlend"
            and options.get("inference_mode", "fast") == "fast" and "progress_callback" not in options)


def writes_frames(configs) -> bool:
    """The smoother chain is one FastBlend: it writes its result straight into ``frames/`` (no copy in ``smoother/blended``)."""
    return (isinstance(configs, (list, tuple)) and len(configs) == 1 and isinstance(configs[0], dict)
            and configs[0].get("processor_type") == "FastBlend")


class StageView:
    """What the table needs to know about a render, without models or inputs: its config, frame count and folder.

    ``n`` may be None (``diffsynth status`` of a folder whose frame count is unknown): then
    the work units are unknown too.
    """

    def __init__(self, config: dict, n: int | None, out: str):
        self.config, self.n, self.out = config, n, out
        self.inputs = (config.get("pipeline") or {}).get("pipeline_inputs") or {}
        self.units = len((config.get("models") or {}).get("controlnet_units") or [])
        smoother = config.get("smoother_configs") or []
        self.smoother = bool(smoother)
        self.final_smoothing = self.smoother and smooths_final_frames(self.inputs)
        self.passes = any(reports_passes(entry) for entry in smoother)
        self.direct = writes_frames(smoother)  # FastBlend alone writes frames/ (in stage 7 with passes, else in 8)
        self.denoise = denoising_plan(self.inputs, n) if n else None
        sampler = self.inputs.get("sampler", "ddim")
        # a multistep sampler keeps latents/previous_<g> beside the latents (an unknown name: the checks say so, not this view)
        self.multistep = check_sampler_name(sampler) is None and sampler_class(sampler).needs_previous

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)


# ---------------------------------------------------------------------- the table


class Stage:
    """One row of the table. ``deletes``: what invalidating the stage removes (relative to the output folder)."""

    id: int
    deletes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return STAGE_NAMES[self.id]

    def files(self, view: StageView) -> list[str]:
        """The files and folders holding this stage's results (relative), for sizes and frame counts."""
        return []

    def weight(self, view: StageView) -> int:
        """Work units of the whole stage: frames (annotations: frames × units; denoising: frames × windows × steps)."""
        return view.n

    def work(self, view: StageView) -> dict[str, int]:
        """What the stage calls for a whole render from nothing, by kind (``workload``): the counts behind time estimates."""
        return {}

    def partial_units(self, view: StageView, manifest: Manifest) -> int:
        """Units committed on disk by an unfinished run under the current key (0 where a partial result counts nothing)."""
        return 0

    def units_done(self, view: StageView, manifest: Manifest, key: str) -> int:
        """Units already done: all of a finished stage, the committed ones of a partial one under the same key."""
        if manifest.is_done(self.id, key):
            return self.weight(view)
        if manifest.key_of(self.id) == key:
            return min(self.partial_units(view, manifest), self.weight(view))
        return 0

    def run(self, ctx: "RunContext") -> None:
        raise NotImplementedError


class SourceFrames(Stage):
    id, deletes = 0, ("source_images",)

    def files(self, view):
        return ["source_images"]

    def work(self, view):
        return {"source frames": view.n}

    def partial_units(self, view, manifest):
        return count_frame_files(view.path("source_images"))

    def run(self, ctx):
        ctx.progress.set_stage(0, self.name)
        source = ctx.source
        if ctx.cluster.any(not ctx.manifest.is_done(0, ctx.keys[0]) or ctx.lacks(source, "source")):
            ctx.manifest.begin(0, ctx.keys[0])
            with WriteBehind(source) as writer:
                for i, frame in Prefetcher(ctx.plan["source"], _within(source.missing(), ctx.work("source"))):
                    writer.put(i, frame)
                    ctx.progress.advance(1)
            ctx.sync("source frames")
            ctx.manifest.finish(0, ctx.keys[0], frames=ctx.n, bytes=source.nbytes())
        ctx.progress.finish_stage(0)


class Annotations(Stage):
    id, deletes = 1, ("controlnet_caches",)

    def files(self, view):
        return ["controlnet_caches"]

    def weight(self, view):
        return view.n * view.units

    def work(self, view):
        units = (view.config.get("models") or {}).get("controlnet_units") or []
        return merged(*({f"annotator frames ({unit.get('processor_id')})": view.n} for unit in units))

    def partial_units(self, view, manifest):
        return sum(count_frame_files(view.path(os.path.join("controlnet_caches", str(k)))) for k in range(view.units))

    def run(self, ctx):
        pipe = ctx.load_models()
        ctx.progress.set_stage(1, self.name)
        if pipe.controlnet is not None:
            if not ctx.manifest.is_done(1, ctx.keys[1]):
                ctx.manifest.begin(1, ctx.keys[1])
            ctx.cond_stores = pipe.annotate(ctx.plan["controls"], ctx.n, ctx.width, ctx.height, ctx.out, ctx.progress, frames=ctx.work("latents"))
            ctx.sync("ControlNet annotations")
            ctx.manifest.finish(1, ctx.keys[1], bytes=sum(s.nbytes() for s in ctx.cond_stores))
        else:
            ctx.manifest.finish(1, ctx.keys[1], skipped="no ControlNet units")
        ctx.progress.finish_stage(1)


class PromptEmbeddings(Stage):
    id, deletes = 2, ("prompt",)
    file = os.path.join("prompt", "embeddings.safetensors")

    def files(self, view):
        return ["prompt"]

    def work(self, view):
        return {"text encoder calls": 2}  # the positive and the negative prompt, always

    def run(self, ctx):
        pipe, inputs = ctx.load_models(), ctx.inputs
        ctx.progress.set_stage(2, self.name)
        path = os.path.join(ctx.out, self.file)
        embs = None
        if ctx.cluster.rank == 0:  # computed once, then broadcast
            embs = self._compute(ctx, pipe, inputs, path)
        embs = ctx.cluster.broadcast(embs)
        ctx.sync_manifest()
        ctx.progress.advance(ctx.n)
        ctx.emb_posi = embs["posi"].to(pipe.device, pipe.torch_dtype)
        ctx.emb_nega = embs["nega"].to(pipe.device, pipe.torch_dtype) if inputs.get("cfg_scale", 7.5) != 1.0 else None

    def _compute(self, ctx, pipe, inputs, path):
        embs = _load_embeddings(path) if ctx.manifest.is_done(2, ctx.keys[2]) and os.path.isfile(path) else None
        if embs is None:
            ctx.manifest.begin(2, ctx.keys[2])
            if isinstance(pipe.prompter.beautiful_prompt, BeautifulPrompt):
                # Sample with the run's seed, not a draw from the global RNG (which depends on what ran
                # before in this process): a recomputed prompt stage refines the prompt identically.
                pipe.prompter.beautiful_prompt.seed = int(ctx.config["pipeline"].get("seed", 0))
            # Both, always: whether denoising uses the negative one depends on cfg_scale, which is not in this stage's key.
            clip_skip = inputs.get("clip_skip", 1)
            embs = {"posi": pipe.prompter.encode_prompt(pipe.text_encoder, inputs["prompt"], clip_skip=clip_skip, device=pipe.device).cpu().contiguous(),
                    "nega": pipe.prompter.encode_prompt(pipe.text_encoder, inputs.get("negative_prompt", ""), clip_skip=clip_skip,
                                                        device=pipe.device, positive=False).cpu().contiguous()}
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_save_safetensors(embs, path)
            ctx.manifest.finish(2, ctx.keys[2])
        return embs


class InitialLatents(Stage):
    """Noise (or encode + noise) per frame, in ``latents/step_000``; skipped when denoising is done or resumes a later step."""

    id = 3

    def files(self, view):
        return ["latents/step_000"]

    def work(self, view):
        return {"VAE encodes": view.n} if view.inputs.get("denoising_strength", 1.0) < 1.0 else {"noise frames": view.n}

    def run(self, ctx):
        pipe, inputs, manifest, keys = ctx.load_models(), ctx.inputs, ctx.manifest, ctx.keys
        strength = inputs.get("denoising_strength", 1.0)
        pipe.use_sampler(inputs.get("sampler", "ddim"))
        pipe.scheduler.set_timesteps(inputs.get("num_inference_steps", 20), strength)
        ctx.num_steps = len(pipe.scheduler.timesteps)
        ctx.final_latents = tensor_store(os.path.join(ctx.out, "latents", f"step_{ctx.num_steps:03d}"), ctx.n)
        ctx.need_denoise = ctx.cluster.any(not manifest.is_done(4, keys[4]) or ctx.lacks(ctx.final_latents, "latents"))
        if ctx.need_denoise:
            ctx.progress.set_stage(3, self.name)
            if manifest.key_of(4) != keys[4]:
                ctx.current = 0
            elif ctx.local:  # the newest generation whose frames are all on some machine
                from ..distributed.transfer import frames_present

                present = [_held(ctx.out, g, ctx.n) for g in range(ctx.num_steps + 1)]
                ctx.current = max((g for g, whole in enumerate(frames_present(ctx.cluster, present, ctx.n)) if whole), default=0)
            else:
                ctx.current = current_generation(ctx.out, ctx.n, ctx.num_steps)
            if ctx.current == 0:
                manifest.begin(3, keys[3])
                generator = torch.Generator().manual_seed(int(ctx.config["pipeline"].get("seed", 0)))
                input_frames = ctx.source if strength < 1.0 else None
                ctx.latents = pipe.initial_latents(input_frames, ctx.n, ctx.width, ctx.height, strength, ctx.out, generator, ctx.progress,
                                                   frames=ctx.work("latents"))
                ctx.sync("initial latents")
                manifest.finish(3, keys[3], bytes=ctx.latents.nbytes())
            else:
                ctx.latents = tensor_store(os.path.join(ctx.out, "latents", f"step_{ctx.current:03d}"), ctx.n)
                if pipe.scheduler.needs_previous:
                    ctx.previous = tensor_store(os.path.join(ctx.out, previous_folder(ctx.current)), ctx.n)
                if ctx.local:  # this rank's frames of that generation, wherever the last run left them
                    ctx.fetch(ctx.latents, ctx.needed("latents"), image=False)
                    if ctx.previous is not None:
                        ctx.fetch(ctx.previous, ctx.needed("latents"), image=False)
                manifest.finish(3, keys[3], note="consumed by denoising")
        elif not manifest.is_done(3, keys[3]):
            manifest.finish(3, keys[3], note="consumed by denoising")
        ctx.progress.finish_stage(3)


class Denoising(Stage):
    """Every step over the sliding windows, one latent generation per step (``latents/step_<s>``), journalled per window."""

    id, deletes = 4, ("latents", "smoothed")

    def files(self, view):
        latents = view.path("latents")
        steps = sorted(f"latents/{d}" for d in (os.listdir(latents) if os.path.isdir(latents) else [])
                       if (d.startswith("step_") and d != "step_000") or d.startswith("previous_"))
        return steps + ["smoothed"]

    def weight(self, view):
        return view.denoise["steps"] * view.denoise["window_frames"]

    def work(self, view):
        """Every step's pass over the windows; a step smoothed inside the loop adds decode, smoother and encode of every frame."""
        steps, in_loop = view.denoise["steps"], len(view.denoise["in_loop"]) if view.smoother else 0
        one = denoise_pass(view.inputs, view.n, view.units)
        chain = merged(*smoother_work(view.config.get("smoother_configs"), view.n))
        passes = [key for key in chain if key in _FAST_PASSES]  # both passes run inside the step
        chain = merged({key: value for key, value in chain.items() if key not in passes}, {"FastBlend remaps": sum(chain[k] for k in passes)})
        smoothing = merged(chain, {"VAE decodes": view.n, "VAE encodes": view.n})
        return merged(*([one] * steps), *([smoothing] * in_loop))

    def partial_units(self, view, manifest):
        steps_done = manifest.data["stages"]["4"].get("steps_done", 0)
        return steps_done * self.weight(view) // max(view.denoise["steps"], 1)

    def run(self, ctx):
        if ctx.need_denoise:
            self._denoise(ctx)
        ctx.progress.finish_stage(4)

    @staticmethod
    def _denoise(ctx):
        pipe, inputs, out, n, manifest = ctx.pipe, ctx.inputs, ctx.out, ctx.n, ctx.manifest
        ctx.progress.set_stage(4, STAGE_NAMES[4])
        manifest.begin(4, ctx.keys[4])
        options = dict(cfg_scale=inputs.get("cfg_scale", 7.5), animatediff_batch_size=inputs.get("animatediff_batch_size", 16),
                       animatediff_stride=inputs.get("animatediff_stride", 8), unet_batch_size=inputs.get("unet_batch_size", 1),
                       controlnet_batch_size=inputs.get("controlnet_batch_size", 1), cross_frame_attention=inputs.get("cross_frame_attention", False),
                       vram_limit_level=inputs.get("vram_limit_level", 0), noise_seed=int(ctx.config["pipeline"].get("seed", 0)))
        multistep = pipe.scheduler.needs_previous
        smoother_ids = set(inputs.get("smoother_progress_ids", []))
        latents = ctx.latents
        shape = (4, ctx.height // 8, ctx.width // 8)  # a latent (read from no frame: a rank may keep only some)
        cluster = ctx.cluster
        if cluster.folder_leader:
            for g in range(ctx.current):  # what a kill between two steps left: older generations, journals of finished steps
                _remove_store(tensor_store(os.path.join(out, "latents", f"step_{g:03d}"), n))
                _remove_store(tensor_store(os.path.join(out, previous_folder(g)), n))
                WindowJournal(os.path.join(out, "latents", f"step_{g + 1:03d}_journal")).remove()
        ctx.sync("denoising")
        previous = ctx.previous
        for step in range(ctx.current, ctx.num_steps):
            nxt = tensor_store(os.path.join(out, "latents", f"step_{step + 1:03d}"), n, shape=shape, dtype=torch.float32)
            nxt_previous = tensor_store(os.path.join(out, previous_folder(step + 1)), n, shape=shape, dtype=torch.float32) if multistep else None
            journal = WindowJournal(os.path.join(out, "latents", f"step_{step + 1:03d}_journal"))
            if cluster.any(ctx.lacks(nxt, "latents")):
                if ctx.smoother is not None and step in smoother_ids:
                    smooth = (lambda decoded, result: smooth_frames(ctx, decoded, result)) if cluster.world > 1 else None
                    fetch = (lambda store, frames: ctx.fetch(store, frames, image=False)) if ctx.local else None
                    pipe._smoothed_step(step, latents, nxt, ctx.cond_stores, ctx.emb_posi, ctx.emb_nega, options, ctx.progress, ctx.smoother,
                                        ctx.source, out, shape, cluster=cluster, share=ctx.share, smooth=smooth, fetch=fetch,
                                        decode_share=ctx.work("decoded"), cover=ctx.needed("latents") if ctx.local else None,
                                        previous=previous, next_previous=nxt_previous)
                else:
                    pipe.denoise_step(step, latents, nxt, ctx.cond_stores, ctx.emb_posi, ctx.emb_nega, options, ctx.progress, journal=journal,
                                      cluster=cluster, frames=ctx.needed("latents") if ctx.local else None,
                                      previous=previous, next_previous=nxt_previous)
                if ctx.local:  # the next step's boundary frames that a neighbour stepped (after an in-loop smoothing)
                    ctx.fetch(nxt, ctx.needed("latents"), image=False)
                    if nxt_previous is not None:
                        ctx.fetch(nxt_previous, ctx.needed("latents"), image=False)
            ctx.sync(f"the end of step {step + 1}")  # every rank has written its frames of the step: the old generation can go
            if ctx.meter is not None:
                ctx.meter.sample()  # two generations on disk: the stage's fullest moment
            if cluster.folder_leader:
                journal.remove()  # denoise_step removes it too (one process), unless a kill came between the step's last commit and that
                _remove_store(latents)
                if previous is not None:
                    _remove_store(previous)
            latents, previous = nxt, nxt_previous
            manifest.update(4, steps_done=step + 1, steps=ctx.num_steps)
        if previous is not None and cluster.folder_leader:  # the last step's x0 predictions: no step follows
            _remove_store(previous)
        manifest.finish(4, ctx.keys[4], steps_done=ctx.num_steps, bytes=latents.nbytes())


class Decode(Stage):
    """The VAE decode in fp32: into ``frames/``, or ``latents/decoded`` when a smoother acts on the decoded frames."""

    id, deletes = 5, ("latents",)

    def files(self, view):
        return ["latents/decoded" if view.final_smoothing else "frames"]

    def work(self, view):
        return {"VAE decodes": view.n}

    def run(self, ctx):
        manifest, keys = ctx.manifest, ctx.keys
        ctx.progress.set_stage(5, self.name)
        ctx.final_smoothing = ctx.smoother is not None and smooths_final_frames(ctx.inputs)  # as the original: only when asked for
        frames = ctx.frames
        ctx.decoded = image_store(os.path.join(ctx.out, "latents", "decoded"), ctx.n, size=(ctx.width, ctx.height)) if ctx.final_smoothing else frames
        ctx.smoothed = ctx.final_smoothing and manifest.is_done(8, keys[8]) and not ctx.cluster.any(ctx.lacks(frames, "frames"))
        if not ctx.smoothed and ctx.cluster.any(not manifest.is_done(5, keys[5]) or ctx.lacks(ctx.decoded, "decoded")):
            manifest.begin(5, keys[5])
            if ctx.local:  # the smoother's halo beyond this rank's frames: their latents from the ranks that own them
                ctx.fetch(ctx.final_latents, ctx.needed("decoded"), image=False)
            ctx.pipe.decode(ctx.final_latents, ctx.decoded, ctx.progress, frames=ctx.work("decoded"))
            ctx.sync("VAE decode")
            manifest.finish(5, keys[5], bytes=ctx.decoded.nbytes())
        ctx.progress.finish_stage(5)


def _final_smoother_work(view: StageView) -> dict[int, dict[str, int]]:
    """Stages 6-8's work when the final frames are smoothed: the reporting FastBlend's passes in 6 and 7, the rest in 8."""
    if not view.final_smoothing:
        return {}
    configs = view.config.get("smoother_configs") or []
    by_stage: dict[int, dict[str, int]] = {6: {}, 7: {}, 8: {}}
    reported = False
    for entry, work in zip(configs, smoother_work(configs, view.n)):
        if not reported and reports_passes(entry):
            reported = True
            by_stage[6] = {"FastBlend remaps": work.get("FastBlend remaps (left pass)", 0)}
            by_stage[7] = {"FastBlend remaps": work.get("FastBlend remaps (right pass)", 0)}
        else:
            by_stage[8] = merged(by_stage[8], work)
    return by_stage


def pass_folders(direct: bool) -> dict[int, str]:
    """Where stages 6-7's files are, relative to the output folder (the right pass's are the merged frames)."""
    return {6: "smoother/left", 7: "frames" if direct else "smoother/blended"}


class SmootherLeft(Stage):
    """FastBlend's left pass; this stage runs the whole final smoothing (stages 6-8 are one smoother call)."""

    id, deletes = 6, ("smoother",)

    def files(self, view):
        return [pass_folders(view.direct)[6]]

    def work(self, view):
        """The chain's first fast-mode FastBlend's left pass (stage 7 its right pass; stage 8 everything else)."""
        return _final_smoother_work(view).get(6, {})

    def partial_units(self, view, manifest):
        return count_frame_files(view.path(pass_folders(view.direct)[self.id]))

    def run(self, ctx):
        if ctx.final_smoothing:
            if not ctx.smoothed:
                if ctx.cluster.world == 1 or splits(ctx):
                    smooth(ctx)
                elif ctx.local:
                    raise ClusterError("this smoother chain cannot be split across processes, and without a shared folder no "
                                       "process has every frame: render it with a shared output folder, or on one process")
                else:  # a smoother that cannot be split runs on rank 0 while the others wait
                    if ctx.cluster.rank == 0:
                        smooth(ctx)
                    ctx.sync("the smoother (on rank 0)")
        else:
            for sid in (6, 7, 8):
                ctx.manifest.finish(sid, ctx.keys[sid], skipped="no smoother" if ctx.smoother is None else "the smoother runs only inside the denoising loop")
                ctx.progress.finish_stage(sid)


class SmootherRight(SmootherLeft):
    """FastBlend's right pass, merging each frame as soon as it is ready (into ``frames/`` when FastBlend is the whole chain)."""

    id, deletes = 7, ("smoother",)

    def files(self, view):
        return [pass_folders(view.direct)[7]] if view.passes and view.final_smoothing else []

    def work(self, view):
        return _final_smoother_work(view).get(7, {})

    def run(self, ctx):
        """Ran inside stage 6's smoother call."""


class SmootherOutput(Stage):
    """The smoothed frames written into ``frames/`` (through processors chained after FastBlend); then the smoother's files go."""

    id, deletes = 8, ("smoother", "frames")

    def files(self, view):
        smoother = view.path("smoother")
        own = ("left", "blended") if view.passes else ("left",)
        other = [f"smoother/{d}" for d in (sorted(os.listdir(smoother)) if os.path.isdir(smoother) else [])
                 if d not in own and os.path.isdir(os.path.join(smoother, d))]
        return other + (["frames"] if view.final_smoothing and not (view.direct and view.passes) else [])

    def work(self, view):
        return _final_smoother_work(view).get(8, {})

    def run(self, ctx):
        for sid in (6, 7, 8):
            ctx.progress.finish_stage(sid)
        if ctx.local:  # rank 0's folder gets every final frame, a few at a time
            ctx.fetch(ctx.frames, ctx.needed("frames"), image=True)
        ctx.sync("the smoother output")
        if ctx.meter is not None:
            ctx.meter.sample()  # before the unsmoothed frames and the smoother's files go
        if not ctx.cluster.folder_leader:
            return
        if ctx.final_smoothing and not ctx.keep:  # the smoothed frames are in frames/: the unsmoothed ones are no longer needed
            _remove_store(ctx.decoded)
        if not ctx.keep and ctx.owns_cache and os.path.isdir(os.path.join(ctx.out, "smoother")):
            shutil.rmtree(os.path.join(ctx.out, "smoother"))  # FastBlend's cache: its results are in frames/ (or the latents)


def _video_name(view: StageView) -> str | None:
    """The finished video's file name by the view's ``data.output`` (None: PNG frames only); the default name if the options are wrong."""
    from ..data.output import OutputOptions, output_problems

    options = (view.config.get("data") or {}).get("output")
    return "video.mp4" if output_problems(options) else OutputOptions.from_config(options).file_name


class VideoEncode(Stage):
    """The finished video (``data.output``: codec, quality; the source's exact frame rate unless ``data.fps``; its audio)."""

    id, deletes = 9, VIDEO_FILE_NAMES

    def files(self, view):
        name = _video_name(view)
        return [name] if name else []

    def work(self, view):
        return {"frames encoded": view.n} if _video_name(view) else {}

    def run(self, ctx):
        if ctx.cluster.rank != 0:  # the video is encoded once, by rank 0
            return
        ctx.progress.set_stage(9, self.name)
        output = ctx.plan["output"]
        if output.file_name is None:
            if not ctx.manifest.is_done(9, ctx.keys[9]):
                ctx.manifest.begin(9, ctx.keys[9])
                ctx.manifest.finish(9, ctx.keys[9], bytes=0, note="PNG frames only (data.output.codec png): frames/ is the result")
            ctx.progress.finish_stage(9)
            return
        video_path = os.path.join(ctx.out, output.file_name)
        if not (ctx.manifest.is_done(9, ctx.keys[9]) and os.path.isfile(video_path)):
            ctx.manifest.begin(9, ctx.keys[9])
            _remove_temp_files(ctx.out, output.file_name)
            audio = ctx.plan["audio"]
            save_video(VideoFrames(ctx.frames), video_path, fps=ctx.plan["fps"], output=output, audio=audio,
                       progress_bar_cmd=ctx.progress.each)
            note = f"{rate_text(ctx.plan['fps'])}, {output.codec}, " + (audio.note if audio is not None else "no audio")
            ctx.manifest.finish(9, ctx.keys[9], bytes=os.path.getsize(video_path), note=note)
        ctx.progress.finish_stage(9)


STAGE_TABLE: tuple[Stage, ...] = (SourceFrames(), Annotations(), PromptEmbeddings(), InitialLatents(), Denoising(), Decode(),
                                  SmootherLeft(), SmootherRight(), SmootherOutput(), VideoEncode())
assert [stage.id for stage in STAGE_TABLE] == sorted(STAGE_NAMES)


# ---------------------------------------------------------------------- one run


class RunContext:
    """What the stages of one run share: the plan, manifest, keys and progress, the stores, and the models once loaded."""

    def __init__(self, runner, plan: dict, manifest: Manifest, keys: dict[int, str], progress, cluster: Cluster | None = None, meter=None):
        self.runner, self.plan, self.manifest, self.keys, self.progress = runner, plan, manifest, keys, progress
        self.meter = meter  # the run's measurements (estimate.meter.Meter), or None
        self.cluster = cluster if cluster is not None else Cluster.solo()
        self.config = plan["config"]
        self.inputs = self.config["pipeline"]["pipeline_inputs"]
        self.out = self.config["data"]["output_folder"]
        self.n, self.width, self.height = plan["num_frames"], plan["width"], plan["height"]
        # Several processes: this rank's frames (see distributed.Layout). In a shared folder it computes its share
        # of each per-frame stage; with a folder of its own (local) it keeps every frame it reads: its windows'
        # frames, and its share plus the smoother's halo for the decode and the smoothing.
        cluster = self.cluster
        windows = sliding_windows(self.n, self.inputs.get("animatediff_batch_size", 16), self.inputs.get("animatediff_stride", 8))
        self.layout = Layout.of(self.n, windows, cluster.world)
        self.local = cluster.world > 1 and not cluster.shared_folder
        self.share = rank_share(self.layout, cluster.rank, cluster.world, cluster.shared_folder) if cluster.world > 1 else None
        self._needed: dict[str, range] = {}
        if self.local:
            owned, cover = self.share, self.layout.cover(cluster.rank)
            halo = smoother_halo(self.config.get("smoother_configs"))
            decoded = range(max(owned.start - halo, 0), min(owned.stop + halo, self.n)) if owned else range(0)
            reach = range(min(cover.start, decoded.start), max(cover.stop, decoded.stop)) if owned else range(0)
            self._needed = {"source": reach, "latents": cover, "decoded": decoded,
                            "frames": range(self.n) if cluster.rank == 0 else owned}
        self.keep = self.config["data"].get("keep_intermediates", False)
        self.source = image_store(os.path.join(self.out, "source_images"), self.n, size=(self.width, self.height))
        self.frames = image_store(os.path.join(self.out, "frames"), self.n, size=(self.width, self.height))
        self.pipe = self.model_manager = self.smoother = None
        self.smoother_stages = SmootherStages()
        self.owns_cache = False
        self.cond_stores: list = []
        self.emb_posi = self.emb_nega = None
        self.latents = self.final_latents = self.decoded = None
        self.previous = None  # a multistep sampler's x0 predictions of the generation denoising resumes from
        self.num_steps, self.current, self.need_denoise = 0, 0, False
        self.final_smoothing = self.smoothed = False

    def needed(self, kind: str) -> range:
        """The frames of ``kind`` (source, latents, decoded, frames) this rank must have in its folder: all, unless local."""
        return self._needed.get(kind, range(self.n))

    def work(self, kind: str) -> range | None:
        """The frames of ``kind`` this rank computes: its share (shared folder), what it needs (local), all (None: one process)."""
        if self.local:
            return self.share if kind == "frames" else self.needed(kind)
        return self.share

    def lacks(self, store, kind: str) -> bool:
        """Whether ``store`` lacks a frame this rank needs (every rank answers for its own folder)."""
        needed = self.needed(kind)
        return any(i in needed for i in store.missing())

    def fetch(self, store, frames, image: bool) -> None:
        """Folders local to each machine: copy into ``store`` the ``frames`` it lacks from ranks that have them (collective)."""
        from ..distributed.transfer import fill

        shape = (self.height, self.width, 3) if image else (4, self.height // 8, self.width // 8)
        fill(self.cluster, store, frames, shape=shape, dtype=torch.uint8 if image else torch.float32, image=image)

    def sync(self, what: str) -> None:
        """Meet the other ranks (every one has finished ``what``), then take rank 0's manifest."""
        self.cluster.barrier(what)
        self.sync_manifest()

    def sync_manifest(self) -> None:
        """Rank 0 writes the manifest; the others adopt its record (so every rank decides the same; another folder's first rank saves it there)."""
        if self.cluster.world > 1:
            self.manifest.data = self.cluster.broadcast(self.manifest.data)
            if self.cluster.rank != 0:
                self.manifest.save()  # a no-op unless this rank keeps a folder of its own

    def load_models(self):
        """The pipeline (and the smoother chain), loaded on first use: after stage 0, which needs none."""
        if self.pipe is None:
            self.pipe, self.model_manager = self.runner._load_pipeline(self.config)
            self.smoother, self.owns_cache = self.runner._load_smoother(self.config, self.model_manager, self.smoother_stages)
        return self.pipe


def current_generation(out: str, n: int, num_steps: int) -> int:
    """The newest complete latent generation on disk (0 if none)."""
    return next((g for g in range(num_steps, -1, -1) if len(_held(out, g, n)) == n), 0)


def _held(out: str, generation: int, n: int) -> list[int]:
    """The frames latent generation ``generation`` holds on disk (none when its folder does not exist: it is not created)."""
    folder = os.path.join(out, "latents", f"step_{generation:03d}")
    if not os.path.isdir(folder):
        return []
    missing = set(tensor_store(folder, n).missing())
    return [i for i in range(n) if i not in missing]


def smoother_halo(configs) -> int:
    """Frames on each side of a share that the smoother chain reads: each FastBlend's window, one per RIFE pass."""
    halo = 0
    for entry in configs or []:
        kind = entry.get("processor_type") if isinstance(entry, dict) else None
        options = (entry.get("config") or {}) if isinstance(entry, dict) else {}
        if kind == "FastBlend":
            halo += int(options.get("window_size", DEFAULT_WINDOW_SIZE))
        elif kind == "RIFE":
            halo += 1
    return halo


# ---------------------------------------------------------------------- the smoother's stages


class SmootherStages:
    """Turns the final smoothing into stages 6-8: FastBlend's pass events begin and finish stages 6-7.

    Installed as the ``progress_callback`` of the chain's first fast-mode FastBlend. Its
    events count only while :meth:`activate` is in effect (the final smoothing); inside
    the denoising loop the same smoother's work belongs to stage 4. FastBlend works through a
    long video in blocks (``block_frames``): stage 7 begins with the first block's right pass,
    and the later blocks' left passes still count as stage 6's work.
    """

    def __init__(self):
        self.target = None
        self.meter = None
        self.installed = False  # set by _load_smoother when a fast-mode FastBlend reports here
        self.direct = None  # set by _load_smoother: the chain's only processor, a FastBlend writing into frames/
        self.folders: dict[int, str] = {}
        self.current: int | None = None
        self.counted: dict[int, int] = {}

    def activate(self, manifest: Manifest, keys: dict[int, str], progress, out: str, folders: dict[int, str], meter=None) -> None:
        self.target = (manifest, keys, progress, out)
        self.meter = meter
        self.folders = folders
        self.current = None
        self.counted = {}

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
            if self.meter is not None:
                self.meter.switch(stage_id)
            if not manifest.is_done(stage_id, keys[stage_id]):
                manifest.begin(stage_id, keys[stage_id])
            progress.set_stage(stage_id, STAGE_NAMES[stage_id])

    def __call__(self, event: ProgressEvent) -> None:
        stage_id = _FASTBLEND_STAGES.get(event.stage)
        if self.target is None or stage_id is None:
            return
        if self.current is None or stage_id > self.current:
            self.enter(stage_id)
        if event.done == 0:
            self.counted[stage_id] = 0  # a pass announces itself with done=0
            return
        progress = self.target[2]  # a later block's left pass counts into stage 6 while stage 7 is the current one
        progress.advance_in(stage_id, event.done - self.counted.get(stage_id, 0))
        self.counted[stage_id] = event.done


def smooth(ctx: RunContext) -> None:
    """Stages 6-8 on the decoded frames, into ``frames/``.

    With a fast-mode FastBlend in the chain its pass events move stages 6 and 7 along
    (:class:`SmootherStages`); a pass already complete on disk reports nothing, and
    the next pass's first event (or the end) finishes it. Stage 8 writes the result
    (through any processors chained after FastBlend) into ``frames/``, one unit per
    frame. Without a fast-mode FastBlend, stages 6 and 7 finish at once and all the
    smoothing is stage 8. A chain of FastBlend alone writes ``frames/`` itself (fast mode:
    its right pass merges each frame straight into it), so no second copy of the frames
    is ever on disk and stage 8 has nothing left to write.
    """
    stages, manifest, keys, progress, frames = ctx.smoother_stages, ctx.manifest, ctx.keys, ctx.progress, ctx.frames

    def smooth_into_frames():
        if ctx.cluster.world > 1:  # each rank its share (the caller checked splits())
            smooth_across(ctx, ctx.decoded, frames, progress_each=lambda todo: progress.each(todo))
            return None
        if stages.direct is not None:  # FastBlend alone writes frames/ itself: no second copy in smoother/blended
            stages.direct.smooth(ctx.source, VideoFrames(ctx.decoded), result_folder=frames.folder)
            return None
        return ctx.smoother(VideoFrames(ctx.decoded), original_frames=ctx.source)

    if stages.installed:
        stages.activate(manifest, keys, progress, ctx.out, pass_folders(stages.direct is not None), ctx.meter)
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
        if ctx.meter is not None:
            ctx.meter.switch(8)
        manifest.begin(8, keys[8])
        result = smooth_into_frames()
        if result is not None:
            _put_all(frames, progress.each(result))
    if stages.installed and stages.direct is not None:  # frames/ is stage 7's: do not count it twice
        manifest.finish(8, keys[8], bytes=0, note="FastBlend merged every frame into frames/ in stage 7")
    else:
        manifest.finish(8, keys[8], bytes=frames.nbytes())


def splits(ctx: RunContext) -> bool:
    """Whether the smoother chain can be split across ranks exactly (every chain the runner builds, in practice).

    A FastBlend in a mode where a frame depends only on the frames of its window (fast,
    balanced, accurate) smooths each rank's share, reading its window of frames more on each
    side (:meth:`FastBlendSmoother.smooth` with a span); the other processors (RIFE, Contrast,
    Sharpness) are lazy sequences that compute a frame from its neighbours on demand, so each
    rank asks only for its share. Either way every frame is the one a single process computes.
    Anything else runs whole on rank 0 while the others wait.
    """
    processors = getattr(ctx.smoother, "processors", None)
    if not processors:
        return False
    return all(p.inference_mode in p.SPAN_MODES for p in processors if _is_fastblend(p))


def _is_fastblend(processor) -> bool:
    return hasattr(processor, "SPAN_MODES") and hasattr(processor, "inference_mode")


def smooth_frames(ctx: RunContext, decoded, result) -> None:
    """Smooth the ``decoded`` store into the ``result`` store on every rank (the in-loop smoother of a run on several processes)."""
    if splits(ctx):
        smooth_across(ctx, decoded, result)
        return
    if ctx.cluster.rank == 0:
        _put_all(result, ctx.smoother(VideoFrames(decoded), original_frames=ctx.source))
    ctx.cluster.barrier("the smoother (on rank 0)")


def smooth_across(ctx: RunContext, style, result, progress_each=None) -> None:
    """The smoother chain over ``style``, each rank writing its share of frames into the ``result`` store (see :func:`splits`).

    A FastBlend writes its spans into its cache (or straight into ``result`` when it ends the
    chain) and the ranks meet before the next processor reads the frames around their share.
    """
    frames = style
    processors = ctx.smoother.processors
    for k, processor in enumerate(processors):
        if _is_fastblend(processor):
            last = k == len(processors) - 1
            frames = _smooth_spans(ctx, processor, frames, result.folder if last else None)
            if ctx.local and not last:  # the next processor reads the frames around this rank's share
                ctx.fetch(frames.store, ctx.needed("decoded"), image=True)
        else:
            frames = processor(frames, original_frames=ctx.source)
    if not (processors and _is_fastblend(processors[-1])):
        todo = _within(result.missing(), ctx.share)
        with WriteBehind(result) as writer:
            for i in (progress_each or (lambda items: items))(todo):
                writer.put(i, frames[i])
    ctx.cluster.barrier("the smoother")


def _smooth_spans(ctx: RunContext, fastblend, style, result_folder: str | None):
    """FastBlend over this rank's share of the frames; the partials are removed after.

    Before, in a shared folder rank 0 checks the cache's key (emptying a stale cache); with
    folders local to each machine, where no process has every frame to compute it, each
    folder's first rank empties the cache instead (a resumed smoothing then starts afresh).
    Returns the result frames (all of them, once every rank is through): ``result_folder``, or
    FastBlend's own ``smoother/blended`` when it is None.
    """
    cluster = ctx.cluster
    if not ctx.local and cluster.rank == 0:
        fastblend.prepare(ctx.source, style, result_folder)
    elif ctx.local and cluster.folder_leader:  # no process has every frame to check the cache's key: start it afresh
        fastblend.release_partials(ctx.n, (ctx.width, ctx.height), everything=True)
    cluster.barrier("the smoother's cache check")
    result = fastblend.smooth(ctx.source, style, result_folder=result_folder, span=(ctx.share.start, ctx.share.stop))
    cluster.barrier("the smoother")
    if cluster.folder_leader:
        fastblend.release_partials(ctx.n, (ctx.width, ctx.height))
    return result


# ---------------------------------------------------------------------- small helpers


def _remove_temp_files(folder: str, name: str) -> None:
    """Remove the temporary files of ``name`` that a killed run left in ``folder``.

    A killed video encode leaves the most: its ffmpeg keeps running until its input
    pipe closes and completes a partial video under the temporary name.
    """
    for entry in os.listdir(folder):
        if is_temp_name(entry) and entry.startswith(f".{name}."):
            os.remove(os.path.join(folder, entry))


def _load_embeddings(path: str) -> dict[str, Any] | None:
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
