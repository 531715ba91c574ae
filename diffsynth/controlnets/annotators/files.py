"""Which weight files each annotator reads, and how to recognise one from its header.

One table for the runner's pre-flight checks (the files a config's ControlNet units need,
each recognised before anything runs), the cache key of stage 1 (only those files) and
``diffsynth info`` (which names what an annotator file is). Recognition is by tensor names
and, where two files share their names (OpenPose's hand and face networks), the size of
the output layer: never by the file name.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .base import ANNOTATOR_URL


@dataclass(frozen=True)
class AnnotatorFile:
    filename: str
    processor: str
    description: str
    required: tuple[str, ...]
    forbidden: tuple[str, ...] = ()
    shape: tuple[str, int, int] | None = None  # (tensor, dimension, size) that must match

    def matches(self, header: dict) -> bool:
        keys = list(header)
        if not all(any(re.search(p, k) for k in keys) for p in self.required):
            return False
        if any(re.search(p, k) for p in self.forbidden for k in keys):
            return False
        if self.shape is not None:
            name, dim, size = self.shape
            entry = header.get(name)
            return entry is not None and len(entry[0]) > dim and entry[0][dim] == size
        return True

    @property
    def url(self) -> str:
        return ANNOTATOR_URL.format(self.filename)


_POSE_HEAD = r"^conv6_2_CPM\.weight$"
ANNOTATOR_FILES: tuple[AnnotatorFile, ...] = (
    AnnotatorFile("sk_model.pth", "lineart", "lineart annotator generator (sk_model.pth, or sk_model2.pth: coarse)", (r"^model0\.1\.weight$", r"^model4\.1\.weight$")),
    AnnotatorFile("netG.pth", "lineart_anime", "anime lineart annotator U-Net (Anime2Sketch)", (r"^(module\.)?model\.model\.0\.weight$",)),
    AnnotatorFile("ControlNetHED.pth", "softedge", "soft edge annotator (HED)", (r"^block1\.convs\.0\.weight$", r"^norm$")),
    AnnotatorFile("dpt_hybrid-midas-501f0c75.pt", "depth", "depth annotator (MiDaS DPT-hybrid)",
                  (r"(^|\.)pretrained\.act_postprocess3\.", r"(^|\.)scratch\.refinenet4\.")),
    AnnotatorFile("body_pose_model.pth", "openpose", "OpenPose body network", (r"^Mconv1_stage2_L1\.weight$",)),
    AnnotatorFile("hand_pose_model.pth", "openpose", "OpenPose hand network", (_POSE_HEAD,), (r"_L1\.",), ("conv6_2_CPM.weight", 0, 22)),
    AnnotatorFile("facenet.pth", "openpose", "OpenPose face network", (_POSE_HEAD,), (r"_L1\.",), ("conv6_2_CPM.weight", 0, 71)),
)


def needed_files(processor_id: str) -> tuple[AnnotatorFile, ...]:
    """The weight files ``processor_id`` reads from the annotator folder (none for tile and canny)."""
    return tuple(entry for entry in ANNOTATOR_FILES if entry.processor == processor_id)


def identify_annotator_file(header: dict) -> AnnotatorFile | None:
    """The table entry a header (``{name: (shape, dtype)}``) matches, or None."""
    hits = [entry for entry in ANNOTATOR_FILES if entry.matches(header)]
    return hits[0] if len(hits) == 1 else None


def depth_alternative(folder: str) -> str | None:
    """A transformers DPT folder that the depth annotator reads when the MiDaS file is absent (see ``DepthDetector.from_folder``)."""
    from .depth import find_transformers_dpt_folder

    return find_transformers_dpt_folder(folder) if os.path.isdir(folder) else None
