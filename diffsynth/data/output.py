"""How a render's finished video is written: codec, quality, pixel format, colour tags (``data.output``), and its audio.

``data.output`` (every key optional)::

    {"codec": "h264",      # h264 (video.mp4, default), h265 (video.mp4), vp9 (video.webm), prores (video.mov),
                           # gif (video.gif), png (no video: frames/ is the result)
     "crf": 5,             # constant quality: lower is better. h264/h265 0-51 (default 5 for h264, the original's
                           # imageio quality 9; 8 for h265), vp9 0-63 (default 15); not for prores/gif/png
     "pix_fmt": "yuv420p", # yuv420p (default: every player opens it), yuv422p, yuv444p, 10-bit variants where the
                           # codec has them; prores: yuv422p10le (default) or yuv444p10le
     "preset": "medium"}   # h264/h265 encoder speed (ultrafast ... veryslow)

Every YUV video is converted from RGB with the BT.709 matrix and tagged so (primaries,
transfer, matrix, limited range), which is what players assume for HD video; an untagged
file leaves each player to guess (BT.601 for small sizes in many), shifting colours.

The audio (``data.audio``, see :class:`AudioClip`) is muxed in afterwards with the video
stream copied, not re-encoded: AAC in mp4/mov, Opus in webm; GIF and PNG carry none.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction

__all__ = ["OutputOptions", "AudioClip", "CODECS", "VIDEO_FILE_NAMES", "output_problems", "crf_range", "pixel_formats", "presets"]

_PIX_FMTS = {
    "h264": ("yuv420p", "yuv422p", "yuv444p", "yuv420p10le", "yuv422p10le", "yuv444p10le"),
    "h265": ("yuv420p", "yuv422p", "yuv444p", "yuv420p10le", "yuv422p10le", "yuv444p10le"),
    "vp9": ("yuv420p", "yuv422p", "yuv444p", "yuv420p10le", "yuv422p10le", "yuv444p10le"),
    "prores": ("yuv422p10le", "yuv444p10le"),
}
_CRF = {"h264": (0, 51, 5), "h265": (0, 51, 8), "vp9": (0, 63, 15)}  # range and default
_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")
CODECS = ("h264", "h265", "vp9", "prores", "gif", "png")
_FILES = {"h264": "video.mp4", "h265": "video.mp4", "vp9": "video.webm", "prores": "video.mov", "gif": "video.gif", "png": None}
VIDEO_FILE_NAMES = tuple(sorted({name for name in _FILES.values() if name}))
"""Every name a render's video can have: a finished render is any of them."""
_MUXERS = {"h264": "mp4", "h265": "mp4", "vp9": "webm", "prores": "mov", "gif": "gif"}
_BT709 = ["-vf", "scale=out_color_matrix=bt709:out_range=tv,setparams=color_primaries=bt709:color_trc=bt709:colorspace=bt709:range=tv"]


def crf_range(codec: str) -> tuple[int, int, int] | None:
    """``(lowest, highest, default)`` crf of ``codec``; None for the codecs without one (prores, gif, png)."""
    return _CRF.get(codec)


def pixel_formats(codec: str) -> tuple[str, ...]:
    """The pixel formats ``data.output.pix_fmt`` takes with ``codec``, the default first (none for gif and png)."""
    return _PIX_FMTS.get(codec, ())


def presets(codec: str) -> tuple[str, ...]:
    """The encoder presets ``data.output.preset`` takes with ``codec`` (h264 and h265 only), fastest first."""
    return _PRESETS if codec in ("h264", "h265") else ()


def output_problems(value) -> list[tuple[str, str, str]]:
    """What is wrong with a ``data.output`` value, as (key, message, remedy) triples (empty: it is fine)."""
    if value is None:
        return []
    if not isinstance(value, dict):
        return [("data.output", f"must be a dict of output options, got {value!r}", 'e.g. {"codec": "h264", "crf": 18}')]
    problems = []
    unknown = sorted(set(value) - {"codec", "crf", "pix_fmt", "preset"})
    if unknown:
        problems.append((f"data.output.{unknown[0]}", "is not an output option", "the options are codec, crf, pix_fmt and preset"))
    codec = value.get("codec", "h264")
    if codec not in CODECS:
        return problems + [("data.output.codec", f"is {codec!r}", f"use one of {', '.join(CODECS)}")]
    crf = value.get("crf")
    if crf is not None:
        if codec not in _CRF:
            problems.append(("data.output.crf", f"does not apply to {codec}", "remove it (prores is fixed-quality HQ; gif and png are lossless in their way)"))
        elif isinstance(crf, bool) or not isinstance(crf, int) or not _CRF[codec][0] <= crf <= _CRF[codec][1]:
            low, high, default = _CRF[codec]
            problems.append(("data.output.crf", f"is {crf!r}; {codec} takes a whole number from {low} to {high}", f"lower is better; the default is {default}"))
    pix_fmt = value.get("pix_fmt")
    if pix_fmt is not None and pix_fmt not in _PIX_FMTS.get(codec, ()):
        allowed = _PIX_FMTS.get(codec)
        problems.append(("data.output.pix_fmt", f"is {pix_fmt!r}, which {codec} does not take here",
                         f"use one of {', '.join(allowed)}" if allowed else "remove it (gif and png have their own)"))
    preset = value.get("preset")
    if preset is not None and (codec not in ("h264", "h265") or preset not in _PRESETS):
        problems.append(("data.output.preset", f"is {preset!r}" + ("" if codec in ("h264", "h265") else f", and {codec} has no presets"),
                         f"for h264/h265 use one of {', '.join(_PRESETS)}; otherwise remove it"))
    return problems


@dataclass(frozen=True)
class OutputOptions:
    """``data.output`` with its defaults filled in (``from_config`` checks it; ``OutputOptions()`` is the default H.264)."""

    codec: str = "h264"
    crf: int | None = 5
    pix_fmt: str | None = "yuv420p"
    preset: str | None = "medium"

    @classmethod
    def from_config(cls, value: dict | None) -> "OutputOptions":
        """The options of a ``data.output`` dict (None: the defaults); ValueError naming the key when one is wrong."""
        problems = output_problems(value)
        if problems:
            key, message, remedy = problems[0]
            raise ValueError(f"{key} {message}: {remedy}")
        value = value or {}
        codec = value.get("codec", "h264")
        crf = value.get("crf", _CRF[codec][2] if codec in _CRF else None)
        pix_fmt = value.get("pix_fmt", _PIX_FMTS[codec][0] if codec in _PIX_FMTS else None)
        preset = value.get("preset", "medium" if codec in ("h264", "h265") else None)
        return cls(codec=codec, crf=crf, pix_fmt=pix_fmt, preset=preset)

    @classmethod
    def from_quality(cls, quality: float | None) -> "OutputOptions":
        """H.264 at imageio's quality scale (1-10, 10 best: ``crf = int((1 - quality / 10) * 51)``; None: libx264's default 23)."""
        if quality is not None and not 1 <= quality <= 10:
            raise ValueError(f"quality must be between 1 and 10 (10 = best), got {quality}")
        return cls(codec="h264", crf=23 if quality is None else int((1 - quality / 10) * 51), pix_fmt="yuv420p", preset="medium")

    def as_key(self) -> dict:
        """What changes the video file (the cache key of stage 9)."""
        return {"codec": self.codec, "crf": self.crf, "pix_fmt": self.pix_fmt, "preset": self.preset}

    @property
    def file_name(self) -> str | None:
        """The video's name in the output folder (None: PNG frames only)."""
        return _FILES[self.codec]

    @property
    def muxer(self) -> str:
        return _MUXERS[self.codec]

    @property
    def carries_audio(self) -> bool:
        return self.codec in ("h264", "h265", "vp9", "prores")

    @property
    def even_sides(self) -> bool:
        """Whether frames must have even sides (4:2:0 and 4:2:2 store colour at half width)."""
        return self.pix_fmt is not None and not self.pix_fmt.startswith("yuv444")

    def video_args(self) -> list[str]:
        """ffmpeg's output options for the video stream (GIF: the second pass, with the palette as input 1)."""
        if self.codec == "gif":
            return ["-lavfi", "[0:v][1:v]paletteuse=dither=sierra2_4a", "-loop", "0"]
        args = list(_BT709)
        if self.codec == "h264":
            args += ["-c:v", "libx264", "-preset", self.preset, "-crf", str(self.crf)]
        elif self.codec == "h265":
            args += ["-c:v", "libx265", "-preset", self.preset, "-crf", str(self.crf), "-tag:v", "hvc1", "-x265-params", "log-level=error"]
        elif self.codec == "vp9":
            args += ["-c:v", "libvpx-vp9", "-crf", str(self.crf), "-b:v", "0", "-row-mt", "1"]
        elif self.codec == "prores":
            args += ["-c:v", "prores_ks", "-profile:v", "3"]
        else:
            raise ValueError(f"{self.codec} is not a video codec")
        args += ["-pix_fmt", self.pix_fmt]
        if self.muxer in ("mp4", "mov"):
            args += ["-movflags", "+faststart"]
        return args

    def audio_args(self) -> list[str]:
        """ffmpeg's options for the muxed audio stream."""
        if self.codec == "vp9":
            return ["-c:a", "libopus", "-b:a", "160k"]
        return ["-c:a", "aac", "-b:a", "192k"]


@dataclass(frozen=True)
class AudioClip:
    """The audio of a video: ``duration`` seconds of the first audio stream of ``path`` from ``start`` (seconds on its
    timeline), padded with silence where the file's audio ends sooner, so the audio is exactly as long as the video."""

    path: str
    start: Fraction
    duration: Fraction
    note: str = field(default="", compare=False)  # why it is what it is, for the manifest

    def as_key(self, identity) -> dict:
        return {"audio": identity(self.path), "start": str(self.start), "duration": str(self.duration)}

    def ffmpeg_input(self) -> list[str]:
        return ["-ss", f"{float(self.start):.6f}", "-t", f"{float(self.duration):.6f}", "-i", os.fspath(self.path)]

    def filter_args(self) -> list[str]:
        return ["-af", f"apad=whole_dur={float(self.duration):.6f}"]
