"""The docs stay true to the code: the generated parts are current, `--help` groups the flags as the
reference does, every relative link resolves, the README stays short, and no test count or test time
creeps in."""

import re
import tomllib
from pathlib import Path

import pytest

from cogtune.config import STAGE_CONFIGS, build_parser, settings_fields
from cogtune.config.reference import flag_reference, group_title, stage_groups
from cogtune.dev import docs
from cogtune.families import VARIANTS
from cogtune.templates import FAMILIES, TEMPLATES, TINY_SETTINGS, TINY_WHERE_SET, template_files, tiny_config

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def test_generated_parts_of_the_docs_are_current():
    stale = [str(path.relative_to(ROOT)) for path, text in docs.generated(ROOT).items()
             if not path.exists() or path.read_text() != text]
    assert not stale, f"out of date: {stale}; run `make docs` and commit the result"


def test_every_generated_region_is_filled():
    for path in PAGES:
        for match in docs.REGION.finditer(path.read_text()):
            assert "|---|" in match["body"], f"{path}: the region {match['what']!r} holds no table"


def test_the_reference_names_every_setting_once_under_its_group():
    text = flag_reference()
    for cls in STAGE_CONFIGS.values():
        for f in settings_fields(cls):
            flag = f"`{f.name}` (config file only)" if f.metadata.get("file_only") else f"`--{f.name}`"
            assert text.count(f"| {flag} |") == 1, f.name
    sections = re.findall(r"^## (.+)$", text, re.M)
    assert sections == ["Groups"] + [group_title(group) for group, _ in stage_groups()]


@pytest.mark.parametrize("stage", list(STAGE_CONFIGS))
def test_help_groups_the_flags_as_the_reference_does(stage):
    parser = build_parser(stage)
    titles = [group.title for group in parser._action_groups if group._group_actions and group.title not in
              ("options", "optional arguments", "positional arguments")]
    assert sorted(titles) == sorted(group_title(group) for group, stages in stage_groups() if stage in stages)
    text = flag_reference()
    for group in parser._action_groups:
        if group.title in titles:  # each section's flags, in the reference's section of that title
            reference = text.split(f"## {group.title}\n", 1)[1].split("\n## ", 1)[0]
            for action in group._group_actions:
                assert f"| `{action.option_strings[0]}` |" in reference, (group.title, action.option_strings)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces to dashes."""
    text = FENCE.sub("", path.read_text())
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_link_checker_sees_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "a.md").write_text("# A page\n\n## Its part\n")
    assert _anchors(tmp_path / "a.md") == {"a-page", "its-part"}
    assert LINK.findall("see [a](a.md#its-part) and [b](b.md)") == ["a.md#its-part", "b.md"]


def test_the_readme_is_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_no_test_counts_or_test_times_in_the_docs():
    counts = re.compile(r"\b\d+ (tests|passed|failed)\b|make test\S* \(?(about|in) \d|\d+ min(utes)? \d* ?s? ?for \d+ tests")
    found = [f"{page.relative_to(ROOT)}: {match.group(0)}" for page in PAGES
             for match in counts.finditer(page.read_text())]
    assert not found, found


def test_the_slurm_script_the_docs_show_is_the_one_init_writes():
    shown = re.search(r"```bash\n(#!/bin/bash\n.*?)```", (ROOT / "docs" / "clusters.md").read_text(), re.S)[1]
    assert shown == template_files("2b")["slurm/train.sbatch"]


@pytest.mark.parametrize("variant", [name for name in FAMILIES if name != "demo"])
def test_a_tiny_config_is_the_family_config_with_the_rehearsal_settings(variant, tmp_path):
    from cogtune.config import load_config

    real = (TEMPLATES / "configs" / FAMILIES[variant]).read_text()
    path = tmp_path / FAMILIES[variant]
    path.write_text(tiny_config(real, variant))
    (tmp_path / "tiny-model").mkdir()  # (a relative model path is a folder when it exists, else a hub id)
    values, original = tomllib.loads(path.read_text()), tomllib.loads(real)
    every = {**values, **values.get("train", {}), **values.get("preprocess", {}), **values.get("infer", {})}
    assert "num_train_epochs" not in every
    for key, value in TINY_SETTINGS.items():
        if value is not None and (key in every or key not in TINY_WHERE_SET):
            assert every.get(key) == value, key
    for table in ("preprocess", "train", "infer"):  # every other setting is the family's own
        for key, value in original.get(table, {}).items():
            if key not in TINY_SETTINGS:
                assert values[table][key] == value, (table, key)
    train = load_config("train", ["--config", str(path)])
    assert train.pretrained_model_name_or_path == str(tmp_path / "tiny-model")
    assert train.max_train_steps == 4 and train.expert == original.get("train", {}).get("expert")
    infer = load_config("infer", ["--config", str(path)])
    assert infer.num_frames == 9 and (infer.image is None) == ("image" not in original.get("infer", {}))
    assert variant in VARIANTS


@pytest.mark.parametrize("variant", [name for name in FAMILIES if name != "demo"])
def test_the_readme_answers_each_family_start_memory_and_resume(variant):
    """From the README alone: the family's row (its memory, its page), and on that page the command that
    starts it, its memory table and the cluster job; the README's cluster section says how to resume."""
    readme = (ROOT / "README.md").read_text()
    row = next((line for line in readme.splitlines() if line.startswith("|") and f"| `{variant}` |" in line), None)
    assert row and re.search(r"\d+\.\d\d GiB", row), f"no row with a memory figure for {variant}"
    page = ROOT / re.search(r"\]\((docs/families/[^)]+\.md)\)", row)[1]
    text = page.read_text()
    assert f"cogtune init --family {variant} " in text or f"# or {variant}" in text
    assert re.search(r"<!-- generated: memory [^>]*\b" + re.escape(variant) + r"\b", text)
    assert "slurm/train.sbatch" in text
    cluster = readme.split("## On a cluster", 1)[1].split("\n## ", 1)[0]
    assert "sbatch" in cluster and "--resume_from_checkpoint latest" in cluster


@pytest.mark.parametrize("tool", ["musubi-tuner", "finetrainers"])
def test_every_flag_the_docs_map_another_trainers_flags_to_is_ours(tool):
    """The right column of the musubi-tuner and finetrainers tables names only settings cogtune has."""
    from cogtune.config import KNOWN_KEYS

    section = (ROOT / "docs" / "training.md").read_text().split(f"## Coming from {tool}", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("| ").rsplit(" | ", 1) for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    ours = [flag for theirs, cell in rows[1:] for flag in re.findall(r"`--([a-z0-9_]+)", theirs if "same name" in cell else cell)]
    assert len(ours) > 20 and not [flag for flag in ours if flag not in KNOWN_KEYS]


def test_the_version_floors_the_readme_states_are_pyprojects():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = dict(re.match(r"([a-z]+)>=([\d.]+)", item).groups() for item in dependencies
                  if re.match(r"(torch|diffusers|transformers|peft|accelerate)>=", item))
    stated = (ROOT / "README.md").read_text().split("## Installing", 1)[1].split("\n## ", 1)[0]
    said = dict(re.findall(r"(torch|diffusers|transformers|peft|accelerate) ([\d.]+)(?:\+| or newer)", stated))
    assert said == floors
