"""Validation videos: the rows of a --validation_file, or the --validation_prompt prompts (and
--validation_images), read and checked. Preprocess encodes them into the cache, and training
generates from those encodings. `settings` is a stage config's ValidationArgs (and its model's
ignore_learned_positional_embeddings)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from cogtune.data.sources import read_rows
from cogtune.errors import CogtuneError
from cogtune.util.seeds import SEED_LIMIT


@dataclass(frozen=True)
class ValidationEntry:
    """One validation video: its prompt and (image-to-video) image, and where a validation file gives
    them, its size, seed and guidance (None: the training clips' size, --seed, --guidance_scale)."""

    prompt: str
    image: str | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    where: str | None = field(default=None, compare=False)  # its row of --validation_file, for messages


VALIDATION_FILE_COLUMNS = {"prompt": str, "image": str, "height": int, "width": int, "num_frames": int, "seed": int,
                           "guidance_scale": float}


def read_validation_file(path: Path) -> list[ValidationEntry]:
    """The rows of a --validation_file, checked: known columns, numbers of the right kind and rule,
    image paths relative to the file."""
    rows = read_rows(path, "--validation_file")
    unknown = sorted(set(rows[0] if rows else {}) - set(VALIDATION_FILE_COLUMNS))
    if unknown:
        raise CogtuneError(f"--validation_file {path}: unknown column(s) {', '.join(unknown)}; it takes "
                           f"{', '.join(VALIDATION_FILE_COLUMNS)}.")
    entries = []
    for number, row in enumerate(rows, start=2 if path.suffix.lower() == ".csv" else 1):
        where = f"--validation_file {path}, {'line' if path.suffix.lower() == '.jsonl' else 'row on line'} {number}"
        values = {}
        for name, kind in VALIDATION_FILE_COLUMNS.items():
            value = row.get(name)
            if value is None or value == "":
                continue
            try:
                if kind is int and (isinstance(value, float) and not value.is_integer() or isinstance(value, bool)):
                    raise ValueError
                values[name] = kind(value) if kind is not str else str(value).strip()
            except (TypeError, ValueError):
                raise CogtuneError(f"{where}: {name} must be {'a whole number' if kind is int else 'a number'}, "
                                   f"got {value!r}.") from None
        if not values.get("prompt"):
            raise CogtuneError(f"{where}: the prompt is empty.")
        for name in ("height", "width", "num_frames"):  # (the model's own rules: checked_validation_entries)
            if name in values and values[name] <= 0:
                raise CogtuneError(f"{where}: {name} {values[name]} is not positive.")
        if "seed" in values and not 0 <= values["seed"] < SEED_LIMIT:
            raise CogtuneError(f"{where}: seed {values['seed']} is out of range (0 to {SEED_LIMIT - 1}).")
        if "guidance_scale" in values and not 0 <= values["guidance_scale"] < float("inf"):
            raise CogtuneError(f"{where}: guidance_scale must be a finite number, 0 or more, got {values['guidance_scale']}.")
        if "image" in values:
            values["image"] = str(path.parent / values["image"])
        entries.append(ValidationEntry(**values, where=where))
    if not entries:
        raise CogtuneError(f"--validation_file {path} holds no rows.")
    return entries


def validation_entries(settings) -> list[ValidationEntry]:
    """The validation videos: the rows of --validation_file, or --validation_prompt's prompts (and images)."""
    if settings.validation_file:
        if settings.validation_prompt or settings.validation_images:
            raise CogtuneError("Give either --validation_file or --validation_prompt (and --validation_images), "
                               "not both.")
        return read_validation_file(Path(settings.validation_file))
    return [ValidationEntry(prompt, image) for prompt, image in _flag_pairs(settings)]

def _flag_pairs(settings) -> list[tuple[str, str | None]]:
    """The (prompt, image or None) pairs of --validation_prompt and --validation_images."""
    if not settings.validation_prompt:
        return []
    separator = settings.validation_prompt_separator
    prompts = [p.strip() for p in settings.validation_prompt.split(separator)]
    images = [i.strip() for i in settings.validation_images.split(separator)] if settings.validation_images else []
    if images and len(images) != len(prompts):
        raise CogtuneError(
            f"--validation_images names {len(images)} image(s) for {len(prompts)} --validation_prompt prompt(s); "
            f"give one image per prompt, separated by {separator!r}.")
    if any(not p for p in prompts):
        raise CogtuneError(f"--validation_prompt holds an empty prompt (check the {separator!r} separators).")
    return list(zip(prompts, images or [None] * len(prompts)))

def checked_validation_entries(settings, spec, clip_size: tuple[int, int, int]) -> list[ValidationEntry]:
    """The validation videos, checked against the model (its family) and the file system, each with
    its size (clip_size, (frames, height, width), where it gives none)."""
    entries = validation_entries(settings)
    images = [entry.image for entry in entries if entry.image]
    if images and not spec.image_conditioned:
        raise CogtuneError(f"--validation_images (or an image column) is for image-to-video models; this {spec.description} model "
                           "generates from text alone. Leave it out.")
    if spec.image_conditioned and len(images) < len(entries):
        raise CogtuneError(f"This {spec.description} model animates an image: give one --validation_images entry "
                           "per --validation_prompt.")
    for image in images:
        if not Path(image).is_file():
            raise CogtuneError(f"--validation_images: {image} does not exist.")
    sized = []
    for entry in entries:
        frames, height, width = (entry.num_frames or clip_size[0], entry.height or clip_size[1],
                                 entry.width or clip_size[2])
        if entry.where:  # a row of --validation_file: the model's rules, naming the row
            spec.check_frames(frames, f"{entry.where}: num_frames")
            spec.check_size(height, width, f"{entry.where}: ", ("height", "width"))
        spec.check_clip_size(frames, height, width, settings.ignore_learned_positional_embeddings)
        sized.append(dataclasses.replace(entry, num_frames=frames, height=height, width=width))
    return sized
