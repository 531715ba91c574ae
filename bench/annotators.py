"""Frames per second of each annotator at 512×512 on this machine's CPU.

Every neural annotator loads full-size random-weight files written in the real
formats (speed does not depend on the weights' values), through the same
``Annotator`` front end the pipelines use (resizing included). Each annotator is
warmed up once, then timed over ``--frames`` calls on a real photograph.

Usage: python bench/annotators.py [--frames 3] [--size 512] [--only canny,lineart,...]
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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
