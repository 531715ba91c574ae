"""SDUNet's video options: motion hook placement, frame chunks, cross-frame attention, skip offload."""
from __future__ import annotations

import pytest
import torch

from diffsynth.models.sd_unet import SDUNet, SDUNetConfig
from diffsynth.testing.factory import randomize_

CONFIG = SDUNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, transformer_depth=(1, 1, 0), context_dim=32)


@pytest.fixture(scope="module")
def unet():
    return randomize_(SDUNet(CONFIG), torch.Generator().manual_seed(0)).eval()


def _inputs(frames=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(frames, 4, 8, 12, generator=g), torch.randn(frames, 7, 32, generator=g)


@torch.no_grad()
def test_motion_hook_positions_match_the_original_layout(unet):
    calls = []

    def motion(block_id, h):
        calls.append((block_id, h.shape[1], tuple(h.shape[-2:])))
        return h

    x, ctx = _inputs()
    plain = unet(x, 10, ctx)
    hooked = unet(x, 10, ctx, motion=motion)
    torch.testing.assert_close(plain, hooked, atol=0, rtol=0)
    ids = [c[0] for c in calls]
    # down: after each resnet(+attention) pair (not after downsamplers); mid; up: before upsamplers
    assert ids == [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)] + [("output", i) for i in range(9)]
    channels = {c[0]: c[1] for c in calls}
    assert channels[("input", 1)] == 64 and channels[("input", 4)] == 128 and channels[("middle", 0)] == 128
    # output block 2 ends with an upsampler; the hook sees the pre-upsample resolution
    assert dict((c[0], c[2]) for c in calls)[("output", 2)] == (2, 3)


@torch.no_grad()
def test_hook_output_is_used(unet):
    x, ctx = _inputs()
    base = unet(x, 10, ctx)
    bumped = unet(x, 10, ctx, motion=lambda block_id, h: h + 1.0 if block_id == ("middle", 0) else h)
    assert not torch.allclose(base, bumped)


@torch.no_grad()
def test_frame_chunks_and_offload_do_not_change_results(unet):
    x, ctx = _inputs(frames=5)
    base = unet(x, 10, ctx)
    torch.testing.assert_close(unet(x, 10, ctx, frame_chunk=2), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(unet(x, 10, ctx, offload_skips=True), base, atol=0, rtol=0)


@torch.no_grad()
def test_cross_frame_attention(unet):
    x, ctx = _inputs(frames=3)
    single = unet(x[:1], 10, ctx[:1])
    torch.testing.assert_close(unet(x[:1], 10, ctx[:1], cross_frame_attention=True), single, atol=1e-5, rtol=0)
    cross = unet(x, 10, ctx, cross_frame_attention=True)
    assert not torch.allclose(cross[:1], single, atol=1e-4)  # frame 0 now sees frames 1 and 2
    # chunks of one frame attend only to themselves, with their own text: the plain result
    plain = unet(x, 10, ctx)
    torch.testing.assert_close(unet(x, 10, ctx, cross_frame_attention=True, frame_chunk=1), plain, atol=1e-5, rtol=0)


@torch.no_grad()
def test_cross_frame_attention_equals_attention_over_all_tokens(unet):
    """Reference: one transformer pass over the concatenated tokens of all frames, mean text context."""
    block = unet.input_blocks[1][1]
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 64, 4, 6, generator=g)
    ctx = torch.randn(3, 7, 32, generator=g)
    got = block(h, ctx, cross_frame=True)
    y = block.proj_in(block.norm(h))
    tokens = y.flatten(2).transpose(1, 2).reshape(1, -1, y.shape[1])
    for tb in block.transformer_blocks:
        tokens = tb(tokens, ctx.mean(0, keepdim=True))
    y = tokens.reshape(3, 24, -1).transpose(1, 2).reshape(3, -1, 4, 6)
    torch.testing.assert_close(got, block.proj_out(y) + h, atol=1e-5, rtol=0)
