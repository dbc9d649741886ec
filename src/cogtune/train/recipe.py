"""Stage 2: the training recipe. `run` reads top to bottom: set-up, the cache, the model, the
optimizer and its schedule, resume, the loop, the final LoRA. The parts it calls live beside it:
`data` (the cache as batches), `step` (the math of one step), `model`, `lora`, `log`,
`checkpoint`, `optim`, `validation` and `report`.

Only the transformer is loaded (plus the scheduler's config): the VAE moments and T5 embeddings
come from the cache, so the VAE and T5 never exist in this process (the VAE only to decode
validation videos). The randomness of every batch is drawn from a generator seeded by (seed,
batch number), and the data order of every epoch from (seed, epoch): a run's batches are a pure
function of its position, which makes resuming exact.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cogtune.cache.disk import read_dataset_repeats
from cogtune.cache.reader import read_empty_prompt_embeds
from cogtune.cache.writer import cache_lock
from cogtune.config import PreprocessConfig, TrainConfig
from cogtune.config.training import OptimizerArgs, ScheduleArgs
from cogtune.errors import CogtuneError, Preempted, first_line
from cogtune.families import ModelConfigs
from cogtune.train import checkpoint as checkpoints
from cogtune.train import log, report
from cogtune.train.data import LatentDataset, TrainingPlan, batch_generator, collate, open_training_cache
from cogtune.train.lora import EMA_WEIGHT_NAME, LORA_WEIGHT_NAME, load_initial_lora, save_lora, write_lora_info
from cogtune.train.model import (build_transformer, context_parallel_groups, context_parallel_layout,
                                 enable_context_parallel, target_modules)
from cogtune.train.optim import make_lr_scheduler, make_optimizer
from cogtune.families.objectives import Objective
from cogtune.train.step import training_loss
from cogtune.train.validation import ValidationRound, load_validation_set, run_validation, validation_due
from cogtune.util import distributed, files, locks, logs
from cogtune.util.devices import check_precision_available, precision_dtype
from cogtune.util.draws import Draws
from cogtune.util.signals import StopRequests, ignore_stop_signals


@dataclass
class TrainResult:
    lora_path: Path
    is_main_process: bool
    transformer: torch.nn.Module = field(repr=False)
    global_step: int = 0
    losses: list = field(default_factory=list)


def run(config: TrainConfig, data: PreprocessConfig | None = None) -> TrainResult:
    """Train a LoRA. data: the preprocess settings of the same command line, which name the cache
    (config.data_settings). SIGTERM or SIGUSR1 make it save a checkpoint at the next step and raise
    Preempted."""
    from accelerate.state import AcceleratorState

    held = contextlib.ExitStack()  # the locks of the output folder and the cache, for the whole run
    try:
        with StopRequests() as stop, held:
            return _run(config, data, stop, held)
    except BaseException:  # stopped, preempted or failed: the curve of the steps so far, all the same
        if distributed.is_main_process() and getattr(held, "owns_output_dir", False):  # not another run's
            report.write_loss_curve_quietly(Path(config.output_dir) / log.TRAIN_LOG_NAME)
        raise
    finally:  # a later run in this process may choose another precision (keeps the distributed state)
        AcceleratorState._reset_state(reset_partial_state=False)


ENGINE_NAMES = {"NO": "one process", "MULTI_GPU": "DDP", "MULTI_CPU": "DDP", "FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}


def requested_engine() -> str | None:
    """The sharding engine an `accelerate launch --config_file` asked for (it says so in the
    environment of every process), or None."""
    def flag(name: str) -> bool:
        return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")

    return "DeepSpeed" if flag("ACCELERATE_USE_DEEPSPEED") else "FSDP" if flag("ACCELERATE_USE_FSDP") else None


def _accelerator(config: TrainConfig, output_dir: Path):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed

    engine = requested_engine()
    if engine and not torch.cuda.is_available():  # accelerate would run DeepSpeed as plain CPU DDP, or fail in FSDP
        raise CogtuneError(
            f"The accelerate config asks for {engine}, which needs CUDA GPUs, and this machine has none. Run "
            "it where the GPUs are, or use accelerate/ddp.yaml (cogtune init) for several processes on CPUs.")
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # several CPU processes (torchrun, gloo) are then one job too
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps (train.optim.make_lr_scheduler)
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / config.logging_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.nccl_timeout))],
    )
    logs.configure(config.log_format, enabled=accelerator.is_main_process)
    engine_name = ENGINE_NAMES.get(accelerator.distributed_type.name, accelerator.distributed_type.name)
    processes = accelerator.num_processes
    where = "CPUs" if accelerator.device.type == "cpu" else accelerator.device.type.upper() + " devices"
    what = engine_name if processes == 1 else f"{engine_name}, {processes} processes"
    logs.message(f"engine: {what} on {where}", engine=accelerator.distributed_type.name, processes=processes)
    set_seed(config.seed)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def _check_engine(config: TrainConfig, engine: str, validating: bool) -> None:
    if validating and engine == "FSDP":
        raise CogtuneError("Validation during training is not available under FSDP, which shards the weights "
                           "across processes; leave out --validation_prompt and run `cogtune infer` on the LoRA.")
    if validating and config.context_parallel_degree > 1:
        raise CogtuneError("Validation during training is not available with --context_parallel_degree (the "
                           "transformer's tokens are split over processes); leave out --validation_prompt and run "
                           "`cogtune infer` on the LoRA.")
    if config.context_parallel_degree > 1 and engine in ("FSDP", "DEEPSPEED"):
        raise CogtuneError(f"--context_parallel_degree composes with DDP only, not {engine}: use accelerate/ddp.yaml "
                           "or torchrun.")
    if config.use_ema and engine in ("FSDP", "DEEPSPEED"):
        raise CogtuneError(f"--use_ema is not available under {engine}, which shards or recasts the LoRA weights; "
                           "use DDP (accelerate/ddp.yaml) or one process.")
    if config.offload_optimizer and engine in ("FSDP", "DEEPSPEED"):
        raise CogtuneError(f"--offload_optimizer does not combine with {engine}, which shards the optimizer itself; "
                           "use accelerate/deepspeed_zero2_offload.yaml (cogtune init) for an offloaded optimizer.")


def _validate(run: checkpoints.Run, validation, config, models, spec, output_dir, step, weight_dtype) -> ValidationRound:
    """Validation videos from the main process; the others wait for it. A validation that fails (the
    VAE out of memory, a full disk) costs its videos, never the training: a warning, and the run goes on
    to its LoRA."""
    accelerator = run.accelerator
    finished = None
    if accelerator.is_main_process:
        try:
            with run.ema_applied() if config.ema_validation else contextlib.nullcontext():
                finished = run_validation(run.lora_model(), validation, config, models, spec, output_dir, step,
                                          weight_dtype, accelerator.autocast)
        except Exception as e:  # the LoRA matters more than its videos
            logs.message(f"warning: the validation videos of step {step} could not be made ({type(e).__name__}: "
                         f"{first_line(e)[:200]}); training goes on, and the LoRA is saved as usual.")
            finished = None
    if accelerator.is_main_process and finished is not None:
        logs.event("validation", step=step, folder=str(finished.folder), contact_sheet=str(finished.contact_sheet),
                   videos=[str(path) for _, path in finished.videos])
        if not logs.json_lines():
            logs.message(f"validation videos of step {step}: {finished.folder}")
        report.log_validation(accelerator, finished)
    accelerator.wait_for_everyone()
    return finished or ValidationRound(step)


def _optimizer_step(run: checkpoints.Run, step_losses: list, lora_parameters: list, max_grad_norm: float):
    """Clip, step and schedule once the step's micro-batches are accumulated; returns (loss, gradient
    norm, whether the step was taken). The loss is the mean over the step's micro-batches and
    processes: the same number on every process, so they all take or all skip the step."""
    accelerator = run.accelerator
    loss_value = accelerator.gather(torch.stack(step_losses).mean()).mean().item()
    norm = accelerator.clip_grad_norm_(lora_parameters, max_grad_norm)
    grad_norm = float(norm) if norm is not None else None  # None: DeepSpeed clips by itself
    # Under fp16 the gradient scaler itself skips steps with overflowing gradients.
    finite = math.isfinite(loss_value) and (grad_norm is None or math.isfinite(grad_norm)
                                            or accelerator.scaler is not None)
    if finite:
        run.optimizer.step()
    if not getattr(run.optimizer, "step_was_skipped", False):  # fp16: a step the gradient scaler skipped
        run.lr_scheduler.step()
        if run.ema is not None and finite:
            run.ema.step(lora_parameters)
    run.optimizer.zero_grad()
    return loss_value, grad_norm, finite


def _save_outputs(run: checkpoints.Run, config: TrainConfig, models, spec, cache_path: Path, manifest, rounds: list,
                  global_step: int, output_dir: Path) -> Path:
    """The final LoRA and its info, the loss curve and the model card (and the hub), from the main
    process; every process calls it (the weights are gathered from all of them)."""
    accelerator = run.accelerator
    lora_path = output_dir / LORA_WEIGHT_NAME
    weights = run.lora_weights()
    if accelerator.is_main_process:
        lora_path = save_lora(run.family, run.lora_model(), output_dir, weights)
        if run.ema is not None:
            save_lora(run.family, run.lora_model(), output_dir, run.ema_weights(), EMA_WEIGHT_NAME)
        repeats = read_dataset_repeats(cache_path)
        last = report.last_round(rounds)
        write_lora_info(output_dir, {
            "base_model": models.source, "family": spec.description,
            "ignore_learned_positional_embeddings": spec.ignores_learned_positions(
                config.ignore_learned_positional_embeddings),
            "expert": config.expert, "image_to_video": config.image_to_video,
            "rank": config.rank, "lora_alpha": config.lora_alpha, "target_modules": target_modules(config, spec),
            "use_dora": config.use_dora, "use_rslora": config.use_rslora, "init_lora": config.init_lora,
            "steps": global_step, "cache": str(cache_path),
            "ema_weights": EMA_WEIGHT_NAME if run.ema is not None else None,
            "frame_extraction": manifest.settings.frame_extraction or "head", "dataset_repeats": repeats,
            "clips": {"max_num_frames": manifest.settings.max_num_frames, "height": manifest.settings.height,
                      "width": manifest.settings.width, "fps": manifest.settings.fps},
            "validation": [{"prompt": prompt, **details} for (prompt, _), details in
                           zip(last.videos, last.settings)] if last is not None else [],
            "settings": {**checkpoints.run_settings(config), "train_batch_size": config.train_batch_size}})
        report.write_loss_curve_quietly(output_dir / log.TRAIN_LOG_NAME)
        card = report.write_model_card(output_dir, config, models, spec, manifest, rounds, global_step, repeats)
        logs.event("model_card", path=str(card))
        if config.push_to_hub:
            url = report.push_to_hub(output_dir, config, rounds)
            logs.message(f"uploaded to {url}", url=url)
    return lora_path


OUTPUT_LOCK = ".cogtune-train.lock"


def _hold_output_dir(accelerator, output_dir: Path, held: contextlib.ExitStack) -> None:
    """One training run per output folder: the main process locks it for the whole run (a run that
    died holds nothing, so a requeued job starts at once); every process of a refused job stops."""
    refused = None
    if accelerator.is_main_process:
        def busy(holder: str) -> str:
            who = holder or "its host and pid are not known"
            return (f"--output_dir {output_dir} is in use by another training run ({who}). Two runs in one folder "
                    "would mix their checkpoints and logs: wait for it to end, stop it, or choose another --output_dir.")
        try:
            held.enter_context(locks.flock(output_dir / OUTPUT_LOCK, True, busy,
                                           "an output folder so that two training runs never write into it at once"))
            held.owns_output_dir = True
        except CogtuneError as e:
            refused = str(e)
    if distributed.any_process(accelerator, refused is not None):
        raise CogtuneError(refused or f"--output_dir {output_dir} is in use by another training run (see the main "
                                      "process's message).")


def _run(config: TrainConfig, data: PreprocessConfig | None, stop: StopRequests,
         held: contextlib.ExitStack) -> TrainResult:
    # Set-up: trackers and hub token, the output folder, devices and precision.
    report.check_trackers(config.report_to)
    if config.push_to_hub:
        report.check_hub_token(config.hub_token)
    models = ModelConfigs.of(config)  # (its config files only)
    spec = models.spec().with_expert(config.expert)  # (an A14B run: the expert's transformer and timesteps)
    output_dir = Path(config.output_dir)
    files.ensure_writable_dir(output_dir, "--output_dir")
    check_precision_available(config.mixed_precision)
    accelerator = _accelerator(config, output_dir)
    # The data-parallel groups: every process, or with --context_parallel_degree N groups of N consecutive
    # processes that split one sample's tokens (each reads the same samples and draws).
    processes, process_index = context_parallel_groups(accelerator.num_processes, accelerator.process_index,
                                                       config.context_parallel_degree)

    # The cache, checked against the model before anything is loaded.
    cache_path, cache = open_training_cache(config, data, models, spec)
    held.enter_context(cache_lock(cache_path, user="this training run"))  # shared: keeps `cache prune` out
    spec.check_precision(config.mixed_precision, logs.message)
    spec.check_flow_shift(config.flow_shift)
    spec.check_objective(Objective.of(config))
    validation = load_validation_set(config, spec, cache_path, cache.manifest)  # T5 never runs here: the cache has them
    empty_prompt = (read_empty_prompt_embeds(cache_path)  # what a dropped caption becomes
                    if config.caption_dropout_p > 0 and config.caption_dropout_technique == "empty" else None)
    _check_engine(config, accelerator.distributed_type.name, validation is not None)
    _hold_output_dir(accelerator, output_dir, held)  # (after the checks: a run refused by them leaves nothing)
    settings = checkpoints.run_settings(config, config.train_batch_size * processes)  # what a resume must match
    checkpoint, overwrite = checkpoints.choose_start(config, output_dir, settings)  # a used folder: resume, replace, refuse
    if overwrite and accelerator.is_main_process:
        checkpoints.remove_run(output_dir, config.logging_dir)
    accelerator.wait_for_everyone()

    # The model: the transformer alone, frozen, with LoRA adapters in fp32; the noise schedule.
    weight_dtype = precision_dtype(config.mixed_precision)
    if config.context_parallel_degree > 1:  # (checked before the weights load)
        spec.check_context_parallel(config.context_parallel_degree, cache.samples.latent_shapes,
                                    models.transformer["in_channels"])
        layout = context_parallel_layout(config.context_parallel_degree, models.transformer["num_attention_heads"],
                                         config.attention_backend, accelerator.device)
    transformer = build_transformer(config, models, spec, accelerator.device)
    if config.context_parallel_degree > 1:
        enable_context_parallel(transformer, spec, layout, accelerator.device, config.attention_backend)
        attention, groups = "Ulysses" if layout[0] > 1 else "ring", "group" + "s" * (processes > 1)
        logs.message(f"context parallelism: each sample's tokens split over {config.context_parallel_degree} processes "
                     f"({attention} attention), {processes} data-parallel {groups}")
    if config.init_lora:  # (a resumed run then loads its checkpoint's LoRA over it)
        covered = load_initial_lora(spec, transformer, config.init_lora, config.rank, config.lora_alpha)
        adapted = sum(1 for name, _ in transformer.named_modules() if name.endswith(".lora_A"))
        logs.message(f"LoRA: starts from {config.init_lora} ({covered} of {adapted} adapted layers; the others new)"
                     if covered < adapted else f"LoRA: starts from {config.init_lora}")
    schedule = spec.noise_schedule(models)

    # Optimizer and learning-rate schedule, sized from the index alone.
    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= config.gradient_accumulation_steps * config.train_batch_size * processes
    lora_parameters = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer(lora_parameters, OptimizerArgs.of(config), learning_rate, config.offload_optimizer)
    plan = TrainingPlan.of(cache, config, processes)
    lr_scheduler = make_lr_scheduler(optimizer, ScheduleArgs.of(config), plan.max_train_steps)
    if accelerator.state.deepspeed_plugin is not None:  # it cannot learn the batch size from a prepared loader
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.train_batch_size
    run = checkpoints.Run(accelerator, *accelerator.prepare(transformer, optimizer, lr_scheduler), family=spec)
    if config.use_ema:  # of the LoRA as it starts (new, or --init_lora); a resume replaces it with the checkpoint's
        from diffusers.training_utils import EMAModel

        run.ema = EMAModel(run.lora_parameters(), decay=config.ema_decay)

    # Resume, and the run's history in train_log.jsonl up to the step resumed from.
    # What decides the data order: the global batch (not how it is shared among processes), so a
    # run resumed on another number of processes with the same global batch trains the same samples.
    order = {"seed": config.seed, "global_batch_size": plan.global_batch_size,
             "gradient_accumulation_steps": config.gradient_accumulation_steps, "cache": str(cache_path),
             "samples": cache.samples.digest}  # what is trained on: a resume over other samples is refused
    global_step = checkpoints.resume(run, checkpoint, order, config.resume_with_new_data)
    log_path = output_dir / log.TRAIN_LOG_NAME
    if accelerator.is_main_process:
        log.keep_up_to(log_path, global_step)
    if config.report_to != "none":  # accelerate starts trackers on the main process only
        accelerator.init_trackers(config.tracker_name, config={
            k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"})

    def save_checkpoint(step: int) -> Path:
        return checkpoints.save(run, output_dir, step, {"data_order": order, "settings": settings},
                                config.checkpoints_total_limit)

    # The loop.
    dataset = LatentDataset(cache)
    objective = Objective.of(config)
    empty_caption = None if empty_prompt is None else {k: v.to(accelerator.device) for k, v in empty_prompt.items()}
    device, on_gpu = accelerator.device, accelerator.device.type == "cuda"
    family_inputs = functools.lru_cache(maxsize=None)(  # RoPE tables and ofs, once per bucket and batch size
        lambda *shape: spec.transformer_inputs(*shape, device))
    steps = log.StepLog(log_path, accelerator, logs.progress(
        total=plan.max_train_steps, initial=global_step, desc="training", unit="step",
        disable=not accelerator.is_local_main_process))
    rounds, step_losses = [], []  # validation rounds of this run; the losses of this step's micro-batches
    batch_number = global_step * config.gradient_accumulation_steps
    while global_step < plan.max_train_steps:
        shares = plan.batches_from(batch_number, config, processes, process_index)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=[share.indices for share in shares],
                                             collate_fn=collate, num_workers=config.dataloader_num_workers,
                                             worker_init_fn=ignore_stop_signals, pin_memory=on_gpu)
        for share, batch in zip(shares, loader):
            draws = Draws(batch_generator(config.seed, batch_number), start=share.start, total=share.total)
            batch_number += 1
            with accelerator.accumulate(run.transformer):
                batch = batch.to(device, non_blocking=True)  # pinned
                batch.empty_caption = empty_caption
                loss = training_loss(run.transformer, batch, spec, draws, schedule, objective,
                                     family_inputs, weight_dtype, accelerator.autocast, share.real,
                                     share.total / processes)
                step_losses.append(loss.detach())
                # every process, even with a NaN loss, so that none waits for another; with context parallelism
                # a process's gradient is its tokens' share of the sample's, so the loss counts degree times
                accelerator.backward(loss * config.context_parallel_degree)
                if not accelerator.sync_gradients:
                    continue
                loss_value, grad_norm, finite = _optimizer_step(run, step_losses, lora_parameters, config.max_grad_norm)
                step_losses = []

            global_step += 1
            steps.write(global_step, loss_value, finite, run.lr_scheduler.get_last_lr()[0], grad_norm,
                        report.peak_memory_mib(device), report.peak_reserved_mib(device))
            saved = None
            if global_step % config.checkpointing_steps == 0 or global_step == plan.max_train_steps:
                saved = save_checkpoint(global_step)
                logs.event("checkpoint", step=global_step, path=str(saved))
                if not logs.json_lines():
                    logs.message(f"checkpoint of step {global_step}: {saved}")
            if validation is not None and validation_due(global_step, plan.steps_per_epoch, config):
                rounds.append(_validate(run, validation, config, models, spec, output_dir, global_step, weight_dtype))
                steps.restart_clock()  # the next step's time leaves the validation out
            if steps.non_finite_in_a_row >= config.max_nan_steps:
                raise CogtuneError(
                    f"Stopped at step {global_step}: {steps.non_finite_in_a_row} steps in a row had a NaN or infinite "
                    f"loss or gradient (--max_nan_steps {config.max_nan_steps}). Lower --learning_rate, use bf16 "
                    f"instead of fp16, or check the cache with `cogtune cache verify {cache_path}`; the checkpoints "
                    "before it are intact.")
            if distributed.any_process(accelerator, stop.signal is not None):
                where = saved or save_checkpoint(global_step)
                raise Preempted(
                    f"stopped by {stop.signal or 'another process'} at step {global_step}; checkpoint saved to {where}. "
                    "Run the same command with --resume_from_checkpoint latest to continue."
                )
            if global_step >= plan.max_train_steps:
                break
    steps.close()
    if validation is not None and (not rounds or rounds[-1].step != global_step):
        rounds.append(_validate(run, validation, config, models, spec, output_dir, global_step, weight_dtype))

    # The final LoRA, its info, the loss curve and the model card (and the hub).
    accelerator.wait_for_everyone()
    lora_path = _save_outputs(run, config, models, spec, cache_path, cache.manifest, rounds, global_step, output_dir)
    accelerator.end_training()
    return TrainResult(lora_path=lora_path.resolve(), is_main_process=accelerator.is_main_process,
                       transformer=run.lora_model(), global_step=global_step, losses=steps.losses)
