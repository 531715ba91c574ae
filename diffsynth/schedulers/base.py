"""The sampler interface every pipeline uses, and the registry of samplers by name (``sampler="dpmpp_2m_karras"``).

One convention for all samplers: the latent a pipeline holds between steps is the
variance-preserving sample ``x = sqrt(a) * x0 + sqrt(1 - a) * eps`` at the sampler's current
noise level (``a``: the cumulative alpha, ``a = 1 / (1 + sigma^2)`` for the samplers that think in
sigmas). So the UNet always gets the latent as it is (no input scaling), the first latent of
text-to-image is the plain CPU noise (diffusers' ``noise * init_noise_sigma`` divided by
``sqrt(1 + sigma_max^2)``: the same image for a seed), the last step lands on x0, and the parts of
the pipelines that work on latents (img2img's ``add_noise``, the video smoother's
``return_to_timestep``, the VAE decode, the sliding-window average of the noise predictions)
are the same for every sampler. A sampler in sigma space (Euler) converts on the way in and out.

Per frame, a step may need more than the latent:

- ``needs_previous``: a multistep solver (DPM-Solver++ 2M) needs the x0 prediction of the frame's
  previous step (``previous``; None at the first step). The pipeline keeps it with the latents
  (the video pipeline in the output folder, written before the latent of the same frame, so a
  killed run resumes identically). :meth:`Sampler.x0` gives the value to keep.
- ``needs_noise``: an ancestral or consistency sampler (Euler a, LCM) adds fresh noise at each
  step but the last (``noise``, a standard normal tensor shaped like the latent). Images draw it
  from the run's generator, as diffusers does; the video pipeline draws it per frame and step
  from the run's seed (:func:`frame_step_noise`), so it never depends on how far a run got or
  which process rendered the frame.

Timesteps are passed as the values in ``sampler.timesteps`` (descending int64, unique): a sampler
looks up its step index from them.
"""
from __future__ import annotations

import hashlib
import importlib
import math

import torch

__all__ = ["Sampler", "SAMPLERS", "SAMPLER_HELP", "make_sampler", "sampler_class", "sampler_names", "frame_step_noise", "check_sampler_name"]

SAMPLER_HELP = ("ddim: the original's (20-30 steps); dpmpp_2m_karras: DDIM's quality in fewer steps (15-25); dpmpp_2m (20-30); "
                "euler (20-30); euler_a: ancestral, more varied (20-40); lcm: 4-8 steps with an LCM-LoRA or AnimateLCM (cfg 1-2)")
"""One line on each sampler and the step counts people use with it (the WebUI's help, the CLI's)."""

SAMPLERS: dict[str, type] = {}
"""name -> Sampler subclass; filled by each sampler module (``register``)."""


def register(cls):
    SAMPLERS[cls.name] = cls
    return cls


def sampler_names() -> tuple[str, ...]:
    _load_all()
    return tuple(SAMPLERS)


def check_sampler_name(name) -> str | None:
    """None when ``name`` is a known sampler, else the message naming the known ones."""
    _load_all()
    if name in SAMPLERS:
        return None
    return f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}"


def sampler_class(name: str) -> type:
    """The class of the sampler ``name`` (its ``needs_previous``/``needs_noise`` without building one); ValueError naming the known ones."""
    problem = check_sampler_name(name)
    if problem is not None:
        raise ValueError(problem)
    return SAMPLERS[name]


def make_sampler(name: str = "ddim", beta_schedule: str = "scaled_linear", num_train_timesteps: int = 1000,
                 beta_start: float = 0.00085, beta_end: float = 0.012) -> "Sampler":
    """The sampler ``name`` over the given training noise schedule (SD 1.x's by default; AnimateDiff's is ``linear``)."""
    return sampler_class(name)(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule)


def _load_all() -> None:
    """Import every sampler module (each registers its samplers when imported)."""
    for module in ("ddim", "euler", "dpmpp", "lcm"):
        importlib.import_module(f"{__package__}.{module}")


def frame_step_noise(seed: int, frame: int, step: int, shape, dtype=torch.float32) -> torch.Tensor:
    """The fresh noise of frame ``frame`` at step ``step`` of a stochastic sampler in a video run seeded ``seed``.

    Drawn on the CPU from a generator seeded by a hash of the three numbers: the same whoever
    computes it, whenever.
    """
    digest = hashlib.sha256(f"diffsynth-sampler-noise/{int(seed)}/{int(frame)}/{int(step)}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(tuple(shape), generator=generator, dtype=dtype)


class Sampler:
    """What a pipeline calls. Subclasses set ``name`` and implement :meth:`set_timesteps`, :meth:`alpha` and :meth:`step`.

    Attributes: ``alphas_cumprod`` (float64, one per training timestep), ``timesteps`` (int64,
    descending, the UNet's timestep of each step), ``needs_previous``, ``needs_noise``.
    """

    name = "?"
    needs_previous = False
    needs_noise = False

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear"):
        from .ddim import cumulative_alphas, make_betas

        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_schedule = beta_schedule
        self.alphas_cumprod = cumulative_alphas(make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule))
        self.set_timesteps(10)

    # ---- to implement
    def set_timesteps(self, num_inference_steps: int, denoising_strength: float = 1.0) -> None:
        """Prepare a run. ``denoising_strength`` < 1 (img2img) keeps the original's meaning: the run starts at the noise
        level of timestep ``round(1000 * strength) - 1`` and takes ``num_inference_steps`` steps down from there."""
        raise NotImplementedError

    def alpha(self, timestep) -> float:
        """The cumulative alpha of the latent at ``timestep``'s step (``1 / (1 + sigma^2)`` for sigma samplers)."""
        raise NotImplementedError

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, to_final: bool = False,
             previous: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The latent after this step (``to_final``: the x0 prediction instead). ``previous``/``noise``: see the module doc."""
        raise NotImplementedError

    # ---- shared
    def index(self, timestep) -> int:
        """The step index of ``timestep`` in the current schedule."""
        t = int(timestep.item()) if isinstance(timestep, torch.Tensor) else int(timestep)
        matches = (self.timesteps == t).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {t} is not in the {self.name} schedule {self.timesteps.tolist()}; call set_timesteps() with this run's settings")
        return int(matches[0, 0])

    def x0(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        """The x0 (data) prediction of ``sample`` at ``timestep``: what a multistep sampler keeps as the next step's ``previous``."""
        a = self.alpha(timestep)
        return ((sample - math.sqrt(1.0 - a) * model_output) / math.sqrt(a)).to(sample.dtype)

    def return_to_timestep(self, timestep, sample: torch.Tensor, sample_stablized: torch.Tensor) -> torch.Tensor:
        """The noise prediction whose x0 prediction at ``timestep`` is ``sample_stablized`` (the video smoother's steering)."""
        a = self.alpha(timestep)
        return ((sample - math.sqrt(a) * sample_stablized) / math.sqrt(1.0 - a)).to(sample.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
        """``original_samples`` noised to the latent of ``timestep``'s step (img2img's start)."""
        a = self.alpha(timestep)
        return (math.sqrt(a) * original_samples + math.sqrt(1.0 - a) * noise).to(original_samples.dtype)
