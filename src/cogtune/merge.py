"""`cogtune merge`: the base pipeline with a trained LoRA merged into its transformer, saved as a
diffusers pipeline folder that `from_pretrained` loads, with no LoRA left to load.

The pipeline is loaded in fp32, the LoRA fused at --lora_scale (diffusers' fuse_lora: W += scale *
alpha / rank * B @ A, DoRA's magnitudes included), the adapter removed, and the whole pipeline cast
to --dtype before it is written: the sum is taken in fp32 and rounded once. The folder is written
under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import torch

from cogtune.config import stage_file_values
from cogtune.errors import CogtuneError, first_line
from cogtune.families import ModelConfigs
from cogtune.train.lora import expanded_lora_quietly, lora_source, read_lora_info, trained_base
from cogtune.util import files, logs
from cogtune.util.devices import MIXED_PRECISION, precision_dtype

ADAPTER_NAME = "merged"


def merge(lora: str, merged_dir: str | Path, base: str | None = None, lora_scale: float = 1.0,
          dtype: str = "bf16", revision: str | None = None, variant: str | None = None) -> Path:
    if not math.isfinite(lora_scale):
        raise CogtuneError(f"--lora_scale must be a finite number, got {lora_scale}.")
    folder, weight_name = lora_source(lora, "--lora")
    info = read_lora_info(folder)
    trained_on = trained_base(folder) or {}
    if not base:  # the model it was trained on, at the same revision and variant
        base, revision, variant = (trained_on.get("pretrained_model_name_or_path"), revision or trained_on.get("revision"),
                                   variant or trained_on.get("variant"))
    if not base:
        raise CogtuneError(f"--lora {lora} does not say which model it was trained on (no cogtune_lora.json beside "
                           "it): pass --pretrained_model_name_or_path.")
    merged_dir = Path(merged_dir)
    if merged_dir.exists() and (not merged_dir.is_dir() or any(merged_dir.iterdir())):
        raise CogtuneError(f"--merged_dir {merged_dir} exists and is not empty: choose a new folder (nothing is "
                           "overwritten).")
    files.ensure_writable_dir(merged_dir.parent, "--merged_dir's parent folder")
    models = ModelConfigs.load(base, revision, variant)
    if info.get("image_to_video"):  # (Wan 2.2 TI2V trained image-to-video)
        models = models.as_image_to_video()
    spec = models.spec()
    pipe = models.load_part(spec.pipeline_class(), None, dtype=torch.float32)
    if spec.ignores_learned_positions(bool(info.get("ignore_learned_positional_embeddings"))):
        spec.drop_learned_positional_embeddings(pipe.transformer)  # recorded in the saved config too
    try:
        with expanded_lora_quietly():
            pipe.load_lora_weights(folder, adapter_name=ADAPTER_NAME, use_safetensors=True,
                                   **({"weight_name": weight_name} if weight_name else {}),
                                   **spec.lora_load_arguments(info))
    except Exception as e:  # OSError, ValueError, safetensors' and peft's own error types
        raise CogtuneError(f"Cannot load the LoRA {lora}: {first_line(e)}") from None
    pipe.fuse_lora(components=spec.lora_components(info), lora_scale=lora_scale, adapter_names=[ADAPTER_NAME])
    pipe.unload_lora_weights()
    pipe.to(precision_dtype(dtype))
    temp = merged_dir.with_name(f".{merged_dir.name}.tmp-{time.time_ns()}")
    try:
        pipe.save_pretrained(temp, safe_serialization=True)
        if merged_dir.is_dir():
            merged_dir.rmdir()  # empty (checked above)
        temp.rename(merged_dir)
    except Exception as e:
        files.raise_if_no_space(e, merged_dir)
        raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return merged_dir.resolve()


def main(argv: list[str], description: str) -> None:
    parser = argparse.ArgumentParser(prog="cogtune merge", description=description)
    parser.add_argument("--config", default=None, help="The config file of the training run: its output_dir (or "
                                                        "lora), model, revision, variant and lora_scale are the "
                                                        "defaults, as for the other stages; flags win.")
    parser.add_argument("--lora", default=None, help="The LoRA: a training output folder, its .safetensors file, or a "
                                                     "hub id (default: the config's lora or output_dir, else "
                                                     "cogtune-lora).")
    parser.add_argument("--merged_dir", required=True, help="The new pipeline folder to write.")
    parser.add_argument("--pretrained_model_name_or_path", default=None,
                        help="The base pipeline (default: the one the LoRA was trained on, from cogtune_lora.json).")
    parser.add_argument("--revision", default=None, help="The base model's hub revision.")
    parser.add_argument("--variant", default=None, help="The base model's weight variant (fp16, bf16).")
    parser.add_argument("--lora_scale", type=float, default=None,
                        help="Strength merged in: 1.0 (the default) is the trained alpha/rank scale (as infer's "
                             "--lora_scale).")
    parser.add_argument("--dtype", type=str.lower, choices=MIXED_PRECISION, default="bf16",
                        help="The saved pipeline's precision: no (fp32), fp16 or bf16 (default: bf16). The sum is "
                             "taken in fp32 either way.")
    args = parser.parse_args(argv)
    logs.configure("text")  # the libraries' loading bars only on a terminal, never into a log file
    names = ("lora", "output_dir", "pretrained_model_name_or_path", "revision", "variant", "lora_scale")
    file = stage_file_values(args.config, "infer", names) if args.config else {}
    lora = args.lora or file.get("lora") or file.get("output_dir") or "cogtune-lora"
    scale = args.lora_scale if args.lora_scale is not None else file.get("lora_scale", 1.0)
    path = merge(lora, args.merged_dir, args.pretrained_model_name_or_path or file.get("pretrained_model_name_or_path"),
                 scale, args.dtype, args.revision or file.get("revision"), args.variant or file.get("variant"))
    logs.result(f"merged: {path}", merged=str(path))
