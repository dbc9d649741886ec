"""The benchmark runner still runs (on the tiny model, without the reference); its figures are not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cogtune.cache.reader import Cache

from conftest import ROOT

BENCH = ROOT / "bench"


def test_bench_runner_writes_the_table_json_and_plot(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--size", "tiny", "--clips", "4", "--steps", "4", "--warmup", "1",
         "--height", "32", "--width", "64", "--rank", "4", "--repeats", "1", "--out", str(tmp_path / "results"),
         "--work", str(tmp_path / "work"), "--only", "gradient checkpointing", "--steady", "0"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "results" / "cpu-tiny.json").read_text())
    runs = results["train"]
    assert [(run["trainer"], run["label"]) for run in runs] == [  # --only, beside the floor and its imports
        ("cogtune", "gradient checkpointing"), ("floor", "gradient checkpointing"), ("floor", "imports")]
    for run in runs[:2]:
        assert len(run["step_times"]) == 4 and run["median_step_seconds"] > 0 and run["peak_rss_bytes"] > 0
        assert len(run["repeats"]["peak_rss_bytes"]) == 1
    imports, floor = runs[2], runs[1]
    assert not imports["step_times"] and 0 < imports["peak_rss_bytes"] < floor["peak_rss_bytes"]
    assert results["read"]["samples"] == 4 * 5 and results["bytes_per_clip"] > 0
    assert results["preprocess"]["clips"] == 4 and results["step_flops"] > 0
    table = (tmp_path / "results" / "cpu-tiny.md").read_text()
    assert "| gradient checkpointing | cogtune |" in table and "not run (no --reference given)" in table
    assert "transformer TFLOP/s" in table
    assert "| gradient checkpointing | " in table.split("Against the floor")[1]  # our run against the floor
    assert (tmp_path / "results" / "cpu-tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_torchvision_standin_matches_the_interpolation_torchvision_uses():
    code = f"""
import sys, torch, torch.nn.functional as F
sys.path.insert(0, {str(BENCH)!r})
from timed import install_torchvision_standin
install_torchvision_standin()
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import resize
import torchvision.transforms as TT
frames = torch.rand(3, 3, 40, 60)
out = resize(frames, size=[20, 30], interpolation=InterpolationMode.BICUBIC)
assert out.shape == (3, 3, 20, 30)
assert torch.equal(out, F.interpolate(frames, size=[20, 30], mode="bicubic", antialias=True, align_corners=False))
assert torch.equal(TT.functional.crop(frames, top=5, left=7, height=10, width=11), frames[..., 5:15, 7:18])
import transformers.utils
assert not transformers.utils.is_torchvision_available()
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_the_gpu_check_runs_end_to_end_on_a_cpu(tmp_path):
    """bench/gpu_check.py, the one command for a GPU machine, in its CPU mode: every part, the same
    files, on shrunk published configs (so that it never rots while no GPU is lent). Without a
    diffusers checkout the reference part says why it did not run."""
    out = tmp_path / "results" / "gpu-check"
    result = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu", "--size", "tiny", "--steps", "3",
         "--warmup", "1", "--work", str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(out.with_suffix(".json").read_text())
    rows = {part: [row for row in results["rows"] if row["part"] == part]
            for part in ("parity", "train", "reference", "preprocess")}
    (parity,) = rows["parity"]
    assert parity["ok"] and len(parity["cpu_losses"]) == 1 and parity["cpu_losses"] == parity["device_losses"]
    assert [row["setting"] for row in rows["train"]] == [
        "2b, fp32, gradient checkpointing", "2b, fp32, gradient checkpointing, 1 of 2 blocks swapped",
        "Wan 2.2 TI2V 5B, fp32, gradient checkpointing",
        "Wan 2.2 TI2V 5B, fp32, gradient checkpointing, context parallelism 2 (estimate per process)"]
    *measured, split = rows["train"]
    for train in measured:
        assert "error" not in train, train
        assert train["median_step_seconds"] > 0 and train["peak_allocated_mib"] > 0 and train["tflops"] > 0
        assert 0 < train["estimate_gib"] < 0.01  # the tiny model's --dry_run estimate
    # context parallelism on one device: its estimate per process only, below the same setting's without it
    assert split["median_step_seconds"] is None and "estimate per GPU only" in split["note"]
    assert 0 < split["estimate_gib"] < measured[2]["estimate_gib"]
    (reference,) = rows["reference"]
    assert reference["error"].startswith("not run: no reference script")
    assert [row["setting"] for row in rows["preprocess"]] == ["VAE tiling and slicing", "no tiling or slicing"]
    for row in rows["preprocess"]:
        assert "error" not in row, row
        assert row["clips"] == 3 and row["vae_seconds"] > 0 and row["t5_seconds"] > 0
        assert row["clips_per_s"] == pytest.approx(3 / row["vae_seconds"])
        assert row["vae_peak_mib"] is None  # GPU memory only
    caches = [Cache.open(path.parent) for path in (tmp_path / "work").glob("preprocess-*/*/manifest.json")]
    assert [len(cache.samples) for cache in caches] == [3, 3]  # every clip encoded, in each fresh cache
    table = out.with_suffix(".md").read_text()
    assert "| 2b, fp32, gradient checkpointing | 9x32x64 |" in table and "not run: no reference script" in table
    assert "| VAE tiling and slicing | 3 of 9x48x80 -> 9x32x64 |" in table
    assert "Parity: a training step's loss on cpu vs the CPU: worst relative difference 0.0" in table


def test_every_setting_of_the_gpu_check_is_a_valid_training_command_line():
    """The real rows run only on a GPU: their flags are checked here, so that the first GPU lent does not
    spend its minutes on a typo."""
    from conftest import load_script

    from cogtune.config import load_config

    gpu_check = load_script(BENCH / "gpu_check.py")
    for size, settings in gpu_check.SETTINGS.items():
        for label, family, clip, precision, flags in settings:
            config = load_config("train", ["--pretrained_model_name_or_path", "m", "--mixed_precision", precision,
                                           *flags])
            assert config.gradient_checkpointing == ("--gradient_checkpointing" in flags), (size, label)
