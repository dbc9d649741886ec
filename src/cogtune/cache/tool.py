"""`cogtune cache inspect | verify | prune`: look into a cache, prove it intact, tidy it up.

- inspect: what a cache holds (samples, buckets, bytes, settings, failures), or the caches under a root.
- verify: every tensor an index row names is present, with the shape and dtype the index and the
  manifest say and the checksum its shard recorded; names each damaged sample.
- prune: removes failed entries, shards no row uses and temp files left by killed runs; optionally
  samples outside the last run's selection and damaged samples. Removed samples are encoded again by
  the next preprocess run. Runs only while no preprocess writes to the cache (the cache lock)."""

from __future__ import annotations

import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cogtune import data_schema as schema
from cogtune.cache.disk import index_parts, read_index, read_manifest, read_selection
from cogtune.cache.identity import list_caches
from cogtune.cache.verify import human_bytes, verify
from cogtune.cache.writer import cache_lock, write_index_part, write_selection
from cogtune.errors import CogtuneError
from cogtune.util import files


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


ONE_SIZE_SETTINGS = ("height", "width", "max_num_frames")  # unused by a cache of buckets: not shown


def inspect(path: str | Path, failures_shown: int = 10) -> str:
    """A human summary of one cache, or a list of the caches under a cache root."""
    path = Path(path)
    if not (path / schema.MANIFEST_FILE).is_file():
        caches = list_caches(path)
        if not caches:
            raise CogtuneError(f"{path} is neither a cogtune cache nor a folder holding caches.")
        lines = [f"{len(caches)} caches under {path}:"]
        for cache_path in caches:
            selection = read_selection(cache_path)
            size = sum(_size(p) for p in schema.shard_paths(cache_path))
            state = f"{len(selection)} samples" if selection is not None else "unfinished"
            lines.append(f"  {cache_path.name}  ({state}, {human_bytes(size)})")
        return "\n".join(lines)

    manifest = read_manifest(path)
    rows = read_index(path)
    selection = read_selection(path)
    selected = set(selection or [])
    ok = [r for r in rows if r.ok and r.sample_id in selected]
    failed = [r for r in rows if not r.ok]
    shards = schema.shard_paths(path)
    used = used_shards(rows)
    orphans = [p for p in shards if p.stem not in used]
    shard_bytes = sum(_size(p) for p in shards)
    index_bytes = sum(_size(p) for p in index_parts(path))
    temps = temp_files(path)
    model = manifest.model
    lines = [
        f"cache: {path.resolve()}",
        f"format version {manifest.format_version}, fingerprint {manifest.fingerprint}",
        f"model: {model.pretrained_model_name_or_path} ({model.description})",
        "dataset: " + ", ".join(f"{k}={v}" for k, v in sorted(manifest.to_json()["dataset"].items()) if v is not None),
        "settings: " + ", ".join(f"{k}={v}" for k, v in sorted(manifest.to_json()["settings"].items())
                                 if v is not None and not (manifest.settings.buckets and k in ONE_SIZE_SETTINGS)),
        ("samples: unfinished (no preprocess run has finished yet); " if selection is None
         else f"samples: {len(ok)} selected and usable; ")
        + f"{sum(r.ok for r in rows)} encoded in all, {len(failed)} failed",
        "buckets: " + (", ".join(f"{name} ({count})" for name, count in
                                 sorted(Counter(r.bucket for r in ok).items())) or "(none)"),
        f"bytes: {human_bytes(shard_bytes)} in {len(shards)} shards"
        + (f" ({human_bytes(shard_bytes // len(ok))} per sample)" if ok else "") + f", index {human_bytes(index_bytes)}",
    ]
    if orphans or temps:
        lines.append(f"prunable: {len(orphans)} shards no sample uses ({human_bytes(sum(map(_size, orphans)))}), "
                     f"{len(temps)} temp files; `cogtune cache prune {path}` removes them")
    if failed:
        kinds = Counter(r.failure_kind or "unreadable" for r in failed)
        lines.append("failures: " + ", ".join(f"{kind} ({count})" for kind, count in kinds.most_common()))
        lines += [f"  {r.source_path}: {r.reason}" for r in failed[:failures_shown]]
        if len(failed) > failures_shown:
            lines.append(f"  ... and {len(failed) - failures_shown} more (in the index: status == 'failed')")
    return "\n".join(lines)


def used_shards(rows) -> set[str]:
    """The shards that hold a tensor of an ok row; any other shard can go."""
    return {name for row in rows if row.ok
            for name in (row.latent_shard, row.text_shard)}


def temp_files(cache_path: Path) -> list[Path]:
    """Temp files that killed writers left behind (never visible to readers)."""
    folders = (cache_path, cache_path / schema.SHARDS_DIR, cache_path / schema.INDEX_DIR)
    return sorted(p for folder in folders for p in folder.glob(f".*{files.TEMP_SUFFIX}") if p.is_file())


@dataclass
class PruneResult:
    failed: int = 0
    unselected: int = 0
    damaged: int = 0
    orphan_shards: int = 0
    temp_files: int = 0
    damaged_index_parts: int = 0
    bytes_freed: int = 0
    removed_cache: bool = False  # an unfinished cache that held nothing: the folder itself

    def text(self, dry_run: bool) -> str:
        verb = "would remove" if dry_run else "removed"
        if self.removed_cache:
            return f"{verb} the cache folder: no preprocess run finished it, and it held nothing"
        return (f"{verb}: {self.failed} failed entries, {self.unselected} unselected samples, "
                f"{self.damaged} damaged samples, {self.damaged_index_parts} damaged index parts, "
                f"{self.orphan_shards} unused shards, {self.temp_files} temp files ({human_bytes(self.bytes_freed)})")


def is_unfinished_and_empty(cache_path: Path) -> bool:
    """A cache no preprocess run finished and nothing was written to: a manifest alone (a run that
    stopped on a bad dataset before encoding anything)."""
    return (read_selection(cache_path) is None and not schema.shard_paths(cache_path)
            and not index_parts(cache_path) and not any((cache_path / schema.VALIDATION_INPUTS_DIR).glob("*")))


def prune_root(cache_root: Path, dry_run: bool = False) -> list[Path]:
    """`cogtune cache prune CACHE_ROOT`: the unfinished, empty caches under it go (not one that a run
    is writing: each is taken under its exclusive lock). Returns them."""
    removed = []
    for cache_path in list_caches(cache_root):
        try:
            with cache_lock(cache_path, exclusive=True):
                if is_unfinished_and_empty(cache_path):
                    removed.append(cache_path)
                    if not dry_run:
                        shutil.rmtree(cache_path)
        except CogtuneError:  # in use: not ours to judge now
            continue
    return removed


def prune(cache_path: str | Path, failed: bool = True, unselected: bool = False, damaged: bool = False,
          dry_run: bool = False) -> PruneResult:
    cache_path = Path(cache_path)
    read_manifest(cache_path)
    with cache_lock(cache_path, exclusive=True):
        if is_unfinished_and_empty(cache_path):  # nothing in it to keep: the folder goes
            if not dry_run:
                shutil.rmtree(cache_path)
            return PruneResult(removed_cache=True)
        if damaged:
            report = verify(cache_path, checksums=True)
            rows, damaged_parts = report.rows, report.damaged_index_parts
        else:  # the index alone says what is failed, unselected or unused
            damaged_parts = []
            rows = {row.sample_id: row for row in read_index(cache_path, damaged_parts)}
        selection = read_selection(cache_path)
        selected = set(selection or [])
        result = PruneResult(damaged_index_parts=len(damaged_parts))

        drop = set()
        if failed:
            gone = {sid for sid, row in rows.items() if not row.ok}
            result.failed, drop = len(gone), drop | gone
        if unselected and selection is not None:
            gone = {sid for sid in rows if sid not in selected} - drop
            result.unselected, drop = len(gone), drop | gone
        if damaged:
            gone = {sid for sid, row in rows.items() if sid in report.damaged or
                    (row.ok and
                     {row.latent_shard, row.text_shard} & report.damaged_shards)}
            result.damaged, drop = len(gone - drop), drop | gone
        kept = [row for sid, row in rows.items() if sid not in drop]
        used = used_shards(kept)
        doomed_shards = [p for p in schema.shard_paths(cache_path)
                         if p.stem not in used]
        temps = temp_files(cache_path)
        result.orphan_shards, result.temp_files = len(doomed_shards), len(temps)
        result.bytes_freed = sum(map(_size, doomed_shards + temps))
        if dry_run:
            return result

        # In an order that a kill at any point leaves a whole cache: first the selection shrinks to
        # what stays (every sample it names still has its rows), then one compacted index part is
        # written before the old ones go, and the unused shards go last.
        kept_ids = {row.sample_id for row in kept}
        if selection is not None and not selected <= kept_ids:  # training reads the selection: no holes
            write_selection(cache_path, [sid for sid in selection if sid in kept_ids])
        old_parts = index_parts(cache_path)
        if drop or damaged_parts or len(old_parts) > 1:
            new_part = write_index_part(cache_path, f"pruned-{uuid.uuid4().hex[:12]}", kept) if kept else None
            for part in old_parts:
                if part != new_part:
                    part.unlink(missing_ok=True)
        for path in doomed_shards + temps:
            path.unlink(missing_ok=True)
        return result


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="cogtune cache", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("inspect", help="What a cache holds, or the caches under a cache root.")
    p.add_argument("path", help="A cache folder, or a --cache_root holding caches.")
    p = sub.add_parser("verify", help="Check every tensor against the index and its checksum; exit 1 if damaged.")
    p.add_argument("path", help="A cache folder.")
    p.add_argument("--no_checksums", action="store_true", help="Check headers, shapes and dtypes only (fast).")
    p.add_argument("--selected_only", action="store_true", help="Check only the samples training reads.")
    p = sub.add_parser("prune", help="Remove failed entries, unused shards and temp files.")
    p.add_argument("path", help="A cache folder.")
    p.add_argument("--keep_failed", action="store_true",
                   help="Keep the failed entries (by default they are removed, so the next run retries them).")
    p.add_argument("--unselected", action="store_true",
                   help="Also remove samples that the last preprocess run did not select (clips no longer in the "
                        "dataset) and the shards only they used.")
    p.add_argument("--damaged", action="store_true",
                   help="Verify checksums first and remove damaged shards and every sample that used them.")
    p.add_argument("--dry_run", action="store_true", help="Say what would be removed; remove nothing.")
    args = parser.parse_args(argv)

    if args.action == "inspect":
        print(inspect(args.path))
        return 0
    if args.action == "verify":
        report = verify(args.path, checksums=not args.no_checksums, selected_only=args.selected_only)
        print(report.text(checksums=not args.no_checksums))
        return 0 if report.ok else 1
    if not (Path(args.path) / schema.MANIFEST_FILE).is_file() and list_caches(args.path):  # a cache root
        removed = prune_root(Path(args.path), args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {len(removed)} unfinished, empty cache(s) under {args.path}"
              + "".join(f"\n  {path.name}" for path in removed)
              + "\n(prune each cache folder for its failed entries, unused shards and temp files)")
        return 0
    result = prune(args.path, failed=not args.keep_failed, unselected=args.unselected, damaged=args.damaged,
                   dry_run=args.dry_run)
    print(result.text(args.dry_run))
    return 0
