"""Preprocess memory: the expected peak GPU memory of its two stages (`cogtune preprocess --dry_run`),
from the model's config files alone.

Each stage is run once on PyTorch's meta device (shapes without storage) while every tensor made
and freed is counted (LiveTensorBytes with meta), so the activation figure is the model's own: T5
on a batch of captions padded to the model's text length, and the VAE encoding the largest clip
with the tiling and slicing asked for. Weights are counted as they would be stored: quantized with
--text_encoder_quant_backend, and with --text_encoder_cpu_offload only the largest layer's at a time.
T5 is freed before the VAE loads, so the peak is the larger stage's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cogtune import quantize
from cogtune.config import PreprocessConfig
from cogtune.data.buckets import clip_sizes
from cogtune.families import ModelConfigs
from cogtune.util.devices import precision_dtype
from cogtune.util.tensor_bytes import LiveTensorBytes, fused_attention_on_meta, gib, largest_module_bytes


@dataclass
class StageEstimate:
    weights: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.activations


def t5_estimate(config: PreprocessConfig, models: ModelConfigs) -> StageEstimate:
    """T5 encoding one caption (preprocess encodes each on its own)."""
    dtype = precision_dtype(config.mixed_precision)  # (on a GPU: this machine may be a CPU)
    spec = models.spec()
    model = spec.meta_text_encoder(models, dtype)
    if config.text_encoder_cpu_offload:  # one module's own weights on the GPU at a time
        weights = largest_module_bytes(model)
    else:
        weights = quantize.weight_bytes(model, config.text_encoder_quant_backend, config.text_encoder_quant_type)
    tokens = spec.text_tokens("meta")
    return StageEstimate(weights, activation_peak(model, lambda: model(tokens)))


def activation_peak(model: torch.nn.Module, run) -> int:
    """The peak bytes of the tensors `run` makes beyond the model's own (whose views an op may return,
    which must not count as new tensors)."""
    own = [*model.parameters(), *model.buffers()]
    with torch.no_grad(), fused_attention_on_meta(), LiveTensorBytes(own, meta=True) as live:
        weights = live.current
        run()
    return live.peak - weights


def vae_estimate(config: PreprocessConfig, models: ModelConfigs, size: tuple[int, int, int], tiling: bool,
                 slicing: bool) -> StageEstimate:
    """The VAE encoding one clip of `size` (frames, height, width): preprocess encodes each on its own."""
    dtype = precision_dtype(config.mixed_precision)
    vae = models.spec().meta_vae(models, dtype)
    if tiling:
        vae.enable_tiling()
    if slicing:
        vae.enable_slicing()
    weights = sum(t.numel() * t.element_size() for t in [*vae.parameters(), *vae.buffers()])
    weights += models.spec().image_encoder_bytes(models, dtype)  # (beside the VAE: Wan 2.1 I2V's CLIP)
    frames, height, width = size
    clips = torch.empty(1, 3, frames, height, width, device="meta", dtype=dtype)
    return StageEstimate(weights, activation_peak(vae, lambda: vae.encode(clips)) + clips.numel() * clips.element_size())


def dry_run(config: PreprocessConfig) -> str:
    """What `cogtune preprocess --dry_run` prints."""
    models = ModelConfigs.of(config)
    spec = models.spec()
    size = max(clip_sizes(config), key=math.prod)
    t5 = t5_estimate(config, models)
    vae = vae_estimate(config, models, size, config.enable_tiling, config.enable_slicing)
    other = vae_estimate(config, models, size, not config.enable_tiling, config.enable_slicing)
    t5_how = ("T5 layer by layer from CPU memory" if config.text_encoder_cpu_offload else
              f"T5 quantized, {config.text_encoder_quant_backend} "
              f"{quantize.quant_type(config.text_encoder_quant_backend, config.text_encoder_quant_type)}"
              if config.text_encoder_quant_backend != "none" else "T5")
    lines = [
        f"Expected peak GPU memory of cogtune preprocess for {spec.description}, clips of "
        f"{'x'.join(map(str, size))} (the largest), "
        f"--mixed_precision {config.mixed_precision}:",
        f"  {t5_how}, one caption at a time: weights {gib(t5.weights)}, activations "
        f"{gib(t5.activations)}: {gib(t5.total)}",
        f"  VAE{' tiled' if config.enable_tiling else ''}{' sliced' if config.enable_slicing else ''}: weights "
        f"{gib(vae.weights)}, encoding {gib(vae.activations)}: {gib(vae.total)} "
        f"({'without' if config.enable_tiling else 'with'} --enable_tiling: {gib(other.total)})",
        f"  expected peak: {gib(max(t5.total, vae.total))} (T5 is freed before the VAE loads)",
        "The estimate counts tensors (as torch.cuda.max_memory_allocated does); the CUDA context and the "
        "allocator's cache add about 0.5-1 GiB to what nvidia-smi shows.",
    ]
    return "\n".join(lines)



def fits(need: int, free_bytes: int) -> bool:
    """Whether `need` bytes of tensors fit `free_bytes` of GPU memory, with a tenth more for the allocator."""
    return need * 1.1 <= free_bytes


@dataclass(frozen=True)
class VaeMemoryChoice:
    tiling: bool
    need: int  # the VAE's expected peak with it
    fits: bool


def choose_vae_memory(config: PreprocessConfig, models: ModelConfigs, free_bytes: int,
                      tiled_cache_started: bool = False) -> VaeMemoryChoice:
    """--auto_tiling: the settings asked, else with tiling, whichever fits `free_bytes` first; the
    last when none does. (Slicing saves nothing: preprocess encodes one clip at a time.) Once a tiled cache of these settings was started, tiling
    stays on, so that a run on a larger GPU continues that cache instead of starting another."""
    size = max(clip_sizes(config), key=math.prod)
    tiling = config.enable_tiling or tiled_cache_started
    choice = None
    for tiling in (tiling, True) if not tiling else (True,):
        need = vae_estimate(config, models, size, tiling, config.enable_slicing).total
        choice = VaeMemoryChoice(tiling, need, fits(need, free_bytes))
        if choice.fits:
            break
    return choice


def vae_room_problem(config: PreprocessConfig, models: ModelConfigs, free_bytes: int) -> str | None:
    """Why encoding the largest clip would not fit the GPU memory that is free (with a tenth more
    for the allocator), and what to do; None when it fits. Tiling is never switched on behind the
    user's back: it changes the latents, so it names another cache."""
    size = max(clip_sizes(config), key=math.prod)
    need = vae_estimate(config, models, size, config.enable_tiling, config.enable_slicing).total
    if fits(need, free_bytes):
        return None
    if not config.enable_tiling:
        tiled = vae_estimate(config, models, size, True, config.enable_slicing).total
        advice = (f"run again with --enable_tiling (expected {gib(tiled)}) or --auto_tiling; it makes another "
                  "cache, so give train the flag too, or let it find the latest preprocess run of the config")
    else:
        advice = "lower --height/--width or the frame counts, or free the GPU of other work"
    return (f"The VAE would need about {gib(need)} to encode clips of {'x'.join(map(str, size))}, and "
            f"{gib(free_bytes)} of the GPU is free: {advice}. Everything encoded so far is kept.")
