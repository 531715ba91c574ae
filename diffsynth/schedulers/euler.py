"""Euler and Euler-ancestral sampling in sigma space: ``"euler"`` and ``"euler_a"`` (diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler with SD 1.5's scheduler config), plus the sigma-table and timestep helpers the
DPM-Solver++ and LCM samplers share.

Karras, Aittala, Aila & Laine, "Elucidating the Design Space of Diffusion-Based Generative Models",
arXiv:2206.00364: the sample in sigma space is ``s = x0 + sigma * eps`` with ``sigma = sqrt((1 - a) / a)``
(``a``: the cumulative alpha), and Euler integrates ``ds/dsigma = eps``. Our pipelines hold the
variance-preserving latent ``x = s / sqrt(1 + sigma^2)`` (see :mod:`.base`), which is exactly diffusers'
``scale_model_input(s)``; a step converts ``x`` to sigma space with the step's sigma, takes the diffusers
update, and converts back with the next sigma (0 after the last step, where the result is x0). Written
out, Euler with an eps-model is DDIM on the same noise levels; the ancestral variant adds fresh noise.

Timesteps ("leading" spacing, ``steps_offset`` 1, as SD 1.5's config gives diffusers users):

- full strength (the run starts at the last training timestep, ``T_max = N - 1``): diffusers' rule,
  ``ratio = N // n``, ``t_i = 1 + (n - 1 - i) * ratio`` (20 steps: 951, 901, ..., 1). At most ``N - 1``
  steps (more would put a timestep past the table; diffusers misbehaves there too).
- ``denoising_strength`` < 1: the original DiffSynth meaning, the run starts at ``T_max =
  round(N * strength) - 1``. The same spacing rule over a model of ``T_max + 1`` training timesteps,
  counted down from ``T_max`` so the first step is exactly at T_max's noise level: ``ratio = (T_max + 1) //
  n``, ``t_i = T_max - i * ratio`` (strength 0.5, 4 steps: 499, 374, 249, 124). At most ``T_max + 1`` steps.
  Anchoring at T_max rather than at 1 is what makes the start exact; the price is a jump at the top:
  strength 0.999 (T_max 998) starts at 998 while 1.0 starts where diffusers does (951 for 20 steps).

Each step's sigma is the table value of its timestep (diffusers interpolates linearly in the table at
integer timesteps, i.e. looks it up); ``alpha(t) = 1 / (1 + sigma^2)`` is then the table's cumulative alpha.
"""

from __future__ import annotations

import math

import torch

from .base import Sampler, register
from .ddim import ddim_timesteps

STEPS_OFFSET = 1
"""SD 1.x's ``steps_offset``: diffusers' "leading" timesteps at full strength end at 1, not 0."""


# ---------------------------------------------------------------------------------------
# Run settings and timestep spacing (shared with the DPM-Solver++ and LCM samplers)
# ---------------------------------------------------------------------------------------


def start_timestep(num_inference_steps: int, denoising_strength: float, num_train_timesteps: int) -> int:
    """T_max = max(round(N * strength) - 1, 0), the timestep whose noise level a run starts from.

    Validates both settings with :func:`.ddim.ddim_timesteps` (int >= 1, strength in (0, 1]), the one
    place that rule and its messages live; its first timestep is T_max.
    """
    return ddim_timesteps(num_inference_steps, denoising_strength, num_train_timesteps)[0]


def leading_timesteps(num_inference_steps: int, t_max: int, num_train_timesteps: int,
                      drop_lowest: bool = False) -> list[int]:
    """Descending, unique "leading" timesteps (``steps_offset`` 1) of a run starting at ``t_max``; see the module doc.

    ``drop_lowest``: DPM-Solver's variant, a grid of ``n + 1`` points whose lowest (0) is dropped, so
    ``ratio = N // (n + 1)`` and the last timestep is ``ratio + 1`` (diffusers' DPMSolverMultistep).
    The step count is capped so the grid fits: ``N - 1 - drop_lowest`` at full range, ``t_max + 1 -
    drop_lowest`` (at least 1) below it.
    """
    extra = 1 if drop_lowest else 0
    if t_max >= num_train_timesteps - 1:
        n = min(num_inference_steps, num_train_timesteps - 1 - extra)
        ratio = num_train_timesteps // (n + extra)
        return [STEPS_OFFSET + j * ratio for j in range(n - 1 + extra, extra - 1, -1)]
    n = max(min(num_inference_steps, t_max + 1 - extra), 1)
    ratio = (t_max + 1) // (n + extra)
    return [t_max - i * ratio for i in range(n)]


# ---------------------------------------------------------------------------------------
# Sigma tables
# ---------------------------------------------------------------------------------------


def sigma_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - a_t) / a_t) per training timestep (float64, ascending in t)."""
    a = alphas_cumprod.to(torch.float64)
    return ((1.0 - a) / a).sqrt()


def sigma_to_alpha(sigma: float) -> float:
    """The cumulative alpha of a sigma-space noise level: 1 / (1 + sigma^2)."""
    return 1.0 / (1.0 + float(sigma) ** 2)


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> torch.Tensor:
    """The n descending noise levels of Karras et al. 2022, eq. 5 (rho = 7): interpolate sigma^(1/rho) linearly.

    One step gives ``[sigma_max]`` (the ramp is ``linspace(0, 1, 1) = [0]``, as in diffusers).
    """
    ramp = torch.linspace(0.0, 1.0, num_inference_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_timestep(sigmas: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The fractional training timestep of each sigma: linear interpolation of log(sigma) in ``table`` (sigma per
    training timestep, ascending).

    Outside the table's range the result is clamped to [0, N - 1] (diffusers' ``_sigma_to_t``). The table's
    logs and interval widths are taken in its own dtype, as diffusers does with its float32 table.
    """
    log_table = table.log()
    log_sigma = sigmas.to(torch.float64).clamp(min=1e-10).log()
    low = (torch.searchsorted(log_table.to(torch.float64), log_sigma, right=True) - 1).clamp(0, len(log_table) - 2)
    width = (log_table[low + 1] - log_table[low]).to(torch.float64)
    w = ((log_sigma - log_table[low].to(torch.float64)) / width).clamp(0.0, 1.0)
    return low.to(torch.float64) + w


def strictly_descending(timesteps: list[int], t_max: int) -> list[int]:
    """Make descending timesteps in [0, t_max] strictly descending, changing repeated values as little as possible.

    Karras sigmas are dense near sigma_min, so from 45 steps (SD 1.5) two of them round to the same
    timestep (diffusers then feeds the UNet t=1 twice); our samplers look steps up by timestep. Working
    up from the end, a repeat becomes one more than the timestep below it; if that climbs past t_max
    (hundreds of steps), working down from t_max, each is held one below the one above. Needs
    ``len(timesteps) <= t_max + 1``. Only the UNet's timestep changes; the step's sigma stays.
    """
    out = list(timesteps)
    for i in range(len(out) - 2, -1, -1):
        out[i] = max(out[i], out[i + 1] + 1)
    out[0] = min(out[0], t_max)
    for i in range(1, len(out)):
        out[i] = min(out[i], out[i - 1] - 1)
    return out


# ---------------------------------------------------------------------------------------
# Steps (x: our VP latent; sigmas: Python floats)
# ---------------------------------------------------------------------------------------


def working_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 at least (half-precision latents are stepped in float32, as diffusers upcasts)."""
    return torch.promote_types(x.dtype, torch.float32)


def euler_step(eps: torch.Tensor, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of ds/dsigma = eps from sigma to sigma_next (Karras et al. 2022, Alg. 1 without churn).

    In sigma space ``s = x * sqrt(1 + sigma^2)``, ``s' = s + (sigma_next - sigma) * eps``; returns
    ``s' / sqrt(1 + sigma_next^2)`` in x's dtype (with sigma_next = 0: the x0 prediction).
    """
    dtype = working_dtype(x)
    s = x.to(dtype) * math.sqrt(1.0 + sigma**2)
    s_next = s + (sigma_next - sigma) * eps.to(dtype)
    return (s_next / math.sqrt(1.0 + sigma_next**2)).to(x.dtype)


def ancestral_sigmas(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step: sigma_down^2 + sigma_up^2 = sigma_next^2.

    ``sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)`` (k-diffusion's ``get_ancestral_step``
    with eta 1, as diffusers' EulerAncestralDiscreteScheduler).
    """
    sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    return sigma_down, sigma_up


def euler_ancestral_step(eps: torch.Tensor, x: torch.Tensor, sigma: float, sigma_next: float,
                         noise: torch.Tensor | None) -> torch.Tensor:
    """Euler step down to sigma_down, then fresh noise up to sigma_next (Karras et al. 2022 / k-diffusion's
    ``sample_euler_ancestral``): ``s' = s + (sigma_down - sigma) eps + sigma_up noise``.

    ``noise`` (standard normal, x's shape) is unused when sigma_next = 0 (the last step lands on x0).
    """
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next)
    dtype = working_dtype(x)
    s = x.to(dtype) * math.sqrt(1.0 + sigma**2)
    s_next = s + (sigma_down - sigma) * eps.to(dtype)
    if sigma_up > 0.0:
        s_next = s_next + sigma_up * noise.to(device=x.device, dtype=dtype)
    return (s_next / math.sqrt(1.0 + sigma_next**2)).to(x.dtype)


def check_noise(name: str, noise: torch.Tensor | None, sample: torch.Tensor) -> None:
    """A stochastic step's noise must be given and shaped like the latent."""
    if noise is None:
        raise ValueError(f"the {name} sampler adds fresh noise at each step but the last: pass noise= (a standard "
                         f"normal tensor shaped like the latent, {tuple(sample.shape)})")
    if tuple(noise.shape) != tuple(sample.shape):
        raise ValueError(f"the {name} sampler's noise must be shaped like the latent {tuple(sample.shape)}, "
                         f"got {tuple(noise.shape)}")


# ---------------------------------------------------------------------------------------
# Samplers (hold the schedule; the math is above)
# ---------------------------------------------------------------------------------------


@register
class EulerSampler(Sampler):
    """diffusers' EulerDiscreteScheduler (SD 1.5 config) on our VP latent.

    ``sigmas``: float64, one per step plus the final 0.
    """

    name = "euler"

    def set_timesteps(self, num_inference_steps: int, denoising_strength: float = 1.0) -> None:
        t_max = start_timestep(num_inference_steps, denoising_strength, self.num_train_timesteps)
        steps = leading_timesteps(num_inference_steps, t_max, self.num_train_timesteps)
        self.timesteps = torch.tensor(steps, dtype=torch.int64)
        table = sigma_table(self.alphas_cumprod)
        self.sigmas = torch.cat([table[self.timesteps], torch.zeros(1, dtype=torch.float64)])

    def alpha(self, timestep) -> float:
        return sigma_to_alpha(self.sigmas[self.index(timestep)])

    def step(self, model_output, timestep, sample, to_final=False, previous=None, noise=None):
        """Euler step to the next sigma (x0 after the last step, or with ``to_final``); ``previous``/``noise`` unused."""
        if to_final:
            return self.x0(model_output, timestep, sample)
        i = self.index(timestep)
        return euler_step(model_output, sample, float(self.sigmas[i]), float(self.sigmas[i + 1]))


@register
class EulerAncestralSampler(EulerSampler):
    """diffusers' EulerAncestralDiscreteScheduler (SD 1.5 config); same timesteps and sigmas as ``"euler"``."""

    name = "euler_a"
    needs_noise = True

    def step(self, model_output, timestep, sample, to_final=False, previous=None, noise=None):
        """Ancestral step; ``noise`` is diffusers' ``randn_tensor`` draw of this step (not needed at the last step)."""
        if to_final:
            return self.x0(model_output, timestep, sample)
        i = self.index(timestep)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if sigma_next > 0.0:
            check_noise(self.name, noise, sample)
        return euler_ancestral_step(model_output, sample, sigma, sigma_next, noise)
