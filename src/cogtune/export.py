"""`cogtune export --format comfyui`: a trained LoRA in the key layout ComfyUI's CogVideoX LoRA
loading reads.

cogtune saves LoRAs as diffusers does (`transformer.<module>.lora_A.weight` / `.lora_B.weight`,
the alpha in the file's metadata). ComfyUI users load CogVideoX through kijai's
ComfyUI-CogVideoXWrapper, whose "CogVideo LoraSelect" node merges LoRAs without `lora_B` keys
with its `merge_lora`: the kohya layout of the CogVideoX-Fun trainer, one entry per module

    lora_unet_<module path, "." -> "_">.lora_down.weight   [rank, in]   (diffusers lora_A)
    lora_unet_<module path, "." -> "_">.lora_up.weight     [out, rank]  (diffusers lora_B)
    lora_unet_<module path, "." -> "_">.alpha              scalar: W += strength * alpha / rank * up @ down

for example `lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight`. The module path is the
diffusers transformer's, which the node resolves by walking the model's attribute names. ComfyUI's
own LoRA loader reads the same `lora_up`/`lora_down`/`alpha` entries.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cogtune.errors import CogtuneError
from cogtune.train.lora import LORA_WEIGHT_NAME, read_lora_info
from cogtune.util import files, logs

FORMATS = ("comfyui",)
PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "transformer."


def lora_alpha(metadata: dict | None, folder: Path) -> float | None:
    """The LoRA alpha from the file's diffusers metadata, else from cogtune_lora.json beside it."""
    adapter = json.loads((metadata or {}).get("lora_adapter_metadata") or "{}")
    if "transformer.lora_alpha" in adapter:
        return float(adapter["transformer.lora_alpha"])
    info = read_lora_info(folder)
    return float(info["lora_alpha"]) if "lora_alpha" in info else None


def to_comfyui(state: dict[str, torch.Tensor], alpha: float | None) -> dict[str, torch.Tensor]:
    """Diffusers LoRA tensors -> the lora_unet_ layout (alpha None: alpha = rank, scale 1)."""
    converted = {}
    for key, tensor in state.items():
        if not key.startswith(DIFFUSERS_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise CogtuneError(f"{key} is not a diffusers transformer LoRA key (transformer.<module>.lora_A/B.weight); "
                               "only LoRAs trained by cogtune or the diffusers scripts can be exported.")
        module, kind = key[len(DIFFUSERS_PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        name = PREFIX + module.replace(".", "_")
        converted[f"{name}.{'lora_down' if kind == 'lora_A' else 'lora_up'}.weight"] = tensor.contiguous()
        if kind == "lora_A":
            rank = tensor.shape[0]
            converted[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    return converted


def export(lora: str | Path, output: str | Path | None, format: str = "comfyui") -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    if format not in FORMATS:
        raise CogtuneError(f"--format {format} is not one of {', '.join(FORMATS)}.")
    path = Path(lora)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise CogtuneError(f"--lora {lora}: no LoRA there (give a training output folder or its .safetensors file).")
    if path.suffix != ".safetensors":
        raise CogtuneError(f"--lora {path} is not a .safetensors file; cogtune never opens pickled LoRAs.")
    with safe_open(str(path), "pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    converted = to_comfyui(state, lora_alpha(metadata, path.parent))
    output = Path(output) if output else path.with_name(f"{path.stem}_comfyui.safetensors")
    files.atomic_write(output, lambda temp: save_file(converted, temp, metadata={"format": "pt",
                                                                                   "exported_by": "cogtune"}))
    return output


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="cogtune export",
                                     description="Write a trained LoRA in another tool's key layout.")
    parser.add_argument("--format", choices=FORMATS, required=True,
                        help="comfyui: lora_unet_* kohya keys with alpha, for ComfyUI-CogVideoXWrapper's LoRA node.")
    parser.add_argument("--lora", default=None, help="The training output folder or its LoRA .safetensors file "
                                                     "(default: --output_dir).")
    parser.add_argument("--output_dir", default="cogtune-lora", help="The training output folder (default: "
                                                                     "cogtune-lora).")
    parser.add_argument("--output", default=None, help="The file to write (default: beside the LoRA, with a "
                                                       "_comfyui suffix).")
    args = parser.parse_args(argv)
    logs.result(f"exported: {export(args.lora or args.output_dir, args.output, args.format)}")
