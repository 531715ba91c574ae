"""ControlNet units: an annotator, a ControlNet and a strength, combined by ``MultiControlNetManager``."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .annotators import Annotator, check_processor_id

logger = logging.getLogger("diffsynth")


@dataclass
class ControlNetConfigUnit:
    """What a user asks for: ``processor_id`` (annotator), the ControlNet file and its strength."""

    processor_id: str
    model_path: str
    scale: float = 1.0

    def __post_init__(self):
        check_processor_id(self.processor_id)


class ControlNetUnit:
    def __init__(self, processor: Annotator, model: torch.nn.Module, scale: float = 1.0):
        self.processor = processor
        self.model = model
        self.scale = scale


def image_to_condition(image: Image.Image) -> torch.Tensor:
    """PIL → ``(3, H, W)`` float32 in [0, 1] (÷255, no centring), as ControlNets expect."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class MultiControlNetManager:
    """Runs several units and sums their scaled residuals."""

    def __init__(self, controlnet_units: Sequence[ControlNetUnit]):
        self.units = list(controlnet_units)
        self.processors = [u.processor for u in self.units]
        self.models = [u.model for u in self.units]
        self.scales = [u.scale for u in self.units]

    def __len__(self) -> int:
        return len(self.units)

    def process_image(self, image: Image.Image, processor_id: str | None = None) -> torch.Tensor:
        """Each unit's annotation of ``image`` (or only ``processor_id``'s): ``(units or 1, 3, H, W)`` in [0, 1]."""
        if processor_id is None:
            processors = self.processors
        else:
            processors = [p for p in self.processors if p.processor_id == processor_id]
            if not processors:
                raise ValueError(f"no ControlNet unit uses processor {processor_id!r}; units: {[p.processor_id for p in self.processors]}")
            processors = processors[:1]
        return torch.stack([image_to_condition(p(image)) for p in processors])

    def __call__(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        conditionings: torch.Tensor,
        attention_tile: tuple[int, int] | None = None,
        batch_size: int | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Summed residuals of all units for ``sample`` (``B`` frames).

        ``conditionings`` is ``(units, B, 3, 8h, 8w)``, float in [0, 1] or uint8 (converted
        per chunk, so a video window's hints stay compact); frames go through each
        ControlNet ``batch_size`` at a time (``controlnet_batch_size``).
        """
        if conditionings.shape[0] != len(self.units):
            raise ValueError(f"got condition images for {conditionings.shape[0]} units, the manager has {len(self.units)}")
        total_down: list[torch.Tensor] | None = None
        total_mid: torch.Tensor | None = None
        batch = sample.shape[0]
        step = batch_size or batch
        if encoder_hidden_states.shape[0] != batch:
            encoder_hidden_states = encoder_hidden_states.expand(batch, -1, -1)
        for unit, cond in zip(self.units, conditionings):
            chunks = []
            for start in range(0, batch, step):
                end = min(start + step, batch)
                hint = cond[start:end].to(sample.device)
                hint = hint.to(sample.dtype) / 255.0 if hint.dtype == torch.uint8 else hint.to(sample.dtype)
                chunks.append(unit.model(sample[start:end], timestep, encoder_hidden_states[start:end], hint, scale=unit.scale, attention_tile=attention_tile))
            down = [torch.cat([c[0][i] for c in chunks]) for i in range(len(chunks[0][0]))]
            mid = torch.cat([c[1] for c in chunks])
            if total_down is None:
                total_down, total_mid = down, mid
            else:
                total_down = [a + b for a, b in zip(total_down, down)]
                total_mid = total_mid + mid
        return total_down, total_mid


def fit_control_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """The control image at the output size: resized (bicubic) with a warning when it differs."""
    if image.size != (width, height):
        logger.warning(
            "controlnet_image is %dx%d but the output is %dx%d; resizing it (pass an image of the output size to avoid this)",
            image.size[0], image.size[1], width, height,
        )
        image = image.resize((width, height), Image.BICUBIC)
    return image
