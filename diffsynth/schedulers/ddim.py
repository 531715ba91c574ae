"""Deterministic DDIM sampling (eta = 0) as used by DiffSynth-Studio (early 2024).

Song, Meng & Ermon, "Denoising Diffusion Implicit Models", arXiv:2010.02502, eq. 12 with
sigma = 0. The noise schedule is the one of Stable Diffusion ("scaled_linear", betas
0.00085..0.012 over 1000 training steps) or, for AnimateDiff motion modules, "linear".

The math lives in the module-level functions below; they take tensors and Python floats
(the cumulative alpha products) and never look at a scheduler object. The class
`EnhancedDDIMScheduler` only holds the alpha table and the current timesteps, and turns a
timestep into the alphas the functions need.
"""

from __future__ import annotations

import math
import numbers

import torch

from .base import Sampler, register

BETA_SCHEDULES = ("scaled_linear", "linear")


# ---------------------------------------------------------------------------------------
# Noise schedule
# ---------------------------------------------------------------------------------------


def make_betas(
    num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str
) -> torch.Tensor:
    """Return the float64 betas of the training noise schedule, shape (num_train_timesteps,).

    "scaled_linear" (Stable Diffusion): linspace(sqrt(beta_start), sqrt(beta_end), N) ** 2.
    "linear" (DDPM, AnimateDiff):       linspace(beta_start, beta_end, N).
    """
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, numbers.Integral):
        raise TypeError(f"num_train_timesteps must be an int, got {num_train_timesteps!r}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"betas must satisfy 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, "
            f"beta_end={beta_end} (Stable Diffusion uses 0.00085 and 0.012)"
        )
    n = int(num_train_timesteps)
    if beta_schedule == "scaled_linear":
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), n, dtype=torch.float64) ** 2
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    raise ValueError(
        f"unknown beta_schedule {beta_schedule!r}; valid values are {', '.join(map(repr, BETA_SCHEDULES))}"
    )


def cumulative_alphas(betas: torch.Tensor) -> torch.Tensor:
    """Return alpha_bar_t = prod_{s<=t} (1 - beta_s), in float64 (keeps 1 - alpha_bar accurate near t=0)."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def ddim_timesteps(
    num_inference_steps: int, denoising_strength: float = 1.0, num_train_timesteps: int = 1000
) -> list[int]:
    """Return the descending DDIM timesteps used by DiffSynth-Studio; the list always ends at 0.

    T_max = max(round(num_train_timesteps * strength) - 1, 0); the step count is capped at
    T_max + 1 (no timestep twice); one step gives [T_max], otherwise
    t_i = round(T_max - i * T_max / (n - 1)) for i = 0..n-1. `round` is Python's (half to
    even): the golden schedules (20 steps: 999, 946, 894, ..., 53, 0) depend on it.
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral):
        raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if isinstance(denoising_strength, bool) or not isinstance(denoising_strength, numbers.Real):
        raise TypeError(f"denoising_strength must be a number in (0, 1], got {denoising_strength!r}")
    if not 0.0 < denoising_strength <= 1.0:
        raise ValueError(
            f"denoising_strength must be in (0, 1], got {denoising_strength} "
            "(1.0 = start from pure noise, smaller keeps more of the input image)"
        )
    t_max = max(round(num_train_timesteps * float(denoising_strength)) - 1, 0)
    n = min(int(num_inference_steps), t_max + 1)
    if n == 1:
        return [t_max]
    return [round(t_max - i * t_max / (n - 1)) for i in range(n)]


# ---------------------------------------------------------------------------------------
# Sampler math (alphas are cumulative products alpha_bar, as Python floats in (0, 1])
# ---------------------------------------------------------------------------------------


def _check_alpha(name: str, value: float, allow_one: bool = True) -> float:
    value = float(value)
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (0.0 < value and upper_ok):
        bound = "(0, 1]" if allow_one else "(0, 1)"
        raise ValueError(f"{name} must be a cumulative alpha in {bound}, got {value}")
    return value


def ddim_step(eps: torch.Tensor, x: torch.Tensor, alpha_t: float, alpha_next: float) -> torch.Tensor:
    """One deterministic DDIM step from alpha_bar = alpha_t to alpha_bar = alpha_next (eta = 0).

    x' = sqrt(a'/a) * x + (sqrt(1 - a') - sqrt(a' (1 - a) / a)) * eps. This is the usual
    "predict x0, then re-noise it with the same eps" written as one affine map; with
    alpha_next = 1 it returns the x0 prediction (x - sqrt(1 - a) eps) / sqrt(a).
    The result has x's dtype.
    """
    a = _check_alpha("alpha_t", alpha_t)
    a_next = _check_alpha("alpha_next", alpha_next)
    coef_x = math.sqrt(a_next / a)
    coef_eps = math.sqrt(1.0 - a_next) - math.sqrt(a_next * (1.0 - a) / a)
    return (coef_x * x + coef_eps * eps).to(x.dtype)


def ddim_eps_for_target(x_t: torch.Tensor, x0_target: torch.Tensor, alpha_t: float) -> torch.Tensor:
    """Return the eps for which `ddim_step(eps, x_t, alpha_t, 1.0)` equals `x0_target`.

    eps = (x_t - sqrt(a) * x0_target) / sqrt(1 - a). Used to steer sampling towards an
    externally edited x0 (the smoother-in-the-loop of the video pipeline). Result has x_t's dtype.
    """
    a = _check_alpha("alpha_t", alpha_t, allow_one=False)
    return ((x_t - math.sqrt(a) * x0_target) / math.sqrt(1.0 - a)).to(x_t.dtype)


def ddim_add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_t: float) -> torch.Tensor:
    """Forward diffusion q(x_t | x0): sqrt(a) * x0 + sqrt(1 - a) * eps, in x0's dtype."""
    a = _check_alpha("alpha_t", alpha_t)
    return (math.sqrt(a) * x0 + math.sqrt(1.0 - a) * eps).to(x0.dtype)


# ---------------------------------------------------------------------------------------
# Scheduler object (holds the alpha table and the current timesteps only)
# ---------------------------------------------------------------------------------------


def timestep_to_int(timestep, num_train_timesteps: int) -> int:
    """Turn a timestep given as int, integral float, numpy scalar or one-element tensor into an int.

    Pipelines pass whatever they iterate over (elements of `scheduler.timesteps`, which are
    0-d int64 tensors) or plain numbers; all must index the same alpha.
    """
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1:
            raise ValueError(
                f"timestep must be a single value, got a tensor of shape {tuple(timestep.shape)}; "
                "call the scheduler once per timestep"
            )
        timestep = timestep.item()
    if isinstance(timestep, bool) or not isinstance(timestep, numbers.Real):
        raise TypeError(f"timestep must be an int, a float or a one-element tensor, got {timestep!r}")
    if not math.isfinite(timestep) or float(timestep) != int(timestep):
        raise ValueError(f"timestep must be a whole number, got {timestep}")
    value = int(timestep)
    if not 0 <= value < num_train_timesteps:
        raise ValueError(f"timestep must be in [0, {num_train_timesteps - 1}], got {value}")
    return value


@register
class EnhancedDDIMScheduler(Sampler):
    """DDIM (eta = 0) with DiffSynth-Studio's timestep spacing; API-compatible with its class. The ``"ddim"`` sampler.

    Attributes: `alphas_cumprod` (float64 tensor, one value per training timestep) and
    `timesteps` (1-D int64 tensor, descending, ending at 0). The constructor prepares 10 steps
    like the original.
    """

    name = "ddim"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
    ):
        betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule)
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_schedule = beta_schedule
        self.alphas_cumprod = cumulative_alphas(betas)
        self.set_timesteps(10)

    def set_timesteps(self, num_inference_steps: int, denoising_strength: float = 1.0) -> None:
        """Prepare the descending timesteps for a run (see `ddim_timesteps`)."""
        steps = ddim_timesteps(num_inference_steps, denoising_strength, self.num_train_timesteps)
        self.timesteps = torch.tensor(steps, dtype=torch.int64)

    def alpha(self, timestep) -> float:
        """alpha_bar at `timestep` as a Python float (float64 precision)."""
        return float(self.alphas_cumprod[timestep_to_int(timestep, self.num_train_timesteps)])

    def next_alpha(self, timestep) -> float:
        """alpha_bar of the timestep after `timestep` in the current schedule; 1.0 after the last one."""
        t = timestep_to_int(timestep, self.num_train_timesteps)
        schedule = self.timesteps.tolist()
        if t not in schedule:
            raise ValueError(
                f"timestep {t} is not in the current schedule {schedule}; call set_timesteps() "
                "with the settings of this run, or pass to_final=True to jump straight to x0"
            )
        position = schedule.index(t)
        if position == len(schedule) - 1:
            return 1.0
        return float(self.alphas_cumprod[schedule[position + 1]])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, to_final: bool = False, previous=None, noise=None):
        """Denoise `sample` from `timestep` to the next scheduled timestep (or to x0 if to_final); DDIM needs no ``previous``/``noise``."""
        alpha_next = 1.0 if to_final else self.next_alpha(timestep)
        return ddim_step(model_output, sample, self.alpha(timestep), alpha_next)

    def return_to_timestep(self, timestep, sample: torch.Tensor, sample_stablized: torch.Tensor):
        """The noise prediction that would make `step(..., to_final=True)` land on `sample_stablized`."""
        return ddim_eps_for_target(sample, sample_stablized, self.alpha(timestep))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timestep):
        """Noise clean latents to `timestep`: sqrt(a) * x0 + sqrt(1 - a) * noise."""
        return ddim_add_noise(original_samples, noise, self.alpha(timestep))
