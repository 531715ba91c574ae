"""Pre-flight checks of a runner config: everything that can be wrong, found before anything is written.

Every file and folder the config names must exist and be what its key says (model files are
recognised from their headers, folders from their layout, videos by ffmpeg), sizes and frame
ranges must be valid, and the output folder writable. All problems are collected and reported
together, each naming the config key, the path as written and as resolved, and the remedy, in
one :class:`PreflightError`. Nothing here writes: a config that fails its checks leaves the
output folder exactly as it was (the first promise: a rerun never costs finished work).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from fractions import Fraction

from ..controlnets.annotators import PROCESSOR_IDS
from ..controlnets.annotators.files import depth_alternative, identify_annotator_file, needed_files
from ..data import UnreadableVideoError, VideoData
from ..data.media import MediaInfo, rate_text
from ..data.output import AudioClip, OutputOptions, output_problems
from ..models.detect import detect
from ..models.errors import ModelFileError
from ..models.state_dict import read_header
from .config_paths import PathOrigin

# Families of model_list entries the video runner can use (SD 1.x only: the video pipeline is SD 1.x's).
_SD_FAMILIES = ("sd1_checkpoint", "unet_diffusers", "diffusers_folder")


@dataclass
class Problem:
    key: str
    message: str
    remedy: str
    origin: PathOrigin | None = None

    def format(self, number: int) -> str:
        lines = [f"  {number}. {self.key}: {self.message}"]
        if self.origin is not None:
            origin = self.origin
            lines.append(f"     path as written: {origin.written}")
            if len(origin.tried) > 1:
                lines.append(f"     resolved: looked for {' and '.join(origin.tried)} (the config's folder first, then the working directory)")
            elif origin.resolved != origin.written:
                lines.append(f"     resolved: {origin.resolved}")
        lines.append(f"     fix: {self.remedy}")
        return "\n".join(lines)


class PreflightError(ValueError):
    """The config cannot run; ``problems`` lists every reason. Nothing was written."""

    def __init__(self, problems: list[Problem], out: str | None, where: str | None = None):
        """``where``: the process that found them, on a run of several (``rank 1 (host gpu2, pid 4242)``)."""
        self.problems = list(problems)
        self.out = out
        written = f"nothing in {out} was changed" if out else "nothing was written"
        head = (f"{where + ': ' if where else ''}the config cannot run ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}, "
                f"found before any work; {written}):")
        super().__init__("\n".join([head] + [p.format(i) for i, p in enumerate(self.problems, 1)]))


@dataclass
class Checked:
    """What the checks found and opened, for the runner to use instead of opening it again."""

    problems: list[Problem] = field(default_factory=list)
    families: dict[str, str] = field(default_factory=dict)  # model_list path -> detected family
    source: VideoData | None = None
    controls: list[VideoData] = field(default_factory=list)
    annotator_files: dict[str, str] = field(default_factory=dict)  # file name -> path, the files stage 1 reads
    headers: dict[str, dict] = field(default_factory=dict)  # model file -> its tensors' shapes and dtypes (for the estimate)
    opened: dict[tuple, VideoData] = field(default_factory=dict)  # (path, is video, height, width) -> reader
    media: MediaInfo | None = None  # the input video's streams and timestamps (None: an image folder)
    fps: Fraction | None = None  # the finished video's frame rate
    output: OutputOptions | None = None  # data.output with its defaults
    audio: AudioClip | None = None  # the finished video's audio (None: silent)
    notes: list[str] = field(default_factory=list)  # what a user should know about the source and the output (warned, recorded)

    def add(self, key: str, message: str, remedy: str, origin: PathOrigin | None = None) -> None:
        self.problems.append(Problem(key, message, remedy, origin))


def _missing_remedy(path: str, what: str) -> str:
    """How to get a missing model file: the download catalogue's entry when it knows the file name."""
    from ..download import CATALOGUE

    entry = CATALOGUE.get(os.path.basename(path))
    moved = "or correct the path (a moved models folder or an unmounted drive looks like this)"
    if entry is not None:
        return (f"put {entry.filename} at {path} (`diffsynth download {entry.filename} --to MODELS_FOLDER`, from {entry.url}), {moved}")
    return f"put the {what} at {path} {moved}; docs/models.md says where each file comes from"


def _model_family(checked: Checked, key: str, path: str, origin: PathOrigin | None) -> str | None:
    """The family of a model_list entry (file header or folder layout), or None after adding the problem."""
    from ..prompts.prompt_models import prompt_model_component

    if not os.path.exists(path):
        checked.add(key, "model file not found", _missing_remedy(path, "model file"), origin)
        return None
    if os.path.isdir(path):
        component = prompt_model_component(path)
        if component is not None:
            return component
        if any(os.path.isdir(os.path.join(path, sub)) for sub in ("unet", "vae", "text_encoder")) or os.path.isfile(os.path.join(path, "config.json")):
            return "diffusers_folder"
        checked.add(key, f"{path} is a folder but not a model folder (no unet/, vae/ or text_encoder/ sub-folder, no config.json)",
                    "point to the checkpoint file, or to the diffusers / Hugging Face model folder itself", origin)
        return None
    try:
        header = read_header(path)
        checked.headers[path] = header
        kind = detect(header, source=path)
    except ModelFileError as exc:
        checked.add(key, f"{exc.problem}", exc.remedy or "replace the file with a complete download", origin)
        return None
    except (OSError, ValueError, RuntimeError) as exc:
        checked.add(key, f"cannot read {path}: {exc}", "replace the file with a complete download, or remove it from models.model_list", origin)
        return None
    if not kind.supported:
        checked.add(key, f"is a {kind.description}", kind.note, origin)
        return None
    if kind.family == "textual_inversion":
        checked.add(key, "is a textual inversion embedding, not a model",
                    "move it into the folder named by models.textual_inversion_folder and remove it from models.model_list", origin)
        return None
    return kind.family


def _check_models(config: dict, origins: dict[str, PathOrigin], checked: Checked) -> None:
    models = config["models"]
    model_list = models.get("model_list") or []
    for i, path in enumerate(model_list):
        family = _model_family(checked, f"models.model_list[{i}]", path, origins.get(f"models.model_list[{i}]"))
        if family is not None:
            checked.families[path] = family
    if len(checked.families) == len(model_list):  # every entry recognised: the list as a whole can be judged
        families = list(checked.families.values())
        if "sdxl_checkpoint" in families:
            checked.add("models.model_list", "holds an SDXL checkpoint; the video runner renders with Stable Diffusion 1.x (AnimateDiff and the "
                        "ControlNets are SD 1.x models)", "use an SD 1.x checkpoint for video (SDXL works in SDXLImagePipeline and `diffsynth txt2img`)")
        elif not any(f in _SD_FAMILIES for f in families):
            checked.add("models.model_list", "holds no Stable Diffusion 1.x checkpoint", "add the checkpoint (e.g. models/stable_diffusion/aingdiffusion_v12.safetensors) first in the list")
        loras, alphas = families.count("lora"), models.get("lora_alphas") or []
        if loras != len(alphas):
            checked.add("models.lora_alphas", f"has {len(alphas)} entr{'y' if len(alphas) == 1 else 'ies'} but models.model_list holds {loras} LoRA file(s)",
                        "give one strength per LoRA file, in the order of the list")
    folder = models.get("textual_inversion_folder")
    if folder:
        key = "models.textual_inversion_folder"
        if not os.path.isdir(folder):
            checked.add(key, "folder not found" if not os.path.exists(folder) else "is not a folder",
                        "create it with the embeddings the prompts name (e.g. verybadimagenegative_v1.3.pt), correct the path, or remove the key", origins.get(key))
    listed = {os.path.realpath(p): p for p in model_list}
    for k, unit in enumerate(models.get("controlnet_units") or []):
        key = f"models.controlnet_units[{k}]"
        if not isinstance(unit, dict) or "processor_id" not in unit or "model_path" not in unit:
            checked.add(key, f"must be a dict with processor_id, model_path and scale, got {unit!r}", "see the Diffutoon examples for the shape of a unit")
            continue
        if unit["processor_id"] not in PROCESSOR_IDS:
            checked.add(f"{key}.processor_id", f"unknown processor {unit['processor_id']!r}", f"use one of {', '.join(PROCESSOR_IDS)}")
        path = unit["model_path"]
        entry = listed.get(os.path.realpath(path))
        family = checked.families.get(entry)  # None: not listed, or listed and already reported as unusable
        if entry is None and os.path.exists(path):
            checked.add(f"{key}.model_path", f"{path} is not in models.model_list, so it would not be loaded", "add it to models.model_list", origins.get(f"{key}.model_path"))
        elif entry is None:
            checked.add(f"{key}.model_path", "ControlNet file not found", _missing_remedy(path, "ControlNet file"), origins.get(f"{key}.model_path"))
        elif family is not None and family not in ("controlnet", "controlnet_diffusers", "diffusers_folder"):
            checked.add(f"{key}.model_path", f"is a {family} file, not a ControlNet", "point the unit at a ControlNet file (control_v11*.pth)")
    _check_annotators(models, origins, checked)


def _check_annotators(models: dict, origins: dict[str, PathOrigin], checked: Checked) -> None:
    folder = models["annotator_folder"]
    origin = origins.get("models.annotator_folder")
    seen = set()
    for unit in models.get("controlnet_units") or []:
        processor = unit.get("processor_id") if isinstance(unit, dict) else None
        for entry in needed_files(processor):
            if entry.filename in seen:
                continue
            seen.add(entry.filename)
            path = os.path.join(folder, entry.filename)
            if processor == "depth" and not os.path.isfile(path):
                alternative = depth_alternative(folder)
                if alternative is not None:
                    checked.annotator_files[os.path.basename(alternative)] = alternative
                    continue
            key = f"models.annotator_folder ({processor} needs {entry.filename})"
            if not os.path.isfile(path):
                checked.add(key, f"annotator weight file {entry.filename} not found in {folder}",
                            f"download it from {entry.url} into that folder (`diffsynth download {entry.filename} --to MODELS_FOLDER`), "
                            "or set models.annotator_folder to the folder that holds it", origin)
                continue
            try:
                matched = identify_annotator_file(read_header(path))
            except (ModelFileError, OSError, ValueError, RuntimeError) as exc:
                checked.add(key, f"cannot read {path}: {exc}", f"download it again from {entry.url}", origin)
                continue
            if matched is None or matched.filename != entry.filename:
                found = f"a {matched.description}" if matched is not None else "no annotator file this program knows"
                checked.add(key, f"{path} is {found}, not the {entry.description}", f"download it again from {entry.url}", origin)
                continue
            checked.annotator_files[entry.filename] = path


def open_frames(spec, key: str, origins: dict[str, PathOrigin], checked: Checked) -> VideoData | None:
    """The cropped/resized frame range a ``{video_file|image_folder, height, width, start_frame_id, end_frame_id}`` dict selects.

    Returns None after adding the problems to ``checked``. A range whose end lies past the
    readable end is a problem naming the readable count; ``end_frame_id: null`` reads to the end.
    """
    if not isinstance(spec, dict):
        checked.add(key, f"must be a dict with video_file or image_folder, got {spec!r}", "see the Diffutoon examples for its shape")
        return None
    bad = False
    for name in ("height", "width"):
        value = spec.get(name)
        if value is not None and (not isinstance(value, int) or value <= 0 or value % 8):
            nearest = max(8, round(value / 8) * 8) if isinstance(value, (int, float)) else 8
            checked.add(f"{key}.{name}", f"must be a positive multiple of 8, got {value!r}; nearest valid: {nearest}", f"set it to {nearest}")
            bad = True
    start, end = spec.get("start_frame_id") or 0, spec.get("end_frame_id")
    times = {name: spec[name] for name in ("start_time", "end_time") if spec.get(name) is not None}
    if times:
        bad = _check_times(spec, times, key, checked) or bad
    elif not isinstance(start, int) or start < 0 or (end is not None and (not isinstance(end, int) or end <= start)):
        checked.add(f"{key}.start_frame_id/end_frame_id", f"[{start}, {end}) is not a frame range",
                    "give 0 <= start_frame_id < end_frame_id (integers), or end_frame_id null for 'to the end'")
        bad = True
    video_file, image_folder = spec.get("video_file"), spec.get("image_folder")
    if bool(video_file) == bool(image_folder):
        checked.add(key, "needs exactly one of video_file and image_folder", "set one and make the other null")
        return None
    path_key = f"{key}.video_file" if video_file else f"{key}.image_folder"
    path = video_file or image_folder
    if not os.path.exists(path):
        checked.add(path_key, "not found", "put the file there or correct the path (relative paths: the config's folder first, then the working directory)",
                    origins.get(path_key))
        return None
    if video_file and not os.path.isfile(path) or image_folder and not os.path.isdir(path):
        checked.add(path_key, f"is not a {'file' if video_file else 'folder'}", f"give the {'video file' if video_file else 'folder of images'} here", origins.get(path_key))
        return None
    try:
        opened = (path, bool(video_file), spec.get("height"), spec.get("width"))
        shared = opened in checked.opened  # one reader per source: its frame count is decoded (and any warning given) once
        if not shared:
            checked.opened[opened] = VideoData(video_file=video_file or None, image_folder=image_folder or None, height=spec.get("height"), width=spec.get("width"))
        video = checked.opened[opened]
        if bad:
            return None
        if times:
            selected = _frames_of_times(video, times, key, path, checked)
            if selected is None:
                return None
            start, end = selected
            spec["start_frame_id"], spec["end_frame_id"] = start, end  # the frames the times select: what the cache keys name
        frames = video.range(start, end)
        count = len(frames)
    except UnreadableVideoError as exc:
        checked.add(path_key, f"ffmpeg cannot read it as a video: {exc.detail}", "give a complete video file (re-download or re-export it)", origins.get(path_key))
        return None
    except (OSError, ValueError) as exc:
        checked.add(path_key, f"cannot read it: {exc}", "give a readable video file or a folder of images", origins.get(path_key))
        return None
    if end is not None and count < end - start:
        readable = start + count
        checked.add(f"{key}.end_frame_id", f"is {end}, past the readable end of {path}: it has {readable} readable frames",
                    f"set end_frame_id to {readable} or less, or to null for 'to the end'")
        return None
    if count == 0:
        checked.add(f"{key}.start_frame_id", f"is {start}, at or past the readable end of {path} (it has {len(video)} readable frames)",
                    "choose a start_frame_id inside the video")
        return None
    # A second spec of the same source gets its own decoder (readers of different regions would keep restarting
    # each other), copied with the frame count already known.
    return copy.deepcopy(frames) if shared else frames


def _check_times(spec: dict, times: dict, key: str, checked: Checked) -> bool:
    """Whether ``start_time``/``end_time`` are wrong (the problems added): seconds, in order, not mixed with frame ids, on a video."""
    bad = False
    for name, value in times.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            checked.add(f"{key}.{name}", f"must be a number of seconds >= 0, got {value!r}", "give seconds from the start of the video, e.g. 12.5")
            bad = True
    if not bad and "end_time" in times and times["end_time"] <= times.get("start_time", 0):
        checked.add(f"{key}.start_time/end_time", f"[{times.get('start_time', 0)}, {times['end_time']}) s is not a time range", "give end_time > start_time")
        bad = True
    mixed = [f"{name} and {frame_name}" for name, frame_name in (("start_time", "start_frame_id"), ("end_time", "end_frame_id"))
             if name in times and spec.get(frame_name) not in (None, 0 if frame_name == "start_frame_id" else None)]
    if mixed:
        checked.add(key, f"gives both {mixed[0]}", "select the frames either by time (start_time/end_time, seconds) or by frame id, not both")
        bad = True
    if spec.get("image_folder"):
        checked.add(key, "selects frames by time, but an image folder has no timestamps", "use start_frame_id/end_frame_id for an image folder")
        bad = True
    return bad


def _frames_of_times(video: VideoData, times: dict, key: str, path: str, checked: Checked) -> tuple[int, int | None] | None:
    """The frame range ``[start, end)`` that ``start_time``/``end_time`` select, by the video's timestamps (None: a problem added)."""
    media = video.media()
    length = media.duration
    start = media.frame_at(times.get("start_time", 0))
    end = media.frame_at(times["end_time"]) if "end_time" in times else None
    if length is not None and times.get("start_time", 0) >= length:
        checked.add(f"{key}.start_time", f"is {times['start_time']} s, at or past the end of {path} ({length:.3f} s)", "choose a time inside the video")
        return None
    if end is not None and length is not None and times["end_time"] > length + 1e-6:
        checked.add(f"{key}.end_time", f"is {times['end_time']} s, past the end of {path} ({length:.3f} s)",
                    f"set end_time to {length:.3f} or less, or leave it out for 'to the end'")
        return None
    if end is not None and end <= start:
        checked.add(f"{key}.start_time/end_time", f"[{times.get('start_time', 0)}, {times['end_time']}) s holds no frame of {path}",
                    f"widen the range: frames come every {1 / float(media.rate or 1):.4f} s")
        return None
    return start, end


def _check_frames(config: dict, origins: dict[str, PathOrigin], checked: Checked) -> None:
    data = config["data"]
    checked.source = open_frames(data.get("input_frames"), "data.input_frames", origins, checked)
    units = (config["models"].get("controlnet_units") or [])
    specs = data.get("controlnet_frames") or []
    if specs and len(specs) != len(units):
        checked.add("data.controlnet_frames", f"has {len(specs)} entries but models.controlnet_units has {len(units)}", "give one entry per unit")
        return
    source = checked.source
    size = source[0].size if source is not None else None
    if size is not None and (size[0] % 8 or size[1] % 8):
        checked.add("data.input_frames", f"frames are {size[0]}x{size[1]}; both sides must be multiples of 8",
                    f"set height and width (nearest valid: {round(size[1] / 8) * 8}x{round(size[0] / 8) * 8} as height x width)")
    for k, spec in enumerate(specs):
        frames = open_frames(spec, f"data.controlnet_frames[{k}]", origins, checked)
        if frames is None or source is None:
            continue
        if len(frames) != len(source):
            checked.add(f"data.controlnet_frames[{k}]", f"selects {len(frames)} frames but data.input_frames selects {len(source)}", "give ranges of the same length")
        elif frames[0].size != size:
            checked.add(f"data.controlnet_frames[{k}]", f"frames are {frames[0].size[0]}x{frames[0].size[1]}, input frames {size[0]}x{size[1]}", "give the same height and width")
        else:
            checked.controls.append(frames)
    if units and not specs and source is not None:
        checked.controls = [source] * len(units)  # the original fed each unit the input video when no frames were listed


def _check_smoothers(config: dict, checked: Checked) -> None:
    from ..processors.sequential import PROCESSOR_TYPES

    for k, entry in enumerate(config.get("smoother_configs") or []):
        key = f"smoother_configs[{k}]"
        if not isinstance(entry, dict) or entry.get("processor_type") not in PROCESSOR_TYPES:
            checked.add(key, f"is not a known smoother: {entry!r}", f"an entry is {{'processor_type': one of {', '.join(PROCESSOR_TYPES)}, 'config': {{...}}}}")
        elif not isinstance(entry.get("config") or {}, dict):
            checked.add(f"{key}.config", f"must be a dict of options, got {entry['config']!r}", "give the options as a dict, or {}")
        elif entry["processor_type"] == "RIFE" and "rife" not in checked.families.values() and len(checked.families) == len(config["models"].get("model_list") or []):
            checked.add(key, "RIFE smoothing needs the RIFE model, and models.model_list holds none", "add models/RIFE/flownet.pkl to models.model_list")


def _check_output(config: dict, origins: dict[str, PathOrigin], checked: Checked) -> None:
    data = config["data"]
    out = data.get("output_folder")
    key = "data.output_folder"
    if not out:
        checked.add(key, "is missing", "name the folder the render goes to")
        return
    if os.path.exists(out) and not os.path.isdir(out):
        checked.add(key, f"{out} exists and is not a folder", "choose another output folder", origins.get(key))
        return
    existing = out
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        checked.add(key, f"{existing} is not writable", "choose a folder you can write to, or fix its permissions", origins.get(key))
    if data.get("clear_output_folder") and os.path.isdir(out) and os.listdir(out) and not any(
            os.path.isfile(os.path.join(out, name)) for name in ("manifest.json", "config.json", "last_process_id.txt")):
        checked.add("data.clear_output_folder", f"is true, and {out} holds files but is not a render's output folder (no manifest.json or config.json)",
                    "choose an empty or new output folder: clear_output_folder would delete everything in it")


def _check_finish(config: dict, origins: dict[str, PathOrigin], checked: Checked) -> None:
    """The finished video: its frame rate (``data.fps``, else the source's exact rate), format (``data.output``), audio (``data.audio``)."""
    data = config["data"]
    problems = output_problems(data.get("output"))
    for key, message, remedy in problems:
        checked.add(key, message, remedy)
    output = None if problems else OutputOptions.from_config(data.get("output"))
    checked.output = output
    source = checked.source
    media = source.media() if source is not None else None
    checked.media = media
    spec = data.get("input_frames") if isinstance(data.get("input_frames"), dict) else {}
    name = os.path.basename(spec.get("video_file") or spec.get("image_folder") or "the input")
    if media is not None and media.header_lies:
        checked.notes.append(f"{name}: its header claims {media.header_frames} frames but only {media.decoded_frames} decode; "
                             f"the render uses those {media.decoded_frames} (the file may be truncated or damaged)")
    fps = data.get("fps")
    if fps is not None:
        rate = _rate(fps)
        if rate is None:
            checked.add("data.fps", f"must be a frame rate > 0 (a number or a fraction like \"30000/1001\"), got {fps!r}",
                        "give the finished video's frame rate, or leave data.fps out for the source's own")
            return
    elif media is not None and media.rate is not None:
        rate = media.rate
    else:
        rate = Fraction(30)
        checked.notes.append(f"{name} has no frame rate (an image folder): the video is written at 30 fps; set data.fps to choose")
    checked.fps = rate
    if media is not None and media.variable:
        low, high = media.rate_range
        checked.notes.append(f"{name} has a variable frame rate ({low:.3f}-{high:.3f} fps): its frames are read as presented, each once, "
                             f"and written at {'data.fps = ' + rate_text(rate) if fps is not None else 'its average rate ' + rate_text(rate)}")
    if source is None:
        return
    checked.audio = _audio(data, origins, checked, media, source, rate, name)


def _rate(value) -> Fraction | None:
    """``data.fps`` as an exact rate: a fraction string ("30000/1001") as written; a number snapped to the NTSC rate it
    stands for (29.97 -> 30000/1001, within 0.01%)."""
    from ..data.media import _snap

    if isinstance(value, bool):
        return None
    try:
        rate = Fraction(value) if isinstance(value, str) else _snap(Fraction(str(value)), Fraction(1, 10**4))
    except (ValueError, ZeroDivisionError, TypeError):
        return None
    return rate if rate > 0 else None


def _audio(data: dict, origins: dict[str, PathOrigin], checked: Checked, media: MediaInfo | None, source: VideoData,
           rate: Fraction, name: str) -> AudioClip | None:
    """The audio the finished video carries (None: silent), cut to the rendered frames' time on the source's timeline."""
    choice = data.get("audio", True)
    output = checked.output
    if choice is False or choice is None:
        return None
    if choice is not True and not isinstance(choice, (str, os.PathLike)):
        checked.add("data.audio", f"must be true, false or the path of a file with audio, got {choice!r}",
                    "leave it out (the source's audio), false (silent), or a file whose audio to use")
        return None
    explicit = choice is not True
    if output is not None and not output.carries_audio:
        if explicit:
            checked.add("data.audio", f"names {choice}, but data.output.codec {output.codec} carries no audio",
                        "use a video codec (h264, h265, vp9, prores), or remove data.audio")
        return None
    n = len(source)
    first = source.first_frame
    duration = Fraction(n) / rate
    if explicit:
        path = os.fspath(choice)
        if not os.path.isfile(path):
            checked.add("data.audio", "file not found", "put the file there or correct the path", origins.get("data.audio"))
            return None
        try:
            from ..data.media import probe_media

            streams = probe_media(path, count=False).audio
        except UnreadableVideoError as exc:
            streams, problem = (), exc.detail
        else:
            problem = None if streams else "it has no audio stream"
        if problem is not None:
            checked.add("data.audio", f"cannot take audio from {path}: {problem}", "give a video or audio file that has sound, or false for none",
                        origins.get("data.audio"))
            return None
        start = media.frame_time(first) if media is not None else Fraction(first) / rate
        return AudioClip(path=path, start=start, duration=duration, note=f"audio of {os.path.basename(path)} from {float(start):.3f} s")
    if media is None or not media.audio:
        return None  # an image folder, or a source without sound: a silent video, no error
    if media.rate is not None and abs(rate - media.rate) > media.rate * Fraction(1, 1000):
        checked.notes.append(f"data.fps {rate_text(rate)} differs from {name}'s {rate_text(media.rate)}: the video plays at another speed "
                             "than the source, and its audio (cut to the video's length) drifts from the picture; "
                             "set data.audio to false for none, or leave data.fps out")
    start = media.source_time(first)
    return AudioClip(path=media.path, start=start, duration=duration, note=f"audio of {name} from {float(start):.3f} s")


def _check_sampler(config: dict, checked: Checked) -> None:
    """``pipeline_inputs.sampler``: a known name; LCM without an LCM model is warned about (a note naming the file to get)."""
    from ..schedulers.base import check_sampler_name

    inputs = config["pipeline"]["pipeline_inputs"]
    name = inputs.get("sampler", "ddim")
    problem = check_sampler_name(name)
    if problem is not None:
        checked.add("pipeline.pipeline_inputs.sampler", f"is {name!r}, which is not a sampler", problem.split("; ", 1)[1])
        return
    if name == "lcm":  # consistency sampling on a model not distilled for it gives mush: say which file is missing
        from ..models.detect import lcm_warning

        note = lcm_warning(config["models"].get("model_list") or [], "sd1", video=True, headers=checked.headers)
        if note:
            checked.notes.append(note)


def check_config(config: dict, origins: dict[str, PathOrigin]) -> Checked:
    """Run every check on a config whose paths are resolved (``config_paths.resolve_config_paths``)."""
    checked = Checked()
    for section in ("models", "data", "pipeline"):
        if not isinstance(config.get(section), dict):
            checked.add(section, "is missing", "a runner config has the sections models, data and pipeline (see the Diffutoon examples)")
    if checked.problems:
        return checked
    _check_models(config, origins, checked)
    _check_frames(config, origins, checked)
    _check_smoothers(config, checked)
    _check_output(config, origins, checked)
    _check_finish(config, origins, checked)
    if not isinstance(config["pipeline"].get("pipeline_inputs"), dict) or "prompt" not in config["pipeline"]["pipeline_inputs"]:
        checked.add("pipeline.pipeline_inputs.prompt", "is missing", "give the prompt")
    else:
        _check_sampler(config, checked)
    return checked
