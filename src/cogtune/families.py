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

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from cogtune.errors import CogtuneError, first_line
from cogtune.util import hub
from cogtune.util.files import sha256_text

OFS_VALUE = 2.0  # the ofs embedding input of CogVideoX 1.5-I2V, as its pipeline passes it


@dataclass(frozen=True)
class FamilySpec:
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
    image_conditioned: bool  # image-to-video: the transformer takes video + image latents on channels
    ofs_embed_dim: int | None

    @classmethod
    def from_configs(cls, transformer: dict, vae: dict, scheduler: dict | None = None) -> "FamilySpec":
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
            image_conditioned=in_channels == 2 * out_channels,
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
        """Whether --ignore_learned_positional_embeddings leaves anything out: only 5b-I2V has them."""
        return bool(ignore_learned_positional_embeddings and self.learned_positional_embeddings)

    # --- clip sizes ---

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.vae_scale_temporal + 1

    def frame_padding(self, latent_frames: int) -> int:
        """Latent frames CogVideoX 1.5 prepends so that patch_size_t divides the frame count."""
        return (-latent_frames) % self.patch_size_t if self.patch_size_t else 0

    def check_clip_size(self, num_frames: int, height: int, width: int,
                        ignore_learned_positional_embeddings: bool) -> None:
        """Refuse clip sizes this family cannot train or generate at, before anything is encoded.
        (4k+1 frames and sizes in multiples of 16, true of every family, are checked with the flags.)"""
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


def dtype_argument(cls, dtype) -> dict:
    """The from_pretrained keyword that sets a model's dtype: `dtype` for transformers and for
    diffusers 0.40 and newer (which deprecate `torch_dtype`), `torch_dtype` for older diffusers."""
    if cls.__module__.startswith("diffusers"):
        import diffusers

        major, minor = (int(part) for part in diffusers.__version__.split(".")[:2])
        if (major, minor) < (0, 40):
            return {"torch_dtype": dtype}
    return {"dtype": dtype}


def load_vae(models: "ModelConfigs", config, device, dtype):
    """The pipeline's VAE on device, with the stage's --enable_slicing and --enable_tiling applied."""
    from diffusers import AutoencoderKLCogVideoX

    vae = models.load_part(AutoencoderKLCogVideoX, "vae", dtype=dtype).to(device).eval()
    if config.enable_slicing:
        vae.enable_slicing()
    if config.enable_tiling:
        vae.enable_tiling()
    return vae


def built_on_meta(build, dtype):
    """build() on PyTorch's meta device (shapes, no storage), in dtype, for the memory estimates;
    diffusers' warning about fp32 modules, which .to(dtype) of a model built from its config gives,
    silenced."""
    from diffusers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            return build().to(dtype)
    finally:
        logging.set_verbosity(verbosity)


def drop_learned_positional_embeddings(transformer) -> None:
    """Let CogVideoX-5b-I2V run at other sizes: its learned positional embeddings are near zero and
    tied to 49x480x720, so they are left out (in training and in inference alike)."""
    transformer.patch_embed.use_learned_positional_embeddings = False
    transformer.register_to_config(use_learned_positional_embeddings=False)


IGNORED_CONFIG_KEYS = ("transformers_version", "torch_dtype", "dtype")  # the library that saved it, storage dtype


def config_hash(config: dict) -> str:
    """Hash of a component's config.json, ignoring keys that do not change the weights' meaning."""
    kept = {k: v for k, v in config.items() if not k.startswith("_") and k not in IGNORED_CONFIG_KEYS}
    return sha256_text(json.dumps(kept, sort_keys=True, default=str))


# The published pipelines whose config files ship with cogtune (config.json files only, no
# weights; see published/README.md): --dry_run, every check before weights are loaded and the
# naming of caches then need no network. Hub ids are matched without regard to case.
PUBLISHED_DIR = Path(__file__).resolve().parent / "published"
PUBLISHED = {
    f"{namespace}/{name}".lower(): name.lower()
    for namespace in ("THUDM", "zai-org")
    for name in ("CogVideoX-2b", "CogVideoX-5b", "CogVideoX-5b-I2V", "CogVideoX1.5-5B", "CogVideoX1.5-5B-I2V")
}
CONFIG_FILES = {"transformer": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json",
                "text_encoder": "config.json"}
FLAG = "--pretrained_model_name_or_path"


def published_folder(name: str) -> Path | None:
    """The shipped configs of a published hub id, or None."""
    folder = PUBLISHED.get(name.strip("/").lower())
    return PUBLISHED_DIR / folder if folder else None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_digest(folder: Path, parts: tuple[str, ...], sample_bytes: int = 1 << 16) -> str:
    """A digest of the weight files of these parts of a pipeline folder, cheap for any size: each
    file's name and size, and 64 KiB from its start (the safetensors header: names, dtypes, shapes),
    middle and end. Two sets of weights of one config differ there as everywhere."""
    digest = hashlib.sha256()
    for part in parts:
        for path in sorted((folder / part).glob("*")):
            if path.suffix not in WEIGHT_SUFFIXES or not path.is_file():
                continue
            size = path.stat().st_size
            digest.update(f"{part}/{path.name}\0{size}\0".encode())
            with open(path, "rb") as f:
                for offset in sorted({0, max(0, size // 2 - sample_bytes // 2), max(0, size - sample_bytes)}):
                    f.seek(offset)
                    digest.update(f.read(sample_bytes))
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelConfigs:
    """The config files of a pipeline's parts, read without instantiating (or downloading) weights,
    and the one place that loads the parts' weights."""

    source: dict  # pretrained_model_name_or_path (absolute when local), revision, variant
    transformer: dict
    vae: dict
    text_encoder: dict
    scheduler: dict
    cache_dir: str | None = None  # the Hugging Face cache (--cache_dir)

    @classmethod
    def load(cls, pretrained_model_name_or_path: str, revision: str | None = None, variant: str | None = None,
             cache_dir: str | None = None) -> "ModelConfigs":
        """Read the configs of a local pipeline folder, of a published hub id (shipped with cogtune,
        unless another --revision is asked for), or of another hub id (the Hugging Face cache first,
        then the hub, which fails within seconds when it cannot be reached)."""
        name = pretrained_model_name_or_path
        path = Path(name).expanduser()
        if path.exists():
            name, folder = str(path.resolve()), path.resolve()
        elif not hub.looks_like_hub_id(name) or path.parent.name and path.parent.is_dir():  # models/CogVideoX-5b
            raise CogtuneError(
                f"{FLAG} {name} does not exist. Give the folder of a diffusers CogVideoX pipeline (it holds "
                "model_index.json and transformer/, vae/, text_encoder/ and scheduler/), or a hub id such as "
                "THUDM/CogVideoX-5b.")
        else:
            folder = published_folder(name) if revision is None else None
        configs = {}
        for part, filename in CONFIG_FILES.items():
            if folder is None:
                configs[part] = hub.read_json(name, f"{part}/{filename}", revision, cache_dir, FLAG)
                continue
            try:
                configs[part] = json.loads((folder / part / filename).read_text())
            except FileNotFoundError:
                raise CogtuneError(f"{FLAG} {name} is not a diffusers CogVideoX pipeline folder: it has no "
                                   f"{part}/{filename}.") from None
            except json.JSONDecodeError as e:
                raise CogtuneError(f"{folder / part / filename} is not valid JSON ({e}).") from None
        source = {"pretrained_model_name_or_path": name, "revision": revision, "variant": variant}
        return cls(source, cache_dir=cache_dir, **configs)

    @classmethod
    def of(cls, config) -> "ModelConfigs":
        """The configs of a stage's --pretrained_model_name_or_path, --revision, --variant and --cache_dir."""
        return cls.load(config.pretrained_model_name_or_path, config.revision, config.variant, config.cache_dir)

    @property
    def location(self) -> str:
        return self.source["pretrained_model_name_or_path"]

    @property
    def on_hub(self) -> bool:
        return not Path(self.location).is_dir()

    def load_part(self, cls, subfolder: str | None, dtype=None, weights: bool = True, **kwargs):
        """`cls.from_pretrained` of one part (subfolder) or of the whole pipeline (None), from the
        same source as the configs. A hub that cannot be reached is not waited for: the part then
        comes from the Hugging Face cache, or the error says that it is not there."""
        if subfolder is not None:
            kwargs["subfolder"] = subfolder
        kwargs.update(revision=self.source["revision"], cache_dir=self.cache_dir)
        if weights and self.source["variant"]:
            kwargs["variant"] = self.source["variant"]
        if dtype is not None:
            kwargs.update(dtype_argument(cls, dtype))
        reason = None
        if self.on_hub and not hub.offline():
            reason = hub.unreachable_reason()
            if reason is not None:
                kwargs["local_files_only"] = True
        try:
            return cls.from_pretrained(self.location, **kwargs)
        except (OSError, ValueError) as e:
            what = f"the {subfolder} of {self.location}" if subfolder else f"the pipeline {self.location}"
            message = first_line(e) or type(e).__name__
            if reason is not None:
                raise CogtuneError(f"Cannot load {what}: " + hub.unreachable_message(what, reason)) from None
            raise CogtuneError(f"Cannot load {what} ({message}).") from None

    def identity(self) -> dict:
        """What the cache records about the model whose VAE and T5 made its tensors."""
        return dict(self.source, family=self.spec().description, vae_config_sha256=config_hash(self.vae),
                    text_encoder_config_sha256=config_hash(self.text_encoder),
                    weights_sha256=None if self.on_hub else weights_digest(Path(self.location), ("vae", "text_encoder")))

    def spec(self) -> FamilySpec:
        return FamilySpec.from_configs(self.transformer, self.vae, self.scheduler)
