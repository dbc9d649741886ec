"""Settings that several stages take, each declared once: the model, VAE memory, video size, where
caches and outputs live, data loading, validation prompts, quantization, compilation and guidance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from cogtune import quantize
from cogtune.config.base import SEED_LIMIT, Group, opt
from cogtune.families.attention import ATTENTION_BACKENDS
from cogtune.errors import CogtuneError
from cogtune.util.devices import MIXED_PRECISION


@dataclass
class ModelArgs(Group):
    """The model: where the base pipeline comes from, and the run's seed (every stage)."""

    pretrained_model_name_or_path: Optional[str] = opt(
        None, "Path to a local diffusers pipeline folder or a hub model id (for example THUDM/CogVideoX-2b). "
              "infer, merge: default, the model the LoRA was trained on (its cogtune_lora.json)."
    )
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) of the pretrained model.")
    variant: Optional[str] = opt(None, "Weight file variant of the pretrained model, for example fp16.")
    cache_dir: Optional[str] = opt(None, "Where downloaded models are stored (the Hugging Face cache), as in diffusers.")
    seed: int = opt(42, "Seed for every random choice (random crops, noise, data order, LoRA init).", rules=('nonnegative',))
    ignore_learned_positional_embeddings: bool = opt(
        False,
        "CogVideoX-5b-I2V only: leave out its learned positional embeddings (tied to 49x480x720) so that it "
        "trains and generates at other sizes. Recorded with the LoRA; infer then leaves them out too.",
    )
    image_to_video: bool = opt(
        False, "Wan 2.2 TI2V only (one model for both): image-to-video instead of text-to-video, as "
               "WanImageToVideoPipeline runs it (the clip's first frame is the image). Give it to preprocess, "
               "train and infer alike; the LoRA records it.")
    mixed_precision: str = opt(
        "bf16", "no, fp16 or bf16. preprocess: the dtype the VAE and text encoder run in on a GPU (the VAE runs in "
                "fp32 on a CPU); train: the dtype of the frozen transformer and autocast (LoRA weights stay fp32 under "
                "fp16); infer: the pipeline's dtype.", choices=MIXED_PRECISION)
    log_format: str = opt(
        "text", "text: progress bars and messages for a terminal; json: one JSON object per line and event "
                "(progress, steps, checkpoints, results) on stdout, for cluster logs.", choices=("text", "json"))
    dry_run: bool = opt(
        False, "Print the expected peak GPU memory of these settings and exit, loading no weights: preprocess, of "
               "the text encoder and VAE stages; train, weights, LoRA, optimizer state and activations with and "
               "without gradient checkpointing; infer, the models as stored, each stage's activations, the offload.")
    model_required: ClassVar[bool] = True  # (infer: the LoRA's cogtune_lora.json may name it)
    # Where the settings came from (filled by load_config, not settings themselves): the config file,
    # and which settings its command line gave as flags.
    config_file: Optional[str] = field(default=None, metadata={"internal": True}, repr=False)
    command_line: tuple = field(default=(), metadata={"internal": True}, repr=False)

    def check_own(self) -> None:
        if not self.pretrained_model_name_or_path and self.model_required:
            raise CogtuneError("--pretrained_model_name_or_path is required (a local pipeline folder or a hub id).")
        if self.seed >= SEED_LIMIT - getattr(self, "num_validation_videos", 1):
            raise CogtuneError(f"--seed {self.seed} is out of range (0 to {SEED_LIMIT - 1}, less the validation videos).")


@dataclass
class VaeArgs(Group):
    """VAE memory (every stage)."""

    enable_slicing: bool = opt(False, "Decode videos one at a time in the VAE (train: the validation videos; infer: "
                                      "the generated ones). Preprocess encodes every clip on its own anyway.")
    enable_tiling: bool = opt(False, "Run the VAE tile by tile (less memory at high resolution): preprocess encodes "
                                     "so (another cache: the latents change), train and infer decode so.")


@dataclass
class VideoSizeArgs(Group):
    """Video size and frame rate (preprocess: of the clips; infer: of the videos)."""

    height: int = opt(480, "Height in pixels of the training clips (preprocess) or of the generated videos (infer); "
                           "a multiple of the model's size step (16 for CogVideoX).", rules=('positive',))
    width: int = opt(720, "Width in pixels of the training clips (preprocess) or of the generated videos (infer); "
                          "a multiple of the model's size step (16 for CogVideoX).", rules=('positive',))
    fps: int = opt(8, "Frame rate of the training clips (preprocess: clips with more frames per second are resampled "
                      "to it), or written into the generated mp4 files (infer).", rules=('positive',))


@dataclass
class CacheRootArgs(Group):
    """Where caches live (preprocess, train)."""

    cache_root: str = opt("cache", "Folder under which caches live, each in a subfolder named after its settings "
                                   "(train: where the cache is found when --data_cache is unset). A relative path, the "
                                   "default too, is beside the config file when there is one.")


@dataclass
class LoaderArgs(Group):
    """Data loading (preprocess, train)."""

    dataloader_num_workers: int = opt(0, "Worker processes that decode and resize videos while the encoders run "
                                         "(preprocess) or read the cache (train).", rules=('nonnegative',))


@dataclass
class ValidationArgs(Group):
    """Validation prompts and images (preprocess encodes them, train generates from them)."""

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

    def check_own(self) -> None:
        from cogtune.data.validation import validation_entries

        validation_entries(self)  # a bad file or a mismatch of prompts and images, named before anything runs


@dataclass
class OutputArgs(Group):
    """The training output folder (train, infer)."""

    output_dir: str = opt("cogtune-lora", "Where checkpoints and the final LoRA are written (train; beside the config "
                                          "file when there is one), and the LoRA and videos/ folder infer uses by default.")


@dataclass
class QuantArgs(Group):
    """Quantizing the frozen weights (train, infer)."""

    quant_backend: str = opt(
        "none",
        "Quantize as it loads (QLoRA-style), through diffusers' quantization configs: torchao, bitsandbytes_4bit, "
        "bitsandbytes_8bit (CUDA only) or quanto. train: the frozen transformer (the LoRA stays fp32 and loads into an "
        "unquantized pipeline); infer: --components_to_quantize.",
        choices=("none", *quantize.BACKENDS),
    )
    quant_type: Optional[str] = opt(
        None, "The --quant_backend's type: torchao int8wo, float8wo or int4wo; bitsandbytes_4bit nf4 or fp4; "
              "bitsandbytes_8bit int8; quanto int8, float8 or int4 (default: the first of each).")

    def check_own(self) -> None:
        quantize.check(self.quant_backend, self.quant_type)


@dataclass
class CompileArgs(Group):
    """Compilation (train, infer)."""

    compile: bool = opt(
        False, "Compile each transformer block with torch.compile (faster steps, or denoising, after a slow first one).")


@dataclass
class AttentionArgs(Group):
    """Attention kernels (train, infer)."""

    attention_backend: Optional[str] = opt(
        None, "Compute attention with this backend of diffusers' attention dispatcher: native (PyTorch's "
              "scaled_dot_product_attention), flex, _native_math, _native_flash, _native_efficient, _native_cudnn, "
              "flash (needs flash-attn), _flash_3 (FlashAttention 3, Hopper), sage (sageattention; inference only "
              "unless --allow_inexact_attention_backward), xformers. Checked before any weights load. Default: each "
              "model's own attention processor, unchanged (train: also the validation videos). make bench-gpu "
              "measures the step time of cuDNN, flash-attn and FlashAttention 3 beside the default's.",
        choices=ATTENTION_BACKENDS)
    allow_inexact_attention_backward: bool = opt(
        False, "Train with --attention_backend sage anyway, although its backward pass is not exact (the "
               "attention's LoRA gradients may be wrong or missing).")


@dataclass
class GuidanceArgs(Group):
    """Guidance (train: of the validation videos; infer)."""

    guidance_scale: float = opt(6.0, "Classifier-free guidance scale (train: of the validation videos).",
                                rules=('nonnegative', 'finite'))
    use_dynamic_cfg: bool = opt(False, "Use the dynamic CFG schedule of CogVideoX (train: for the validation videos).")
    flow_shift: Optional[float] = opt(
        None, "Flow-matching models (Wan): the sampler's flow shift (train: of the validation videos). Default: the "
              "pipeline scheduler's; the Wan cards advise 3.0 at 480p and 5.0 at 720p. Training draws its sigmas "
              "with the scheduler's own shift either way.", rules=('positive_finite',))
