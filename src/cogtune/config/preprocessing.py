"""The settings of `cogtune preprocess`: the dataset, the clips, what the cache stores, the text
encoder's memory and the preview."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cogtune import quantize
from cogtune.config.base import TENSOR_DTYPES, Group, opt


@dataclass
class DataArgs(Group):
    """The dataset (preprocess)."""

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
    datasets: list = opt(
        [], "Several datasets in one cache, given in the config file as one [[datasets]] table each: its "
            "instance_data_root or dataset_name, and dataset_config_name, caption_column, video_column, id_token "
            "where they differ from the top-level ones, and repeats: how many times each of its samples is trained "
            "per epoch (default 1).", file_only=True)
    max_failures: Optional[float] = opt(
        None,
        "Stop the run when more clips than this cannot be used: a count (10) or a fraction of the clips (0.05). "
        "Default: never stop; unusable clips are skipped and counted.", rules=('count_or_fraction',))


@dataclass
class ClipArgs(Group):
    """Frames and crops of the training clips (preprocess)."""

    max_num_frames: int = opt(49, "Frames per training clip (4k+1). Shorter clips use the largest 4k+1 they hold.", rules=('positive',))
    min_num_frames: int = opt(
        5, "Clips with fewer usable frames than this (at --fps, after the skips) are skipped as too short, each with "
           "its reason: a 0.3 s clip would otherwise be a 1-frame sample, a still image.", rules=('positive',))
    skip_frames_start: int = opt(0, "Source frames dropped from the start of every video.", rules=('nonnegative',))
    skip_frames_end: int = opt(0, "Source frames dropped from the end of every video.", rules=('nonnegative',))
    video_reshape_mode: str = opt(
        "center",
        "center: keep aspect, resize to cover, centre crop; random: same with a seeded random crop; "
        "none: plain resize to height x width (distorts the aspect ratio).",
        choices=("center", "random", "none"),
    )
    frame_extraction: str = opt(
        "head", "Which frames of a clip become samples: head, its first --max_num_frames at --fps (the default: the "
                "model's motion speed); spread, --max_num_frames spread over the whole clip at its own frame rate, "
                "every (frames // max_num_frames)-th (what the diffusers scripts do, ignoring --fps); and several "
                "windows of --max_num_frames at --fps, each a sample of its own, at most --max_windows_per_clip "
                "(musubi-tuner's names): chunk, consecutive windows that do not overlap; slide, a window every "
                "--frame_stride frames; uniform, --frame_sample windows spread evenly over the clip.",
        choices=("head", "spread", "chunk", "slide", "uniform"))
    frame_stride: int = opt(10, "--frame_extraction slide: frames (at --fps) from one window's start to the next.", rules=('positive',))
    frame_sample: int = opt(4, "--frame_extraction uniform: how many windows.", rules=('positive',))
    max_windows_per_clip: int = opt(
        8, "The most windows a clip gives with --frame_extraction chunk, slide or uniform (the first ones); a "
           "worker holds a clip's windows in memory together.", rules=('positive',))
    height_buckets: list = opt([], "Heights of the training buckets (with --width_buckets and --frame_buckets: every "
                                "combination is a bucket). Each clip goes to the bucket nearest its aspect ratio, then area.")
    width_buckets: list = opt([], "Widths of the training buckets (see --height_buckets).")
    frame_buckets: list = opt([], "Frame counts (4k+1) of the training buckets; a clip goes to the longest it can fill.")
    buckets: list = opt([], "An explicit list of buckets FRAMESxHEIGHTxWIDTH, for example 49x480x720 49x720x480.")


@dataclass
class CacheArgs(Group):
    """What the cache stores (preprocess)."""

    latent_dtype: str = opt("bf16", "Dtype of the stored VAE moments and text embeddings.", choices=TENSOR_DTYPES)
    shard_size_mb: float = opt(512.0, "A cache shard file rolls over once it holds this many megabytes.", rules=('positive', 'finite'))
    image_noise_variants: int = opt(
        1,
        "CogVideoX image-to-video models: how many independently noised encodings of each clip's first frame to "
        "store (noise sigma = exp(N(-3, 0.5))); training picks one at random each step. (Wan stores its one "
        "first frame as it is, as its pipelines take it.)", rules=('positive',))
    auto_tiling: bool = opt(
        False, "On a GPU, switch on --enable_slicing, then --enable_tiling, when the VAE would not fit the free "
               "memory (its estimate plus a tenth). Tiling changes the latents, so it writes another cache; train "
               "with the same config (or this flag) finds it, and a later run continues the tiled cache.")
    vae_batch_size: int = opt(
        1, "Not used any more, kept so that older configs still read: every clip goes through the VAE on its "
           "own, since a batch of several gives each clip slightly other latents (kernels sum in an order that "
           "depends on the batch), and the cache must hold the same bytes for the same clip.", rules=('positive',))


@dataclass
class TextEncoderArgs(Group):
    """The text encoder's memory (preprocess)."""

    text_encoder_quant_backend: str = opt(
        "none", "Quantize T5 as it loads, for encoding the captions (torchao, bitsandbytes_4bit, bitsandbytes_8bit "
                "or quanto, as --quant_backend names them): T5-XXL takes 8.9 GiB in bf16. The embeddings change "
                "slightly, so the cache is another one.",
        choices=("none", *quantize.BACKENDS))
    text_encoder_quant_type: Optional[str] = opt(
        None, "The --text_encoder_quant_backend's type (as --quant_type; default: the backend's first).")
    text_encoder_cpu_offload: bool = opt(
        False, "Keep T5's layers in CPU memory and bring each to the GPU only while it runs (accelerate's "
               "cpu_offload): T5 then needs little GPU memory, and encodes more slowly. The embeddings are the same.")

    def check_own(self) -> None:
        quantize.check(self.text_encoder_quant_backend, self.text_encoder_quant_type, "--text_encoder_quant_backend",
                       "--text_encoder_quant_type")


@dataclass
class PreviewArgs(Group):
    """Previewing the clips (preprocess)."""

    preview: bool = opt(
        False, "Decode, resize and crop a sample of the clips exactly as preprocess would, write a contact sheet "
               "per bucket (the source frame with the crop drawn on it, then frames over time) and exit: no model, "
               "no GPU, no cache.")
    preview_samples: int = opt(8, "How many clips --preview shows, spread evenly over the dataset.", rules=('positive',))
    preview_dir: Optional[str] = opt(None, "Where --preview writes its contact sheets (default: CACHE_ROOT/preview).")
