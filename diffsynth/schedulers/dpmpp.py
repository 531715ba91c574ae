"""DPM-Solver++ 2M: ``"dpmpp_2m"`` and ``"dpmpp_2m_karras"`` (diffusers' DPMSolverMultistepScheduler, solver_order 2,
algorithm_type "dpmsolver++", solver_type "midpoint", with SD 1.5's scheduler config; Karras sigmas off / on).

Lu, Zhou, Bao, Chen, Li & Zhu, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", arXiv:2211.01095, Algorithm 2 (multistep, second order). The solver works on the VP sample
``x = alpha_t x0 + sigma_t eps`` with ``alpha_t = 1 / sqrt(1 + sigma^2)``, ``sigma_t = sigma alpha_t`` and
``lambda = log(alpha_t / sigma_t) = -log(sigma)``: that is our latent as it is (diffusers' initial noise
sigma is 1 and its ``scale_model_input`` is the identity). The data prediction it integrates is
``(x - sigma_t eps) / alpha_t`` = :meth:`Sampler.x0` with ``alpha() = alpha_t^2 = 1 / (1 + sigma^2)``; the
pipeline keeps it per frame and passes it back as the next step's ``previous``.

Order (diffusers' rules for order 2 with lower_order_final True, final_sigmas_type "zero", euler_at_final
False): the first step of a run is first order (no previous x0 yet) and so is the last step, whatever the
step count (final_sigmas_type "zero" forces it; the "< 15 steps" rule adds nothing for order 2); every
other step is second order. The first-order step to sigma 0 returns the x0 prediction.

Timesteps:

- ``"dpmpp_2m"``: "leading" spacing with diffusers' n + 1 grid (``ratio = N // (n + 1)``, ``t_i = 1 + (n - i) *
  ratio``; 20 steps: 941, 894, ..., 48), each step's sigma the table value of its timestep. Strength < 1:
  the same rule over ``T_max + 1`` training timesteps counted down from T_max (``ratio = (T_max + 1) // (n + 1)``,
  ``t_i = T_max - i * ratio``), see :func:`.euler.leading_timesteps`.
- ``"dpmpp_2m_karras"``: n Karras sigmas (rho 7) from ``sigma_max = sigma(T_max)`` (sigma(999) at full strength,
  as diffusers) to ``sigma_min = sigma(0)``; the UNet's timestep is the rounded log-sigma interpolation in
  the table, done on diffusers' float32 table (:func:`float32_sigma_table`) so it rounds the same way.
  These sigmas are not table values: ``alpha()`` is ``1 / (1 + sigma^2)`` of the Karras sigma. From 45 steps
  (SD 1.5) some sigmas round to the same timestep (diffusers feeds the UNet t=1 twice); repeats are
  raised just enough to make the timesteps unique (:func:`.euler.strictly_descending`; 45 steps: diffusers'
  ..., 4, 3, 1, 1, 0 becomes ..., 4, 3, 2, 1, 0), the sigmas stay identical. At most ``T_max + 1`` steps.
"""

from __future__ import annotations

import math

import torch

from .base import Sampler, register
from .ddim import make_betas
from .euler import (karras_sigmas, leading_timesteps, sigma_table, sigma_to_alpha, sigma_to_timestep, start_timestep,
                    strictly_descending, working_dtype)


def float32_sigma_table(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> torch.Tensor:
    """sigma per training timestep as diffusers computes it, in float32 (betas, cumprod and sigma all float32).

    Used only to choose the UNet timestep of a Karras sigma exactly as diffusers does: it rounds a timestep
    interpolated in this table, from Karras sigmas spanning it, and its float32 cumprod (off by up to ~1e-6
    relative) decides some roundings (SD 1.5, 18 steps: 575.4998 from our float64 table, 575.5005 from
    diffusers', which feeds the UNet 576). The solver's sigmas come from the float64 table.
    """
    make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule)  # validates the arguments
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    else:
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    a = torch.cumprod(1.0 - betas, dim=0)
    return ((1.0 - a) / a) ** 0.5


def vp_levels(sigma: float) -> tuple[float, float, float]:
    """(alpha_t, sigma_t, lambda_t) of a sigma-space noise level: 1/sqrt(1+sigma^2), sigma alpha_t, -log(sigma)."""
    alpha_t = 1.0 / math.sqrt(1.0 + sigma**2)
    return alpha_t, sigma * alpha_t, -math.log(sigma)


def dpmpp_first_order(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """DPM-Solver++ 1 (= DDIM): ``x' = (sigma_t'/sigma_t) x - alpha_t' (e^-h - 1) x0``, h = lambda' - lambda.

    With sigma_next = 0 (the last step) it is x0.
    """
    if sigma_next == 0.0:
        return x0.to(x.dtype)
    _, s_t, lam = vp_levels(sigma)
    a_next, s_next, lam_next = vp_levels(sigma_next)
    h = lam_next - lam
    dtype = working_dtype(x)
    out = (s_next / s_t) * x.to(dtype) - (a_next * math.expm1(-h)) * x0.to(dtype)
    return out.to(x.dtype)


def dpmpp_2m_step(x: torch.Tensor, x0: torch.Tensor, x0_prev: torch.Tensor, sigma_prev: float, sigma: float,
                  sigma_next: float) -> torch.Tensor:
    """DPM-Solver++ 2M (Alg. 2, midpoint form): D0 = x0, D1 = (x0 - x0_prev) / r, r = h_prev / h;
    ``x' = (sigma_t'/sigma_t) x - alpha_t' (e^-h - 1) (D0 + D1 / 2)``. Needs sigma_next > 0."""
    _, _, lam_prev = vp_levels(sigma_prev)
    _, s_t, lam = vp_levels(sigma)
    a_next, s_next, lam_next = vp_levels(sigma_next)
    h, h_prev = lam_next - lam, lam - lam_prev
    r = h_prev / h
    dtype = working_dtype(x)
    d0 = x0.to(dtype)
    d1 = (d0 - x0_prev.to(device=x.device, dtype=dtype)) / r
    out = (s_next / s_t) * x.to(dtype) - (a_next * math.expm1(-h)) * (d0 + 0.5 * d1)
    return out.to(x.dtype)


@register
class DPMSolverMultistepSampler(Sampler):
    """DPM-Solver++ 2M on table sigmas with "leading" timesteps. ``sigmas``: float64, one per step plus the final 0."""

    name = "dpmpp_2m"
    needs_previous = True

    def set_timesteps(self, num_inference_steps: int, denoising_strength: float = 1.0) -> None:
        t_max = start_timestep(num_inference_steps, denoising_strength, self.num_train_timesteps)
        steps, sigmas = self.schedule(num_inference_steps, t_max)
        self.timesteps = torch.tensor(steps, dtype=torch.int64)
        self.sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])

    def schedule(self, num_inference_steps: int, t_max: int) -> tuple[list[int], torch.Tensor]:
        """(timesteps, their float64 sigmas) of a run starting at ``t_max``."""
        steps = leading_timesteps(num_inference_steps, t_max, self.num_train_timesteps, drop_lowest=True)
        return steps, sigma_table(self.alphas_cumprod)[torch.tensor(steps)]

    def alpha(self, timestep) -> float:
        return sigma_to_alpha(self.sigmas[self.index(timestep)])

    def step(self, model_output, timestep, sample, to_final=False, previous=None, noise=None):
        """One DPM-Solver++ step; ``previous`` is :meth:`x0` of this frame's previous step (None at the first step)."""
        x0 = self.x0(model_output, timestep, sample)
        if to_final:
            return x0
        i = self.index(timestep)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if i == 0 or i == len(self.timesteps) - 1:
            return dpmpp_first_order(sample, x0, sigma, sigma_next)
        if previous is None:
            raise ValueError(f"the {self.name} sampler needs previous= (sampler.x0() of this frame's previous step) at "
                             f"step {i + 1} of {len(self.timesteps)}; it is None only at the first step")
        return dpmpp_2m_step(sample, x0, previous, float(self.sigmas[i - 1]), sigma, sigma_next)


@register
class DPMSolverMultistepKarrasSampler(DPMSolverMultistepSampler):
    """DPM-Solver++ 2M on Karras sigmas (diffusers' ``use_karras_sigmas=True``)."""

    name = "dpmpp_2m_karras"

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear"):
        self.float32_sigmas = float32_sigma_table(num_train_timesteps, beta_start, beta_end, beta_schedule)
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule)

    def schedule(self, num_inference_steps: int, t_max: int) -> tuple[list[int], torch.Tensor]:
        """n Karras sigmas from sigma(t_max) to sigma(0); timesteps chosen from diffusers' float32 table (see module doc)."""
        n = min(num_inference_steps, t_max + 1)
        table = sigma_table(self.alphas_cumprod)
        sigmas = karras_sigmas(float(table[0]), float(table[t_max]), n)
        like_diffusers = karras_sigmas(float(self.float32_sigmas[0]), float(self.float32_sigmas[t_max]), n)
        steps = sigma_to_timestep(like_diffusers, self.float32_sigmas).round()
        return strictly_descending([int(t) for t in steps.tolist()], t_max), sigmas
