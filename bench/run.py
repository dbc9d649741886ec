"""Side-by-side benchmark: cogtune against the diffusers reference script, on the same model, data and settings.

    .venv/bin/python bench/run.py --reference ~/src/diffusers            # or: make bench REFERENCE=~/src/diffusers

Builds a random-weight "small" CogVideoX pipeline with the real models' proportions (cogtune
make-tiny-model --size small) and synthetic clips, then measures:

- preprocess: clips/s of a fresh `cogtune preprocess` (model loading included) and its peak RSS;
- cache reading: samples/s through the training DataLoader alone;
- cache size: bytes per clip;
- training: our `cogtune train` and, with --reference, the diffusers script
  examples/cogvideo/train_cogvideox_lora.py of that checkout, each in its own process under
  bench/timed.py, with the same model, clips, resolution, frames, batch, rank, steps, seed and
  optimizer. Per run: the median optimizer-step interval after --warmup steps, the peak RSS of the
  process (VmHWM) and, on a GPU, torch.cuda.max_memory_allocated.
- the floor: bench/floor.py, the same transformer, LoRA, optimizer and batch shapes in a bare loop
  (random inputs; what any trainer must spend), for the defaults and gradient checkpointing, and a
  process that only imports what that loop imports (torch, diffusers, peft). Our runs are compared
  with it: step time, peak memory, and peak memory net of those imports.

Writes RESULTS/NAME.md (the table, the machine, the settings), RESULTS/NAME.json and RESULTS/NAME.png.
Nothing of the diffusers checkout is copied; it is run where it lies.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCE_SCRIPT = Path("examples/cogvideo/train_cogvideox_lora.py")
# A repeat trains into the folder of the run before it: a new run there, replacing that one's outputs
# (cogtune refuses a folder that holds another run's unless told so).
REPEATABLE = ("--overwrite_output_dir",)


@dataclass
class Settings:
    size: str = "small"  # of the random-weight model: small (the real proportions) or tiny (for a quick check)
    clips: int = 16
    frames: int = 9
    height: int = 96
    width: int = 160
    fps: int = 8
    batch: int = 1
    rank: int = 64
    steps: int = 24
    warmup: int = 3
    repeats: int = 2
    seed: int = 0
    learning_rate: float = 1e-4
    mixed_precision: str = "no"
    only: str = ""  # run only the training setting of this label ("" for all)
    steady: int = 1  # 0: preprocess once, without the second run that gives the steady rate

    def shared_flags(self) -> list[str]:
        """The training flags both trainers take with the same name and meaning."""
        return ["--pretrained_model_name_or_path", "{model}", "--train_batch_size", str(self.batch),
                "--max_train_steps", str(self.steps), "--rank", str(self.rank), "--lora_alpha", str(self.rank),
                "--seed", str(self.seed), "--mixed_precision", self.mixed_precision,
                "--learning_rate", str(self.learning_rate), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                "--optimizer", "adamw", "--checkpointing_steps", "1000000", "--dataloader_num_workers", "0"]


# --- assets -------------------------------------------------------------------------------------


def make_assets(work: Path, settings: Settings) -> tuple[Path, Path]:
    """The small model and `clips` distinct captioned clips (prompts.txt + videos.txt), built once per work folder."""
    from cogtune.dev.tiny import make_tiny_model

    model = work / f"model-{settings.size}"
    if not (model / "model_index.json").is_file():
        make_tiny_model(model, "2b", seed=0, size=settings.size)
    data = make_clips(work / f"data-{settings.clips}", settings.clips,
                      (2 * settings.frames, settings.height, settings.width), settings.fps)
    return model, data


def make_clips(folder: Path, count: int, size: tuple[int, int, int], fps: int) -> Path:
    """A dataset folder (prompts.txt, videos.txt, videos/) of `count` distinct synthetic clips of
    (frames, height, width), made once per folder."""
    import numpy as np

    from cogtune.dev.tiny import COLORS, synthetic_frames
    from cogtune.util.media import write_mp4

    if (folder / "videos.txt").is_file():
        return folder
    frames, height, width = size
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    colors = list(COLORS.items())
    prompts, videos = [], []
    for i in range(count):
        name, color = colors[i % len(colors)]
        pixels = synthetic_frames(frames, height, width, color, 1 - 2 * (i % 2))
        pixels = np.clip(pixels.astype(np.int16) + 7 * (i // len(colors)), 0, 255).astype(np.uint8)  # distinct
        write_mp4(folder / "videos" / f"{i:05d}.mp4", pixels, fps)
        prompts.append(f"a {name} square moves across a dark gradient background, take {i}")
        videos.append(f"videos/{i:05d}.mp4")
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (folder / "videos.txt").write_text("\n".join(videos) + "\n")
    return folder


# --- measuring ----------------------------------------------------------------------------------


def run_measured(name: str, command: list[str], work: Path) -> dict:
    """Run command under bench/timed.py in its own process: its figures (peak RSS, step times) and wall time."""
    record_path, log_path = work / f"{name}.json", work / f"{name}.log"
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(HERE / "timed.py"), str(record_path), *command],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        process.wait()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise SystemExit(f"{name} failed with exit status {process.returncode}; last lines of {log_path}:\n{tail}")
    record = json.loads(record_path.read_text())
    record.update(name=name, seconds=seconds)
    return record


def median_step_seconds(record: dict, warmup: int) -> float:
    times = record["step_times"]
    intervals = [b - a for a, b in zip(times[warmup:], times[warmup + 1:])]
    if not intervals:
        raise SystemExit(f"{record['name']}: too few steps to time after {warmup} warm-up steps; raise --steps.")
    return statistics.median(intervals)


def read_throughput(cache_dir: Path, batch: int, passes: int = 5) -> dict:
    """Samples/s of the training DataLoader alone (the same dataset, batches and collate as `cogtune train`)."""
    import torch

    from cogtune.cache.reader import Cache
    from cogtune.train.data import LatentDataset, collate, epoch_batches

    cache = Cache.open(cache_dir)
    shapes = [tuple(row.latent_shape) for row in cache.samples]
    dataset = LatentDataset(cache)
    samples, started = 0, time.perf_counter()
    for epoch in range(passes):
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=epoch_batches(shapes, batch, 0, epoch),
                                             collate_fn=collate)
        for item in loader:
            samples += next(iter(item.video.values())).shape[0]
    seconds = time.perf_counter() - started
    return {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds,
            "seconds_per_batch": seconds / (samples / batch)}


def parameter_count(folder: Path) -> int:
    """Parameters stored in a model folder, from the safetensors headers alone."""
    import math

    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def step_flops(model: Path, settings: Settings) -> int:
    """Model FLOPs of one training step of the transformer (forward and backward, no recomputation),
    counted by torch's FlopCounterMode on the meta device: the work both trainers do per step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cogtune.config import load_config
    from cogtune.families import ModelConfigs
    from cogtune.train.model import build_transformer

    models = ModelConfigs.load(str(model))
    spec = models.spec()
    config = load_config("train", ["--pretrained_model_name_or_path", str(model), "--rank", str(settings.rank),
                                   "--mixed_precision", settings.mixed_precision])
    meta = torch.device("meta")
    transformer = build_transformer(config, models, spec, meta, meta=True)
    latent_shape = [spec.latent_channels, spec.latent_frames(settings.frames), settings.height // spec.vae_scale_spatial,
                    settings.width // spec.vae_scale_spatial]
    inputs = spec.memory_inputs(settings.batch, latent_shape, transformer.config.in_channels, torch.float32, meta)
    with FlopCounterMode(display=False) as counter:
        pred = transformer(**inputs, return_dict=False)[0]
        pred.float().pow(2).mean().backward()
    return counter.get_total_flops()


def subset(data: Path, clips: int) -> Path:
    """A dataset folder of the first `clips` clips of data (prompts.txt and videos.txt cut short, videos copied)."""
    import shutil

    folder = data.parent / f"{data.name}-first-{clips}"
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    for name in ("prompts.txt", "videos.txt"):
        (folder / name).write_text("".join((data / name).read_text().splitlines(keepends=True)[:clips]))
    for video in (folder / "videos.txt").read_text().split():
        if not (folder / video).exists():
            shutil.copy2(data / video, folder / video)
    return folder


def cache_bytes(cache_dir: Path) -> int:
    return sum(path.stat().st_size for path in cache_dir.rglob("*") if path.is_file())


# --- the runs -----------------------------------------------------------------------------------


def train_runs(settings: Settings, model: Path, data: Path, cache_dir: Path, work: Path,
               reference: Path | None) -> list[dict]:
    """Measure every training run: each setting on both trainers, then our memory options, which
    the reference does not have."""
    shared = [flag.format(model=model) for flag in settings.shared_flags()]
    variants = [("defaults", []), ("gradient checkpointing", ["--gradient_checkpointing"])]
    runs = []
    for label, extra in variants:
        runs.append((label, "cogtune", ["-m", "cogtune.cli", "train", *shared, *extra, "--data_cache", str(cache_dir),
                                        "--output_dir", str(work / f"out-cogtune-{len(runs)}"), *REPEATABLE]))
        if reference is not None:
            runs.append((label, "diffusers", [str(reference / REFERENCE_SCRIPT), *shared, *extra,
                                              "--instance_data_root", str(data), "--caption_column", "prompts.txt",
                                              "--video_column", "videos.txt", "--height", str(settings.height),
                                              "--width", str(settings.width), "--fps", str(settings.fps),
                                              "--max_num_frames", str(settings.frames),
                                              "--output_dir", str(work / f"out-diffusers-{len(runs)}")]))
    runs.append(("gradient checkpointing + fp8 base", "cogtune",
                 ["-m", "cogtune.cli", "train", *shared, "--gradient_checkpointing",
                  "--layerwise_casting_storage_dtype", "float8_e4m3fn", "--data_cache", str(cache_dir),
                  "--output_dir", str(work / f"out-cogtune-{len(runs)}"), *REPEATABLE]))
    runs.append(("gradient checkpointing + torchao int8 base", "cogtune",
                 ["-m", "cogtune.cli", "train", *shared, "--gradient_checkpointing", "--quant_backend", "torchao",
                  "--quant_type", "int8wo", "--data_cache", str(cache_dir),
                  "--output_dir", str(work / f"out-cogtune-{len(runs)}"), *REPEATABLE]))
    if settings.mixed_precision == "no":  # the floor (fp32): the same step in a bare loop, and its imports alone
        for label, extra in variants:
            runs.append((label, "floor", [str(HERE / "floor.py"), "--model", str(model), "--batch", str(settings.batch),
                                          "--rank", str(settings.rank), "--steps", str(settings.steps),
                                          "--seed", str(settings.seed), "--learning_rate", str(settings.learning_rate),
                                          "--frames", str(settings.frames), "--height", str(settings.height),
                                          "--width", str(settings.width), *extra]))
        runs.append(("imports", "floor", [str(HERE / "floor.py"), "--imports_only"]))
    if settings.only:  # (the test of this script runs one setting)
        runs = [run for run in runs if run[0] in (settings.only, "imports")]
    # Every run is repeated, in turn with the others so that a slow spell of the machine is shared;
    # a run's figures are the medians over its repeats (its range is kept in the JSON).
    repeats: list[list[dict]] = [[] for _ in runs]
    for repeat in range(settings.repeats):
        for i, (label, trainer, command) in enumerate(runs):
            print(f"train: {trainer}, {label} ({repeat + 1} of {settings.repeats})", flush=True)
            record = run_measured(f"train-{i}-{trainer}-{repeat}", command, work)
            record.update(label=label, trainer=trainer, median_step_seconds=None if label == "imports" else
                          median_step_seconds(record, settings.warmup))
            repeats[i].append(record)
    results = []
    for records in repeats:
        figures = {key: [record[key] for record in records]
                   for key in ("median_step_seconds", "peak_rss_bytes", "cuda_max_memory_allocated")}
        summary = dict(records[0], repeats=figures)  # the first repeat's timeline and step times, for the plot
        for key, values in figures.items():
            summary[key] = None if values[0] is None else statistics.median(values)
        results.append(summary)
    return results


def machine() -> dict:
    import diffusers
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": memory, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def reference_revision(reference: Path | None) -> str | None:
    if reference is None:
        return None
    try:
        return subprocess.run(["git", "-C", str(reference), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"


# --- the report ---------------------------------------------------------------------------------

MIB = 1024 ** 2


def memory_of(run: dict) -> int:
    return run["cuda_max_memory_allocated"] or run["peak_rss_bytes"]


def trained(results: dict) -> list[dict]:
    """The runs that trained (not the floor's imports alone)."""
    return [run for run in results["train"] if run["label"] != "imports"]


def floor_table(results: dict) -> list[str]:
    """Our runs against the floor (bench/floor.py): step time, peak memory, and peak memory net of the
    floor's imports (torch, diffusers, peft: the peak of a process that only imports them)."""
    floors = {run["label"]: run for run in results["train"] if run["trainer"] == "floor"}
    imports = floors.pop("imports", None)
    if not floors or imports is None:
        return []
    base = imports["peak_rss_bytes"]
    lines = ["", f"Against the floor: the same transformer, LoRA, optimizer and batch shapes in a bare loop "
                 f"(bench/floor.py); its imports alone peak at {base / MIB:.0f} MiB.", "",
             "| setting | step vs floor | peak RSS vs floor | peak RSS net of the floor's imports, vs floor |",
             "|---|---|---|---|"]
    for run in results["train"]:
        floor = floors.get(run["label"])
        if run["trainer"] != "cogtune" or floor is None:
            continue
        lines.append(f"| {run['label']} | {run['median_step_seconds'] / floor['median_step_seconds']:.2f}x | "
                     f"{run['peak_rss_bytes'] / floor['peak_rss_bytes']:.2f}x | "
                     f"{(run['peak_rss_bytes'] - base) / (floor['peak_rss_bytes'] - base):.2f}x "
                     f"({(run['peak_rss_bytes'] - base) / MIB:.0f} vs {(floor['peak_rss_bytes'] - base) / MIB:.0f} MiB) |")
    return lines


def report(results: dict, out: Path, name: str) -> None:
    on_gpu = "gpu" in results["machine"]
    memory_label = "peak GPU memory allocated" if on_gpu else "peak RSS"
    peak = results["peak_tflops"]
    lines = [f"# cogtune vs the diffusers reference script ({name})", ""]
    m, s = results["machine"], results["settings"]
    lines += [f"Machine: {m.get('gpu', m['cpu'])}, {m['cores']} CPU cores, {m['memory_bytes'] / 1024 ** 3:.0f} GiB "
              f"RAM; torch {m['torch']}, diffusers {m['diffusers']}, Python {m['python']}.",
              f"Reference: {results['reference'] or 'not run (no --reference given)'}"
              + (f" at {results['reference_revision']}" if results["reference_revision"] else "") + ".",
              f"Model: random-weight {s['size']} CogVideoX-2b structure ({results['parameters']}).",
              f"Settings: {s['clips']} clips of {s['frames']}x{s['height']}x{s['width']}, batch {s['batch']}, "
              f"rank {s['rank']}, {s['steps']} steps (median over the steps after {s['warmup']}), seed {s['seed']}, "
              f"AdamW, mixed precision {s['mixed_precision']}. Each training run was made {s['repeats']} times, "
              f"in turn with the others; the figures are medians over the repeats, with the range of the peak "
              f"memory in brackets.",
              f"Transformer TFLOP/s: the model FLOPs of one training step of the transformer "
              f"({results['step_flops'] / 1e9:.1f} GFLOP forward and backward, no recomputation, counted by "
              f"torch's FlopCounterMode), divided by the median step time"
              + (f"; MFU against a peak of {peak} TFLOP/s." if peak else "."), ""]
    lines += [f"| setting | trainer | median step (s) | {memory_label} (MiB) | step vs reference | memory vs reference "
              f"| transformer TFLOP/s{' | MFU' if peak else ''} |",
              "|---|---|---|---|---|---|---|" + ("---|" if peak else "")]
    reference_runs = {run["label"]: run for run in results["train"] if run["trainer"] == "diffusers"}
    for run in trained(results):
        ref = reference_runs.get(run["label"]) or reference_runs.get("gradient checkpointing")
        ratios = ["", ""]
        if ref is not None and run["trainer"] == "cogtune":
            ratios = [f"{run['median_step_seconds'] / ref['median_step_seconds']:.2f}x",
                      f"{memory_of(run) / memory_of(ref):.2f}x"]
            if ref["label"] != run["label"]:
                ratios = [f"{r} (vs its gradient checkpointing)" for r in ratios]
        achieved = results["step_flops"] / run["median_step_seconds"] / 1e12
        memories = [m for m in run["repeats"]["cuda_max_memory_allocated"] if m] or run["repeats"]["peak_rss_bytes"]
        lines.append(f"| {run['label']} | {run['trainer']} | {run['median_step_seconds']:.3f} | "
                     f"{memory_of(run) / MIB:.0f} ({min(memories) / MIB:.0f}-{max(memories) / MIB:.0f}) | "
                     f"{ratios[0]} | {ratios[1]} | {achieved:.3f} |"
                     + (f" {achieved / peak:.1%} |" if peak else ""))
    lines += floor_table(results)
    p, r = results["preprocess"], results["read"]
    step = min(run["median_step_seconds"] for run in trained(results) if run["trainer"] == "cogtune")
    lines += ["", "| stage | figure |", "|---|---|",
              f"| preprocess | " + (f"{p['steady_clips_per_s']:.2f} clips/s steady (the time {p['clips']} clips take "
                                      f"beyond {p['clips'] // 2}); " if p['steady_clips_per_s'] else "")
              + f"{p['clips_per_s']:.2f} clips/s for the whole command ({p['clips']} clips in "
              f"{p['seconds']:.1f} s, start-up and model loading included); peak RSS "
              f"{p['peak_rss_bytes'] / MIB:.0f} MiB |",
              f"| cache read (training DataLoader alone) | {r['samples_per_s']:.0f} samples/s; one batch in "
              f"{r['seconds_per_batch'] * 1000:.2f} ms, {step / r['seconds_per_batch']:.0f}x faster than our fastest "
              f"training step |",
              f"| cache size | {results['bytes_per_clip'] / 1024:.0f} KiB per clip (latent moments and caption "
              f"embeddings, index and manifest) |", ""]
    lines += ["Reproduce: `make bench REFERENCE=/path/to/diffusers` (a checkout of "
              "https://github.com/huggingface/diffusers; its examples/cogvideo/train_cogvideox_lora.py is run).", ""]
    (out / f"{name}.md").write_text("\n".join(lines))
    plot(results, out / f"{name}.png", memory_label)
    for run in results["train"]:  # the plot has every sample; the JSON keeps one in five
        run["rss_timeline"] = run["rss_timeline"][::5]
    (out / f"{name}.json").write_text(json.dumps(results) + "\n")


def plot(results: dict, path: Path, memory_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = trained(results)
    labels = [f"{run['trainer']}\n{run['label']}" for run in runs]
    colors = ["tab:blue" if run["trainer"] == "cogtune" else "tab:green" if run["trainer"] == "floor" else "tab:gray"
              for run in runs]
    figure, (memory, step, timeline) = plt.subplots(1, 3, figsize=(17, 5))
    memory.barh(labels, [memory_of(run) / MIB for run in runs], color=colors)
    memory.set_xlabel(f"{memory_label} (MiB)")
    memory.invert_yaxis()
    step.barh(labels, [run["median_step_seconds"] for run in runs], color=colors)
    step.set_xlabel("median step time (s)")
    step.set_yticks([])
    step.invert_yaxis()
    for run in runs:
        seconds, rss = zip(*run["rss_timeline"]) if run["rss_timeline"] else ((), ())
        timeline.plot(seconds, [b / MIB for b in rss], label=f"{run['trainer']}, {run['label']}",
                      linestyle="-" if run["trainer"] == "cogtune" else "--")
    timeline.set_xlabel("seconds since start")
    timeline.set_ylabel("RSS (MiB)")
    timeline.legend(fontsize=7)
    figure.suptitle(f"cogtune vs diffusers train_cogvideox_lora.py, {results['machine'].get('gpu', 'CPU')}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, help="A diffusers checkout (its examples/cogvideo script is run).")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="Where the table and plot go.")
    parser.add_argument("--name", help="Name of the result files (default: cpu-small or gpu-small).")
    parser.add_argument("--work", type=Path, default=HERE / "work", help="Models, clips, caches and logs (reused).")
    parser.add_argument("--peak_tflops", type=float, help="The device's peak TFLOP/s in the training dtype, for MFU "
                                                          "(for example 989 for an H100 SXM in bf16).")
    for key, value in vars(Settings()).items():
        parser.add_argument(f"--{key}", type=type(value), default=value)
    args = parser.parse_args()
    settings = Settings(**{key: getattr(args, key) for key in vars(Settings())})
    if args.reference is not None and not (args.reference / REFERENCE_SCRIPT).is_file():
        raise SystemExit(f"--reference {args.reference}: no {REFERENCE_SCRIPT} there; give a diffusers checkout.")
    import torch

    name = args.name or f"{'gpu' if torch.cuda.is_available() else 'cpu'}-{settings.size}"
    work = args.work.resolve() / name
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    print("assets: small model and clips", flush=True)
    model, data = make_assets(work, settings)
    print("preprocess", flush=True)
    # Two fresh caches, of half the clips and of all of them: the difference is the steady encoding
    # rate, without start-up and model loading.
    runs = {}
    for clips in (settings.clips // 2, settings.clips) if settings.steady else (settings.clips,):
        cache_root = work / f"cache-{clips}-{time.time_ns()}"
        runs[clips] = run_measured(f"preprocess-{clips}", [
            "-m", "cogtune.cli", "preprocess", "--pretrained_model_name_or_path", str(model),
            "--instance_data_root", str(subset(data, clips)), "--height", str(settings.height),
            "--width", str(settings.width), "--fps", str(settings.fps), "--max_num_frames", str(settings.frames),
            "--cache_root", str(cache_root), "--mixed_precision", settings.mixed_precision], work)
    from cogtune.cache.identity import list_caches

    (cache_dir,) = list_caches(cache_root)
    full = runs[settings.clips]
    half = runs.get(settings.clips // 2)
    preprocess = dict(full, clips=settings.clips, clips_per_s=settings.clips / full["seconds"],
                      steady_clips_per_s=(settings.clips - settings.clips // 2) / (full["seconds"] - half["seconds"])
                      if half else None)
    read = read_throughput(cache_dir, settings.batch)
    train = train_runs(settings, model, data, cache_dir, work, args.reference)

    counts = {part: parameter_count(model / part) for part in ("transformer", "text_encoder", "vae")}
    results = {"machine": machine(), "settings": vars(settings), "reference": str(args.reference or "") or None,
               "reference_revision": reference_revision(args.reference),
               "parameters": ", ".join(f"{part} {count / 1e6:.1f}M" for part, count in counts.items()),
               "step_flops": step_flops(model, settings), "peak_tflops": args.peak_tflops,
               "preprocess": preprocess, "read": read, "bytes_per_clip": cache_bytes(cache_dir) / settings.clips,
               "train": train}
    report(results, args.out, name)
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
