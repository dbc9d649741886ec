"""The parts of the docs that are written from the code and the benchmarks' results, never by hand:

    docs/flags.md                          the flag reference (config/reference.py)
    <!-- generated: families -->           README's table of families: pipeline, clip, the init
                                           config's --dry_run memory, the family's page
    <!-- generated: memory VARIANT ... -->  a family page's memory table: its init config, then every
                                           option at its card's sizes (bench/results/estimates.json)

    python -m cogtune.dev.docs            # rewrite them (make docs), after bench/estimates.py or a settings change
    python -m cogtune.dev.docs --check    # exit 1 naming each file that is out of date (a test runs this)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from cogtune.config.reference import flag_reference
from cogtune.families.models import published_folder
from cogtune.util.files import write_text

REGION = re.compile(r"(<!-- generated: (?P<what>[^>]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)
ESTIMATES = Path("bench/results/estimates.json")
# Each family variant's page (relative to docs/) and, where it runs more than one pipeline, the other.
PAGES = {
    "2b": "families/cogvideox-2b.md", "5b": "families/cogvideox-5b.md", "5b-i2v": "families/cogvideox-5b-i2v.md",
    "1.5-5b": "families/cogvideox1.5-5b.md", "1.5-5b-i2v": "families/cogvideox1.5-5b-i2v.md",
    "wan2.1-t2v-1.3b": "families/wan2.1-t2v.md", "wan2.1-t2v-14b": "families/wan2.1-t2v.md",
    "wan2.1-i2v-14b-480p": "families/wan2.1-i2v-14b.md", "wan2.1-i2v-14b-720p": "families/wan2.1-i2v-14b.md",
    "wan2.2-ti2v-5b": "families/wan2.2-ti2v-5b.md", "wan2.2-t2v-a14b": "families/wan2.2-a14b.md",
    "wan2.2-i2v-a14b": "families/wan2.2-a14b.md",
}
ALSO_RUNS = {"wan2.2-ti2v-5b": "WanImageToVideoPipeline with `image_to_video`"}


def _gib(value: float) -> str:
    return f"{value:.2f} GiB"


def _source(estimates: dict) -> str:
    return (f"Estimates of `cogtune train --dry_run` (`{estimates['command']}`, {estimates['date']}, at "
            f"{estimates['commit']}), from the published config files; not measured on a GPU.")


def estimate_row(row: dict, settings: str | None = None) -> str:
    """One row of bench/results/estimates.json as a Markdown table row (model, clip, settings, the parts)."""
    return (f"| {row['model']} | {row['clip']} | {settings or row['settings']} | {_gib(row['weights'])} | "
            f"{_gib(row['lora_gradients_optimizer'])} | {_gib(row['activations'])} | **{_gib(row['total'])}** |")


def memory_table(estimates: dict, variants: list[str]) -> str:
    """The init config's estimate of each variant, then every option at the card's sizes (batch 1, rank 64)."""
    recommended = [row for row in estimates["recommended"] if row["variant"] in variants]
    missing = set(variants) - {row["variant"] for row in recommended}
    if missing:
        raise SystemExit(f"{ESTIMATES} has no estimate for {', '.join(sorted(missing))}: run bench/estimates.py.")
    hub_ids = {row["hub_id"] for row in recommended}
    lines = ["| model | clip | settings | weights | LoRA + grads + optimizer | activations | total |",
             "|---|---|---|---|---|---|---|"]
    for row in recommended + [row for row in estimates["rows"] if row["hub_id"] in hub_ids]:
        lines.append(estimate_row(row, row["settings"] if "variant" in row else f"{row['settings']}, rank 64"))
    return "\n".join(["", _source(estimates), "", *lines, ""]) + "\n"


def families_table(estimates: dict) -> str:
    """README's table: each variant's pipeline, its card's clip and the memory its init config is expected at."""
    lines = ["| family | `--family` | pipeline | frames x height x width, fps | memory (init config) | page |",
             "|---|---|---|---|---|---|"]
    for row in estimates["recommended"]:
        variant = row["variant"]
        index = json.loads((published_folder(row["hub_id"]) / "model_index.json").read_text())
        pipeline = f"{index['_class_name']}" + (f", {ALSO_RUNS[variant]}" if variant in ALSO_RUNS else "")
        experts = ", one expert" if "expert" in row["settings"] else ""
        lines.append(f"| {row['model']} | `{variant}` | {pipeline} | {row['clip']}, {row['fps']} | "
                     f"{_gib(row['total'])}{experts} | [page](docs/{PAGES[variant]}) |")
    return "\n".join(["", *lines, "", _source(estimates).replace("Estimates", "Memory: estimates") + " "
                      "Each page gives the init config's precision and rank.", ""]) + "\n"


def generated(root: Path) -> dict[Path, str]:
    """Every generated file and every file with generated regions, as it should read."""
    if not (root / ESTIMATES).exists():
        raise SystemExit(f"{root / ESTIMATES} is missing: run `python bench/estimates.py` (about 15 minutes).")
    estimates = json.loads((root / ESTIMATES).read_text())
    files = {root / "docs" / "flags.md": flag_reference()}
    for path in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        if path in files or not path.exists():
            continue
        text = path.read_text()

        def fill(match: re.Match) -> str:
            what = match["what"].split()
            if what[0] == "families":
                body = families_table(estimates)
            elif what[0] == "memory":
                body = memory_table(estimates, what[1:])
            else:
                raise SystemExit(f"{path}: unknown generated region {match['what']!r}.")
            return match.group(1) + body + match.group(4)

        files[path] = REGION.sub(fill, text)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cogtune.dev.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Write nothing; exit 1 naming each file out of date.")
    parser.add_argument("--root", default=".", help="The repository (default: here).")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    stale = []
    for path, text in generated(root).items():
        if not path.exists() or path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text(path, text)
    for path in stale:
        print(f"{'out of date' if args.check else 'wrote'}: {path.relative_to(root)}")
    if args.check and stale:
        print("Run `make docs` and commit the result.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
