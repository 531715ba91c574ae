"""Where the paths of a runner config point, decided once, the same way from any working directory.

Rule: an absolute path (``~`` expanded) is used as written. A relative one resolves against
the folder of the config file when a file or folder exists there, else against the working
directory. So a project folder holding ``config.json`` next to ``models/`` runs from anywhere,
and the examples' ``models/...`` paths still work from the repository root. A config given as
a dict (no file) resolves against the working directory. The runner saves the resolved config
(absolute paths) as ``OUTPUT/config.json``, so ``diffsynth run OUTPUT/config.json`` and
``diffsynth status OUTPUT`` work from anywhere.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

DEFAULT_ANNOTATOR_FOLDER = "models/Annotators"


@dataclass(frozen=True)
class PathOrigin:
    """A config path: the key that holds it, as written, the places tried (config folder first) and the one used."""

    key: str
    written: str
    tried: tuple[str, ...]
    resolved: str


def resolve_path(value: str, config_dir: str | None) -> tuple[str, tuple[str, ...]]:
    """``(resolved absolute path, candidates tried)`` by the module's rule."""
    expanded = os.path.expanduser(os.fspath(value))
    if os.path.isabs(expanded):
        return os.path.normpath(expanded), (os.path.normpath(expanded),)
    candidates = []
    if config_dir is not None:
        candidates.append(os.path.normpath(os.path.join(os.path.abspath(config_dir), expanded)))
    cwd = os.path.abspath(expanded)
    if cwd not in candidates:
        candidates.append(cwd)
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate, tuple(candidates)
    return candidates[-1], tuple(candidates)


def _path_slots(config: dict):
    """``(key, container, field)`` for every path a runner config may hold (present and not empty)."""
    models = config.get("models") or {}
    for i, _ in enumerate(models.get("model_list") or []):
        yield f"models.model_list[{i}]", models["model_list"], i
    for name in ("textual_inversion_folder", "annotator_folder"):
        if models.get(name):
            yield f"models.{name}", models, name
    for k, unit in enumerate(models.get("controlnet_units") or []):
        if isinstance(unit, dict) and unit.get("model_path"):
            yield f"models.controlnet_units[{k}].model_path", unit, "model_path"
    data = config.get("data") or {}
    specs = [("data.input_frames", data.get("input_frames"))]
    specs += [(f"data.controlnet_frames[{k}]", spec) for k, spec in enumerate(data.get("controlnet_frames") or [])]
    for key, spec in specs:
        for name in ("video_file", "image_folder"):
            if isinstance(spec, dict) and spec.get(name):
                yield f"{key}.{name}", spec, name
    if data.get("output_folder"):
        yield "data.output_folder", data, "output_folder"
    if isinstance(data.get("audio"), (str, os.PathLike)) and data.get("audio"):
        yield "data.audio", data, "audio"
    for k, entry in enumerate(config.get("smoother_configs") or []):
        options = entry.get("config") if isinstance(entry, dict) else None
        if isinstance(options, dict) and options.get("cache_folder"):
            yield f"smoother_configs[{k}].config.cache_folder", options, "cache_folder"


def resolve_config_paths(config: dict, config_dir: str | None) -> tuple[dict, dict[str, PathOrigin]]:
    """A copy of ``config`` with every path absolute, and where each came from (by config key).

    ``models.annotator_folder`` gets its default (``models/Annotators``) resolved the same way
    when the config does not give one.
    """
    config = copy.deepcopy(config)
    models = config.setdefault("models", {})
    if not models.get("annotator_folder"):
        models["annotator_folder"] = DEFAULT_ANNOTATOR_FOLDER
    origins = {}
    for key, container, field in _path_slots(config):
        written = container[field]
        if not isinstance(written, (str, os.PathLike)):
            raise ValueError(f"{key} must be a path (a string), got {type(written).__name__} {written!r}")
        resolved, tried = resolve_path(written, config_dir)
        container[field] = resolved
        origins[key] = PathOrigin(key, os.fspath(written), tried, resolved)
    return config, origins
