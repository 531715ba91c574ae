"""Latent Consistency Model multistep sampling: ``"lcm"`` (diffusers' LCMScheduler with SD 1.5's config and its own
defaults: original_inference_steps 50, timestep_scaling 10).

Luo, Tan, Huang, Li & Zhao, "Latent Consistency Models", arXiv:2310.04378, Algorithm 3: at each step
the consistency function ``f(x, t) = c_skip(t) x + c_out(t) x0(x, t)`` gives a clean estimate, which is
noised again to the next timestep's level with fresh noise (all steps but the last). The sample is
variance-preserving with the table's cumulative alphas, so it is our latent as it is; ``alpha(t)`` is the
table value of ``t``. The last step returns ``f`` itself (c_skip there is ~1e-8 of the x0 prediction, not 0).

Timesteps: LCM was distilled on ``original_steps = 50`` timesteps ``k j - 1`` (``k = N // 50``, j = 1..50:
19, 39, ..., 999); n steps pick indices ``floor(j * L / n)`` (j = 0..n-1, float arithmetic as diffusers'
``np.linspace``) of that list in descending order (4 steps: 999, 759, 499, 259). At most L steps (L = 50
at full strength; diffusers raises above it, we cap like DDIM).

Strength < 1: diffusers' own rule, which keeps the run on the distillation grid: the list is cut to the
timesteps ``k j - 1 <= T_max`` (``T_max = round(N * strength) - 1``), i.e. diffusers'
``int(original_steps * strength)`` entries evaluated in integers (diffusers' float product truncates
``50 * 0.58 = 28.999...`` to 28; we keep 29). So the run starts at the highest grid timestep at or below
T_max, at most k - 1 = 19 timesteps lower (strength 0.5: exactly 499). Below the grid's lowest timestep
(strength < 0.02) the one step is at T_max itself.
"""

from __future__ import annotations

import math

import torch

from .base import Sampler, register
from .euler import check_noise, start_timestep, working_dtype

ORIGINAL_STEPS = 50
"""The distillation schedule's length (diffusers' ``original_inference_steps``)."""
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5


def lcm_timesteps(num_inference_steps: int, t_max: int, num_train_timesteps: int,
                  original_steps: int = ORIGINAL_STEPS) -> list[int]:
    """Descending, unique LCM timesteps of a run starting at (or just below) ``t_max``; see the module doc."""
    if original_steps > num_train_timesteps:
        raise ValueError(f"the lcm sampler needs at least {original_steps} training timesteps (its distillation "
                         f"schedule), got num_train_timesteps={num_train_timesteps}")
    k = num_train_timesteps // original_steps
    count = min((t_max + 1) // k, original_steps)
    origin = [k * j - 1 for j in range(count, 0, -1)] or [t_max]
    n = min(num_inference_steps, len(origin))
    step = len(origin) / n  # np.linspace(0, L, n, endpoint=False) is j * (L / n) in float64
    return [origin[math.floor(j * step)] for j in range(n)]


def consistency_scalings(timestep: int, timestep_scaling: float = TIMESTEP_SCALING,
                         sigma_data: float = SIGMA_DATA) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency boundary condition at the scaled timestep u = t * timestep_scaling:
    ``c_skip = sigma_data^2 / (u^2 + sigma_data^2)``, ``c_out = u / sqrt(u^2 + sigma_data^2)``
    (LCM eq. 4, after Song et al. 2023's consistency models)."""
    u = timestep * timestep_scaling
    return sigma_data**2 / (u**2 + sigma_data**2), u / math.sqrt(u**2 + sigma_data**2)


def lcm_denoise(eps: torch.Tensor, x: torch.Tensor, alpha: float, timestep: int) -> torch.Tensor:
    """The consistency function f(x, t) = c_skip x + c_out x0, with x0 = (x - sqrt(1 - a) eps) / sqrt(a); in x's dtype."""
    c_skip, c_out = consistency_scalings(timestep)
    dtype = working_dtype(x)
    x0 = (x.to(dtype) - math.sqrt(1.0 - alpha) * eps.to(dtype)) / math.sqrt(alpha)
    return (c_out * x0 + c_skip * x.to(dtype)).to(x.dtype)


def lcm_renoise(denoised: torch.Tensor, noise: torch.Tensor, alpha_next: float) -> torch.Tensor:
    """The next step's latent: sqrt(a') f + sqrt(1 - a') noise (Algorithm 3's re-noising), in denoised's dtype."""
    dtype = working_dtype(denoised)
    noise = noise.to(device=denoised.device, dtype=dtype)
    out = math.sqrt(alpha_next) * denoised.to(dtype) + math.sqrt(1.0 - alpha_next) * noise
    return out.to(denoised.dtype)


@register
class LCMSampler(Sampler):
    """diffusers' LCMScheduler (SD 1.5 config) on our latent (which is already its sample)."""

    name = "lcm"
    needs_noise = True

    def set_timesteps(self, num_inference_steps: int, denoising_strength: float = 1.0) -> None:
        t_max = start_timestep(num_inference_steps, denoising_strength, self.num_train_timesteps)
        steps = lcm_timesteps(num_inference_steps, t_max, self.num_train_timesteps)
        self.timesteps = torch.tensor(steps, dtype=torch.int64)

    def alpha(self, timestep) -> float:
        return float(self.alphas_cumprod[self.timesteps[self.index(timestep)]])

    def step(self, model_output, timestep, sample, to_final=False, previous=None, noise=None):
        """Consistency step; ``noise`` is diffusers' ``randn_tensor`` draw of this step (none at the last step)."""
        if to_final:
            return self.x0(model_output, timestep, sample)
        i = self.index(timestep)
        t = int(self.timesteps[i])
        denoised = lcm_denoise(model_output, sample, self.alpha(t), t)
        if i == len(self.timesteps) - 1:
            return denoised
        check_noise(self.name, noise, sample)
        return lcm_renoise(denoised, noise, float(self.alphas_cumprod[self.timesteps[i + 1]]))
