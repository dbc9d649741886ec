"""Several processes on the CPU (torchrun, gloo): the same cache as one process, DDP training equal
to one process with the same global batch, checkpoints and resume across ranks."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogtune import data_schema as schema
from cogtune.cache.reader import Cache

from conftest import cache_path_of, cogtune_here, write_config
from test_cache_lifecycle import write_dataset

TESTS = Path(__file__).parent


def torchrun(*args, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("dist"), 5)  # 5: batches of 2 end with a short one


def test_two_process_preprocess_equals_one_process(tmp_path, tiny_model, data):
    config = write_config(tmp_path / "c.toml", tiny_model, data, tmp_path / "one", tmp_path / "out",
                          height=32, width=48, shard_size_mb=1e-6)
    one = Cache.open(cache_path_of(cogtune_here("preprocess", "--config", config).stdout))
    out = torchrun("-m", "cogtune.cli", "preprocess", "--config", config, "--cache_root", tmp_path / "two").stdout
    assert sum(line.startswith("cache: ") for line in out.splitlines()) == 1  # one summary, from the main process
    assert "encoded: 5 videos, 5 captions" in out
    two = Cache.open(cache_path_of(out))
    writers = {p.name.split("-")[0] for p in (two.path / schema.SHARDS_DIR).glob("*.safetensors")}
    assert writers == {"r0", "r1"}  # both processes encoded a share

    # the same samples in the same order (training shuffles positions in it), whoever wrote them
    assert [r.sample_id for r in one.samples] != [] and \
        [r.sample_id for r in one.samples] == [r.sample_id for r in two.samples]
    for age, part in enumerate(reversed(sorted((two.path / schema.INDEX_DIR).glob("*.parquet")))):
        os.utime(part, (1_000_000 + age, 1_000_000 + age))  # a touch, a copy without times, rsync
    assert [r.sample_id for r in Cache.open(two.path).samples] == [r.sample_id for r in two.samples]
    rows_two = {r.sample_id: r for r in two.samples}
    for row in one.samples:
        other = rows_two[row.sample_id]
        for column in ("frame_indices", "bucket", "latent_shape", "latent_key", "text_key", "caption", "decoder"):
            assert getattr(row, column) == getattr(other, column)
        for a, b in zip(one.latent_moments(row), two.latent_moments(other)):
            assert torch.equal(a, b)
        assert torch.equal(one.prompt_embeds(row), two.prompt_embeds(other))
    assert cogtune_here("cache", "verify", two.path).returncode == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, data):
    """A cache of 5 clips, and one-process training with a batch of 2 for 6 steps (the reference):
    each epoch's third batch is short."""
    root = tmp_path_factory.mktemp("ddp")
    config = write_config(root / "c.toml", tiny_model, data, root / "cache", root / "one", height=32, width=48,
                          max_train_steps=6, checkpointing_steps=3, lr_scheduler="cosine", lr_warmup_steps=2,
                          validation_prompt="DEMO a red square", validation_num_inference_steps=2)
    cogtune_here("preprocess", "--config", config)
    cogtune_here("train", "--config", config, "--train_batch_size", "2")
    return dict(root=root, config=config, one=root / "one")


def losses(output_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def test_ddp_on_two_processes_equals_one_process_with_the_same_global_batch(trained, tmp_path):
    """Short batches included: on two processes a lone sample is trained once, with the noise it gets
    on one process (the second process trains a repeat of weight zero)."""
    out = tmp_path / "two"
    torchrun(TESTS / "ddp_worker.py", "--config", trained["config"], "--output_dir", out, "--train_batch_size", "1")
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # identical ranks
    reference = load_file(trained["one"] / "pytorch_lora_weights.safetensors")
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert saved.keys() == reference.keys()
    for key in saved:  # equal up to the summation order of the gradient all-reduce, at each tensor's own scale
        torch.testing.assert_close(saved[key], reference[key], rtol=1e-4, atol=1e-4 * reference[key].abs().max().item())
    assert losses(out) == pytest.approx(losses(trained["one"]), rel=1e-5)
    assert sorted(p.name for p in (out / "checkpoint-6").glob("random_states_*")) == \
        ["random_states_0.safetensors", "random_states_1.safetensors"]


def test_two_process_checkpoint_and_resume(trained, tmp_path):
    full = tmp_path / "full"
    common = ["-m", "cogtune.cli", "train", "--config", trained["config"], "--train_batch_size", "1",
              "--validation_steps", "3"]
    torchrun(*common, "--output_dir", full)
    # validation on the main process while the other waits, without changing the training
    assert sorted(p.name for p in (full / "validation").iterdir()) == ["step-000003", "step-000006"]
    assert len(list((full / "validation" / "step-000006").glob("*.mp4"))) == 1
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    log = (full / "train_log.jsonl").read_text().splitlines()
    (resumed / "train_log.jsonl").write_text("\n".join(log[:3]) + "\n")
    out = torchrun(*common, "--output_dir", resumed, "--resume_from_checkpoint", "latest")
    assert "Resumed from" in out.stdout + out.stderr
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-6)
    assert losses(full) == pytest.approx(losses(trained["one"]), rel=1e-5)
    a, b = load_file(full / "pytorch_lora_weights.safetensors"), load_file(resumed / "pytorch_lora_weights.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


@pytest.mark.parametrize("name, engine", [("single_gpu", "NO"), ("ddp", "MULTI_GPU"), ("fsdp", "FSDP"),
                                          ("deepspeed_zero2", "DEEPSPEED"), ("deepspeed_zero2_offload", "DEEPSPEED"),
                                          ("deepspeed_zero3", "DEEPSPEED"), ("deepspeed_zero3_offload", "DEEPSPEED")])
def test_shipped_accelerate_configs_load(name, engine):
    from accelerate.commands.config.config_args import load_config_from_file

    from cogtune.templates import TEMPLATES

    config = load_config_from_file(str(TEMPLATES / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == engine
    if engine == "DEEPSPEED":
        stage = config.deepspeed_config["zero_stage"]
        assert stage in (2, 3) and name.startswith(f"deepspeed_zero{stage}")
        assert (config.deepspeed_config["offload_optimizer_device"] == "cpu") == name.endswith("offload")
        assert config.deepspeed_config["zero3_save_16bit_model"] == (stage == 3)  # the LoRA can be gathered
    if engine == "FSDP":
        assert config.fsdp_config["fsdp_use_orig_params"] is True  # frozen base, trainable LoRA
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


FAKE_SRUN = """#!/bin/bash
# stand-in for srun on one machine: SLURM_NTASKS copies of the command, signals passed on
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
    pids+=($!)
done
trap 'forwarded=1; kill -USR1 "${pids[@]}" 2>/dev/null' USR1
status=0
for p in "${pids[@]}"; do
    while :; do forwarded=0; wait $p; s=$?; [ "$forwarded" = 1 ] || break; done
    [ $s -gt $status ] && status=$s
done
exit $status
"""


def test_the_multinode_slurm_example_starts_one_process_per_task_and_requeues(trained, tmp_path):
    """slurm/train_multinode.sbatch (as `cogtune init` writes it) with stand-ins for srun and scontrol: two processes
    find each other through the environment the script sets, and SIGUSR1 stops both at one
    checkpoint that holds both processes' states, then the job is requeued."""
    from test_preemption import logged_steps, wait_for

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text(
        f"#!/bin/sh\nif [ \"$1\" = show ]; then echo 127.0.0.1; else echo \"$@\" >> {tmp_path / 'scontrol.log'}; fi\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77", SLURM_NTASKS="2",
               SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(29000 + os.getpid() % 1000),
               CONFIG=str(trained["config"]), COGTUNE=f"{sys.executable} -m cogtune.cli")
    cogtune_here("init", "--family", "5b", tmp_path / "run")
    script = tmp_path / "run" / "slurm" / "train_multinode.sbatch"
    out = tmp_path / "out"
    args = ["bash", str(script), "--output_dir", str(out), "--train_batch_size", "1", "--max_train_steps", "400",
            "--checkpointing_steps", "1000"]
    job = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: logged_steps(out) >= 3, job)
    job.send_signal(signal.SIGUSR1)
    stdout, stderr = job.communicate(timeout=180)
    assert job.returncode == 75, stderr[-3000:]
    assert "requeueing job 77" in stdout and (tmp_path / "scontrol.log").read_text() == "requeue 77\n"
    (checkpoint,) = (out).glob("checkpoint-*")
    assert sorted(p.name for p in checkpoint.glob("random_states_*")) == \
        ["random_states_0.safetensors", "random_states_1.safetensors"]  # both processes took part
