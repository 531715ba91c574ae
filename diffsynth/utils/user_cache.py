"""The user's cache folder for small files that outlive a run (file fingerprints, later timing history).

``$DIFFSYNTH_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/diffsynth``, else ``~/.cache/diffsynth``.
Nothing in it is needed for correctness: deleting it only costs a re-read of the inputs.
"""
from __future__ import annotations

import os


def user_cache_dir() -> str:
    """The folder (not created here): see the module docstring for the rule."""
    explicit = os.environ.get("DIFFSYNTH_CACHE_DIR")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "diffsynth")
