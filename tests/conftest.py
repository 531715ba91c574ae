"""Shared fixtures: tiny random-weight model files in the real formats (from ``diffsynth.testing``)."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# File fingerprints (cache/identity.py) are remembered in the user's cache folder: keep the tests' out of ~/.cache.
os.environ.setdefault("DIFFSYNTH_CACHE_DIR", tempfile.mkdtemp(prefix="diffsynth-test-cache-"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_sd_file(tiny_dir):
    """A tiny SD 1.x single-file checkpoint (.safetensors, fp32)."""
    from diffsynth.testing.factory import write_sd_checkpoint

    return write_sd_checkpoint(str(tiny_dir / "tiny_sd15.safetensors"), seed=0)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_sd_file):
    from diffsynth import ModelManager, SDImagePipeline

    mm = ModelManager(torch_dtype=torch.float32, device="cpu")
    mm.load_models([tiny_sd_file])
    return SDImagePipeline.from_model_manager(mm)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA; skip them (with a reason) where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def server():
    """A pre-imported fork server for the killed-and-rerun renders (``diffsynth.testing.crash_child``), one per test module."""
    from diffsynth.testing.crash_child import ForkServer

    with ForkServer(timeout=300) as s:
        yield s
