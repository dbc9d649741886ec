"""Checking a cache's tensors before they are trained on (`cogtune cache verify`, and training's
own check before the model loads): every tensor a sample needs is in its shard, of the right dtype
and shape, and (with checksums) the bytes recorded when it was written."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open

from cogtune import data_schema as schema
from cogtune.cache.disk import read_index, read_manifest, read_selection
from cogtune.cache.index import TrainingSamples, group_starts, sort_keys
from cogtune.errors import CogtuneError, first_line


def _shape_matches(shape: list[int], expected: tuple) -> bool:
    return expected is None or len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))


@dataclass
class Report:
    """What verify found: problems per sample and per file."""

    cache_path: Path
    samples: int = 0  # ok index rows checked
    shards: int = 0
    bytes_hashed: int = 0
    damaged: dict = field(default_factory=lambda: defaultdict(list))  # sample_id -> problems
    damaged_shards: set = field(default_factory=set)
    damaged_index_parts: list = field(default_factory=list)
    cache_problems: list = field(default_factory=list)  # not tied to one sample
    rows: dict[str, schema.IndexRow] = field(default_factory=dict)  # by sample_id

    @property
    def ok(self) -> bool:
        return not (self.damaged or self.damaged_shards or self.damaged_index_parts or self.cache_problems)

    def text(self, checksums: bool) -> str:
        lines = [f"cache: {self.cache_path}",
                 f"checked: {self.samples} samples in {self.shards} shards"
                 + (f", {human_bytes(self.bytes_hashed)} hashed" if checksums else " (headers only)")]
        lines += [f"problem: {problem}" for problem in self.cache_problems]
        lines += [f"damaged index part: {part}" for part in self.damaged_index_parts]
        if self.damaged:
            lines.append(f"damaged: {len(self.damaged)} samples")
            for sid, problems in sorted(self.damaged.items()):
                row = self.rows.get(sid)
                source = row.source_path if row is not None else "?"
                lines.append(f"  {sid} ({source}): " + "; ".join(dict.fromkeys(problems)))
        if self.ok:
            lines.append("ok")
        else:
            lines.append(f"Run `cogtune cache prune --damaged {self.cache_path}` to drop what is damaged, then "
                         "`cogtune preprocess` with the same settings to encode it again.")
        return "\n".join(lines)


def verify(cache_path: str | Path, checksums: bool = True, selected_only: bool = False) -> Report:
    """Check every ok sample of the index (or of the selection) against the shards."""
    cache_path = Path(cache_path)
    manifest = read_manifest(cache_path)
    report = Report(cache_path=cache_path)
    rows = {row.sample_id: row for row in read_index(cache_path, report.damaged_index_parts)}
    report.rows = rows
    try:
        selection = read_selection(cache_path)
    except CogtuneError as e:
        selection = []
        report.cache_problems.append(str(e))
    if selection is None:
        report.cache_problems.append(f"no {schema.SELECTION_FILE}: no preprocess run has finished; run it again "
                                     "with the same settings to finish the cache")
        selection = []
    for sid in selection:
        if sid not in rows:
            report.damaged[sid].append("selected but has no index row")
    selected = set(selection)
    checked = [row for row in rows.values() if row.ok
               and (not selected_only or row.sample_id in selected)]
    return check_samples(cache_path, manifest, checked, checksums, report)


def check_samples(cache_path: Path, manifest: schema.Manifest, rows, checksums: bool,
                  report: Report | None = None) -> Report:
    """Check the tensors of these ok index rows (or TrainingSamples) against the shards (into
    report, or a new one). Samples that name the same tensors are checked once, as one."""
    if isinstance(rows, TrainingSamples):
        return _check_training_samples(cache_path, manifest, rows, checksums)
    report = report or Report(cache_path=Path(cache_path), rows={row.sample_id: row for row in rows})
    report.samples = len(rows)
    return _check_shards(cache_path, manifest, _needed(rows, manifest), checksums, report)


def _check_training_samples(cache_path: Path, manifest: schema.Manifest, samples: TrainingSamples,
                            checksums: bool) -> Report:
    """check_samples for the columns training holds: one representative per distinct set of tensors
    (a video and a caption), its problems then given to every sample that shares them."""
    columns = samples.columns
    keys = [columns["latent_shard"], *sort_keys(columns["latent_key"]), columns["text_shard"],
            *sort_keys(columns["text_key"]), columns["image_variants"], *columns["latent_shape"].T]
    order = np.lexsort(keys[::-1])
    starts = group_starts(keys, order)  # where another set of tensors begins in that order
    first = order[starts]
    which = np.empty(len(order), np.int64)
    which[order] = np.cumsum(starts) - 1  # each sample's set of tensors
    representatives = [samples[int(i)] for i in first]
    checked = _check_shards(cache_path, manifest, _needed(representatives, manifest), checksums,
                            Report(cache_path=Path(cache_path)))
    report = Report(cache_path=Path(cache_path), samples=len(samples), shards=checked.shards,
                    bytes_hashed=checked.bytes_hashed, damaged_shards=checked.damaged_shards)
    for number, representative in enumerate(representatives):
        problems = checked.damaged.get(representative.sample_id)
        if problems:
            for index in np.nonzero(which == number)[0]:
                report.damaged[columns["sample_id"][index].decode()].extend(problems)
    return report


def _needed(rows, manifest: schema.Manifest) -> dict[str, dict[str, list]]:
    needed: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))  # shard -> key -> [(sid, shape)]
    for row in rows:
        for shard, key, shape in row.tensors(manifest.tensors, manifest.settings.text_length):
            needed[shard][key].append((row.sample_id, shape))
    return needed


def _check_shards(cache_path: Path, manifest: schema.Manifest, needed: dict, checksums: bool, report: Report) -> Report:
    """Open each shard once and check the keys, dtypes, shapes (and checksums) its users need."""
    dtype = schema.DTYPES[manifest.settings.latent_dtype]

    for shard_name, keys in sorted(needed.items(), key=lambda item: str(item[0])):
        report.shards += 1

        def damage(problem: str, users: list) -> None:
            report.damaged_shards.add(shard_name)
            for sid, _ in users:
                report.damaged[sid].append(problem)

        everyone = [user for users in keys.values() for user in users]
        if not schema.valid_shard_name(shard_name):
            damage(f"names shard {shard_name!r}, which is not a file in the cache's shards/ folder", everyone)
            continue
        path = schema.shard_path(cache_path, shard_name)
        if not path.is_file():
            damage(f"shard {shard_name} is missing", everyone)
            continue
        try:
            with safe_open(str(path), framework="pt") as shard:
                stored = set(shard.keys())
                recorded = json.loads((shard.metadata() or {}).get(schema.CHECKSUMS_METADATA, "{}"))
                for key, users in keys.items():
                    if key not in stored:
                        damage(f"{key} is missing from shard {shard_name}", users)
                        continue
                    header = shard.get_slice(key)
                    shape = list(header.get_shape())
                    if header.get_dtype() != schema.SAFETENSORS_DTYPES[dtype]:
                        damage(f"{key} is {header.get_dtype()}, the cache stores {schema.SAFETENSORS_DTYPES[dtype]}", users)
                    for sid, expected in users:
                        if not _shape_matches(shape, expected):
                            damage(f"{key} has shape {shape}, the index says "
                                   f"{['*' if e is None else e for e in expected]}", [(sid, expected)])
                    if checksums:
                        tensor = shard.get_tensor(key)
                        report.bytes_hashed += tensor.numel() * tensor.element_size()
                        if key not in recorded:
                            damage(f"{key} has no checksum in shard {shard_name}", users)
                        elif schema.sha256_tensor(tensor) != recorded[key]:
                            damage(f"{key} does not match its checksum (shard {shard_name} is corrupt)", users)
        except Exception as e:  # safetensors raises its own error types for damaged files
            damage(f"shard {shard_name} cannot be read ({first_line(e)[:120]})", everyone)
    return report


def human_bytes(n: int) -> str:
    """A byte count for people: 812 B, 3.2 KiB, 41.0 MiB, 1.3 GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
