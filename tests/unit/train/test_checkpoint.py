"""What a checkpoint keeps: its state round-trips, and its schedule means the same on any number of
processes."""

import json

import numpy as np
import pytest
import torch

from cogtune.train.checkpoint import flatten, unflatten


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
