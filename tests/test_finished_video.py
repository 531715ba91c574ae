"""Real clips in, finished videos out: exact frame rates, audio cut to the rendered range, output formats, many clips.

Every clip here is made with the ffmpeg that imageio-ffmpeg ships: 29.97 fps with a stereo tone,
25 fps without audio, a variable-frame-rate clip, one whose audio stops before its video, and an
AVI whose header claims more frames than it holds (as OpenCV's ``tree.avi``: 444 claimed, 68 decode).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import struct
import subprocess
from fractions import Fraction

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from diffsynth.cli import main as cli_main
from diffsynth.data import VideoData, save_video
from diffsynth.data.media import probe_media
from diffsynth.data.output import AudioClip, OutputOptions
from diffsynth.pipelines.preflight import PreflightError
from diffsynth.pipelines.runner import SDVideoPipelineRunner
from diffsynth.testing.runner_files import write_tiny_project

NTSC = Fraction(30000, 1001)


def ffmpeg(*args: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-v", "error", "-y", *args], check=True)


def make_clip(path, rate: str = "30000/1001", seconds: float = 0.4, audio: str | None = "stereo", audio_seconds: float | None = None,
              vfr: bool = False, size: int = 64) -> str:
    """A testsrc2 clip; ``audio``: "stereo" (a chirp, so any cut of it is recognisable), or None."""
    args = ["-f", "lavfi", "-i", f"testsrc2=size={size}x{size}:rate={rate}"]
    if audio:
        args += ["-f", "lavfi", "-i", "aevalsrc=sin(2*PI*(200+600*t)*t)|sin(2*PI*(300+500*t)*t):s=44100:c=stereo"]
    args += ["-t", str(seconds)]
    if vfr:  # every third frame shown twice as long
        args += ["-vf", "setpts='(N+floor(N/3))/30/TB'", "-fps_mode", "vfr"]
    args += ["-c:v", "libx264", "-pix_fmt", "yuv420p"]
    if audio:
        args += ["-c:a", "aac", "-map", "0:v", "-map", "1:a"]
        if audio_seconds is not None:
            args += ["-af", f"atrim=0:{audio_seconds}"]
    ffmpeg(*args, str(path))
    return str(path)


def lying_avi(path, frames: int = 8, claimed: int = 40) -> str:
    """An MJPEG AVI holding ``frames`` frames whose header (avih and strh lengths) claims ``claimed``."""
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x64:rate=30", "-frames:v", str(frames), "-c:v", "mjpeg", str(path))
    data = bytearray(open(path, "rb").read())
    struct.pack_into("<I", data, data.find(b"avih") + 8 + 16, claimed)
    struct.pack_into("<I", data, data.find(b"strh") + 8 + 32, claimed)
    open(path, "wb").write(data)
    return str(path)


def pcm(path, start: float = 0.0) -> np.ndarray:
    """The first audio stream decoded to mono 16-bit samples at 44.1 kHz."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-ss", str(start), "-i", str(path), "-map", "0:a:0",
           "-ac", "1", "-ar", "44100", "-f", "s16le", "-"]
    return np.frombuffer(subprocess.run(cmd, capture_output=True, check=True).stdout, np.int16).astype(np.float64)


def frames_on_disk(out) -> np.ndarray:
    folder = os.path.join(out, "frames")
    names = sorted(os.listdir(folder), key=lambda n: int(n.split(".")[0]))
    return np.stack([np.asarray(Image.open(os.path.join(folder, n)).convert("RGB")) for n in names]).astype(np.int16)


def decoded(path) -> np.ndarray:
    return np.stack([np.asarray(f) for f in VideoData(video_file=path)]).astype(np.int16)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    config = write_tiny_project(str(tmp_path_factory.mktemp("finish_project")), frames=8, smoother=False, steps=1)
    config["data"].pop("fps")  # the source's own rate
    config["data"]["controlnet_frames"] = []  # the units read the input's frames
    return config


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return {
        "ntsc_stereo": make_clip(folder / "ntsc_stereo.mp4"),
        "pal_silent": make_clip(folder / "pal_silent.mp4", rate="25", audio=None),
        "vfr": make_clip(folder / "vfr.mp4", rate="30", seconds=0.5, audio=None, vfr=True),
        "short_audio": make_clip(folder / "short_audio.mp4", audio_seconds=0.15),
        "tree": lying_avi(folder / "tree.avi"),
    }


def config_for(project, clip, out, **data):
    config = copy.deepcopy(project)
    config["data"]["input_frames"].update(video_file=clip, start_frame_id=0, end_frame_id=None)
    config["data"]["output_folder"] = str(out)
    config["data"].update(data)
    return config


def render(config):
    runner = SDVideoPipelineRunner(progress_bar_cmd=None)
    runner.run(config)
    return runner


# ---------------------------------------------------------------------- probing


def test_probe_gives_exact_rates_audio_and_the_frames_that_decode(clips, tmp_path):
    ntsc = probe_media(clips["ntsc_stereo"])
    assert ntsc.rate == NTSC and not ntsc.variable and ntsc.decoded_frames == 12
    assert [(a.codec, a.sample_rate, a.channels) for a in ntsc.audio] == [("aac", 44100, 2)]
    assert abs(ntsc.audio[0].duration - 0.4) < 0.01
    assert ntsc.frame_time(6) == Fraction(6 * 1001, 30000) and ntsc.frame_at(0.2) == 6  # 0.2 s: frame 6 shows at 0.2002 s
    mkv = tmp_path / "ntsc.mkv"  # Matroska keeps times in milliseconds: 33, 34, 33 ... ms apart
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x64:rate=30000/1001", "-t", "3", "-c:v", "libx264", str(mkv))
    assert probe_media(str(mkv), count=False).rate == NTSC
    pal = probe_media(clips["pal_silent"])
    assert pal.rate == 25 and pal.audio == () and pal.decoded_frames == 10
    vfr = probe_media(clips["vfr"])
    assert vfr.variable and vfr.rate_range == (15.0, 30.0)
    assert abs(float(vfr.rate) - vfr.decoded_frames / vfr.duration) < 0.01  # the average rate over the clip
    swapped = tmp_path / "audio_first.mp4"  # the audio is the input's stream 0, the video its stream 1
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=300:sample_rate=22050", "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25", "-t", "1",
           "-map", "0:a", "-map", "1:v", "-c:v", "libx264", "-pix_fmt", "yuv444p", "-c:a", "aac", "-ac", "1", str(swapped))
    audio_first = probe_media(str(swapped), count=False)
    assert (audio_first.pix_fmt, audio_first.rate, [(a.sample_rate, a.channels) for a in audio_first.audio]) == ("yuv444p", 25, [(22050, 1)])
    tree = probe_media(clips["tree"])
    assert (tree.header_frames, tree.decoded_frames, tree.header_lies) == (40, 8, True)


def test_info_prints_a_video(clips, capsys):
    assert cli_main(["info", clips["ntsc_stereo"]]) == 0
    text = capsys.readouterr().out
    assert "30000/1001" in text and "12 (decoded)" in text and "aac, 44100 Hz, stereo" in text
    assert cli_main(["info", clips["tree"]]) == 0
    assert "the header claims 40" in capsys.readouterr().out
    assert cli_main(["info", clips["vfr"]]) == 0
    assert "VARIABLE frame rate (15.000-30.000 fps)" in capsys.readouterr().out


# ---------------------------------------------------------------------- writing


def test_save_video_codecs_colour_and_audio(clips, tmp_path):
    red = [np.full((48, 64, 3), (200, 30, 60), np.uint8)] * 12
    for codec, name, pix_fmt in (("h264", "video.mp4", "yuv420p"), ("h265", "video.mp4", "yuv420p"), ("vp9", "video.webm", "yuv420p"),
                                 ("prores", "video.mov", "yuv422p10le"), ("gif", "video.gif", None)):
        options = OutputOptions.from_config({"codec": codec})
        assert options.file_name == name
        path = str(tmp_path / codec / name)
        audio = AudioClip(clips["ntsc_stereo"], Fraction(0), Fraction(12) / NTSC)
        assert save_video(red, path, NTSC, output=options, audio=audio) == 12
        media = probe_media(path)
        assert media.decoded_frames == 12 and media.rate == NTSC, codec
        assert np.abs(decoded(path)[0].astype(int) - (200, 30, 60)).max() <= 3, codec  # BT.709 both ways: no colour shift
        if codec == "gif":
            assert media.audio == ()
        else:
            assert media.pix_fmt == pix_fmt and media.color == "tv, bt709", codec
            assert abs(media.audio[0].duration - float(Fraction(12) / NTSC)) < 1 / 30, codec
        assert os.listdir(tmp_path / codec) == [name]  # no temp file left
    with pytest.raises(TypeError, match="reads its frames twice"):
        save_video(iter(red), str(tmp_path / "once.gif"), 30, output=OutputOptions.from_config({"codec": "gif"}))


def test_bad_output_options_are_named(project, clips, tmp_path):
    config = config_for(project, clips["ntsc_stereo"], tmp_path / "out", output={"codec": "av1", "crf": 5})
    with pytest.raises(PreflightError, match=r"data\.output\.codec: is 'av1'"):
        SDVideoPipelineRunner(progress_bar_cmd=None).run(config)
    for output, key in (({"crf": 60}, "data.output.crf"), ({"codec": "prores", "crf": 10}, "data.output.crf"),
                        ({"pix_fmt": "rgb24"}, "data.output.pix_fmt"), ({"quality": 9}, "data.output.quality")):
        with pytest.raises(PreflightError, match=key.replace(".", r"\.")):
            SDVideoPipelineRunner(progress_bar_cmd=None).prepare(config_for(project, clips["ntsc_stereo"], tmp_path / "out", output=output))
    with pytest.raises(PreflightError, match=r"data\.fps: must be a frame rate"):
        SDVideoPipelineRunner(progress_bar_cmd=None).prepare(config_for(project, clips["ntsc_stereo"], tmp_path / "out", fps=0))
    assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------------- renders of real clips


@pytest.mark.parametrize("kind", ["ntsc_stereo", "pal_silent", "vfr", "short_audio"])
def test_render_keeps_rate_audio_and_frames(project, clips, tmp_path, kind, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="diffsynth"):
        render(config_for(project, clips[kind], out, output={"pix_fmt": "yuv444p", "crf": 0}))
    source = probe_media(clips[kind])
    video = probe_media(str(out / "video.mp4"))
    n = len(os.listdir(out / "frames"))
    assert n == source.decoded_frames and video.decoded_frames == n
    assert video.rate == source.rate  # the exact rate (a variable one's average)
    assert abs(video.duration - float(n / source.rate)) < float(1 / source.rate)
    assert abs(video.duration - source.duration) < float(1 / source.rate)
    if source.audio:
        assert len(video.audio) == 1 and abs(video.audio[0].duration - video.duration) < float(1 / source.rate)
        assert video.audio[0].codec == "aac"
    else:
        assert video.audio == ()  # a source without audio: a silent video, no error
    difference = np.abs(decoded(str(out / "video.mp4")) - frames_on_disk(out))
    assert difference.max() <= 4 and difference.mean() < 1  # 4:4:4 at crf 0: the frames on disk, to YUV rounding
    variable_warned = any("variable frame rate" in r.getMessage() for r in caplog.records)
    assert variable_warned == (kind == "vfr")


def test_audio_is_cut_to_the_rendered_range(project, clips, tmp_path):
    out = tmp_path / "out"
    config = config_for(project, clips["ntsc_stereo"], out)
    config["data"]["input_frames"].update(start_frame_id=3, end_frame_id=9)
    render(config)
    video = probe_media(str(out / "video.mp4"))  # default options: H.264 4:2:0, BT.709
    assert video.decoded_frames == 6 and video.rate == NTSC and (video.pix_fmt, video.color) == ("yuv420p", "tv, bt709")
    got = pcm(out / "video.mp4")
    start = float(Fraction(3 * 1001, 30000))
    assert abs(len(got) / 44100 - float(6 / NTSC)) < 1 / 30
    source = pcm(clips["ntsc_stereo"])
    # where in the source chirp the output's audio lies: the best match of a 2000-sample stretch
    window = got[1000:3000]
    scores = [np.dot(window, source[k:k + 2000]) / (np.linalg.norm(source[k:k + 2000]) + 1e-9) for k in range(0, len(source) - 2000)]
    found = (int(np.argmax(scores)) - 1000) / 44100
    assert abs(found - start) < 0.002, (found, start)
    # decoded frames in order: each one is closest to the frame of its own index on disk
    disk, back = frames_on_disk(out), decoded(str(out / "video.mp4"))
    for i in range(len(back)):
        assert int(np.argmin([np.abs(back[i] - d).mean() for d in disk])) == i


def test_start_and_end_time_select_the_same_frames_as_ids(project, clips, tmp_path):
    runner = SDVideoPipelineRunner(progress_bar_cmd=None)
    by_time = config_for(project, clips["ntsc_stereo"], tmp_path / "a")
    by_time["data"]["input_frames"].update(start_frame_id=None, start_time=0.2, end_time=0.3)
    by_id = config_for(project, clips["ntsc_stereo"], tmp_path / "a")
    by_id["data"]["input_frames"].update(start_frame_id=6, end_frame_id=9)  # frames at 0.2002, 0.2336, 0.2669 s
    plan_time, plan_id = runner.prepare(by_time), runner.prepare(by_id)
    assert plan_time["num_frames"] == 3
    assert runner.stage_keys(plan_time) == runner.stage_keys(plan_id)
    both = copy.deepcopy(by_time)
    both["data"]["input_frames"]["end_frame_id"] = 9
    with pytest.raises(PreflightError, match="gives both end_time and end_frame_id"):
        runner.prepare(both)
    past = copy.deepcopy(by_time)
    past["data"]["input_frames"]["end_time"] = 5.0
    with pytest.raises(PreflightError, match=r"end_time: is 5.0 s, past the end"):
        runner.prepare(past)


def test_audio_choices(project, clips, tmp_path):
    runner = SDVideoPipelineRunner(progress_bar_cmd=None)
    silent = runner.prepare(config_for(project, clips["ntsc_stereo"], tmp_path / "a", audio=False))
    assert silent["audio"] is None
    other = runner.prepare(config_for(project, clips["pal_silent"], tmp_path / "a", audio=clips["ntsc_stereo"]))
    assert other["audio"].path == clips["ntsc_stereo"] and other["fps"] == 25
    with pytest.raises(PreflightError, match=r"data\.audio: cannot take audio from .*has no audio stream"):
        runner.prepare(config_for(project, clips["ntsc_stereo"], tmp_path / "a", audio=clips["pal_silent"]))
    with pytest.raises(PreflightError, match=r"data\.audio: names .* carries no audio"):
        runner.prepare(config_for(project, clips["ntsc_stereo"], tmp_path / "a", audio=clips["ntsc_stereo"], output={"codec": "gif"}))
    fixed = runner.prepare(config_for(project, clips["ntsc_stereo"], tmp_path / "a", fps=29.97))  # a typed NTSC rate is NTSC
    assert fixed["fps"] == NTSC and not fixed["notes"]
    faster = runner.prepare(config_for(project, clips["ntsc_stereo"], tmp_path / "a", fps="60"))
    assert faster["fps"] == 60 and "drifts from the picture" in faster["notes"][0]


def test_changing_only_output_options_reencodes_only(project, clips, tmp_path):
    out = tmp_path / "out"
    config = config_for(project, clips["ntsc_stereo"], out)
    render(config)
    manifest = json.load(open(out / "manifest.json"))

    def stage_files():  # every file of stages 0-8 (the video, the run's records and previous/ aside) and its time
        return {os.path.join(root, n): os.stat(os.path.join(root, n)).st_mtime_ns for root, dirs, names in os.walk(out)
                if "previous" not in root for n in names if not n.startswith("video.") and n not in ("manifest.json", "config.json", "last_process_id.txt")}

    before, earlier = stage_files(), "video.mp4"
    assert len(before) >= 12 * 4  # source, two units' annotations, frames
    for output, name, codec in (({"codec": "vp9", "crf": 30}, "video.webm", "vp9"), ({"codec": "h265"}, "video.mp4", "hevc"),
                                ({"codec": "prores"}, "video.mov", "prores"), ({"codec": "gif"}, "video.gif", "gif")):
        config["data"]["output"] = output
        render(config)
        after = json.load(open(out / "manifest.json"))
        assert [after["stages"][str(sid)]["key"] for sid in range(9)] == [manifest["stages"][str(sid)]["key"] for sid in range(9)]
        assert after["stages"]["9"]["key"] != manifest["stages"]["9"]["key"]
        assert stage_files() == before, output  # nothing of stages 0-8 was written again
        assert probe_media(str(out / name), count=False).codec == codec
        assert [n for n in os.listdir(out) if n.startswith("video.")] == [name]
        kept = [n for d in os.listdir(out / "previous") for n in os.listdir(out / "previous" / d) if n.startswith("video.")]
        assert kept == [earlier]  # the video it replaced was moved to previous/, not deleted
        earlier = name
    config["data"]["output"] = {"codec": "png"}
    render(config)
    assert not [n for n in os.listdir(out) if n.startswith("video.")] and len(os.listdir(out / "frames")) == 12
    assert "PNG frames only" in json.load(open(out / "manifest.json"))["stages"]["9"]["note"]
    rerun = render(config)  # a finished PNG-only render is complete: nothing to do
    assert rerun.last_estimate is None


def test_header_that_lies_is_warned_and_shown_in_status(project, clips, tmp_path, caplog, capsys):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="diffsynth"):
        render(config_for(project, clips["tree"], out))
    assert any("header claims 40 frames but only 8 decode" in r.getMessage() for r in caplog.records)
    assert len(os.listdir(out / "frames")) == 8
    assert cli_main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "header claims 40 frames, 8 decode" in text and "warning: tree.avi: its header claims 40 frames but only 8 decode" in text
    assert "output: video.mp4, h264, 30 fps, 8 frames, no audio" in text


# ---------------------------------------------------------------------- many clips


def test_batch_renders_each_clip_loading_models_once(project, clips, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    shutil.copy(clips["ntsc_stereo"], folder / "dance.mp4")
    shutil.copy(clips["pal_silent"], folder / "walk.mp4")
    (folder / "broken.mp4").write_bytes(open(clips["ntsc_stereo"], "rb").read()[:3000])  # no moov atom: unreadable
    root = tmp_path / "out"
    config = config_for(project, clips["ntsc_stereo"], root)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    loads = []
    build = SDVideoPipelineRunner._build_pipeline
    monkeypatch.setattr(SDVideoPipelineRunner, "_build_pipeline", lambda self, c: loads.append(1) or build(self, c))
    assert cli_main(["run", str(config_path), "--input", str(folder)]) == 1  # one clip failed
    text = capsys.readouterr().out
    assert len(loads) == 1  # models loaded once for both good clips
    lines = {line.split()[0]: line for line in text.splitlines() if line.split() and line.split()[0].endswith(".mp4")}
    assert "failed: data.input_frames.video_file: ffmpeg cannot read it as a video: moov atom not found" in lines["broken.mp4"]
    assert lines["dance.mp4"].split()[1:2] == ["12"] and lines["dance.mp4"].endswith("done")
    assert lines["walk.mp4"].split()[1:2] == ["10"] and lines["walk.mp4"].endswith("done")
    assert "2 of 3 clips rendered" in text
    assert probe_media(str(root / "dance" / "video.mp4")).audio and not probe_media(str(root / "walk" / "video.mp4")).audio
    assert probe_media(str(root / "walk" / "video.mp4"), count=False).rate == 25
    summary = json.load(open(root / "batch.json"))["clips"]
    assert [(os.path.basename(c["clip"]), c["status"]) for c in summary] == [("broken.mp4", "failed"), ("dance.mp4", "done"), ("walk.mp4", "done")]
    # the clip rendered in the batch is the clip rendered alone (nothing of one clip's run leaks into the next)
    alone = tmp_path / "alone"
    render(config_for(project, str(folder / "walk.mp4"), alone))
    assert np.array_equal(frames_on_disk(alone), frames_on_disk(root / "walk"))
    # a rerun: each clip resumes on its own (finished ones in a moment, nothing rewritten)
    stamps = {n: os.stat(root / "dance" / "frames" / n).st_mtime_ns for n in os.listdir(root / "dance" / "frames")}
    assert cli_main(["run", str(config_path), "--input", str(folder / "*.mp4")]) == 1
    assert {n: os.stat(root / "dance" / "frames" / n).st_mtime_ns for n in os.listdir(root / "dance" / "frames")} == stamps
    assert cli_main(["run", str(config_path), "--input", str(tmp_path / "nothing" / "*.mp4")]) == 2
    assert "no file matches" in capsys.readouterr().err


def test_estimate_counts_the_chosen_format(project, clips, tmp_path):
    from diffsynth.estimate import estimate_plan

    runner = SDVideoPipelineRunner(progress_bar_cmd=None)
    final = {}
    for codec in ("h264", "prores", "png"):
        plan = runner.prepare(config_for(project, clips["ntsc_stereo"], tmp_path / codec, output={"codec": codec}))
        final[codec] = estimate_plan(plan, device="cpu", use_history=False).final_bytes
    frames_only = final["png"]  # PNG-only: the frames and no video
    assert final["h264"] > frames_only and final["prores"] - frames_only > 4 * (final["h264"] - frames_only)
