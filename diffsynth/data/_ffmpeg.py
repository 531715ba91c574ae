"""ffmpeg subprocesses for the data module: decode a video as a frame stream, count its frames, encode one.

We drive the ffmpeg binary that imageio-ffmpeg ships (no system ffmpeg needed; the
environment variable ``IMAGEIO_FFMPEG_EXE`` selects another). The header is read
with ``imageio_ffmpeg.read_frames`` (its public parser); decoding, counting and
encoding run ffmpeg directly, so we can kill a decoder instantly (read_frames asks
ffmpeg to quit, ~0.5 s at 720p) and check exit statuses.

Frame numbering. Every decoder here uses :data:`DECODE_OPTIONS`: the first video
stream, one output frame per decoded frame (``-fps_mode passthrough``: no frames
duplicated or dropped to fit a constant rate, which ffmpeg would otherwise do for
variable-frame-rate files). So frame ``n`` of a stream, of a stream opened at ``n``
and of the counting pass are the same frame.
"""
from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import tempfile
import weakref
from dataclasses import dataclass
from fractions import Fraction

import imageio_ffmpeg
import numpy as np

logger = logging.getLogger("diffsynth")

__all__ = [
    "UnreadableVideoError",
    "VideoInfo",
    "probe_video",
    "FrameStream",
    "count_decodable_frames",
    "FrameEncoder",
    "DECODE_OPTIONS",
]

DECODE_OPTIONS = ("-map", "0:v:0", "-fps_mode", "passthrough")
_STDERR_TAIL = 1200  # characters of ffmpeg's log quoted in an error message


class UnreadableVideoError(OSError):
    """ffmpeg cannot read the file as a video (not a video, damaged header, no video stream).

    ``detail`` is ffmpeg's own reason on one line (e.g. "moov atom not found"), without its
    build banner or the file name it repeats.
    """

    def __init__(self, path: str, detail: str):
        self.path, self.detail = path, ffmpeg_reason(detail, path)
        super().__init__(f"cannot read video {path}: {self.detail}")

    def __reduce__(self):  # picklable across processes despite the two-argument constructor
        return type(self), (self.path, self.detail)


@dataclass(frozen=True)
class VideoInfo:
    """What the container header says. ``fps``/``duration`` are None when ffmpeg could not tell."""

    width: int
    height: int
    fps: float | None
    duration: float | None

    @property
    def header_frames(self) -> int | None:
        """Frame count implied by the header (``duration * fps``): a hint for warnings, never trusted."""
        if self.fps is None or self.duration is None:
            return None
        return round(self.fps * self.duration)


_LOG_PREFIX = re.compile(r"^\[[^\]]+ @ (0x)?[0-9a-fA-F]+\]\s*")


def ffmpeg_reason(log: str, path: str | None = None) -> str:
    """ffmpeg's error lines as one line: banner, configuration and stream listings dropped, "[mov,mp4,... @ 0x...]"
    and the repeated file name stripped, duplicates removed."""
    reasons = []
    for line in log.splitlines():
        line = line.strip()
        if not line or line.startswith(("ffmpeg version", "built with", "configuration:", "lib", "Input #", "Output #", "Stream", "Duration", "Metadata")):
            continue
        line = _LOG_PREFIX.sub("", line)
        if path is not None and line.startswith(f"{path}: "):
            line = line[len(path) + 2 :]
        if line.startswith(("Error opening input file", "Error opening input files")):
            continue  # ffmpeg 7 repeats the reason in these
        line = line.removeprefix("Error opening input: ")
        if line and line not in reasons:
            reasons.append(line)
    text = "; ".join(reasons) or "ffmpeg gave no reason"
    return text[-_STDERR_TAIL:]


def _probe_error(path: str) -> str:
    """ffmpeg's own complaint about ``path`` (no banner): what a user should read when a video does not open."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-v", "error", "-i", path, "-map", "0:v:0", "-frames:v", "1", "-f", "null", "-"]
    result = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=120)
    return result.stderr


def probe_video(path: str) -> VideoInfo:
    """Read the header of the video file ``path``; raises UnreadableVideoError naming it if ffmpeg cannot.

    Decodes at most one frame (``-frames:v 1``), so ffmpeg exits by itself right after.
    """
    frames = imageio_ffmpeg.read_frames(path, output_params=[*DECODE_OPTIONS, "-frames:v", "1"])
    try:
        meta = next(frames)
        width, height = meta["size"]
    except Exception as exc:  # read_frames raises OSError/RuntimeError; its header parser IndexError & co.
        raise UnreadableVideoError(path, _probe_error(path) or str(exc) or type(exc).__name__) from None
    finally:
        frames.close()
    fps = float(meta.get("fps") or 0) or None
    duration = float(meta.get("duration") or 0) or None
    return VideoInfo(width=int(width), height=int(height), fps=fps, duration=duration)


class FrameStream:
    """The decoded RGB frames of a video file, in order, from frame ``start`` on.

    One ffmpeg process per stream, writing raw RGB frames into a pipe; ``info`` (from
    :func:`probe_video`) gives the frame size. Opening at ``start > 0`` lets ffmpeg
    decode and drop the frames before it (a ``select`` filter on the frame number),
    which is exact and cheaper than piping them through Python, but still decodes
    them: opening at frame j costs about j frame decodes.
    """

    def __init__(self, path: str, info: VideoInfo, start: int = 0):
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-v", "error", "-i", path, *DECODE_OPTIONS]
        if start > 0:
            cmd += ["-vf", f"select=gte(n\\,{start})"]
        cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
        self.path = path
        self.info = info
        self.position = start  # index of the frame the next read() returns
        self._frame_bytes = info.width * info.height * 3
        self._log = tempfile.TemporaryFile()  # ffmpeg's complaints, quoted when the stream ends early
        self._process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log)
        # A stream dropped without close() (a reader garbage-collected mid-video) still stops its ffmpeg.
        self._stop = weakref.finalize(self, _stop_decoder, self._process, self._log)

    def read(self) -> np.ndarray | None:
        """The next frame as a read-only ``(height, width, 3)`` uint8 array, or None at the end.

        The stream ends at the first frame ffmpeg cannot decode (its message is logged
        at debug level, the caller decides whether to warn): the frames before it are
        kept, nothing after it is guessed.
        """
        if self._process.stdout.closed:
            return None
        data = self._process.stdout.read(self._frame_bytes)
        if len(data) < self._frame_bytes:
            self._finish(torn=len(data))
            return None
        self.position += 1
        return np.frombuffer(data, np.uint8).reshape(self.info.height, self.info.width, 3)

    def close(self) -> None:
        """Stop the ffmpeg process now (idempotent). Killing is instant; asking it to quit is not."""
        self._stop()

    def _finish(self, torn: int) -> None:
        status = self._process.wait()
        self._log.seek(0)
        message = self._log.read().decode(errors="replace").strip()
        if status != 0 or message or torn:
            logger.debug("video %s: decoding stopped before frame %d (ffmpeg exit status %d, %d bytes of a torn frame): %s",
                         self.path, self.position, status, torn, message[-_STDERR_TAIL:] or "(no message)")
        self.close()


def _stop_decoder(process: subprocess.Popen, log) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    process.stdout.close()
    log.close()


def count_decodable_frames(path: str, limit: int | None = None) -> int:
    """Number of frames ffmpeg can decode from ``path``, counting at most ``limit``.

    Decodes (inside ffmpeg, no pixels cross the pipe): the only count that matches
    what a :class:`FrameStream` will deliver, since headers can overstate it. Costs
    one decode of the first ``min(limit, total)`` frames.
    """
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-v", "error", "-i", path, *DECODE_OPTIONS]
    if limit is not None:
        cmd += ["-frames:v", str(limit)]
    cmd += ["-f", "null", "-progress", "pipe:1", "-nostats", "-"]
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")
    counts = [line.split("=", 1)[1] for line in result.stdout.splitlines() if line.startswith("frame=")]
    if not counts:
        raise UnreadableVideoError(path, result.stderr or f"ffmpeg exited with status {result.returncode}")
    if result.returncode != 0 or result.stderr.strip():
        logger.debug("counting frames of %s: ffmpeg said: %s", path, result.stderr.strip()[-_STDERR_TAIL:])
    return int(counts[-1])


class FrameEncoder:
    """An ffmpeg process that encodes raw RGB frames written to it into ``path``.

    ``muxer`` names the container explicitly (``-f``), so ``path`` may be a temp name
    without the right extension. ``output_args`` are the encoder's options (codec, rate
    control, pixel format, colour tags: ``diffsynth.data.output.OutputOptions.video_args``);
    ``extra_inputs`` are more inputs after the frames, as ffmpeg options (a GIF's palette: ``-f png_pipe -i PATH``).
    Frames must be C-contiguous ``(height, width, 3)`` uint8 arrays of the given size.
    ffmpeg's log goes to a temp file (no pipe to drain) and is quoted in errors.
    """

    def __init__(self, path: str, muxer: str, width: int, height: int, fps: float | Fraction, output_args: list[str],
                 name: str | None = None, extra_inputs: list[str] | None = None):
        self.name = name or path  # what error messages call the file (the final name, not the temp one)
        rate = Fraction(fps).limit_denominator(1_000_000) if not isinstance(fps, Fraction) else fps
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-v", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(rate), "-i", "-"]
        cmd += [*(extra_inputs or []), "-an", *output_args, "-f", muxer, path]
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log)

    def write(self, frame: np.ndarray) -> None:
        """Send one frame; raises OSError quoting ffmpeg's log if ffmpeg has stopped."""
        data = memoryview(frame).cast("B")
        try:
            self._process.stdin.write(data)
        except (BrokenPipeError, ValueError) as exc:  # ValueError: stdin already closed
            self._process.wait()
            status = self._process.returncode
            raise OSError(f"ffmpeg stopped while writing {self.name} (exit status {status}): {self._log_text()}") from exc

    def finish(self) -> None:
        """Flush, wait for ffmpeg to finish the file, and raise OSError if it failed."""
        with contextlib.suppress(BrokenPipeError):  # ffmpeg already exited; its status below tells why
            self._process.stdin.close()
        status = self._process.wait()
        log = self._log_text()
        self._log.close()
        if status != 0:
            raise OSError(f"ffmpeg failed to write {self.name} (exit status {status}): {log}")

    def abort(self) -> None:
        """Kill ffmpeg without finishing the file (the caller deletes it)."""
        self._process.kill()
        self._process.wait()
        with contextlib.suppress(BrokenPipeError):  # closing flushes buffered bytes into the dead pipe
            self._process.stdin.close()
        self._log.close()

    def _log_text(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace").strip()[-_STDERR_TAIL:] or "(no message)"
