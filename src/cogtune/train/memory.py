"""Training memory: an estimate made before anything is loaded (`cogtune train --dry_run`), and a
measurement of live tensor bytes that works on any device (for checking the estimate on a CPU).

The estimate builds the transformer on PyTorch's meta device (shapes without storage, so a 5B model
costs nothing), prepared exactly as training prepares it (weight dtype, fp8 storage, LoRA), and
runs one forward pass of a batch of the largest bucket on meta tensors while counting every tensor
that autograd saves for the backward pass. The activation figure is therefore the model's own,
not a rule of thumb; the rest is counting:

    peak = weights + LoRA + LoRA gradients + optimizer state + saved activations + backward transient

With gradient checkpointing, each block keeps only its inputs, and one block's activations exist
at a time, while it is recomputed. The backward transient (gradients in flight, attention backward
buffers) is taken as half of one block's saved activations: a constant fitted to CPU measurements
of nine configurations (three families, with and without checkpointing and fp8 storage), which
tests/e2e/test_memory.py keeps checking. With fp8 layerwise casting, autograd keeps each
layer's upcast weight for the backward pass, so the saving shows with gradient checkpointing (one
block's weights upcast at a time) and not without it; the meta pass counts this as it happens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cogtune import quantize
from cogtune.cache.identity import training_cache
from cogtune.cache.reader import Cache
from cogtune.config import PreprocessConfig, TrainConfig
from cogtune.config.training import OptimizerArgs
from cogtune.data.buckets import clip_sizes
from cogtune.errors import CogtuneError
from cogtune.families import ModelConfigs, ModelFamily
from cogtune.train.model import build_transformer
from cogtune.train.optim import state_bytes_per_parameter
from cogtune.train.swap import swapped_bytes
from cogtune.util.devices import precision_dtype
from cogtune.util.tensor_bytes import fused_attention_on_meta, gib



@dataclass
class Estimate:
    weights: int
    lora: int
    gradients: int
    optimizer: int
    activations: int
    transient: int
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    gradient_checkpointing: bool
    offload_optimizer: bool
    tokens: int

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.gradients + self.optimizer + self.activations + self.transient

    def table(self) -> str:
        checkpointing = "with" if self.gradient_checkpointing else "without"
        other = self.activations_without_checkpointing if self.gradient_checkpointing \
            else self.activations_with_checkpointing
        rows = [
            ("frozen transformer weights", self.weights),
            ("LoRA parameters (fp32)", self.lora),
            ("LoRA gradients (fp32)", self.gradients),
            ("optimizer state" + (" (in CPU memory: 0 on the GPU)" if self.offload_optimizer else ""),
             self.optimizer),
            (f"saved activations, {checkpointing} gradient checkpointing ({self.tokens} tokens)", self.activations),
            ("backward transient", self.transient),
        ]
        width = max(len(name) for name, _ in rows) + 2
        lines = [f"  {name:<{width}}{gib(value, 8)}" for name, value in rows]
        lines.append(f"  {'expected peak GPU memory':<{width}}{gib(self.total, 8)}")
        lines.append(f"  (saved activations {'without' if self.gradient_checkpointing else 'with'} gradient "
                     f"checkpointing would be {gib(other)})")
        return "\n".join(lines)


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind the tensors."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


class SavedTensorBytes:
    """Counts the bytes autograd saves for backward (distinct storages, excluding `exclude`, the
    model's own tensors). Storages are told apart by address, so every storage seen is kept
    alive until the count is done: a freed one's address could otherwise be reused by another."""

    def __init__(self, exclude):
        self.exclude = {t.untyped_storage()._cdata: t.untyped_storage() for t in exclude}
        self.storages = {}

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        if storage._cdata not in self.exclude:
            self.storages[storage._cdata] = storage
        return t

    @property
    def total(self) -> int:
        return sum(storage.nbytes() for storage in self.storages.values())

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def activation_bytes(transformer, spec: ModelFamily, inputs: dict) -> tuple[int, int, int, int, list[int]]:
    """(all saved bytes, the blocks' share of them, the largest single block's, the bytes of the
    blocks' inputs, and per block the bytes of its hidden and text states: what
    --gradient_checkpointing_cpu_offload keeps in CPU memory) of one forward pass."""
    blocks = spec.blocks(transformer)
    per_block, block_inputs, offloadable = [], [], []
    # A tensor every block takes (Wan's text states and timestep embedding) is kept once: by id, the
    # tensors held here so that no id is reused.
    inputs_seen = {}
    with SavedTensorBytes([*transformer.parameters(), *transformer.buffers()]) as saved:
        def before(module, args, kwargs):
            module._cogtune_saved_before = saved.total
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in (*args, *kwargs.values()) if isinstance(a, tuple) for t in a
                        if isinstance(t, torch.Tensor)]  # (RoPE tables come as a tuple)
            new = {id(t): t for t in tensors if id(t) not in inputs_seen}
            inputs_seen.update(new)
            block_inputs.append(tensor_bytes(new.values()))
            offloadable.append(tensor_bytes(spec.block_states(args, kwargs)))

        def after(module, args, kwargs, output):
            per_block.append(saved.total - module._cogtune_saved_before)

        handles = [block.register_forward_pre_hook(before, with_kwargs=True) for block in blocks]
        handles += [block.register_forward_hook(after, with_kwargs=True) for block in blocks]
        try:
            with fused_attention_on_meta():
                transformer(**inputs, return_dict=False)
        finally:
            for handle in handles:
                handle.remove()
    return saved.total, sum(per_block), max(per_block), sum(block_inputs), offloadable


def estimate(transformer, spec: ModelFamily, inputs: dict, gradient_checkpointing: bool, optimizer_state_bytes: int,
             offload_optimizer: bool, weights: int | None = None, offload_checkpointed: bool = False) -> Estimate:
    """The peak memory of training `transformer` (frozen, with LoRA, on the meta device or any other)
    on `inputs` (the keyword arguments of one forward pass, on the same device). Under mixed
    precision, pass the LoRA in the compute dtype: autocast, which does not act on the meta device,
    runs the LoRA matmuls in that dtype and saves their inputs in it. `weights`: the frozen weights'
    bytes where they are not the model's own (quantized ones, counted by quantize.weight_bytes).
    `offload_checkpointed`: --gradient_checkpointing_cpu_offload."""
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    frozen = [p for p in transformer.parameters() if not p.requires_grad] + list(transformer.buffers())
    lora_params = sum(p.numel() for p in trainable)
    lora_bytes = 4 * lora_params  # training keeps the LoRA and its gradients in fp32
    total_saved, in_blocks, largest_block, block_inputs, offloadable = activation_bytes(transformer, spec, inputs)
    with_checkpointing = block_inputs + largest_block + total_saved - in_blocks
    if offload_checkpointed:  # the blocks' states wait in CPU memory; one block's comes back at a time
        with_checkpointing -= sum(offloadable) - max(offloadable)
    tokens = inputs["encoder_hidden_states"].shape[1] + spec.video_tokens(inputs["hidden_states"])
    return Estimate(
        weights=sum(p.numel() * p.element_size() for p in frozen) if weights is None else weights,
        lora=lora_bytes,
        gradients=lora_bytes,
        optimizer=0 if offload_optimizer else lora_params * optimizer_state_bytes,
        activations=with_checkpointing if gradient_checkpointing else total_saved,
        transient=largest_block // 2,
        activations_without_checkpointing=total_saved,
        activations_with_checkpointing=with_checkpointing,
        gradient_checkpointing=gradient_checkpointing,
        offload_optimizer=offload_optimizer,
        tokens=tokens,
    )


# --- the estimate of a configuration (`cogtune train --dry_run`) --------------------------------


def largest_latent_shape(config: TrainConfig, preprocess_config: PreprocessConfig | None, models: ModelConfigs,
                         spec: ModelFamily) -> tuple[list[int], str]:
    """[C, F, H, W] of the biggest latent training will see, and where it was learnt: the cache's
    index when the cache exists, else the preprocess settings."""
    try:
        cache_path = training_cache(config.data_cache, preprocess_config, models).path
        shapes = {tuple(row.latent_shape) for row in Cache.open(cache_path).samples}
        if shapes:
            return list(max(shapes, key=lambda shape: math.prod(shape[1:]))), f"the cache {cache_path}"
    except CogtuneError:
        if preprocess_config is None:
            raise
    frames, height, width = max(clip_sizes(preprocess_config), key=lambda bucket: math.prod(bucket))
    return ([spec.latent_channels, spec.latent_frames(frames), height // spec.vae_scale_spatial,
             width // spec.vae_scale_spatial], "the preprocess settings (no cache yet)")


def memory_estimate(config: TrainConfig, models: ModelConfigs, latent_shape: list[int]):
    """The expected peak GPU memory of training with these settings on batches of latent_shape [C, F, H, W],
    per process: with --context_parallel_degree N each process holds 1/N of the tokens, so its activations
    are 1/N of one process's (the weights, LoRA and optimizer state are whole on each)."""
    estimated = _memory_estimate(config, models, latent_shape)
    degree = config.context_parallel_degree
    if degree > 1:
        for part in ("activations", "transient", "activations_without_checkpointing",
                     "activations_with_checkpointing", "tokens"):
            setattr(estimated, part, -(-getattr(estimated, part) // degree))
    return estimated


def _memory_estimate(config: TrainConfig, models: ModelConfigs, latent_shape: list[int]):
    spec = models.spec()
    meta = torch.device("meta")
    transformer = build_transformer(config, models, spec, meta, meta=True)
    weight_dtype = precision_dtype(config.mixed_precision)
    for parameter in transformer.parameters():  # as autocast would run them (see memory.estimate)
        if parameter.requires_grad:
            parameter.data = parameter.data.to(weight_dtype)
    inputs = spec.memory_inputs(config.train_batch_size, latent_shape, transformer.config.in_channels, weight_dtype,
                                meta)
    state_bytes = state_bytes_per_parameter(OptimizerArgs.of(config))
    if config.quant_backend == "none":
        estimated = estimate(transformer, spec, inputs, config.gradient_checkpointing, state_bytes,
                             config.offload_optimizer, offload_checkpointed=config.gradient_checkpointing_cpu_offload)
        if config.blocks_to_swap:  # the swapped blocks' weights are on the GPU two at a time at most
            away, at_once = swapped_bytes(spec.blocks(transformer), config.blocks_to_swap)
            estimated.weights += at_once - away
        return estimated
    # The meta model is unquantized: its linear weights are counted as the backend stores them, and
    # what the backend's layers save for the backward pass is added to the activations.
    estimated = estimate(transformer, spec, inputs, config.gradient_checkpointing, state_bytes,
                         config.offload_optimizer, quantize.weight_bytes(transformer, config.quant_backend,
                                                                         config.quant_type),
                         config.gradient_checkpointing_cpu_offload)
    without, with_ = quantize.dequantized_saved_bytes(transformer, spec.blocks(transformer), config.quant_backend,
                                                      weight_dtype.itemsize)
    estimated.activations_without_checkpointing += without
    estimated.activations_with_checkpointing += with_
    estimated.activations += with_ if config.gradient_checkpointing else without
    return estimated


def dry_run(config: TrainConfig, preprocess_config: PreprocessConfig | None = None) -> str:
    """What `cogtune train --dry_run` prints: the memory estimate, from config files alone."""
    models = ModelConfigs.of(config)
    spec = models.spec()
    latent_shape, source = largest_latent_shape(config, preprocess_config, models, spec)
    estimated = memory_estimate(config, models, latent_shape)
    channels, frames, height, width = latent_shape
    return (f"Expected peak GPU memory for {spec.description}, batch {config.train_batch_size} of latents "
            f"{frames}x{height}x{width} (the largest, from {source}), rank {config.rank}, "
            f"--mixed_precision {config.mixed_precision}"
            + (f", per process of --context_parallel_degree {config.context_parallel_degree} (a 1/"
               f"{config.context_parallel_degree} share of the tokens each)" if config.context_parallel_degree > 1 else "")
            + (f", --quant_backend {config.quant_backend} --quant_type "
               f"{quantize.quant_type(config.quant_backend, config.quant_type)}" if config.quant_backend != "none" else "")
            + f":\n{estimated.table()}\n"
            "The estimate counts tensors (as torch.cuda.max_memory_allocated does); the CUDA context and the "
            "allocator's cache add about 0.5-1 GiB to what nvidia-smi shows.")
