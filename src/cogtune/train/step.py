"""One training step: the family draws the step's inputs from the batch, the transformer runs, and
the family's objective weighs its output. The math itself is the family's (`families/`)."""

from __future__ import annotations

import torch

from cogtune.families import ModelFamily
from cogtune.families.objectives import Objective
from cogtune.util.draws import Draws


def training_loss(transformer, batch: dict, spec: ModelFamily, draws: Draws, schedule, objective: Objective,
                  family_inputs, weight_dtype: torch.dtype, autocast, real: int | None = None,
                  per_process: float | None = None) -> torch.Tensor:
    """One micro-batch's loss: draw the step's inputs, run the transformer (under autocast, in
    weight_dtype) and take the family's loss of its output. family_inputs(batch, frames, height,
    width): the family's extra keyword inputs (spec.transformer_inputs, cached per shape). With
    `real` and `per_process` (train.data.Share), the sum over the first `real` samples divided by
    `per_process`: the rows after them are repeats that count for nothing. Else the mean."""
    inputs = spec.step_inputs(batch, draws, schedule, objective)
    with autocast():
        pred = transformer(**spec.model_inputs(inputs, weight_dtype), **family_inputs(*spec.latent_size(inputs)),
                           return_dict=False)[0]
    losses = spec.losses(pred, inputs, weight_dtype, objective)
    if real is None:
        return losses.mean()
    return losses[:real].sum() / per_process
