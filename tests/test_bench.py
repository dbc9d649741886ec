"""The benchmark runner still runs (on the tiny model, without the reference); its figures are not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_bench_runner_writes_the_table_json_and_plot(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--size", "tiny", "--clips", "4", "--steps", "4", "--warmup", "1",
         "--height", "32", "--width", "64", "--rank", "4", "--repeats", "1", "--out", str(tmp_path / "results"),
         "--work", str(tmp_path / "work"), "--only", "gradient checkpointing"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "results" / "cpu-tiny.json").read_text())
    runs = results["train"]
    assert [(run["trainer"], run["label"]) for run in runs] == [("cogtune", "gradient checkpointing")]  # --only
    for run in runs:
        assert len(run["step_times"]) == 4 and run["median_step_seconds"] > 0 and run["peak_rss_bytes"] > 0
        assert len(run["repeats"]["peak_rss_bytes"]) == 1
    assert results["read"]["samples"] == 4 * 5 and results["bytes_per_clip"] > 0
    assert results["preprocess"]["clips"] == 4 and results["step_flops"] > 0
    table = (tmp_path / "results" / "cpu-tiny.md").read_text()
    assert "| gradient checkpointing | cogtune |" in table and "not run (no --reference given)" in table
    assert "transformer TFLOP/s" in table
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
