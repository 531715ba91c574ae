"""examples/Diffutoon.ipynb runs headless, top to bottom, on tiny random-weight models.

The notebook's own cells run. The test only inserts two cells, as a user would edit: one after
the cell tagged ``parameters`` (no install, no Drive, no downloads, CPU, 64×64, 4 frames) and
one after the cell tagged ``templates`` (1 denoising step, small FastBlend settings). The
model files are tiny models written in the real formats at the paths the notebook documents.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import nbclient
import nbformat
import pytest

from diffsynth.testing.annotator_files import write_hed_file, write_lineart_file
from diffsynth.testing.controlnet_files import write_controlnet
from diffsynth.testing.depth_files import write_midas_file
from diffsynth.testing.factory import write_sd_checkpoint, write_textual_inversion
from diffsynth.testing.motion_files import write_motion_module
from diffsynth.testing.runner_files import write_input_clip

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "Diffutoon.ipynb"
FRAMES = 4


def _write_models(models: Path) -> None:
    write_sd_checkpoint(str(models / "stable_diffusion" / "aingdiffusion_v12.safetensors"))
    write_motion_module(str(models / "AnimateDiff" / "mm_sd_v15_v2.ckpt"))
    for seed, name in enumerate(["control_v11f1e_sd15_tile.pth", "control_v11p_sd15_lineart.pth",
                                 "control_v11p_sd15_softedge.pth", "control_v11f1p_sd15_depth.pth"], start=1):
        write_controlnet(str(models / "ControlNet" / name), seed=seed)
    write_lineart_file(str(models / "Annotators" / "sk_model.pth"))
    write_hed_file(str(models / "Annotators" / "ControlNetHED.pth"))
    write_midas_file(str(models / "Annotators" / "dpt_hybrid-midas-501f0c75.pt"))
    write_textual_inversion(str(models / "textual_inversion" / "verybadimagenegative_v1.3.pt"))


def _code_cell(source: str):
    return nbformat.v4.new_code_cell(source, id=f"test-{abs(hash(source)) % 10**8}")


def _insert_after(nb, tag: str, source: str) -> None:
    (index,) = [i for i, cell in enumerate(nb.cells) if tag in cell.metadata.get("tags", [])]
    nb.cells.insert(index + 1, _code_cell(source))


def _outputs(nb, tag: str) -> list:
    (cell,) = [cell for cell in nb.cells if tag in cell.metadata.get("tags", [])]
    return cell.outputs


def _execute(work: Path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    _insert_after(nb, "parameters", f"""
INSTALL = False
MOUNT_DRIVE = False
DOWNLOAD_MODELS = False
WORK_DIR = {str(work)!r}
MODELS_DIR = os.path.join(WORK_DIR, "models")
INPUT_VIDEO = os.path.join(WORK_DIR, "input_video.mp4")
OUTPUT_DIR = os.path.join(WORK_DIR, "output")
DEVICE = "cpu"
TOON_SIZE = COLOR_SIZE = 64
START_FRAME, END_FRAME = 0, {FRAMES}
FPS = 8
""")
    _insert_after(nb, "templates", """
for template in (toon_shading_template, color_video_template):
    template["pipeline"]["pipeline_inputs"].update(num_inference_steps=1, animatediff_batch_size=4, animatediff_stride=2)
color_video_template["smoother_configs"][0]["config"] = {"window_size": 2, "minimum_patch_size": 3, "num_iter": 2}
""")
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}})
    client.execute()
    return nb


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    work = tmp_path_factory.mktemp("diffutoon_notebook")
    _write_models(work / "models")
    write_input_clip(str(work / "input_video.mp4"), frames=FRAMES + 2, width=80, height=64)
    with _kernel_env():
        nb = _execute(work)
    return work, nb


class _kernel_env:
    """One thread, no GPU, for the kernel (a child process, which inherits the environment)."""

    values = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_every_render_produces_its_video_and_shows_it(executed):
    work, nb = executed
    for name in ("toon_video", "color_video", "edit_video"):
        video = work / "output" / name / "video.mp4"
        assert video.is_file() and video.stat().st_size > 0, name
        assert len(list((work / "output" / name / "frames").glob("*.png"))) == FRAMES
    for tag in ("toon", "stage1", "stage2"):
        html = [o["data"]["text/html"] for o in _outputs(nb, tag) if o.get("output_type") == "display_data" and "text/html" in o.get("data", {})]
        assert html and "<video" in html[0] and "data:video/mp4;base64," in html[0], tag


def test_stage_2_runs_its_own_config_fed_by_stage_1(executed):
    work, _ = executed
    config = json.loads((work / "output" / "edit_video" / "config.json").read_text())
    tile, lineart = config["data"]["controlnet_frames"]
    assert tile["video_file"] == str(work / "output" / "color_video" / "video.mp4")
    assert (tile["start_frame_id"], tile["end_frame_id"]) == (None, None)
    assert lineart["video_file"] == str(work / "input_video.mp4")
    assert [u["processor_id"] for u in config["models"]["controlnet_units"]] == ["tile", "lineart"]
    toon = json.loads((work / "output" / "toon_video" / "config.json").read_text())
    assert toon["data"]["controlnet_frames"][0]["video_file"] == str(work / "input_video.mp4")  # the runs share no dicts


def test_model_cell_checks_files_without_downloading(executed):
    _, nb = executed
    (cell,) = [c for c in nb.cells if c.get("id") == "models"]
    text = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
    assert text.count("present") == 10 and "downloaded" not in text


def test_status_cell_reports_finished_renders(executed):
    _, nb = executed
    text = "".join(o.get("text", "") for o in _outputs(nb, "status") if o.get("output_type") == "stream")
    assert text.count("last finished stage 9") == 3


def test_running_the_notebook_again_resumes_instead_of_recomputing(executed):
    # What a user does after a Colab disconnect: run all cells again on the same output folder.
    work, _ = executed
    frames = sorted((work / "output").glob("*/frames/*.png")) + sorted((work / "output").glob("*/video.mp4"))
    before = {p: p.stat().st_mtime_ns for p in frames}
    with _kernel_env():
        _execute(work)
    assert {p: p.stat().st_mtime_ns for p in frames} == before
