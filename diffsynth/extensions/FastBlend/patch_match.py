"""Patch-match engine of FastBlend (Duan et al., "FastBlend", arXiv:2311.09265).

The math follows DiffSynth-Studio's `extensions/FastBlend/patch_match.py` and `cupy_kernels.py`
(early 2024; facts in `shared/reference/upstream_spec.md` §8.2-8.3), re-implemented here:

* An NNF (nearest-neighbour field) is int32 ``(B, H, W, 2)``: for each target pixel the
  (row, col) of the matched source pixel. Images are float32 ``(B, H, W, C)`` in 0..255.
* Patch sizes shrink every iteration: ``[min + 2i for i in range(num_iter)]`` reversed.
* **Remap** (the vote): ``T(p) = mean of S(nnf(p+q) - q)`` over offsets ``q`` in the patch window
  with ``p+q`` inside the image and ``nnf(p+q) - q`` inside the image.
* **Patch error**: ``E(p) = sum_q sum_c w_c (T(p+q) - S(nnf(p)+q))^2`` over zero-padded images.
  **Pairwise error** (interpolation): batch pairs (even a, odd b),
  ``E(p) = sum_q sum_c (S_a(nnf_a(p)+q) - S_b(nnf_b(p)+q))^2``, given to both members.
* **Total error** ``= guide_weight * E_guide + E_style``; candidates are accepted per pixel where
  their error is strictly lower (ties keep the current match).
* One iteration: propagation (4 directions, random order, each candidate = neighbour's match
  shifted by one pixel, clamped), random search (3 steps, offsets uniform in [-4, 4]^2,
  clamped), tracking along the batch axis.
* A pyramid of ``int(log2(min(H, W) / max_patch))`` levels, coarse to fine.

Backends: the kernels (remap, patch error, pairwise error) come from `TorchKernels` (any torch
device, always available) or from `cupy_backend.CupyKernels` (CUDA raw kernels, used on CUDA
when cupy works). The driver (candidate generation, random numbers, acceptance) is torch code
shared by both, so with the same seed both backends evaluate the same candidates.

Memory per batch element (torch backend, float32, C = 3, padded by P = max_patch // 2): the
packs hold 16 channels per padded pixel (source guide+style, target guide+remapped style,
source style+valid for the vote; pairwise mode: 13), plus the NNF, one candidate NNF, two
error maps and the result: about 110 bytes per pixel. Measured resident peak of one call
above its inputs, batch 1: 43 MB at 512^2, 268 MB at 1536^2 (batch 2 at 1024^2 adds ~105 MB
per element). Upstream's CUDA version held about
four padded 3-channel images plus NNFs (~160 MB at 1536^2). Patch rows are gathered in chunks
of ~1 MiB per thread (GPU: 256 MiB), so nothing of size ``(B, H, W, patch^2, C)`` is ever built,
and the remap accumulates one batch element at a time.

Results do not depend on the chunk size (hence not on the thread count): per-pixel sums are
elementwise or per-row reductions, never BLAS products whose blocking depends on alignment.

Speed (torch backend, defaults, batch 1, one CPU core): about 3.5 s of CPU time per 512^2 frame.
Per iteration that is one remap, four full patch-error passes (current field, three random
candidates) and the propagation candidates, of which only the pixels whose candidate differs
from their match are evaluated (the others would get their own error back and never win).
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
import torch.nn.functional as F

__all__ = [
    "PatchMatcher",
    "PyramidPatchMatcher",
    "TorchKernels",
    "cupy_available",
    "pairwise_patch_error",
    "patch_error",
    "pyramid_sizes",
    "remap",
    "resample_area",
    "upscale_nnf",
]

BACKENDS = ("auto", "torch", "cupy")
INITIALIZATIONS = ("identity", "random")

# Bytes of gathered patch rows processed per torch op: small on the CPU so that a chunk stays in
# the L2 cache (about 1 MiB per thread timed best here), large on GPUs.
_CPU_CHUNK_BYTES = 1 << 20
_GPU_CHUNK_BYTES = 256 << 20
# Below this fraction of changed candidates the torch backend evaluates only the changed pixels
# (gathering the target side too costs ~1.4x per pixel, so beyond ~60% the full grid is cheaper).
_SUBSET_FRACTION = 0.6


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def cupy_available() -> bool:
    """True when cupy imports and sees a usable CUDA device.

    cupy-cuda12x imports fine on machines without a GPU and fails only on first use, so the
    check asks `cupy.cuda.is_available()` and treats any failure as "not available".
    """
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:  # ImportError, CUDARuntimeError, missing driver libraries, ...
        return False


def _resolve_device(device, gpu_id: int) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # `gpu_id` is kept for upstream compatibility; an explicit "cuda:N" wins.
        device = torch.device("cuda", gpu_id)
    return device


@functools.lru_cache(maxsize=None)
def _kernels_for(backend: str, device: torch.device, threads_per_block: int):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "cupy" if device.type == "cuda" and cupy_available() else "torch"
    if backend == "torch":
        return TorchKernels(device)
    if device.type != "cuda":
        raise ValueError(f"backend='cupy' needs a CUDA device, got device={str(device)!r}; use backend='torch'")
    if not cupy_available():
        raise RuntimeError(
            "backend='cupy' was requested but cupy is not installed or sees no CUDA device; "
            "install cupy-cuda12x (pip install 'diffsynth[gpu]') or use backend='torch'"
        )
    from .cupy_backend import CupyKernels

    return CupyKernels(device, threads_per_block)


def _mix_seed(*values: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 steps), independent of Python's hash."""
    mask = (1 << 64) - 1
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & mask)) & mask
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        x ^= x >> 31
    return x >> 1


class _Random:
    """All randomness of one `estimate_nnf` call, per batch item.

    Item ``i`` draws only from its own pair of generators, seeded from ``seeds[i]``: a host
    generator for its (tiny) propagation orders and one on the device for its NNF-sized draws.
    So an item's result does not depend on which other items share its batch, nor on the batch
    size, and a caller that seeds each task by what it computes (FastBlend's runners) gets frames
    that depend only on their window and the seed, however a video is cut into calls. (Tracking,
    the mean target style and the pairwise error couple the items of a batch by design.)
    """

    def __init__(self, seeds, device: torch.device):
        self.hosts, self.devices = [], []
        for seed in seeds:
            host = torch.Generator("cpu")
            host.manual_seed(_mix_seed(seed, 1))
            dev = torch.Generator(device)
            dev.manual_seed(_mix_seed(seed, 2))
            self.hosts.append(host)
            self.devices.append(dev)

    @classmethod
    def for_batch(cls, seed, batch: int, device: torch.device) -> "_Random":
        """``seed``: one int for the whole call (item ``i`` then uses ``(seed, i)``), or one seed per item."""
        if isinstance(seed, numbers.Integral):
            return cls([_mix_seed(seed, i) for i in range(batch)], device)
        seeds = [int(s) for s in seed]
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {batch} items; give one seed per item or one int")
        return cls(seeds, device)

    def randint(self, low: int, high: int, item_shape, device, dtype) -> torch.Tensor:
        """``(B, *item_shape)`` integers in ``[low, high)``, item ``i`` from its own generator."""
        return torch.stack([torch.randint(low, high, tuple(item_shape), generator=g, device=device, dtype=dtype) for g in self.devices])

    def orders(self) -> list[list[int]]:
        """Each item's order of the four propagation directions for one iteration."""
        return [torch.randperm(4, generator=g).tolist() for g in self.hosts]


def _to_bhwc(name: str, x, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, H, W, C), got {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.float32).contiguous()


def _clamp_nnf_(nnf: torch.Tensor, height: int, width: int) -> torch.Tensor:
    nnf[..., 0].clamp_(0, height - 1)
    nnf[..., 1].clamp_(0, width - 1)
    return nnf


def _pad(image: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad (B, H, W, C) by `pad` pixels on every side of H and W."""
    return F.pad(image, (0, 0, pad, pad, pad, pad))


def _pad_size_of(padded: torch.Tensor, nnf: torch.Tensor, patch_size: int) -> int:
    (_, hp, wp, _), (_, h, w, _) = padded.shape, nnf.shape
    pad = (hp - h) // 2
    if hp - h != 2 * pad or wp - w != 2 * pad:
        raise ValueError(f"padded image {hp}x{wp} is not the NNF size {h}x{w} padded equally on all sides")
    if pad < patch_size // 2:
        raise ValueError(f"padding {pad} is smaller than the patch radius {patch_size // 2}")
    return pad


# ---------------------------------------------------------------------------------------------
# Torch kernels
# ---------------------------------------------------------------------------------------------


def _accumulate_squares(acc, diff):
    """acc += diff**2 elementwise (diff is a fresh buffer and may be overwritten).

    Patch errors are accumulated per strip element over the patch rows and weighted and summed
    over the strip once at the end; unlike a matrix-vector product (whose BLAS blocking depends
    on the row count and alignment), this gives every pixel the same bits whatever the chunk
    size, hence whatever the thread count.
    """
    if acc is None:
        return diff.mul_(diff)
    return acc.addcmul_(diff, diff)



class TorchKernels:
    """Remap / patch-error / pairwise-error kernels in torch ops, for any device.

    Images are "packs": zero-padded channel-last float32 tensors ``(B, Hp, Wp, Ct)`` with
    ``Hp = H + 2*pad``. A patch row of ``k`` pixels is ``k*Ct`` contiguous floats, so the
    patches are read as overlapping "strips" (a view, no copy) and gathered row by row with
    `index_select`: the work is ``k`` strip gathers per pixel instead of ``k^2`` pixel gathers.
    """

    name = "torch"
    supports_subset = True

    def __init__(self, device, chunk_bytes: int | None = None):
        self.device = torch.device(device)
        self.chunk_bytes = chunk_bytes

    def _chunk_pixels(self, floats_per_pixel: int) -> int:
        chunk_bytes = self.chunk_bytes
        if chunk_bytes is None and self.device.type == "cpu":
            # Each torch op is one parallel region: with more threads, give each op more work.
            chunk_bytes = _CPU_CHUNK_BYTES * max(1, torch.get_num_threads())
        elif chunk_bytes is None:
            chunk_bytes = _GPU_CHUNK_BYTES
        return max(64, chunk_bytes // (4 * floats_per_pixel))

    @staticmethod
    def _strips(pack: torch.Tensor, k: int) -> torch.Tensor:
        channels = pack.shape[-1]
        return pack.reshape(-1).unfold(0, k * channels, channels)

    @staticmethod
    def _strip_starts(match_row, match_col, batch, pack_shape, pad, r):
        """Flat strip index of the top-left pixel of the patch around (match_row, match_col)."""
        _, hp, wp, _ = pack_shape
        return (batch * hp + match_row + (pad - r)) * wp + match_col + (pad - r)

    @classmethod
    def _strip_starts_rows(cls, nnf, b, y0, y1, pack_shape, pad, r):
        """Strip starts (int64, flat) of the matches of target rows y0..y1-1 of batch element b."""
        field = nnf[b, y0:y1].reshape(-1, 2).long()
        return cls._strip_starts(field[:, 0], field[:, 1], b, pack_shape, pad, r)

    def remap(self, pack: torch.Tensor, nnf: torch.Tensor, k: int, pad: int, c0: int) -> torch.Tensor:
        """The vote. Channels ``[c0, Ct-1)`` of `pack` are values, channel ``Ct-1`` is 1 inside the
        image and 0 in the padding. Returns the mean ``(B, H, W, Ct-1-c0)``.

        Computed as a scatter: target pixel p' votes ``S(nnf(p') + u)`` into ``p' + u`` for every
        ``u`` in the window, which is the same set of terms as the gather form in the module
        docstring (``u = -q``). Sources in the padding add 0 to values and count; votes landing
        outside the image fall into the accumulator's border, which is cropped.
        """
        b_, hp, wp, ct = pack.shape
        _, h, w, _ = nnf.shape
        r = k // 2
        cv = ct - c0
        strips = self._strips(pack, k)
        out = torch.empty(b_, h, w, cv - 1, device=pack.device)
        rows = max(1, self._chunk_pixels(k * ct) // w)
        wb = w + 2 * (k - 1)
        for b in range(b_):
            # One batch element at a time: the accumulator is (H + k - 1, W + k - 1, cv), not B of them.
            acc = torch.zeros(h + 2 * r, w + 2 * r, cv, device=pack.device)
            buf = None
            for y0 in range(0, h, rows):
                y1 = min(h, y0 + rows)
                n = y1 - y0
                s0 = self._strip_starts_rows(nnf, b, y0, y1, pack.shape, pad, r)
                if buf is None or buf.shape[0] != n:
                    # Row x of the gathered strips sits at buf[:, x + k - 1]; the k - 1 zero columns
                    # on both sides make every diagonal below the same length.
                    buf = torch.zeros(n, wb, k, cv, device=pack.device)
                # Descending j: every accumulator row then receives its votes in increasing source
                # row order whatever the chunking, so results do not depend on the chunk size.
                for j in reversed(range(k)):
                    g = strips.index_select(0, s0 + j * wp).view(n, w, k, ct)
                    buf[:, k - 1 : k - 1 + w] = g[..., c0:]
                    # Vote of pixel x, strip element i lands in accumulator column x + i, so column
                    # x' sums buf[:, x' + i', k - 1 - i'] over i' (a diagonal): a strided view.
                    diag = buf.as_strided(
                        (n, w + k - 1, k, cv),
                        (wb * k * cv, k * cv, (k - 1) * cv, 1),
                        buf.storage_offset() + (k - 1) * cv,
                    )
                    acc[y0 + j : y1 + j] += diag.sum(2)
            inside = acc[r : r + h, r : r + w]
            torch.div(inside[..., :-1], inside[..., -1:], out=out[b])
        return out

    def error_grid(self, src, tgt, nnf, k: int, pad: int, weights: torch.Tensor) -> torch.Tensor:
        """Patch error of every target pixel: ``sum_q sum_c w_c (tgt(p+q) - src(nnf(p)+q))^2``."""
        b_, hp, wp, ct = src.shape
        _, h, w, _ = nnf.shape
        r = k // 2
        strips = self._strips(src, k)
        w_strip = weights.to(src.device).repeat(k)
        out = torch.empty(b_, h, w, device=src.device)
        rows = max(1, self._chunk_pixels(k * ct) // w)
        for b in range(b_):
            for y0 in range(0, h, rows):
                y1 = min(h, y0 + rows)
                n = y1 - y0
                s0 = self._strip_starts_rows(nnf, b, y0, y1, src.shape, pad, r)
                acc = None
                for j in range(k):
                    g = strips.index_select(0, s0 + j * wp).view(n, w, k * ct)
                    t = tgt.as_strided(
                        (n, w, k * ct),
                        (wp * ct, ct, 1),
                        tgt.storage_offset() + ((b * hp + y0 + j + pad - r) * wp + pad - r) * ct,
                    )
                    acc = _accumulate_squares(acc, g.sub_(t))
                out[b, y0:y1] = acc.mul_(w_strip).sum(-1)
        return out

    def _ssd_at(self, pack_a, pack_b, k, weights, count, starts) -> torch.Tensor:
        """Weighted SSD between patches of `pack_a` and `pack_b` for `count` pixels;
        ``starts(i0, i1)`` gives the strip starts of pixels i0..i1-1 on both sides (computed per
        chunk, so no int64 index of the whole batch exists at once)."""
        ct = pack_a.shape[-1]
        wp = pack_a.shape[2]
        sa, sb = self._strips(pack_a, k), self._strips(pack_b, k)
        w_strip = weights.to(pack_a.device).repeat(k)
        out = torch.empty(count, device=pack_a.device)
        chunk = self._chunk_pixels(k * ct)
        for i0 in range(0, count, chunk):
            i1 = min(count, i0 + chunk)
            a0, b0 = starts(i0, i1)
            acc = None
            for j in range(k):
                g = sa.index_select(0, a0 + j * wp)
                acc = _accumulate_squares(acc, g.sub_(sb.index_select(0, b0 + j * wp)))
            out[i0:i1] = acc.mul_(w_strip).sum(-1)
        return out

    def error_at(self, src, tgt, pixels, matches, k: int, pad: int, weights, size) -> torch.Tensor:
        """`error_grid` for the flat target pixels `pixels` (indices into B*H*W) matched to
        `matches` (M, 2) only. `size` = (H, W)."""
        h, w = size
        r = k // 2

        def starts(i0, i1):
            p, m = pixels[i0:i1].long(), matches[i0:i1].long()
            b, rem = p // (h * w), p % (h * w)
            start_s = self._strip_starts(m[:, 0], m[:, 1], b, src.shape, pad, r)
            start_t = self._strip_starts(rem // w, rem % w, b, tgt.shape, pad, r)
            return start_s, start_t

        return self._ssd_at(src, tgt, k, weights, pixels.numel(), starts)

    def pairwise_at(self, src, pair_pixels, matches_a, matches_b, k, pad, weights, size) -> torch.Tensor:
        """Pairwise error at flat pixels of the pair grid ((B/2)*H*W): member a = 2j, b = 2j+1."""
        h, w = size
        r = k // 2

        def starts(i0, i1):
            pair = pair_pixels[i0:i1].long() // (h * w)
            ma, mb = matches_a[i0:i1].long(), matches_b[i0:i1].long()
            start_a = self._strip_starts(ma[:, 0], ma[:, 1], 2 * pair, src.shape, pad, r)
            start_b = self._strip_starts(mb[:, 0], mb[:, 1], 2 * pair + 1, src.shape, pad, r)
            return start_a, start_b

        return self._ssd_at(src, src, k, weights, pair_pixels.numel(), starts)

    def pairwise_grid(self, src, nnf, k: int, pad: int, weights) -> torch.Tensor:
        """Pairwise error of every pixel, shape (B/2, H, W)."""
        b_, h, w, _ = nnf.shape
        r = k // 2
        out = torch.empty(b_ // 2, h, w, device=src.device)
        for j in range(b_ // 2):
            field_a, field_b = nnf[2 * j].reshape(-1, 2), nnf[2 * j + 1].reshape(-1, 2)

            def starts(i0, i1, field_a=field_a, field_b=field_b, j=j):
                ma, mb = field_a[i0:i1].long(), field_b[i0:i1].long()
                start_a = self._strip_starts(ma[:, 0], ma[:, 1], 2 * j, src.shape, pad, r)
                start_b = self._strip_starts(mb[:, 0], mb[:, 1], 2 * j + 1, src.shape, pad, r)
                return start_a, start_b

            out[j] = self._ssd_at(src, src, k, weights, h * w, starts).view(h, w)
        return out


# ---------------------------------------------------------------------------------------------
# Pure functions on zero-padded images (the torch kernels with plain arguments)
# ---------------------------------------------------------------------------------------------


def _with_valid_channel(padded: torch.Tensor, pad: int) -> torch.Tensor:
    valid = torch.zeros(padded.shape[:-1] + (1,), device=padded.device)
    valid[:, pad : padded.shape[1] - pad, pad : padded.shape[2] - pad] = 1.0
    return torch.cat([padded.float(), valid], dim=-1).contiguous()


def remap(source_style_padded: torch.Tensor, nnf: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Vote `source_style_padded` (B, H+2p, W+2p, C), zero-padded, p >= patch_size // 2, onto the
    target grid of `nnf` (B, H, W, 2). Returns the unpadded target (B, H, W, C)."""
    pad = _pad_size_of(source_style_padded, nnf, patch_size)
    pack = _with_valid_channel(source_style_padded, pad)
    return TorchKernels(pack.device).remap(pack, nnf, patch_size, pad, 0)


def patch_error(source_padded, nnf, target_padded, patch_size: int, weights=None) -> torch.Tensor:
    """``E(p) = sum_q sum_c w_c (target(p+q) - source(nnf(p)+q))^2`` for every target pixel,
    over zero-padded (B, H+2p, W+2p, C) images; `weights` (C,) defaults to ones. Returns (B, H, W)."""
    pad = _pad_size_of(source_padded, nnf, patch_size)
    channels = source_padded.shape[-1]
    weights = torch.ones(channels) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    kernels = TorchKernels(source_padded.device)
    return kernels.error_grid(
        source_padded.float().contiguous(), target_padded.float().contiguous(), nnf, patch_size, pad, weights
    )


def pairwise_patch_error(source_padded, nnf, patch_size: int, weights=None) -> torch.Tensor:
    """``E(p) = sum_q sum_c w_c (S_a(nnf_a(p)+q) - S_b(nnf_b(p)+q))^2`` for the batch pairs
    (a, b) = (2j, 2j+1), returned for both members: (B, H, W). B must be even."""
    if nnf.shape[0] % 2:
        raise ValueError(f"pairwise patch error needs an even batch, got {nnf.shape[0]}")
    pad = _pad_size_of(source_padded, nnf, patch_size)
    channels = source_padded.shape[-1]
    weights = torch.ones(channels) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    kernels = TorchKernels(source_padded.device)
    err = kernels.pairwise_grid(source_padded.float().contiguous(), nnf, patch_size, pad, weights)
    return err.repeat_interleave(2, dim=0)


# ---------------------------------------------------------------------------------------------
# One pyramid level
# ---------------------------------------------------------------------------------------------


class PatchMatcher:
    """PatchMatch at one resolution (upstream `PatchMatcher`, one pyramid level).

    `estimate_nnf(source_guide, target_guide, source_style, nnf)` refines `nnf` with
    ``num_iter`` iterations of shrinking patch size and returns ``(nnf, target_style)`` where
    `target_style` is `source_style` remapped by the final NNF with the smallest patch size.
    Inputs are unpadded float32 (B, H, W, C) tensors on `device`.
    """

    def __init__(
        self,
        height,
        width,
        channel=3,
        minimum_patch_size=5,
        threads_per_block=8,
        num_iter=5,
        gpu_id=0,
        guide_weight=10.0,
        random_search_steps=3,
        random_search_range=4,
        use_mean_target_style=False,
        use_pairwise_patch_error=False,
        tracking_window_size=0,
        device="cpu",
        backend="auto",
    ):
        if minimum_patch_size < 1 or minimum_patch_size % 2 == 0:
            raise ValueError(f"minimum_patch_size must be a positive odd number, got {minimum_patch_size}")
        if num_iter < 1:
            raise ValueError(f"num_iter must be at least 1, got {num_iter}")
        if use_mean_target_style and use_pairwise_patch_error:
            raise ValueError("use_mean_target_style and use_pairwise_patch_error are exclusive (accurate vs interpolation)")
        self.height, self.width, self.channel = height, width, channel
        self.minimum_patch_size = minimum_patch_size
        self.num_iter = num_iter
        self.guide_weight = float(guide_weight)
        self.random_search_steps = random_search_steps
        self.random_search_range = random_search_range
        self.use_mean_target_style = use_mean_target_style
        self.use_pairwise_patch_error = use_pairwise_patch_error
        self.tracking_window_size = tracking_window_size
        self.patch_size_list = [minimum_patch_size + 2 * i for i in range(num_iter)][::-1]
        self.pad_size = self.patch_size_list[0] // 2
        self.device = _resolve_device(device, gpu_id)
        self.kernels = _kernels_for(backend, self.device, threads_per_block)
        self._w_guide = torch.full((channel,), self.guide_weight, device=self.device)
        self._w_style = torch.ones(channel, device=self.device)
        self._w_total = torch.cat([self._w_guide, self._w_style])

    # -- packs ------------------------------------------------------------------------------

    def _make_packs(self, sg, tg, ss):
        """Zero-padded channel-last images the kernels read.

        vote: [style, valid] for the remap. Default and mean-target modes: src = [guide, style],
        tgt = [guide, remapped style] (one pass computes guide_weight*E_guide + E_style).
        Pairwise mode: src = guide, tgt = guide, pair = style (the two errors read different pairs).
        """
        if self.use_pairwise_patch_error:
            layout = {"vote": (ss, 1.0), "src": (sg,), "tgt": (tg,), "pair": (ss,)}
        else:
            layout = {"vote": (ss, 1.0), "src": (sg, ss), "tgt": (tg, None)}
        return {name: self._pack(parts) for name, parts in layout.items()}

    def _pack(self, parts):
        """Concatenate (B, H, W, C) parts (None: zeros, a float: that constant in one channel) on
        the channel axis into a zero-padded pack, without an unpadded temporary."""
        p, h, w, c = self.pad_size, self.height, self.width, self.channel
        widths = [1 if isinstance(x, float) else c for x in parts]
        pack = torch.zeros(parts[0].shape[0], h + 2 * p, w + 2 * p, sum(widths), device=self.device)
        c0 = 0
        for x, width in zip(parts, widths):
            if x is not None:
                pack[:, p : p + h, p : p + w, c0 : c0 + width] = x
            c0 += width
        return pack

    def _set_target_style(self, packs, style):
        p, c = self.pad_size, self.channel
        packs["tgt"][:, p : p + self.height, p : p + self.width, c : 2 * c] = style

    def _remap(self, packs, nnf, k):
        return self.kernels.remap(packs["vote"], nnf, k, self.pad_size, 0)

    # -- errors -----------------------------------------------------------------------------

    def _error(self, packs, nnf, k):
        """Total error of every pixel for `nnf` (the target style in the "tgt" pack is set by the
        caller, except in mean-target-style mode, where it is the batch mean of remap(`nnf`))."""
        pad = self.pad_size
        if self.use_mean_target_style:
            self._set_target_style(packs, self._remap(packs, nnf, k).mean(0, keepdim=True))
        if self.use_pairwise_patch_error:
            guide = self.kernels.error_grid(packs["src"], packs["tgt"], nnf, k, pad, self._w_guide)
            pair = self.kernels.pairwise_grid(packs["pair"], nnf, k, pad, self._w_style)
            return guide + pair.repeat_interleave(2, dim=0)
        return self.kernels.error_grid(packs["src"], packs["tgt"], nnf, k, pad, self._w_total)

    def _update(self, packs, nnf, err, cand, k):
        """Accept `cand` where its error is strictly lower; updates `nnf` and `err` in place."""
        if self.use_mean_target_style:
            # The target style depends on the whole candidate field, so every pixel's error
            # changes; evaluate all of them, exactly as upstream.
            upd = self._error(packs, cand, k)
            accept = upd < err
        else:
            changed = (cand != nnf).any(-1)
            if self.use_pairwise_patch_error:
                changed = (changed[0::2] | changed[1::2]).repeat_interleave(2, dim=0)
            n_changed = int(changed.sum())
            if n_changed == 0:
                return
            if self.kernels.supports_subset and n_changed < _SUBSET_FRACTION * changed.numel():
                self._update_subset(packs, nnf, err, cand, changed, k)
                return
            # A pixel whose candidate equals its match (pairwise: and whose partner's does too)
            # gets its own error back; masking it keeps this path equal to the subset one.
            upd = self._error(packs, cand, k)
            accept = (upd < err) & changed
        # In place through the candidate's own buffers: no NNF-sized temporaries.
        nnf.copy_(torch.where(accept[..., None], cand, nnf, out=cand))
        err.copy_(torch.where(accept, upd, err, out=upd))

    def _update_subset(self, packs, nnf, err, cand, changed, k):
        """`_update` evaluating only the pixels in `changed` (torch backend)."""
        size, hw, pad = (self.height, self.width), self.height * self.width, self.pad_size
        flat_cand, flat_nnf, flat_err = cand.view(-1, 2), nnf.view(-1, 2), err.view(-1)
        if self.use_pairwise_patch_error:
            pair_pixels = changed[0::2].reshape(-1).nonzero().squeeze(1)
            pa = (pair_pixels // hw) * (2 * hw) + pair_pixels % hw
            pb = pa + hw
            ma, mb = flat_cand.index_select(0, pa), flat_cand.index_select(0, pb)
            pair = self.kernels.pairwise_at(packs["pair"], pair_pixels, ma, mb, k, pad, self._w_style, size)
            pixels, matches = torch.cat([pa, pb]), torch.cat([ma, mb])
            guide = self.kernels.error_at(packs["src"], packs["tgt"], pixels, matches, k, pad, self._w_guide, size)
            upd = guide + torch.cat([pair, pair])
        else:
            pixels = changed.reshape(-1).nonzero().squeeze(1)
            matches = flat_cand.index_select(0, pixels)
            upd = self.kernels.error_at(packs["src"], packs["tgt"], pixels, matches, k, pad, self._w_total, size)
        accept = upd < flat_err.index_select(0, pixels)
        sel = pixels[accept]
        flat_nnf.index_copy_(0, sel, matches[accept])
        flat_err.index_copy_(0, sel, upd[accept])

    # -- candidates -------------------------------------------------------------------------

    def _neighbour_candidate(self, nnf, direction):
        """Neighbour's match shifted by one pixel: 0 above (+1 row), 1 left (+1 col), 2 below
        (-1 row), 3 right (-1 col). Border pixels use their own match (edge replication)."""
        cand = nnf.clone()
        if direction == 0:
            cand[:, 1:] = nnf[:, :-1]
            cand[..., 0] += 1
        elif direction == 1:
            cand[:, :, 1:] = nnf[:, :, :-1]
            cand[..., 1] += 1
        elif direction == 2:
            cand[:, :-1] = nnf[:, 1:]
            cand[..., 0] -= 1
        else:
            cand[:, :, :-1] = nnf[:, :, 1:]
            cand[..., 1] -= 1
        return _clamp_nnf_(cand, self.height, self.width)

    def _random_candidate(self, nnf, rng):
        r = self.random_search_range
        step = rng.randint(-r, r + 1, nnf.shape[1:], nnf.device, nnf.dtype)
        return _clamp_nnf_(step.add_(nnf), self.height, self.width)

    def _propagation_candidate(self, nnf, directions):
        """The neighbour candidate of each item for its own direction (one tensor op when all agree)."""
        if len(set(directions)) == 1:
            return self._neighbour_candidate(nnf, directions[0])
        cand = torch.empty_like(nnf)
        for direction in sorted(set(directions)):
            index = torch.tensor([i for i, d in enumerate(directions) if d == direction], device=nnf.device)
            cand[index] = self._neighbour_candidate(nnf.index_select(0, index), direction)
        return cand

    def _track_candidate(self, nnf, d):
        """The match of the batch neighbour d frames away (edge-replicated); within the even and
        the odd sub-batch for pairwise error."""
        b = nnf.shape[0]
        if self.use_pairwise_patch_error:
            half = torch.arange(b // 2, device=nnf.device)
            src = (half + d).clamp(0, b // 2 - 1) * 2
            index = torch.stack([src, src + 1], dim=1).reshape(-1)
        else:
            index = (torch.arange(b, device=nnf.device) + d).clamp(0, b - 1)
        return nnf.index_select(0, index)

    # -- main loop ----------------------------------------------------------------------------

    def estimate_nnf(self, source_guide, target_guide, source_style, nnf, rng=None, seed=0):
        """Refine `nnf` (B, H, W, 2) and return ``(nnf int32, target_style float32 (B, H, W, C))``.

        Randomness comes from `rng` (shared by the pyramid levels) or a fresh one from `seed`
        (one int, or one seed per batch item: see `_Random`).
        """
        with torch.no_grad():
            rng = rng or _Random.for_batch(seed, torch.as_tensor(source_guide).shape[0], self.device)
            return self._estimate(source_guide, target_guide, source_style, nnf, rng)

    def _estimate(self, source_guide, target_guide, source_style, nnf, rng, remap_result=True):
        sg = _to_bhwc("source_guide", source_guide, self.device)
        tg = _to_bhwc("target_guide", target_guide, self.device)
        ss = _to_bhwc("source_style", source_style, self.device)
        expected = (self.height, self.width, self.channel)
        for name, x in (("source_guide", sg), ("target_guide", tg), ("source_style", ss)):
            if tuple(x.shape[1:]) != expected or x.shape[0] != sg.shape[0]:
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)}, expected (B, {expected[0]}, {expected[1]}, "
                    f"{expected[2]}) with the same B for all three inputs"
                )
        if tuple(nnf.shape) != (sg.shape[0], self.height, self.width, 2):
            raise ValueError(f"nnf has shape {tuple(nnf.shape)}, expected ({sg.shape[0]}, {self.height}, {self.width}, 2)")
        if self.use_pairwise_patch_error and sg.shape[0] % 2:
            raise ValueError(f"pairwise patch error needs an even batch (pairs of frames), got {sg.shape[0]}")
        nnf = _clamp_nnf_(nnf.to(device=self.device, dtype=torch.int32).clone(), self.height, self.width)
        packs = self._make_packs(sg, tg, ss)
        del sg, tg, ss
        for k in self.patch_size_list:
            if not (self.use_mean_target_style or self.use_pairwise_patch_error):
                # Only the default error reads this remapped style, fixed for the whole iteration;
                # the mean mode recomputes it per candidate and the pairwise error never reads it.
                self._set_target_style(packs, self._remap(packs, nnf, k))
            err = self._error(packs, nnf, k)
            orders = rng.orders()
            for step in range(4):
                self._update(packs, nnf, err, self._propagation_candidate(nnf, [order[step] for order in orders]), k)
            for _ in range(self.random_search_steps):
                self._update(packs, nnf, err, self._random_candidate(nnf, rng), k)
            for d in range(1, self.tracking_window_size + 1):
                self._update(packs, nnf, err, self._track_candidate(nnf, d), k)
                self._update(packs, nnf, err, self._track_candidate(nnf, -d), k)
        # Upstream also remaps at every coarse level and discards the result; the pyramid skips it.
        target_style = self._remap(packs, nnf, self.patch_size_list[-1]) if remap_result else None
        return nnf, target_style


# ---------------------------------------------------------------------------------------------
# Pyramid
# ---------------------------------------------------------------------------------------------


def pyramid_sizes(image_height, image_width, minimum_patch_size=5, num_iter=5):
    """Level sizes, coarse to fine: ``levels = int(log2(min(H, W) / max_patch))`` with
    ``max_patch = min + 2 (num_iter - 1)``, level l = ``H // 2**(levels-1-l)``.

    Upstream builds no level at all when the image is smaller than ``2 * max_patch``
    (``levels <= 0``) and then fails; we use one full-resolution level there.
    """
    maximum_patch_size = minimum_patch_size + 2 * (num_iter - 1)
    levels = max(1, int(math.log2(min(image_height, image_width) / maximum_patch_size)))
    return [(image_height // 2 ** (levels - 1 - l), image_width // 2 ** (levels - 1 - l)) for l in range(levels)]


def resample_area(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Area-resample (B, H, W, C) to (B, height, width, C) on the images' device.

    Upstream used cv2.INTER_AREA on the host. For integer factors (every level when H and W are
    divisible by 2**(levels-1)) both are the plain box mean. Otherwise torch's "area" mode
    (adaptive average pooling) averages whole input pixels ``floor(i*H/h) .. ceil((i+1)*H/h)-1``
    with equal weights where cv2 weights the partially covered border pixels fractionally; the
    difference is a sub-pixel blur at the coarse levels only.
    """
    if images.shape[1:3] == (height, width):
        return images
    resized = F.interpolate(images.permute(0, 3, 1, 2), size=(height, width), mode="area")
    return resized.permute(0, 2, 3, 1).contiguous()


def upscale_nnf(nnf: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Carry a coarse NNF (B, h, w, 2) to the next level (B, height, width, 2).

    Each fine pixel takes the displacement ``nnf - position`` of its coarse pixel
    (``floor(i * h / height)``), scaled by ``height / h`` (resp. width) and rounded, then clamped.
    For an exact doubling this is upstream's rule: repeat x2, times 2, +1 on odd rows/cols.

    Bug fix: upstream (79fb9fe6) built the lists of odd rows and odd columns that get the +1 from
    ``range(nnf.shape[0])``, the batch size, so only odd rows/cols below B were offset and every
    other odd row/col of the upscaled field pointed one pixel off (an identity field did not stay
    an identity). Its "is the scale exactly 2?" test also compared against the batch dimension,
    so it always went through cv2.INTER_LINEAR + truncation, a no-op for exact doubling. Here
    every odd row/col gets its +1. For sizes that are not an exact doubling (H or W not divisible
    by 2**(levels-1)) upstream bilinearly resized the doubled coordinates and truncated them; we
    scale displacements of the nearest coarse pixel instead, which keeps an identity field an
    identity and does not blend coordinates across motion edges.
    """
    b, h, w, _ = nnf.shape
    rows = torch.arange(height, device=nnf.device)
    cols = torch.arange(width, device=nnf.device)
    coarse_rows = (rows * h) // height
    coarse_cols = (cols * w) // width
    picked = nnf.long()[:, coarse_rows][:, :, coarse_cols]
    if (height, width) == (2 * h, 2 * w):
        out = torch.stack(
            [
                2 * picked[..., 0] + (rows % 2).view(1, -1, 1),
                2 * picked[..., 1] + (cols % 2).view(1, 1, -1),
            ],
            dim=-1,
        )
    else:
        dy = (picked[..., 0] - coarse_rows.view(1, -1, 1)).double() * (height / h)
        dx = (picked[..., 1] - coarse_cols.view(1, 1, -1)).double() * (width / w)
        out = torch.stack(
            [rows.view(1, -1, 1) + dy.round().long(), cols.view(1, 1, -1) + dx.round().long()], dim=-1
        )
    return _clamp_nnf_(out, height, width).to(torch.int32).contiguous()


class PyramidPatchMatcher:
    """Coarse-to-fine PatchMatch between a source and a target guide (upstream
    `PyramidPatchMatcher`); `estimate_nnf` returns ``(nnf, target_style)``.

    Inputs: float32 tensors (B, H, W, C) with values in 0..255 on any device (moved to
    `device`). Output: `nnf` int32 (B, H, W, 2), `target_style` float32 (B, H, W, C) = the
    source style remapped onto the target by the final NNF (smallest patch size), on `device`.

    `backend`: "torch", "cupy" or "auto" (cupy when `device` is CUDA and cupy works, else torch).
    `seed`: the base of the per-call randomness; `estimate_nnf(..., seed=s)` uses only `s`, so a
    call is reproducible whatever ran before; with ``seed=None`` the n-th such call uses
    (self.seed, n). ``seed`` may also be one seed per batch item: each item then draws only from
    its own seed, so its result is the same in any batch (see `_Random`). All pyramid resampling happens on `device` (no host round trip per level).
    """

    def __init__(
        self,
        image_height,
        image_width,
        channel=3,
        minimum_patch_size=5,
        threads_per_block=8,
        num_iter=5,
        gpu_id=0,
        guide_weight=10.0,
        use_mean_target_style=False,
        use_pairwise_patch_error=False,
        tracking_window_size=0,
        initialize="identity",
        device="cpu",
        backend="auto",
        seed=0,
    ):
        if initialize not in INITIALIZATIONS:
            raise ValueError(f"initialize must be one of {INITIALIZATIONS}, got {initialize!r}")
        self.image_height, self.image_width, self.channel = image_height, image_width, channel
        self.minimum_patch_size = minimum_patch_size
        self.num_iter = num_iter
        self.initialize = initialize
        self.seed = int(seed)
        self._calls = 0
        self.device = _resolve_device(device, gpu_id)
        sizes = pyramid_sizes(image_height, image_width, minimum_patch_size, num_iter)
        self.pyramid_level = len(sizes)
        self.pyramid_heights = [h for h, _ in sizes]
        self.pyramid_widths = [w for _, w in sizes]
        self.patch_matchers = [
            PatchMatcher(
                h,
                w,
                channel,
                minimum_patch_size=minimum_patch_size,
                threads_per_block=threads_per_block,
                num_iter=num_iter,
                gpu_id=gpu_id,
                guide_weight=guide_weight,
                use_mean_target_style=use_mean_target_style,
                use_pairwise_patch_error=use_pairwise_patch_error,
                tracking_window_size=tracking_window_size,
                device=self.device,
                backend=backend,
            )
            for h, w in sizes
        ]
        self.backend = self.patch_matchers[0].kernels.name  # "torch" or "cupy", after "auto" is resolved

    def initialize_nnf(self, batch_size: int, rng: _Random) -> torch.Tensor:
        h, w = self.pyramid_heights[0], self.pyramid_widths[0]
        if self.initialize == "random":
            return torch.stack([torch.stack([torch.randint(0, h, (h, w), generator=g, device=self.device, dtype=torch.int32),
                                             torch.randint(0, w, (h, w), generator=g, device=self.device, dtype=torch.int32)], dim=-1)
                                for g in rng.devices])
        rows = torch.arange(h, device=self.device, dtype=torch.int32).view(h, 1).expand(h, w)
        cols = torch.arange(w, device=self.device, dtype=torch.int32).view(1, w).expand(h, w)
        return torch.stack([rows, cols], dim=-1).expand(batch_size, h, w, 2).contiguous()

    def estimate_nnf(self, source_guide, target_guide, source_style, seed=None):
        """Match `target_guide` to `source_guide` and remap `source_style`: ``(nnf, target_style)``."""
        if seed is None:
            seed = _mix_seed(self.seed, self._calls)
            self._calls += 1
        rng = _Random.for_batch(seed, torch.as_tensor(source_guide).shape[0], self.device)
        with torch.no_grad():
            sg = _to_bhwc("source_guide", source_guide, self.device)
            tg = _to_bhwc("target_guide", target_guide, self.device)
            ss = _to_bhwc("source_style", source_style, self.device)
            expected = (self.image_height, self.image_width, self.channel)
            for name, x in (("source_guide", sg), ("target_guide", tg), ("source_style", ss)):
                if tuple(x.shape[1:]) != expected or x.shape[0] != sg.shape[0]:
                    raise ValueError(
                        f"{name} has shape {tuple(x.shape)}, expected (B, {expected[0]}, {expected[1]}, {expected[2]}) "
                        f"with the same B for all three inputs"
                    )
            nnf = None
            for level, matcher in enumerate(self.patch_matchers):
                h, w = self.pyramid_heights[level], self.pyramid_widths[level]
                nnf = self.initialize_nnf(sg.shape[0], rng) if level == 0 else upscale_nnf(nnf, h, w)
                last = level == len(self.patch_matchers) - 1
                nnf, target_style = matcher._estimate(
                    resample_area(sg, h, w), resample_area(tg, h, w), resample_area(ss, h, w), nnf, rng, last
                )
        return nnf, target_style
