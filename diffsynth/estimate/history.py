"""The estimates' memory of this machine: calibrations and what earlier runs measured (``<user cache>/estimates.json``).

Keyed by device, models and frame size (:func:`history_key`), it keeps

- ``calibrations``: the per-unit seconds ``diffsynth estimate --calibrate`` measured (reused by later
  estimates of the same key, which then say "calibrated <date>");
- ``runs``: per stage, measured ÷ predicted seconds of the last runs (the factor later predictions are
  multiplied by), with the source the prediction had;
- ``frames``: per model set, the PNG size of a rendered frame ÷ that of a source frame, and the video's
  bytes per frame ÷ a rendered frame's, as measured (rendered frames' compression cannot be known before).

Written atomically; a damaged file is set aside with a warning (it only costs the estimates their history).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time

from ..utils.atomic import atomic_write_text
from ..utils.user_cache import user_cache_dir

logger = logging.getLogger("diffsynth")

HISTORY_FILE = "estimates.json"
_KEEP_RUNS = 8  # runs remembered per key and stage


def history_path() -> str:
    return os.path.join(user_cache_dir(), HISTORY_FILE)


def models_signature(model_list) -> str:
    """The model set, by file name and size (cheap, and stable when the models folder moves)."""
    parts = []
    for path in model_list or []:
        size = os.path.getsize(path) if os.path.isfile(path) else sum(
            os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)
        parts.append(f"{os.path.basename(os.path.normpath(path))}:{size}")
    return "|".join(parts)


def stage_id(stage: int, work: dict) -> str:
    """A stage as the history knows it: its number and the kinds of work in it (a stage smoothing in another mode,
    or with other annotators, is another stage as far as its speed goes)."""
    return f"{stage}:" + ",".join(sorted(unit for unit, count in work.items() if count))


def history_key(device: str, signature: str, width: int, height: int) -> str:
    return f"{device}||{signature}||{width}x{height}"


class History:
    def __init__(self, path: str | None = None):
        self.path = path or history_path()
        self.data = {"calibrations": {}, "runs": {}, "frames": {}}
        if os.path.isfile(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    loaded = json.load(f)
                if not isinstance(loaded, dict):
                    raise ValueError("not a JSON object")
                for section in self.data:
                    self.data[section] = dict(loaded.get(section) or {})
            except (OSError, ValueError) as exc:
                logger.warning("estimate history %s is unreadable (%s): renamed to %s.bad; estimates start without history",
                               self.path, exc, self.path)
                os.replace(self.path, self.path + ".bad")

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True))

    # calibrations
    def calibration(self, key: str) -> dict | None:
        return self.data["calibrations"].get(key)

    def set_calibration(self, key: str, costs: dict[str, float]) -> None:
        self.data["calibrations"][key] = {"costs": costs, "when": time.strftime("%Y-%m-%d %H:%M")}

    # runs
    def stage_factor(self, key: str, stage: str) -> tuple[float, int] | None:
        """Median measured ÷ predicted seconds of ``stage`` (:func:`stage_id`) over the remembered runs, and their number."""
        ratios = [r for r in self.data["runs"].get(key, {}).get(stage, []) if r > 0]
        return (statistics.median(ratios), len(ratios)) if ratios else None

    def add_run(self, key: str, ratios: dict[str, float]) -> None:
        stages = self.data["runs"].setdefault(key, {})
        for stage, ratio in ratios.items():
            kept = stages.setdefault(stage, [])
            kept.append(round(float(ratio), 4))
            del kept[:-_KEEP_RUNS]

    # frames
    def frame_ratios(self, signature: str) -> dict | None:
        return self.data["frames"].get(signature)

    def set_frame_ratios(self, signature: str, ratios: dict[str, float]) -> None:
        self.data["frames"][signature] = {k: round(v, 4) for k, v in ratios.items()}
