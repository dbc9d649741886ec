"""`cogtune infer`: the base CogVideoX pipeline plus a trained LoRA -> mp4 files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from .config import InferConfig, check_precision_available, precision_dtype
from .errors import CogtuneError
from .tiny import write_mp4
from .train import LORA_WEIGHT_NAME

ADAPTER_NAME = "cogtune"


def read_prompts(config: InferConfig) -> list[str]:
    if config.prompt:
        return [config.prompt]
    path = Path(config.prompt_file)
    if not path.is_file():
        raise CogtuneError(f"--prompt_file {path} does not exist.")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise CogtuneError(f"--prompt_file {path} holds no prompts.")
    return prompts


def lora_location(config: InferConfig) -> tuple[str, str | None]:
    """(folder or hub id, weight file name) of the LoRA to load."""
    lora = config.lora or config.output_dir
    path = Path(lora)
    if path.is_file():
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / LORA_WEIGHT_NAME).is_file():
            raise CogtuneError(f"No {LORA_WEIGHT_NAME} in {path}; train first, or pass --lora with the file.")
        return str(path), LORA_WEIGHT_NAME
    if config.lora is None:
        raise CogtuneError(f"--output_dir {path} does not exist; train first or pass --lora.")
    if path.is_absolute() or lora.startswith(".") or lora.count("/") != 1:
        raise CogtuneError(f"--lora {lora} does not exist (give a LoRA folder, its .safetensors file, or a hub id).")
    return lora, None  # a hub id


def video_name(index: int, prompt: str, seed: int) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-")[:48] or "video"
    return f"{index:03d}-{words}-seed{seed}.mp4"


def run(config: InferConfig) -> list[Path]:
    from diffusers import CogVideoXPipeline

    prompts = read_prompts(config)
    folder, weight_name = lora_location(config)
    check_precision_available(config.mixed_precision)
    dtype = precision_dtype(config.mixed_precision)
    try:
        pipe = CogVideoXPipeline.from_pretrained(
            config.pretrained_model_name_or_path, revision=config.revision, variant=config.variant,
            cache_dir=config.cache_dir, torch_dtype=dtype,
        )
    except (OSError, ValueError) as e:
        raise CogtuneError(f"Cannot load the pipeline {config.pretrained_model_name_or_path}: {e}") from None
    kwargs = {"weight_name": weight_name} if weight_name else {}
    try:
        pipe.load_lora_weights(folder, adapter_name=ADAPTER_NAME, **kwargs)
    except (OSError, ValueError) as e:
        raise CogtuneError(f"Cannot load the LoRA {config.lora or config.output_dir}: {str(e).splitlines()[0]}") from None
    # The LoRA file carries its alpha, so scale 1.0 is the trained strength.
    pipe.set_adapters([ADAPTER_NAME], [config.lora_scale])
    if config.enable_slicing:
        pipe.vae.enable_slicing()
    if config.enable_tiling:
        pipe.vae.enable_tiling()
    if config.enable_model_cpu_offload and torch.cuda.is_available():
        pipe.enable_model_cpu_offload()
    else:
        pipe.to("cuda" if torch.cuda.is_available() else "cpu")

    out_dir = Path(config.video_output_dir or Path(config.output_dir) / "videos")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(config.seed)
        frames = pipe(
            prompt=prompt, negative_prompt=config.negative_prompt, num_frames=config.num_frames,
            height=config.height, width=config.width, num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale, use_dynamic_cfg=config.use_dynamic_cfg, generator=generator,
            max_sequence_length=pipe.transformer.config.max_text_seq_length, output_type="np",
        ).frames[0]
        path = out_dir / video_name(index, prompt, config.seed)
        write_mp4(path, (np.clip(frames, 0, 1) * 255).round().astype(np.uint8), config.fps)
        written.append(path.resolve())
    return written
