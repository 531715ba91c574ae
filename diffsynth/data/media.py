"""What a video file holds, exactly: frame timestamps and rate, decodable frames, audio streams (``diffsynth info VIDEO``).

One ffmpeg pass copies the packets of the first video stream and of every audio stream into
ffmpeg's ``framecrc`` listing (no decoding: a ten-minute clip takes a fraction of a second),
which gives each packet's timestamp and duration in its stream's exact time base; ffmpeg's
own description of the input (codec names, the container's duration) comes on the same
call's stderr. From the timestamps:

- the frame rate as an exact fraction: a stream whose frames are evenly spaced (to within one
  tick of its time base, as in Matroska's millisecond clock) has the rate its spacing says,
  snapped to the nearest fraction with a denominator up to 1001 (``30000/1001``, ``25``);
- a variable frame rate (frames unevenly spaced): its average over the clip, flagged;
- the presentation time of every frame, so a time range selects frames exactly.

The decodable frame count needs a decode (``count_decodable_frames``): headers can claim more
frames than the file holds (OpenCV's ``tree.avi`` claims 444, 68 decode). Nothing here keeps
pixels; the timestamps are one integer per frame.
"""
from __future__ import annotations

import bisect
import re
import subprocess
from dataclasses import dataclass, field
from fractions import Fraction

import imageio_ffmpeg

from ._ffmpeg import UnreadableVideoError, count_decodable_frames

__all__ = ["AudioStream", "MediaInfo", "probe_media", "rate_text"]

_NOPTS = -(2**63)
_CHANNELS = {"mono": 1, "stereo": 2, "2.1": 3, "3.0": 3, "quad": 4, "4.0": 4, "5.0": 5, "5.1": 6, "6.1": 7, "7.1": 8}
_DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
_START = re.compile(r"Duration: .*?start: (-?\d+(?:\.\d+)?)")
_STREAM = re.compile(r"Stream #0:(\d+).*?: (Video|Audio): ([^\s,]+)")


@dataclass(frozen=True)
class AudioStream:
    """One audio stream: ``index`` among the file's audio streams (``0:a:index``); ``duration`` from its packets."""

    index: int
    codec: str
    sample_rate: int | None
    channels: int | None
    layout: str | None
    duration: float | None

    def describe(self) -> str:
        layout = self.layout or (f"{self.channels} channels" if self.channels else "? channels")
        rate = f"{self.sample_rate} Hz" if self.sample_rate else "? Hz"
        length = f"{self.duration:.3f} s" if self.duration is not None else "? s"
        return f"{self.codec}, {rate}, {layout}, {length}"


@dataclass(frozen=True)
class MediaInfo:
    """A video file as its packets tell it. Times are seconds from the start of the container's timeline."""

    path: str
    width: int
    height: int
    codec: str
    rate: Fraction | None  # exact (constant) or average (variable) frame rate; None: the file has no timestamps
    variable: bool  # frames unevenly spaced: ``rate`` is their average
    packets: int  # video packets (frames in the container; not all need decode)
    container_duration: float | None  # what the header says (ffmpeg's "Duration")
    start: float  # the container's start time (ffmpeg's "start")
    audio: tuple[AudioStream, ...]
    decoded_frames: int | None = None  # frames that decode, when counted (``probe_media(count=True)``)
    time_base: Fraction = Fraction(1)
    timestamps: tuple[int, ...] = field(default=(), repr=False)  # presentation times in ``time_base`` units, sorted
    rate_range: tuple[float, float] | None = None  # slowest and fastest instantaneous rate of a variable-rate clip
    pix_fmt: str | None = None  # the video's pixel format as ffmpeg names it (yuv420p)
    color: str | None = None  # its colour tags as ffmpeg prints them ("tv, bt709"), None when untagged

    @property
    def header_frames(self) -> int | None:
        """Frames the header claims: its duration times the frame rate (None when it does not say)."""
        if self.container_duration is None or self.rate is None:
            return None
        return round(self.container_duration * self.rate)

    @property
    def frames(self) -> int:
        """Frames a reader gets: the decoded count when known, else the packets."""
        return self.decoded_frames if self.decoded_frames is not None else self.packets

    @property
    def header_lies(self) -> bool:
        """The header claims more frames than decode (more than the rounding of ``duration x rate`` explains)."""
        claimed = self.header_frames
        return self.decoded_frames is not None and claimed is not None and self.decoded_frames < claimed - 1

    @property
    def duration(self) -> float | None:
        """Seconds of video: the frames that decode at their timestamps (the header's duration when there are none)."""
        if self.timestamps and self.frames:
            return float(self.frame_time(self.frames))
        return self.container_duration

    def frame_time(self, index: int) -> Fraction:
        """When frame ``index`` appears, in seconds from the first frame; ``index == frames`` gives the end of the last.

        From the timestamps when the file has them, else ``index / rate``.
        """
        if not self.timestamps:
            if self.rate is None:
                raise ValueError(f"{self.path} has neither timestamps nor a frame rate")
            return Fraction(index) / self.rate
        first = self.timestamps[0]
        if index < len(self.timestamps):
            return (self.timestamps[index] - first) * self.time_base
        # past the last packet (the end of the last frame): one more average frame per index
        last = (self.timestamps[-1] - first) * self.time_base
        return last + Fraction(index - len(self.timestamps) + 1) / (self.rate or 1)

    def frame_at(self, seconds: float) -> int:
        """The first frame shown at or after ``seconds`` from the first frame (a time range's first frame, or the end of one)."""
        if not self.timestamps:
            return int(-(-Fraction(seconds) * (self.rate or 0) // 1))  # ceil
        first = self.timestamps[0]
        # half a tick of slack: a time typed as 1.001 lands on the frame at 1001/1000 s, not the next
        target = Fraction(seconds) / self.time_base + first - Fraction(1, 2)
        return bisect.bisect_left(self.timestamps, target)

    def source_time(self, index: int) -> Fraction:
        """Frame ``index``'s time on the container's timeline less its start (what ffmpeg's ``-ss`` seeks to)."""
        if not self.timestamps:
            return self.frame_time(index)
        return self.timestamps[0] * self.time_base - Fraction(self.start).limit_denominator(1_000_000) + self.frame_time(index)


def rate_text(rate: Fraction | None) -> str:
    """``30000/1001 (29.970 fps)``, ``25 fps``, or ``unknown``."""
    if rate is None:
        return "unknown"
    if rate.denominator == 1:
        return f"{rate.numerator} fps"
    return f"{rate.numerator}/{rate.denominator} ({float(rate):.3f} fps)"


def probe_media(path: str, count: bool = True, decoded_frames: int | None = None) -> MediaInfo:
    """Probe ``path``: streams, exact frame rate, timestamps; with ``count``, the frames that decode (one decode pass).

    ``decoded_frames``: a count the caller already has (a reader counted them), so no second pass.
    Raises UnreadableVideoError naming the file when ffmpeg cannot read a video stream in it.
    """
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", path,
           "-map", "0:v:0", "-map", "0:a?", "-c", "copy", "-f", "framecrc", "-"]
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")
    listing, log = result.stdout, result.stderr
    streams = _stream_headers(listing)
    video = streams.get(0)
    if result.returncode != 0 or video is None or video.get("media_type") != "video":
        raise UnreadableVideoError(path, log or f"ffmpeg exited with status {result.returncode}")
    packets: dict[int, list[tuple[int, int]]] = {index: [] for index in streams}
    for line in listing.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        index, pts, duration = int(parts[0]), int(parts[2]), int(parts[3])
        packets.setdefault(index, []).append((pts, duration))
    width, height = (int(v) for v in video["dimensions"].split("x"))
    time_base = Fraction(video["tb"])
    video_packets = packets.get(0, [])
    described = _described_streams(log)
    timestamps = sorted(pts for pts, _ in video_packets if pts != _NOPTS) if video_packets and all(pts != _NOPTS for pts, _ in video_packets) else []
    rate, variable, rate_range = _frame_rate(timestamps, video_packets, time_base, _header_fps(log))
    audio = []
    for k, index in enumerate(sorted(i for i, s in streams.items() if s.get("media_type") == "audio")):
        header = streams[index]
        layout = header.get("channel_layout_name")
        audio.append(AudioStream(
            index=k, codec=header.get("codec_id", "?"), sample_rate=int(header["sample_rate"]) if "sample_rate" in header else None,
            channels=_channels(layout, described.get(index, "")), layout=layout,
            duration=_stream_duration(packets.get(index, []), Fraction(header["tb"])) if "tb" in header else None))
    if count and decoded_frames is None:
        decoded_frames = count_decodable_frames(path)
    pix_fmt, color = _pixel_format(described.get(0, ""))  # stream 0 of the listing: the video (-map 0:v:0 comes first)
    match = _DURATION.search(log)
    container_duration = int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3]) if match else None
    start = _START.search(log)
    return MediaInfo(path=path, width=width, height=height, codec=video.get("codec_id", "?"), rate=rate, variable=variable,
                     packets=len(video_packets), container_duration=container_duration, start=float(start[1]) if start else 0.0,
                     audio=tuple(audio), decoded_frames=decoded_frames, time_base=time_base, timestamps=tuple(timestamps),
                     rate_range=rate_range, pix_fmt=pix_fmt, color=color)


def _stream_headers(listing: str) -> dict[int, dict[str, str]]:
    """framecrc's ``#key index: value`` header lines, by stream index."""
    streams: dict[int, dict[str, str]] = {}
    for line in listing.splitlines():
        if not line.startswith("#"):
            if line.strip():
                break
            continue
        head, _, value = line[1:].partition(":")
        key, _, index = head.rpartition(" ")
        if index.isdigit():
            streams.setdefault(int(index), {})[key] = value.strip()
    return streams


def _described_streams(log: str) -> dict[int, str]:
    """ffmpeg's one-line description of each copied stream, by its index in the framecrc listing (for what framecrc
    does not list: channel counts, pixel format, colour tags).

    Read from the "Output #0" section: there the streams are numbered as in the listing (the input's own
    numbers differ when its audio comes before its video), and a copied stream keeps the input's description.
    """
    output = log.split("Output #0", 1)[1] if "Output #0" in log else ""
    return {int(m[1]): line for line in output.splitlines() for m in [_STREAM.search(line)] if m}


def _header_fps(log: str) -> Fraction | None:
    """The rate ffmpeg prints for the input's video stream ("29.97 fps"), for files without timestamps."""
    for line in log.splitlines():
        if "Video:" in line and "Stream #0:" in line:
            found = re.search(r"([\d.]+) (?:fps|tbr)", line)
            if found:
                return _snap(Fraction(found[1]))
    return None


def _snap(rate: Fraction, tolerance: Fraction = Fraction(5, 10000)) -> Fraction:
    """The frame rate ``rate`` measures, to within ``tolerance`` (relative): a whole rate or an NTSC one (``N*1000/1001``)
    when one is that close (the nearest of them), else the simplest fraction with a denominator up to 1001, else ``rate``."""
    whole = Fraction(round(rate))
    ntsc = Fraction(round(rate * Fraction(1001, 1000)) * 1000, 1001)
    near = sorted((c for c in (whole, ntsc) if c > 0 and abs(c - rate) <= rate * tolerance), key=lambda c: abs(c - rate))
    if near:
        return near[0]
    simple = rate.limit_denominator(1001)
    return simple if abs(simple - rate) <= rate * tolerance else rate.limit_denominator(1_000_000)


def _frame_rate(timestamps: list[int], packets: list[tuple[int, int]], time_base: Fraction, header: Fraction | None):
    """(rate, variable, (slowest, fastest) when variable) from the sorted timestamps; the header's rate without them."""
    if len(timestamps) < 2:
        if len(packets) == 1 and packets[0][1] > 0:
            return _snap(1 / (packets[0][1] * time_base)), False, None
        return header, False, None
    steps = [b - a for a, b in zip(timestamps, timestamps[1:])]
    span = timestamps[-1] - timestamps[0]
    average = Fraction(len(steps)) / (span * time_base) if span > 0 else None
    if average is None:
        return header, False, None
    low, high = min(steps), max(steps)
    # The average is exact to two ticks over the span (each end rounded to the clock: Matroska's is a millisecond).
    tolerance = max(Fraction(2, span), Fraction(1, 10**6))
    if high - low <= 1 or high <= low * Fraction(101, 100):  # one tick of jitter, or under 1%: a constant rate
        return _snap(average, tolerance), False, None
    return _snap(average, tolerance), True, (float(1 / (high * time_base)), float(1 / (low * time_base)))


def _pixel_format(description: str) -> tuple[str | None, str | None]:
    """("yuv420p", "tv, bt709") from ffmpeg's "Video: h264 (High) (...), yuv420p(tv, bt709, progressive), 64x48" line."""
    after = description.split("Video:", 1)[-1]
    found = re.search(r"\), ([a-z0-9_]+)(?:\(([^)]*)\))?, \d+x\d+", after) or re.search(r", ([a-z0-9_]+)(?:\(([^)]*)\))?, \d+x\d+", after)
    if not found:
        return None, None
    tags = [t.strip() for t in (found[2] or "").split(",") if t.strip() and t.strip() not in ("progressive", "top first", "bottom first")]
    return found[1], ", ".join(tags) or None


def _channels(layout: str | None, description: str) -> int | None:
    if layout in _CHANNELS:
        return _CHANNELS[layout]
    found = re.search(r"(\d+) channels", description)
    if found:
        return int(found[1])
    name = re.search(r"Hz, ([^,]+),", description)
    return _CHANNELS.get(name[1].strip()) if name else None


def _stream_duration(packets: list[tuple[int, int]], time_base: Fraction) -> float | None:
    """From the first packet shown to the end of the last; priming packets before time 0 (AAC's encoder delay) do not count."""
    timed = [(pts, duration) for pts, duration in packets if pts != _NOPTS]
    if not timed:
        return None
    first = max(min(pts for pts, _ in timed), 0)
    end = max(pts + duration for pts, duration in timed)
    return float((end - first) * time_base)
