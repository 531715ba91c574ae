"""Golden-number tests for the DDIM scheduler (upstream_spec §4)."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from diffsynth.schedulers import EnhancedDDIMScheduler
from diffsynth.schedulers.ddim import (
    ddim_add_noise,
    ddim_eps_for_target,
    ddim_step,
    ddim_timesteps,
    make_betas,
)

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012)


def diffusers_reference(beta_schedule):
    # clip_sample defaults to True in diffusers and would clamp x0 to [-1, 1]; the original never clamps.
    return DDIMScheduler(beta_schedule=beta_schedule, clip_sample=False, **SD_BETAS)


# --- timesteps ---------------------------------------------------------------------------


def test_twenty_steps_golden():
    expected = [999, 946, 894, 841, 789, 736, 684, 631, 578, 526, 473, 421, 368, 315, 263, 210, 158, 105, 53, 0]
    scheduler = EnhancedDDIMScheduler()
    scheduler.set_timesteps(20)
    assert scheduler.timesteps.tolist() == expected
    assert scheduler.timesteps.dtype == torch.int64 and scheduler.timesteps.ndim == 1


def test_ten_steps_golden_and_constructor_default():
    expected = [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert EnhancedDDIMScheduler().timesteps.tolist() == expected  # constructor prepares 10 steps
    assert ddim_timesteps(10) == expected


def test_one_step_partial_strength():
    assert ddim_timesteps(1, 0.7) == [699]


def test_bankers_rounding_is_used():
    # strength 0.998 -> T_max = 997; the middle of 3 steps is 498.5, which Python rounds to
    # 498 (half to even); half-up rounding would give 499.
    assert ddim_timesteps(3, 0.998) == [997, 498, 0]


def test_steps_capped_at_available_timesteps():
    # strength 0.004 -> T_max = 3, so at most 4 distinct steps
    assert ddim_timesteps(50, 0.004) == [3, 2, 1, 0]
    assert ddim_timesteps(7, 0.0001) == [0]


@pytest.mark.parametrize(
    "args, match",
    [
        ((0,), "num_inference_steps must be >= 1, got 0"),
        ((10, 0.0), "denoising_strength must be in \\(0, 1\\], got 0.0"),
        ((10, 1.5), "denoising_strength must be in \\(0, 1\\], got 1.5"),
    ],
)
def test_set_timesteps_validates(args, match):
    with pytest.raises(ValueError, match=match):
        EnhancedDDIMScheduler().set_timesteps(*args)


def test_set_timesteps_rejects_non_integer_steps():
    with pytest.raises(TypeError, match="num_inference_steps must be an int, got 2.5"):
        ddim_timesteps(2.5)


# --- noise schedule ----------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_match_diffusers(beta_schedule):
    ours = EnhancedDDIMScheduler(beta_schedule=beta_schedule).alphas_cumprod
    reference = diffusers_reference(beta_schedule).alphas_cumprod.double()
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    # diffusers builds its betas in float32, hence the 1e-6 tolerance
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_alphas_cumprod_exact_float64_formula():
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    expected = torch.from_numpy(np.cumprod(1.0 - betas))
    torch.testing.assert_close(EnhancedDDIMScheduler().alphas_cumprod, expected, rtol=1e-13, atol=0)


def test_unknown_beta_schedule_names_valid_ones():
    with pytest.raises(ValueError, match="unknown beta_schedule 'cosine'.*'scaled_linear', 'linear'"):
        EnhancedDDIMScheduler(beta_schedule="cosine")


def test_bad_betas_rejected():
    with pytest.raises(ValueError, match="beta_start=0.02, beta_end=0.012"):
        make_betas(1000, 0.02, 0.012, "linear")


# --- step / add_noise / return_to_timestep -----------------------------------------------


def _tensors(seed=0, shape=(1, 4, 8, 8), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


def test_step_matches_hand_formula():
    scheduler = EnhancedDDIMScheduler()
    scheduler.set_timesteps(20)
    x, eps = _tensors()
    a = scheduler.alphas_cumprod[946].item()
    a_next = scheduler.alphas_cumprod[894].item()
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    expected = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    out = scheduler.step(eps, 946, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.dtype == x.dtype


def test_step_last_timestep_goes_to_x0():
    scheduler = EnhancedDDIMScheduler()
    x, eps = _tensors(1)
    a = scheduler.alphas_cumprod[0].item()
    expected = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    torch.testing.assert_close(scheduler.step(eps, 0, x), expected, rtol=1e-5, atol=1e-5)


def _diffusers_steps_to(ds, t, t_next):
    """Make diffusers' DDIM step from t land on t_next (it steps by 1000 // num_inference_steps)."""
    for m in range(1, 1001):
        if 1000 // m == t - t_next:
            ds.set_timesteps(m)
            return True
    return False


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_step_matches_diffusers_ddim_eta0(beta_schedule):
    ours = EnhancedDDIMScheduler(beta_schedule=beta_schedule)
    ours.set_timesteps(10)  # every gap is 111 = 1000 // 9
    ds = diffusers_reference(beta_schedule)
    schedule = ours.timesteps.tolist()
    x, eps = _tensors(2)
    for t, t_next in zip(schedule[:-1], schedule[1:]):
        assert _diffusers_steps_to(ds, t, t_next)
        expected = ds.step(eps, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(ours.step(eps, t, x), expected, rtol=1e-4, atol=1e-4)


def test_step_matches_diffusers_on_twenty_step_gap():
    ours = EnhancedDDIMScheduler()
    ours.set_timesteps(20)
    ds = diffusers_reference("scaled_linear")
    x, eps = _tensors(3)
    assert _diffusers_steps_to(ds, 946, 894)  # gap 52 = 1000 // 19
    expected = ds.step(eps, 946, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours.step(eps, 946, x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("timestep", [736, torch.tensor(736), torch.tensor([736]), 736.0])
def test_timestep_forms_are_equivalent(timestep):
    scheduler = EnhancedDDIMScheduler()
    scheduler.set_timesteps(20)
    x, eps = _tensors(4)
    torch.testing.assert_close(scheduler.step(eps, timestep, x), scheduler.step(eps, 736, x), rtol=0, atol=0)
    torch.testing.assert_close(scheduler.add_noise(x, eps, timestep), scheduler.add_noise(x, eps, 736), rtol=0, atol=0)


def test_iterating_timesteps_tensor_works_with_step():
    scheduler = EnhancedDDIMScheduler()
    scheduler.set_timesteps(4)
    x, eps = _tensors(5)
    for t in scheduler.timesteps:
        x = scheduler.step(eps, t, x)
    assert torch.isfinite(x).all()


def test_to_final_recovers_x0():
    scheduler = EnhancedDDIMScheduler()
    x0, eps = _tensors(6)
    for t in (999, 500, 17):
        x_t = scheduler.add_noise(x0, eps, t)
        torch.testing.assert_close(scheduler.step(eps, t, x_t, to_final=True), x0, rtol=1e-4, atol=1e-4)


def test_add_noise_formula():
    scheduler = EnhancedDDIMScheduler()
    x0, eps = _tensors(7)
    a = scheduler.alphas_cumprod[300].item()
    torch.testing.assert_close(scheduler.add_noise(x0, eps, 300), math.sqrt(a) * x0 + math.sqrt(1 - a) * eps)


def test_return_to_timestep_inverts_final_step():
    scheduler = EnhancedDDIMScheduler()
    x_t, target = _tensors(8)
    eps = scheduler.return_to_timestep(631, x_t, target)
    torch.testing.assert_close(scheduler.step(eps, 631, x_t, to_final=True), target, rtol=1e-4, atol=1e-4)


def test_outputs_keep_sample_dtype():
    scheduler = EnhancedDDIMScheduler()
    x, eps = _tensors(9, dtype=torch.float16)
    assert scheduler.step(eps, 999, x).dtype == torch.float16
    assert scheduler.add_noise(x, eps, 999).dtype == torch.float16
    assert scheduler.return_to_timestep(999, x, x).dtype == torch.float16


def test_step_with_timestep_outside_schedule_explains():
    scheduler = EnhancedDDIMScheduler()
    x, eps = _tensors(10)
    with pytest.raises(ValueError, match="timestep 500 is not in the current schedule.*set_timesteps"):
        scheduler.step(eps, 500, x)
    scheduler.step(eps, 500, x, to_final=True)  # no schedule needed to jump to x0


@pytest.mark.parametrize(
    "timestep, error, match",
    [
        (1000, ValueError, "timestep must be in \\[0, 999\\], got 1000"),
        (-1, ValueError, "got -1"),
        (10.5, ValueError, "whole number, got 10.5"),
        (torch.tensor([1, 2]), ValueError, "single value"),
        ("10", TypeError, "timestep must be"),
    ],
)
def test_bad_timesteps_rejected(timestep, error, match):
    x, eps = _tensors(11)
    with pytest.raises(error, match=match):
        EnhancedDDIMScheduler().add_noise(x, eps, timestep)


def test_pure_functions_validate_alphas():
    x, eps = _tensors(12)
    with pytest.raises(ValueError, match="alpha_next must be a cumulative alpha in \\(0, 1\\], got 1.5"):
        ddim_step(eps, x, 0.5, 1.5)
    with pytest.raises(ValueError, match="alpha_t must be a cumulative alpha in \\(0, 1\\), got 1.0"):
        ddim_eps_for_target(x, x, 1.0)
    torch.testing.assert_close(ddim_add_noise(x, eps, 1.0), x)
