"""Kohya/civitai LoRA files: parse them, then merge them into the model weights.

File format (kohya sd-scripts, what civitai serves): for every adapted module
``<prefix><module_path_with_underscores>`` three entries

* ``.lora_down.weight``: ``[rank, in]`` (Linear), ``[rank, in, kh, kw]`` (Conv2d),
* ``.lora_up.weight``: ``[out, rank]`` or ``[out, rank, 1, 1]``,
* ``.alpha``: a scalar (optional; absent means ``alpha = rank``).

Prefixes: ``lora_unet_`` (diffusers UNet module names), ``lora_te_`` (the CLIP
text model, ``text_model.encoder.layers.N...``); SDXL files use ``lora_te1_``
and ``lora_te2_`` for its two text encoders.

Merge (Hu et al. 2021, "LoRA", arXiv 2106.09685; alpha/rank scaling as in kohya):
``W += strength * (alpha / rank) * up @ down``, computed in float32 on the
weight's device. For 3x3 convolutions (LoCon) ``down`` holds the kernel and
``up`` is 1x1, so ``ΔW = (up.flatten(1) @ down.flatten(1)).reshape(W.shape)``.

Deliberate differences from DiffSynth-Studio (upstream_spec §2.8, §12.5): the
file's alpha keys are honoured, text-encoder LoRA is applied, LoCon works, no
device is hard-coded, underscore names are resolved against the model's real
module paths instead of string fix-ups, and a key that resolves to nothing is an
error instead of being dropped. Weights are still changed in place (no unload).
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ModelFileError
from .state_dict import load_state_dict

__all__ = [
    "LORA_PREFIXES",
    "LoRA",
    "LoRAWeight",
    "apply_lora",
    "apply_loras",
    "is_lora_state_dict",
    "load_lora",
    "parse_lora_state_dict",
]

# Key prefix -> model component it adapts. "lora_te_" is SD 1.x/2.x's single text
# encoder; SDXL files name theirs "lora_te1_" (CLIP ViT-L) and "lora_te2_" (OpenCLIP bigG).
LORA_PREFIXES: dict[str, str] = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

_UP = "lora_up.weight"
_DOWN = "lora_down.weight"
_ALPHA = "alpha"

# Suffixes of other adapter kinds (LyCORIS and friends) that share the kohya prefixes.
# Matched so the error can name what the file is instead of "unknown key".
_OTHER_ADAPTERS = {
    "hada_": "LoHa (LyCORIS Hadamard-product adapter)",
    "lokr_": "LoKr (LyCORIS Kronecker-product adapter)",
    "lora_mid.": "LoCon with a Tucker/CP-decomposed kernel (lora_mid)",
    "dora_scale": "DoRA (weight-decomposed LoRA)",
    "diff": "a full weight difference (LyCORIS 'full' / diff)",
    "oft_": "OFT (orthogonal fine-tuning)",
    "ia3": "(IA)^3",
}
_NOT_PLAIN_LORA_REMEDY = (
    "Only plain kohya LoRA/LoCon files (lora_up / lora_down / alpha) are supported; "
    "look for a plain LoRA version of this model on its download page."
)


@dataclass(frozen=True)
class LoRAWeight:
    """One adapted module: ``up [out, rank(, 1, 1)]``, ``down [rank, in(, kh, kw)]``, optional alpha."""

    key: str  # the file's key stem, e.g. "lora_unet_down_blocks_0_attentions_0_proj_in"
    name: str  # the same without the prefix: the module path with "." written as "_"
    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank, or 1 when the file stores no alpha (kohya's default alpha = rank)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self, shape: torch.Size, device: torch.device, strength: float) -> torch.Tensor:
        """``strength * alpha/rank * up @ down`` in float32 on ``device``, shaped like the weight."""
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return ((strength * self.scale) * (up @ down)).reshape(shape)


@dataclass(frozen=True)
class LoRA:
    """A parsed LoRA file: its weights grouped by the model component they adapt.

    Each group maps the underscore module name (key without prefix) to a :class:`LoRAWeight`.
    """

    path: str
    unet: dict[str, LoRAWeight] = field(default_factory=dict)
    text_encoder: dict[str, LoRAWeight] = field(default_factory=dict)
    text_encoder_2: dict[str, LoRAWeight] = field(default_factory=dict)

    def group(self, component: str) -> dict[str, LoRAWeight]:
        return getattr(self, component)

    def __len__(self) -> int:
        return sum(len(self.group(c)) for c in COMPONENTS)


# --------------------------------------------------------------------------- detection and parsing


def is_lora_state_dict(state_dict: Mapping[str, object] | Iterable[str]) -> bool:
    """Fingerprint of a kohya LoRA: every key starts with a kohya prefix; lora_up and lora_down keys exist.

    Accepts a state dict or just its keys (e.g. a safetensors header).
    """
    keys = list(state_dict.keys() if isinstance(state_dict, Mapping) else state_dict)
    if not keys or not all(_split_prefix(k)[0] for k in keys):
        return False
    return any(k.endswith("." + _UP) for k in keys) and any(k.endswith("." + _DOWN) for k in keys)


def load_lora(path: str | os.PathLike) -> LoRA:
    """Read a kohya LoRA file (``.safetensors`` or a weights-only pickle) into a :class:`LoRA`.

    Raises :class:`ModelFileError` (naming the file and key) for keys that are not
    kohya LoRA keys, unpaired up/down weights, inconsistent ranks, or other adapter kinds.
    """
    path = os.fspath(path)
    return parse_lora_state_dict(load_state_dict(path), path)


def parse_lora_state_dict(state_dict: Mapping[str, torch.Tensor], path: str = "<state dict>") -> LoRA:
    """Group a kohya LoRA state dict into a :class:`LoRA`; ``path`` is only used in messages.

    The input mapping is not modified.
    """
    if not state_dict:
        raise ModelFileError(path, "the file holds no tensors, so no LoRA weights.", "Download it again.")
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        stem, suffix = _split_key(path, key)
        entries.setdefault(stem, {})[suffix] = value
    groups: dict[str, dict[str, LoRAWeight]] = {c: {} for c in COMPONENTS}
    for stem in sorted(entries):
        weight = _make_weight(path, stem, entries[stem])
        group = groups[_split_prefix(stem)[1]]
        if weight.name in group:  # "lora_te_x" and "lora_te1_x" both adapt text_encoder.x
            raise ModelFileError(
                path,
                f"keys {group[weight.name].key!r} and {stem!r} adapt the same module.",
                "The file mixes SD 1.x and SDXL text-encoder LoRA naming; it is probably damaged.",
            )
        group[weight.name] = weight
    return LoRA(path=path, **groups)


def _split_prefix(key: str) -> tuple[str, str] | tuple[None, None]:
    for prefix, component in LORA_PREFIXES.items():
        if key.startswith(prefix):
            return prefix, component
    return None, None


def _split_key(path: str, key: str) -> tuple[str, str]:
    """``"lora_unet_x.lora_up.weight"`` -> ``("lora_unet_x", "lora_up.weight")``, or an error."""
    stem, _, suffix = key.partition(".")
    if _split_prefix(stem)[0] is None:
        prefixes = ", ".join(LORA_PREFIXES)
        raise ModelFileError(
            path,
            f"key {key!r} is not a kohya LoRA key (expected it to start with one of {prefixes}).",
            "Is this a LoRA in kohya/civitai format? diffusers-format LoRA folders are not supported; "
            "convert them with kohya's tools.",
        )
    if suffix in (_UP, _DOWN, _ALPHA):
        return stem, suffix
    kind = next((name for marker, name in _OTHER_ADAPTERS.items() if suffix.startswith(marker)), None)
    if kind is not None:
        raise ModelFileError(path, f"key {key!r} belongs to {kind}, not a plain LoRA.", _NOT_PLAIN_LORA_REMEDY)
    raise ModelFileError(
        path,
        f"key {key!r} has the unknown suffix {suffix!r} (expected {_UP!r}, {_DOWN!r} or {_ALPHA!r}).",
        _NOT_PLAIN_LORA_REMEDY,
    )


def _make_weight(path: str, stem: str, parts: dict[str, torch.Tensor]) -> LoRAWeight:
    """Check one module's up/down/alpha entries and bundle them."""
    missing = [s for s in (_UP, _DOWN) if s not in parts]
    if missing:
        raise ModelFileError(
            path,
            f"LoRA module {stem!r} has {sorted(parts)} but no {' / '.join(missing)}.",
            "The file is incomplete or not a LoRA; download it again.",
        )
    up, down = parts[_UP], parts[_DOWN]
    _check_factor_shapes(path, stem, up, down)
    return LoRAWeight(
        key=stem, name=stem[len(_split_prefix(stem)[0]):], up=up, down=down, alpha=_read_alpha(path, stem, parts.get(_ALPHA))
    )


def _check_factor_shapes(path: str, stem: str, up: torch.Tensor, down: torch.Tensor) -> None:
    shapes = f"lora_up {tuple(up.shape)}, lora_down {tuple(down.shape)}"
    if up.dim() not in (2, 4) or down.dim() not in (2, 4):
        raise ModelFileError(path, f"LoRA module {stem!r} has factors of unexpected rank ({shapes}).", _NOT_PLAIN_LORA_REMEDY)
    if up.shape[1] != down.shape[0]:
        raise ModelFileError(
            path,
            f"LoRA module {stem!r}: lora_up has {up.shape[1]} input columns but lora_down has rank {down.shape[0]} ({shapes}).",
            "The file is corrupt; download it again.",
        )
    if any(d != 1 for d in up.shape[2:]):
        raise ModelFileError(
            path, f"LoRA module {stem!r}: lora_up must be a 1x1 kernel ({shapes}).", _NOT_PLAIN_LORA_REMEDY
        )


def _read_alpha(path: str, stem: str, alpha: torch.Tensor | None) -> float | None:
    if alpha is None:
        return None
    if alpha.numel() != 1:
        raise ModelFileError(
            path, f"{stem}.alpha should be a scalar but has shape {tuple(alpha.shape)}.", "The file is corrupt; download it again."
        )
    value = float(alpha.reshape(()).item())
    if not math.isfinite(value):
        raise ModelFileError(path, f"{stem}.alpha is {value}.", "The file is corrupt; download it again.")
    return value


# --------------------------------------------------------------------------- applying


@dataclass(frozen=True)
class _Patch:
    """One planned merge: the parameter to change and the LoRA weight that changes it."""

    name: str  # "<component>.<parameter name>"
    parameter: nn.Parameter
    weight: LoRAWeight


def apply_lora(
    lora: LoRA,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    strength: float = 1.0,
    unet_module_map: Mapping[str, str] | None = None,
    text_encoder_2: nn.Module | None = None,
) -> list[str]:
    """Merge ``lora`` into the given models' weights, in place; return the touched parameters.

    * ``strength`` multiplies every ΔW (DiffSynth-Studio's per-file "lora alpha").
    * ``unet_module_map`` maps diffusers module paths to this UNet's (LDM) module paths;
      by default it is generated from ``unet.config``. UNet keys written with LDM
      module paths (``lora_unet_input_blocks_1_1_proj_in``) are accepted too.
    * Every LoRA group present in the file needs its model: a file with text-encoder
      weights and no ``text_encoder`` is an error, never a silent partial merge.
    * All keys are resolved and shape-checked before any weight changes, so an
      error leaves the models untouched. ``lora`` itself is not modified.

    Returned names are ``"unet.<param>"``, ``"text_encoder.<param>"``, ``"text_encoder_2.<param>"``
    in merge order, each once.
    """
    strength = _check_strength(strength)
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    if all(m is None for m in models.values()):
        raise ValueError("apply_lora needs at least one model (unet=, text_encoder=, text_encoder_2=)")
    patches: list[_Patch] = []
    for component in COMPONENTS:
        group = lora.group(component)
        if not group:
            continue
        model = models[component]
        if model is None:
            raise ValueError(
                f"{lora.path}: the LoRA has {len(group)} {component} weights (e.g. {next(iter(group.values())).key!r}) "
                f"but no {component} was passed to apply_lora; pass {component}=... so the LoRA is applied whole"
            )
        index = _module_index(component, model, unet_module_map)
        patches += [_plan_patch(lora.path, component, model, index, w) for w in group.values()]
    with torch.no_grad():
        for patch in patches:
            _merge(patch, strength)
    return list(dict.fromkeys(p.name for p in patches))


def apply_loras(
    loras: Sequence[LoRA | str | os.PathLike],
    strengths: float | Sequence[float] = 1.0,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    unet_module_map: Mapping[str, str] | None = None,
    text_encoder_2: nn.Module | None = None,
) -> list[str]:
    """Apply several LoRAs (parsed, or paths) with one strength each (or one for all).

    The caller's sequences are only read (upstream consumed its ``lora_alphas`` list with
    ``pop``, losing the values for the saved config). Returns the touched parameter names.
    """
    loras = list(loras)
    strengths = [strengths] * len(loras) if isinstance(strengths, numbers.Real) else list(strengths)
    if len(strengths) != len(loras):
        raise ValueError(f"got {len(loras)} LoRAs but {len(strengths)} strengths; give one strength per LoRA")
    touched: dict[str, None] = {}
    for item, strength in zip(loras, strengths):
        lora = item if isinstance(item, LoRA) else load_lora(item)
        names = apply_lora(lora, unet, text_encoder, strength, unet_module_map, text_encoder_2)
        touched.update(dict.fromkeys(names))
    return list(touched)


def _check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength):
        raise ValueError(f"LoRA strength must be a finite number (1.0 = as trained), got {strength!r}")
    return float(strength)


def _module_index(component: str, model: nn.Module, unet_module_map: Mapping[str, str] | None) -> dict[str, set[str]]:
    """``{module path with "_" for ".": {module paths}}`` for every module of ``model``.

    Kohya names cannot be turned back into paths by replacing "_" (module names such as
    ``to_q``, ``proj_in``, ``self_attn`` contain underscores); matching against the
    model's real paths in underscore form resolves them without guessing. A set with
    more than one path marks a name that is ambiguous for this model.
    """
    pairs = [(path, path) for path, _ in model.named_modules() if path]
    if component == "unet":
        if unet_module_map is None:
            from .convert import unet_module_map as build_map  # noqa: PLC0415 (sibling module, imported when needed)

            unet_module_map = build_map(model.config)
        pairs += list(unet_module_map.items())
    index: dict[str, set[str]] = {}
    for source, target in pairs:
        index.setdefault(source.replace(".", "_"), set()).add(target)
    return index


def _plan_patch(path: str, component: str, model: nn.Module, index: dict[str, set[str]], weight: LoRAWeight) -> _Patch:
    targets = index.get(weight.name)
    if not targets:
        close = difflib.get_close_matches(weight.name, list(index), n=3)
        hint = f" Closest module names of this model: {close}." if close else ""
        raise ModelFileError(
            path,
            f"LoRA key {weight.key!r} names a {component} module {weight.name!r} that this model does not have.{hint}",
            "Is the LoRA made for another model family (SDXL, SD 2.x) than the one loaded?",
        )
    if len(targets) > 1:
        raise ModelFileError(
            path, f"LoRA key {weight.key!r} matches several {component} modules: {sorted(targets)}.", "Please report this as a bug."
        )
    (module_path,) = targets
    module = _get_module(path, model, module_path, weight.key)
    parameter = getattr(module, "weight", None)
    if not isinstance(parameter, torch.Tensor) or parameter.dim() not in (2, 4):
        raise ModelFileError(
            path,
            f"LoRA key {weight.key!r} targets {component} module {module_path!r} ({type(module).__name__}), "
            "which is not a Linear or Conv2d layer.",
            "The LoRA does not fit this model.",
        )
    _check_fits(path, weight, module_path, parameter)
    return _Patch(name=f"{component}.{module_path}.weight", parameter=parameter, weight=weight)


def _get_module(path: str, model: nn.Module, module_path: str, key: str) -> nn.Module:
    try:
        return model.get_submodule(module_path)
    except AttributeError as exc:
        raise ModelFileError(
            path,
            f"LoRA key {key!r} maps to module {module_path!r}, which the model lacks.",
            "The UNet module map does not match this UNet's config; please report this as a bug.",
        ) from exc


def _check_fits(path: str, weight: LoRAWeight, module_path: str, parameter: torch.Tensor) -> None:
    """The factors must produce a ΔW of the parameter's shape.

    Linear ``[out, in]``: down ``[r, in]`` (or ``[r, in, 1, 1]``). Conv ``[out, in, kh, kw]``:
    down ``[r, in, kh, kw]``, or ``[r, in]`` for a 1x1 kernel (a linear LoRA on a 1x1 conv).
    """
    up, down = weight.up, weight.down
    kernel = tuple(parameter.shape[2:])
    down_kernel = tuple(down.shape[2:])
    kernels_agree = down_kernel == kernel or (all(k == 1 for k in kernel) and all(k == 1 for k in down_kernel))
    if up.shape[0] != parameter.shape[0] or down.shape[1] != parameter.shape[1] or not kernels_agree:
        raise ModelFileError(
            path,
            f"LoRA key {weight.key!r} does not fit {module_path}.weight {tuple(parameter.shape)}: "
            f"lora_up {tuple(up.shape)}, lora_down {tuple(down.shape)}.",
            "Is the LoRA made for another model family (SDXL, SD 2.x) than the one loaded?",
        )


def _merge(patch: _Patch, strength: float) -> None:
    """W <- cast(float32(W) + ΔW): one rounding to the weight's dtype, on the weight's device."""
    param = patch.parameter
    delta = patch.weight.delta(param.shape, param.device, strength)
    param.copy_((param.to(torch.float32) + delta).to(param.dtype))
