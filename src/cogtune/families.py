"""What differs between CogVideoX families, decided in one place from the model's own config files.

Nothing here looks at a model's name: the transformer, VAE and scheduler configs say everything
(positional embeddings, latent scaling, temporal patching, image conditioning).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CogtuneError


@dataclass(frozen=True)
class FamilySpec:
    latent_channels: int
    scaling_factor: float
    invert_scale_latents: bool
    vae_scale_spatial: int  # pixels per latent pixel
    vae_scale_temporal: int  # pixel frames per latent frame (after the first)
    patch_size: int
    patch_size_t: int | None
    use_rotary: bool
    attention_head_dim: int
    sample_height: int  # latent grid the model was trained at (RoPE base size)
    sample_width: int
    max_text_seq_length: int
    text_embed_dim: int
    image_conditioned: bool

    @classmethod
    def from_configs(cls, transformer: dict, vae: dict) -> "FamilySpec":
        latent_channels = vae["latent_channels"]
        spec = cls(
            latent_channels=latent_channels,
            scaling_factor=float(vae.get("scaling_factor", 1.15258426)),
            invert_scale_latents=bool(vae.get("invert_scale_latents", False)),
            vae_scale_spatial=2 ** (len(vae["block_out_channels"]) - 1),
            vae_scale_temporal=int(vae.get("temporal_compression_ratio", 4)),
            patch_size=int(transformer["patch_size"]),
            patch_size_t=transformer.get("patch_size_t"),
            use_rotary=bool(transformer.get("use_rotary_positional_embeddings", False)),
            attention_head_dim=int(transformer["attention_head_dim"]),
            sample_height=int(transformer["sample_height"]),
            sample_width=int(transformer["sample_width"]),
            max_text_seq_length=int(transformer["max_text_seq_length"]),
            text_embed_dim=int(transformer["text_embed_dim"]),
            image_conditioned=transformer["in_channels"] != transformer.get("out_channels", transformer["in_channels"]),
        )
        if spec.image_conditioned:
            raise CogtuneError(
                "This is an image-to-video CogVideoX model (transformer in_channels "
                f"{transformer['in_channels']} != out_channels {transformer.get('out_channels')}); this version of "
                "cogtune trains text-to-video models (CogVideoX-2b, CogVideoX-5b) only."
            )
        if spec.patch_size_t:
            raise CogtuneError(
                f"This is a CogVideoX 1.5 model (transformer patch_size_t {spec.patch_size_t}); this version of "
                "cogtune trains CogVideoX 1.0 text-to-video models (CogVideoX-2b, CogVideoX-5b) only."
            )
        if transformer["in_channels"] != latent_channels:
            raise CogtuneError(
                f"The transformer takes {transformer['in_channels']} channels but the VAE makes {latent_channels}; "
                "the model folder mixes components of different models."
            )
        return spec

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.vae_scale_temporal + 1

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE posterior sample -> the x0 the transformer is trained on."""
        if self.invert_scale_latents:
            return latents
        return latents * self.scaling_factor

    def rotary_embeddings(self, height: int, width: int, latent_frames: int, device: torch.device):
        """RoPE (cos, sin) for a latent clip of the given pixel size, or None for sincos models.

        As the CogVideoX 1.0 pipelines do: the grid of patches is placed as a centred crop region of
        the base grid the model was trained at (sample_height x sample_width latent pixels).
        """
        if not self.use_rotary:
            return None
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        pixels_per_patch = self.vae_scale_spatial * self.patch_size
        grid_height, grid_width = height // pixels_per_patch, width // pixels_per_patch
        base_height, base_width = self.sample_height // self.patch_size, self.sample_width // self.patch_size
        crop = get_resize_crop_region_for_grid((grid_height, grid_width), base_width, base_height)
        return get_3d_rotary_pos_embed(
            embed_dim=self.attention_head_dim,
            crops_coords=crop,
            grid_size=(grid_height, grid_width),
            temporal_size=latent_frames,
            device=device,
        )


@dataclass(frozen=True)
class ModelConfigs:
    """The config files of a pipeline's parts, read without instantiating (or downloading) weights."""

    source: dict  # pretrained_model_name_or_path (absolute when local), revision, variant
    transformer: dict
    vae: dict
    text_encoder: dict

    @classmethod
    def load(cls, pretrained_model_name_or_path: str, revision: str | None = None, variant: str | None = None,
             cache_dir: str | None = None) -> "ModelConfigs":
        from pathlib import Path

        from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
        from transformers import AutoConfig

        location = pretrained_model_name_or_path
        if Path(location).exists():
            location = str(Path(location).resolve())
        kwargs = dict(revision=revision, cache_dir=cache_dir)
        try:
            transformer = dict(CogVideoXTransformer3DModel.load_config(location, subfolder="transformer", **kwargs))
            vae = dict(AutoencoderKLCogVideoX.load_config(location, subfolder="vae", **kwargs))
            text_encoder = AutoConfig.from_pretrained(location, subfolder="text_encoder", **kwargs).to_dict()
        except (OSError, ValueError) as e:
            raise CogtuneError(
                f"Cannot read the model configs of --pretrained_model_name_or_path {pretrained_model_name_or_path}: "
                f"{str(e).splitlines()[0].rstrip('.')}. Give a diffusers CogVideoX pipeline folder or hub id."
            ) from None
        source = {"pretrained_model_name_or_path": location, "revision": revision, "variant": variant}
        return cls(source, transformer, vae, text_encoder)

    def identity(self) -> dict:
        """What the cache records about the model whose VAE and T5 made its tensors."""
        from .data_schema import config_hash

        return dict(self.source, vae_config_sha256=config_hash(self.vae),
                    text_encoder_config_sha256=config_hash(self.text_encoder))

    def spec(self) -> FamilySpec:
        return FamilySpec.from_configs(self.transformer, self.vae)
