"""Streaming frame writers: ``save_video`` (H.264 and the other codecs of ``data.output``, through ffmpeg) and ``save_frames`` (one PNG per frame).

Both take any frame source: a list, a ``VideoData``, a ``diffsynth.cache`` store, a
generator. Frames are pulled one at a time and never collected, so memory does not
depend on the number of frames. Frames may be PIL images (any mode; converted to
RGB) or ``(height, width, 3)`` uint8 arrays.
"""
from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterable, Iterator
from fractions import Fraction

import numpy as np
from PIL import Image

import imageio_ffmpeg

from ..progress import track
from ..utils.atomic import atomic_path, atomic_save_image, scratch_path
from ._ffmpeg import FrameEncoder, ffmpeg_reason
from .output import AudioClip, OutputOptions

logger = logging.getLogger("diffsynth")

__all__ = ["save_video", "save_frames", "mux_audio", "has_audio", "VIDEO_CONTAINERS"]

VIDEO_CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi", ".webm": "webm", ".gif": "gif"}
"""File extensions ``save_video`` writes, and the ffmpeg muxer for each."""


def save_video(frames: Iterable, save_path: str | os.PathLike, fps: float | Fraction, quality: float | None = 9,
               ffmpeg_params: list[str] | None = None, progress_bar_cmd=None, *, output: OutputOptions | None = None,
               audio: AudioClip | None = None) -> int:
    """Encode ``frames`` into the video file ``save_path``; returns the frame count.

    - Streaming: frames go to ffmpeg one by one as they are read (a GIF reads them twice:
      once for its palette, once to write, so ``frames`` must then be re-iterable, a list
      or a store).
    - Atomic: ffmpeg writes a temp file next to ``save_path`` that replaces it only
      once complete; if a frame source raises or ffmpeg fails, the temp file is
      removed and an existing ``save_path`` is left untouched.
    - Codec: ``output`` (:class:`~diffsynth.data.output.OutputOptions`: h264, h265, vp9,
      prores, gif; crf, pixel format, preset); without it H.264 yuv420p at ``quality``,
      imageio's 1-10 scale (9, the original's default, is crf 5: near-lossless, large
      files). YUV video is converted with the BT.709 matrix and tagged BT.709.
      ``ffmpeg_params`` (e.g. ``["-tune", "film"]``) are appended to the encoder's
      options and override ours.
    - ``audio``: an :class:`~diffsynth.data.output.AudioClip` muxed in after the video is
      encoded (the video stream is copied, not re-encoded), padded with silence to the
      video's length; a clip whose file has no audio stream adds none.
    - Odd sizes: 4:2:0 and 4:2:2 store colour at half resolution, so encoders need even
      sides. A frame with an odd width or height is padded by one column/row
      repeating its last one (a warning says so); frames are never rescaled
      (imageio's default ``macro_block_size=16`` would rescale e.g. 1080 to 1088).
    - Parent folders are created. The container follows the extension:
      one of :data:`VIDEO_CONTAINERS`.
    """
    save_path = os.fspath(save_path)
    muxer = _muxer_for(save_path)
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    options = output if output is not None else OutputOptions.from_quality(quality)
    if options.codec == "png":
        raise ValueError("the png output writes no video: save the frames with save_frames")
    if (muxer == "gif") != (options.codec == "gif"):
        raise ValueError(f"cannot write {options.codec} into {save_path}: name it {options.file_name}")
    os.makedirs(os.path.dirname(os.path.abspath(save_path)), exist_ok=True)
    with atomic_path(save_path) as tmp:
        if options.codec == "gif":
            return _encode_gif(frames, tmp, fps, options, ffmpeg_params, save_path, progress_bar_cmd)
        if audio is None or not has_audio(audio.path):
            return _encode(_frames(frames, "save video", progress_bar_cmd), tmp, muxer, fps, options, ffmpeg_params, save_path)
        with scratch_path(save_path) as video_only:
            count = _encode(_frames(frames, "save video", progress_bar_cmd), video_only, muxer, fps, options, ffmpeg_params, save_path)
            mux_audio(video_only, audio, tmp, muxer, options, save_path)
        return count


def has_audio(path: str) -> bool:
    """Whether the file ``path`` has an audio stream (ffmpeg reads only its header)."""
    from .media import probe_media

    return bool(probe_media(path, count=False).audio)


def mux_audio(video: str, audio: AudioClip, path: str, muxer: str, options: OutputOptions, name: str) -> None:
    """``path`` := the video stream of ``video`` (copied) and ``audio`` encoded for the container; OSError quoting ffmpeg."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-v", "error", "-y", "-i", video, *audio.ffmpeg_input(),
           "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", *options.audio_args(), *audio.filter_args()]
    if muxer in ("mp4", "mov"):
        cmd += ["-movflags", "+faststart"]
    cmd += ["-f", muxer, path]
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")
    if result.returncode != 0:
        raise OSError(f"ffmpeg could not add the audio of {audio.path} to {name} (exit status {result.returncode}): "
                      f"{ffmpeg_reason(result.stderr)}")


def _encode(frames: Iterator, tmp: str, muxer: str, fps, options: OutputOptions, ffmpeg_params, save_path: str,
            extra_inputs: list[str] | None = None, output_args: list[str] | None = None) -> int:
    """Feed ``frames`` to an encoder writing ``tmp``; returns the count. On any error ffmpeg is killed.

    ``output_args``: ffmpeg's output options instead of ``options``' (a GIF's palette pass)."""
    encoder = None
    count = 0
    pad = options.even_sides
    try:
        for frame in frames:
            array = _rgb_array(frame, count)
            if encoder is None:
                first_shape = array.shape
                encoder = _start_encoder(array.shape, tmp, muxer, fps, options, ffmpeg_params, save_path, extra_inputs, output_args)
            elif array.shape != first_shape:
                raise ValueError(f"frame {count} is {array.shape[1]}x{array.shape[0]} but frame 0 is "
                                 f"{first_shape[1]}x{first_shape[0]}; all frames of a video must have one size")
            encoder.write(_pad_to_even(array) if pad else array)
            count += 1
        if encoder is None:
            raise ValueError(f"no frames to write to {save_path}")
        encoder.finish()
    except BaseException:
        if encoder is not None:
            encoder.abort()
        raise
    return count


def _encode_gif(frames, tmp: str, fps, options: OutputOptions, ffmpeg_params, save_path: str, progress_bar_cmd) -> int:
    """Two passes over ``frames``: the palette of the whole clip (ffmpeg's palettegen), then the GIF drawn with it."""
    if iter(frames) is frames:
        raise TypeError(f"a GIF reads its frames twice (palette, then image): give save_video a list or a store, not a one-shot "
                        f"{type(frames).__name__}, to write {save_path}")
    with scratch_path(save_path) as palette:
        _encode(_frames(frames, "gif palette", None), palette, "image2", fps, options, None, save_path,
                output_args=["-vf", "palettegen=stats_mode=full", "-update", "1", "-c:v", "png"])
        return _encode(_frames(frames, "save video", progress_bar_cmd), tmp, "gif", fps, options, ffmpeg_params, save_path,
                       extra_inputs=["-f", "png_pipe", "-i", palette])


def _start_encoder(shape: tuple, tmp: str, muxer: str, fps, options: OutputOptions, ffmpeg_params, save_path: str,
                   extra_inputs: list[str] | None, output_args: list[str] | None = None) -> FrameEncoder:
    height, width = shape[:2]
    if options.even_sides and (height % 2 or width % 2):
        logger.warning("save_video %s: frames are %dx%d (odd); padding to %dx%d by repeating the last row/column, "
                       "as %s needs even sides", save_path, width, height, _even(width), _even(height), options.pix_fmt)
        width, height = _even(width), _even(height)
    args = output_args if output_args is not None else [*options.video_args(), *(ffmpeg_params or [])]
    return FrameEncoder(tmp, muxer, width, height, fps, args, name=save_path, extra_inputs=extra_inputs)


def save_frames(frames: Iterable, folder: str | os.PathLike, start: int = 0, zero_pad: int | None = None,
                progress_bar_cmd=None) -> int:
    """Save each frame as a PNG in ``folder`` (created if needed); returns the count.

    Frame ``i`` (counting from 0 in ``frames``) is named ``{start + i}.png`` (the
    original's names when ``start=0``), or zero-padded to ``zero_pad`` digits
    (``zero_pad=5`` gives ``00012.png``). ``start`` lets a frame range keep its
    indices in the source video. Each file is written atomically.
    """
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if zero_pad is not None and zero_pad < 1:
        raise ValueError(f"zero_pad must be a number of digits >= 1 or None, got {zero_pad}")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    count = 0
    for frame in _frames(frames, "save frames", progress_bar_cmd):
        image = frame if isinstance(frame, Image.Image) else Image.fromarray(_rgb_array(frame, count))
        number = start + count
        name = f"{number:0{zero_pad}d}.png" if zero_pad else f"{number}.png"
        atomic_save_image(image, os.path.join(folder, name))
        count += 1
    return count


def _muxer_for(path: str) -> str:
    extension = os.path.splitext(path)[1].lower()
    if extension not in VIDEO_CONTAINERS:
        raise ValueError(f"cannot write a video named {path}: use one of the extensions {', '.join(VIDEO_CONTAINERS)}")
    return VIDEO_CONTAINERS[extension]


def _frames(frames, stage: str, progress_bar_cmd) -> Iterator:
    """Iterate ``frames``; with a progress bar, its total is ``len(frames)`` when there is one.

    An object with ``len`` and ``[i]`` but no ``__iter__`` is read at ``0 .. len-1``
    (rather than until ``[i]`` raises IndexError, which not every store does).
    """
    if hasattr(type(frames), "__iter__"):
        items = frames
    elif hasattr(frames, "__len__") and hasattr(frames, "__getitem__"):
        items = (frames[i] for i in range(len(frames)))
    else:
        raise TypeError(f"frames must be iterable or support len() and [i], got {type(frames).__name__}")
    if progress_bar_cmd is None:
        return iter(items)
    total = len(frames) if hasattr(frames, "__len__") else None
    return track(items, stage, total, progress_bar_cmd)


def _rgb_array(frame, index: int) -> np.ndarray:
    """``frame`` as a C-contiguous ``(height, width, 3)`` uint8 array."""
    if isinstance(frame, Image.Image):
        if frame.mode != "RGB":
            frame = frame.convert("RGB")
        return np.asarray(frame)
    array = np.asarray(frame)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise TypeError(f"frame {index} must be a PIL image or a (height, width, 3) uint8 array, "
                        f"got {type(frame).__name__} with shape {getattr(array, 'shape', None)} and dtype {array.dtype}")
    return np.ascontiguousarray(array)


def _even(n: int) -> int:
    return n + n % 2


def _pad_to_even(array: np.ndarray) -> np.ndarray:
    height, width = array.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return array
    return np.pad(array, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
