"""--attention_backend: which kernel computes attention, through diffusers' attention dispatcher.

Wan's attention processors call the dispatcher already; CogVideoX's call F.scaled_dot_product_attention
directly, so its family swaps in a processor of ours with the same math that calls the dispatcher
(`cogvideox.DispatchingCogVideoXAttnProcessor`). Without the flag nothing is swapped: every step is
what it was.

A backend is checked before any weights load: that its package is installed (diffusers' own check,
which names what to install), that it runs on this device and in this dtype, and, for training, that
it has a backward pass that computes the gradients attention has.
"""

from __future__ import annotations

import torch

from cogtune.errors import CogtuneError

# The dispatcher's backends cogtune offers (diffusers' AttentionBackendName values): PyTorch's own,
# flash-attn 2 and 3, SageAttention and xformers. Hub-kernel, NPU and XLA variants are left out.
ATTENTION_BACKENDS = ("native", "flex", "_native_math", "_native_flash", "_native_efficient", "_native_cudnn",
                      "flash", "_flash_3", "sage", "xformers")
CPU_BACKENDS = ("native", "flex", "_native_math", "_native_flash")  # the rest need a CUDA GPU
HALF_ONLY = ("flash", "_flash_3", "sage")  # fp16 and bf16 kernels only
NO_CPU_BACKWARD = ("flex",)  # torch's FlexAttention has no backward on the CPU
INEXACT_BACKWARD = ("sage",)  # no backward of its own: every peer uses it for inference only
# Ring attention (--context_parallel_degree) merges the shares' attention by their log-sum-exp, which these
# kernels return (on GPUs).
RING_BACKENDS = ("flash", "_flash_3", "_native_cudnn", "_native_flash", "sage")
# The PyTorch ops that diffusers' ring attention calls for PyTorch's own backends: CUDA kernels only (on the CPU,
# `_native_flash` attention without context parallelism is another op, which returns no log-sum-exp to diffusers).
RING_OPS = {"_native_flash": "aten::_scaled_dot_product_flash_attention",
            "_native_cudnn": "aten::_scaled_dot_product_cudnn_attention"}


def check_attention_backend(backend: str | None, device: torch.device, dtype: torch.dtype, training: bool,
                            allow_inexact: bool = False) -> None:
    """Refuse, naming what to do, a backend that cannot run here; nothing for None (no backend asked)."""
    if backend is None:
        return
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    flag = f"--attention_backend {backend}"
    if backend in INEXACT_BACKWARD and training and not allow_inexact:
        raise CogtuneError(
            f"{flag} is refused for training: SageAttention quantizes the queries and keys to 8 bits and has no "
            "exact backward pass (diffusers gives it none; musubi-tuner, finetrainers and the SageAttention authors "
            "use it for inference only), so the gradients of the attention's LoRA layers would be wrong or missing. "
            "Use it with `cogtune infer`, or pass --allow_inexact_attention_backward to train with it anyway.")
    try:
        _check_attention_backend_requirements(AttentionBackendName(backend))
    except (RuntimeError, ImportError) as e:
        raise CogtuneError(f"{flag}: {e}") from None
    if device.type != "cuda" and backend not in CPU_BACKENDS:
        raise CogtuneError(f"{flag} needs a CUDA GPU; on the {device.type} use one of "
                           f"{', '.join(CPU_BACKENDS)}, or leave the flag out.")
    if backend in HALF_ONLY and dtype not in (torch.float16, torch.bfloat16):
        raise CogtuneError(f"{flag} computes in fp16 or bf16 only: use --mixed_precision bf16 (or fp16), or the "
                           "native backend.")
    if backend == "_flash_3" and torch.cuda.get_device_capability(device)[0] < 9:
        raise CogtuneError(f"{flag} (FlashAttention 3) needs a Hopper GPU (compute capability 9.0) or newer; "
                           "use --attention_backend flash or native.")
    if training and backend in NO_CPU_BACKWARD and device.type == "cpu":
        raise CogtuneError(f"{flag} cannot train on the CPU: PyTorch's FlexAttention has no backward pass there. "
                           "Use native on the CPU; flex trains on a GPU.")


def check_ring_attention(backend: str, device: torch.device) -> None:
    """Refuse ring attention with a PyTorch backend whose op has no kernel on this device (the CPU's)."""
    op = RING_OPS.get(backend)
    if op and not torch._C._dispatch_has_kernel_for_dispatch_key(op, device.type.upper()):
        raise CogtuneError(
            f"ring attention with --attention_backend {backend} calls {op}, which PyTorch runs on CUDA GPUs only, not "
            f"on the {device.type}: run context parallelism on GPUs, or on the {device.type} use a "
            "--context_parallel_degree that divides the attention heads (Ulysses, which any backend runs).")
