"""The one prepared GPU check: GPU figures measured in one short run, each part in its own process
with its own time budget (issue 19).

    make bench-gpu                                    # on a GPU machine: cuda, the real model sizes
    .venv/bin/python bench/gpu_check.py --device cpu --size tiny    # the same script on a CPU, in a minute

Models are built with random weights from the published configs that ship with cogtune (the
transformer's weights only: training never loads T5 or, without validation, the VAE), and the cache
is written with random latents of the real shapes by the cache writer: nothing is downloaded.
Writes `<out>.md` and `<out>.json` after every part, and prints each row as it is measured, so a run
cut short still leaves the figures of the parts it finished.

Parts (this version; see the issue for what is still to come):
- parity: the loss of a training step on the device equals the CPU's for the same tiny model,
  batch, noise and timesteps (within bf16 tolerance on a GPU; exactly on a CPU);
- train: `cogtune train` on each setting (family, precision, gradient checkpointing, fp8 storage of
  the frozen base), batch 1, rank 64: peak `max_memory_allocated` and `max_memory_reserved` (peak
  RSS on a CPU), median step time after warm-up, transformer TFLOP/s and MFU against the chip's
  dense bf16 peak, and the `--dry_run` estimate beside the measured peak with their ratio.

Not yet built: the diffusers reference script side by side, and preprocess (T5 and VAE) throughput
and memory. Until they are, the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 2**20

# Dense bf16 peaks (TFLOP/s) by device name, for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}

# (label, family, frames x height x width, precision, extra train flags), per size. The real size
# is what the README's figures are about; tiny runs the same code paths on a CPU.
SETTINGS = {
    "real": [
        ("2b, fp16, gradient checkpointing", "2b", (49, 480, 720), "fp16", ["--gradient_checkpointing"]),
        ("2b, bf16, gradient checkpointing", "2b", (49, 480, 720), "bf16", ["--gradient_checkpointing"]),
        ("2b, bf16", "2b", (49, 480, 720), "bf16", []),
        ("2b, bf16, gradient checkpointing, fp8 storage", "2b", (49, 480, 720), "bf16",
         ["--gradient_checkpointing", "--layerwise_casting_storage_dtype", "float8_e4m3fn"]),
        ("5b, bf16, gradient checkpointing", "5b", (49, 480, 720), "bf16", ["--gradient_checkpointing"]),
        ("5b, bf16", "5b", (49, 480, 720), "bf16", []),
        ("5b, bf16, gradient checkpointing, fp8 storage", "5b", (49, 480, 720), "bf16",
         ["--gradient_checkpointing", "--layerwise_casting_storage_dtype", "float8_e4m3fn"]),
    ],
    "tiny": [
        ("2b, fp32, gradient checkpointing", "2b", (9, 32, 64), "no", ["--gradient_checkpointing"]),
    ],
}
PUBLISHED = {"2b": "THUDM/CogVideoX-2b", "5b": "THUDM/CogVideoX-5b"}


# --- assets: a model folder and a cache, made here ---------------------------------------------


def make_model(folder: Path, family: str, size: str) -> Path:
    """A pipeline folder: the tiny random model, or the published configs with a random-weight
    transformer of the real size (bf16) and the other parts' configs only."""
    if (folder / "model_index.json").is_file():
        return folder
    if size == "tiny":
        from cogtune.dev.tiny import make_tiny_model

        return make_tiny_model(folder, family)
    import shutil

    import torch
    from diffusers import CogVideoXTransformer3DModel

    from cogtune.families import published_folder

    published = published_folder(PUBLISHED[family])
    shutil.copytree(published, folder, ignore=shutil.ignore_patterns("transformer"))
    config = json.loads((published / "transformer" / "config.json").read_text())
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        transformer = CogVideoXTransformer3DModel.from_config(config).to(torch.bfloat16)
    transformer.save_pretrained(folder / "transformer")
    return folder


def make_cache(model: Path, cache_root: Path, size: tuple[int, int, int], clips: int = 4) -> Path:
    """A cache of `clips` samples of random latents and caption embeddings of the shapes preprocess
    would write for `size`, written by the cache writer under the identity preprocess would give."""
    import torch

    from cogtune import data_schema as schema
    from cogtune.cache.identity import cache_identity
    from cogtune.cache.writer import CacheWriter
    from cogtune.config import load_config
    from cogtune.families import ModelConfigs

    frames, height, width = size
    config = load_config("preprocess", ["--pretrained_model_name_or_path", str(model), "--instance_data_root",
                                        str(cache_root), "--cache_root", str(cache_root), "--height", str(height),
                                        "--width", str(width), "--max_num_frames", str(frames)])
    models = ModelConfigs.of(config)
    spec = models.spec()
    identity = cache_identity(config, models)
    path = cache_root / identity.name
    if (path / schema.SELECTION_FILE).is_file():
        return path
    channels, dtype = models.vae["latent_channels"], schema.DTYPES[config.latent_dtype]  # as preprocess stores them
    shape = [channels, spec.latent_frames(frames), height // spec.vae_scale_spatial, width // spec.vae_scale_spatial]
    writer = CacheWriter(path, identity.manifest(), shard_size_mb=512)
    generator = torch.Generator().manual_seed(0)
    ids = []
    for i in range(clips):
        sha, caption = schema.sha256_text(f"clip {i}"), f"a synthetic clip {i}"
        key = schema.video_key(sha)
        mean_key, logvar_key = schema.latent_tensor_keys(key)
        shard = writer.add_tensor(mean_key, torch.randn(shape, generator=generator).to(dtype))
        writer.add_tensor(logvar_key, torch.full(shape, -6.0).to(dtype))
        text_key = schema.text_tensor_key(schema.caption_key(caption))
        text_shard = writer.add_tensor(text_key, torch.randn(spec.max_text_seq_length, spec.text_embed_dim,
                                                             generator=generator).mul(0.1).to(dtype))
        source = schema.SampleSource(schema.sample_id(sha, caption), f"/synthetic/{i}.mp4", 1, 1, sha, caption)
        video = schema.VideoLatent(frame_indices=list(range(frames)), source_fps=8.0, source_height=height,
                                   source_width=width, num_frames=frames, height=height, width=width,
                                   bucket=f"{frames}x{height}x{width}", decoder="synthetic", latent_shape=shape,
                                   latent_shard=shard, latent_key=key, image_noise_sigmas=[])
        writer.add_row(schema.ok_row(source, video, text_shard))
        ids.append(source.sample_id)
    writer.write_selection(ids)
    return path


# --- the parts -----------------------------------------------------------------------------------


def train_flags(model: Path, cache: Path, precision: str, extra: list[str], steps: int) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--data_cache", str(cache), "--train_batch_size", "1",
            "--rank", "64", "--lora_alpha", "64", "--mixed_precision", precision, "--max_train_steps", str(steps),
            "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--checkpointing_steps", "1000000", "--seed", "0", *extra]


def run_cogtune(args: list[str], log: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", **(env or {}))
    with open(log, "w") as out:
        return subprocess.run([sys.executable, "-m", "cogtune.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                              env=environment, timeout=timeout)


def dry_run_gib(model: Path, cache: Path, precision: str, extra: list[str]) -> float | None:
    """The total that `cogtune train --dry_run` prints for the same flags (GiB), computed here by the
    same function (memory_estimate) for the cache's latent shape."""
    from cogtune.cache.reader import Cache
    from cogtune.config import load_config
    from cogtune.families import ModelConfigs
    from cogtune.train.memory import memory_estimate

    config = load_config("train", train_flags(model, cache, precision, extra, 1))
    shape = Cache.open(cache, for_training=True).samples.latent_shapes[0]
    return memory_estimate(config, ModelConfigs.of(config), list(shape)).total / 2**30


def part_parity(args, work: Path) -> list[dict]:
    """The first step's loss of the same tiny run on the CPU and on the device."""
    model = make_model(work / "model-tiny-2b", "2b", "tiny")
    cache = make_cache(model, work / "cache-tiny", (9, 32, 64))
    losses = {}
    for device in dict.fromkeys(["cpu", args.device]):
        out = work / f"parity-{device}"
        env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
        precision = "bf16" if device == "cuda" else "no"
        # One step: its loss depends only on the base weights, batch, noise and timesteps (drawn on the
        # CPU), since LoRA's B starts at zero; a second step would also depend on A's initialisation,
        # which is drawn on the device.
        result = run_cogtune(["train", *train_flags(model, cache, precision, [], 1), "--output_dir", str(out)],
                             work / f"parity-{device}.log", args.part_timeout, env)
        if result.returncode != 0:
            return [{"part": "parity", "device": device, "error": f"exit {result.returncode}, see {out}.log"}]
        losses[device] = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    cpu, other = losses["cpu"], losses[args.device]
    tolerance = 2e-2 if args.device == "cuda" else 0.0  # bf16 on the GPU; the same arithmetic on the CPU
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(cpu, other))
    return [{"part": "parity", "device": args.device, "cpu_losses": cpu, "device_losses": other,
             "worst_relative_difference": worst, "tolerance": tolerance, "ok": worst <= tolerance}]


def part_train(args, work: Path) -> list[dict]:
    import torch

    rows = []
    for label, family, size, precision, extra in SETTINGS[args.size]:
        started = time.perf_counter()
        model = make_model(work / f"model-{args.size}-{family}", family, args.size)
        cache = make_cache(model, work / f"cache-{args.size}-{family}", size)
        out = work / f"train-{len(rows)}"
        result = run_cogtune(["train", *train_flags(model, cache, precision, extra, args.steps), "--output_dir",
                              str(out)], work / f"train-{len(rows)}.log", args.part_timeout)
        row = {"part": "train", "setting": label, "family": family, "size": "x".join(map(str, size)),
               "precision": precision}
        if result.returncode != 0:
            rows.append(dict(row, error=f"exit {result.returncode}; see {work / f'train-{len(rows)}.log'}"))
            print_row(rows[-1])
            continue
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        times = [record["step_seconds"] for record in log[args.warmup:]] or [log[-1]["step_seconds"]]
        row.update(median_step_seconds=statistics.median(times), peak_allocated_mib=max(r["peak_memory_mib"] for r in log),
                   peak_reserved_mib=max((r.get("peak_reserved_mib") or 0) for r in log) or None,
                   estimate_gib=dry_run_gib(model, cache, precision, extra),
                   seconds=round(time.perf_counter() - started, 1))
        flops = step_flops(model, size)
        row["tflops"] = flops / row["median_step_seconds"] / 1e12
        peak = args.peak_tflops or (next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name()), None)
                                    if torch.cuda.is_available() else None)
        row["mfu"] = row["tflops"] / peak if peak else None
        if row["estimate_gib"] and torch.cuda.is_available():  # (on a CPU the peak is the whole process's RSS)
            row["measured_vs_estimate"] = row["peak_allocated_mib"] / (row["estimate_gib"] * 1024)
        rows.append(row)
        print_row(row)
    return rows


def step_flops(model: Path, size: tuple[int, int, int]) -> int:
    """Model FLOPs of one training step of the transformer (forward and backward), counted on the
    meta device (bench/run.py's count, for this size)."""
    sys.path.insert(0, str(HERE))
    from run import Settings
    from run import step_flops as count

    frames, height, width = size
    return count(model, Settings(frames=frames, height=height, width=width, rank=64, batch=1))


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


PARTS = {"parity": part_parity, "train": part_train}


# --- the run -------------------------------------------------------------------------------------


def print_row(row: dict) -> None:
    print(json.dumps(row), flush=True)


def report(results: dict, out: Path) -> None:
    """The Markdown table and the JSON, rewritten after every part."""
    lines = [f"# GPU check (`bench/gpu_check.py`): {results['device_name']}, size {results['size']}", "",
             f"torch {results['torch']}, measured {results['date']}. Each part in its own process; "
             "peak memory is torch.cuda.max_memory_allocated (peak RSS on a CPU).", ""]
    train = [r for r in results["rows"] if r["part"] == "train"]
    if train:
        lines += ["| setting | size | median step (s) | peak allocated (MiB) | peak reserved (MiB) | --dry_run "
                  "estimate (GiB) | measured / estimate | TFLOP/s | MFU |", "|---|---|---|---|---|---|---|---|---|"]
        for r in train:
            if "error" in r:
                lines.append(f"| {r['setting']} | {r['size']} | {r['error']} | | | | | | |")
                continue
            mfu = "" if r["mfu"] is None else f"{r['mfu']:.1%}"
            ratio = f"{r['measured_vs_estimate']:.2f}" if "measured_vs_estimate" in r else ""
            lines.append(f"| {r['setting']} | {r['size']} | {r['median_step_seconds']:.3f} | {r['peak_allocated_mib']:.0f} | "
                         f"{r['peak_reserved_mib'] or ''} | {_gib(r['estimate_gib'])} | {ratio} | {r['tflops']:.3g} | "
                         f"{mfu} |")
    for r in results["rows"]:
        if r["part"] == "parity":
            lines += ["", f"Parity: a training step's loss on {r['device']} vs CPU: worst relative difference "
                          f"{r.get('worst_relative_difference', 'n/a')} (tolerance {r.get('tolerance')}): "
                          f"{'ok' if r.get('ok') else 'FAILED ' + r.get('error', '')}"]
    for part, why in results["not_run"].items():
        lines += ["", f"{part}: not run ({why})."]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


def _gib(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}" if value >= 0.1 else f"{value * 1024:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=sorted(SETTINGS), default="real")
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=["parity", "train"])
    parser.add_argument("--steps", type=int, default=6, help="Training steps per setting (the first --warmup untimed).")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--part_timeout", type=float, default=150.0, help="Seconds one measured command may take.")
    parser.add_argument("--peak_tflops", type=float, help="The chip's dense bf16 peak (default: from its name).")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "gpu-check")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu-check")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here; run with --device cpu --size tiny for the CPU check.")
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"device_name": device_name(), "size": args.size, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": [],
               "not_run": {"reference": "the diffusers script side by side is not built yet",
                           "preprocess": "T5 and VAE throughput and memory are not built yet"}}
    for part in args.parts:
        try:
            results["rows"] += PARTS[part](args, args.work)
        except subprocess.TimeoutExpired as e:
            results["rows"].append({"part": part, "error": f"over its budget of {e.timeout:.0f} s"})
        report(results, args.out)
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
