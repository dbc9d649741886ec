"""A pipeline's config files, read without instantiating (or downloading) weights, and the one place
that loads its parts' weights. Its model_index.json says which family reads it (the registry)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from cogtune.errors import CogtuneError, first_line
from cogtune.families.base import ModelFamily, config_hash, dtype_argument, weights_digest
from cogtune.families.registry import family_class, published_folder_name
from cogtune.util import hub

# The published pipelines whose config files ship with cogtune (config.json files only, no weights;
# see published/README.md): --dry_run, every check before weights are loaded and the naming of
# caches then need no network. Hub ids are matched without regard to case.
PUBLISHED_DIR = Path(__file__).resolve().parent.parent / "published"
FLAG = "--pretrained_model_name_or_path"
MODEL_INDEX = "model_index.json"


def published_folder(name: str) -> Path | None:
    """The shipped configs of a published hub id, or None."""
    folder = published_folder_name(name)
    return PUBLISHED_DIR / folder if folder else None


@dataclass(frozen=True)
class ModelConfigs:
    """The config files of a pipeline's parts (as its family declares them), and where they came from."""

    source: dict  # pretrained_model_name_or_path (absolute when local), revision, variant
    family_class: type[ModelFamily]
    configs: dict  # part -> its config
    cache_dir: str | None = None  # the Hugging Face cache (--cache_dir)

    @classmethod
    def load(cls, pretrained_model_name_or_path: str, revision: str | None = None, variant: str | None = None,
             cache_dir: str | None = None) -> "ModelConfigs":
        """Read the configs of a local pipeline folder, of a published hub id (shipped with cogtune,
        unless another --revision is asked for), or of another hub id (the Hugging Face cache first,
        then the hub, which fails within seconds when it cannot be reached)."""
        name = pretrained_model_name_or_path
        path = Path(name).expanduser()
        if path.exists():
            name, folder = str(path.resolve()), path.resolve()
        elif not hub.looks_like_hub_id(name) or path.parent.name and path.parent.is_dir():  # models/CogVideoX-5b
            raise CogtuneError(
                f"{FLAG} {name} does not exist. Give the folder of a diffusers pipeline (it holds model_index.json "
                "and a folder per part: transformer/, vae/, text_encoder/, scheduler/, ...), or a hub id such as "
                "THUDM/CogVideoX-5b.")
        else:
            folder = published_folder(name) if revision is None else None

        def read(filename: str) -> dict:
            if folder is None:
                return hub.read_json(name, filename, revision, cache_dir, FLAG)
            try:
                return json.loads((folder / filename).read_text())
            except FileNotFoundError:
                raise CogtuneError(f"{FLAG} {name} is not a diffusers pipeline folder: it has no {filename}.") from None
            except json.JSONDecodeError as e:
                raise CogtuneError(f"{folder / filename} is not valid JSON ({e}).") from None

        index = read(MODEL_INDEX)
        family = family_class(index.get("_class_name"), f"{FLAG} {name}")
        configs = {"model_index": index}
        for part, filename in family.config_files.items():
            if part in family.optional_parts and not (index.get(part) or [None])[0]:
                continue  # (a part the pipeline saved as [null, null], or does not have)
            configs[part] = read(f"{part}/{filename}")
        source = {"pretrained_model_name_or_path": name, "revision": revision, "variant": variant}
        return cls(source, family, configs, cache_dir=cache_dir)

    @classmethod
    def of(cls, config, image_to_video: bool = False) -> "ModelConfigs":
        """The configs of a stage's --pretrained_model_name_or_path, --revision, --variant and --cache_dir,
        as an image-to-video pipeline with --image_to_video (or image_to_video: a LoRA's record)."""
        models = cls.load(config.pretrained_model_name_or_path, config.revision, config.variant, config.cache_dir)
        return models.as_image_to_video() if image_to_video or config.image_to_video else models

    def as_image_to_video(self) -> "ModelConfigs":
        """The same model run by its family's image-to-video pipeline (a model that does both)."""
        configs = dict(self.configs, model_index=self.family_class.image_to_video_index(self.configs))
        return dataclasses.replace(self, configs=configs)

    def __getattr__(self, part: str) -> dict:
        """A part's config by its name (models.transformer, models.vae, ...)."""
        configs = self.__dict__.get("configs") or {}
        if part in configs:
            return configs[part]
        raise AttributeError(part)

    @property
    def location(self) -> str:
        return self.source["pretrained_model_name_or_path"]

    @property
    def on_hub(self) -> bool:
        return not Path(self.location).is_dir()

    def load_part(self, cls, subfolder: str | None, dtype=None, weights: bool = True, **kwargs):
        """`cls.from_pretrained` of one part (subfolder) or of the whole pipeline (None), from the
        same source as the configs. A hub that cannot be reached is not waited for: the part then
        comes from the Hugging Face cache, or the error says that it is not there."""
        if subfolder is not None:
            kwargs["subfolder"] = subfolder
        kwargs.update(revision=self.source["revision"], cache_dir=self.cache_dir)
        if weights and self.source["variant"]:
            kwargs["variant"] = self.source["variant"]
        if dtype is not None:
            kwargs.update(dtype_argument(cls, dtype))
        reason = None
        if self.on_hub and not hub.offline():
            reason = hub.unreachable_reason()
            if reason is not None:
                kwargs["local_files_only"] = True
        try:
            return cls.from_pretrained(self.location, **kwargs)
        except (OSError, ValueError) as e:
            what = f"the {subfolder} of {self.location}" if subfolder else f"the pipeline {self.location}"
            message = first_line(e) or type(e).__name__
            if reason is not None:
                raise CogtuneError(f"Cannot load {what}: " + hub.unreachable_message(what, reason)) from None
            raise CogtuneError(f"Cannot load {what} ({message}).") from None

    def identity(self) -> dict:
        """What the cache records about the model whose encoders made its tensors (a CacheModel)."""
        parts = tuple(part for part in self.family_class.encoded_parts if part in self.configs)
        return dict(self.source, family=self.family_class.name, description=self.spec().description,
                    components={part: config_hash(self.configs[part]) for part in parts},
                    weights_sha256=None if self.on_hub else weights_digest(Path(self.location), parts))

    def spec(self) -> ModelFamily:
        """The family of this pipeline, for its variant (its configs decide it)."""
        return self.family_class.from_configs(self.configs)
