"""ControlNet units and annotators."""
from .annotators import PROCESSOR_IDS, Annotator
from .units import ControlNetConfigUnit, ControlNetUnit, MultiControlNetManager

Processor_id = str  # the original's name for the processor id type; valid values: PROCESSOR_IDS

__all__ = ["Annotator", "ControlNetConfigUnit", "ControlNetUnit", "MultiControlNetManager", "PROCESSOR_IDS", "Processor_id"]
