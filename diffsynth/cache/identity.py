"""What identifies an input or model file in a cache key: its content, not where it lies.

A stage's cache key must not change when the models folder is moved, a drive is mounted
elsewhere or a file is downloaded again, and must change when the file really changes.
So a file is identified by its size and a SHA-256 over samples of its content: the first
64 KiB (a whole safetensors header when that is longer: it names every tensor, its dtype,
shape and offsets), the last 64 KiB and eight 4 KiB blocks spread evenly in between;
small files are hashed whole. Two checkpoints of one architecture differ in every block
of weights, so sampling tells them apart; what it cannot see is an edit of a few bytes in
an unsampled region of an otherwise identical file, which no real model or video edit is.

Reading ~200 KiB per file is cheap for model files, not for an image folder of thousands
of frames on a hard disk, so fingerprints are remembered in the user's cache folder keyed
by absolute path, size and modification time (ns): an unchanged file is never read twice.
That file is only a memo; deleting it costs a re-read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading

from ..utils.atomic import atomic_write_text
from ..utils.user_cache import user_cache_dir

logger = logging.getLogger("diffsynth")

IDENTITY_VERSION = "content-v1"
_HEAD = 64 * 1024
_TAIL = 64 * 1024
_BLOCKS = 8
_BLOCK = 4 * 1024
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_MEMO_NAME = "file_fingerprints.json"
_MEMO_LIMIT = 100_000  # entries; the oldest are dropped beyond it


def _sampled_sha256(path: str, size: int) -> str:
    digest = hashlib.sha256(struct.pack("<Q", size))
    with open(path, "rb") as f:
        if size <= _HEAD + _TAIL + _BLOCKS * _BLOCK:
            digest.update(f.read())
            return digest.hexdigest()
        head = f.read(_HEAD)
        if path.lower().endswith(".safetensors") and len(head) >= 8:
            header_len = struct.unpack("<Q", head[:8])[0]
            if _HEAD < 8 + header_len <= min(size, _MAX_SAFETENSORS_HEADER):
                head += f.read(8 + header_len - _HEAD)
        digest.update(head)
        span = size - _TAIL - _HEAD
        for k in range(1, _BLOCKS + 1):
            f.seek(_HEAD + span * k // (_BLOCKS + 1))
            digest.update(f.read(_BLOCK))
        f.seek(size - _TAIL)
        digest.update(f.read(_TAIL))
    return digest.hexdigest()


class _Memo:
    """``{absolute path: [size, mtime_ns, fingerprint]}`` in the user's cache folder, loaded once per process."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries: dict[str, list] | None = None
        self.path: str | None = None
        self.dirty = False

    def _load(self) -> None:
        self.path = os.path.join(user_cache_dir(), _MEMO_NAME)
        self.entries = {}
        if os.path.isfile(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    loaded = json.load(f)
                if loaded.get("version") == IDENTITY_VERSION:
                    self.entries = dict(loaded.get("entries", {}))
            except (OSError, ValueError) as exc:
                logger.warning("file fingerprint memo %s is unreadable (%s); it will be rebuilt", self.path, exc)

    def fingerprint(self, path: str, stat: os.stat_result) -> str:
        with self.lock:
            if self.entries is None or self.path != os.path.join(user_cache_dir(), _MEMO_NAME):
                self._load()
            entry = self.entries.get(path)
            if entry is not None and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
                return entry[2]
        value = _sampled_sha256(path, stat.st_size)
        with self.lock:
            self.entries.pop(path, None)
            self.entries[path] = [stat.st_size, stat.st_mtime_ns, value]
            while len(self.entries) > _MEMO_LIMIT:
                self.entries.pop(next(iter(self.entries)))
            self.dirty = True
        return value

    def save(self) -> None:
        with self.lock:
            if not self.dirty or self.entries is None:
                return
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                atomic_write_text(self.path, json.dumps({"version": IDENTITY_VERSION, "entries": self.entries}), fsync=False)
                self.dirty = False
            except OSError as exc:  # a read-only home only costs re-reading next time: say so, do not fail the run
                logger.warning("could not save file fingerprints to %s (%s); the next run re-reads its inputs", self.path, exc)
                self.dirty = False


_memo = _Memo()


def content_identity(path: str) -> dict:
    """``{"size", "sha256"}`` of a file, or ``{"files": [[relative path, size, sha256], ...]}`` of a folder.

    Folders skip hidden entries (``.git``, ``.cache``, editors' files). A missing path raises
    ``FileNotFoundError``: a missing input is an error, never a reason to recompute (the
    pre-flight checks report it first, with the config key and the remedy).
    """
    path = os.path.abspath(path)
    if os.path.isdir(path):
        entries = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                full = os.path.join(root, name)
                stat = os.stat(full)
                entries.append([os.path.relpath(full, path).replace(os.sep, "/"), stat.st_size, _memo.fingerprint(full, stat)])
        return {"files": sorted(entries)}
    stat = os.stat(path)
    return {"size": stat.st_size, "sha256": _memo.fingerprint(path, stat)}


def save_fingerprints() -> None:
    """Write the fingerprints computed since the last call to the user's cache folder (once per set of keys)."""
    _memo.save()


def legacy_identity(path: str | None) -> dict | None:
    """The identity of the first manifests (absolute path, size, mtime in s): only to recognise their keys when migrating."""
    if path is None:
        return None
    path = os.path.abspath(path)
    if os.path.isdir(path):
        entries = []
        for root, _, files in os.walk(path):
            for name in sorted(files):
                full = os.path.join(root, name)
                stat = os.stat(full)
                entries.append((os.path.relpath(full, path), stat.st_size, int(stat.st_mtime)))
        return {"path": path, "files": sorted(entries)}
    if not os.path.exists(path):
        return {"path": path, "missing": True}
    stat = os.stat(path)
    return {"path": path, "size": stat.st_size, "mtime": int(stat.st_mtime)}
