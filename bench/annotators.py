"""Frames per second of each annotator at 512×512 on this machine's CPU.

Every neural annotator loads full-size random-weight files written in the real
formats (speed does not depend on the weights' values), through the same
``Annotator`` front end the pipelines use (resizing included). Each annotator is
warmed up once, then timed over ``--frames`` calls on a real photograph.

With random weights openpose "finds" many people, and it runs the hand network on two
crops and the face network on one crop per person, so its frames/s says little about a real
video. ``--openpose-breakdown`` times its parts instead and estimates a one-person frame:
body maps + 2 hand crops + 1 face crop.

Usage: python bench/annotators.py [--frames 3] [--size 512] [--only canny,lineart,...] [--openpose-breakdown]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from diffsynth.controlnets import PROCESSOR_IDS, Annotator


def sample_photo(size: int) -> Image.Image:
    spec = importlib.util.find_spec("skimage")
    if spec is not None:
        path = os.path.join(spec.submodule_search_locations[0], "data", "astronaut.png")
        return Image.open(path).convert("RGB").resize((size, size))
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def write_all_annotator_files(folder: str) -> None:
    from diffsynth.controlnets.annotators.midas_convert import MidasHybridConfig
    from diffsynth.testing.annotator_files import write_hed_file, write_lineart_anime_file, write_lineart_file
    from diffsynth.testing.depth_files import write_midas_file
    from diffsynth.testing.openpose_files import write_openpose_files

    write_lineart_file(folder)
    write_lineart_anime_file(folder)
    write_hed_file(folder)
    write_midas_file(os.path.join(folder, "dpt_hybrid-midas-501f0c75.pt"), config=MidasHybridConfig())
    write_openpose_files(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--only", default=",".join(PROCESSOR_IDS))
    ap.add_argument("--openpose-breakdown", action="store_true", help="time openpose's body, hand and face networks separately")
    args = ap.parse_args()
    if args.openpose_breakdown:
        openpose_breakdown(sample_photo(args.size), args.frames)
        return
    image = sample_photo(args.size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size}, {args.frames} timed calls each")
    with tempfile.TemporaryDirectory() as folder:
        write_all_annotator_files(folder)
        for pid in args.only.split(","):
            annotator = Annotator(pid, model_path=folder, device="cpu")
            annotator(image)  # warm-up
            times = []
            for _ in range(args.frames):
                start = time.perf_counter()
                annotator(image)
                times.append(time.perf_counter() - start)
            med = statistics.median(times)
            print(f"  {pid:14s} {1 / med:8.2f} frames/s  ({med * 1000:8.1f} ms/frame)")


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def openpose_breakdown(image: Image.Image, repeats: int) -> None:
    from diffsynth.controlnets.annotators.openpose import inference
    from diffsynth.controlnets.annotators.openpose.detector import OpenposeDetector
    from diffsynth.testing.openpose_files import write_openpose_files

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {image.size[0]}x{image.size[1]}, median of {repeats}")
    with tempfile.TemporaryDirectory() as folder:
        write_openpose_files(folder)
        detector = OpenposeDetector.from_folder(folder)
    bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
    side = image.size[1] // 3  # a hand or face crop about a third of the frame tall
    crop = np.ascontiguousarray(bgr[:side, :side])
    with torch.no_grad():
        body = _median_time(lambda: inference.body_maps(detector.body_net, bgr), repeats)
        hand = _median_time(lambda: inference.hand_maps(detector.hand_net, crop), repeats)
        face = _median_time(lambda: inference.face_maps(detector.face_net, crop), repeats)
        heatmaps, pafs = inference.body_maps(detector.body_net, bgr)
        people = len(detector.poses_from_maps(bgr, heatmaps, pafs))
    one_person = body + 2 * hand + face
    print(f"  body maps          {body * 1000:8.1f} ms")
    print(f"  hand maps per crop {hand * 1000:8.1f} ms  ({side}x{side} crop, all scales)")
    print(f"  face maps per crop {face * 1000:8.1f} ms")
    print(f"  people found by the random-weight body net: {people}")
    print(f"  estimated one-person frame: {one_person * 1000:.1f} ms = {1 / one_person:.3f} frames/s")


if __name__ == "__main__":
    main()
