"""What a run measures about itself, per stage: wall seconds, the output folder's peak bytes, this process's peak
resident memory and the device's peak memory (CUDA), for the manifest's predicted-vs-measured record.

A thread samples the resident memory often (reading ``/proc/self/statm`` is cheap) and the output
folder's bytes less often (a walk of thousands of files is not: the interval grows with the time a walk
takes, so it costs under 5% of a core); the stages also call :meth:`Meter.sample` at the moments the folder
is at its fullest (a denoising step's end before the old generation goes, before the smoother's cleanup).
"""
from __future__ import annotations

import logging
import os
import threading
import time

import torch

from ..cache.previous import PREVIOUS_FOLDER
from ..utils.sizes import path_bytes
from .core import current_rss

logger = logging.getLogger("diffsynth")

_RSS_INTERVAL = 0.1


def folder_bytes(out: str) -> int:
    """Bytes of the output folder, without ``previous/`` (a kept render is not this render's)."""
    if not os.path.isdir(out):
        return 0
    return sum(path_bytes(os.path.join(out, name)) for name in os.listdir(out) if name != PREVIOUS_FOLDER)


class Meter:
    def __init__(self, out: str, device: str | torch.device | None = None, disk: bool = True):
        """``disk``: whether this process measures the folder (on a run of several, each folder's first process does)."""
        self.out = out
        self.disk = disk
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.stage: int | None = None
        self.began = 0.0
        self.records: dict[int, dict] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._disk_every = 0.5
        self._disk_next = 0.0

    def __enter__(self) -> "Meter":
        self._thread = threading.Thread(target=self._loop, name="diffsynth-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.switch(None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _record(self, stage: int) -> dict:
        return self.records.setdefault(stage, {"seconds": 0.0, "disk_peak_bytes": 0, "ram_peak_bytes": 0, "device_peak_bytes": None})

    def switch(self, stage: int | None) -> None:
        """The run moves on to ``stage`` (None: it ends): the time since the last switch is the previous stage's."""
        with self._lock:
            now = time.monotonic()
            if self.stage is not None:
                record = self._record(self.stage)
                record["seconds"] += now - self.began
                if self.cuda:
                    peak = torch.cuda.max_memory_allocated(self.device)
                    record["device_peak_bytes"] = max(record["device_peak_bytes"] or 0, peak)
            if stage == self.stage and stage is not None:
                self.began = now
                return
            self.stage, self.began = stage, now
        if stage is not None:
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            self.sample()

    def sample(self, disk: bool = True) -> None:
        """Record the resident memory (and the folder's bytes) now, as the current stage's."""
        rss = current_rss()
        nbytes = folder_bytes(self.out) if disk and self.disk else None
        with self._lock:
            if self.stage is None:
                return
            record = self._record(self.stage)
            record["ram_peak_bytes"] = max(record["ram_peak_bytes"], rss)
            if nbytes is not None:
                record["disk_peak_bytes"] = max(record["disk_peak_bytes"], nbytes)

    def _loop(self) -> None:
        while not self._stop.wait(_RSS_INTERVAL):
            now = time.monotonic()
            disk = now >= self._disk_next
            start = time.monotonic()
            try:
                self.sample(disk=disk)
            except OSError as exc:  # the folder unreadable (permissions, a network disk gone): the run goes on unmeasured
                logger.warning("the run's measurements stop here: %s", exc)
                return
            if disk:
                took = time.monotonic() - start
                self._disk_every = max(0.5, 20 * took)
                self._disk_next = time.monotonic() + self._disk_every

    def results(self) -> dict[int, dict]:
        with self._lock:
            return {sid: dict(record, seconds=round(record["seconds"], 3)) for sid, record in self.records.items()}
