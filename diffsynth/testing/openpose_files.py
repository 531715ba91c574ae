"""Random-weight OpenPose files in the released layout (``lllyasviel/Annotators``).

The released ``body_pose_model.pth``, ``hand_pose_model.pth`` and ``facenet.pth``
are flat pickled dicts of float32 tensors keyed by layer name
(``conv1_1.weight``, ``Mconv7_stage6_L2.bias``, ...): no wrapper and no module
prefix (controlnet_aux 0.0.7 adds its ``model0.``-style prefixes when loading the
body and hand files, and loads the face file as is). Full size they hold
52,311,446 / 36,832,324 / 38,425,706 parameters in 184 / 104 / 104 tensors
(about 209 / 147 / 154 MB).

``width=TINY_WIDTH`` writes the same keys at 1/16 of the channels (the networks
read the width back from ``conv1_1.weight``), for fast tests.
"""
from __future__ import annotations

import math
import os

import torch

from ..controlnets.annotators.openpose.detector import BODY_FILE, FACE_FILE, HAND_FILE
from ..controlnets.annotators.openpose.networks import NETWORKS, PoseNetConfig
from ..utils.atomic import atomic_open

FULL_WIDTH = 64
TINY_WIDTH = 4
FILENAMES = {"body": BODY_FILE, "hand": HAND_FILE, "face": FACE_FILE}


def openpose_state_dict(kind: str, width: int = FULL_WIDTH, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random float32 weights for ``kind`` (``"body"``, ``"hand"``, ``"face"``), fan-in scaled."""
    build, _ = NETWORKS[kind]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build(PoseNetConfig(width=width)).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith(".weight"):
            sd[key] = torch.randn(shape, generator=g) * math.sqrt(2.0 / shape[1:].numel())
        else:
            sd[key] = 0.05 * torch.randn(shape, generator=g)
    return sd


def write_openpose_file(folder: str, kind: str, width: int = FULL_WIDTH, seed: int = 0, legacy_format: bool = False) -> str:
    """Write ``kind``'s file under its released name in ``folder``; returns the path.

    ``legacy_format`` writes PyTorch's pre-1.6 (non-zip) pickle, as files converted
    around 2019 (pytorch-openpose) may be; both load with ``weights_only=True``.
    """
    path = os.path.join(folder, FILENAMES[kind])
    with atomic_open(path, "wb") as f:
        torch.save(openpose_state_dict(kind, width, seed), f, _use_new_zipfile_serialization=not legacy_format)
    return path


def write_openpose_files(folder: str, width: int = FULL_WIDTH, seed: int = 0, kinds=("body", "hand", "face")) -> dict[str, str]:
    """Write the files of ``kinds`` into ``folder`` (created if needed); returns ``{kind: path}``."""
    os.makedirs(folder, exist_ok=True)
    return {kind: write_openpose_file(folder, kind, width, seed + i) for i, kind in enumerate(kinds)}
