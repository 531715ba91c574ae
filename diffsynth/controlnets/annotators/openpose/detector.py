"""``OpenposeDetector``: body, hands and face drawn on black, as DiffSynth-Studio used controlnet_aux 0.0.7.

DiffSynth-Studio called controlnet_aux's ``OpenposeDetector`` with
``include_body=True, include_hand=True, include_face=True``; those are the
defaults here. The networks see the image in BGR order (they are converted Caffe
models); the detector takes and returns RGB like every annotator.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..base import require_annotator_file
from . import inference
from .drawing import draw_poses
from .keypoints import PoseResult, body_poses, crop_to_image, face_box, face_peaks, hand_boxes, hand_peaks, normalize_pose
from .networks import load_pose_net

BODY_FILE = "body_pose_model.pth"
HAND_FILE = "hand_pose_model.pth"
FACE_FILE = "facenet.pth"


class OpenposeDetector:
    """``detector(rgb uint8 (h, w, 3)) -> uint8 (h, w, 3)``: the poses drawn on a black canvas.

    ``body_net`` always runs (hands and face are found from the body's keypoints);
    ``hand_net``/``face_net`` may be ``None`` when ``include_hand``/``include_face``
    is off. ``include_body`` only decides whether the skeleton is drawn.
    """

    def __init__(
        self,
        body_net: nn.Module,
        hand_net: nn.Module | None = None,
        face_net: nn.Module | None = None,
        include_body: bool = True,
        include_hand: bool = True,
        include_face: bool = True,
    ):
        if include_hand and hand_net is None:
            raise ValueError("include_hand=True needs a hand network (hand_pose_model.pth)")
        if include_face and face_net is None:
            raise ValueError("include_face=True needs a face network (facenet.pth)")
        self.body_net, self.hand_net, self.face_net = body_net, hand_net, face_net
        self.include_body, self.include_hand, self.include_face = include_body, include_hand, include_face

    @classmethod
    def from_folder(
        cls,
        folder: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        include_body: bool = True,
        include_hand: bool = True,
        include_face: bool = True,
    ) -> "OpenposeDetector":
        """Load ``body_pose_model.pth`` and, when included, ``hand_pose_model.pth`` and ``facenet.pth`` from ``folder``.

        A missing file raises ``FileNotFoundError`` naming it, the folder and its download
        link; an incomplete or foreign one ``ModelFileError`` listing the offending keys.
        """
        paths = {"body": require_annotator_file(folder, BODY_FILE)}
        if include_hand:
            paths["hand"] = require_annotator_file(folder, HAND_FILE)
        if include_face:
            paths["face"] = require_annotator_file(folder, FACE_FILE)
        nets = {kind: load_pose_net(path, kind, device=device, dtype=dtype) for kind, path in paths.items()}
        return cls(nets["body"], nets.get("hand"), nets.get("face"), include_body, include_hand, include_face)

    def detect_poses(self, image: np.ndarray) -> list[PoseResult]:
        """Every person in an RGB ``uint8`` image, in 0..1 coordinates."""
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        heatmaps, pafs = inference.body_maps(self.body_net, bgr)
        return self.poses_from_maps(bgr, heatmaps, pafs)

    def poses_from_maps(self, bgr: np.ndarray, heatmaps: np.ndarray, pafs: np.ndarray) -> list[PoseResult]:
        """People from body heatmaps (H, W, 19) and PAFs (H, W, 38) of the BGR image, with their hands and faces."""
        h, w = bgr.shape[:2]
        results = []
        for body in body_poses(heatmaps, pafs):
            left = right = face = None
            if self.include_hand:
                for x, y, side, is_left in hand_boxes(body, h, w):
                    crop = bgr[y : y + side, x : x + side]
                    peaks = hand_peaks(inference.hand_maps(self.hand_net, crop), crop.shape[0], crop.shape[1])
                    keypoints = crop_to_image(peaks, x, y, h, w)
                    if is_left:
                        left = keypoints
                    else:
                        right = keypoints
            if self.include_face:
                box = face_box(body, h, w)
                if box is not None:
                    x, y, side = box
                    crop = bgr[y : y + side, x : x + side]
                    peaks = face_peaks(inference.face_maps(self.face_net, crop))
                    face = crop_to_image(peaks, x, y, h, w) if len(peaks) else None
            results.append(PoseResult(normalize_pose(body, h, w), left, right, face))
        return results

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"openpose expects an RGB uint8 image (h, w, 3), got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        poses = self.detect_poses(image)
        return draw_poses(poses, h, w, body=self.include_body, hands=self.include_hand, face=self.include_face)
