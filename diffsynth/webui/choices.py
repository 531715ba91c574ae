"""The options the WebUI's pickers offer: model files per folder, sizes, devices, ControlNet processors."""
from __future__ import annotations

import os

from ..controlnets.annotators import PROCESSOR_IDS

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# Width x height presets; every side a multiple of 8 (the pipelines' rule). 16:9 and 9:16 are the video sizes users ask for.
SIZE_PRESETS = {
    "512 x 512 (1:1)": (512, 512),
    "768 x 768 (1:1)": (768, 768),
    "1024 x 1024 (1:1)": (1024, 1024),
    "768 x 512 (3:2)": (768, 512),
    "512 x 768 (2:3)": (512, 768),
    "768 x 432 (16:9)": (768, 432),
    "1024 x 576 (16:9)": (1024, 576),
    "1280 x 720 (16:9)": (1280, 720),
    "1920 x 1080 (16:9)": (1920, 1080),
    "432 x 768 (9:16)": (432, 768),
    "576 x 1024 (9:16)": (576, 1024),
    "720 x 1280 (9:16)": (720, 1280),
}
CUSTOM_SIZE = "Custom"


def model_files(folder: str, extensions: tuple[str, ...] = MODEL_EXTENSIONS) -> list[str]:
    """Sorted model files directly in ``folder`` plus diffusers model folders (a subfolder with ``model_index.json``
    or ``unet/``); paths are joined to ``folder``. A missing folder offers nothing."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith("."):
            continue
        if os.path.isfile(path) and name.lower().endswith(extensions):
            found.append(path)
        elif os.path.isdir(path) and (os.path.isfile(os.path.join(path, "model_index.json")) or os.path.isdir(os.path.join(path, "unet"))):
            found.append(path)
    return found


def snap_to_8(value: int | float) -> int:
    """The nearest positive multiple of 8 (the WebUI rounds; the library refuses other sizes)."""
    return max(8, int(round(float(value) / 8)) * 8)


def guess_processor(model_path: str | None) -> str | None:
    """The annotator a ControlNet file name suggests: the longest processor id in the name, so
    ``control_v11p_sd15s2_lineart_anime`` gives ``lineart_anime``, not ``lineart``. None if no id matches."""
    if not model_path:
        return None
    name = os.path.basename(model_path).lower()
    matches = [p for p in PROCESSOR_IDS if p in name]
    return max(matches, key=len) if matches else None


def gpu_process_choices() -> list[int]:
    """How many processes a render may use: ``[1, ..., n]`` with ``n`` visible CUDA devices (one process each), ``[1]`` else."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return list(range(1, count + 1)) if count > 1 else [1]


def available_devices() -> list[str]:
    """Devices this machine can run on, the default first (see ``diffsynth.utils.device``)."""
    import torch

    from ..utils.device import default_device

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    first = default_device()
    return [first] + [d for d in devices if d != first]
