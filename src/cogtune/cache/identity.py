"""How a cache is named and found: the settings that decide which cache a preprocess run writes,
and which cache a training run trains on.

A cache folder is named after everything that shapes its tensors (the model's VAE and T5, the
dataset, the clip settings). `cogtune preprocess` also records, per config file, which cache its
latest run wrote and with which settings given on its command line. Training takes the cache that
its own settings name; when its command line does not name the data (the recipe `make preprocess
ARGS="--instance_data_root B"` then `make train`), it takes the cache the latest preprocess run of
the same config wrote and says so, and it never falls back to an older cache of other data.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cogtune import data_schema as schema
from cogtune import quantize
from cogtune.config import relative_to
from cogtune.config.preprocessing import ClipArgs
from cogtune.data.buckets import bucket_name, configured_buckets
from cogtune.data.sources import DATASET_KEYS, clip_settings_of, dataset_tables
from cogtune.errors import CogtuneError
from cogtune.families import ModelConfigs
from cogtune.util import files

DATASET_SETTINGS = (*DATASET_KEYS, "datasets")
TENSOR_SETTINGS = ("height", "width", "fps", "max_num_frames", "skip_frames_start", "skip_frames_end",
                   "video_reshape_mode", "latent_dtype", "mixed_precision", "enable_tiling")
BUCKET_SETTINGS = ("buckets", "height_buckets", "width_buckets", "frame_buckets")
# Every setting that can change which cache a preprocess run writes.
IDENTITY_SETTINGS = (("pretrained_model_name_or_path", "revision", "variant") + DATASET_SETTINGS + TENSOR_SETTINGS
                     + BUCKET_SETTINGS + ("image_noise_variants", "seed", "text_encoder_quant_backend",
                                          "text_encoder_quant_type", "frame_extraction", "frame_stride",
                                          "frame_sample", "max_windows_per_clip"))
LATEST_DIR = ".latest-preprocess"  # under --cache_root: one record per config file


@dataclass(frozen=True)
class CacheIdentity:
    """Everything that decides which cache folder a preprocess run writes to: a cache's name ends in
    the fingerprint of these, so two caches are the same exactly when all of them are."""

    model: schema.CacheModel
    dataset: schema.CacheDataset
    settings: schema.CacheSettings
    tensors: schema.TensorSet

    @property
    def fingerprint(self) -> str:
        # (the weights digest is checked, not named: see CacheModel)
        payload = {"format_version": schema.FORMAT_VERSION, **self._unnamed().identity_json()}
        return files.sha256_text(json.dumps(payload, sort_keys=True))[:12]

    @property
    def legacy_fingerprint(self) -> str | None:
        """The fingerprint format version 5 gave this cache, where it could have written it."""
        legacy = schema.legacy_identity_json(self._unnamed().identity_json())
        return files.sha256_text(json.dumps(legacy, sort_keys=True))[:12] if legacy else None

    def _name(self, fingerprint: str) -> str:
        s = self.settings
        model = _slug(Path(str(self.model.pretrained_model_name_or_path).rstrip("/")).name)
        dataset = (f"{len(self.dataset.datasets)}datasets" if self.dataset.datasets else
                   _slug(Path(str(self.dataset.dataset_name or self.dataset.instance_data_root)).name))
        size = f"{len(s.buckets)}buckets" if s.buckets else f"{s.height}x{s.width}_{s.max_num_frames}f"
        return f"{model}_{dataset}_{size}_{s.fps}fps_{s.video_reshape_mode}_{fingerprint}"

    @property
    def name(self) -> str:
        return self._name(self.fingerprint)

    def name_in(self, cache_root: str | Path) -> str:
        """The folder of this cache under cache_root: its own name, unless only a cache of format
        version 5 with these settings is there (it is read, and added to, as it is)."""
        root, legacy = Path(cache_root), self.legacy_fingerprint
        if legacy and not (root / self.name / schema.MANIFEST_FILE).is_file() \
                and (root / self._name(legacy) / schema.MANIFEST_FILE).is_file():
            return self._name(legacy)
        return self.name

    def _unnamed(self) -> schema.Manifest:
        return schema.Manifest("", self.model, self.dataset, self.settings, self.tensors)

    def manifest(self) -> schema.Manifest:
        """The manifest of the cache these settings name."""
        return dataclasses.replace(self._unnamed(), fingerprint=self.fingerprint)

    def to_json(self) -> dict:
        """model, dataset, settings and tensors as the manifest stores them."""
        return self._unnamed().identity_json(weights=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-")[:40] or "x"


def cache_identity(config, models: ModelConfigs) -> CacheIdentity:
    """Which cache a preprocess run with these settings writes to (and a training run reads from)."""
    settings = {name: getattr(config, name) for name in TENSOR_SETTINGS}
    buckets = configured_buckets(config)
    settings["buckets"] = [bucket_name(b) for b in buckets] if buckets else None
    spec = models.spec()
    settings["text_length"] = spec.text_length
    image_conditioned = spec.image_conditioned
    noised = image_conditioned and spec.noised_first_frame  # (Wan encodes the one first frame as it is)
    settings["image_noise_variants"] = (config.image_noise_variants if noised else 1) if image_conditioned else 0
    if config.video_reshape_mode == "random" or noised:  # random crops and first-frame noise
        settings["seed"] = config.seed
    if config.text_encoder_quant_backend != "none":
        settings["text_encoder_quantization"] = (f"{config.text_encoder_quant_backend} "
                                                 f"{quantize.quant_type(config.text_encoder_quant_backend, config.text_encoder_quant_type)}")
    if config.frame_extraction != "head":
        settings["frame_extraction"] = frame_extraction_name(config)
    tables = dataset_tables(config)
    if config.datasets:  # several: each one's settings (their repeats do not change a tensor, so not here)
        dataset = {**dict.fromkeys(DATASET_KEYS), "datasets": [_dataset_identity(table, config) for table in tables]}
    else:
        dataset = _dataset_identity(tables[0], config)
    return CacheIdentity(model=schema.CacheModel(**models.identity()), dataset=schema.CacheDataset(**dataset),
                         settings=schema.CacheSettings(**settings), tensors=spec.tensors)


def _dataset_identity(table: dict, config) -> dict:
    """A dataset's settings as the manifest records them: local paths absolute; its own clip settings
    (recorded only where it has some, so that other caches keep their names)."""
    name = table["dataset_name"]
    clip = clip_settings_of(table, config)
    return {**({"clip_settings": json.loads(clip)} if clip else {}),
        "instance_data_root": str(Path(table["instance_data_root"]).resolve()) if table["instance_data_root"] else None,
        "dataset_name": str(Path(name).resolve()) if name and Path(name).exists() else name,
        "dataset_config_name": table["dataset_config_name"],
        "caption_column": table["caption_column"],
        "video_column": table["video_column"],
        "id_token": table["id_token"],
    }


def frame_extraction_name(config: ClipArgs) -> str:
    """--frame_extraction and the numbers that shape its windows, as the manifest records them."""
    mode = config.frame_extraction
    if mode == "spread":  # one clip a video: no windows to count
        return mode
    detail = {"slide": f" {config.frame_stride}", "uniform": f" {config.frame_sample}"}.get(mode, "")
    return f"{mode}{detail}, max {config.max_windows_per_clip}"


def list_caches(cache_root: str | Path) -> list[Path]:
    root = Path(cache_root)
    return sorted(p.parent for p in root.glob(f"*/{schema.MANIFEST_FILE}")) if root.is_dir() else []


def find_cache(cache_root: str | Path, identity: CacheIdentity) -> Path:
    """The folder of the cache that matches identity, with a helpful error when there is none."""
    path = Path(cache_root) / identity.name_in(cache_root)
    if (path / schema.MANIFEST_FILE).is_file():
        return path
    listing = "\n  ".join(str(p) for p in list_caches(cache_root)) or "(none)"
    raise CogtuneError(
        f"No cache for these settings at {path}. Run `cogtune preprocess` with the same config first, or pass "
        f"--data_cache with one of the caches under {cache_root}:\n  {listing}"
    )


def _record_path(cache_root: Path, config_file: str | None) -> Path:
    key = files.sha256_text(str(Path(config_file).resolve()) if config_file else "(no config file)")[:16]
    return Path(cache_root) / LATEST_DIR / f"{key}.json"


def record_preprocess_run(config, identity: CacheIdentity) -> None:
    """Note that the latest preprocess run of config's file (or of no file) writes identity's cache,
    with the identity settings its command line gave."""
    flags = {name: getattr(config, name) for name in config.command_line if name in IDENTITY_SETTINGS}
    flags = relative_to(flags, Path.cwd())  # absolute, so that a train run elsewhere can replay them
    record = {"config_file": str(Path(config.config_file).resolve()) if config.config_file else None,
              "cache": identity.name_in(config.cache_root), "command_line": flags, **identity.to_json(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = _record_path(Path(config.cache_root), config.config_file)
    files.atomic_write(path, lambda temp: Path(temp).write_text(json.dumps(record, indent=2, default=str) + "\n"))


def latest_preprocess_run(cache_root: Path, config_file: str | None) -> dict | None:
    path = _record_path(cache_root, config_file)
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    # A record of another shape (edited by hand, cut short) is no record: the settings decide alone.
    needed = {"cache": str, "model": dict, "dataset": dict, "settings": dict, "command_line": dict}
    if not isinstance(record, dict) or any(not isinstance(record.get(k), kind) for k, kind in needed.items()):
        return None
    if "tensors" not in record:  # written by a release of cache format version 5
        try:
            return schema.upgraded_legacy_json(record)
        except (KeyError, TypeError, AttributeError):
            return None
    return record


def _flags_text(flags: dict) -> str:
    return " ".join(f"--{name} {' '.join(map(str, value)) if isinstance(value, list) else value}"
                    for name, value in flags.items()) or "no data flags"


@dataclass(frozen=True)
class TrainingCache:
    path: Path
    why: str  # one line for the user: which cache, and why this one


def training_cache(data_cache: str | None, data, models: ModelConfigs) -> TrainingCache:
    """The cache a training run trains on. data: the preprocess settings of the same command line
    (config file, [preprocess] table and flags), as `cogtune preprocess` would read them."""
    if data_cache:
        return TrainingCache(Path(data_cache), "given by --data_cache")
    if data is None:
        raise CogtuneError("Say which cache to train from: --data_cache DIR, or --config with the preprocess settings.")
    cache_root = Path(data.cache_root)
    named = cache_identity(data, models)
    if data.auto_tiling and not data.enable_tiling:  # preprocess continues a tiled cache once there is one
        tiled = cache_identity(_with(data, {"enable_tiling": True}), models)
        if (cache_root / tiled.name_in(cache_root) / schema.MANIFEST_FILE).is_file():
            named = tiled
    latest = latest_preprocess_run(cache_root, data.config_file)
    source = f"--config {data.config_file}" if data.config_file else "no config file"
    named_path = cache_root / named.name_in(cache_root)  # (or the version 5 cache of these settings)
    if latest is None or latest["cache"] == named_path.name:
        path = find_cache(cache_root, named)
        return TrainingCache(path, "the cache these settings name" + (
            ", which the latest `cogtune preprocess` of this config wrote" if latest else ""))

    differences = schema.describe_differences(
        named.to_json(),
        {key: latest[key] for key in ("model", "dataset", "settings", "tensors")},
        found_label="the latest preprocess run wrote", expected_label="this command names")
    listing = "\n  ".join(differences[:12])
    given = [name for name in data.command_line if name in IDENTITY_SETTINGS]
    if given:  # this command line names its data: train on that or on nothing
        if (named_path / schema.MANIFEST_FILE).is_file():
            flags = _flags_text({name: getattr(data, name) for name in given})
            return TrainingCache(named_path, f"the cache these settings name ({flags})")
        raise CogtuneError(
            f"No cache for these settings at {named_path}. The latest `cogtune preprocess` with {source} wrote "
            f"{cache_root / latest['cache']} ({_flags_text(latest['command_line'])}), whose settings differ:\n"
            f"  {listing}\nRun preprocess with the same flags as train, or pass --data_cache.")
    # No data flags here: the latest preprocess run of this config is what the user means, provided its
    # command-line flags are the whole difference (the config file has not changed since).
    replayed = cache_identity(_with(data, latest["command_line"]), models)
    latest_path = cache_root / latest["cache"]
    if replayed.name_in(cache_root) == latest_path.name and (latest_path / schema.MANIFEST_FILE).is_file():
        return TrainingCache(
            cache_root / latest["cache"],
            f"written by the latest `cogtune preprocess` with {source} and {_flags_text(latest['command_line'])}; "
            "this command gives no data flags (pass the same ones to name that cache yourself)")
    raise CogtuneError(
        f"Not sure which cache to train on: the settings of this command name {named_path}, but the "
        f"latest `cogtune preprocess` with {source} wrote {cache_root / latest['cache']} "
        f"({_flags_text(latest['command_line'])}), and they differ:\n  {listing}\n"
        "Give train the data flags of the cache you mean (the same ARGS as preprocess), preprocess again with "
        "this command's settings, or pass --data_cache.")


def _with(data, values: dict):
    """data with some settings replaced (those it has)."""
    names = {f.name for f in dataclasses.fields(data)}
    return dataclasses.replace(data, **{name: value for name, value in values.items() if name in names})
