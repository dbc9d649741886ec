"""`cogtune export --format comfyui`: a trained LoRA in the key layout ComfyUI's LoRA loading reads
(for CogVideoX, and for Wan under its original module names).

cogtune saves LoRAs as diffusers does (`transformer.<module>.lora_A.weight` / `.lora_B.weight`,
the alpha in the file's metadata). ComfyUI users load CogVideoX through kijai's
ComfyUI-CogVideoXWrapper, whose "CogVideo LoraSelect" node merges LoRAs without `lora_B` keys
with its `merge_lora`: the kohya layout of the CogVideoX-Fun trainer, one entry per module

    lora_unet_<module path, "." -> "_">.lora_down.weight   [rank, in]   (diffusers lora_A)
    lora_unet_<module path, "." -> "_">.lora_up.weight     [out, rank]  (diffusers lora_B)
    lora_unet_<module path, "." -> "_">.alpha              scalar: W += strength * alpha / rank * up @ down

for example `lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight`. The module path is the
diffusers transformer's, which the node resolves by walking the model's attribute names. ComfyUI's
own LoRA loader reads the same `lora_up`/`lora_down`/`alpha` entries, and a DoRA's magnitudes as

    lora_unet_<module>.dora_scale                          [out, 1]    (peft's lora_magnitude_vector)

applied as peft applies them: W' = dora_scale * (W + alpha / rank * up @ down) / its norm per output.

Wan: ComfyUI's WanModel keeps the module names of Wan's original checkpoints (blocks.0.self_attn.q,
cross_attn.k_img, ffn.0, ...), not diffusers' (blocks.0.attn1.to_q, ...); its LoRA loader maps each
`lora_unet_<name, "." -> "_">` to `diffusion_model.<name>.weight` (comfy/lora.py, model_lora_keys_unet),
so the export names each module as the original checkpoint does: the inverse of the renames in
diffusers' scripts/convert_wan_to_diffusers.py (families/wan.py, ORIGINAL_NAMES). That is also the
layout musubi-tuner writes for Wan.

ComfyUI scales by alpha / rank: an rsLoRA (trained at lora_alpha / sqrt(rank)) is written with alpha =
lora_alpha * sqrt(rank), so that ComfyUI applies the trained strength.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from cogtune.config import stage_file_values
from cogtune.errors import CogtuneError
from cogtune.families import ModelConfigs
from cogtune.train.lora import read_lora, read_lora_info, trained_base
from cogtune.util import files, logs

FORMATS = ("comfyui",)
PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "transformer."


def adapter_settings(metadata: dict | None, folder: Path) -> tuple[float | None, bool]:
    """(lora_alpha, use_rslora) from the file's diffusers metadata, else from cogtune_lora.json beside it."""
    adapter = json.loads((metadata or {}).get("lora_adapter_metadata") or "{}")
    info = read_lora_info(folder)
    alpha = adapter.get("transformer.lora_alpha", info.get("lora_alpha"))
    rslora = adapter.get("transformer.use_rslora", info.get("use_rslora", False))
    return (float(alpha) if alpha is not None else None), bool(rslora)


def to_comfyui(state: dict[str, torch.Tensor], alpha: float | None, rslora: bool = False,
               rename=lambda module: module) -> dict[str, torch.Tensor]:
    """Diffusers LoRA tensors -> the lora_unet_ layout (alpha None: alpha = rank, scale 1), with the
    alpha that gives the trained strength at ComfyUI's alpha / rank (rsLoRA: alpha x sqrt(rank)), and
    DoRA's magnitudes as dora_scale. rename: a diffusers module path -> the one ComfyUI's model has
    (the family's exported_module)."""
    converted = {}
    for key, tensor in state.items():
        if not key.startswith(DIFFUSERS_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight",
                                                                      ".lora_magnitude_vector")):
            raise CogtuneError(f"{key} is not a diffusers transformer LoRA key (transformer.<module>.lora_A/B.weight, "
                               "or a DoRA's lora_magnitude_vector); only LoRAs trained by cogtune or the diffusers "
                               "scripts can be exported.")
        if key.endswith(".lora_magnitude_vector"):
            module = rename(key[len(DIFFUSERS_PREFIX):].removesuffix(".lora_magnitude_vector"))
            converted[f"{PREFIX}{module.replace('.', '_')}.dora_scale"] = tensor.reshape(-1, 1).contiguous()
            continue
        module, kind = rename(key[len(DIFFUSERS_PREFIX):].rsplit(".", 2)[0]), key.rsplit(".", 2)[1]
        name = PREFIX + module.replace(".", "_")
        converted[f"{name}.{'lora_down' if kind == 'lora_A' else 'lora_up'}.weight"] = tensor.contiguous()
        if kind == "lora_A":
            rank = tensor.shape[0]
            strength = (alpha if alpha is not None else rank) * (math.sqrt(rank) if rslora else 1.0)
            converted[f"{name}.alpha"] = torch.tensor(float(strength))
    return converted


def family_of(folder: Path, format: str):
    """The LoRA's model family, where its cogtune_lora.json names a base model whose configs can be
    read here (a local folder, a published id, the hub cache), else None; a format the family does
    not export to is refused."""
    base = trained_base(folder)
    if base is None:
        return None
    try:
        spec = ModelConfigs.load(base["pretrained_model_name_or_path"], base.get("revision"), base.get("variant")).spec()
    except CogtuneError:  # the base is not here: the keys are checked as they are converted
        return None
    if format not in spec.export_formats:
        raise CogtuneError(f"--format {format} is not available for a {spec.description} LoRA (it exports to: "
                           f"{', '.join(spec.export_formats) or 'nothing yet'}); its diffusers file loads as it is.")
    return spec


def export(lora: str | Path, output: str | Path | None, format: str = "comfyui") -> Path:
    from safetensors.torch import save_file

    if format not in FORMATS:
        raise CogtuneError(f"--format {format} is not one of {', '.join(FORMATS)}.")
    path, state, metadata = read_lora(str(lora), "--lora")
    spec = family_of(path.parent, format)
    alpha, rslora = adapter_settings(metadata, path.parent)
    converted = to_comfyui(state, alpha, rslora, spec.exported_module if spec is not None else lambda module: module)
    output = Path(output) if output else path.with_name(f"{path.stem}_comfyui.safetensors")
    if output.exists() and output.resolve() == path.resolve():
        raise CogtuneError(f"--output {output} is the LoRA being exported: give another file (nothing is written "
                           "over its input).")
    if output.is_dir():
        raise CogtuneError(f"--output {output} is a folder: give the file to write, for example {output / 'lora_comfyui.safetensors'}.")
    files.ensure_writable_dir(output.parent, "--output's folder")
    files.atomic_write(output, lambda temp: save_file(converted, temp, metadata={"format": "pt",
                                                                                   "exported_by": "cogtune"}))
    return output


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="cogtune export",
                                     description="Write a trained LoRA in another tool's key layout.")
    parser.add_argument("--config", default=None, help="The config file of the training run: its output_dir (and "
                                                        "lora) are the defaults, as for the other stages.")
    parser.add_argument("--format", choices=FORMATS, required=True,
                        help="comfyui: lora_unet_* kohya keys with alpha (and DoRA's dora_scale), for ComfyUI (CogVideoX; "
                             "Wan under its original module names) and ComfyUI-CogVideoXWrapper's LoRA node.")
    parser.add_argument("--lora", default=None, help="The training output folder or its LoRA .safetensors file "
                                                     "(default: --output_dir).")
    parser.add_argument("--output_dir", default=None, help="The training output folder (default: the config's, "
                                                           "else cogtune-lora).")
    parser.add_argument("--output", default=None, help="The file to write (default: beside the LoRA, with a "
                                                       "_comfyui suffix).")
    args = parser.parse_args(argv)
    logs.configure("text")
    defaults = stage_file_values(args.config, "infer", ("lora", "output_dir")) if args.config else {}
    lora = args.lora or (None if args.output_dir else defaults.get("lora")) or args.output_dir or \
        defaults.get("output_dir") or "cogtune-lora"
    logs.result(f"exported: {export(lora, args.output, args.format)}")
