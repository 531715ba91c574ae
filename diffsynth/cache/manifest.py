"""The run manifest: per-stage status and cache keys, and the seed edition's ``last_process_id.txt``.

``manifest.json`` is rewritten atomically whenever a stage's status changes; a
stage is marked done only after its outputs are durable. Cache keys are
SHA-256 hashes of canonical JSON of everything a stage's result depends on.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from ..utils.atomic import atomic_write_text
from .identity import IDENTITY_VERSION

SCHEMA_VERSION = 1

STAGES = (
    (0, "source frames"),
    (1, "ControlNet annotations"),
    (2, "prompt embeddings"),
    (3, "initial latents"),
    (4, "denoising"),
    (5, "VAE decode"),
    (6, "smoother left pass"),
    (7, "smoother right + merge"),
    (8, "smoother output"),
    (9, "video encode"),
)
STAGE_NAMES = dict(STAGES)


def stable_hash(value: Any) -> str:
    """Hex SHA-256 of ``value`` as canonical JSON (sorted keys; tuples as lists)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Manifest:
    """``OUTPUT/manifest.json``: ``{"schema", "stages": {"<id>": {"name", "key", "status", ...}}, "versions", "updated"}``."""

    def __init__(self, folder: str, writable: bool = True):
        """``writable=False``: a copy that never writes (ranks other than 0 of a run on several processes)."""
        self.folder = folder
        self.writable = writable
        self._began: dict[int, float] = {}  # stage -> when this process began it (monotonic): its seconds at finish
        self.path = os.path.join(folder, "manifest.json")
        # identity: how the keys identify files (cache/identity.py); manifests without it are migrated by the runner.
        self.data: dict[str, Any] = {"schema": SCHEMA_VERSION, "identity": IDENTITY_VERSION, "stages": {}}
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                loaded = json.load(f)
            if loaded.get("schema") == SCHEMA_VERSION:
                self.data = loaded

    def stage(self, stage_id: int) -> dict:
        return self.data["stages"].setdefault(str(stage_id), {"name": STAGE_NAMES[stage_id], "status": "pending"})

    def is_done(self, stage_id: int, key: str) -> bool:
        record = self.data["stages"].get(str(stage_id))
        return record is not None and record.get("status") == "done" and record.get("key") == key

    def key_of(self, stage_id: int) -> str | None:
        return self.data["stages"].get(str(stage_id), {}).get("key")

    def begin(self, stage_id: int, key: str) -> None:
        record = self.stage(stage_id)
        if record.get("key") != key:
            record.clear()
            record.update(name=STAGE_NAMES[stage_id], status="pending")
            self._began.pop(stage_id, None)  # the time spent under the old key is not this result's
        record.update(key=key, status="running" if record.get("status") != "done" else "done")
        self._began.setdefault(stage_id, time.monotonic())
        self.save()

    def finish(self, stage_id: int, key: str, **info: Any) -> None:
        """Mark the stage done (its ``seconds``: the wall time spent on it, summed over the runs that worked on it)."""
        record = self.stage(stage_id)
        self._tick(stage_id, record)
        self._began.pop(stage_id, None)
        record.update(key=key, status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **info)
        self.save()
        self.write_last_process_id()

    def update(self, stage_id: int, **info: Any) -> None:
        record = self.stage(stage_id)
        self._tick(stage_id, record)
        record.update(**info)
        self.save()

    def _tick(self, stage_id: int, record: dict) -> None:
        """Add the time since this process began the stage (or since the last tick) to its ``seconds``: a killed run's
        time counts up to its last save."""
        began = self._began.get(stage_id)
        if began is not None:
            now = time.monotonic()
            record["seconds"] = round(record.get("seconds", 0.0) + now - began, 3)
            self._began[stage_id] = now

    def invalidate_from(self, stage_id: int) -> None:
        """Forget ``stage_id`` and every later stage (their keys changed)."""
        for sid, _ in STAGES:
            if sid >= stage_id:
                self.data["stages"].pop(str(sid), None)
        self.save()
        self.write_last_process_id()

    def last_done(self) -> int:
        """Id of the last stage of the unbroken run of finished stages from 0 (-1 if none): the seed edition's number."""
        last = -1
        for sid, _ in STAGES:
            if self.data["stages"].get(str(sid), {}).get("status") != "done":
                break
            last = sid
        return last

    def save(self) -> None:
        if not self.writable:
            return
        os.makedirs(self.folder, exist_ok=True)
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True))

    def write_last_process_id(self) -> None:
        if not self.writable:
            return
        atomic_write_text(os.path.join(self.folder, "last_process_id.txt"), str(self.last_done()))
