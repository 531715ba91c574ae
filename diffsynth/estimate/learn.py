"""After a run: what the history learns from it (``history.py``): measured ÷ predicted seconds of each stage it
computed whole, and how large rendered frames and the video came out against the source frames."""
from __future__ import annotations

import logging
import os

from ..utils.sizes import count_frame_files, path_bytes
from . import costs as C
from .history import History, stage_id

logger = logging.getLogger("diffsynth")

_MIN_SECONDS = 0.2


def learn_from_run(manifest, plan: dict, keys: dict[int, str], done_before: set[int], history: History | None = None) -> None:
    """Update the history from a finished run's manifest (its ``estimate`` and each stage's ``measured``)."""
    estimate = manifest.data.get("estimate")
    if not estimate or not manifest.writable:
        return
    learn = estimate.get("learn") or {}
    if not learn.get("runs_key") or estimate.get("world_size", 1) != 1:
        return  # a run on several processes times its ranks' shares, not the stages a single process is predicted for
    history = history if history is not None else History()
    ratios = {}
    for sid, predicted in (estimate.get("stages") or {}).items():
        record = manifest.data["stages"].get(sid) or {}
        measured = (record.get("measured") or {}).get("seconds")
        if int(sid) in done_before or not manifest.is_done(int(sid), keys[int(sid)]) or measured is None:
            continue
        base = predicted.get("base_seconds") or 0.0
        if base >= _MIN_SECONDS and measured >= _MIN_SECONDS:  # a stage of a few milliseconds is noise, not a rate
            ratios[stage_id(int(sid), predicted.get("work") or {})] = measured / base
    out = manifest.folder
    frames = os.path.join(out, "frames")
    count = count_frame_files(frames)
    try:
        if ratios:
            history.add_run(learn["runs_key"], ratios)
        if count and learn.get("png_source_bytes"):
            per_frame = path_bytes(frames) / count
            output = plan.get("output")
            name = output.file_name if output is not None else "video.mp4"
            video = os.path.join(out, name) if name else None
            found = {"frame": per_frame / learn["png_source_bytes"]}
            factor = C.video_bytes_factor(output)
            if video is not None and os.path.isfile(video) and factor > 0:  # kept as the default H.264's ratio
                found["video"] = os.path.getsize(video) / count / per_frame / factor
            history.set_frame_ratios(learn["signature"], found)
        history.save()
    except OSError as exc:
        logger.warning("could not update the estimate history %s: %s", history.path, exc)
