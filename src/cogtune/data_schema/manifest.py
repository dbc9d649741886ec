"""manifest.json: the model (its family and encoders), the dataset and every setting that shaped the
tensors, and the tensor set; caches of format version 5 read as version 6."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cogtune.data_schema.layout import FORMAT_VERSION, LEGACY_IMAGE_TENSORS, LEGACY_TENSORS, LEGACY_VERSION, TensorSet
from cogtune.errors import CogtuneError


@dataclass(frozen=True)
class CacheModel:
    """The model whose encoders made a cache's tensors."""

    pretrained_model_name_or_path: str
    revision: str | None
    variant: str | None
    family: str  # the family's name in the registry ("CogVideoX")
    description: str  # the variant, as the family describes it
    components: dict  # each encoder that made tensors (part name) -> the sha256 of its config
    # A digest of the encoders' weight files (names, sizes and sampled bytes) for a local
    # pipeline folder; None for a hub id (its id and revision name the weights) and in caches
    # written before it was kept. Not part of the cache's name: a cache written with other weights
    # under the same name is refused by the writer and by training instead (WEIGHTS_DIGEST).
    weights_sha256: str | None = None


WEIGHTS_DIGEST = "weights_sha256"


@dataclass(frozen=True)
class CacheDataset:
    """Where a cache's records come from and how their captions are formed."""

    instance_data_root: str | None
    dataset_name: str | None
    dataset_config_name: str | None
    caption_column: str | None
    video_column: str | None
    id_token: str | None
    datasets: list | None = None  # [[datasets]]: each one's settings as above (repeats aside); else not recorded


@dataclass(frozen=True)
class CacheSettings:
    """Every setting that shaped a cache's tensors."""

    height: int
    width: int
    fps: int
    max_num_frames: int
    skip_frames_start: int
    skip_frames_end: int
    video_reshape_mode: str
    latent_dtype: str
    mixed_precision: str
    enable_tiling: bool
    buckets: list[str] | None  # FRAMESxHEIGHTxWIDTH names, or None: one size
    text_length: int  # tokens of every caption's stored embedding
    image_noise_variants: int  # first-frame encodings per video: 0 for text-to-video
    seed: int | None = None  # recorded only where it changes tensors (random crops, first-frame noise)
    text_encoder_quantization: str | None = None  # "torchao int8wo" when T5 was quantized; else not recorded
    frame_extraction: str | None = None  # "chunk", "slide 10", "uniform 4", each "max N"; None: head (not recorded)


def _as_json(record) -> dict:
    data = dataclasses.asdict(record)
    optional = {CacheSettings: ("seed", "text_encoder_quantization", "frame_extraction"),
                CacheDataset: ("datasets",)}.get(type(record), ())
    for name in optional:  # recorded only when set: older caches keep their names
        if data[name] is None:
            del data[name]
    return data


def _record(cls, data: dict, where: str):
    try:
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__} is not an object")
        return cls(**data)
    except TypeError as e:
        raise CogtuneError(f"{where} does not describe a cache of format version {FORMAT_VERSION} ({e}); "
                           "rebuild the cache with `cogtune preprocess`.") from None


@dataclass(frozen=True)
class Manifest:
    """manifest.json: what a cache holds and how it was made. A cache of LEGACY_VERSION is read as
    this version (its manifest file is left as it is)."""

    fingerprint: str
    model: CacheModel
    dataset: CacheDataset
    settings: CacheSettings
    tensors: TensorSet
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return {"format_version": self.format_version, "fingerprint": self.fingerprint, "model": _as_json(self.model),
                "dataset": _as_json(self.dataset), "settings": _as_json(self.settings),
                "tensors": self.tensors.to_json()}

    def identity_json(self, weights: bool = False) -> dict:
        """What names the cache: its model (less the weights digest, which is checked but not named,
        unless `weights`), dataset, settings and tensors."""
        data = self.to_json()
        if not weights:
            data["model"].pop(WEIGHTS_DIGEST, None)
        return {key: data[key] for key in ("model", "dataset", "settings", "tensors")}

    @classmethod
    def from_json(cls, data: dict, where: str) -> "Manifest":
        """The manifest in data (read from where), refused unless it is of this format version or
        LEGACY_VERSION (read as this one)."""
        if not isinstance(data, dict):
            raise CogtuneError(f"{where}: its manifest is not a JSON object; rebuild the cache with `cogtune preprocess`.")
        version = data.get("format_version")
        if version not in (FORMAT_VERSION, LEGACY_VERSION):
            raise CogtuneError(
                f"{where} has cache format version {version}, this cogtune reads versions {LEGACY_VERSION} and "
                f"{FORMAT_VERSION}. Rebuild it with `cogtune preprocess` (it writes a new folder; the old one can be "
                "deleted)."
            )
        try:
            if version == LEGACY_VERSION:
                data = upgraded_legacy_json(data)
            fingerprint, model, dataset, settings, tensors = (
                data[k] for k in ("fingerprint", "model", "dataset", "settings", "tensors"))
            tensors = TensorSet.from_json(tensors)
        except (KeyError, TypeError) as e:
            raise CogtuneError(f"{where} lacks {e}; rebuild the cache with `cogtune preprocess`.") from None
        return cls(fingerprint, _record(CacheModel, model, where), _record(CacheDataset, dataset, where),
                   _record(CacheSettings, settings, where), tensors, version)


LEGACY_FAMILY = "CogVideoX"


LEGACY_COMPONENTS = ("vae", "text_encoder")


def upgraded_legacy_json(data: dict) -> dict:
    """A version 5 manifest (or preprocess record) as version 6 writes it, its fingerprint kept."""
    model = dict(data["model"])
    upgraded_model = {key: model.get(key) for key in ("pretrained_model_name_or_path", "revision", "variant")}
    upgraded_model.update(family=LEGACY_FAMILY, description=model["family"],
                          components={part: model[f"{part}_config_sha256"] for part in LEGACY_COMPONENTS},
                          weights_sha256=model.get(WEIGHTS_DIGEST))
    settings = dict(data["settings"])
    settings["text_length"] = settings.pop("max_text_seq_length")
    first_frame = LEGACY_IMAGE_TENSORS if settings.get("image_noise_variants") else ()
    tensors = dataclasses.replace(LEGACY_TENSORS, first_frame=first_frame)
    return {**data, "model": upgraded_model, "settings": settings, "tensors": tensors.to_json()}


def legacy_identity_json(identity: dict) -> dict | None:
    """What version 5 hashed into the name of the cache of this identity (Manifest.identity_json of
    version 6), or None where version 5 could not have written it (another family or components)."""
    model, settings = identity["model"], dict(identity["settings"])
    expected = dataclasses.replace(LEGACY_TENSORS, first_frame=LEGACY_IMAGE_TENSORS if settings["image_noise_variants"]
                                   else ())
    if model["family"] != LEGACY_FAMILY or set(model["components"]) != set(LEGACY_COMPONENTS) \
            or identity["tensors"] != expected.to_json():
        return None
    legacy_model = {key: model[key] for key in ("pretrained_model_name_or_path", "revision", "variant")}
    legacy_model["family"] = model["description"]
    legacy_model.update({f"{part}_config_sha256": model["components"][part] for part in LEGACY_COMPONENTS})
    settings["max_text_seq_length"] = settings.pop("text_length")
    return {"format_version": LEGACY_VERSION, "model": legacy_model, "dataset": identity["dataset"],
            "settings": settings}


def describe_differences(expected: dict, found: dict, prefix: str = "", found_label: str = "cache has",
                         expected_label: str = "expected") -> list[str]:
    """Human-readable differences between two nested dicts (such as two manifests' JSON)."""
    lines = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key), found.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += describe_differences(a, b, f"{prefix}{key}.", found_label, expected_label)
        elif a != b:
            lines.append(f"{prefix}{key}: {found_label} {b!r}, {expected_label} {a!r}")
    return lines
