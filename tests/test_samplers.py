"""The samplers by name against diffusers 0.42.1 (SD 1.5's scheduler config), on our VP-latent convention.

Trajectories run in float32, the pipelines' dtype. Unless a test says otherwise the diffusers reference
is given our float64 ``alphas_cumprod`` before ``set_timesteps``: diffusers builds the table with a float32
cumprod, whose sigmas are off by up to 1.3e-5 relative (at t = 0), and that alone moves sigma-space
samples (|s| ~ 15) by ~1e-5; with the same table every step agrees within 1e-5 absolute in diffusers'
space, so the check is about the step formulas. ``test_untouched_reference_trajectories`` runs the
references as a user gets them, within 1e-5 of the sample's scale.
"""

import logging
import math

import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       LCMScheduler)

from diffsynth.schedulers import EnhancedDDIMScheduler, make_sampler, sampler_names
from diffsynth.schedulers.euler import strictly_descending
from diffsynth.schedulers.lcm import consistency_scalings

SD15_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", clip_sample=False,
                   set_alpha_to_one=False)
REFERENCES = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "lcm": (LCMScheduler, {}),
}
NEW = tuple(REFERENCES)
STEP_COUNTS = {name: (1, 2, 4, 6, 10, 20, 25, 44) for name in NEW} | {"lcm": (1, 2, 3, 4, 6, 8)}
SHAPE = (1, 4, 8, 8)
ATOL = 1e-5

logging.getLogger("diffusers").setLevel(logging.ERROR)  # from_config's notes on config keys a scheduler ignores


def reference(name, beta_schedule="scaled_linear", alphas_cumprod=None):
    cls, extra = REFERENCES[name]
    ref = cls.from_config(dict(SD15_CONFIG, beta_schedule=beta_schedule, **extra))
    if alphas_cumprod is not None:
        ref.alphas_cumprod = alphas_cumprod.clone()
    return ref


def fake_eps(x, t):
    """A deterministic stand-in for the UNet: a fixed nonlinear map of x plus a timestep-dependent term."""
    g = torch.Generator().manual_seed(1234)
    mix = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    xd = x.to(torch.float64)
    eps = 0.8 * xd + 0.3 * torch.tanh(torch.einsum("oc,bchw->bohw", mix, xd)) + 0.2 * math.cos(float(t) / 97.0) * bias
    return eps.to(x.dtype)


def to_diffusers_space(sampler, latent, step_index):
    """Our VP latent after step ``step_index`` in diffusers' sample space (sigma space for the Euler samplers)."""
    if sampler.name in ("euler", "euler_a"):
        return latent * math.sqrt(1.0 + float(sampler.sigmas[step_index + 1]) ** 2)
    return latent


def run_both(name, num_steps, beta_schedule="scaled_linear", same_table=True, custom_timesteps=None,
             denoising_strength=1.0):
    """Run our sampler and diffusers' side by side from the same noise; yield per-step comparisons.

    Yields (step index, UNet input diff, sample diff in diffusers' space, reference sample, reference, our x0,
    our previous). Fresh noise is replayed: diffusers draws ``randn_tensor(shape, generator=g)`` (a plain
    ``torch.randn`` on the CPU) inside its step; we draw from a second generator with the same seed, in the same
    order (Euler a draws at every step, its last draw multiplied by sigma_up = 0; LCM at all steps but the last).
    """
    sampler = make_sampler(name, beta_schedule=beta_schedule)
    sampler.set_timesteps(num_steps, denoising_strength)
    ref = reference(name, beta_schedule, sampler.alphas_cumprod if same_table else None)
    if custom_timesteps is None:
        ref.set_timesteps(num_steps)
    else:
        ref.set_timesteps(timesteps=custom_timesteps)
    assert ref.timesteps.to(torch.int64).tolist() == sampler.timesteps.tolist()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    sample = noise * ref.init_noise_sigma  # diffusers' prepare_latents
    x = noise.clone()  # ours: the plain noise is the first VP latent
    ref_gen, our_gen = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    previous = None
    n = len(sampler.timesteps)
    for i, (t_ref, t) in enumerate(zip(ref.timesteps, sampler.timesteps)):
        unet_in = ref.scale_model_input(sample, t_ref)
        input_diff = (unet_in - x).abs().max().item()
        step_noise = None
        if name == "euler_a" or (name == "lcm" and i < n - 1):
            step_noise = torch.randn(SHAPE, generator=our_gen, dtype=x.dtype)
        eps_ref, eps = fake_eps(unet_in, t_ref), fake_eps(x, t)
        x0 = sampler.x0(eps, t, x)
        sample = ref.step(eps_ref, t_ref, sample, generator=ref_gen).prev_sample
        x = sampler.step(eps, t, x, previous=previous, noise=step_noise)
        diff = (to_diffusers_space(sampler, x, i) - sample).abs().max().item()
        yield i, input_diff, diff, sample, ref, x0, previous
        previous = x0


# ---- names ------------------------------------------------------------------------------


def test_names_registered_with_their_needs():
    assert set(sampler_names()) == {"ddim", *NEW}
    needs = {name: (make_sampler(name).needs_previous, make_sampler(name).needs_noise) for name in sampler_names()}
    assert needs == {"ddim": (False, False), "euler": (False, False), "euler_a": (False, True),
                     "dpmpp_2m": (True, False), "dpmpp_2m_karras": (True, False), "lcm": (False, True)}


def test_ddim_unchanged():
    sampler = make_sampler("ddim")
    assert type(sampler) is EnhancedDDIMScheduler
    sampler.set_timesteps(20)
    assert sampler.timesteps.tolist() == [999, 946, 894, 841, 789, 736, 684, 631, 578, 526, 473, 421, 368, 315,
                                          263, 210, 158, 105, 53, 0]


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError) as info:
        make_sampler("foo")
    assert "'foo'" in str(info.value)
    for name in sampler_names():
        assert name in str(info.value)


@pytest.mark.parametrize("name", NEW)
def test_run_settings_validated(name):
    sampler = make_sampler(name)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampler.set_timesteps(0)
    with pytest.raises(TypeError, match="num_inference_steps"):
        sampler.set_timesteps(2.5)
    for strength in (0.0, 1.5):
        with pytest.raises(ValueError, match="denoising_strength"):
            sampler.set_timesteps(10, strength)


# ---- timesteps --------------------------------------------------------------------------


def test_our_table_is_diffusers_table():
    """The float64 table we give the references is diffusers' float32 one, more accurately."""
    for beta_schedule in ("scaled_linear", "linear"):
        ours = make_sampler("euler", beta_schedule=beta_schedule).alphas_cumprod
        theirs = reference("euler", beta_schedule).alphas_cumprod.double()
        assert torch.allclose(ours, theirs, rtol=2e-6, atol=0)


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m"])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_leading_timesteps_match_diffusers(name, beta_schedule):
    sampler, ref = make_sampler(name, beta_schedule=beta_schedule), reference(name, beta_schedule)
    for n in [*range(1, 101), 250, 500, 998]:
        sampler.set_timesteps(n)
        ref.set_timesteps(n)
        assert sampler.timesteps.tolist() == ref.timesteps.to(torch.int64).tolist(), n
        assert sampler.timesteps.dtype == torch.int64
        assert torch.allclose(sampler.sigmas, ref.sigmas.double(), rtol=2e-5, atol=0), n


def test_leading_golden():
    euler, dpm = make_sampler("euler"), make_sampler("dpmpp_2m")
    euler.set_timesteps(20)
    dpm.set_timesteps(20)
    assert euler.timesteps.tolist() == list(range(951, 0, -50))
    assert dpm.timesteps.tolist() == list(range(941, 47, -47))


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_karras_timesteps_match_diffusers(beta_schedule):
    sampler, ref = make_sampler("dpmpp_2m_karras", beta_schedule=beta_schedule), reference("dpmpp_2m_karras", beta_schedule)
    for n in range(1, 101):
        sampler.set_timesteps(n)
        ref.set_timesteps(n)
        theirs = ref.timesteps.tolist()
        assert torch.allclose(sampler.sigmas, ref.sigmas.double(), rtol=2e-5, atol=0), n
        if len(set(theirs)) == len(theirs):
            assert sampler.timesteps.tolist() == theirs, n
        else:  # from 45 steps (SD 1.5): two Karras sigmas round to one timestep; the upper one is raised
            assert sampler.timesteps.tolist() == strictly_descending(theirs, 999) != theirs, n

    if beta_schedule == "scaled_linear":
        sampler.set_timesteps(44)
        assert sampler.timesteps.tolist()[-5:] == [5, 3, 2, 1, 0]
        sampler.set_timesteps(45)
        assert sampler.timesteps.tolist()[-5:] == [4, 3, 2, 1, 0]  # diffusers: ..., 4, 3, 1, 1, 0
        sampler.set_timesteps(50)
        assert sampler.timesteps.tolist()[-6:] == [6, 4, 3, 2, 1, 0]  # diffusers: ..., 6, 4, 2, 1, 1, 0


def test_lcm_timesteps_match_diffusers():
    sampler, ref = make_sampler("lcm"), reference("lcm")
    for n in range(1, 51):
        sampler.set_timesteps(n)
        ref.set_timesteps(n)
        assert sampler.timesteps.tolist() == ref.timesteps.tolist(), n
    sampler.set_timesteps(4)
    assert sampler.timesteps.tolist() == [999, 759, 499, 259]
    sampler.set_timesteps(80)  # diffusers raises above original_inference_steps; we cap like DDIM
    assert len(sampler.timesteps) == 50


@pytest.mark.parametrize("strength", [0.5, 0.3, 0.8, 0.06])
def test_lcm_strength_is_diffusers_strength(strength):
    count = round(50 * strength)
    sampler, ref = make_sampler("lcm"), reference("lcm")
    for n in range(1, count + 1):
        sampler.set_timesteps(n, strength)
        ref.set_timesteps(n, strength=strength)
        assert sampler.timesteps.tolist() == ref.timesteps.tolist(), n


def test_lcm_strength_counts_in_integers():
    # diffusers computes int(50 * 0.58) = int(28.999999999999996) = 28 grid timesteps; T_max = 579 is one of the 29
    sampler = make_sampler("lcm")
    sampler.set_timesteps(4, 0.58)
    assert sampler.timesteps[0] == 579
    sampler.set_timesteps(4, 0.75)  # T_max = 749: the highest grid timestep at or below it
    assert sampler.timesteps.tolist() == [739, 559, 379, 199]
    sampler.set_timesteps(4, 0.01)  # below the grid: one step at T_max
    assert sampler.timesteps.tolist() == [9]


# ---- img2img strength -------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("num_steps", [1, 4, 10, 20])
def test_strength_starts_at_t_max(name, num_steps):
    sampler = make_sampler(name)
    sampler.set_timesteps(num_steps, 0.5)
    assert len(sampler.timesteps) == num_steps
    assert sampler.timesteps[0] == 499
    assert sampler.alpha(sampler.timesteps[0]) == pytest.approx(float(sampler.alphas_cumprod[499]), rel=1e-12)
    sampler.set_timesteps(num_steps, 0.75)
    first = sampler.alpha(sampler.timesteps[0])
    if name == "lcm":  # the distillation grid's 739, 10 timesteps below T_max
        assert first == pytest.approx(float(sampler.alphas_cumprod[739]), rel=1e-12)
    else:
        assert first == pytest.approx(float(sampler.alphas_cumprod[749]), rel=1e-12)


def test_strength_golden():
    expected = {"euler": [499, 374, 249, 124], "euler_a": [499, 374, 249, 124], "dpmpp_2m": [499, 399, 299, 199],
                "lcm": [499, 379, 259, 139]}
    for name, steps in expected.items():
        sampler = make_sampler(name)
        sampler.set_timesteps(4, 0.5)
        assert sampler.timesteps.tolist() == steps, name
    karras = make_sampler("dpmpp_2m_karras")
    karras.set_timesteps(4, 0.5)
    table = ((1 - karras.alphas_cumprod) / karras.alphas_cumprod).sqrt()
    assert karras.sigmas[0].item() == pytest.approx(table[499].item(), rel=1e-12)
    assert karras.sigmas[-2].item() == pytest.approx(table[0].item(), rel=1e-12)
    assert karras.timesteps[-1] == 0 and karras.sigmas[-1] == 0


@pytest.mark.parametrize("name", NEW)
def test_timesteps_unique_descending_and_capped(name):
    sampler = make_sampler(name)
    for strength in (1.0, 0.9996, 0.75, 0.5, 0.1, 0.004, 0.0001):
        t_max = max(round(1000 * strength) - 1, 0)
        for n in (1, 2, 7, 50, 200, 999):
            sampler.set_timesteps(n, strength)
            steps = sampler.timesteps.tolist()
            assert 1 <= len(steps) <= n
            assert all(a > b for a, b in zip(steps, steps[1:])), (strength, n, steps)
            assert 0 <= steps[-1] and steps[0] <= t_max
            if t_max < 999 and name != "lcm":
                assert steps[0] == t_max
            for t in steps:
                assert 0 < sampler.alpha(t) < 1
    sampler.set_timesteps(50, 0.004)  # T_max = 3
    assert sampler.timesteps.tolist() == {"euler": [3, 2, 1, 0], "euler_a": [3, 2, 1, 0], "dpmpp_2m": [3, 2, 1],
                                          "dpmpp_2m_karras": [3, 2, 1, 0], "lcm": [3]}[name]


# ---- trajectories -----------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_trajectories_match_diffusers(name):
    for n in STEP_COUNTS[name]:
        for i, input_diff, diff, *_ in run_both(name, n):
            assert input_diff <= ATOL, (n, i, input_diff)  # the UNet sees our latent as it is
            assert diff <= ATOL, (n, i, diff)


@pytest.mark.parametrize("name", NEW)
def test_trajectories_match_diffusers_linear_betas(name):
    for n in (4, 10):
        for i, input_diff, diff, *_ in run_both(name, n, beta_schedule="linear"):
            assert input_diff <= ATOL and diff <= ATOL, (n, i, input_diff, diff)


@pytest.mark.parametrize("name", NEW)
def test_untouched_reference_trajectories(name):
    for n in (4, 10, 25) if name != "lcm" else (2, 4, 8):
        for i, _, diff, sample, *_ in run_both(name, n, same_table=False):
            assert diff <= ATOL * max(1.0, sample.abs().max().item()), (n, i, diff)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "lcm"])
def test_strength_schedule_steps_as_diffusers_would(name):
    """Below full strength only the choice of timesteps differs from diffusers: given them, it steps identically.

    (diffusers' Euler a takes no custom timesteps; it shares "euler"'s set_timesteps.)
    """
    sampler = make_sampler(name)
    sampler.set_timesteps(6, 0.5)
    timesteps = sampler.timesteps.tolist()
    for i, input_diff, diff, *_ in run_both(name, 6, custom_timesteps=timesteps, denoising_strength=0.5):
        assert input_diff <= ATOL and diff <= ATOL, (i, input_diff, diff)


@pytest.mark.parametrize("strength, timestep", [(0.0005, 0), (0.01, 9)])
def test_lcm_boundary_condition_at_low_timesteps(strength, timestep):
    """c_skip is ~1e-8 on the usual grid; at t = 0 the consistency function must return the sample itself."""
    ref = reference("lcm")
    for t in (0, 1, 5, 19, 259, 999):
        assert consistency_scalings(t) == pytest.approx(ref.get_scalings_for_boundary_condition_discrete(t), rel=1e-12)
    assert consistency_scalings(0) == (1.0, 0.0)
    for i, _, diff, *_ in run_both("lcm", 1, custom_timesteps=[timestep], denoising_strength=strength):
        assert diff <= ATOL, (i, diff)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_karras"])
def test_previous_is_diffusers_model_output(name):
    for n in (6, 20):
        for i, _, _, _, ref, x0, previous in run_both(name, n):
            # after step i diffusers holds this step's data prediction; ours was computed by x0() before the step
            assert (ref.model_outputs[-1] - x0).abs().max().item() <= ATOL, (n, i)
            if previous is not None:
                assert (ref.model_outputs[-2] - previous).abs().max().item() <= ATOL, (n, i)


def test_dpmpp_order_rules():
    sampler = make_sampler("dpmpp_2m")
    sampler.set_timesteps(20)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    eps = fake_eps(x, 0)
    junk = torch.full(SHAPE, 100.0)
    t_first, t_mid, t_last = sampler.timesteps[0], sampler.timesteps[5], sampler.timesteps[-1]
    # first and last steps are first order: previous is ignored; the last lands on x0
    assert torch.equal(sampler.step(eps, t_first, x), sampler.step(eps, t_first, x, previous=junk))
    assert torch.equal(sampler.step(eps, t_last, x), sampler.step(eps, t_last, x, previous=junk))
    assert torch.equal(sampler.step(eps, t_last, x), sampler.x0(eps, t_last, x))
    # other steps are second order and need it
    assert not torch.allclose(sampler.step(eps, t_mid, x, previous=junk), sampler.step(eps, t_mid, x, previous=x))
    with pytest.raises(ValueError, match="dpmpp_2m.*previous"):
        sampler.step(eps, t_mid, x)
    assert torch.equal(sampler.step(eps, t_mid, x, to_final=True), sampler.x0(eps, t_mid, x))


@pytest.mark.parametrize("name", ["euler_a", "lcm"])
def test_noise_required_except_at_last_step(name):
    sampler = make_sampler(name)
    sampler.set_timesteps(4)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    eps = fake_eps(x, 0)
    with pytest.raises(ValueError, match=name):
        sampler.step(eps, sampler.timesteps[0], x)
    with pytest.raises(ValueError, match="shaped like"):
        sampler.step(eps, sampler.timesteps[0], x, noise=torch.zeros(1, 4, 4, 4))
    last = sampler.timesteps[-1]
    assert torch.equal(sampler.step(eps, last, x), sampler.step(eps, last, x, noise=torch.randn(SHAPE)))
    a, b = (sampler.step(eps, sampler.timesteps[0], x, noise=torch.full(SHAPE, v)) for v in (0.0, 1.0))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", NEW)
def test_to_final_is_x0_and_round_trips(name):
    sampler = make_sampler(name)
    sampler.set_timesteps(10)
    t = sampler.timesteps[3]
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    eps = fake_eps(x, t)
    x0 = sampler.step(eps, t, x, to_final=True)
    assert torch.equal(x0, sampler.x0(eps, t, x))
    a = sampler.alpha(t)
    assert torch.allclose(math.sqrt(a) * x0 + math.sqrt(1 - a) * eps, x, atol=1e-12)
    assert torch.allclose(sampler.return_to_timestep(t, x, x0), eps, atol=1e-10)


@pytest.mark.parametrize("name", NEW)
def test_half_precision_latents_step_in_float32(name):
    sampler = make_sampler(name)
    sampler.set_timesteps(4)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    eps, noise = fake_eps(x, 0), torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    t = sampler.timesteps[1]
    previous = sampler.x0(eps, sampler.timesteps[0], x)
    full = sampler.step(eps, t, x, previous=previous, noise=noise)
    half = sampler.step(eps.half(), t, x.half(), previous=previous.half(), noise=noise)
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), full, atol=1e-2)
