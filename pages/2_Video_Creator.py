"""Video Creator: builds a runner config and renders it in a background process that outlives the browser
(a folder of clips: each clip in turn, into a folder of its own)."""
import os
import random
import time

import streamlit as st

from diffsynth.controlnets.annotators import PROCESSOR_IDS
from diffsynth.schedulers.base import SAMPLER_HELP, sampler_names
from diffsynth.webui.choices import (CUSTOM_SIZE, SIZE_PRESETS, available_devices, gpu_process_choices, guess_processor, model_files,
                                    snap_to_8)
from diffsynth.utils.sizes import human_bytes
from diffsynth.webui.runs import (BATCH_CONFIG_FILE, CONFIG_FILE, RunInfo, cancel_render, comparison_rows, estimate_rows, estimate_verdicts,
                                  list_runs, read_worker_record, render_processes, rendering_processes, run_info, start_render,
                                  write_run_config)
from diffsynth.webui.video_form import (AUDIO_CHOICES, CODECS, FASTBLEND_MODES, SMOOTHERS, ControlNetUnitForm, VideoForm, build_video_config,
                                        codec_choices, describe_input, input_clips, rife_model)

VIDEO_MODEL_EXTENSIONS = (".safetensors", ".pth", ".ckpt")
NUM_CONTROLNET_UNITS = 3

st.set_page_config(page_title="Video Creator", layout="wide")
st.title("Video Creator")
state = st.session_state
state.setdefault("run_name", time.strftime("render_%Y%m%d_%H%M%S"))
if "next_run_name" in state:  # set after a start; a widget's value can only change before the widget is drawn
    state["run_name"] = state.pop("next_run_name")


def file_picker(label: str, folder: str, key: str) -> str | None:
    files = model_files(folder, VIDEO_MODEL_EXTENSIONS)
    choice = st.selectbox(label, ["None"] + files, format_func=lambda p: p if p == "None" else os.path.basename(p), key=key)
    return None if choice == "None" else choice


def estimate_form(config: dict, processes: int) -> dict:
    """The estimate of the form's config (``diffsynth estimate``), as JSON."""
    from diffsynth.cache.manifest import Manifest
    from diffsynth.estimate import estimate_plan
    from diffsynth.pipelines.runner import SDVideoPipelineRunner

    runner = SDVideoPipelineRunner(progress_bar_cmd=None)
    plan = runner.prepare(config)
    out = plan["config"]["data"]["output_folder"]
    return estimate_plan(plan, world=processes, manifest=Manifest(out, writable=False), keys=runner.stage_keys(plan)).as_json()


@st.cache_data(max_entries=64, show_spinner=False)
def _described(path: str, stamp: tuple) -> str:
    return describe_input(path)


def about_input(path: str) -> str:
    """``describe_input``, probed again only when the path or its modification time changes (the page reruns often)."""
    expanded = os.path.expanduser(path.strip())
    try:
        stamp = (os.stat(expanded).st_mtime_ns,) if expanded else ()
    except OSError:
        stamp = ()
    return _described(path.strip(), stamp)


AUDIO_LABELS = {"source": "the input's", "none": "none", "file": "from a file"}
MODE_HELP = "fast: quickest, for long videos; balanced: a little smoother; accurate: best and slowest (the Diffutoon paper's)"


def flash(kind: str, text: str) -> None:
    """A message that survives the rerun that follows an action."""
    state["flash"] = (kind, text)


with st.sidebar:
    models_root = st.text_input("Models folder", value=os.environ.get("DIFFSYNTH_MODELS_DIR", "models"), key="models_root")
    output_root = st.text_input("Output root", value=os.environ.get("DIFFSYNTH_OUTPUT_DIR", "output"), key="output_root",
                                help="each render is a folder in here; the Renders panel lists them")

form_column, runs_column = st.columns(2)

# ---------------------------------------------------------------------- the form
with form_column:
    form = VideoForm()
    with st.expander("Model", expanded=True):
        form.sd_model = file_picker("Stable Diffusion", os.path.join(models_root, "stable_diffusion"), "sd_model")
        form.animatediff_model = file_picker("AnimateDiff", os.path.join(models_root, "AnimateDiff"), "animatediff_model")
        c1, c2 = st.columns(2)
        with c1:
            form.lora_model = file_picker("LoRA", os.path.join(models_root, "lora"), "lora_model")
        form.lora_alpha = c2.slider("LoRA Alpha", -4.0, 4.0, 1.0, step=0.1, key="lora_alpha")
        form.device = st.selectbox("Device", available_devices(), key="device")

    with st.expander("Data", expanded=True):
        form.input_path = st.text_input("Input Video File Path", key="input_path",
                                        help="a video file, a folder of images, or a folder of clips (each rendered into a folder of its own)")
        clips = input_clips(form.input_path)
        about = about_input(form.input_path)
        if about:
            st.caption(about)
        preset = st.selectbox("Size (width x height)", [CUSTOM_SIZE] + list(SIZE_PRESETS), index=8, key="size_preset")
        if preset == CUSTOM_SIZE:
            c1, c2 = st.columns(2)
            form.width = snap_to_8(c1.number_input("Width", 64, 4096, 1024, step=8, key="width"))
            form.height = snap_to_8(c2.number_input("Height", 64, 4096, 1024, step=8, key="height"))
            st.caption(f"Sizes are rounded to multiples of 8: {form.width}x{form.height}.")
        else:
            form.width, form.height = SIZE_PRESETS[preset]
        c1, c2, c3 = st.columns(3)
        form.start_frame_id = int(c1.number_input("Start Frame id", 0, None, 0, key="start_frame_id"))
        whole_clips = clips is not None and c2.checkbox("Whole clips", value=True, key="whole_clips",
                                                        help="clips differ in length: each is rendered from the start frame to its end")
        form.end_frame_id = None if whole_clips else int(c2.number_input("End Frame id", 1, None, 16, key="end_frame_id"))
        fps_mode = c3.selectbox("FPS", ["source", "set"], key="fps_mode", format_func={"source": "the input's", "set": "set a rate"}.get,
                                help="the input's exact frame rate (30000/1001 stays 30000/1001), or one you set")
        form.fps = float(c3.number_input("Frame rate", 0.001, 1000.0, 30.0, format="%.3f", key="fps")) if fps_mode == "set" else None
        run_name = st.text_input("Render name", key="run_name", help="the output folder's name in the output root")
        form.output_folder = os.path.join(output_root, run_name.strip())
        st.caption(f"Output folder: `{os.path.abspath(form.output_folder)}`" + (" (each clip into a folder in it)" if clips else ""))
        if os.path.isfile(os.path.join(form.output_folder, BATCH_CONFIG_FILE if clips else CONFIG_FILE)):
            st.caption("This folder already holds a render: Run updates it, reusing every stage whose inputs did not change.")

    with st.expander("Output video", expanded=False):
        c1, c2 = st.columns(2)
        form.codec = c1.selectbox("Codec", CODECS, key="codec",
                                  format_func=lambda c: f"{c} ({codec_choices(c).file_name or 'PNG frames only'})")
        codec = codec_choices(form.codec)
        if codec.crf_range:  # keyed by codec: another codec starts at its own default
            form.crf = c2.slider("Quality (CRF, lower is better)", *codec.crf_range, codec.crf_default, key=f"crf_{form.codec}")
        else:
            c2.caption(f"{form.codec} has no quality setting")
        if codec.pix_fmts:
            form.pix_fmt = c1.selectbox("Pixel format", codec.pix_fmts, key=f"pix_fmt_{form.codec}", help="the first plays everywhere")
        if codec.presets:
            form.preset = c2.selectbox("Encoder preset", codec.presets, key=f"preset_{form.codec}", help="slower: smaller file, same quality")
        form.audio = st.radio("Audio", AUDIO_CHOICES, format_func=AUDIO_LABELS.get, key="audio", horizontal=True,
                              help="the input's audio is cut to the rendered frames")
        if form.audio == "file":
            form.audio_file = st.text_input("Audio file", key="audio_file", help="a video or audio file whose sound the video carries")

    with st.expander("Smoother", expanded=False):
        form.smoother = st.selectbox("Smoother", SMOOTHERS, key="smoother", help="FastBlend on the final frames removes flicker (Diffutoon's deflicker)")
        if form.smoother == "FastBlend":
            defaults = VideoForm()
            c1, c2 = st.columns(2)
            form.fastblend_mode = c1.selectbox("Mode", FASTBLEND_MODES, key="fastblend_mode", help=MODE_HELP)
            form.fastblend_window_size = int(c2.number_input("Window size", 1, 1000, defaults.fastblend_window_size, key="fastblend_window_size",
                                                             help="frames on each side blended into each frame"))
            form.fastblend_num_iter = int(c1.number_input("Iterations", 1, 100, defaults.fastblend_num_iter, key="fastblend_num_iter",
                                                          help="patch-match iterations per frame pair"))
            form.fastblend_guide_weight = float(c2.number_input("Guide weight", 0.0, 1000.0, defaults.fastblend_guide_weight,
                                                                key="fastblend_guide_weight", help="how much the input video guides the blending"))
        if rife_model(models_root):
            form.rife = st.checkbox("RIFE", value=False, key="rife", help="RIFE frame-interpolation smoothing, after FastBlend when both are on")
        else:
            st.caption(f"RIFE: put its model at `{os.path.join(models_root, 'RIFE', 'flownet.pkl')}` to use it")

    with st.expander("ControlNet Units", expanded=True):
        for k, tab in enumerate(st.tabs([f"ControlNet Unit {k + 1}" for k in range(NUM_CONTROLNET_UNITS)])):
            with tab:
                unit = ControlNetUnitForm()
                unit.model_path = file_picker("ControlNet", os.path.join(models_root, "ControlNet"), f"cn_model_{k}")
                guessed = guess_processor(unit.model_path)
                options = ["None"] + list(PROCESSOR_IDS)
                # keyed by the file: choosing another ControlNet re-guesses its processor from the name
                choice = st.selectbox("Processor", options, index=options.index(guessed) if guessed else 0,
                                      key=f"cn_processor_{k}_{os.path.basename(unit.model_path or '')}")
                unit.processor_id = None if choice == "None" else choice
                unit.scale = st.slider("Scale", 0.0, 1.0, 0.5, step=0.01, key=f"cn_scale_{k}")
                unit.use_input_video = st.checkbox("Use input video as ControlNet input", value=True, key=f"cn_use_input_{k}")
                if not unit.use_input_video:
                    unit.video_path = st.text_input("ControlNet Video File Path", key=f"cn_path_{k}", help="frames are resized to the input video's size")
                    c1, c2 = st.columns(2)
                    unit.start_frame_id = int(c1.number_input("Start Frame id", 0, None, 0, key=f"cn_start_{k}"))
                    unit.end_frame_id = int(c2.number_input("End Frame id", 1, None, 16, key=f"cn_end_{k}"))
                form.controlnet_units.append(unit)

    with st.expander("Seed", expanded=True):
        use_fixed_seed = st.checkbox("Use fixed seed", value=False, key="use_fixed_seed")
        seed = st.number_input("Random seed", 0, 10**9, 0, key="seed", disabled=not use_fixed_seed)

    with st.expander("Textual Guidance", expanded=True):
        form.prompt = st.text_area("Positive prompt", key="prompt")
        form.negative_prompt = st.text_area("Negative prompt", key="negative_prompt")
        c1, c2 = st.columns(2)
        form.cfg_scale = c1.slider("Classifier-free guidance scale", 1.0, 10.0, 7.0, key="cfg_scale")
        form.clip_skip = c2.slider("Clip Skip", 1, 4, 1, key="clip_skip")

    with st.expander("Denoising", expanded=True):
        c1, c2 = st.columns(2)
        form.num_inference_steps = c1.slider("Inference steps", 1, 100, 10, key="steps")
        form.denoising_strength = c2.slider("Denoising strength", 0.01, 1.0, 1.0, key="denoising_strength")
        form.sampler = c1.selectbox("Sampler", sampler_names(), key="sampler", help=SAMPLER_HELP)

    with st.expander("Efficiency (only for saving VRAM; results do not change)", expanded=False):
        c1, c2 = st.columns(2)
        form.animatediff_batch_size = c1.slider("Animatediff batch size", 1, 32, 16, key="animatediff_batch_size")
        form.animatediff_stride = c2.slider("Animatediff stride", 1, max(2, form.animatediff_batch_size),
                                            max(1, form.animatediff_batch_size // 2), key="animatediff_stride")
        form.unet_batch_size = c1.slider("UNet batch size", 1, 32, 1, key="unet_batch_size")
        form.controlnet_batch_size = c2.slider("ControlNet batch size", 1, 32, 1, key="controlnet_batch_size")
        form.cross_frame_attention = st.checkbox("Enable Cross-Frame Attention", value=False, key="cross_frame_attention")

    process_choices = gpu_process_choices()
    processes = 1
    if clips is not None:
        st.caption(f"{len(clips)} clips: each is rendered in turn, with the models loaded once.")
    elif len(process_choices) > 1:  # more than one CUDA device: one video across several of them, same result
        processes = st.selectbox("GPU processes", process_choices, index=len(process_choices) - 1, key="gpu_processes",
                                 help="render this video on this many GPUs at once (one process each); the frames are the ones one GPU gives")

    if st.button("Estimate", key="estimate_run", help="disk, RAM, device memory and time of this render, before it starts (no model is loaded)"):
        form.seed = int(seed) if use_fixed_seed else 0
        try:
            if not run_name.strip():
                raise ValueError("give the render a name (its output folder)")
            state["estimate"] = estimate_form(build_video_config(form, models_root), processes)
            state["estimate_of"] = f"the first clip, {os.path.basename(clips[0])}, of {len(clips)}" if clips else None
        except (ValueError, OSError) as exc:
            state.pop("estimate", None)
            st.error(str(exc))
    if state.get("estimate"):
        shown = state["estimate"]
        st.dataframe(estimate_rows(shown), hide_index=True)
        for fits, sentence in estimate_verdicts(shown):
            (st.caption if fits else st.warning)(sentence)
        st.caption("Time from: " + shown["sources"]["time"] + ". The render prints the same estimate first (see its log) and "
                   "refuses to start when the disk cannot hold it." + (f" This is the estimate of {state['estimate_of']}." if state.get("estimate_of") else ""))

    if st.button("☢️Run☢️", type="primary", key="start_run", help="starts a background render; you may close the browser"):
        form.seed = int(seed) if use_fixed_seed else random.randrange(0, 10**9)
        try:
            if not run_name.strip():
                raise ValueError("give the render a name (its output folder)")
            config = build_video_config(form, models_root)
            out = config["data"]["output_folder"]
            if render_processes(out):
                raise ValueError(f"a render is already running in {out}; cancel it first or choose another render name")
            write_run_config(config, out, batch=clips is not None)
            folder = os.path.abspath(os.path.expanduser(form.input_path.strip())) if clips else None
            proc = start_render(out, processes=1 if clips else processes, clips=folder)
        except (ValueError, OSError) as exc:
            st.error(str(exc))
        else:
            what = f"the render of {len(clips)} clips" if clips else "the render"
            flash("success", f"Started {what} in {out} (pid {proc.pid}, seed {form.seed}). It runs in the background: closing the browser does not stop it.")
            state["selected_run"] = out
            state["next_run_name"] = time.strftime("render_%Y%m%d_%H%M%S")  # the next render gets a folder of its own
            st.rerun()


# ---------------------------------------------------------------------- the renders in the output root
def show_run(info: RunInfo) -> None:
    text = f"{info.state}: {info.stage} ({info.fraction:.0%})"
    st.progress(min(1.0, max(0.0, info.fraction)), text=text)
    {"failed": st.error, "done": st.success, "running": st.info, "queued": st.info}.get(info.state, st.warning)(info.message)
    c1, c2, c3 = st.columns(3)
    if c1.button("Resume", key="resume_run", disabled=info.state in ("running", "queued", "done")):
        try:
            record = read_worker_record(info.out) or {}
            proc = start_render(info.out, cwd=record.get("cwd"), processes=int(record.get("processes", 1)))
        except (ValueError, OSError) as exc:
            flash("error", str(exc))
        else:
            flash("success", f"Resumed {info.name} in the background (pid {proc.pid}).")
        st.rerun()
    cancel_help = "stops the batch: its process renders every clip" if info.batch is not None else None
    if c2.button("Cancel", key="cancel_run", disabled=info.state not in ("running", "queued"), help=cancel_help):
        pids = cancel_render(info.out)
        flash("info", f"Asked pid {', '.join(map(str, pids))} to stop; finished work is kept and Resume continues." if pids else "The render had already stopped.")
        st.rerun()
    if info.clips is not None:  # a batch: its clips, each a render of its own
        st.dataframe(info.clips, hide_index=True)
        st.caption(f"Each clip is a render of its own, in `{info.out}/<render>`: choose `{info.name}/<render>` above for its stages, frames "
                   f"and video. Resume continues the batch (finished clips are skipped).")
        if info.log_tail:
            with st.expander("Log", expanded=info.state == "failed"):
                st.code(info.log_tail, language=None)
        return
    if c3.button("Open result", key="open_result", disabled=info.video is None):
        state["opened_result"] = info.out
    if info.table is not None:
        rows = [{"id": r["id"], "stage": r["name"], "status": r["status"], "frames": r["frames"], "disk": human_bytes(r["bytes"]), "note": r["note"]}
                for r in info.table["rows"]]
        st.dataframe(rows, hide_index=True)
        st.caption(f"{info.table['frames'] if info.table['frames'] is not None else '?'} frames, {human_bytes(info.table['total_bytes'])} on disk, "
                   f"in `{info.out}`. Same as `diffsynth status {info.out}`; resume from a terminal with `diffsynth run {os.path.join(info.out, 'config.json')}`.")
    if info.table is not None and any(r.get("predicted") for r in info.table["rows"]):
        with st.expander("Predicted vs measured", expanded=info.state == "done"):
            st.dataframe(comparison_rows(info.table), hide_index=True)
    if info.last_frames:
        st.image(info.last_frames, caption=[f"frame {int(os.path.basename(p).split('.')[0])}" for p in info.last_frames], width=160)
    if state.get("opened_result") == info.out and info.video is not None:
        file_name, mime = info.download
        (st.image if mime.startswith("image/") else st.video)(info.video)
        with open(info.video, "rb") as f:
            st.download_button(f"Download {os.path.basename(info.video)}", data=f.read(), file_name=file_name, mime=mime, key="download_video")
        st.caption(f"Frames: `{os.path.join(info.out, 'frames')}`")
    if info.log_tail:
        with st.expander("Log", expanded=info.state == "failed"):
            st.code(info.log_tail, language=None)


def listed_runs() -> list[str]:
    return list_runs(output_root)[:30]


def runs_panel() -> None:
    if "flash" in state:
        kind, text = state.pop("flash")
        getattr(st, kind)(text)
    runs = listed_runs()
    if not runs:
        st.info(f"No renders in `{os.path.abspath(output_root)}` yet.")
        return
    scan = rendering_processes()
    infos = {info.out: info for info in (run_info(r, scan=scan) for r in runs)}
    st.dataframe([{"render": i.name, "state": i.state, "progress": f"{i.fraction:.0%}", "stage": i.stage} for i in infos.values()], hide_index=True)
    if state.get("selected_run") not in infos:
        state["selected_run"] = next(iter(infos))
    selected = st.selectbox("Render", list(infos), format_func=lambda p: infos[p].name, key="selected_run")
    show_run(infos[selected])
    if state.get("panel_refreshing") and not any(i.pids for i in infos.values()):
        state["panel_refreshing"] = False
        st.rerun()  # a full rerun turns the periodic refresh off


with runs_column:
    st.subheader("Renders")
    # Refresh while a render listed here runs. The same renders and processes as the panel's test above: a render
    # elsewhere on the machine (another output root) counted here but not there made each rerun start the next.
    scan = rendering_processes()
    running = any(render_processes(r, scan) for r in listed_runs())
    state["panel_refreshing"] = running
    st.fragment(runs_panel, run_every=3.0 if running else None)()
