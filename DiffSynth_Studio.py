"""DiffSynth Studio WebUI home page: ``python -m streamlit run DiffSynth_Studio.py``."""
import streamlit as st
import torch

st.set_page_config(page_title="DiffSynth Studio", layout="wide")

if torch.cuda.is_available():
    # On Windows the driver otherwise spills into "shared GPU memory" (system RAM) instead of failing: 10-100x slower.
    torch.cuda.set_per_process_memory_fraction(0.999, 0)

st.title("DiffSynth Studio")
st.markdown(
    """
A diffusion engine for images and long videos, compatible with
[DiffSynth-Studio](https://github.com/modelscope/DiffSynth-Studio) (disk-cache edition).

- **Image Creator**: text-to-image and image-to-image with Stable Diffusion and SDXL checkpoints,
  a drawing canvas for sketches over the input image, and downloads.
- **Video Creator**: video re-rendering (Diffutoon and friends) with AnimateDiff, LoRA and ControlNet.
  A render runs in its own background process and writes everything into its output folder:
  **closing the browser does not stop it**. Come back any time to see its progress, cancel it,
  resume it after a crash or a reboot, or open the result. A render started on the command line
  (`diffsynth run CONFIG`) into the same folder shows up there too, and is resumed the same way.

Put model files into the folders under `models/` (each has a README saying what goes there);
the pages list them. Pick a page in the sidebar.
"""
)
st.page_link("pages/1_Image_Creator.py", label="Image Creator", icon="🖼️")
st.page_link("pages/2_Video_Creator.py", label="Video Creator", icon="🎬")
