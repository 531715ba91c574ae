"""Bytes on disk and how they are shown: one format for `diffsynth status`, the runner's errors,
downloads and the WebUI."""
from __future__ import annotations

import os


def human_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"``; whole bytes below 1 KiB, GiB the largest unit."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def path_bytes(path: str) -> int:
    """Size of a file, or of every file under a folder (0 when it does not exist).

    A folder may change while it is counted (a run commits and deletes files while ``diffsynth status`` or the
    run's own meter counts them): a file or folder that is gone by the time it is reached counts nothing,
    since it no longer takes space."""
    try:
        if not os.path.isdir(path):
            return os.path.getsize(path) if os.path.isfile(path) else 0
        total = 0
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    total += path_bytes(entry.path) if entry.is_dir(follow_symlinks=False) else entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue  # deleted (or renamed: a temporary file committed) since the listing
        return total
    except FileNotFoundError:
        return 0


def count_frame_files(folder: str) -> int:
    """Committed per-frame files in ``folder`` (``000012.png``, ``000012.npy``; temporary files excluded)."""
    if not os.path.isdir(folder):
        return 0
    return sum(1 for name in os.listdir(folder) if name.split(".")[0].isdigit() and not name.startswith("."))


def human_seconds(seconds: float) -> str:
    """``12.3 s``, ``4 min 05 s``, ``3 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
