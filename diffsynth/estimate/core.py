"""Disk, RAM, device memory and time of a render, per stage and in total, before any model loads (DESIGN §3, "Estimates").

Everything comes from the runner's plan (what the pre-flight checks opened: the config, the source
frames, the model files' headers) and the stage table:

- **disk**: each stage's files, from the stores' own codecs (latents, FastBlend partials: exact sizes;
  PNG frames: a few source frames encoded as the stores do, rendered frames at the ratio the history
  measured for these models, or at the source's), walked through the stages in order with what each
  deletes: the peak of the output folder at once, and what stays;
- **device memory**: the weights as built from the headers in the run's dtype, plus the activations of
  the largest call (a denoising window, a decode) traced on the meta device at the configured sizes;
- **RAM**: this process as it is (Python, torch, the engine), plus the weights when the models run on
  the CPU (one file's worth more while loading), plus the activations on the CPU, plus the frames the
  stage holds (prefetch and write-behind queues, FastBlend's frame caches, the control images of a window);
- **time**: the stages' counts of work × seconds per unit (``costs.py``), × the history's measured ÷
  predicted ratio of each stage when earlier runs of this device, models and size exist.
"""
from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass, field

import torch

from ..cache.manifest import STAGE_NAMES
from ..utils.sizes import human_bytes, human_seconds, path_bytes
from . import costs as C
from .history import History, history_key, models_signature, stage_id
from .trace import meta_models, module_bytes, trace

SCHEMA = 1
COSTS_VERSION = 1  # the default cost model's version: ratios learned against another are not reused
_NPY_HEADER = 128  # TensorCodec: .npy format 1.0 with the header padded to 64-byte multiples (always 128 here)
_SAFETENSORS_HEADER = 256
_RUN_FILES_BYTES = 12 * 1024  # config.json, manifest.json (with this estimate in it), last_process_id.txt
_WORKING_FRAMES = 4  # frames in flight per prefetch/write-behind pair (depth 2 each)
# Measured on Linux x86-64 with glibc, torch 2.13 (bench/estimate.py shows how the whole fares):
_PROMPTER_BYTES = 45 * 2**20  # the CLIP tokenizer's vocabulary and merges as Python objects
_CPU_RUNTIME_BYTES = 20 * 2**20  # oneDNN/MKL buffers and kernels at the first convolutions
_CPU_ALLOCATOR = 1.5  # resident bytes per traced activation byte: freed blocks stay with the process for reuse
_DEFAULT_VIDEO_RATIO = 0.35  # video bytes per frame ÷ a rendered PNG frame at the default H.264 (crf 5), until measured
_WEIGHTLESS_ANNOTATORS = ("canny", "tile")  # read no weights: timed and their PNGs sized on the input's own frames
_CHEAP_ANNOTATORS = {f"annotator frames ({processor})" for processor in _WEIGHTLESS_ANNOTATORS}


@dataclass
class StageEstimate:
    id: int
    name: str
    work: dict[str, int]
    seconds: float
    disk_peak_bytes: int
    ram_peak_bytes: int
    device_peak_bytes: int | None
    source: str  # where the seconds came from
    done: bool = False  # already finished in the output folder (costs nothing more)
    base_seconds: float = 0.0  # before the history's factor (what later runs are compared with)

    def as_json(self) -> dict:
        return {"id": self.id, "name": self.name, "work": self.work, "seconds": round(self.seconds, 3),
                "disk_peak_bytes": int(self.disk_peak_bytes), "ram_peak_bytes": int(self.ram_peak_bytes),
                "device_peak_bytes": None if self.device_peak_bytes is None else int(self.device_peak_bytes),
                "source": self.source, "done": self.done, "base_seconds": round(self.base_seconds, 4)}


@dataclass
class Estimate:
    stages: list[StageEstimate]
    device: str
    world: int
    final_bytes: int
    folder_bytes: int  # the output folder now
    free_disk: int | None
    free_device: int | None
    free_ram: int | None
    fits: dict[str, dict] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    ranks: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # vram_limit_level "auto": what it chose
    learn: dict = field(default_factory=dict)  # what the run's measurements are compared with for the history

    @property
    def total(self) -> dict:
        devices = [s.device_peak_bytes for s in self.stages if s.device_peak_bytes is not None]
        return {"seconds": round(sum(s.seconds for s in self.stages), 3),
                "disk_peak_bytes": max(s.disk_peak_bytes for s in self.stages),
                "disk_final_bytes": int(self.final_bytes),
                "ram_peak_bytes": max(s.ram_peak_bytes for s in self.stages),
                "device_peak_bytes": max(devices) if devices else None}

    def as_json(self) -> dict:
        return {"schema": SCHEMA, "device": self.device, "world_size": self.world,
                "stages": {str(s.id): s.as_json() for s in self.stages}, "total": self.total, "fits": self.fits,
                "sources": self.sources, "ranks": self.ranks, "settings": self.settings,
                "free": {"disk_bytes": self.free_disk, "device_bytes": self.free_device, "ram_bytes": self.free_ram},
                "output_folder_bytes": self.folder_bytes, "learn": self.learn}

    def format(self) -> str:
        lines = [f"estimate for {self.device}" + (f", {self.world} processes (per process: the largest share)" if self.world > 1 else "") + ":"]
        header = f"{'id':>2}  {'stage':<24} {'time':>10}  {'disk peak':>10}  {'RAM peak':>10}  {'device peak':>11}  time from"
        lines += [header, "-" * len(header)]
        for s in self.stages:
            device = "-" if s.device_peak_bytes is None else human_bytes(s.device_peak_bytes)
            spent = "done" if s.done else human_seconds(s.seconds)
            lines.append(f"{s.id:>2}  {s.name:<24} {spent:>10}  {human_bytes(s.disk_peak_bytes):>10}  {human_bytes(s.ram_peak_bytes):>10}  "
                         f"{device:>11}  {'' if s.done else s.source}".rstrip())
        t = self.total
        device = "-" if t["device_peak_bytes"] is None else human_bytes(t["device_peak_bytes"])
        lines.append(f"{'':>2}  {'total':<24} {human_seconds(t['seconds']):>10}  {human_bytes(t['disk_peak_bytes']):>10}  "
                     f"{human_bytes(t['ram_peak_bytes']):>10}  {device:>11}")
        lines.append(f"output folder: peak {human_bytes(t['disk_peak_bytes'])} at once, {human_bytes(t['disk_final_bytes'])} when finished"
                     + (f" ({human_bytes(self.folder_bytes)} there now)" if self.folder_bytes else ""))
        for what, verdict in self.fits.items():
            lines.append(f"{what}: {'fits' if verdict['fits'] else 'DOES NOT FIT'} ({verdict['reason']})")
        if self.settings:
            lines.append("vram_limit_level auto: " + ", ".join(f"{k} = {v}" for k, v in self.settings.items()))
        for what, source in self.sources.items():
            lines.append(f"{what} from: {source}")
        return "\n".join(lines)


# ---------------------------------------------------------------------- models as built, traced


class _Models:
    """The run's models on the meta device: weights per component and traced calls (cached per setting)."""

    def __init__(self, config: dict, device: torch.device, dtype: torch.dtype, families: dict[str, str], headers: dict | None = None):
        models = config["models"]

        usable = [p for p in models["model_list"] if families.get(p) not in (None, "rife", "translator", "beautiful_prompt")]
        loras = [p for p in models["model_list"] if families.get(p) == "lora"]
        alphas = list(models.get("lora_alphas") or [])
        self.manager = meta_models(usable, dtype, lora_alphas=alphas[:len(loras)], headers=headers)
        self.device, self.dtype = device, dtype
        m = self.manager
        self.units = len(models.get("controlnet_units") or [])
        found = m.controlnet if self.units and m.has("controlnet") else []
        self.controlnets = list(found) if isinstance(found, (list, tuple)) else [found]
        decoder = m.vae_decoder if m.has("vae_decoder") else None
        # A decoder in another dtype gets an fp32 copy for the video's decode (SDVideoPipeline.vae_decoder_fp32): twice its bytes more.
        fp32_copy = decoder is not None and next(decoder.parameters()).dtype != torch.float32
        self.weights = {
            "unet": module_bytes(m.unet if m.has("unet") else None),
            "motion": module_bytes(m.motion_modules if m.has("motion_modules") else None),
            "controlnet": module_bytes(self.controlnets),
            "text encoder": module_bytes(m.text_encoder if m.has("text_encoder") else None),
            "vae": module_bytes(decoder) * (3 if fp32_copy else 1) + module_bytes(m.vae_encoder if m.has("vae_encoder") else None),
        }
        # Files the meta manager does not build (RIFE, prompt models): their bytes on disk, loaded on the CPU.
        self.other_bytes = sum(_file_bytes(p) for p in models["model_list"] if p not in usable and p not in loras)
        self.largest_file = max((_file_bytes(p) for p in models["model_list"]), default=0)
        self._traces: dict = {}

    def _pipe(self):
        from ..controlnets.units import ControlNetUnit, MultiControlNetManager
        from ..pipelines.sd_video import SDVideoPipeline

        m = self.manager
        pipe = SDVideoPipeline("meta", self.dtype, use_animatediff=m.has("motion_modules"))
        pipe.unet = m.unet
        pipe.motion_modules = m.motion_modules if m.has("motion_modules") else None
        pipe.controlnet = MultiControlNetManager([ControlNetUnit(None, c, 1.0) for c in self.controlnets]) if self.controlnets else None
        return pipe

    def window(self, frames: int, width: int, height: int, inputs: dict, vram_limit_level: int, unet_batch_size: int | None = None):
        batch = int(unet_batch_size or inputs.get("unet_batch_size", 1))
        key = ("window", frames, width, height, batch, int(inputs.get("controlnet_batch_size", 1)), vram_limit_level,
               bool(inputs.get("cross_frame_attention", False)), inputs.get("cfg_scale", 7.5) != 1.0)
        if key not in self._traces:
            pipe = self._pipe()
            context = getattr(getattr(self.manager.text_encoder, "config", None), "hidden_size", 768) if self.manager.has("text_encoder") else 768
            x = torch.zeros(frames, 4, height // 8, width // 8, device="meta", dtype=self.dtype)
            emb = torch.zeros(1, 77, context, device="meta", dtype=self.dtype)
            cond = torch.zeros(len(self.controlnets), frames, 3, height, width, dtype=torch.uint8, device="meta") if self.controlnets else None
            self._traces[key] = trace(pipe._window_noise, x, torch.tensor(999, device="meta"), emb, emb if key[-1] else None, cond,
                                      inputs.get("cfg_scale", 7.5), batch, int(inputs.get("controlnet_batch_size", 1)),
                                      bool(inputs.get("cross_frame_attention", False)), vram_limit_level)
        return self._traces[key]

    def decode(self, width: int, height: int):
        key = ("decode", width, height)
        if key not in self._traces:
            decoder = copy.deepcopy(self.manager.vae_decoder).float()
            self._traces[key] = trace(decoder, torch.zeros(1, 4, height // 8, width // 8, device="meta"))
        return self._traces[key]

    def encode(self, width: int, height: int):
        key = ("encode", width, height)
        if key not in self._traces:
            encoder = self.manager.vae_encoder
            dtype = next(encoder.parameters()).dtype
            self._traces[key] = trace(encoder, torch.zeros(1, 3, height, width, device="meta", dtype=dtype))
        return self._traces[key]


def _file_bytes(path: str) -> int:
    return os.path.getsize(path) if os.path.isfile(path) else path_bytes(path)


# ---------------------------------------------------------------------- disk


def _npy_bytes(shape, itemsize: int) -> int:
    count = 1
    for s in shape:
        count *= s
    return _NPY_HEADER + count * itemsize


class _Disk:
    """The output folder through the stages: what each adds and deletes, and the peak (``stage id -> bytes``)."""

    def __init__(self):
        self.now: dict[str, int] = {}
        self.peaks: dict[int, int] = {}

    def add(self, stage: int, name: str, nbytes: float) -> None:
        self.now[name] = self.now.get(name, 0) + int(nbytes)
        self.peaks[stage] = max(self.peaks.get(stage, 0), sum(self.now.values()))

    def remove(self, *names: str) -> None:
        for name in names:
            self.now.pop(name, None)

    def mark(self, stage: int) -> None:
        self.peaks[stage] = max(self.peaks.get(stage, 0), sum(self.now.values()))


def _disk_timeline(view, width: int, height: int, png_source: float, png_control: list[float], png_out: float, video_frame: float,
                   text_width: int, fastblend: dict | None) -> tuple[dict[int, int], int]:
    """Peak bytes of the output folder during each stage, and its bytes at the end (one process or a shared folder)."""
    n, inputs, keep = view.n, view.inputs, view.config["data"].get("keep_intermediates", False)
    latent = _npy_bytes((4, height // 8, width // 8), 4)
    disk = _Disk()
    disk.add(0, "run files", _RUN_FILES_BYTES)
    disk.add(0, "source_images", n * png_source)
    disk.mark(1)
    for k, each in enumerate(png_control):
        disk.add(1, f"controlnet_caches/{k}", n * each)
    disk.add(2, "prompt", 2 * 77 * text_width * 4 + _SAFETENSORS_HEADER)
    disk.add(3, "latents/step_000", n * latent)
    steps, in_loop = view.denoise["steps"], set(view.denoise["in_loop"]) if view.smoother else set()
    batch = inputs.get("animatediff_batch_size", 16)
    journal = 2 * min(batch, n) * latent * (2 if inputs.get("cfg_scale", 7.5) != 1.0 else 1)  # a window's ε+ and ε− waiting for its frames
    disk.mark(4)
    for step in range(steps):
        if step in in_loop:  # x0 and its decoded frames, the smoother's files, the smoothed frames and their latents, then the step
            disk.add(4, "smoothed", n * (latent + png_out))
            _smoother_pass(disk, 4, fastblend, n, png_out, "smoother/blended")
            disk.add(4, "smoothed", n * (png_out + latent))
        # a multistep sampler keeps each frame's previous x0 beside the latents: the step's and the next one's
        multistep = n * latent if view.multistep else 0
        disk.add(4, "latents/next", n * latent + journal + multistep)
        disk.remove("latents/next", "latents/step_000", "smoothed")
        disk.now["latents/final"] = n * latent + (multistep if step + 1 < steps else 0)
    disk.mark(4)
    if view.final_smoothing:
        disk.add(5, "latents/decoded", n * png_out)
        target = "frames" if view.direct else "smoother/blended"
        disk.remove("smoother/blended")  # a FastBlend call over other frames starts its cache afresh
        if fastblend and fastblend["mode"] == "fast":
            _smoother_pass(disk, 6, fastblend, n, png_out, target, right_stage=7)
        else:
            disk.mark(6)
            disk.mark(7)
            disk.add(8, target, n * png_out)
        if not view.direct:
            disk.add(8, "frames", n * png_out)
        disk.mark(8)
        if not keep:
            disk.remove("latents/decoded", "smoother/blended", "smoother/left")
    else:
        disk.add(5, "frames", n * png_out)
        for sid in (6, 7, 8):
            disk.mark(sid)
        disk.remove("smoother/blended")  # an in-loop smoother's files go at stage 8
    disk.add(9, "video", n * video_frame)  # video.mp4 (or .webm, .mov, .gif by data.output; nothing for png)
    return disk.peaks, sum(disk.now.values())


def _smoother_pass(disk: _Disk, stage: int, fastblend: dict | None, n: int, png_out: float, target: str, right_stage: int | None = None) -> None:
    """FastBlend's files over ``n`` frames: in fast mode, block by block, the block's left partials, then the right pass
    merging each frame into ``target`` and deleting its left partial; other modes and processors: ``target`` only."""
    right_stage = stage if right_stage is None else right_stage
    if not fastblend or fastblend["mode"] != "fast":
        disk.add(right_stage, target, n * png_out)
        return
    block = fastblend["block"] or n
    for first in range(0, n, block):
        size = min(block, n - first)
        disk.add(stage, "smoother/left", size * fastblend["left"])
        disk.now["smoother/left"] = 0
        disk.add(right_stage, target, size * png_out)  # the right pass: the partials shrink as the frames grow


def _fastblend_disk(configs, n: int, width: int, height: int) -> dict | None:
    """The chain's first FastBlend: its mode, fast mode's block of frames and the bytes of one left partial (float16)."""
    from ..processors.FastBlend import DEFAULT_WINDOW_SIZE, default_block_frames

    for entry in configs or []:
        if isinstance(entry, dict) and entry.get("processor_type") == "FastBlend":
            options = entry.get("config") or {}
            w = int(options.get("window_size", DEFAULT_WINDOW_SIZE))
            block = options.get("block_frames")
            return {"mode": options.get("inference_mode", "fast"), "block": default_block_frames(w) if block is None else int(block),
                    "left": _npy_bytes((height, width, 3), 2)}
    return None


# ---------------------------------------------------------------------- the estimate


def _free_ram() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident bytes of this process now."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sample_frames(source) -> list:
    """The first, middle and last frames (fewer for a shorter clip)."""
    n = len(source)
    return [source[i] for i in sorted({0, n // 2, n - 1})]


def estimate_plan(plan: dict, device: str | None = None, world: int = 1, calibrate: bool = False, use_history: bool = True,
                  manifest=None, keys: dict[int, str] | None = None, history: History | None = None, base_rss: int | None = None) -> Estimate:
    """The estimate of ``plan`` (``SDVideoPipelineRunner.prepare``'s) on ``device`` (default: the config's) with ``world`` processes.

    ``manifest``/``keys``: the output folder's record, so that stages already done cost nothing.
    ``calibrate``: time real units first (loads the models). ``base_rss``: the run process's resident
    bytes before it loads anything (default: this process's now).
    """
    from ..models.model_manager import default_dtype
    from ..pipelines.stages import STAGE_TABLE, StageView
    from ..utils.device import default_device

    rss_start = current_rss()
    config = plan["config"]
    inputs = config["pipeline"]["pipeline_inputs"]
    n, width, height = plan["num_frames"], plan["width"], plan["height"]
    out = config["data"]["output_folder"]
    device = torch.device(device or config["models"].get("device") or default_device())
    dtype = default_dtype(device)
    view = StageView(config, n, out)
    history = history if history is not None else (History() if use_history or calibrate else None)
    signature = models_signature(config["models"]["model_list"])
    hkey = history_key(str(device), signature, width, height)
    families = plan.get("families") or {}
    models = _Models(config, device, dtype, families, plan.get("headers"))
    sources: dict[str, str] = {}

    # ---- probes (a fraction of a second) and the PNG size of the frames
    samples = _sample_frames(plan["source"])
    files = C.probe_files(out, samples, width, height)
    png_source = files["png bytes"]
    units = config["models"].get("controlnet_units") or []
    png_control = [_control_png(unit, frames, png_source) for unit, frames in zip(units, plan["controls"])]
    ratios = history.frame_ratios(signature) if history is not None else None
    png_out = png_source * (ratios or {}).get("frame", 1.0)
    video_frame = png_out * (ratios or {}).get("video", _DEFAULT_VIDEO_RATIO) * C.video_bytes_factor(plan.get("output"))
    sources["disk"] = ("stores' formats; rendered frames at the PNG size measured by earlier runs of these models" if ratios else
                       "stores' formats; rendered frames assumed to compress like the source frames (no earlier run of these models)")

    # ---- seconds per unit
    vram_level = inputs.get("vram_limit_level", 0)
    settings: dict = {}
    window = min(inputs.get("animatediff_batch_size", 16), n)
    if vram_level == "auto":
        vram_level, settings = 0, {}
    used = {unit for stage in STAGE_TABLE for unit in stage.work(view)} | {"denoise frames", "latent files", "model loading"}
    used = {unit if not unit.startswith("annotator frames (") or unit in _CHEAP_ANNOTATORS else "neural annotator frames" for unit in used}
    unit_costs, time_source = _unit_costs(models, plan, device, dtype, window, width, height, vram_level, files, calibrate, history, hkey,
                                          samples, used)
    sources["time"] = time_source

    # ---- memory
    free_device = _device_free(device)
    if inputs.get("vram_limit_level", 0) == "auto":
        vram_level, settings = _auto_vram(models, inputs, window, width, height, free_device)
    weights = sum(models.weights.values())
    on_cpu = device.type == "cpu"
    w_trace = models.window(window, width, height, dict(inputs, **{k: v for k, v in settings.items() if k == "controlnet_batch_size"}),
                            vram_level, settings.get("unet_batch_size"))
    d_trace = models.decode(width, height) if models.manager.has("vae_decoder") else None
    e_trace = models.encode(width, height) if models.manager.has("vae_encoder") else None
    frame_bytes = width * height * 3
    latent = 4 * (height // 8) * (width // 8) * 4
    cond_bytes = models.units * window * frame_bytes  # a window's control images, uint8
    fb_ram = _fastblend_ram(config.get("smoother_configs"), width, height)
    # Activations on the CPU: what the trace finds alive at once, with the allocator's caching of freed blocks.
    traced = {"window": w_trace.peak_bytes, "decode": d_trace.peak_bytes if d_trace else 0, "encode": e_trace.peak_bytes if e_trace else 0}
    act = {k: int(v * _CPU_ALLOCATOR) if on_cpu else 0 for k, v in traced.items()}  # in the host's RAM
    # This process as the run will have it: now, with what the estimate itself keeps (it runs in the run's process).
    base = (current_rss() if base_rss is None else base_rss + max(current_rss() - rss_start, 0))
    models_host = _PROMPTER_BYTES + models.other_bytes + (weights + _CPU_RUNTIME_BYTES if on_cpu else models.largest_file)
    working = _WORKING_FRAMES * frame_bytes
    needs = {
        0: working,
        1: models_host,
        2: models_host,
        3: models_host + working + (act["encode"] if inputs.get("denoising_strength", 1.0) < 1.0 else 0),
        4: models_host + cond_bytes + 4 * window * latent + w_trace.host_bytes + act["window"]
        + ((max(act["decode"], act["encode"]) + fb_ram) if view.denoise["in_loop"] and view.smoother else 0),
        5: models_host + working + act["decode"],
        6: models_host + fb_ram, 7: models_host + fb_ram, 8: models_host + fb_ram + working, 9: models_host + working,
    }
    ram_stage, high = {}, 0
    for sid in sorted(needs):  # the allocator keeps what a stage used: a stage's peak is the highest so far
        high = max(high, needs[sid])
        ram_stage[sid] = int(base + high)
    sources["RAM"] = ("this process now, the prompter, weights from the file headers, activations traced on the meta device "
                      "(and what the allocator keeps of them)")
    device_stage: dict[int, int | None] = {sid: None for sid in STAGE_NAMES}
    if not on_cpu:
        resident = weights
        in_loop = bool(view.denoise["in_loop"] and view.smoother)  # a smoothed step decodes and encodes every frame too
        device_stage = {0: 0, 1: resident, 2: resident, 3: resident + traced["encode"],
                        4: resident + max(traced["window"], traced["decode"] + traced["encode"] if in_loop else 0),
                        5: resident + traced["decode"], 6: resident, 7: resident, 8: resident, 9: resident}
        sources["device memory"] = "weights from the file headers; activations traced on the meta device (memory-efficient attention)"

    # ---- disk
    fastblend = _fastblend_disk(config.get("smoother_configs"), n, width, height)
    text_width = getattr(getattr(models.manager.text_encoder, "config", None), "hidden_size", 768) if models.manager.has("text_encoder") else 768
    peaks, final = _disk_timeline(view, width, height, png_source, png_control, png_out, video_frame, text_width, fastblend)

    # ---- time per stage (the history's ratios were measured against predictions of the same kind and cost model)
    runs_key = f"{hkey}||{'default' if time_source.startswith('default') else 'calibrated'}||v{COSTS_VERSION}"
    stages = []
    for stage in STAGE_TABLE:
        work = stage.work(view)
        if stage.id in (0, 9):  # an ffmpeg process started, whatever the number of frames
            work = dict(work, **{"ffmpeg starts": 1})
        if stage.id == 4:
            work = dict(work, **{"denoise frames": view.denoise["steps"] * view.denoise["window_frames"], "latent files": n * view.denoise["steps"]})
        elif stage.id == 1:
            work = dict(work, **{"model loading": 1})
        base = sum(count * _cost_of(unit, unit_costs) for unit, count in work.items())
        factor = history.stage_factor(runs_key, stage_id(stage.id, work)) if history is not None and use_history and base > 0 else None
        seconds = base * factor[0] if factor else base
        source = f"{_short(time_source)} × history ({factor[1]} run{'s' if factor[1] != 1 else ''})" if factor else _short(time_source)
        done = manifest is not None and keys is not None and manifest.is_done(stage.id, keys[stage.id])
        stages.append(StageEstimate(stage.id, stage.name, work, 0.0 if done else seconds, peaks.get(stage.id, 0), ram_stage[stage.id],
                                    device_stage[stage.id], source, done, base))
    folder_bytes = path_bytes(out) if os.path.isdir(out) else 0
    free_disk = _free_disk(out)
    estimate = Estimate(stages, str(device), world, final, folder_bytes, free_disk, free_device, _free_ram(), sources=sources, settings=settings,
                        learn={"runs_key": runs_key, "calibration_key": hkey, "signature": signature, "png_source_bytes": png_source})
    if world > 1:
        _per_rank(estimate, view, world)
    estimate.fits = _fits(estimate)
    memory = estimate.fits.get("device memory")
    if memory is not None and not memory["fits"] and inputs.get("vram_limit_level") != "auto":
        level, fitting = _auto_vram(models, inputs, window, width, height, free_device)
        memory["advice"] = (f"set vram_limit_level to {fitting['vram_limit_level']}, unet_batch_size to {fitting['unet_batch_size']} and "
                            f"controlnet_batch_size to {fitting['controlnet_batch_size']} in pipeline_inputs (or vram_limit_level to "
                            "\"auto\"); none of them changes the result"
                            if "note" not in fitting else "no vram_limit_level or unet_batch_size fits: a smaller size or a GPU with more memory")
    return estimate


def _cost_of(unit: str, costs: dict[str, float]) -> float:
    """Seconds of one ``unit``; a neural annotator without its own figure costs the default of its kind. The counts of
    UNet and ControlNet calls and frames are inside ``denoise frames``, which is what is timed."""
    if unit in costs:
        return costs[unit]
    return costs.get("neural annotator frames", 0.0) if unit.startswith("annotator frames (") else 0.0


def _short(source: str) -> str:
    return source.split(" (")[0]


def _control_png(unit: dict, frames, png_source: float) -> float:
    """PNG bytes of a unit's annotation: computed on a few of its control frames for the annotators that read no weights;
    others are assumed to compress like the source frames."""
    processor = unit.get("processor_id")
    if processor in _WEIGHTLESS_ANNOTATORS:
        from ..controlnets.annotators import Annotator

        annotator = Annotator(processor, model_path=None, device="cpu")
        return C.png_bytes_of([annotator(frame) for frame in _sample_frames(frames)])
    return png_source


def _fastblend_ram(configs, width: int, height: int) -> int:
    """FastBlend's frames held at once: each reader's cache of a window of uint8 frames, the batch's float planes."""
    from ..processors.FastBlend import DEFAULT_WINDOW_SIZE

    total = 0
    for entry in configs or []:
        if isinstance(entry, dict) and entry.get("processor_type") == "FastBlend":
            options = entry.get("config") or {}
            w, batch = int(options.get("window_size", DEFAULT_WINDOW_SIZE)), int(options.get("batch_size", 8))
            frames = w + batch + 2
            total = max(total, 2 * frames * width * height * 3 + batch * 6 * width * height * 4 * 4)
        elif isinstance(entry, dict) and entry.get("processor_type") == "RIFE":
            total = max(total, 4 * width * height * 3 * 4 * 8)
    return total


def _device_free(device: torch.device) -> int | None:
    """Free memory of a CUDA device present here (None: the CPU, or a device this machine does not have)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0]
    return None


def _free_disk(out: str) -> int | None:
    existing = out
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        return shutil.disk_usage(existing or ".").free
    except OSError:
        return None


def _fits(estimate: Estimate) -> dict:
    total = estimate.total
    fits = {}
    # What the stages still to run add at their peak to what the folder holds now (nothing for a finished render).
    need = max(max((s.disk_peak_bytes for s in estimate.stages if not s.done), default=0) - estimate.folder_bytes, 0)
    if estimate.free_disk is not None:
        fits["disk"] = {"fits": need <= estimate.free_disk,
                        "reason": f"needs {human_bytes(need)} more than the output folder holds now, {human_bytes(estimate.free_disk)} free",
                        "missing_bytes": max(need - estimate.free_disk, 0), "needed_bytes": need}
    if estimate.free_ram is not None:
        fits["RAM"] = {"fits": total["ram_peak_bytes"] <= estimate.free_ram + current_rss(),  # this process is part of the peak
                       "reason": f"peak {human_bytes(total['ram_peak_bytes'])}, {human_bytes(estimate.free_ram)} available"}
    if total["device_peak_bytes"] is not None and estimate.free_device is not None:
        fits["device memory"] = {"fits": total["device_peak_bytes"] <= estimate.free_device,
                                 "reason": f"peak {human_bytes(total['device_peak_bytes'])}, {human_bytes(estimate.free_device)} free"}
    return fits


def _per_rank(estimate: Estimate, view, world: int) -> None:
    """A run on ``world`` processes: each rank's share of the split stages (the largest share sets the time)."""
    from ..distributed import Layout, frame_share
    from ..pipelines.sd_video import sliding_windows

    n, inputs = view.n, view.inputs
    windows = sliding_windows(n, inputs.get("animatediff_batch_size", 16), inputs.get("animatediff_stride", 8))
    layout = Layout.of(n, windows, world)
    total_frames = sum(w.end - w.start for w in windows)
    ranks = []
    for rank in range(world):
        own = sum(w.end - w.start for k, w in enumerate(windows) if layout.owners[k] == rank)
        frames = len(frame_share(n, rank, world))
        seconds = {}
        for s in estimate.stages:
            if s.id == 4:
                seconds[s.id] = s.seconds * own / max(total_frames, 1)
            elif s.id in (2, 9):
                seconds[s.id] = s.seconds if rank == 0 else 0.0
            elif s.id == 1:
                load = s.work.get("model loading", 0)
                seconds[s.id] = s.seconds * frames / max(n, 1) if not load else s.seconds * (frames / max(n, 1))
            else:
                seconds[s.id] = s.seconds * frames / max(n, 1)
        ranks.append({"rank": rank, "frames": frames, "window_frames": own, "seconds": round(sum(seconds.values()), 3),
                      "ram_peak_bytes": max(s.ram_peak_bytes for s in estimate.stages),
                      "device_peak_bytes": estimate.total["device_peak_bytes"]})
    slowest = max(ranks, key=lambda r: r["seconds"])
    scale = slowest["seconds"] / max(estimate.total["seconds"], 1e-9)
    for s in estimate.stages:
        s.seconds *= scale  # the run takes as long as its slowest rank
    estimate.ranks = ranks


# ---------------------------------------------------------------------- seconds per unit


def _unit_costs(models: _Models, plan, device, dtype, window, width, height, vram_level, files, calibrate, history, hkey, samples, used):
    """Seconds per unit, and where they came from: calibrated now, a calibration in the history, or the defaults;
    a calibration lacking a unit this config uses (a smoother added since) takes the default for it, and says so."""
    config = plan["config"]
    inputs = config["pipeline"]["pipeline_inputs"]
    defaults, default_source = _default_costs(models, config, inputs, device, dtype, window, width, height, vram_level, files, samples)
    if calibrate:
        from .calibrate import calibrate_units

        measured = calibrate_units(plan, device, window, width, height, samples, files)
        if history is not None:
            stored = history.calibration(hkey)
            history.set_calibration(hkey, {**(stored["costs"] if stored else {}), **measured})
            history.save()
        costs, source = measured, "calibrated now (real units on the device"
    else:
        stored = history.calibration(hkey) if history is not None else None
        if stored is None:
            return defaults, default_source
        costs, source = stored["costs"], f"calibrated {stored['when']} (history"
    missing = sorted(unit for unit in used if unit not in costs and unit in defaults)
    return {**defaults, **costs}, source + (f"; defaults for {', '.join(missing)})" if missing else ")")


def _default_costs(models, config, inputs, device, dtype, window, width, height, vram_level, files, samples):
    probe = C.probe_device(device, dtype)
    w = models.window(window, width, height, inputs, vram_level)
    remap = C.per_megapixel("FastBlend remaps", device, width, height) * _patch_match_effort(config.get("smoother_configs"))
    costs = {
        "denoise frames": C.traced_seconds(w, probe) / window,
        "VAE decodes": C.traced_seconds(models.decode(width, height), probe) + files["png write"] + files["latent io"],
        "VAE encodes": C.traced_seconds(models.encode(width, height), probe) + files["png read"] + files["latent io"],
        "latent files": files["latent io"],
        "noise frames": files["latent io"],
        "text encoder calls": 0.05,
        "ffmpeg starts": 0.05,
        "source frames": C.per_megapixel("video decode", device, width, height) + files["png write"],
        "frames encoded": C.per_megapixel("frames encoded", device, width, height) + files["png read"],
        "FastBlend remaps": remap,
        "FastBlend remaps (balanced)": remap * C.BALANCED_REMAP,
        "FastBlend remaps (accurate)": remap * C.ACCURATE_REMAP,
        "RIFE frames": C.per_megapixel("RIFE frames", device, width, height) + files["png write"],
        "edited frames": C.per_megapixel("edited frames", device, width, height) + files["png write"],
        "neural annotator frames": C.per_megapixel("neural annotator frames", device, width, height) + files["png write"],
        "model loading": 0.5 + sum(_file_bytes(p) for p in config["models"]["model_list"]) / 400e6,
    }
    for processor in _WEIGHTLESS_ANNOTATORS:
        costs[f"annotator frames ({processor})"] = _cheap_annotator_seconds(processor, samples) + files["png write"]
    speed = ("an assumed GPU's speed (40 TFLOP/s fp16; this machine has no CUDA device to probe)" if probe.get("assumed")
             else "this device's probed speed")
    return costs, f"default (model calls traced: FLOPs and operators at {speed}; constants per megapixel)"


def _patch_match_effort(configs) -> float:
    """A remap's work against FastBlend's defaults (5 iterations, patches from 5 pixels): iterations × patch area."""
    for entry in configs or []:
        if isinstance(entry, dict) and entry.get("processor_type") == "FastBlend":
            options = entry.get("config") or {}
            return int(options.get("num_iter", 5)) / 5 * int(options.get("minimum_patch_size", 5)) ** 2 / 25
    return 1.0


def _cheap_annotator_seconds(processor: str, samples) -> float:
    from ..controlnets.annotators import Annotator
    import time

    annotator = Annotator(processor, model_path=None, device="cpu")
    start = time.perf_counter()
    for frame in samples:
        annotator(frame)
    return (time.perf_counter() - start) / len(samples)


def _auto_vram(models: _Models, inputs: dict, window: int, width: int, height: int, free: int | None) -> tuple[int, dict]:
    """``vram_limit_level: "auto"``: the fastest setting whose device peak fits the free memory: level 0, then 1, then
    the UNet's and the ControlNets' frame batches halved together (none of these changes a result)."""
    unet, control = int(inputs.get("unet_batch_size", 1)), int(inputs.get("controlnet_batch_size", 1))
    candidates = [(0, unet, control), (1, unet, control)]
    while unet > 1 or control > 1:
        unet, control = max(unet // 2, 1), max(control // 2, 1)
        candidates.append((1, unet, control))
    weights = sum(models.weights.values())
    for level, unet, control in candidates:
        peak = weights + models.window(window, width, height, dict(inputs, controlnet_batch_size=control), level, unet).peak_bytes
        if free is None or peak <= free:
            return level, {"vram_limit_level": level, "unet_batch_size": unet, "controlnet_batch_size": control}
    level, unet, control = candidates[-1]
    return level, {"vram_limit_level": level, "unet_batch_size": unet, "controlnet_batch_size": control, "note": "nothing fits; the smallest setting"}
