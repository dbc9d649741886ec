"""`cogtune init`: write a family's config, the accelerate configs and the Slurm scripts into a
folder, from the copies that ship inside the package (so an installed cogtune has everything the
README's commands point at).

    cogtune init --family 5b my-run      # my-run/cogvideox-5b-lora.toml, my-run/accelerate/, my-run/slurm/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cogtune.errors import CogtuneError
from cogtune.families import VARIANTS

TEMPLATES = Path(__file__).resolve().parent  # configs/, accelerate/ and slurm/ beside this file
# Every variant the family registry knows has a config (configs/<its model, lower case>-lora.toml).
FAMILIES = {**{variant: f"{model.lower()}-lora.toml" for variant, (_, model) in VARIANTS.items()}, "demo": "demo.toml"}
CONFIG_PLACEHOLDER = "@CONFIG@"  # the Slurm scripts' default --config


def template_files(family: str) -> dict[str, str]:
    """Relative path in the new folder -> text, for a family."""
    config_name = FAMILIES[family]
    files = {config_name: (TEMPLATES / "configs" / config_name).read_text()}
    for folder in ("accelerate", "slurm"):
        for path in sorted((TEMPLATES / folder).iterdir()):
            files[f"{folder}/{path.name}"] = path.read_text().replace(CONFIG_PLACEHOLDER, config_name)
    return files


def init(family: str, folder: Path, force: bool = False) -> list[Path]:
    """Write the family's files into folder; refuses to replace files that exist unless force."""
    files = template_files(family)
    existing = [name for name in files if (folder / name).exists()]
    if existing and not force:
        raise CogtuneError(f"{folder} already holds {', '.join(existing)}; nothing was written. Choose another "
                           "folder, or pass --force to replace them.")
    written = []
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if path.suffix == ".sbatch":
            path.chmod(0o755)
        written.append(path)
    return written


def main(argv: list[str], description: str) -> None:
    parser = argparse.ArgumentParser(prog="cogtune init", description=description)
    parser.add_argument("folder", nargs="?", default=".", help="Where to write the files (default: here).")
    parser.add_argument("--family", choices=list(FAMILIES), required=True,
                        help="The model family to write a config for (demo: the tiny CPU demo).")
    parser.add_argument("--force", action="store_true", help="Replace files that exist.")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    written = init(args.family, folder, args.force)
    config = folder / FAMILIES[args.family]
    print(f"config: {config}")
    print(f"wrote {len(written)} files under {folder}: the config, accelerate/ (multi-GPU configs) and slurm/ "
          "(batch scripts that survive preemption)")
    if args.family != "demo":
        print(f"next: set instance_data_root in {config} (or pass --instance_data_root to each stage), then\n"
              f"  cogtune preprocess --config {config}\n  cogtune train --config {config}")
