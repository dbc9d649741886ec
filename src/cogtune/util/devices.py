"""Precision names and the devices the stages run on."""

from __future__ import annotations

import os

import torch

from cogtune.errors import CogtuneError

MIXED_PRECISION = ("no", "fp16", "bf16")


def precision_dtype(mixed_precision: str) -> torch.dtype:
    """The torch dtype of a --mixed_precision value ("no" is fp32)."""
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def check_precision_available(mixed_precision: str) -> None:
    """fp16 autocast exists only on GPUs; say so before any model is loaded."""
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise CogtuneError("--mixed_precision fp16 needs a GPU; use bf16 or no on a CPU.")


def encoding_device_and_dtype(precision: str) -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype preprocess runs its encoders: this process's GPU in --mixed_precision,
    or the CPU in fp32 (bf16/fp16 3D convolutions are pathologically slow on CPUs)."""
    if torch.cuda.is_available():  # one GPU per process of a node
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), precision_dtype(precision)
    return torch.device("cpu"), torch.float32
