import pytest
import torch

from cogtune.train.data import epoch_batches
from cogtune.families.objectives import NoiseSchedule, add_noise, velocity_loss


def test_every_sample_once_per_epoch_batches_of_one_shape():
    shapes = [(4, 3, 4, 6)] * 7 + [(4, 2, 4, 6)] * 5 + [(4, 3, 6, 4)] * 3
    for epoch in range(3):
        batches = epoch_batches(shapes, 2, seed=1, epoch=epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(shapes)))
        assert all(len({shapes[i] for i in b}) == 1 for b in batches)
        assert all(1 <= len(b) <= 2 for b in batches)


def test_order_is_deterministic_and_shuffled_across_the_dataset():
    shapes = [(1,)] * 10 + [(2,)] * 10
    assert epoch_batches(shapes, 2, 7, 0) == epoch_batches(shapes, 2, 7, 0)
    assert epoch_batches(shapes, 2, 7, 0) != epoch_batches(shapes, 2, 7, 1)
    assert epoch_batches(shapes, 2, 7, 0) != epoch_batches(shapes, 2, 8, 0)
    first_shapes = [shapes[b[0]] for b in epoch_batches(shapes, 2, 7, 0)]
    assert first_shapes != sorted(first_shapes)  # buckets interleave rather than run one after another


@pytest.fixture(scope="module")
def scheduler():
    from diffusers import CogVideoXDDIMScheduler

    from cogtune.dev.tiny import SCHEDULER_2B

    return CogVideoXDDIMScheduler(**SCHEDULER_2B)


def test_loss_equals_the_design_formula(scheduler):
    torch.manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, 6)
    noise = torch.randn_like(x0)
    pred = torch.randn_like(x0)
    timesteps = torch.tensor([0, 500, 999])
    constants = NoiseSchedule(scheduler.alphas_cumprod).at(timesteps)

    x_t = add_noise(x0, noise, constants)
    ours = velocity_loss(pred, x_t, x0, constants)

    # DESIGN.md, written out with the scheduler's own operations: x_t = add_noise(x0, eps, t),
    # x0_hat = get_velocity(pred, x_t, t), loss = mean_b mean_FCHW 1/(1-abar) (x0_hat - x0)^2.
    reference_x_t = scheduler.add_noise(x0, noise, timesteps)
    assert torch.allclose(x_t, reference_x_t, atol=1e-5)
    x0_hat = scheduler.get_velocity(pred, reference_x_t, timesteps)
    weights = 1 / (1 - scheduler.alphas_cumprod[timesteps])
    reference = torch.stack([(weights[b] * (x0_hat[b] - x0[b]) ** 2).mean() for b in range(3)]).mean()
    assert torch.allclose(ours, reference, rtol=1e-5)

    # ... which equals the plain MSE between predicted and true velocity.
    true_velocity = scheduler.get_velocity(x0, noise, timesteps)
    assert torch.allclose(ours, ((pred - true_velocity) ** 2).mean(), rtol=1e-4)


def test_loss_is_zero_for_the_true_velocity(scheduler):
    x0 = torch.randn(2, 1, 4, 2, 2)
    noise = torch.randn_like(x0)
    timesteps = torch.tensor([10, 900])
    constants = NoiseSchedule(scheduler.alphas_cumprod).at(timesteps)
    x_t = add_noise(x0, noise, constants)
    velocity = scheduler.get_velocity(x0, noise, timesteps)
    assert velocity_loss(velocity, x_t, x0, constants).item() < 1e-8
