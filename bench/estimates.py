"""The `--dry_run` memory estimate for the published CogVideoX and Wan models at their cards' sizes, batch 1, rank 64.

    .venv/bin/python bench/estimates.py            # writes bench/results/estimates.md

Reads the published pipelines' config files that ship with cogtune (src/cogtune/published: no
weights, nothing downloaded) and runs the estimate that `cogtune train --dry_run` prints for
several settings. These are estimates, not measurements: the estimate is checked against measured
peaks only on CPU-sized models (tests/e2e/test_memory.py, within -5%/+15%).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

GC = ["--gradient_checkpointing"]
OFFLOAD = ["--gradient_checkpointing_cpu_offload"]
SETTINGS = [
    ("bf16", []),
    ("bf16, gradient checkpointing", GC),
    ("bf16, gradient checkpointing, 8-bit Adam", GC + ["--use_8bit_adam"]),
    ("bf16, gradient checkpointing, optimizer offload", GC + ["--offload_optimizer"]),
    ("fp8 storage, bf16 compute, gradient checkpointing", GC + ["--layerwise_casting_storage_dtype", "float8_e4m3fn"]),
    ("bf16, gradient checkpointing, 20 blocks swapped", GC + ["--blocks_to_swap", "20"]),
    ("bf16, gradient checkpointing, checkpoints in CPU memory", GC + OFFLOAD),
    ("torchao int8wo base, gradient checkpointing", GC + ["--quant_backend", "torchao", "--quant_type", "int8wo"]),
    ("torchao float8wo base, gradient checkpointing", GC + ["--quant_backend", "torchao", "--quant_type", "float8wo"]),
    ("quanto int8 base, gradient checkpointing", GC + ["--quant_backend", "quanto", "--quant_type", "int8"]),
    ("bitsandbytes nf4 base, gradient checkpointing", GC + ["--quant_backend", "bitsandbytes_4bit"]),
    ("bitsandbytes nf4 base, gradient checkpointing, 8-bit Adam",
     GC + ["--quant_backend", "bitsandbytes_4bit", "--use_8bit_adam"]),
    ("torchao int8wo base, gradient checkpointing, checkpoints in CPU memory",
     GC + OFFLOAD + ["--quant_backend", "torchao", "--quant_type", "int8wo"]),
    ("bitsandbytes nf4 base, gradient checkpointing, 8-bit Adam, checkpoints in CPU memory",
     GC + OFFLOAD + ["--quant_backend", "bitsandbytes_4bit", "--use_8bit_adam"]),
]
# (model, hub id, latent shape [C, F, H, W] of a clip size its card gives, which the row names). A Wan 2.2
# A14B row is one expert (a run trains one; both have the same shapes).
MODELS = [
    ("CogVideoX-2b", "THUDM/CogVideoX-2b", [16, 13, 60, 90], "49x480x720"),
    ("CogVideoX-5b", "THUDM/CogVideoX-5b", [16, 13, 60, 90], "49x480x720"),
    ("CogVideoX-5b-I2V", "THUDM/CogVideoX-5b-I2V", [16, 13, 60, 90], "49x480x720"),
    ("CogVideoX-1.5-5B", "THUDM/CogVideoX1.5-5B", [16, 21, 96, 170], "81x768x1360"),
    ("Wan2.1-T2V-1.3B", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", [16, 21, 60, 104], "81x480x832"),
    ("Wan2.1-T2V-14B", "Wan-AI/Wan2.1-T2V-14B-Diffusers", [16, 21, 60, 104], "81x480x832"),
    ("Wan2.1-T2V-14B", "Wan-AI/Wan2.1-T2V-14B-Diffusers", [16, 21, 90, 160], "81x720x1280"),
    ("Wan2.1-I2V-14B-480P", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", [16, 21, 60, 104], "81x480x832"),
    ("Wan2.1-I2V-14B-720P", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", [16, 21, 90, 160], "81x720x1280"),
    ("Wan2.2-TI2V-5B", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", [48, 31, 44, 80], "121x704x1280"),
    ("Wan2.2-T2V-A14B (one expert)", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", [16, 21, 60, 104], "81x480x832"),
    ("Wan2.2-T2V-A14B (one expert)", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", [16, 21, 90, 160], "81x720x1280"),
    ("Wan2.2-I2V-A14B (one expert)", "Wan-AI/Wan2.2-I2V-A14B-Diffusers", [16, 21, 60, 104], "81x480x832"),
]


def model_rows(number: int) -> list[str]:
    """The table rows of MODELS[number] under every setting (run in a process of its own: building a
    14B transformer on the meta device a dozen times keeps a few GiB of CPU memory)."""
    from cogtune.config import load_config
    from cogtune.families import ModelConfigs
    from cogtune.train.memory import memory_estimate

    gib = 1024 ** 3
    name, model, shape, clip = MODELS[number]
    models = ModelConfigs.load(model)
    rows = []
    for label, flags in SETTINGS:
        config = load_config("train", ["--pretrained_model_name_or_path", model, "--rank", "64",
                                       "--lora_alpha", "64", "--mixed_precision", "bf16", *flags])
        e = memory_estimate(config, models, shape)
        rows.append(f"| {name} | {clip} | {label} | {e.weights / gib:.2f} GiB | "
                    f"{(e.lora + e.gradients + e.optimizer) / gib:.2f} GiB | "
                    f"{(e.activations + e.transient) / gib:.2f} GiB | **{e.total / gib:.2f} GiB** |")
    return rows


def main() -> None:
    import json
    import subprocess
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--model":
        print(json.dumps(model_rows(int(sys.argv[2]))))
        return
    lines = ["# Expected peak GPU memory (`cogtune train --dry_run`), batch 1, rank 64", "",
             "Estimates from the published model configs; not measured on a GPU (none was available).", "",
             "| model | clip | settings | weights | LoRA + grads + optimizer | activations | total |",
             "|---|---|---|---|---|---|---|"]
    for number in range(len(MODELS)):
        done = subprocess.run([sys.executable, __file__, "--model", str(number)], capture_output=True, text=True,
                              check=True)
        lines += json.loads(done.stdout.strip().splitlines()[-1])
    lines.append("")
    out = HERE / "results" / "estimates.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(out.read_text())


if __name__ == "__main__":
    main()
