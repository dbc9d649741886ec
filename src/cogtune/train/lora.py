"""What a training run leaves behind, and how it is read back: the LoRA in diffusers format (with
its rank and alpha) and cogtune_lora.json beside it (the base model, family, LoRA settings, steps,
cache, and whether 5b-I2V's learned positional embeddings were left out)."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import warnings
from pathlib import Path

from cogtune.errors import CogtuneError, first_line
from cogtune.families import ModelFamily
from cogtune.util import files

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_INFO_NAME = "cogtune_lora.json"
EMA_WEIGHT_NAME = "pytorch_lora_weights_ema.safetensors"  # --use_ema: the averaged LoRA, beside the trained one


def save_lora(family: ModelFamily, transformer, directory: Path, weights: dict | None = None,
              weight_name: str = LORA_WEIGHT_NAME) -> Path:
    """Save the adapter in the family pipeline's diffusers format, with its rank and alpha, so that
    load_lora_weights alone reproduces the trained scale. Written to a temp folder, then renamed into
    place. weights: the LoRA tensors when they had to be gathered from several processes (default:
    the transformer's)."""
    from peft.utils import get_peft_model_state_dict

    directory.mkdir(parents=True, exist_ok=True)
    temp = directory / f".lora-tmp-{time.time_ns()}"
    # peft keeps the targets as a set, whose order changes from process to process: sorted, the same
    # LoRA is the same file
    metadata = {key: sorted(value) if isinstance(value, (set, frozenset)) else value
                for key, value in transformer.peft_config["default"].to_dict().items()}
    try:
        family.save_lora_weights(temp, weights if weights is not None else get_peft_model_state_dict(transformer),
                                 metadata, weight_name)
        files.canonical_safetensors(temp / weight_name)  # the same LoRA, the same bytes
        files.publish(temp / weight_name, directory / weight_name)  # readable by the group, as all else
    except Exception as e:  # a full disk arrives wrapped in safetensors' own error type
        files.raise_if_no_space(e, directory / weight_name)
        raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return directory / weight_name


@contextlib.contextmanager
def expanded_lora_quietly():
    """diffusers' load_lora_weights for Wan 2.1 image-to-video adds zero LoRA weights for the image K/V
    projections a LoRA does not adapt, and peft then warns that the file adapts modules its config does
    not name. That warning says nothing about the LoRA; it is silenced here, and only it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="While injecting the PEFT adapters, an inconsistency",
                                category=RuntimeWarning)
        yield


def load_lora_into(family: ModelFamily, transformer, directory: Path, weight_name: str = LORA_WEIGHT_NAME) -> None:
    from peft.utils import set_peft_model_state_dict

    try:  # safetensors only: a pickled LoRA is never opened
        state = family.lora_state_dict(str(directory), weight_name=weight_name, use_safetensors=True)
    except Exception as e:  # diffusers and safetensors raise several error types
        raise CogtuneError(f"Cannot read {Path(directory) / weight_name} ({first_line(e)}).") from None
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise CogtuneError(f"The LoRA in {directory} does not match this model (unexpected keys).")


def lora_source(value: str, flag: str) -> tuple[str, str | None]:
    """(folder or hub id, weight file name; None for a hub id) of a LoRA given as a folder holding
    pytorch_lora_weights.safetensors (ours, or a diffusers script's checkpoint-N), a .safetensors
    file, or a hub id. A local file is checked here (check_lora_file): every command that reads a
    LoRA comes through this one door (a hub LoRA is checked by diffusers when it is fetched)."""
    path = Path(value)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CogtuneError(f"{flag} {path} is not a .safetensors file. cogtune reads LoRAs only as safetensors, "
                               "since pickled files (.bin, .pt) can run code when opened.")
        check_lora_file(path, flag)
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / LORA_WEIGHT_NAME).is_file():
            raise CogtuneError(f"No {LORA_WEIGHT_NAME} in {path}; train first, or give {flag} the LoRA file itself.")
        check_lora_file(path / LORA_WEIGHT_NAME, flag)
        return str(path), LORA_WEIGHT_NAME
    if path.is_absolute() or value.startswith(".") or value.count("/") != 1:
        raise CogtuneError(f"{flag} {value} does not exist (give a LoRA folder, its .safetensors file, or a hub id).")
    return value, None


def check_lora_file(path: Path, flag: str) -> None:
    """A local LoRA must be a whole safetensors file of LoRA tensors: said in one line naming it, not
    as safetensors' traceback (a file cut short, 0 bytes, a pickle renamed .safetensors)."""
    from safetensors import safe_open

    if path.stat().st_size == 0:
        raise CogtuneError(f"{flag} {path} is empty (0 bytes): copy the LoRA again, or use a checkpoint's.")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types
        raise CogtuneError(f"{flag} {path} is not a whole safetensors file ({first_line(e)[:120]}): it is damaged, cut "
                           "short, or another kind of file under that name. Copy the LoRA again, or use a "
                           "checkpoint's.") from None
    if not any(".lora_A." in key or ".lora_down." in key for key in keys):
        raise CogtuneError(f"{flag} {path} holds no LoRA tensors (lora_A/lora_B or lora_down/lora_up keys): it is "
                           "another kind of safetensors file.")


def read_lora(value: str, flag: str) -> tuple[Path, dict, dict]:
    """A local LoRA's file, tensors and metadata, read through lora_source's checks."""
    from safetensors import safe_open

    folder, weight_name = lora_source(value, flag)
    if weight_name is None:
        raise CogtuneError(f"{flag} {value}: give a local LoRA (a training output folder or its .safetensors file); "
                           "download a hub LoRA first with `hf download`.")
    path = Path(folder) / weight_name
    with safe_open(str(path), framework="pt") as f:
        return path, {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}


def load_initial_lora(family: ModelFamily, transformer, value: str, rank: int, lora_alpha: float) -> int:
    """--init_lora: start the adapters from an existing LoRA, which must have this run's rank (and
    alpha, when its file records one). Returns how many of this run's adapted layers it covered;
    the others start as a new LoRA does (B = 0)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    folder, weight_name = lora_source(value, "--init_lora")
    try:
        state, metadata = family.lora_state_dict(
            folder, use_safetensors=True, return_lora_metadata=True, **({"weight_name": weight_name} if weight_name else {}))
    except Exception as e:  # diffusers, the hub and safetensors raise several error types
        raise CogtuneError(f"Cannot read the LoRA --init_lora {value} ({first_line(e)}).") from None
    state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    ranks = sorted({v.shape[0] for k, v in state.items() if ".lora_A." in k})
    if ranks != [rank]:
        raise CogtuneError(f"--init_lora {value} has rank {', '.join(map(str, ranks)) or 'none (no transformer LoRA)'}; "
                           f"this run has --rank {rank}. Train with its rank (and its --lora_alpha).")
    alpha = (metadata or {}).get("transformer.lora_alpha")
    if alpha is not None and float(alpha) != float(lora_alpha):
        raise CogtuneError(f"--init_lora {value} was trained with lora_alpha {alpha}; this run has --lora_alpha "
                           f"{lora_alpha:g}, which would change its strength. Pass --lora_alpha {alpha}.")
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise CogtuneError(f"--init_lora {value} adapts layers this run does not ({result.unexpected_keys[0]}, ...): "
                           "give the same --lora_target_modules (or preset), --use_dora and model family it was "
                           "trained with.")
    ours = {k.split(".lora_A.")[0] for k in get_peft_model_state_dict(transformer) if ".lora_A." in k}
    return len(ours & {k.split(".lora_A.")[0] for k in state if ".lora_A." in k})


def write_lora_info(folder: Path, info: dict) -> Path:
    path = Path(folder) / LORA_INFO_NAME
    files.write_text(path, json.dumps(info, indent=2) + "\n")
    return path


def trained_base(folder: str | Path) -> dict | None:
    """The base model a LoRA folder says it was trained on (pretrained_model_name_or_path, revision,
    variant), or None when it does not say."""
    base = read_lora_info(folder).get("base_model") or {}
    return base if isinstance(base, dict) and base.get("pretrained_model_name_or_path") else None


def read_lora_info(folder: str | Path) -> dict:
    """The training facts cogtune stored beside a local LoRA (empty for hub LoRAs and other tools')."""
    path = Path(folder) / LORA_INFO_NAME
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CogtuneError(f"{path} is damaged ({e}); copy it again with the LoRA beside it.") from None
    if not isinstance(info, dict):
        raise CogtuneError(f"{path} is not a cogtune LoRA record (a JSON object); copy it again with the LoRA.")
    return info
