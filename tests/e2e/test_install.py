"""What a fresh install gets: declared dependencies that are true, the lock that `make setup`
installs, what an installed package ships (`cogtune init`), and the entry points."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

from cogtune.config import load_config, make_config, read_toml, values_for_stage
from cogtune.errors import CogtuneError
from cogtune.templates import FAMILIES, TEMPLATES

from conftest import ROOT, cogtune, cogtune_here


PACKAGE = ROOT / "src" / "cogtune"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CORE = [Requirement(text) for text in PROJECT["dependencies"]]
EXTRAS = {extra: [Requirement(text) for text in texts] for extra, texts in PROJECT["optional-dependencies"].items()}
LOCK = ROOT / "requirements" / "lock.txt"


def canonical(name: str) -> str:
    return name.lower().replace("_", "-")


def third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the cogtune files importing it; `lazy` marks imports inside functions."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("cogtune", "tomli"):
                    found.setdefault(top, set()).add(path.name)
    return found


def test_every_imported_package_is_declared():
    distributions = metadata.packages_distributions()
    declared_core = {canonical(r.name) for r in CORE}
    declared_extra = {canonical(r.name) for requirements in EXTRAS.values() for r in requirements}
    imports = third_party_imports()
    assert {"torch", "diffusers", "PIL", "huggingface_hub", "tokenizers"} <= set(imports)
    for module, files in imports.items():
        names = {canonical(d) for d in distributions.get(module, [module])}
        assert names & (declared_core | declared_extra), f"{module} (imported by {sorted(files)}) is not declared"


def test_optional_packages_are_imported_only_where_they_are_used():
    """An extra's package must not be needed to import cogtune: it is imported inside functions."""
    extras = {canonical(r.name) for requirements in EXTRAS.values() for r in requirements} - {"tensorboard"}
    distributions = metadata.packages_distributions()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "level", 0) == 0:
                module = (node.names[0].name if isinstance(node, ast.Import) else node.module).split(".")[0]
                names = {canonical(d) for d in distributions.get(module, [module])}
                assert not names & extras, f"{path.name} imports {module} at module level"


def test_torch_is_a_range_that_admits_the_versions_users_have():
    (torch,) = [r for r in CORE if r.name == "torch"]
    for version in ("2.11.0", "2.13.0", "2.14.1", "2.15.0"):
        assert torch.specifier.contains(version), version
    assert not any(s.operator in ("==", "~=", "===") for s in torch.specifier)


def test_decord_is_installed_only_where_it_has_wheels():
    (decord,) = [r for r in CORE if r.name == "decord"]
    assert decord.marker is not None
    for machine, expected in (("x86_64", True), ("AMD64", True), ("aarch64", False), ("arm64", False)):
        assert decord.marker.evaluate({"platform_machine": machine}) is expected, machine


def test_every_core_dependency_has_a_floor_for_make_test_oldest():
    from conftest import load_script

    pins = load_script(ROOT / "requirements" / "floors.py").floors()
    assert {canonical(line.split("==")[0]) for line in pins} >= {
        canonical(r.name) for r in CORE if r.marker is None or r.marker.evaluate()}
    if os.environ.get("COGTUNE_ENV") == "oldest":  # make test-oldest: the floors are what is installed
        for line in pins:
            name, version = line.split("==")
            assert Version(metadata.version(name)) == Version(version), name


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        requirement, _, marker = line.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        name, version = requirement.split("==")
        pins[canonical(name.strip())] = version.strip()
    return pins


def test_the_lock_satisfies_pyproject_and_is_what_make_setup_installed():
    pins = lock_pins()
    for requirement in CORE + EXTRAS["test"]:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonical(requirement.name)
        assert name in pins, f"{name} is missing from {LOCK.name}: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject's {requirement}: run `make lock`"
    if os.environ.get("COGTUNE_ENV") == "lock":  # make test: the environment is the lock, nothing else
        for name, version in pins.items():
            assert Version(metadata.version(name)) == Version(version), f"{name}: installed {metadata.version(name)}"


def test_init_writes_each_family_config_and_the_cluster_files(tmp_path):
    for family, config_name in FAMILIES.items():
        folder = tmp_path / family
        out = cogtune_here("init", "--family", family, folder).stdout
        assert f"config: {folder / config_name}" in out
        for stage in ("preprocess", "train", "infer"):
            path = folder / config_name
            make_config(stage, values_for_stage(read_toml(path), stage, str(path)), str(path))
        assert sorted(p.name for p in (folder / "accelerate").iterdir()) == \
            sorted(p.name for p in (TEMPLATES / "accelerate").iterdir())
        for script in (folder / "slurm").iterdir():
            text = script.read_text()
            assert "@CONFIG@" not in text and f"CONFIG=${{CONFIG:-{config_name}}}" in text
            assert os.access(script, os.X_OK)
    again = cogtune_here("init", "--family", "5b", tmp_path / "5b", check=False)
    assert again.returncode == 2 and "--force" in again.stderr
    cogtune_here("init", "--family", "5b", "--force", tmp_path / "5b")


def test_paths_in_a_config_file_are_relative_to_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    (folder / "model").mkdir(parents=True)
    config = folder / "run.toml"
    config.write_text('pretrained_model_name_or_path = "model"\ninstance_data_root = "data"\ncache_root = "cache"\n'
                      'output_dir = "runs/a"\nvalidation_prompt = "a:::b"\nvalidation_images = "x.png:::/abs/y.png"\n'
                      '[train]\ndata_cache = "cache/c1"\nresume_from_checkpoint = "latest"\n'
                      '[infer]\nprompt = "p"\nlora = "THUDM/some-lora"\nimage = "first.png"\n')
    monkeypatch.chdir(tmp_path)
    pre = load_config("preprocess", ["--config", str(config.relative_to(tmp_path))])
    assert pre.pretrained_model_name_or_path == str(folder / "model")  # a folder that exists there
    assert (pre.instance_data_root, pre.cache_root) == (str(folder / "data"), str(folder / "cache"))
    assert pre.validation_images == f"{folder / 'x.png'}:::/abs/y.png"
    train = load_config("train", ["--config", str(config), "--output_dir", "here"])
    assert (train.data_cache, train.resume_from_checkpoint) == (str(folder / "cache/c1"), "latest")
    assert train.output_dir == "here"  # a flag is relative to where the command runs, as usual
    infer = load_config("infer", ["--config", str(config)])
    assert (infer.lora, infer.image) == ("THUDM/some-lora", str(folder / "first.png"))  # a hub id stays one


def test_version_and_python_dash_m():
    from cogtune import __version__

    assert cogtune("--version").stdout.strip() == f"cogtune {__version__}"
    assert metadata.version("cogtune") == __version__
    result = subprocess.run([sys.executable, "-m", "cogtune", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "commands:" in result.stdout and "init" in result.stdout


def test_the_hub_messages_name_the_current_login_command(monkeypatch, tmp_path):
    from cogtune.train import report

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CogtuneError, match="`hf auth login`"):
        report.check_hub_token(None)
    sources = "".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    assert "huggingface-cli" not in sources


def test_without_decord_every_video_is_decoded_with_pyav(demo_data):
    """What aarch64 installs get (no decord wheel): the same clip, read by PyAV."""
    script = f"""
import sys
sys.modules["decord"] = None  # import decord now raises ImportError, as where it is not installed
from pathlib import Path
from cogtune.data.video import fixed_size, read_clip
clip = read_clip(Path({str(demo_data / "videos" / "00000.mp4")!r}), fixed_size(32, 48, 9, 4), 8, 0, 0, "center", None)
print(clip.decoder, tuple(clip.pixels.shape))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["pyav", "(3,", "9,", "32,", "48)"]
