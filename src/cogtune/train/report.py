"""Around a training run: tracker logging, the loss curve, the model card and the hub upload."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cogtune import data_schema as schema
from cogtune.errors import CogtuneError
from cogtune.train.log import TRAIN_LOG_NAME, read_log
from cogtune.train.lora import LORA_INFO_NAME, LORA_WEIGHT_NAME
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


def write_loss_curve(log_path: Path, png_path: Path | None = None) -> Path | None:
    """A PNG of the loss per step (and its running mean) and the learning rate, from train_log.jsonl,
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
    window = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    axis.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="loss")
    axis.plot(steps[window - 1:], smooth, color="tab:blue", linewidth=1.8, label=f"running mean ({window} steps)")
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


def card_data(models, spec, manifest: schema.Manifest, rounds: list, output_dir: Path) -> dict:
    """The YAML header of the model card."""
    base = models.source["pretrained_model_name_or_path"]
    kind = "image-to-video" if spec.image_conditioned else "text-to-video"
    data = {"library_name": "diffusers", "license": "other",
            "tags": [kind, "diffusers-training", "diffusers", "lora", "cogvideox", "cogvideox-diffusers",
                     "template:sd-lora", "cogtune"]}
    if not Path(base).exists():  # a hub id; the hub refuses a local path here
        data["base_model"] = base
    id_token = manifest.dataset.id_token
    if id_token:
        data["instance_prompt"] = id_token
    last = last_round(rounds)
    if last is not None:
        data["widget"] = [{"text": prompt, "output": {"url": _relative(path, output_dir)}} for prompt, path in last.videos]
    return data


def model_card(config, models, spec, manifest: schema.Manifest, rounds: list, steps: int, output_dir: Path) -> str:
    """The model card (README.md) of a trained LoRA: YAML header, settings, samples, how to load it."""
    import yaml

    data = card_data(models, spec, manifest, rounds, output_dir)
    last = last_round(rounds)
    base = models.source["pretrained_model_name_or_path"]
    settings = manifest.settings
    image = spec.image_conditioned
    pipeline_class = spec.pipeline_class_name
    repo = config.hub_model_id or output_dir.name
    id_token = data.get("instance_prompt")
    prompt = last.videos[0][0] if last is not None else f"{id_token or ''} a video".strip()
    rows = [
        ("Base model", f"`{base}`" + (" (a local folder)" if "base_model" not in data else "")),
        ("Model family", spec.description),
        ("Identifier token", f"`{id_token}`" if id_token else "none"),
        ("LoRA rank / alpha", f"{config.rank} / {config.lora_alpha:g}"),
        ("Target modules", ", ".join(target_modules(config))
         + (f" (preset {config.lora_target_preset})" if config.lora_target_preset else "")),
        ("LoRA variant", "DoRA" if config.use_dora and not config.use_rslora else "DoRA, rsLoRA" if config.use_dora
         else "rsLoRA (alpha / sqrt(rank); diffusers 0.35 and newer read this from the file)" if config.use_rslora
         else "LoRA"),
        ("Steps", str(steps)),
        ("Learning rate", f"{config.learning_rate:g} ({config.lr_scheduler}, {config.lr_warmup_steps} warm-up steps)"),
        ("Optimizer", config.optimizer + (" (8-bit)" if config.use_8bit_adam else "")),
        ("Batch size x accumulation", f"{config.train_batch_size} x {config.gradient_accumulation_steps}"),
        ("Mixed precision", config.mixed_precision),
        ("Clips", f"{settings.max_num_frames} frames of {settings.height}x{settings.width} at {settings.fps} fps"
                  + (f", buckets {', '.join(settings.buckets)}" if settings.buckets else "")),
        ("Seed", str(config.seed)),
    ]
    lines = ["---", yaml.safe_dump(data, sort_keys=False).strip(), "---", "",
             f"# {repo}: a CogVideoX LoRA", "",
             f"A LoRA for [{base}](https://huggingface.co/{base})" if "base_model" in data else
             f"A LoRA for the CogVideoX model in `{base}`",
             f"({spec.description}), trained with cogtune from precomputed latents.", "",
             "## Training settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "## Validation samples", ""]
    if last is None:
        lines += ["No validation prompts were given (`--validation_prompt`)."]
    else:
        lines += [f"Generated at step {last.step} with guidance scale {config.guidance_scale:g}"
                  + (" (dynamic CFG)" if config.use_dynamic_cfg else "")
                  + f", {config.validation_num_inference_steps} steps:", ""]
        lines += [f"- [{p}]({_relative(path, output_dir)})" for p, path in last.videos]
        lines += ["", f"![validation frames]({_relative(last.contact_sheet, output_dir)})"]
    if (output_dir / LOSS_CURVE_NAME).is_file():
        lines += ["", "## Loss", "", f"![loss curve]({LOSS_CURVE_NAME})"]
    image_lines = ['image = load_image("first_frame.png")', ""] if image else []
    call_image = "image=image, " if image else ""
    lines += [
        "", "## Use it with diffusers", "", "```python", "import torch",
        f"from diffusers import {pipeline_class}",
        "from diffusers.utils import export_to_video" + (", load_image" if image else ""), "",
        f'pipe = {pipeline_class}.from_pretrained("{base}", dtype=torch.bfloat16).to("cuda")',
        f'pipe.load_lora_weights("{repo}", weight_name="pytorch_lora_weights.safetensors", adapter_name="cogtune")',
        'pipe.set_adapters(["cogtune"], [1.0])  # the file stores its alpha: 1.0 is the trained strength',
        *image_lines,
        f"video = pipe({call_image}prompt={prompt!r}, guidance_scale={config.guidance_scale:g}, "
        f"use_dynamic_cfg={config.use_dynamic_cfg}).frames[0]",
        f'export_to_video(video, "output.mp4", fps={settings.fps})', "```", "",
        f"Diffusers versions that ignore the stored alpha need `pipe.set_adapters([\"cogtune\"], "
        f"[{config.lora_alpha:g} / {config.rank}])` instead. With cogtune: `cogtune infer --lora {repo} "
        f"--pretrained_model_name_or_path {base} --prompt \"...\"`.", "",
        "## License", "", "The LoRA follows the license of its base model.", "",
    ]
    return "\n".join(lines)


def write_model_card(output_dir: Path, config, models, spec, manifest: schema.Manifest, rounds: list, steps: int) -> Path:
    path = output_dir / MODEL_CARD_NAME
    text = model_card(config, models, spec, manifest, rounds, steps, output_dir)
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
