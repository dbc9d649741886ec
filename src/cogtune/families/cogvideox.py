"""What differs between CogVideoX families, decided in one place from the model's own config files.

Nothing here looks at a model's name: the transformer, VAE and scheduler configs say everything.

    family       positions                 image input   temporal patch   VAE scaling
    2b           3D sincos                 -             -                1.15258426
    5b           RoPE, crop grid           -             -                0.7
    5b-I2V       RoPE + learned pos. emb.  32 channels   -                0.7
    1.5-5B       RoPE, slice grid          -             2                0.7, invert_scale_latents
    1.5-5B-I2V   RoPE, slice grid          32 channels   2, ofs = 2.0     0.7, invert_scale_latents

Latent conventions follow the diffusers pipelines, which are what a trained LoRA runs in: every
pipeline decodes `latents / scaling_factor`, so the video latents a transformer works on are
`posterior sample * scaling_factor` for every family. `invert_scale_latents` changes only the
image-to-video conditioning latent, which the I2V pipeline divides by the factor instead of
multiplying (CogVideoX 1.5-I2V was trained that way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cogtune.data_schema import TensorSet, TrainingBatch
from cogtune.errors import CogtuneError
from cogtune.families.base import ModelFamily
from cogtune.families.objectives import (NoiseSchedule, Objective, StepInputs, add_noise, draw_timesteps,
                                         drop_captions, dropped, pick_variants, posterior_sample, snr_weights,
                                         velocity_losses)
from cogtune.families.sampling import guided_denoise
from cogtune.util.draws import Draws

OFS_VALUE = 2.0  # the ofs embedding input of CogVideoX 1.5-I2V, as its pipeline passes it


@dataclass(frozen=True)
class CogVideoX(ModelFamily):
    """A CogVideoX variant, from its transformer, VAE and scheduler configs."""

    name = "CogVideoX"
    pipelines = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline")
    config_files = {"transformer": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json",
                    "text_encoder": "config.json"}
    encoded_parts = ("vae", "text_encoder")
    transformer_class, vae_class = "CogVideoXTransformer3DModel", "AutoencoderKLCogVideoX"
    text_encoder_class = "T5EncoderModel"
    variants = {"2b": "CogVideoX-2b", "5b": "CogVideoX-5b", "5b-i2v": "CogVideoX-5b-I2V",
                "1.5-5b": "CogVideoX1.5-5B", "1.5-5b-i2v": "CogVideoX1.5-5B-I2V"}
    published = {f"{namespace}/{name}".lower(): name.lower() for name in variants.values()
                 for namespace in ("thudm", "zai-org")}
    # Named sets of --lora_target_modules: the block's attention projections (the reference's), plus
    # its feed-forward layers, plus the linear layers of its adaptive norms (every nn.Linear of a block).
    target_presets = {
        "attention": ["to_q", "to_k", "to_v", "to_out.0"],
        "attention_ffn": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
        "all_linear": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear",
                       "norm2.linear"],
    }
    frame_step = 4  # the CogVideoX VAE takes 4k+1 frames
    size_multiple = 16
    size_reason = "the VAE downsamples by 8 and the transformer patches by 2"

    latent_channels: int
    scaling_factor: float
    invert_scale_latents: bool
    vae_scale_spatial: int  # pixels per latent pixel
    vae_scale_temporal: int  # pixel frames per latent frame (after the first)
    patch_size: int
    patch_size_t: int | None  # CogVideoX 1.5 patches latent frames in pairs
    use_rotary: bool
    learned_positional_embeddings: bool  # CogVideoX-5b-I2V: tied to its training size
    attention_head_dim: int
    sample_height: int  # latent grid the model was trained at (RoPE base size)
    sample_width: int
    sample_frames: int  # pixel frames the model was trained at
    max_text_seq_length: int
    text_embed_dim: int
    image_to_video: bool  # the transformer takes video + image latents on channels
    ofs_embed_dim: int | None

    @classmethod
    def from_configs(cls, configs: dict[str, dict]) -> "CogVideoX":
        transformer, vae, scheduler = configs["transformer"], configs["vae"], configs.get("scheduler")
        if "latent_channels" not in vae or "max_text_seq_length" not in transformer:
            raise CogtuneError("The transformer and VAE configs are not those of a CogVideoX model (no "
                               "max_text_seq_length or latent_channels); the model folder mixes components of "
                               "different models.")
        latent_channels = int(vae["latent_channels"])
        in_channels = int(transformer["in_channels"])
        out_channels = int(transformer.get("out_channels") or in_channels)
        spec = cls(
            latent_channels=latent_channels,
            scaling_factor=float(vae.get("scaling_factor", 1.15258426)),
            invert_scale_latents=bool(vae.get("invert_scale_latents", False)),
            vae_scale_spatial=2 ** (len(vae["block_out_channels"]) - 1),
            vae_scale_temporal=int(vae.get("temporal_compression_ratio", 4)),
            patch_size=int(transformer["patch_size"]),
            patch_size_t=transformer.get("patch_size_t"),
            use_rotary=bool(transformer.get("use_rotary_positional_embeddings", False)),
            learned_positional_embeddings=bool(transformer.get("use_learned_positional_embeddings", False)),
            attention_head_dim=int(transformer["attention_head_dim"]),
            sample_height=int(transformer["sample_height"]),
            sample_width=int(transformer["sample_width"]),
            sample_frames=int(transformer.get("sample_frames", 49)),
            max_text_seq_length=int(transformer["max_text_seq_length"]),
            text_embed_dim=int(transformer["text_embed_dim"]),
            image_to_video=in_channels == 2 * out_channels,
            ofs_embed_dim=transformer.get("ofs_embed_dim"),
        )
        if out_channels != latent_channels or in_channels not in (latent_channels, 2 * latent_channels):
            raise CogtuneError(
                f"The transformer takes {in_channels} channels and makes {out_channels}, but the VAE makes "
                f"{latent_channels}; the model folder mixes components of different models."
            )
        if scheduler is not None and scheduler.get("prediction_type", "v_prediction") != "v_prediction":
            raise CogtuneError(
                f"The scheduler predicts {scheduler['prediction_type']!r}; CogVideoX models (and cogtune) use "
                "v_prediction. Is this a CogVideoX pipeline?"
            )
        return spec

    @property
    def image_conditioned(self) -> bool:
        return self.image_to_video

    # --- what the family is called and how it should be run ---

    @property
    def description(self) -> str:
        version = "CogVideoX 1.5" if self.patch_size_t else "CogVideoX 1.0"
        kind = "image-to-video" if self.image_conditioned else "text-to-video"
        positions = "RoPE" if self.use_rotary else "sincos positions"
        return f"{version} {kind} ({positions}, VAE scaling {self.scaling_factor:g})"

    @property
    def recommended_precision(self) -> str:
        """fp16 for CogVideoX-2b (trained in fp16), bf16 for every RoPE model."""
        return "bf16" if self.use_rotary else "fp16"

    def check_precision(self, mixed_precision: str, warn) -> None:
        if mixed_precision == "fp16" and self.recommended_precision == "bf16":
            if self.patch_size_t:
                raise CogtuneError(
                    "--mixed_precision fp16 makes CogVideoX 1.5 models produce NaN; use bf16 (or no)."
                )
            warn(f"warning: this {self.description} model was trained in bf16; fp16 may overflow. "
                 "--mixed_precision bf16 is recommended.")

    @property
    def pipeline_class_name(self) -> str:
        """The diffusers pipeline that generates with this family."""
        return "CogVideoXImageToVideoPipeline" if self.image_conditioned else "CogVideoXPipeline"

    def ignores_learned_positions(self, ignore_learned_positional_embeddings: bool) -> bool:
        """Only 5b-I2V has learned positional embeddings."""
        return bool(ignore_learned_positional_embeddings and self.learned_positional_embeddings)

    # --- clip sizes ---

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.vae_scale_temporal + 1

    def frame_padding(self, latent_frames: int) -> int:
        """Latent frames CogVideoX 1.5 prepends so that patch_size_t divides the frame count."""
        return (-latent_frames) % self.patch_size_t if self.patch_size_t else 0

    def check_clip_size(self, num_frames: int, height: int, width: int,
                        ignore_learned_positional_embeddings: bool) -> None:
        """Refuse clip sizes this family cannot train or generate at, before anything is encoded
        (beyond the rules of check_frames and check_size, which every stage asks first)."""
        if self.use_rotary and self.patch_size_t:  # the 1.5 "slice" grid only covers the model's base size
            max_height, max_width = (self.sample_height * self.vae_scale_spatial,
                                     self.sample_width * self.vae_scale_spatial)
            if height > max_height or width > max_width:
                raise CogtuneError(
                    f"This {self.description} model's rotary position embeddings cover at most {max_height}x"
                    f"{max_width} pixels (its sample_height/sample_width), not {height}x{width}; pick a smaller size."
                )
        if self.learned_positional_embeddings and not ignore_learned_positional_embeddings:
            trained = (self.sample_frames, self.sample_height * self.vae_scale_spatial,
                       self.sample_width * self.vae_scale_spatial)
            if (num_frames, height, width) != trained:
                raise CogtuneError(
                    f"This {self.description} model has learned positional embeddings for {trained[0]} frames of "
                    f"{trained[1]}x{trained[2]} only, not {num_frames} frames of {height}x{width}. Use that size, "
                    "or pass --ignore_learned_positional_embeddings (to preprocess, train and infer alike)."
                )

    # --- the tensors the transformer sees ---

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE posterior sample of a video -> the x0 the transformer is trained on (all families)."""
        return latents * self.scaling_factor

    def scale_image_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE posterior sample of the conditioning image -> the latent the I2V pipeline feeds."""
        if self.invert_scale_latents:
            return latents / self.scaling_factor
        return latents * self.scaling_factor

    def pad_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, F, C, H, W] -> CogVideoX 1.5 layout: copies of the first latent frame prepended until
        patch_size_t divides F (the pipeline generates those frames first and drops them)."""
        padding = self.frame_padding(latents.shape[1])
        if not padding:
            return latents
        return torch.cat([latents[:, :1].expand(-1, padding, -1, -1, -1), latents], dim=1)

    def image_condition(self, image_latents: torch.Tensor, latent_frames: int) -> torch.Tensor:
        """[B, 1, C, H, W] image latent -> [B, latent_frames, C, H, W]: the image in the first frame,
        zeros after it, as CogVideoXImageToVideoPipeline.prepare_latents builds it."""
        padding = image_latents.new_zeros((image_latents.shape[0], latent_frames - 1, *image_latents.shape[2:]))
        return torch.cat([image_latents, padding], dim=1)

    def ofs(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        if not self.ofs_embed_dim:
            return None
        return torch.full((batch_size,), OFS_VALUE, device=device)

    def transformer_inputs(self, batch_size: int, latent_frames: int, latent_height: int, latent_width: int,
                           device: torch.device, dtype: torch.dtype | None = None) -> dict:
        """The family's keyword inputs of the transformer for a batch of latents of this size
        (latent_frames after any 1.5 padding): its RoPE tables (None for sincos models) and, for
        CogVideoX 1.5-I2V, ofs (in dtype when given). Training, validation and the memory estimate
        all feed the transformer through this."""
        ofs = self.ofs(batch_size, device)
        if ofs is not None and dtype is not None:
            ofs = ofs.to(dtype)
        rotary = self.rotary_embeddings(latent_height * self.vae_scale_spatial, latent_width * self.vae_scale_spatial,
                                        latent_frames, device)
        return {"image_rotary_emb": rotary, "ofs": ofs}

    def rotary_embeddings(self, height: int, width: int, latent_frames: int, device: torch.device):
        """RoPE (cos, sin) for a latent clip of the given pixel size (latent_frames after any 1.5
        padding), or None for sincos models. As the pipelines do: CogVideoX 1.0 places the patch
        grid as a centred crop region of its base grid; 1.5 uses the "slice" grid."""
        if not self.use_rotary:
            return None
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        pixels_per_patch = self.vae_scale_spatial * self.patch_size
        grid_height, grid_width = height // pixels_per_patch, width // pixels_per_patch
        base_height, base_width = self.sample_height // self.patch_size, self.sample_width // self.patch_size
        if self.patch_size_t is None:
            crop = get_resize_crop_region_for_grid((grid_height, grid_width), base_width, base_height)
            return get_3d_rotary_pos_embed(embed_dim=self.attention_head_dim, crops_coords=crop,
                                           grid_size=(grid_height, grid_width), temporal_size=latent_frames,
                                           device=device)
        return get_3d_rotary_pos_embed(
            embed_dim=self.attention_head_dim, crops_coords=None, grid_size=(grid_height, grid_width),
            temporal_size=-(-latent_frames // self.patch_size_t), grid_type="slice",
            max_size=(base_height, base_width), device=device,
        )

    # --- the parts -----------------------------------------------------------------------------

    def blocks(self, transformer) -> torch.nn.ModuleList:
        return transformer.transformer_blocks

    # The first arguments of a block that are the large per-block states (hidden_states and
    # encoder_hidden_states): what --gradient_checkpointing_cpu_offload keeps in CPU memory.
    block_state_arguments = 2

    def block_states(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """Those states of a block's call, given by position or by name."""
        names = ("hidden_states", "encoder_hidden_states")
        return [*args[:self.block_state_arguments], *(kwargs[k] for k in names if k in kwargs)]

    def use_attention_backend(self, transformer, backend: str) -> None:
        """CogVideoX's processors call F.scaled_dot_product_attention themselves: each is replaced by one of
        the same math that calls diffusers' dispatcher, which the backend then reaches."""
        from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0

        for module in transformer.modules():
            if isinstance(module, Attention) and isinstance(module.processor, CogVideoXAttnProcessor2_0):
                module.set_processor(DispatchingCogVideoXAttnProcessor())
        super().use_attention_backend(transformer, backend)

    def context_parallel_plan(self, transformer) -> dict:
        """CogVideoX has no context-parallel plan in diffusers; this is ours. Each process of a group takes a
        contiguous share of the text tokens and of the video tokens (and the video tokens' RoPE) as the first
        block is entered; the attention processor joins its shares and the dispatcher's all-to-all (or ring)
        attends over every process's tokens. Attention has no mask and RoPE is applied before it, so the order
        in which the shares meet does not matter. The output projection's tokens are gathered back in order.
        Text and video token counts must divide by the degree."""
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        tokens = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
        rope = ContextParallelInput(split_dim=0, expected_dims=2, split_output=False)  # (cos, sin), [video tokens, D]
        return {"": {"image_rotary_emb": [rope, rope]},
                "transformer_blocks.0": {"hidden_states": tokens, "encoder_hidden_states": tokens},
                "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}

    def context_parallel_tokens(self, latent_shape: list[int], in_channels: int) -> dict[str, int]:
        return {**super().context_parallel_tokens(latent_shape, in_channels), "text": self.max_text_seq_length}

    def drop_learned_positional_embeddings(self, transformer) -> None:
        """Let CogVideoX-5b-I2V run at other sizes: its learned positional embeddings are near zero and
        tied to 49x480x720, so they are left out (in training and in inference alike)."""
        transformer.patch_embed.use_learned_positional_embeddings = False
        transformer.register_to_config(use_learned_positional_embeddings=False)

    # --- encoding (stage 1) --------------------------------------------------------------------

    @property
    def tensors(self) -> TensorSet:
        """What the cache stores: per caption its T5 embedding; per video window, and per noised
        first frame of an image-to-video model, the VAE posterior's mean and log-variance."""
        return TensorSet(caption=("prompt_embeds",), video=("mean", "logvar"),
                         first_frame=("mean", "logvar") if self.image_conditioned else ())

    @property
    def text_length(self) -> int:
        """Tokens of every caption's embedding (padded to it, as the pipelines pad)."""
        return self.max_text_seq_length

    @torch.no_grad()
    def embed_texts(self, texts: list[str], tokenizer, text_encoder) -> tuple[list[dict[str, torch.Tensor]], int]:
        """The prompt_embeds of each text: T5's [text length, dim], padded to max_text_seq_length as the
        pipelines pad, each text through T5 on its own; and how many were truncated.

        One text per forward pass: the cache is content-addressed, so a caption's bytes must not depend
        on the captions that share its batch, and matrix kernels on CPUs and GPUs pick their blocking
        (and so their sums' order) by the batch's shape."""
        max_length = self.max_text_seq_length
        tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                           add_special_tokens=True, return_tensors="pt")
        full_lengths = tokenizer(texts, add_special_tokens=True, return_length=True)["length"]
        ids = tokens.input_ids.to(text_encoder.device)
        embeds = [{"prompt_embeds": text_encoder(ids[number:number + 1])[0][0]} for number in range(len(texts))]
        return embeds, sum(length > max_length for length in full_lengths)

    def text_tokens(self, device) -> torch.Tensor:
        """A caption's token ids as the text encoder sees them (for the memory estimates)."""
        return torch.zeros(1, self.max_text_seq_length, dtype=torch.long, device=device)

    @torch.no_grad()
    def encode_pixels(self, vae, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """[1, C, F, H, W] pixels in [-1, 1] -> the VAE posterior's mean and logvar, [C, f, h, w] each."""
        posterior = vae.encode(pixels).latent_dist
        return {"mean": posterior.mean[0], "logvar": posterior.logvar[0]}

    def encode_first_frame(self, vae, pixels: torch.Tensor, num_frames: int) -> dict[str, torch.Tensor]:
        """[1, C, 1, H, W] (noised) first frame -> its VAE posterior, as for a clip (of any length)."""
        return self.encode_pixels(vae, pixels)

    # --- the training objective: v-prediction on the pipeline's DDPM schedule -------------------

    def noise_schedule(self, models: "ModelConfigs") -> NoiseSchedule:
        from diffusers import CogVideoXDDIMScheduler

        return NoiseSchedule(CogVideoXDDIMScheduler.from_config(models.scheduler).alphas_cumprod)

    def sample_x0(self, mean: torch.Tensor, logvar: torch.Tensor, draws: Draws) -> torch.Tensor:
        """A fresh posterior sample of the stored moments ([B, C, F, H, W]), scaled for the transformer,
        as [B, F, C, H, W] float32."""
        return self.scale_latents(posterior_sample(mean, logvar, draws)).permute(0, 2, 1, 3, 4).contiguous()

    def sample_image_latents(self, mean: torch.Tensor, logvar: torch.Tensor, draws: Draws,
                             dropout: float) -> torch.Tensor:
        """The image-to-video conditioning latent of each sample, [B, 1, C, H, W] float32: one of its K
        stored noised first-frame encodings ([B, K, C, 1, H, W]) at random, sampled, scaled as the I2V
        pipeline does, and zeroed with probability `dropout`."""
        mean, logvar = pick_variants(mean, logvar, draws)
        latents = self.scale_image_latents(posterior_sample(mean, logvar, draws)).permute(0, 2, 1, 3, 4)
        return dropped(latents, dropout, draws)

    def step_inputs(self, batch: TrainingBatch, draws: Draws, schedule: NoiseSchedule,
                    objective: Objective) -> StepInputs:
        """The randomness of one step, drawn in a fixed order: the video posterior sample, timesteps,
        noise, then (I2V) the image encoding, its posterior sample and dropout, then (with caption
        dropout) which captions are dropped. Options that are off draw nothing."""
        x0 = self.pad_frames(self.sample_x0(batch.video["mean"], batch.video["logvar"], draws))
        timesteps = draw_timesteps(objective, draws, x0.shape[0], len(schedule))
        noise = draws.randn(x0.shape)
        constants = schedule.at(timesteps).to(x0.device)
        x_t = add_noise(x0, noise.to(x0.device), constants)
        model_input = x_t
        if self.image_conditioned:
            image = self.sample_image_latents(batch.first_frame["mean"], batch.first_frame["logvar"], draws,
                                              objective.noised_image_dropout)
            model_input = torch.cat([x_t, self.image_condition(image, x0.shape[1])], dim=2)
        prompt_embeds = batch.caption["prompt_embeds"]
        if objective.caption_dropout_p > 0:
            empty = batch.empty_caption["prompt_embeds"] if batch.empty_caption is not None else None
            prompt_embeds = drop_captions(prompt_embeds, empty, objective, draws)
        return StepInputs(x0=x0, x_t=x_t, model_input=model_input, timesteps=timesteps, constants=constants,
                          prompt_embeds=prompt_embeds)

    def model_inputs(self, inputs: StepInputs, dtype: torch.dtype) -> dict:
        """The transformer's keyword inputs of a step, beside transformer_inputs'."""
        return dict(hidden_states=inputs.model_input.to(dtype), encoder_hidden_states=inputs.prompt_embeds.to(dtype),
                    timestep=inputs.timesteps.to(inputs.x0.device))

    def latent_size(self, inputs: StepInputs) -> tuple[int, int, int, int]:
        """(batch, latent frames, height, width) of a step's latents: what transformer_inputs takes."""
        return inputs.x0.shape[0], inputs.x0.shape[1], *inputs.x0.shape[3:]

    def losses(self, pred: torch.Tensor, inputs: StepInputs, dtype: torch.dtype, objective: Objective) -> torch.Tensor:
        """The CogVideoX training loss of each sample, [B] (velocity, min-SNR weighted with snr_gamma)."""
        losses = velocity_losses(pred, inputs.x_t.to(dtype), inputs.x0, inputs.constants)
        if objective.snr_gamma is not None:
            losses = losses * snr_weights(inputs.constants, objective.snr_gamma)
        return losses

    def memory_inputs(self, batch: int, latent_shape: list[int], in_channels: int, dtype: torch.dtype,
                      device, inputs_dtype: torch.dtype | None = None) -> dict:
        """Empty tensors of one forward pass on a batch of latents [C, F, H, W] (for the estimates);
        inputs_dtype: that of transformer_inputs' tensors, as in generation."""
        channels, frames, height, width = latent_shape
        frames += self.frame_padding(frames)
        return dict(
            hidden_states=torch.empty(batch, frames, in_channels, height, width, device=device, dtype=dtype),
            encoder_hidden_states=torch.empty(batch, self.max_text_seq_length, self.text_embed_dim, device=device,
                                              dtype=dtype),
            timestep=torch.zeros(batch, dtype=torch.long, device=device),
            **self.transformer_inputs(batch, frames, height, width, device, inputs_dtype),
        )

    def video_tokens(self, hidden_states: torch.Tensor) -> int:
        """Tokens of one sample's latents [B, F, C, H, W] in the transformer's sequence."""
        frames = hidden_states.shape[1] // (self.patch_size_t or 1)
        return frames * (hidden_states.shape[3] // self.patch_size) * (hidden_states.shape[4] // self.patch_size)

    # --- validation: the pipelines' sampler, from cached embeddings ----------------------------

    def validation_scheduler(self, models: "ModelConfigs"):
        """CogVideoXDPMScheduler from the pipeline's scheduler config, as the diffusers training
        scripts validate (and as the CogVideoX authors advise for sampling)."""
        from diffusers import CogVideoXDPMScheduler

        return CogVideoXDPMScheduler.from_config(models.scheduler)

    @torch.no_grad()
    def generate_latents(self, transformer, scheduler, caption: dict, negative: dict, num_frames: int, height: int,
                         width: int, num_inference_steps: int, guidance_scale: float, use_dynamic_cfg: bool,
                         generator: torch.Generator, dtype: torch.dtype, first_frame: dict | None = None) -> torch.Tensor:
        """One video's denoised latents [1, F, C, h, w] (CogVideoX 1.5's padding frames dropped), as the
        CogVideoX pipelines compute them from these cached tensors (the prompt's and the negative
        prompt's embeddings, the image's VAE moments) and this generator: classifier-free guidance with
        the negative embedding, optional dynamic CFG, the given scheduler."""
        from diffusers.utils.torch_utils import randn_tensor

        device = next(p for p in transformer.parameters()).device
        scheduler.set_timesteps(num_inference_steps, device=device)
        latent_frames = self.latent_frames(num_frames)
        padding = self.frame_padding(latent_frames)
        frames = latent_frames + padding
        shape = (1, frames, self.latent_channels, height // self.vae_scale_spatial, width // self.vae_scale_spatial)
        prompt_embeds, negative_embeds = caption["prompt_embeds"], negative["prompt_embeds"]
        image_latents = None
        if first_frame is not None:  # sampled first, with the same generator, as the I2V pipeline does
            mean, logvar = (first_frame[name].to(device, torch.float32) for name in ("mean", "logvar"))
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            sample = mean + std * randn_tensor(mean.shape, generator=generator, device=device, dtype=mean.dtype)
            image = self.scale_image_latents(sample[None].to(dtype).permute(0, 2, 1, 3, 4))  # [1, 1, C, h, w]
            image_latents = self.image_condition(image, frames)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma
        guided = guidance_scale > 1.0
        embeds = torch.stack([negative_embeds, prompt_embeds]) if guided else prompt_embeds[None]
        embeds = embeds.to(device, dtype)
        family_inputs = self.transformer_inputs(1, frames, shape[3], shape[4], device, dtype)

        def predict(model_input, t):
            return transformer(hidden_states=model_input, encoder_hidden_states=embeds,
                               timestep=t.expand(model_input.shape[0]), **family_inputs, return_dict=False)[0]

        def dynamic_scale(t):  # the pipelines' use_dynamic_cfg
            return 1 + guidance_scale * (
                (1 - math.cos(math.pi * ((num_inference_steps - t.item()) / num_inference_steps) ** 5.0)) / 2)

        latents = guided_denoise(predict, scheduler, latents, guidance_scale, generator, dtype,
                                 dynamic_scale if use_dynamic_cfg else None, image_latents)
        return latents[:, padding:]

    @torch.no_grad()
    def decode(self, vae, latents: torch.Tensor) -> np.ndarray:
        """[1, F, C, h, w] latents -> [frames, H, W, 3] uint8, as the pipelines' decode_latents and postprocess."""
        video = vae.decode(latents.permute(0, 2, 1, 3, 4).to(vae.dtype) / self.scaling_factor).sample[0]
        video = (video.float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)  # [F, H, W, 3]
        return (video.cpu().numpy() * 255).round().astype(np.uint8)

    # --- LoRA files, the model card and inference ------------------------------------------------

    card_tags = ("cogvideox", "cogvideox-diffusers")

    def pipeline_call_arguments(self, use_dynamic_cfg: bool) -> dict:
        """The pipeline's own keyword arguments that cogtune's settings choose (beyond prompt, size,
        steps, guidance and generator)."""
        return {"use_dynamic_cfg": use_dynamic_cfg, "max_sequence_length": self.max_text_seq_length}

    def card_call_arguments(self, use_dynamic_cfg: bool) -> str:
        return f"use_dynamic_cfg={use_dynamic_cfg}, "

    export_formats = ("comfyui",)  # kijai's ComfyUI-CogVideoXWrapper and ComfyUI's LoRA loader (export.py)


class DispatchingCogVideoXAttnProcessor:
    """diffusers' CogVideoXAttnProcessor2_0, step for step (text and video tokens joined into one sequence,
    the q/k norms, RoPE on the video tokens), except that attention goes through diffusers' attention
    dispatcher, so that `set_attention_backend` (--attention_backend) reaches CogVideoX as it reaches
    the models whose processors dispatch already (Wan)."""

    _attention_backend = None  # set by set_attention_backend
    _parallel_config = None  # set by enable_parallelism (--context_parallel_degree)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)
        # The dispatcher takes and returns [B, S, H, D]; the processor works in [B, H, S, D].
        hidden_states = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                              attn_mask=attention_mask, backend=self._attention_backend,
                                              parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # the projection, then dropout
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1)
        return hidden_states, encoder_hidden_states
