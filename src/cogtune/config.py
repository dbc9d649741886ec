"""Settings: one dataclass per stage, filled from a TOML file and then from command-line flags.

Flag names and meanings follow the diffusers CogVideoX example scripts. A config file is flat
(`key = value`, the flag names without dashes) and may hold `[preprocess]`, `[train]` and `[infer]`
tables whose keys apply to that stage only, so one file can drive all three stages.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cogtune import quantize
from cogtune.errors import CogtuneError
from cogtune.util.devices import MIXED_PRECISION

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STAGE_TABLES = ("preprocess", "train", "infer")


def opt(default: Any, help: str, choices: tuple | None = None, file_only: bool = False, **kwargs) -> Any:
    """A dataclass field that also describes its command-line flag (none for a file_only setting, which
    only a config file can give). Choices are lower case; values are taken in any case."""
    metadata = {"help": help, "choices": choices, "file_only": file_only}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


TENSOR_DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class ModelArgs:
    """Where the base CogVideoX pipeline comes from (shared by every stage)."""

    pretrained_model_name_or_path: Optional[str] = opt(
        None, "Path to a local diffusers CogVideoX pipeline folder or a hub model id (for example THUDM/CogVideoX-2b). "
              "infer, merge: default, the model the LoRA was trained on (its cogtune_lora.json)."
    )
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) of the pretrained model.")
    variant: Optional[str] = opt(None, "Weight file variant of the pretrained model, for example fp16.")
    cache_dir: Optional[str] = opt(None, "Where downloaded models are stored (the Hugging Face cache), as in diffusers.")
    log_format: str = opt(
        "text", "text: progress bars and messages for a terminal; json: one JSON object per line and event "
                "(progress, steps, checkpoints, results) on stdout, for cluster logs.", choices=("text", "json"))
    seed: int = opt(42, "Seed for every random choice (random crops, noise, data order, LoRA init).")
    ignore_learned_positional_embeddings: bool = opt(
        False,
        "CogVideoX-5b-I2V only: leave out its learned positional embeddings (tied to 49x480x720) so that it "
        "trains and generates at other sizes. Recorded with the LoRA; infer then leaves them out too.",
    )
    # Where the settings came from (filled by load_config, not settings themselves): the config file,
    # and which settings its command line gave as flags.
    config_file: Optional[str] = field(default=None, metadata={"internal": True}, repr=False)
    command_line: tuple = field(default=(), metadata={"internal": True}, repr=False)


@dataclass(frozen=True)
class ValidationEntry:
    """One validation video: its prompt and (image-to-video) image, and where a validation file gives
    them, its size, seed and guidance (None: the training clips' size, --seed, --guidance_scale)."""

    prompt: str
    image: str | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None


SEED_LIMIT = 2**63  # seeds go to torch.Generator.manual_seed and numpy, which take less than this safely

VALIDATION_FILE_COLUMNS = {"prompt": str, "image": str, "height": int, "width": int, "num_frames": int, "seed": int,
                           "guidance_scale": float}


def read_validation_file(path: Path) -> list[ValidationEntry]:
    """The rows of a --validation_file, checked: known columns, numbers of the right kind and rule,
    image paths relative to the file."""
    from cogtune.data.sources import read_rows

    rows = read_rows(path, "--validation_file")
    unknown = sorted(set(rows[0] if rows else {}) - set(VALIDATION_FILE_COLUMNS))
    if unknown:
        raise CogtuneError(f"--validation_file {path}: unknown column(s) {', '.join(unknown)}; it takes "
                           f"{', '.join(VALIDATION_FILE_COLUMNS)}.")
    entries = []
    for number, row in enumerate(rows, start=2 if path.suffix.lower() == ".csv" else 1):
        where = f"--validation_file {path}, {'line' if path.suffix.lower() == '.jsonl' else 'row on line'} {number}"
        values = {}
        for name, kind in VALIDATION_FILE_COLUMNS.items():
            value = row.get(name)
            if value is None or value == "":
                continue
            try:
                if kind is int and (isinstance(value, float) and not value.is_integer() or isinstance(value, bool)):
                    raise ValueError
                values[name] = kind(value) if kind is not str else str(value).strip()
            except (TypeError, ValueError):
                raise CogtuneError(f"{where}: {name} must be {'a whole number' if kind is int else 'a number'}, "
                                   f"got {value!r}.") from None
        if not values.get("prompt"):
            raise CogtuneError(f"{where}: the prompt is empty.")
        for name in ("height", "width"):
            if name in values and (values[name] <= 0 or values[name] % 16):
                raise CogtuneError(f"{where}: {name} {values[name]} is not a positive multiple of 16.")
        if "seed" in values and not 0 <= values["seed"] < SEED_LIMIT:
            raise CogtuneError(f"{where}: seed {values['seed']} is out of range (0 to {SEED_LIMIT - 1}).")
        if "guidance_scale" in values and not 0 <= values["guidance_scale"] < float("inf"):
            raise CogtuneError(f"{where}: guidance_scale must be a finite number, 0 or more, got {values['guidance_scale']}.")
        if "num_frames" in values and (values["num_frames"] < 1 or (values["num_frames"] - 1) % 4):
            raise CogtuneError(f"{where}: num_frames {values['num_frames']} is not of the form 4k+1.")
        if "image" in values:
            values["image"] = str(path.parent / values["image"])
        entries.append(ValidationEntry(**values))
    if not entries:
        raise CogtuneError(f"--validation_file {path} holds no rows.")
    return entries


@dataclass
class ValidationArgs:
    """Validation prompts (and images): preprocess encodes them into the cache, train generates from
    those embeddings, so T5 never runs in the training process."""

    validation_prompt: Optional[str] = opt(
        None, "One or more prompts to generate videos for during training, separated by "
              "--validation_prompt_separator. Give the same value to preprocess, which encodes them into the cache.")
    validation_images: Optional[str] = opt(
        None, "Image-to-video models: one image (or video, whose first frame is used) per validation prompt, "
              "separated by --validation_prompt_separator, in the order of the prompts.")
    validation_prompt_separator: str = opt(":::", "String that separates validation prompts (and images).")
    validation_file: Optional[str] = opt(
        None, "A .csv or .jsonl file of validation videos instead of --validation_prompt, one per row: prompt, and "
              "where wanted image (image-to-video; relative to the file), height, width, num_frames, seed and "
              "guidance_scale (default: the training clips' size, --seed, --guidance_scale). Give it to preprocess "
              "too, which encodes its prompts and images.")

    def validation_entries(self) -> list[ValidationEntry]:
        """The validation videos: the rows of --validation_file, or --validation_prompt's prompts (and images)."""
        if self.validation_file:
            if self.validation_prompt or self.validation_images:
                raise CogtuneError("Give either --validation_file or --validation_prompt (and --validation_images), "
                                   "not both.")
            return read_validation_file(Path(self.validation_file))
        return [ValidationEntry(prompt, image) for prompt, image in self._flag_pairs()]

    def _flag_pairs(self) -> list[tuple[str, str | None]]:
        """The (prompt, image or None) pairs of --validation_prompt and --validation_images."""
        if not self.validation_prompt:
            return []
        separator = self.validation_prompt_separator
        prompts = [p.strip() for p in self.validation_prompt.split(separator)]
        images = [i.strip() for i in self.validation_images.split(separator)] if self.validation_images else []
        if images and len(images) != len(prompts):
            raise CogtuneError(
                f"--validation_images names {len(images)} image(s) for {len(prompts)} --validation_prompt prompt(s); "
                f"give one image per prompt, separated by {separator!r}.")
        if any(not p for p in prompts):
            raise CogtuneError(f"--validation_prompt holds an empty prompt (check the {separator!r} separators).")
        return list(zip(prompts, images or [None] * len(prompts)))

    def checked_validation_entries(self, spec, clip_size: tuple[int, int, int]) -> list[ValidationEntry]:
        """The validation videos, checked against the model (a FamilySpec) and the file system, each with
        its size (clip_size, (frames, height, width), where it gives none)."""
        entries = self.validation_entries()
        images = [entry.image for entry in entries if entry.image]
        if images and not spec.image_conditioned:
            raise CogtuneError(f"--validation_images (or an image column) is for image-to-video models; this {spec.description} model "
                               "generates from text alone. Leave it out.")
        if spec.image_conditioned and len(images) < len(entries):
            raise CogtuneError(f"This {spec.description} model animates an image: give one --validation_images entry "
                               "per --validation_prompt.")
        for image in images:
            if not Path(image).is_file():
                raise CogtuneError(f"--validation_images: {image} does not exist.")
        sized = []
        for entry in entries:
            frames, height, width = (entry.num_frames or clip_size[0], entry.height or clip_size[1],
                                     entry.width or clip_size[2])
            spec.check_clip_size(frames, height, width, self.ignore_learned_positional_embeddings)
            sized.append(dataclasses.replace(entry, num_frames=frames, height=height, width=width))
        return sized


@dataclass
class PreprocessConfig(ModelArgs, ValidationArgs):
    """Decode, resize and encode a video dataset (and the validation prompts) into a cache."""

    instance_data_root: Optional[str] = opt(
        None, "Folder holding the videos; paths in videos.txt or the metadata file are relative to it."
    )
    dataset_name: Optional[str] = opt(
        None,
        "A metadata file (.csv, .json, .jsonl, .parquet) with a caption and a video column, or a folder "
        "holding metadata.{csv,jsonl,json,parquet}. Leave unset to use prompts.txt + videos.txt.",
    )
    dataset_config_name: Optional[str] = opt(None, "Config name of a hub --dataset_name (datasets.load_dataset).")
    caption_column: str = opt("prompts.txt", "Caption column of the metadata file, or the prompts file (prompts.txt).")
    video_column: str = opt("videos.txt", "Video path column of the metadata file, or the video list file (videos.txt).")
    id_token: Optional[str] = opt(None, "Identifier token put before every caption, followed by a space.")
    allow_symlinks_outside_root: bool = opt(
        False, "Accept videos that are symlinks to files outside --instance_data_root (paths that climb out of it "
               "with .. are refused either way).")
    height: int = opt(480, "Height in pixels of the training clips (a multiple of 16).")
    width: int = opt(720, "Width in pixels of the training clips (a multiple of 16).")
    fps: int = opt(8, "Frame rate of the training clips: clips with more frames per second are resampled to it.")
    max_num_frames: int = opt(49, "Frames per training clip (4k+1). Shorter clips use the largest 4k+1 they hold.")
    min_num_frames: int = opt(
        5, "Clips with fewer usable frames than this (at --fps, after the skips) are skipped as too short, each with "
           "its reason: a 0.3 s clip would otherwise be a 1-frame sample, a still image.")
    skip_frames_start: int = opt(0, "Source frames dropped from the start of every video.")
    skip_frames_end: int = opt(0, "Source frames dropped from the end of every video.")
    height_buckets: list = opt([], "Heights of the training buckets (with --width_buckets and --frame_buckets: every "
                                "combination is a bucket). Each clip goes to the bucket nearest its aspect ratio, then area.")
    width_buckets: list = opt([], "Widths of the training buckets (see --height_buckets).")
    frame_buckets: list = opt([], "Frame counts (4k+1) of the training buckets; a clip goes to the longest it can fill.")
    buckets: list = opt([], "An explicit list of buckets FRAMESxHEIGHTxWIDTH, for example 49x480x720 49x720x480.")
    video_reshape_mode: str = opt(
        "center",
        "center: keep aspect, resize to cover, centre crop; random: same with a seeded random crop; "
        "none: plain resize to height x width (distorts the aspect ratio).",
        choices=("center", "random", "none"),
    )
    cache_root: str = opt("cache", "Folder under which caches live, each in a subfolder named after its settings "
                                   "(a relative path, the default too, is beside the config file when there is one).")
    latent_dtype: str = opt("bf16", "Dtype of the stored VAE moments and text embeddings.", choices=TENSOR_DTYPES)
    mixed_precision: str = opt(
        "bf16", "Dtype the VAE and T5 run in on a GPU (the VAE always runs in fp32 on a CPU).", choices=MIXED_PRECISION
    )
    shard_size_mb: float = opt(512.0, "A cache shard file rolls over once it holds this many megabytes.")
    enable_slicing: bool = opt(False, "Train and infer: decode videos one at a time in the VAE. Preprocess encodes "
                                      "every clip on its own anyway.")
    enable_tiling: bool = opt(False, "Encode with the VAE tile by tile (less memory at high resolution).")
    auto_tiling: bool = opt(
        False, "On a GPU, switch on --enable_slicing, then --enable_tiling, when the VAE would not fit the free "
               "memory (its estimate plus a tenth). Tiling changes the latents, so it writes another cache; train "
               "with the same config (or this flag) finds it, and a later run continues the tiled cache.")
    text_encoder_quant_backend: str = opt(
        "none", "Quantize T5 as it loads, for encoding the captions (torchao, bitsandbytes_4bit, bitsandbytes_8bit "
                "or quanto, as --quant_backend names them): T5-XXL takes 8.9 GiB in bf16. The embeddings change "
                "slightly, so the cache is another one.",
        choices=("none", "torchao", "bitsandbytes_4bit", "bitsandbytes_8bit", "quanto"))
    text_encoder_quant_type: Optional[str] = opt(
        None, "The --text_encoder_quant_backend's type (as --quant_type; default: the backend's first).")
    text_encoder_cpu_offload: bool = opt(
        False, "Keep T5's layers in CPU memory and bring each to the GPU only while it runs (accelerate's "
               "cpu_offload): T5 then needs little GPU memory, and encodes more slowly. The embeddings are the same.")
    dry_run: bool = opt(
        False, "Print the expected peak GPU memory of the T5 and VAE stages for these settings and exit, loading "
               "no weights.")
    datasets: list = opt(
        [], "Several datasets in one cache, given in the config file as one [[datasets]] table each: its "
            "instance_data_root or dataset_name, and dataset_config_name, caption_column, video_column, id_token "
            "where they differ from the top-level ones, and repeats: how many times each of its samples is trained "
            "per epoch (default 1).", file_only=True)
    frame_extraction: str = opt(
        "head", "Which frames of a clip become samples: head, its first --max_num_frames at --fps (the default: the "
                "model's motion speed); spread, --max_num_frames spread over the whole clip at its own frame rate, "
                "every (frames // max_num_frames)-th (what the diffusers scripts do, ignoring --fps); and several "
                "windows of --max_num_frames at --fps, each a sample of its own, at most --max_windows_per_clip "
                "(musubi-tuner's names): chunk, consecutive windows that do not overlap; slide, a window every "
                "--frame_stride frames; uniform, --frame_sample windows spread evenly over the clip.",
        choices=("head", "spread", "chunk", "slide", "uniform"))
    frame_stride: int = opt(10, "--frame_extraction slide: frames (at --fps) from one window's start to the next.")
    frame_sample: int = opt(4, "--frame_extraction uniform: how many windows.")
    max_windows_per_clip: int = opt(
        8, "The most windows a clip gives with --frame_extraction chunk, slide or uniform (the first ones); a "
           "worker holds a clip's windows in memory together.")
    preview: bool = opt(
        False, "Decode, resize and crop a sample of the clips exactly as preprocess would, write a contact sheet "
               "per bucket (the source frame with the crop drawn on it, then frames over time) and exit: no model, "
               "no GPU, no cache.")
    preview_samples: int = opt(8, "How many clips --preview shows, spread evenly over the dataset.")
    preview_dir: Optional[str] = opt(None, "Where --preview writes its contact sheets (default: CACHE_ROOT/preview).")
    dataloader_num_workers: int = opt(0, "Worker processes that decode and resize videos while the encoders run.")
    vae_batch_size: int = opt(
        1, "Not used any more, kept so that older configs still read: every clip goes through the VAE on its "
           "own, since a batch of several gives each clip slightly other latents (kernels sum in an order that "
           "depends on the batch), and the cache must hold the same bytes for the same clip.")
    max_failures: Optional[float] = opt(
        None,
        "Stop the run when more clips than this cannot be used: a count (10) or a fraction of the clips (0.05). "
        "Default: never stop; unusable clips are skipped and counted.",
    )
    image_noise_variants: int = opt(
        1,
        "Image-to-video models: how many independently noised encodings of each clip's first frame to store "
        "(noise sigma = exp(N(-3, 0.5))); training picks one at random each step.",
    )


@dataclass
class TrainConfig(ModelArgs, ValidationArgs):
    """Train a LoRA on the transformer from a cache; T5 is never loaded, the VAE only to decode validation videos."""

    data_cache: Optional[str] = opt(
        None,
        "The cache folder to train from. When unset, the cache that `cogtune preprocess` writes for the same "
        "config file is used.",
    )
    cache_root: str = opt("cache", "Folder under which caches live (used to find the cache when --data_cache is unset; "
                                   "beside the config file when there is one).")
    output_dir: str = opt("cogtune-lora", "Where checkpoints and the final LoRA are written (beside the config file "
                                          "when there is one).")
    rank: int = opt(64, "LoRA rank.")
    lora_alpha: float = opt(64.0, "LoRA alpha; the LoRA scale is lora_alpha / rank (rank or rank/2 is advised).")
    lora_target_modules: list = opt(
        ["to_q", "to_k", "to_v", "to_out.0"], "Transformer modules that get LoRA adapters."
    )
    lora_target_preset: Optional[str] = opt(
        None, "A named set of --lora_target_modules (replaces it): attention (the default's four projections), "
              "attention_ffn (plus the feed-forward layers) or all_linear (every linear layer of the blocks, the "
              "norms' too).", choices=("attention", "attention_ffn", "all_linear"))
    use_dora: bool = opt(
        False, "DoRA (peft's use_dora): a learned magnitude per output feature beside the LoRA. diffusers' "
               "load_lora_weights loads it (checked in the tests); slower steps.")
    use_rslora: bool = opt(
        False, "rsLoRA (peft's use_rslora): scale lora_alpha / sqrt(rank) instead of lora_alpha / rank. The file "
               "records it; diffusers 0.35 and newer read that when loading.")
    init_lora: Optional[str] = opt(
        None, "Start from an existing LoRA instead of a new one: a folder with pytorch_lora_weights.safetensors "
              "(ours, or a diffusers script's checkpoint-N), a .safetensors file, or a hub id. Same --rank, "
              "--lora_alpha and targets. A resumed run continues from its checkpoint instead.")
    mixed_precision: str = opt(
        "bf16",
        "no, fp16 or bf16: dtype of the frozen transformer and autocast (LoRA weights stay fp32 under fp16).",
        choices=MIXED_PRECISION,
    )
    train_batch_size: int = opt(1, "Samples per batch per device; a batch only holds samples of one latent shape.")
    num_train_epochs: int = opt(1, "Epochs to train (ignored when --max_train_steps is set).")
    max_train_steps: Optional[int] = opt(None, "Optimizer steps to train; overrides --num_train_epochs.")
    checkpointing_steps: int = opt(500, "Save a checkpoint-N folder every this many optimizer steps.")
    checkpoints_total_limit: Optional[int] = opt(
        None, "Keep at most this many checkpoints: the one just saved, and the newest others (the oldest go first).")
    resume_from_checkpoint: Optional[str] = opt(
        None, "A checkpoint-N folder to resume from, or 'latest' for the newest one in --output_dir (a new run "
              "when there is none yet, so a requeued job can always pass it)."
    )
    overwrite_output_dir: bool = opt(
        False, "Start a new run in an --output_dir that holds another run's checkpoints or LoRA, removing them (and "
               "its log, curve, card and validation videos; other files stay). Without it such a run is refused. With "
               "--resume_from_checkpoint latest: the run there is resumed when its settings are this run's, else "
               "replaced.")
    resume_with_new_data: bool = opt(
        False, "Resume even though the cache's selection changed since the checkpoint (clips added or removed by a "
               "later preprocess). Without it such a resume is refused: its steps would differ from the run it "
               "continues."
    )
    max_nan_steps: int = opt(
        5, "A step whose loss or gradient is NaN or infinite is skipped with a warning; this many in a row stop "
           "the run.")
    gradient_accumulation_steps: int = opt(1, "Batches accumulated per optimizer step.")
    gradient_checkpointing: bool = opt(False, "Recompute transformer activations in the backward pass (less memory).")
    layerwise_casting_storage_dtype: str = opt(
        "none",
        "Store the frozen transformer's linear weights in fp8 and cast each layer to the --mixed_precision dtype "
        "only while it runs (diffusers layerwise casting): about half the weight memory of bf16. LoRA weights, "
        "norms and embeddings are not cast.",
        choices=("none", "float8_e4m3fn", "float8_e5m2"),
    )
    quant_backend: str = opt(
        "none",
        "Quantize the frozen transformer as it loads (QLoRA-style), through diffusers' quantization configs: "
        "torchao, bitsandbytes_4bit, bitsandbytes_8bit (CUDA only) or quanto. The LoRA stays fp32 and loads "
        "into an unquantized pipeline.",
        choices=("none", "torchao", "bitsandbytes_4bit", "bitsandbytes_8bit", "quanto"),
    )
    quant_type: Optional[str] = opt(
        None, "The --quant_backend's type: torchao int8wo, float8wo or int4wo; bitsandbytes_4bit nf4 or fp4; "
              "bitsandbytes_8bit int8; quanto int8, float8 or int4 (default: the first of each).")
    gradient_checkpointing_cpu_offload: bool = opt(
        False, "With --gradient_checkpointing: keep each block's stored inputs in CPU memory until the backward "
               "pass needs them (musubi-tuner's option): the activations left on the GPU are one block's.")
    blocks_to_swap: int = opt(
        0, "Keep the frozen weights of this many transformer blocks (the last ones) in CPU memory and bring each "
           "to the GPU only while it runs, overlapped with compute (musubi-tuner's option). Needs "
           "--gradient_checkpointing.")
    offload_optimizer: bool = opt(
        False, "Keep the optimizer state (and an fp32 copy of the LoRA) in CPU memory and step there; "
               "the GPU then holds no optimizer state.")
    compile: bool = opt(
        False, "Compile each transformer block with torch.compile (faster steps after a slow first one).")
    dry_run: bool = opt(
        False, "Print the expected peak GPU memory of these settings (weights, LoRA, optimizer state, "
               "activations with and without gradient checkpointing) and exit without loading any weights.")
    learning_rate: float = opt(1e-4, "Initial learning rate (after warm-up).")
    scale_lr: bool = opt(
        False, "Multiply the learning rate by gradient_accumulation_steps x train_batch_size x number of processes."
    )
    lr_scheduler: str = opt(
        "constant",
        "Learning rate schedule, as in diffusers.optimization.get_scheduler.",
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
    )
    lr_warmup_steps: int = opt(500, "Warm-up steps of the learning rate schedule.")
    lr_num_cycles: int = opt(1, "Hard restarts of the cosine_with_restarts schedule.")
    lr_power: float = opt(1.0, "Power of the polynomial schedule.")
    optimizer: str = opt(
        "adam",
        "adam, adamw or prodigy (prodigy needs the prodigyopt package). Case does not matter.",
        choices=("adam", "adamw", "prodigy"),
    )
    use_8bit_adam: bool = opt(False, "Use bitsandbytes' 8-bit Adam/AdamW (needs the bitsandbytes package); the "
                                     "optimizer state then takes 2 bytes per LoRA parameter instead of 8.")
    adam_beta1: float = opt(0.9, "Adam beta1.")
    adam_beta2: float = opt(0.95, "Adam beta2.")
    adam_weight_decay: float = opt(1e-4, "Weight decay.")
    adam_epsilon: float = opt(1e-8, "Adam epsilon.")
    prodigy_beta3: Optional[float] = opt(None, "Prodigy beta3 (default: sqrt(beta2)).")
    prodigy_decouple: bool = opt(False, "Prodigy: decoupled weight decay (AdamW style).")
    prodigy_use_bias_correction: bool = opt(False, "Prodigy: Adam bias correction.")
    prodigy_safeguard_warmup: bool = opt(False, "Prodigy: no step-size growth during warm-up.")
    max_grad_norm: float = opt(1.0, "Gradients are clipped to this norm.")
    allow_tf32: bool = opt(False, "Allow TF32 matmuls on Ampere and newer GPUs (faster).")
    validation_epochs: Optional[int] = opt(
        None, "Generate the validation videos after every this many epochs (and after the last step). "
              "Default: 50 when --validation_prompt is set and --validation_steps is not.")
    validation_steps: Optional[int] = opt(
        None, "Generate the validation videos every this many optimizer steps (and after the last step).")
    num_validation_videos: int = opt(1, "Videos generated per validation prompt (seeds --seed, --seed+1, ...).")
    validation_num_inference_steps: int = opt(50, "Denoising steps of the validation videos.")
    enable_slicing: bool = opt(False, "Decode the validation videos one at a time in the VAE (less memory).")
    enable_tiling: bool = opt(False, "Decode the validation videos tile by tile in the VAE (less memory).")
    guidance_scale: float = opt(6.0, "Classifier-free guidance scale of the validation videos.")
    use_dynamic_cfg: bool = opt(False, "Use the dynamic CFG schedule of CogVideoX for the validation videos.")
    report_to: str = opt(
        "none", "Experiment tracker for accelerate: none, tensorboard, wandb or all.",
        choices=("none", "tensorboard", "wandb", "all"),
    )
    tracker_name: str = opt("cogtune", "Project name of the tracker run.")
    logging_dir: str = opt("logs", "Tracker logs go to OUTPUT_DIR/LOGGING_DIR.")
    push_to_hub: bool = opt(False, "Upload the LoRA, its model card and validation videos to the Hugging Face Hub "
                                   "at the end of training.")
    hub_model_id: Optional[str] = opt(None, "Hub repository to upload to (default: the name of --output_dir).")
    hub_token: Optional[str] = opt(None, "Hub token (default: the token of `hf auth login` or HF_TOKEN).")
    nccl_timeout: int = opt(600, "Seconds the processes of a multi-GPU run wait for each other (NCCL timeout).")
    dataloader_num_workers: int = opt(0, "Worker processes that read the cache.")
    noised_image_dropout: float = opt(
        0.05, "Image-to-video models: probability that a sample's image latent is zeroed in a step."
    )
    caption_dropout_p: float = opt(
        0.0, "Probability that a sample's caption is dropped in a step (as finetrainers' --caption_dropout_p), so "
             "that classifier-free guidance keeps working after long fine-tunes.")
    caption_dropout_technique: str = opt(
        "empty", "What a dropped caption becomes: empty, the empty prompt's T5 embedding (what the pipeline's "
                 "negative prompt gives; preprocess stores it), or zero.", choices=("empty", "zero"))
    timestep_sampling: str = opt(
        "uniform", "How a step draws its timesteps: uniform (the reference), logit_normal (sigmoid of "
                   "N(--logit_mean, --logit_std)) or mode (--mode_scale), as diffusers' "
                   "compute_density_for_timestep_sampling (its scripts' --weighting_scheme).",
        choices=("uniform", "logit_normal", "mode"))
    logit_mean: float = opt(0.0, "Mean of the logit-normal timestep density.")
    logit_std: float = opt(1.0, "Standard deviation of the logit-normal timestep density.")
    mode_scale: float = opt(1.29, "Scale of the mode timestep density (0 is uniform; below 1.75).")
    use_ema: bool = opt(
        False, "Keep an exponential moving average of the LoRA weights (diffusers' EMAModel: the first step's LoRA, "
               "then decay min(--ema_decay, (1 + n) / (10 + n)) at the n-th step after it), saved beside the LoRA as pytorch_lora_weights_ema.safetensors, "
               "loadable as a LoRA; restored exactly on resume. One process or DDP (not FSDP or DeepSpeed).")
    ema_decay: float = opt(0.9999, "Decay of the --use_ema average (at most; less during its warm-up).")
    ema_validation: bool = opt(False, "With --use_ema: generate the validation videos with the EMA weights.")
    snr_gamma: Optional[float] = opt(
        None, "Min-SNR weighting of each sample's loss, min(SNR, gamma) / (SNR + 1) (diffusers' --snr_gamma; 5.0 "
              "is the paper's). Default: unweighted, as the reference.")


@dataclass
class InferConfig(ModelArgs):
    """Generate videos with the base pipeline plus a trained LoRA."""

    lora: Optional[str] = opt(
        None,
        "LoRA to load: a folder holding pytorch_lora_weights.safetensors, that file, or a hub id. "
        "Default: the LoRA in --output_dir.",
    )
    output_dir: str = opt("cogtune-lora", "The training output folder; videos go to its videos/ subfolder by default.")
    video_output_dir: Optional[str] = opt(None, "Where the mp4 files are written (default: OUTPUT_DIR/videos).")
    lora_scale: float = opt(1.0, "Strength of the LoRA: 1.0 is the trained alpha/rank scale, 0 disables it.")
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
    num_inference_steps: int = opt(50, "Denoising steps.")
    guidance_scale: float = opt(6.0, "Classifier-free guidance scale.")
    use_dynamic_cfg: bool = opt(False, "Use the dynamic CFG schedule of CogVideoX.")
    num_frames: int = opt(49, "Frames to generate (4k+1).")
    height: int = opt(480, "Height of the generated video in pixels.")
    width: int = opt(720, "Width of the generated video in pixels.")
    fps: int = opt(8, "Frame rate written into the mp4 files.")
    mixed_precision: str = opt("bf16", "Dtype of the pipeline: no (fp32), fp16 or bf16.", choices=MIXED_PRECISION)
    enable_model_cpu_offload: bool = opt(False, "Keep each model on the CPU until it runs (less GPU memory).")
    enable_sequential_cpu_offload: bool = opt(
        False, "Keep every layer on the CPU until it runs (the least GPU memory, and much slower; one GPU only).")
    enable_slicing: bool = opt(False, "Decode latents one video at a time in the VAE.")
    enable_tiling: bool = opt(False, "Decode latents tile by tile in the VAE.")
    quant_backend: str = opt(
        "none", "Quantize --components_to_quantize as they load, through diffusers' quantization configs: torchao, "
                "bitsandbytes_4bit, bitsandbytes_8bit (CUDA only) or quanto.",
        choices=("none", "torchao", "bitsandbytes_4bit", "bitsandbytes_8bit", "quanto"))
    quant_type: Optional[str] = opt(
        None, "The --quant_backend's type: torchao int8wo, float8wo or int4wo; bitsandbytes_4bit nf4 or fp4; "
              "bitsandbytes_8bit int8; quanto int8, float8 or int4 (default: the first of each).")
    components_to_quantize: list = opt(
        ["transformer", "text_encoder"], "The pipeline's parts that --quant_backend quantizes (transformer, "
                                         "text_encoder, vae), as diffusers' PipelineQuantizationConfig names them.")
    compile: bool = opt(
        False, "Compile each transformer block with torch.compile (faster denoising after a slow first step).")
    dry_run: bool = opt(
        False, "Print the expected peak GPU memory of these settings (the models as stored, each stage's "
               "activations, the offload) and exit, loading no weights.")


# A flag given on the command line replaces these settings of the config file too: it wins over the
# file consistently, even where the file's setting would otherwise take precedence (max_train_steps
# over num_train_epochs) or conflict (a validation file and validation prompts).
REPLACES = {"prompt": ("prompt_file",), "prompt_file": ("prompt",),
            "validation_file": ("validation_prompt", "validation_images"), "validation_prompt": ("validation_file",),
            "validation_images": ("validation_file",), "num_train_epochs": ("max_train_steps",)}
STAGE_CONFIGS = {"preprocess": PreprocessConfig, "train": TrainConfig, "infer": InferConfig}


def settings_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a stage's dataclass that are settings (flags and config keys)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


KNOWN_KEYS = {f.name for cls in STAGE_CONFIGS.values() for f in settings_fields(cls)}
# Settings whose values are paths: a relative one in a config file is relative to that file's folder.
# The second group may also be hub ids; they are taken as paths when that path exists.
PATH_SETTINGS = ("instance_data_root", "cache_root", "data_cache", "output_dir", "video_output_dir", "prompt_file",
                 "image", "cache_dir", "resume_from_checkpoint", "validation_images", "preview_dir", "validation_file")
PATH_OR_HUB_SETTINGS = ("pretrained_model_name_or_path", "dataset_name", "lora", "init_lora")


def _base_type(annotation: str) -> type:
    hint = eval(annotation, {"Optional": Optional, "list": list})  # annotations are plain strings here
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def build_parser(stage: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per setting, named as the field. It takes the flags of every
    stage, so that one command line (or a diffusers script's, pasted whole) serves each stage: a flag
    of another stage is accepted and left to that stage."""
    cls = STAGE_CONFIGS[stage]
    parser = argparse.ArgumentParser(prog=f"cogtune {stage}", description=(cls.__doc__ or "").strip() or None,
                                     argument_default=argparse.SUPPRESS, allow_abbrev=False,
                                     usage=f"cogtune {stage} [--config FILE.toml] [--setting VALUE ...]")
    parser.add_argument("--config", help="A TOML file of settings; flags given here override it. Relative paths in "
                                          "it are relative to its folder.")
    parser.add_argument("--unset", nargs="+", metavar="SETTING", help="Settings of the config file to leave out "
                        "(back to their defaults), for example --unset max_train_steps validation_prompt.")
    own = [f for f in settings_fields(cls) if not f.metadata.get("file_only")]
    added = {f.name for f in settings_fields(cls)}
    for f in own:
        _add_flag(parser, f, _help_text(f))
    for other in STAGE_CONFIGS.values():  # hidden from --help: `cogtune <that stage> --help` describes them
        for f in settings_fields(other):
            if f.name not in added and not f.metadata.get("file_only"):
                added.add(f.name)
                _add_flag(parser, f, argparse.SUPPRESS)
    parser.epilog = ("The flags of the other stages are accepted too, and left to them, so that one command line "
                     "(or a diffusers script's, pasted whole) serves every stage.")
    return parser


def _help_text(f: dataclasses.Field) -> str:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return f"{f.metadata['help']} (default: {default})"


def _add_flag(group, f: dataclasses.Field, help_text: str) -> None:
    kind = _base_type(f.type)
    name = f"--{f.name}"
    if kind is bool:
        group.add_argument(name, action=argparse.BooleanOptionalAction, help=help_text)
    elif kind is list:
        group.add_argument(name, nargs="+", help=help_text)
    elif f.metadata.get("choices"):  # in any case: users type Adam / AdamW, as in the reference README
        group.add_argument(name, type=str.lower, choices=f.metadata["choices"], help=help_text)
    else:
        group.add_argument(name, type=kind, choices=f.metadata.get("choices"), help=help_text)


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise CogtuneError(f"Config file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as e:
        raise CogtuneError(f"Config file {path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise CogtuneError(f"Config file {path} is not UTF-8 text; save it as UTF-8.") from None


def values_for_stage(document: dict, stage: str, source: str) -> dict:
    """The flat settings a config document gives one stage: top-level keys, then its own table."""
    unknown = [k for k in document if k not in KNOWN_KEYS and k not in STAGE_TABLES]
    for table in STAGE_TABLES:
        if not isinstance(document.get(table, {}), dict):
            raise CogtuneError(f"{source}: [{table}] must be a table of settings.")
        unknown += [f"{table}.{k}" for k in document.get(table, {}) if k not in KNOWN_KEYS]
    if unknown:
        raise CogtuneError(
            f"{source}: unknown setting(s) {', '.join(sorted(unknown))}. "
            f"Run `cogtune {stage} --help` for the settings each stage takes."
        )
    names = {f.name for f in settings_fields(STAGE_CONFIGS[stage])}
    values = {k: v for k, v in document.items() if k in names}
    values.update({k: v for k, v in document.get(stage, {}).items() if k in names})
    return values


def relative_to(values: dict, folder: Path, separator: str = ":::") -> dict:
    """values with their relative paths made relative to folder (a config file's): the paths of
    PATH_SETTINGS always, those of PATH_OR_HUB_SETTINGS when that path exists (else a hub id)."""
    resolved = dict(values)

    def under(text: str) -> str:
        path = Path(text).expanduser()
        return str(path) if path.is_absolute() else str(folder / path)

    for name, value in values.items():
        if name == "datasets" and isinstance(value, list):  # each table's paths, as the top-level ones
            resolved[name] = [relative_to(table, folder, separator) if isinstance(table, dict) else table
                              for table in value]
        if not isinstance(value, str) or not value:
            continue
        if name == "resume_from_checkpoint" and value == "latest":
            continue
        if name == "validation_images":
            resolved[name] = separator.join(under(part.strip()) for part in value.split(separator))
        elif name in PATH_SETTINGS:
            resolved[name] = under(value)
        elif name in PATH_OR_HUB_SETTINGS and not Path(value).expanduser().is_absolute() and (folder / value).exists():
            resolved[name] = str(folder / value)
    return resolved


def _default_folders_beside(values: dict, folder: Path, fields: dict) -> None:
    """The default cache_root and output_dir, where values give none, in the config file's folder:
    relative to it, as every path in the file is."""
    for name in ("cache_root", "output_dir"):
        if name in fields and name not in values:
            values[name] = str(folder / fields[name].default)


def stage_file_values(config_path: str, stage: str, names: tuple[str, ...]) -> dict:
    """The values a config file gives a stage for these settings (its [stage] table over its top-level
    keys, relative paths relative to its folder), checked as the stage itself checks them: for the
    commands that take a few settings of a stage (export, merge)."""
    document = values_for_stage(read_toml(config_path), stage, str(config_path))
    folder = Path(config_path).resolve().parent
    values = relative_to(document, folder)
    fields = {f.name: f for f in settings_fields(STAGE_CONFIGS[stage])}
    _default_folders_beside(values, folder, fields)
    wanted = {name: values[name] for name in names if values.get(name) is not None}
    for name, value in wanted.items():
        kind = _base_type(fields[name].type)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            wanted[name] = value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise CogtuneError(f"{config_path}: {name} must be of type {kind.__name__}, got {value!r}.")
    return wanted


def make_config(stage: str, values: dict, source: str = "settings", origin: dict | None = None):
    """Build and validate a stage's dataclass from flat values; origin: config_file and command_line."""
    origin = origin or {}
    cls = STAGE_CONFIGS[stage]
    fields = {f.name: f for f in settings_fields(cls)}
    for name, value in values.items():
        kind = _base_type(fields[name].type)
        if value is None:
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CogtuneError(f"{source}: {name} must be of type {kind.__name__}, got {value!r}.")
        choices = fields[name].metadata.get("choices")
        if choices:  # checked and normalised here, once, wherever the value came from
            values[name] = str(values[name]).lower()
            if values[name] not in choices:
                raise CogtuneError(f"{source}: {name} must be one of {', '.join(choices)}, got {value!r}.")
    config = cls(**values, **origin)
    validate(config)
    return config


def load_config(stage: str, argv: list[str]) -> Any:
    """Parse a stage's command line: defaults, then the --config file (its [stage] table over its
    top-level keys; relative paths relative to its folder), then flags. Flags of the other stages
    are accepted and ignored."""
    cls = STAGE_CONFIGS[stage]
    flags = vars(build_parser(stage).parse_args(argv))
    own = {f.name for f in settings_fields(cls)}
    flags = {name: value for name, value in flags.items() if name in own or name in ("config", "unset")}
    values = {}
    config_path = flags.pop("config", None)
    unset = flags.pop("unset", None) or []
    unknown = [name for name in unset if name not in KNOWN_KEYS]
    if unknown:
        raise CogtuneError(f"--unset {' '.join(unknown)}: no such setting. Run `cogtune {stage} --help` for the settings.")
    if config_path:
        document = values_for_stage(read_toml(config_path), stage, str(config_path))
        separator = flags.get("validation_prompt_separator", document.get("validation_prompt_separator", ":::"))
        values.update(relative_to(document, Path(config_path).resolve().parent, separator))
        for given, replaced in REPLACES.items():  # --prompt_file on the command line replaces the file's prompt, ...
            if given in flags:
                for name in replaced:
                    if name not in flags:
                        values.pop(name, None)
        for name in unset:
            values.pop(name, None)
    values.update(flags)
    if config_path:
        _default_folders_beside(values, Path(config_path).resolve().parent, {f.name: f for f in settings_fields(cls)})
    origin = {"config_file": str(Path(config_path).resolve()) if config_path else None,
              "command_line": tuple(sorted(flags))}
    return make_config(stage, values, source=str(config_path) if config_path else "command line", origin=origin)


def validate(config) -> None:
    if not config.pretrained_model_name_or_path and not isinstance(config, InferConfig):  # infer: the LoRA's record
        raise CogtuneError("--pretrained_model_name_or_path is required (a local pipeline folder or a hub id).")
    positive = ["validation_epochs", "validation_steps", "num_validation_videos", "validation_num_inference_steps",
                "nccl_timeout", "train_batch_size", "gradient_accumulation_steps", "rank", "vae_batch_size", "checkpointing_steps",
                "max_nan_steps", "max_train_steps", "lr_num_cycles", "checkpoints_total_limit", "lora_alpha", "shard_size_mb",
                "adam_epsilon", "lr_power", "preview_samples", "frame_stride", "frame_sample",
                "max_windows_per_clip", "min_num_frames",
                "num_train_epochs", "max_num_frames", "fps", "num_frames", "height", "width", "num_inference_steps"]
    # Every number is checked here, when flags are read: not after a model has loaded, and never
    # silently taken (0 steps as "a full epoch", -3 as "nothing to do").
    for name in positive:
        value = getattr(config, name, None)
        if value is not None and not value > 0:  # (NaN fails too)
            raise CogtuneError(f"--{name} must be positive, got {value}.")
    seed = getattr(config, "seed", None)
    if seed is not None and seed >= SEED_LIMIT - getattr(config, "num_validation_videos", 1):
        raise CogtuneError(f"--seed {seed} is out of range (0 to {SEED_LIMIT - 1}, less the validation videos).")
    for name in ("skip_frames_start", "skip_frames_end", "dataloader_num_workers", "lr_warmup_steps",
                 "adam_weight_decay", "guidance_scale", "seed", "learning_rate"):  # (a rate of 0: a dry look at the losses)
        value = getattr(config, name, None)
        if value is not None and not value >= 0:
            raise CogtuneError(f"--{name} must be zero or more, got {value}.")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(config, name, None)
        if value is not None and not 0 <= value < 1:
            raise CogtuneError(f"--{name} must be at least 0 and below 1, got {value}.")
    for name in ("learning_rate", "max_grad_norm", "lora_alpha", "shard_size_mb", "guidance_scale", "lora_scale"):
        value = getattr(config, name, None)
        if value is not None and not math.isfinite(value):  # NaN too: it would reach the weights
            raise CogtuneError(f"--{name} must be a finite number, got {value}.")
    tracker = getattr(config, "tracker_name", None)
    if tracker is not None and (not tracker.strip() or tracker.strip(".") == "" or "/" in tracker or "\\" in tracker
                                or "\0" in tracker):
        raise CogtuneError(f"--tracker_name {tracker!r} must be a plain name (no / or \\, not . or ..): trackers "
                           "use it as a folder name inside --output_dir.")
    if isinstance(config, (PreprocessConfig, InferConfig)):
        for name in ("height", "width"):
            if getattr(config, name) % 16:
                raise CogtuneError(
                    f"--{name} {getattr(config, name)} is not a multiple of 16 (the VAE downsamples by 8 and the "
                    "transformer patches by 2); pick the nearest multiple of 16."
                )
    frames = getattr(config, "max_num_frames", None) or getattr(config, "num_frames", None)
    if frames is not None and (frames - 1) % 4:
        lower, upper = frames - (frames - 1) % 4, frames - (frames - 1) % 4 + 4
        flag = "--max_num_frames" if isinstance(config, PreprocessConfig) else "--num_frames"
        raise CogtuneError(
            f"{flag} {frames} is not of the form 4k+1 that the CogVideoX VAE needs; use {lower} or {upper}."
        )
    if isinstance(config, InferConfig) and bool(config.prompt) == bool(config.prompt_file):
        raise CogtuneError("Give exactly one of --prompt or --prompt_file.")
    if isinstance(config, (PreprocessConfig, TrainConfig)):
        config.validation_entries()
    if isinstance(config, (TrainConfig, InferConfig)):
        quantize.check(config.quant_backend, config.quant_type)
    if isinstance(config, PreprocessConfig):
        quantize.check(config.text_encoder_quant_backend, config.text_encoder_quant_type,
                       "--text_encoder_quant_backend", "--text_encoder_quant_type")
    if isinstance(config, InferConfig):
        unknown = set(config.components_to_quantize) - {"transformer", "text_encoder", "vae"}
        if unknown:
            raise CogtuneError(f"--components_to_quantize: {', '.join(sorted(unknown))} is not a part of the pipeline "
                               "(transformer, text_encoder, vae).")
        if config.enable_sequential_cpu_offload and config.enable_model_cpu_offload:
            raise CogtuneError("--enable_sequential_cpu_offload and --enable_model_cpu_offload: pick one (sequential "
                               "saves more memory, model offload is faster).")
    if isinstance(config, TrainConfig) and config.gradient_checkpointing_cpu_offload and not config.gradient_checkpointing:
        raise CogtuneError("--gradient_checkpointing_cpu_offload offloads what gradient checkpointing stores: add "
                           "--gradient_checkpointing.")
    if isinstance(config, TrainConfig) and config.blocks_to_swap:
        if config.blocks_to_swap < 0:
            raise CogtuneError(f"--blocks_to_swap must be zero or more, got {config.blocks_to_swap}.")
        if not config.gradient_checkpointing:
            raise CogtuneError("--blocks_to_swap needs --gradient_checkpointing: without it a block's weights are "
                               "kept for the backward pass, so it could not leave the GPU.")
        for flag, used in (("--compile", config.compile),
                           ("--layerwise_casting_storage_dtype", config.layerwise_casting_storage_dtype != "none"),
                           ("--quant_backend", config.quant_backend != "none")):
            if used:
                raise CogtuneError(f"--blocks_to_swap and {flag} both act on the blocks' weights: use one.")
    if isinstance(config, TrainConfig):
        if config.quant_backend != "none" and config.layerwise_casting_storage_dtype != "none":
            raise CogtuneError("--quant_backend and --layerwise_casting_storage_dtype both shrink the frozen weights: "
                               "pick one.")
    if isinstance(config, TrainConfig) and config.max_grad_norm <= 0:
        raise CogtuneError(f"--max_grad_norm must be positive, got {config.max_grad_norm}.")
    if isinstance(config, TrainConfig):
        for name in ("noised_image_dropout", "caption_dropout_p"):
            if not 0 <= getattr(config, name) <= 1:
                raise CogtuneError(f"--{name} is a probability (0 to 1), got {getattr(config, name)}.")
        for name in ("logit_std", "snr_gamma"):
            value = getattr(config, name)
            if value is not None and not 0 < value < float("inf"):
                raise CogtuneError(f"--{name} must be a positive number, got {value}.")
        if not 0 < config.ema_decay < 1:
            raise CogtuneError(f"--ema_decay must be above 0 and below 1, got {config.ema_decay}.")
        if config.ema_validation and not config.use_ema:
            raise CogtuneError("--ema_validation validates with the EMA weights: add --use_ema.")
        if not 0 <= config.mode_scale < 1 / (math.pi / 2 - 1):  # the mode density's map stays monotone
            raise CogtuneError(f"--mode_scale must be at least 0 and below 1.75, got {config.mode_scale}.")
    if isinstance(config, PreprocessConfig):
        check_datasets(config.datasets, config)
        from cogtune.data.buckets import configured_buckets

        configured_buckets(config)
        if config.image_noise_variants < 1:
            raise CogtuneError(f"--image_noise_variants must be 1 or more, got {config.image_noise_variants}.")
        if config.max_failures is not None and not config.max_failures >= 0:
            raise CogtuneError(f"--max_failures takes a count (10) or a fraction (0.05), got {config.max_failures:g}.")


def check_datasets(datasets: list, config=None) -> None:
    """[[datasets]] tables: tables, of known keys, each naming its data once, with a whole positive
    repeats, and clip settings of their own checked as the top-level ones are (choices lower-cased)."""
    from cogtune.data.sources import CLIP_KEYS, DATASET_KEYS

    keys = (*DATASET_KEYS, *CLIP_KEYS, "repeats")
    seen = {}
    for number, table in enumerate(datasets, start=1):
        if not isinstance(table, dict):
            raise CogtuneError(f"datasets: entry {number} is {table!r}; give each dataset as a [[datasets]] table in "
                               "the config file (instance_data_root or dataset_name, repeats, ...).")
        unknown = sorted(set(table) - set(keys))
        if unknown:
            raise CogtuneError(f"[[datasets]] table {number}: unknown key(s) {', '.join(unknown)}; a dataset takes "
                               f"{', '.join(keys)}.")
        if not table.get("instance_data_root") and not table.get("dataset_name"):
            raise CogtuneError(f"[[datasets]] table {number} names no data: give its instance_data_root or dataset_name.")
        repeats = table.get("repeats", 1)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise CogtuneError(f"[[datasets]] table {number}: repeats must be a whole number, 1 or more, got {repeats!r}.")
        same = tuple(str(table.get(key) or (getattr(config, key, None) if config is not None else None) or "")
                     for key in (*DATASET_KEYS, *CLIP_KEYS))
        if same in seen:  # the same samples twice: every clip trained twice as often, without a word
            raise CogtuneError(f"[[datasets]] tables {seen[same]} and {number} name the same data "
                               f"({same[0] or same[1]}) with the same settings; give it once, with repeats = 2 to "
                               "train it twice as often.")
        seen[same] = number
        own = {key: table[key] for key in CLIP_KEYS if key in table}
        if own and config is not None:
            if any(key in own for key in ("height", "width", "max_num_frames")) and (
                    config.buckets or config.height_buckets or config.width_buckets or config.frame_buckets):
                raise CogtuneError(f"[[datasets]] table {number} gives its own clip size, and buckets are set for "
                                   "all: use one or the other.")
            try:
                checked = make_config("preprocess", {**{f.name: getattr(config, f.name)
                                                        for f in settings_fields(PreprocessConfig)},
                                                     "datasets": [], **own}, f"[[datasets]] table {number}")
            except CogtuneError as e:
                raise CogtuneError(f"[[datasets]] table {number}: {str(e).removeprefix(f'[[datasets]] table {number}: ')}")
            table.update({key: getattr(checked, key) for key in own})  # normalised (frame_extraction = "Chunk")


# Flags of a training command line that are training's own settings, though preprocess has settings of
# the same names: the transformer's precision is not the encoders', decoding validation videos tiled
# is not encoding clips tiled, and so on. They never choose the cache a training run reads.
TRAINING_MEANINGS = ("mixed_precision", "enable_tiling", "enable_slicing", "seed", "dataloader_num_workers",
                     "dry_run")


def data_settings(stage_config, argv: list[str]) -> "PreprocessConfig":
    """The preprocess settings of a train (or infer) command line: the same config file and flags, read
    as `cogtune preprocess` reads them (its [preprocess] table, its flags), with this stage's model and
    cache root. They name the cache that preprocess wrote for this command line. A flag that is also a
    training setting (TRAINING_MEANINGS: --mixed_precision bf16 for the transformer after a preprocess
    at fp16, as the diffusers command runs) is left out: only settings of the cached tensors choose it,
    and the latest preprocess run of the config says which it used."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    fields = {f.name: f for f in settings_fields(PreprocessConfig)}
    for name in TRAINING_MEANINGS:
        _add_flag(own, fields[name], None)
    _, argv = own.parse_known_args(argv)
    data = load_config("preprocess", argv)
    return dataclasses.replace(data, **{name: getattr(stage_config, name) for name in
                                        ("pretrained_model_name_or_path", "revision", "variant", "cache_dir",
                                         "cache_root") if hasattr(stage_config, name)})
