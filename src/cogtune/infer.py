"""`cogtune infer`: the base pipeline of the model's family plus a trained LoRA -> mp4 files."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cogtune import quantize
from cogtune.config import InferConfig
from cogtune.data.sources import decoded_text, read_rows
from cogtune.data.video import first_frame_pixels
from cogtune.errors import CogtuneError, first_line
from cogtune.families import ModelConfigs
from cogtune.families.attention import check_attention_backend
from cogtune.train.lora import expanded_lora_quietly, lora_source, read_lora_info, trained_base
from cogtune.train.validation import video_name
from cogtune.util import files, logs
from cogtune.util.devices import check_precision_available, precision_dtype
from cogtune.util.media import write_mp4

ADAPTER_NAME = "cogtune"
EXPERT_ADAPTER_NAME = "cogtune_expert"  # --expert_lora's adapter


@dataclass(frozen=True)
class Job:
    prompt: str
    image: Path | None  # the first frame, for image-to-video models


def read_jobs(config: InferConfig, image_conditioned: bool) -> list[Job]:
    """The prompts (and, for image-to-video models, their images) to generate videos for."""
    image = Path(config.image) if config.image else None
    if config.prompt:
        jobs = [Job(config.prompt, image)]
    else:
        path = Path(config.prompt_file)
        if not path.is_file():
            raise CogtuneError(f"--prompt_file {path} does not exist.")
        if path.suffix.lower() in (".csv", ".jsonl"):
            jobs = [Job(prompt, path.parent / picture if picture else image)
                    for prompt, picture in _prompt_image_pairs(path)]
        else:
            jobs = [Job(line.strip(), image) for line in decoded_text(path, "--prompt_file").splitlines() if line.strip()]
        if not jobs:
            raise CogtuneError(f"--prompt_file {path} holds no prompts.")
    for job in jobs:
        if image_conditioned and job.image is None:
            raise CogtuneError(
                f"This is an image-to-video model: give --image, or a --prompt_file with an image column "
                f"(no image for prompt {job.prompt[:60]!r})."
            )
        if not image_conditioned and job.image is not None:
            raise CogtuneError(f"This is a text-to-video model; it takes no image ({job.image}).")
        if job.image is not None and not job.image.is_file():
            raise CogtuneError(f"Image {job.image} does not exist.")
    return jobs


def _prompt_image_pairs(path: Path) -> list[tuple[str, str | None]]:
    return [(str(row["prompt"]).strip(), row.get("image") or None) for row in read_rows(path, "--prompt_file")
            if str(row["prompt"] or "").strip()]


def lora_location(config: InferConfig) -> tuple[str, str | None]:
    """(folder or hub id, weight file name) of the LoRA to load."""
    if config.lora is not None:
        return lora_source(config.lora, "--lora")
    path = Path(config.output_dir)
    if not path.exists():
        raise CogtuneError(f"--output_dir {path} does not exist; train first or pass --lora.")
    return lora_source(config.output_dir, "--output_dir")


def with_trained_base(config: InferConfig) -> InferConfig:
    """The config with the base model the LoRA was trained on (its cogtune_lora.json: model, revision
    and variant), where --pretrained_model_name_or_path is not given."""
    if config.pretrained_model_name_or_path:
        return config
    folder, _ = lora_location(config)
    base = trained_base(folder)
    if base is None:
        raise CogtuneError(f"{config.lora or config.output_dir} does not say which model it was trained on (no "
                           "cogtune_lora.json beside it): pass --pretrained_model_name_or_path.")
    logs.message(f"base model: {base['pretrained_model_name_or_path']} (the one the LoRA was trained on)")
    return dataclasses.replace(config, pretrained_model_name_or_path=base["pretrained_model_name_or_path"],
                               revision=config.revision or base.get("revision"),
                               variant=config.variant or base.get("variant"))


def run(config: InferConfig) -> list[Path]:
    logs.configure(config.log_format)
    config = with_trained_base(config)
    folder, weight_name = lora_location(config)
    # Where the videos go, proved writable before minutes of loading the pipeline.
    out_dir = Path(config.video_output_dir or Path(config.output_dir) / "videos")
    files.ensure_writable_dir(out_dir, "--video_output_dir" if config.video_output_dir else "--output_dir")
    info = read_lora_info(folder)
    models = ModelConfigs.of(config, bool(info.get("image_to_video")))  # (TI2V: as trained)
    spec = models.spec()
    jobs = read_jobs(config, spec.image_conditioned)
    ignore_positions = config.ignore_learned_positional_embeddings or bool(
        info.get("ignore_learned_positional_embeddings"))
    spec.check_frames(config.num_frames, "--num_frames")
    spec.check_size(config.height, config.width)
    spec.check_clip_size(config.num_frames, config.height, config.width, ignore_positions)
    check_precision_available(config.mixed_precision)
    spec.check_precision(config.mixed_precision, logs.message)
    spec.check_flow_shift(config.flow_shift)
    dtype = precision_dtype(config.mixed_precision)
    pipeline_class = spec.pipeline_class()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_attention_backend(config.attention_backend, device, dtype, training=False)
    quantization = None
    if config.quant_backend != "none":
        quantize.require(config.quant_backend, device)
        quantization = quantize.pipeline_config(config.quant_backend, config.quant_type,
                                                config.components_to_quantize, dtype)
    pipe = models.load_part(pipeline_class, None, dtype=dtype,
                            **({"quantization_config": quantization} if quantization else {}))
    if spec.ignores_learned_positions(ignore_positions):
        spec.drop_learned_positional_embeddings(pipe.transformer)
    if config.attention_backend:  # every transformer of the pipeline (Wan 2.2 A14B: both experts)
        for name, part in pipe.components.items():
            if name.startswith("transformer") and part is not None:
                spec.use_attention_backend(part, config.attention_backend)
    loras = [(ADAPTER_NAME, folder, weight_name, info, config.lora or config.output_dir)]
    if config.expert_lora:  # (a Wan 2.2 A14B LoRA for each expert)
        where, name = lora_source(config.expert_lora, "--expert_lora")
        loras.append((EXPERT_ADAPTER_NAME, where, name, read_lora_info(where), config.expert_lora))
        experts = [record.get("expert") for _, _, _, record, _ in loras]
        if sorted(map(str, experts)) != ["high_noise", "low_noise"]:
            raise CogtuneError(f"--lora and --expert_lora are LoRAs of the experts {experts[0]} and {experts[1]} (their "
                               "cogtune_lora.json); give one LoRA trained with --expert high_noise and one with "
                               "--expert low_noise.")
    for adapter, where, name, record, given in loras:
        kwargs = {"weight_name": name} if name else {}
        kwargs |= spec.lora_load_arguments(record)  # (a Wan 2.2 low-noise expert's: transformer_2)
        try:
            with expanded_lora_quietly():
                pipe.load_lora_weights(where, adapter_name=adapter, use_safetensors=True, **kwargs)  # never pickle
        except Exception as e:  # OSError, ValueError, safetensors' and peft's own error types
            raise CogtuneError(f"Cannot load the LoRA {given}: {first_line(e)}") from None
    # The LoRA file carries its alpha, so scale 1.0 is the trained strength.
    pipe.set_adapters([adapter for adapter, *_ in loras], [config.lora_scale] * len(loras))
    pipe.scheduler = spec.with_flow_shift(pipe.scheduler, config.flow_shift)
    if config.enable_slicing:
        pipe.vae.enable_slicing()
    if config.enable_tiling:
        pipe.vae.enable_tiling()
    offload = device.type == "cuda" and (config.enable_model_cpu_offload or config.enable_sequential_cpu_offload)
    if (config.enable_model_cpu_offload or config.enable_sequential_cpu_offload) and not offload:
        logs.message("note: CPU offload needs a GPU; on the CPU everything is in CPU memory already.")
    if offload and config.enable_sequential_cpu_offload:
        pipe.enable_sequential_cpu_offload()
    elif offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    if config.compile:  # regional compilation, as in training: one compiled graph serves every block
        for block in spec.blocks(pipe.transformer):
            block.compile()

    written = []
    pipe.set_progress_bar_config(disable=not logs.draws_bars(), leave=False, desc="denoising")
    for index, job in enumerate(logs.progress(jobs, desc="generating", unit="video")):
        generator = torch.Generator().manual_seed(config.seed)
        image = {}
        if job.image is not None:  # the frame training and validation see, at the video's size
            image["image"] = spec.inference_image(first_frame_pixels(job.image, config.height, config.width))
        frames = pipe(
            prompt=job.prompt, negative_prompt=config.negative_prompt, num_frames=config.num_frames,
            height=config.height, width=config.width, num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale, generator=generator, output_type="np", **image,
            **spec.pipeline_call_arguments(config.use_dynamic_cfg),
        ).frames[0]
        path = out_dir / video_name(index, job.prompt, config.seed)
        write_mp4(path, (np.clip(frames, 0, 1) * 255).round().astype(np.uint8), config.fps)
        written.append(path.resolve())
    return written
