"""LoRA files (kohya/civitai, diffusers and PEFT layouts): parse them, then merge them into the model weights.

Every layout stores, for each adapted module, a ``down`` factor ``[rank, in]`` (Linear) or
``[rank, in, kh, kw]`` (Conv2d), an ``up`` factor ``[out, rank]`` or ``[out, rank, 1, 1]``,
and optionally an alpha (absent means ``alpha = rank``, i.e. scale 1). They differ in names:

* **kohya** (sd-scripts, what civitai serves; also the LCM-LoRA scripts' export
  ``get_module_kohya_state_dict`` in diffusers' ``examples/consistency_distillation`` and
  AnimateLCM's ``AnimateLCM_sd15_t2v_lora.safetensors``, which AnimateLCM's own loader reads as
  ``lora_unet_*.lora_down.weight``): ``<prefix><module path with "_" for ".">`` +
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``. Prefixes ``lora_unet_``,
  ``lora_te_`` (SD 1.x text encoder), ``lora_te1_`` / ``lora_te2_`` (SDXL's two).
* **PEFT**, as diffusers' ``save_lora_weights`` writes a ``get_peft_model_state_dict``:
  ``<component>.<module path>.lora_A.weight`` (down) / ``.lora_B.weight`` (up), components
  ``unet``, ``text_encoder``, ``text_encoder_2``. No alpha in the tensors; diffusers ≥ 0.35 keeps
  PEFT's ``lora_alpha`` in the safetensors ``__metadata__`` (``lora_adapter_metadata``, JSON with
  ``"unet.lora_alpha"``, ``"unet.r"``, …), which is honoured.
* **diffusers** (``convert_state_dict_to_diffusers`` of a PEFT state dict, as the current
  LCM-LoRA SDXL script saves): the PEFT names with ``to_q/to_k/to_v/to_out.0 .lora.down/.lora.up``
  in the UNet and ``q_proj/k_proj/v_proj/out_proj .lora_linear_layer.down/.up`` in text
  encoders (diffusers' ``PEFT_TO_DIFFUSERS`` table); the other modules keep ``lora_A``/``lora_B``.
  A ``<component>.<module path>.alpha`` tensor (diffusers' ``network_alphas`` naming) is read as
  the alpha.

UNet module paths are diffusers names (``down_blocks.0.attentions.0.proj_in``) or, in kohya
SDXL files, LDM names (``input_blocks.4.1.proj_in``); text-encoder paths are Hugging Face CLIP
names (``text_model.encoder.layers.0.self_attn.q_proj``).

Merge (Hu et al. 2021, "LoRA", arXiv 2106.09685; alpha/rank scaling as in kohya and PEFT):
``W += strength * (alpha / rank) * up @ down``, computed in float32 on the
weight's device. For 3x3 convolutions (LoCon) ``down`` holds the kernel and
``up`` is 1x1, so ``ΔW = (up.flatten(1) @ down.flatten(1)).reshape(W.shape)``.

Deliberate differences from DiffSynth-Studio (upstream_spec §2.8, §12.5): the
file's alpha keys are honoured, text-encoder LoRA is applied, LoCon works, no
device is hard-coded, module names are resolved against the model's real
module paths instead of string fix-ups, and a key that resolves to nothing is an
error instead of being dropped. Weights are still changed in place (no unload).
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ModelFileError
from .state_dict import FORMAT_SAFETENSORS, detect_file_format, load_state_dict, read_safetensors_metadata

__all__ = [
    "DOTTED_PREFIXES",
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
# The diffusers/PEFT layouts: "<component>." in front of a dotted module path (diffusers'
# save_lora_weights packs each component's layers under its pipeline attribute name).
DOTTED_PREFIXES: dict[str, str] = {
    "unet.": "unet",
    "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2",
}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

_UP = "lora_up.weight"
_DOWN = "lora_down.weight"
_ALPHA = "alpha"
_KOHYA_PARTS = {_UP: "up", _DOWN: "down", _ALPHA: "alpha"}
# Suffix after the dotted module path -> factor. The last two entries rename the module
# itself, so the part of the suffix before ".lora" stays in the path.
_DOTTED_PARTS = {
    "lora_A.weight": "down",  # PEFT
    "lora_B.weight": "up",
    "lora.down.weight": "down",  # diffusers LoRALinearLayer / LoRAConv2dLayer (PEFT_TO_DIFFUSERS: to_q/k/v/out.0)
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",  # diffusers text encoders (q/k/v/out_proj)
    "lora_linear_layer.up.weight": "up",
    "alpha": "alpha",  # diffusers network_alphas naming
}
# diffusers' metadata key (diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY).
_ADAPTER_METADATA = "lora_adapter_metadata"

# Suffixes of other adapter kinds (LyCORIS and friends) that share the kohya prefixes.
# Matched so the error can name what the file is instead of "unknown key".
_OTHER_ADAPTERS = {
    "hada_": "LoHa (LyCORIS Hadamard-product adapter)",
    "lokr_": "LoKr (LyCORIS Kronecker-product adapter)",
    "lora_mid.": "LoCon with a Tucker/CP-decomposed kernel (lora_mid)",
    "dora_scale": "DoRA (weight-decomposed LoRA)",
    "lora_magnitude_vector": "DoRA (weight-decomposed LoRA)",
    "diff": "a full weight difference (LyCORIS 'full' / diff)",
    "oft_": "OFT (orthogonal fine-tuning)",
    "ia3": "(IA)^3",
}
_NOT_PLAIN_LORA_REMEDY = (
    "Only plain LoRA/LoCon files (kohya lora_up / lora_down / alpha, or diffusers/PEFT lora_A / lora_B) "
    "are supported; look for a plain LoRA version of this model on its download page."
)


@dataclass(frozen=True)
class LoRAWeight:
    """One adapted module: ``up [out, rank(, 1, 1)]``, ``down [rank, in(, kh, kw)]``, optional alpha."""

    key: str  # the file's key stem: "lora_unet_down_blocks_0_attentions_0_proj_in" or "unet.down_blocks.0.attentions.0.proj_in"
    name: str  # the module path without the prefix, with "." written as "_"
    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank, or 1 when the file stores no alpha (kohya's default alpha = rank; PEFT without an alpha)."""
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


@dataclass(frozen=True)
class _Key:
    """What one file key is: which module of which component, and which part of its LoRA."""

    stem: str  # the key without its part suffix (shown in messages)
    component: str
    name: str  # module path with "_" for "."
    part: str  # "up", "down" or "alpha"
    dotted: bool  # a diffusers/PEFT key (its alpha may come from the file's metadata)


# --------------------------------------------------------------------------- detection and parsing


def is_lora_state_dict(state_dict: Mapping[str, object] | Iterable[str]) -> bool:
    """Fingerprint of a LoRA: every key is a LoRA key of one of the layouts; up and down factors exist.

    Accepts a state dict or just its keys (e.g. a safetensors header).
    """
    keys = list(state_dict.keys() if isinstance(state_dict, Mapping) else state_dict)
    parsed = [_classify(k) for k in keys]
    if not keys or any(p is None for p in parsed):
        return False
    parts = {p.part for p in parsed}
    return {"up", "down"} <= parts


def load_lora(path: str | os.PathLike) -> LoRA:
    """Read a LoRA file (``.safetensors`` or a weights-only pickle) into a :class:`LoRA`.

    A safetensors file's ``__metadata__`` is read for diffusers' ``lora_adapter_metadata``
    (the PEFT alpha of diffusers/PEFT-layout files). Raises :class:`ModelFileError` (naming
    the file and key) for keys that are not LoRA keys, unpaired up/down weights,
    inconsistent ranks, or other adapter kinds.
    """
    path = os.fspath(path)
    state_dict = load_state_dict(path)
    metadata = read_safetensors_metadata(path) if detect_file_format(path) == FORMAT_SAFETENSORS else {}
    return parse_lora_state_dict(state_dict, path, metadata=metadata)


def parse_lora_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str = "<state dict>", *, metadata: Mapping[str, str] | None = None
) -> LoRA:
    """Group a LoRA state dict (any supported layout) into a :class:`LoRA`; ``path`` is only used in messages.

    ``metadata``: the file's safetensors ``__metadata__``; its ``lora_adapter_metadata``
    gives the alpha of diffusers/PEFT-layout weights that carry no ``.alpha`` tensor.
    The input mapping is not modified.
    """
    if not state_dict:
        raise ModelFileError(path, "the file holds no tensors, so no LoRA weights.", "Download it again.")
    peft_alphas = _metadata_alphas(path, metadata or {})
    entries: dict[str, tuple[_Key, dict[str, tuple[str, torch.Tensor]]]] = {}
    for key, value in state_dict.items():
        info = _parse_key(path, key)
        _, parts = entries.setdefault(info.stem, (info, {}))
        if info.part in parts:
            raise ModelFileError(
                path,
                f"keys {parts[info.part][0]!r} and {key!r} both hold the {info.part} factor of {info.stem!r}.",
                "The file mixes two LoRA layouts for one module; it is probably damaged.",
            )
        parts[info.part] = (key, value)
    groups: dict[str, dict[str, LoRAWeight]] = {c: {} for c in COMPONENTS}
    for stem in sorted(entries):
        info, parts = entries[stem]
        weight = _make_weight(path, info, {part: value for part, (_, value) in parts.items()}, peft_alphas)
        group = groups[info.component]
        if weight.name in group:  # "lora_te_x" and "lora_te1_x" (or "text_encoder.x") all adapt text_encoder.x
            raise ModelFileError(
                path,
                f"keys {group[weight.name].key!r} and {stem!r} adapt the same module.",
                "The file mixes two LoRA namings (SD 1.x and SDXL, or kohya and diffusers) for one module; it is probably damaged.",
            )
        group[weight.name] = weight
    return LoRA(path=path, **groups)


def _kohya_prefix(key: str) -> tuple[str, str] | tuple[None, None]:
    for prefix, component in LORA_PREFIXES.items():
        if key.startswith(prefix):
            return prefix, component
    return None, None


def _dotted_prefix(key: str) -> tuple[str, str] | tuple[None, None]:
    for prefix in sorted(DOTTED_PREFIXES, key=len, reverse=True):  # "text_encoder_2." before "text_encoder."
        if key.startswith(prefix):
            return prefix, DOTTED_PREFIXES[prefix]
    return None, None


def _classify(key: str) -> _Key | None:
    """The :class:`_Key` of a LoRA key of any supported layout, or None."""
    prefix, component = _kohya_prefix(key)
    if prefix is not None:
        stem, _, suffix = key.partition(".")
        part = _KOHYA_PARTS.get(suffix)
        return None if part is None else _Key(stem, component, stem[len(prefix):], part, dotted=False)
    prefix, component = _dotted_prefix(key)
    if prefix is None:
        return None
    for suffix, part in _DOTTED_PARTS.items():
        if key.endswith("." + suffix) and len(key) > len(prefix) + len(suffix) + 1:
            stem = key[: -len(suffix) - 1]
            return _Key(stem, component, stem[len(prefix):].replace(".", "_"), part, dotted=True)
    return None


def _parse_key(path: str, key: str) -> _Key:
    """The :class:`_Key` of ``key``, or an error that says what the key is instead."""
    info = _classify(key)
    if info is not None:
        return info
    kohya, _ = _kohya_prefix(key)
    dotted, _ = _dotted_prefix(key)
    if kohya is None and dotted is None:
        hint = (
            " It looks like a PEFT training checkpoint (base_model.model.…), whose alpha is kept in adapter_config.json."
            if "base_model.model." in key
            else ""
        )
        raise ModelFileError(
            path,
            f"key {key!r} is not a LoRA key (expected a kohya key starting with one of {', '.join(LORA_PREFIXES)} "
            f"or a diffusers/PEFT key starting with one of {', '.join(DOTTED_PREFIXES)}).{hint}",
            "Is this a LoRA file? Export it as a diffusers LoRA (pipeline.save_lora_weights) or a kohya LoRA.",
        )
    pieces = key.split(".")
    tails = [key.partition(".")[2]] if kohya is not None else [".".join(pieces[-2:]), pieces[-1]]
    kind = next((name for marker, name in _OTHER_ADAPTERS.items() if any(t.startswith(marker) for t in tails)), None)
    if kind is not None:
        raise ModelFileError(path, f"key {key!r} belongs to {kind}, not a plain LoRA.", _NOT_PLAIN_LORA_REMEDY)
    expected = [_UP, _DOWN, _ALPHA] if kohya is not None else list(_DOTTED_PARTS)
    raise ModelFileError(
        path,
        f"key {key!r} has an unknown suffix (expected one of {', '.join(repr(s) for s in expected)}).",
        _NOT_PLAIN_LORA_REMEDY,
    )


def _metadata_alphas(path: str, metadata: Mapping[str, str]) -> dict[str, tuple[float, int, bool]]:
    """``{component: (lora_alpha, r, has a rank_pattern)}`` from diffusers' ``lora_adapter_metadata``
    (the PEFT ``LoraConfig`` fields of each component, as ``"unet.lora_alpha"``, ``"unet.r"``, …).

    PEFT scales by ``lora_alpha / r``; per-module ``alpha_pattern`` entries, rsLoRA
    (``alpha / sqrt(r)``) and DoRA are refused rather than merged with a wrong scale.
    """
    raw = metadata.get(_ADAPTER_METADATA)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise ModelFileError(path, f"its {_ADAPTER_METADATA} metadata is not JSON ({exc}).", "The file is corrupt; download it again.") from exc
    if not isinstance(config, dict):
        raise ModelFileError(path, f"its {_ADAPTER_METADATA} metadata is not a JSON object.", "The file is corrupt; download it again.")
    alphas = {}
    for component in COMPONENTS:
        alpha, rank = config.get(f"{component}.lora_alpha"), config.get(f"{component}.r")
        if alpha is None:
            continue
        refused = [name for name in ("alpha_pattern", "use_rslora", "use_dora") if config.get(f"{component}.{name}")]
        if refused:
            raise ModelFileError(
                path,
                f"its PEFT settings for the {component} use {', '.join(refused)}, which this loader does not implement.",
                "Use a plain LoRA (one lora_alpha per component), or merge it into the model with diffusers and load that.",
            )
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or not isinstance(rank, int):
            raise ModelFileError(
                path, f"its {component}.lora_alpha / {component}.r metadata ({alpha!r}, {rank!r}) are not numbers.", "The file is corrupt; download it again."
            )
        alphas[component] = (float(alpha), rank, bool(config.get(f"{component}.rank_pattern")))
    return alphas


def _make_weight(path: str, info: _Key, parts: dict[str, torch.Tensor], peft_alphas: Mapping[str, tuple]) -> LoRAWeight:
    """Check one module's up/down/alpha entries and bundle them."""
    missing = [s for s in ("up", "down") if s not in parts]
    if missing:
        names = {"up": "lora_B.weight", "down": "lora_A.weight"} if info.dotted else {"up": _UP, "down": _DOWN}
        raise ModelFileError(
            path,
            f"LoRA module {info.stem!r} has {sorted(parts)} but no {' / '.join(missing)} factor "
            f"({', '.join(f'{info.stem}.{names[m]}' for m in missing)}).",
            "The file is incomplete or not a LoRA; download it again.",
        )
    up, down = parts["up"], parts["down"]
    _check_factor_shapes(path, info.stem, up, down)
    alpha = _read_alpha(path, info.stem, parts.get("alpha"))
    if alpha is None and info.dotted and info.component in peft_alphas:
        alpha, rank, rank_pattern = peft_alphas[info.component]
        if not rank_pattern and rank != down.shape[0]:
            raise ModelFileError(
                path,
                f"its metadata gives the {info.component} LoRA rank {rank}, but {info.stem!r} has rank {down.shape[0]}.",
                "The file is inconsistent; download it again.",
            )
    return LoRAWeight(key=info.stem, name=info.name, up=up, down=down, alpha=alpha)


def _check_factor_shapes(path: str, stem: str, up: torch.Tensor, down: torch.Tensor) -> None:
    shapes = f"up {tuple(up.shape)}, down {tuple(down.shape)}"
    if up.dim() not in (2, 4) or down.dim() not in (2, 4):
        raise ModelFileError(path, f"LoRA module {stem!r} has factors of unexpected rank ({shapes}).", _NOT_PLAIN_LORA_REMEDY)
    if up.shape[1] != down.shape[0]:
        raise ModelFileError(
            path,
            f"LoRA module {stem!r}: the up factor has {up.shape[1]} input columns but the down factor has rank {down.shape[0]} ({shapes}).",
            "The file is corrupt; download it again.",
        )
    if any(d != 1 for d in up.shape[2:]):
        raise ModelFileError(
            path, f"LoRA module {stem!r}: the up factor must be a 1x1 kernel ({shapes}).", _NOT_PLAIN_LORA_REMEDY
        )


def _read_alpha(path: str, stem: str, alpha: torch.Tensor | None) -> float | None:
    if alpha is None:
        return None
    if alpha.numel() != 1:
        raise ModelFileError(
            path, f"{stem}.alpha should be a scalar but has shape {tuple(alpha.shape)}.", "The file is corrupt; download it again."
        )
    if alpha.is_meta:  # models built from headers alone (estimates): the merge only has to keep the shapes
        return None
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
    model's real paths in underscore form resolves them without guessing. Dotted
    (diffusers/PEFT) paths are matched in the same form, so every layout resolves alike. A
    set with more than one path marks a name that is ambiguous for this model.
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
