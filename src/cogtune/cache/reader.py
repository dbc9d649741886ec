"""Reading a cache in the format of `data_schema`: a finished cache opened for its tensors (each
checked against its checksum), the validation inputs, and the sibling caches whose encodings a
new cache can copy. Its files (cache.files) and columns (cache.index) are read beside it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from cogtune import data_schema as schema
from cogtune.cache.disk import read_index, read_manifest, read_selection, read_selection_repeats
from cogtune.cache.index import TrainingSamples
from cogtune.errors import CogtuneError
from cogtune.util import files


@dataclass
class Cache:
    """A finished cache opened for reading: the selected samples, in the order of their sample ids
    (content keys), and lazy tensor access."""

    path: Path
    manifest: schema.Manifest
    samples: list[schema.IndexRow] | TrainingSamples  # the selected samples with status ok
    failed: list[schema.IndexRow] = field(default_factory=list)  # (empty when opened for training)
    failed_count: int = 0
    verify_checksums: bool = False  # check each tensor read against its shard's recorded sha256
    _handles: dict = field(default_factory=dict, repr=False)
    _checksums: dict = field(default_factory=dict, repr=False)  # shard name -> {key: sha256}

    @classmethod
    def open(cls, path: str | Path, for_training: bool = False) -> "Cache":
        """The cache at path. for_training: the samples as TrainingSamples (columns; no failed rows,
        only their count in `failed_count`), which is what a run over a million samples can hold."""
        path = Path(path)
        manifest = read_manifest(path)
        selection = read_selection(path, as_arrow=for_training)
        if selection is None:
            raise CogtuneError(
                f"{path} has no {schema.SELECTION_FILE}: its preprocess run did not finish. Run `cogtune preprocess` "
                "again with the same settings; it resumes where it stopped."
            )
        if for_training:
            samples = TrainingSamples.read(path, selection)
            repeats = read_selection_repeats(path)
            if repeats is not None:
                samples.set_repeats(*repeats)
            return cls(path=path, manifest=manifest, samples=samples, failed_count=samples.failed,
                       verify_checksums=True)
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
        failed = [row for row in rows if not row.ok]
        return cls(path=path, manifest=manifest, samples=[row for row in rows if row.ok], failed=failed,
                   failed_count=len(failed))

    def _shard(self, name: str):
        handle = self._handles.get(name)
        if handle is None:
            path = schema.shard_path(self.path, name)
            try:
                handle = safe_open(str(path), framework="pt")
                stamp = (handle.metadata() or {}).get(schema.FINGERPRINT_METADATA)
            except Exception as e:  # safetensors raises its own error types
                raise CogtuneError(f"Cache shard {path} cannot be read ({e}); run `cogtune cache verify "
                                   f"{self.path}`.") from None
            if stamp is not None and stamp != self.manifest.fingerprint:  # (shards of version 5 have none)
                raise CogtuneError(f"Cache shard {path} belongs to another cache (fingerprint {stamp}, this cache's "
                                   f"is {self.manifest.fingerprint}): it was copied in by hand. Remove it, run "
                                   f"`cogtune cache prune --damaged {self.path}`, and preprocess again.")
            self._handles[name] = handle
        return handle

    def _tensor(self, shard_name: str, key: str, sample_id: str) -> torch.Tensor:
        """A stored tensor; with verify_checksums, refused unless it hashes to what its shard
        recorded when it was written (a flipped byte is never trained on)."""
        shard = self._shard(shard_name)
        tensor = shard.get_tensor(key)
        if self.verify_checksums:
            recorded = self._checksums.get(shard_name)
            if recorded is None:
                try:
                    recorded = json.loads((shard.metadata() or {}).get(schema.CHECKSUMS_METADATA, "{}"))
                except json.JSONDecodeError:
                    recorded = {}
                self._checksums[shard_name] = recorded
            if schema.sha256_tensor(tensor) != recorded.get(key):
                raise CogtuneError(
                    f"Sample {sample_id}: tensor {key} in {schema.shard_path(self.path, shard_name)} does not match the "
                    f"checksum recorded when it was written (the file is corrupt). Run `cogtune cache verify {self.path}`, "
                    f"then `cogtune cache prune --damaged {self.path}` and preprocess again; checkpoints are intact.")
        return tensor

    def stored_tensor(self, shard_name: str, key: str) -> torch.Tensor:
        """A tensor by shard and key (checked as every read is), for copying into another cache."""
        return self._tensor(shard_name, key, key)

    def video_tensors(self, row: schema.IndexRow) -> dict[str, torch.Tensor]:
        """A sample's video tensors by name (TensorSet.video), each [C, F, H, W]."""
        return {name: self._tensor(row.latent_shard, schema.video_tensor_key(row.latent_key, name), row.sample_id)
                for name in self.manifest.tensors.video}

    @property
    def image_noise_variants(self) -> int:
        """Noised first-frame encodings per video: 0 for a text-to-video cache."""
        return self.manifest.settings.image_noise_variants

    def first_frame_tensors(self, row: schema.IndexRow) -> dict[str, torch.Tensor]:
        """Every noised first-frame encoding's tensors by name (TensorSet.first_frame), each [K, C, 1, H, W]."""
        return {name: torch.stack([self._tensor(row.latent_shard, schema.first_frame_tensor_key(row.latent_key, k, name),
                                                row.sample_id) for k in range(row.image_variants)])
                for name in self.manifest.tensors.first_frame}

    def caption_tensors(self, row: schema.IndexRow) -> dict[str, torch.Tensor]:
        """A sample's caption tensors by name (TensorSet.caption), each [text length, ...]."""
        return {name: self._tensor(row.text_shard, schema.caption_tensor_key(row.text_key, name), row.sample_id)
                for name in self.manifest.tensors.caption}

    def __getstate__(self):  # DataLoader workers reopen shards themselves
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


def read_validation_inputs(cache_path: Path, entries: list, by_frames: bool = False
                           ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[tuple, dict[str, torch.Tensor]]]:
    """The cached caption tensors of every validation prompt and of "" (the negative prompt), and the
    first-frame tensors of every validation image at its entry's height x width (and frame count, with
    by_frames: the family's first_frame_depends_on_frames), by (image, height, width); a CogtuneError
    naming whatever preprocess has not encoded."""
    from safetensors.torch import load_file

    text_paths = {text: schema.validation_text_path(cache_path, text) for text in [*(e.prompt for e in entries), ""]}
    image_paths = {(e.image, e.height, e.width): schema.validation_image_path(cache_path, files.sha256_file(e.image),
                                                                             e.height, e.width,
                                                                             e.num_frames if by_frames else None)
                   for e in entries if e.image is not None}
    missing = [repr(text) if text else "the empty negative prompt" for text, path in text_paths.items()
               if not path.is_file()]
    missing += [f"image {image} at {height}x{width}" for (image, height, width), path in image_paths.items()
                if not path.is_file()]
    if missing:
        raise CogtuneError(
            f"The cache {cache_path} holds no encoding of these validation inputs: {', '.join(missing)}. Run "
            "`cogtune preprocess` with the same --validation_prompt (and --validation_images) or --validation_file: "
            "it encodes only "
            "what is missing, so that training never needs a text encoder."
        )
    embeds = {text: load_file(path) for text, path in text_paths.items()}
    images = {image: load_file(path) for image, path in image_paths.items()}
    return embeds, images


def read_empty_prompt_embeds(cache_path: Path) -> dict[str, torch.Tensor]:
    """The cached caption tensors of the empty prompt, by name."""
    from safetensors.torch import load_file

    path = schema.validation_text_path(cache_path, "")
    if not path.is_file():
        raise CogtuneError(
            f"The cache {cache_path} holds no embedding of the empty prompt, which --caption_dropout_technique empty "
            "trains on (it was written before preprocess stored it). Run `cogtune preprocess` with the same settings "
            "once more: it encodes that one prompt and nothing else. Or use --caption_dropout_technique zero.")
    return load_file(path)


def sibling_caches(cache_path: Path, manifest: schema.Manifest) -> list[Path]:
    """The other caches beside this one (under its cache root) of the same model and tensor settings,
    whose datasets differ: they hold the same bytes for the same content, since every encoding depends
    only on the content, the model and these settings. Newest first."""
    wanted = manifest.identity_json()
    siblings = []
    for other in Path(cache_path).parent.glob(f"*/{schema.MANIFEST_FILE}"):
        if other.parent.resolve() == Path(cache_path).resolve():
            continue
        try:
            theirs = read_manifest(other.parent).identity_json()
        except CogtuneError:  # another release's or damaged: not ours to copy from
            continue
        if all(theirs[key] == wanted[key] for key in ("model", "settings", "tensors")):
            siblings.append(other.parent)
    return sorted(siblings, key=lambda path: (path / schema.MANIFEST_FILE).stat().st_mtime, reverse=True)


def sibling_tensor_reader(cache_path: Path) -> "Cache":
    """A reader of a sibling cache's tensors by shard and key, each checked against its checksum."""
    return Cache(path=Path(cache_path), manifest=read_manifest(cache_path), samples=[], verify_checksums=True)
