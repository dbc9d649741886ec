"""Training objectives a family's step is built from, as pure functions: what a step draws beyond
the data (`Objective`, timesteps, caption dropout) and v-prediction over a discrete noise schedule,
the CogVideoX loss. A family's `step_inputs` and `losses` combine them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from cogtune.util.draws import Draws


@dataclass(frozen=True)
class Objective:
    """What a step draws and how it weighs each sample, beyond the data. The defaults are the
    reference's: uniform timesteps, every caption kept, the unweighted loss."""

    noised_image_dropout: float = 0.05  # image-to-video: a sample's image latent zeroed
    timestep_sampling: str = "uniform"  # or logit_normal, mode (diffusers' compute_density_for_timestep_sampling)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    snr_gamma: float | None = None  # min-SNR weighting
    caption_dropout_p: float = 0.0
    caption_dropout_technique: str = "empty"  # the empty prompt's embedding (batch.empty_caption), or zero

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
    return draws.keep((u * num_timesteps).long().clamp(0, num_timesteps - 1), rows)


def posterior_sample(mean: torch.Tensor, logvar: torch.Tensor, draws: Draws) -> torch.Tensor:
    """A sample of the VAE's diagonal Gaussian posterior from its stored moments, in float32."""
    mean, logvar = mean.float(), logvar.float()
    eps = draws.randn(mean.shape).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * eps


def pick_variants(mean: torch.Tensor, logvar: torch.Tensor, draws: Draws) -> tuple[torch.Tensor, torch.Tensor]:
    """One of the K stored encodings of each sample ([B, K, ...] -> [B, ...]), drawn uniformly, in float32."""
    batch, variants = mean.shape[:2]
    chosen = draws.randint(variants, batch)
    rows = torch.arange(batch)
    return mean[rows, chosen].float(), logvar[rows, chosen].float()


def dropped(latents: torch.Tensor, dropout: float, draws: Draws) -> torch.Tensor:
    """Each sample's latents ([B, ...]) zeroed with probability `dropout`."""
    keep = (draws.rand(latents.shape[0]) >= dropout).to(latents.dtype).to(latents.device)
    return latents * keep.view(-1, *[1] * (latents.dim() - 1))


def drop_captions(prompt_embeds: torch.Tensor, empty: torch.Tensor | None, objective: Objective,
                  draws: Draws) -> torch.Tensor:
    """Each sample's caption embedding replaced, with probability caption_dropout_p, by the empty
    prompt's (technique empty: what the pipeline's negative prompt gives) or by zeros."""
    dropped = draws.rand(prompt_embeds.shape[0]).to(prompt_embeds.device) < objective.caption_dropout_p
    replacement = torch.zeros_like(prompt_embeds) if objective.caption_dropout_technique == "zero" else \
        empty.to(prompt_embeds.dtype).expand_as(prompt_embeds)
    return torch.where(dropped.view(-1, 1, 1), replacement, prompt_embeds)


# --- v-prediction over a discrete schedule (DDPM alphas_cumprod) ---------------------------------


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


def add_noise(x0: torch.Tensor, noise: torch.Tensor, constants: StepConstants) -> torch.Tensor:
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, with the coefficients computed in float64."""
    return constants.signal * x0 + constants.noise * noise


def velocity_losses(pred: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, constants: StepConstants) -> torch.Tensor:
    """The v-prediction loss of each sample, [B]: x0_hat = sqrt(abar) x_t - sqrt(1 - abar) pred,
    weighted by 1 / (1 - abar), averaged over the other dimensions."""
    x0_hat = constants.signal * x_t.float() - constants.noise * pred.float()
    return (constants.weight * (x0_hat - x0.float()) ** 2).flatten(1).mean(1)


def velocity_loss(pred: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, constants: StepConstants) -> torch.Tensor:
    """The v-prediction loss, averaged over the batch."""
    return velocity_losses(pred, x_t, x0, constants).mean()


def snr_weights(constants: StepConstants, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights of each sample, [B] (Hang et al. 2023, as diffusers' scripts apply them to
    a v-prediction loss): min(SNR, gamma) / (SNR + 1), SNR = abar / (1 - abar)."""
    snr = (constants.signal ** 2 / constants.noise ** 2).flatten()
    return snr.clamp(max=gamma) / (snr + 1)


@dataclass
class StepInputs:
    """What one training step feeds the transformer, and what its loss compares against."""

    x0: torch.Tensor  # the clean latents, in the transformer's layout
    x_t: torch.Tensor
    model_input: torch.Tensor  # x_t, with the family's conditioning joined
    timesteps: torch.Tensor
    constants: StepConstants
    prompt_embeds: torch.Tensor  # the batch's, some replaced with caption dropout
