"""The three OpenPose networks: body (PAFs + part heatmaps), hand and face keypoints.

All three are convolutional pose machines (Wei et al., "Convolutional Pose
Machines", CVPR 2016) on a VGG-19 front end (Simonyan & Zisserman, 2015); the
body network has two branches per stage, part affinity fields and part
confidence maps (Cao et al., "Realtime Multi-Person 2D Pose Estimation using Part
Affinity Fields", CVPR 2017). The hand (Simon et al., CVPR 2017) and face networks
are one-branch CPMs that differ only in their number of outputs.

The layers are data: each network is a list of blocks, each block a list of
``Conv`` rows (or ``POOL``). The convolutions are registered under their own
names directly on the module, so ``state_dict()`` keys are exactly the keys of
the released files (``conv1_1.weight``, ``Mconv7_stage6_L2.bias``, ...). The
files were converted from CMU's Caffe models by pytorch-openpose; controlnet_aux
0.0.7 strips its own ``model0.``/``model1_0.``-style prefixes when loading them
(``util.transfer``), which is why the files have none.

``PoseNetConfig().width == 64`` is the real architecture; every hidden width is
a multiple of it, so a network built with ``width=4`` has the same keys and
layers at 1/16 of the channels (for tests). The width is read back from the
file (``conv1_1.weight``), then every key and shape is checked strictly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ....models.errors import ModelFileError
from ....models.loading import infer_config, instantiate
from ....models.state_dict import load_state_dict

BODY_PAF_CHANNELS = 38  # x and y of 19 limbs
BODY_HEATMAP_CHANNELS = 19  # 18 parts + background
HAND_HEATMAP_CHANNELS = 22  # 21 hand keypoints + background
FACE_HEATMAP_CHANNELS = 71  # 70 face landmarks + background
STAGES = 6


@dataclass(frozen=True)
class PoseNetConfig:
    """Width of the first VGG block; the released networks use 64 (hidden widths 64/128/256/512)."""

    width: int = 64


class Conv(NamedTuple):
    name: str
    cin: int
    cout: int
    kernel: int
    relu: bool = True


POOL = "pool"  # 2x2 max pooling, stride 2
Layer = Union[Conv, str]


def _vgg_front(w: int) -> list[Layer]:
    """VGG-19 up to conv4_2, shared by all three networks."""
    return [
        Conv("conv1_1", 3, w, 3), Conv("conv1_2", w, w, 3), POOL,
        Conv("conv2_1", w, 2 * w, 3), Conv("conv2_2", 2 * w, 2 * w, 3), POOL,
        Conv("conv3_1", 2 * w, 4 * w, 3), Conv("conv3_2", 4 * w, 4 * w, 3),
        Conv("conv3_3", 4 * w, 4 * w, 3), Conv("conv3_4", 4 * w, 4 * w, 3), POOL,
        Conv("conv4_1", 4 * w, 8 * w, 3), Conv("conv4_2", 8 * w, 8 * w, 3),
    ]


def _refinement_stage(w: int, cin: int, cout: int, suffix: str, final_relu: bool = False) -> list[Layer]:
    """Stages 2-6: five 7x7 convolutions, two 1x1; ``suffix`` like ``stage3_L1`` or ``stage3``."""
    return [
        Conv(f"Mconv1_{suffix}", cin, 2 * w, 7),
        *(Conv(f"Mconv{i}_{suffix}", 2 * w, 2 * w, 7) for i in range(2, 6)),
        Conv(f"Mconv6_{suffix}", 2 * w, 2 * w, 1),
        Conv(f"Mconv7_{suffix}", 2 * w, cout, 1, relu=final_relu),
    ]


def body_layers(config: PoseNetConfig) -> dict[str, list[Layer]]:
    """Blocks of the body network: ``features``, then ``stage{s}_L1`` (PAFs) and ``stage{s}_L2`` (heatmaps)."""
    w = config.width
    blocks: dict[str, list[Layer]] = {
        "features": _vgg_front(w) + [Conv("conv4_3_CPM", 8 * w, 4 * w, 3), Conv("conv4_4_CPM", 4 * w, 2 * w, 3)],
    }
    outputs = {1: BODY_PAF_CHANNELS, 2: BODY_HEATMAP_CHANNELS}
    for branch, cout in outputs.items():
        blocks[f"stage1_L{branch}"] = [
            *(Conv(f"conv5_{i}_CPM_L{branch}", 2 * w, 2 * w, 3) for i in range(1, 4)),
            Conv(f"conv5_4_CPM_L{branch}", 2 * w, 8 * w, 1),
            Conv(f"conv5_5_CPM_L{branch}", 8 * w, cout, 1, relu=False),
        ]
    stage_in = BODY_PAF_CHANNELS + BODY_HEATMAP_CHANNELS + 2 * w
    for stage in range(2, STAGES + 1):
        for branch, cout in outputs.items():
            # controlnet_aux 0.0.7 (like pytorch-openpose) lists Mconv7_stage6_L1 twice in its
            # "no ReLU" table and never Mconv7_stage6_L2, so the final heatmaps are clamped at 0.
            # Kept: it changes the Gaussian-smoothed maps the peaks are found on.
            final_relu = stage == STAGES and branch == 2
            blocks[f"stage{stage}_L{branch}"] = _refinement_stage(w, stage_in, cout, f"stage{stage}_L{branch}", final_relu)
    return blocks


def cpm_layers(config: PoseNetConfig, out_channels: int) -> dict[str, list[Layer]]:
    """Blocks of the one-branch hand/face network: ``features``, ``stage1`` ... ``stage6``."""
    w = config.width
    blocks: dict[str, list[Layer]] = {
        "features": _vgg_front(w) + [
            Conv("conv4_3", 8 * w, 8 * w, 3), Conv("conv4_4", 8 * w, 8 * w, 3),
            Conv("conv5_1", 8 * w, 8 * w, 3), Conv("conv5_2", 8 * w, 8 * w, 3),
            Conv("conv5_3_CPM", 8 * w, 2 * w, 3),
        ],
        "stage1": [Conv("conv6_1_CPM", 2 * w, 8 * w, 1), Conv("conv6_2_CPM", 8 * w, out_channels, 1, relu=False)],
    }
    for stage in range(2, STAGES + 1):
        blocks[f"stage{stage}"] = _refinement_stage(w, out_channels + 2 * w, out_channels, f"stage{stage}")
    return blocks


class _LayerTableNet(nn.Module):
    """Registers every ``Conv`` of ``blocks`` under its own name (flat state-dict keys)."""

    def __init__(self, blocks: dict[str, list[Layer]]):
        super().__init__()
        self.blocks = blocks
        for block in blocks.values():
            for layer in block:
                if layer != POOL:
                    self.add_module(layer.name, nn.Conv2d(layer.cin, layer.cout, layer.kernel, padding=layer.kernel // 2))

    def run(self, block: str, x: torch.Tensor) -> torch.Tensor:
        for layer in self.blocks[block]:
            if layer == POOL:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            else:
                x = getattr(self, layer.name)(x)
                if layer.relu:
                    x = F.relu(x)
        return x


class BodyPoseNet(_LayerTableNet):
    """``body_pose_model.pth``: image (1, 3, h, w), BGR/256 - 0.5 -> (PAFs (1, 38, h/8, w/8), heatmaps (1, 19, h/8, w/8))."""

    def __init__(self, config: PoseNetConfig = PoseNetConfig()):
        super().__init__(body_layers(config))
        self.config = config

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.run("features", x)
        pafs, heatmaps = self.run("stage1_L1", features), self.run("stage1_L2", features)
        for stage in range(2, STAGES + 1):
            joined = torch.cat([pafs, heatmaps, features], dim=1)
            pafs, heatmaps = self.run(f"stage{stage}_L1", joined), self.run(f"stage{stage}_L2", joined)
        return pafs, heatmaps


class KeypointCPM(_LayerTableNet):
    """One-branch CPM: image (1, 3, h, w), BGR/256 - 0.5 -> heatmaps of the last stage (1, out_channels, h/8, w/8)."""

    def __init__(self, config: PoseNetConfig, out_channels: int):
        super().__init__(cpm_layers(config, out_channels))
        self.config = config
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.run("features", x)
        heatmaps = self.run("stage1", features)
        for stage in range(2, STAGES + 1):
            heatmaps = self.run(f"stage{stage}", torch.cat([heatmaps, features], dim=1))
        return heatmaps


def hand_pose_net(config: PoseNetConfig = PoseNetConfig()) -> KeypointCPM:
    """``hand_pose_model.pth``: 21 hand keypoints + background."""
    return KeypointCPM(config, HAND_HEATMAP_CHANNELS)


def face_net(config: PoseNetConfig = PoseNetConfig()) -> KeypointCPM:
    """``facenet.pth``: 70 face landmarks + background (only the last stage is used)."""
    return KeypointCPM(config, FACE_HEATMAP_CHANNELS)


# What each released file holds: a builder from the config, and how errors name it.
NETWORKS = {
    "body": (BodyPoseNet, "OpenPose body network (body_pose_model.pth layout)"),
    "hand": (hand_pose_net, "OpenPose hand network (hand_pose_model.pth layout)"),
    "face": (face_net, "OpenPose face network (facenet.pth layout)"),
}
# Fingerprints: (key, output channels) found only in that network. Hand and face share every
# key name; their stage-1 output width tells them apart.
FINGERPRINTS = {
    "body": ("conv5_5_CPM_L2.weight", BODY_HEATMAP_CHANNELS),
    "hand": ("conv6_2_CPM.weight", HAND_HEATMAP_CHANNELS),
    "face": ("conv6_2_CPM.weight", FACE_HEATMAP_CHANNELS),
}


def identify_pose_net(sd: dict[str, torch.Tensor]) -> str | None:
    """Which OpenPose network ``sd`` holds, by fingerprint; ``None`` if none matches."""
    for kind, (key, channels) in FINGERPRINTS.items():
        if key in sd and sd[key].ndim == 4 and sd[key].shape[0] == channels:
            return kind
    return None


def infer_pose_net_config(sd: dict[str, torch.Tensor]) -> PoseNetConfig:
    """The width is the output channel count of ``conv1_1`` (64 in the released files)."""
    width = sd["conv1_1.weight"].shape[0]
    if width < 1:
        raise ValueError(f"conv1_1.weight has {width} output channels")
    return PoseNetConfig(width=int(width))


def load_pose_net(path: str, kind: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load ``kind`` (``"body"``, ``"hand"`` or ``"face"``) from ``path`` strictly (``weights_only=True``).

    A missing, unexpected or mis-shaped key raises ``ModelFileError`` naming the file and the keys.
    """
    if kind not in NETWORKS:
        raise ValueError(f"unknown OpenPose network {kind!r}; valid: {', '.join(NETWORKS)}")
    build, what = NETWORKS[kind]
    sd = load_state_dict(path)
    found = identify_pose_net(sd)
    if found is not None and found != kind:
        raise ModelFileError(
            path,
            f"holds the {NETWORKS[found][1]}, not the {what}.",
            "The OpenPose files may have been renamed or swapped; download each under its own name from "
            "https://huggingface.co/lllyasviel/Annotators.",
        )
    config = infer_config(infer_pose_net_config, sd, source=path, what=what)
    return instantiate(lambda: build(config), sd, source=path, what=what, device=device, dtype=dtype)
