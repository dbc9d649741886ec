"""The step's timestep draws (families.objectives.draw_timesteps): uniform as the reference draws,
logit-normal and mode following their densities (checked against the densities' own distribution
functions), and each process drawing its own rows of the global batch."""

from __future__ import annotations

import math

import pytest
import torch

from cogtune.families.objectives import Objective, draw_timesteps
from cogtune.util.draws import Draws

DRAWS = 200_000
STEPS = 1000


def bin_frequencies(timesteps: torch.Tensor, bins: int = 10) -> torch.Tensor:
    return torch.bincount(timesteps * bins // STEPS, minlength=bins).double() / len(timesteps)


def assert_matches(frequencies: torch.Tensor, cdf) -> None:
    """Each bin's frequency within 5 standard errors of its probability under `cdf` (of u in [0, 1);
    timestep t = floor(u * 1000)), so that the check holds for any seed, not only this one."""
    bins = len(frequencies)
    edges = [cdf(i / bins) for i in range(bins + 1)]
    for i, frequency in enumerate(frequencies.tolist()):
        p = edges[i + 1] - edges[i]
        assert abs(frequency - p) <= 5 * math.sqrt(p * (1 - p) / DRAWS) + 1e-9, (i, frequency, p)


def drawn(objective: Objective, seed: int = 0) -> torch.Tensor:
    return draw_timesteps(objective, Draws(torch.Generator().manual_seed(seed)), DRAWS, STEPS)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (-0.5, 0.7)])
def test_logit_normal_timesteps_follow_their_density(mean, std):
    timesteps = drawn(Objective(timestep_sampling="logit_normal", logit_mean=mean, logit_std=std))
    assert timesteps.min() >= 0 and timesteps.max() < STEPS

    def cdf(u: float) -> float:  # P(sigmoid(N(mean, std)) <= u)
        if u <= 0 or u >= 1:
            return float(u >= 1)
        return 0.5 * (1 + math.erf((math.log(u / (1 - u)) - mean) / (std * math.sqrt(2))))

    assert_matches(bin_frequencies(timesteps), cdf)


@pytest.mark.parametrize("scale", [0.0, 1.29])
def test_mode_timesteps_follow_their_density(scale):
    timesteps = drawn(Objective(timestep_sampling="mode", mode_scale=scale))

    def g(u: float) -> float:  # the SD3 paper's mode map of a uniform u (decreasing for scale < 1.75)
        return 1 - u - scale * (math.cos(math.pi * u / 2) ** 2 - 1 + u)

    def cdf(x: float) -> float:  # P(g(U) <= x) = 1 - g^-1(x), by bisection
        low, high = 0.0, 1.0
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if g(middle) > x else (low, middle)
        return 1 - low

    assert_matches(bin_frequencies(timesteps), cdf)


def test_uniform_timesteps_are_the_references_draw():
    ours = draw_timesteps(Objective(), Draws(torch.Generator().manual_seed(3)), 8, STEPS)
    assert torch.equal(ours, torch.randint(0, STEPS, (8,), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("sampling", ["logit_normal", "mode"])
def test_a_process_draws_its_own_rows_of_the_global_batch(sampling):
    objective = Objective(timestep_sampling=sampling)
    whole = draw_timesteps(objective, Draws(torch.Generator().manual_seed(5)), 6, STEPS)
    part = draw_timesteps(objective, Draws(torch.Generator().manual_seed(5), start=2, total=6), 3, STEPS)
    assert torch.equal(part, whole[2:5])
