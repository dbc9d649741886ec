"""The one prepared GPU check: every GPU figure of the README measured in one short run, each
measurement in its own process, each part within its own time budget (issue 19).

    make bench-gpu                                    # on a GPU machine: cuda, the real model sizes
    .venv/bin/python bench/gpu_check.py --device cpu --size tiny    # the same script on a CPU, in a minute

Models are built here with random weights from the published configs that ship with cogtune
(`--size tiny` shrinks their widths), clips are drawn and written here, and the caches of the
training part hold random latents of the real shapes, written by the cache writer: nothing is
downloaded. Writes `<out>.md` and `<out>.json` after every part and prints each row as it is
measured, so a run cut short still leaves the figures of what it finished.

Parts, in the order they run (the most wanted figures first, so a short budget loses the least):
- parity: the loss of a training step on the device equals the CPU's for the same tiny model,
  batch, noise and timesteps (within bf16 tolerance on a GPU; exactly on a CPU);
- train: `cogtune train` on each setting (family, precision, gradient checkpointing, fp8 storage or
  a torchao int8 quantized frozen base, block swap), batch 1, rank 64: peak `max_memory_allocated` and `max_memory_reserved` (peak
  RSS on a CPU), median step time after warm-up, transformer TFLOP/s and MFU against the chip's
  dense bf16 peak, and the `--dry_run` estimate beside the measured peak with their ratio;
- reference: the diffusers script examples/cogvideo/train_cogvideox_lora.py on 2b with the same
  settings (and the VAE tiling and slicing its README advises), under bench/timed.py: its training
  peak (the steps after the first), its whole run's peak and its median step, beside ours. It needs
  the script (`--reference`, a diffusers checkout; `make gpu-wheels REFERENCE=...` copies it into
  bench/wheels/reference) and decord; without them the table says why it did not run;
- preprocess: `cogtune preprocess` of synthetic clips with the VAE's tiling and slicing on and off:
  clips/s, and the peak GPU memory of the T5 stage and of the VAE stage, each from a fresh cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import Settings, make_clips  # noqa: E402 (bench/run.py: the clips and the FLOP count it shares)
from run import step_flops as count_step_flops  # noqa: E402

MIB = 2**20
REFERENCE_SCRIPT = Path("examples/cogvideo/train_cogvideox_lora.py")

# Dense bf16 peaks (TFLOP/s) by device name, for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}

GC = ["--gradient_checkpointing"]
FP8 = ["--layerwise_casting_storage_dtype", "float8_e4m3fn"]
# Training settings (label, family, frames x height x width, precision, extra flags), most wanted
# first: the README's two figures (2b and 5b, bf16, gradient checkpointing), the Wan models at their
# cards' sizes (random weights from the published configs), then the others.
INT8 = ["--quant_backend", "torchao", "--quant_type", "int8wo"]
SETTINGS = {
    "real": [
        ("2b, bf16, gradient checkpointing", "2b", (49, 480, 720), "bf16", GC),
        ("5b, bf16, gradient checkpointing", "5b", (49, 480, 720), "bf16", GC),
        ("Wan 2.1 1.3B, bf16, gradient checkpointing", "wan2.1-1.3b", (81, 480, 832), "bf16", GC),
        ("Wan 2.2 TI2V 5B, bf16, gradient checkpointing", "wan2.2-5b", (121, 704, 1280), "bf16", GC),
        ("Wan 2.1 14B, bf16, gradient checkpointing", "wan2.1-14b", (81, 480, 832), "bf16", GC),
        # --attention_backend, beside the rows above without it (flash is refused in a second where flash-attn
        # is not installed, and the row says so).
        ("5b, bf16, gradient checkpointing, cuDNN attention", "5b", (49, 480, 720), "bf16",
         GC + ["--attention_backend", "_native_cudnn"]),
        ("Wan 2.1 1.3B, bf16, gradient checkpointing, cuDNN attention", "wan2.1-1.3b", (81, 480, 832), "bf16",
         GC + ["--attention_backend", "_native_cudnn"]),
        ("5b, bf16, gradient checkpointing, flash-attn", "5b", (49, 480, 720), "bf16",
         GC + ["--attention_backend", "flash"]),
        ("5b, bf16, gradient checkpointing, FlashAttention 3", "5b", (49, 480, 720), "bf16",
         GC + ["--attention_backend", "_flash_3"]),
        # --fp8_compute (FP8 matmuls for the frozen linear layers; needs compute capability 8.9+), beside bf16.
        ("5b, bf16, gradient checkpointing, fp8 compute", "5b", (49, 480, 720), "bf16", GC + ["--fp8_compute"]),
        ("Wan 2.1 1.3B, bf16, gradient checkpointing, context parallelism 2 (estimate per GPU)", "wan2.1-1.3b",
         (81, 480, 832), "bf16", GC + ["--context_parallel_degree", "2"]),
        ("Wan 2.1 1.3B, bf16, gradient checkpointing, fp8 compute", "wan2.1-1.3b", (81, 480, 832), "bf16",
         GC + ["--fp8_compute"]),
        ("5b, bf16, gradient checkpointing, torchao int8wo base", "5b", (49, 480, 720), "bf16", GC + INT8),
        ("5b, bf16, gradient checkpointing in CPU memory, torchao int8wo base", "5b", (49, 480, 720), "bf16",
         GC + ["--gradient_checkpointing_cpu_offload"] + INT8),
        ("5b, bf16, gradient checkpointing, 32 of 42 blocks swapped", "5b", (49, 480, 720), "bf16",
         GC + ["--blocks_to_swap", "32"]),
        ("2b, bf16, gradient checkpointing, torchao int8wo base", "2b", (49, 480, 720), "bf16", GC + INT8),
        ("2b, fp16, gradient checkpointing", "2b", (49, 480, 720), "fp16", GC),
        ("2b, bf16, gradient checkpointing, fp8 storage", "2b", (49, 480, 720), "bf16", GC + FP8),
        ("5b, bf16, gradient checkpointing, fp8 storage", "5b", (49, 480, 720), "bf16", GC + FP8),
        ("2b, bf16", "2b", (49, 480, 720), "bf16", []),
        ("5b, bf16", "5b", (49, 480, 720), "bf16", []),
    ],
    "tiny": [
        ("2b, fp32, gradient checkpointing", "2b", (9, 32, 64), "no", GC),
        ("2b, fp32, gradient checkpointing, 1 of 2 blocks swapped", "2b", (9, 32, 64), "no",
         GC + ["--blocks_to_swap", "1"]),
        ("Wan 2.2 TI2V 5B, fp32, gradient checkpointing", "wan2.2-5b", (9, 64, 64), "no", GC),
        ("Wan 2.2 TI2V 5B, fp32, gradient checkpointing, context parallelism 2 (estimate per process)", "wan2.2-5b",
         (9, 64, 64), "no", GC + ["--context_parallel_degree", "2"]),
    ],
}
# The training settings the reference runs too (it has no fp8 storage, and 2b only here).
REFERENCE_SETTINGS = {
    "real": ["2b, bf16, gradient checkpointing", "2b, bf16", "2b, fp16, gradient checkpointing"],
    "tiny": ["2b, fp32, gradient checkpointing"],
}
# Preprocess: clips of (frames, height, width) as found (16:9, resized and cropped to the training
# size, which is that of the first training setting), and the VAE options.
SOURCE_CLIPS = {"real": (4, (49, 720, 1280)), "tiny": (3, (9, 48, 80))}
VAE_OPTIONS = [("VAE tiling and slicing", ["--enable_tiling", "--enable_slicing"]), ("no tiling or slicing", [])]
# Seconds for each part (spread over the parts chosen, in these proportions, by --budget). The real
# ones sum to 7.8 minutes: the whole check fits an 8-minute command.
PART_SECONDS = {
    "real": {"parity": 30, "train": 330, "reference": 40, "preprocess": 70},
    "tiny": {"parity": 120, "train": 120, "reference": 180, "preprocess": 120},
}
MIN_COMMAND_SECONDS = 10  # a command is not started with less left than this in its part's budget
PUBLISHED = {"2b": "THUDM/CogVideoX-2b", "5b": "THUDM/CogVideoX-5b", "wan2.1-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
             "wan2.1-14b": "Wan-AI/Wan2.1-T2V-14B-Diffusers", "wan2.2-5b": "Wan-AI/Wan2.2-TI2V-5B-Diffusers"}
# --size tiny: the published configs with every width shrunk (the structure kept), so the CPU
# check runs the code that builds the real models. By family name.
TINY_TEXT_ENCODER = dict(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, relative_attention_num_buckets=8)
TINY_WIDTHS = {
    "CogVideoX": {
        "transformer": dict(num_attention_heads=2, attention_head_dim=16, time_embed_dim=8, text_embed_dim=32,
                            num_layers=2, max_text_seq_length=32),
        "text_encoder": TINY_TEXT_ENCODER,
        "vae": dict(block_out_channels=[8, 8, 8, 8], norm_num_groups=2, layers_per_block=1),
    },
    "Wan": {
        "transformer": dict(num_attention_heads=2, attention_head_dim=8, ffn_dim=32, freq_dim=16, text_dim=32,
                            num_layers=2),
        "text_encoder": TINY_TEXT_ENCODER,
        "vae": dict(base_dim=8, decoder_base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
    },
}
TINY_TEXT_LENGTH = {"CogVideoX": 32}  # the tiny CogVideoX's max_text_seq_length (Wan pads every caption to 512)
TRAINING_PARTS = ("transformer",)  # what `cogtune train` loads (no validation: no VAE, and never T5)
ALL_PARTS = ("transformer", "vae", "text_encoder", "tokenizer")  # what preprocess and the reference load


class OutOfTime(Exception):
    """A part's budget is spent: its remaining commands are not started."""


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def timeout(self) -> float:
        """The seconds the next command may take (the rest of the part's budget)."""
        left = self.end - time.monotonic()
        if left < MIN_COMMAND_SECONDS:
            raise OutOfTime(f"not run: the part's budget of {self.seconds:.0f} s was spent (raise --budget)")
        return left


# --- assets: models, caches and clips, made here -------------------------------------------------


def make_model(folder: Path, family: str, size: str, parts: tuple[str, ...]) -> Path:
    """A pipeline folder of the published configs (`size` tiny: shrunk) with random-weight `parts`
    (bf16; fp32 when tiny), built on the GPU where there is one. The other parts have their config
    alone (what `cogtune train` reads of them); parts already built are kept."""
    import diffusers
    import torch
    import transformers

    from cogtune.families import ModelConfigs, published_folder

    published = published_folder(PUBLISHED[family])
    spec = ModelConfigs.load(PUBLISHED[family]).spec()

    def config(part: str) -> dict:
        values = json.loads((published / part / "config.json").read_text())
        return dict(values, **TINY_WIDTHS[spec.name][part]) if size == "tiny" else values

    if not (folder / "model_index.json").is_file():
        shutil.copytree(published / "scheduler", folder / "scheduler", dirs_exist_ok=True)
        for part in ("transformer", "vae", "text_encoder"):
            (folder / part).mkdir(parents=True, exist_ok=True)
            (folder / part / "config.json").write_text(json.dumps(config(part), indent=1))
        index = json.loads((published / "model_index.json").read_text())
        index["tokenizer"] = ["transformers", "T5TokenizerFast"]  # the tokenizer made here (no sentencepiece file)
        index = {part: value for part, value in index.items()  # (the parts made here, and the pipeline's settings)
                 if not isinstance(value, list) or part in ("transformer", "vae", "text_encoder", "tokenizer",
                                                            "scheduler")}
        (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if size == "tiny" else torch.bfloat16
    for part in parts:
        built, partial = folder / part / ".built", folder / f"{part}.partial"
        if built.is_file():
            continue
        shutil.rmtree(partial, ignore_errors=True)  # a build cut short is made again
        torch.manual_seed(0)
        if part == "tokenizer":
            from cogtune.dev.tiny import make_tokenizer

            make_tokenizer(spec.text_length if size != "tiny" else TINY_TEXT_LENGTH.get(spec.name, 512)
                           ).save_pretrained(partial)
        else:
            with device:
                if part in ("transformer", "vae"):  # the family's diffusers classes
                    cls = getattr(diffusers, spec.transformer_class if part == "transformer" else spec.vae_class)
                    model = cls.from_config(config(part))
                else:
                    cls = getattr(transformers, spec.text_encoder_class)
                    model = cls(cls.config_class(**{k: v for k, v in config(part).items() if k != "architectures"}))
            model.to(dtype).save_pretrained(partial)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()  # this process measures nothing: the GPU is the commands'
        (folder / part).mkdir(exist_ok=True)
        for path in partial.iterdir():
            path.replace(folder / part / path.name)
        partial.rmdir()
        built.touch()
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
    from cogtune.util.files import sha256_text

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
    channels, dtype = spec.latent_channels, schema.DTYPES[config.latent_dtype]  # as preprocess stores them
    shape = [channels, spec.latent_frames(frames), height // spec.vae_scale_spatial, width // spec.vae_scale_spatial]
    writer = CacheWriter(path, identity.manifest(), shard_size_mb=512)
    generator = torch.Generator().manual_seed(0)
    ids = []
    for i in range(clips):
        sha, caption = sha256_text(f"clip {i}"), f"a synthetic clip {i}"
        key = schema.video_key(sha)
        shard = writer.add_tensor(schema.video_tensor_key(key, "mean"), torch.randn(shape, generator=generator).to(dtype))
        writer.add_tensor(schema.video_tensor_key(key, "logvar"), torch.full(shape, -6.0).to(dtype))
        text_key = schema.caption_tensor_key(schema.caption_key(caption), "prompt_embeds")
        text_shard = writer.add_tensor(text_key, torch.randn(spec.text_length, spec.text_embed_dim,
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


# --- running a command ----------------------------------------------------------------------------


def train_flags(model: Path, precision: str, extra: list[str], steps: int) -> list[str]:
    """The flags of a training run that our trainer and the reference share, name and meaning."""
    return ["--pretrained_model_name_or_path", str(model), "--train_batch_size", "1", "--rank", "64",
            "--lora_alpha", "64", "--mixed_precision", precision, "--max_train_steps", str(steps),
            "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--optimizer", "adamw",
            "--checkpointing_steps", "1000000", "--dataloader_num_workers", "0", "--seed", "0", *extra]


def run_logged(command: list[str], log: Path, timeout: float, env: dict | None = None) -> int:
    """Run a Python command with its output in `log`; its exit status."""
    environment = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
                       **(env or {}))
    with open(log, "w") as out:
        return subprocess.run([sys.executable, *command], stdout=out, stderr=subprocess.STDOUT, env=environment,
                              timeout=timeout).returncode


def failure(log: Path, status: int) -> str:
    """What a failed command's row says: its status and the last line of its log that says something."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return f"exit {status}: {lines[-1][:200] if lines else 'no output'} (log: {log})"


def measured_rows(part: str, settings: list, budget: Budget, measure) -> list[dict]:
    """measure(setting) -> row for each setting, while the part's budget lasts; every row is
    printed as it comes. A command over its time, or not started for lack of it, leaves a row that
    says so."""
    rows = []
    for setting in settings:
        row = {"part": part, "setting": setting[0]}
        try:
            row.update(measure(setting, budget.timeout()))
        except OutOfTime as e:
            row["error"] = str(e)
        except subprocess.TimeoutExpired as e:
            row["error"] = f"stopped at the end of the part's budget ({e.timeout:.0f} s left for it)"
        rows.append(row)
        print_row(row)
    return rows


def json_lines(log: Path) -> list[dict]:
    records = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


# --- the parts -----------------------------------------------------------------------------------


def part_parity(args, work: Path, budget: Budget) -> list[dict]:
    """The first step's loss of the same tiny run on the CPU and on the device."""
    model = make_model(work / "model-tiny-2b", "2b", "tiny", TRAINING_PARTS)
    cache = make_cache(model, work / "cache-tiny-2b", SETTINGS["tiny"][0][2])

    def measure(setting, timeout):
        losses = {}
        for device in dict.fromkeys(["cpu", args.device]):
            out = work / f"parity-{device}"
            env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
            precision = "bf16" if device == "cuda" else "no"
            # One step: its loss depends only on the base weights, batch, noise and timesteps (drawn on
            # the CPU), since LoRA's B starts at zero; a second step would also depend on A's
            # initialisation, which is drawn on the device.
            log = work / f"parity-{device}.log"
            status = run_logged(["-m", "cogtune.cli", "train", *train_flags(model, precision, [], 1), "--data_cache",
                                 str(cache), "--output_dir", str(out)], log, budget.timeout(), env)
            if status != 0:
                return {"error": failure(log, status)}
            losses[device] = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
        cpu, other = losses["cpu"], losses[args.device]
        tolerance = 2e-2 if args.device == "cuda" else 0.0  # bf16 on the GPU; the same arithmetic on the CPU
        worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(cpu, other))
        return {"device": args.device, "cpu_losses": cpu, "device_losses": other, "worst_relative_difference": worst,
                "tolerance": tolerance, "ok": worst <= tolerance}

    return measured_rows("parity", [("a training step's loss",)], budget, measure)


def part_train(args, work: Path, budget: Budget) -> list[dict]:
    def measure(setting, timeout):
        label, family, size, precision, extra = setting
        number = SETTINGS[args.size].index(setting)
        model = make_model(work / f"model-{args.size}-{family}", family, args.size, TRAINING_PARTS)
        cache = make_cache(model, work / f"cache-{args.size}-{family}", size)
        out, log = work / f"train-{number}", work / f"train-{number}.log"
        shutil.rmtree(out, ignore_errors=True)
        row = {"family": family, "size": "x".join(map(str, size)), "precision": precision}
        if "--context_parallel_degree" in extra:  # several GPUs split a sample: one GPU prints its estimate only
            return dict(row, estimate_gib=dry_run_gib(model, cache, precision, extra), median_step_seconds=None,
                        peak_allocated_mib=None, peak_reserved_mib=None, tflops=None, mfu=None,
                        note="context parallelism needs several GPUs: the --dry_run estimate per GPU only")
        started = time.perf_counter()
        status = run_logged(["-m", "cogtune.cli", "train", *train_flags(model, precision, extra, args.steps),
                             "--data_cache", str(cache), "--output_dir", str(out)], log, budget.timeout())
        if status != 0:
            return dict(row, error=failure(log, status))
        records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        times = [r["step_seconds"] for r in records[args.warmup:]] or [records[-1]["step_seconds"]]
        row.update(median_step_seconds=statistics.median(times),
                   peak_allocated_mib=max(r["peak_memory_mib"] for r in records),
                   peak_reserved_mib=max((r.get("peak_reserved_mib") or 0) for r in records) or None,
                   skipped_steps=sum(r.get("loss") is None for r in records),
                   estimate_gib=dry_run_gib(model, cache, precision, extra), seconds=round(time.perf_counter() - started, 1))
        row["tflops"] = step_flops(model, size) / row["median_step_seconds"] / 1e12
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name()), None)
        row["mfu"] = row["tflops"] / peak if peak and args.device == "cuda" else None
        if args.device == "cuda":  # (on a CPU the peak is the whole process's RSS, not comparable)
            row["measured_vs_estimate"] = row["peak_allocated_mib"] / (row["estimate_gib"] * 1024)
        return row

    return measured_rows("train", SETTINGS[args.size], budget, measure)


def part_reference(args, work: Path, budget: Budget) -> list[dict]:
    settings = [s for s in SETTINGS[args.size] if s[0] in REFERENCE_SETTINGS[args.size]]
    settings.sort(key=lambda s: REFERENCE_SETTINGS[args.size].index(s[0]))
    script = args.reference / REFERENCE_SCRIPT if args.reference else None
    missing = reference_missing(script)
    if missing:
        return measured_rows("reference", settings, budget, lambda setting, timeout: {"error": f"not run: {missing}"})
    model = make_model(work / f"model-{args.size}-2b", "2b", args.size, ALL_PARTS)
    count, (_, height, width) = 1, SOURCE_CLIPS[args.size][1]
    data = make_clips(work / f"clips-{args.size}-reference", count, (settings[0][2][0], height, width), 8)

    def measure(setting, timeout):
        label, family, (frames, height, width), precision, extra = setting
        number = REFERENCE_SETTINGS[args.size].index(label)
        record_path, log = work / f"reference-{number}.json", work / f"reference-{number}.log"
        record_path.unlink(missing_ok=True)
        status = run_logged([str(HERE / "timed.py"), str(record_path), str(script),
                             *train_flags(model, precision, extra, args.steps), "--instance_data_root", str(data),
                             "--caption_column", "prompts.txt", "--video_column", "videos.txt", "--height",
                             str(height), "--width", str(width), "--fps", "8", "--max_num_frames", str(frames),
                             "--enable_tiling", "--enable_slicing", "--output_dir", str(work / f"reference-{number}")],
                            log, timeout)
        if status != 0:
            return {"error": failure(log, status)}
        record = json.loads(record_path.read_text())
        times = record["step_times"]
        intervals = [b - a for a, b in zip(times[args.warmup:], times[args.warmup + 1:])]
        return {"trainer": "diffusers", "median_step_seconds": statistics.median(intervals) if intervals else None,
                "training_peak_allocated_mib": _mib(record.get("cuda_training_peak_allocated")),
                "training_peak_reserved_mib": _mib(record.get("cuda_training_peak_reserved")),
                "run_peak_allocated_mib": _mib(record.get("cuda_max_memory_allocated")),
                "peak_rss_mib": _mib(record["peak_rss_bytes"]), "clips": count}

    return measured_rows("reference", settings, budget, measure)


def reference_missing(script: Path | None) -> str | None:
    """Why the reference cannot run here, or None."""
    import importlib.util

    if script is None:
        return ("no reference script (give --reference, a diffusers checkout, or make gpu-wheels "
                "REFERENCE=~/src/diffusers, which copies it into bench/wheels/reference)")
    if not script.is_file():
        return f"{script} does not exist"
    absent = [name for name in ("diffusers", "decord") if importlib.util.find_spec(name) is None]
    if absent:
        return f"{' and '.join(absent)} cannot be imported (make gpu-wheels puts their wheels into bench/wheels)"
    return None


def part_preprocess(args, work: Path, budget: Budget) -> list[dict]:
    model = make_model(work / f"model-{args.size}-2b", "2b", args.size, ALL_PARTS)
    count, source = SOURCE_CLIPS[args.size]
    data = make_clips(work / f"clips-{args.size}", count, source, 8)
    frames, height, width = SETTINGS[args.size][0][2]
    precision = "bf16" if args.device == "cuda" else "no"

    def measure(setting, timeout):
        label, extra = setting
        number = VAE_OPTIONS.index(setting)
        cache_root, log = work / f"preprocess-{number}", work / f"preprocess-{number}.log"
        shutil.rmtree(cache_root, ignore_errors=True)  # a fresh cache: everything is encoded
        started = time.perf_counter()
        status = run_logged(["-m", "cogtune.cli", "preprocess", "--pretrained_model_name_or_path", str(model),
                             "--instance_data_root", str(data), "--caption_column", "prompts.txt", "--video_column",
                             "videos.txt", "--cache_root", str(cache_root), "--height", str(height), "--width",
                             str(width), "--max_num_frames", str(frames), "--mixed_precision", precision,
                             "--dataloader_num_workers", "2", "--log_format", "json", *extra], log, timeout)
        if status != 0:
            return {"error": failure(log, status)}
        result = next(r for r in json_lines(log) if r.get("event") == "result" and "stages" in r)
        captions, videos = result["stages"]["captions"], result["stages"]["videos"]
        return {"clips": count, "source": "x".join(map(str, source)), "size": f"{frames}x{height}x{width}",
                "t5_seconds": captions["seconds"], "t5_peak_mib": captions["peak_gpu_mib"],
                "vae_seconds": videos["seconds"], "clips_per_s": videos["items"] / videos["seconds"],
                "vae_peak_mib": videos["peak_gpu_mib"], "seconds": round(time.perf_counter() - started, 1)}

    return measured_rows("preprocess", VAE_OPTIONS, budget, measure)


def dry_run_gib(model: Path, cache: Path, precision: str, extra: list[str]) -> float:
    """The total that `cogtune train --dry_run` prints for the same flags (GiB), computed here by the
    same function (memory_estimate) for the cache's latent shape."""
    from cogtune.cache.reader import Cache
    from cogtune.config import load_config
    from cogtune.families import ModelConfigs
    from cogtune.train.memory import memory_estimate

    config = load_config("train", [*train_flags(model, precision, extra, 1), "--data_cache", str(cache)])
    shape = Cache.open(cache, for_training=True).samples.latent_shapes[0]
    return memory_estimate(config, ModelConfigs.of(config), list(shape)).total / 2**30


def step_flops(model: Path, size: tuple[int, int, int]) -> int:
    """Model FLOPs of one training step of the transformer (forward and backward), counted on the
    meta device (bench/run.py's count, for this size)."""
    frames, height, width = size
    return count_step_flops(model, Settings(frames=frames, height=height, width=width, rank=64, batch=1))


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


PARTS = {"parity": part_parity, "train": part_train, "reference": part_reference, "preprocess": part_preprocess}


# --- the report ----------------------------------------------------------------------------------


def print_row(row: dict) -> None:
    print(json.dumps(row), flush=True)


def _mib(value: float | None) -> float | None:
    return None if value is None else value / MIB


def _gib(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}" if value >= 0.1 else f"{value * 1024:.1f} MiB"


def _num(value, spec: str = ".0f") -> str:
    return "" if value is None else format(value, spec)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def report(results: dict, out: Path) -> None:
    """The Markdown tables and the JSON, rewritten after every part."""
    rows = results["rows"]
    memory = "torch.cuda.max_memory_allocated" if results["device"] == "cuda" else "peak RSS (the whole process)"
    lines = [f"# GPU check (`bench/gpu_check.py`): {results['device_name']}, size {results['size']}", "",
             f"torch {results['torch']}, measured {results['date']}, {results['seconds']:.0f} s in all. "
             f"Each command in its own process; peak memory is {memory}.", ""]
    ours = {r["setting"]: r for r in rows if r["part"] == "train" and "error" not in r}

    def part_rows(part):
        return [r for r in rows if r["part"] == part]

    if part_rows("train"):
        lines += ["## cogtune train", ""] + table(
            ["setting", "size", "median step (s)", "peak allocated (MiB)", "peak reserved (MiB)",
             "--dry_run estimate (GiB)", "measured / estimate", "TFLOP/s", "MFU"],
            [[r["setting"], r["error"]] + [""] * 7 if "error" in r else
             [r["setting"], r["size"], _num(r["median_step_seconds"], ".3f"), _num(r["peak_allocated_mib"]),
              _num(r["peak_reserved_mib"]), _gib(r["estimate_gib"]), _num(r.get("measured_vs_estimate"), ".2f"),
              _num(r["tflops"], ".3g"), _num(r["mfu"], ".1%")] for r in part_rows("train")])
        skipped = [r for r in part_rows("train") if r.get("skipped_steps")]
        lines += [f"\n{r['setting']}: {r['skipped_steps']} of {results['steps']} steps skipped (non-finite loss)"
                  for r in skipped]
        lines.append("")
    if part_rows("reference"):
        lines += ["## The diffusers reference script, same settings", ""] + table(
            ["setting", "median step (s)", "training peak allocated (MiB)", "whole run's peak (MiB)",
             "training peak reserved (MiB)", "cogtune's peak / the reference's", "cogtune's step / the reference's"],
            [[r["setting"], r["error"]] + [""] * 5 if "error" in r else
             [r["setting"], _num(r["median_step_seconds"], ".3f"), _num(r["training_peak_allocated_mib"]),
              _num(r["run_peak_allocated_mib"] or r["peak_rss_mib"]), _num(r["training_peak_reserved_mib"]),
              *ratios(ours.get(r["setting"]), r)] for r in part_rows("reference")])
        lines += ["", "The reference keeps T5 and the VAE on the GPU while it trains and encodes each step's prompt; "
                      "its training peak is that of the steps after the first, its whole run's peak includes "
                      "encoding the dataset with the VAE at its start.", ""]
    if part_rows("preprocess"):
        lines += ["## cogtune preprocess", ""] + table(
            ["VAE", "clips", "T5 stage (s)", "T5 peak (MiB)", "VAE stage (s)", "clips/s", "VAE peak (MiB)",
             "whole command (s)"],
            [[r["setting"], r["error"]] + [""] * 6 if "error" in r else
             [r["setting"], f"{r['clips']} of {r['source']} -> {r['size']}", f"{r['t5_seconds']:.1f}",
              _num(r["t5_peak_mib"]), f"{r['vae_seconds']:.1f}", f"{r['clips_per_s']:.3g}", _num(r["vae_peak_mib"]),
              f"{r['seconds']:.1f}"] for r in part_rows("preprocess")])
        lines += ["", "Each stage's time includes loading its model; the VAE stage's includes decoding "
                      "(DataLoader workers beside the GPU). A stage's peak is its own (reset at its start).", ""]
    for r in part_rows("parity"):
        verdict = "ok" if r.get("ok") else f"FAILED {r.get('error', '')}"
        lines += [f"Parity: a training step's loss on {r.get('device', results['device'])} vs the CPU: worst relative "
                  f"difference {r.get('worst_relative_difference', 'n/a')} (tolerance {r.get('tolerance')}): {verdict}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


def ratios(ours: dict | None, reference: dict) -> list[str]:
    """cogtune's peak memory and step time over the reference's, where both were measured."""
    if ours is None:
        return ["", ""]
    theirs = reference["training_peak_allocated_mib"] or reference["peak_rss_mib"]
    step = reference["median_step_seconds"]
    return [_num(ours["peak_allocated_mib"] / theirs, ".2f") if theirs else "",
            _num(ours["median_step_seconds"] / step, ".2f") if step else ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=sorted(SETTINGS), default="real")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--steps", type=int, default=5, help="Training steps per setting (the first --warmup untimed).")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget", type=float,
                        help="Seconds for the whole check, shared among the parts as PART_SECONDS shares them "
                             "(default: their sum, 7.7 minutes at the real size).")
    parser.add_argument("--reference", type=Path, help="A diffusers checkout (its examples/cogvideo script).")
    parser.add_argument("--peak_tflops", type=float, help="The chip's dense bf16 peak (default: from its name).")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "gpu-check")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu-check")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here; run with --device cpu --size tiny for the CPU check.")
    args.work.mkdir(parents=True, exist_ok=True)
    shares = {part: PART_SECONDS[args.size][part] for part in args.parts}
    scale = (args.budget or sum(shares.values())) / sum(shares.values())
    started = time.perf_counter()
    results = {"device": args.device, "device_name": device_name(), "size": args.size, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": args.steps, "warmup": args.warmup,
               "budgets": {part: seconds * scale for part, seconds in shares.items()}, "rows": [], "seconds": 0.0}
    for part in args.parts:
        print(f"# {part} (budget {shares[part] * scale:.0f} s)", flush=True)
        results["rows"] += PARTS[part](args, args.work, Budget(shares[part] * scale))
        results["seconds"] = time.perf_counter() - started
        report(results, args.out)
    print(f"wrote {args.out.with_suffix('.md')} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
