"""Shared fixtures: tiny random models and demo clips, built once per test session; the command line
run as a user runs it; and the `e2e` marker.

    unit/   fast tests of the package's parts, in folders that mirror src/cogtune
    e2e/    whole runs: tiny models, demo clips, the command line, several processes

A test under e2e/ is end to end (`e2e`, by its folder); `make test-fast` runs the others alone. A
test outside e2e/ that asks for a tiny model or demo clips is an error that says to move it."""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent  # the repository
ASSETS = TESTS / "assets"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
os.environ.setdefault("TQDM_DISABLE", "1")
# torch.compile's code cache, one per ATEN_CPU_CAPABILITY: inductor reuses a precompiled header built
# for one capability under another (the suite run with ATEN_CPU_CAPABILITY=default after a plain run
# failed to compile: "at::vec has not been declared"), a cache key torch leaves out.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor-{getpass.getuser()}-{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"))


MODEL_FIXTURES = {"tiny_model", "tiny_models", "demo_data"}
E2E = TESTS / "e2e"


def pytest_collection_modifyitems(items):
    for item in items:
        if E2E in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.e2e)
        elif MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(f"{item.nodeid} uses a tiny model or demo clips: it is end to end, move it "
                                    "under tests/e2e/.")


def cogtune(*args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real command line, as a user would."""
    result = subprocess.run([sys.executable, "-m", "cogtune.cli", *map(str, args)], capture_output=True, text=True,
                            cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"cogtune {' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def load_script(path: Path):
    """A script of the repository (bench/, requirements/) imported as a module, for its functions and tables."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cogtune_here(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The same command line run inside the test process: no interpreter start-up, for tests that
    make many calls. Use `cogtune` where the process itself matters (signals, limits, imports)."""
    import contextlib
    import io

    from cogtune.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            returncode = main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help, bad flags
            returncode = e.code if isinstance(e.code, int) else 1
    result = subprocess.CompletedProcess(args, returncode, stdout.getvalue(), stderr.getvalue())
    if check and returncode != 0:
        raise AssertionError(f"cogtune {' '.join(map(str, args))} failed ({returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The one tiny-model factory: tiny_models(family, seed) is that family's random-weight pipeline,
    built once per session."""
    from cogtune.dev.tiny import make_tiny_model

    built = {}

    def tiny(family: str = "2b", seed: int = 0) -> Path:
        if (family, seed) not in built:
            folder = tmp_path_factory.mktemp(f"model-{family}-{seed}") / f"tiny-{family}"
            built[family, seed] = make_tiny_model(folder, family=family, seed=seed)
        return built[family, seed]

    return tiny


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> Path:
    return tiny_models("2b")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from cogtune.dev.tiny import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("data") / "demo")


def cache_path_of(output: str) -> Path:
    """The cache folder a preprocess run printed (its `cache: ...` summary line)."""
    return Path(re.search(r"^cache: (.+)$", output, re.M).group(1))


def write_config(path: Path, model: Path, data: Path, cache_root: Path, output_dir: Path, **extra) -> Path:
    """A demo-like config file for the tiny model."""
    settings = dict(
        pretrained_model_name_or_path=str(model), instance_data_root=str(data), cache_root=str(cache_root),
        output_dir=str(output_dir), id_token="DEMO", height=32, width=64, fps=8, max_num_frames=9,
        mixed_precision="no", latent_dtype="fp32", rank=4, lora_alpha=2, train_batch_size=2, max_train_steps=4,
        learning_rate=1e-2, lr_scheduler="constant", lr_warmup_steps=0, checkpointing_steps=2,
        optimizer="adamw", prompt="DEMO a red square moves", num_inference_steps=2, num_frames=9,
    )
    settings.update(extra)
    lines = []
    for key, value in settings.items():
        if isinstance(value, list):
            lines.append(f"{key} = {json.dumps(value)}")
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f"{key} = {str(value)!r}".replace("'", '"'))
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the family contract runs (tests/contract.py), shared by the family test modules --------------


@pytest.fixture(scope="session")
def models(tiny_models):
    """Every variant's tiny model (seed 3), by variant name."""
    from contract import CONTRACT

    return {variant: tiny_models(variant, seed=3) for variant, _ in CONTRACT.values()}


@pytest.fixture(scope="session")
def first_frame(tmp_path_factory, demo_data):
    """A PNG of a demo clip's first frame: the image an image-to-video model animates."""
    import av

    path = tmp_path_factory.mktemp("image") / "first.png"
    with av.open(str(demo_data / "videos" / "00000.mp4")) as container:
        next(container.decode(video=0)).to_image().save(path)
    return path


def _contract_names():
    from contract import CONTRACT

    return list(CONTRACT)


@pytest.fixture(scope="session", params=_contract_names())
def trained(request, tmp_path_factory, models, demo_data, first_frame):
    """One contract run: preprocess, 4 training steps (validated at step 4, checkpoints at 2 and 4), infer."""
    from contract import CONTRACT, I2V, run_stages

    name = request.param
    variant, settings = CONTRACT[name]
    root = tmp_path_factory.mktemp(f"run-{name}")
    extra = dict(image=str(first_frame), image_noise_variants=2, validation_images=str(first_frame)) \
        if name in I2V else {}
    config = write_config(root / "run.toml", models[variant], demo_data, root / "cache", root / "out",
                          noised_image_dropout=0.3, validation_prompt="DEMO a red square moves",
                          validation_num_inference_steps=2, validation_steps=4, **extra, **settings)
    results = run_stages(config, "preprocess", "train", "infer")
    return dict(family=name, variant=variant, settings=settings, model=models[variant], config=config,
                out=root / "out", **results)
