"""The cache contract between `preprocess` and `train`: the only module that knows file names,
tensor keys, Parquet columns and the format version.

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

Tensors are keyed by content, so nothing is encoded twice: a video's VAE moments by the hash of
the video file (`latents/<video_key>/mean|logvar`), a caption's T5 embedding by the hash of the
caption text (`text/<caption_key>/prompt_embeds`). Image-to-video caches also hold, per video,
`--image_noise_variants` encodings of its noised first frame (`images/<video_key>/<k>/mean|logvar`,
in the shard of the video's latents, their sigmas in the index). Index parts are written after their shard, so a
run killed at any moment loses at most the shard in progress and no reader ever sees half a file.
Several writers (ranks) can add parts to one cache at once: they share its lock.

Two caches are the same when their fingerprints are: a hash of the format version, the model
identity (id or path, revision, variant, component config hashes), the dataset source and every
setting that changes the tensors. Anything else gets its own folder, never a silent mix.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cogtune.errors import CogtuneError
from cogtune.util.files import atomic_write, sha256_text, write_json

# 2: image-to-video latents, image_noise_sigmas; 3: bucket, failure_kind, decoder; 4: tensor checksums
FORMAT_VERSION = 5  # 5: model configs hashed as their files store them (4 hashed the installed
# transformers' expanded view of the T5 config, which changed with its version)
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
CHECKSUMS_METADATA = "cogtune.sha256"  # shard header entry: JSON {tensor key: sha256 of its bytes}
SELECTION_FILE = "selection.parquet"
SHARDS_DIR = "shards"
VALIDATION_DIR = "validation"
INDEX_DIR = "index"

STATUS_OK = "ok"
STATUS_FAILED = "failed"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

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
        # the encodings live in the latent shard under image_latent_tensor_keys(latent_key, variant)
        ("image_noise_sigmas", pa.list_(pa.float64())),
    ]
)
SELECTION_SCHEMA = pa.schema([("sample_id", pa.string())])


# --- identities ---------------------------------------------------------------------------------


def sha256_tensor(tensor: torch.Tensor) -> str:
    """Hash of a tensor's bytes as stored (any dtype, bf16 included)."""
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def sample_id(source_sha256: str, caption: str) -> str:
    return sha256_text(f"{source_sha256}\n{caption}")[:32]


def video_key(source_sha256: str) -> str:
    return source_sha256[:32]


def caption_key(caption: str) -> str:
    return sha256_text(caption)[:32]


def latent_tensor_keys(key: str) -> tuple[str, str]:
    """Keys of a video's posterior mean and log-variance."""
    return f"latents/{key}/mean", f"latents/{key}/logvar"


def image_latent_tensor_keys(key: str, variant: int) -> tuple[str, str]:
    """Keys of the posterior mean and log-variance of a video's noised first frame, one per variant."""
    return f"images/{key}/{variant}/mean", f"images/{key}/{variant}/logvar"


def text_tensor_key(key: str) -> str:
    return f"text/{key}/prompt_embeds"


def validation_text_path(cache_dir: str | Path, prompt: str) -> Path:
    """A validation prompt's T5 embedding (tensor `prompt_embeds`); "" is the negative prompt."""
    return Path(cache_dir) / VALIDATION_DIR / f"text-{caption_key(prompt)}.safetensors"


def validation_image_path(cache_dir: str | Path, image_sha256: str, height: int, width: int) -> Path:
    """A validation image's VAE moments (tensors `mean`, `logvar`, [C, 1, h, w]) at one pixel size."""
    return Path(cache_dir) / VALIDATION_DIR / f"image-{image_sha256[:32]}-{height}x{width}.safetensors"


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A small safetensors file, written atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda temp: save_file(tensors, temp, metadata=metadata))


@dataclass(frozen=True)
class CacheIdentity:
    """Everything that decides which cache folder a preprocess run writes to."""

    model: dict  # pretrained_model_name_or_path, revision, variant, component config hashes
    dataset: dict  # where the records come from and how captions are formed
    settings: dict  # every setting that changes the tensors

    @property
    def fingerprint(self) -> str:
        payload = {"format_version": FORMAT_VERSION, "model": self.model, "dataset": self.dataset,
                   "settings": self.settings}
        return sha256_text(json.dumps(payload, sort_keys=True))[:12]

    @property
    def name(self) -> str:
        s = self.settings
        model = _slug(Path(str(self.model["pretrained_model_name_or_path"]).rstrip("/")).name)
        dataset = _slug(Path(str(self.dataset.get("dataset_name") or self.dataset.get("instance_data_root"))).name)
        size = (f"{len(s['buckets'])}buckets" if s.get("buckets")
                else f"{s['height']}x{s['width']}_{s['max_num_frames']}f")
        return f"{model}_{dataset}_{size}_{s['fps']}fps_{s['video_reshape_mode']}_{self.fingerprint}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-")[:40] or "x"


# --- the lock ---------------------------------------------------------------------------------


@contextlib.contextmanager
def cache_lock(cache_dir: Path, exclusive: bool = False):
    """Writers share a cache's lock; `cogtune cache prune` takes it alone, so it never deletes what a
    running preprocess is writing. Raises CogtuneError when the lock cannot be had at once."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f.fileno(), (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CogtuneError(
                f"{cache_dir} is in use: " + ("a preprocess run is writing to it; wait until it has finished."
                                              if exclusive else "`cogtune cache prune` is running on it; wait for it.")
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_parquet(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda temp: pq.write_table(table, temp))


# --- the manifest -------------------------------------------------------------------------------


def manifest_for(identity: CacheIdentity) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": identity.fingerprint,
        "model": identity.model,
        "dataset": identity.dataset,
        "settings": identity.settings,
    }


def read_manifest(cache_dir: Path) -> dict:
    path = cache_dir / MANIFEST_FILE
    if not path.is_file():
        raise CogtuneError(
            f"{cache_dir} is not a cogtune cache (no {MANIFEST_FILE}). Run `cogtune preprocess` to build one, "
            "or point --data_cache at a folder it wrote."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CogtuneError(f"{path} is damaged ({e}); rebuild the cache with `cogtune preprocess`.") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CogtuneError(
            f"{cache_dir} has cache format version {version}, this cogtune reads version {FORMAT_VERSION}. "
            "Rebuild it with `cogtune preprocess` (it writes a new folder; the old one can be deleted)."
        )
    return manifest


def describe_differences(expected: dict, found: dict, prefix: str = "", found_label: str = "cache has",
                         expected_label: str = "expected") -> list[str]:
    """Human-readable differences between two nested dicts."""
    lines = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key), found.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += describe_differences(a, b, f"{prefix}{key}.", found_label, expected_label)
        elif a != b:
            lines.append(f"{prefix}{key}: {found_label} {b!r}, {expected_label} {a!r}")
    return lines


# --- writing ------------------------------------------------------------------------------------


class CacheWriter:
    """Appends encoded tensors and index rows to a cache, one complete shard at a time."""

    def __init__(self, cache_dir: Path, identity: CacheIdentity, shard_size_mb: float, writer_id: str = "w0"):
        self.cache_dir = Path(cache_dir)
        self.writer_id = writer_id
        self.shard_bytes = int(shard_size_mb * 1024 * 1024)
        self._tensors: dict[str, torch.Tensor] = {}
        self._rows: list[dict] = []
        self._pending_bytes = 0
        self._part_name = self._new_part_name()
        self.shards_written = 0
        manifest = manifest_for(identity)
        if (self.cache_dir / MANIFEST_FILE).exists():
            found = read_manifest(self.cache_dir)
            differences = describe_differences(manifest, found)
            if differences:
                raise CogtuneError(
                    f"{self.cache_dir} holds a cache with other settings:\n  " + "\n  ".join(differences)
                    + "\nUse another --cache_root, or delete that folder."
                )
        else:
            write_json(self.cache_dir / MANIFEST_FILE, manifest)

    def _new_part_name(self) -> str:
        return f"{self.writer_id}-{uuid.uuid4().hex[:12]}"

    @property
    def part_name(self) -> str:
        """The shard that tensors added now will land in."""
        return self._part_name

    def add_tensor(self, key: str, tensor: torch.Tensor) -> str:
        """Queue a tensor; returns the shard name it will be stored in."""
        tensor = tensor.detach().to("cpu").contiguous()
        self._tensors[key] = tensor
        self._pending_bytes += tensor.numel() * tensor.element_size()
        return self._part_name

    def add_row(self, row: dict) -> None:
        missing = [name for name in INDEX_SCHEMA.names if name not in row]
        if missing:
            raise ValueError(f"index row lacks columns {missing}")
        self._rows.append(row)

    def should_flush(self) -> bool:
        return self._pending_bytes >= self.shard_bytes

    def flush(self) -> None:
        """Make everything queued so far visible: the shard first, then its index part."""
        if not self._tensors and not self._rows:
            return
        name = self._part_name
        if self._tensors:
            tensors = self._tensors
            metadata = {"format_version": str(FORMAT_VERSION),
                        CHECKSUMS_METADATA: json.dumps({key: sha256_tensor(t) for key, t in tensors.items()})}
            atomic_write(self.cache_dir / SHARDS_DIR / f"{name}.safetensors",
                         lambda temp: save_file(tensors, temp, metadata=metadata))
            self.shards_written += 1
        if self._rows:
            write_index_part(self.cache_dir, name, self._rows)
        self._tensors, self._rows, self._pending_bytes = {}, [], 0
        self._part_name = self._new_part_name()

    def write_selection(self, sample_ids: Iterable[str]) -> None:
        """Record the samples of a finished run; training reads exactly these."""
        self.flush()
        write_selection(self.cache_dir, sample_ids)


def write_index_part(cache_dir: Path, name: str, rows: list[dict]) -> Path:
    path = Path(cache_dir) / INDEX_DIR / f"{name}.parquet"
    _write_parquet(path, pa.Table.from_pylist(rows, schema=INDEX_SCHEMA))
    return path


def write_selection(cache_dir: Path, sample_ids: Iterable[str]) -> None:
    ids = list(dict.fromkeys(sample_ids))
    _write_parquet(Path(cache_dir) / SELECTION_FILE, pa.Table.from_pydict({"sample_id": ids}, SELECTION_SCHEMA))


# --- reading ------------------------------------------------------------------------------------


def index_parts(cache_dir: Path) -> list[Path]:
    """The index parts, first written first."""
    return sorted((Path(cache_dir) / INDEX_DIR).glob("*.parquet"), key=lambda p: (p.stat().st_mtime_ns, p.name))


def read_index_part(part: Path) -> list[dict]:
    try:
        table = pq.read_table(part)
    except (pa.ArrowInvalid, OSError) as e:
        raise CogtuneError(f"Cache index part {part} is damaged ({e}); delete it and rerun preprocess.") from None
    if table.schema.names != INDEX_SCHEMA.names:
        raise CogtuneError(f"Cache index part {part} has unexpected columns; rebuild the cache.")
    return table.to_pylist()


def read_index(cache_dir: Path, damaged_parts: list | None = None) -> list[dict]:
    """One row per sample, in the order samples first appeared. A sample written more than once
    (a retried failure, two writers) keeps its first usable row, else its first row. A damaged
    index part raises CogtuneError, or is appended to damaged_parts when that list is given."""
    rows: dict[str, dict] = {}
    for part in index_parts(cache_dir):
        try:
            part_rows = read_index_part(part)
        except CogtuneError:
            if damaged_parts is None:
                raise
            damaged_parts.append(part)
            continue
        for row in part_rows:
            known = rows.get(row["sample_id"])
            if known is None or (known["status"] != STATUS_OK and row["status"] == STATUS_OK):
                rows[row["sample_id"]] = row
    return list(rows.values())


def read_selection(cache_dir: Path) -> list[str] | None:
    """The sample ids of the last finished preprocess run, or None if no run has finished."""
    path = Path(cache_dir) / SELECTION_FILE
    if not path.is_file():
        return None
    try:
        return pq.read_table(path).column("sample_id").to_pylist()
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise CogtuneError(f"{path} is damaged ({e}); run `cogtune preprocess` again to rewrite it.") from None


def shard_path(cache_dir: Path, name: str) -> Path:
    return Path(cache_dir) / SHARDS_DIR / f"{name}.safetensors"


@dataclass
class Cache:
    """A finished cache opened for reading: the selected samples and lazy tensor access."""

    path: Path
    manifest: dict
    samples: list[dict]  # index rows of the selected samples with status ok
    failed: list[dict] = field(default_factory=list)
    _handles: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "Cache":
        path = Path(path)
        manifest = read_manifest(path)
        selection = read_selection(path)
        if selection is None:
            raise CogtuneError(
                f"{path} has no {SELECTION_FILE}: its preprocess run did not finish. Run `cogtune preprocess` "
                "again with the same settings; it resumes where it stopped."
            )
        selected = set(selection)
        rows = [row for row in read_index(path) if row["sample_id"] in selected]
        missing = selected - {row["sample_id"] for row in rows}
        if missing:
            raise CogtuneError(
                f"{path}: {len(missing)} selected samples have no index row (the cache is damaged). "
                "Run `cogtune preprocess` again to rewrite them."
            )
        ok = [row for row in rows if row["status"] == STATUS_OK]
        failed = [row for row in rows if row["status"] != STATUS_OK]
        return cls(path=path, manifest=manifest, samples=ok, failed=failed)

    def _shard(self, name: str):
        handle = self._handles.get(name)
        if handle is None:
            path = shard_path(self.path, name)
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CogtuneError(f"Cache shard {path} cannot be read ({e}); run `cogtune cache verify "
                                   f"{self.path}`.") from None
            self._handles[name] = handle
        return handle

    def latent_moments(self, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored posterior mean and log-variance of a sample, [C, F, H, W]."""
        mean_key, logvar_key = latent_tensor_keys(row["latent_key"])
        shard = self._shard(row["latent_shard"])
        return shard.get_tensor(mean_key), shard.get_tensor(logvar_key)

    @property
    def image_noise_variants(self) -> int:
        """Noised first-frame encodings per video: 0 for a text-to-video cache."""
        return int(self.manifest["settings"].get("image_noise_variants", 0))

    def image_moments(self, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance of every noised first-frame encoding, [K, C, 1, H, W]."""
        shard = self._shard(row["latent_shard"])
        keys = [image_latent_tensor_keys(row["latent_key"], k) for k in range(len(row["image_noise_sigmas"]))]
        return (torch.stack([shard.get_tensor(mean) for mean, _ in keys]),
                torch.stack([shard.get_tensor(logvar) for _, logvar in keys]))

    def prompt_embeds(self, row: dict) -> torch.Tensor:
        """The stored T5 embedding of a sample's caption, [max_text_seq_length, text_dim]."""
        return self._shard(row["text_shard"]).get_tensor(text_tensor_key(row["text_key"]))

    def __getstate__(self):  # DataLoader workers reopen shards themselves
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


def stored_tensor_shards(cache_dir: str | Path) -> dict[str, str]:
    """Tensor key -> shard name for every complete shard (reads only the shard headers)."""
    found = {}
    for path in sorted((Path(cache_dir) / SHARDS_DIR).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as shard:
                found.update(dict.fromkeys(shard.keys(), path.stem))
        except Exception as e:  # safetensors raises its own error types
            raise CogtuneError(f"Cache shard {path} is damaged ({e}); run `cogtune cache prune --damaged "
                               f"{cache_dir}`, then preprocess again.") from None
    return found


def list_caches(cache_root: str | Path) -> list[Path]:
    root = Path(cache_root)
    return sorted(p.parent for p in root.glob(f"*/{MANIFEST_FILE}")) if root.is_dir() else []


def find_cache(cache_root: str | Path, identity: CacheIdentity) -> Path:
    """The folder of the cache that matches identity, with a helpful error when there is none."""
    path = Path(cache_root) / identity.name
    if (path / MANIFEST_FILE).is_file():
        return path
    others = list_caches(cache_root)
    listing = "\n  ".join(str(p) for p in others) or "(none)"
    raise CogtuneError(
        f"No cache for these settings at {path}. Run `cogtune preprocess` with the same config first, or pass "
        f"--data_cache with one of the caches under {cache_root}:\n  {listing}"
    )


def check_compatible(manifest: dict, model: dict, cache_path: Path) -> None:
    """Refuse a cache whose tensors came from other VAE or text-encoder weights than model's."""
    expected = {k: model[k] for k in ("vae_config_sha256", "text_encoder_config_sha256")}
    found = {k: manifest.get("model", {}).get(k) for k in expected}
    differences = describe_differences(expected, found)
    if differences:
        built_for = manifest.get("model", {})
        raise CogtuneError(
            f"The cache {cache_path} was built for another model: {built_for.get('pretrained_model_name_or_path')}, "
            f"a {built_for.get('family', 'CogVideoX')} model, not {model['pretrained_model_name_or_path']}, a "
            f"{model.get('family', 'CogVideoX')} model. Their VAE or T5 differ:\n  " + "\n  ".join(differences)
            + "\nPreprocess the data with the model you train, or train the model the cache was built for."
        )


def check_conditioning(manifest: dict, image_conditioned: bool, model_description: str, cache_path: Path) -> None:
    """Refuse a text-to-video cache for an image-to-video model, and the reverse."""
    variants = int(manifest.get("settings", {}).get("image_noise_variants", 0))
    if image_conditioned and not variants:
        raise CogtuneError(
            f"The cache {cache_path} was built for a text-to-video model and holds no first-frame latents, but "
            f"the model to train is a {model_description} model. Preprocess the data with this model first."
        )
    if variants and not image_conditioned:
        raise CogtuneError(
            f"The cache {cache_path} was built for an image-to-video model, but the model to train is a "
            f"{model_description} model. Preprocess the data with this model first."
        )


def row_template() -> dict[str, Any]:
    return {name: None for name in INDEX_SCHEMA.names}
