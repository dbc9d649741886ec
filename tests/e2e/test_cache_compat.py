"""Caches on users' disks keep working: a cache of format version 5 (the release before the family
interface) is read as version 6, found under the name version 5 gave it, added to as it is, and
trained on without encoding anything again.

Version 5 is pinned here, independently of the package: how it named a cache (`v5_fingerprint`)
and what it wrote (`as_version_5`). The stored manifests under assets/cache-v5 were written by that
release and check the pinned copy."""

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from cogtune import data_schema as schema
from cogtune.util.files import sha256_text

from conftest import ASSETS, cache_path_of, cogtune_here, write_config

STORED = sorted((ASSETS / "cache-v5").glob("manifest-*.json"))


def v5_fingerprint(manifest: dict) -> str:
    """Version 5's cache fingerprint: the hash of its format version, model (less the weights
    digest), dataset and settings, as cache/identity.py computed it in that release."""
    payload = {"format_version": 5, **{key: json.loads(json.dumps(manifest[key])) for key in ("model", "dataset",
                                                                                               "settings")}}
    payload["model"].pop("weights_sha256", None)
    return sha256_text(json.dumps(payload, sort_keys=True))[:12]


def v5_json(v6: dict) -> dict:
    """A version 6 manifest or preprocess record (model, dataset, settings) as version 5 wrote it."""
    model, settings = v6["model"], dict(v6["settings"])
    settings["max_text_seq_length"] = settings.pop("text_length")
    return {**{k: v for k, v in v6.items() if k not in ("model", "settings", "tensors")},
            "model": {"pretrained_model_name_or_path": model["pretrained_model_name_or_path"],
                      "revision": model["revision"], "variant": model["variant"], "family": model["description"],
                      "vae_config_sha256": model["components"]["vae"],
                      "text_encoder_config_sha256": model["components"]["text_encoder"],
                      "weights_sha256": model["weights_sha256"]},
            "settings": settings}


def as_version_5(cache: Path) -> Path:
    """The cache rewritten as version 5 would have written it: its manifest, its name, its shards'
    headers (no stamps) and its config's preprocess record. The tensors are not touched."""
    manifest = v5_json(json.loads((cache / schema.MANIFEST_FILE).read_text()))
    manifest.update(format_version=5, fingerprint=v5_fingerprint(manifest))
    old = cache.with_name(re.sub(r"_[0-9a-f]{12}$", f"_{manifest['fingerprint']}", cache.name))
    cache.rename(old)
    (old / schema.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    for shard in schema.shard_paths(old):
        with safe_open(str(shard), "pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        save_file(tensors, str(shard), metadata={"format_version": "5",
                                                 schema.CHECKSUMS_METADATA: metadata[schema.CHECKSUMS_METADATA]})
    for record_path in (old.parent / ".latest-preprocess").glob("*.json"):
        record = json.loads(record_path.read_text())
        record_path.write_text(json.dumps({**v5_json(record), "cache": old.name}, indent=2))
    return old


@pytest.mark.parametrize("stored", STORED, ids=lambda path: path.stem)
def test_a_version_5_manifest_reads_as_version_6_and_keeps_its_name(stored):
    data = json.loads(stored.read_text())
    assert v5_fingerprint(data) == data["fingerprint"]  # the pinned copy is that release's
    manifest = schema.Manifest.from_json(data, str(stored))
    assert manifest.format_version == 5 and manifest.fingerprint == data["fingerprint"]
    assert manifest.model.family == "CogVideoX" and manifest.model.description == data["model"]["family"]
    assert manifest.model.components == {"vae": data["model"]["vae_config_sha256"],
                                         "text_encoder": data["model"]["text_encoder_config_sha256"]}
    assert manifest.settings.text_length == data["settings"]["max_text_seq_length"]
    image = data["settings"]["image_noise_variants"] > 0
    assert manifest.tensors == schema.TensorSet(("prompt_embeds",), ("mean", "logvar"), ("mean", "logvar") if image else ())
    legacy = schema.legacy_identity_json(manifest.identity_json())  # what names it, as version 5 computed it
    assert sha256_text(json.dumps(legacy, sort_keys=True))[:12] == data["fingerprint"]


def test_a_version_5_cache_is_found_trained_on_and_never_encoded_again(tmp_path, tiny_model, demo_data):
    config = write_config(tmp_path / "c.toml", tiny_model, demo_data, tmp_path / "cache", tmp_path / "out",
                          max_train_steps=2, validation_prompt="DEMO a red square moves", validation_steps=100)
    new = cache_path_of(cogtune_here("preprocess", "--config", config).stdout)
    cogtune_here("train", "--config", config, "--output_dir", tmp_path / "on-6")
    old = as_version_5(new)
    shards = sorted(schema.shard_paths(old))

    again = cogtune_here("preprocess", "--config", config)
    assert cache_path_of(again.stdout) == old, again.stdout  # its own folder, by the name version 5 gave it
    assert sorted(p.name for p in old.parent.iterdir() if not p.name.startswith(".")) == [old.name]
    assert sorted(schema.shard_paths(old)) == shards  # nothing encoded
    assert json.loads((old / schema.MANIFEST_FILE).read_text())["format_version"] == 5  # left as it is

    trained = cogtune_here("train", "--config", config, "--output_dir", tmp_path / "on-5")
    assert f"cache: {old} " in trained.stdout + trained.stderr
    losses = [[json.loads(line)["loss"] for line in (tmp_path / out / "train_log.jsonl").read_text().splitlines()]
              for out in ("on-6", "on-5")]
    assert losses[0] == losses[1]
    lora = [(tmp_path / out / "pytorch_lora_weights.safetensors").read_bytes() for out in ("on-6", "on-5")]
    assert lora[0] == lora[1]
