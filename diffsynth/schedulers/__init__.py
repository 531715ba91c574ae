"""Noise schedules and sampler steps (pure functions of tensors and floats)."""

from .base import SAMPLERS, Sampler, check_sampler_name, frame_step_noise, make_sampler, sampler_names
from .ddim import EnhancedDDIMScheduler
from .dpmpp import DPMSolverMultistepKarrasSampler, DPMSolverMultistepSampler
from .euler import EulerAncestralSampler, EulerSampler
from .lcm import LCMSampler

__all__ = [
    "EnhancedDDIMScheduler",
    "Sampler",
    "SAMPLERS",
    "make_sampler",
    "sampler_names",
    "check_sampler_name",
    "frame_step_noise",
    "EulerSampler",
    "EulerAncestralSampler",
    "DPMSolverMultistepSampler",
    "DPMSolverMultistepKarrasSampler",
    "LCMSampler",
]
