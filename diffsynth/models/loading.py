"""Build a network from a state dict strictly, without needless copies.

The module is created on the ``meta`` device (no memory), the state dict is
checked key by key and shape by shape, and its tensors are *assigned* as the
parameters. Peak RAM while loading is therefore the state dict itself, already
in the target dtype.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import nn

from .errors import ModelFileError

M = TypeVar("M", bound=nn.Module)


def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" … (+{len(items) - n} more)" if len(items) > n else "")


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str, what: str) -> None:
    """Raise ``ModelFileError`` listing missing, unexpected and mis-shaped keys."""
    check_layout({k: tuple(v.shape) for k, v in model.state_dict().items()}, sd, source, what)


def check_layout(
    expected: dict[str, tuple[int, ...]],
    sd: dict[str, torch.Tensor],
    source: str,
    what: str,
    remedy: str = "The file may be truncated, of another model family, or a variant this program does not support.",
    expected_label: str = "model",
) -> None:
    """Strict key/shape check of ``sd`` against ``expected`` shapes; ``ModelFileError`` listing the first offenders."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(
        f"{k} (file {tuple(sd[k].shape)}, {expected_label} {expected[k]})" for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k]
    )
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
        if misshaped:
            parts.append(f"{len(misshaped)} keys with the wrong shape: {_first(misshaped, 3)}")
        raise ModelFileError(source, f"does not hold a complete {what}: " + "; ".join(parts) + ".", remedy)


def infer_config(infer: Callable[[dict], object], sd: dict[str, torch.Tensor], *, source: str, what: str):
    """``infer(sd)``, turning a missing key in an incomplete file into a ``ModelFileError``."""
    try:
        return infer(sd)
    except (KeyError, StopIteration, ValueError, IndexError) as exc:
        raise ModelFileError(
            source,
            f"does not hold a complete {what}: its architecture cannot be read from the weights ({type(exc).__name__}: {exc}).",
            "The file may be truncated or of another model family; download it again or check what it is with `diffsynth info`.",
        ) from exc


def instantiate(
    factory: Callable[[], M], sd: dict[str, torch.Tensor], *, source: str, what: str, device: torch.device | str, dtype: torch.dtype
) -> M:
    """``factory()`` built on the meta device, filled with ``sd`` (strict), moved to ``device``/``dtype``, in eval mode."""
    with torch.device("meta"):
        model = factory()
    check_state_dict(model, sd, source, what)
    sd = {k: (v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.requires_grad_(False)
    return model.to(device=device).eval()
