"""Depth annotator: MiDaS DPT-hybrid, as controlnet_aux 0.0.7's ``MidasDetector``.

Network. We run transformers' ``DPTForDepthEstimation`` (hybrid config: BiT
ResNet-50 stem/stages + ViT-B/16 + DPT decoder) rather than a copy of MiDaS/timm:
it is the same architecture, maintained, and transformers itself converted this
checkpoint into ``Intel/dpt-hybrid-midas``. Our part is the key converter
(:mod:`.midas_convert`, pure and rule-generated) and the forward orchestration
below. Equivalence with MiDaS was checked piece by piece (and is pinned by a test
that runs an independent functional MiDaS forward on the original keys):

* weight-standardised convs with eps 1e-8 and TF "SAME" padding, GroupNorm(32),
  ResNetV2 non-preact bottlenecks with the stride in conv2: identical to timm's
  ``vit_base_resnet50_384`` backbone (timm >= 0.4.10; the 2021 timm MiDaS was
  trained with may have used another standardisation eps, a ~1e-4 relative effect);
* the stem max pool pads with 0 in transformers and -inf in timm: equal, since it
  follows a ReLU;
* ViT blocks, "project" readout, reassemble/fusion and head: identical; LayerNorm
  eps is set to timm's 1e-6 for converted files.

What differs is handled here: transformers' hybrid forward refuses any input size
other than ``config.image_size`` (384) and its neck assumes square token grids for
hybrid models, while MiDaS (and so DiffSynth) runs at the detection resolution,
any multiple of 32, landscape or portrait, with the position embedding resized
bilinearly (``align_corners=False``). :func:`dpt_depth` therefore calls the
transformers modules in order itself, with MiDaS's position-embedding resize.

Pre/post-processing = ``MidasDetector.__call__`` between its two ``resize_image``
calls: RGB ``x / 127.5 - 1`` at the detection size (no MiDaS 384 resize, no
ImageNet mean/std), ``d -= d.min(); d /= d.max()`` on the device, then
``(d * 255).clip(0, 255).astype(uint8)`` (truncation). The normal-map branch
(``a``, ``bg_th``, ``depth_and_normal``) is not ported: DiffSynth never used it.
Differences: the map is computed in float32 whatever the model dtype; a constant
prediction gives an all-zero map (controlnet_aux divided by zero).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from ...models.errors import ModelFileError
from ...models.loading import check_layout, infer_config, instantiate
from ...models.state_dict import load_state_dict
from .base import require_annotator_file
from .midas_convert import (
    PATCH,
    MidasHybridConfig,
    convert_midas_state_dict,
    infer_midas_config,
    is_midas_hybrid,
    midas_layout,
    to_dpt_config,
)

__all__ = ["DepthDetector", "MIDAS_FILENAME", "depth_to_uint8", "dpt_depth", "resize_position_embedding", "find_transformers_dpt_folder"]

MIDAS_FILENAME = "dpt_hybrid-midas-501f0c75.pt"
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


# --------------------------------------------------------------------------- forward


def resize_position_embedding(pos: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(1, 1 + g*g, C) ViT position embedding -> (1, 1 + grid_h*grid_w, C), as MiDaS ``_resize_pos_embed``.

    The class-token entry is kept; the square grid is resized bilinearly
    (``align_corners=False``), which is the identity when the size is unchanged.
    """
    token, grid = pos[:, :1], pos[0, 1:]
    side = int(round(grid.shape[0] ** 0.5))
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
    return torch.cat([token, grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], dim=1)


def dpt_depth(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Relative inverse depth ``(b, h, w)`` of a transformers DPT at any size that is a multiple of 32.

    ``model`` is a ``DPTForDepthEstimation`` with a hybrid (BiT) or plain ViT
    embedding. Follows transformers' own forward, except that the hybrid position
    embedding is resized to the input and the token grid may be non-square.
    """
    config = model.config
    emb = model.dpt.embeddings
    b, _, h, w = pixel_values.shape
    if config.is_hybrid:
        # Features 0 and 1 are ResNet stages; the last stage, projected, becomes the tokens.
        stage_maps = list(emb.backbone(pixel_values).feature_maps)
        tokens = emb.projection(stage_maps[-1])
        grid_h, grid_w = tokens.shape[-2:]
        tokens = torch.cat([emb.cls_token.expand(b, -1, -1), tokens.flatten(2).transpose(1, 2)], dim=1)
        tokens = tokens + resize_position_embedding(emb.position_embeddings, grid_h, grid_w)
        features = stage_maps[:2]
        taps = list(config.backbone_out_indices[2:])
    else:
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        grid_h, grid_w = h // patch, w // patch
        tokens = emb(pixel_values).last_hidden_states  # resizes its position embedding itself
        features = []
        taps = list(config.backbone_out_indices)
    for i, layer in enumerate(model.dpt.encoder.layer):
        if i > max(taps):
            break  # later blocks feed nothing DPT reads
        tokens = layer(tokens)
        if i in taps:
            features.append(tokens)
    return model.head(model.neck(features, grid_h, grid_w))


# --------------------------------------------------------------------------- loading


def _prefixes(keys, n: int = 8) -> str:
    seen = sorted({".".join(k.split(".")[:2]) for k in keys})
    return ", ".join(seen[:n]) + (f" … (+{len(seen) - n} more)" if len(seen) > n else "")


def find_transformers_dpt_folder(folder: str) -> str | None:
    """The transformers DPT folder to use inside ``folder``, or None.

    ``folder`` itself if its ``config.json`` says ``"model_type": "dpt"``, otherwise
    the one immediate sub-folder whose ``config.json`` does. Several such
    sub-folders are ambiguous: ``ValueError`` naming them.
    """
    def is_dpt(path: str) -> bool:
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            return False
        try:
            with open(config, encoding="utf-8") as f:
                return json.load(f).get("model_type") == "dpt"
        except (OSError, ValueError, AttributeError):
            return False  # an unreadable config.json is not a DPT folder

    if is_dpt(folder):
        return folder
    found = sorted(e.path for e in os.scandir(folder) if e.is_dir() and is_dpt(e.path)) if os.path.isdir(folder) else []
    if len(found) > 1:
        raise ValueError(f"several transformers DPT folders in {os.path.abspath(folder)}: {', '.join(found)}; pass the one to use as the folder")
    return found[0] if found else None


class DepthDetector:
    """``detector(rgb uint8 (h, w, 3)) -> depth uint8 (h, w)``, nearer = brighter, stretched to 0..255.

    ``h`` and ``w`` must be multiples of 32 (``Annotator`` resizes to multiples of 64).
    """

    def __init__(self, model, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.dtype = dtype

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_folder(cls, folder: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "DepthDetector":
        """Load the depth network from an annotator folder.

        Rule: ``folder/dpt_hybrid-midas-501f0c75.pt`` (the MiDaS file) if it exists;
        else a transformers DPT folder (``config.json`` with ``"model_type": "dpt"``
        plus ``model.safetensors`` or ``pytorch_model.bin``, e.g. a download of
        ``Intel/dpt-hybrid-midas``): ``folder`` itself, or its one immediate
        sub-folder that is one (:func:`find_transformers_dpt_folder`). Otherwise
        ``FileNotFoundError`` naming the MiDaS file, the folder and its download link.
        """
        has_midas = os.path.isfile(os.path.join(folder, MIDAS_FILENAME))
        dpt_folder = None if has_midas else find_transformers_dpt_folder(folder)
        if dpt_folder is not None:
            return cls.from_transformers_folder(dpt_folder, device, dtype)
        try:
            path = require_annotator_file(folder, MIDAS_FILENAME)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{exc} Alternatively put a transformers DPT folder (config.json + model.safetensors, "
                "e.g. Intel/dpt-hybrid-midas) inside it."
            ) from None
        return cls.from_midas_file(path, device, dtype)

    @classmethod
    def from_midas_file(cls, path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "DepthDetector":
        """Load a MiDaS DPT-hybrid ``.pt`` (real or a same-layout test file), converting it to transformers' DPT."""
        from transformers import DPTForDepthEstimation

        sd = load_state_dict(path)
        if not is_midas_hybrid(sd):
            raise ModelFileError(
                path,
                f"is not a MiDaS DPT-hybrid checkpoint (it holds {len(sd)} tensors under {_prefixes(sd)}; "
                "expected pretrained.model.patch_embed.backbone.*, pretrained.model.blocks.* and scratch.*).",
                f"The depth annotator needs {MIDAS_FILENAME} from https://huggingface.co/lllyasviel/Annotators "
                "(DPT-Large and MiDaS v2.1 files are not supported).",
            )
        cfg: MidasHybridConfig = infer_config(infer_midas_config, sd, source=path, what="MiDaS DPT-hybrid network")
        check_layout(midas_layout(cfg), sd, path, "MiDaS DPT-hybrid network",
                     f"Download {MIDAS_FILENAME} again from https://huggingface.co/lllyasviel/Annotators.", expected_label="expected")
        converted = convert_midas_state_dict(sd, cfg)
        model = instantiate(
            lambda: DPTForDepthEstimation(to_dpt_config(cfg)), converted, source=path, what="DPT-hybrid depth network", device=device, dtype=dtype
        )
        return cls(model, device, dtype)

    @classmethod
    def from_transformers_folder(cls, folder: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "DepthDetector":
        """Load a transformers ``DPTForDepthEstimation`` folder (hybrid or plain ViT) with our strict loader."""
        from transformers import DPTConfig, DPTForDepthEstimation

        config_path = os.path.join(folder, "config.json")
        config = DPTConfig.from_json_file(config_path)
        if config.backbone_config is not None and not config.is_hybrid:
            raise ModelFileError(
                config_path,
                f"describes a DPT with a {config.backbone_config.model_type} backbone; only DPT-hybrid (BiT) and plain-ViT DPT are supported.",
                "Use dpt_hybrid-midas-501f0c75.pt or Intel/dpt-hybrid-midas.",
            )
        weights = next((os.path.join(folder, n) for n in _TRANSFORMERS_WEIGHTS if os.path.isfile(os.path.join(folder, n))), None)
        if weights is None:
            raise FileNotFoundError(
                f"transformers DPT folder {os.path.abspath(folder)} has a config.json but no "
                f"{' or '.join(_TRANSFORMERS_WEIGHTS)} (sharded checkpoints are not supported); download the weights into it "
                "(for example from https://huggingface.co/Intel/dpt-hybrid-midas)."
            )
        sd = load_state_dict(weights)
        model = instantiate(lambda: DPTForDepthEstimation(config), sd, source=weights, what="transformers DPT depth network", device=device, dtype=dtype)
        return cls(model, device, dtype)

    # ------------------------------------------------------------------ inference

    def _check_image(self, image: np.ndarray) -> None:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            described = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"the depth detector takes an RGB uint8 array (h, w, 3), got a {described}")
        h, w = image.shape[:2]
        step = 2 * PATCH
        if h % step or w % step or h == 0 or w == 0:
            near_w, near_h = (max(step, int(round(n / step)) * step) for n in (w, h))
            raise ValueError(f"depth detection needs height and width that are multiples of {step}, got {w}x{h}; nearest valid: {near_w}x{near_h}")

    @torch.inference_mode()
    def estimate(self, image: np.ndarray) -> torch.Tensor:
        """Raw relative inverse depth, float32 ``(h, w)`` on the detector's device (before the 0..255 stretch)."""
        self._check_image(image)
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).float() / 127.5 - 1.0
        x = x.permute(2, 0, 1).unsqueeze(0).to(self.dtype)
        return dpt_depth(self.model, x)[0].float()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return depth_to_uint8(self.estimate(image))


def depth_to_uint8(depth: torch.Tensor) -> np.ndarray:
    """MidasDetector's stretch: ``d -= min; d /= max`` (on the tensor's device), ``(d * 255).clip(0, 255).astype(uint8)``.

    The minimum maps to 0 and the maximum to 255 (values are truncated, not rounded).
    A constant map gives all zeros; NaN/inf is a ``RuntimeError`` (usually fp16 overflow).
    """
    if not bool(torch.isfinite(depth).all()):
        raise RuntimeError("the depth network produced NaN/inf values; run the detector in torch.float32")
    depth = depth.float() - depth.min()
    peak = depth.max()
    if peak <= 0:
        return np.zeros(tuple(depth.shape), dtype=np.uint8)  # flat prediction: nothing to stretch
    return ((depth / peak).cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)
