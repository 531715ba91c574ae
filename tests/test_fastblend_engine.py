"""FastBlend patch-match engine: kernels against brute force, NNF behaviour, pyramid, backends.

The brute-force references below are written straight from the formulas of
`shared/reference/upstream_spec.md` §8.2 (loops over pixels and offsets, float64), independent
of the vectorised torch kernels they check.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffsynth.extensions.FastBlend.patch_match import (
    PatchMatcher,
    PyramidPatchMatcher,
    TorchKernels,
    cupy_available,
    pairwise_patch_error,
    patch_error,
    pyramid_sizes,
    remap,
    resample_area,
    upscale_nnf,
)

# ---------------------------------------------------------------------------------------------
# Brute-force references
# ---------------------------------------------------------------------------------------------


def brute_remap(style, nnf, k):
    """T(p) = mean over q of S(nnf(p+q) - q), p+q and nnf(p+q)-q inside the image."""
    b_, h, w, c = style.shape
    r = k // 2
    out = np.zeros((b_, h, w, c))
    for b in range(b_):
        for y in range(h):
            for x in range(w):
                total, count = np.zeros(c), 0
                for qy in range(-r, r + 1):
                    for qx in range(-r, r + 1):
                        yy, xx = y + qy, x + qx
                        if not (0 <= yy < h and 0 <= xx < w):
                            continue
                        sy, sx = nnf[b, yy, xx, 0] - qy, nnf[b, yy, xx, 1] - qx
                        if not (0 <= sy < h and 0 <= sx < w):
                            continue
                        total += style[b, sy, sx]
                        count += 1
                out[b, y, x] = total / count
    return out


def brute_patch_error(source_padded, nnf, target_padded, k, weights):
    """E(p) = sum_q sum_c w_c (T(p+q) - S(nnf(p)+q))^2 over the zero-padded images."""
    b_, h, w, _ = nnf.shape
    pad = (source_padded.shape[1] - h) // 2
    r = k // 2
    out = np.zeros((b_, h, w))
    for b in range(b_):
        for y in range(h):
            for x in range(w):
                my, mx = nnf[b, y, x]
                for qy in range(-r, r + 1):
                    for qx in range(-r, r + 1):
                        d = target_padded[b, y + pad + qy, x + pad + qx] - source_padded[b, my + pad + qy, mx + pad + qx]
                        out[b, y, x] += (weights * d * d).sum()
    return out


def brute_pairwise_error(source_padded, nnf, k):
    """E(p) = sum_q sum_c (S_a(nnf_a(p)+q) - S_b(nnf_b(p)+q))^2 for pairs (2j, 2j+1), both members."""
    b_, h, w, _ = nnf.shape
    pad = (source_padded.shape[1] - h) // 2
    r = k // 2
    out = np.zeros((b_, h, w))
    for j in range(b_ // 2):
        a, b = 2 * j, 2 * j + 1
        for y in range(h):
            for x in range(w):
                (ay, ax), (by, bx) = nnf[a, y, x], nnf[b, y, x]
                e = 0.0
                for qy in range(-r, r + 1):
                    for qx in range(-r, r + 1):
                        d = source_padded[a, ay + pad + qy, ax + pad + qx] - source_padded[b, by + pad + qy, bx + pad + qx]
                        e += (d * d).sum()
                out[a, y, x] = out[b, y, x] = e
    return out


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


def random_case(seed, batch=2, height=7, width=9, channels=3, pad=3):
    g = torch.Generator().manual_seed(seed)
    source = torch.rand(batch, height, width, channels, generator=g) * 255
    target = torch.rand(batch, height, width, channels, generator=g) * 255
    nnf = torch.stack(
        [
            torch.randint(0, height, (batch, height, width), generator=g),
            torch.randint(0, width, (batch, height, width), generator=g),
        ],
        dim=-1,
    ).to(torch.int32)
    padding = (0, 0, pad, pad, pad, pad)
    return source, F.pad(source, padding), F.pad(target, padding), nnf


def texture(batch, height, width, seed, channels=3):
    """Smooth colour blobs plus fine noise, integer valued 0..255: patches are unique."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, height // 8 + 1, width // 8 + 1, generator=g)
    x = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    x = x + 0.1 * torch.rand(batch, channels, height, width, generator=g)
    return (x.clamp(0, 1) * 255).round().permute(0, 2, 3, 1).contiguous()


def identity_field(batch, height, width):
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([rows, cols], dim=-1).expand(batch, height, width, 2).to(torch.int32)


# ---------------------------------------------------------------------------------------------
# Kernels against brute force
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 5, 7])
def test_remap_matches_brute_force(k):
    source, source_padded, _, nnf = random_case(seed=k)
    expected = brute_remap(source.double().numpy(), nnf.numpy(), k)
    got = remap(source_padded, nnf, k)
    assert got.shape == source.shape and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("k", [3, 5])
def test_patch_error_matches_brute_force(k):
    _, source_padded, target_padded, nnf = random_case(seed=10 + k)
    weights = np.array([10.0, 10.0, 10.0])
    expected = brute_patch_error(source_padded.double().numpy(), nnf.numpy(), target_padded.double().numpy(), k, weights)
    got = patch_error(source_padded, nnf, target_padded, k, weights=torch.tensor(weights, dtype=torch.float32))
    assert got.shape == nnf.shape[:3]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    unweighted = patch_error(source_padded, nnf, target_padded, k)
    np.testing.assert_allclose(unweighted.numpy(), expected / 10.0, rtol=1e-5)


@pytest.mark.parametrize("k", [3, 5])
def test_pairwise_patch_error_matches_brute_force(k):
    _, source_padded, _, nnf = random_case(seed=20 + k, batch=4)
    expected = brute_pairwise_error(source_padded.double().numpy(), nnf.numpy(), k)
    got = pairwise_patch_error(source_padded, nnf, k)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="even batch"):
        pairwise_patch_error(source_padded[:3], nnf[:3], k)


def test_padding_must_cover_the_patch():
    _, source_padded, target_padded, nnf = random_case(seed=1, pad=1)
    with pytest.raises(ValueError, match="patch radius"):
        patch_error(source_padded, nnf, target_padded, 5)


def test_subset_error_equals_grid_error():
    """The engine evaluates only changed pixels; that must equal the full-grid error there."""
    _, source_padded, target_padded, nnf = random_case(seed=3, batch=3, height=11, width=13, pad=4)
    kernels = TorchKernels("cpu", chunk_bytes=4096)  # tiny chunks: several chunks per call
    weights = torch.tensor([10.0, 10.0, 10.0])
    grid = kernels.error_grid(source_padded, target_padded, nnf, 7, 4, weights)
    pixels = torch.tensor([0, 5, 77, 142, 200, 428])
    got = kernels.error_at(source_padded, target_padded, pixels, nnf.view(-1, 2)[pixels], 7, 4, weights, (11, 13))
    assert torch.equal(got, grid.view(-1)[pixels])


def test_results_do_not_depend_on_chunk_size():
    """The chunk size follows the thread count; the bits must not."""
    _, source_padded, target_padded, nnf = random_case(seed=4, batch=4, height=12, width=10, pad=6)
    valid = torch.zeros_like(source_padded[..., :1])
    valid[:, 6:-6, 6:-6] = 1.0
    vote = torch.cat([source_padded, valid], dim=-1).contiguous()
    weights = torch.tensor([10.0, 10.0, 1.0])
    reference = TorchKernels("cpu", chunk_bytes=1 << 24)
    for chunk_bytes in (256, 3000, 20000):
        kernels = TorchKernels("cpu", chunk_bytes=chunk_bytes)
        for k in (5, 13):
            for name, args in (
                ("error_grid", (source_padded, target_padded, nnf, k, 6, weights)),
                ("pairwise_grid", (source_padded, nnf, k, 6, weights)),
                ("remap", (vote, nnf, k, 6, 0)),
            ):
                assert torch.equal(getattr(kernels, name)(*args), getattr(reference, name)(*args)), (name, k, chunk_bytes)


# ---------------------------------------------------------------------------------------------
# Patch matching behaviour
# ---------------------------------------------------------------------------------------------

MODES = {
    "default": {},
    "accurate (mean target style)": {"use_mean_target_style": True},
    "interpolation (pairwise)": {"use_pairwise_patch_error": True},
    "tracking": {"tracking_window_size": 1},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_identical_inputs_give_identity_nnf(mode):
    """Identity init on identical guides and styles: every candidate has error >= 0 = current."""
    frame = texture(1, 32, 40, seed=0)
    frames = frame.expand(2, 32, 40, 3)
    matcher = PyramidPatchMatcher(32, 40, **MODES[mode])
    nnf, target_style = matcher.estimate_nnf(frames, frames, frames, seed=0)
    assert nnf.dtype == torch.int32 and nnf.shape == (2, 32, 40, 2)
    assert target_style.dtype == torch.float32 and target_style.shape == (2, 32, 40, 3)
    assert torch.equal(nnf, identity_field(2, 32, 40))
    assert torch.equal(target_style, frames)


def test_shift_is_recovered():
    """Target = source moved by (dy, dx): away from the borders the NNF is p - (dy, dx)."""
    height, width, (dy, dx), margin = 64, 64, (3, -5), 16
    big = texture(1, height + 2 * margin, width + 2 * margin, seed=2)
    source = big[:, margin : margin + height, margin : margin + width]
    target = big[:, margin - dy : margin - dy + height, margin - dx : margin - dx + width]
    style = 255.0 - source  # any image aligned with the source guide
    matcher = PyramidPatchMatcher(height, width)
    assert matcher.pyramid_level == 2
    nnf, target_style = matcher.estimate_nnf(source, target, style, seed=1)
    expected = identity_field(1, height, width) - torch.tensor([dy, dx], dtype=torch.int32)
    inner = (slice(None), slice(8 + 5, height - 8 - 5), slice(8 + 5, width - 8 - 5))
    found = (nnf[inner] == expected[inner]).all(-1).float().mean().item()
    assert found > 0.97, found
    # where the NNF is right everywhere around a pixel, the vote copies the moved style exactly
    moved = 255.0 - target
    assert (target_style[inner] - moved[inner]).abs().mean().item() < 2.0


def test_random_init_converges_to_identity():
    frames = texture(2, 64, 64, seed=5)
    matcher = PyramidPatchMatcher(64, 64, initialize="random")
    nnf, target_style = matcher.estimate_nnf(frames, frames, frames, seed=3)
    identity = (nnf == identity_field(2, 64, 64)).all(-1).float().mean().item()
    assert identity > 0.95, identity
    assert (target_style - frames).abs().mean().item() < 1.0


def test_same_seed_same_result_whatever_ran_before():
    frames = texture(2, 32, 40, seed=6)
    target = torch.roll(frames, shifts=(1, 2), dims=(1, 2))
    matcher = PyramidPatchMatcher(32, 40, initialize="random", num_iter=2)
    first = matcher.estimate_nnf(frames, target, frames, seed=7)
    matcher.estimate_nnf(frames, target, frames)  # consumes the internal counter
    matcher.estimate_nnf(frames, target, frames, seed=8)
    again = matcher.estimate_nnf(frames, target, frames, seed=7)
    fresh = PyramidPatchMatcher(32, 40, initialize="random", num_iter=2).estimate_nnf(frames, target, frames, seed=7)
    for a, b in ((first, again), (first, fresh)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other = matcher.estimate_nnf(frames, target, frames, seed=9)
    assert not torch.equal(first[0], other[0])  # the seed reaches the random init and search


def test_seed_none_uses_base_seed_and_call_counter():
    frames = texture(1, 32, 40, seed=7)
    target = torch.roll(frames, shifts=(2, -1), dims=(1, 2))

    def run_twice(seed):
        matcher = PyramidPatchMatcher(32, 40, initialize="random", num_iter=1, seed=seed)
        return [matcher.estimate_nnf(frames, target, frames)[0] for _ in range(2)]

    a1, a2 = run_twice(0)
    b1, b2 = run_twice(0)
    c1, _ = run_twice(1)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)
    assert not torch.equal(a1, c1)


def test_single_level_patch_matcher_improves_a_bad_field():
    frames = texture(1, 24, 28, seed=8)
    target = torch.roll(frames, shifts=(2, 3), dims=(1, 2))
    matcher = PatchMatcher(24, 28, num_iter=3)
    start = torch.zeros(1, 24, 28, 2, dtype=torch.int32)  # everything matched to (0, 0)
    nnf, target_style = matcher.estimate_nnf(frames, target, frames, start, seed=0)
    k = matcher.patch_size_list[-1]
    pad = matcher.pad_size
    padding = (0, 0, pad, pad, pad, pad)

    def err(field):
        return patch_error(F.pad(frames, padding), field, F.pad(target, padding), k).mean()

    assert err(nnf) < 0.5 * err(start)
    assert torch.equal(target_style, remap(F.pad(frames, padding), nnf, k))


# ---------------------------------------------------------------------------------------------
# Pyramid
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, expected",
    [
        ((512, 512), [(32, 32), (64, 64), (128, 128), (256, 256), (512, 512)]),
        ((1536, 1536), [(48, 48), (96, 96), (192, 192), (384, 384), (768, 768), (1536, 1536)]),
        ((720, 1280), [(45, 80), (90, 160), (180, 320), (360, 640), (720, 1280)]),
        ((32, 40), [(32, 40)]),
        ((20, 20), [(20, 20)]),  # upstream built no level here and crashed
    ],
)
def test_pyramid_levels(size, expected):
    assert pyramid_sizes(*size) == expected
    matcher = PyramidPatchMatcher(*size)  # cheap: nothing is allocated before estimate_nnf
    assert matcher.pyramid_level == len(expected)
    assert list(zip(matcher.pyramid_heights, matcher.pyramid_widths)) == expected


def test_upscale_nnf_exact_doubling_is_upstreams_rule():
    """Repeat x2, times 2, +1 on every odd row/col (upstream offset only odd indices < batch)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.stack(
        [torch.randint(0, 6, (2, 6, 5), generator=g), torch.randint(0, 5, (2, 6, 5), generator=g)], dim=-1
    ).to(torch.int32)
    fine = coarse.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2) * 2
    fine[:, 1::2, :, 0] += 1
    fine[:, :, 1::2, 1] += 1
    assert torch.equal(upscale_nnf(coarse, 12, 10), fine)


@pytest.mark.parametrize("size", [(12, 10), (13, 11), (27, 23)])
def test_upscale_nnf_keeps_identity_and_bounds(size):
    height, width = size
    assert torch.equal(upscale_nnf(identity_field(1, 6, 5), height, width), identity_field(1, height, width))
    corner = torch.full((1, 6, 5, 2), 5, dtype=torch.int32)
    up = upscale_nnf(corner, height, width)
    assert up[..., 0].max() <= height - 1 and up[..., 1].max() <= width - 1 and up.min() >= 0


def test_area_resampling_equals_cv2_for_integer_factors():
    image = texture(1, 64, 48, seed=9)
    ours = resample_area(image, 16, 12)[0].numpy()
    theirs = cv2.resize(image[0].numpy(), (12, 16), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Validation and backend choice
# ---------------------------------------------------------------------------------------------


def test_bad_arguments_are_explained():
    frames = texture(1, 32, 40, seed=0)
    with pytest.raises(ValueError, match="initialize"):
        PyramidPatchMatcher(32, 40, initialize="zeros")
    with pytest.raises(ValueError, match="odd"):
        PyramidPatchMatcher(32, 40, minimum_patch_size=4)
    with pytest.raises(ValueError, match="backend"):
        PyramidPatchMatcher(32, 40, backend="opencl")
    with pytest.raises(ValueError, match="expected"):
        PyramidPatchMatcher(32, 40).estimate_nnf(frames[:, :16], frames[:, :16], frames[:, :16])
    with pytest.raises(ValueError, match="even batch"):
        PyramidPatchMatcher(32, 40, use_pairwise_patch_error=True).estimate_nnf(frames, frames, frames)


def test_backend_choice_without_cuda():
    assert isinstance(cupy_available(), bool)
    assert PyramidPatchMatcher(32, 40, backend="auto").backend == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        PyramidPatchMatcher(32, 40, backend="cupy", device="cpu")


def test_inputs_are_moved_and_numpy_is_accepted():
    frames = texture(1, 32, 40, seed=1)
    nnf, target_style = PyramidPatchMatcher(32, 40).estimate_nnf(
        frames.numpy().astype(np.uint8), frames.double(), frames.numpy()
    )
    assert nnf.device.type == "cpu" and target_style.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# GPU: cupy against torch (skipped without CUDA)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cupy_kernels_match_torch_kernels():
    if not cupy_available():
        pytest.skip("cupy is not installed or sees no CUDA device")
    from diffsynth.extensions.FastBlend.cupy_backend import CupyKernels

    device = torch.device("cuda")
    _, source_padded, target_padded, nnf = random_case(seed=30, batch=4, height=40, width=56, pad=6)
    source_padded, target_padded, nnf = source_padded.to(device), target_padded.to(device), nnf.to(device)
    vote = torch.cat([source_padded, torch.zeros_like(source_padded[..., :1])], dim=-1)
    vote[:, 6:-6, 6:-6, -1] = 1.0
    vote = vote.contiguous()
    torch_kernels, cupy_kernels = TorchKernels(device), CupyKernels(device)
    weights = torch.tensor([10.0, 10.0, 1.0], device=device)
    for k in (5, 9, 13):
        torch.testing.assert_close(cupy_kernels.remap(vote, nnf, k, 6, 0), torch_kernels.remap(vote, nnf, k, 6, 0))
        torch.testing.assert_close(
            cupy_kernels.error_grid(source_padded, target_padded, nnf, k, 6, weights),
            torch_kernels.error_grid(source_padded, target_padded, nnf, k, 6, weights),
            rtol=1e-5,
            atol=1e-2,
        )
        torch.testing.assert_close(
            cupy_kernels.pairwise_grid(source_padded, nnf, k, 6, weights),
            torch_kernels.pairwise_grid(source_padded, nnf, k, 6, weights),
            rtol=1e-5,
            atol=1e-2,
        )
    # and the torch kernels on CUDA against the CPU ones
    torch.testing.assert_close(
        torch_kernels.remap(vote, nnf, 7, 6, 0).cpu(), TorchKernels("cpu").remap(vote.cpu(), nnf.cpu(), 7, 6, 0)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(MODES))
def test_cupy_and_torch_backends_agree(mode):
    """Same seed, same candidates: the backends differ only by float summation order, so the
    fields agree almost everywhere and the remapped styles are close."""
    if not cupy_available():
        pytest.skip("cupy is not installed or sees no CUDA device")
    source = texture(4, 96, 128, seed=11)
    target = torch.roll(source, shifts=(3, -4), dims=(1, 2))
    style = 255.0 - source
    results = {}
    for backend in ("torch", "cupy"):
        matcher = PyramidPatchMatcher(96, 128, initialize="random", device="cuda", backend=backend, **MODES[mode])
        results[backend] = matcher.estimate_nnf(source, target, style, seed=5)
    (nnf_t, style_t), (nnf_c, style_c) = results["torch"], results["cupy"]
    agreement = (nnf_t == nnf_c).all(-1).float().mean().item()
    assert agreement > 0.95, agreement  # a broken kernel gives ~0 with a random init
    assert (style_t - style_c).abs().mean().item() < 1.0


def test_each_batch_item_draws_only_from_its_own_seed():
    """An item's NNF and remapped style are the same alone and in any batch, given its seed (random init too)."""
    rng = np.random.default_rng(5)
    frames = [torch.tensor(rng.integers(0, 255, (20, 24, 3)), dtype=torch.float32) for _ in range(6)]
    matcher = PyramidPatchMatcher(20, 24, minimum_patch_size=3, num_iter=2, initialize="random", device="cpu", backend="torch")
    sg, tg, ss = torch.stack(frames[:3]), torch.stack(frames[3:]), torch.stack(frames[1:4])
    nnf_batch, style_batch = matcher.estimate_nnf(sg, tg, ss, seed=[11, 22, 33])
    nnf_alone, style_alone = matcher.estimate_nnf(sg[1:2], tg[1:2], ss[1:2], seed=[22])
    assert torch.equal(nnf_batch[1:2], nnf_alone) and torch.equal(style_batch[1:2], style_alone)
    nnf_other, _ = matcher.estimate_nnf(sg[1:2], tg[1:2], ss[1:2], seed=[23])
    assert not torch.equal(nnf_other, nnf_alone)  # the seed matters
    with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
        matcher.estimate_nnf(sg[:2], tg[:2], ss[:2], seed=[1, 2, 3])
