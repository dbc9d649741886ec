"""Around a training run: tracker logging, the loss curve, the model card and the hub upload."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cogtune import data_schema as schema
from cogtune.config.training import LoraArgs
from cogtune.errors import CogtuneError
from cogtune.train.log import TRAIN_LOG_NAME, read_log
from cogtune.train.lora import EMA_WEIGHT_NAME, LORA_INFO_NAME, LORA_WEIGHT_NAME
from cogtune.train.model import target_modules
from cogtune.util import files, logs
from cogtune.util.rss import peak_rss_bytes

LOSS_CURVE_NAME = "loss_curve.png"
MODEL_CARD_NAME = "README.md"
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def peak_memory_mib(device) -> float:
    """Peak memory so far: torch.cuda.max_memory_allocated on a GPU, the process's peak RSS on a CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_bytes() / 2**20


def peak_reserved_mib(device) -> float | None:
    """torch.cuda.max_memory_reserved on a GPU (what the allocator held), None elsewhere."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**20
    return None


def check_trackers(report_to: str) -> None:
    """Name the missing package before any model is loaded."""
    import importlib.util

    wanted = list(TRACKER_PACKAGES) if report_to == "all" else [report_to] if report_to != "none" else []
    missing = [name for name in wanted if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None]
    if missing:
        raise CogtuneError(f"--report_to {report_to} needs the {' and '.join(missing)} package(s): "
                           f"pip install {' '.join(missing)} (or pip install 'cogtune[tracking]').")


def log_validation(accelerator, done) -> None:
    """A validation round to the trackers: the contact sheet as an image (tensorboard), the mp4s as
    videos (wandb)."""
    from PIL import Image

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            sheet = np.asarray(Image.open(done.contact_sheet).convert("RGB"))
            tracker.writer.add_image("validation/contact_sheet", sheet, done.step, dataformats="HWC")
            for index, frames in enumerate(done.frames):
                _add_gif(tracker.writer, f"validation/video_{index}", frames, done.fps, done.step)
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Video(str(path), caption=prompt, format="mp4")
                                        for prompt, path in done.videos]}, step=done.step)


def gif_bytes(frames: np.ndarray, fps: int) -> bytes:
    """[F, H, W, 3] uint8 frames as an endlessly looping animated GIF."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return buffer.getvalue()


def _add_gif(writer, tag: str, frames: np.ndarray, fps: int, step: int) -> None:
    """A video in tensorboard's image panel, as SummaryWriter.add_video writes it (an animated GIF),
    without add_video's moviepy dependency."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    height, width = frames.shape[1:3]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif_bytes(frames, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


# --- the loss curve -----------------------------------------------------------------------------


def smoothing_weight(steps: int) -> float:
    """TensorBoard's default 0.6 for a short run, more for a long one (about 20 steps' memory)."""
    return min(0.98, max(0.6, 1 - 20 / max(steps, 1)))


def smoothed(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average, debiased so that the first points are
    not pulled towards 0 (last = weight * last + (1 - weight) * value, divided by 1 - weight^n)."""
    out, last = np.empty(len(values)), 0.0
    for number, value in enumerate(values, start=1):
        last = last * weight + (1 - weight) * value
        out[number - 1] = last / (1 - weight ** number)
    return out


def write_loss_curve(log_path: Path, png_path: Path | None = None) -> Path | None:
    """A PNG of the loss per step (and its smoothed trend, as TensorBoard smooths) and the learning rate, from train_log.jsonl,
    so that a resumed run's curve covers the whole run. None when no step has a loss yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_log(log_path) if r.get("loss") is not None]
    if not records:
        return None
    png_path = png_path or log_path.parent / LOSS_CURVE_NAME
    steps = np.array([r["step"] for r in records])
    losses = np.array([r["loss"] for r in records], dtype=float)
    weight = smoothing_weight(len(losses))
    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    axis.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="loss (each step's timestep differs)")
    axis.plot(steps, smoothed(losses, weight), color="tab:blue", linewidth=1.8,
              label=f"smoothed (TensorBoard's moving average, weight {weight:.2f})")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3)
    lr_axis = axis.twinx()
    lr_axis.plot(steps, [r["lr"] for r in records], color="tab:gray", linestyle="--", linewidth=1, label="lr")
    lr_axis.set_ylabel("learning rate")
    lines = axis.get_legend_handles_labels()[0] + lr_axis.get_legend_handles_labels()[0]
    axis.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize=8)
    axis.set_title(f"{log_path.parent.name}: {len(records)} steps, last loss {losses[-1]:.4f}")
    figure.tight_layout()
    files.atomic_write(png_path, lambda temp: figure.savefig(temp, format="png"))
    plt.close(figure)
    return png_path


def write_loss_curve_quietly(log_path: Path) -> None:
    """The loss curve, if it can be drawn: a plotting problem never costs a finished run."""
    try:
        write_loss_curve(log_path)
    except Exception as e:  # matplotlib and file-system errors alike
        logs.message(f"warning: could not draw the loss curve of {log_path}: {e}")


# --- the model card and the hub -----------------------------------------------------------------


def _relative(path: Path, root: Path) -> str:
    return Path(path).resolve().relative_to(root.resolve()).as_posix()


def last_round(rounds: list):
    """The last validation round that made videos (a process other than the main one knows none)."""
    return next((r for r in reversed(rounds) if r.videos), None)


def card_data(models, spec, manifest: schema.Manifest, rounds: list, output_dir: Path):
    """The YAML header of the model card, as huggingface_hub's ModelCardData."""
    from huggingface_hub import ModelCardData

    base = models.source["pretrained_model_name_or_path"]
    kind = "image-to-video" if spec.image_conditioned else "text-to-video"
    fields = {"library_name": "diffusers", "license": "other",
              "tags": [kind, "diffusers-training", "diffusers", "lora", *spec.card_tags, "template:sd-lora", "cogtune"]}
    if not Path(base).exists():  # a hub id; the hub refuses a local path here
        fields["base_model"] = base
    if manifest.dataset.id_token:
        fields["instance_prompt"] = manifest.dataset.id_token
    last = last_round(rounds)
    if last is not None:
        fields["widget"] = [{"text": prompt, "output": {"url": _relative(path, output_dir)}}
                            for prompt, path in last.videos]
    return ModelCardData(**fields)


def lora_variant(config: LoraArgs) -> str:
    if config.use_dora:
        return "DoRA" + (", rsLoRA" if config.use_rslora else "")
    return "rsLoRA (alpha / sqrt(rank); diffusers 0.35 and newer read this from the file)" if config.use_rslora \
        else "LoRA"


def training_rows(config, settings, dataset_repeats: list[int] | None, spec) -> list[tuple[str, str]]:
    """Every option that shapes the LoRA, as the card's table shows it."""
    sampling = {"uniform": "uniform (the reference)",
                "logit_normal": f"logit-normal (mean {config.logit_mean:g}, std {config.logit_std:g})",
                "mode": f"mode (scale {config.mode_scale:g})"}[config.timestep_sampling]
    rows = [
        ("LoRA rank / alpha", f"{config.rank} / {config.lora_alpha:g}"),
        ("Target modules", ", ".join(target_modules(config, spec))
         + (f" (preset {config.lora_target_preset})" if config.lora_target_preset else "")),
        ("LoRA variant", lora_variant(config)),
        ("Started from", f"`{config.init_lora}`" if config.init_lora else "a new LoRA"),
        ("Learning rate", f"{config.learning_rate:g} ({config.lr_scheduler}, {config.lr_warmup_steps} warm-up steps)"),
        ("Optimizer", config.optimizer + (" (8-bit)" if config.use_8bit_adam else "")),
        ("Batch size x accumulation", f"{config.train_batch_size} x {config.gradient_accumulation_steps}"),
        ("Mixed precision", config.mixed_precision),
        ("Timestep sampling", sampling + (f", min-SNR gamma {config.snr_gamma:g}" if config.snr_gamma else "")),
        ("Caption dropout", f"{config.caption_dropout_p:g} ({config.caption_dropout_technique})"
         if config.caption_dropout_p else "none"),
        ("EMA", f"decay {config.ema_decay:g}, saved as `{EMA_WEIGHT_NAME}`"
         + (" (the validation videos use it)" if config.ema_validation else "") if config.use_ema else "none"),
        ("Clips", f"{settings.max_num_frames} frames of {settings.height}x{settings.width} at {settings.fps} fps"
                  + (f", buckets {', '.join(settings.buckets)}" if settings.buckets else "")),
        ("Frame extraction", settings.frame_extraction or "head (the first frames at the clips' fps)"),
        ("Dataset repeats", ", ".join(map(str, dataset_repeats)) if dataset_repeats else "1"),
        ("Seed", str(config.seed)),
    ]
    if spec.image_conditioned:
        rows.append(("Noised image dropout", f"{config.noised_image_dropout:g}"))
    return rows


def model_card(config, models, spec, manifest: schema.Manifest, rounds: list, steps: int, output_dir: Path,
               dataset_repeats: list[int] | None = None) -> str:
    """The model card (README.md) of a trained LoRA: YAML header, settings, samples, how to load it."""
    data = card_data(models, spec, manifest, rounds, output_dir)
    last = last_round(rounds)
    base = models.source["pretrained_model_name_or_path"]
    settings = manifest.settings
    image = spec.image_conditioned
    pipeline_class = spec.pipeline_class_name
    repo = config.hub_model_id or output_dir.name
    id_token = manifest.dataset.id_token
    on_hub = data.base_model is not None
    prompt = last.videos[0][0] if last is not None else f"{id_token or ''} a video".strip()
    rows = [("Base model", f"`{base}`" + ("" if on_hub else " (a local folder)")), ("Model family", spec.description),
            ("Identifier token", f"`{id_token}`" if id_token else "none"), ("Steps", str(steps)),
            *training_rows(config, settings, dataset_repeats, spec)]
    lines = ["---", data.to_yaml(), "---", "",
             f"# {repo}: a {spec.name} LoRA", "",
             f"A LoRA for [{base}](https://huggingface.co/{base})" if on_hub else
             f"A LoRA for the {spec.name} model in `{base}`",
             f"({spec.description}), trained with cogtune from precomputed latents. `cogtune_lora.json` beside it "
             "records every setting of the run.", "",
             "## Training settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "## Validation samples", ""]
    if last is None:
        lines += ["No validation prompts were given (`--validation_prompt`)."]
    else:
        lines += [f"Generated at step {last.step}, {config.validation_num_inference_steps} steps"
                  + (", dynamic CFG" if config.use_dynamic_cfg else "")
                  + (", with the EMA weights" if config.ema_validation else "") + ":", ""]
        details = last.settings or [{}] * len(last.videos)
        lines += [f"- [{p}]({_relative(path, output_dir)})" + (
            f": seed {d['seed']}, guidance scale {d['guidance_scale']:g}, {d['num_frames']} frames of "
            f"{d['height']}x{d['width']}" if d else "") for (p, path), d in zip(last.videos, details)]
        lines += ["", f"![validation frames]({_relative(last.contact_sheet, output_dir)})"]
    if (output_dir / LOSS_CURVE_NAME).is_file():
        lines += ["", "## Loss", "", f"![loss curve]({LOSS_CURVE_NAME})"]
    image_lines = ['image = load_image("first_frame.png")', ""] if image else []
    call_image = "image=image, " if image else ""
    dtype = {"fp16": "float16", "bf16": "bfloat16"}[spec.recommended_precision]
    first = last.settings[0] if last is not None and last.settings else {}
    guidance = first.get("guidance_scale", config.guidance_scale)
    ema_lines = ([f"# the EMA of the weights instead: weight_name=\"{EMA_WEIGHT_NAME}\""] if config.use_ema else [])
    lines += [
        "", "## Use it with diffusers", "", "```python", "import diffusers", "import torch",
        "from packaging.version import Version",
        f"from diffusers import {pipeline_class}",
        "from diffusers.utils import export_to_video" + (", load_image" if image else ""), "",
        "# diffusers 0.40 renamed from_pretrained's torch_dtype to dtype (older releases ignore dtype)",
        'dtype_name = "dtype" if Version(diffusers.__version__) >= Version("0.40") else "torch_dtype"',
        f'pipe = {pipeline_class}.from_pretrained("{base}", **{{dtype_name: torch.{dtype}}}).to("cuda")',
        f'pipe.load_lora_weights("{repo}", weight_name="{LORA_WEIGHT_NAME}", adapter_name="cogtune"'
        + "".join(f", {key}={value!r}" for key, value in spec.lora_load_arguments({"expert": config.expert}).items())
        + ")",
        *ema_lines,
        'pipe.set_adapters(["cogtune"], [1.0])  # the file stores its alpha: 1.0 is the trained strength',
        *image_lines,
        f"video = pipe({call_image}prompt={prompt!r}, guidance_scale={guidance:g}, "
        f"{spec.card_call_arguments(config.use_dynamic_cfg)}generator=torch.Generator().manual_seed({first.get('seed', config.seed)})"
        ").frames[0]",
        f'export_to_video(video, "output.mp4", fps={settings.fps})', "```", "",
        f"Diffusers versions that ignore the stored alpha need `pipe.set_adapters([\"cogtune\"], "
        f"[{config.lora_alpha:g} / {config.rank}])` instead"
        + (f" (rsLoRA: `[{config.lora_alpha:g} / {config.rank} ** 0.5]`)" if config.use_rslora else "")
        + f". With cogtune: `cogtune infer --lora {repo} --prompt \"...\"` (the base model comes from "
        "cogtune_lora.json).", "",
        "## License", "", "The LoRA follows the license of its base model.", "",
    ]
    return "\n".join(lines)


def write_model_card(output_dir: Path, config, models, spec, manifest: schema.Manifest, rounds: list, steps: int,
                     dataset_repeats: list[int] | None = None) -> Path:
    path = output_dir / MODEL_CARD_NAME
    text = model_card(config, models, spec, manifest, rounds, steps, output_dir, dataset_repeats)
    files.atomic_write(path, lambda temp: Path(temp).write_text(text))
    return path


def check_hub_token(token: str | None) -> None:
    from huggingface_hub import get_token

    if not (token or get_token()):
        raise CogtuneError("--push_to_hub needs a Hugging Face token: pass --hub_token, set HF_TOKEN, or run "
                           "`hf auth login` first. Nothing has been trained yet.")


def upload_patterns(rounds: list) -> list[str]:
    """What goes to the hub: the LoRA, its card, facts, log and curve, and the last validation round."""
    patterns = [MODEL_CARD_NAME, LORA_WEIGHT_NAME, LORA_INFO_NAME, TRAIN_LOG_NAME, LOSS_CURVE_NAME]
    last = last_round(rounds)
    if last is not None:
        patterns.append(f"{last.folder.parent.name}/{last.folder.name}/*")
    return patterns


def push_to_hub(output_dir: Path, config, rounds: list) -> str:
    """Create (or reuse) the hub repository and upload the LoRA with its model card; returns its URL."""
    from huggingface_hub import create_repo, upload_folder

    token = config.hub_token or os.environ.get("HF_TOKEN")
    repo_id = create_repo(config.hub_model_id or output_dir.resolve().name, exist_ok=True, token=token).repo_id
    upload_folder(repo_id=repo_id, folder_path=str(output_dir), allow_patterns=upload_patterns(rounds), token=token,
                  commit_message="cogtune LoRA")
    return f"https://huggingface.co/{repo_id}"
