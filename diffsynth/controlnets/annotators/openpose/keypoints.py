"""From network outputs to keypoints: pure numpy/scipy functions, no torch.

Body: peaks of the smoothed part heatmaps, limbs scored by the line integral of
the part affinity field between two peaks, limbs greedily joined into people
(Cao et al., "Realtime Multi-Person 2D Pose Estimation using Part Affinity
Fields", CVPR 2017). Hands and face: a square box from the body's arm or head
keypoints, then one peak per heatmap inside the box.

The thresholds, sample counts and tie-breaking follow controlnet_aux 0.0.7
(``open_pose/body.py``, ``hand.py``, ``face.py``, ``util.py``), itself from
pytorch-openpose and CMU's OpenPose; places where that code behaves oddly are
kept and marked, because ControlNet openpose models were trained on its maps.

Coordinates here are pixels (x right, y down) of the image the maps were
computed for; :func:`normalize_pose` turns a person into the 0..1 coordinates
that the drawing functions (and OpenPose JSON) use.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
from scipy.ndimage import gaussian_filter, label

# The 18 body parts of the COCO-18 OpenPose model, in heatmap channel order.
BODY_PARTS = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)
N_BODY_PARTS = len(BODY_PARTS)
N_HAND_KEYPOINTS = 21

# Limbs (part a, part b) in the order they are associated and drawn; the last two
# (ear to shoulder) help grouping but are neither drawn nor allowed to start a person.
BODY_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)
N_DRAWN_LIMBS = 17
# PAF channels (x, y) of each limb above, in the body network's 38-channel output.
LIMB_PAF_CHANNELS = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11),
    (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
)


class Keypoint(NamedTuple):
    x: float
    y: float
    score: float = 1.0
    id: int = -1


class BodyPose(NamedTuple):
    """One person: a keypoint (or ``None``) per body part, the grouping score and the number of parts."""

    keypoints: list[Optional[Keypoint]]
    total_score: float
    total_parts: int


class PoseResult(NamedTuple):
    """One person in 0..1 coordinates; hands and face are ``None`` when not detected or not asked for."""

    body: BodyPose
    left_hand: Optional[list[Keypoint]]
    right_hand: Optional[list[Keypoint]]
    face: Optional[list[Keypoint]]


# --------------------------------------------------------------------------- body


def find_body_peaks(heatmaps: np.ndarray, threshold: float = 0.1, sigma: float = 3.0) -> list[np.ndarray]:
    """Per body part, the local maxima of the Gaussian-smoothed heatmap above ``threshold``.

    ``heatmaps``: (H, W, >=18). Returns 18 arrays of rows ``(x, y, score, id)``:
    ``score`` is the unsmoothed heatmap value, ``id`` numbers all peaks of all parts
    consecutively (row-major order within a part). A pixel is a maximum when it is
    >= its four neighbours (zero outside the map), so a plateau yields several peaks.
    """
    peaks = []
    next_id = 0
    for part in range(N_BODY_PARTS):
        raw = heatmaps[:, :, part].astype(np.float64)
        smooth = gaussian_filter(raw, sigma=sigma)
        around = np.pad(smooth, 1)
        is_peak = (
            (smooth >= around[:-2, 1:-1]) & (smooth >= around[2:, 1:-1])
            & (smooth >= around[1:-1, :-2]) & (smooth >= around[1:-1, 2:]) & (smooth > threshold)
        )
        ys, xs = np.nonzero(is_peak)
        ids = np.arange(next_id, next_id + len(xs))
        peaks.append(np.stack([xs, ys, raw[ys, xs], ids], axis=1).astype(np.float64).reshape(-1, 4))
        next_id += len(xs)
    return peaks


def connect_limbs(
    peaks: list[np.ndarray], pafs: np.ndarray, image_height: int, samples: int = 10, paf_threshold: float = 0.05
) -> list[Optional[np.ndarray]]:
    """Per limb, the chosen (part a peak, part b peak) pairs: rows ``(id_a, id_b, score, index_a, index_b)``.

    A pair's score is the mean over ``samples`` points of the segment of the PAF
    projected on the segment's direction, minus a penalty for segments longer
    than half the image height. A pair qualifies when more than 80% of the
    samples exceed ``paf_threshold`` and the score is positive; pairs are then
    taken greedily by score, each peak at most once. ``None`` for a limb where one
    of its parts has no peak at all.
    """
    connections: list[Optional[np.ndarray]] = []
    for (part_a, part_b), (cx, cy) in zip(BODY_LIMBS, LIMB_PAF_CHANNELS):
        cand_a, cand_b = peaks[part_a], peaks[part_b]
        if len(cand_a) == 0 or len(cand_b) == 0:
            connections.append(None)
            continue
        start = cand_a[:, None, :2]  # (nA, 1, 2)
        end = cand_b[None, :, :2]  # (1, nB, 2)
        delta = end - start
        norm = np.maximum(np.sqrt(delta[..., 0] ** 2 + delta[..., 1] ** 2), 0.001)
        direction = delta / norm[..., None]
        shape = (len(cand_a), len(cand_b))
        xs = np.linspace(np.broadcast_to(start[..., 0], shape), np.broadcast_to(end[..., 0], shape), samples, axis=-1)
        ys = np.linspace(np.broadcast_to(start[..., 1], shape), np.broadcast_to(end[..., 1], shape), samples, axis=-1)
        xi, yi = np.rint(xs).astype(np.intp), np.rint(ys).astype(np.intp)  # round half to even, like Python's round()
        along = pafs[yi, xi, cx] * direction[..., 0:1] + pafs[yi, xi, cy] * direction[..., 1:2]  # (nA, nB, samples)
        score = along.sum(axis=-1) / samples + np.minimum(0.5 * image_height / norm - 1, 0)
        ok = ((along > paf_threshold).sum(axis=-1) > 0.8 * samples) & (score > 0)

        ia, ib = np.nonzero(ok)
        order = np.argsort(-score[ia, ib], kind="stable")
        chosen: list[tuple[float, float, float, int, int]] = []
        used_a: set[int] = set()
        used_b: set[int] = set()
        limit = min(len(cand_a), len(cand_b))
        for k in order:
            i, j = int(ia[k]), int(ib[k])
            if i in used_a or j in used_b:
                continue
            chosen.append((cand_a[i, 3], cand_b[j, 3], float(score[i, j]), i, j))
            used_a.add(i)
            used_b.add(j)
            if len(chosen) >= limit:
                break
        connections.append(np.array(chosen, dtype=np.float64).reshape(-1, 5))
    return connections


def group_people(
    peaks: list[np.ndarray],
    connections: list[Optional[np.ndarray]],
    min_parts: int = 4,
    min_mean_score: float = 0.4,
) -> np.ndarray:
    """Join limbs that share a peak into people.

    Returns rows of ``N_BODY_PARTS + 2``: the peak id of each part (-1 if absent),
    then the total score (peak scores + limb scores) and the number of parts.
    People with fewer than ``min_parts`` parts or a mean score below
    ``min_mean_score`` per part are dropped.
    """
    all_peaks = np.concatenate(peaks) if peaks else np.zeros((0, 4))
    peak_score = {int(row[3]): row[2] for row in all_peaks}
    people: list[np.ndarray] = []
    for limb, rows in enumerate(connections):
        if rows is None:
            continue
        part_a, part_b = BODY_LIMBS[limb]
        for id_a, id_b, limb_score, _, _ in rows:
            owners = [p for p, person in enumerate(people) if person[part_a] == id_a or person[part_b] == id_b]
            if len(owners) == 1:
                person = people[owners[0]]
                if person[part_b] != id_b:
                    person[part_b] = id_b
                    person[-1] += 1
                    person[-2] += peak_score[int(id_b)] + limb_score
            elif len(owners) >= 2:
                # controlnet_aux keeps room for two owners and raises IndexError on a third;
                # we use the first two.
                first, second = people[owners[0]], people[owners[1]]
                overlap = np.any((first[:-2] >= 0) & (second[:-2] >= 0))
                if not overlap:  # two halves of one person: merge them
                    first[:-2] += second[:-2] + 1  # -1 + id + 1 = id where only the second has the part
                    first[-2:] += second[-2:]
                    first[-2] += limb_score
                    del people[owners[1]]
                else:
                    first[part_b] = id_b
                    first[-1] += 1
                    first[-2] += peak_score[int(id_b)] + limb_score
            elif limb < N_DRAWN_LIMBS:  # the ear-shoulder limbs never start a person
                person = np.full(N_BODY_PARTS + 2, -1.0)
                person[part_a], person[part_b] = id_a, id_b
                person[-1] = 2
                person[-2] = peak_score[int(id_a)] + peak_score[int(id_b)] + limb_score
                people.append(person)
    kept = [p for p in people if p[-1] >= min_parts and p[-2] / p[-1] >= min_mean_score]
    return np.array(kept, dtype=np.float64).reshape(-1, N_BODY_PARTS + 2)


def body_poses(heatmaps: np.ndarray, pafs: np.ndarray) -> list[BodyPose]:
    """All people in the maps, in pixel coordinates: heatmaps (H, W, >=18), PAFs (H, W, 38)."""
    peaks = find_body_peaks(heatmaps)
    people = group_people(peaks, connect_limbs(peaks, pafs, image_height=heatmaps.shape[0]))
    by_id = {int(row[3]): row for part_peaks in peaks for row in part_peaks}
    poses = []
    for person in people:
        keypoints: list[Optional[Keypoint]] = []
        for peak_id in person[:N_BODY_PARTS].astype(int):
            if peak_id < 0:
                keypoints.append(None)
            else:
                x, y, score, _ = by_id[peak_id]
                keypoints.append(Keypoint(x, y, score, peak_id))
        poses.append(BodyPose(keypoints, float(person[-2]), int(person[-1])))
    return poses


# --------------------------------------------------------------------------- hand and face boxes


def hand_boxes(body: BodyPose, image_height: int, image_width: int) -> list[tuple[int, int, int, bool]]:
    """Square hand boxes ``(x, y, side, is_left)`` from shoulder, elbow and wrist (pixels), left hand first.

    OpenPose's ``handDetector.cpp`` rule: the centre is the wrist pushed a third
    of the forearm further out; the side is 1.5 x max(forearm, 0.9 x upper arm),
    clipped to the image; boxes under 20 pixels are dropped.
    """
    boxes = []
    arms = ((5, 6, 7, True), (2, 3, 4, False))  # (shoulder, elbow, wrist, is_left)
    for shoulder, elbow, wrist, is_left in arms:
        points = [body.keypoints[i] for i in (shoulder, elbow, wrist)]
        if any(p is None for p in points):
            continue
        (sx, sy), (ex, ey), (wx, wy) = [(p.x, p.y) for p in points]
        forearm = math.sqrt((wx - ex) ** 2 + (wy - ey) ** 2)
        upper_arm = math.sqrt((ex - sx) ** 2 + (ey - sy) ** 2)
        side = 1.5 * max(forearm, 0.9 * upper_arm)
        x = max(wx + 0.33 * (wx - ex) - side / 2, 0)
        y = max(wy + 0.33 * (wy - ey) - side / 2, 0)
        side_x = image_width - x if x + side > image_width else side
        side_y = image_height - y if y + side > image_height else side
        side = min(side_x, side_y)
        if side >= 20:
            boxes.append((int(x), int(y), int(side), is_left))
    return boxes


def face_box(body: BodyPose, image_height: int, image_width: int) -> Optional[tuple[int, int, int]]:
    """Face box ``(x, y, side)`` around the nose, sized by the eyes and ears (pixels); ``None`` if under 20 pixels.

    The half-side is the largest of 3x the nose-eye and 1.5x the nose-ear
    (Chebyshev) distances. controlnet_aux clips the side by ``x + half > width``
    rather than ``x + side > width``, so a box near the right or bottom edge can
    reach past the image and the crop comes out non-square; kept as is.
    """
    nose = body.keypoints[0]
    eyes = [body.keypoints[i] for i in (14, 15)]
    ears = [body.keypoints[i] for i in (16, 17)]
    if nose is None or all(p is None for p in eyes + ears):
        return None
    half = 0.0
    for points, factor in ((eyes, 3.0), (ears, 1.5)):
        for p in points:
            if p is not None:
                half = max(half, factor * max(abs(nose.x - p.x), abs(nose.y - p.y)))
    x, y = max(nose.x - half, 0), max(nose.y - half, 0)
    side_x = image_width - x if x + half > image_width else 2 * half
    side_y = image_height - y if y + half > image_height else 2 * half
    side = min(side_x, side_y)
    if side < 20:
        return None
    return int(x), int(y), int(side)


# --------------------------------------------------------------------------- hand and face peaks


def hand_peaks(heatmaps: np.ndarray, crop_height: int, crop_width: int, threshold: float = 0.05, sigma: float = 3.0) -> np.ndarray:
    """One (x, y) per hand keypoint, in crop pixels; (0, 0) where nothing exceeds ``threshold``.

    ``heatmaps``: (S, S, >=21) on a square grid over the crop. Per keypoint: the
    smoothed map above ``threshold`` is split into 8-connected blobs, the blob with
    the largest sum of the raw map is kept, and its raw maximum is the keypoint.
    """
    size_y, size_x = heatmaps.shape[:2]
    out = np.zeros((N_HAND_KEYPOINTS, 2), dtype=np.int64)
    for k in range(N_HAND_KEYPOINTS):
        raw = heatmaps[:, :, k]
        mask = gaussian_filter(raw, sigma=sigma) > threshold
        if not mask.any():
            continue
        blobs, count = label(mask, structure=np.ones((3, 3)))
        sums = [raw[blobs == i].sum() for i in range(1, count + 1)]
        best = np.where(blobs == int(np.argmax(sums)) + 1, raw, 0)
        y, x = np.unravel_index(np.argmax(best), best.shape)
        out[k] = int(float(x) * crop_width / size_x), int(float(y) * crop_height / size_y)
    return out


def face_peaks(heatmaps: np.ndarray, threshold: float = 0.05) -> np.ndarray:
    """(x, y) of the maximum of every channel of ``heatmaps`` (C, H, W) that exceeds ``threshold``.

    Channels below the threshold are skipped, so the result has up to C rows and
    row i is not necessarily landmark i. controlnet_aux scans all 71 channels,
    the background one included (it usually yields one more dot); kept as is.
    """
    found = []
    for channel in heatmaps:
        if channel.max() > threshold:
            y, x = np.unravel_index(np.argmax(channel), channel.shape)
            found.append((x, y))
    return np.array(found, dtype=np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------- coordinates


def crop_to_image(peaks: np.ndarray, x0: int, y0: int, image_height: int, image_width: int) -> list[Keypoint]:
    """Crop-pixel peaks -> 0..1 image coordinates (float32); a 0 coordinate (not found) becomes -1/size."""
    p = peaks.astype(np.float32)
    xs = np.where(p[:, 0] < 1e-6, -1, p[:, 0] + x0) / float(image_width)
    ys = np.where(p[:, 1] < 1e-6, -1, p[:, 1] + y0) / float(image_height)
    return [Keypoint(x, y) for x, y in zip(xs.astype(np.float32), ys.astype(np.float32))]


def normalize_pose(body: BodyPose, image_height: int, image_width: int) -> BodyPose:
    """The same person with x / width and y / height."""
    keypoints = [
        None if k is None else Keypoint(k.x / float(image_width), k.y / float(image_height), k.score, k.id)
        for k in body.keypoints
    ]
    return BodyPose(keypoints, body.total_score, body.total_parts)
