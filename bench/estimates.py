"""The `--dry_run` memory estimate for the real CogVideoX-2b and -5b at 49x480x720, batch 1, rank 64.

    .venv/bin/python bench/estimates.py            # writes bench/results/estimates.md

Writes config-only copies of the published pipelines (the config.json files of the hub's
THUDM/CogVideoX-2b and -5b, written out below: no weights, nothing downloaded) and runs the
estimate that `cogtune train --dry_run` prints for several settings. These are estimates, not
measurements: the estimate is checked against measured peaks only on CPU-sized models
(tests/test_memory.py, within -5%/+15%).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

TRANSFORMER_2B = {
    "_class_name": "CogVideoXTransformer3DModel", "activation_fn": "gelu-approximate", "attention_bias": True,
    "attention_head_dim": 64, "dropout": 0.0, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 16,
    "max_text_seq_length": 226, "norm_elementwise_affine": True, "norm_eps": 1e-05, "num_attention_heads": 30,
    "num_layers": 30, "out_channels": 16, "patch_size": 2, "sample_frames": 49, "sample_height": 60,
    "sample_width": 90, "spatial_interpolation_scale": 1.875, "temporal_compression_ratio": 4,
    "temporal_interpolation_scale": 1.0, "text_embed_dim": 4096, "time_embed_dim": 512,
    "timestep_activation_fn": "silu", "use_rotary_positional_embeddings": False,
}
TRANSFORMER_5B = dict(TRANSFORMER_2B, num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
T5_XXL = {"model_type": "t5", "architectures": ["T5EncoderModel"], "d_model": 4096, "d_ff": 10240, "d_kv": 64,
          "num_heads": 64, "num_layers": 24, "vocab_size": 32128, "feed_forward_proj": "gated-gelu",
          "relative_attention_num_buckets": 32, "is_encoder_decoder": False}


def write_configs(folder: Path, family: str) -> Path:
    from cogtune.tiny import SCHEDULER_2B, SCHEDULER_5B

    import torch
    from diffusers import AutoencoderKLCogVideoX

    transformer = TRANSFORMER_2B if family == "2b" else TRANSFORMER_5B
    with torch.device("meta"):  # diffusers' defaults are the published VAE's config; only the scaling differs
        vae = dict(AutoencoderKLCogVideoX(scaling_factor=1.15258426 if family == "2b" else 0.7).config)
    scheduler = dict(SCHEDULER_2B if family == "2b" else SCHEDULER_5B, _class_name="CogVideoXDDIMScheduler")
    for part, name, config in (("transformer", "config.json", transformer), ("vae", "config.json", vae),
                               ("scheduler", "scheduler_config.json", scheduler),
                               ("text_encoder", "config.json", T5_XXL)):
        (folder / part).mkdir(parents=True, exist_ok=True)
        (folder / part / name).write_text(json.dumps(config, default=list))
    return folder


SETTINGS = [
    ("bf16", []),
    ("bf16, gradient checkpointing", ["--gradient_checkpointing"]),
    ("bf16, gradient checkpointing, 8-bit Adam", ["--gradient_checkpointing", "--use_8bit_adam"]),
    ("bf16, gradient checkpointing, optimizer offload", ["--gradient_checkpointing", "--offload_optimizer"]),
    ("fp8 storage, bf16 compute, gradient checkpointing",
     ["--gradient_checkpointing", "--layerwise_casting_storage_dtype", "float8_e4m3fn"]),
]


def main() -> None:
    from cogtune.config import load_config
    from cogtune.families import ModelConfigs
    from cogtune.train import memory_estimate

    gib = 1024 ** 3
    lines = ["# Expected peak GPU memory (`cogtune train --dry_run`), 49x480x720, batch 1, rank 64", "",
             "Estimates from the published model configs; not measured on a GPU (none was available).", "",
             "| model | settings | weights | LoRA + grads + optimizer | activations | total |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as temp:
        for family in ("2b", "5b"):
            folder = write_configs(Path(temp) / family, family)
            models = ModelConfigs.load(str(folder))
            for label, flags in SETTINGS:
                config = load_config("train", ["--pretrained_model_name_or_path", str(folder), "--rank", "64",
                                               "--lora_alpha", "64", "--mixed_precision", "bf16", *flags])
                e = memory_estimate(config, models, [16, 13, 60, 90])
                lines.append(f"| CogVideoX-{family} | {label} | {e.weights / gib:.2f} GiB | "
                             f"{(e.lora + e.gradients + e.optimizer) / gib:.2f} GiB | "
                             f"{(e.activations + e.transient) / gib:.2f} GiB | **{e.total / gib:.2f} GiB** |")
    lines.append("")
    out = HERE / "results" / "estimates.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(out.read_text())


if __name__ == "__main__":
    main()
