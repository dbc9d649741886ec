"""The cache is content-addressed: a clip's, a caption's, a first frame's and a validation prompt's
tensors are bytes that depend on that content and the encoder alone, never on what was encoded
beside them (the batch, --vae_batch_size, the rest of the dataset)."""

import shutil

import numpy as np
from PIL import Image
from safetensors import safe_open

from cogtune import data_schema as schema

from conftest import cache_path_of, cogtune_here, write_config


def stored(cache):
    """Every tensor of a cache, by key, as raw bytes: the shards' and the validation files'."""
    tensors = {}
    for path in [*schema.shard_paths(cache), *sorted((cache / schema.VALIDATION_INPUTS_DIR).glob("*.safetensors"))]:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                name = key if path.parent.name == schema.SHARDS_DIR else f"{path.name}:{key}"
                tensors[name] = f.get_tensor(key).numpy().tobytes()
    return tensors


def test_every_encoding_gives_the_same_bytes_alone_and_among_others(tmp_path, tiny_models, demo_data):
    model = tiny_models("5b-i2v")
    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(image)
    one = tmp_path / "one"  # the third clip and its caption, alone
    (one / "videos").mkdir(parents=True)
    shutil.copy(demo_data / "videos" / "00002.mp4", one / "videos")
    (one / "videos.txt").write_text("videos/00002.mp4\n")
    (one / "prompts.txt").write_text((demo_data / "prompts.txt").read_text().splitlines()[2] + "\n")

    def preprocess(name, data, prompts, **settings):
        config = write_config(tmp_path / f"{name}.toml", model, data, tmp_path / name, tmp_path / "out",
                              image_noise_variants=2, validation_prompt=":::".join(prompts),
                              validation_images=":::".join([str(image)] * len(prompts)), **settings)
        return stored(cache_path_of(cogtune_here("preprocess", "--config", config).stdout))

    together = preprocess("together", demo_data, ["DEMO one", "DEMO two"], vae_batch_size=1)
    batched = preprocess("batched", demo_data, ["DEMO two", "DEMO one"], vae_batch_size=3)
    alone = preprocess("alone", one, ["DEMO two"], vae_batch_size=2)
    kinds = {key.split("/")[0].split("-")[0] for key in together}
    assert kinds == {"latents", "images", "text", "image"}, kinds  # clips, first frames, captions, validation inputs
    assert sum(key.startswith("images/") for key in together) == 4 * 2 * 2  # 4 videos, 2 variants, mean and logvar
    assert len(together) == len(batched) and len(alone) < len(together)
    assert all(together[key] == batched[key] for key in together), \
        [key for key in together if together[key] != batched[key]]
    assert all(together[key] == alone[key] for key in alone), [key for key in alone if together[key] != alone[key]]
