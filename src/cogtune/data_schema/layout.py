"""Where everything of a cache is, and what it is called: the format version, file and folder names,
shard header entries, the tensor set a family declares, content keys and tensor keys."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from cogtune.errors import CogtuneError
from cogtune.util.files import sha256_text


# 2: image-to-video latents, image_noise_sigmas; 3: bucket, failure_kind, decoder; 4: tensor checksums;
# 5: model configs hashed as their files store them (4 hashed the installed transformers' expanded
# view of the T5 config, which changed with its version)
FORMAT_VERSION = 6  # 6: the family, its encoders and its tensor names in the manifest; shards stamped


LEGACY_VERSION = 5  # read as version 6 (Manifest.from_json): such caches train on, nothing re-encoded


MANIFEST_FILE = "manifest.json"


LOCK_FILE = ".lock"


CHECKSUMS_METADATA = "cogtune.sha256"  # shard header entry: JSON {tensor key: sha256 of its bytes}


FINGERPRINT_METADATA = "cogtune.fingerprint"  # shard header entry: the fingerprint of the cache it belongs to


FAMILY_METADATA = "cogtune.family"  # shard header entry: the model family whose encoders made its tensors


SELECTION_FILE = "selection.parquet"


# The content hash of every source file as last seen (path, size, mtime): a file touched, copied or
# rsynced without times is hashed again once, not on every later run. Only a shortcut: a cache
# without it, or with a damaged one, is read as if it had none.
FINGERPRINTS_FILE = "fingerprints.parquet"


SHARDS_DIR = "shards"


INDEX_DIR = "index"


VALIDATION_INPUTS_DIR = "validation"  # validation prompts' T5 embeddings and images' VAE moments


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass(frozen=True)
class TensorSet:
    """The tensors a model family stores, by name: per caption (each [text length, ...]), per video
    window (each of the latent shape, [C, F, H, W]) and, image-to-video, per noised first frame (each
    [C, 1, H, W]). The same names key a validation prompt's and a validation image's file."""

    caption: tuple[str, ...]
    video: tuple[str, ...]
    first_frame: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"caption": list(self.caption), "video": list(self.video), "first_frame": list(self.first_frame)}

    @classmethod
    def from_json(cls, data: dict) -> "TensorSet":
        return cls(tuple(data["caption"]), tuple(data["video"]), tuple(data.get("first_frame", ())))


# What CogVideoX caches of format version 5 hold (that version named no tensors in its manifest).
LEGACY_TENSORS = TensorSet(caption=("prompt_embeds",), video=("mean", "logvar"))


LEGACY_IMAGE_TENSORS = ("mean", "logvar")


def sha256_tensor(tensor: torch.Tensor) -> str:
    """Hash of a tensor's bytes as stored (any dtype, bf16 included)."""
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def sample_id(source_sha256: str, caption: str) -> str:
    return sha256_text(f"{source_sha256}\n{caption}")[:32]


def clip_source(source_sha256: str, clip_settings: str = "") -> str:
    """What identifies a video's clips where a sha256 identifies a video: its content's sha256 at the
    top-level clip settings; with its [[datasets]] table's own (sources.CLIP_KEYS, as JSON), a hash of
    both, so that the same video cut two ways is two sets of latents."""
    return source_sha256 if not clip_settings else sha256_text(f"{source_sha256}\n{clip_settings}")


def video_key(source_sha256: str) -> str:
    return source_sha256[:32]


def window_source(source_sha256: str, start: int) -> str:
    """What identifies one window of a video (its first frame `start` among the frames at --fps)
    where a sha256 identifies a whole video: the sha256 itself for the window at 0 (the clip head
    extraction takes), else the sha256 and the start."""
    return source_sha256 if start == 0 else f"{source_sha256}@{start}"


def window_key(source_sha256: str, start: int) -> str:
    """The latent key of a video's window: video_key for the window at 0, else with @start."""
    return video_key(source_sha256) if start == 0 else f"{video_key(source_sha256)}@{start}"


def window_start(latent_key: str) -> int:
    """The window start a latent key names (window_key)."""
    return int(latent_key.partition("@")[2] or 0)


def caption_key(caption: str) -> str:
    return sha256_text(caption)[:32]


def video_tensor_key(key: str, name: str) -> str:
    """Key of a video window's tensor `name` (TensorSet.video); key: its latent_key."""
    return f"latents/{key}/{name}"


def first_frame_tensor_key(key: str, variant: int, name: str) -> str:
    """Key of the tensor `name` (TensorSet.first_frame) of a video's noised first frame, one per variant."""
    return f"images/{key}/{variant}/{name}"


def caption_tensor_key(key: str, name: str) -> str:
    """Key of a caption's tensor `name` (TensorSet.caption); key: its caption_key."""
    return f"text/{key}/{name}"


def caption_tensor_keys(caption: str, tensors: TensorSet) -> list[str]:
    """Keys of every tensor stored for a caption."""
    return [caption_tensor_key(caption_key(caption), name) for name in tensors.caption]


def video_tensor_keys(key: str, tensors: TensorSet, variants: int) -> list[str]:
    """Keys of every tensor stored for a video window (its latent_key), first frames included."""
    return [video_tensor_key(key, name) for name in tensors.video] + [
        first_frame_tensor_key(key, variant, name) for variant in range(variants) for name in tensors.first_frame]


SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\Z")  # what CacheWriter names shards: r0-<hex>


def valid_shard_name(name) -> bool:
    return isinstance(name, str) and bool(SHARD_NAME.match(name)) and ".." not in name


def shard_path(cache_path: str | Path, name: str) -> Path:
    """The file of a shard. A name that is no plain file name (a path, .., an absolute path: a
    crafted index) is refused, so that nothing outside the cache's shards/ is ever read."""
    if not valid_shard_name(name):
        raise CogtuneError(f"{cache_path}: the index names a shard {name!r}, which is not a file in its {SHARDS_DIR}/ "
                           "folder (a damaged or crafted index). Run `cogtune cache verify` on it, then "
                           "`cogtune cache prune --damaged` and preprocess again.")
    return Path(cache_path) / SHARDS_DIR / f"{name}.safetensors"


def shard_paths(cache_path: str | Path) -> list[Path]:
    """Every complete shard of a cache (temp files of killed runs have another suffix)."""
    return sorted((Path(cache_path) / SHARDS_DIR).glob("*.safetensors"))


def index_part_path(cache_path: str | Path, name: str) -> Path:
    return Path(cache_path) / INDEX_DIR / f"{name}.parquet"


def validation_text_path(cache_path: str | Path, prompt: str) -> Path:
    """A validation prompt's tensors (TensorSet.caption names); "" is the negative prompt."""
    return Path(cache_path) / VALIDATION_INPUTS_DIR / f"text-{caption_key(prompt)}.safetensors"


def validation_image_path(cache_path: str | Path, image_sha256: str, height: int, width: int,
                          frames: int | None = None) -> Path:
    """A validation image's tensors (TensorSet.first_frame names) at one pixel size, and at one frame
    count for a family whose image tensors depend on it (Wan)."""
    size = f"{height}x{width}" if frames is None else f"{frames}x{height}x{width}"
    return Path(cache_path) / VALIDATION_INPUTS_DIR / f"image-{image_sha256[:32]}-{size}.safetensors"
