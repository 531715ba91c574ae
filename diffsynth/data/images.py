"""Image-level helpers of the data module: natural sorting of frame files, loading, crop-and-resize.

``crop_and_resize`` and ``search_for_images`` keep the names and the behaviour of
DiffSynth-Studio's ``diffsynth/data/video.py`` (early 2024), with the natural sort
made total (the original's key could compare an int with a str and raise TypeError).
"""
from __future__ import annotations

import os
import re

from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "natural_sort_key", "search_for_images", "load_image", "crop_and_resize"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
"""Frame files an image folder may hold (compared case-insensitively)."""

_DIGIT_RUNS = re.compile(r"([0-9]+)")


def natural_sort_key(name: str) -> tuple:
    """Sort key that orders ``frame2.png`` before ``frame10.png``.

    The name is split into alternating text and digit runs; digit runs compare as
    integers, text runs case-insensitively. Each run is tagged ``(0, int)`` or
    ``(1, str)``, so two keys never compare an int with a str: at a position where
    one name has a number and the other text, the number sorts first (as "0" < "a"
    in ASCII). Names whose keys tie (``1.png`` and ``01.png``, ``A.png`` and
    ``a.png``) are ordered by the raw name, so the order is total and deterministic.
    """
    runs = _DIGIT_RUNS.split(name)
    # re.split with a capturing group alternates text, digits, text, ...: odd positions are digits.
    tagged = tuple((0, int(run)) if i % 2 else (1, run.casefold()) for i, run in enumerate(runs))
    return tagged, name


def search_for_images(folder: str | os.PathLike) -> list[str]:
    """Paths of the frame images in ``folder``, naturally sorted.

    Frame images are files ending in .jpg/.jpeg/.png (any case). Hidden files
    (starting with ".", e.g. macOS "._x.png" forks or our own ".x.png.tmp" temp
    files) and sub-folders are skipped.
    Raises FileNotFoundError naming ``folder`` when it does not exist.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    names = [
        entry.name
        for entry in os.scandir(folder)
        if entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_EXTENSIONS)
    ]
    return [os.path.join(folder, name) for name in sorted(names, key=natural_sort_key)]


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as an RGB PIL image (the file is closed before returning)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def crop_and_resize(image: Image.Image, height: int, width: int) -> Image.Image:
    """Centre-crop ``image`` to the aspect ratio ``height:width``, then resize it to exactly that size.

    The original's rule, kept exactly (crop sizes are truncated with ``int``):

    - source relatively wider (``img_h / img_w < height / width``): keep the full height,
      crop the width to ``int(img_h / height * width)`` starting at ``(img_w - crop) // 2``;
    - otherwise keep the full width, crop the height to ``int(img_w / width * height)``
      starting at ``(img_h - crop) // 2``.

    The resize is bicubic (PIL's default for RGB, named here so it cannot drift).
    An image already at ``(height, width)`` is returned unchanged.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"crop_and_resize needs a positive size, got height={height}, width={width}")
    img_w, img_h = image.size
    if (img_w, img_h) == (width, height):
        return image
    if img_h / img_w < height / width:
        crop_w = int(img_h / height * width)
        left = (img_w - crop_w) // 2
        box = (left, 0, left + crop_w, img_h)
    else:
        crop_h = int(img_w / width * height)
        top = (img_h - crop_h) // 2
        box = (0, top, img_w, top + crop_h)
    return image.crop(box).resize((width, height), Image.Resampling.BICUBIC)
