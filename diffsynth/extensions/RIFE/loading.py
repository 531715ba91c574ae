"""Reading ``flownet.pkl``: key conversion (a pure function), strict checking, fp32 always.

The published file is a flat ``{key: tensor}`` pickle whose keys carry the ``module.`` prefix of
``DistributedDataParallel`` (``module.block0.conv0.0.0.weight``). It is read like every other model
file, with ``torch.load(weights_only=True)`` (:func:`diffsynth.models.state_dict.load_state_dict`).
"""
from __future__ import annotations

import os

import torch

from ...models.errors import ModelFileError
from ...models.loading import check_state_dict, infer_config, instantiate
from ...models.state_dict import load_state_dict
from .ifnet import IFNet, IFNetConfig

__all__ = [
    "RIFE_FILE",
    "RIFE_URL",
    "rife_fingerprint",
    "convert_rife_state_dict",
    "infer_rife_config",
    "load_rife_state_dict",
    "build_rife_model",
    "load_rife_model",
    "rife_from_model_manager",
]

RIFE_FILE = "models/RIFE/flownet.pkl"
RIFE_URL = "https://drive.google.com/file/d/1APIzVeI-4ZZCEuIRE1m6WYfSCaOsi_7_/view?usp=sharing"

# Required key patterns for ModelManager detection (all must match). The teacher block's key is
# the sentinel DiffSynth-Studio used; the student key guards against a lone teacher.
rife_fingerprint: tuple[str, ...] = (
    r"^(module\.)?block_tea\.convblock3\.0\.1\.weight$",
    r"^(module\.)?block0\.conv0\.0\.0\.weight$",
)

_PREFIX = "module."
_WHAT = "RIFE IFNet (flownet.pkl)"


def convert_rife_state_dict(sd: dict[str, torch.Tensor], source: str | os.PathLike = "<state dict>") -> dict[str, torch.Tensor]:
    """``sd`` with the leading ``module.`` removed from every key (keys without it are kept as they are).

    A key present both with and without the prefix is ambiguous: ``ModelFileError`` naming ``source``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if name in out:
            raise ModelFileError(
                source,
                f"holds {name!r} both with and without the {_PREFIX!r} prefix.",
                "A RIFE file holds one copy of each weight; download flownet.pkl again.",
            )
        out[name] = value
    return out


def infer_rife_config(sd: dict[str, torch.Tensor]) -> IFNetConfig:
    """The IFNet shape of a converted state dict (the width is the second stem conv's output channels)."""
    return IFNetConfig(width=int(sd["block0.conv0.1.0.weight"].shape[0]))


def load_rife_state_dict(sd: dict[str, torch.Tensor], source: str | os.PathLike = "<state dict>") -> dict[str, torch.Tensor]:
    """The IFNet weights in ``sd`` (as read from ``flownet.pkl``): prefix stripped, checked, fp32.

    Every key and shape must match :class:`IFNet`; otherwise ``ModelFileError`` naming ``source``
    and listing the missing, unexpected and mis-shaped keys.
    """
    sd = convert_rife_state_dict(sd, source)
    source = os.fspath(source)
    config = infer_config(infer_rife_config, sd, source=source, what=_WHAT)
    with torch.device("meta"):
        reference = IFNet(config)
    check_state_dict(reference, sd, source, _WHAT)
    return {k: v.to(torch.float32) if v.dtype != torch.float32 else v for k, v in sd.items()}


def build_rife_model(
    sd: dict[str, torch.Tensor], *, source: str | os.PathLike = "<state dict>", device: str | torch.device = "cpu"
) -> IFNet:
    """An :class:`IFNet` in eval mode on ``device``, always in fp32 (IFNet breaks in half precision)."""
    sd = load_rife_state_dict(sd, source)
    config = infer_rife_config(sd)
    return instantiate(lambda: IFNet(config), sd, source=os.fspath(source), what=_WHAT, device=device, dtype=torch.float32)


def load_rife_model(path: str | os.PathLike = RIFE_FILE, device: str | torch.device = "cpu") -> IFNet:
    """Read ``flownet.pkl`` (``weights_only=True``) and build the model; a missing file names the download."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"RIFE model file {os.path.abspath(path)} not found. Download flownet.pkl from {RIFE_URL} and put it there.")
    return build_rife_model(load_state_dict(path), source=path, device=device)


def rife_from_model_manager(model_manager, needed_by: str = "RIFE") -> IFNet:
    """``model_manager.RIFE``, or a ``ValueError`` saying which file to load."""
    model = getattr(model_manager, "RIFE", None)
    if model is None:
        raise ValueError(
            f"{needed_by} needs the RIFE model, but the model manager has none loaded. "
            f"Load {RIFE_FILE} first (model_manager.load_models([{RIFE_FILE!r}, ...])); download it from {RIFE_URL}"
        )
    return model
