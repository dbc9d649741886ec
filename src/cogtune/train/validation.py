"""Validation videos during training, generated from embeddings that `cogtune preprocess` put in the
cache: the training process never loads a text encoder, and loads the VAE only to decode, then frees it.

The denoising loop is the family's (`generate_latents`: the loop of its diffusers pipelines, run on
the training transformer with its LoRA); tests/e2e/test_validation.py checks it against the pipelines.
"""

from __future__ import annotations

import gc
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cogtune import data_schema as schema
from cogtune.cache.reader import read_validation_inputs
from cogtune.config.training import ValidationRunArgs
from cogtune.data.validation import checked_validation_entries
from cogtune.families import ModelConfigs, ModelFamily
from cogtune.util import logs, media
from cogtune.util.media import write_mp4

VALIDATION_VIDEOS_DIR = "validation"  # under the output dir: step-<N>/ folders of mp4 files and a contact sheet
CONTACT_SHEET_NAME = "contact_sheet.png"


@dataclass
class ValidationPrompt:
    prompt: str
    image: str | None
    caption: dict[str, torch.Tensor]  # its cached caption tensors (TensorSet.caption)
    first_frame: dict[str, torch.Tensor] | None  # its image's cached tensors (TensorSet.first_frame), or None
    num_frames: int
    height: int
    width: int
    seed: int | None = None  # None: --seed (and --seed + 1, ... for --num_validation_videos)
    guidance_scale: float | None = None  # None: --guidance_scale


@dataclass
class ValidationSet:
    prompts: list[ValidationPrompt]
    negative: dict[str, torch.Tensor]  # the empty prompt's caption tensors
    fps: int  # of the training clips, and so of the validation videos


def load_validation_set(config, spec: ModelFamily, cache_path: Path, manifest: schema.Manifest) -> ValidationSet | None:
    """The validation prompts' cached embeddings (and image latents), at the cache's clip size; a
    clear error, before any model is loaded, for whatever preprocess has not encoded."""
    settings = manifest.settings
    entries = checked_validation_entries(config, spec, (settings.max_num_frames, settings.height, settings.width))
    if not entries:
        return None
    embeds, images = read_validation_inputs(cache_path, entries, spec.first_frame_depends_on_frames)
    prompts = [ValidationPrompt(e.prompt, e.image, embeds[e.prompt], images.get((e.image, e.height, e.width)),
                                e.num_frames, e.height, e.width, e.seed, e.guidance_scale) for e in entries]
    return ValidationSet(prompts, embeds[""], settings.fps)  # (each prompt has its size)


def validation_due(step: int, steps_per_epoch: int, config: ValidationRunArgs) -> bool:
    """Whether step ends a validation period: every --validation_steps steps, or else at the end of
    every --validation_epochs-th epoch (50, as in the diffusers scripts). The last step is validated
    anyway, after the loop."""
    if config.validation_steps:
        return step % config.validation_steps == 0
    epochs = config.validation_epochs or 50
    return step % steps_per_epoch == 0 and (step // steps_per_epoch) % epochs == 0


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


def run_validation(transformer, validation: ValidationSet, config, models: ModelConfigs, spec: ModelFamily,
                   output_dir: Path, step: int, dtype: torch.dtype, autocast) -> ValidationRound:
    """Generate --num_validation_videos per prompt, decode them with the VAE (loaded here, freed
    before returning), and write the mp4s and a contact sheet under OUTPUT_DIR/validation/step-N."""
    was_training = transformer.training
    transformer.eval()
    scheduler = spec.with_flow_shift(spec.validation_scheduler(models), config.flow_shift)
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
                    latents.append((prompt.prompt, seed, spec.generate_latents(
                        transformer, scheduler, prompt.caption, validation.negative,
                        prompt.num_frames, prompt.height, prompt.width, config.validation_num_inference_steps,
                        guidance, config.use_dynamic_cfg, generator, dtype, prompt.first_frame)))
    finally:
        transformer.train(was_training)
    vae = spec.load_vae(models, latents[0][2].device, dtype, config.enable_slicing, config.enable_tiling)
    folder = output_dir / VALIDATION_VIDEOS_DIR / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    videos, frames = [], []
    try:
        for index, (prompt, seed, video_latents) in enumerate(latents):
            video = spec.decode(vae, video_latents)
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
