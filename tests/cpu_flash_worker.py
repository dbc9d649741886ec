"""Run by the ring-attention test under torchrun: `cogtune <args>` in a process where PyTorch's flash-attention
op has a CPU kernel.

Ring attention merges the shares' attention by their log-sum-exp, which diffusers' `_native_flash` backend
reads from `aten::_scaled_dot_product_flash_attention` (and its backward). PyTorch gives those ops CUDA kernels
only; on the CPU the same computation is `_scaled_dot_product_flash_attention_for_cpu` (its CPU flash-attention
kernel, output and log-sum-exp). This registers the one under the other's name, so the ring machinery runs on
the CPU unchanged. cogtune ships no such kernel: a CPU run without it is refused."""

import sys

import torch

_lib = torch.library.Library("aten", "IMPL")


def _forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                         scale=scale)
    empty = query.new_empty(0)  # cumulative lengths, RNG state, debug mask: unused without dropout or varlen
    return out, lse, empty, empty, query.shape[2], key.shape[2], empty, empty, empty


def _backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
              is_causal, philox_seed, philox_offset, *, scale=None):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, scale=scale)


_lib.impl("_scaled_dot_product_flash_attention", _forward, "CPU")
_lib.impl("_scaled_dot_product_flash_attention_backward", _backward, "CPU")

if __name__ == "__main__":
    from cogtune.cli import main

    sys.exit(main())
