"""``diffsynth estimate --calibrate``: time a few real units at the run's size on the device (seconds, not minutes).

Loads the models as the run does (timing the load), then times one denoising window (both prompt
branches, every ControlNet), one VAE decode and encode, each annotator on one frame, FastBlend on three
frames and RIFE and a short video encode when the config uses them. Each is run once to warm up and
once timed; a window that would take long (a full-size model on the CPU) is timed on fewer frames
and scaled per frame.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from ..utils.device import default_device
from ..utils.sizes import human_seconds

_WINDOW_BUDGET = 20.0  # seconds: a window slower than this is timed on 2 frames
_CALIBRATION_PIXELS = 100_000  # FastBlend is calibrated on frames of at most this many pixels
_SMOOTHER_DEVICE = torch.device(default_device())  # where the smoothers run (their own default), to synchronise on


def _time(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def calibrate_units(plan: dict, device: torch.device, window: int, width: int, height: int, samples, files: dict) -> dict[str, float]:
    import logging

    from ..pipelines.runner import SDVideoPipelineRunner
    from ..pipelines.sd_video import _image_to_uint8

    logger = logging.getLogger("diffsynth")
    config = plan["config"]
    inputs = config["pipeline"]["pipeline_inputs"]
    calibration_config = dict(config, models=dict(config["models"], device=str(device)))
    runner = SDVideoPipelineRunner(progress_bar_cmd=None)
    start = time.perf_counter()
    pipe, manager = runner._load_pipeline(calibration_config)
    costs = {"model loading": time.perf_counter() - start}
    generator = torch.Generator().manual_seed(0)
    dtype = pipe.torch_dtype
    emb = pipe.prompter.encode_prompt(pipe.text_encoder, inputs.get("prompt", ""), clip_skip=inputs.get("clip_skip", 1), device=pipe.device)
    costs["text encoder calls"] = _time(lambda: pipe.prompter.encode_prompt(pipe.text_encoder, inputs.get("prompt", ""), device=pipe.device), device)
    t = pipe.scheduler.timesteps[0] if len(getattr(pipe.scheduler, "timesteps", [])) else torch.tensor(999)
    t_dev = torch.as_tensor(t).to(pipe.device)

    def run_window(frames: int):
        x = torch.randn(frames, 4, height // 8, width // 8, generator=generator).to(pipe.device, dtype)
        cond = None
        if pipe.controlnet is not None:
            hints = [torch.stack([_image_to_uint8(samples[0])] * frames) for _ in pipe.controlnet.units]
            cond = torch.stack(hints)
        pipe._window_noise(x, t_dev, emb, emb if inputs.get("cfg_scale", 7.5) != 1.0 else None, cond, inputs.get("cfg_scale", 7.5),
                           int(inputs.get("unet_batch_size", 1)), int(inputs.get("controlnet_batch_size", 1)),
                           bool(inputs.get("cross_frame_attention", False)), int(inputs.get("vram_limit_level", 0) if inputs.get("vram_limit_level") != "auto" else 0))

    first = _time(lambda: run_window(min(window, 2)), device)  # warm-up, and a measure of how slow this is
    if first / min(window, 2) * window > _WINDOW_BUDGET and window > 2:
        logger.info("calibration: a window of %d frames would take about %s here; timing 2 frames", window, human_seconds(first / 2 * window))
        costs["denoise frames"] = _time(lambda: run_window(2), device) / 2
    else:
        costs["denoise frames"] = _time(lambda: run_window(window), device) / window
    latent = torch.randn(1, 4, height // 8, width // 8, generator=generator)
    decode = lambda: pipe.vae_decoder_fp32(latent.to(pipe.device, torch.float32))  # noqa: E731
    decode()
    costs["VAE decodes"] = _time(decode, device) + files["png write"] + files["latent io"]
    from ..pipelines.sd_image import preprocess_image

    image = preprocess_image(samples[0]).to(pipe.device, pipe.vae_encoder.dtype)
    pipe.vae_encoder(image)
    costs["VAE encodes"] = _time(lambda: pipe.vae_encoder(image), device) + files["png read"] + files["latent io"]
    costs["latent files"] = costs["noise frames"] = files["latent io"]
    if pipe.controlnet is not None:
        for processor in pipe.controlnet.processors:
            processor(samples[0])
            costs[f"annotator frames ({processor.processor_id})"] = _time(lambda: processor(samples[0]), device) + files["png write"]
    source_reader = plan["source"]
    costs["source frames"] = _time(lambda: [source_reader[i] for i in range(min(3, len(source_reader)))], device) / min(3, len(source_reader)) + files["png write"]
    _calibrate_smoothers(config, manager, samples, costs, files, source_reader)
    _calibrate_video(samples, config, costs, files)
    manager.to("cpu")
    return costs


def _calibration_frames(source, count: int) -> tuple[list, float]:
    """The input's first ``count`` frames (repeated for a shorter clip), at most 0.1 MP each, and the pixel ratio back."""
    frames = [source[i % len(source)] for i in range(count)]
    width, height = frames[0].size
    if width * height <= _CALIBRATION_PIXELS:
        return frames, 1.0
    factor = (_CALIBRATION_PIXELS / (width * height)) ** 0.5
    size = (max(8, int(width * factor) // 8 * 8), max(8, int(height * factor) // 8 * 8))
    return [frame.resize(size) for frame in frames], (width * height) / (size[0] * size[1])


def _calibrate_smoothers(config: dict, manager, samples, costs: dict, files: dict, source) -> None:
    from ..processors import SequencialProcessor

    for entry in config.get("smoother_configs") or []:
        kind = entry.get("processor_type") if isinstance(entry, dict) else None
        options = dict((entry.get("config") or {}) if isinstance(entry, dict) else {})
        if kind == "FastBlend":
            mode = options.get("inference_mode", "fast")
            unit = "FastBlend remaps" if mode == "fast" else f"FastBlend remaps ({mode})"
            if unit in costs:
                continue
            # The configured mode, engine settings, batch and blocks on two clip lengths of the input's own frames (so
            # that the call's fixed costs cancel out and the batches are as full as in the run); a small window keeps
            # it short. Frames above 0.1 MP are calibrated at 0.1 MP and scaled by their pixels (a remap's work is).
            batch = int(options.get("batch_size", 8))
            options.update(window_size=1 if mode == "accurate" else 2, cache_folder=None, in_memory=True)
            chain = SequencialProcessor.from_model_manager(manager, [{"processor_type": "FastBlend", "config": options}])
            lengths = (3, 5) if mode == "accurate" else (batch, 2 * batch)
            frames, scale = _calibration_frames(source, lengths[1])
            counted, timed = [], []
            for length in lengths:
                clip = frames[:length]
                counted.append(_remaps(options, length))
                timed.append(_time(lambda: list(chain(clip, original_frames=clip)), torch.device("cpu")))
            costs[unit] = scale * max(timed[1] - timed[0], 1e-4) / max(counted[1] - counted[0], 1)
            continue
        elif kind == "RIFE" and "RIFE frames" not in costs:
            chain = SequencialProcessor.from_model_manager(manager, [{"processor_type": "RIFE", "config": options}])
            frames = list(samples)
            seconds = _time(lambda: list(chain(frames, original_frames=frames)), _SMOOTHER_DEVICE)
            costs["RIFE frames"] = seconds / max(len(frames) - 2, 1) + files["png write"]
        elif kind in ("Contrast", "Sharpness") and "edited frames" not in costs:
            chain = SequencialProcessor.from_model_manager(manager, [{"processor_type": kind, "config": options}])
            costs["edited frames"] = _time(lambda: list(chain(list(samples))), torch.device("cpu")) / len(samples) + files["png write"]


def _remaps(options: dict, n: int) -> int:
    """Patch matches of a FastBlend entry over ``n`` frames (the stages' own count)."""
    from ..pipelines.workload import smoother_work

    work = smoother_work([{"processor_type": "FastBlend", "config": options}], n)[0]
    return sum(work.values())


def _calibrate_video(samples, config: dict, costs: dict, files: dict) -> None:
    from ..data import save_video

    frames = list(samples) * 3
    with tempfile.TemporaryDirectory(prefix=".diffsynth_estimate_") as tmp:
        seconds = _time(lambda: save_video(frames, os.path.join(tmp, "video.mp4"), fps=config["data"].get("fps", 30)), _SMOOTHER_DEVICE)
    costs["frames encoded"] = seconds / len(frames) + files["png read"]
