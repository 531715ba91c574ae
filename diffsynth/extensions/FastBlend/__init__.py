"""FastBlend deflicker (arXiv 2311.09265): the patch-match engine, the modes (streaming), the standalone entry."""
# modes and the standalone entry
from .runners import (AccurateModeRunner, BalancedModeRunner, EngineSettings, FastModeRunner, InterpolationModeRunner,
                      InterpolationModeSingleFrameRunner, accurate_blend, balanced_blend, fast_blend,
                      interpolate_keyframes)
from .cli import add_fastblend_arguments, run_fastblend
# the patch-match engine (torch backend; the cupy backend is imported only when used)
from .patch_match import PatchMatcher, PyramidPatchMatcher, pairwise_patch_error, patch_error, remap
