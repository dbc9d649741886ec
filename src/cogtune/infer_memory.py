"""Generation memory: the expected peak GPU memory of `cogtune infer` with its memory options
(`cogtune infer --dry_run`), from the model's config files alone.

Each model's part of the run is passed once over meta tensors while every tensor made and freed is
counted (as for preprocess): T5 encoding a prompt, the transformer's forward pass on a batch of
latents (two with classifier-free guidance), and the VAE decoding the latents with the tiling and
slicing asked for. Weights are counted as stored (quantized for --components_to_quantize). What is
on the GPU at once depends on the offload: without it, all three models and the largest stage's
activations; with model offload, one model and its stage; with sequential offload, one layer's
weights and the largest stage's activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cogtune import quantize
from cogtune.config import InferConfig
from cogtune.families import ModelConfigs
from cogtune.infer import with_trained_base
from cogtune.preprocess.memory import activation_peak
from cogtune.util.devices import precision_dtype
from cogtune.util.tensor_bytes import gib, largest_module_bytes


@dataclass
class Part:
    name: str
    weights: int  # as stored on the GPU
    largest_layer: int  # the most weight bytes one module holds directly (what sequential offload keeps)
    activations: int  # the peak of its stage beyond its weights


def _weights(model: torch.nn.Module, config: InferConfig, part: str) -> tuple[int, int]:
    backend = config.quant_backend if part in config.components_to_quantize else "none"
    return quantize.weight_bytes(model, backend, config.quant_type), largest_module_bytes(model)


def parts(config: InferConfig, models: ModelConfigs) -> list[Part]:
    spec = models.spec()
    dtype = precision_dtype(config.mixed_precision)
    meta = torch.device("meta")
    batch = 2 if config.guidance_scale > 1 else 1  # classifier-free guidance: the prompt and the negative one

    t5 = spec.meta_text_encoder(models, dtype)
    tokens = spec.text_tokens(meta)
    found = [Part("T5", *_weights(t5, config, "text_encoder"), activation_peak(t5, lambda: t5(tokens)))]

    transformer = spec.meta_transformer(models, dtype).requires_grad_(False).eval()
    height, width = config.height // spec.vae_scale_spatial, config.width // spec.vae_scale_spatial
    latent_shape = [spec.latent_channels, spec.latent_frames(config.num_frames), height, width]
    inputs = spec.memory_inputs(batch, latent_shape, transformer.config.in_channels, dtype, meta, dtype)
    found.append(Part("transformer", *_weights(transformer, config, "transformer"),
                      activation_peak(transformer, lambda: transformer(**inputs, return_dict=False))))

    vae = spec.meta_vae(models, dtype)
    if config.enable_tiling:
        vae.enable_tiling()
    if config.enable_slicing:
        vae.enable_slicing()
    latents = torch.empty(1, spec.latent_channels, spec.latent_frames(config.num_frames), height, width, device=meta,
                          dtype=dtype)
    found.append(Part("VAE", *_weights(vae, config, "vae"), activation_peak(vae, lambda: vae.decode(latents))))
    return found


def peak(found: list[Part], config: InferConfig) -> int:
    """What is on the GPU at most at once, for the offload asked for."""
    if config.enable_sequential_cpu_offload:
        return max(p.largest_layer for p in found) + max(p.activations for p in found)
    if config.enable_model_cpu_offload:
        return max(p.weights + p.activations for p in found)
    return sum(p.weights for p in found) + max(p.activations for p in found)


def dry_run(config: InferConfig) -> str:
    """What `cogtune infer --dry_run` prints."""
    config = with_trained_base(config)
    models = ModelConfigs.of(config)
    spec = models.spec()
    found = parts(config, models)
    offload = ("sequential CPU offload" if config.enable_sequential_cpu_offload else
               "model CPU offload" if config.enable_model_cpu_offload else "no offload")
    quantized = (f", {config.quant_backend} {quantize.quant_type(config.quant_backend, config.quant_type)} for "
                 f"{' and '.join(config.components_to_quantize)}" if config.quant_backend != "none" else "")
    lines = [f"Expected peak GPU memory of cogtune infer for {spec.description}, {config.num_frames}x{config.height}x"
             f"{config.width}, --mixed_precision {config.mixed_precision}, {offload}{quantized}"
             f"{', VAE tiling' if config.enable_tiling else ''}{', VAE slicing' if config.enable_slicing else ''}:"]
    lines += [f"  {p.name}: weights {gib(p.weights)}, its stage's activations {gib(p.activations)}" for p in found]
    lines.append(f"  expected peak: {gib(peak(found, config))}")
    lines.append("The estimate counts tensors (as torch.cuda.max_memory_allocated does); the CUDA context and the "
                 "allocator's cache add about 0.5-1 GiB to what nvidia-smi shows. The LoRA adds its own few MiB.")
    return "\n".join(lines)

