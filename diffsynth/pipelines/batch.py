"""Many clips, one config: ``diffsynth run CONFIG --input 'clips/*.mp4'`` (a glob or a folder).

Each clip is rendered with the same settings into ``OUTPUT/<clip name>/`` (``OUTPUT``: the
config's ``data.output_folder``), a render of its own: its own manifest, so each clip resumes on
its own and a rerun of the batch skips the finished ones in a moment. The models are loaded once
and stay on the device from clip to clip. A clip that fails (unreadable, too short for the
config's frame range, a full disk) is reported and the next one starts; the summary
(``OUTPUT/batch.json``, rewritten as each clip starts and ends, and a table) says, per clip, its
frames, time and result or error.

The clip replaces ``data.input_frames``' source, and that of every ``data.controlnet_frames``
entry that read the same file as the input (the usual "control frames from the input video");
an entry naming another file keeps it.
"""
from __future__ import annotations

import copy
import glob
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

from ..data.images import natural_sort_key
from ..utils.atomic import atomic_write_text
from ..utils.sizes import human_seconds

logger = logging.getLogger("diffsynth")

__all__ = ["VIDEO_EXTENSIONS", "ClipResult", "find_clips", "clip_folders", "clip_config", "run_batch", "format_summary", "BATCH_FILE"]

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm", ".gif", ".mpg", ".mpeg", ".ts", ".m2ts", ".mts", ".flv", ".wmv", ".3gp", ".ogv")
BATCH_FILE = "batch.json"


@dataclass
class ClipResult:
    clip: str
    out: str
    status: str  # not run, running, done, failed, interrupted
    frames: int | None = None
    seconds: float = 0.0
    error: str | None = None


def find_clips(pattern: str) -> list[str]:
    """The clips ``pattern`` names: the video files in a folder (by extension, hidden files skipped), or a glob's files;
    naturally sorted, absolute. ValueError when there are none."""
    expanded = os.path.expanduser(pattern)
    if os.path.isdir(expanded):
        names = [entry.path for entry in os.scandir(expanded)
                 if entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(VIDEO_EXTENSIONS)]
        where = f"the folder {expanded} holds no video files ({', '.join(VIDEO_EXTENSIONS[:6])}, ...)"
    else:
        names = [path for path in glob.glob(expanded) if os.path.isfile(path)]
        where = f"no file matches {pattern!r}" + ("" if any(ch in pattern for ch in "*?[") else " (give a folder, or a glob like 'clips/*.mp4' in quotes)")
    if not names:
        raise ValueError(f"--input: {where}")
    return sorted((os.path.abspath(p) for p in names), key=lambda p: natural_sort_key(os.path.basename(p)))


def clip_folders(clips: list[str], root: str) -> dict[str, str]:
    """Each clip's output folder: ``root/<name without extension>``, or ``root/<file name>`` where two clips share a stem."""
    stems = [os.path.splitext(os.path.basename(c))[0] for c in clips]
    return {clip: os.path.join(root, stem if stems.count(stem) == 1 else os.path.basename(clip)) for clip, stem in zip(clips, stems)}


def clip_config(config: dict, clip: str, out: str) -> dict:
    """``config`` rendering ``clip`` into ``out`` (the input's source replaced, and the control frames that read it)."""
    config = copy.deepcopy(config)
    data = config["data"]
    spec = data.get("input_frames")
    if not isinstance(spec, dict):
        raise ValueError("data.input_frames must be a dict (video_file, height, width, frame range) to render clips with it")
    original = spec.get("video_file") or spec.get("image_folder")
    for entry in data.get("controlnet_frames") or []:
        if isinstance(entry, dict) and (entry.get("video_file") or entry.get("image_folder")) == original:
            entry.update(video_file=clip, image_folder=None)
    spec.update(video_file=clip, image_folder=None)
    data["output_folder"] = out
    return config


def run_batch(config: dict, clips: list[str], root: str, runner, config_dir: str | None = None) -> list[ClipResult]:
    """Render every clip with ``runner`` (an ``SDVideoPipelineRunner`` that keeps its models loaded); returns the results.

    Ctrl-C stops the batch (the clip being rendered keeps its finished work; a rerun continues): that clip's
    result is ``interrupted``, the rest ``not run``, and the results are returned as they stand.
    """
    from .preflight import PreflightError
    from .runner import RunError

    folders = clip_folders(clips, root)
    results = [ClipResult(clip=c, out=folders[c], status="not run") for c in clips]
    _save(root, results)  # this batch's record from the start (a rerun's, not the last run's results)
    try:
        for k, (clip, result) in enumerate(zip(clips, results)):
            logger.info("clip %d of %d: %s -> %s", k + 1, len(clips), clip, result.out)
            result.status = "running"
            _save(root, results)
            began = time.monotonic()
            try:
                frames = runner.run(clip_config(config, clip, result.out), config_dir=config_dir)
            except KeyboardInterrupt:
                result.status, result.seconds = "interrupted", time.monotonic() - began
                break
            except (RunError, PreflightError, ValueError, OSError) as exc:  # this clip's problem: the next one starts
                result.status = "failed"
                # the summary's one line: the checks' problems themselves (their remedies are in the log above)
                result.error = "; ".join(f"{p.key}: {p.message}" for p in exc.problems) if isinstance(exc, PreflightError) else str(exc)
                logger.error("clip %s failed: %s", clip, exc)
            else:
                result.status, result.frames = "done", len(frames)
            result.seconds = time.monotonic() - began
            _save(root, results)
    finally:
        _save(root, results)
        runner.release_models()
    return results


def _save(root: str, results: list[ClipResult]) -> None:
    os.makedirs(root, exist_ok=True)
    atomic_write_text(os.path.join(root, BATCH_FILE), json.dumps({"clips": [asdict(r) for r in results]}, indent=1))


def format_summary(results: list[ClipResult]) -> str:
    """A table: clip, frames, time, result or error (one line each; a long error cut at 200 characters)."""
    width = max([len(os.path.basename(r.clip)) for r in results] + [4])
    lines = [f"{'clip':<{width}}  {'frames':>6}  {'time':>10}  result", "-" * (width + 30)]
    for r in results:
        result = r.status if r.error is None else f"{r.status}: {' '.join(r.error.split())}"
        if len(result) > 200:
            result = result[:197] + "..."
        frames = str(r.frames) if r.frames is not None else "-"
        spent = human_seconds(r.seconds) if r.status != "not run" else "-"
        lines.append(f"{os.path.basename(r.clip):<{width}}  {frames:>6}  {spent:>10}  {result}")
    done = sum(r.status == "done" for r in results)
    lines.append(f"{done} of {len(results)} clips rendered" + (f"; {len(results) - done} not: see above" if done < len(results) else ""))
    return "\n".join(lines)
