"""The `--dry_run` memory estimate for the published CogVideoX and Wan models at their cards' sizes, batch 1, rank 64.

    .venv/bin/python bench/estimates.py    # writes bench/results/estimates.md and .json; then `make docs`

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
    ("bf16, gradient checkpointing, context parallelism 2 (per GPU)", GC + ["--context_parallel_degree", "2"]),
    ("bf16, gradient checkpointing, context parallelism 4 (per GPU)", GC + ["--context_parallel_degree", "4"]),
]
# Context parallelism 4 splits CogVideoX's 226 text tokens unevenly (training refuses it): Wan only.
WAN_ONLY = ("bf16, gradient checkpointing, context parallelism 4 (per GPU)",)
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


def sizes(e) -> dict:
    """An estimate's parts, in GiB to two places, as the tables print them."""
    gib = 1024 ** 3
    return {"weights": round(e.weights / gib, 2),
            "lora_gradients_optimizer": round((e.lora + e.gradients + e.optimizer) / gib, 2),
            "activations": round((e.activations + e.transient) / gib, 2), "total": round(e.total / gib, 2)}


def model_rows(number: int) -> list[dict]:
    """The estimates of MODELS[number] under every setting, in GiB (run in a process of its own: building
    a 14B transformer on the meta device a dozen times keeps a few GiB of CPU memory)."""
    from cogtune.config import load_config
    from cogtune.families import ModelConfigs
    from cogtune.train.memory import memory_estimate

    name, model, shape, clip = MODELS[number]
    models = ModelConfigs.load(model)
    rows = []
    for label, flags in SETTINGS:
        if label in WAN_ONLY and not name.startswith("Wan"):
            continue
        config = load_config("train", ["--pretrained_model_name_or_path", model, "--rank", "64",
                                       "--lora_alpha", "64", "--mixed_precision", "bf16", *flags])
        e = memory_estimate(config, models, shape)
        rows.append({"model": name, "hub_id": model, "clip": clip, "settings": label, "flags": flags, **sizes(e)})
    return rows


def recommended_row(variant: str) -> dict:
    """The estimate of the config `cogtune init --family VARIANT` writes, at its own clip size (what
    `cogtune train --config THAT --dry_run` prints before a cache exists)."""
    from cogtune.config import load_config
    from cogtune.families import VARIANTS, ModelConfigs
    from cogtune.templates import FAMILIES, TEMPLATES
    from cogtune.train.memory import memory_estimate

    path = TEMPLATES / "configs" / FAMILIES[variant]
    config = load_config("train", ["--config", str(path)])
    clip = load_config("preprocess", ["--config", str(path)])
    models = ModelConfigs.of(config)
    spec = models.spec()
    shape = [spec.latent_channels, spec.latent_frames(clip.max_num_frames), clip.height // spec.vae_scale_spatial,
             clip.width // spec.vae_scale_spatial]
    e = memory_estimate(config, models, shape)
    settings = (f"the init config: {config.mixed_precision}, rank {config.rank}"
                + (", gradient checkpointing" if config.gradient_checkpointing else "")
                + (f", {config.expert} expert" if getattr(config, "expert", None) else ""))
    return {"variant": variant, "model": VARIANTS[variant][1], "hub_id": config.pretrained_model_name_or_path,
            "clip": f"{clip.max_num_frames}x{clip.height}x{clip.width}", "fps": clip.fps, "settings": settings,
            **sizes(e)}


def main() -> None:
    import datetime
    import json
    import platform
    import subprocess
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--model":
        print(json.dumps(model_rows(int(sys.argv[2]))))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--recommended":
        print(json.dumps(recommended_row(sys.argv[2])))
        return
    rows = []
    for number in range(len(MODELS)):
        done = subprocess.run([sys.executable, __file__, "--model", str(number)], capture_output=True, text=True,
                              check=True)
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    import torch

    from cogtune.dev.docs import estimate_row
    from cogtune.templates import FAMILIES
    from cogtune.util.files import write_text

    recommended = []
    for variant in FAMILIES:
        if variant != "demo":
            done = subprocess.run([sys.executable, __file__, "--recommended", variant], capture_output=True, text=True,
                                  check=True)
            recommended.append(json.loads(done.stdout.strip().splitlines()[-1]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    meta = {"date": datetime.date.today().isoformat(), "commit": commit.strip() or "unknown",
            "command": "python bench/estimates.py", "machine": f"{platform.machine()}, torch {torch.__version__}",
            "batch": 1, "rank": 64}
    lines = ["# Expected peak GPU memory (`cogtune train --dry_run`), batch 1, rank 64", "",
             f"Estimates from the published model configs (`{meta['command']}`, {meta['date']}, at {meta['commit']}); "
             "not measured on a GPU.", "",
             "| model | clip | settings | weights | LoRA + grads + optimizer | activations | total |",
             "|---|---|---|---|---|---|---|", *map(estimate_row, rows), "",
             "## The config `cogtune init --family VARIANT` writes, at its own clip size", "",
             "| model | clip | settings | weights | LoRA + grads + optimizer | activations | total |",
             "|---|---|---|---|---|---|---|", *map(estimate_row, recommended), ""]
    out = HERE / "results" / "estimates.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, "\n".join(lines))
    write_text(out.with_suffix(".json"), json.dumps({**meta, "rows": rows, "recommended": recommended}, indent=1) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
