"""The Video Creator's form and the runner config it becomes (upstream_spec §6.7, §10.2).

Fixes three bugs of the original page: a ControlNet unit's own video path is used (the
original reused the input video's), an empty input path is a message instead of a crash
inside the runner, and a ControlNet without a processor is refused before anything runs.
Paths in the config are absolute, so ``diffsynth run OUTPUT/config.json`` resumes the
render from any working directory.

Beyond the original page, what a Diffutoon render needs: the finished video's frame rate and
audio (the source's by default: ``data.fps`` and ``data.audio`` are left out), its format
(``data.output``), the smoother on the final frames (FastBlend, then RIFE if its model is
there), and a folder of clips as the input (:func:`input_clips`: one render per clip, as
``diffsynth run CONFIG --input FOLDER``).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field

from ..controlnets.annotators import PROCESSOR_IDS
from ..data import UnreadableVideoError
from ..data.images import IMAGE_EXTENSIONS
from ..data.media import probe_media, rate_text
from ..data.output import CODECS, OutputOptions, crf_range, output_problems, pixel_formats, presets as codec_presets
from ..pipelines.batch import find_clips
from ..processors.FastBlend import INFERENCE_MODES, FastBlendSmoother
from .choices import snap_to_8

AUDIO_CHOICES = ("source", "none", "file")
"""``VideoForm.audio``: the source's (``data.audio`` left out), none (``false``), or ``audio_file``'s."""
SMOOTHERS = ("none", "FastBlend")
FASTBLEND_MODES = tuple(m for m in INFERENCE_MODES if m != "interpolation")  # interpolation needs keyframes the page has no way to give
RIFE_MODEL = os.path.join("RIFE", "flownet.pkl")  # under the models folder, where the Diffutoon examples put it
# FastBlend's own defaults (the original's), read from its signature so that the form never disagrees with it
FASTBLEND_DEFAULTS = {name: p.default for name, p in inspect.signature(FastBlendSmoother).parameters.items()
                      if name in ("inference_mode", "window_size", "num_iter", "guide_weight")}


@dataclass(frozen=True)
class CodecChoices:
    """What the page offers for one codec: the crf range and default (None: the codec has no crf), pixel formats, presets."""

    codec: str
    crf_range: tuple[int, int] | None
    crf_default: int | None
    pix_fmts: tuple[str, ...]
    presets: tuple[str, ...]
    file_name: str | None  # the video's name in the output folder (None: PNG frames only)


def codec_choices(codec: str) -> CodecChoices:
    """The options ``data.output`` accepts with ``codec`` (``diffsynth.data.output``'s tables, defaults first)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")
    defaults = OutputOptions.from_config({"codec": codec})
    crf = crf_range(codec)
    presets = codec_presets(codec)
    if presets:  # the default first, so a selectbox's first option is the default
        presets = (defaults.preset,) + tuple(p for p in presets if p != defaults.preset)
    return CodecChoices(codec=codec, crf_range=None if crf is None else (crf[0], crf[1]), crf_default=defaults.crf,
                        pix_fmts=pixel_formats(codec), presets=presets, file_name=defaults.file_name)


def rife_model(models_root: str) -> str | None:
    """``models_root/RIFE/flownet.pkl`` when it is there (the page offers RIFE only then), else None."""
    path = os.path.join(models_root, RIFE_MODEL)
    return os.path.abspath(path) if os.path.isfile(path) else None


def _images_in(folder: str) -> int:
    """How many images (by extension, hidden files skipped) lie directly in ``folder``."""
    with os.scandir(folder) as entries:
        return sum(e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries)


def input_clips(path: str) -> list[str] | None:
    """The clips of a batch when ``path`` is a folder of video files (and no images), naturally sorted; None otherwise
    (a video file, an image folder, a folder without videos, nothing)."""
    path = os.path.abspath(os.path.expanduser(path.strip())) if path and path.strip() else ""
    if not path or not os.path.isdir(path):
        return None
    if _images_in(path):
        return None  # an image folder is one video, as it always was
    try:
        return find_clips(path)
    except ValueError:  # no video files in it
        return None


def describe_input(path: str) -> str:
    """One line about the input for the page: a video's size, exact frame rate and audio; a folder's clips or images.

    Never raises: an unreadable file is described by ffmpeg's reason.
    """
    path = os.path.expanduser(path.strip())
    if not path:
        return ""
    if not os.path.exists(path):
        return f"{path} does not exist"
    if os.path.isdir(path):
        clips = input_clips(path)
        if clips is not None:
            names = ", ".join(os.path.basename(c) for c in clips[:5]) + (", ..." if len(clips) > 5 else "")
            return f"a folder of {len(clips)} clip{'s' if len(clips) != 1 else ''} ({names}): each is rendered into a folder of its own"
        images = _images_in(path)
        if not images:
            return f"{path} holds neither video files nor images ({', '.join(IMAGE_EXTENSIONS)})"
        return f"a folder of {images} images: the video gets 30 fps unless you set the frame rate"
    try:
        media = probe_media(path, count=False)
    except UnreadableVideoError as exc:
        return f"cannot read {os.path.basename(path)}: {exc.detail}"
    except (OSError, ValueError) as exc:
        return f"cannot read {os.path.basename(path)}: {exc}"
    rate = rate_text(media.rate) + (" average, variable" if media.variable else "")
    audio = "; ".join(stream.describe() for stream in media.audio) if media.audio else "no audio"
    length = f", {media.duration:.2f} s" if media.duration is not None else ""
    return f"{os.path.basename(path)}: {media.width}x{media.height}, {rate}, {media.packets} frames{length}; audio: {audio}"


@dataclass
class ControlNetUnitForm:
    """One ControlNet tab. ``use_input_video=False`` reads ``video_path`` (a file or an image folder) instead."""

    model_path: str | None = None
    processor_id: str | None = None
    scale: float = 0.5
    use_input_video: bool = True
    video_path: str = ""
    start_frame_id: int = 0
    end_frame_id: int | None = 16


@dataclass
class VideoForm:
    sd_model: str | None = None
    animatediff_model: str | None = None
    lora_model: str | None = None
    lora_alpha: float = 1.0
    input_path: str = ""
    width: int = 1024
    height: int = 1024
    start_frame_id: int = 0
    end_frame_id: int | None = 16
    output_folder: str = "output"
    fps: float | None = None  # None: the source's exact rate (data.fps left out)
    audio: str = "source"  # one of AUDIO_CHOICES
    audio_file: str = ""  # audio == "file": the file whose audio the video carries
    codec: str = "h264"
    crf: int | None = None  # None: the codec's default; ignored by codecs without one (prores, gif, png)
    pix_fmt: str | None = None  # None: the codec's default
    preset: str | None = None  # None: the codec's default (h264/h265 only)
    smoother: str = "none"  # one of SMOOTHERS
    fastblend_mode: str = FASTBLEND_DEFAULTS["inference_mode"]
    fastblend_window_size: int = FASTBLEND_DEFAULTS["window_size"]
    fastblend_num_iter: int = FASTBLEND_DEFAULTS["num_iter"]
    fastblend_guide_weight: float = FASTBLEND_DEFAULTS["guide_weight"]
    rife: bool = False  # RIFE after the FastBlend pass (or alone); needs models/RIFE/flownet.pkl
    controlnet_units: list[ControlNetUnitForm] = field(default_factory=list)
    seed: int = 0
    prompt: str = ""
    negative_prompt: str = ""
    cfg_scale: float = 7.0
    clip_skip: int = 1
    num_inference_steps: int = 10
    sampler: str = "ddim"  # pipeline_inputs.sampler (diffsynth.schedulers)
    denoising_strength: float = 1.0
    animatediff_batch_size: int = 16
    animatediff_stride: int = 8
    unet_batch_size: int = 1
    controlnet_batch_size: int = 1
    cross_frame_attention: bool = False
    device: str = "cpu"


def _frames_spec(path: str, what: str, width: int, height: int, start: int, end: int | None, clips: bool = False) -> dict:
    """``data.input_frames``' shape; ``clips``: a folder of clips reads as its first clip (the batch swaps in each one)."""
    path = path.strip()
    if not path:
        raise ValueError(f"{what}: give the path of a video file or of a folder of images" + (" or of clips" if clips else ""))
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise ValueError(f"{what}: {path} does not exist")
    if end is not None and end <= start:
        raise ValueError(f"{what}: the end frame id ({end}) must be greater than the start frame id ({start})")
    found = input_clips(path) if clips else None
    if found:
        path = found[0]
    is_folder = os.path.isdir(path)
    return {"video_file": None if is_folder else path, "image_folder": path if is_folder else None,
            "height": height, "width": width, "start_frame_id": start, "end_frame_id": end}


def _output_options(form: VideoForm) -> dict:
    """``data.output`` with every option the codec has (the form's, else the codec's default), checked."""
    if form.codec not in CODECS:
        raise ValueError(f"codec: choose one of {', '.join(CODECS)}, got {form.codec!r}")
    choices = codec_choices(form.codec)  # the defaults come first in its lists
    value = {"codec": form.codec,
             "crf": (choices.crf_default if form.crf is None else int(form.crf)) if choices.crf_range else None,
             "pix_fmt": (form.pix_fmt or choices.pix_fmts[0]) if choices.pix_fmts else None,
             "preset": (form.preset or choices.presets[0]) if choices.presets else None}
    value = {key: v for key, v in value.items() if v is not None}
    problems = output_problems(value)
    if problems:
        key, message, remedy = problems[0]
        raise ValueError(f"Output: {key} {message}; {remedy}")
    return value


def _audio(form: VideoForm, output: dict) -> dict:
    """``{"audio": ...}`` for ``data`` (empty: the source's audio, the runner's default)."""
    if form.audio == "source":
        return {}
    if form.audio == "none":
        return {"audio": False}
    if form.audio != "file":
        raise ValueError(f"Audio: choose one of {', '.join(AUDIO_CHOICES)}, got {form.audio!r}")
    path = os.path.abspath(os.path.expanduser(form.audio_file.strip())) if form.audio_file.strip() else ""
    if not path:
        raise ValueError("Audio: give the file whose audio the video carries, or choose the source's or none")
    if not os.path.isfile(path):
        raise ValueError(f"Audio: {path} does not exist")
    if not OutputOptions.from_config(output).carries_audio:
        raise ValueError(f"Audio: a {output['codec']} video carries no audio; choose a video codec (h264, h265, vp9, prores) or no audio")
    return {"audio": path}


def _smoothers(form: VideoForm, models_root: str) -> tuple[list[dict], list[str]]:
    """``smoother_configs`` (FastBlend, then RIFE) and the model files they need."""
    configs, models = [], []
    if form.smoother == "FastBlend":
        if form.fastblend_mode not in FASTBLEND_MODES:
            raise ValueError(f"FastBlend: choose a mode of {', '.join(FASTBLEND_MODES)}, got {form.fastblend_mode!r}")
        if int(form.fastblend_window_size) < 1 or int(form.fastblend_num_iter) < 1:
            raise ValueError("FastBlend: the window size and the iterations must be at least 1")
        configs.append({"processor_type": "FastBlend", "config": {
            "inference_mode": form.fastblend_mode, "window_size": int(form.fastblend_window_size),
            "num_iter": int(form.fastblend_num_iter), "guide_weight": float(form.fastblend_guide_weight)}})
    elif form.smoother != "none":
        raise ValueError(f"Smoother: choose one of {', '.join(SMOOTHERS)}, got {form.smoother!r}")
    if form.rife:
        model = rife_model(models_root)
        if model is None:
            raise ValueError(f"RIFE needs its model at {os.path.join(models_root, RIFE_MODEL)}")
        models.append(model)
        configs.append({"processor_type": "RIFE", "config": {}})
    return configs, models


def build_video_config(form: VideoForm, models_root: str) -> dict:
    """A runner config (the shape ``diffsynth run`` reads) from the form; ``ValueError`` with a user-facing message when incomplete."""
    if not form.sd_model:
        raise ValueError(f"choose a Stable Diffusion model (files in {os.path.join(models_root, 'stable_diffusion')})")
    if not form.prompt.strip():
        raise ValueError("write a positive prompt")
    width, height = snap_to_8(form.width), snap_to_8(form.height)
    source = _frames_spec(form.input_path, "Input video", width, height, form.start_frame_id, form.end_frame_id, clips=True)
    model_list = [os.path.abspath(form.sd_model)]
    if form.animatediff_model:
        model_list.append(os.path.abspath(form.animatediff_model))
    lora_alphas = []
    if form.lora_model:
        model_list.append(os.path.abspath(form.lora_model))
        lora_alphas.append(float(form.lora_alpha))
    units, unit_frames = [], []
    for k, unit in enumerate(form.controlnet_units):
        if not unit.model_path:
            continue
        if unit.processor_id not in PROCESSOR_IDS:
            raise ValueError(f"ControlNet unit {k + 1}: choose a processor for {os.path.basename(unit.model_path)} (one of {', '.join(PROCESSOR_IDS)})")
        path = os.path.abspath(unit.model_path)
        model_list.append(path)
        units.append({"processor_id": unit.processor_id, "model_path": path, "scale": float(unit.scale)})
        if unit.use_input_video:
            unit_frames.append(dict(source))
        else:
            # Same size as the input: the runner feeds both to one UNet, frame by frame.
            spec = _frames_spec(unit.video_path, f"ControlNet unit {k + 1} video", width, height, unit.start_frame_id, unit.end_frame_id)
            n_source = None if source["end_frame_id"] is None else source["end_frame_id"] - source["start_frame_id"]
            n_unit = None if spec["end_frame_id"] is None else spec["end_frame_id"] - spec["start_frame_id"]
            if n_source is not None and n_unit is not None and n_source != n_unit:
                raise ValueError(f"ControlNet unit {k + 1} video: its frame range holds {n_unit} frames but the input video's holds {n_source}; give ranges of the same length")
            unit_frames.append(spec)
    stride = max(1, min(int(form.animatediff_stride), int(form.animatediff_batch_size)))
    output = _output_options(form)
    data = {
        "input_frames": source,
        "controlnet_frames": unit_frames,
        "output_folder": os.path.abspath(os.path.expanduser(form.output_folder.strip() or "output")),
        "output": output,
        **_audio(form, output),
    }
    if form.fps is not None:  # else left out: the video gets the source's exact rate (30000/1001 stays 30000/1001)
        if not float(form.fps) > 0:
            raise ValueError(f"FPS must be above 0, got {form.fps}")
        data["fps"] = int(form.fps) if float(form.fps).is_integer() else float(form.fps)
    smoothers, smoother_models = _smoothers(form, models_root)
    model_list += smoother_models
    ti_folder = os.path.abspath(os.path.join(models_root, "textual_inversion"))
    config = {
        "models": {
            "model_list": model_list,
            # only a folder that is there (the runner's checks refuse a missing one; a models folder need not have it)
            "textual_inversion_folder": ti_folder if os.path.isdir(ti_folder) else None,
            "annotator_folder": os.path.abspath(os.path.join(models_root, "Annotators")),
            "device": form.device,
            "lora_alphas": lora_alphas,
            "controlnet_units": units,
        },
        "data": data,
        "pipeline": {
            "seed": int(form.seed),
            "pipeline_inputs": {
                "prompt": form.prompt,
                "negative_prompt": form.negative_prompt,
                "cfg_scale": float(form.cfg_scale),
                "clip_skip": int(form.clip_skip),
                "denoising_strength": float(form.denoising_strength),
                "num_inference_steps": int(form.num_inference_steps),
                "sampler": form.sampler,
                "animatediff_batch_size": int(form.animatediff_batch_size),
                "animatediff_stride": stride,
                "unet_batch_size": int(form.unet_batch_size),
                "controlnet_batch_size": int(form.controlnet_batch_size),
                "cross_frame_attention": bool(form.cross_frame_attention),
                # the runner fills these from data (as the original's runner did)
                "input_frames": [],
                "num_frames": None,
                "width": width,
                "height": height,
                "controlnet_frames": [],
            },
        },
    }
    if smoothers:  # on the final frames, as the Diffutoon examples do
        config["smoother_configs"] = smoothers
        config["pipeline"]["pipeline_inputs"]["smoother_progress_ids"] = [-1]
    return config
