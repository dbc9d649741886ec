"""The flag reference (docs/flags.md), written from the settings' own metadata: one section per group of
settings, in the order the stages list them (preprocess, then train, then infer), as `--help` groups
them. `python -m cogtune.dev.docs` writes it; a test fails when the file differs from what this gives."""

from __future__ import annotations

import dataclasses

from cogtune.config import STAGE_CONFIGS, _base_type, settings_fields
from cogtune.config.base import RULES, Group

HEADER = """\
# Flag reference

<!-- Written by `make docs` (python -m cogtune.dev.docs) from the settings' own help texts, defaults, choices
and rules: edit those in src/cogtune/config/, never this file. -->

Every setting is a flag of the stages that take it and a key of the config file (the flag's name
without the dashes, at the top of the file for every stage or in a `[preprocess]`, `[train]` or
`[infer]` table for one). A flag on the command line beats the file. Every stage accepts every
stage's flags and leaves the others' to them, so one command line serves all three. The sections
are the groups `cogtune <stage> --help` prints; [the config file](training.md#the-config-file) says
how a file and flags combine.

Yes/no settings take `--flag` and `--no-flag` on the command line, `true` or `false` in a file.
Settings marked *config file only* have no flag.
"""


def group_title(group: type[Group]) -> str:
    """A group's section title: the first line of its docstring (the same as `--help`'s)."""
    return (group.__doc__ or group.__name__).strip().splitlines()[0].rstrip(".")


def stage_groups() -> list[tuple[type[Group], list[str]]]:
    """Every group of settings once, in the order the stages list them, with the stages that take it."""
    groups: dict[type[Group], list[str]] = {}
    for stage, cls in STAGE_CONFIGS.items():
        for group in cls.__bases__:
            groups.setdefault(group, []).append(stage)
    return list(groups.items())


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    if isinstance(value, list):
        return "`[]`" if not value else "`" + " ".join(map(str, value)) + "`"
    return f"`{value}`"


def _type(f: dataclasses.Field, cls: type) -> str:
    if f.metadata.get("choices"):
        return " \\| ".join(f"`{choice}`" for choice in f.metadata["choices"])
    kind = _base_type(f, cls)
    return {bool: "yes/no", int: "integer", float: "number", str: "text", list: "list"}.get(kind, kind.__name__)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def flag_reference() -> str:
    """docs/flags.md: each group's settings, as a table of flag, value, default and meaning."""
    lines = [HEADER]
    contents = []
    sections = []
    for group, stages in stage_groups():
        title = group_title(group)
        anchor = "-".join("".join(c for c in title.lower() if c.isalnum() or c in " -").split())
        contents.append(f"- [{title}](#{anchor})")
        stage_cls = STAGE_CONFIGS[stages[0]]
        fields = {f.name: f for f in settings_fields(stage_cls)}
        rows = ["| setting | takes | default | what it does |", "|---|---|---|---|"]
        for name in group.own_fields():
            f = fields.get(name)
            if f is None:
                continue
            flag = f"`{name}` (config file only)" if f.metadata.get("file_only") else f"`--{name}`"
            said = [RULES[rule][1] for rule in f.metadata.get("rules", ())]
            meaning = f.metadata["help"] + (f" Rule: {'; '.join(said)}." if said else "")
            rows.append(f"| {flag} | {_type(f, stage_cls)} | {_default(f)} | {_cell(meaning)} |")
        sections += [f"## {title}", "", f"Stages: {', '.join(f'`{stage}`' for stage in stages)}.", "", *rows, ""]
    lines += ["## Groups", "", *contents, "", *sections]
    lines.append("Other commands (`cogtune init`, `export`, `merge`, `cache`, `make-tiny-model`, `make-demo-data`) "
                 "describe their few flags in `cogtune <command> --help`.")
    return "\n".join(lines) + "\n"
