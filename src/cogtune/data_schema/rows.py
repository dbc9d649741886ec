"""The index: its Parquet columns, the typed rows of encoded and skipped samples, the tensors a row
needs, and the training batch those tensors make."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pyarrow as pa
import torch

from cogtune.data_schema.layout import LEGACY_IMAGE_TENSORS, TensorSet, caption_key, caption_tensor_key, first_frame_tensor_key, sample_id, video_tensor_key
from cogtune.util.files import sha256_text


STATUS_OK = "ok"


STATUS_FAILED = "failed"


INDEX_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("failure_kind", pa.string()),  # short category of a skipped clip ("too short", "unreadable", ...)
        ("source_path", pa.string()),
        ("source_size", pa.int64()),
        ("source_mtime_ns", pa.int64()),
        ("source_sha256", pa.string()),
        ("caption", pa.string()),
        ("caption_sha256", pa.string()),
        ("frame_indices", pa.list_(pa.int32())),
        ("source_fps", pa.float64()),
        ("source_height", pa.int32()),
        ("source_width", pa.int32()),
        ("num_frames", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("bucket", pa.string()),  # FRAMESxHEIGHTxWIDTH the clip was brought to
        ("decoder", pa.string()),  # decord, or pyav when decord could not be trusted with the file
        ("latent_shape", pa.list_(pa.int32())),  # [C, F, H, W] of the stored moments
        ("latent_shard", pa.string()),
        ("latent_key", pa.string()),
        ("text_shard", pa.string()),
        ("text_key", pa.string()),
        # image-to-video caches: the noise sigma of each stored first-frame encoding (empty otherwise);
        # the encodings live in the latent shard under first_frame_tensor_key(latent_key, variant, name)
        ("image_noise_sigmas", pa.list_(pa.float64())),
    ]
)


SELECTION_SCHEMA = pa.schema([("sample_id", pa.string())])  # and "repeats" (int32), where one is not 1


DATASET_REPEATS_KEY = b"cogtune.dataset_repeats"  # selection metadata: the [[datasets]] repeats, a JSON list


FINGERPRINTS_SCHEMA = pa.schema([("source_path", pa.string()), ("source_size", pa.int64()),
                                 ("source_mtime_ns", pa.int64()), ("source_sha256", pa.string())])


@dataclass(frozen=True)
class SampleSource:
    """Where a sample comes from: one (video file, caption) pair, identified by their content."""

    sample_id: str
    source_path: str
    source_size: int
    source_mtime_ns: int
    source_sha256: str
    caption: str


@dataclass(frozen=True)
class VideoLatent:
    """The index columns of an encoded video, shared by every sample of that video."""

    frame_indices: list[int]
    source_fps: float
    source_height: int
    source_width: int
    num_frames: int
    height: int
    width: int
    bucket: str
    decoder: str
    latent_shape: list[int]
    latent_shard: str
    latent_key: str
    image_noise_sigmas: list[float]


@dataclass(slots=True)
class IndexRow:
    """One row of the index (INDEX_SCHEMA): a sample, encoded (status ok) or skipped with a reason."""

    sample_id: str
    status: str
    reason: str | None = None
    failure_kind: str | None = None
    source_path: str | None = None
    source_size: int | None = None
    source_mtime_ns: int | None = None
    source_sha256: str | None = None
    caption: str | None = None
    caption_sha256: str | None = None
    frame_indices: list[int] | None = None
    source_fps: float | None = None
    source_height: int | None = None
    source_width: int | None = None
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    bucket: str | None = None
    decoder: str | None = None
    latent_shape: list[int] | None = None
    latent_shard: str | None = None
    latent_key: str | None = None
    text_shard: str | None = None
    text_key: str | None = None
    image_noise_sigmas: list[float] | None = None

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def video_latent(self) -> VideoLatent:
        """The encoded video of an ok row, to reuse for another caption of the same video."""
        return VideoLatent(**{f.name: getattr(self, f.name) for f in dataclasses.fields(VideoLatent)})

    @property
    def image_variants(self) -> int:
        """Stored noised first-frame encodings of the sample's video (0 for text-to-video)."""
        return len(self.image_noise_sigmas or [])

    def tensors(self, tensors: TensorSet, text_length: int) -> list[tuple[str, str, tuple | None]]:
        """(shard, key, shape) of every tensor an ok row needs; a None in a shape is not checked."""
        return sample_tensors(self, tensors, text_length)

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in INDEX_SCHEMA.names}


def sample_tensors(row, tensors: TensorSet, text_length: int) -> list[tuple[str, str, tuple | None]]:
    """(shard, key, shape) of every tensor a usable sample needs (an IndexRow, or any row with its
    latent_shard, latent_key, latent_shape, image_variants, text_shard and text_key)."""
    channels, _, height, width = row.latent_shape
    found = [(row.latent_shard, video_tensor_key(row.latent_key, name), tuple(row.latent_shape))
             for name in tensors.video]
    for variant in range(row.image_variants):
        found += [(row.latent_shard, first_frame_tensor_key(row.latent_key, variant, name),
                   (channels, 1, height, width) if name in LEGACY_IMAGE_TENSORS else None)  # (a family's own: unchecked)
                  for name in tensors.first_frame]
    found += [(row.text_shard, caption_tensor_key(row.text_key, name), (text_length, None)) for name in tensors.caption]
    return found


def ok_row(source: SampleSource, video: VideoLatent, text_shard: str) -> IndexRow:
    """The row of a sample whose video latents and caption embedding are stored."""
    return IndexRow(status=STATUS_OK, reason="", caption_sha256=sha256_text(source.caption),
                    text_key=caption_key(source.caption), text_shard=text_shard,
                    **dataclasses.asdict(source), **dataclasses.asdict(video))


def failed_row(source: SampleSource, kind: str, reason: str) -> IndexRow:
    """The row of a sample whose clip could not be used, and why (it is not tried again)."""
    return IndexRow(status=STATUS_FAILED, failure_kind=kind, reason=reason, image_noise_sigmas=[],
                    caption_sha256=sha256_text(source.caption), **dataclasses.asdict(source))


@dataclass
class TrainingBatch:
    """A batch of cached samples as training reads it: exactly the tensors of the cache's TensorSet,
    stacked, by name. The family's objective consumes it."""

    video: dict[str, torch.Tensor]  # TensorSet.video: each [B, C, F, H, W]
    caption: dict[str, torch.Tensor]  # TensorSet.caption: each [B, text length, ...]
    first_frame: dict[str, torch.Tensor]  # TensorSet.first_frame: each [B, K, C, 1, H, W] (K encodings a video)
    empty_caption: dict[str, torch.Tensor] | None = None  # the empty prompt's (--caption_dropout_technique empty)

    @classmethod
    def collate(cls, items: list["TrainingBatch"]) -> "TrainingBatch":
        """Samples (each a TrainingBatch of one, unstacked) -> one batch."""
        def stacked(part: str) -> dict[str, torch.Tensor]:
            return {name: torch.stack([getattr(item, part)[name] for item in items]) for name in getattr(items[0], part)}
        return cls(stacked("video"), stacked("caption"), stacked("first_frame"))

    def _map(self, move) -> "TrainingBatch":
        def moved(tensors):
            return None if tensors is None else {name: move(tensor) for name, tensor in tensors.items()}
        return TrainingBatch(moved(self.video), moved(self.caption), moved(self.first_frame), moved(self.empty_caption))

    def to(self, device, non_blocking: bool = False) -> "TrainingBatch":
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TrainingBatch":  # (the DataLoader's pin_memory calls this)
        return self._map(lambda tensor: tensor.pin_memory())
