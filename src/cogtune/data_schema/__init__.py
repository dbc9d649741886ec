"""The cache contract between `preprocess` and `train`: the only module that knows file names,
tensor keys, Parquet columns, the format version, and the typed manifest and index rows.
`cache.writer` writes this format, `cache.reader` reads it, `cache.identity` names and finds a cache.

    layout.py     names, keys and paths; the tensor set a family declares
    rows.py       the index's columns and typed rows; the training batch
    manifest.py   manifest.json, and reading caches of format version 5

A cache is one folder, named after what it holds, under a cache root:

    <cache_root>/<model>_<dataset>_<H>x<W>_<F>f_<fps>fps_<crop>_<fingerprint>/
        manifest.json           format version, model identity, every setting that changes tensors
        shards/<part>.safetensors   tensors; append-only, each written to a temp name, fsynced, renamed;
                                    the header holds the sha256 of every tensor (`cogtune cache verify`)
        index/<part>.parquet    one row per sample whose tensors live in the shard of the same name
        selection.parquet       the sample ids of the last finished preprocess run: what train reads
        validation/             validation prompts' T5 embeddings (`text-<caption_key>.safetensors`,
                                the empty negative prompt included) and, for image-to-video, the VAE
                                moments of validation images (`image-<sha>-<H>x<W>.safetensors`)
        .lock                   held shared by writers, exclusively by `cogtune cache prune`

Tensors are keyed by content, so nothing is encoded twice, and named by their role: the model's
family declares which tensors it stores (`TensorSet`, recorded in the manifest). Per video (by the
hash of the video file) `latents/<video_key>/<name>` (CogVideoX: the VAE posterior's mean and
logvar); per caption (by the hash of its text) `text/<caption_key>/<name>` (CogVideoX: the T5
`prompt_embeds`). Image-to-video caches also hold, per video, `--image_noise_variants` encodings of
its noised first frame (`images/<video_key>/<k>/<name>`, in the shard of the video's latents, their
sigmas in the index). Every shard's header names its cache (fingerprint) and the model family. Index parts are written after their shard, so a
run killed at any moment loses at most the shard in progress and no reader ever sees half a file.
Several writers (ranks) can add parts to one cache at once: they share its lock.

Two caches are the same when their fingerprints are: a hash of the format version, the model
identity (id or path, revision, variant, component config hashes), the dataset source and every
setting that changes the tensors. Anything else gets its own folder, never a silent mix.
"""

from cogtune.data_schema.layout import (CHECKSUMS_METADATA, DTYPES, FAMILY_METADATA, FINGERPRINTS_FILE, FINGERPRINT_METADATA, FORMAT_VERSION, INDEX_DIR, LEGACY_IMAGE_TENSORS, LEGACY_TENSORS, LEGACY_VERSION, LOCK_FILE, MANIFEST_FILE, SAFETENSORS_DTYPES, SELECTION_FILE, SHARDS_DIR, SHARD_NAME, TensorSet, VALIDATION_INPUTS_DIR, caption_key, caption_tensor_key, caption_tensor_keys, clip_source, first_frame_tensor_key, index_part_path, sample_id, sha256_tensor, shard_path, shard_paths, valid_shard_name, validation_image_path, validation_text_path, video_key, video_tensor_key, video_tensor_keys, window_key, window_source, window_start)
from cogtune.data_schema.rows import (DATASET_REPEATS_KEY, FINGERPRINTS_SCHEMA, INDEX_SCHEMA, IndexRow, SELECTION_SCHEMA, STATUS_FAILED, STATUS_OK, SampleSource, TrainingBatch, VideoLatent, failed_row, ok_row, sample_tensors)
from cogtune.data_schema.manifest import (CacheDataset, CacheModel, CacheSettings, LEGACY_COMPONENTS, LEGACY_FAMILY, Manifest, WEIGHTS_DIGEST, describe_differences, legacy_identity_json, upgraded_legacy_json)

__all__ = ['CHECKSUMS_METADATA', 'CacheDataset', 'CacheModel', 'CacheSettings', 'DATASET_REPEATS_KEY', 'DTYPES', 'FAMILY_METADATA', 'FINGERPRINTS_FILE', 'FINGERPRINTS_SCHEMA', 'FINGERPRINT_METADATA', 'FORMAT_VERSION', 'INDEX_DIR', 'INDEX_SCHEMA', 'IndexRow', 'LEGACY_COMPONENTS', 'LEGACY_FAMILY', 'LEGACY_IMAGE_TENSORS', 'LEGACY_TENSORS', 'LEGACY_VERSION', 'LOCK_FILE', 'MANIFEST_FILE', 'Manifest', 'SAFETENSORS_DTYPES', 'SELECTION_FILE', 'SELECTION_SCHEMA', 'SHARDS_DIR', 'SHARD_NAME', 'STATUS_FAILED', 'STATUS_OK', 'SampleSource', 'TensorSet', 'TrainingBatch', 'VALIDATION_INPUTS_DIR', 'VideoLatent', 'WEIGHTS_DIGEST', 'caption_key', 'caption_tensor_key', 'caption_tensor_keys', 'clip_source', 'describe_differences', 'failed_row', 'first_frame_tensor_key', 'index_part_path', 'legacy_identity_json', 'ok_row', 'sample_id', 'sample_tensors', 'sha256_tensor', 'shard_path', 'shard_paths', 'upgraded_legacy_json', 'valid_shard_name', 'validation_image_path', 'validation_text_path', 'video_key', 'video_tensor_key', 'video_tensor_keys', 'window_key', 'window_source', 'window_start']
