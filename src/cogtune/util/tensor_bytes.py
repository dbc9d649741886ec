"""Live tensor bytes and their peak, counted as tensors are made and freed, on any device."""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GIB = 1024 ** 3


def gib(n: int, width: int = 0) -> str:
    """n bytes in GiB, or in MiB below a tenth of a GiB (right-aligned in `width` characters)."""
    return f"{n / GIB:{width}.2f} GiB" if n >= GIB / 10 else f"{n / 1024 ** 2:{width}.1f} MiB"


def largest_module_bytes(model: torch.nn.Module) -> int:
    """The most parameter bytes one module holds itself: what offloading layer by layer keeps on the device."""
    return max(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False)) for m in model.modules())


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created while active, and their peak: on a CPU, the
    figure torch.cuda.max_memory_allocated gives on a GPU (without the allocator's rounding).
    Tensors that existed before (weights, say) are counted by passing them as `existing`. With
    `meta`, tensors on the meta device count too: a pass on meta tensors then gives the peak the
    same pass would reach on a device, without any memory."""

    def __init__(self, existing=(), meta: bool = False):
        super().__init__()
        self.meta = meta
        self.current = self.peak = 0
        self.seen = weakref.WeakValueDictionary()
        for t in existing:
            self._track(t)

    def _track(self, t):
        if not isinstance(t, torch.Tensor) or (t.device.type == "meta" and not self.meta):
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.seen:
            return
        self.seen[key] = storage
        size = storage.nbytes()
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int):
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            self._track(t)
        return out


@contextlib.contextmanager
def fused_attention_on_meta():
    """On the meta device F.scaled_dot_product_attention falls back to its math path, which saves the
    whole attention matrix; the GPU's flash and memory-efficient kernels (and the CPU's flash
    kernel) save only q, k, v, the output and a logsumexp, and none of them makes the attention
    matrix. This routes meta tensors to the fused kernel (with the mask, as T5's position bias, where
    there is one), so that the count matches what a device holds."""
    import torch.nn.functional as F

    plain = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if not kwargs.get("enable_gqa", False):  # (diffusers' attention dispatcher passes enable_gqa=False)
            kwargs.pop("enable_gqa", None)
        if query.device.type != "meta" or set(kwargs) - {"scale"}:
            return plain(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=kwargs.get("scale"))[0]

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain
