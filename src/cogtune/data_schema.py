"""The cache contract between `preprocess` and `train`: the only module that knows file names,
tensor keys, Parquet columns, the format version, and the typed manifest and index rows.
`cache.writer` writes this format, `cache.reader` reads it, `cache.identity` names and finds a cache.

A cache is one folder, named after what it holds, under a cache root:

    <cache_root>/<model>_<dataset>_<H>x<W>_<F>f_<fps>fps_<crop>_<fingerprint>/
        manifest.json           format version, model identity, every setting that changes tensors
        shards/<part>.safetensors   tensors; append-only, each written to a temp name, fsynced, renamed;
                                    the header holds the sha256 of every tensor (`cogtune cache verify`)
        index/<part>.parquet    one row per sample whose tensors live in the shard of the same name
        selection.parquet       the sample ids of the last finished preprocess run: what train reads
        validation/             validation prompts' T5 embeddings (`text-<caption_key>.safetensors`,
                                the empty negative prompt included) and, for image-to-video, the VAE
                                moments of validation images (`image-<sha>-<H>x<W>.safetensors`)
        .lock                   held shared by writers, exclusively by `cogtune cache prune`

Tensors are keyed by content, so nothing is encoded twice, and named by their role: the model's
family declares which tensors it stores (`TensorSet`, recorded in the manifest). Per video (by the
hash of the video file) `latents/<video_key>/<name>` (CogVideoX: the VAE posterior's mean and
logvar); per caption (by the hash of its text) `text/<caption_key>/<name>` (CogVideoX: the T5
`prompt_embeds`). Image-to-video caches also hold, per video, `--image_noise_variants` encodings of
its noised first frame (`images/<video_key>/<k>/<name>`, in the shard of the video's latents, their
sigmas in the index). Every shard's header names its cache (fingerprint) and the model family. Index parts are written after their shard, so a
run killed at any moment loses at most the shard in progress and no reader ever sees half a file.
Several writers (ranks) can add parts to one cache at once: they share its lock.

Two caches are the same when their fingerprints are: a hash of the format version, the model
identity (id or path, revision, variant, component config hashes), the dataset source and every
setting that changes the tensors. Anything else gets its own folder, never a silent mix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from cogtune.errors import CogtuneError
from cogtune.util.files import sha256_text

# 2: image-to-video latents, image_noise_sigmas; 3: bucket, failure_kind, decoder; 4: tensor checksums;
# 5: model configs hashed as their files store them (4 hashed the installed transformers' expanded
# view of the T5 config, which changed with its version)
FORMAT_VERSION = 6  # 6: the family, its encoders and its tensor names in the manifest; shards stamped
LEGACY_VERSION = 5  # read as version 6 (Manifest.from_json): such caches train on, nothing re-encoded
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
CHECKSUMS_METADATA = "cogtune.sha256"  # shard header entry: JSON {tensor key: sha256 of its bytes}
FINGERPRINT_METADATA = "cogtune.fingerprint"  # shard header entry: the fingerprint of the cache it belongs to
FAMILY_METADATA = "cogtune.family"  # shard header entry: the model family whose encoders made its tensors
SELECTION_FILE = "selection.parquet"
# The content hash of every source file as last seen (path, size, mtime): a file touched, copied or
# rsynced without times is hashed again once, not on every later run. Only a shortcut: a cache
# without it, or with a damaged one, is read as if it had none.
FINGERPRINTS_FILE = "fingerprints.parquet"
SHARDS_DIR = "shards"
INDEX_DIR = "index"
VALIDATION_INPUTS_DIR = "validation"  # validation prompts' T5 embeddings and images' VAE moments

STATUS_OK = "ok"
STATUS_FAILED = "failed"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass(frozen=True)
class TensorSet:
    """The tensors a model family stores, by name: per caption (each [text length, ...]), per video
    window (each of the latent shape, [C, F, H, W]) and, image-to-video, per noised first frame (each
    [C, 1, H, W]). The same names key a validation prompt's and a validation image's file."""

    caption: tuple[str, ...]
    video: tuple[str, ...]
    first_frame: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"caption": list(self.caption), "video": list(self.video), "first_frame": list(self.first_frame)}

    @classmethod
    def from_json(cls, data: dict) -> "TensorSet":
        return cls(tuple(data["caption"]), tuple(data["video"]), tuple(data.get("first_frame", ())))


# What CogVideoX caches of format version 5 hold (that version named no tensors in its manifest).
LEGACY_TENSORS = TensorSet(caption=("prompt_embeds",), video=("mean", "logvar"))
LEGACY_IMAGE_TENSORS = ("mean", "logvar")

INDEX_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("failure_kind", pa.string()),  # short category of a skipped clip ("too short", "unreadable", ...)
        ("source_path", pa.string()),
        ("source_size", pa.int64()),
        ("source_mtime_ns", pa.int64()),
        ("source_sha256", pa.string()),
        ("caption", pa.string()),
        ("caption_sha256", pa.string()),
        ("frame_indices", pa.list_(pa.int32())),
        ("source_fps", pa.float64()),
        ("source_height", pa.int32()),
        ("source_width", pa.int32()),
        ("num_frames", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("bucket", pa.string()),  # FRAMESxHEIGHTxWIDTH the clip was brought to
        ("decoder", pa.string()),  # decord, or pyav when decord could not be trusted with the file
        ("latent_shape", pa.list_(pa.int32())),  # [C, F, H, W] of the stored moments
        ("latent_shard", pa.string()),
        ("latent_key", pa.string()),
        ("text_shard", pa.string()),
        ("text_key", pa.string()),
        # image-to-video caches: the noise sigma of each stored first-frame encoding (empty otherwise);
        # the encodings live in the latent shard under first_frame_tensor_key(latent_key, variant, name)
        ("image_noise_sigmas", pa.list_(pa.float64())),
    ]
)
SELECTION_SCHEMA = pa.schema([("sample_id", pa.string())])  # and "repeats" (int32), where one is not 1
DATASET_REPEATS_KEY = b"cogtune.dataset_repeats"  # selection metadata: the [[datasets]] repeats, a JSON list
FINGERPRINTS_SCHEMA = pa.schema([("source_path", pa.string()), ("source_size", pa.int64()),
                                 ("source_mtime_ns", pa.int64()), ("source_sha256", pa.string())])


# --- keys and paths -----------------------------------------------------------------------------


def sha256_tensor(tensor: torch.Tensor) -> str:
    """Hash of a tensor's bytes as stored (any dtype, bf16 included)."""
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def sample_id(source_sha256: str, caption: str) -> str:
    return sha256_text(f"{source_sha256}\n{caption}")[:32]


def clip_source(source_sha256: str, clip_settings: str = "") -> str:
    """What identifies a video's clips where a sha256 identifies a video: its content's sha256 at the
    top-level clip settings; with its [[datasets]] table's own (sources.CLIP_KEYS, as JSON), a hash of
    both, so that the same video cut two ways is two sets of latents."""
    return source_sha256 if not clip_settings else sha256_text(f"{source_sha256}\n{clip_settings}")


def video_key(source_sha256: str) -> str:
    return source_sha256[:32]


def window_source(source_sha256: str, start: int) -> str:
    """What identifies one window of a video (its first frame `start` among the frames at --fps)
    where a sha256 identifies a whole video: the sha256 itself for the window at 0 (the clip head
    extraction takes), else the sha256 and the start."""
    return source_sha256 if start == 0 else f"{source_sha256}@{start}"


def window_key(source_sha256: str, start: int) -> str:
    """The latent key of a video's window: video_key for the window at 0, else with @start."""
    return video_key(source_sha256) if start == 0 else f"{video_key(source_sha256)}@{start}"


def window_start(latent_key: str) -> int:
    """The window start a latent key names (window_key)."""
    return int(latent_key.partition("@")[2] or 0)


def caption_key(caption: str) -> str:
    return sha256_text(caption)[:32]


def video_tensor_key(key: str, name: str) -> str:
    """Key of a video window's tensor `name` (TensorSet.video); key: its latent_key."""
    return f"latents/{key}/{name}"


def first_frame_tensor_key(key: str, variant: int, name: str) -> str:
    """Key of the tensor `name` (TensorSet.first_frame) of a video's noised first frame, one per variant."""
    return f"images/{key}/{variant}/{name}"


def caption_tensor_key(key: str, name: str) -> str:
    """Key of a caption's tensor `name` (TensorSet.caption); key: its caption_key."""
    return f"text/{key}/{name}"


def caption_tensor_keys(caption: str, tensors: TensorSet) -> list[str]:
    """Keys of every tensor stored for a caption."""
    return [caption_tensor_key(caption_key(caption), name) for name in tensors.caption]


def video_tensor_keys(key: str, tensors: TensorSet, variants: int) -> list[str]:
    """Keys of every tensor stored for a video window (its latent_key), first frames included."""
    return [video_tensor_key(key, name) for name in tensors.video] + [
        first_frame_tensor_key(key, variant, name) for variant in range(variants) for name in tensors.first_frame]


SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\Z")  # what CacheWriter names shards: r0-<hex>


def valid_shard_name(name) -> bool:
    return isinstance(name, str) and bool(SHARD_NAME.match(name)) and ".." not in name


def shard_path(cache_path: str | Path, name: str) -> Path:
    """The file of a shard. A name that is no plain file name (a path, .., an absolute path: a
    crafted index) is refused, so that nothing outside the cache's shards/ is ever read."""
    if not valid_shard_name(name):
        raise CogtuneError(f"{cache_path}: the index names a shard {name!r}, which is not a file in its {SHARDS_DIR}/ "
                           "folder (a damaged or crafted index). Run `cogtune cache verify` on it, then "
                           "`cogtune cache prune --damaged` and preprocess again.")
    return Path(cache_path) / SHARDS_DIR / f"{name}.safetensors"


def shard_paths(cache_path: str | Path) -> list[Path]:
    """Every complete shard of a cache (temp files of killed runs have another suffix)."""
    return sorted((Path(cache_path) / SHARDS_DIR).glob("*.safetensors"))


def index_part_path(cache_path: str | Path, name: str) -> Path:
    return Path(cache_path) / INDEX_DIR / f"{name}.parquet"


def validation_text_path(cache_path: str | Path, prompt: str) -> Path:
    """A validation prompt's tensors (TensorSet.caption names); "" is the negative prompt."""
    return Path(cache_path) / VALIDATION_INPUTS_DIR / f"text-{caption_key(prompt)}.safetensors"


def validation_image_path(cache_path: str | Path, image_sha256: str, height: int, width: int) -> Path:
    """A validation image's tensors (TensorSet.first_frame names, [C, 1, h, w]) at one pixel size."""
    return Path(cache_path) / VALIDATION_INPUTS_DIR / f"image-{image_sha256[:32]}-{height}x{width}.safetensors"


# --- the index rows -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSource:
    """Where a sample comes from: one (video file, caption) pair, identified by their content."""

    sample_id: str
    source_path: str
    source_size: int
    source_mtime_ns: int
    source_sha256: str
    caption: str


@dataclass(frozen=True)
class VideoLatent:
    """The index columns of an encoded video, shared by every sample of that video."""

    frame_indices: list[int]
    source_fps: float
    source_height: int
    source_width: int
    num_frames: int
    height: int
    width: int
    bucket: str
    decoder: str
    latent_shape: list[int]
    latent_shard: str
    latent_key: str
    image_noise_sigmas: list[float]


@dataclass(slots=True)
class IndexRow:
    """One row of the index (INDEX_SCHEMA): a sample, encoded (status ok) or skipped with a reason."""

    sample_id: str
    status: str
    reason: str | None = None
    failure_kind: str | None = None
    source_path: str | None = None
    source_size: int | None = None
    source_mtime_ns: int | None = None
    source_sha256: str | None = None
    caption: str | None = None
    caption_sha256: str | None = None
    frame_indices: list[int] | None = None
    source_fps: float | None = None
    source_height: int | None = None
    source_width: int | None = None
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    bucket: str | None = None
    decoder: str | None = None
    latent_shape: list[int] | None = None
    latent_shard: str | None = None
    latent_key: str | None = None
    text_shard: str | None = None
    text_key: str | None = None
    image_noise_sigmas: list[float] | None = None

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def video_latent(self) -> VideoLatent:
        """The encoded video of an ok row, to reuse for another caption of the same video."""
        return VideoLatent(**{f.name: getattr(self, f.name) for f in dataclasses.fields(VideoLatent)})

    @property
    def image_variants(self) -> int:
        """Stored noised first-frame encodings of the sample's video (0 for text-to-video)."""
        return len(self.image_noise_sigmas or [])

    def tensors(self, tensors: TensorSet, text_length: int) -> list[tuple[str, str, tuple | None]]:
        """(shard, key, shape) of every tensor an ok row needs; a None in a shape is not checked."""
        return sample_tensors(self, tensors, text_length)

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in INDEX_SCHEMA.names}


def sample_tensors(row, tensors: TensorSet, text_length: int) -> list[tuple[str, str, tuple | None]]:
    """(shard, key, shape) of every tensor a usable sample needs (an IndexRow, or any row with its
    latent_shard, latent_key, latent_shape, image_variants, text_shard and text_key)."""
    channels, _, height, width = row.latent_shape
    found = [(row.latent_shard, video_tensor_key(row.latent_key, name), tuple(row.latent_shape))
             for name in tensors.video]
    for variant in range(row.image_variants):
        found += [(row.latent_shard, first_frame_tensor_key(row.latent_key, variant, name), (channels, 1, height, width))
                  for name in tensors.first_frame]
    found += [(row.text_shard, caption_tensor_key(row.text_key, name), (text_length, None)) for name in tensors.caption]
    return found


def ok_row(source: SampleSource, video: VideoLatent, text_shard: str) -> IndexRow:
    """The row of a sample whose video latents and caption embedding are stored."""
    return IndexRow(status=STATUS_OK, reason="", caption_sha256=sha256_text(source.caption),
                    text_key=caption_key(source.caption), text_shard=text_shard,
                    **dataclasses.asdict(source), **dataclasses.asdict(video))


def failed_row(source: SampleSource, kind: str, reason: str) -> IndexRow:
    """The row of a sample whose clip could not be used, and why (it is not tried again)."""
    return IndexRow(status=STATUS_FAILED, failure_kind=kind, reason=reason, image_noise_sigmas=[],
                    caption_sha256=sha256_text(source.caption), **dataclasses.asdict(source))


# --- the training batch ------------------------------------------------------------------------


@dataclass
class TrainingBatch:
    """A batch of cached samples as training reads it: exactly the tensors of the cache's TensorSet,
    stacked, by name. The family's objective consumes it."""

    video: dict[str, torch.Tensor]  # TensorSet.video: each [B, C, F, H, W]
    caption: dict[str, torch.Tensor]  # TensorSet.caption: each [B, text length, ...]
    first_frame: dict[str, torch.Tensor]  # TensorSet.first_frame: each [B, K, C, 1, H, W] (K encodings a video)
    empty_caption: dict[str, torch.Tensor] | None = None  # the empty prompt's (--caption_dropout_technique empty)

    @classmethod
    def collate(cls, items: list["TrainingBatch"]) -> "TrainingBatch":
        """Samples (each a TrainingBatch of one, unstacked) -> one batch."""
        def stacked(part: str) -> dict[str, torch.Tensor]:
            return {name: torch.stack([getattr(item, part)[name] for item in items]) for name in getattr(items[0], part)}
        return cls(stacked("video"), stacked("caption"), stacked("first_frame"))

    def _map(self, move) -> "TrainingBatch":
        def moved(tensors):
            return None if tensors is None else {name: move(tensor) for name, tensor in tensors.items()}
        return TrainingBatch(moved(self.video), moved(self.caption), moved(self.first_frame), moved(self.empty_caption))

    def to(self, device, non_blocking: bool = False) -> "TrainingBatch":
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TrainingBatch":  # (the DataLoader's pin_memory calls this)
        return self._map(lambda tensor: tensor.pin_memory())


# --- the manifest -------------------------------------------------------------------------------


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

    def identity_json(self) -> dict:
        """What names the cache (its model less the weights digest, dataset, settings and tensors)."""
        data = self.to_json()
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


# --- caches of format version 5 (CogVideoX only) ------------------------------------------------
# Version 5 recorded one VAE and one T5 and no tensor names; its tensors have the keys version 6
# gives CogVideoX's (LEGACY_TENSORS). Its caches are read as version 6 and keep their names: a
# preprocess or training run whose settings name a cache finds one of version 5 by the name that
# version gave it (legacy_identity_json, then the same fingerprint), so nothing is encoded again.

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
