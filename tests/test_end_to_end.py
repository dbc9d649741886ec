"""The real commands on a tiny random model, as a user runs them."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from cogtune import data_schema as schema

from conftest import ASSETS, cogtune, cogtune_here, write_config


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, demo_data):
    """preprocess -> train -> infer through the CLI with one config file."""
    root = tmp_path_factory.mktemp("e2e")
    config = write_config(root / "run.toml", tiny_model, demo_data, root / "cache", root / "out")
    outputs = {stage: cogtune(stage, "--config", config).stdout for stage in ("preprocess", "train", "infer")}
    cache_dir = Path(outputs["preprocess"].split("cache: ")[1].splitlines()[0])
    return dict(root=root, config=config, cache=cache_dir, out=root / "out", **outputs)


def transformer_output(transformer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 3, 4, 4, 8, generator=generator)
    text = torch.randn(1, 32, 32, generator=generator)
    with torch.no_grad():
        return transformer(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([500]),
                           return_dict=False)[0]


def test_preprocess_writes_the_cache(run):
    assert "samples: 4 ok, 0 skipped" in run["preprocess"]
    assert "encoded: 4 videos, 4 captions" in run["preprocess"]
    cache = schema.Cache.open(run["cache"])
    assert len(cache.samples) == 4
    for row in cache.samples:
        assert row["caption"].startswith("DEMO ")
        assert row["num_frames"] == 9 and len(row["frame_indices"]) == 9
        assert row["frame_indices"][:3] == [0, 2, 4]  # 16 fps demo clips resampled to 8 fps
        assert row["latent_shape"] == [4, 3, 4, 8]  # C, (9-1)/4+1 frames, 32/8, 64/8
        mean, logvar = cache.latent_moments(row)
        assert mean.shape == (4, 3, 4, 8) and logvar.shape == mean.shape and mean.dtype == torch.float32
        assert cache.prompt_embeds(row).shape == (32, 32)  # max_text_seq_length x T5 width


def test_second_preprocess_encodes_nothing(run):
    shards_before = sorted((run["cache"] / schema.SHARDS_DIR).iterdir())
    again = cogtune_here("preprocess", "--config", run["config"]).stdout
    assert "encoded: 0 videos, 0 captions; reused from the cache: 4 videos, 4 captions" in again
    assert sorted((run["cache"] / schema.SHARDS_DIR).iterdir()) == shards_before


def test_changed_caption_encodes_only_that_caption(tmp_path, tiny_model, demo_data):
    data = shutil.copytree(demo_data, tmp_path / "data")
    config = write_config(tmp_path / "c.toml", tiny_model, data, tmp_path / "cache", tmp_path / "out")
    cogtune_here("preprocess", "--config", config)
    prompts = (data / "prompts.txt").read_text().splitlines()
    prompts[1] = "a completely new caption"
    (data / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = cogtune_here("preprocess", "--config", config).stdout
    assert "encoded: 0 videos, 1 captions" in out
    cache_dir = Path(out.split("cache: ")[1].splitlines()[0])
    captions = sorted(row["caption"] for row in schema.Cache.open(cache_dir).samples)
    assert "DEMO a completely new caption" in captions and len(captions) == 4


def test_train_writes_lora_checkpoints_and_log(run):
    out = run["out"]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["grad_norm"] is not None for r in log)
    from safetensors import safe_open

    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert {k.split(".")[-3] for k in keys if "lora_A" in k} == {"to_q", "to_k", "to_v", "0"}
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 2


def test_infer_writes_a_video(run):
    path = Path(run["infer"].split("video: ")[1].strip())
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 64, 3)


def test_first_step_loss_matches_an_independent_computation(run, tiny_model):
    """The logged loss of step 1 equals DESIGN.md's formula computed here from the cache with the
    base transformer (LoRA B matrices start at zero) and the scheduler's own operations."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    from cogtune.train.data import batch_generator, epoch_batches

    cache = schema.Cache.open(run["cache"])
    shapes = [tuple(r["latent_shape"]) for r in cache.samples]
    batch = [cache.samples[i] for i in epoch_batches(shapes, 2, 42, 0)[0]]
    mean = torch.stack([cache.latent_moments(r)[0] for r in batch])
    logvar = torch.stack([cache.latent_moments(r)[1] for r in batch])
    text = torch.stack([cache.prompt_embeds(r) for r in batch])
    generator = batch_generator(42, 0)
    posterior = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
    x0 = (posterior * 1.15258426).permute(0, 2, 1, 3, 4)
    timesteps = torch.randint(0, 1000, (2,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)

    scheduler = CogVideoXDDIMScheduler.from_pretrained(tiny_model, subfolder="scheduler")
    transformer = CogVideoXTransformer3DModel.from_pretrained(tiny_model, subfolder="transformer")
    x_t = scheduler.add_noise(x0, noise, timesteps)
    with torch.no_grad():
        pred = transformer(hidden_states=x_t, encoder_hidden_states=text, timestep=timesteps, return_dict=False)[0]
    x0_hat = scheduler.get_velocity(pred, x_t, timesteps)
    weights = 1 / (1 - scheduler.alphas_cumprod[timesteps])
    expected = torch.stack([(weights[b] * (x0_hat[b] - x0[b]) ** 2).mean() for b in range(2)]).mean()

    logged = json.loads((run["out"] / "train_log.jsonl").read_text().splitlines()[0])["loss"]
    assert logged == pytest.approx(expected.item(), rel=1e-4)


def test_training_creates_no_encoders_and_the_saved_lora_reproduces_the_model(tmp_path, tiny_model, run,
                                                                                monkeypatch):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline
    from transformers import T5EncoderModel

    from cogtune import train
    from cogtune.config import data_settings, load_config

    created = []
    for cls in (T5EncoderModel, AutoencoderKLCogVideoX):
        original = cls.__init__

        def recording_init(self, *args, _original=original, _name=cls.__name__, **kwargs):
            created.append(_name)
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", recording_init)
    argv = ["--config", str(run["config"]), "--output_dir", str(tmp_path / "out")]
    config = load_config("train", argv)
    result = train.run(config, data_settings(config, argv))
    assert created == []
    monkeypatch.undo()

    pipe = CogVideoXPipeline.from_pretrained(tiny_model)
    base = transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path / "out"), weight_name="pytorch_lora_weights.safetensors")  # no set_adapters
    loaded = transformer_output(pipe.transformer)
    trained = transformer_output(result.transformer.to(torch.float32).eval())
    assert not torch.allclose(base, loaded, atol=1e-4)  # the LoRA changes the output
    assert torch.allclose(loaded, trained, atol=1e-5)  # exactly as the trained model does


def test_rope_model_trains_and_matches_the_pipeline_rope(tmp_path, tiny_model_5b, demo_data):
    """A 5b-style (RoPE) tiny model: our rotary embeddings equal the pipeline's, and training runs."""
    from diffusers import CogVideoXPipeline

    from cogtune.families import ModelConfigs

    spec = ModelConfigs.load(str(tiny_model_5b)).spec()
    pipe = CogVideoXPipeline.from_pretrained(tiny_model_5b)
    for height, width in ((32, 64), (32, 48), (48, 32)):
        ours = spec.rotary_embeddings(height, width, 3, torch.device("cpu"))
        theirs = pipe._prepare_rotary_positional_embeddings(height, width, 3, torch.device("cpu"))
        assert all(torch.allclose(a, b) for a, b in zip(ours, theirs))
    config = write_config(tmp_path / "c.toml", tiny_model_5b, demo_data, tmp_path / "cache", tmp_path / "out")
    cogtune_here("preprocess", "--config", config)
    cogtune_here("train", "--config", config)
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_cache_of_another_model_is_refused(run, tiny_model_5b, tmp_path):
    result = cogtune_here("train", "--config", run["config"], "--pretrained_model_name_or_path", tiny_model_5b,
                     "--data_cache", run["cache"], "--output_dir", tmp_path, check=False)
    assert result.returncode == 2 and "built for another model" in result.stderr
    assert "Traceback" not in result.stderr


def test_real_clips_are_encoded_or_skipped_with_a_reason(tmp_path, tiny_model):
    data = tmp_path / "data"
    shutil.copytree(ASSETS / "videos", data)
    (data / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    names = sorted(p.name for p in data.iterdir() if p.suffix in (".mp4", ".webm"))
    (data / "metadata.csv").write_text("caption,video\n" + "".join(f"clip {n},{n}\n" for n in names))
    config = write_config(tmp_path / "c.toml", tiny_model, data, tmp_path / "cache", tmp_path / "out",
                          dataset_name=str(data / "metadata.csv"), caption_column="caption", video_column="video",
                          fps=24)
    out = cogtune_here("preprocess", "--config", config).stdout
    cache = schema.Cache.open(Path(out.split("cache: ")[1].splitlines()[0]))
    kept = {Path(r["source_path"]).name: r for r in cache.samples}
    skipped = {Path(r["source_path"]).name: r["reason"] for r in cache.failed}
    assert set(kept) | set(skipped) == set(names)
    assert "broken.mp4" in skipped and "cannot open video" in skipped["broken.mp4"]
    portrait = kept["sample_portrait.mp4"]
    assert (portrait["source_height"], portrait["source_width"]) == (1080, 720)
    assert len(kept) >= 3


def test_accumulated_step_logs_the_mean_of_its_micro_batches(run, tmp_path):
    """With the learning rate at zero the weights never move, so one step over two accumulated
    micro-batches must log the mean of the two single-batch steps that see the same batches."""
    common = ["--config", run["config"], "--learning_rate", "0", "--train_batch_size", "1",
              "--checkpointing_steps", "100"]
    cogtune_here("train", *common, "--output_dir", tmp_path / "a", "--max_train_steps", "2")
    cogtune_here("train", *common, "--output_dir", tmp_path / "b", "--max_train_steps", "1",
            "--gradient_accumulation_steps", "2")
    single = [json.loads(line)["loss"] for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    (accumulated,) = [json.loads(line)["loss"] for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert accumulated == pytest.approx(sum(single) / 2, rel=1e-5)
