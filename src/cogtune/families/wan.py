"""What differs between Wan families, decided in one place from the pipeline's own config files.

Nothing here looks at a model's name: model_index.json and the part configs say everything.

    family            transformer in/out   VAE (z, spatial)   image input                       timesteps
    2.1 T2V 1.3B/14B  16 / 16              16, 8x             -                                 one per sample
    2.1 I2V 14B       36 / 16              16, 8x             mask + VAE(first frame, zeros)    one per sample
                                                              on channels; CLIP image tokens
    2.2 TI2V 5B       48 / 48              48, 16x            (I2V pipeline) first latent       one per token
                                                              frame replaced by the image's     (expand_timesteps)
    2.2 A14B T2V/I2V  16 / 16, 36 / 16     16, 8x             as 2.1 I2V, no CLIP               two experts split
                                                                                                at boundary_ratio

Latent conventions follow the diffusers Wan pipelines, which are what a trained LoRA runs in: the
transformer works on (VAE latents - latents_mean) * (1 / latents_std), per channel, in [B, C, F, H, W].
Training is flow matching (rectified flow): x_t = (1 - sigma) x0 + sigma eps, the target eps - x0,
and the timestep is what the pipeline's flow-matching scheduler gives at that sigma (1000 sigma, the
sigma after the model's flow shift).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from cogtune.data_schema import TensorSet, TrainingBatch
from cogtune.errors import CogtuneError
from cogtune.families.base import ModelFamily, _transformers, meta_transformers_model
from cogtune.families.objectives import Objective, drop_captions, draw_timesteps, posterior_sample
from cogtune.util.draws import Draws

# diffusers' module names -> Wan's original ones (ComfyUI's), from the renames of diffusers'
# scripts/convert_wan_to_diffusers.py (TRANSFORMER_KEYS_RENAME_DICT), for every linear layer.
ORIGINAL_NAMES = (
    ("attn1.to_q", "self_attn.q"), ("attn1.to_k", "self_attn.k"), ("attn1.to_v", "self_attn.v"),
    ("attn1.to_out.0", "self_attn.o"), ("attn2.to_q", "cross_attn.q"), ("attn2.to_k", "cross_attn.k"),
    ("attn2.to_v", "cross_attn.v"), ("attn2.to_out.0", "cross_attn.o"), ("attn2.add_k_proj", "cross_attn.k_img"),
    ("attn2.add_v_proj", "cross_attn.v_img"), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("proj_out", "head.head"),
)
TEXT_LENGTH = 512  # the Wan pipelines' max_sequence_length: every caption is padded to it
EXPERTS = ("high_noise", "low_noise")  # Wan 2.2 A14B: `transformer` and `transformer_2`


@dataclass
class FlowSchedule:
    """The training sigmas of the pipeline's flow-matching schedule: 1000 levels from 1 down to
    1/1000, shifted by the model's flow shift, as diffusers' FlowMatchEulerDiscreteScheduler builds
    them; index 0 is pure noise. `first`/`last` bound the indices a run draws from (a Wan 2.2 expert's
    range of timesteps)."""

    sigmas: torch.Tensor  # float64, descending
    first: int = 0
    last: int | None = None

    @classmethod
    def shifted(cls, shift: float, num_train_timesteps: int = 1000) -> "FlowSchedule":
        sigmas = torch.linspace(1, num_train_timesteps, num_train_timesteps, dtype=torch.float64).flip(0)
        sigmas = sigmas / num_train_timesteps
        return cls(shift * sigmas / (1 + (shift - 1) * sigmas))

    @property
    def timesteps(self) -> torch.Tensor:
        return self.sigmas * len(self.sigmas)

    def __len__(self):
        return (len(self.sigmas) if self.last is None else self.last) - self.first

    def between(self, low: float, high: float) -> "FlowSchedule":
        """The levels whose timestep t lies in [low, high) (a Wan 2.2 expert's share)."""
        inside = ((self.timesteps >= low) & (self.timesteps < high)).nonzero().flatten()
        return FlowSchedule(self.sigmas, int(inside[0]), int(inside[-1]) + 1)


@dataclass
class FlowStepInputs:
    """What one flow-matching training step feeds the transformer, and what its loss compares against."""

    x0: torch.Tensor  # [B, C, F, H, W], normalised latents
    noise: torch.Tensor
    model_input: torch.Tensor  # x_t, with the family's image conditioning
    timesteps: torch.Tensor  # [B], or [B, tokens] for Wan 2.2 TI2V
    prompt_embeds: torch.Tensor
    image_embeds: torch.Tensor | None  # CLIP image tokens (Wan 2.1 I2V)
    loss_from_frame: int  # 1 where the first latent frame is the given image (TI2V image-to-video)


@dataclass(frozen=True)
class FirstFrameEncoders:
    """What encodes an image-to-video model's first frame: the VAE, and (Wan 2.1 I2V) CLIP."""

    vae: torch.nn.Module
    image_processor: object = None
    image_encoder: torch.nn.Module | None = None


@dataclass(frozen=True)
class Wan(ModelFamily):
    """A Wan 2.1 or 2.2 variant, from its model_index.json and its transformer, VAE and scheduler configs."""

    name = "Wan"
    pipelines = ("WanPipeline", "WanImageToVideoPipeline")
    config_files = {"transformer": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json",
                    "text_encoder": "config.json", "transformer_2": "config.json", "image_encoder": "config.json"}
    optional_parts = ("transformer_2", "image_encoder")
    encoded_parts = ("vae", "text_encoder", "image_encoder")
    transformer_class, vae_class, text_encoder_class = "WanTransformer3DModel", "AutoencoderKLWan", "UMT5EncoderModel"
    variants = {"wan2.1-t2v-1.3b": "Wan2.1-T2V-1.3B", "wan2.1-t2v-14b": "Wan2.1-T2V-14B",
                "wan2.1-i2v-14b-480p": "Wan2.1-I2V-14B-480P", "wan2.1-i2v-14b-720p": "Wan2.1-I2V-14B-720P",
                "wan2.2-ti2v-5b": "Wan2.2-TI2V-5B", "wan2.2-t2v-a14b": "Wan2.2-T2V-A14B",
                "wan2.2-i2v-a14b": "Wan2.2-I2V-A14B"}
    published = {f"wan-ai/{name}-diffusers".lower(): name.lower() for name in variants.values()}
    # Named sets of --lora_target_modules, by the names of WanTransformerBlock's layers: its self- and
    # cross-attention projections (what musubi-tuner and finetrainers adapt), plus the feed-forward
    # layers, plus the added image key/value projections of Wan 2.1 I2V.
    target_presets = {
        "attention": ["to_q", "to_k", "to_v", "to_out.0"],
        "attention_ffn": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"],
        "all_linear": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "add_k_proj", "add_v_proj"],
    }
    frame_step = 4  # the Wan VAEs take 4k+1 frames

    pipeline_name: str  # model_index.json _class_name
    latent_channels: int
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    vae_scale_spatial: int
    vae_scale_temporal: int
    patch_size: tuple[int, int, int]
    in_channels: int
    text_embed_dim: int  # the transformer's text_dim: the width of a caption embedding
    image_dim: int | None  # CLIP image tokens' width (Wan 2.1 I2V), else None
    image_tokens: int  # CLIP's tokens per image (257 for ViT-H/14 at 224)
    expand_timesteps: bool  # Wan 2.2 TI2V: a timestep per token, the image's tokens at 0
    boundary_ratio: float | None  # Wan 2.2 A14B: transformer for t >= ratio x 1000, transformer_2 below
    two_experts: bool
    flow_shift: float
    num_train_timesteps: int
    expert: str | None = None  # Wan 2.2 A14B: the expert a run trains (with_expert)

    @classmethod
    def from_configs(cls, configs: dict[str, dict]) -> "Wan":
        transformer, vae, scheduler = configs["transformer"], configs["vae"], configs.get("scheduler") or {}
        index = configs.get("model_index") or {}
        if "z_dim" not in vae or "text_dim" not in transformer:
            raise CogtuneError("The transformer and VAE configs are not those of a Wan model (no text_dim or z_dim); "
                               "the model folder mixes components of different models.")
        spec = cls(
            pipeline_name=index.get("_class_name", "WanPipeline"),
            latent_channels=int(vae["z_dim"]),
            latents_mean=tuple(float(v) for v in vae["latents_mean"]),
            latents_std=tuple(float(v) for v in vae["latents_std"]),
            vae_scale_spatial=int(vae.get("scale_factor_spatial") or 8),
            vae_scale_temporal=int(vae.get("scale_factor_temporal") or 4),
            patch_size=tuple(int(p) for p in transformer["patch_size"]),
            in_channels=int(transformer["in_channels"]),
            text_embed_dim=int(transformer["text_dim"]),
            image_dim=transformer.get("image_dim"),
            image_tokens=_clip_tokens(configs.get("image_encoder")),
            expand_timesteps=bool(index.get("expand_timesteps")),
            boundary_ratio=index.get("boundary_ratio"),
            two_experts="transformer_2" in configs,
            flow_shift=float(scheduler.get("flow_shift") or scheduler.get("shift") or 1.0),
            num_train_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
        )
        out_channels = int(transformer.get("out_channels") or spec.in_channels)
        if out_channels != spec.latent_channels or spec.in_channels not in (
                spec.latent_channels, 2 * spec.latent_channels + spec.vae_scale_temporal):
            raise CogtuneError(
                f"The transformer takes {spec.in_channels} channels and makes {out_channels}, but the VAE makes "
                f"{spec.latent_channels}; the model folder mixes components of different models.")
        if spec.image_dim and "image_encoder" not in configs:
            raise CogtuneError("The transformer takes CLIP image tokens (image_dim), but the pipeline has no "
                               "image_encoder; give the Wan 2.1 image-to-video pipeline folder as it is published.")
        if scheduler.get("prediction_type", "flow_prediction") not in ("flow_prediction", None) \
                and "shift" not in scheduler:
            raise CogtuneError(f"The scheduler predicts {scheduler['prediction_type']!r}; Wan models are flow "
                               "matching models (flow_prediction). Is this a Wan pipeline?")
        if spec.two_experts and spec.boundary_ratio is None:
            raise CogtuneError("The pipeline has a transformer_2 but no boundary_ratio in model_index.json: it "
                               "cannot say which expert denoises which timesteps.")
        return spec

    # --- what it is ----------------------------------------------------------------------------

    @property
    def channel_conditioned(self) -> bool:
        """Wan 2.1 I2V and 2.2 I2V A14B: a mask and the image's latents joined on channels."""
        return self.in_channels > self.latent_channels

    @property
    def image_conditioned(self) -> bool:
        return self.channel_conditioned or (self.expand_timesteps and self.pipeline_name == "WanImageToVideoPipeline")

    @property
    def description(self) -> str:
        if self.expand_timesteps:
            version = "Wan 2.2 TI2V"
        elif self.two_experts:
            version = "Wan 2.2 A14B"
        else:
            version = "Wan 2.1"
        kind = "image-to-video" if self.image_conditioned else "text-to-video"
        return f"{version} {kind} ({self.latent_channels} latent channels, flow shift {self.flow_shift:g})"

    @property
    def pipeline_class_name(self) -> str:
        return "WanImageToVideoPipeline" if self.image_conditioned else "WanPipeline"

    @property
    def recommended_precision(self) -> str:
        return "bf16"

    def check_precision(self, mixed_precision: str, warn) -> None:
        if mixed_precision == "fp16":
            warn(f"warning: this {self.description} model was trained in bf16; fp16 may overflow. "
                 "--mixed_precision bf16 is recommended.")

    # --- sizes ---------------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_spatial * self.patch_size[1]

    @property
    def size_reason(self) -> str:
        return f"the VAE downsamples by {self.vae_scale_spatial} and the transformer patches by {self.patch_size[1]}"

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.vae_scale_temporal + 1

    def check_clip_size(self, num_frames: int, height: int, width: int,
                        ignore_learned_positional_embeddings: bool) -> None:
        """Wan's RoPE is computed for any size; frames and sizes are checked by check_frames and check_size."""

    # --- the parts -----------------------------------------------------------------------------

    def with_expert(self, expert: str | None) -> "Wan":
        if not self.two_experts:
            return super().with_expert(expert)
        if expert is None:
            raise CogtuneError(
                f"This {self.description} pipeline has two experts: give --expert high_noise (transformer, timesteps "
                f"from {self.boundary_ratio * self.num_train_timesteps:g} up) or --expert low_noise (transformer_2, "
                "below). Train one run for each; both use the same cache.")
        return dataclasses.replace(self, expert=expert)

    @classmethod
    def image_to_video_index(cls, configs: dict[str, dict]) -> dict:
        if not cls.from_configs(configs).expand_timesteps:
            return super().image_to_video_index(configs)
        return dict(configs.get("model_index") or {}, _class_name="WanImageToVideoPipeline")

    @property
    def transformer_part(self) -> str:
        """The pipeline part a run trains: `transformer`, or Wan 2.2 A14B's low-noise `transformer_2`."""
        return "transformer_2" if self.expert == "low_noise" else "transformer"

    def load_transformer(self, models, dtype: torch.dtype, **kwargs) -> torch.nn.Module:
        from diffusers import WanTransformer3DModel

        return models.load_part(WanTransformer3DModel, self.transformer_part, dtype=dtype, **kwargs)

    def lora_load_arguments(self, info: dict) -> dict:
        return {"load_into_transformer_2": True} if info.get("expert") == "low_noise" else {}

    def lora_components(self, info: dict) -> list[str]:
        return ["transformer_2"] if info.get("expert") == "low_noise" else ["transformer"]

    def blocks(self, transformer) -> torch.nn.ModuleList:
        return transformer.blocks

    # A block's first argument, hidden_states, is its large state; the text states and the timestep
    # embedding are the same tensors for every block (what checkpoint offload leaves where they are).
    block_state_arguments = 1

    def block_states(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        names = ("hidden_states",)
        return [*args[:self.block_state_arguments], *(kwargs[k] for k in names if k in kwargs)]

    # --- encoding (stage 1) --------------------------------------------------------------------

    @property
    def tensors(self) -> TensorSet:
        """Per caption the UMT5 embedding; per video window the VAE posterior's mean and log-variance;
        per image-to-video first frame its normalised latent condition (and CLIP tokens for 2.1 I2V)."""
        first_frame = ()
        if self.image_conditioned:
            first_frame = ("condition", "image_embeds") if self.image_dim else ("condition",)
        return TensorSet(caption=("prompt_embeds",), video=("mean", "logvar"), first_frame=first_frame)

    @property
    def text_length(self) -> int:
        return TEXT_LENGTH

    noised_first_frame = False  # the Wan pipelines encode the image as it is (CogVideoX adds noise)
    first_frame_depends_on_frames = True  # Wan 2.1's condition is the VAE of the image and F - 1 zero frames

    @torch.no_grad()
    def embed_texts(self, texts: list[str], tokenizer, text_encoder) -> tuple[list[dict[str, torch.Tensor]], int]:
        """Each text as WanPipeline._get_t5_prompt_embeds makes it: cleaned, tokenized to 512 with its
        attention mask, UMT5's last hidden state trimmed to the text's tokens and zero-padded to 512.
        Each text through UMT5 on its own (the cache is content-addressed)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        cleaned = [prompt_clean(text) for text in texts]
        tokens = tokenizer(cleaned, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                           add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        full_lengths = tokenizer(cleaned, add_special_tokens=True, return_length=True)["length"]
        device = text_encoder.device
        embeds = []
        for number in range(len(texts)):
            ids, mask = tokens.input_ids[number:number + 1].to(device), tokens.attention_mask[number:number + 1].to(device)
            hidden = text_encoder(ids, mask).last_hidden_state[0]
            length = int(mask.gt(0).sum())
            embeds.append({"prompt_embeds": torch.cat([hidden[:length], hidden.new_zeros(TEXT_LENGTH - length,
                                                                                          hidden.shape[1])])})
        return embeds, sum(length > TEXT_LENGTH for length in full_lengths)

    def text_tokens(self, device) -> torch.Tensor:
        return torch.zeros(1, TEXT_LENGTH, dtype=torch.long, device=device)

    @torch.no_grad()
    def encode_pixels(self, vae, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """[1, C, F, H, W] pixels in [-1, 1] -> the VAE posterior's mean and logvar, [C, f, h, w] each."""
        posterior = vae.encode(pixels).latent_dist
        return {"mean": posterior.mean[0], "logvar": posterior.logvar[0]}

    def first_frame_encoders(self, models, vae, device, dtype) -> FirstFrameEncoders:
        """The VAE, and for Wan 2.1 I2V the pipeline's CLIP image processor and encoder."""
        if not self.image_dim:
            return FirstFrameEncoders(vae)
        index = models.model_index
        processor = models.load_part(_transformers(index["image_processor"][1]), "image_processor", weights=False)
        encoder = models.load_part(_transformers(index["image_encoder"][1]), "image_encoder", dtype=dtype)
        return FirstFrameEncoders(vae, processor, encoder.to(device).eval())

    def image_encoder_bytes(self, models, dtype: torch.dtype) -> int:
        """CLIP's weights (Wan 2.1 I2V), built on the meta device from its config."""
        if not self.image_dim:
            return 0
        encoder = meta_transformers_model(models.model_index["image_encoder"][1], models.image_encoder, dtype)
        return sum(p.numel() * p.element_size() for p in encoder.parameters())

    @torch.no_grad()
    def encode_first_frame(self, encoders: FirstFrameEncoders, pixels: torch.Tensor,
                           num_frames: int) -> dict[str, torch.Tensor]:
        """[1, C, 1, H, W] first frame in [-1, 1] -> its conditioning tensors, as the Wan I2V pipeline's
        prepare_latents and encode_image make them for a video of num_frames frames."""
        condition = self.latent_condition(encoders.vae, pixels, num_frames)
        tensors = {"condition": condition[0]}
        if self.image_dim:
            tensors["image_embeds"] = self.image_embeds(encoders, pixels)[0]
        return tensors

    def latent_condition(self, vae, pixels: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The image's normalised latents: of the image and num_frames - 1 zero frames (channel
        conditioned), or of the image alone (TI2V), with the VAE's mode, as prepare_latents does."""
        video = pixels
        if not self.expand_timesteps:
            video = torch.cat([pixels, pixels.new_zeros(*pixels.shape[:2], num_frames - 1, *pixels.shape[3:])], dim=2)
        latents = vae.encode(video.to(vae.dtype)).latent_dist.mode()
        return self.normalize(latents.float())

    def image_embeds(self, encoders: FirstFrameEncoders, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP's penultimate hidden states of the frame, as WanImageToVideoPipeline.encode_image (given
        the frame as an image of its size)."""
        image = pixel_image(pixels[0, :, 0])
        inputs = encoders.image_processor(images=image, return_tensors="pt").to(encoders.image_encoder.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(encoders.image_encoder.dtype)
        return encoders.image_encoder(**inputs, output_hidden_states=True).hidden_states[-2].float()

    def inference_image(self, pixels: torch.Tensor):
        """The image the pipeline is given for a [3, 1, H, W] frame in [-1, 1]: a PIL image (CLIP's
        processor reads images, not normalised tensors)."""
        return pixel_image(pixels[:, 0])

    # --- latents -------------------------------------------------------------------------------

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents [B, C, F, H, W] -> the transformer's: (x - mean) * (1 / std), as the pipelines."""
        mean, inverse_std = self._moments(latents)
        return (latents - mean) * inverse_std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, inverse_std = self._moments(latents)
        return latents / inverse_std + mean

    def _moments(self, latents: torch.Tensor):
        shape = (1, self.latent_channels, 1, 1, 1)
        mean = torch.tensor(self.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(self.latents_std).view(shape).to(latents.device, latents.dtype)
        return mean, inverse_std

    def first_frame_mask(self, batch: int, latent_frames: int, height: int, width: int, device) -> torch.Tensor:
        """Wan 2.1/2.2 A14B I2V's mask channels [B, vae_scale_temporal, F, h, w]: 1 on the frames the
        image gives, as prepare_latents builds it (the first pixel frame, repeated per latent frame)."""
        pixel_frames = (latent_frames - 1) * self.vae_scale_temporal + 1
        mask = torch.ones(batch, 1, pixel_frames, height, width, device=device)
        mask[:, :, 1:] = 0
        mask = torch.cat([mask[:, :, :1].repeat_interleave(self.vae_scale_temporal, dim=2), mask[:, :, 1:]], dim=2)
        return mask.view(batch, -1, self.vae_scale_temporal, height, width).transpose(1, 2)

    def token_timesteps(self, t: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """TI2V's timestep per token [B, tokens] from per-sample t [B] and the latent frame mask [F, h, w]
        (0 where the image is), as the pipelines' expand_timesteps does."""
        per_token = frame_mask[:, ::self.patch_size[1], ::self.patch_size[2]].flatten()
        return per_token[None] * t.view(-1, 1)

    def ti2v_mask(self, latent_frames: int, height: int, width: int, device) -> torch.Tensor:
        """[F, h, w]: 1, and 0 on the first latent frame when it is the given image."""
        mask = torch.ones(latent_frames, height, width, device=device)
        if self.image_conditioned:
            mask[0] = 0
        return mask

    # --- the training objective: flow matching -------------------------------------------------

    def noise_schedule(self, models) -> FlowSchedule:
        """The pipeline's flow-matching sigmas; for a Wan 2.2 A14B expert, those of its timesteps only."""
        schedule = FlowSchedule.shifted(self.flow_shift, self.num_train_timesteps)
        if not self.two_experts:
            return schedule
        boundary = self.boundary_ratio * self.num_train_timesteps
        if self.expert == "low_noise":
            return schedule.between(0.0, boundary)
        return schedule.between(boundary, float("inf"))

    def step_inputs(self, batch: TrainingBatch, draws: Draws, schedule: FlowSchedule,
                    objective: Objective) -> FlowStepInputs:
        """The randomness of one step, drawn in a fixed order: the video posterior sample, the sigma
        levels, noise, then (with caption dropout) which captions are dropped."""
        x0 = self.normalize(posterior_sample(batch.video["mean"], batch.video["logvar"], draws))
        index = schedule.first + draw_timesteps(objective, draws, x0.shape[0], len(schedule))
        noise = draws.randn(x0.shape).to(x0.device)
        sigmas = schedule.sigmas[index].float().view(-1, 1, 1, 1, 1).to(x0.device)
        x_t = (1 - sigmas) * x0 + sigmas * noise
        t = schedule.timesteps[index].float().to(x0.device)
        model_input, timesteps, image_embeds, loss_from = x_t, t, None, 0
        if self.image_conditioned:
            condition = batch.first_frame["condition"][:, 0].float()
            if self.channel_conditioned:
                mask = self.first_frame_mask(x0.shape[0], *x0.shape[2:], x0.device)
                model_input = torch.cat([x_t, mask, condition], dim=1)
                if self.image_dim:
                    image_embeds = batch.first_frame["image_embeds"][:, 0]
            else:  # TI2V: the first latent frame is the image, at timestep 0, and not in the loss
                model_input = torch.cat([condition[:, :, :1], x_t[:, :, 1:]], dim=2)
                loss_from = 1
        if self.expand_timesteps:
            timesteps = self.token_timesteps(t, self.ti2v_mask(*x0.shape[2:], x0.device))
        prompt_embeds = batch.caption["prompt_embeds"]
        if objective.caption_dropout_p > 0:
            empty = batch.empty_caption["prompt_embeds"] if batch.empty_caption is not None else None
            prompt_embeds = drop_captions(prompt_embeds, empty, objective, draws)
        return FlowStepInputs(x0=x0, noise=noise, model_input=model_input, timesteps=timesteps,
                              prompt_embeds=prompt_embeds, image_embeds=image_embeds, loss_from_frame=loss_from)

    def model_inputs(self, inputs: FlowStepInputs, dtype: torch.dtype) -> dict:
        found = dict(hidden_states=inputs.model_input.to(dtype), encoder_hidden_states=inputs.prompt_embeds.to(dtype),
                     timestep=inputs.timesteps)
        if inputs.image_embeds is not None:
            found["encoder_hidden_states_image"] = inputs.image_embeds.to(dtype)
        return found

    def latent_size(self, inputs: FlowStepInputs) -> tuple[int, int, int, int]:
        return inputs.x0.shape[0], *inputs.x0.shape[2:]

    def transformer_inputs(self, batch_size: int, latent_frames: int, latent_height: int, latent_width: int,
                           device, dtype: torch.dtype | None = None) -> dict:
        """None: the Wan transformer computes its RoPE from the latents' size itself."""
        return {}

    def check_objective(self, objective: Objective) -> None:
        if objective.snr_gamma is not None:
            raise CogtuneError("--snr_gamma weights a v-prediction loss; Wan models are trained by flow matching, "
                               "which cogtune does not weight. Leave --snr_gamma out.")

    def losses(self, pred: torch.Tensor, inputs: FlowStepInputs, dtype: torch.dtype,
               objective: Objective) -> torch.Tensor:
        """The flow-matching loss of each sample, [B]: the mean squared error of the predicted velocity
        against eps - x0 (over the frames the model generates)."""
        start = inputs.loss_from_frame
        target = (inputs.noise - inputs.x0)[:, :, start:]
        return ((pred.float()[:, :, start:] - target) ** 2).flatten(1).mean(1)

    def memory_inputs(self, batch: int, latent_shape: list[int], in_channels: int, dtype: torch.dtype,
                      device, inputs_dtype: torch.dtype | None = None) -> dict:
        channels, frames, height, width = latent_shape
        found = dict(
            hidden_states=torch.empty(batch, in_channels, frames, height, width, device=device, dtype=dtype),
            encoder_hidden_states=torch.empty(batch, TEXT_LENGTH, self.text_embed_dim, device=device, dtype=dtype),
            timestep=torch.zeros(batch, dtype=torch.float32, device=device),
        )
        if self.expand_timesteps:
            found["timestep"] = torch.zeros(batch, self.video_tokens(found["hidden_states"]), device=device)
        if self.image_dim:
            found["encoder_hidden_states_image"] = torch.empty(batch, self.image_tokens, self.image_dim, device=device, dtype=dtype)
        return found

    def video_tokens(self, hidden_states: torch.Tensor) -> int:
        frames, height, width = hidden_states.shape[2:]
        return (frames // self.patch_size[0]) * (height // self.patch_size[1]) * (width // self.patch_size[2])

    # --- validation: the pipelines' sampler, from cached embeddings ----------------------------

    def validation_scheduler(self, models):
        """The pipeline's own scheduler (UniPC with flow sigmas for the published Wan pipelines)."""
        import diffusers

        name = (models.model_index.get("scheduler") or [None, "UniPCMultistepScheduler"])[1]
        return getattr(diffusers, name).from_config(models.scheduler)

    def check_flow_shift(self, flow_shift: float | None) -> None:
        """Every Wan sampler has a flow shift."""

    def with_flow_shift(self, scheduler, flow_shift: float | None):
        """The pipeline's scheduler with another flow shift (UniPC's flow_shift, FlowMatchEuler's shift)."""
        if flow_shift is None:
            return scheduler
        key = "flow_shift" if "flow_shift" in scheduler.config else "shift"
        return type(scheduler).from_config(scheduler.config, **{key: flow_shift})

    @torch.no_grad()
    def generate_latents(self, transformer, scheduler, caption: dict, negative: dict, num_frames: int, height: int,
                         width: int, num_inference_steps: int, guidance_scale: float, use_dynamic_cfg: bool,
                         generator: torch.Generator, dtype: torch.dtype, first_frame: dict | None = None) -> torch.Tensor:
        """One video's denoised latents [1, C, F, h, w], as the Wan pipelines compute them from these
        cached tensors: the condition and prompt passes of classifier-free guidance, the scheduler's
        steps (the trained transformer at every step: for a Wan 2.2 A14B expert, a preview)."""
        from diffusers.utils.torch_utils import randn_tensor

        device = next(p for p in transformer.parameters()).device
        scheduler.set_timesteps(num_inference_steps, device=device)
        frames, h, w = self.latent_frames(num_frames), height // self.vae_scale_spatial, width // self.vae_scale_spatial
        latents = randn_tensor((1, self.latent_channels, frames, h, w), generator=generator, device=device,
                               dtype=torch.float32)
        prompt = caption["prompt_embeds"][None].to(device, dtype)
        negative_prompt = negative["prompt_embeds"][None].to(device, dtype)
        extra, condition, mask = {}, None, self.ti2v_mask(frames, h, w, device)
        if first_frame is not None:
            condition = first_frame["condition"].to(device, torch.float32)[None]
            if "image_embeds" in first_frame:
                extra["encoder_hidden_states_image"] = first_frame["image_embeds"].to(device, dtype)[None]
            if self.channel_conditioned:
                condition = torch.cat([self.first_frame_mask(1, frames, h, w, device), condition], dim=1)
        for t in scheduler.timesteps:
            model_input = latents
            if condition is not None and self.channel_conditioned:
                model_input = torch.cat([latents, condition], dim=1)
            elif condition is not None:
                model_input = (1 - mask) * condition + mask * latents
            timestep = self.token_timesteps(t.view(1), mask) if self.expand_timesteps else t.expand(1)
            model_input = model_input.to(dtype)

            def predict(embeds):
                return transformer(hidden_states=model_input, timestep=timestep, encoder_hidden_states=embeds,
                                   return_dict=False, **extra)[0]

            noise_pred = predict(prompt)
            if guidance_scale > 1.0:
                uncond = predict(negative_prompt)
                noise_pred = uncond + guidance_scale * (noise_pred - uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if condition is not None and not self.channel_conditioned:
            latents = (1 - mask) * condition + mask * latents
        return latents

    @torch.no_grad()
    def decode(self, vae, latents: torch.Tensor) -> np.ndarray:
        """[1, C, F, h, w] latents -> [frames, H, W, 3] uint8, as the pipelines un-normalise, decode and
        post-process."""
        video = vae.decode(self.denormalize(latents.to(vae.dtype)), return_dict=False)[0][0]
        video = (video.float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)  # [F, H, W, 3]
        return (video.cpu().numpy() * 255).round().astype(np.uint8)

    # --- LoRA files, the model card and inference ----------------------------------------------

    card_tags = ("wan", "wan-diffusers")

    def pipeline_call_arguments(self, use_dynamic_cfg: bool) -> dict:
        return {"max_sequence_length": TEXT_LENGTH}

    def card_call_arguments(self, use_dynamic_cfg: bool) -> str:
        return ""

    export_formats = ("comfyui",)

    def exported_module(self, module: str) -> str:
        """The module's name in Wan's original checkpoints, which ComfyUI's WanModel keeps (so a
        `lora_unet_<name, "." -> "_">` key reaches `diffusion_model.<name>.weight`): the inverse of the
        renames in diffusers' scripts/convert_wan_to_diffusers.py."""
        for diffusers_name, original in ORIGINAL_NAMES:
            if module.endswith(diffusers_name):
                return module[:len(module) - len(diffusers_name)] + original
        raise CogtuneError(f"The LoRA adapts {module}, which has no name in Wan's original layout that cogtune knows; "
                           "it cannot be exported for ComfyUI (its diffusers file loads as it is).")


def _clip_tokens(config: dict | None) -> int:
    """Tokens CLIP's vision tower makes of one image: its patches and the class token."""
    if not config:
        return 0
    return (int(config.get("image_size", 224)) // int(config.get("patch_size", 14))) ** 2 + 1


def pixel_image(frame: torch.Tensor):
    """[3, H, W] in [-1, 1] -> the PIL image it was made from (training frames are k / 127.5 - 1)."""
    from PIL import Image

    array = ((frame.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
