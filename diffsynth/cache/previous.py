"""``OUTPUT/previous/``: where a finished render goes when a changed config or call would delete it.

A rerun never costs a finished render: the runner (and ``SDVideoPipeline`` with an
``output_folder``) move the files they would delete (``frames/``, ``video.mp4``) here,
with the ``config.json``/``manifest.json`` that made them, instead of deleting them.
One generation is kept: the older one is removed once the new one is complete.
"""
from __future__ import annotations

import logging
import os
import shutil
import time

from ..utils.atomic import atomic_write_bytes

logger = logging.getLogger("diffsynth")

PREVIOUS_FOLDER = "previous"
_INCOMING = ".incoming"  # previous/.incoming: a move in progress, completed by the next call if this one is killed


def keep_previous(out: str, names: list[str], finished: bool) -> str | None:
    """Move ``names`` (files or folders in ``out``) to ``out/previous/<time>/`` when ``finished``; returns that folder.

    Moves are renames inside the output folder (no copy of the frames). A kill at any
    point leaves ``previous/.incoming``, which the next call completes (whatever
    ``finished`` it is given) before anything else is deleted.
    """
    previous = os.path.join(out, PREVIOUS_FOLDER)
    incoming = os.path.join(previous, _INCOMING)
    present = [name for name in names if os.path.exists(os.path.join(out, name))]
    resuming = os.path.isdir(incoming)
    if not resuming and not (finished and present):
        return None
    os.makedirs(incoming, exist_ok=True)
    for name in ("config.json", "manifest.json"):  # copies: the run still needs its own
        source, target = os.path.join(out, name), os.path.join(incoming, name)
        if os.path.isfile(source) and not os.path.exists(target):
            with open(source, "rb") as f:
                atomic_write_bytes(target, f.read())
    for name in present:
        os.replace(os.path.join(out, name), os.path.join(incoming, name))
    for name in os.listdir(previous):  # one generation: the older one goes only now that the new one is complete
        if name != _INCOMING:
            path = os.path.join(previous, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    kept = os.path.join(previous, time.strftime("%Y%m%d-%H%M%S"))
    os.replace(incoming, kept)
    logger.warning("the inputs changed, so the finished render in %s was moved, not deleted: %s are now in %s "
                   "(`diffsynth clean %s --previous` removes it)", out, ", ".join(sorted(os.listdir(kept))), kept, out)
    return kept
