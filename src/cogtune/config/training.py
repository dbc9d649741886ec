"""The settings of `cogtune train`: the cache, the LoRA, batches, checkpoints, the optimizer and its
schedule, the objective, EMA, memory, validation and tracking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cogtune.config.base import Group, opt
from cogtune.errors import CogtuneError


@dataclass
class TrainDataArgs(Group):
    """The cache to train from (train)."""

    data_cache: Optional[str] = opt(
        None,
        "The cache folder to train from. When unset, the cache that `cogtune preprocess` writes for the same "
        "config file is used.",
    )


@dataclass
class LoraArgs(Group):
    """The LoRA (train)."""

    rank: int = opt(64, "LoRA rank.", rules=('positive',))
    lora_alpha: float = opt(64.0, "LoRA alpha; the LoRA scale is lora_alpha / rank (rank or rank/2 is advised).", rules=('positive', 'finite'))
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
    expert: Optional[str] = opt(
        None, "Wan 2.2 A14B (two experts) only, and required there: the expert the LoRA is for. high_noise trains "
              "`transformer` on the timesteps at or above the pipeline's boundary_ratio x 1000, low_noise trains "
              "`transformer_2` on those below; diffusers loads the low-noise LoRA with load_into_transformer_2=True "
              "(infer and merge read this from cogtune_lora.json). Both experts train from the same cache.",
        choices=("high_noise", "low_noise"))
    init_lora: Optional[str] = opt(
        None, "Start from an existing LoRA instead of a new one: a folder with pytorch_lora_weights.safetensors "
              "(ours, or a diffusers script's checkpoint-N), a .safetensors file, or a hub id. Same --rank, "
              "--lora_alpha and targets. A resumed run continues from its checkpoint instead.")


@dataclass
class BatchArgs(Group):
    """Batches, epochs and steps (train)."""

    train_batch_size: int = opt(1, "Samples per batch per device; a batch only holds samples of one latent shape.", rules=('positive',))
    gradient_accumulation_steps: int = opt(1, "Batches accumulated per optimizer step.", rules=('positive',))
    num_train_epochs: int = opt(1, "Epochs to train (ignored when --max_train_steps is set).", rules=('positive',))
    max_train_steps: Optional[int] = opt(None, "Optimizer steps to train; overrides --num_train_epochs.", rules=('positive',))


@dataclass
class CheckpointArgs(Group):
    """Checkpoints, resuming and stopping (train)."""

    checkpointing_steps: int = opt(500, "Save a checkpoint-N folder every this many optimizer steps.", rules=('positive',))
    checkpoints_total_limit: Optional[int] = opt(
        None, "Keep at most this many checkpoints: the one just saved, and the newest others (the oldest go first).", rules=('positive',))
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
           "the run.", rules=('positive',))


@dataclass
class OptimizerArgs(Group):
    """The optimizer (train)."""

    optimizer: str = opt(
        "adam",
        "adam, adamw or prodigy (prodigy needs the prodigyopt package). Case does not matter.",
        choices=("adam", "adamw", "prodigy"),
    )
    use_8bit_adam: bool = opt(False, "Use bitsandbytes' 8-bit Adam/AdamW (needs the bitsandbytes package); the "
                                     "optimizer state then takes 2 bytes per LoRA parameter instead of 8.")
    learning_rate: float = opt(1e-4, "Initial learning rate (after warm-up).", rules=('nonnegative', 'finite'))
    scale_lr: bool = opt(
        False, "Multiply the learning rate by gradient_accumulation_steps x train_batch_size x number of processes."
    )
    adam_beta1: float = opt(0.9, "Adam beta1.", rules=('unit',))
    adam_beta2: float = opt(0.95, "Adam beta2.", rules=('unit',))
    adam_weight_decay: float = opt(1e-4, "Weight decay.", rules=('nonnegative',))
    adam_epsilon: float = opt(1e-8, "Adam epsilon.", rules=('positive',))
    prodigy_beta3: Optional[float] = opt(None, "Prodigy beta3 (default: sqrt(beta2)).")
    prodigy_decouple: bool = opt(False, "Prodigy: decoupled weight decay (AdamW style).")
    prodigy_use_bias_correction: bool = opt(False, "Prodigy: Adam bias correction.")
    prodigy_safeguard_warmup: bool = opt(False, "Prodigy: no step-size growth during warm-up.")
    max_grad_norm: float = opt(1.0, "Gradients are clipped to this norm.", rules=('positive', 'finite'))


@dataclass
class ScheduleArgs(Group):
    """The learning-rate schedule (train)."""

    lr_scheduler: str = opt(
        "constant",
        "Learning rate schedule, as in diffusers.optimization.get_scheduler.",
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
    )
    lr_warmup_steps: int = opt(500, "Warm-up steps of the learning rate schedule.", rules=('nonnegative',))
    lr_num_cycles: int = opt(1, "Hard restarts of the cosine_with_restarts schedule.", rules=('positive',))
    lr_power: float = opt(1.0, "Power of the polynomial schedule.", rules=('positive',))


@dataclass
class ObjectiveArgs(Group):
    """What each step draws and how it weighs the loss (train)."""

    timestep_sampling: str = opt(
        "uniform", "How a step draws its timesteps: uniform (the reference), logit_normal (sigmoid of "
                   "N(--logit_mean, --logit_std)) or mode (--mode_scale), as diffusers' "
                   "compute_density_for_timestep_sampling (its scripts' --weighting_scheme).",
        choices=("uniform", "logit_normal", "mode"))
    logit_mean: float = opt(0.0, "Mean of the logit-normal timestep density.")
    logit_std: float = opt(1.0, "Standard deviation of the logit-normal timestep density.", rules=('positive_finite',))
    mode_scale: float = opt(1.29, "Scale of the mode timestep density (0 is uniform; below 1.75).", rules=('mode_scale',))
    snr_gamma: Optional[float] = opt(
        None, "Min-SNR weighting of each sample's loss, min(SNR, gamma) / (SNR + 1) (diffusers' --snr_gamma; 5.0 "
              "is the paper's). Default: unweighted, as the reference.", rules=('positive_finite',))
    caption_dropout_p: float = opt(
        0.0, "Probability that a sample's caption is dropped in a step (as finetrainers' --caption_dropout_p), so "
             "that classifier-free guidance keeps working after long fine-tunes.", rules=('probability',))
    caption_dropout_technique: str = opt(
        "empty", "What a dropped caption becomes: empty, the empty prompt's T5 embedding (what the pipeline's "
                 "negative prompt gives; preprocess stores it), or zero.", choices=("empty", "zero"))
    noised_image_dropout: float = opt(
        0.05, "CogVideoX image-to-video models: probability that a sample's image latent is zeroed in a step (Wan "
              "keeps its image condition, as its pipelines give it).", rules=('probability',))


@dataclass
class EmaArgs(Group):
    """An exponential moving average of the LoRA (train)."""

    use_ema: bool = opt(
        False, "Keep an exponential moving average of the LoRA weights (diffusers' EMAModel: the first step's LoRA, "
               "then decay min(--ema_decay, (1 + n) / (10 + n)) at the n-th step after it), saved beside the LoRA as pytorch_lora_weights_ema.safetensors, "
               "loadable as a LoRA; restored exactly on resume. One process or DDP (not FSDP or DeepSpeed).")
    ema_decay: float = opt(0.9999, "Decay of the --use_ema average (at most; less during its warm-up).", rules=('open_unit',))
    ema_validation: bool = opt(False, "With --use_ema: generate the validation videos with the EMA weights.")

    def check_own(self) -> None:
        if self.ema_validation and not self.use_ema:
            raise CogtuneError("--ema_validation validates with the EMA weights: add --use_ema.")


@dataclass
class MemoryArgs(Group):
    """Training memory and speed: checkpointing, offload, fp8 storage and compute (train)."""

    gradient_checkpointing: bool = opt(False, "Recompute transformer activations in the backward pass (less memory).")
    gradient_checkpointing_cpu_offload: bool = opt(
        False, "With --gradient_checkpointing: keep each block's stored inputs in CPU memory until the backward "
               "pass needs them (musubi-tuner's option): the activations left on the GPU are one block's.")
    blocks_to_swap: int = opt(
        0, "Keep the frozen weights of this many transformer blocks (the last ones) in CPU memory and bring each "
           "to the GPU only while it runs, overlapped with compute (musubi-tuner's option). Needs "
           "--gradient_checkpointing.", rules=('nonnegative',))
    offload_optimizer: bool = opt(
        False, "Keep the optimizer state (and an fp32 copy of the LoRA) in CPU memory and step there; "
               "the GPU then holds no optimizer state.")
    layerwise_casting_storage_dtype: str = opt(
        "none",
        "Store the frozen transformer's linear weights in fp8 and cast each layer to the --mixed_precision dtype "
        "only while it runs (diffusers layerwise casting): about half the weight memory of bf16. LoRA weights, "
        "norms and embeddings are not cast.",
        choices=("none", "float8_e4m3fn", "float8_e5m2"),
    )
    allow_tf32: bool = opt(False, "Allow TF32 matmuls on Ampere and newer GPUs (faster).")
    context_parallel_degree: int = opt(
        1, "Split each sample's tokens over this many processes (context parallelism, diffusers' machinery): "
           "Ulysses all-to-all where the degree divides the attention heads, else ring attention (which needs "
           "--attention_backend _native_cudnn, _native_flash or flash, on GPUs). The processes "
           "(torchrun or accelerate, DDP) are data-parallel groups of this many: processes = groups x degree, and "
           "the batch per group is --train_batch_size. Not with validation during training, "
           "--compile or --blocks_to_swap. --dry_run estimates the memory per process (the activations divided "
           "by the degree); one GPU cannot measure it.", rules=('positive',))
    fp8_compute: bool = opt(
        False, "Run the frozen linear layers of the transformer's blocks as FP8 matmuls with dynamic scaling "
               "(torchao float8 training) on GPUs with FP8 tensor cores (compute capability 8.9 or newer); LoRA "
               "weights and gradients keep their precision. Needs --mixed_precision bf16 and torchao. Its speed "
               "beside bf16 is measured by make bench-gpu; --dry_run counts the weights' stored bytes.")

    def check_own(self) -> None:
        if self.context_parallel_degree > 1 and self.blocks_to_swap:
            raise CogtuneError("--context_parallel_degree and --blocks_to_swap do not combine yet; use one.")
        if self.fp8_compute and (self.layerwise_casting_storage_dtype != "none" or self.blocks_to_swap):
            raise CogtuneError("--fp8_compute casts the frozen linear weights to fp8 for each matmul itself: use it "
                               "without --layerwise_casting_storage_dtype and --blocks_to_swap.")
        if self.gradient_checkpointing_cpu_offload and not self.gradient_checkpointing:
            raise CogtuneError("--gradient_checkpointing_cpu_offload offloads what gradient checkpointing stores: add "
                               "--gradient_checkpointing.")
        if self.blocks_to_swap and not self.gradient_checkpointing:
            raise CogtuneError("--blocks_to_swap needs --gradient_checkpointing: without it a block's weights are "
                               "kept for the backward pass, so it could not leave the GPU.")


@dataclass
class ValidationRunArgs(Group):
    """When and how the validation videos are generated (train)."""

    validation_epochs: Optional[int] = opt(
        None, "Generate the validation videos after every this many epochs (and after the last step). "
              "Default: 50 when --validation_prompt is set and --validation_steps is not.", rules=('positive',))
    validation_steps: Optional[int] = opt(
        None, "Generate the validation videos every this many optimizer steps (and after the last step).", rules=('positive',))
    num_validation_videos: int = opt(1, "Videos generated per validation prompt (seeds --seed, --seed+1, ...).", rules=('positive',))
    validation_num_inference_steps: int = opt(50, "Denoising steps of the validation videos.", rules=('positive',))


@dataclass
class TrackingArgs(Group):
    """Trackers and the hub (train)."""

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
    nccl_timeout: int = opt(600, "Seconds the processes of a multi-GPU run wait for each other (NCCL timeout).", rules=('positive',))

    def check_own(self) -> None:
        name = self.tracker_name
        if not name.strip() or name.strip(".") == "" or any(c in name for c in "/\\\0"):
            raise CogtuneError(f"--tracker_name {name!r} must be a plain name (no / or \\, not . or ..): trackers "
                               "use it as a folder name inside --output_dir.")
