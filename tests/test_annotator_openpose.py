"""OpenPose annotator: network layouts, strict loading, keypoint extraction and drawing.

Keypoint extraction and drawing are tested on synthetic heatmaps and PAFs built
here (known people -> known keypoints and pixels). Random-weight networks detect
nothing meaningful, so the end-to-end tests on them assert only shape, dtype and
determinism; the hand and face networks run for real (tiny width) inside a
detection whose body maps are synthetic.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from diffsynth.controlnets.annotators.openpose import OpenposeDetector
from diffsynth.controlnets.annotators.openpose import inference
from diffsynth.controlnets.annotators.openpose.drawing import BODY_COLORS, HAND_BONES, draw_face, draw_hand, draw_poses
from diffsynth.controlnets.annotators.openpose.keypoints import (
    BODY_LIMBS,
    LIMB_PAF_CHANNELS,
    BodyPose,
    Keypoint,
    PoseResult,
    body_poses,
    crop_to_image,
    face_box,
    face_peaks,
    hand_boxes,
    hand_peaks,
    normalize_pose,
)
from diffsynth.controlnets.annotators.openpose.networks import (
    NETWORKS,
    BodyPoseNet,
    PoseNetConfig,
    face_net,
    hand_pose_net,
    identify_pose_net,
)
from diffsynth.models.errors import ModelFileError
from diffsynth.testing.openpose_files import TINY_WIDTH, openpose_state_dict, write_openpose_file, write_openpose_files

URL = "https://huggingface.co/lllyasviel/Annotators/resolve/main/"

# A person facing the camera in a 256x256 image, pixel (x, y) per COCO-18 part;
# parts at least 9 pixels apart so that no disc of radius 4 hides another's centre.
PERSON = {
    0: (128, 60), 1: (128, 90), 2: (100, 90), 3: (90, 130), 4: (85, 165), 5: (156, 90), 6: (166, 130), 7: (171, 165),
    8: (110, 170), 9: (108, 210), 10: (106, 245), 11: (146, 170), 12: (148, 210), 13: (150, 245),
    14: (120, 50), 15: (136, 50), 16: (110, 60), 17: (146, 60),
}


def synthetic_maps(people: list[dict[int, tuple[int, int]]], height: int, width: int):
    """Heatmaps (H, W, 19): a unit Gaussian (sigma 2) per part; PAFs (H, W, 38): the limb's unit vector within 2 px of it."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    heat = np.zeros((height, width, 19))
    paf = np.zeros((height, width, 38))
    for person in people:
        for part, (x, y) in person.items():
            heat[:, :, part] = np.maximum(heat[:, :, part], np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0**2)))
        for (a, b), (cx, cy) in zip(BODY_LIMBS, LIMB_PAF_CHANNELS):
            if a not in person or b not in person:
                continue
            (xa, ya), (xb, yb) = person[a], person[b]
            length = math.hypot(xb - xa, yb - ya)
            ux, uy = (xb - xa) / length, (yb - ya) / length
            along = (xx - xa) * ux + (yy - ya) * uy
            across = np.abs((xx - xa) * uy - (yy - ya) * ux)
            band = (along >= -1) & (along <= length + 1) & (across <= 2)
            paf[band, cx], paf[band, cy] = ux, uy
    return heat, paf


def shifted(person, dx=0, dy=0):
    return {k: (x + dx, y + dy) for k, (x, y) in person.items()}


def pixels(pose: BodyPose) -> dict[int, tuple[int, int]]:
    return {i: (int(k.x), int(k.y)) for i, k in enumerate(pose.keypoints) if k is not None}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openpose_tiny")
    write_openpose_files(str(folder), width=TINY_WIDTH)
    return str(folder)


# --------------------------------------------------------------------------- networks and files


@pytest.mark.parametrize(
    "kind, n_keys, n_params, shapes",
    [
        ("body", 184, 52_311_446, {"conv1_1.weight": (64, 3, 3, 3), "conv4_4_CPM.weight": (128, 256, 3, 3),
                                   "conv5_5_CPM_L1.weight": (38, 512, 1, 1), "conv5_5_CPM_L2.weight": (19, 512, 1, 1),
                                   "Mconv1_stage2_L1.weight": (128, 185, 7, 7), "Mconv7_stage6_L2.bias": (19,)}),
        ("hand", 104, 36_832_324, {"conv5_3_CPM.weight": (128, 512, 3, 3), "conv6_2_CPM.weight": (22, 512, 1, 1),
                                   "Mconv1_stage2.weight": (128, 150, 7, 7), "Mconv7_stage6.weight": (22, 128, 1, 1)}),
        ("face", 104, 38_425_706, {"conv6_2_CPM.weight": (71, 512, 1, 1), "Mconv1_stage6.weight": (128, 199, 7, 7),
                                   "Mconv7_stage6.bias": (71,)}),
    ],
)
def test_full_size_layout_matches_the_released_files(kind, n_keys, n_params, shapes):
    # Counts match the released files' sizes (209 / 147 / 154 MB of float32).
    build, _ = NETWORKS[kind]
    with torch.device("meta"):
        sd = build(PoseNetConfig()).state_dict()
    assert len(sd) == n_keys
    assert sum(v.numel() for v in sd.values()) == n_params
    assert all("." not in k.rsplit(".", 1)[0] for k in sd), "keys must be flat layer names, as in the files"
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape


@pytest.mark.parametrize("kind", ["body", "hand", "face"])
def test_tiny_variant_has_the_same_keys(kind):
    build, _ = NETWORKS[kind]
    with torch.device("meta"):
        full = build(PoseNetConfig()).state_dict()
    tiny = openpose_state_dict(kind, width=TINY_WIDTH)
    assert list(tiny) == list(full)
    assert tiny["conv1_1.weight"].shape[0] == TINY_WIDTH


def test_network_output_shapes_and_final_heatmap_relu():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 48)
    pafs, heatmaps = BodyPoseNet(PoseNetConfig(TINY_WIDTH))(x)
    assert pafs.shape == (1, 38, 8, 6) and heatmaps.shape == (1, 19, 8, 6)
    # controlnet_aux's no-ReLU list omits Mconv7_stage6_L2: heatmaps are clamped, PAFs are not.
    assert heatmaps.min() >= 0 and pafs.min() < 0
    assert hand_pose_net(PoseNetConfig(TINY_WIDTH))(x).shape == (1, 22, 8, 6)
    assert face_net(PoseNetConfig(TINY_WIDTH))(x).shape == (1, 71, 8, 6)


@pytest.mark.parametrize("legacy_format", [False, True])
def test_loads_both_pickle_formats(tmp_path, legacy_format):
    sd = openpose_state_dict("hand", width=TINY_WIDTH, seed=3)
    write_openpose_file(str(tmp_path), "hand", width=TINY_WIDTH, seed=3, legacy_format=legacy_format)
    write_openpose_file(str(tmp_path), "body", width=TINY_WIDTH)
    det = OpenposeDetector.from_folder(str(tmp_path), include_face=False)
    assert torch.equal(det.hand_net.conv1_1.weight, sd["conv1_1.weight"])
    assert det.face_net is None and det.body_net.config.width == TINY_WIDTH


def test_missing_key_names_file_and_key(tmp_path):
    sd = openpose_state_dict("body", width=TINY_WIDTH)
    del sd["Mconv7_stage6_L2.bias"]
    torch.save(sd, tmp_path / "body_pose_model.pth")
    with pytest.raises(ModelFileError) as err:
        OpenposeDetector.from_folder(str(tmp_path), include_hand=False, include_face=False)
    assert "body_pose_model.pth" in str(err.value) and "Mconv7_stage6_L2.bias" in str(err.value)


def test_unreadable_width_names_file_and_key(tmp_path):
    sd = openpose_state_dict("face", width=TINY_WIDTH)
    del sd["conv1_1.weight"]
    write_openpose_file(str(tmp_path), "body", width=TINY_WIDTH)
    torch.save(sd, tmp_path / "facenet.pth")
    with pytest.raises(ModelFileError) as err:
        OpenposeDetector.from_folder(str(tmp_path), include_hand=False)
    assert "facenet.pth" in str(err.value) and "conv1_1.weight" in str(err.value)


def test_hand_file_in_place_of_face_file_is_reported(tmp_path):
    write_openpose_file(str(tmp_path), "body", width=TINY_WIDTH)
    torch.save(openpose_state_dict("hand", width=TINY_WIDTH), tmp_path / "facenet.pth")
    with pytest.raises(ModelFileError) as err:
        OpenposeDetector.from_folder(str(tmp_path), include_hand=False)
    assert "facenet.pth" in str(err.value) and "holds the OpenPose hand network" in str(err.value)


def test_fingerprints_tell_the_three_networks_apart():
    for kind in ("body", "hand", "face"):
        assert identify_pose_net(openpose_state_dict(kind, width=TINY_WIDTH)) == kind
    assert identify_pose_net({"conv1_1.weight": torch.zeros(64, 3, 3, 3)}) is None


def test_missing_files_name_file_folder_and_link(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        OpenposeDetector.from_folder(str(tmp_path))
    msg = str(err.value)
    assert "body_pose_model.pth" in msg and str(tmp_path) in msg and URL + "body_pose_model.pth" in msg
    write_openpose_file(str(tmp_path), "body", width=TINY_WIDTH)
    with pytest.raises(FileNotFoundError, match="hand_pose_model.pth"):
        OpenposeDetector.from_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"facenet\.pth.*" + URL.replace(".", r"\.") + r"facenet\.pth"):
        OpenposeDetector.from_folder(str(tmp_path), include_hand=False)
    assert OpenposeDetector.from_folder(str(tmp_path), include_hand=False, include_face=False).hand_net is None


def test_device_and_dtype_are_applied(tiny_folder):
    det = OpenposeDetector.from_folder(tiny_folder, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in det.body_net.parameters())
    out = det(np.full((64, 64, 3), 200, dtype=np.uint8))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


# --------------------------------------------------------------------------- body keypoints


def test_one_person_is_found_at_its_joints():
    heat, paf = synthetic_maps([PERSON], 256, 256)
    poses = body_poses(heat, paf)
    assert len(poses) == 1
    assert pixels(poses[0]) == PERSON
    assert poses[0].total_parts == 18
    # Peak scores (1 each) plus limb scores (1 each: the PAF is the unit vector): 18 + 17 grouping limbs.
    assert poses[0].total_score == pytest.approx(18 + 17, abs=0.05)


def test_two_people_are_separated():
    right = shifted(PERSON, dx=200, dy=20)
    heat, paf = synthetic_maps([PERSON, right], 300, 420)
    poses = body_poses(heat, paf)
    assert sorted((pixels(p) for p in poses), key=lambda d: d[0]) == [PERSON, right]


def test_partial_people_below_four_parts_are_dropped():
    arm = {k: PERSON[k] for k in (2, 3, 4)}  # three parts, two limbs
    leg = {k: PERSON[k] for k in (8, 9, 10, 1)}  # four parts, three limbs
    heat, paf = synthetic_maps([arm, shifted(leg, dx=100)], 256, 256)
    poses = body_poses(heat, paf)
    assert [pixels(p) for p in poses] == [shifted(leg, dx=100)]


def test_parts_without_limb_evidence_are_not_joined():
    heat, _ = synthetic_maps([PERSON], 256, 256)
    assert body_poses(heat, np.zeros((256, 256, 38))) == []


def test_nothing_detected_gives_a_black_canvas():
    heat, paf = np.zeros((128, 128, 19)), np.zeros((128, 128, 38))
    assert body_poses(heat, paf) == []
    assert not draw_poses([], 128, 128).any()


# --------------------------------------------------------------------------- hand and face boxes


def pose_from(points: dict[int, tuple[float, float]]) -> BodyPose:
    return BodyPose([Keypoint(*points[i]) if i in points else None for i in range(18)], 0.0, len(points))


def test_hand_boxes_from_arms():
    boxes = hand_boxes(pose_from(PERSON), 256, 256)
    # Right arm: shoulder (100, 90), elbow (90, 130), wrist (85, 165): forearm 35.36, upper arm 41.23,
    # side 1.5 * max(35.36, 0.9 * 41.23) = 55.66, centre = wrist + 0.33 (wrist - elbow) = (83.35, 176.55).
    # The left arm mirrors it around x = 128.
    assert boxes == [(144, 148, 55, True), (55, 148, 55, False)]


def test_hand_boxes_need_the_whole_arm_and_are_clipped():
    no_left_elbow = {k: v for k, v in PERSON.items() if k != 6}
    assert [b[3] for b in hand_boxes(pose_from(no_left_elbow), 256, 256)] == [False]
    # Clipped at the bottom: the box keeps its corner and shrinks to the image.
    (x, y, side, _), = hand_boxes(pose_from({2: (100, 90), 3: (90, 130), 4: (85, 165)}), 190, 256)
    assert (x, y) == (55, 148) and side == int(190 - 148.72)
    # A hand box under 20 pixels is dropped.
    assert hand_boxes(pose_from({2: (100, 90), 3: (100, 96), 4: (100, 102)}), 256, 256) == []


def test_face_box_from_nose_eyes_and_ears():
    # Half side = max(3 x nose-eye, 1.5 x nose-ear) Chebyshev distance = max(3 * 10, 1.5 * 18) = 30.
    assert face_box(pose_from(PERSON), 256, 256) == (98, 30, 60)
    assert face_box(pose_from({k: v for k, v in PERSON.items() if k != 0}), 256, 256) is None
    assert face_box(pose_from({k: v for k, v in PERSON.items() if k not in (14, 15, 16, 17)}), 256, 256) is None
    assert face_box(pose_from({0: (128, 60), 14: (125, 57)}), 256, 256) is None  # 18 pixels: too small
    # controlnet_aux's clipping tests x + half (not x + side) against the width: this box reaches past the edge.
    assert face_box(pose_from({0: (240, 60), 14: (230, 50)}), 256, 256) == (210, 30, 60)


# --------------------------------------------------------------------------- hand and face peaks


def blob(size, x, y, sigma, amplitude=1.0):
    yy, xx = np.mgrid[0:size, 0:size]
    return amplitude * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))


def test_hand_peaks_take_the_strongest_blob_and_scale_to_the_crop():
    maps = np.zeros((128, 128, 22))
    for k in range(21):
        maps[:, :, k] = blob(128, 10 + 5 * k, 20 + 4 * k, 2.0)
    # Keypoint 3: a sharp high blob and a wide lower one; the blob with the larger sum wins.
    maps[:, :, 3] = blob(128, 20, 20, 1.5, 1.0) + blob(128, 90, 90, 4.0, 0.8)
    maps[:, :, 7] = 0.01  # nothing above the threshold
    peaks = hand_peaks(maps, crop_height=64, crop_width=96)
    assert peaks.shape == (21, 2)
    assert tuple(peaks[0]) == (int(10 * 96 / 128), int(20 * 64 / 128))
    assert tuple(peaks[3]) == (int(90 * 96 / 128), int(90 * 64 / 128))
    assert tuple(peaks[7]) == (0, 0)


def test_face_peaks_skip_weak_channels():
    maps = np.zeros((71, 50, 40), dtype=np.float32)
    maps[0, 10, 5] = 0.9
    maps[1, 20, 30] = 0.04  # below 0.05: skipped
    maps[2, 40, 12] = 0.3
    assert face_peaks(maps).tolist() == [[5, 10], [12, 40]]


def test_crop_peaks_to_image_coordinates():
    kp = crop_to_image(np.array([[0, 5], [10, 0], [4, 6]]), x0=20, y0=30, image_height=100, image_width=200)
    assert [(round(float(k.x), 6), round(float(k.y), 6)) for k in kp] == [(-1 / 200, 0.35), (0.15, -0.01), (0.12, 0.36)]


# --------------------------------------------------------------------------- drawing


def test_drawn_skeleton_has_part_colours_at_joints_and_limbs_between():
    heat, paf = synthetic_maps([PERSON], 256, 256)
    pose = normalize_pose(body_poses(heat, paf)[0], 256, 256)
    canvas = draw_poses([PoseResult(pose, None, None, None)], 256, 256)
    assert canvas.shape == (256, 256, 3) and canvas.dtype == np.uint8
    for part, (x, y) in PERSON.items():
        assert tuple(canvas[y, x]) == BODY_COLORS[part], part
    # Limbs away from others: both arms (limbs 2-5) and legs (7, 8, 10, 11), in 60% of their colour.
    for limb in (2, 3, 4, 5, 7, 8, 10, 11):
        (xa, ya), (xb, yb) = PERSON[BODY_LIMBS[limb][0]], PERSON[BODY_LIMBS[limb][1]]
        expected = tuple(int(c * 0.6) for c in BODY_COLORS[limb])
        assert tuple(canvas[(ya + yb) // 2, (xa + xb) // 2]) == expected, limb
    # The ear-to-shoulder limbs help grouping but are not drawn.
    assert not canvas[75, 105].any()
    assert not draw_poses([PoseResult(pose, None, None, None)], 256, 256, body=False).any()


def test_two_drawn_people_do_not_share_limbs():
    right = shifted(PERSON, dx=200)
    heat, paf = synthetic_maps([PERSON, right], 256, 420)
    poses = [PoseResult(normalize_pose(p, 256, 420), None, None, None) for p in body_poses(heat, paf)]
    canvas = draw_poses(poses, 256, 420)
    assert tuple(canvas[PERSON[1][1], PERSON[1][0]]) == BODY_COLORS[1]
    assert tuple(canvas[right[1][1], right[1][0]]) == BODY_COLORS[1]
    assert not canvas[:, 180:280].any()  # nothing drawn in the gap between them


def test_hand_and_face_drawing():
    h, w = 100, 200
    # Wrist at (100, 90); finger f's four keypoints 4f+1 .. 4f+4 go up from (60 + 20 f, 70) in steps of 15.
    points = [(100, 90)] + [(60 + 20 * f, 70 - 15 * j) for f in range(5) for j in range(4)]
    hand = [Keypoint(np.float32(x / w), np.float32(y / h)) for x, y in points]
    hand[20] = Keypoint(np.float32(-1 / w), np.float32(-1 / h))  # not found (the fingertip at (140, 25))
    canvas = draw_hand(np.zeros((h, w, 3), np.uint8), hand)
    assert tuple(canvas[90, 100]) == (0, 0, 255)
    assert not canvas[0, 0].any()
    # Bone 5 (keypoints 5-6, index finger) has hue 5/20: (127.5, 255, 0), which OpenCV rounds to 128.
    assert HAND_BONES[5] == (5, 6)
    assert tuple(canvas[62, 80]) == (128, 255, 0)
    # Neither a dot nor a bone at the missing fingertip.
    assert not canvas[15:35, 130:150].any()
    face = draw_face(np.zeros((h, w, 3), np.uint8), [Keypoint(0.5, 0.5), Keypoint(-0.005, 0.2)])
    assert tuple(face[50, 100]) == (255, 255, 255)
    lit = face.any(axis=2)
    assert lit.sum() == lit[46:55, 96:105].sum() > 20  # one disc of radius 3; the x = -1 point is not drawn
    assert not draw_hand(np.zeros((h, w, 3), np.uint8), None).any()


# --------------------------------------------------------------------------- whole detector


def test_hands_and_face_run_in_their_boxes(tiny_folder):
    det = OpenposeDetector.from_folder(tiny_folder)
    heat, paf = synthetic_maps([PERSON], 256, 256)
    rgb = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    (pose,) = det.poses_from_maps(np.ascontiguousarray(rgb[:, :, ::-1]), heat, paf)
    boxes = {is_left: (x, y, s) for x, y, s, is_left in hand_boxes(pose_from(PERSON), 256, 256)}
    for hand, is_left in ((pose.left_hand, True), (pose.right_hand, False)):
        assert len(hand) == 21
        x, y, s = boxes[is_left]
        for k in hand:  # each coordinate is inside its box, or -1/size where the crop gave 0
            assert k.x == np.float32(-1 / 256) or x / 256 <= k.x < (x + s) / 256
            assert k.y == np.float32(-1 / 256) or y / 256 <= k.y < (y + s) / 256
    fx, fy, fs = face_box(pose_from(PERSON), 256, 256)
    for k in pose.face or []:
        assert k.x == np.float32(-1 / 256) or fx / 256 <= k.x < (fx + fs) / 256
        assert k.y == np.float32(-1 / 256) or fy / 256 <= k.y < (fy + fs) / 256
    assert pixels(BodyPose([None if k is None else Keypoint(k.x * 256, k.y * 256) for k in pose.body.keypoints], 0, 0)) == PERSON

    no_hands = OpenposeDetector(det.body_net, None, det.face_net, include_hand=False)
    (pose,) = no_hands.poses_from_maps(np.ascontiguousarray(rgb[:, :, ::-1]), heat, paf)
    assert pose.left_hand is None and pose.right_hand is None


def test_end_to_end_shape_dtype_and_determinism(tiny_folder):
    # Random weights: whatever is (not) detected is noise, so only the contract is checked.
    det = OpenposeDetector.from_folder(tiny_folder)
    image = np.random.default_rng(1).integers(0, 256, (128, 192, 3), dtype=np.uint8)
    out = det(image)
    assert out.shape == (128, 192, 3) and out.dtype == np.uint8
    assert np.array_equal(out, det(image))
    heatmaps, pafs = inference.body_maps(det.body_net, image)
    assert heatmaps.shape == (128, 192, 19) and pafs.shape == (128, 192, 38)
    with pytest.raises(ValueError, match="RGB uint8"):
        det(image.astype(np.float32))


def test_needs_the_networks_it_is_asked_to_use(tiny_folder):
    det = OpenposeDetector.from_folder(tiny_folder)
    with pytest.raises(ValueError, match="hand_pose_model.pth"):
        OpenposeDetector(det.body_net, None, det.face_net)


@pytest.mark.slow
def test_full_size_files_load_and_run(tmp_path):
    # About a minute on one CPU thread. A grey frame keeps the random body network from
    # "finding" people (each hand costs ~17 s at full size), so the hand and face networks
    # are run once each on a crop directly.
    write_openpose_files(str(tmp_path))
    assert os.path.getsize(tmp_path / "body_pose_model.pth") > 200e6
    det = OpenposeDetector.from_folder(str(tmp_path))
    out = det(np.full((512, 512, 3), 128, dtype=np.uint8))
    assert out.shape == (512, 512, 3) and out.dtype == np.uint8
    crop = np.random.default_rng(0).integers(0, 256, (90, 90, 3), dtype=np.uint8)
    assert inference.hand_maps(det.hand_net, crop).shape == (128, 128, 22)
    assert inference.face_maps(det.face_net, crop).shape == (71, 90, 90)
