import json

import pytest
import torch

from cogtune import data_schema as schema
from cogtune.errors import CogtuneError
from cogtune.util import files

MODEL = {"pretrained_model_name_or_path": "/models/a", "revision": None, "variant": None,
         "vae_config_sha256": "v1", "text_encoder_config_sha256": "t1"}
DATASET = {"instance_data_root": "/data", "dataset_name": None, "caption_column": "prompts.txt",
           "video_column": "videos.txt", "id_token": None}
SETTINGS = {"height": 32, "width": 48, "fps": 8, "max_num_frames": 9, "video_reshape_mode": "center",
            "max_text_seq_length": 16}


def identity(**changes):
    settings = dict(SETTINGS, **changes)
    return schema.CacheIdentity(model=MODEL, dataset=DATASET, settings=settings)


def write_sample(writer, sha, caption, latent=None, text=None):
    latent = torch.randn(4, 3, 4, 6) if latent is None else latent
    text = torch.randn(16, 32) if text is None else text
    mean_key, logvar_key = schema.latent_tensor_keys(schema.video_key(sha))
    shard = writer.add_tensor(mean_key, latent)
    writer.add_tensor(logvar_key, -latent.abs())
    text_key = schema.caption_key(caption)
    text_shard = writer.add_tensor(schema.text_tensor_key(text_key), text)
    row = schema.row_template()
    row.update(sample_id=schema.sample_id(sha, caption), status=schema.STATUS_OK, reason="", source_path="/x.mp4",
               source_size=1, source_mtime_ns=1, source_sha256=sha, caption=caption,
               caption_sha256=files.sha256_text(caption), frame_indices=list(range(9)), source_fps=8.0,
               source_height=32, source_width=48, num_frames=9, height=32, width=48,
               latent_shape=list(latent.shape), latent_shard=shard, latent_key=schema.video_key(sha),
               text_shard=text_shard, text_key=text_key)
    writer.add_row(row)
    return row, latent, text


def test_round_trip(tmp_path):
    cache_dir = tmp_path / identity().name
    writer = schema.CacheWriter(cache_dir, identity(), shard_size_mb=0.0001)  # a shard per flush
    row_a, latent_a, text_a = write_sample(writer, "a" * 64, "first")
    writer.flush()
    row_b, latent_b, text_b = write_sample(writer, "b" * 64, "second 猫")
    writer.write_selection([row_a["sample_id"], row_b["sample_id"]])
    assert len(list((cache_dir / schema.SHARDS_DIR).glob("*.safetensors"))) == 2

    cache = schema.Cache.open(cache_dir)
    assert [r["caption"] for r in cache.samples] == ["first", "second 猫"]
    mean, logvar = cache.latent_moments(cache.samples[1])
    assert torch.equal(mean, latent_b) and torch.equal(logvar, -latent_b.abs())
    assert torch.equal(cache.prompt_embeds(cache.samples[0]), text_a)
    assert cache.manifest["format_version"] == schema.FORMAT_VERSION
    assert cache.manifest["settings"] == SETTINGS


def test_selection_decides_what_is_read(tmp_path):
    writer = schema.CacheWriter(tmp_path / "c", identity(), 1.0)
    row_a, *_ = write_sample(writer, "a" * 64, "old caption")
    row_b, *_ = write_sample(writer, "a" * 64, "new caption")
    writer.write_selection([row_b["sample_id"]])
    assert [r["caption"] for r in schema.Cache.open(tmp_path / "c").samples] == ["new caption"]


def test_unfinished_cache_is_refused(tmp_path):
    writer = schema.CacheWriter(tmp_path / "c", identity(), 1.0)
    write_sample(writer, "a" * 64, "x")
    writer.flush()
    with pytest.raises(CogtuneError, match="did not finish"):
        schema.Cache.open(tmp_path / "c")


def test_other_format_version_is_refused(tmp_path):
    writer = schema.CacheWriter(tmp_path / "c", identity(), 1.0)
    writer.write_selection([])
    manifest = json.loads((tmp_path / "c" / schema.MANIFEST_FILE).read_text())
    manifest["format_version"] = schema.FORMAT_VERSION + 1
    (tmp_path / "c" / schema.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CogtuneError, match=f"format version {schema.FORMAT_VERSION + 1}"):
        schema.Cache.open(tmp_path / "c")


def test_writer_refuses_a_folder_with_other_settings(tmp_path):
    schema.CacheWriter(tmp_path / "c", identity(), 1.0)
    with pytest.raises(CogtuneError, match="settings.height: cache has 32, expected 64"):
        schema.CacheWriter(tmp_path / "c", identity(height=64), 1.0)


def test_cache_of_another_model_is_refused(tmp_path):
    other = dict(MODEL, vae_config_sha256="v2")
    with pytest.raises(CogtuneError, match="built for another model"):
        schema.check_compatible(schema.manifest_for(identity()), other, tmp_path)
    schema.check_compatible(schema.manifest_for(identity()), MODEL, tmp_path)  # the same model passes


def test_settings_change_the_name_and_fingerprint():
    names = {identity().name, identity(height=64).name, identity(fps=16).name, identity(max_num_frames=49).name}
    assert len(names) == 4
    assert identity().name == identity().name
    assert identity().name.startswith("a_data_32x48_9f_8fps_center_")


def test_find_cache_lists_the_others(tmp_path):
    schema.CacheWriter(tmp_path / identity().name, identity(), 1.0)
    assert schema.find_cache(tmp_path, identity()) == tmp_path / identity().name
    with pytest.raises(CogtuneError, match=identity().name):
        schema.find_cache(tmp_path, identity(height=64))


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "file.bin"

    def failing(temp):
        open(temp, "wb").write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        files.atomic_write(target, failing)
    assert not target.exists() and list(tmp_path.iterdir()) == []
