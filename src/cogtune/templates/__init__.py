"""`cogtune init`: write a family's config, the accelerate configs and the Slurm scripts into a
folder, from the copies that ship inside the package (so an installed cogtune has everything the
README's commands point at).

    cogtune init --family 5b my-run          # my-run/cogvideox-5b-lora.toml, my-run/accelerate/, my-run/slurm/
    cogtune init --family 5b --tiny my-run   # the same, pointed at a tiny random model and synthetic clips
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from cogtune.errors import CogtuneError
from cogtune.families import VARIANTS
from cogtune.util import logs

TEMPLATES = Path(__file__).resolve().parent  # configs/, accelerate/ and slurm/ beside this file
# Every variant the family registry knows has a config (configs/<its model, lower case>-lora.toml).
FAMILIES = {**{variant: f"{model.lower()}-lora.toml" for variant, (_, model) in VARIANTS.items()}, "demo": "demo.toml"}
CONFIG_PLACEHOLDER = "@CONFIG@"  # the Slurm scripts' default --config
# --tiny: the settings a rehearsal on a CPU changes (the model and data it builds in the folder, a small
# clip size that every family takes, a few steps); every other setting stays the family's.
TINY_MODEL, TINY_DATA = "tiny-model", "data"
TINY_SETTINGS = {"pretrained_model_name_or_path": TINY_MODEL, "instance_data_root": TINY_DATA, "height": 32,
                 "width": 64, "fps": 8, "max_num_frames": 9, "num_frames": 9, "mixed_precision": "no",
                 "num_train_epochs": None, "max_train_steps": 4, "checkpointing_steps": 2, "lr_warmup_steps": 0,
                 "num_inference_steps": 4, "validation_num_inference_steps": 4, "image": f"{TINY_DATA}/videos/00000.mp4"}
TINY_WHERE_SET = ("image", "num_frames", "num_inference_steps", "validation_num_inference_steps")  # not added


def template_files(family: str) -> dict[str, str]:
    """Relative path in the new folder -> text, for a family."""
    config_name = FAMILIES[family]
    files = {config_name: (TEMPLATES / "configs" / config_name).read_text()}
    for folder in ("accelerate", "slurm"):
        for path in sorted((TEMPLATES / folder).iterdir()):
            files[f"{folder}/{path.name}"] = path.read_text().replace(CONFIG_PLACEHOLDER, config_name)
    return files


def tiny_config(text: str, family: str) -> str:
    """A family's config for a rehearsal on a CPU: TINY_SETTINGS replace the values of the keys the file
    sets (in the table that sets them) or join its top-level keys (those of TINY_WHERE_SET only replace);
    the other settings stay."""
    lines = text.splitlines()
    for key, value in TINY_SETTINGS.items():
        pattern = re.compile(rf"^{re.escape(key)}\s*=")
        found = [i for i, line in enumerate(lines) if pattern.match(line)]
        for i in reversed(found):
            del lines[i]
        if value is None:
            continue
        line = f"{key} = " + (f'"{value}"' if isinstance(value, str) else str(value))
        if found:
            lines.insert(found[0], line)
        elif key not in TINY_WHERE_SET:
            top = next((i for i, line in enumerate(lines) if line.startswith("[")), len(lines))
            lines.insert(top, line)
    header = (f"# REHEARSAL (`cogtune init --tiny`): {family}'s config, pointed at a tiny random-weight model of the "
              f"same family ({TINY_MODEL}/) and synthetic clips ({TINY_DATA}/), at 9x32x64 for a few steps, so that "
              "every command runs on a CPU in seconds. The videos it makes are noise. For the real run, "
              "`cogtune init` without --tiny.")
    return header + "\n" + "\n".join(lines) + "\n"


def init(family: str, folder: Path, force: bool = False, tiny: bool = False) -> list[Path]:
    """Write the family's files into folder; refuses to replace files that exist unless force. With tiny,
    the config is tiny_config's, and the tiny model and synthetic clips it names are built beside it."""
    if tiny and family == "demo":
        raise CogtuneError("--tiny rehearses a family's config; the demo is tiny already.")
    files = template_files(family)
    if tiny:
        files[FAMILIES[family]] = tiny_config(files[FAMILIES[family]], family)
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
    if tiny:
        from cogtune.dev.tiny import make_demo_data, make_tiny_model

        make_tiny_model(folder / TINY_MODEL, family=family)
        make_demo_data(folder / TINY_DATA)
    return written


def main(argv: list[str], description: str) -> None:
    parser = argparse.ArgumentParser(prog="cogtune init", description=description)
    parser.add_argument("folder", nargs="?", default=".", help="Where to write the files (default: here).")
    parser.add_argument("--family", choices=list(FAMILIES), required=True,
                        help="The model family to write a config for (demo: the tiny CPU demo).")
    parser.add_argument("--force", action="store_true", help="Replace files that exist.")
    parser.add_argument("--tiny", action="store_true",
                        help="Rehearse on a CPU: the same config, pointed at a tiny random-weight model of the family "
                             "and synthetic clips that init builds in the folder, at 9x32x64 for a few steps.")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if args.tiny:
        logs.configure("text")  # no library progress bars while the tiny model is saved
    written = init(args.family, folder, args.force, args.tiny)
    config = folder / FAMILIES[args.family]
    print(f"config: {config}")
    print(f"wrote {len(written)} files under {folder}: the config, accelerate/ (multi-GPU configs) and slurm/ "
          "(batch scripts that survive preemption)")
    if args.tiny:
        print(f"rehearsal: a tiny {args.family} model in {folder / TINY_MODEL} and synthetic clips in "
              f"{folder / TINY_DATA}; every command runs on a CPU:\n  cogtune preprocess --config {config}\n"
              f"  cogtune train --config {config}\n  cogtune infer --config {config}")
    elif args.family != "demo":
        print(f"next: set instance_data_root in {config} (or pass --instance_data_root to each stage), then\n"
              f"  cogtune preprocess --config {config}\n  cogtune train --config {config}")
