"""Stage 2: the training recipe. `run` reads top to bottom: set-up, model, LoRA, optimizer, data,
the step, checkpoints, the final LoRA.

Only the transformer is loaded (plus the scheduler's config): the VAE moments and T5 embeddings
come from the cache, so the VAE and T5 never exist in this process.

The randomness of every batch (posterior sample, timesteps, noise) is drawn from a generator
seeded by (seed, batch number), and the data order of every epoch from (seed, epoch): a run's
batches are a pure function of its position, which makes resuming exact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as checkpoints
from . import data_schema as schema
from . import logs, report
from .cache import check_samples
from .config import PreprocessConfig, TrainConfig, check_precision_available, precision_dtype
from .errors import CogtuneError, Preempted
from .families import FamilySpec, ModelConfigs, drop_learned_positional_embeddings
from .identity import training_cache
from .optim import make_optimizer, state_bytes_per_parameter
from .signals import StopRequests, ignore_stop_signals
from .validation import load_validation_set

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_INFO_NAME = "cogtune_lora.json"
TRAIN_LOG_NAME = "train_log.jsonl"


# --- pure parts ---------------------------------------------------------------------------------


def epoch_batches(shapes: list[tuple], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: the whole dataset shuffled from (seed, epoch), each batch holding
    samples of one latent shape. Every sample appears exactly once; the last batch of a shape may
    be short."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shapes))
    pending: dict[tuple, list[int]] = {}
    batches = []
    for index in order.tolist():
        group = pending.setdefault(shapes[index], [])
        group.append(index)
        if len(group) == batch_size:
            batches.append(pending.pop(shapes[index]))
    batches.extend(pending.values())
    return batches


def batch_generator(seed: int, batch_number: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + batch_number)


def rank_share(batch: list[int], batch_size: int, num_processes: int, process_index: int) -> list[int]:
    """This process's part of a global batch. With several processes, a short global batch (the
    last of a bucket) is filled up with its own samples again, so that every process gets
    batch_size samples of the same shape and no collective waits on another."""
    if num_processes == 1:
        return batch
    wanted = batch_size * num_processes
    filled = (batch * math.ceil(wanted / len(batch)))[:wanted]
    return filled[process_index * batch_size:(process_index + 1) * batch_size]


@dataclass
class Draws:
    """The random numbers of one global batch, drawn in full on every process from the batch's
    generator, of which a process keeps the rows of its own samples: each sample gets the same
    noise whether the global batch is trained by one process or shared among several."""

    generator: torch.Generator
    start: int = 0  # this process's first row in the global batch
    total: int | None = None  # rows of the global batch (None: this process's batch is all of it)

    def _keep(self, drawn: torch.Tensor, rows: int) -> torch.Tensor:
        return drawn[self.start:self.start + rows]

    def randn(self, shape) -> torch.Tensor:
        return self._keep(torch.randn((self.total or shape[0], *shape[1:]), generator=self.generator), shape[0])

    def randint(self, high: int, rows: int) -> torch.Tensor:
        return self._keep(torch.randint(0, high, (self.total or rows,), generator=self.generator), rows)

    def rand(self, rows: int) -> torch.Tensor:
        return self._keep(torch.rand(self.total or rows, generator=self.generator), rows)


def sample_x0(mean: torch.Tensor, logvar: torch.Tensor, spec: FamilySpec, draws: Draws) -> torch.Tensor:
    """A fresh sample of the VAE posterior, scaled for the transformer, as [B, F, C, H, W] float32.

    mean, logvar: [B, C, F, H, W] as stored in the cache."""
    mean, logvar = mean.float(), logvar.float()
    eps = draws.randn(mean.shape).to(mean.device)
    latents = mean + torch.exp(0.5 * logvar) * eps
    return spec.scale_latents(latents).permute(0, 2, 1, 3, 4).contiguous()


def sample_image_latents(mean: torch.Tensor, logvar: torch.Tensor, spec: FamilySpec, draws: Draws,
                         dropout: float) -> torch.Tensor:
    """The image-to-video conditioning latent of each sample, [B, 1, C, H, W] float32: one of its
    stored noised first-frame encodings picked at random, sampled from its posterior, scaled as
    the I2V pipeline does, and zeroed with probability `dropout`.

    mean, logvar: [B, K, C, 1, H, W], the K stored encodings of each sample."""
    batch, variants = mean.shape[:2]
    chosen = draws.randint(variants, batch)
    rows = torch.arange(batch)
    mean, logvar = mean[rows, chosen].float(), logvar[rows, chosen].float()
    eps = draws.randn(mean.shape).to(mean.device)
    latents = spec.scale_image_latents(mean + torch.exp(0.5 * logvar) * eps).permute(0, 2, 1, 3, 4)
    keep = (draws.rand(batch) >= dropout).to(latents.dtype).to(latents.device)
    return latents * keep.view(-1, 1, 1, 1, 1)


@dataclass
class NoiseSchedule:
    """The timestep-dependent constants of the loss, computed once in float64 from alphas_cumprod."""

    alphas_cumprod: torch.Tensor

    def __post_init__(self):
        abar = self.alphas_cumprod.to(torch.float64)
        self.signal, self.noise, self.weight = abar.sqrt(), (1 - abar).sqrt(), 1 / (1 - abar)

    def __len__(self):
        return len(self.alphas_cumprod)

    def at(self, timesteps: torch.Tensor) -> "StepConstants":
        return StepConstants(*(table[timesteps].float().view(-1, 1, 1, 1, 1)
                               for table in (self.signal, self.noise, self.weight)))


@dataclass
class StepConstants:
    """sqrt(abar_t), sqrt(1 - abar_t) and 1 / (1 - abar_t) of a batch's timesteps, shaped [B, 1, 1, 1, 1]."""

    signal: torch.Tensor
    noise: torch.Tensor
    weight: torch.Tensor

    def to(self, device) -> "StepConstants":
        return StepConstants(self.signal.to(device), self.noise.to(device), self.weight.to(device))


@dataclass
class StepInputs:
    """What one training step feeds the transformer, and what its loss compares against."""

    x0: torch.Tensor  # [B, F, C, H, W], F padded for CogVideoX 1.5
    x_t: torch.Tensor
    model_input: torch.Tensor  # x_t, with the image condition concatenated on channels for I2V
    timesteps: torch.Tensor
    constants: StepConstants


def step_inputs(batch: dict, spec: FamilySpec, draws: Draws, schedule: NoiseSchedule,
                noised_image_dropout: float) -> StepInputs:
    """The randomness of one step, drawn in a fixed order: the video posterior sample, timesteps,
    noise, then (I2V) the image encoding, its posterior sample and dropout."""
    x0 = spec.pad_frames(sample_x0(batch["mean"], batch["logvar"], spec, draws))
    timesteps = draws.randint(len(schedule), x0.shape[0])
    noise = draws.randn(x0.shape)
    constants = schedule.at(timesteps).to(x0.device)
    x_t = add_noise(x0, noise.to(x0.device), constants)
    model_input = x_t
    if spec.image_conditioned:
        image = sample_image_latents(batch["image_mean"], batch["image_logvar"], spec, draws,
                                     noised_image_dropout)
        model_input = torch.cat([x_t, spec.image_condition(image, x0.shape[1])], dim=2)
    return StepInputs(x0=x0, x_t=x_t, model_input=model_input, timesteps=timesteps, constants=constants)


def velocity_loss(pred: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, constants: StepConstants) -> torch.Tensor:
    """The CogVideoX training loss: x0_hat = sqrt(abar) x_t - sqrt(1 - abar) pred, weighted by
    1 / (1 - abar), averaged over (F, C, H, W) and then over the batch."""
    x0_hat = constants.signal * x_t.float() - constants.noise * pred.float()
    return (constants.weight * (x0_hat - x0.float()) ** 2).flatten(1).mean(1).mean()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, constants: StepConstants) -> torch.Tensor:
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, with the coefficients computed in float64."""
    return constants.signal * x0 + constants.noise * noise


# --- the cache as a dataset ---------------------------------------------------------------------


class LatentDataset(torch.utils.data.Dataset):
    def __init__(self, cache: schema.Cache):
        self.cache = cache

    def __len__(self):
        return len(self.cache.samples)

    def __getitem__(self, index):
        row = self.cache.samples[index]
        mean, logvar = self.cache.latent_moments(row)
        item = {"mean": mean, "logvar": logvar, "prompt_embeds": self.cache.prompt_embeds(row)}
        if self.cache.image_noise_variants:
            item["image_mean"], item["image_logvar"] = self.cache.image_moments(row)
        return item


def collate(items: list[dict]) -> dict:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


# --- LoRA files ---------------------------------------------------------------------------------


def save_lora(transformer, directory: Path, weights: dict | None = None) -> Path:
    """Save the adapter in diffusers format, with its rank and alpha, so that load_lora_weights alone
    reproduces the trained scale. Written to a temp folder, then renamed into place. weights: the
    LoRA tensors when they had to be gathered from several processes (default: the transformer's)."""
    from diffusers import CogVideoXPipeline
    from peft.utils import get_peft_model_state_dict

    directory.mkdir(parents=True, exist_ok=True)
    temp = directory / f".lora-tmp-{time.time_ns()}"
    try:
        CogVideoXPipeline.save_lora_weights(
            temp, transformer_lora_layers=weights if weights is not None else get_peft_model_state_dict(transformer),
            transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
        )
        (temp / LORA_WEIGHT_NAME).replace(directory / LORA_WEIGHT_NAME)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return directory / LORA_WEIGHT_NAME


def load_lora_into(transformer, directory: Path) -> None:
    from diffusers import CogVideoXPipeline
    from peft.utils import set_peft_model_state_dict

    try:  # safetensors only: a pickled LoRA is never opened
        state = CogVideoXPipeline.lora_state_dict(str(directory), weight_name=LORA_WEIGHT_NAME, use_safetensors=True)
    except Exception as e:  # diffusers and safetensors raise several error types
        raise CogtuneError(f"Cannot read {Path(directory) / LORA_WEIGHT_NAME} ({str(e).splitlines()[0]}).") from None
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise CogtuneError(f"The LoRA in {directory} does not match this model (unexpected keys).")


def build_transformer(config: TrainConfig, models: ModelConfigs, spec: FamilySpec, device, meta: bool = False):
    """The transformer as training uses it: frozen in the --mixed_precision dtype (linear weights in
    fp8 with --layerwise_casting_storage_dtype), with fp32 LoRA adapters. meta: built on the meta
    device from the config alone (shapes, no weights), for the memory estimate."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    weight_dtype = precision_dtype(config.mixed_precision)
    if meta:
        from diffusers.utils import logging

        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # .to(dtype) on a model built from its config warns about fp32 modules
        try:
            with torch.device("meta"):
                transformer = CogVideoXTransformer3DModel.from_config(models.transformer).to(weight_dtype)
        finally:
            logging.set_verbosity(verbosity)
    else:
        transformer = models.load_part(CogVideoXTransformer3DModel, "transformer", dtype=weight_dtype)
    if config.ignore_learned_positional_embeddings and spec.learned_positional_embeddings:
        drop_learned_positional_embeddings(transformer)
    transformer.requires_grad_(False)
    transformer.to(device)
    if config.gradient_checkpointing and not meta:
        transformer.enable_gradient_checkpointing()
    torch.manual_seed(config.seed)  # LoRA init
    transformer.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, init_lora_weights=True,
                                       target_modules=list(config.lora_target_modules)))
    cast_training_params([transformer], dtype=torch.float32)  # only the LoRA is trained: only it is fp32
    if config.layerwise_casting_storage_dtype != "none":  # after the LoRA, which it leaves in fp32
        transformer.enable_layerwise_casting(storage_dtype=getattr(torch, config.layerwise_casting_storage_dtype),
                                             compute_dtype=weight_dtype)
    if config.compile and not meta:  # regional compilation: one compiled graph serves every block
        for block in transformer.transformer_blocks:
            block.compile()
    return transformer


def largest_latent_shape(config: TrainConfig, preprocess_config: PreprocessConfig | None, models: ModelConfigs,
                         spec: FamilySpec) -> tuple[list[int], str]:
    """[C, F, H, W] of the biggest latent training will see, and where it was learnt: the cache's
    index when the cache exists, else the preprocess settings."""
    try:
        cache_path = training_cache(config.data_cache, preprocess_config, models).path
        shapes = {tuple(row["latent_shape"]) for row in schema.Cache.open(cache_path).samples}
        if shapes:
            return list(max(shapes, key=lambda shape: math.prod(shape[1:]))), f"the cache {cache_path}"
    except CogtuneError:
        if preprocess_config is None:
            raise
    from .buckets import configured_buckets

    buckets = configured_buckets(preprocess_config) or [(preprocess_config.max_num_frames, preprocess_config.height,
                                                         preprocess_config.width)]
    frames, height, width = max(buckets, key=lambda bucket: math.prod(bucket))
    return ([spec.latent_channels, spec.latent_frames(frames), height // spec.vae_scale_spatial,
             width // spec.vae_scale_spatial], "the preprocess settings (no cache yet)")


def memory_estimate(config: TrainConfig, models: ModelConfigs, latent_shape: list[int]):
    """The expected peak GPU memory of training with these settings on batches of latent_shape [C, F, H, W]."""
    from .memory import estimate

    spec = models.spec()
    meta = torch.device("meta")
    transformer = build_transformer(config, models, spec, meta, meta=True)
    weight_dtype = precision_dtype(config.mixed_precision)
    for parameter in transformer.parameters():  # as autocast would run them (see memory.estimate)
        if parameter.requires_grad:
            parameter.data = parameter.data.to(weight_dtype)
    channels, frames, height, width = latent_shape
    frames += spec.frame_padding(frames)
    batch = config.train_batch_size
    in_channels = transformer.config.in_channels
    inputs = dict(
        hidden_states=torch.empty(batch, frames, in_channels, height, width, device=meta, dtype=weight_dtype),
        encoder_hidden_states=torch.empty(batch, spec.max_text_seq_length, spec.text_embed_dim, device=meta,
                                          dtype=weight_dtype),
        timestep=torch.zeros(batch, dtype=torch.long, device=meta),
        image_rotary_emb=spec.rotary_embeddings(height * spec.vae_scale_spatial, width * spec.vae_scale_spatial,
                                                frames, meta),
        ofs=spec.ofs(batch, meta),
    )
    return estimate(transformer, inputs, config.gradient_checkpointing, state_bytes_per_parameter(config),
                    config.offload_optimizer)


def dry_run(config: TrainConfig, preprocess_config: PreprocessConfig | None = None) -> str:
    """What `cogtune train --dry_run` prints: the memory estimate, from config files alone."""
    models = ModelConfigs.of(config)
    spec = models.spec()
    latent_shape, source = largest_latent_shape(config, preprocess_config, models, spec)
    estimated = memory_estimate(config, models, latent_shape)
    channels, frames, height, width = latent_shape
    return (f"Expected peak GPU memory for {spec.description}, batch {config.train_batch_size} of latents "
            f"{frames}x{height}x{width} (the largest, from {source}), rank {config.rank}, "
            f"--mixed_precision {config.mixed_precision}:\n{estimated.table()}\n"
            "The estimate counts tensors (as torch.cuda.max_memory_allocated does); the CUDA context and the "
            "allocator's cache add about 0.5-1 GiB to what nvidia-smi shows.")


@dataclass
class TrainResult:
    lora_path: Path
    is_main_process: bool
    transformer: torch.nn.Module = field(repr=False)
    global_step: int = 0
    losses: list = field(default_factory=list)


# --- the recipe ---------------------------------------------------------------------------------


def validation_due(step: int, steps_per_epoch: int, config: TrainConfig) -> bool:
    """Whether step ends a validation period: every --validation_steps steps, or else at the end of
    every --validation_epochs-th epoch (50, as in the diffusers scripts). The last step is validated
    anyway, after the loop."""
    if config.validation_steps:
        return step % config.validation_steps == 0
    epochs = config.validation_epochs or 50
    return step % steps_per_epoch == 0 and (step // steps_per_epoch) % epochs == 0


def logged_step(line: str) -> float:
    """The step of a train_log.jsonl line; a line cut short by a killed run counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def stop_requested(accelerator, stop: StopRequests) -> bool:
    """Whether any process was asked to stop (a signal may reach only some of them)."""
    wanted = torch.tensor([1.0 if stop.signal else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        wanted = accelerator.reduce(wanted, reduction="sum")
    return bool(wanted.item())


def run(config: TrainConfig, preprocess_config: PreprocessConfig | None = None) -> TrainResult:
    """Train a LoRA. SIGTERM or SIGUSR1 make it save a checkpoint at the next step and raise Preempted."""
    from accelerate.state import AcceleratorState

    try:
        with StopRequests() as stop:
            return _run(config, preprocess_config, stop)
    except BaseException:  # stopped, preempted or failed: the curve of the steps so far, all the same
        if int(os.environ.get("RANK", 0)) == 0:
            report.write_loss_curve_quietly(Path(config.output_dir) / TRAIN_LOG_NAME)
        raise
    finally:  # a later run in this process may choose another precision (keeps the distributed state)
        AcceleratorState._reset_state(reset_partial_state=False)


def _run(config: TrainConfig, preprocess_config: PreprocessConfig | None, stop: StopRequests) -> TrainResult:
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
    from diffusers import CogVideoXDDIMScheduler
    from diffusers.optimization import get_scheduler

    # Set-up: devices, precision, output folder.
    report.check_trackers(config.report_to)
    if config.push_to_hub:
        report.check_hub_token(config.hub_token)
    output_dir = Path(config.output_dir)
    schema.ensure_writable_dir(output_dir, "--output_dir")
    check_precision_available(config.mixed_precision)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # several CPU processes (torchrun, gloo) are then one job too
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / config.logging_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.nccl_timeout))],
    )
    logs.configure(config.log_format, enabled=accelerator.is_main_process)
    set_seed(config.seed)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # The cache, checked against the model before anything is loaded.
    models = ModelConfigs.of(config)
    spec = models.spec()
    training = training_cache(config.data_cache, preprocess_config, models)
    cache_path = training.path
    logs.message(f"cache: {cache_path.resolve()} ({training.why})")
    cache = schema.Cache.open(cache_path)
    schema.check_compatible(cache.manifest, models.identity(), cache_path)
    schema.check_conditioning(cache.manifest, spec.image_conditioned, spec.description, cache_path)
    cached_text_length = cache.manifest["settings"].get("max_text_seq_length")
    if cached_text_length != spec.max_text_seq_length:
        raise CogtuneError(
            f"The cache {cache_path} holds text embeddings of {cached_text_length} tokens but the transformer takes "
            f"{spec.max_text_seq_length}."
        )
    if not cache.samples:
        raise CogtuneError(f"The cache {cache_path} holds no usable samples ({len(cache.failed)} were skipped).")
    damage = check_samples(cache_path, cache.manifest, cache.samples, checksums=False)  # shard headers: quick
    if not damage.ok:
        raise CogtuneError(f"The cache {cache_path} is damaged:\n" + damage.text(checksums=False))
    for size in sorted({(row["num_frames"], row["height"], row["width"]) for row in cache.samples}):
        spec.check_clip_size(*size, config.ignore_learned_positional_embeddings)
    spec.check_precision(config.mixed_precision, logs.message)
    engine = accelerator.distributed_type.name
    validation = load_validation_set(config, spec, cache_path, cache.manifest)  # T5 never runs here: the cache has them
    if validation is not None and engine == "FSDP":
        raise CogtuneError("Validation during training is not available under FSDP, which shards the weights "
                           "across processes; leave out --validation_prompt and run `cogtune infer` on the LoRA.")
    if config.offload_optimizer and engine in ("FSDP", "DEEPSPEED"):
        raise CogtuneError(f"--offload_optimizer does not combine with {engine}, which shards the optimizer itself; "
                           "use configs/accelerate/deepspeed_zero2_offload.yaml for an offloaded optimizer instead.")

    # The model: the transformer alone, frozen, with LoRA adapters in fp32.
    weight_dtype = precision_dtype(config.mixed_precision)
    transformer = build_transformer(config, models, spec, accelerator.device)
    scheduler = CogVideoXDDIMScheduler.from_config(models.scheduler)
    schedule = NoiseSchedule(scheduler.alphas_cumprod)

    # Optimizer and learning-rate schedule.
    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
    lora_parameters = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer(lora_parameters, config, learning_rate)

    # Data: the whole schedule is known up front from the index alone.
    # Every process walks the same global batches (train_batch_size x processes, one shape each)
    # and reads only its own share of each.
    shapes = [tuple(row["latent_shape"]) for row in cache.samples]
    processes, process_index = accelerator.num_processes, accelerator.process_index
    global_batch_size = config.train_batch_size * processes
    batches_per_epoch = len(epoch_batches(shapes, global_batch_size, config.seed, 0))
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    max_train_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
        num_cycles=config.lr_num_cycles, power=config.lr_power,
    )
    if accelerator.state.deepspeed_plugin is not None:  # it cannot learn the batch size from a prepared loader
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.train_batch_size
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)

    # Resume: the LoRA, optimizer, schedule, scaler and RNG states; the data position follows from the step.
    def lora_of():
        return accelerator.unwrap_model(transformer)

    def lora_weights() -> dict:
        """The LoRA tensors, gathered from every process's shards under FSDP and ZeRO-3: every process calls it."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(lora_of(), state_dict=accelerator.get_state_dict(transformer))

    order = {"seed": config.seed, "train_batch_size": config.train_batch_size,
             "gradient_accumulation_steps": config.gradient_accumulation_steps,
             "num_processes": accelerator.num_processes, "cache": str(cache_path)}
    global_step = 0
    checkpoint = None
    if config.resume_from_checkpoint == "latest":
        checkpoint = checkpoints.latest_checkpoint(output_dir)
        if checkpoint is None:
            logs.message(f"No checkpoint in {output_dir} yet; starting a new run.")
    elif config.resume_from_checkpoint:
        checkpoint = Path(config.resume_from_checkpoint)
    if checkpoint is not None:
        info = checkpoints.load(accelerator, checkpoint, lambda d: load_lora_into(lora_of(), d), optimizer,
                                lr_scheduler)
        global_step = info["global_step"]
        changed = [f"{k} ({info.get('data_order', {}).get(k)} -> {v})" for k, v in order.items()
                   if info.get("data_order", {}).get(k) != v]
        if changed:
            logs.message("warning: the data order differs from the interrupted run's, so the resumed run will "
                         "not repeat it exactly: " + ", ".join(changed))
        logs.message(f"Resumed from {checkpoint} at step {global_step}.", step=global_step)

    def save_checkpoint(step: int) -> Path:
        return checkpoints.save(accelerator, output_dir, step, {"data_order": order},
                                lora_weights, lambda d, weights: save_lora(lora_of(), d, weights), optimizer,
                                lr_scheduler,
                                config.checkpoints_total_limit)

    # The loop.
    if config.report_to != "none":  # accelerate starts trackers on the main process only
        accelerator.init_trackers(config.tracker_name or "cogtune", config={
            k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"})
    rounds = []  # validation rounds of this run

    def validate(step: int):
        """Validation videos from the main process; the others wait for it."""
        from .validation import run_validation

        done = None
        if accelerator.is_main_process:
            done = run_validation(lora_of(), validation, config, models, spec, output_dir, step, weight_dtype,
                                  accelerator.autocast)
            logs.event("validation", step=step, folder=str(done.folder), contact_sheet=str(done.contact_sheet),
                       videos=[str(path) for _, path in done.videos])
            if not logs.json_lines():
                logs.message(f"validation videos of step {step}: {done.folder}")
            report.log_validation(accelerator, done)
        accelerator.wait_for_everyone()
        return done or report.ValidationMark(step)

    log_path = output_dir / TRAIN_LOG_NAME
    if accelerator.is_main_process:  # the log holds this run's history: steps up to the resumed one, no more
        kept = [line for line in (log_path.read_text().splitlines() if log_path.is_file() else [])
                if logged_step(line) <= global_step]
        schema.atomic_write(log_path, lambda temp: Path(temp).write_text("".join(f"{line}\n" for line in kept)))
    dataset = LatentDataset(cache)
    device, on_gpu = accelerator.device, accelerator.device.type == "cuda"
    per_shape: dict = {}
    losses, step_losses, nan_steps = [], [], 0
    progress = logs.progress(total=max_train_steps, initial=global_step, desc="training", unit="step",
                             disable=not accelerator.is_local_main_process)
    batch_number = global_step * config.gradient_accumulation_steps
    step_started = time.time()
    while global_step < max_train_steps:
        epoch, position = divmod(batch_number, batches_per_epoch)
        batches = [rank_share(batch, config.train_batch_size, processes, process_index)
                   for batch in epoch_batches(shapes, global_batch_size, config.seed, epoch)[position:]]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                             num_workers=config.dataloader_num_workers,
                                             worker_init_fn=ignore_stop_signals, pin_memory=on_gpu)
        for batch in loader:
            draws = Draws(batch_generator(config.seed, batch_number), start=process_index * config.train_batch_size,
                          total=global_batch_size if processes > 1 else None)
            batch_number += 1
            with accelerator.accumulate(transformer):
                batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}  # pinned
                inputs = step_inputs(batch, spec, draws, schedule, config.noised_image_dropout)
                x0, x_t = inputs.x0, inputs.x_t
                latent_frames, height, width = x0.shape[1], x0.shape[3], x0.shape[4]
                key = (x0.shape[0], latent_frames, height, width)
                if key not in per_shape:  # RoPE tables and ofs, once per bucket and batch size
                    per_shape[key] = (spec.rotary_embeddings(height * spec.vae_scale_spatial,
                                                             width * spec.vae_scale_spatial, latent_frames, device),
                                      spec.ofs(x0.shape[0], device))
                rotary, ofs = per_shape[key]
                with accelerator.autocast():
                    pred = transformer(
                        hidden_states=inputs.model_input.to(weight_dtype),
                        encoder_hidden_states=batch["prompt_embeds"].to(weight_dtype),
                        timestep=inputs.timesteps.to(device),
                        image_rotary_emb=rotary,
                        ofs=ofs,
                        return_dict=False,
                    )[0]
                loss = velocity_loss(pred, x_t.to(weight_dtype), x0, inputs.constants)
                step_losses.append(loss.detach())
                accelerator.backward(loss)  # every process, even with a NaN loss, so that none waits for another
                if not accelerator.sync_gradients:
                    continue
                # The mean over the step's micro-batches and processes: the same number on every process,
                # so they all take or all skip the step.
                loss_value = accelerator.gather(torch.stack(step_losses).mean()).mean().item()
                step_losses = []
                norm = accelerator.clip_grad_norm_(lora_parameters, config.max_grad_norm)
                grad_norm = float(norm) if norm is not None else None  # None: DeepSpeed clips by itself
                # Under fp16 the gradient scaler itself skips steps with overflowing gradients.
                finite = math.isfinite(loss_value) and (grad_norm is None or math.isfinite(grad_norm)
                                                        or accelerator.scaler is not None)
                if finite:
                    optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            global_step += 1
            step_seconds = time.time() - step_started
            step_started = time.time()
            record = {"step": global_step, "loss": loss_value if finite else None, "lr": lr_scheduler.get_last_lr()[0],
                      "grad_norm": grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
                      "step_seconds": round(step_seconds, 4),
                      "peak_memory_mib": round(report.peak_memory_mib(device), 1)}
            if finite:
                nan_steps = 0
                losses.append(loss_value)
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}",
                                     grad_norm=f"{record['grad_norm'] or 0:.3f}", s_per_step=f"{step_seconds:.2f}")
            else:
                nan_steps += 1
                record["skipped"] = f"non-finite loss {loss_value} or gradient norm {grad_norm}"
                logs.message(f"warning: step {global_step} skipped: the loss ({loss_value}) or the gradient norm "
                             f"({grad_norm}) is not finite ({nan_steps} in a row).")
            progress.update(1)
            if accelerator.is_main_process:
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            logs.event("step", **record)
            accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                            step=global_step)
            saved = None
            if global_step % config.checkpointing_steps == 0 or global_step == max_train_steps:
                saved = save_checkpoint(global_step)
                logs.event("checkpoint", step=global_step, path=str(saved))
            if validation is not None and validation_due(global_step, steps_per_epoch, config):
                rounds.append(validate(global_step))
                step_started = time.time()  # the next step's time leaves the validation out
            if nan_steps >= config.max_nan_steps:
                raise CogtuneError(
                    f"Stopped at step {global_step}: {nan_steps} steps in a row had a NaN or infinite loss or gradient "
                    f"(--max_nan_steps {config.max_nan_steps}). Lower --learning_rate, use bf16 instead of fp16, or "
                    f"check the cache with `cogtune cache verify {cache_path}`; the checkpoints before it are intact."
                )
            if stop_requested(accelerator, stop):
                where = saved or save_checkpoint(global_step)
                raise Preempted(
                    f"stopped by {stop.signal or 'another process'} at step {global_step}; checkpoint saved to {where}. "
                    "Run the same command with --resume_from_checkpoint latest to continue."
                )
            if global_step >= max_train_steps:
                break
    progress.close()
    if validation is not None and (not rounds or rounds[-1].step != global_step):
        rounds.append(validate(global_step))  # the LoRA as saved: what the model card shows

    # The final LoRA.
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(transformer)
    lora_path = output_dir / LORA_WEIGHT_NAME
    weights = lora_weights()
    if accelerator.is_main_process:
        lora_path = save_lora(unwrapped, output_dir, weights)
        info = {"base_model": models.source, "family": spec.description,
                "ignore_learned_positional_embeddings": bool(
                    config.ignore_learned_positional_embeddings and spec.learned_positional_embeddings),
                "rank": config.rank, "lora_alpha": config.lora_alpha,
                "target_modules": list(config.lora_target_modules), "steps": global_step, "cache": str(cache_path)}
        schema.atomic_write(output_dir / LORA_INFO_NAME,
                            lambda temp: Path(temp).write_text(json.dumps(info, indent=2) + "\n"))
        report.write_loss_curve_quietly(log_path)
        card = report.write_model_card(output_dir, config, models, spec, cache.manifest, rounds, global_step)
        logs.event("model_card", path=str(card))
        if config.push_to_hub:
            url = report.push_to_hub(output_dir, config, rounds)
            logs.message(f"uploaded to {url}", url=url)
    accelerator.end_training()
    return TrainResult(lora_path=lora_path.resolve(), is_main_process=accelerator.is_main_process,
                       transformer=unwrapped, global_step=global_step, losses=losses)
