"""OpenPose annotator (body, hands, face) for ControlNet ``openpose``: our own implementation of controlnet_aux 0.0.7's.

Modules: ``networks`` (the three CNNs, loaded strictly from the released files),
``inference`` (running them on images), ``keypoints`` (pure numpy: peaks, limb
association, hand/face boxes), ``drawing`` (the pose map), ``detector`` (all together).
"""
from .detector import BODY_FILE, FACE_FILE, HAND_FILE, OpenposeDetector
from .keypoints import BodyPose, Keypoint, PoseResult

__all__ = ["OpenposeDetector", "BODY_FILE", "HAND_FILE", "FACE_FILE", "BodyPose", "Keypoint", "PoseResult"]
