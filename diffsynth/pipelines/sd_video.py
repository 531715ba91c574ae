"""``SDVideoPipeline``: text-to-video and video-to-video that stream through per-frame stores.

Same parameters and semantics as DiffSynth-Studio's video pipeline (AnimateDiff
sliding windows with a triangular weighted average, ControlNet units, a smoother
inside the denoising loop), but no per-frame list ever lives in RAM: control
images, latents of every denoising step and decoded frames are per-frame stores
(files under ``output_folder`` by default), and each step streams over windows,
keeping only the frames a later window still covers.

Output folder layout (see DESIGN.md §3)::

    controlnet_caches/<unit>/   annotated control images (PNG)
    latents/step_<s>/           latents after s denoising steps (one .npy per frame)
    latents/decoded/            decoded frames before a final smoother (PNG)
    smoothed/step_<s>/          frames smoothed inside the loop at step s (PNG)
    frames/                     the result (PNG), returned as a lazy sequence

A step's latents are deleted once the next step's are complete.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from ..cache import Prefetcher, StoreFrames, WriteBehind, as_store, image_store, tensor_store
from ..controlnets import ControlNetConfigUnit, MultiControlNetManager
from ..models.model_manager import ModelManager
from ..progress import ProgressCallback, ProgressEvent, wrap_progress_bar
from ..prompts import SDPrompter
from ..schedulers import EnhancedDDIMScheduler
from ..schedulers.base import frame_step_noise, make_sampler
from .sd_image import LATENT_FACTOR, build_controlnet_manager, check_size, preprocess_image, tensor_to_images

logger = logging.getLogger("diffsynth")


@dataclass(frozen=True)
class Window:
    """Frames ``[start, end)`` denoised together, and the triangular weight of each."""

    start: int
    end: int

    def weight(self, i: int) -> float:
        """The original's weight: ``max(1 - |i - c| / half, 0.01)``, peaking at the window centre."""
        centre = (self.start + self.end - 1) / 2
        half = (self.end - self.start - 1 + 0.01) / 2
        return max(1 - abs(i - centre) / half, 0.01)


def sliding_windows(num_frames: int, batch_size: int, stride: int) -> list[Window]:
    """``[s, min(s + batch, N))`` for ``s = 0, stride, ...``, stopping at the window that reaches the end."""
    if batch_size < 1 or stride < 1:
        raise ValueError(f"animatediff_batch_size and animatediff_stride must be >= 1, got {batch_size} and {stride}")
    windows = []
    for start in range(0, num_frames, stride):
        end = min(start + batch_size, num_frames)
        windows.append(Window(start, end))
        if end == num_frames:
            break
    return windows


class RunningMean:
    """The original's running weighted mean ``acc ← acc·W/(W+w) + x·w/(W+w)``, for open frames only."""

    def __init__(self):
        self.value: dict[int, torch.Tensor] = {}
        self.weight: dict[int, float] = {}

    def add(self, i: int, x: torch.Tensor, w: float) -> None:
        if i not in self.value:
            self.value[i] = torch.zeros_like(x)
            self.weight[i] = 0.0
        total = self.weight[i]
        self.value[i] = self.value[i] * (total / (total + w)) + x * (w / (total + w))
        self.weight[i] = total + w

    def pop(self, i: int) -> torch.Tensor:
        self.weight.pop(i)
        return self.value.pop(i)

    def __len__(self) -> int:
        return len(self.value)


class WindowJournal:
    """The noise predictions of each finished window of one denoising step: ``contrib_<k>.safetensors`` per window ``k``.

    A window's file holds ε_pos (and ε_neg) of every frame it covers. It is committed
    atomically before any frame the window finishes is written, and deleted once every frame
    it covers is committed (the folder goes at the end of the step). A rerun loads a window's
    file instead of running the UNet again, so a kill loses at most the window being computed.
    Files are keyed by window, never by process: a rerun with any number of processes reuses
    every one (the running means are refolded from them in window order, so the numbers are
    the same). Files of the first format (``window_<k>``: the running means after window ``k``)
    are ignored.
    """

    FORMAT = "window-contributions-v1"

    def __init__(self, folder: str):
        self.folder = folder

    def path(self, k: int) -> str:
        return os.path.join(self.folder, f"contrib_{k:06d}.safetensors")

    def load(self, k: int, window: "Window", with_negative: bool) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]] | None:
        """Window ``k``'s predictions ``{frame: (ε_pos, ε_neg or None)}``, or None when it has no usable file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        path = self.path(k)
        if not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(path)
            if meta.get("format") != self.FORMAT or (int(meta["start"]), int(meta["end"])) != (window.start, window.end):
                raise ValueError(f"it holds {meta.get('format')} for frames {meta.get('start')}-{meta.get('end')}, "
                                 f"not window {k} = frames {window.start}-{window.end}")
            frames = range(window.start, window.end)
            result = {i: (tensors[f"posi.{i}"], tensors[f"nega.{i}"] if with_negative else None) for i in frames}
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            logger.warning("ignoring unusable denoising journal %s (%s); recomputing that window", path, exc)
            self.discard(k)
            return None
        return result

    def commit(self, k: int, window: "Window", contributions: dict[int, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        from ..utils.atomic import atomic_save_safetensors

        os.makedirs(self.folder, exist_ok=True)
        tensors = {}
        for i, (pos, neg) in contributions.items():
            tensors[f"posi.{i}"] = pos.contiguous()
            if neg is not None:
                tensors[f"nega.{i}"] = neg.contiguous()
        atomic_save_safetensors(tensors, self.path(k), metadata={"format": self.FORMAT, "start": str(window.start), "end": str(window.end)})

    def discard(self, k: int) -> None:
        try:
            os.remove(self.path(k))
        except FileNotFoundError:
            pass  # never written, or discarded already: either way it is gone

    def remove(self) -> None:
        if os.path.isdir(self.folder):
            shutil.rmtree(self.folder)


def previous_folder(generation: int) -> str:
    """Where a multistep sampler keeps, for latent generation ``generation``, each frame's x0 prediction of the step before
    (relative to the output folder, beside ``latents/step_<g>``)."""
    return os.path.join("latents", f"previous_{generation:03d}")


VideoFrames = StoreFrames  # the video pipeline's result: a lazy frame sequence backed by output_folder/frames


class SDVideoPipeline:
    """Video pipeline over an SD 1.x model set, optional AnimateDiff motion modules and ControlNet units."""

    def __init__(self, device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32, use_animatediff: bool = True):
        self.device = torch.device(device)
        self.torch_dtype = torch_dtype
        self.use_animatediff = use_animatediff
        self.scheduler = EnhancedDDIMScheduler(beta_schedule="linear" if use_animatediff else "scaled_linear")
        self.prompter = SDPrompter()
        self.text_encoder = self.unet = self.vae_encoder = self.vae_decoder = None
        self.vae_decoder_fp32 = None
        self.motion_modules = None
        self.controlnet: MultiControlNetManager | None = None

    def use_sampler(self, name: str) -> None:
        """Sample with ``name`` (``diffsynth.schedulers``) from now on, over this pipeline's noise schedule (AnimateDiff's linear one)."""
        if getattr(self.scheduler, "name", None) != name:
            self.scheduler = make_sampler(name, beta_schedule=self.scheduler.beta_schedule)

    @staticmethod
    def from_model_manager(
        model_manager: ModelManager, controlnet_config_units: Sequence[ControlNetConfigUnit] = (), annotator_folder: str = "models/Annotators"
    ) -> "SDVideoPipeline":
        pipe = SDVideoPipeline(model_manager.device, model_manager.torch_dtype, use_animatediff=model_manager.has("motion_modules"))
        from .sd_image import SDImagePipeline

        image_pipe = SDImagePipeline(model_manager.device, model_manager.torch_dtype)
        image_pipe.fetch_main_models(model_manager)
        image_pipe.fetch_prompter(model_manager)
        pipe.prompter = image_pipe.prompter
        pipe.text_encoder, pipe.unet = image_pipe.text_encoder, image_pipe.unet
        pipe.vae_encoder, pipe.vae_decoder = image_pipe.vae_encoder, image_pipe.vae_decoder
        # Video frames are decoded in fp32: fp16 decoding turned frames black (the seed edition's fix).
        pipe.vae_decoder_fp32 = pipe.vae_decoder if pipe.vae_decoder.dtype == torch.float32 else copy.deepcopy(pipe.vae_decoder).float()
        pipe.motion_modules = model_manager.model.get("motion_modules")
        pipe.controlnet = build_controlnet_manager(model_manager, controlnet_config_units, annotator_folder)
        return pipe

    # ------------------------------------------------------------------ stages
    def _stores(self, root: str | None, name: str):
        return None if root is None else os.path.join(root, name)

    def annotate(self, controlnet_frames, num_frames: int, width: int, height: int, root: str | None, progress, frames: range | None = None) -> list:
        """Stage: each unit's annotation of each frame (of ``frames``: this process's share), into ``controlnet_caches/<k>/``.

        Skips frames already there."""
        units = self.controlnet.units
        if len(controlnet_frames) == num_frames and not _is_list_of_sequences(controlnet_frames, len(units)):
            sources = [as_store(controlnet_frames)] * len(units)  # a flat list: every unit annotates the same frames
        else:
            if len(controlnet_frames) != len(units):
                raise ValueError(f"controlnet_frames holds {len(controlnet_frames)} frame lists but there are {len(units)} ControlNet units")
            sources = [as_store(frames) for frames in controlnet_frames]
        stores = []
        for k, (unit, source) in enumerate(zip(units, sources)):
            if len(source) < num_frames:
                raise ValueError(f"ControlNet unit {k} ({unit.processor.processor_id}) has {len(source)} frames, need {num_frames}")
            store = image_store(self._stores(root, os.path.join("controlnet_caches", str(k))), num_frames, size=(width, height))
            todo = _within(store.missing(), frames)
            with WriteBehind(store) as writer:
                for i, frame in Prefetcher(source, todo):
                    writer.put(i, unit.processor(_fit_frame(frame, width, height, f"controlnet frame {i}")))
                    progress("annotate", 1, len(todo) * len(units))
            stores.append(store)
        return stores

    def initial_latents(self, input_frames, num_frames, width, height, denoising_strength, root, generator, progress, frames: range | None = None):
        """Stage: noise (shared by all frames without motion modules, as the original), or encoded frames plus noise.

        ``frames``: only these (this process's share); the noise of frame ``i`` is still the
        ``i``-th draw of ``generator``, so any share gives the same latents.
        """
        shape = (1, 4, height // LATENT_FACTOR, width // LATENT_FACTOR)
        store = tensor_store(self._stores(root, os.path.join("latents", "step_000")), num_frames, shape=shape[1:], dtype=torch.float32)
        todo = set(_within(store.missing(), frames))
        if not todo:
            return store
        img2img = input_frames is not None and denoising_strength < 1.0
        source = as_store(input_frames) if img2img else None
        shared = None if self.motion_modules is not None else torch.randn(shape, generator=generator)
        t0 = self.scheduler.timesteps[0]
        with WriteBehind(store) as writer:
            for i in range(max(todo) + 1):
                # one draw per frame from one stream: equals the original's batched randn((N,4,h,w)) on CPU
                noise = shared if shared is not None else torch.randn(shape, generator=generator)
                if i not in todo:
                    continue
                if img2img:
                    frame = _fit_frame(source[i], width, height, f"input frame {i}")
                    x = preprocess_image(frame).to(self.device, self.vae_encoder.dtype)
                    latent = self.vae_encoder(x).float().cpu()
                    latent = self.scheduler.add_noise(latent, noise, t0)
                else:
                    latent = noise
                writer.put(i, latent[0])
                progress("initial latents", 1, num_frames)
        return store

    def _window_noise(self, latents, t, emb_posi, emb_nega, cond, cfg_scale, unet_batch_size, controlnet_batch_size, cross_frame_attention, vram_limit_level):
        """(ε_pos, ε_neg) of one window (ε_neg None when cfg_scale == 1)."""
        frames = latents.shape[0]
        motion = self.motion_modules  # SDMotionModel is the UNet's motion(block_id, h) callable

        def run(emb):
            emb = emb.expand(frames, -1, -1)
            down = mid = None
            if cond is not None:
                down, mid = self.controlnet(latents, t, emb, cond, batch_size=controlnet_batch_size)
            return self.unet(
                latents, t, emb, down_residuals=down, mid_residual=mid, motion=motion,
                frame_chunk=unet_batch_size, cross_frame_attention=cross_frame_attention, offload_skips=vram_limit_level >= 1,
            ).float()

        return run(emb_posi), (run(emb_nega) if emb_nega is not None else None)

    def denoise_step(self, step, src, dst, cond_stores, emb_posi, emb_nega, options, progress, x0_store=None, journal=None, cluster=None,
                     frames: range | None = None, previous=None, next_previous=None):
        """One timestep over the frames missing from ``dst`` (or ``x0_store``), window by window.

        A frame's noise prediction is the running weighted mean (:class:`RunningMean`) of its
        windows' predictions, folded in window order; a frame is stepped and written once its
        last window is in. Only windows covering a missing frame run. With a ``journal`` (a
        :class:`WindowJournal`) each window's predictions are committed before the frames it
        finishes, so a rerun continues after the last committed window.

        Several processes (``cluster``, a :class:`~diffsynth.distributed.Cluster`): each runs
        its contiguous run of windows (:func:`~diffsynth.distributed.window_owners`). A frame
        covered by windows of several ranks (a boundary frame) is folded by each of them from
        all the predictions: each sends the others its own (only boundary frames' data crosses
        ranks, in one exchange per step), and every holder folds them in window order, so the
        mean is bit for bit one process's. In a shared folder the rank of the frame's last
        window writes it; in a folder of its own (``frames``: the frames this rank's windows
        cover, the only ones it looks for there) every rank holding a frame writes it. The caller
        meets the other ranks at a barrier after this returns.

        A multistep sampler reads each frame's previous x0 prediction from ``previous`` (the store
        kept with ``src``) and writes the new one into ``next_previous`` (kept with ``dst``) before
        the frame's latent; a stochastic one draws its noise per frame and step
        (:meth:`advance`).
        """
        from ..distributed import Cluster, window_owners

        cluster = cluster if cluster is not None else Cluster.solo()
        t = self.scheduler.timesteps[step]
        t_dev = t.to(self.device)
        target = x0_store if x0_store is not None else dst
        missing = target.missing()
        if cluster.world > 1:  # what is missing anywhere, as every rank sees it: listed before any rank writes (a collective)
            missing = sorted({i for found in cluster.all_gather([i for i in missing if frames is None or i in frames]) for i in found})
        if not missing:
            return
        windows = sliding_windows(len(src), options["animatediff_batch_size"], options["animatediff_stride"])
        owners = window_owners([w.end - w.start for w in windows], cluster.world)
        cover: dict[int, list[int]] = {i: [] for i in missing}  # missing frame -> the windows covering it, in order
        for k, window in enumerate(windows):
            for i in range(window.start, window.end):
                if i in cover:
                    cover[i].append(k)
        holders = {i: sorted({owners[k] for k in ks}) for i, ks in cover.items() if ks}
        me = cluster.rank
        mine = {i for i, ranks in holders.items() if me in ranks}  # frames this rank folds
        boundary = {i for i in mine if len(holders[i]) > 1}
        my_windows = sorted({k for i in mine for k in cover[i] if owners[k] == me})
        unclosed = {k: sum(1 for i in range(windows[k].start, windows[k].end) if i in mine) for k in my_windows}
        with_negative = emb_nega is not None
        posi, nega = RunningMean(), RunningMean()
        held: dict[int, list[tuple[int, torch.Tensor, torch.Tensor | None]]] = {i: [] for i in boundary}
        # latents and control images of the frames a window still covers: read once per step
        open_latents: dict[int, torch.Tensor] = {}
        open_cond: dict[int, torch.Tensor] = {}

        def stepped(i: int, eps: torch.Tensor, neg: torch.Tensor | None) -> torch.Tensor:
            if neg is not None:
                eps = neg + options["cfg_scale"] * (eps - neg)
            latent = open_latents.pop(i) if i in open_latents else src[i]
            open_cond.pop(i, None)
            if x0_store is not None:
                return self.scheduler.step(eps, t, latent, to_final=True)
            return self.advance(i, step, eps, latent, options, previous, next_previous)

        with WriteBehind(target) as writer:
            for position, k in enumerate(my_windows):
                window = windows[k]
                frames = range(window.start, window.end)
                contributions = journal.load(k, window, with_negative) if journal is not None else None
                if contributions is None:
                    for i in frames:
                        if i not in open_latents:
                            open_latents[i] = src[i]
                            if cond_stores:
                                open_cond[i] = torch.stack([_image_to_uint8(store[i]) for store in cond_stores])
                    x = torch.stack([open_latents[i] for i in frames]).to(self.device, self.torch_dtype)
                    cond = torch.stack([open_cond[i] for i in frames], dim=1) if cond_stores else None
                    e_pos, e_neg = self._window_noise(x, t_dev, emb_posi, emb_nega, cond, options["cfg_scale"], options["unet_batch_size"],
                                                      options["controlnet_batch_size"], options["cross_frame_attention"], options["vram_limit_level"])
                    contributions = {i: (e_pos[j].cpu(), e_neg[j].cpu() if e_neg is not None else None) for j, i in enumerate(frames)}
                    if journal is not None:
                        journal.commit(k, window, contributions)
                    ran = True
                else:
                    ran = False
                for i in frames:
                    if i not in mine:
                        continue
                    pos, neg = contributions[i]
                    if i in boundary:
                        held[i].append((k, pos, neg))
                        continue
                    w = window.weight(i)
                    posi.add(i, pos, w)
                    if neg is not None:
                        nega.add(i, neg, w)
                    if cover[i][-1] == k:  # the frame's last window: its mean is complete
                        writer.put(i, stepped(i, posi.pop(i), nega.pop(i) if neg is not None else None))
                        for k2 in cover[i]:
                            if k2 in unclosed:
                                unclosed[k2] -= 1
                next_start = windows[my_windows[position + 1]].start if position + 1 < len(my_windows) else len(src)
                for i in [i for i in open_latents if i < next_start and i not in mine]:
                    open_latents.pop(i)  # a finished frame only some window of this rank read
                    open_cond.pop(i, None)
                if journal is not None:
                    writer.flush()  # the frames this window finished are durable before their windows' files go
                    for k2 in [k2 for k2, left in unclosed.items() if left == 0 and k2 <= k]:
                        journal.discard(k2)
                        del unclosed[k2]
                if ran:
                    progress("denoise", window.end - window.start, None)
            cluster.barrier(f"the end of step {step + 1}'s windows")  # so the exchange never waits for a slow rank's windows
            if boundary:
                shape = next(iter(held.values()))[0][1].shape  # a latent's (this rank's folder may hold none of frame 0)
                received = self._exchange_boundary(cluster, boundary, held, holders, cover, owners, with_negative, shape)
                for i in sorted(boundary):
                    mean_pos, mean_neg = RunningMean(), RunningMean()
                    for k, pos, neg in sorted(held[i] + received[i], key=lambda item: item[0]):  # window order, as one process
                        mean_pos.add(i, pos, windows[k].weight(i))
                        if neg is not None:
                            mean_neg.add(i, neg, windows[k].weight(i))
                    latent = stepped(i, mean_pos.pop(i), mean_neg.pop(i) if with_negative else None)
                    if not cluster.shared_folder or holders[i][-1] == me:
                        writer.put(i, latent)
        if journal is not None and cluster.world == 1:
            journal.remove()

    def advance(self, i: int, step: int, eps: torch.Tensor, latent: torch.Tensor, options: dict, previous=None, next_previous=None) -> torch.Tensor:
        """Frame ``i``'s latent after step ``step`` (``eps``: its guided noise prediction), with the sampler's per-frame state.

        A multistep sampler's x0 prediction of this step is written into ``next_previous`` before
        the caller writes the latent: a latent on disk always has its state beside it, so a killed
        run resumes bit for bit. A stochastic sampler's noise is :func:`frame_step_noise` of the
        run's ``options["noise_seed"]``, this frame and this step.
        """
        sampler = self.scheduler
        t = sampler.timesteps[step]
        before = previous[i] if sampler.needs_previous and previous is not None else None
        noise = frame_step_noise(options.get("noise_seed", 0), i, step, latent.shape) if sampler.needs_noise else None
        if sampler.needs_previous and next_previous is not None:
            next_previous.put(i, sampler.x0(eps, t, latent).contiguous())
        return sampler.step(eps, t, latent, previous=before, noise=noise)

    @staticmethod
    def _exchange_boundary(cluster, boundary, held, holders, cover, owners, with_negative, shape):
        """The other ranks' predictions of this rank's boundary frames: ``{frame: [(window, ε_pos, ε_neg), ...]}``.

        Each side knows from the plan alone which predictions the other holds, so the tensors
        go without a header: one send and one receive per neighbour, all at once.
        """
        me = cluster.rank
        kinds = 2 if with_negative else 1
        shared_with: dict[int, list[int]] = {}
        for i in sorted(boundary):
            for rank in holders[i]:
                if rank != me:
                    shared_with.setdefault(rank, []).append(i)
        sends, receives, expected = {}, {}, {}
        for peer, frames in shared_with.items():
            mine = [torch.stack([pos] + ([neg] if with_negative else [])) for i in frames for _, pos, neg in held[i]]
            expected[peer] = [(i, k) for i in frames for k in cover[i] if owners[k] == peer]
            if mine:
                sends[peer] = torch.stack(mine)
            if expected[peer]:
                receives[peer] = torch.empty((len(expected[peer]), kinds, *shape), dtype=torch.float32)
        cluster.exchange(sends, receives)
        received: dict[int, list] = {i: [] for i in boundary}
        for peer, items in expected.items():
            for (i, k), both in zip(items, receives.get(peer, ())):
                received[i].append((k, both[0], both[1] if with_negative else None))
        return received

    def decode(self, latents_store, out_store, progress, frames: range | None = None):
        """Stage: fp32 VAE decode of every frame (of ``frames``) not yet in ``out_store``."""
        todo = _within(out_store.missing(), frames)
        with WriteBehind(out_store) as writer:
            for i, latent in Prefetcher(latents_store, todo):
                image = self.vae_decoder_fp32(latent[None].to(self.device, torch.float32))
                writer.put(i, tensor_to_images(image)[0])
                progress("decode", 1, len(todo))

    def encode_frames(self, frames_store, out_store, progress, frames: range | None = None):
        todo = _within(out_store.missing(), frames)
        with WriteBehind(out_store) as writer:
            for i, frame in Prefetcher(frames_store, todo):
                x = preprocess_image(frame).to(self.device, self.vae_encoder.dtype)
                writer.put(i, self.vae_encoder(x).float().cpu()[0])
                progress("encode", 1, len(todo))

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        cfg_scale: float = 7.5,
        clip_skip: int = 1,
        num_frames: int | None = None,
        input_frames=None,
        controlnet_frames=None,
        denoising_strength: float = 1.0,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 20,
        animatediff_batch_size: int = 16,
        animatediff_stride: int = 8,
        unet_batch_size: int = 1,
        controlnet_batch_size: int = 1,
        cross_frame_attention: bool = False,
        smoother: Callable | None = None,
        smoother_progress_ids: Sequence[int] = (),
        vram_limit_level: int = 0,
        progress_bar_cmd: Callable | None = tqdm,
        progress_bar_st=None,
        output_folder: str | None = None,
        in_memory: bool = False,
        progress_callback: ProgressCallback | None = None,
        generator: torch.Generator | None = None,
        sampler: str = "ddim",
    ) -> VideoFrames:
        """Render ``num_frames`` frames; returns a lazy sequence of PIL frames backed by ``output_folder/frames``.

        ``input_frames``/``controlnet_frames`` may be lists, ``VideoData`` objects or
        stores. ``in_memory=True`` keeps every per-frame artifact in RAM instead
        (short clips, tests); ``output_folder=None`` uses a temporary folder that
        is removed when the result is garbage-collected. Noise comes from the
        global torch RNG (or ``generator``) as in the original. ``sampler``: ddim (the
        original's), euler, euler_a, dpmpp_2m, dpmpp_2m_karras or lcm; a stochastic one draws
        its per-frame noise from a seed taken from the RNG after the initial noise.
        """
        check_size(height, width)
        if num_frames is None:
            if input_frames is None:
                raise ValueError("num_frames is required for text-to-video (no input_frames given)")
            num_frames = len(input_frames)
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if self.motion_modules is not None and animatediff_batch_size > self.motion_modules.config.max_positions:
            raise ValueError(
                f"animatediff_batch_size {animatediff_batch_size} exceeds the motion modules' {self.motion_modules.config.max_positions} positions"
            )
        if controlnet_frames is not None and self.controlnet is None:
            raise ValueError("controlnet_frames were given but the pipeline has no ControlNet units")
        if self.controlnet is not None and controlnet_frames is None:
            raise ValueError(f"the pipeline has {len(self.controlnet)} ControlNet units: pass controlnet_frames (one frame list per unit, or one shared list)")
        if input_frames is not None and len(input_frames) < num_frames:
            raise ValueError(f"input_frames holds {len(input_frames)} frames, need {num_frames}")
        smoother_ids = set(smoother_progress_ids)

        keepalive = None
        root = None
        if not in_memory:
            if output_folder is None:
                keepalive = tempfile.TemporaryDirectory(prefix="diffsynth_video_")
                output_folder = keepalive.name
            os.makedirs(output_folder, exist_ok=True)
            root = output_folder

        global_rng = generator is None
        if global_rng:  # draw from (a copy of) the global RNG, then advance it as the original's randn would
            generator = torch.Generator()
            generator.set_state(torch.get_rng_state())
        if root is not None:
            call = dict(prompt=prompt, negative_prompt=negative_prompt, cfg_scale=cfg_scale, clip_skip=clip_skip, num_frames=num_frames,
                        denoising_strength=denoising_strength, height=height, width=width, num_inference_steps=num_inference_steps,
                        animatediff_batch_size=animatediff_batch_size, animatediff_stride=animatediff_stride,
                        cross_frame_attention=cross_frame_attention, smoother=smoother is not None, smoother_progress_ids=sorted(smoother_ids),
                        **({"sampler": sampler} if sampler != "ddim" else {}))
            self._claim_folder(root, call, generator, input_frames, controlnet_frames)
        self.use_sampler(sampler)
        self.scheduler.set_timesteps(num_inference_steps, denoising_strength)
        progress = _Progress(progress_bar_cmd, progress_callback, progress_bar_st, num_inference_steps)

        latents = self.initial_latents(input_frames, num_frames, width, height, denoising_strength, root, generator, progress)
        noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if self.scheduler.needs_noise else 0
        if global_rng:
            torch.set_rng_state(generator.get_state())
        emb_posi = self.prompter.encode_prompt(self.text_encoder, prompt, clip_skip=clip_skip, device=self.device, positive=True)
        emb_nega = None
        if cfg_scale != 1.0:
            emb_nega = self.prompter.encode_prompt(self.text_encoder, negative_prompt, clip_skip=clip_skip, device=self.device, positive=False)
        cond_stores = self.annotate(controlnet_frames, num_frames, width, height, root, progress) if self.controlnet is not None else []

        options = dict(cfg_scale=cfg_scale, animatediff_batch_size=animatediff_batch_size, animatediff_stride=animatediff_stride,
                       unet_batch_size=unet_batch_size, controlnet_batch_size=controlnet_batch_size,
                       cross_frame_attention=cross_frame_attention, vram_limit_level=vram_limit_level, noise_seed=noise_seed)
        shape = latents[0].shape
        guide = as_store(input_frames) if input_frames is not None else None
        previous = None
        for step in range(len(self.scheduler.timesteps)):
            progress.begin_step(step)
            nxt = tensor_store(self._stores(root, os.path.join("latents", f"step_{step + 1:03d}")), num_frames, shape=shape, dtype=torch.float32)
            nxt_previous = (tensor_store(self._stores(root, previous_folder(step + 1)), num_frames, shape=shape, dtype=torch.float32)
                            if self.scheduler.needs_previous else None)
            journal = None if root is None else WindowJournal(os.path.join(root, "latents", f"step_{step + 1:03d}_journal"))
            if not nxt.complete():
                if smoother is not None and step in smoother_ids:
                    self._smoothed_step(step, latents, nxt, cond_stores, emb_posi, emb_nega, options, progress, smoother, guide, root, shape,
                                        previous=previous, next_previous=nxt_previous)
                else:
                    self.denoise_step(step, latents, nxt, cond_stores, emb_posi, emb_nega, options, progress, journal=journal,
                                      previous=previous, next_previous=nxt_previous)
            if journal is not None:
                journal.remove()  # left behind when a kill came between the step's last commit and denoise_step's removal
            _remove_store(latents)
            if previous is not None:
                _remove_store(previous)
            latents, previous = nxt, nxt_previous
        if previous is not None:
            _remove_store(previous)

        final_smoothing = smoother is not None and (-1 in smoother_ids or num_inference_steps in smoother_ids)
        decoded = image_store(self._stores(root, os.path.join("latents", "decoded") if final_smoothing else "frames"), num_frames, size=(width, height))
        self.decode(latents, decoded, progress)
        if final_smoothing:
            frames = image_store(self._stores(root, "frames"), num_frames, size=(width, height))
            _put_all(frames, smoother(VideoFrames(decoded), original_frames=guide))
            decoded = frames
        progress.close()
        return VideoFrames(decoded, keepalive)

    def _claim_folder(self, root: str, call: dict, generator: torch.Generator, input_frames, controlnet_frames) -> None:
        """Reuse ``root``'s per-frame files only for the same call: same parameters, noise, models and inputs.

        A different call in the same folder clears the previous call's files (with a
        warning) instead of returning stale frames. The inputs are identified by a
        hash of their first, middle and last frames (cheap, not exhaustive).
        """
        from ..cache.manifest import stable_hash
        from ..cache.previous import keep_previous
        from ..utils.sizes import count_frame_files

        def sample(frames):
            if frames is None or not len(frames):
                return None
            if _is_list_of_sequences(frames, len(self.controlnet) if self.controlnet is not None else 0):
                return [sample(f) for f in frames]
            picks = sorted({0, len(frames) // 2, len(frames) - 1})
            return [hashlib.sha256(_image_to_uint8(frames[i]).numpy().tobytes()).hexdigest() for i in picks]

        identity = dict(call, rng=hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest(),
                        models=[float(p.float().sum()) for p in (self.unet.out[2].weight, self.text_encoder.text_model.final_layer_norm.weight)],
                        motion=self.motion_modules is not None, units=[(u.processor.processor_id, u.scale) for u in self.controlnet.units] if self.controlnet else [],
                        inputs=sample(input_frames), controls=sample(controlnet_frames))
        key = stable_hash(identity)
        path = os.path.join(root, "pipeline_call.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                previous = json.load(f).get("key")
            if previous == key:
                return
            logger.warning("%s holds the files of a different pipeline call; clearing them", root)
            # a rerun never deletes finished frames: they go to previous/
            keep_previous(root, ["frames"], finished=count_frame_files(os.path.join(root, "frames")) > 0)
            for name in ("controlnet_caches", "latents", "smoothed", "smoother", "frames"):
                if os.path.isdir(os.path.join(root, name)):
                    shutil.rmtree(os.path.join(root, name))
        from ..utils.atomic import atomic_write_text

        atomic_write_text(path, json.dumps({"key": key}))

    def _smoothed_step(self, step, latents, nxt, cond_stores, emb_posi, emb_nega, options, progress, smoother, guide, root, shape,
                       cluster=None, share: range | None = None, smooth=None, fetch=None, decode_share: range | None = None,
                       cover: range | None = None, previous=None, next_previous=None):
        """x0 of every frame → decode → smoother → encode → ε that lands on the smoothed x0 → DDIM step (the original's loop).

        Several processes: the x0 pass is split as :meth:`denoise_step`, decode, encode and the
        step by ``share`` (this rank's frames; the decode by ``decode_share``, its share plus the
        smoother's halo when every rank has a folder of its own, whose missing x0 latents
        ``fetch(store, frames)`` brings from their ranks; ``cover``: the frames its windows cover,
        as :meth:`denoise_step`'s ``frames``); ``smooth(decoded, smoothed)`` (from the
        runner) smooths across the ranks; the ranks meet between the parts.
        """
        from ..distributed import Cluster

        cluster = cluster if cluster is not None else Cluster.solo()
        n = len(latents)
        prefix = os.path.join("smoothed", f"step_{step:03d}")
        x0 = tensor_store(self._stores(root, os.path.join(prefix, "x0")), n, shape=shape, dtype=torch.float32)
        journal = None if root is None else WindowJournal(os.path.join(root, prefix, "x0_journal"))  # a kill loses at most one window here too
        decode_share = share if decode_share is None else decode_share
        self.denoise_step(step, latents, None, cond_stores, emb_posi, emb_nega, options, progress, x0_store=x0, journal=journal, cluster=cluster,
                          frames=cover)
        cluster.barrier(f"step {step + 1}: x0 of every frame")
        if fetch is not None:
            fetch(x0, decode_share)
        decoded = image_store(self._stores(root, os.path.join(prefix, "decoded")), n)
        self.decode(x0, decoded, progress, frames=decode_share)
        cluster.barrier(f"step {step + 1}: x0 decoded")
        smoothed = image_store(self._stores(root, os.path.join(prefix, "frames")), n)
        if not smoothed.complete():
            if smooth is not None:
                smooth(decoded, smoothed)
            else:
                _put_all(smoothed, smoother(VideoFrames(decoded), original_frames=guide))
        cluster.barrier(f"step {step + 1}: x0 smoothed")
        target = tensor_store(self._stores(root, os.path.join(prefix, "x0_smoothed")), n, shape=shape, dtype=torch.float32)
        self.encode_frames(smoothed, target, progress, frames=share)
        t = self.scheduler.timesteps[step]
        with WriteBehind(nxt) as writer:
            for i in _within(nxt.missing(), share):
                eps = self.scheduler.return_to_timestep(t, latents[i], target[i])
                writer.put(i, self.advance(i, step, eps, latents[i], options, previous, next_previous))
        cluster.barrier(f"step {step + 1} stepped")
        if cluster.folder_leader:
            for store in (x0, decoded, smoothed, target):
                _remove_store(store)
            if journal is not None:
                journal.remove()


class _Progress:
    """tqdm over denoising steps plus typed events for UIs.

    The bar is ``progress_bar_cmd`` wrapped around ``range(steps)`` (:func:`wrap_progress_bar`, so a
    one-argument command such as the original examples' ``lambda x: x`` works too), advanced by
    taking one item per step: a step's item is taken when it begins, and the rest at the end.
    """

    def __init__(self, bar_cmd, callback, st_bar, steps):
        self.callback = callback
        self.st_bar = st_bar
        self.steps = steps
        self.ticks = iter(wrap_progress_bar(bar_cmd, range(steps), steps, "denoising")) if bar_cmd is not None else None
        self.counts: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        self.counts[stage] = self.counts.get(stage, 0) + done
        if self.callback is not None:
            self.callback(ProgressEvent(stage, self.counts[stage], total if total is not None else -1))

    def begin_step(self, step: int) -> None:
        if self.ticks is not None:
            next(self.ticks, None)  # tqdm counts an item done when the next one is taken
        if self.st_bar is not None:
            self.st_bar.progress(step / self.steps)
        if self.callback is not None:
            self.callback(ProgressEvent("step", step, self.steps))

    def close(self) -> None:
        if self.ticks is not None:
            for _ in self.ticks:  # the last steps' items; exhausting a tqdm closes it
                continue
        if self.callback is not None:
            self.callback(ProgressEvent("step", self.steps, self.steps))


def _within(indices: list[int], frames: range | None) -> list[int]:
    """``indices`` inside ``frames`` (all of them when ``frames`` is None)."""
    return indices if frames is None else [i for i in indices if i in frames]


def _is_list_of_sequences(frames, units: int) -> bool:
    first = frames[0] if len(frames) else None
    return len(frames) == units and first is not None and not isinstance(first, Image.Image) and hasattr(first, "__len__")


def _fit_frame(frame: Image.Image, width: int, height: int, what: str) -> Image.Image:
    if frame.size != (width, height):
        raise ValueError(f"{what} is {frame.size[0]}x{frame.size[1]} but the video is {width}x{height}; resize the frames (VideoData(height=, width=) does)")
    return frame


def _image_to_uint8(image: Image.Image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def _put_all(store, frames) -> None:
    with WriteBehind(store) as writer:
        for i, frame in enumerate(frames):
            writer.put(i, frame)
    if len(store) and store.missing():
        raise ValueError(f"the smoother returned {len(store) - len(store.missing())} frames for a {len(store)}-frame video")


def _remove_store(store) -> None:
    folder = getattr(store, "folder", None)
    store.clear()
    if folder is not None and os.path.isdir(folder):
        shutil.rmtree(folder)
