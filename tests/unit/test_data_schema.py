import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from cogtune import data_schema as schema
from cogtune.cache.identity import CacheIdentity, find_cache
from cogtune.cache.compat import check_compatible
from cogtune.cache.reader import Cache
from cogtune.cache.writer import CacheWriter
from cogtune.errors import CogtuneError
from cogtune.util import files

MODEL = schema.CacheModel(pretrained_model_name_or_path="/models/a", revision=None, variant=None, family="CogVideoX",
                          description="CogVideoX 1.0 text-to-video", components={"vae": "v1", "text_encoder": "t1"})
TENSORS = schema.TensorSet(caption=("prompt_embeds",), video=("mean", "logvar"))
DATASET = schema.CacheDataset(instance_data_root="/data", dataset_name=None, dataset_config_name=None,
                              caption_column="prompts.txt", video_column="videos.txt", id_token=None)
SETTINGS = dict(height=32, width=48, fps=8, max_num_frames=9, skip_frames_start=0, skip_frames_end=0,
                video_reshape_mode="center", latent_dtype="fp32", mixed_precision="no", enable_tiling=False,
                buckets=None, text_length=16, image_noise_variants=0)


def identity(**changes):
    return CacheIdentity(model=MODEL, dataset=DATASET, settings=schema.CacheSettings(**dict(SETTINGS, **changes)),
                         tensors=TENSORS)


def write_sample(writer, sha, caption, latent=None, text=None):
    latent = torch.randn(4, 3, 4, 6) if latent is None else latent
    text = torch.randn(16, 32) if text is None else text
    shard = writer.add_tensor(schema.video_tensor_key(schema.video_key(sha), "mean"), latent)
    writer.add_tensor(schema.video_tensor_key(schema.video_key(sha), "logvar"), -latent.abs())
    text_shard = writer.add_tensor(schema.caption_tensor_key(schema.caption_key(caption), "prompt_embeds"), text)
    source = schema.SampleSource(schema.sample_id(sha, caption), "/x.mp4", 1, 1, sha, caption)
    video = schema.VideoLatent(frame_indices=list(range(9)), source_fps=8.0, source_height=32, source_width=48,
                               num_frames=9, height=32, width=48, bucket="9x32x48", decoder="pyav",
                               latent_shape=list(latent.shape), latent_shard=shard, latent_key=schema.video_key(sha),
                               image_noise_sigmas=[])
    row = schema.ok_row(source, video, text_shard)
    writer.add_row(row)
    return row, latent, text


def test_round_trip(tmp_path):
    cache_dir = tmp_path / identity().name
    writer = CacheWriter(cache_dir, identity().manifest(), shard_size_mb=0.0001)  # a shard per flush
    row_a, latent_a, text_a = write_sample(writer, "a" * 64, "first")
    writer.flush()
    row_b, latent_b, text_b = write_sample(writer, "b" * 64, "second 猫")
    writer.write_selection([row_a.sample_id, row_b.sample_id])
    assert len(list((cache_dir / schema.SHARDS_DIR).glob("*.safetensors"))) == 2

    cache = Cache.open(cache_dir)
    assert [r.caption for r in cache.samples] == ["first", "second 猫"]
    video = cache.video_tensors(cache.samples[1])
    assert torch.equal(video["mean"], latent_b) and torch.equal(video["logvar"], -latent_b.abs())
    assert torch.equal(cache.caption_tensors(cache.samples[0])["prompt_embeds"], text_a)
    assert cache.manifest == identity().manifest()
    for shard in schema.shard_paths(cache_dir):  # every shard names its cache and family
        with safe_open(str(shard), "pt") as f:
            metadata = f.metadata()
        assert metadata[schema.FINGERPRINT_METADATA] == identity().fingerprint
        assert metadata[schema.FAMILY_METADATA] == "CogVideoX"
    assert cache.samples[0] == row_a  # every column read back as written
    assert json.loads((cache_dir / schema.MANIFEST_FILE).read_text())["settings"] == SETTINGS  # no seed: not random


def test_selection_decides_what_is_read(tmp_path):
    writer = CacheWriter(tmp_path / "c", identity().manifest(), 1.0)
    row_a, *_ = write_sample(writer, "a" * 64, "old caption")
    row_b, *_ = write_sample(writer, "a" * 64, "new caption")
    writer.write_selection([row_b.sample_id])
    assert [r.caption for r in Cache.open(tmp_path / "c").samples] == ["new caption"]


def test_unfinished_cache_is_refused(tmp_path):
    writer = CacheWriter(tmp_path / "c", identity().manifest(), 1.0)
    write_sample(writer, "a" * 64, "x")
    writer.flush()
    with pytest.raises(CogtuneError, match="did not finish"):
        Cache.open(tmp_path / "c")


def test_other_format_version_is_refused(tmp_path):
    writer = CacheWriter(tmp_path / "c", identity().manifest(), 1.0)
    writer.write_selection([])
    manifest = json.loads((tmp_path / "c" / schema.MANIFEST_FILE).read_text())
    manifest["format_version"] = schema.FORMAT_VERSION + 1
    (tmp_path / "c" / schema.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CogtuneError, match=f"format version {schema.FORMAT_VERSION + 1}"):
        Cache.open(tmp_path / "c")


def test_writer_refuses_a_folder_with_other_settings(tmp_path):
    CacheWriter(tmp_path / "c", identity().manifest(), 1.0)
    with pytest.raises(CogtuneError, match="settings.height: cache has 32, expected 64"):
        CacheWriter(tmp_path / "c", identity(height=64).manifest(), 1.0)


def test_cache_of_another_model_is_refused(tmp_path):
    model = dataclasses.asdict(MODEL)
    with pytest.raises(CogtuneError, match="built for another model"):
        check_compatible(identity().manifest(), dict(model, components={"vae": "v2", "text_encoder": "t1"}), tmp_path)
    check_compatible(identity().manifest(), model, tmp_path)  # the same model passes


def test_settings_change_the_name_and_fingerprint():
    names = {identity().name, identity(height=64).name, identity(fps=16).name, identity(max_num_frames=49).name}
    assert len(names) == 4
    assert identity().name == identity().name
    assert identity().name.startswith("a_data_32x48_9f_8fps_center_")


def test_find_cache_lists_the_others(tmp_path):
    CacheWriter(tmp_path / identity().name, identity().manifest(), 1.0)
    assert find_cache(tmp_path, identity()) == tmp_path / identity().name
    with pytest.raises(CogtuneError, match=identity().name):
        find_cache(tmp_path, identity(height=64))


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "file.bin"

    def failing(temp):
        open(temp, "wb").write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        files.atomic_write(target, failing)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_index_rows_have_exactly_the_index_columns():
    assert [f.name for f in dataclasses.fields(schema.IndexRow)] == schema.INDEX_SCHEMA.names
    video_columns = {f.name for f in dataclasses.fields(schema.VideoLatent)}
    source_columns = {f.name for f in dataclasses.fields(schema.SampleSource)}
    assert video_columns | source_columns <= set(schema.INDEX_SCHEMA.names) and not video_columns & source_columns


def test_failed_row_keeps_the_source_and_no_tensors():
    source = schema.SampleSource("s" * 32, "/a.mp4", 5, 7, "a" * 64, "a cat")
    row = schema.failed_row(source, "too short", "videos.txt line 3: 4 frames")
    assert not row.ok and row.failure_kind == "too short" and row.reason == "videos.txt line 3: 4 frames"
    assert (row.source_path, row.source_size, row.caption_sha256) == ("/a.mp4", 5, files.sha256_text("a cat"))
    assert row.latent_shard is None and row.text_shard is None and row.image_noise_sigmas == []


def test_a_manifest_of_another_shape_is_refused():
    data = identity().manifest().to_json()
    del data["settings"]["fps"]
    with pytest.raises(CogtuneError, match="does not describe a cache"):
        schema.Manifest.from_json(data, "/cache")
    assert schema.Manifest.from_json(identity().manifest().to_json(), "/cache") == identity().manifest()


def test_a_shard_of_another_cache_is_refused(tmp_path):
    """A shard copied in from another cache (its header names that cache) is not read as this one's."""
    from safetensors.torch import load_file, save_file

    writer = CacheWriter(tmp_path / "c", identity().manifest(), 1.0)
    row, _, _ = write_sample(writer, "a" * 64, "first")
    writer.write_selection([row.sample_id])
    shard = schema.shard_path(tmp_path / "c", row.latent_shard)
    with safe_open(str(shard), "pt") as f:
        metadata = dict(f.metadata())
    save_file(load_file(shard), str(shard), metadata=dict(metadata, **{schema.FINGERPRINT_METADATA: identity(
        height=64).fingerprint}))
    cache = Cache.open(tmp_path / "c")
    with pytest.raises(CogtuneError, match="belongs to another cache"):
        cache.video_tensors(cache.samples[0])
