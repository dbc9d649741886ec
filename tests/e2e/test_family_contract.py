"""The family contract, over every variant the family registry knows (the runs of tests/contract.py),
on tiny random models that carry its structural flags (CogVideoX: 2b sincos, 5b RoPE, 5b-I2V image
input and learned positions, 1.5 temporal patches and slice RoPE, 1.5-I2V image input and ofs; Wan:
2.1 T2V, 2.1 I2V with CLIP, 2.2 TI2V in both modes, the A14B experts): each preprocesses, trains,
validates, resumes exactly and generates. Then CogVideoX's own checks: its first-step loss equals its
objective computed independently, its LoRA loads into its own diffusers pipeline, its layouts and
refusals (Wan's are in test_wan_pipelines.py)."""

import json
import shutil
from pathlib import Path

import av
import pytest
import torch

from cogtune import preprocess
from cogtune.cache.reader import Cache
from cogtune.config import data_settings, load_config
from cogtune.data.video import read_clip
from cogtune.dev.tiny import make_demo_data
from cogtune.errors import CogtuneError
from cogtune.families import VARIANTS, supported_pipelines
from cogtune.train.log import TRAIN_LOG_NAME
from cogtune.train.lora import LORA_INFO_NAME, LORA_WEIGHT_NAME

from conftest import cache_path_of, cogtune, cogtune_here, write_config
from contract import COGVIDEOX, I2V, read_video, run_stages

def test_every_family_preprocesses_trains_and_generates(trained):
    family = trained["family"]
    assert trained["preprocess"].samples == 4
    losses = trained["train"].losses
    assert len(losses) == 4 and all(0 < loss < 100 for loss in losses)
    (video,) = trained["infer"]
    frames = read_video(video)
    assert len(frames) == 9 and frames[0].shape == (32, 64, 3)
    info = json.loads((trained["out"] / LORA_INFO_NAME).read_text())
    assert ("image-to-video" in info["family"]) == (family in I2V)
    assert ("1.5" in info["family"]) == family.startswith("1.5")


def test_every_family_validates_and_resumes_exactly(trained, tmp_path):
    """The validation videos of the last step are written; a run resumed from the checkpoint of step
    2 trains steps 3 and 4 to the same losses and the same LoRA file, byte for byte."""
    out = trained["out"]
    step = out / "validation" / "step-000004"
    assert len(list(step.glob("*.mp4"))) == 1 and (step / "contact_sheet.png").is_file()
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    result = run_stages(trained["config"], "train", extra=["--output_dir", resumed,
                                                            "--resume_from_checkpoint", "latest"])["train"]
    assert result.losses == trained["train"].losses[2:]
    assert (resumed / LORA_WEIGHT_NAME).read_bytes() == (out / LORA_WEIGHT_NAME).read_bytes()


@pytest.mark.parametrize("trained", COGVIDEOX, indirect=True)
def test_cogvideox_lora_loads_into_its_diffusers_pipeline(trained):
    """diffusers alone (no cogtune code) loads the LoRA into the family's pipeline class, the
    transformer then computes what the trained one does, and the pipeline generates."""
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline
    from PIL import Image

    family = trained["family"]
    cls = CogVideoXImageToVideoPipeline if family in I2V else CogVideoXPipeline
    pipe = cls.from_pretrained(trained["model"])
    pipe.load_lora_weights(str(trained["out"]), weight_name=LORA_WEIGHT_NAME)
    channels = pipe.transformer.config.in_channels
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4 if family.startswith("1.5") else 3, channels, 4, 8, generator=generator)
    text = torch.randn(1, 32, 32, generator=generator)
    ofs = torch.tensor([2.0]) if pipe.transformer.config.ofs_embed_dim else None
    rope = pipe._prepare_rotary_positional_embeddings(32, 64, latents.shape[1], torch.device("cpu")) \
        if pipe.transformer.config.use_rotary_positional_embeddings else None
    with torch.no_grad():
        kwargs = dict(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([500]),
                      image_rotary_emb=rope, ofs=ofs, return_dict=False)
        loaded = pipe.transformer(**kwargs)[0]
        trained_output = trained["train"].transformer.float().eval()(**kwargs)[0]
    assert torch.allclose(loaded, trained_output, atol=1e-5)

    image = {"image": Image.new("RGB", (64, 32), (200, 40, 40))} if family in I2V else {}
    video = pipe(prompt="DEMO a red square", num_frames=9, height=32, width=64, num_inference_steps=2,
                 max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(0), **image).frames[0]
    assert video.shape == (9, 32, 64, 3) and torch.isfinite(torch.from_numpy(video)).all()


@pytest.mark.parametrize("trained", COGVIDEOX, indirect=True)
def test_cogvideox_first_step_loss_matches_the_design_formula(trained):
    """Step 1's logged loss, recomputed here from the cache with the base transformer (LoRA B
    starts at zero), the family's diffusers pipeline for RoPE and the scheduler's own operations:
    x0 = posterior x scaling_factor ([B, F, C, H, W]; 1.5: first frame repeated to an even count),
    x_t = add_noise, I2V input = [x_t, image latent then zeros] on channels (image latent =
    posterior of a random stored variant x or / scaling_factor as the pipeline does, zeroed with
    probability noised_image_dropout), ofs = 2.0 for 1.5-I2V, loss = mean 1/(1-abar) (x0_hat - x0)^2."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline,
                           CogVideoXPipeline, CogVideoXTransformer3DModel)

    from cogtune.train.data import batch_generator, epoch_batches

    model, family = trained["model"], trained["family"]
    cache = Cache.open(trained["preprocess"].cache_path)
    shapes = [tuple(r.latent_shape) for r in cache.samples]
    rows = [cache.samples[i] for i in epoch_batches(shapes, 2, 42, 0)[0]]
    mean = torch.stack([cache.video_tensors(r)["mean"] for r in rows])
    logvar = torch.stack([cache.video_tensors(r)["logvar"] for r in rows])
    text = torch.stack([cache.caption_tensors(r)["prompt_embeds"] for r in rows])
    vae_config = AutoencoderKLCogVideoX.load_config(model, subfolder="vae")
    scaling = vae_config["scaling_factor"]
    transformer = CogVideoXTransformer3DModel.from_pretrained(model, subfolder="transformer")
    scheduler = CogVideoXDDIMScheduler.from_pretrained(model, subfolder="scheduler")

    generator = batch_generator(42, 0)
    posterior = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
    x0 = (posterior * scaling).permute(0, 2, 1, 3, 4)
    if transformer.config.patch_size_t and x0.shape[1] % 2:
        x0 = torch.cat([x0[:, :1], x0], dim=1)
    timesteps = torch.randint(0, 1000, (2,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = scheduler.add_noise(x0, noise, timesteps)
    model_input = x_t
    if family in I2V:
        image_mean = torch.stack([cache.first_frame_tensors(r)["mean"] for r in rows])  # [B, K, C, 1, H, W]
        image_logvar = torch.stack([cache.first_frame_tensors(r)["logvar"] for r in rows])
        assert image_mean.shape[1] == 2
        variant = torch.randint(0, 2, (2,), generator=generator)
        picked_mean, picked_logvar = image_mean[torch.arange(2), variant], image_logvar[torch.arange(2), variant]
        image = picked_mean + torch.exp(0.5 * picked_logvar) * torch.randn(picked_mean.shape, generator=generator)
        image = image / scaling if vae_config.get("invert_scale_latents") else image * scaling
        keep = torch.rand(2, generator=generator) >= 0.3
        image = image.permute(0, 2, 1, 3, 4) * keep.view(-1, 1, 1, 1, 1)
        zeros = torch.zeros(2, x0.shape[1] - 1, *image.shape[2:])
        model_input = torch.cat([x_t, torch.cat([image, zeros], dim=1)], dim=2)
    pipeline_class = CogVideoXImageToVideoPipeline if family in I2V else CogVideoXPipeline
    pipe = pipeline_class.from_pretrained(model, transformer=transformer)
    rope = None
    if transformer.config.use_rotary_positional_embeddings:
        rope = pipe._prepare_rotary_positional_embeddings(32, 64, x0.shape[1], torch.device("cpu"))
    ofs = torch.full((1,), 2.0) if transformer.config.ofs_embed_dim else None
    with torch.no_grad():
        pred = transformer(hidden_states=model_input, encoder_hidden_states=text, timestep=timesteps,
                           image_rotary_emb=rope, ofs=ofs, return_dict=False)[0]
    x0_hat = scheduler.get_velocity(pred, x_t, timesteps)
    weights = 1 / (1 - scheduler.alphas_cumprod[timesteps])
    expected = torch.stack([(weights[b] * (x0_hat[b] - x0[b]) ** 2).mean() for b in range(2)]).mean()

    logged = json.loads((trained["out"] / TRAIN_LOG_NAME).read_text().splitlines()[0])["loss"]
    assert logged == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("family", ["5b-i2v", "1.5-5b-i2v"])
def test_image_condition_layout_equals_the_pipelines(models, family):
    """Our image condition (scaling, zero padding, 1.5 frame count) equals what
    CogVideoXImageToVideoPipeline.prepare_latents builds from the same VAE sample."""
    from diffusers import CogVideoXImageToVideoPipeline

    from cogtune.families import ModelConfigs

    spec = ModelConfigs.load(str(models[family])).spec()
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(models[family])
    image = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latent_frames = spec.latent_frames(9)
    padded = latent_frames + spec.frame_padding(latent_frames)
    pixel_frames = (padded - 1) * 4 + 1  # what the pipeline's __call__ passes on for 1.5
    _, theirs = pipe.prepare_latents(image, 1, 4, pixel_frames, 32, 64, torch.float32, torch.device("cpu"),
                                     torch.Generator().manual_seed(5))
    sample = pipe.vae.encode(image[:, :, None]).latent_dist.sample(torch.Generator().manual_seed(5))
    ours = spec.image_condition(spec.scale_image_latents(sample).permute(0, 2, 1, 3, 4), padded)
    assert ours.shape == theirs.shape == (1, padded, 4, 4, 8)
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("family", ["5b", "1.5-5b"])
def test_rotary_embeddings_equal_the_pipelines(models, family):
    from diffusers import CogVideoXPipeline

    from cogtune.families import ModelConfigs

    spec = ModelConfigs.load(str(models[family])).spec()
    pipe = CogVideoXPipeline.from_pretrained(models[family])
    for height, width, frames in ((32, 64, 4), (32, 48, 14), (64, 32, 2), (128, 128, 8)):
        ours = spec.rotary_embeddings(height, width, frames, torch.device("cpu"))
        theirs = pipe._prepare_rotary_positional_embeddings(height, width, frames, torch.device("cpu"))
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("trained", sorted(I2V & set(COGVIDEOX)), indirect=True)
def test_first_frame_encodings_are_stored_noised_and_reproducible(trained):
    """Each stored first-frame encoding is the VAE posterior of the clip's first frame plus Gaussian
    noise of its recorded sigma, that noise drawn as documented: sigma = exp(N(-3, 0.5)) and the noise
    from a generator seeded by sha256("first frame {seed} {video sha256}"). Recomputed here with the
    pipeline's own VAE, so it holds for any random weights."""
    import hashlib

    from diffusers import AutoencoderKLCogVideoX

    from cogtune.data.video import size_rule

    cache = Cache.open(trained["preprocess"].cache_path)
    config = load_config("preprocess", ["--config", str(trained["config"])])
    vae = AutoencoderKLCogVideoX.from_pretrained(trained["model"], subfolder="vae").eval()
    assert cache.image_noise_variants == 2
    for row in cache.samples:
        seed_text = f"first frame {config.seed} {row.source_sha256}"
        generator = torch.Generator().manual_seed(int(hashlib.sha256(seed_text.encode()).hexdigest()[:15], 16))
        sigmas = torch.exp(torch.randn(2, generator=generator, dtype=torch.float64) * 0.5 - 3.0)
        assert row.image_noise_sigmas == pytest.approx(sigmas.tolist(), rel=1e-12)
        assert sigmas[0] != sigmas[1]

        clip = read_clip(Path(row.source_path), size_rule(config, 4), config.fps, config.skip_frames_start,
                         config.skip_frames_end, config.video_reshape_mode, None)
        assert clip.frame_indices == row.frame_indices
        first = clip.pixels[:, :1].float()  # [C, 1, H, W] in [-1, 1]
        noise = torch.randn((2, *first.shape), generator=generator)
        noised = first[None] + noise * sigmas.float().view(-1, 1, 1, 1, 1)
        with torch.no_grad():
            expected = vae.encode(noised).latent_dist
        image_mean, image_logvar = (cache.first_frame_tensors(row)[name] for name in ("mean", "logvar"))
        assert image_mean.shape == (2, 4, 1, 4, 8)
        torch.testing.assert_close(image_mean, expected.mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(image_logvar, expected.logvar, rtol=1e-4, atol=1e-5)
    # The noise is a function of the seed and the clip: a new cache with the same settings is identical.
    again = preprocess.run(load_config("preprocess", ["--config", str(trained["config"]), "--cache_root",
                                                      str(trained["out"].parent / "cache-again")]))
    other = Cache.open(again.cache_path)
    assert [r.image_noise_sigmas for r in other.samples] == [r.image_noise_sigmas for r in cache.samples]
    for row, row_again in zip(cache.samples, other.samples):
        assert torch.equal(cache.first_frame_tensors(row)["mean"], other.first_frame_tensors(row_again)["mean"])


def test_cogvideox15_trains_on_an_odd_latent_frame_count(tmp_path, models):
    """49 frames -> 13 latent frames, which patch_size_t = 2 cannot patch (the diffusers scripts
    crash here): the first latent frame is repeated, training runs, and the LoRA generates 49 frames."""
    data = make_demo_data(tmp_path / "data", num_frames=52, fps=16)
    config = write_config(tmp_path / "c.toml", models["1.5-5b"], data, tmp_path / "cache", tmp_path / "out",
                          fps=16, max_num_frames=49, num_frames=49, max_train_steps=2, train_batch_size=1)
    cache_dir = cache_path_of(cogtune_here("preprocess", "--config", config).stdout)
    assert {tuple(r.latent_shape) for r in Cache.open(cache_dir).samples} == {(4, 13, 4, 8)}
    cogtune_here("train", "--config", config)
    log = [json.loads(line) for line in (tmp_path / "out" / TRAIN_LOG_NAME).read_text().splitlines()]
    assert len(log) == 2 and all(0 < r["loss"] < 100 for r in log)
    video = Path(cogtune_here("infer", "--config", config).stdout.split("video: ")[1].strip())
    assert len(read_video(video)) == 49


# --- mismatches are refused before anything is encoded or trained ---------------------------------


def test_text_to_video_cache_is_refused_for_an_image_to_video_model_and_the_reverse(tmp_path, models, demo_data):
    caches = {}
    for family in ("5b", "5b-i2v"):
        config = write_config(tmp_path / f"{family}.toml", models[family], demo_data, tmp_path / "cache",
                              tmp_path / family)
        caches[family] = run_stages(config, "preprocess")["preprocess"].cache_path
    for family, other in (("5b-i2v", "5b"), ("5b", "5b-i2v")):
        expected = "built for a text-to-video model" if family == "5b-i2v" else "built for an image-to-video model"
        with pytest.raises(CogtuneError, match=f"{expected}.*Preprocess the data with this model"):
            run_stages(tmp_path / f"{family}.toml", "train", extra=["--data_cache", caches[other]])
        assert not list((tmp_path / family).glob("checkpoint-*"))


def test_cache_of_another_family_is_refused_naming_it(tmp_path, models, demo_data):
    config = write_config(tmp_path / "c.toml", models["5b"], demo_data, tmp_path / "cache", tmp_path / "out")
    cache_dir = run_stages(config, "preprocess")["preprocess"].cache_path
    with pytest.raises(CogtuneError) as refused:
        run_stages(config, "train", extra=["--pretrained_model_name_or_path", models["1.5-5b"],
                                           "--data_cache", cache_dir])
    message = str(refused.value)
    assert "built for another model" in message
    assert "a CogVideoX 1.0 text-to-video (RoPE, VAE scaling 0.7) model, not" in message
    assert "a CogVideoX 1.5 text-to-video (RoPE, VAE scaling 0.7) model" in message


def test_learned_positional_embeddings_size_is_checked_before_encoding(tmp_path, models, demo_data):
    config = write_config(tmp_path / "c.toml", models["5b-i2v"], demo_data, tmp_path / "cache", tmp_path / "out",
                          width=48)
    with pytest.raises(CogtuneError, match="9 frames of 32x64 only, not 9 frames of 32x48.*"
                                           "--ignore_learned_positional_embeddings"):
        run_stages(config, "preprocess")
    assert not list(tmp_path.glob("cache/*/shards/*"))  # nothing was encoded


def test_cogvideox15_size_beyond_its_rope_grid_is_refused_before_encoding(tmp_path, models, demo_data):
    config = write_config(tmp_path / "c.toml", models["1.5-5b"], demo_data, tmp_path / "cache", tmp_path / "out",
                          width=256)
    with pytest.raises(CogtuneError, match="cover at most 128x128 pixels .*not 32x256"):
        run_stages(config, "preprocess")
    assert not list(tmp_path.glob("cache/*/shards/*"))


def test_ignoring_learned_positional_embeddings_trains_other_sizes_and_infer_follows(tmp_path, models, demo_data,
                                                                                     first_frame):
    config = write_config(tmp_path / "c.toml", models["5b-i2v"], demo_data, tmp_path / "cache", tmp_path / "out",
                          width=48, image=str(first_frame), ignore_learned_positional_embeddings=True)
    results = run_stages(config, "preprocess", "train")
    info = json.loads((tmp_path / "out" / LORA_INFO_NAME).read_text())
    assert info["ignore_learned_positional_embeddings"] is True
    assert not results["train"].transformer.patch_embed.use_learned_positional_embeddings
    # infer without the flag: the LoRA's record makes it leave the embeddings out too
    video = Path(cogtune_here("infer", "--config", config, "--no-ignore_learned_positional_embeddings").stdout
                 .split("video: ")[1].strip())
    assert read_video(video)[0].shape == (32, 48, 3)
    # a LoRA without that record, at that size, is refused before the pipeline is loaded
    (tmp_path / "out" / LORA_INFO_NAME).unlink()
    with pytest.raises(CogtuneError, match="--ignore_learned_positional_embeddings"):
        run_stages(config, "infer", extra=["--no-ignore_learned_positional_embeddings"])


@pytest.mark.parametrize("trained", ["5b-i2v"], indirect=True)
def test_infer_reads_prompt_image_pairs_and_checks_images(tmp_path, trained, first_frame):
    pairs = tmp_path / "pairs.jsonl"
    second = tmp_path / "second.mp4"
    second.write_bytes(trained["infer"][0].read_bytes())
    pairs.write_text(json.dumps({"prompt": "DEMO a red square", "image": str(first_frame)}) + "\n"
                     + json.dumps({"prompt": "DEMO from a video's first frame", "image": "second.mp4"}) + "\n")
    out = cogtune_here("infer", "--config", trained["config"], "--prompt_file", pairs, "--image", "",
                  "--video_output_dir", tmp_path / "videos").stdout
    assert out.count("video: ") == 2
    with pytest.raises(CogtuneError, match="nope.png does not exist"):
        run_stages(trained["config"], "infer", extra=["--image", tmp_path / "nope.png"])
    with pytest.raises(CogtuneError, match="This is an image-to-video model: give --image"):
        run_stages(trained["config"], "infer", extra=["--image", ""])


@pytest.mark.parametrize("trained", ["5b"], indirect=True)
def test_text_to_video_infer_refuses_an_image(trained, first_frame):
    with pytest.raises(CogtuneError, match="text-to-video model; it takes no image"):
        run_stages(trained["config"], "infer", extra=["--image", first_frame])


def test_fp16_is_refused_for_cogvideox15_and_discouraged_for_other_bf16_families(models):
    from cogtune.families import ModelConfigs

    warnings = []
    ModelConfigs.load(str(models["5b"])).spec().check_precision("fp16", warnings.append)
    assert len(warnings) == 1 and "bf16 is recommended" in warnings[0]
    ModelConfigs.load(str(models["2b"])).spec().check_precision("fp16", warnings.append)
    assert len(warnings) == 1  # CogVideoX-2b was trained in fp16
    with pytest.raises(CogtuneError, match="NaN"):
        ModelConfigs.load(str(models["1.5-5b"])).spec().check_precision("fp16", warnings.append)


@pytest.fixture(scope="module")
def other_pipeline(tmp_path_factory) -> Path:
    """A pipeline folder of an architecture cogtune does not train: its model_index.json is what is read."""
    folder = tmp_path_factory.mktemp("other") / "tiny-hunyuan"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoPipeline",
                                                         "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"]}))
    return folder


@pytest.mark.parametrize("stage", ["preprocess", "train"])
def test_a_pipeline_of_another_architecture_is_refused_in_one_line(other_pipeline, demo_data, tmp_path, stage):
    result = cogtune(stage, "--pretrained_model_name_or_path", other_pipeline, "--instance_data_root", demo_data,
                     "--cache_root", tmp_path / "cache", "--output_dir", tmp_path / "out", check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("cogtune")]
    assert "is a HunyuanVideoPipeline" in line and supported_pipelines() in line, result.stderr
