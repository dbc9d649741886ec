"""Validation videos during training, generated from embeddings that `cogtune preprocess` put in the
cache: the training process never loads T5, and loads the VAE only to decode, then frees it.

The denoising loop is the one of CogVideoXPipeline and CogVideoXImageToVideoPipeline (classifier-free
guidance with the empty negative prompt, optional dynamic CFG, the pipeline's own scheduler), run
on the training transformer with its LoRA; tests/test_validation.py checks it against the pipelines.
"""

from __future__ import annotations

import gc
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cogtune import data_schema as schema
from cogtune.cache.reader import read_validation_inputs
from cogtune.families import FamilySpec, ModelConfigs, load_vae
from cogtune.util import logs, media
from cogtune.util.media import write_mp4

VALIDATION_VIDEOS_DIR = "validation"  # under the output dir: step-<N>/ folders of mp4 files and a contact sheet
CONTACT_SHEET_NAME = "contact_sheet.png"


@dataclass
class ValidationPrompt:
    prompt: str
    image: str | None
    prompt_embeds: torch.Tensor  # [text length, text dim]
    image_moments: tuple[torch.Tensor, torch.Tensor] | None  # VAE mean and logvar, [C, 1, h, w]
    num_frames: int
    height: int
    width: int
    seed: int | None = None  # None: --seed (and --seed + 1, ... for --num_validation_videos)
    guidance_scale: float | None = None  # None: --guidance_scale


@dataclass
class ValidationSet:
    prompts: list[ValidationPrompt]
    negative_embeds: torch.Tensor
    fps: int  # of the training clips, and so of the validation videos


def load_validation_set(config, spec: FamilySpec, cache_path: Path, manifest: schema.Manifest) -> ValidationSet | None:
    """The validation prompts' cached embeddings (and image latents), at the cache's clip size; a
    clear error, before any model is loaded, for whatever preprocess has not encoded."""
    settings = manifest.settings
    entries = config.checked_validation_entries(spec, (settings.max_num_frames, settings.height, settings.width))
    if not entries:
        return None
    embeds, images = read_validation_inputs(cache_path, entries)
    prompts = [ValidationPrompt(e.prompt, e.image, embeds[e.prompt], images.get((e.image, e.height, e.width)),
                                e.num_frames, e.height, e.width, e.seed, e.guidance_scale) for e in entries]
    return ValidationSet(prompts, embeds[""], settings.fps)  # (each prompt has its size)


def validation_due(step: int, steps_per_epoch: int, config) -> bool:
    """Whether step ends a validation period: every --validation_steps steps, or else at the end of
    every --validation_epochs-th epoch (50, as in the diffusers scripts). The last step is validated
    anyway, after the loop."""
    if config.validation_steps:
        return step % config.validation_steps == 0
    epochs = config.validation_epochs or 50
    return step % steps_per_epoch == 0 and (step // steps_per_epoch) % epochs == 0


def load_scheduler(models: ModelConfigs):
    """The validation scheduler: CogVideoXDPMScheduler from the pipeline's scheduler config, as the
    diffusers training scripts validate (and as the CogVideoX authors advise for sampling)."""
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler.from_config(models.scheduler)


@torch.no_grad()
def generate_latents(transformer, scheduler, spec: FamilySpec, prompt_embeds: torch.Tensor,
                     negative_embeds: torch.Tensor, num_frames: int, height: int, width: int,
                     num_inference_steps: int, guidance_scale: float, use_dynamic_cfg: bool,
                     generator: torch.Generator, dtype: torch.dtype,
                     image_moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One video's denoised latents [1, F, C, h, w] (CogVideoX 1.5's padding frames dropped), as the
    CogVideoX pipelines compute them from these embeddings and this generator."""
    from diffusers import CogVideoXDPMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    device = next(p for p in transformer.parameters()).device
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    latent_frames = spec.latent_frames(num_frames)
    padding = spec.frame_padding(latent_frames)
    frames = latent_frames + padding
    channels = spec.latent_channels
    shape = (1, frames, channels, height // spec.vae_scale_spatial, width // spec.vae_scale_spatial)
    image_latents = None
    if image_moments is not None:  # sampled first, with the same generator, as the I2V pipeline does
        mean, logvar = (t.to(device, torch.float32) for t in image_moments)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        sample = mean + std * randn_tensor(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        image = spec.scale_image_latents(sample[None].to(dtype).permute(0, 2, 1, 3, 4))  # [1, 1, C, h, w]
        image_latents = spec.image_condition(image, frames)
    latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma
    guided = guidance_scale > 1.0
    embeds = torch.stack([negative_embeds, prompt_embeds]) if guided else prompt_embeds[None]
    embeds = embeds.to(device, dtype)
    family_inputs = spec.transformer_inputs(1, frames, shape[3], shape[4], device, dtype)
    extra = {"eta": 0.0, "generator": generator}
    old_pred_original_sample = None
    for i, t in enumerate(logs.progress(timesteps, desc="validation", unit="step", leave=False)):
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if image_latents is not None:
            model_input = torch.cat([model_input, torch.cat([image_latents] * model_input.shape[0])], dim=2)
        noise_pred = transformer(hidden_states=model_input, encoder_hidden_states=embeds,
                                 timestep=t.expand(model_input.shape[0]), **family_inputs,
                                 return_dict=False)[0].float()
        scale = guidance_scale
        if use_dynamic_cfg:
            scale = 1 + guidance_scale * (
                (1 - math.cos(math.pi * ((num_inference_steps - t.item()) / num_inference_steps) ** 5.0)) / 2)
        if guided:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + scale * (text - uncond)
        if isinstance(scheduler, CogVideoXDPMScheduler):
            latents, old_pred_original_sample = scheduler.step(
                noise_pred, old_pred_original_sample, t, timesteps[i - 1] if i > 0 else None, latents, **extra,
                return_dict=False)
        else:
            latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        latents = latents.to(dtype)
    return latents[:, padding:]


@torch.no_grad()
def decode(vae, latents: torch.Tensor, scaling_factor: float) -> np.ndarray:
    """[1, F, C, h, w] latents -> [frames, H, W, 3] uint8, as the pipelines' decode_latents and postprocess."""
    video = vae.decode(latents.permute(0, 2, 1, 3, 4).to(vae.dtype) / scaling_factor).sample[0]  # [3, F, H, W]
    video = (video.float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)
    return (video.cpu().numpy() * 255).round().astype(np.uint8)


def video_name(index: int, prompt: str, seed: int) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-")[:48] or "video"
    return f"{index:03d}-{words}-seed{seed}.mp4"


def contact_sheet(videos: list[tuple[str, np.ndarray]], path: Path, columns: int = 8) -> None:
    """A PNG with one row per video: its label, then `columns` frames evenly spaced from first to last."""
    rows = []
    for label, frames in videos:
        picks = np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int)
        rows.append((label, [frames[index] for index in picks]))
    media.contact_sheet(rows, path)


@dataclass
class ValidationRound:
    """A validation round's videos; on the processes other than the main one, its step only."""

    step: int
    folder: Path | None = None
    videos: list[tuple[str, Path]] = field(default_factory=list)  # (prompt, mp4)
    settings: list[dict] = field(default_factory=list)  # per video: its seed, guidance scale and size
    contact_sheet: Path | None = None
    frames: list[np.ndarray] = field(default_factory=list)  # per video, [F, H, W, 3] uint8 (for the trackers)
    fps: int = 0


def run_validation(transformer, validation: ValidationSet, config, models: ModelConfigs, spec: FamilySpec,
                   output_dir: Path, step: int, dtype: torch.dtype, autocast) -> ValidationRound:
    """Generate --num_validation_videos per prompt, decode them with the VAE (loaded here, freed
    before returning), and write the mp4s and a contact sheet under OUTPUT_DIR/validation/step-N."""
    was_training = transformer.training
    transformer.eval()
    scheduler = load_scheduler(models)
    latents, settings = [], []
    try:
        with autocast():
            for prompt in validation.prompts:
                first_seed = config.seed if prompt.seed is None else prompt.seed
                guidance = config.guidance_scale if prompt.guidance_scale is None else prompt.guidance_scale
                for seed in range(first_seed, first_seed + config.num_validation_videos):
                    generator = torch.Generator().manual_seed(seed)
                    settings.append({"seed": seed, "guidance_scale": guidance, "num_frames": prompt.num_frames,
                                     "height": prompt.height, "width": prompt.width})
                    latents.append((prompt.prompt, seed, generate_latents(
                        transformer, scheduler, spec, prompt.prompt_embeds, validation.negative_embeds,
                        prompt.num_frames, prompt.height, prompt.width, config.validation_num_inference_steps,
                        guidance, config.use_dynamic_cfg, generator, dtype, prompt.image_moments)))
    finally:
        transformer.train(was_training)
    vae = load_vae(models, config, latents[0][2].device, dtype)
    folder = output_dir / VALIDATION_VIDEOS_DIR / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    videos, frames = [], []
    try:
        for index, (prompt, seed, video_latents) in enumerate(latents):
            video = decode(vae, video_latents, spec.scaling_factor)
            path = folder / video_name(index, prompt, seed)
            write_mp4(path, video, validation.fps)
            videos.append((prompt, path))
            frames.append(video)
    finally:
        del vae
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    sheet = folder / CONTACT_SHEET_NAME
    contact_sheet([(f"{prompt} (seed {seed})", video) for (prompt, seed, _), video in zip(latents, frames)], sheet)
    return ValidationRound(step, folder, videos, settings, sheet, frames, validation.fps)
