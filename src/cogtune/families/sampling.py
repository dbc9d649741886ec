"""The denoising loop of the diffusers video pipelines, for validation videos generated from cached
embeddings: classifier-free guidance (the negative prompt first in the batch), an optional guidance
scale per step, a conditioning latent joined on channels, and the pipeline's scheduler."""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from cogtune.util import logs


@torch.no_grad()
def guided_denoise(predict: Callable, scheduler, latents: torch.Tensor, guidance_scale: float, generator: torch.Generator,
                   dtype: torch.dtype, scale_at: Callable | None = None,
                   condition: torch.Tensor | None = None) -> torch.Tensor:
    """Denoise `latents` over the scheduler's timesteps (set by the caller), as the pipelines do.
    predict(model_input, t): the transformer's noise prediction for the batch; scale_at(t): the
    guidance scale of step t (default guidance_scale); condition: joined on dim 2 of every row.
    Schedulers whose step takes the previous step's x0 prediction (CogVideoXDPMScheduler) get it."""
    timesteps = scheduler.timesteps
    guided = guidance_scale > 1.0
    extra = {"eta": 0.0, "generator": generator}
    multistep = "old_pred_original_sample" in inspect.signature(scheduler.step).parameters
    old_pred_original_sample = None
    for i, t in enumerate(logs.progress(timesteps, desc="validation", unit="step", leave=False)):
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if condition is not None:
            model_input = torch.cat([model_input, torch.cat([condition] * model_input.shape[0])], dim=2)
        noise_pred = predict(model_input, t).float()
        scale = guidance_scale if scale_at is None else scale_at(t)
        if guided:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + scale * (text - uncond)
        if multistep:
            latents, old_pred_original_sample = scheduler.step(
                noise_pred, old_pred_original_sample, t, timesteps[i - 1] if i > 0 else None, latents, **extra,
                return_dict=False)
        else:
            latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        latents = latents.to(dtype)
    return latents
