"""Friendly checks that the model files a script needs are where it expects them."""
from __future__ import annotations

import os
from typing import Mapping


def require_model_files(files: Mapping[str, str]) -> None:
    """Raise ``FileNotFoundError`` listing every missing file, where to put it and where to download it.

    ``files`` maps a local path (e.g. ``models/stable_diffusion/x.safetensors``) to its download URL.
    """
    missing = [(path, url) for path, url in files.items() if not os.path.exists(path)]
    if missing:
        lines = "\n".join(f"  {path}\n      download: {url}" for path, url in missing)
        raise FileNotFoundError(
            f"{len(missing)} model file(s) missing. Download each and put it at the path shown "
            f"(relative to {os.getcwd()}):\n{lines}"
        )
