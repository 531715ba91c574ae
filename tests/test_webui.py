"""The Streamlit WebUI, headless (``AppTest``), on tiny random-weight models in a temporary ``models/`` tree.

Image Creator: generate, use an output as input, errors as messages, one model per session.
Video Creator: the form's config (with the original page's bugs fixed; the source's frame rate
and audio by default; the output format; the smoother), a render started from the page in a
background worker, killed, resumed and finished; a render started on the command line is
listed, cancelled and resumed the same way; a folder of clips rendered clip by clip.
"""
from __future__ import annotations

import ast
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from diffsynth.testing.factory import write_sd_checkpoint
from diffsynth.data.output import output_problems
from diffsynth.testing.runner_files import write_input_clip, write_tiny_project
from diffsynth.webui import runs
from diffsynth.webui.choices import guess_processor, model_files, snap_to_8
from diffsynth.webui.image_session import ImageModels, ImageRequest, compose_drawing, generate, step_progress
from diffsynth.webui.video_form import (ControlNetUnitForm, VideoForm, build_video_config, codec_choices, describe_input, input_clips,
                                        rife_model)

ROOT = Path(__file__).resolve().parents[1]
IMAGE_PAGE = str(ROOT / "pages" / "1_Image_Creator.py")
VIDEO_PAGE = str(ROOT / "pages" / "2_Video_Creator.py")
SD = os.path.join("models", "stable_diffusion", "tiny_sd15.safetensors")
FRAMES = 4


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A folder with ``models/`` (SD, AnimateDiff, ControlNets, textual inversion) and ``input.mp4``."""
    folder = tmp_path_factory.mktemp("webui_project")
    write_tiny_project(str(folder), frames=FRAMES, smoother=False, steps=2)
    return folder


@pytest.fixture
def in_project(project, monkeypatch):
    """Run in the project folder, as a user runs ``streamlit run`` next to ``models/``."""
    monkeypatch.chdir(project)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the render workers
    return project


def _no_problems(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


# ---------------------------------------------------------------------- pure helpers


def test_nothing_under_diffsynth_imports_streamlit():
    for path in (ROOT / "diffsynth").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(name.split(".")[0].startswith("streamlit") for name in names), path


def test_pickers_sizes_and_processor_guess(project):
    assert model_files(str(project / "models" / "ControlNet")) == [
        str(project / "models" / "ControlNet" / "control_tiny_canny.safetensors"), str(project / "models" / "ControlNet" / "control_tiny_tile.pth")]
    assert model_files(str(project / "no_such_folder")) == []
    assert guess_processor("control_v11p_sd15s2_lineart_anime.pth") == "lineart_anime"  # the longest id wins
    assert guess_processor("control_v11p_sd15_lineart.pth") == "lineart"
    assert guess_processor("mystery.pth") is None
    assert (snap_to_8(721), snap_to_8(3)) == (720, 8)


def _form(project, **changes) -> VideoForm:
    form = VideoForm(sd_model=str(project / SD), input_path=str(project / "input.mp4"), prompt="a girl dancing", width=64, height=64,
                     start_frame_id=0, end_frame_id=FRAMES, output_folder=str(project / "output" / "x"), device="cpu")
    for name, value in changes.items():
        setattr(form, name, value)
    return form


def test_video_form_fixes_the_original_pages_bugs(project, tmp_path):
    # an empty input path is a message, not a crash inside the runner
    with pytest.raises(ValueError, match="Input video: give the path"):
        build_video_config(_form(project, input_path="  "), "models")
    # a ControlNet unit's own video path is used (the original reused the input video's)
    other = tmp_path / "control_frames"
    other.mkdir()
    for i in range(FRAMES):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(other / f"{i:03d}.png")
    tile = str(project / "models" / "ControlNet" / "control_tiny_tile.pth")
    unit = ControlNetUnitForm(model_path=tile, processor_id="tile", use_input_video=False, video_path=str(other), start_frame_id=0, end_frame_id=FRAMES)
    config = build_video_config(_form(project, controlnet_units=[unit, ControlNetUnitForm()]), "models")
    assert config["data"]["controlnet_frames"] == [{"video_file": None, "image_folder": str(other), "height": 64, "width": 64,
                                                    "start_frame_id": 0, "end_frame_id": FRAMES}]
    assert config["models"]["controlnet_units"] == [{"processor_id": "tile", "model_path": tile, "scale": 0.5}]
    assert config["models"]["model_list"] == [str(project / SD), tile]
    assert "input_video" not in config["data"]
    # a ControlNet without a processor is refused before anything runs
    with pytest.raises(ValueError, match="ControlNet unit 1: choose a processor"):
        build_video_config(_form(project, controlnet_units=[ControlNetUnitForm(model_path=tile)]), "models")
    with pytest.raises(ValueError, match="holds 2 frames but the input video's holds 4"):
        unit.end_frame_id = 2
        build_video_config(_form(project, controlnet_units=[unit]), "models")


def test_video_form_leaves_the_rate_and_audio_to_the_source_and_builds_output_and_smoother(project, tmp_path):
    config = build_video_config(_form(project), "models")
    data, inputs = config["data"], config["pipeline"]["pipeline_inputs"]
    assert "fps" not in data and "audio" not in data  # the source's exact rate and its audio
    assert data["output"] == {"codec": "h264", "crf": 5, "pix_fmt": "yuv420p", "preset": "medium"}
    assert "smoother_configs" not in config and "smoother_progress_ids" not in inputs
    assert build_video_config(_form(project, fps=29.97), "models")["data"]["fps"] == 29.97
    assert build_video_config(_form(project, fps=24.0), "models")["data"]["fps"] == 24

    # each codec gets the options it has, and nothing it refuses
    outputs = {codec: build_video_config(_form(project, codec=codec, crf=20, pix_fmt=None), "models")["data"]["output"]
               for codec in ("h265", "vp9", "prores", "gif", "png")}
    assert outputs == {"h265": {"codec": "h265", "crf": 20, "pix_fmt": "yuv420p", "preset": "medium"},
                       "vp9": {"codec": "vp9", "crf": 20, "pix_fmt": "yuv420p"}, "prores": {"codec": "prores", "pix_fmt": "yuv422p10le"},
                       "gif": {"codec": "gif"}, "png": {"codec": "png"}}
    assert all(output_problems(o) == [] for o in outputs.values())
    assert (codec_choices("vp9").crf_range, codec_choices("h264").presets[0], codec_choices("png").file_name) == ((0, 63), "medium", None)
    with pytest.raises(ValueError, match="Output: data.output.crf is 70; vp9 takes a whole number from 0 to 63"):
        build_video_config(_form(project, codec="vp9", crf=70), "models")

    assert build_video_config(_form(project, audio="none"), "models")["data"]["audio"] is False
    sound = tmp_path / "sound.m4a"
    sound.write_bytes(b"")
    assert build_video_config(_form(project, audio="file", audio_file=str(sound)), "models")["data"]["audio"] == str(sound)
    with pytest.raises(ValueError, match="a gif video carries no audio"):
        build_video_config(_form(project, audio="file", audio_file=str(sound), codec="gif"), "models")
    with pytest.raises(ValueError, match="does not exist"):
        build_video_config(_form(project, audio="file", audio_file=str(tmp_path / "missing.wav")), "models")

    # FastBlend on the final frames, then RIFE, whose model joins the model list (offered only where it is)
    smoothed = _form(project, smoother="FastBlend", fastblend_mode="balanced", fastblend_window_size=5, fastblend_num_iter=2, rife=True)
    with pytest.raises(ValueError, match="RIFE needs its model"):
        build_video_config(smoothed, str(tmp_path / "models"))
    assert rife_model(str(tmp_path / "models")) is None
    from diffsynth.testing.rife_files import write_rife_file

    rife = str(tmp_path / "models" / "RIFE" / "flownet.pkl")
    os.makedirs(os.path.dirname(rife))
    os.makedirs(tmp_path / "models" / "textual_inversion")  # the form names it; the runner wants it there
    write_rife_file(rife)
    config = build_video_config(smoothed, str(tmp_path / "models"))
    assert config["smoother_configs"] == [
        {"processor_type": "FastBlend", "config": {"inference_mode": "balanced", "window_size": 5, "num_iter": 2, "guide_weight": 10.0}},
        {"processor_type": "RIFE", "config": {}}]
    assert config["pipeline"]["pipeline_inputs"]["smoother_progress_ids"] == [-1] and config["models"]["model_list"][-1] == rife
    from diffsynth.pipelines.runner import SDVideoPipelineRunner

    plan = SDVideoPipelineRunner(progress_bar_cmd=None).prepare(config)  # the runner's checks take it (nothing is loaded)
    assert plan["fps"] == 8 and plan["audio"] is None  # the clip's own rate; it has no sound


def test_a_folder_of_clips_is_a_batch_and_the_input_is_described(project, tmp_path):
    import imageio_ffmpeg

    clips = tmp_path / "clips"
    clips.mkdir()
    write_input_clip(str(clips / "b10.mp4"), frames=4)
    write_input_clip(str(clips / "b9.mp4"), frames=5, seed=1)
    assert input_clips(str(clips)) == [str(clips / "b9.mp4"), str(clips / "b10.mp4")]  # natural order
    assert input_clips(str(project / "input.mp4")) is None and input_clips(str(tmp_path / "missing")) is None
    images = tmp_path / "frames"
    images.mkdir()
    Image.new("RGB", (64, 64)).save(images / "000.png")
    (images / "also.mp4").write_bytes(b"")
    assert input_clips(str(images)) is None  # a folder with images is one video, as before
    config = build_video_config(_form(project, input_path=str(clips), end_frame_id=None), "models")
    assert config["data"]["input_frames"]["video_file"] == str(clips / "b9.mp4") and config["data"]["input_frames"]["end_frame_id"] is None

    assert describe_input(str(clips)).startswith("a folder of 2 clips (b9.mp4, b10.mp4)")
    assert describe_input(str(images)).startswith("a folder of 1 images")
    assert describe_input(str(project / "input.mp4")) == "input.mp4: 64x64, 8 fps, 4 frames, 0.50 s; audio: no audio"
    ntsc = tmp_path / "ntsc.mp4"  # the exact rate and the audio of a camera-like clip
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=30000/1001",
                    "-f", "lavfi", "-i", "sine=sample_rate=48000", "-t", "0.2", "-c:v", "libx264", "-c:a", "aac", str(ntsc)], check=True)
    about = describe_input(str(ntsc))
    assert "30000/1001 (29.970 fps)" in about and "aac, 48000 Hz" in about, about
    assert describe_input(str(images / "also.mp4")).startswith("cannot read also.mp4: ")  # a message, not an exception


def test_cli_command_lines_are_recognised():
    assert runs._cli_config_arg(["/venv/bin/diffsynth", "run", "c.json"]) == "c.json"
    assert runs._cli_config_arg(["python", "-m", "diffsynth.cli", "run", "c.yaml"]) == "c.yaml"
    assert runs._cli_config_arg(["python", "-c", "from diffsynth.cli import main; main()", "run", "c.json"]) == "c.json"
    assert runs._cli_config_arg(["python", "-m", "diffsynth.cli", "status", "out"]) is None
    assert runs._cli_config_arg(["python", "train.py", "run", "c.json"]) is None


def test_drawing_is_composited_over_the_input():
    base = Image.new("RGB", (64, 32), (0, 0, 255))
    strokes = np.zeros((16, 32, 4), np.uint8)  # half size: the canvas is scaled to the image
    strokes[:, :16] = (255, 0, 0, 255)
    out = np.asarray(compose_drawing(base, strokes))
    assert tuple(out[5, 5]) == (255, 0, 0) and tuple(out[5, 60]) == (0, 0, 255)
    assert compose_drawing(base, np.zeros((16, 32, 4), np.uint8)) is base


# ---------------------------------------------------------------------- Image Creator


def test_generate_reports_progress_per_image_and_chains_repetitions(in_project, tiny_pipe):
    events = []
    request = ImageRequest(prompt="a cat", num_inference_steps=2, height=64, width=64, num_images=2, seed=3,
                           input_image=Image.new("RGB", (64, 64), "white"), denoising_strength=0.5, repetition=2)
    results = generate(tiny_pipe, request, {}, lambda i: step_progress(lambda f, text: events.append((i, f, text)), f"image {i + 1}"))
    assert [seed for _, seed in results] == [3, 4, 5, 6]
    assert [(i, f) for i, f, _ in events] == [(i, f) for i in range(4) for f in (0.0, 0.5, 1.0)]
    assert events[-1][2] == "image 4: denoising 2/2"


def test_image_creator_generates_uses_output_as_input_and_reports_errors(in_project):
    at = AppTest.from_file(IMAGE_PAGE, default_timeout=120).run()
    _no_problems(at)
    at.sidebar.selectbox(key="model_path").select(SD)
    at.sidebar.text_area(key="prompt").input("a cat")
    at.sidebar.slider(key="steps").set_value(2)
    at.sidebar.selectbox(key="size_preset").select("Custom").run()
    at.sidebar.number_input(key="width").set_value(64)
    at.sidebar.number_input(key="height").set_value(64)
    at.sidebar.checkbox(key="use_fixed_seed").check().run()
    at.sidebar.number_input(key="seed").set_value(7)
    at.button(key="generate").click().run()
    _no_problems(at)
    assert len(at.get("image")) == 2
    outputs = at.session_state["output_images"]
    assert [o["seed"] for o in outputs] == [7, 8]

    # the page's images are the engine's: same seed, same pixels
    from diffsynth import ModelManager, SDImagePipeline

    mm = ModelManager(device="cpu")
    mm.load_model(SD)
    torch.manual_seed(8)
    expected = SDImagePipeline.from_model_manager(mm)(prompt="a cat", cfg_scale=7.5, height=64, width=64, num_inference_steps=2, progress_bar_cmd=None)
    assert np.array_equal(np.asarray(outputs[1]["image"]), np.asarray(expected))
    assert Image.open(io.BytesIO(outputs[0]["png"])).size == (64, 64)
    loaded = at.session_state["image_models"]
    assert loaded.key == ("Stable Diffusion", SD, "cpu")

    # "use it as input image": img2img from that output, chained twice
    at.button(key="use_output_as_input_1").click().run()
    _no_problems(at)
    assert np.array_equal(np.asarray(at.session_state["input_image"]), np.asarray(outputs[1]["image"]))
    at.slider(key="repetition").set_value(2)
    at.button(key="generate").click().run()
    _no_problems(at)
    assert [o["seed"] for o in at.session_state["output_images"]] == [7, 8, 9, 10]
    assert at.session_state["image_models"] is loaded and loaded.pipeline is not None  # loaded once per session

    # a file that is no model: a message, not a traceback; the previous model was released on the switch
    broken = Path("models/stable_diffusion/broken.safetensors")
    broken.write_bytes(b"not a model")
    try:
        at = at.run()
        at.sidebar.selectbox(key="model_path").select(str(broken))
        at.button(key="generate").click().run()
        assert not at.exception
        assert any("Could not load" in e.value and "broken.safetensors" in e.value for e in at.error), [e.value for e in at.error]
        assert loaded.key is None and loaded.model_manager is None
    finally:
        broken.unlink()
    at.sidebar.selectbox(key="model_path").select("None")
    at.button(key="generate").click().run()
    assert any("Choose a model first" in e.value for e in at.error)


def test_image_creator_sdxl_and_sdxl_turbo(in_project):
    from diffsynth import ModelManager, SDXLImagePipeline
    from diffsynth.testing.factory import write_sdxl_checkpoint

    sdxl = write_sdxl_checkpoint(os.path.join("models", "stable_diffusion_xl", "tiny_sdxl.safetensors"))
    turbo = write_sdxl_checkpoint(os.path.join("models", "stable_diffusion_xl_turbo", "tiny_sdxl_turbo.safetensors"), seed=1)
    at = AppTest.from_file(IMAGE_PAGE, default_timeout=120).run()
    at.sidebar.selectbox(key="model_type").select("Stable Diffusion XL").run()
    at.sidebar.selectbox(key="model_path").select(sdxl)
    at.sidebar.text_area(key="prompt").input("a cat")
    at.sidebar.slider(key="steps").set_value(2)
    at.sidebar.selectbox(key="size_preset").select("Custom").run()
    at.sidebar.number_input(key="width").set_value(64)
    at.sidebar.number_input(key="height").set_value(64)
    at.sidebar.number_input(key="num_images").set_value(1)
    at.sidebar.checkbox(key="use_fixed_seed").check().run()
    at.button(key="generate").click().run()
    _no_problems(at)
    (output,) = at.session_state["output_images"]
    mm = ModelManager(device="cpu")
    mm.load_model(sdxl)
    torch.manual_seed(0)
    expected = SDXLImagePipeline.from_model_manager(mm)(prompt="a cat", cfg_scale=7.5, height=64, width=64, num_inference_steps=2, progress_bar_cmd=None)
    assert np.array_equal(np.asarray(output["image"]), np.asarray(expected))

    # Turbo fixes steps, guidance and size: those widgets are gone
    at.sidebar.selectbox(key="model_type").select("Stable Diffusion XL Turbo").run()
    assert not [s for s in at.sidebar.slider if s.key in ("steps", "cfg_scale")]
    at.sidebar.selectbox(key="model_path").select(turbo)
    at.button(key="generate").click().run()
    _no_problems(at)
    assert at.session_state["output_images"][0]["image"].size == (512, 512)
    assert at.session_state["image_models"].key == ("Stable Diffusion XL Turbo", turbo, "cpu")


def test_models_are_released_on_switch(tmp_path):
    first = write_sd_checkpoint(str(tmp_path / "a.safetensors"), seed=0)
    second = write_sd_checkpoint(str(tmp_path / "b.safetensors"), seed=1)
    models = ImageModels()
    pipe = models.pipeline_for("Stable Diffusion", first, "cpu")
    assert models.pipeline_for("Stable Diffusion", first, "cpu") is pipe  # cached
    old_manager = models.model_manager
    other = models.pipeline_for("Stable Diffusion", second, "cpu")
    assert other is not pipe and models.model_manager is not old_manager and models.key[1] == second
    models.release()
    assert models.pipeline is None and models.key is None


# ---------------------------------------------------------------------- Video Creator


def _wait(condition, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _stage_done(out: str, stage: int) -> bool:
    try:
        with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
            return json.load(f)["stages"][str(stage)]["status"] == "done"
    except (OSError, ValueError, KeyError):  # not written yet, or replaced while being read
        return False


def _progress(at: AppTest) -> tuple[int, str]:
    bars = at.get("progress")
    assert bars, "the page shows no progress bar"
    return bars[0].proto.value, bars[0].proto.text


def _mtimes(folder):
    return {os.path.relpath(os.path.join(r, f), folder): os.stat(os.path.join(r, f)).st_mtime_ns
            for r, _, files in os.walk(folder) for f in files if f not in (runs.WORKER_FILE, runs.LOG_FILE, runs.CONFIG_FILE)}  # every run rewrites config.json


def test_video_render_survives_a_killed_worker_and_resumes_to_the_end(in_project):
    at = AppTest.from_file(VIDEO_PAGE, default_timeout=60).run()
    _no_problems(at)
    assert any("No renders" in i.value for i in at.info)
    at.selectbox(key="sd_model").select(SD)
    at.selectbox(key="animatediff_model").select(os.path.join("models", "AnimateDiff", "mm_tiny_v2.ckpt"))
    at.selectbox(key="cn_model_0").select(os.path.join("models", "ControlNet", "control_tiny_tile.pth")).run()
    assert at.selectbox(key="cn_processor_0_control_tiny_tile.pth").value == "tile"  # guessed from the file name
    at.text_input(key="input_path").input("input.mp4")
    at.selectbox(key="size_preset").select("Custom").run()
    at.number_input(key="width").set_value(64)
    at.number_input(key="height").set_value(64)
    at.number_input(key="end_frame_id").set_value(FRAMES)
    at.text_input(key="run_name").input("dance")
    at.text_area(key="prompt").input("best quality, a girl is dancing")
    at.slider(key="steps").set_value(2)
    at.slider(key="animatediff_batch_size").set_value(4).run()
    at.slider(key="animatediff_stride").set_value(2)
    at.checkbox(key="use_fixed_seed").check().run()
    at.number_input(key="seed").set_value(3)
    at.button(key="estimate_run").click().run()  # the estimate before Start: per stage, nothing written
    _no_problems(at)
    estimate = at.dataframe[0].value
    assert list(estimate["stage"])[:2] == ["source frames", "ControlNet annotations"] and list(estimate["stage"])[-1] == "total"
    assert any(c.value.startswith("disk: fits") for c in at.caption)
    assert not os.path.exists(in_project / "output" / "dance")
    at.button(key="start_run").click().run()
    _no_problems(at)
    out = str(in_project / "output" / "dance")
    assert any("Started the render" in s.value for s in at.success), [s.value for s in at.success]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["pipeline"]["seed"] == 3 and config["data"]["input_frames"]["video_file"] == str(in_project / "input.mp4")
    assert "fps" not in config["data"] and "audio" not in config["data"]  # the page's defaults: the source's rate and sound

    # it runs in its own process: the page sees it running and shows progress from the manifest
    _wait(lambda: _stage_done(out, 0), 120, "stage 0 of the background render")
    record = runs.read_worker_record(out)
    assert os.getsid(record["pid"]) != os.getsid(0)  # its own session: nothing that ends the Streamlit server's reaches it
    at.run()
    _no_problems(at)
    value, text = _progress(at)
    assert text.startswith("running"), text
    assert at.button(key="cancel_run").disabled is False and at.button(key="resume_run").disabled is True

    # kill it (as a crash or a reboot would), then the page offers Resume
    os.kill(record["pid"], signal.SIGKILL)
    _wait(lambda: not runs.render_processes(out), 30, "the killed worker to be gone")
    at.run()
    _no_problems(at)
    value, text = _progress(at)
    assert text.startswith("stopped") and 0 < value < 100, (value, text)
    assert any("process is gone" in w.value for w in at.warning)
    at.button(key="resume_run").click().run()
    _no_problems(at)
    assert any("Resumed dance" in s.value for s in at.success)

    _wait(lambda: not runs.render_processes(out) and runs.read_worker_record(out)["state"] != "running", 180, "the resumed render to end", 0.5)
    at.run()
    _no_problems(at)
    assert _progress(at) == (100, "done: all stages done (100%)"), runs.log_tail(out)
    compared = [d.value for d in at.dataframe if "time (measured / est.)" in d.value.columns]  # the comparison after the render
    assert compared and list(compared[0]["stage"])[4] == "denoising" and " / " in compared[0]["time (measured / est.)"][4]
    assert len(at.get("image")) == 1  # the last decoded frames
    at.button(key="open_result").click().run()
    _no_problems(at)
    assert at.get("video")
    (download,) = at.get("download_button")
    assert download.proto.label == "Download video.mp4" and download.proto.url.endswith(".mp4")
    assert runs.read_worker_record(out)["state"] == "finished"
    assert sorted(os.listdir(os.path.join(out, "frames"))) == [f"{i:06d}.png" for i in range(FRAMES)]

    # the command line sees the same render: `diffsynth run OUTPUT/config.json` has nothing left to do
    from diffsynth.cli import main

    before = _mtimes(out)
    assert main(["run", os.path.join(out, "config.json")]) == 0
    assert _mtimes(out) == before


def test_a_command_line_render_is_listed_and_cancelled_from_the_page(in_project):
    config = write_tiny_project(str(in_project), frames=FRAMES, smoother=False, steps=2)  # same files: same identities
    out = str(in_project / "output" / "from_cli")
    config["data"]["output_folder"] = out
    config["pipeline"]["pipeline_inputs"].update(animatediff_batch_size=4, animatediff_stride=2)
    path = in_project / "cli_config.json"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable, "-m", "diffsynth.cli", "run", path.name], cwd=in_project,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        _wait(lambda: os.path.isfile(os.path.join(out, "manifest.json")), 120, "the command-line render to start")
        info = runs.run_info(out)
        assert info.state == "running" and info.pids == [proc.pid]

        at = AppTest.from_file(VIDEO_PAGE, default_timeout=60).run()
        _no_problems(at)
        at.selectbox(key="selected_run").select(out).run()
        assert _progress(at)[1].startswith("running")
        at.button(key="cancel_run").click().run()
        _no_problems(at)
        assert any(f"Asked pid {proc.pid} to stop" in i.value for i in at.info), [i.value for i in at.info]
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    at.run()
    _no_problems(at)
    assert at.button(key="cancel_run").disabled and not at.button(key="resume_run").disabled
    assert runs.run_info(out).state in ("stopped", "not started")


def test_the_page_offers_gpu_processes_only_with_several_cuda_devices(in_project, monkeypatch):
    at = AppTest.from_file(VIDEO_PAGE, default_timeout=60).run()
    _no_problems(at)
    assert "gpu_processes" not in [box.key for box in at.selectbox]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    at = AppTest.from_file(VIDEO_PAGE, default_timeout=60).run()
    _no_problems(at)
    box = at.selectbox(key="gpu_processes")
    assert box.options == ["1", "2", "3", "4"] and box.value == 4  # all of them by default


def test_a_render_elsewhere_does_not_keep_the_page_rerunning(in_project, tmp_path):
    """A render into another output root is no reason to refresh this page's panel (it used to rerun the page without end)."""
    out = str(tmp_path / "renders" / "idle")
    runs.write_run_config(build_video_config(_form(in_project, output_folder=out), "models"), out)
    elsewhere = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", runs.WORKER_MODULE, str(tmp_path / "other")])
    try:
        assert runs.render_processes(str(tmp_path / "other"))  # it looks like a render to the page
        at = AppTest.from_file(VIDEO_PAGE, default_timeout=20)
        at.session_state["output_root"] = str(tmp_path / "renders")
        at.run()
        _no_problems(at)
        assert _progress(at)[1].startswith("not started") and at.session_state["panel_refreshing"] is False
    finally:
        elsewhere.kill()
        elsewhere.wait()


def test_a_render_started_on_two_processes_runs_under_the_launcher_and_resumes_so(in_project, tmp_path):
    """``start_render(out, processes=2)``: the worker runs ``diffsynth run --nproc-per-node 2``; the record keeps the count for Resume."""
    config = write_tiny_project(str(tmp_path / "two"), frames=FRAMES, smoother=False, steps=2)
    config["pipeline"]["pipeline_inputs"].update(animatediff_batch_size=2, animatediff_stride=1)
    out = config["data"]["output_folder"]
    runs.write_run_config(config, out)
    proc = runs.start_render(out, processes=2)
    assert proc.wait(timeout=240) == 0, runs.log_tail(out)
    record = runs.read_worker_record(out)
    assert record["state"] == "finished" and record["processes"] == 2 and record["argv"][-2:] == ["--nproc-per-node", "2"]
    assert json.load(open(os.path.join(out, "manifest.json")))["distributed"]["world_size"] == 2
    assert sorted(os.listdir(os.path.join(out, "frames"))) == [f"{i:06d}.png" for i in range(FRAMES)]
    with pytest.raises(ValueError, match="processes must be >= 1"):
        runs.start_render(out, processes=0)


def test_a_folder_of_clips_renders_clip_by_clip_from_the_page(in_project, tmp_path):
    """A folder of clips as the input: one worker renders each into OUTPUT/<clip>/ (GIF, FastBlend); the panel lists the batch
    and its clips and offers each clip's video under its own name and type."""
    clips = tmp_path / "clips"
    clips.mkdir()
    write_input_clip(str(clips / "b9.mp4"), frames=FRAMES)
    write_input_clip(str(clips / "b10.mp4"), frames=FRAMES + 1, seed=1)  # clips differ in length: each is rendered whole
    at = AppTest.from_file(VIDEO_PAGE, default_timeout=60).run()
    at.sidebar.text_input(key="output_root").input(str(tmp_path / "renders")).run()
    at.selectbox(key="sd_model").select(SD)
    at.text_input(key="input_path").input(str(clips)).run()
    _no_problems(at)
    assert any(c.value.startswith("a folder of 2 clips (b9.mp4, b10.mp4)") for c in at.caption)
    assert at.checkbox(key="whole_clips").value is True and "gpu_processes" not in [box.key for box in at.selectbox]
    at.selectbox(key="size_preset").select("Custom").run()
    at.number_input(key="width").set_value(64)
    at.number_input(key="height").set_value(64)
    at.selectbox(key="codec").select("gif")
    at.selectbox(key="smoother").select("FastBlend").run()
    at.number_input(key="fastblend_window_size").set_value(2)
    at.number_input(key="fastblend_num_iter").set_value(2)
    at.text_input(key="run_name").input("clips")
    at.text_area(key="prompt").input("a girl is dancing")
    at.slider(key="steps").set_value(1)
    at.slider(key="animatediff_batch_size").set_value(4).run()
    at.button(key="start_run").click().run()
    _no_problems(at)
    assert any("Started the render of 2 clips" in s.value for s in at.success), [s.value for s in at.success]
    out = str(tmp_path / "renders" / "clips")
    # the batch's config has a name of its own: OUTPUT is not a (broken) render of one video
    assert os.path.isfile(os.path.join(out, runs.BATCH_CONFIG_FILE)) and not os.path.exists(os.path.join(out, runs.CONFIG_FILE))
    assert runs.read_worker_record(out)["input"] == str(clips)

    _wait(lambda: not runs.render_processes(out) and runs.read_worker_record(out)["state"] not in ("starting", "running"), 180,
          "the batch to end", 0.5)
    assert runs.read_worker_record(out)["state"] == "finished", runs.log_tail(out)
    results = json.load(open(os.path.join(out, "batch.json")))["clips"]
    assert [(os.path.basename(r["clip"]), r["status"], r["frames"]) for r in results] == [("b9.mp4", "done", FRAMES), ("b10.mp4", "done", FRAMES + 1)]
    for name, frames in (("b9", FRAMES), ("b10", FRAMES + 1)):
        clip_out = os.path.join(out, name)
        assert len(os.listdir(os.path.join(clip_out, "frames"))) == frames and os.path.isfile(os.path.join(clip_out, "video.gif"))
        config = json.load(open(os.path.join(clip_out, runs.CONFIG_FILE)))
        assert config["data"]["input_frames"]["video_file"] == str(clips / f"{name}.mp4") and config["smoother_configs"][0]["processor_type"] == "FastBlend"

    at.run()
    _no_problems(at)
    listed = at.dataframe[0].value
    assert list(listed["render"]) == ["clips", "clips/b9", "clips/b10"] and set(listed["state"]) == {"done"}
    assert _progress(at) == (100, "done: 2 of 2 clips done (100%)")  # the batch, selected after the start
    table = at.dataframe[1].value
    assert list(table["clip"]) == ["b9.mp4", "b10.mp4"] and list(table["frames"]) == [FRAMES, FRAMES + 1]

    # a clip is a render of its own: its stages, and its video offered as what it is
    at.selectbox(key="selected_run").select(os.path.join(out, "b10")).run()
    assert _progress(at) == (100, "done: all stages done (100%)")
    at.button(key="open_result").click().run()
    _no_problems(at)
    (download,) = at.get("download_button")
    assert download.proto.label == "Download video.gif" and download.proto.url.endswith(".gif")
    assert runs.run_info(os.path.join(out, "b10")).download == ("clips_b10.gif", "image/gif")


def test_cancelling_a_clip_stops_its_batch_and_resume_continues_it(in_project, tmp_path):
    """While a batch runs, its clips count its process as theirs (Cancel on a clip stops the batch; no second writer
    starts); Resume takes the clips its start recorded and skips the finished ones; a clip that fails is named."""
    clips = tmp_path / "clips"
    clips.mkdir()
    for k, name in enumerate(("a", "b")):
        write_input_clip(str(clips / f"{name}.mp4"), frames=FRAMES, seed=k)
    (clips / "c.mp4").write_bytes(b"not a video")
    out = str(tmp_path / "batch")
    form = _form(in_project, input_path=str(clips), end_frame_id=None, output_folder=out, num_inference_steps=4,
                 animatediff_batch_size=4, animatediff_stride=2)
    config = build_video_config(form, "models")
    runs.write_run_config(config, out, batch=True)
    with pytest.raises(ValueError, match="holds a batch of clips"):
        runs.write_run_config(config, out)
    worker = runs.start_render(out, clips=str(clips))
    first = os.path.join(out, "a")
    _wait(lambda: _stage_done(first, 0), 120, "the first clip to start")
    info = runs.run_info(out)
    assert info.state == "running" and info.stage == "clip 1 of 3: a.mp4"
    assert [r["state"] for r in info.clips] == ["running", "queued", "queued"]
    assert runs.run_info(first).state == "running" and runs.run_info(first).name == "batch/a"
    with pytest.raises(runs.RunBusy):
        runs.start_render(first)  # the clip alone would be a second writer of its folder
    assert runs.cancel_render(first) == [worker.pid]
    assert worker.wait(timeout=60) == 130
    info = runs.run_info(out)
    assert info.state == "cancelled" and [r["state"] for r in info.clips][1:] == ["not started", "not started"], info

    resumed = runs.start_render(out)  # the clips its first start recorded
    assert resumed.wait(timeout=180) == 1, runs.log_tail(out)  # one clip failed
    info = runs.run_info(out)
    assert [r["state"] for r in info.clips] == ["done", "done", "failed"] and "cannot read it as a video" in info.clips[2]["result"]
    assert info.state == "failed" and info.message.startswith("1 of 3 clips failed (c.mp4)")
    assert [os.path.basename(p) for p in runs.list_runs(str(tmp_path))] == ["batch", "a", "b"]
