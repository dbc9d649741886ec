"""One training step's math, as pure functions: the randomness of a batch (drawn in full on every
process, each keeping its own rows), the posterior samples, the noise schedule's constants, the
inputs the transformer gets and the CogVideoX velocity loss."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from cogtune.families import FamilySpec


@dataclass
class Draws:
    """The random numbers of one global batch, drawn in full on every process from the batch's
    generator, of which a process keeps the rows of its own samples: each sample gets the same
    noise whether the global batch is trained by one process or shared among several."""

    generator: torch.Generator
    start: int = 0  # this process's first row in the global batch
    total: int | None = None  # real samples of the global batch (None: this process's batch is all of it)

    def _keep(self, drawn: torch.Tensor, rows: int) -> torch.Tensor:
        """This process's rows; rows past the global batch's real samples (repeats of weight zero,
        see train.data.Share) get the first row's numbers, which nothing uses."""
        kept = drawn[self.start:self.start + rows]
        if len(kept) < rows:
            kept = torch.cat([kept, drawn[:1].expand(rows - len(kept), *drawn.shape[1:])])
        return kept

    def randn(self, shape) -> torch.Tensor:
        return self._keep(torch.randn((self.total or shape[0], *shape[1:]), generator=self.generator), shape[0])

    def randint(self, high: int, rows: int) -> torch.Tensor:
        return self._keep(torch.randint(0, high, (self.total or rows,), generator=self.generator), rows)

    def rand(self, rows: int) -> torch.Tensor:
        return self._keep(torch.rand(self.total or rows, generator=self.generator), rows)


def sample_x0(mean: torch.Tensor, logvar: torch.Tensor, spec: FamilySpec, draws: Draws) -> torch.Tensor:
    """A fresh sample of the VAE posterior, scaled for the transformer, as [B, F, C, H, W] float32.

    mean, logvar: [B, C, F, H, W] as stored in the cache."""
    mean, logvar = mean.float(), logvar.float()
    eps = draws.randn(mean.shape).to(mean.device)
    latents = mean + torch.exp(0.5 * logvar) * eps
    return spec.scale_latents(latents).permute(0, 2, 1, 3, 4).contiguous()


def sample_image_latents(mean: torch.Tensor, logvar: torch.Tensor, spec: FamilySpec, draws: Draws,
                         dropout: float) -> torch.Tensor:
    """The image-to-video conditioning latent of each sample, [B, 1, C, H, W] float32: one of its
    stored noised first-frame encodings picked at random, sampled from its posterior, scaled as
    the I2V pipeline does, and zeroed with probability `dropout`.

    mean, logvar: [B, K, C, 1, H, W], the K stored encodings of each sample."""
    batch, variants = mean.shape[:2]
    chosen = draws.randint(variants, batch)
    rows = torch.arange(batch)
    mean, logvar = mean[rows, chosen].float(), logvar[rows, chosen].float()
    eps = draws.randn(mean.shape).to(mean.device)
    latents = spec.scale_image_latents(mean + torch.exp(0.5 * logvar) * eps).permute(0, 2, 1, 3, 4)
    keep = (draws.rand(batch) >= dropout).to(latents.dtype).to(latents.device)
    return latents * keep.view(-1, 1, 1, 1, 1)


@dataclass
class NoiseSchedule:
    """The timestep-dependent constants of the loss, computed once in float64 from alphas_cumprod."""

    alphas_cumprod: torch.Tensor

    def __post_init__(self):
        abar = self.alphas_cumprod.to(torch.float64)
        self.signal, self.noise, self.weight = abar.sqrt(), (1 - abar).sqrt(), 1 / (1 - abar)

    def __len__(self):
        return len(self.alphas_cumprod)

    def at(self, timesteps: torch.Tensor) -> "StepConstants":
        return StepConstants(*(table[timesteps].float().view(-1, 1, 1, 1, 1)
                               for table in (self.signal, self.noise, self.weight)))


@dataclass
class StepConstants:
    """sqrt(abar_t), sqrt(1 - abar_t) and 1 / (1 - abar_t) of a batch's timesteps, shaped [B, 1, 1, 1, 1]."""

    signal: torch.Tensor
    noise: torch.Tensor
    weight: torch.Tensor

    def to(self, device) -> "StepConstants":
        return StepConstants(self.signal.to(device), self.noise.to(device), self.weight.to(device))


@dataclass(frozen=True)
class Objective:
    """What a step draws and how it weighs each sample, beyond the data. The defaults are the
    reference's: uniform timesteps, every caption kept, the unweighted velocity loss."""

    noised_image_dropout: float = 0.05  # image-to-video: a sample's image latent zeroed
    timestep_sampling: str = "uniform"  # or logit_normal, mode (diffusers' compute_density_for_timestep_sampling)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    snr_gamma: float | None = None  # min-SNR weighting
    caption_dropout_p: float = 0.0
    caption_dropout_technique: str = "empty"  # the empty prompt's embedding (batch["empty_prompt_embeds"]), or zero

    @classmethod
    def of(cls, config) -> "Objective":
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def draw_timesteps(objective: Objective, draws: Draws, rows: int, num_timesteps: int) -> torch.Tensor:
    """The step's timesteps: uniform integers (the reference), or diffusers' logit-normal or mode
    density over [0, 1) scaled to the schedule, as its flow-matching scripts index their sigmas."""
    if objective.timestep_sampling == "uniform":
        return draws.randint(num_timesteps, rows)
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        objective.timestep_sampling, draws.total or rows, logit_mean=objective.logit_mean,
        logit_std=objective.logit_std, mode_scale=objective.mode_scale, generator=draws.generator)
    return draws._keep((u * num_timesteps).long().clamp(0, num_timesteps - 1), rows)


def snr_weights(constants: StepConstants, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights of each sample, [B] (Hang et al. 2023, as diffusers' scripts apply them to
    a v-prediction loss, which the CogVideoX loss is): min(SNR, gamma) / (SNR + 1), SNR = abar / (1 - abar)."""
    snr = (constants.signal ** 2 / constants.noise ** 2).flatten()
    return snr.clamp(max=gamma) / (snr + 1)


@dataclass
class StepInputs:
    """What one training step feeds the transformer, and what its loss compares against."""

    x0: torch.Tensor  # [B, F, C, H, W], F padded for CogVideoX 1.5
    x_t: torch.Tensor
    model_input: torch.Tensor  # x_t, with the image condition concatenated on channels for I2V
    timesteps: torch.Tensor
    constants: StepConstants
    prompt_embeds: torch.Tensor  # the batch's, some replaced with caption dropout


def step_inputs(batch: dict, spec: FamilySpec, draws: Draws, schedule: NoiseSchedule,
                objective: Objective) -> StepInputs:
    """The randomness of one step, drawn in a fixed order: the video posterior sample, timesteps,
    noise, then (I2V) the image encoding, its posterior sample and dropout, then (with caption
    dropout) which captions are dropped. Options that are off draw nothing."""
    x0 = spec.pad_frames(sample_x0(batch["mean"], batch["logvar"], spec, draws))
    timesteps = draw_timesteps(objective, draws, x0.shape[0], len(schedule))
    noise = draws.randn(x0.shape)
    constants = schedule.at(timesteps).to(x0.device)
    x_t = add_noise(x0, noise.to(x0.device), constants)
    model_input = x_t
    if spec.image_conditioned:
        image = sample_image_latents(batch["image_mean"], batch["image_logvar"], spec, draws,
                                     objective.noised_image_dropout)
        model_input = torch.cat([x_t, spec.image_condition(image, x0.shape[1])], dim=2)
    prompt_embeds = batch["prompt_embeds"]
    if objective.caption_dropout_p > 0:
        prompt_embeds = drop_captions(prompt_embeds, batch.get("empty_prompt_embeds"), objective, draws)
    return StepInputs(x0=x0, x_t=x_t, model_input=model_input, timesteps=timesteps, constants=constants,
                      prompt_embeds=prompt_embeds)


def drop_captions(prompt_embeds: torch.Tensor, empty: torch.Tensor | None, objective: Objective,
                  draws: Draws) -> torch.Tensor:
    """Each sample's caption embedding replaced, with probability caption_dropout_p, by the empty
    prompt's (technique empty: what the pipeline's negative prompt gives) or by zeros."""
    dropped = draws.rand(prompt_embeds.shape[0]).to(prompt_embeds.device) < objective.caption_dropout_p
    replacement = torch.zeros_like(prompt_embeds) if objective.caption_dropout_technique == "zero" else \
        empty.to(prompt_embeds.dtype).expand_as(prompt_embeds)
    return torch.where(dropped.view(-1, 1, 1), replacement, prompt_embeds)


def velocity_losses(pred: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, constants: StepConstants) -> torch.Tensor:
    """The CogVideoX training loss of each sample, [B]: x0_hat = sqrt(abar) x_t - sqrt(1 - abar)
    pred, weighted by 1 / (1 - abar), averaged over (F, C, H, W)."""
    x0_hat = constants.signal * x_t.float() - constants.noise * pred.float()
    return (constants.weight * (x0_hat - x0.float()) ** 2).flatten(1).mean(1)


def velocity_loss(pred: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, constants: StepConstants) -> torch.Tensor:
    """The CogVideoX training loss, averaged over the batch."""
    return velocity_losses(pred, x_t, x0, constants).mean()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, constants: StepConstants) -> torch.Tensor:
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, with the coefficients computed in float64."""
    return constants.signal * x0 + constants.noise * noise


def training_loss(transformer, batch: dict, spec: FamilySpec, draws: Draws, schedule: NoiseSchedule,
                  objective: Objective, family_inputs, weight_dtype: torch.dtype, autocast,
                  real: int | None = None, per_process: float | None = None) -> torch.Tensor:
    """One micro-batch's loss: draw the step's inputs, run the transformer (under autocast, in
    weight_dtype) and compare its velocity with x0 (min-SNR weighted with objective.snr_gamma).
    family_inputs(batch, frames, height, width): the family's extra keyword inputs
    (spec.transformer_inputs, cached per shape). With `real` and `per_process` (train.data.Share),
    the sum over the first `real` samples divided by `per_process`: the rows after them are repeats
    that count for nothing. Else the mean."""
    inputs = step_inputs(batch, spec, draws, schedule, objective)
    with autocast():
        pred = transformer(
            hidden_states=inputs.model_input.to(weight_dtype),
            encoder_hidden_states=inputs.prompt_embeds.to(weight_dtype),
            timestep=inputs.timesteps.to(inputs.x0.device),
            **family_inputs(inputs.x0.shape[0], inputs.x0.shape[1], *inputs.x0.shape[3:]),
            return_dict=False,
        )[0]
    losses = velocity_losses(pred, inputs.x_t.to(weight_dtype), inputs.x0, inputs.constants)
    if objective.snr_gamma is not None:
        losses = losses * snr_weights(inputs.constants, objective.snr_gamma)
    if real is None:
        return losses.mean()
    return losses[:real].sum() / per_process
