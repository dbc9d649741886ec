"""The real commands on a tiny random model, as a user runs them."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from cogtune import data_schema as schema
from cogtune.cache.reader import Cache

from conftest import ASSETS, cache_path_of, cogtune, cogtune_here, write_config


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, demo_data):
    """preprocess -> train -> infer through the CLI with one config file."""
    root = tmp_path_factory.mktemp("e2e")
    config = write_config(root / "run.toml", tiny_model, demo_data, root / "cache", root / "out")
    # train as its own process (the console command); preprocess and infer in this one (their own
    # processes are run by the demo, the batch-job and the preemption tests)
    outputs = {stage: (cogtune if stage == "train" else cogtune_here)(stage, "--config", config).stdout
               for stage in ("preprocess", "train", "infer")}
    cache_dir = cache_path_of(outputs["preprocess"])
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
    # Each stage's figures: its items, and no GPU peak on a CPU.
    stages = [line for line in run["preprocess"].splitlines() if line.startswith(("T5: ", "VAE: "))]
    assert [line.split(" in ")[0] for line in stages] == ["T5: 4 captions", "VAE: 4 clips"], stages
    assert all("clips/s)" in line or "captions/s)" in line for line in stages), stages
    cache = Cache.open(run["cache"])
    assert len(cache.samples) == 4
    for row in cache.samples:
        assert row.caption.startswith("DEMO ")
        assert row.num_frames == 9 and len(row.frame_indices) == 9
        assert row.frame_indices[:3] == [0, 2, 4]  # 16 fps demo clips resampled to 8 fps
        assert row.latent_shape == [4, 3, 4, 8]  # C, (9-1)/4+1 frames, 32/8, 64/8
        video = cache.video_tensors(row)
        assert set(video) == {"mean", "logvar"}
        assert video["mean"].shape == (4, 3, 4, 8) and video["logvar"].shape == video["mean"].shape
        assert video["mean"].dtype == torch.float32
        assert cache.caption_tensors(row)["prompt_embeds"].shape == (32, 32)  # max_text_seq_length x T5 width


def test_second_preprocess_encodes_nothing(run):
    shards_before = sorted((run["cache"] / schema.SHARDS_DIR).iterdir())
    again = cogtune_here("preprocess", "--config", run["config"]).stdout
    assert "encoded: 0 videos, 0 captions; reused from the cache: 4 videos, 4 captions" in again
    assert "T5: " not in again and "VAE: " not in again  # no stage ran
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
    cache_dir = cache_path_of(out)
    captions = sorted(row.caption for row in Cache.open(cache_dir).samples)
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
    cache = Cache.open(cache_path_of(out))
    kept = {Path(r.source_path).name: r for r in cache.samples}
    skipped = {Path(r.source_path).name: r.reason for r in cache.failed}
    assert set(kept) | set(skipped) == set(names)
    assert "broken.mp4" in skipped and "cannot open video" in skipped["broken.mp4"]
    portrait = kept["sample_portrait.mp4"]
    assert (portrait.source_height, portrait.source_width) == (1080, 720)
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


@pytest.mark.e2e  # a new process: what a user sees on stderr
def test_user_errors_print_one_line_without_traceback(tmp_path):
    result = cogtune("preprocess", "--pretrained_model_name_or_path", tmp_path / "nope",
                     "--instance_data_root", tmp_path, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("cogtune preprocess: error:")
