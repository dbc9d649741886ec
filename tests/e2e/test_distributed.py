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

from conftest import TESTS, cache_path_of, cogtune_here, write_config
from test_cache_lifecycle import write_dataset




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
        for part in ("video_tensors", "caption_tensors"):
            mine, theirs = getattr(one, part)(row), getattr(two, part)(other)
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
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


def assert_same_training(out: Path, reference: Path, tolerance: float = 1e-4) -> None:
    """The same per-step losses (to 1e-5) and the same LoRA tensors, equal up to the summation order of the
    collectives (which Adam's 1 / sqrt(v) magnifies where a gradient is near zero): to `tolerance` of each
    tensor's own scale."""
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)
    saved, expected = (load_file(path / "pytorch_lora_weights.safetensors") for path in (out, reference))
    assert saved.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(saved[key], expected[key], rtol=tolerance,
                                   atol=tolerance * expected[key].abs().max().item())


def test_ddp_on_two_processes_equals_one_process_with_the_same_global_batch(trained, tmp_path):
    """Short batches included: on two processes a lone sample is trained once, with the noise it gets
    on one process (the second process trains a repeat of weight zero)."""
    out = tmp_path / "two"
    torchrun(TESTS / "ddp_worker.py", "--config", trained["config"], "--output_dir", out, "--train_batch_size", "1")
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # identical ranks
    assert_same_training(out, trained["one"])
    assert sorted(p.name for p in (out / "checkpoint-6").glob("random_states_*")) == \
        ["random_states_0.safetensors", "random_states_1.safetensors"]


def test_three_processes_equal_one_with_the_same_global_batch(trained, tmp_path):
    """5 clips in global batches of 3: each epoch's second batch has 2 samples, so the third process
    trains only a repeat of weight zero. Losses and LoRA equal one process with a batch of 3."""
    one, three = tmp_path / "one", tmp_path / "three"
    common = ["--config", trained["config"], "--max_train_steps", "4", "--checkpointing_steps", "100"]
    cogtune_here("train", *common, "--train_batch_size", "3", "--output_dir", one)
    torchrun("-m", "cogtune.cli", "train", *common, "--train_batch_size", "1", "--output_dir", three, processes=3)
    assert_same_training(three, one)


def lrs(output_dir: Path) -> list[float]:
    return [json.loads(line)["lr"] for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def resume_from(source: Path, step: int, target: Path) -> Path:
    """A run folder holding source's checkpoint-<step> and its log up to that step."""
    target.mkdir()
    shutil.copytree(source / f"checkpoint-{step}", target / f"checkpoint-{step}")
    log = (source / "train_log.jsonl").read_text().splitlines()
    (target / "train_log.jsonl").write_text("\n".join(log[:step]) + "\n")
    return target


def test_checkpoints_resume_on_another_number_of_processes(trained, tmp_path):
    """With the same global batch, a run resumed on 2 processes from a 1-process checkpoint, or on 1
    from a 2-process one, trains what the uninterrupted run trains: the learning-rate schedule counts
    optimizer steps (a cosine with warm-up once restarted its warm-up after 2 -> 1), and the data
    order follows the global batch."""
    full = tmp_path / "full"
    common = ["--config", trained["config"], "--validation_steps", "3"]
    torchrun("-m", "cogtune.cli", "train", *common, "--train_batch_size", "1", "--output_dir", full)
    # validation on the main process while the other waits, without changing the training
    assert sorted(p.name for p in (full / "validation").iterdir()) == ["step-000003", "step-000006"]
    assert len(list((full / "validation" / "step-000006").glob("*.mp4"))) == 1
    assert losses(full) == pytest.approx(losses(trained["one"]), rel=1e-5)
    assert lrs(full) == pytest.approx(lrs(trained["one"]), rel=1e-9)

    one_to_two = resume_from(trained["one"], 3, tmp_path / "one-to-two")
    out = torchrun("-m", "cogtune.cli", "train", *common, "--train_batch_size", "1", "--output_dir", one_to_two,
                   "--resume_from_checkpoint", "latest")
    assert "Resumed from" in out.stdout + out.stderr and "data order differs" not in out.stdout + out.stderr
    assert "engine: DDP, 2 processes on CPUs" in out.stderr  # what runs, said once
    two_to_one = resume_from(full, 3, tmp_path / "two-to-one")
    cogtune_here("train", *common, "--train_batch_size", "2", "--output_dir", two_to_one,
                 "--resume_from_checkpoint", "latest")
    for resumed in (one_to_two, two_to_one):
        assert lrs(resumed) == pytest.approx(lrs(trained["one"]), rel=1e-9)
        assert_same_training(resumed, trained["one"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("variable, engine", [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")])
def test_an_engine_that_needs_gpus_is_refused_on_cpus(trained, tmp_path, monkeypatch, variable, engine):
    """`accelerate launch` with the DeepSpeed or FSDP config on a machine without CUDA: accelerate
    ran DeepSpeed as plain CPU DDP without a word, and failed inside FSDP with a traceback on every
    rank. Now: a clear refusal, before anything is loaded or written."""
    monkeypatch.setenv(variable, "true")  # what accelerate launch --config_file sets in every process
    out = tmp_path / "out"
    result = cogtune_here("train", "--config", trained["config"], "--output_dir", out, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"asks for {engine}, which needs CUDA GPUs" in result.stderr and "accelerate/ddp.yaml" in result.stderr
    assert not (out / "train_log.jsonl").exists()


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
        # No layer class named: accelerate wraps the model's _no_split_modules, each family's blocks.
        assert "fsdp_transformer_layer_cls_to_wrap" not in config.fsdp_config
        import torch

        from cogtune.families import FAMILIES, ModelConfigs

        for family in FAMILIES:
            models = ModelConfigs.load(next(iter(family.published)))
            transformer = models.spec().meta_transformer(models, torch.bfloat16)
            assert type(models.spec().blocks(transformer)[0]).__name__ in transformer._no_split_modules


FAKE_SRUN = """#!/bin/bash
# stand-in for srun on one machine: SLURM_NTASKS copies of the command, signals passed on; with
# --kill-on-bad-exit=1, as srun does, the first task to exit non-zero has the others killed, and
# srun then returns 137 (what the real one returned when the ranks stopped with 75 a moment apart)
kill_on_bad_exit=0
while [[ "$1" == --* ]]; do [ "$1" = --kill-on-bad-exit=1 ] && kill_on_bad_exit=1; shift; done
echo "$MASTER_PORT" > "$FAKE_SRUN_LOG"
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
    if [ $s -ne 0 ] && [ $kill_on_bad_exit = 1 ]; then
        kill -9 "${pids[@]}" 2>/dev/null
        wait
        exit 137
    fi
done
exit $status
"""


def fake_slurm(tmp_path: Path, job_id: str, **env) -> dict:
    """PATH with stand-ins for srun and scontrol (requeues go to scontrol.log), and the environment
    of a Slurm job of two tasks on this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text(
        f"#!/bin/sh\nif [ \"$1\" = show ]; then echo 127.0.0.1; else echo \"$@\" >> {tmp_path / 'scontrol.log'}; fi\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID=job_id, SLURM_NTASKS="2",
                SLURM_JOB_NODELIST="localhost", FAKE_SRUN_LOG=str(tmp_path / "srun.log"),
                COGTUNE=f"{sys.executable} -m cogtune.cli", **env)


def test_the_multinode_slurm_example_starts_one_process_per_task_and_requeues(trained, tmp_path):
    """slurm/train_multinode.sbatch (as `cogtune init` writes it) with stand-ins for srun and
    scontrol: two processes find each other through the environment the script sets, on a port of
    the job's own, and SIGUSR1 stops both at one checkpoint that holds both processes' states. srun
    --kill-on-bad-exit then returns 137, not 75, and the job is requeued all the same."""
    from test_preemption import logged_steps, wait_for

    job_id = str(10_000 + os.getpid() % 20_000)  # the port the script derives from it must be free here
    env = fake_slurm(tmp_path, job_id, CONFIG=str(trained["config"]))
    env.pop("MASTER_PORT", None)
    cogtune_here("init", "--family", "5b", tmp_path / "run")
    script = tmp_path / "run" / "slurm" / "train_multinode.sbatch"
    out = tmp_path / "out"
    args = ["bash", str(script), "--output_dir", str(out), "--train_batch_size", "1", "--max_train_steps", "400",
            "--checkpointing_steps", "1000"]
    job = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: logged_steps(out) >= 3, job)
    job.send_signal(signal.SIGUSR1)
    stdout, stderr = job.communicate(timeout=180)
    assert job.returncode == 137, stderr[-3000:]  # srun's status, passed on
    assert f"requeueing job {job_id}" in stdout and (tmp_path / "scontrol.log").read_text() == f"requeue {job_id}\n"
    assert (tmp_path / "srun.log").read_text().strip() == str(10_000 + int(job_id) % 20_000)  # the job's own port
    (checkpoint,) = (out).glob("checkpoint-*")
    assert sorted(p.name for p in checkpoint.glob("random_states_*")) == \
        ["random_states_0.safetensors", "random_states_1.safetensors"]  # both processes took part


def test_a_multinode_job_that_fails_without_being_stopped_is_not_requeued(tmp_path):
    """A crash (here a config that does not exist) ends the job with its status, and no requeue:
    requeueing is for stops the script passed on."""
    env = fake_slurm(tmp_path, "31", MASTER_PORT=str(29000 + os.getpid() % 1000), CONFIG=str(tmp_path / "none.toml"))
    cogtune_here("init", "--family", "5b", tmp_path / "run")
    for name in ("train_multinode", "preprocess_multinode"):
        job = subprocess.run(["bash", str(tmp_path / "run" / "slurm" / f"{name}.sbatch")], env=env,
                             capture_output=True, text=True, timeout=120)
        assert job.returncode != 0 and "requeueing" not in job.stdout, name
    assert not (tmp_path / "scontrol.log").exists()
