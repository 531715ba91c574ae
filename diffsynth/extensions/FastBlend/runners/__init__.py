"""FastBlend's modes, streaming from stores: ``fast``, ``balanced``, ``accurate``, ``interpolation``.

Each mode is a function ``*_blend(guide, style, out=None, ...)`` (``interpolate_keyframes`` for
keyframes) that reads frames from stores or sequences and commits result frames to ``out``;
the original's runner classes (``FastModeRunner().run(...)`` etc.) are kept as thin wrappers.
"""
from .accurate import AccurateModeRunner, accurate_blend, accurate_plan
from .balanced import BalancedModeRunner, balanced_blend, balanced_plan
from .common import EngineSettings, RunStats, StoreFrames, derive_seed
from .fast import FastModeRunner, MergingStore, fast_blend, fast_pass, merge_partials
from .fenwick import fast_pass_plan, fenwick_nodes, original_task_list, table_tasks, window_nodes
from .interpolation import (InterpolationModeRunner, InterpolationModeSingleFrameRunner, interpolate_keyframes,
                            interpolation_groups, interpolation_weights, single_keyframe_batches)

__all__ = [
    "EngineSettings",
    "RunStats",
    "StoreFrames",
    "derive_seed",
    "fast_blend",
    "fast_pass",
    "merge_partials",
    "MergingStore",
    "balanced_blend",
    "accurate_blend",
    "interpolate_keyframes",
    "fast_pass_plan",
    "balanced_plan",
    "accurate_plan",
    "fenwick_nodes",
    "window_nodes",
    "table_tasks",
    "original_task_list",
    "interpolation_groups",
    "interpolation_weights",
    "single_keyframe_batches",
    "FastModeRunner",
    "BalancedModeRunner",
    "AccurateModeRunner",
    "InterpolationModeRunner",
    "InterpolationModeSingleFrameRunner",
]
