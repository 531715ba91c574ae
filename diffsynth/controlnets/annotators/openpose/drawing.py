"""Draw poses the way ControlNet's openpose models were trained to read them.

Colours, sizes and drawing order are those of controlnet_aux 0.0.7
(``open_pose/util.py``): each body limb a filled ellipse 4 pixels thick in 60% of
its colour, each body part a disc of radius 4 in its full colour; hand bones
2-pixel lines coloured around the hue circle, hand keypoints blue discs of radius
4; face landmarks white discs of radius 3. The canvas is RGB. Keypoints are in
0..1 image coordinates (see ``keypoints.normalize_pose``).
"""
from __future__ import annotations

import colorsys
import math
from typing import Optional, Sequence

import cv2
import numpy as np

from .keypoints import BODY_LIMBS, N_DRAWN_LIMBS, Keypoint, PoseResult

# One colour per body part (and per drawn limb, which takes the colour of its index), RGB.
BODY_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
LIMB_SHADE = 0.6
STICK_WIDTH = 4
BODY_POINT_RADIUS = 4

# Hand bones: wrist (0) to each finger's base, then along the finger.
HAND_BONES = tuple(
    pair for finger in range(5) for pair in ((0, 4 * finger + 1), *((4 * finger + i, 4 * finger + i + 1) for i in range(1, 4)))
)
# Bone i gets hue i / 20 at full saturation and value; cv2 rounds the float channels.
HAND_BONE_COLORS = tuple(tuple(255.0 * c for c in colorsys.hsv_to_rgb(i / len(HAND_BONES), 1.0, 1.0)) for i in range(len(HAND_BONES)))
HAND_POINT_COLOR = (0, 0, 255)
HAND_POINT_RADIUS = 4
HAND_LINE_WIDTH = 2
FACE_POINT_COLOR = (255, 255, 255)
FACE_POINT_RADIUS = 3
# Hand and face points at pixel 0 (or the -1 of "not found") are not drawn.
_MIN_PIXEL = 0.01


def draw_body(canvas: np.ndarray, keypoints: Sequence[Optional[Keypoint]]) -> np.ndarray:
    """Draw one person's limbs, then its parts, onto ``canvas`` (modified and returned)."""
    h, w = canvas.shape[:2]
    for (a, b), color in zip(BODY_LIMBS[:N_DRAWN_LIMBS], BODY_COLORS):
        ka, kb = keypoints[a], keypoints[b]
        if ka is None or kb is None:
            continue
        xa, xb = ka.x * float(w), kb.x * float(w)
        ya, yb = ka.y * float(h), kb.y * float(h)
        length = ((ya - yb) ** 2 + (xa - xb) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ya - yb, xa - xb))
        centre = (int((xa + xb) / 2), int((ya + yb) / 2))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(float(c) * LIMB_SHADE) for c in color])
    for k, color in zip(keypoints, BODY_COLORS):
        if k is not None:
            cv2.circle(canvas, (int(k.x * w), int(k.y * h)), BODY_POINT_RADIUS, color, thickness=-1)
    return canvas


def draw_hand(canvas: np.ndarray, keypoints: Optional[Sequence[Keypoint]]) -> np.ndarray:
    """Draw one hand's bones, then its keypoints; nothing for ``None`` or an empty list."""
    if not keypoints:
        return canvas
    h, w = canvas.shape[:2]
    pixels = [(int(k.x * w), int(k.y * h)) for k in keypoints]
    for (a, b), color in zip(HAND_BONES, HAND_BONE_COLORS):
        (xa, ya), (xb, yb) = pixels[a], pixels[b]
        if min(xa, ya, xb, yb) > _MIN_PIXEL:
            cv2.line(canvas, (xa, ya), (xb, yb), color, thickness=HAND_LINE_WIDTH)
    for x, y in pixels:
        if x > _MIN_PIXEL and y > _MIN_PIXEL:
            cv2.circle(canvas, (x, y), HAND_POINT_RADIUS, HAND_POINT_COLOR, thickness=-1)
    return canvas


def draw_face(canvas: np.ndarray, keypoints: Optional[Sequence[Keypoint]]) -> np.ndarray:
    """Draw face landmarks as white dots; nothing for ``None`` or an empty list."""
    if not keypoints:
        return canvas
    h, w = canvas.shape[:2]
    for k in keypoints:
        x, y = int(k.x * w), int(k.y * h)
        if x > _MIN_PIXEL and y > _MIN_PIXEL:
            cv2.circle(canvas, (x, y), FACE_POINT_RADIUS, FACE_POINT_COLOR, thickness=-1)
    return canvas


def draw_poses(
    poses: Sequence[PoseResult], height: int, width: int, body: bool = True, hands: bool = True, face: bool = True
) -> np.ndarray:
    """A black RGB ``uint8`` canvas (height, width, 3) with each person drawn: body, left hand, right hand, face."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for pose in poses:
        if body:
            draw_body(canvas, pose.body.keypoints)
        if hands:
            draw_hand(canvas, pose.left_hand)
            draw_hand(canvas, pose.right_hand)
        if face:
            draw_face(canvas, pose.face)
    return canvas
