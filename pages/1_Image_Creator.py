"""Image Creator: text-to-image and image-to-image (with a sketch canvas) from a model under models/."""
import logging
import os

import streamlit as st
from PIL import Image, UnidentifiedImageError
from streamlit_drawable_canvas import st_canvas

from diffsynth.data.images import crop_and_resize
from diffsynth.schedulers.base import SAMPLER_HELP, sampler_names
from diffsynth.webui.choices import CUSTOM_SIZE, SIZE_PRESETS, available_devices, model_files, snap_to_8
from diffsynth.webui.image_session import MODEL_TYPES, ImageModels, ImageRequest, compose_drawing, generate, png_bytes, step_progress

logger = logging.getLogger("diffsynth.webui")

st.set_page_config(page_title="Image Creator", layout="wide")
st.title("Image Creator")
state = st.session_state
state.setdefault("image_models", ImageModels())
state.setdefault("input_version", 0)  # part of the uploader's and canvas's keys: a new input image resets both
state.setdefault("output_images", [])


def set_input(image):
    if image is None:
        state.pop("input_image", None)
    else:
        state["input_image"] = image
    state["input_version"] += 1


# ---------------------------------------------------------------------- sidebar: model, prompt, image settings
with st.sidebar:
    with st.expander("Model", expanded=True):
        model_type = st.selectbox("Model type", list(MODEL_TYPES), key="model_type")
        models_root = st.text_input("Models folder", value=os.environ.get("DIFFSYNTH_MODELS_DIR", "models"), key="models_root")
        folder = os.path.join(models_root, MODEL_TYPES[model_type].folder)
        files = model_files(folder)
        model_path = st.selectbox("Model path", ["None"] + files, format_func=lambda p: p if p == "None" else os.path.basename(p), key="model_path")
        if not files:
            st.caption(f"No model files in `{folder}` yet: put a checkpoint there.")
        device = st.selectbox("Device", available_devices(), key="device")
    fixed = MODEL_TYPES[model_type].fixed
    with st.expander("Prompt", expanded=True):
        prompt = st.text_area("Positive prompt", key="prompt")
        negative_prompt = "" if "negative_prompt" in fixed else st.text_area("Negative prompt", key="negative_prompt")
        cfg_scale = 1.0 if "cfg_scale" in fixed else st.slider("Classifier-free guidance scale", 1.0, 10.0, 7.5, key="cfg_scale")
    with st.expander("Image", expanded=True):
        steps = fixed.get("num_inference_steps") or st.slider("Inference steps", 1, 100, 20, key="steps")
        sampler = st.selectbox("Sampler", sampler_names(), key="sampler", help=SAMPLER_HELP)
        if "height" in fixed:
            width, height = fixed["width"], fixed["height"]
            st.caption(f"{model_type} renders {width}x{height} in {steps} step(s) without guidance.")
        else:
            preset = st.selectbox("Size (width x height)", list(SIZE_PRESETS) + [CUSTOM_SIZE], key="size_preset")
            if preset == CUSTOM_SIZE:
                width = snap_to_8(st.number_input("Width", 64, 4096, 512, step=8, key="width"))
                height = snap_to_8(st.number_input("Height", 64, 4096, 512, step=8, key="height"))
                st.caption(f"Sizes are rounded to multiples of 8: {width}x{height}.")
            else:
                width, height = SIZE_PRESETS[preset]
        num_images = st.number_input("Number of images", 1, 64, 2, key="num_images")
        use_fixed_seed = st.checkbox("Use fixed seed", value=False, key="use_fixed_seed")
        seed = st.number_input("Random seed", 0, 10**9, 0, key="seed", disabled=not use_fixed_seed)

# Choosing "None" frees the loaded model at once; another file is swapped in when the next image is generated.
if model_path == "None" and state["image_models"].key is not None:
    state["image_models"].release()

input_column, output_column = st.columns(2)

# ---------------------------------------------------------------------- input image and canvas
with input_column:
    st.markdown("#### Input image (optional)")
    left, right = st.columns(2)
    left.button("Create white board", key="white_board", on_click=lambda: set_input(Image.new("RGB", (width, height), "white")))
    right.button("Delete input image", key="delete_input", on_click=lambda: set_input(None))
    upload = st.file_uploader("Upload image", type=["png", "jpg", "jpeg", "webp"], key=f"upload_image_{state['input_version']}")
    if upload is not None and state.get("upload_seen") != upload.file_id:
        try:
            with Image.open(upload) as opened:
                uploaded = crop_and_resize(opened.convert("RGB"), height, width)
        except (UnidentifiedImageError, OSError) as exc:
            st.error(f"could not read {upload.name} as an image: {exc}")
        else:
            state["input_image"] = uploaded
            state["upload_seen"] = upload.file_id

    input_image = state.get("input_image")
    drawing, denoising_strength, repetition = None, 1.0, 1
    if input_image is not None:
        drawing_mode = st.radio("Drawing tool", ["freedraw", "line", "rect", "circle"], horizontal=True, key="drawing_mode")
        c1, c2, c3 = st.columns(3)
        stroke_color = c1.color_picker("Stroke color", "#000000", key="stroke_color")
        fill_color = c2.color_picker("Fill color", "#FFFFFF", key="fill_color")
        stroke_width = c3.slider("Stroke width", 1, 50, 10, key="stroke_width")
        denoising_strength = st.slider("Denoising strength", 0.01, 1.0, 0.7, key="denoising_strength")
        repetition = st.slider("Repetition", 1, 8, 1, key="repetition", help="each round takes the previous round's images as input")
        canvas_width = 512
        canvas = st_canvas(
            fill_color=fill_color, stroke_width=stroke_width, stroke_color=stroke_color, background_image=input_image,
            update_streamlit=True, width=canvas_width, height=max(8, round(canvas_width * input_image.height / input_image.width)),
            drawing_mode=drawing_mode, return_image_data=True, key=f"canvas_{state['input_version']}",
        )
        drawing = canvas.image_data

# ---------------------------------------------------------------------- generation and outputs
with output_column:
    c1, c2, c3 = st.columns([2, 1, 1])
    run = c1.button("Generate image", type="primary", key="generate")
    auto_update = c2.checkbox("Auto update", value=False, key="auto_update", help="generate again on every change")
    num_columns = int(c3.number_input("Columns", 1, 8, 2, key="num_columns"))

    if run or auto_update:
        if model_path == "None":
            st.error(f"Choose a model first (Model path in the sidebar; files in `{folder}`).")
        else:
            pipe = None
            try:
                with st.spinner(f"loading {os.path.basename(model_path)} on {device}..."):
                    pipe = state["image_models"].pipeline_for(model_type, model_path, device)
            except Exception as exc:  # the UI boundary: any loading failure becomes a message (and a log entry)
                logger.exception("loading %s failed", model_path)
                st.error(f"Could not load {model_path}: {exc}")
            if pipe is not None:
                source = compose_drawing(input_image, drawing) if input_image is not None else None
                request = ImageRequest(prompt=prompt, negative_prompt=negative_prompt, cfg_scale=cfg_scale, num_inference_steps=int(steps),
                                       height=height, width=width, num_images=int(num_images), seed=int(seed) if use_fixed_seed else None,
                                       input_image=source, denoising_strength=denoising_strength, repetition=int(repetition), sampler=sampler)
                total = request.num_images * (request.repetition if source is not None else 1)
                progress_area = st.empty()
                with progress_area.container():
                    columns = st.columns(num_columns)
                    bars = [columns[i % num_columns].progress(0.0, text=f"image {i + 1}: waiting") for i in range(total)]

                def progress_for(i):
                    return step_progress(lambda fraction, text: bars[i].progress(fraction, text=text), f"image {i + 1}")

                try:
                    results = generate(pipe, request, fixed, progress_for)
                except Exception as exc:  # the UI boundary: a failed generation becomes a message (and a log entry)
                    logger.exception("image generation failed")
                    st.error(f"Generation failed: {exc}")
                else:
                    state["output_images"] = [{"image": image, "seed": s, "png": png_bytes(image)} for image, s in results]
                progress_area.empty()

    outputs = state["output_images"]
    columns = st.columns(num_columns)
    for i, output in enumerate(outputs):
        with columns[i % num_columns]:
            st.image(output["image"], caption=f"image {i + 1}, seed {output['seed']}", width="stretch")
            st.button("Use it as input image", key=f"use_output_as_input_{i}", on_click=set_input, args=(output["image"],))
            st.download_button("Download", data=output["png"], file_name=f"image_{i + 1}_seed{output['seed']}.png", mime="image/png", key=f"download_{i}")
