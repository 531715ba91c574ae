"""Standalone FastBlend: deflicker a folder of stylized frames along a guide video.

``diffsynth fastblend --guide VIDEO_OR_FOLDER --style FRAMES_DIR --out DIR --mode fast``
(or :func:`run_fastblend` from Python). The output folder holds ``frames/000000.png`` ...
(zero-padded frame indices, the cache's names), ``video.mp4`` (the guide's fps, or 30) and the
cache ``smoother/`` (``key.json``; fast mode's ``left/`` and ``right/`` while it runs). Run the
same command again after a crash and it continues; change an input or a setting and it
recomputes.

Frames are matched by sorted order (natural sort of the file names); when the guide and the
style have different numbers of frames the shorter count is used, and style frames of another
size are resized to the guide's (both as the original's WebUI, with a message). In
``interpolation`` mode the style folder holds keyframes, placed at the frame number in their
file names (the numeric field that differs between all names, as the original's
``KeyFrameMatcher``; ``12.png`` or ``frame_0012.png`` is frame 12).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from PIL import Image

__all__ = ["run_fastblend", "add_fastblend_arguments", "cmd_fastblend", "keyframe_numbers"]

logger = logging.getLogger("diffsynth")

_MODES = ("fast", "balanced", "accurate", "interpolation")


def keyframe_numbers(file_names: Sequence[str]) -> list[int]:
    """The frame number of each keyframe file: the last numeric field whose values differ across all names.

    Falls back to ``0, 1, 2, ...`` when no field tells the files apart (as the original did).
    """
    numbers = [tuple(int(x) for x in re.findall(r"[0-9]+", os.path.basename(name))) for name in file_names]
    shortest = min((len(n) for n in numbers), default=0)
    for field in range(shortest - 1, -1, -1):
        values = [n[field] for n in numbers]
        if len(set(values)) == len(values):
            return values
    logger.warning("FastBlend: the keyframe names carry no distinct frame numbers; using 0, 1, 2, ...")
    return list(range(len(file_names)))


class _Resized(Sequence):
    """Frames resized (bicubic, no crop) to ``(width, height)`` when read."""

    def __init__(self, frames, size):
        self.frames, self.size = frames, tuple(size)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i):
        frame = self.frames[i]
        return frame if frame.size == self.size else frame.convert("RGB").resize(self.size, Image.BICUBIC)


def run_fastblend(guide: str | os.PathLike, style: str | os.PathLike, out: str | os.PathLike, mode: str = "fast",
                  *, fps: float | None = None, **params: Any) -> str:
    """Deflicker (or, in ``interpolation`` mode, render from keyframes); returns the path of ``video.mp4``.

    ``guide``: a video file or an image folder; ``style``: an image folder; ``out``: the output
    folder. ``params`` are :class:`~diffsynth.processors.FastBlend.FastBlendSmoother`'s
    (``window_size``, ``batch_size``, ``minimum_patch_size``, ``num_iter``, ``guide_weight``,
    ``initialize``, ``tracking_window_size``, ``device``, ``seed``, ...). ``fps``: of the video
    (default: the guide video's, or 30 for an image folder).
    """
    from ...data import VideoData, save_video, search_for_images
    from ...processors.FastBlend import FastBlendSmoother

    guide, style, out = os.fspath(guide), os.fspath(style), os.fspath(out)
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(_MODES)}")
    if not os.path.exists(guide):
        raise FileNotFoundError(f"guide video or image folder not found: {guide}")
    guide_frames = VideoData(image_folder=guide) if os.path.isdir(guide) else VideoData(video_file=guide)
    style_files = search_for_images(style)
    if not style_files:
        raise ValueError(f"no style frames (.png/.jpg) in {style}")
    style_frames = VideoData(file_list=style_files)
    height, width = guide_frames.shape()
    if style_frames.shape() != (height, width):
        logger.info("FastBlend: style frames are %dx%d, the guide's %dx%d; resizing the style frames",
                    style_frames.shape()[1], style_frames.shape()[0], width, height)
    style_view = _Resized(style_frames, (width, height))
    keyframe_indices = None
    if mode == "interpolation":
        keyframe_indices = keyframe_numbers(style_files)
    else:
        n_guide, n_style = len(guide_frames), len(style_frames)
        if n_guide != n_style:
            logger.info("FastBlend: %d guide frames and %d style frames; using the first %d of each",
                        n_guide, n_style, min(n_guide, n_style))
            guide_frames.set_length(min(n_guide, n_style))
            style_frames.set_length(min(n_guide, n_style))
    os.makedirs(out, exist_ok=True)
    params.setdefault("progress_bar_cmd", _tqdm())
    smoother = FastBlendSmoother(inference_mode=mode, cache_folder=out, **params)
    frames = smoother.smooth(guide_frames, style_view, result_folder=os.path.join(out, "frames"),
                             keyframe_indices=keyframe_indices)
    video = os.path.join(out, "video.mp4")
    media = guide_frames.media()  # a guide video's exact rate (30000/1001, not the header's rounded 29.97)
    save_video(frames, video, fps=fps or (media.rate if media is not None else None) or 30)
    logger.info("FastBlend: %d frames in %s, video %s", len(frames), os.path.join(out, "frames"), video)
    return video


def _tqdm():
    from tqdm import tqdm

    return tqdm


def add_fastblend_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``fastblend`` options to ``parser`` (a subparser) and make :func:`cmd_fastblend` its handler."""
    parser.add_argument("--guide", required=True, help="guide video file, or a folder of its frames")
    parser.add_argument("--style", required=True, help="folder of stylized frames (keyframes in interpolation mode)")
    parser.add_argument("--out", required=True, help="output folder: frames/, video.mp4 and the resumable cache")
    parser.add_argument("--mode", default="fast", choices=_MODES)
    parser.add_argument("--window-size", type=int, default=60, help="frames blended on each side (default 60)")
    parser.add_argument("--batch-size", type=int, default=8, help="patch matches per engine call (default 8)")
    parser.add_argument("--minimum-patch-size", type=int, default=5, help="odd; the smallest patch (default 5)")
    parser.add_argument("--num-iter", type=int, default=5, help="patch-match iterations per pyramid level (default 5)")
    parser.add_argument("--guide-weight", type=float, default=10.0, help="weight of the guide error (default 10)")
    parser.add_argument("--initialize", default="identity", choices=("identity", "random"))
    parser.add_argument("--tracking-window-size", type=int, default=0, help="interpolation/accurate tracking (default 0)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=float, default=None, help="of video.mp4 (default: the guide's, or 30)")
    parser.set_defaults(func=cmd_fastblend)
    return parser


def cmd_fastblend(args: argparse.Namespace) -> int:
    """The ``diffsynth fastblend`` command."""
    video = run_fastblend(args.guide, args.style, args.out, args.mode, fps=args.fps, window_size=args.window_size,
                          batch_size=args.batch_size, minimum_patch_size=args.minimum_patch_size, num_iter=args.num_iter,
                          guide_weight=args.guide_weight, initialize=args.initialize,
                          tracking_window_size=args.tracking_window_size, device=args.device, seed=args.seed)
    print(f"wrote {video}")
    return 0
