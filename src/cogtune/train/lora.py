"""What a training run leaves behind, and how it is read back: the LoRA in diffusers format (with
its rank and alpha) and cogtune_lora.json beside it (the base model, family, LoRA settings, steps,
cache, and whether 5b-I2V's learned positional embeddings were left out)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from cogtune.errors import CogtuneError, first_line
from cogtune.util import files

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_INFO_NAME = "cogtune_lora.json"


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
        files.publish(temp / LORA_WEIGHT_NAME, directory / LORA_WEIGHT_NAME)  # readable by the group, as all else
    except Exception as e:  # a full disk arrives wrapped in safetensors' own error type
        files.raise_if_no_space(e, directory / LORA_WEIGHT_NAME)
        raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return directory / LORA_WEIGHT_NAME


def load_lora_into(transformer, directory: Path) -> None:
    from diffusers import CogVideoXPipeline
    from peft.utils import set_peft_model_state_dict

    try:  # safetensors only: a pickled LoRA is never opened
        state = CogVideoXPipeline.lora_state_dict(str(directory), weight_name=LORA_WEIGHT_NAME, use_safetensors=True)
    except Exception as e:  # diffusers and safetensors raise several error types
        raise CogtuneError(f"Cannot read {Path(directory) / LORA_WEIGHT_NAME} ({first_line(e)}).") from None
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise CogtuneError(f"The LoRA in {directory} does not match this model (unexpected keys).")


def write_lora_info(folder: Path, info: dict) -> Path:
    path = Path(folder) / LORA_INFO_NAME
    files.write_text(path, json.dumps(info, indent=2) + "\n")
    return path


def read_lora_info(folder: str | Path) -> dict:
    """The training facts cogtune stored beside a local LoRA (empty for hub LoRAs and other tools')."""
    path = Path(folder) / LORA_INFO_NAME
    return json.loads(path.read_text()) if path.is_file() else {}
