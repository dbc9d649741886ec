"""Millisecond tests of the pure functions that the process-level tests reach only through torchrun
or whole runs: how batches are shared among processes, the noise each sample gets, how videos are
balanced, the failure limit, the training log, and the quick judgements on paths and files."""

import json
import math

import numpy as np
import pytest
import torch

from cogtune.data.sources import _looks_like_hub_id
from cogtune.data.video import not_a_video
from cogtune.preprocess.plan import failure_limit
from cogtune.train.checkpoint import flatten, unflatten
from cogtune.train.data import epoch_batches, rank_share
from cogtune.train.log import logged_step
from cogtune.util.draws import Draws
from cogtune.util.distributed import balance
from cogtune.util.hub import looks_like_hub_id


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_rank_shares_split_a_full_global_batch_in_order(processes):
    batch = list(range(10, 10 + 2 * processes))
    shares = [rank_share(batch, 2, processes, rank) for rank in range(processes)]
    assert sum((share.indices for share in shares), []) == batch
    assert all(share.real == 2 and share.total == len(batch) for share in shares)


@pytest.mark.parametrize("processes", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [[7], [7, 8, 9], [7, 8, 9, 10, 11]])
def test_a_short_global_batch_counts_each_sample_once_whatever_the_process_count(processes, batch):
    """Every process gets batch_size rows of the batch's shape (repeats fill a short batch), and the
    real rows, taken in order across processes, are the batch itself, each once: the loss weights
    (1 for real rows, 0 for repeats, divided by total / processes) then average to the batch's mean."""
    size = max(1, math.ceil(len(batch) / processes))
    shares = [rank_share(batch, size, processes, rank) for rank in range(processes)]
    assert all(len(share.indices) == (len(batch) if processes == 1 else size) for share in shares)
    assert sum((share.indices[:share.real] for share in shares), []) == batch
    assert all(set(share.indices) <= set(batch) and share.total == len(batch) for share in shares)
    losses = {index: float(index) ** 2 for index in batch}  # any per-sample losses
    per_process = [sum(losses[i] for i in share.indices[:share.real]) / (share.total / processes) for share in shares]
    assert sum(per_process) / processes == pytest.approx(sum(losses.values()) / len(batch))


def test_every_sample_gets_the_same_noise_whatever_the_process_count():
    def draws(start, total):
        return Draws(torch.Generator().manual_seed(5), start=start, total=total)

    whole = draws(0, None)
    alone = (whole.randn((4, 3)), whole.randint(1000, 4), whole.rand(4))
    for rows, starts in ((2, (0, 2)), (1, (0, 1, 2, 3))):
        parts = [draws(start, 4) for start in starts]
        shared = [(d.randn((rows, 3)), d.randint(1000, rows), d.rand(rows)) for d in parts]
        for kind in range(3):
            assert torch.equal(torch.cat([s[kind] for s in shared]), alone[kind])
    short = draws(2, 3)  # the second of two processes, batch 2, of a global batch of 3: one real row
    whole_of_three = draws(0, None)
    noise, reference = short.randn((2, 3)), whole_of_three.randn((3, 3))
    assert torch.equal(noise[0], reference[2]) and torch.isfinite(noise).all()  # the repeat's row counts for nothing


def test_epoch_batches_hold_one_shape_and_every_sample_once():
    shapes = [(4, 3, 4, 8)] * 5 + [(4, 2, 4, 8)] * 3
    batches = epoch_batches(shapes, 2, seed=1, epoch=0)
    assert sorted(i for batch in batches for i in batch) == list(range(8))
    assert all(len({shapes[i] for i in batch}) == 1 for batch in batches)
    assert epoch_batches(shapes, 2, seed=1, epoch=0) == batches != epoch_batches(shapes, 2, seed=1, epoch=1)


def test_balance_gives_each_video_to_the_least_loaded_process():
    costs = [5.0, 1.0, 4.0, 2.0, 3.0]
    owner = balance(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner) if o == rank) for rank in range(2)]
    assert owner == [0, 0, 1, 0, 1] and loads == [8.0, 7.0]  # 5 -> 0, 4 -> 1, 3 -> 1 (4 < 5), 2 -> 0, 1 -> 0 (a tie)
    assert balance([1.0, 1.0, 1.0], 3) == [0, 1, 2]  # ties go to the lowest rank
    assert balance([], 4) == []


@pytest.mark.parametrize("max_failures, clips, limit", [
    (None, 100, None), (10.0, 100, 10), (1.0, 3, 1), (0.05, 100, 5), (0.05, 19, 0), (0.0, 50, 0), (0.5, 7, 3)])
def test_failure_limit_is_a_count_from_one_up_and_a_fraction_below(max_failures, clips, limit):
    assert failure_limit(max_failures, clips) == limit


def test_a_log_line_cut_short_counts_as_after_every_step():
    assert logged_step(json.dumps({"step": 3, "loss": 0.5})) == 3
    for broken in ('{"step": 4, "lo', "", "[1, 2]", '{"loss": 1}'):
        assert logged_step(broken) == math.inf


@pytest.mark.parametrize("head, reason", [
    (b"", "empty"), (b"\x89PNG\r\n\x1a\n" + bytes(100), "PNG"), (b"\xff\xd8\xff\xe0" + bytes(100), "JPEG"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt ", "RIFF"), (b"a caption\nanother\n", "text"),
    ("un chat noir é".encode() * 400, "text"), (b"%PDF-1.7", "PDF")])
def test_files_that_are_certainly_not_videos_say_what_they_are(tmp_path, head, reason):
    path = tmp_path / "x"
    path.write_bytes(head)
    assert reason in not_a_video(path)


@pytest.mark.parametrize("head", [b"\x00\x00\x00\x18ftypmp42" + bytes(64), b"RIFF\x00\x00\x00\x00AVI LIST",
                                  b"\x1aE\xdf\xa3" + bytes(60)])
def test_video_containers_may_be_videos(tmp_path, head):
    path = tmp_path / "x"
    path.write_bytes(head)
    assert not_a_video(path) is None


@pytest.mark.parametrize("name, hub", [
    ("THUDM/CogVideoX-2b", True), ("Wild-Heart/Disney-VideoGeneration-Dataset", True), ("gpt2", True),
    ("./data", False), ("/data/clips", False), ("~/clips", False), ("a/b/c", False), ("a//b", False),
    ("my data/x", False), ("", False)])
def test_hub_ids_are_told_from_paths(name, hub):
    assert looks_like_hub_id(name) is hub


def test_a_metadata_file_name_is_not_a_hub_dataset():
    assert _looks_like_hub_id("user/videos") and not _looks_like_hub_id("clips/metadata.csv")
    assert not _looks_like_hub_id("clips/train.jsonl")


def test_checkpoint_state_round_trips_tensors_arrays_tuples_and_dicts():
    state = {"step": 3, "rng": (1, np.arange(4, dtype=np.uint32), [torch.ones(2), None]), "name": "x",
             "nested": {"a": torch.zeros(1, dtype=torch.bfloat16), "b": 0.5, "c": True}}
    tensors = {}
    stored = json.loads(json.dumps(flatten(state, tensors)))  # what the checkpoint holds is plain JSON
    back = unflatten(stored, tensors)
    assert back["step"] == 3 and back["name"] == "x" and isinstance(back["rng"], tuple)
    assert back["rng"][1].dtype == np.uint32 and np.array_equal(back["rng"][1], np.arange(4))
    assert torch.equal(back["rng"][2][0], torch.ones(2)) and back["rng"][2][1] is None
    assert back["nested"]["a"].dtype == torch.bfloat16 and back["nested"]["b"] == 0.5 and back["nested"]["c"] is True
    with pytest.raises(TypeError, match="cannot store a set"):
        flatten({"bad": {1, 2}}, {})


def published_spec(name: str):
    from cogtune.families import PUBLISHED_DIR, ModelConfigs

    return ModelConfigs.load(str(PUBLISHED_DIR / name)).spec()


def test_clip_sizes_a_family_cannot_take_are_refused_before_encoding():
    from cogtune.errors import CogtuneError

    fifteen = published_spec("cogvideox1.5-5b")  # RoPE "slice" grid: up to sample_height/width (300) x 8 pixels
    fifteen.check_clip_size(81, 768, 1360, False)
    fifteen.check_clip_size(49, 2400, 2400, False)
    with pytest.raises(CogtuneError, match="at most 2400x2400 pixels"):
        fifteen.check_clip_size(81, 2416, 1360, False)
    learned = published_spec("cogvideox-5b-i2v")  # learned positional embeddings: 49x480x720 only
    learned.check_clip_size(49, 480, 720, False)
    with pytest.raises(CogtuneError, match="learned positional embeddings for 49 frames of 480x720 only"):
        learned.check_clip_size(49, 480, 640, False)
    learned.check_clip_size(49, 480, 640, True)  # --ignore_learned_positional_embeddings
    published_spec("cogvideox-2b").check_clip_size(25, 320, 480, False)  # sincos: any size


@pytest.mark.parametrize("name", ["cosine", "linear", "polynomial", "constant_with_warmup", "cosine_with_restarts"])
def test_a_schedule_saved_counting_each_process_resumes_at_the_same_point(name):
    """Checkpoints written before the schedule counted optimizer steps hold a position counted once
    per process (2 here) on a schedule twice as long: in_optimizer_steps divides it back, and the
    learning rates from there on are those of a schedule that always counted optimizer steps."""
    from diffusers.optimization import get_scheduler

    from cogtune.train.checkpoint import LR_SCHEDULE_UNIT, in_optimizer_steps

    def schedule(scale: int):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        return optimizer, get_scheduler(name, optimizer, num_warmup_steps=2 * scale, num_training_steps=10 * scale,
                                        num_cycles=2 if name == "cosine_with_restarts" else 0.5)

    optimizer, old = schedule(2)
    for _ in range(2 * 3):  # 3 optimizer steps on 2 processes, stepped once per process
        optimizer.step()
        old.step()
    saved = old.state_dict()
    reference_optimizer, reference = schedule(1)
    for _ in range(3):
        reference_optimizer.step()
        reference.step()
    resumed_optimizer, resumed = schedule(1)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(in_optimizer_steps(saved, {"num_processes": 2}))
    assert in_optimizer_steps(saved, {"lr_schedule_unit": LR_SCHEDULE_UNIT}) is saved  # new checkpoints as saved
    for _ in range(7):
        for opt, sched in ((reference_optimizer, reference), (resumed_optimizer, resumed)):
            opt.step()
            sched.step()
        assert resumed.get_last_lr() == pytest.approx(reference.get_last_lr(), rel=1e-12)
