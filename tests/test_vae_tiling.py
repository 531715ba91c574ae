"""Tiled VAE encode/decode: covers any size, agrees with the untiled result, no NaN or dark borders."""
from __future__ import annotations

import pytest
import torch

from diffsynth.models.sd_vae import SDVAEDecoder, SDVAEEncoder
from diffsynth.testing.factory import TINY_VAE, build_sd_state_dicts


@pytest.fixture(scope="module")
def vae():
    sd = build_sd_state_dicts(0)["vae"]
    dec = SDVAEDecoder(TINY_VAE).eval()
    dec.load_state_dict({k: v for k, v in sd.items() if k.startswith(("decoder.", "post_quant_conv."))})
    enc = SDVAEEncoder(TINY_VAE).eval()
    enc.load_state_dict({k: v for k, v in sd.items() if k.startswith(("encoder.", "quant_conv."))})
    return enc, dec


def _rel(a, b):
    return ((a - b).abs().mean() / a.std()).item()


@torch.no_grad()
def test_decoder_tiles_any_size(vae):
    _, dec = vae
    z = torch.randn(1, 4, 21, 27, generator=torch.Generator().manual_seed(0))  # (21 - 8) % 5 != 0, (27 - 8) % 5 != 0
    full = dec(z)
    errors = []
    for tile, stride in ((8, 5), (12, 7), (16, 11)):
        tiled = dec(z, tiled=True, tile_size=tile, tile_stride=stride)
        assert tiled.shape == full.shape == (1, 3, 168, 216)
        assert torch.isfinite(tiled).all()
        # borders are weighted like the interior: no dark frame (the original left NaN/black there)
        frame = torch.ones_like(full, dtype=torch.bool)
        frame[..., 8:-8, 8:-8] = False
        assert abs(tiled[frame].abs().mean() / full[frame].abs().mean() - 1) < 0.1
        errors.append(_rel(full, tiled))
    # tiles see less context than the whole image (random weights make that visible), so
    # agreement improves as tiles grow; with a tile as large as the image it is exact
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.1, errors
    torch.testing.assert_close(dec(z, tiled=True, tile_size=32, tile_stride=16), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_encoder_tiles_any_size(vae):
    enc, _ = vae
    x = torch.rand(1, 3, 168, 216, generator=torch.Generator().manual_seed(1)) * 2 - 1
    full = enc(x)
    small = enc(x, tiled=True, tile_size=8, tile_stride=5)
    large = enc(x, tiled=True, tile_size=16, tile_stride=11)
    assert small.shape == full.shape == (1, 4, 21, 27)
    assert torch.isfinite(small).all()
    assert _rel(full, small) > _rel(full, large) and _rel(full, large) < 0.15
    torch.testing.assert_close(enc(x, tiled=True, tile_size=32, tile_stride=16), full, atol=1e-5, rtol=0)


def test_encoder_rejects_sizes_not_multiple_of_8(vae):
    enc, _ = vae
    with pytest.raises(ValueError, match="nearest valid: 64x72"):
        enc(torch.zeros(1, 3, 70, 64))
