"""Training that survives a cluster: exact resume after SIGTERM or kill -9, atomic checkpoints
read without pickle, NaN steps skipped."""

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cogtune import data_schema as schema
from cogtune.cache.identity import list_caches
from cogtune.cache.reader import Cache
from cogtune.train import checkpoint as checkpoints

from conftest import cogtune_here, write_config
from test_cache_lifecycle import start, wait_for

STEPS = 120


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, demo_data):
    """A cache and the log and LoRA of an uninterrupted run of STEPS steps."""
    root = tmp_path_factory.mktemp("preempt")
    config = write_config(root / "c.toml", tiny_model, demo_data, root / "cache", root / "full",
                          max_train_steps=STEPS, checkpointing_steps=1000, lr_scheduler="cosine", lr_warmup_steps=5)
    cogtune_here("preprocess", "--config", config)
    cogtune_here("train", "--config", config)
    return dict(root=root, config=config, full=root / "full")


def log_of(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def assert_same_run(output_dir: Path, reference: Path) -> None:
    ours, theirs = log_of(output_dir), log_of(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in theirs], rel=1e-6)
    assert [r["lr"] for r in ours] == pytest.approx([r["lr"] for r in theirs], rel=1e-9)
    a, b = load_file(output_dir / "pytorch_lora_weights.safetensors"), load_file(reference / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def logged_steps(output_dir: Path) -> int:
    path = output_dir / "train_log.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _catches(pid: int, number: int) -> bool:
    """Whether the process has a handler for this signal (its SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (number - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from /proc")
def test_sigterm_checkpoints_exits_75_and_resume_equals_an_uninterrupted_run(setup, tmp_path):
    """SIGTERM sent the moment the process catches it, while torch and diffusers are still being
    imported (a stop in a job's first seconds): honoured after the first step, with a checkpoint and
    status 75 (which the Slurm script requeues), not the default kill (143). (Waiting for logged
    steps instead races a tiny model's 10 ms steps on a busy machine.)"""
    out = tmp_path / "out"
    # The window between the handler and torch's import is a fraction of a second, which a poll on a
    # busy machine (the tests run in parallel) can miss. A sitecustomize on the child's path holds
    # the first `import torch` for 3 s: cogtune's code runs as it is, its window is only wider.
    slow = tmp_path / "slow-torch-import"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import sys, time\n"
        "class SlowTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            sys.meta_path.remove(self)\n"
        "            time.sleep(3)\n"
        "        return None\n"
        "sys.meta_path.insert(0, SlowTorch())\n")
    path = os.pathsep.join(filter(None, [str(slow), os.environ.get("PYTHONPATH")]))
    process = start("train", "--config", setup["config"], "--output_dir", out, env=dict(os.environ, PYTHONPATH=path))
    assert wait_for(lambda: _catches(process.pid, signal.SIGTERM), process)
    imported_yet = "torch" in Path(f"/proc/{process.pid}/maps").read_text()
    process.send_signal(signal.SIGTERM)
    assert not imported_yet  # the signal came before torch was in (it fails if the handler came after)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr
    (saved,) = checkpoints.checkpoints_in(out)  # checkpointing_steps is 1000: this one is the signal's
    step = int(saved.name.split("-")[1])
    assert step == 1 and f"stopped by SIGTERM at step {step}; checkpoint saved to {saved}" in stderr
    assert "--resume_from_checkpoint latest" in stderr and "Traceback" not in stderr
    assert logged_steps(out) == 1

    resumed = cogtune_here("train", "--config", setup["config"], "--output_dir", out,
                           "--resume_from_checkpoint", "latest")
    assert f"Resumed from {saved} at step {step}" in resumed.stdout + resumed.stderr
    assert_same_run(out, setup["full"])


def test_kill_9_at_any_moment_then_resume_latest_equals_an_uninterrupted_run(setup, tmp_path):
    """A checkpoint every step, so that the kills land while checkpoints are being written."""
    out = tmp_path / "out"
    common = ["--config", setup["config"], "--output_dir", out, "--checkpointing_steps", "1",
              "--checkpoints_total_limit", "2", "--resume_from_checkpoint", "latest"]
    kills = 0
    for after in (3, 20):
        process = start("train", *common)
        if wait_for(lambda: logged_steps(out) >= after, process):
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        # Old ones go only after a new one is complete, so a kill between the rename and the pruning
        # leaves the limit plus the one just saved; the next save prunes back to the limit.
        assert len(checkpoints.checkpoints_in(out)) <= 3
    assert kills == 2
    cogtune_here("train", *common)
    assert_same_run(out, setup["full"])
    assert len(checkpoints.checkpoints_in(out)) == 2
    assert not list(out.glob(".checkpoint-*"))  # stale temp folders were cleaned


def test_a_checkpoint_cut_short_is_never_the_latest(setup, tmp_path):
    out = tmp_path / "out"
    cogtune_here("train", "--config", setup["config"], "--output_dir", out, "--max_train_steps", "4",
                 "--checkpointing_steps", "2")
    # what a kill during a save leaves: a temp folder; and a folder a user copied without its state file
    shutil.copytree(out / "checkpoint-4", out / ".checkpoint-6.tmp")
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-8")
    (out / "checkpoint-8" / checkpoints.STATE_NAME).unlink()
    assert checkpoints.latest_checkpoint(out) == out / "checkpoint-4"
    result = cogtune_here("train", "--config", setup["config"], "--output_dir", out,
                          "--resume_from_checkpoint", out / "checkpoint-8", check=False)
    assert result.returncode == 2 and "is not a complete cogtune checkpoint" in result.stderr


def test_checkpoint_state_round_trips_without_pickle(tmp_path):
    parameter = torch.nn.Parameter(torch.randn(3, 4))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3, betas=(0.9, 0.95))
    parameter.grad = torch.randn(3, 4)
    optimizer.step()
    random.random(), np.random.rand(), torch.rand(1)
    state = {"optimizer": optimizer.state_dict(), "rng": checkpoints.rng_states(), "scaler": None}
    checkpoints.save_state(tmp_path / "s.safetensors", state)
    expected_draws = (random.random(), np.random.rand(), torch.rand(1))

    loaded = checkpoints.load_state(tmp_path / "s.safetensors")
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)  # tuples stay tuples
    restored = torch.optim.AdamW([torch.nn.Parameter(parameter.detach().clone())], lr=1e-3)
    restored.load_state_dict(loaded["optimizer"])
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(restored.state_dict()["state"][0][key], optimizer.state_dict()["state"][0][key])
    checkpoints.set_rng_states(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected_draws
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:  # plain safetensors: JSON header, tensors
        assert checkpoints.STRUCTURE_KEY in f.metadata()


def test_a_nan_sample_skips_its_step_and_training_goes_on(setup, tmp_path):
    (cache,) = list_caches(setup["root"] / "cache")
    cache_dir = Path(shutil.copytree(cache, tmp_path / "cache" / "c"))
    row = Cache.open(cache_dir).samples[0]
    shard = schema.shard_path(cache_dir, row.latent_shard)
    tensors = load_file(shard)
    mean_key = schema.video_tensor_key(row.latent_key, "mean")
    tensors[mean_key] = torch.full_like(tensors[mean_key], float("nan"))
    with safe_open(str(shard), framework="pt") as f:  # as a VAE that gave NaN would have written it: checksummed
        metadata = dict(f.metadata())
    checksums = json.loads(metadata[schema.CHECKSUMS_METADATA])
    checksums[mean_key] = schema.sha256_tensor(tensors[mean_key])
    save_file(tensors, shard, metadata={**metadata, schema.CHECKSUMS_METADATA: json.dumps(checksums)})
    result = cogtune_here("train", "--config", setup["config"], "--data_cache", cache_dir, "--output_dir",
                          tmp_path / "out", "--max_train_steps", "4", "--train_batch_size", "1")
    log = log_of(tmp_path / "out")
    skipped = [r for r in log if r.get("skipped")]
    assert len(skipped) == 1 and skipped[0]["loss"] is None  # each sample is seen once in 4 steps of batch 1
    assert f"warning: step {skipped[0]['step']} skipped" in result.stdout + result.stderr
    lora = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(t).all() for t in lora.values())


def test_a_diverging_run_stops_after_max_nan_steps(setup, tmp_path):
    result = cogtune_here("train", "--config", setup["config"], "--output_dir", tmp_path / "out",
                          "--learning_rate", "1e12", "--max_nan_steps", "3", check=False)
    assert result.returncode == 2
    assert "3 steps in a row had a NaN or infinite loss or gradient (--max_nan_steps 3)" in result.stderr
    log = log_of(tmp_path / "out")
    assert len(log) < STEPS and all(r.get("skipped") for r in log[-3:])


def test_a_pickled_lora_is_refused(setup, tmp_path):
    pickled = tmp_path / "lora.bin"
    torch.save({"transformer.x.lora_A.weight": torch.zeros(1)}, pickled)
    result = cogtune_here("infer", "--config", setup["config"], "--lora", pickled, check=False)
    assert result.returncode == 2 and "reads LoRAs only as safetensors" in result.stderr


def test_the_slurm_example_passes_usr1_on_and_requeues_then_the_requeued_job_finishes(setup, tmp_path):
    """slurm/train.sbatch, as `cogtune init` writes it, run as Slurm runs it: SIGUSR1 to the batch script
    before the time limit; `scontrol` is a stand-in that records the requeue."""
    import os
    import subprocess
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
               CONFIG=str(setup["config"]), COGTUNE=f"{sys.executable} -m cogtune.cli")
    cogtune_here("init", "--family", "2b", tmp_path / "run")
    script = tmp_path / "run" / "slurm" / "train.sbatch"
    assert 'CONFIG=${CONFIG:-cogvideox-2b-lora.toml}' in script.read_text()
    out = tmp_path / "out"
    job = subprocess.Popen(["bash", str(script), "--output_dir", str(out)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    assert wait_for(out.is_dir, job)  # the run's handler is installed: the signal lands while the model loads
    job.send_signal(signal.SIGUSR1)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 75, stderr
    assert "stopped by SIGUSR1" in stderr and "requeueing job 4242" in stdout
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert len(checkpoints.checkpoints_in(out)) == 1

    requeued = subprocess.run(["bash", str(script), "--output_dir", str(out)], env=env, capture_output=True,
                              text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stderr
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # not requeued again
    assert_same_run(out, setup["full"])


@pytest.mark.parametrize("stage", ["preprocess", "train"])
def test_a_stop_signal_after_the_summary_never_kills_the_process(setup, tmp_path, stage):
    """SIGTERM sent again and again from the moment the last line is printed until the process ends:
    it exits 75 (stopped, its work saved) or with its own 0, never killed by the signal (143 to a
    shell), which a Slurm wrapper would take for a killed job."""
    import subprocess
    import sys
    import time

    flags = ["--output_dir", tmp_path / "out", "--max_train_steps", "1"] if stage == "train" else []
    process = subprocess.Popen([sys.executable, "-m", "cogtune.cli", stage, "--config", str(setup["config"]),
                                *map(str, flags)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    last = "lora: " if stage == "train" else "cache: "
    for line in process.stdout:  # the result line: the stage's work is done
        if line.startswith(last):
            break
    signals = 0
    while process.poll() is None:
        process.send_signal(signal.SIGTERM)
        signals += 1
        time.sleep(0.002)
    assert signals > 0 and process.returncode in (0, 75), process.returncode
