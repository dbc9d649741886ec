"""The cache as training data: the order of the batches, a pure function of (seed, epoch) and the
samples' content keys; each process's share of a global batch (the same samples and weights for
any number of processes); the plan of a run (batches per epoch, steps); the dataset that
reads one sample's tensors; and the cache a run trains on, checked before any model is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cogtune import data_schema as schema
from cogtune.cache.identity import training_cache
from cogtune.cache.compat import check_for_training
from cogtune.cache.disk import read_dataset_repeats
from cogtune.cache.reader import Cache
from cogtune.cache.verify import check_samples
from cogtune.data.sources import dataset_tables
from cogtune.errors import CogtuneError
from cogtune.families import ModelConfigs, ModelFamily
from cogtune.util import logs


def epoch_batches(shapes: list[tuple], batch_size: int, seed: int, epoch: int,
                  repeats: np.ndarray | None = None) -> list[list[int]]:
    """The batches of one epoch: the whole dataset shuffled from (seed, epoch), each batch holding
    samples of one latent shape. Every sample appears exactly once (repeats[i] times, with
    repeats); the last batch of a shape may be short."""
    items = np.arange(len(shapes)) if repeats is None else np.repeat(np.arange(len(shapes)), repeats)
    order = items[np.random.default_rng([seed, epoch]).permutation(len(items))]
    pending: dict[tuple, list[int]] = {}
    batches = []
    for index in order.tolist():
        group = pending.setdefault(shapes[index], [])
        group.append(index)
        if len(group) == batch_size:
            batches.append(pending.pop(shapes[index]))
    batches.extend(pending.values())
    return batches


def batch_generator(seed: int, batch_number: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + batch_number)


@dataclass(frozen=True)
class Share:
    """One process's part of a global batch: `indices`, always batch_size of them so that every
    process runs the same shapes and no collective waits on another; the first `real` are its
    own samples, the rest repeats (of the batch's shape) whose loss weight is zero. `start` is its
    first row in the global batch, `total` the global batch's real samples: the loss is the sum
    over real rows divided by total / processes, so that the mean over processes (DDP's gradient
    average) is the mean over the real samples, whatever the number of processes."""

    indices: list[int]
    real: int
    start: int
    total: int


def rank_share(batch: list[int], batch_size: int, num_processes: int, process_index: int) -> Share:
    """This process's part of a global batch (see Share). One process takes the batch as it is."""
    if num_processes == 1:
        return Share(list(batch), len(batch), 0, len(batch))
    start = process_index * batch_size
    own = batch[start:start + batch_size]
    padding = [batch[k % len(batch)] for k in range(batch_size - len(own))]
    return Share(own + padding, len(own), start, len(batch))


@dataclass(frozen=True)
class TrainingPlan:
    """How many batches and steps a run has, known up front from the index alone. Every process
    walks the same global batches (train_batch_size x processes, one shape each)."""

    shapes: list  # the latent shape of every sample (as a number per shape), in sample order
    repeats: np.ndarray | None  # each sample's times per epoch (None: once each)
    global_batch_size: int
    batches_per_epoch: int
    steps_per_epoch: int
    max_train_steps: int

    @classmethod
    def of(cls, cache: Cache, config, processes: int) -> "TrainingPlan":
        shapes = cache.samples.shape_groups  # batches hold one latent shape: a number per shape will do
        repeats = cache.samples.repeats
        global_batch_size = config.train_batch_size * processes
        batches_per_epoch = len(epoch_batches(shapes, global_batch_size, config.seed, 0, repeats))
        steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
        return cls(shapes, repeats, global_batch_size, batches_per_epoch, steps_per_epoch,
                   config.max_train_steps or config.num_train_epochs * steps_per_epoch)

    def batches_from(self, batch_number: int, config, processes: int, process_index: int) -> list[Share]:
        """This process's shares of the batches of the epoch that batch_number falls in, from that
        batch on."""
        epoch, position = divmod(batch_number, self.batches_per_epoch)
        return [rank_share(batch, config.train_batch_size, processes, process_index)
                for batch in epoch_batches(self.shapes, self.global_batch_size, config.seed, epoch,
                                           self.repeats)[position:]]


class LatentDataset(torch.utils.data.Dataset):
    def __init__(self, cache: Cache):
        self.cache = cache

    def __len__(self):
        return len(self.cache.samples)

    def __getitem__(self, index) -> schema.TrainingBatch:
        """One sample, unstacked: the tensors of the cache's TensorSet."""
        row = self.cache.samples[index]
        return schema.TrainingBatch(video=self.cache.video_tensors(row), caption=self.cache.caption_tensors(row),
                                    first_frame=self.cache.first_frame_tensors(row))


collate = schema.TrainingBatch.collate


def open_training_cache(config, data, models: ModelConfigs, spec: ModelFamily) -> tuple[Path, Cache]:
    """The cache this run trains on (saying which, and why), refused before any model is loaded
    when it does not fit the model: another VAE or T5, the other kind of model, another text
    length, no usable samples, damaged shards, clip sizes the family cannot take."""
    training = training_cache(config.data_cache, data, models)
    cache_path = training.path
    logs.message(f"cache: {cache_path.resolve()} ({training.why})")
    cache = Cache.open(cache_path, for_training=True)
    check_for_training(cache.manifest, models.identity(), spec, cache_path)
    if data is not None and data.datasets and not config.data_cache:  # repeats live in the selection
        wanted, written = [table["repeats"] for table in dataset_tables(data)], read_dataset_repeats(cache_path)
        if wanted != written:
            raise CogtuneError(
                f"The [[datasets]] repeats are {wanted}, but the latest `cogtune preprocess` of {cache_path} wrote "
                f"the selection with {written}. Run `cogtune preprocess` again with this config: it encodes nothing "
                "new and records the repeats.")
    if cache.samples.repeats is not None:
        logs.message(f"repeats: {len(cache.samples)} samples, {int(cache.samples.repeats.sum())} per epoch")
    if not len(cache.samples):
        raise CogtuneError(f"The cache {cache_path} holds no usable samples ({cache.failed_count} were skipped).")
    damage = check_samples(cache_path, cache.manifest, cache.samples, checksums=False)  # shard headers: quick
    if not damage.ok:
        raise CogtuneError(f"The cache {cache_path} is damaged:\n" + damage.text(checksums=False))
    for size in sorted(cache.samples.clip_sizes):
        spec.check_clip_size(*size, config.ignore_learned_positional_embeddings)
    return cache_path, cache
