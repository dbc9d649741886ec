"""Training checkpoints, written atomically and read without pickle.

    <output_dir>/checkpoint-<step>/
        pytorch_lora_weights.safetensors   the LoRA, in diffusers format (infer can load it as is)
        pytorch_lora_weights_ema.safetensors   with --use_ema: the LoRA's exponential moving average
        training_state.safetensors         optimizer, learning-rate schedule and gradient scaler
                                           (under FSDP one per process: training_state_<rank>.safetensors;
                                           under DeepSpeed, deepspeed/ in DeepSpeed's own format instead)
        random_states_<rank>.safetensors   each process's torch, CUDA, numpy and Python RNG states
        cogtune_state.json                 step, data position and the settings that decide the data order

Every file is written into `.checkpoint-<step>.tmp/`, and the folder is renamed to its final name
once complete (cogtune_state.json last), so a crash mid-save leaves the previous checkpoint as the
latest. Non-tensor state is stored as JSON in the safetensors header, with tensors referenced by key:
reading a checkpoint never unpickles anything.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cogtune.config import settings_fields
from cogtune.errors import CogtuneError, first_line
from cogtune.train.lora import EMA_WEIGHT_NAME, LORA_INFO_NAME, LORA_WEIGHT_NAME, load_lora_into, save_lora
from cogtune.util import files, logs

PREFIX = "checkpoint-"
STATE_NAME = "cogtune_state.json"
TRAINING_STATE_NAME = "training_state.safetensors"
STRUCTURE_KEY = "cogtune.structure"
LR_SCHEDULE_UNIT = "optimizer_step"  # how the saved schedule counts; see in_optimizer_steps


# --- nested state <-> tensors + JSON ------------------------------------------------------------


def flatten(value, tensors: dict, path: str = "t"):
    """A JSON-able description of value, its tensors (and numpy arrays) moved into `tensors`."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "ui" else value)
        return {"__ndarray__": path, "dtype": value.dtype.str}
    if isinstance(value, dict):
        return {"__dict__": [[k, flatten(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (at {path})")


def unflatten(value, tensors: dict):
    if isinstance(value, list):
        return [unflatten(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return tensors[value["__ndarray__"]].numpy().astype(np.dtype(value["dtype"]))
        if "__tuple__" in value:
            return tuple(unflatten(v, tensors) for v in value["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in value["__dict__"]}
    return value


def save_state(path: Path, state: dict) -> None:
    tensors: dict = {}
    structure = flatten(state, tensors)
    files.atomic_write(path, lambda temp: save_file(tensors, temp, metadata={STRUCTURE_KEY: json.dumps(structure)}))


def load_state(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            structure = json.loads((f.metadata() or {})[STRUCTURE_KEY])
    except Exception as e:  # safetensors raises its own error types
        raise CogtuneError(f"Checkpoint file {path} cannot be read ({first_line(e)}); resume from an "
                           "earlier checkpoint or start again.") from None
    return unflatten(structure, tensors)


# --- random number generators -------------------------------------------------------------------


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# --- finding checkpoints ------------------------------------------------------------------------


def numbered_folders(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-N folder in output_dir, ours or another tool's, oldest first."""
    found = []
    for path in Path(output_dir).glob(f"{PREFIX}*"):
        match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def checkpoints_in(output_dir: Path) -> list[Path]:
    """Complete checkpoint-N folders, oldest first; anything else with that prefix is not ours."""
    return [path for _, path in numbered_folders(output_dir) if (path / STATE_NAME).is_file()]


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint, for --resume_from_checkpoint latest. Refuses when a newer
    checkpoint-N folder was written by accelerate's save_state (a diffusers script's: pickled
    optimizer.bin, random_states_0.pkl), which cogtune never opens: starting again at step 0 beside
    it would look like a resume and silently not be one."""
    checkpoints = checkpoints_in(output_dir)
    newest = int(checkpoints[-1].name.removeprefix(PREFIX)) if checkpoints else -1
    foreign = [(step, path) for step, path in numbered_folders(output_dir)
               if not (path / STATE_NAME).exists() and (any(path.glob("*.bin")) or any(path.glob("*.pkl")))]
    newer = [path for step, path in foreign if step > newest]
    if newer:
        raise CogtuneError(
            f"--resume_from_checkpoint latest: {newer[-1]} is not a cogtune checkpoint (it holds no {STATE_NAME} "
            "but accelerate's pickled state, as the diffusers training scripts write it), so cogtune cannot resume "
            "it. "
            + (f"The newest cogtune checkpoint is {checkpoints[-1]}: pass it to --resume_from_checkpoint. "
               if checkpoints else "Nothing has been trained here by cogtune. ")
            + "To start a new run, use another --output_dir or move that folder away.")
    return checkpoints[-1] if checkpoints else None


def read_info(checkpoint: Path) -> dict:
    path = checkpoint / STATE_NAME
    if not path.is_file():
        raise CogtuneError(f"--resume_from_checkpoint {checkpoint} is not a complete cogtune checkpoint "
                           f"(no {STATE_NAME}).")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CogtuneError(f"{path} is damaged ({e}); resume from an earlier checkpoint.") from None


# --- saving and loading -------------------------------------------------------------------------

DEEPSPEED_DIR = "deepspeed"


def training_state_name(engine: str, process_index: int) -> str:
    """FSDP shards the optimizer state, so each process keeps its own; otherwise it is one file."""
    return f"training_state_{process_index}.safetensors" if engine == "FSDP" else TRAINING_STATE_NAME


@dataclass
class Run:
    """What a checkpoint saves and restores: the prepared transformer (its LoRA), optimizer and
    learning-rate schedule, with the accelerator that prepared them."""

    accelerator: Any
    transformer: Any
    optimizer: Any
    lr_scheduler: Any
    family: Any = None  # the ModelFamily: how its LoRA files are written and read
    ema: Any = None  # --use_ema: diffusers' EMAModel of the LoRA parameters

    def lora_parameters(self) -> list:
        return [p for p in self.lora_model().parameters() if p.requires_grad]

    @contextmanager
    def ema_applied(self):
        """The LoRA parameters hold the EMA's values inside the block, their own again after it."""
        parameters = self.lora_parameters()
        self.ema.store(parameters)
        self.ema.copy_to(parameters)
        try:
            yield
        finally:
            self.ema.restore(parameters)

    def ema_weights(self) -> dict:
        """The EMA's values under the LoRA's names (a copy)."""
        from peft.utils import get_peft_model_state_dict

        with self.ema_applied():
            return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.lora_model()).items()}

    def lora_model(self):
        """The transformer with its LoRA, unwrapped from DDP, FSDP or DeepSpeed."""
        return self.accelerator.unwrap_model(self.transformer)

    def lora_weights(self) -> dict:
        """The LoRA tensors, gathered from every process's shards under FSDP and ZeRO-3: every process calls it."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.lora_model(), state_dict=self.accelerator.get_state_dict(self.transformer))


def save(run: Run, output_dir: Path, step: int, info: dict, total_limit: int | None) -> Path:
    """Write checkpoint-<step> from every process (each adds its RNG states); returns its path."""
    accelerator, optimizer, lr_scheduler = run.accelerator, run.optimizer, run.lr_scheduler
    final = output_dir / f"{PREFIX}{step}"
    temp = output_dir / f".{PREFIX}{step}.tmp"
    weights = run.lora_weights()
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_state(temp / f"random_states_{accelerator.process_index}.safetensors", rng_states())
    if accelerator.is_main_process:
        save_lora(run.family, run.lora_model(), temp, weights)
        if run.ema is not None:  # loadable as a LoRA too; its step count goes into cogtune_state.json
            save_lora(run.family, run.lora_model(), temp, run.ema_weights(), EMA_WEIGHT_NAME)
            info = dict(info, ema_optimization_step=run.ema.optimization_step)
    engine = accelerator.distributed_type.name
    if engine == "DEEPSPEED":  # ZeRO partitions the optimizer into DeepSpeed's own objects: its own format
        accelerator.save_state(str(temp / DEEPSPEED_DIR), exclude_frozen_parameters=True)
    elif engine == "FSDP" or accelerator.is_main_process:  # FSDP: each process holds a shard of the state
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        save_state(temp / training_state_name(engine, accelerator.process_index),
                   {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = dict(info, global_step=step, num_processes=accelerator.num_processes,
                     lr_schedule_unit=LR_SCHEDULE_UNIT)
        files.write_text(temp / STATE_NAME, json.dumps(state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        temp.rename(final)  # complete checkpoints only ever appear under their final name
        if total_limit is not None:  # old ones go only once the new one is in place, never the new one
            others = [path for path in checkpoints_in(output_dir) if path != final]
            for old in others[:max(0, len(others) - (total_limit - 1))]:
                shutil.rmtree(old, ignore_errors=True)
        for stale in output_dir.glob(f".{PREFIX}*.tmp"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def in_optimizer_steps(schedule: dict, info: dict) -> dict:
    """A saved learning-rate schedule's state, counted in optimizer steps. Checkpoints before
    LR_SCHEDULE_UNIT counted once per process per step (accelerate stepped the schedule on every
    process, and its length was multiplied to match): their position is divided back, which for
    the diffusers schedules (functions of step / length) is the same point of the same curve."""
    if info.get("lr_schedule_unit") == LR_SCHEDULE_UNIT:
        return schedule
    processes = int(info.get("num_processes") or 1)
    schedule = dict(schedule, last_epoch=schedule["last_epoch"] // processes)
    schedule["_step_count"] = schedule["last_epoch"] + 1
    return schedule


def load(run: Run, checkpoint: Path) -> dict:
    """Restore a checkpoint written by `save`; returns its cogtune_state.json."""
    accelerator, optimizer, lr_scheduler = run.accelerator, run.optimizer, run.lr_scheduler
    info = read_info(checkpoint)
    engine = accelerator.distributed_type.name
    if (checkpoint / DEEPSPEED_DIR).is_dir():
        if engine != "DEEPSPEED":
            raise CogtuneError(f"{checkpoint} was saved under DeepSpeed; resume it under DeepSpeed too.")
        accelerator.load_state(str(checkpoint / DEEPSPEED_DIR))  # the LoRA weights are in it too
    else:
        if run.ema is not None:
            load_ema(run, checkpoint, info)
        load_lora_into(run.family, run.lora_model(), checkpoint)
        path = checkpoint / training_state_name(engine, accelerator.process_index)
        if not path.is_file():
            raise CogtuneError(f"{checkpoint} holds no {path.name}: it was saved by another engine or number of "
                               f"processes ({info.get('num_processes')}); resume it as it was run.")
        state = load_state(path)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(in_optimizer_steps(state["lr_scheduler"], info))
        if state["scaler"] is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
    rng_path = checkpoint / f"random_states_{accelerator.process_index}.safetensors"
    if rng_path.is_file():
        set_rng_states(load_state(rng_path))
    else:
        accelerator.print(f"warning: {checkpoint} holds no random states for process {accelerator.process_index} "
                          f"(it was saved by {info.get('num_processes')} processes); they start fresh.")
    return info


def load_ema(run: Run, checkpoint: Path, info: dict) -> None:
    """The EMA of a checkpoint: its LoRA file read into the parameters and taken as the shadow
    values (exactly: fp32 both), its step count from cogtune_state.json. A checkpoint saved
    without --use_ema starts the average at the checkpoint's own LoRA."""
    if not (checkpoint / EMA_WEIGHT_NAME).is_file():
        logs.message(f"warning: {checkpoint} was saved without --use_ema; the EMA starts from its LoRA.")
        load_lora_into(run.family, run.lora_model(), checkpoint)
    else:
        load_lora_into(run.family, run.lora_model(), checkpoint, EMA_WEIGHT_NAME)
    run.ema.shadow_params = [p.detach().clone() for p in run.lora_parameters()]
    run.ema.optimization_step = int(info.get("ema_optimization_step", 0))


# Settings that do not change what a run trains: where it writes and logs, how it validates and
# checkpoints, how it spends memory and time, and how long it goes on (a finished run may be
# resumed with a larger --max_train_steps). Every other setting must match to resume a run.
NOT_RUN_SETTINGS = frozenset({
    "output_dir", "resume_from_checkpoint", "resume_with_new_data", "overwrite_output_dir", "log_format",
    "report_to", "tracker_name", "logging_dir", "push_to_hub", "hub_model_id", "hub_token", "validation_prompt",
    "validation_images", "validation_prompt_separator", "validation_file", "validation_epochs", "validation_steps",
    "num_validation_videos", "validation_num_inference_steps", "guidance_scale", "use_dynamic_cfg", "enable_slicing",
    "enable_tiling", "ema_validation", "checkpointing_steps", "checkpoints_total_limit", "nccl_timeout",
    "dataloader_num_workers", "max_train_steps", "num_train_epochs", "max_nan_steps", "gradient_checkpointing",
    "gradient_checkpointing_cpu_offload", "blocks_to_swap", "offload_optimizer", "compile", "dry_run", "allow_tf32",
    "attention_backend", "allow_inexact_attention_backward",  # the kernel, as allow_tf32 and compile
    "context_parallel_degree",  # how the processes share the work: the data-parallel groups keep the global batch
    "cache_dir", "cache_root", "data_cache",  # the cache itself is checked by its samples (data_order)
    # per process: a run resumed on another number of processes keeps its global batch (recorded instead)
    "train_batch_size",
})


def run_settings(config, global_batch_size: int | None = None) -> dict:
    """The settings that decide what a run trains (all but NOT_RUN_SETTINGS, and the global batch
    where given), as JSON values: a checkpoint records them, and a run resumes only a checkpoint whose
    settings are its own."""
    batch = {"global_batch_size": global_batch_size} if global_batch_size is not None else {}
    return batch | {f.name: getattr(config, f.name) for f in settings_fields(type(config)) if f.name not in NOT_RUN_SETTINGS}


def settings_differ(saved: dict, now: dict) -> list[str]:
    """'name (then -> now)' for each setting that differs; a setting the checkpoint predates is not compared."""
    return [f"{name} ({saved[name]!r} -> {value!r})" for name, value in now.items()
            if name in saved and saved[name] != value]


def run_outputs(output_dir: Path) -> list[Path]:
    """What a training run left in output_dir: its checkpoints (ours and a diffusers script's) and
    its final LoRA. Logs, curves and cards alone are not a run's work."""
    found = [path for _, path in numbered_folders(output_dir)]
    found += [Path(output_dir) / name for name in (LORA_WEIGHT_NAME, EMA_WEIGHT_NAME)
              if (Path(output_dir) / name).is_file()]
    return sorted(found)


# What `cogtune train` writes into its output folder, besides checkpoint-N folders: what
# --overwrite_output_dir removes (nothing else in the folder is touched).
RUN_FILES = (LORA_WEIGHT_NAME, EMA_WEIGHT_NAME, LORA_INFO_NAME, "train_log.jsonl", "loss_curve.png", "README.md")
RUN_FOLDERS = ("validation",)


def remove_run(output_dir: Path, logging_dir: str) -> None:
    """--overwrite_output_dir: the earlier run's checkpoints, LoRA, log, curve, card, validation
    videos and tracker logs go; other files in the folder stay."""
    for path in run_outputs(output_dir):
        if path.is_dir():
            shutil.rmtree(path)
    for name in RUN_FILES:
        (output_dir / name).unlink(missing_ok=True)
    for name in (*RUN_FOLDERS, logging_dir):
        shutil.rmtree(output_dir / name, ignore_errors=True)


def choose_start(config, output_dir: Path, settings: dict) -> tuple[Path | None, bool]:
    """Where a run starts, decided before any model loads: (the checkpoint to resume or None, whether
    the earlier run's outputs must be removed first). A new run into a folder that holds another
    run's checkpoints or LoRA is refused unless --overwrite_output_dir or --resume_from_checkpoint
    say what to do with them; a run resumes only a checkpoint trained with its own settings
    (run_settings, with its global batch)."""
    outputs = run_outputs(output_dir)
    checkpoint = None
    if config.resume_from_checkpoint == "latest":
        checkpoint = latest_checkpoint(output_dir)
    elif config.resume_from_checkpoint:
        checkpoint = Path(config.resume_from_checkpoint)
    if checkpoint is not None:
        saved = read_info(checkpoint).get("settings")  # (read_info: complete, and ours)
        differ = settings_differ(saved, settings) if saved is not None else []
        if not differ:
            if saved is None:
                logs.message(f"warning: {checkpoint} records no settings (an older cogtune wrote it), so whether "
                             "this run's settings are the ones it was trained with is not checked.")
            return checkpoint, False
        if not config.overwrite_output_dir or config.resume_from_checkpoint != "latest":
            raise CogtuneError(
                f"{checkpoint} was trained with other settings than this run's: {'; '.join(differ)}. Resuming would "
                "mix two runs. Give this run another --output_dir, or put the settings back to resume it"
                + (", or add --overwrite_output_dir to start again here (its checkpoints and LoRA are removed)."
                   if config.resume_from_checkpoint == "latest" else "."))
        logs.message(f"--overwrite_output_dir: {checkpoint} was trained with other settings ({'; '.join(differ)}); "
                     "starting a new run in its place.")
        return None, True
    if not outputs:
        if config.resume_from_checkpoint == "latest":
            logs.message(f"No checkpoint in {output_dir} yet; starting a new run.")
        return None, False
    if config.overwrite_output_dir:
        logs.message(f"--overwrite_output_dir: removing the earlier run's outputs in {output_dir} "
                     f"({', '.join(path.name for path in outputs[:4])}{', ...' if len(outputs) > 4 else ''}).")
        return None, True
    raise CogtuneError(
        f"--output_dir {output_dir} holds another training run ({', '.join(path.name for path in outputs[:4])}"
        f"{', ...' if len(outputs) > 4 else ''}). A new run there would mix the two: pass --resume_from_checkpoint "
        "latest to continue it, --overwrite_output_dir to start again in its place (its checkpoints, LoRA, log and "
        "validation videos are removed), or choose another --output_dir.")


def resume(run: Run, checkpoint: Path | None, order: dict, new_data: bool = False) -> int:
    """Restore a checkpoint (choose_start's): the LoRA, optimizer, schedule, scaler and RNG states.
    Returns its step, from which the data position follows; 0 for a new run. order: what decides the
    data order, compared with the checkpoint's: other samples (order["samples"], a digest of the
    selection) are refused unless new_data."""
    if checkpoint is None:
        return 0
    info = load(run, checkpoint)
    saved = dict(info.get("data_order", {}))
    if "global_batch_size" not in saved and "train_batch_size" in saved:  # written before global_batch_size
        saved["global_batch_size"] = saved["train_batch_size"] * int(saved.get("num_processes") or 1)
    if "samples" in saved and saved["samples"] != order.get("samples") and not new_data:
        raise CogtuneError(
            f"The cache's samples changed since {checkpoint} was saved ({saved['samples']} then, {order.get('samples')} "
            "now: a preprocess run added or removed clips), so resuming would not continue the same run. Pass "
            "--resume_with_new_data to go on with the new samples, or train them in a new run (another --output_dir)."
        )
    changed = [f"{k} ({saved.get(k)} -> {v})" for k, v in order.items() if k in saved and saved.get(k) != v
               or k not in saved and k != "samples"]
    if changed:
        logs.message("warning: the data order differs from the interrupted run's, so the resumed run will "
                     "not repeat it exactly: " + ", ".join(changed))
    logs.message(f"Resumed from {checkpoint} at step {info['global_step']}.", step=info["global_step"])
    return info["global_step"]
