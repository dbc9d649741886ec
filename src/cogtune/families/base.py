"""What every model family is: the `ModelFamily` interface each stage calls, and the helpers any
family uses to read and build its parts.

A family owns everything model-specific: its parts and their classes, its frame and size rules,
how captions and clips become cached tensors, the training objective, the list of blocks, the
validation sampler, LoRA I/O and target presets, the model card's pipeline call and its exports.
The stages never name a model class and never branch on a family: they ask it.
"""

from __future__ import annotations

import abc
import hashlib
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from cogtune.data_schema import TensorSet, TrainingBatch
from cogtune.errors import CogtuneError
from cogtune.families.objectives import Objective
from cogtune.util.draws import Draws
from cogtune.util.files import sha256_text


class ModelFamily(abc.ABC):
    """One architecture, and one variant of it, decided from the pipeline's own config files.

    Class attributes say what the registry and the tools need before any config is read; the
    instance (from `from_configs`) answers for one model. `models` arguments are the pipeline's
    `families.models.ModelConfigs` (which imports the registry, and so every family)."""

    name: ClassVar[str]  # e.g. "CogVideoX"
    pipelines: ClassVar[tuple[str, ...]]  # model_index.json _class_name values this family reads
    config_files: ClassVar[dict[str, str]]  # part -> its config file (read without weights)
    encoded_parts: ClassVar[tuple[str, ...]]  # the parts whose outputs the cache stores
    variants: ClassVar[dict[str, str]]  # `cogtune init --family` and make-tiny-model name -> description
    published: ClassVar[dict[str, str]]  # lower-case hub id -> its folder of shipped config files
    target_presets: ClassVar[dict[str, list[str]]]  # --lora_target_preset -> module names
    optional_parts: ClassVar[tuple[str, ...]] = ()  # config_files parts read only where model_index.json lists them

    # --- what it is --------------------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def from_configs(cls, configs: dict[str, dict]) -> "ModelFamily":
        """The variant these part configs describe; a CogtuneError for parts that do not fit together."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """One line for users: the version, text- or image-to-video, what tells the variant apart."""

    @property
    @abc.abstractmethod
    def image_conditioned(self) -> bool:
        """Whether the model animates a first frame (image-to-video)."""

    @property
    @abc.abstractmethod
    def pipeline_class_name(self) -> str:
        """The diffusers pipeline that generates with this model."""

    @property
    @abc.abstractmethod
    def recommended_precision(self) -> str:
        """The --mixed_precision the model was trained in."""

    @abc.abstractmethod
    def check_precision(self, mixed_precision: str, warn) -> None:
        """Refuse (or warn of) a precision the model cannot run in."""

    # --- sizes -------------------------------------------------------------------------------

    frame_step: ClassVar[int]  # clips have frame_step * k + 1 frames
    size_multiple: ClassVar[int]  # heights and widths are multiples of this
    size_reason: ClassVar[str]  # why, in words

    def check_frames(self, frames: int, what: str) -> None:
        """Refuse a frame count that is not frame_step * k + 1 (what: the flag or row that gave it)."""
        if frames < 1 or (frames - 1) % self.frame_step:
            lower = max(1, frames - (frames - 1) % self.frame_step)
            raise CogtuneError(f"{what} {frames} is not of the form {self.frame_step}k+1 that the {self.name} VAE "
                               f"needs; use {lower} or {lower + self.frame_step}.")

    def check_size(self, height: int, width: int, where: str = "", names: tuple[str, str] = ("--height", "--width")
                   ) -> None:
        """Refuse a height or width that is not a multiple of size_multiple."""
        for name, value in zip(names, (height, width)):
            if value % self.size_multiple or value < self.size_multiple:
                raise CogtuneError(f"{where}{name} {value} is not a multiple of {self.size_multiple} ({self.size_reason}); "
                                   f"pick the nearest multiple of {self.size_multiple}.")

    def check_clip_settings(self, clips, buckets: list | None, where: str = "") -> None:
        """The clip settings of a preprocess config (or of one [[datasets]] table: where says which) and
        its buckets, by this model's rules."""
        self.check_frames(clips.max_num_frames, f"{where}--max_num_frames")
        self.check_size(clips.height, clips.width, where)
        for frames, height, width in buckets or []:
            self.check_frames(frames, f"{where}Bucket {frames}x{height}x{width}: frames")
            self.check_size(height, width, f"{where}Bucket {frames}x{height}x{width}: ", ("height", "width"))

    @abc.abstractmethod
    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a clip of num_frames pixel frames."""

    def frame_padding(self, latent_frames: int) -> int:
        """Latent frames the transformer needs before the clip's own (none unless the family says)."""
        return 0

    @abc.abstractmethod
    def check_clip_size(self, num_frames: int, height: int, width: int,
                        ignore_learned_positional_embeddings: bool) -> None:
        """Refuse clip sizes this model cannot train or generate at, before anything is encoded."""

    def ignores_learned_positions(self, ignore_learned_positional_embeddings: bool) -> bool:
        """Whether --ignore_learned_positional_embeddings leaves anything out of this model."""
        return False

    def drop_learned_positional_embeddings(self, transformer) -> None:
        """Leave the learned positional embeddings out (where ignores_learned_positions says so)."""

    # --- the parts: diffusers and transformers classes, named by the family --------------------

    transformer_class: ClassVar[str]  # a diffusers model class
    vae_class: ClassVar[str]  # a diffusers model class
    text_encoder_class: ClassVar[str]  # a transformers model class

    def pipeline_class(self):
        """The diffusers pipeline class (for `cogtune infer`, merge and the LoRA I/O)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    @classmethod
    def image_to_video_index(cls, configs: dict[str, dict]) -> dict:
        """model_index.json as the family's image-to-video pipeline of this model would read
        (--image_to_video, for a model that does both); a CogtuneError for any other model."""
        raise CogtuneError(f"--image_to_video is for models that do both text- and image-to-video (Wan 2.2 TI2V); "
                           f"this {cls.from_configs(configs).description} model is one or the other by itself. "
                           "Leave --image_to_video out.")

    def with_expert(self, expert: str | None) -> "ModelFamily":
        """The family as a run that trains this expert sees it (--expert: models with several
        transformers); a CogtuneError for an expert this model does not have."""
        if expert is not None:
            raise CogtuneError(f"--expert {expert} is for models with two experts (Wan 2.2 A14B); this {self.description} "
                               "model has one transformer. Leave --expert out.")
        return self

    def lora_load_arguments(self, info: dict) -> dict:
        """load_lora_weights' keyword arguments for a LoRA of this family (its cogtune_lora.json: info)."""
        return {}

    def lora_components(self, info: dict) -> list[str]:
        """The pipeline parts a LoRA (its cogtune_lora.json: info) adapts, for fuse_lora."""
        return ["transformer"]

    def load_transformer(self, models: "ModelConfigs", dtype: torch.dtype, **kwargs) -> torch.nn.Module:
        return models.load_part(_diffusers(self.transformer_class), "transformer", dtype=dtype, **kwargs)

    def meta_transformer(self, models: "ModelConfigs", dtype: torch.dtype) -> torch.nn.Module:
        """The transformer on the meta device, for the memory estimates."""
        cls = _diffusers(self.transformer_class)
        return built_on_meta(lambda: cls.from_config(models.transformer), dtype)

    def load_vae(self, models: "ModelConfigs", device, dtype, slicing: bool = False, tiling: bool = False):
        """The pipeline's VAE on device, with --enable_slicing and --enable_tiling applied."""
        vae = models.load_part(_diffusers(self.vae_class), "vae", dtype=dtype).to(device).eval()
        if slicing:
            vae.enable_slicing()
        if tiling:
            vae.enable_tiling()
        return vae

    def meta_vae(self, models: "ModelConfigs", dtype: torch.dtype) -> torch.nn.Module:
        cls = _diffusers(self.vae_class)
        return meta_model(lambda: cls.from_config(models.vae), dtype)

    def load_text_encoder(self, models: "ModelConfigs", dtype: torch.dtype, **kwargs):
        """(tokenizer, text encoder) of the pipeline, the encoder in dtype on the CPU."""
        from transformers import AutoTokenizer

        tokenizer = models.load_part(AutoTokenizer, "tokenizer", weights=False)
        return tokenizer, models.load_part(_transformers(self.text_encoder_class), "text_encoder", dtype=dtype,
                                           **kwargs).eval()

    def meta_text_encoder(self, models: "ModelConfigs", dtype: torch.dtype) -> torch.nn.Module:
        return meta_transformers_model(self.text_encoder_class, models.text_encoder, dtype)

    def use_attention_backend(self, transformer, backend: str) -> None:
        """Compute the transformer's attention with --attention_backend (checked already by
        families.attention.check_attention_backend): diffusers' set_attention_backend, which reaches every
        processor that calls its attention dispatcher. A family whose processors call
        F.scaled_dot_product_attention directly swaps in processors of the same math that dispatch first."""
        transformer.set_attention_backend(backend)

    def context_parallel_plan(self, transformer) -> dict:
        """How --context_parallel_degree splits the transformer's tokens (diffusers' ContextParallelInput and
        ContextParallelOutput by module): the model's own `_cp_plan`; a CogtuneError where it has none."""
        plan = getattr(transformer, "_cp_plan", None)
        if not plan:
            raise CogtuneError(f"--context_parallel_degree is not available for {self.name} models yet: their "
                               "transformer has no context-parallel plan. Use data parallelism (DDP) instead.")
        return plan

    def context_parallel_tokens(self, latent_shape: list[int], in_channels: int) -> dict[str, int]:
        """The token counts --context_parallel_degree splits for a sample of latent_shape [C, F, H, W]: the
        video tokens (the text's too where the family's plan splits them)."""
        hidden = self.memory_inputs(1, list(latent_shape), in_channels, torch.float32, "meta")["hidden_states"]
        return {"video": self.video_tokens(hidden)}

    def check_context_parallel(self, degree: int, latent_shapes, in_channels: int) -> None:
        """Every split token count divides by the degree (diffusers splits into equal shares), or a CogtuneError
        that names the clip size and what to do."""
        for shape in sorted(set(map(tuple, latent_shapes))):
            for what, count in self.context_parallel_tokens(list(shape), in_channels).items():
                if count % degree:
                    raise CogtuneError(
                        f"--context_parallel_degree {degree}: the {what} tokens of the clips of latent shape "
                        f"{'x'.join(map(str, shape))} ({count}) do not split into {degree} equal shares. Use a degree "
                        f"that divides {count}, or other clip sizes.")

    @abc.abstractmethod
    def blocks(self, transformer) -> torch.nn.ModuleList:
        """The repeated blocks: what block swap, regional compilation and the estimates walk."""

    block_state_arguments: ClassVar[int]  # a block's first arguments that are its large states

    @abc.abstractmethod
    def block_states(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The large per-block states of a block's call (what checkpoint offload keeps in CPU memory)."""

    # --- encoding (stage 1) ------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def tensors(self) -> TensorSet:
        """The tensors the cache stores for this model, by name (what its objective consumes)."""

    @property
    @abc.abstractmethod
    def text_length(self) -> int:
        """Tokens of every stored caption embedding."""

    text_embed_dim: int  # the width of a caption embedding (each family's from_configs sets it)

    @abc.abstractmethod
    def embed_texts(self, texts: list[str], tokenizer, text_encoder) -> tuple[list[dict[str, torch.Tensor]], int]:
        """Each text's tensors by name (TensorSet.caption), as the pipeline feeds the transformer, each
        through the encoder on its own (the cache is content-addressed); how many were truncated."""

    @abc.abstractmethod
    def text_tokens(self, device) -> torch.Tensor:
        """A caption's token ids as the text encoder sees them (for the memory estimates)."""

    @abc.abstractmethod
    def encode_pixels(self, vae, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """[1, C, F, H, W] pixels in [-1, 1] -> the clip's tensors by name (TensorSet.video)."""

    noised_first_frame: ClassVar[bool] = True  # the first frame is encoded with --image_noise_variants noises
    first_frame_depends_on_frames: ClassVar[bool] = False  # its tensors differ with the clip's frame count

    def first_frame_encoders(self, models: "ModelConfigs", vae, device, dtype):
        """What encode_first_frame takes: the VAE, unless the family needs more (an image encoder)."""
        return vae

    @abc.abstractmethod
    def encode_first_frame(self, encoders, pixels: torch.Tensor, num_frames: int) -> dict[str, torch.Tensor]:
        """[1, C, 1, H, W] first frame of a clip of num_frames frames -> its tensors by name
        (TensorSet.first_frame); encoders: first_frame_encoders'."""

    def image_encoder_bytes(self, models: "ModelConfigs", dtype: torch.dtype) -> int:
        """Weight bytes of what encodes first frames beside the VAE (for the estimates): none here."""
        return 0

    def inference_image(self, pixels: torch.Tensor):
        """The image the family's pipeline is given for a [3, 1, H, W] first frame in [-1, 1]."""
        return (pixels[:, 0][None] + 1) / 2

    # --- the training objective --------------------------------------------------------------

    @abc.abstractmethod
    def noise_schedule(self, models: "ModelConfigs"):
        """What the objective needs from the scheduler, read once per run."""

    @abc.abstractmethod
    def step_inputs(self, batch: TrainingBatch, draws: Draws, schedule, objective: Objective):
        """The step's inputs drawn from a batch of cached tensors, in a fixed order of draws."""

    @abc.abstractmethod
    def model_inputs(self, inputs, dtype: torch.dtype) -> dict:
        """The transformer's keyword inputs of a step, beside transformer_inputs'."""

    @abc.abstractmethod
    def latent_size(self, inputs) -> tuple[int, int, int, int]:
        """(batch, latent frames, height, width) of a step: what transformer_inputs takes."""

    @abc.abstractmethod
    def transformer_inputs(self, batch_size: int, latent_frames: int, latent_height: int, latent_width: int,
                           device, dtype: torch.dtype | None = None) -> dict:
        """The model's extra keyword inputs for latents of this size (position tables, ...)."""

    def check_objective(self, objective: Objective) -> None:
        """A CogtuneError, before any model loads, for an objective option the family cannot train with."""

    @abc.abstractmethod
    def losses(self, pred: torch.Tensor, inputs, dtype: torch.dtype, objective: Objective) -> torch.Tensor:
        """The loss of each sample, [B], weighted as the objective asks."""

    @abc.abstractmethod
    def memory_inputs(self, batch: int, latent_shape: list[int], in_channels: int, dtype: torch.dtype,
                      device, inputs_dtype: torch.dtype | None = None) -> dict:
        """Empty tensors of one forward pass on a batch of latents [C, F, H, W] (for the estimates)."""

    @abc.abstractmethod
    def video_tokens(self, hidden_states: torch.Tensor) -> int:
        """Tokens of one sample's latents in the transformer's sequence."""

    # --- validation ----------------------------------------------------------------------------

    @abc.abstractmethod
    def validation_scheduler(self, models: "ModelConfigs"): ...

    def with_flow_shift(self, scheduler, flow_shift: float | None):
        """The sampler with --flow_shift applied (flow-matching families)."""
        self.check_flow_shift(flow_shift)
        return scheduler

    def check_flow_shift(self, flow_shift: float | None) -> None:
        """A CogtuneError for --flow_shift where the family's sampler has none."""
        if flow_shift is not None:
            raise CogtuneError(f"--flow_shift is for flow-matching models (Wan); this {self.description} model's "
                               "sampler has no flow shift. Leave --flow_shift out.")

    @abc.abstractmethod
    def generate_latents(self, transformer, scheduler, caption: dict, negative: dict, num_frames: int, height: int,
                         width: int, num_inference_steps: int, guidance_scale: float, use_dynamic_cfg: bool,
                         generator: torch.Generator, dtype: torch.dtype, first_frame: dict | None = None) -> torch.Tensor:
        """One video's denoised latents, as the family's pipeline computes them from these cached
        tensors (caption, negative prompt, and image where the model is image-to-video)."""

    @abc.abstractmethod
    def decode(self, vae, latents: torch.Tensor) -> np.ndarray:
        """Latents -> [frames, H, W, 3] uint8, as the pipeline decodes and post-processes."""

    # --- LoRA files, the model card, inference and exports -------------------------------------

    def save_lora_weights(self, directory, layers: dict, metadata: dict, weight_name: str) -> None:
        """The LoRA in diffusers' format for this pipeline, with peft's adapter settings."""
        self.pipeline_class().save_lora_weights(directory, transformer_lora_layers=layers,
                                                transformer_lora_adapter_metadata=metadata, weight_name=weight_name)

    def lora_state_dict(self, source: str, **kwargs):
        """diffusers' reading of a LoRA for this pipeline (its key conversions applied)."""
        return self.pipeline_class().lora_state_dict(source, **kwargs)

    card_tags: ClassVar[tuple[str, ...]]  # the model card's tags for this family

    @abc.abstractmethod
    def pipeline_call_arguments(self, use_dynamic_cfg: bool) -> dict:
        """The pipeline's own keyword arguments that cogtune's settings choose."""

    @abc.abstractmethod
    def card_call_arguments(self, use_dynamic_cfg: bool) -> str:
        """The same, as the model card's snippet spells them (ending in ", ", or empty)."""

    export_formats: ClassVar[tuple[str, ...]]  # `cogtune export --format` values this family's LoRAs take

    def exported_module(self, module: str) -> str:
        """A diffusers transformer module path (blocks.0.attn1.to_q) as the ComfyUI export names it: the
        module path of the model as ComfyUI holds it (CogVideoX: the diffusers one)."""
        return module


IGNORED_CONFIG_KEYS = ("transformers_version", "torch_dtype", "dtype")  # the library that saved it, storage dtype


def config_hash(config: dict) -> str:
    """Hash of a component's config.json, ignoring keys that do not change the weights' meaning."""
    kept = {k: v for k, v in config.items() if not k.startswith("_") and k not in IGNORED_CONFIG_KEYS}
    return sha256_text(json.dumps(kept, sort_keys=True, default=str))


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


def dtype_argument(cls, dtype) -> dict:
    """The from_pretrained keyword that sets a model's dtype: `dtype` for transformers and for
    diffusers 0.40 and newer (which deprecate `torch_dtype`), `torch_dtype` for older diffusers."""
    if cls.__module__.startswith("diffusers"):
        import diffusers

        major, minor = (int(part) for part in diffusers.__version__.split(".")[:2])
        if (major, minor) < (0, 40):
            return {"torch_dtype": dtype}
    return {"dtype": dtype}


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


def meta_model(build, dtype: torch.dtype) -> torch.nn.Module:
    """A model built on the meta device (shapes, no storage), frozen, in dtype."""
    return built_on_meta(build, dtype).requires_grad_(False).eval()


def meta_transformers_model(class_name: str, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """A transformers model (by class name) built on the meta device from a part's config.json."""
    cls = _transformers(class_name)
    values = {k: v for k, v in config.items() if k != "architectures"}
    return meta_model(lambda: cls(cls.config_class(**values)), dtype)


def _diffusers(name: str):
    import diffusers

    return getattr(diffusers, name)


def _transformers(name: str):
    import transformers

    return getattr(transformers, name)
