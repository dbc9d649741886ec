"""--context_parallel_degree on the CPU (torchrun, gloo): a group of processes that splits each sample's
tokens trains what one process trains on the same global batch, with Ulysses attention and with ring
attention; groups compose with data parallelism (2 groups of 2 equal 2 data-parallel processes); checkpoints
resume across the two."""

import json
import shutil

import pytest
import torch
from conftest import cogtune_here, write_config
from contract import run_stages
from test_distributed import TESTS, assert_same_training, resume_from, torchrun

from cogtune.config import load_config
from cogtune.errors import CogtuneError
from cogtune.train.model import context_parallel_groups

# LoRA tensors to a thousandth of their scale: the all-to-alls and all-gathers add summation orders to the
# all-reduce's
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def wan_run(models, demo_data, tmp_path_factory):
    """A Wan 2.1 T2V cache, and one process's training on it with batches of 1 and of 2 (checkpoints at 2)."""
    root = tmp_path_factory.mktemp("cp")
    config = write_config(root / "c.toml", models["wan2.1-t2v-1.3b"], demo_data, root / "cache", root / "one",
                          train_batch_size=1, max_train_steps=3, checkpointing_steps=2)
    run_stages(config, "preprocess", "train")
    run_stages(config, "train", extra=["--output_dir", root / "one-batch-2", "--train_batch_size", "2"])
    return dict(config=config, one=root / "one", two=root / "one-batch-2")


def test_two_processes_splitting_each_sample_train_as_one_process_and_resume_across(wan_run, tmp_path):
    """And a checkpoint resumes across the two: one process's on 2 processes splitting each sample, theirs
    on one process (a Slurm requeue on another layout), each training what the uninterrupted run trains."""
    out = tmp_path / "cp2"
    cp2 = ["--context_parallel_degree", "2"]
    torchrun("-m", "cogtune.cli", "train", "--config", wan_run["config"], *cp2, "--output_dir", out)
    assert_same_training(out, wan_run["one"], TOLERANCE)

    one_to_cp2 = resume_from(wan_run["one"], 2, tmp_path / "one-to-cp2")
    torchrun("-m", "cogtune.cli", "train", "--config", wan_run["config"], *cp2, "--output_dir", one_to_cp2,
             "--resume_from_checkpoint", "latest")
    cp2_to_one = resume_from(out, 2, tmp_path / "cp2-to-one")
    cogtune_here("train", "--config", wan_run["config"], "--output_dir", cp2_to_one, "--resume_from_checkpoint",
                 "latest")
    for resumed in (one_to_cp2, cp2_to_one):
        assert_same_training(resumed, wan_run["one"], TOLERANCE)


def test_two_groups_of_two_train_as_two_data_parallel_processes(wan_run, tmp_path):
    """4 processes, context parallelism 2: 2 data-parallel groups, a sample each, as one process with
    batches of 2 (which two DDP processes train, tests/e2e/test_distributed.py)."""
    out = tmp_path / "dp2-cp2"
    result = torchrun("-m", "cogtune.cli", "train", "--config", wan_run["config"], "--context_parallel_degree", "2",
                      "--output_dir", out, processes=4)
    assert "split over 2 processes (Ulysses attention), 2 data-parallel groups" in result.stderr
    assert_same_training(out, wan_run["two"], TOLERANCE)


def test_the_degree_must_divide_the_processes_and_does_not_combine_with_compile():
    assert context_parallel_groups(4, 3, 2) == (2, 1) and context_parallel_groups(3, 2, 1) == (3, 2)
    with pytest.raises(CogtuneError, match="must divide the number of processes"):
        context_parallel_groups(3, 0, 2)
    with pytest.raises(CogtuneError, match="--compile do not combine"):
        load_config("train", ["--pretrained_model_name_or_path", "m", "--context_parallel_degree", "2", "--compile"])


@pytest.mark.parametrize("variant", ["1.5-5b-i2v"])  # RoPE, the image condition, ofs and frame padding
def test_cogvideox_with_our_context_parallel_plan_trains_as_one_process(models, demo_data, first_frame, tmp_path,
                                                                        variant):
    """Our plan for CogVideoX (text and video tokens both split, RoPE with the video tokens), with gradient
    checkpointing: 2 processes splitting each sample train what one process trains."""
    extra = dict(image=str(first_frame)) if variant.endswith("i2v") else {}
    config = write_config(tmp_path / "c.toml", models[variant], demo_data, tmp_path / "cache", tmp_path / "one",
                          train_batch_size=1, max_train_steps=2, checkpointing_steps=100, gradient_checkpointing=True,
                          **extra)
    run_stages(config, "preprocess", "train")
    out = tmp_path / "cp2"
    torchrun("-m", "cogtune.cli", "train", "--config", config, "--context_parallel_degree", "2", "--output_dir", out)
    assert_same_training(out, tmp_path / "one", TOLERANCE)


def test_token_counts_that_do_not_split_evenly_are_refused_before_training():
    """CogVideoX-5b at 49x480x720 (published configs, no weights): 17,550 video and 226 text tokens split over
    2 processes, not over 4; Wan 2.1 at 81x480x832 (32,760 video tokens) over 8."""
    from cogtune.families import ModelConfigs

    cogvideox = ModelConfigs.load("THUDM/CogVideoX-5b")
    spec, channels = cogvideox.spec(), cogvideox.transformer["in_channels"]
    assert spec.context_parallel_tokens([16, 13, 60, 90], channels) == {"video": 17550, "text": 226}
    spec.check_context_parallel(2, [(16, 13, 60, 90)], channels)
    with pytest.raises(CogtuneError, match=r"video tokens of the clips of latent shape 16x13x60x90 \(17550\)"):
        spec.check_context_parallel(4, [(16, 13, 60, 90)], channels)
    wan = ModelConfigs.load("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    wan.spec().check_context_parallel(8, [(16, 21, 60, 104)], wan.transformer["in_channels"])


def test_the_estimate_divides_the_activations_by_the_degree():
    from cogtune.families import ModelConfigs
    from cogtune.train.memory import memory_estimate

    argv = ["--pretrained_model_name_or_path", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "--gradient_checkpointing"]
    models = ModelConfigs.load("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    shape = [16, 5, 30, 52]
    one = memory_estimate(load_config("train", argv), models, shape)
    four = memory_estimate(load_config("train", [*argv, "--context_parallel_degree", "4"]), models, shape)
    assert (four.weights, four.lora, four.optimizer) == (one.weights, one.lora, one.optimizer)
    assert four.activations == -(-one.activations // 4) and four.total < one.total


def one_head_copy(model, target):
    """The tiny model with a transformer of one attention head (random weights of the same width), which no
    degree above 1 divides: context parallelism takes ring attention."""
    shutil.copytree(model, target)
    config = json.loads((target / "transformer" / "config.json").read_text())
    config.update(num_attention_heads=1, attention_head_dim=config["num_attention_heads"] * config["attention_head_dim"])
    kind = getattr(__import__("diffusers"), config["_class_name"])
    torch.manual_seed(0)
    kind.from_config(config).save_pretrained(target / "transformer")
    return target


@pytest.mark.parametrize("variant", ["wan2.1-t2v-1.3b", "5b"])  # diffusers' plan for Wan, ours for CogVideoX (RoPE)
def test_ring_attention_trains_as_one_process(models, demo_data, tmp_path, variant):
    """2 processes, a one-head model: ring attention, which merges the shares' attention by their log-sum-exp
    (diffusers' _native_flash backend; tests/cpu_flash_worker.py gives its PyTorch op the CPU's kernel)."""
    model = one_head_copy(models[variant], tmp_path / "one-head")
    config = write_config(tmp_path / "c.toml", model, demo_data, tmp_path / "cache", tmp_path / "one",
                          train_batch_size=1, max_train_steps=2, checkpointing_steps=100)
    run_stages(config, "preprocess", "train")
    out = tmp_path / "ring2"
    result = torchrun(TESTS / "cpu_flash_worker.py", "train", "--config", config, "--context_parallel_degree", "2",
                      "--attention_backend", "_native_flash", "--output_dir", out)
    assert "split over 2 processes (ring attention), 1 data-parallel group" in result.stderr
    assert_same_training(out, tmp_path / "one", TOLERANCE)


def test_ring_attention_needs_a_kernel_that_returns_the_log_sum_exp():
    """A degree that does not divide the heads takes ring attention, with a backend whose kernel returns the
    log-sum-exp on this device (PyTorch's flash and cuDNN ops have CUDA kernels only)."""
    from cogtune.train.model import context_parallel_layout

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert context_parallel_layout(4, 12, None, cpu) == (4, 1)  # Wan 2.1 1.3B's 12 heads: Ulysses
    assert context_parallel_layout(4, 30, "flash", gpu) == (1, 4)  # CogVideoX-2b's 30: ring
    with pytest.raises(CogtuneError, match="needs ring attention"):
        context_parallel_layout(4, 30, None, gpu)
    with pytest.raises(CogtuneError, match="_scaled_dot_product_flash_attention, which PyTorch runs on CUDA GPUs"):
        context_parallel_layout(4, 30, "_native_flash", cpu)
