"""The `--dry_run` memory estimate for the real CogVideoX-2b and -5b at 49x480x720, batch 1, rank 64.

    .venv/bin/python bench/estimates.py            # writes bench/results/estimates.md

Reads the published pipelines' config files that ship with cogtune (src/cogtune/published: no
weights, nothing downloaded) and runs the estimate that `cogtune train --dry_run` prints for
several settings. These are estimates, not measurements: the estimate is checked against measured
peaks only on CPU-sized models (tests/test_memory.py, within -5%/+15%).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

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
    from cogtune.train.memory import memory_estimate

    gib = 1024 ** 3
    lines = ["# Expected peak GPU memory (`cogtune train --dry_run`), 49x480x720, batch 1, rank 64", "",
             "Estimates from the published model configs; not measured on a GPU (none was available).", "",
             "| model | settings | weights | LoRA + grads + optimizer | activations | total |", "|---|---|---|---|---|---|"]
    for family in ("2b", "5b"):
        model = f"THUDM/CogVideoX-{family}"
        models = ModelConfigs.load(model)
        for label, flags in SETTINGS:
            config = load_config("train", ["--pretrained_model_name_or_path", model, "--rank", "64",
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
