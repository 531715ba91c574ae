"""RIFE frame interpolation and smoothing (the ``flownet.pkl`` IFNet, RIFE v3.x HD).

* :class:`IFNet` (+ :class:`IFNetConfig`): the network; :func:`load_rife_model` /
  :func:`build_rife_model` / :func:`load_rife_state_dict` read ``models/RIFE/flownet.pkl``
  strictly, in fp32; ``rife_fingerprint`` holds the key patterns that identify the file.
* :class:`RIFEInterpolater`: ``interpolate(frames, scale=1.0, batch_size=4, num_iter=1)``.
* :class:`RIFESmoother`: one smoothing pass, first and last frames unchanged.

Frames are PIL images (any sequence: list, store, ``VideoData``); results are lazy sequences or
go to a store, so a long video never sits in memory. Any frame size works: frames are padded to
the sizes IFNet needs and cropped back (see :mod:`.frames`).
"""
from .frames import SCALES, pad_multiple
from .ifnet import IFBlock, IFNet, IFNetConfig, warp
from .interpolate import InterpolatedFrames, RIFEInterpolater
from .loading import (
    RIFE_FILE,
    RIFE_URL,
    build_rife_model,
    convert_rife_state_dict,
    infer_rife_config,
    load_rife_model,
    load_rife_state_dict,
    rife_fingerprint,
    rife_from_model_manager,
)
from .smoother import RIFESmoother, SmoothedFrames

__all__ = [
    "IFNet",
    "IFNetConfig",
    "IFBlock",
    "warp",
    "SCALES",
    "pad_multiple",
    "RIFE_FILE",
    "RIFE_URL",
    "rife_fingerprint",
    "convert_rife_state_dict",
    "infer_rife_config",
    "load_rife_state_dict",
    "build_rife_model",
    "load_rife_model",
    "rife_from_model_manager",
    "RIFEInterpolater",
    "InterpolatedFrames",
    "RIFESmoother",
    "SmoothedFrames",
]
