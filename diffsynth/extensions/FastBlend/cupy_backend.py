"""CUDA raw kernels (cupy) for the FastBlend patch-match engine.

Imported only when `patch_match` picks the cupy backend (CUDA device and a working cupy), so
importing `diffsynth` never needs cupy. The kernels compute exactly the remap, patch error and
pairwise error of `patch_match.TorchKernels` (same packs, same weights; one thread per target
pixel, upstream's launch shape: grid (ceil(H/tpb), ceil(W/tpb), B), block (tpb, tpb)). Everything
else (candidates, random numbers, acceptance) stays in the shared torch driver, so both backends
evaluate the same candidates for the same seed and differ only by float summation order.

Tensors are shared with torch zero-copy through `__cuda_array_interface__`, and the kernels run
on torch's current stream, so no synchronisation is needed between the two libraries.

Doubtful: this file is exercised only by the GPU tests (`pytest -m gpu`); it has not run on the
machines this was written on (no CUDA there).
"""

from __future__ import annotations

import cupy as cp
import numpy as np
import torch

_SOURCE = r"""
extern "C" {

// Packs are zero-padded channel-last float32 (B, H + 2 pad, W + 2 pad, channels); nnf is int32
// (B, H, W, 2) holding (row, col) of the source pixel for every target pixel.

__global__ void fb_remap(const float* pack, const int* nnf, float* out,
                         const int height, const int width, const int pad, const int channels,
                         const int c0, const int values, const int k) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    const int col = blockIdx.y * blockDim.y + threadIdx.y;
    if (row >= height || col >= width) return;
    const long long b = blockIdx.z;
    const long long wp = width + 2 * pad;
    const float* src = pack + b * (height + 2 * pad) * wp * channels;
    const int* field = nnf + b * height * width * 2;
    float* dst = out + ((b * height + row) * width + col) * values;
    const int r = k / 2;
    for (int c = 0; c < values; ++c) dst[c] = 0.0f;
    int count = 0;
    // Vote: mean of S(nnf(p + q) - q) over q with p + q and nnf(p + q) - q inside the image.
    for (int qy = -r; qy <= r; ++qy) {
        const int yy = row + qy;
        if (yy < 0 || yy >= height) continue;
        for (int qx = -r; qx <= r; ++qx) {
            const int xx = col + qx;
            if (xx < 0 || xx >= width) continue;
            const int sy = field[(yy * width + xx) * 2] - qy;
            const int sx = field[(yy * width + xx) * 2 + 1] - qx;
            if (sy < 0 || sy >= height || sx < 0 || sx >= width) continue;
            const float* s = src + ((sy + pad) * wp + sx + pad) * channels + c0;
            for (int c = 0; c < values; ++c) dst[c] += s[c];
            ++count;
        }
    }
    for (int c = 0; c < values; ++c) dst[c] /= (float)count;
}

__global__ void fb_patch_error(const float* src_pack, const float* tgt_pack, const int* nnf,
                               const float* weights, float* out,
                               const int height, const int width, const int pad, const int channels,
                               const int k) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    const int col = blockIdx.y * blockDim.y + threadIdx.y;
    if (row >= height || col >= width) return;
    const long long b = blockIdx.z;
    const long long wp = width + 2 * pad;
    const long long image = (height + 2 * pad) * wp * channels;
    const float* src = src_pack + b * image;
    const float* tgt = tgt_pack + b * image;
    const long long p = (b * height + row) * width + col;
    const int my = nnf[p * 2], mx = nnf[p * 2 + 1];
    const int r = k / 2;
    float e = 0.0f;
    for (int qy = -r; qy <= r; ++qy) {
        for (int qx = -r; qx <= r; ++qx) {
            const float* t = tgt + ((row + pad + qy) * wp + col + pad + qx) * channels;
            const float* s = src + ((my + pad + qy) * wp + mx + pad + qx) * channels;
            for (int c = 0; c < channels; ++c) {
                const float d = t[c] - s[c];
                e += weights[c] * d * d;
            }
        }
    }
    out[p] = e;
}

// blockIdx.z = pair j; members a = 2j, b = 2j + 1; out is (B / 2, H, W).
__global__ void fb_pairwise_error(const float* pack, const int* nnf, const float* weights, float* out,
                                  const int height, const int width, const int pad, const int channels,
                                  const int k) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    const int col = blockIdx.y * blockDim.y + threadIdx.y;
    if (row >= height || col >= width) return;
    const long long j = blockIdx.z;
    const long long wp = width + 2 * pad;
    const long long image = (height + 2 * pad) * wp * channels;
    const float* sa = pack + (2 * j) * image;
    const float* sb = pack + (2 * j + 1) * image;
    const long long pa = ((2 * j) * height + row) * width + col;
    const long long pb = ((2 * j + 1) * height + row) * width + col;
    const int ay = nnf[pa * 2], ax = nnf[pa * 2 + 1];
    const int by = nnf[pb * 2], bx = nnf[pb * 2 + 1];
    const int r = k / 2;
    float e = 0.0f;
    for (int qy = -r; qy <= r; ++qy) {
        for (int qx = -r; qx <= r; ++qx) {
            const float* a = sa + ((ay + pad + qy) * wp + ax + pad + qx) * channels;
            const float* b = sb + ((by + pad + qy) * wp + bx + pad + qx) * channels;
            for (int c = 0; c < channels; ++c) {
                const float d = a[c] - b[c];
                e += weights[c] * d * d;
            }
        }
    }
    out[(j * height + row) * width + col] = e;
}

}
"""


class CupyKernels:
    """The `TorchKernels` interface (full-grid evaluation only) as CUDA raw kernels."""

    name = "cupy"
    supports_subset = False

    def __init__(self, device, threads_per_block: int = 8):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CupyKernels needs a CUDA device, got {self.device}")
        self.threads_per_block = int(threads_per_block)
        self._index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        with cp.cuda.Device(self._index):
            self._module = cp.RawModule(code=_SOURCE)

    def _launch(self, name, batch, height, width, args):
        tpb = self.threads_per_block
        grid = ((height + tpb - 1) // tpb, (width + tpb - 1) // tpb, batch)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        with cp.cuda.Device(self._index), cp.cuda.ExternalStream(stream):
            arrays = [cp.asarray(a) if isinstance(a, torch.Tensor) else a for a in args]
            self._module.get_function(name)(grid, (tpb, tpb, 1), tuple(arrays))

    @staticmethod
    def _check(*tensors):
        for t in tensors:
            if not t.is_contiguous():
                raise ValueError("cupy kernels need contiguous tensors")

    def remap(self, pack: torch.Tensor, nnf: torch.Tensor, k: int, pad: int, c0: int) -> torch.Tensor:
        nnf = nnf.to(torch.int32).contiguous()
        self._check(pack)
        b, h, w, _ = nnf.shape
        channels = pack.shape[-1]
        values = channels - 1 - c0
        out = torch.empty(b, h, w, values, device=pack.device, dtype=torch.float32)
        i32 = np.int32
        self._launch(
            "fb_remap", b, h, w,
            (pack, nnf, out, i32(h), i32(w), i32(pad), i32(channels), i32(c0), i32(values), i32(k)),
        )
        return out

    def error_grid(self, src, tgt, nnf, k: int, pad: int, weights) -> torch.Tensor:
        nnf = nnf.to(torch.int32).contiguous()
        self._check(src, tgt)
        weights = weights.to(device=src.device, dtype=torch.float32).contiguous()
        b, h, w, _ = nnf.shape
        out = torch.empty(b, h, w, device=src.device, dtype=torch.float32)
        i32 = np.int32
        self._launch(
            "fb_patch_error", b, h, w,
            (src, tgt, nnf, weights, out, i32(h), i32(w), i32(pad), i32(src.shape[-1]), i32(k)),
        )
        return out

    def pairwise_grid(self, src, nnf, k: int, pad: int, weights) -> torch.Tensor:
        nnf = nnf.to(torch.int32).contiguous()
        self._check(src)
        weights = weights.to(device=src.device, dtype=torch.float32).contiguous()
        b, h, w, _ = nnf.shape
        out = torch.empty(b // 2, h, w, device=src.device, dtype=torch.float32)
        i32 = np.int32
        self._launch(
            "fb_pairwise_error", b // 2, h, w,
            (src, nnf, weights, out, i32(h), i32(w), i32(pad), i32(src.shape[-1]), i32(k)),
        )
        return out
