"""Reading a cache in the format of `data_schema`: the manifest, the index, the selection, and the
tensors of the selected samples; and whether a cache fits the model a run trains."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open

from cogtune import data_schema as schema
from cogtune.errors import CogtuneError
from cogtune.families import FamilySpec
from cogtune.util import files


def read_manifest(cache_path: Path) -> schema.Manifest:
    path = Path(cache_path) / schema.MANIFEST_FILE
    if not path.is_file():
        raise CogtuneError(
            f"{cache_path} is not a cogtune cache (no {schema.MANIFEST_FILE}). Run `cogtune preprocess` to build one, "
            "or point --data_cache at a folder it wrote."
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CogtuneError(f"{path} is damaged ({e}); rebuild the cache with `cogtune preprocess`.") from None
    return schema.Manifest.from_json(data, str(cache_path))


def index_parts(cache_path: Path) -> list[Path]:
    """The index parts, first written first."""
    return sorted((Path(cache_path) / schema.INDEX_DIR).glob("*.parquet"),
                  key=lambda p: (p.stat().st_mtime_ns, p.name))


def read_index_part(part: Path) -> list[schema.IndexRow]:
    try:
        table = pq.read_table(part)
    except (pa.ArrowInvalid, OSError) as e:
        raise CogtuneError(f"Cache index part {part} is damaged ({e}); delete it and rerun preprocess.") from None
    if table.schema.names != schema.INDEX_SCHEMA.names:
        raise CogtuneError(f"Cache index part {part} has unexpected columns; rebuild the cache.")
    return [schema.IndexRow(**row) for row in table.to_pylist()]


def read_index(cache_path: Path, damaged_parts: list | None = None) -> list[schema.IndexRow]:
    """One row per sample, in the order samples first appeared. A sample written more than once
    (a retried failure, two writers) keeps its first usable row, else its first row. A damaged
    index part raises CogtuneError, or is appended to damaged_parts when that list is given."""
    rows: dict[str, schema.IndexRow] = {}
    for part in index_parts(cache_path):
        try:
            part_rows = read_index_part(part)
        except CogtuneError:
            if damaged_parts is None:
                raise
            damaged_parts.append(part)
            continue
        for row in part_rows:
            known = rows.get(row.sample_id)
            if known is None or (not known.ok and row.ok):
                rows[row.sample_id] = row
    return list(rows.values())


def read_selection(cache_path: Path) -> list[str] | None:
    """The sample ids of the last finished preprocess run, or None if no run has finished."""
    path = Path(cache_path) / schema.SELECTION_FILE
    if not path.is_file():
        return None
    try:
        return pq.read_table(path).column("sample_id").to_pylist()
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise CogtuneError(f"{path} is damaged ({e}); run `cogtune preprocess` again to rewrite it.") from None


def read_fingerprints(cache_path: Path) -> dict[tuple[str, int, int], str]:
    """(source path, size, mtime_ns) -> content hash, as the last preprocess runs saw the files;
    empty when the cache has no fingerprints file or a damaged one (they are only a shortcut)."""
    path = Path(cache_path) / schema.FINGERPRINTS_FILE
    try:
        table = pq.read_table(path, schema=schema.FINGERPRINTS_SCHEMA)
    except (FileNotFoundError, pa.ArrowInvalid, OSError):
        return {}
    columns = [table.column(name).to_pylist() for name in schema.FINGERPRINTS_SCHEMA.names]
    return {(p, size, mtime): sha for p, size, mtime, sha in zip(*columns)}


def stored_tensor_shards(cache_path: str | Path) -> dict[str, str]:
    """Tensor key -> shard name for every complete shard (reads only the shard headers)."""
    found = {}
    for path in schema.shard_paths(cache_path):
        try:
            with safe_open(str(path), framework="pt") as shard:
                found.update(dict.fromkeys(shard.keys(), path.stem))
        except Exception as e:  # safetensors raises its own error types
            raise CogtuneError(f"Cache shard {path} is damaged ({e}); run `cogtune cache prune --damaged "
                               f"{cache_path}`, then preprocess again.") from None
    return found


@dataclass
class Cache:
    """A finished cache opened for reading: the selected samples, in the order of their sample ids
    (content keys), and lazy tensor access."""

    path: Path
    manifest: schema.Manifest
    samples: list[schema.IndexRow]  # the selected samples with status ok
    failed: list[schema.IndexRow] = field(default_factory=list)
    _handles: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "Cache":
        path = Path(path)
        manifest = read_manifest(path)
        selection = read_selection(path)
        if selection is None:
            raise CogtuneError(
                f"{path} has no {schema.SELECTION_FILE}: its preprocess run did not finish. Run `cogtune preprocess` "
                "again with the same settings; it resumes where it stopped."
            )
        selected = set(selection)
        rows = [row for row in read_index(path) if row.sample_id in selected]
        missing = selected - {row.sample_id for row in rows}
        if missing:
            raise CogtuneError(
                f"{path}: {len(missing)} selected samples have no index row (the cache is damaged). "
                "Run `cogtune preprocess` again to rewrite them."
            )
        # In the order of their content keys: training shuffles positions in this list, so it must
        # not depend on which process wrote a sample, when, or on the index parts' modification times.
        rows.sort(key=lambda row: row.sample_id)
        return cls(path=path, manifest=manifest, samples=[row for row in rows if row.ok],
                   failed=[row for row in rows if not row.ok])

    def _shard(self, name: str):
        handle = self._handles.get(name)
        if handle is None:
            path = schema.shard_path(self.path, name)
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CogtuneError(f"Cache shard {path} cannot be read ({e}); run `cogtune cache verify "
                                   f"{self.path}`.") from None
            self._handles[name] = handle
        return handle

    def latent_moments(self, row: schema.IndexRow) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored posterior mean and log-variance of a sample, [C, F, H, W]."""
        mean_key, logvar_key = schema.latent_tensor_keys(row.latent_key)
        shard = self._shard(row.latent_shard)
        return shard.get_tensor(mean_key), shard.get_tensor(logvar_key)

    @property
    def image_noise_variants(self) -> int:
        """Noised first-frame encodings per video: 0 for a text-to-video cache."""
        return self.manifest.settings.image_noise_variants

    def image_moments(self, row: schema.IndexRow) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance of every noised first-frame encoding, [K, C, 1, H, W]."""
        shard = self._shard(row.latent_shard)
        keys = [schema.image_latent_tensor_keys(row.latent_key, k) for k in range(len(row.image_noise_sigmas))]
        return (torch.stack([shard.get_tensor(mean) for mean, _ in keys]),
                torch.stack([shard.get_tensor(logvar) for _, logvar in keys]))

    def prompt_embeds(self, row: schema.IndexRow) -> torch.Tensor:
        """The stored T5 embedding of a sample's caption, [max_text_seq_length, text_dim]."""
        return self._shard(row.text_shard).get_tensor(schema.text_tensor_key(row.text_key))

    def __getstate__(self):  # DataLoader workers reopen shards themselves
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


def read_validation_inputs(cache_path: Path, pairs: list[tuple[str, str | None]], height: int, width: int
                           ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The cached T5 embedding of every validation prompt and of "" (the negative prompt), and the
    VAE moments of every validation image at height x width; a CogtuneError naming whatever
    preprocess has not encoded."""
    from safetensors.torch import load_file

    text_paths = {text: schema.validation_text_path(cache_path, text) for text in [*(p for p, _ in pairs), ""]}
    image_paths = {image: schema.validation_image_path(cache_path, files.sha256_file(image), height, width)
                   for _, image in pairs if image is not None}
    missing = [repr(text) if text else "the empty negative prompt" for text, path in text_paths.items()
               if not path.is_file()]
    missing += [f"image {image}" for image, path in image_paths.items() if not path.is_file()]
    if missing:
        raise CogtuneError(
            f"The cache {cache_path} holds no encoding of these validation inputs: {', '.join(missing)}. Run "
            "`cogtune preprocess` with the same --validation_prompt (and --validation_images): it encodes only "
            "what is missing, so that training never needs T5."
        )
    embeds = {text: load_file(path)[schema.VALIDATION_PROMPT_EMBEDS] for text, path in text_paths.items()}
    images = {}
    for image, path in image_paths.items():
        tensors = load_file(path)
        images[image] = (tensors[schema.VALIDATION_IMAGE_MEAN], tensors[schema.VALIDATION_IMAGE_LOGVAR])
    return embeds, images


def check_compatible(manifest: schema.Manifest, model: dict, cache_path: Path) -> None:
    """Refuse a cache whose tensors came from other VAE or text-encoder weights than model's
    (ModelConfigs.identity())."""
    built_for = manifest.model
    expected = {k: model[k] for k in ("vae_config_sha256", "text_encoder_config_sha256")}
    differences = schema.describe_differences(expected, {k: getattr(built_for, k) for k in expected})
    if differences:
        raise CogtuneError(
            f"The cache {cache_path} was built for another model: {built_for.pretrained_model_name_or_path}, "
            f"a {built_for.family} model, not {model['pretrained_model_name_or_path']}, a "
            f"{model.get('family', 'CogVideoX')} model. Their VAE or T5 differ:\n  " + "\n  ".join(differences)
            + "\nPreprocess the data with the model you train, or train the model the cache was built for."
        )


def check_for_training(manifest: schema.Manifest, model: dict, spec: FamilySpec, cache_path: Path) -> None:
    """Refuse a cache that the model to train cannot use: another VAE or T5, the other kind of model
    (text- or image-to-video), another text length."""
    check_compatible(manifest, model, cache_path)
    variants = manifest.settings.image_noise_variants
    if spec.image_conditioned and not variants:
        raise CogtuneError(
            f"The cache {cache_path} was built for a text-to-video model and holds no first-frame latents, but "
            f"the model to train is a {spec.description} model. Preprocess the data with this model first."
        )
    if variants and not spec.image_conditioned:
        raise CogtuneError(
            f"The cache {cache_path} was built for an image-to-video model, but the model to train is a "
            f"{spec.description} model. Preprocess the data with this model first."
        )
    cached_text_length = manifest.settings.max_text_seq_length
    if cached_text_length != spec.max_text_seq_length:
        raise CogtuneError(
            f"The cache {cache_path} holds text embeddings of {cached_text_length} tokens but the transformer takes "
            f"{spec.max_text_seq_length}."
        )
