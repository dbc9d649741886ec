"""A cache of a million samples: what opening it for training costs, and what a preprocess rerun
costs, against the number of samples.

    .venv/bin/python bench/index_scale.py [--samples 100000 1000000] [--processes 1 2]
                                          [--out bench/results/index-scale]

For each size, makes the demo's 4 clips and their cache (tiny random model) in a temporary
folder, then N more source files beside them (16 bytes each: a rerun takes them as they were
recorded and never decodes them) with index rows as preprocess would have written them (their
path, size, mtime and hash; the tensors of one of the real clips), the fingerprints file and a
selection of all of them. Each measurement runs in a fresh process:

- `training view`: `Cache.open(path, for_training=True)` (the columns training keeps) and the
  shape groups the training plan batches by; wall time and growth of resident memory (sampled
  every 2 ms);
- `shard check`: `check_samples` over those samples (what `cogtune train` does before loading the
  model: shard headers against the index);
- `index rows`: `Cache.open(path)`, one IndexRow object per sample, what training held before;
- `rerun, nothing changed`: `cogtune preprocess` again over the same N+4 sources, on 1 process
  and on 2 (torchrun, gloo); wall time of the command, imports included;
- `10 clips added`: 10 new clips appended to the dataset, then the rerun; beside it, the same
  command on 10 other new clips into an empty cache: what encoding 10 clips costs by itself.
(The summary's "reused ... 4 videos" is the bench's doing: the synthetic rows name the 4 real
clips' tensors.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from decode_cost import RssPeak  # noqa: E402  (the resident-memory sampler)

COGTUNE = [sys.executable, "-m", "cogtune.cli"]


def preprocess_args(root: Path, data: Path) -> list[str]:
    return ["preprocess", "--pretrained_model_name_or_path", str(root / "model"), "--instance_data_root", str(data),
            "--cache_root", str(root / "cache"), "--height", "32", "--width", "48", "--max_num_frames", "9"]


def build(root: Path, data: Path) -> Path:
    """The cache of the demo's 4 clips, written into `data`, preprocessed with the tiny model (a
    cache belongs to its data folder: the synthetic sources go into the same folder)."""
    if not (root / "model").is_dir():
        subprocess.run([*COGTUNE, "make-tiny-model", str(root / "model")], check=True, capture_output=True)
    subprocess.run([*COGTUNE, "make-demo-data", str(data)], check=True, capture_output=True)
    out = subprocess.run([*COGTUNE, *preprocess_args(root, data)], check=True, capture_output=True,
                         text=True).stdout
    return Path(next(line[len("cache: "):] for line in out.splitlines() if line.startswith("cache: ")))


def new_clips(folder: Path, count: int, first: int) -> list[tuple[str, str]]:
    """`count` small synthetic clips, each different, written into folder: (relative path, caption)."""
    from cogtune.dev.tiny import synthetic_frames, write_mp4

    (folder / "new").mkdir(parents=True, exist_ok=True)
    added = []
    for i in range(first, first + count):
        relative = f"new/{i:04d}.mp4"
        color = (40 + 19 * i % 200, 230 - 23 * i % 200, 60 + 37 * i % 190)
        write_mp4(folder / relative, synthetic_frames(12, 48, 64, color, 1 if i % 2 else -1), 8)
        added.append((relative, f"new clip {i}"))
    return added


def timed_run(command: list[str]) -> dict:
    """Wall time of a preprocess command, and what its summary says it did."""
    import re

    started = time.perf_counter()
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    seconds = time.perf_counter() - started
    encoded = re.search(r"^encoded: (\d+) videos.*\(([\d.]+) s\)$", out, re.M)
    hashed = re.search(r"^hashed: (\d+) of (\d+)", out, re.M)
    return {"seconds": round(seconds, 1), "run_seconds": float(encoded[2]), "encoded_videos": int(encoded[1]),
            "hashed": int(hashed[1]), "sources": int(hashed[2])}


def grow(cache_path: Path, samples: int, sources: Path, part_rows: int = 100_000) -> None:
    """`samples` source files under `sources` (16 bytes each, in folders of 1,000, added to its
    videos.txt and prompts.txt), and index parts with a row for each, as a preprocess run that
    encoded them would have written: their path, size, mtime and hash, and the tensors of one of
    the cache's real rows. Also the fingerprints file and a selection of all the samples."""
    import hashlib
    import os

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from cogtune import data_schema as schema
    from cogtune.cache.disk import index_columns, read_fingerprints, read_selection
    from cogtune.cache.writer import _write_parquet, write_fingerprints, write_selection
    from cogtune.util.files import sha256_text

    index = index_columns(cache_path, schema.INDEX_SCHEMA.names)
    real = index.filter(pc.equal(index["status"], schema.STATUS_OK))
    ids, fingerprints = read_selection(cache_path), read_fingerprints(cache_path).to_pydict()
    videos = (sources / "videos.txt").read_text().splitlines()
    prompts = (sources / "prompts.txt").read_text().splitlines()
    for start in range(0, samples, part_rows):
        stop = min(samples, start + part_rows)
        columns = {name: [] for name in ("sample_id", "source_path", "source_size", "source_mtime_ns",
                                         "source_sha256", "caption", "caption_sha256")}
        for i in range(start, stop):
            relative = f"synthetic/{i // 1000:04d}/v{i:07d}.mp4"
            path = sources / relative
            if i % 1000 == 0:
                path.parent.mkdir(parents=True)
            content = i.to_bytes(16, "little")
            with open(path, "wb") as f:
                f.write(content)
            stat = os.stat(path)
            sha, caption = hashlib.sha256(content).hexdigest(), f"caption {i}"
            for name, value in zip(columns, (schema.sample_id(sha, caption), str(path), stat.st_size,
                                             stat.st_mtime_ns, sha, caption, sha256_text(caption))):
                columns[name].append(value)
            videos.append(relative)
            prompts.append(caption)
        table = real.take(pa.array(np.arange(stop - start) % len(real)))
        for name, values in columns.items():
            table = table.set_column(table.schema.get_field_index(name), name,
                                     pa.array(values, table.schema.field(name).type))
        _write_parquet(schema.index_part_path(cache_path, f"synthetic-{start:09d}"), table)
        ids += columns["sample_id"]
        for name in schema.FINGERPRINTS_SCHEMA.names:
            fingerprints[name] += columns[name]
    write_selection(cache_path, ids)
    write_fingerprints(cache_path, pa.table(fingerprints).sort_by(  # sorted, as preprocess writes it
        [(name, "ascending") for name in schema.FINGERPRINTS_SCHEMA.names]))
    (sources / "videos.txt").write_text("\n".join(videos) + "\n")
    (sources / "prompts.txt").write_text("\n".join(prompts) + "\n")


def measure(cache_path: Path, what: str) -> dict:
    """In this process (a child): one measurement."""
    from cogtune.cache.reader import Cache
    from cogtune.cache.verify import check_samples

    rss = RssPeak().__enter__()
    started = time.perf_counter()
    if what == "training view":
        cache = Cache.open(cache_path, for_training=True)
        groups = cache.samples.shape_groups  # what the training plan batches by
        detail = {"samples": len(cache.samples), "column_mib": round(cache.samples.nbytes / 2**20, 1),
                  "shapes": len(set(groups))}
    elif what == "shard check":
        cache = Cache.open(cache_path, for_training=True)
        opened = time.perf_counter()
        report = check_samples(cache_path, cache.manifest, cache.samples, checksums=False)
        detail = {"samples": len(cache.samples), "ok": report.ok, "check_seconds": round(time.perf_counter() - opened, 2)}
    else:
        cache = Cache.open(cache_path)
        detail = {"samples": len(cache.samples)}
    seconds = time.perf_counter() - started
    rss.__exit__(None, None, None)
    return {"what": what, "seconds": round(seconds, 2), "peak_rss_growth_mib": round(rss.growth / 2**20), **detail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                        help="Process counts of the rerun measurement (torchrun with gloo beyond 1).")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "index-scale")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), args.child[1])))
        return
    root = Path(tempfile.mkdtemp(prefix="cogtune-index-"))
    results = []

    def record(row):
        print(json.dumps(row), flush=True)
        results.append(row)

    for samples in args.samples:
        started = time.perf_counter()
        sources = root / f"sources-{samples}"
        cache_path = build(root, sources)
        grow(cache_path, samples, sources)
        print(json.dumps({"samples": samples, "index_written_seconds": round(time.perf_counter() - started, 1)}))
        for what in ("training view", "shard check", "index rows"):
            child = [sys.executable, __file__, "--child", str(cache_path), what]
            record({"cache_samples": samples, **json.loads(subprocess.run(child, check=True, capture_output=True,
                                                                          text=True).stdout)})
        # Reruns of preprocess over the same sources: nothing changed; then 10 clips added.
        for processes in args.processes:
            launcher = COGTUNE if processes == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                "-m", "cogtune.cli"]
            record({"cache_samples": samples, "what": f"rerun, nothing changed, {processes} process" + ("es" if processes > 1 else ""),
                    **timed_run([*launcher, *preprocess_args(root, sources)])})
        added = new_clips(sources, 10, first=samples)
        with open(sources / "videos.txt", "a") as videos, open(sources / "prompts.txt", "a") as prompts:
            for relative, caption in added:
                videos.write(relative + "\n")
                prompts.write(caption + "\n")
        record({"cache_samples": samples, "what": "rerun, 10 clips added, 1 process",
                **timed_run([*COGTUNE, *preprocess_args(root, sources)])})
        alone = root / f"alone-{samples}"
        new_clips(alone, 10, first=samples + 10)  # other clips, so nothing is reused
        (alone / "videos.txt").write_text("".join(f"new/{i:04d}.mp4\n" for i in range(samples + 10, samples + 20)))
        (alone / "prompts.txt").write_text("".join(f"new clip {i}\n" for i in range(samples + 10, samples + 20)))
        fresh = preprocess_args(root, alone)
        fresh[fresh.index("--cache_root") + 1] = str(root / f"cache-alone-{samples}")
        record({"cache_samples": samples, "what": "10 clips into an empty cache (the cost of encoding them)",
                **timed_run([*COGTUNE, *fresh])})
    lines = ["# A cache of a million samples (`bench/index_scale.py`)", "",
             "Synthetic sources and index rows beside the demo's 4 clips (see the script's docstring). Each figure in "
             "a fresh process. `seconds`: wall time, imports included (about 8 s for a `cogtune` command here); "
             "`run`: the time preprocess itself reports; RSS: growth of resident memory over the interpreter with its "
             "imports, sampled every 2 ms.", "",
             "| samples | what | seconds | peak RSS growth (MiB) | detail |", "|---|---|---|---|---|"]
    for row in results:
        detail = {k: v for k, v in row.items() if k not in ("cache_samples", "what", "seconds", "peak_rss_growth_mib")}
        text = ", ".join(f"{k}: {v}" for k, v in detail.items())
        lines.append(f"| {row['cache_samples']:,} | {row['what']} | {row['seconds']} | "
                     f"{row.get('peak_rss_growth_mib', '')} | {text} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
