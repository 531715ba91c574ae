"""What finishing a video costs: probing a clip, muxing its audio, and each output codec.

1. Probe. A 1280x720 clip at 30000/1001 fps with a stereo AAC track (``--seconds`` long, made with
   the bundled ffmpeg): ``probe_media(count=False)`` (the exact rate, timestamps and audio streams
   from one packet-copy pass, no decode) vs counting the decodable frames (one decode pass, what a
   render does anyway) vs imageio-ffmpeg's header read. Best of 3 each.
2. Audio. ``save_video`` of the clip's first ``--frames`` frames (1280x720, h264 defaults) with and
   without the clip's audio: the muxing step (video stream copied, audio encoded to AAC) vs the encode.
3. Codecs. The same frames through every ``data.output`` codec at its defaults: encode seconds and
   bytes per frame (BT.709 conversion included).

Usage: python bench/finish.py [--seconds 20] [--frames 60]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from fractions import Fraction

import imageio_ffmpeg
import numpy as np


def best(fn, repeat=3):
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--frames", type=int, default=60)
    args = parser.parse_args()

    from diffsynth.data import VideoData, save_video
    from diffsynth.data._ffmpeg import count_decodable_frames
    from diffsynth.data.media import probe_media
    from diffsynth.data.output import CODECS, AudioClip, OutputOptions

    with tempfile.TemporaryDirectory() as tmp:
        clip = os.path.join(tmp, "clip.mp4")
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30000/1001",
                        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-ac", "2", "-t", str(args.seconds),
                        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac", clip], check=True)

        def header():
            reader = imageio_ffmpeg.read_frames(clip)
            meta = next(reader)
            reader.close()
            return meta

        probe_s, media = best(lambda: probe_media(clip, count=False))
        count_s, count = best(lambda: count_decodable_frames(clip))
        header_s, _ = best(header)
        print(f"1. probe of a {args.seconds:g} s 1280x720 clip ({count} frames, {media.rate}, {len(media.audio)} audio stream)")
        print(f"   probe_media(count=False) {probe_s:.3f} s | decode count {count_s:.3f} s | imageio header {header_s:.3f} s")
        print(f"   probe / decode count = {probe_s / count_s:.3f}")

        frames = [np.asarray(f) for f in VideoData(video_file=clip)[: args.frames]]
        rate = media.rate
        audio = AudioClip(clip, Fraction(0), Fraction(len(frames)) / rate)
        silent_s, _ = best(lambda: save_video(frames, os.path.join(tmp, "silent.mp4"), rate, output=OutputOptions()))
        sound_s, _ = best(lambda: save_video(frames, os.path.join(tmp, "sound.mp4"), rate, output=OutputOptions(), audio=audio))
        print(f"2. save_video of {len(frames)} frames at 1280x720 (h264 crf 5): {silent_s:.2f} s silent, {sound_s:.2f} s with audio "
              f"(ratio {sound_s / silent_s:.3f}; the mux adds {sound_s - silent_s:.2f} s)")

        print(f"3. codecs at their defaults, {len(frames)} frames of 1280x720 (best of 1):")
        for codec in CODECS:
            options = OutputOptions.from_config({"codec": codec})
            if options.file_name is None:
                continue
            path = os.path.join(tmp, "codec", options.file_name)
            seconds, _ = best(lambda: save_video(frames, path, rate, output=options), repeat=1)
            print(f"   {codec:<7} {seconds:6.2f} s  {os.path.getsize(path) / len(frames) / 1024:8.1f} KiB/frame  "
                  f"({options.file_name}, {options.pix_fmt or 'palette'}, crf {options.crf})")
            os.remove(path)


if __name__ == "__main__":
    main()
