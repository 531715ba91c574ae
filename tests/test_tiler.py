"""Tiled application of convolutional networks: coverage of any size, seamless blending."""

import pytest
import torch
import torch.nn.functional as F

from diffsynth.models.tiler import axis_blend_weights, tile_starts, tiled_forward

# (height, width, tile, stride): sizes where (size - tile) % stride != 0, size < tile, size == tile
AWKWARD_SIZES = [
    (37, 53, 16, 12),
    (20, 71, 32, 16),  # height smaller than the tile
    (16, 16, 16, 8),
    (9, 40, 8, 3),
    (33, 29, 10, 10),  # stride == tile: no overlap at all
    (5, 7, 64, 32),  # the whole input is smaller than one tile
]


@pytest.mark.parametrize("size, tile, stride", [(37, 16, 12), (20, 32, 16), (16, 16, 8), (9, 8, 3), (33, 10, 10), (1, 4, 2)])
def test_tile_starts_cover_every_index(size, tile, stride):
    starts = tile_starts(size, tile, stride)
    t = min(tile, size)
    covered = torch.zeros(size, dtype=torch.int64)
    for s in starts:
        covered[s : s + t] += 1
    assert starts[0] == 0 and starts[-1] == size - t
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))
    assert bool((covered > 0).all())


def test_blend_weights_flat_at_image_border_and_positive():
    inner = axis_blend_weights(16, 4.0, ramp_start=True, ramp_end=True)
    assert bool((inner > 0).all()) and float(inner.max()) == 1.0
    assert inner[0] < inner[1] < inner[2] < inner[3] <= 1.0 and torch.equal(inner, inner.flip(0))
    left_edge = axis_blend_weights(16, 4.0, ramp_start=False, ramp_end=True)
    assert float(left_edge[0]) == 1.0 and left_edge[-1] < 1.0
    assert torch.equal(axis_blend_weights(5, 0, True, True), torch.ones(5))


@pytest.mark.parametrize("height, width, tile, stride", AWKWARD_SIZES)
@pytest.mark.parametrize("out_scale", [1, 8])
def test_blend_masks_sum_positive_everywhere(height, width, tile, stride, out_scale):
    # The 2-D mask of tile (r, c) is w_r(y) * w_c(x), so over the tile grid the
    # mask sum is (sum_r w_r(y)) * (sum_c w_c(x)): check each axis.
    for size in (height, width):
        t = min(tile, size)
        total = torch.zeros(size * out_scale)
        for s in tile_starts(size, tile, stride):
            weights = axis_blend_weights(t * out_scale, stride / 2 * out_scale, s > 0, s + t < size)
            total[s * out_scale : (s + t) * out_scale] += weights
        assert bool((total > 0).all())


@pytest.mark.parametrize("height, width, tile, stride", AWKWARD_SIZES)
@pytest.mark.parametrize("tile_batch_size", [1, 3])
def test_identity_and_pointwise_are_exact(height, width, tile, stride, tile_batch_size):
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    for fn in (lambda t: t, lambda t: torch.tanh(3 * t) + t**2):
        got = tiled_forward(fn, x, tile, stride, tile_batch_size=tile_batch_size)
        assert got.shape == x.shape and got.dtype == x.dtype
        assert torch.allclose(got, fn(x), atol=1e-6, rtol=0)


def test_each_tile_is_seen_once_and_has_tile_shape():
    seen = []

    def fn(t):
        seen.append(tuple(t.shape))
        return t

    tiled_forward(fn, torch.zeros(1, 2, 37, 53), 16, 12, tile_batch_size=4)
    n_tiles = len(tile_starts(37, 16, 12)) * len(tile_starts(53, 16, 12))
    assert sum(s[0] for s in seen) == n_tiles
    assert all(s[1:] == (2, 16, 16) and s[0] <= 4 for s in seen)


@pytest.mark.parametrize("height, width, tile, stride", AWKWARD_SIZES)
def test_upsample_with_out_scale(height, width, tile, stride):
    x = torch.randn(1, 4, height, width, generator=torch.Generator().manual_seed(1))

    def up(t):
        return F.interpolate(t, scale_factor=2, mode="nearest")

    got = tiled_forward(up, x, tile, stride, out_scale=2, out_channels=4)
    assert got.shape == (1, 4, 2 * height, 2 * width)
    assert torch.allclose(got, up(x), atol=1e-6, rtol=0)


def test_downsample_with_fractional_out_scale():
    x = torch.randn(1, 3, 48, 40, generator=torch.Generator().manual_seed(2))

    def down(t):
        return F.avg_pool2d(t, 8)

    got = tiled_forward(down, x, 16, 8, out_scale=1 / 8)
    assert got.shape == (1, 3, 6, 5)
    assert torch.allclose(got, down(x), atol=1e-6, rtol=0)


def test_misaligned_fractional_scale_is_explained():
    with pytest.raises(ValueError, match="multiples of 8"):
        tiled_forward(lambda t: F.avg_pool2d(t, 8), torch.zeros(1, 1, 44, 40), 16, 8, out_scale=1 / 8)


def _conv_net(seed=0, channels=8):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, channels, 3, padding=1),
        torch.nn.SiLU(),
        torch.nn.Conv2d(channels, channels, 3, padding=1),
        torch.nn.SiLU(),
        torch.nn.Conv2d(channels, 3, 3, padding=1),
    ).eval()


@pytest.mark.parametrize("height, width", [(61, 75), (40, 40), (24, 90)])
def test_conv_network_tiled_matches_untiled(height, width):
    net = _conv_net()
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = net(x)
        blended = tiled_forward(net, x, 32, 16)
        hard_seams = tiled_forward(net, x, 32, 16, border=0)
    assert torch.isfinite(blended).all()
    # Only a tile's outer 3 pixels (receptive-field radius) differ from the
    # untiled result, because they see zero padding instead of neighbours. The
    # ramp gives those pixels little weight, so the error is a fraction of the
    # hard-seam error and small on average.
    error = (blended - reference).abs()
    assert error.max() < 0.3 * (hard_seams - reference).abs().max()
    assert error.mean() < 0.01 * reference.abs().max()
    assert torch.allclose(blended[..., :3, :3], reference[..., :3, :3], atol=1e-5)  # image corner: one flat tile


def test_conv_network_no_border_darkening():
    """Border pixels get full weight, so a constant field stays constant up to the edge."""
    conv = torch.nn.Conv2d(1, 1, 1, bias=False)
    torch.nn.init.ones_(conv.weight)
    x = torch.full((1, 1, 50, 70), 0.7)
    with torch.no_grad():
        got = tiled_forward(conv, x, 32, 24)
    assert torch.allclose(got, x, atol=1e-6)


def test_half_precision_accumulates_in_float32():
    x = torch.randn(1, 2, 30, 30).half()
    got = tiled_forward(lambda t: t * 2, x, 16, 7)
    assert got.dtype == torch.float16
    assert torch.equal(got, x * 2)


def test_rectangular_tiles_and_border():
    x = torch.randn(1, 1, 30, 50)
    got = tiled_forward(lambda t: t + 1, x, (16, 24), (8, 20), border=(2, 0))
    assert torch.allclose(got, x + 1, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tile_size": 0, "tile_stride": 1}, "tile_size"),
        ({"tile_size": 8, "tile_stride": 0}, "tile_stride"),
        ({"tile_size": 8, "tile_stride": 9}, "tile_stride"),
        ({"tile_size": 8, "tile_stride": 4, "out_scale": 0}, "out_scale"),
        ({"tile_size": 8, "tile_stride": 4, "tile_batch_size": 0}, "tile_batch_size"),
        ({"tile_size": 8, "tile_stride": 4, "border": -1}, "border"),
        ({"tile_size": 8, "tile_stride": 4, "out_channels": 5}, "out_channels"),
        ({"tile_size": 8, "tile_stride": 4, "out_scale": 2}, "out_scale"),
    ],
)
def test_bad_arguments_are_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiled_forward(lambda t: t, torch.zeros(1, 3, 20, 20), **kwargs)


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        tiled_forward(lambda t: t, torch.zeros(3, 20, 20), 8, 4)
