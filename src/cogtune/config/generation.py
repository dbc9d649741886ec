"""The settings of `cogtune infer`: what to generate, with which LoRA, and the pipeline's memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cogtune.config.base import Group, opt
from cogtune.errors import CogtuneError


@dataclass
class GenerationArgs(Group):
    """What to generate, and with which LoRA (infer)."""

    lora: Optional[str] = opt(
        None,
        "LoRA to load: a folder holding pytorch_lora_weights.safetensors, that file, or a hub id. "
        "Default: the LoRA in --output_dir.",
    )
    expert_lora: Optional[str] = opt(
        None, "Wan 2.2 A14B: the LoRA trained for the other expert (as --lora: a folder, its file or a hub id), "
              "loaded beside --lora; each goes into the expert its cogtune_lora.json names.")
    lora_scale: float = opt(1.0, "Strength of the LoRA: 1.0 is the trained alpha/rank scale, 0 disables it.", rules=('finite',))
    video_output_dir: Optional[str] = opt(None, "Where the mp4 files are written (default: OUTPUT_DIR/videos).")
    prompt: Optional[str] = opt(None, "The prompt to generate a video for.")
    prompt_file: Optional[str] = opt(
        None,
        "A text file with one prompt per line (blank lines are skipped), or for image-to-video a .csv or "
        ".jsonl file of prompt/image pairs (columns prompt and image; image paths relative to the file).",
    )
    image: Optional[str] = opt(
        None, "Image-to-video models: the first frame to animate (an image file, or a video whose first frame "
        "is used); applies to every prompt."
    )
    negative_prompt: Optional[str] = opt(None, "The negative prompt.")
    num_inference_steps: int = opt(50, "Denoising steps.", rules=('positive',))
    num_frames: int = opt(49, "Frames to generate (4k+1).", rules=('positive',))

    def check_own(self) -> None:
        if bool(self.prompt) == bool(self.prompt_file):
            raise CogtuneError("Give exactly one of --prompt or --prompt_file.")


@dataclass
class OffloadArgs(Group):
    """Generation memory: offload and quantized parts (infer)."""

    enable_model_cpu_offload: bool = opt(False, "Keep each model on the CPU until it runs (less GPU memory).")
    enable_sequential_cpu_offload: bool = opt(
        False, "Keep every layer on the CPU until it runs (the least GPU memory, and much slower; one GPU only).")
    components_to_quantize: list = opt(
        ["transformer", "text_encoder"], "The pipeline's parts that --quant_backend quantizes (transformer, "
                                         "text_encoder, vae), as diffusers' PipelineQuantizationConfig names them.")

    def check_own(self) -> None:
        unknown = set(self.components_to_quantize) - {"transformer", "text_encoder", "vae"}
        if unknown:
            raise CogtuneError(f"--components_to_quantize: {', '.join(sorted(unknown))} is not a part of the pipeline "
                               "(transformer, text_encoder, vae).")
        if self.enable_sequential_cpu_offload and self.enable_model_cpu_offload:
            raise CogtuneError("--enable_sequential_cpu_offload and --enable_model_cpu_offload: pick one (sequential "
                               "saves more memory, model offload is faster).")
