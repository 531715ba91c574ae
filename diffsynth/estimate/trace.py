"""What a model call costs, found without running it: the models built on the meta device from file headers, their
calls traced at the run's sizes.

:func:`meta_models` loads a config's ``model_list`` through the real :class:`ModelManager` with every tensor
replaced by a meta tensor of the shape and dtype its file's header gives (no weight is read), so the modules
are exactly those a run builds: architecture, dtype, LoRA merges, the fp32 VAE copy. :func:`trace` runs a call
on meta tensors under a dispatch mode that follows every tensor the call creates until it dies, and returns:

- ``peak_bytes``: the most bytes alive at once on the device (activations; the weights were there before);
- ``host_bytes``: bytes copied to the CPU inside the call (``offload_skips``: the skip connections);
- ``flops``: multiply-adds × 2 of the matrix products, convolutions and attention;
- ``ops``: operator calls (each costs a fixed launch/dispatch overhead, which dominates small models).

Attention goes through the memory-efficient kernels on every device this engine runs on (CPU flash attention
and CUDA's flash / memory-efficient kernels): it is traced as its output plus its log-sum-exp, never as the
full attention matrix.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..models.blocks import attention_stand_in


@dataclass
class Traced:
    """What a traced call costs (see the module's doc)."""

    peak_bytes: int = 0
    host_bytes: int = 0
    flops: int = 0
    ops: int = 0


def _storage_key(t: torch.Tensor):
    return t.untyped_storage()._cdata


class _Tracer(TorchDispatchMode):
    """Live bytes of the tensors created under it (by storage), their peak, FLOPs and operator count."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.result = Traced()
        self._storages: dict[int, list] = {}  # storage -> [bytes, live tensors]

    def _track(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        entry = self._storages.get(key)
        if entry is None:
            nbytes = t.untyped_storage().nbytes()
            entry = self._storages[key] = [nbytes, 0]
            self.live += nbytes
            self.result.peak_bytes = max(self.result.peak_bytes, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.result.ops += 1
        if name == "_to_copy" and isinstance(args[0], torch.Tensor) and args[0].is_meta and str(kwargs.get("device", "meta")) == "cpu":
            src = args[0]  # offloaded to host memory: counted there, kept as a meta tensor for the rest of the trace
            self.result.host_bytes += src.numel() * kwargs.get("dtype", src.dtype).itemsize
            return torch.empty(src.shape, dtype=kwargs.get("dtype", src.dtype), device="meta")
        out = func(*args, **kwargs)
        self.result.flops += _flops(name, args, out)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_meta:
                self._track(t)
        return out


def _flops(name: str, args, out) -> int:
    if name in ("mm", "addmm"):
        a, b = (args[1], args[2]) if name == "addmm" else (args[0], args[1])
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if name in ("bmm", "baddbmm"):
        a, b = (args[1], args[2]) if name == "baddbmm" else (args[0], args[1])
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if name == "convolution":
        weight = args[1]
        out_t = out
        return 2 * out_t.numel() * weight.shape[1] * weight[0, 0].numel()
    return 0


def trace(call, *args, **kwargs) -> Traced:
    """Run ``call(*args, **kwargs)`` on meta tensors and return what it costs (see the module's doc)."""
    tracer = _Tracer()

    def attention(q, k, v, is_causal=False):
        """Memory-efficient attention: its output and log-sum-exp are allocated; FLOPs of QKᵀ and AV."""
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        tracer.result.flops += 2 * q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        del lse
        return out

    with torch.no_grad(), attention_stand_in(attention), tracer:
        call(*args, **kwargs)
    return tracer.result


# ---------------------------------------------------------------------- models from headers


def meta_models(model_list, dtype: torch.dtype, lora_alphas=(), headers: dict | None = None):
    """A :class:`ModelManager` holding the config's models on the meta device in ``dtype``, built from headers alone.

    ``headers``: the files' headers the pre-flight checks already read (``{path: {name: (shape, dtype)}}``), so no
    file is read twice; others are read here (a header only, except for legacy pickles). Only this thread loads
    from headers (``state_dict.meta_tensors_only``): a model loading elsewhere in the process meanwhile is untouched."""
    from ..models.model_manager import ModelManager
    from ..models.state_dict import meta_tensors_only, read_file_header

    known = {os.fspath(path): header for path, header in (headers or {}).items()}

    def header(path: str):
        if path not in known:
            known[path] = read_file_header(path)
        return known[path]

    with meta_tensors_only(header):
        manager = ModelManager(torch_dtype=dtype, device="meta")
        manager.load_models(list(model_list), lora_alphas=list(lora_alphas))
    return manager


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (as built: the run's dtype, per component)."""
    if module is None:
        return 0
    if isinstance(module, (list, tuple)):
        return sum(module_bytes(m) for m in module)
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
