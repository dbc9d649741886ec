"""Around a training run: validation videos from cached embeddings (T5 never loaded), tensorboard,
the loss curve, the model card, the ComfyUI export and JSON logs."""

import dataclasses
import gc
import io
import json
import re
import weakref
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cogtune.cache.identity import list_caches
from cogtune.cache.disk import read_manifest
from cogtune.config import load_config
from cogtune.export import to_comfyui
from cogtune.families import ModelConfigs
from cogtune.train import report
from cogtune.util.media import LINE_HEIGHT
from cogtune.train.validation import CONTACT_SHEET_NAME, load_validation_set

from conftest import cache_path_of, cogtune_here, write_config

PROMPTS = ("DEMO a red square moves", "DEMO a blue circle")


@pytest.fixture(scope="module")
def models(tiny_models):
    return {family: tiny_models(family, seed=5) for family in ("2b", "1.5-5b-i2v")}


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A 32x64 first frame: the size the clips are trained at, so no pipeline resizes it."""
    path = tmp_path_factory.mktemp("image") / "first.png"
    pixels = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path



@pytest.mark.parametrize("family", ["2b", "1.5-5b-i2v"])
def test_generation_from_cached_embeddings_equals_the_pipeline(family, models, demo_data, image, tmp_path):
    """The denoising loop run on cached embeddings gives the latents the diffusers pipeline gives from
    the prompt itself (DDIM for 2b; DPM, dynamic CFG, image and 1.5 frame padding for 1.5-I2V)."""
    from diffusers import CogVideoXDPMScheduler, CogVideoXImageToVideoPipeline, CogVideoXPipeline

    i2v = family == "1.5-5b-i2v"
    config = write_config(tmp_path / "c.toml", models[family], demo_data, tmp_path / "cache", tmp_path / "out",
                          validation_prompt=PROMPTS[0], **({"validation_images": str(image)} if i2v else {}))
    cache = cache_path_of(cogtune_here("preprocess", "--config", config).stdout)
    spec = ModelConfigs.load(str(models[family])).spec()
    validation = load_validation_set(load_config("train", ["--config", str(config)]), spec, cache,
                                     read_manifest(cache))
    (prompt,) = validation.prompts
    assert (prompt.first_frame is not None) == i2v

    pipe = (CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline).from_pretrained(
        models[family])
    if i2v:
        pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    settings = dict(num_inference_steps=3, guidance_scale=6.0, use_dynamic_cfg=i2v)
    ours = spec.generate_latents(pipe.transformer, type(pipe.scheduler).from_config(pipe.scheduler.config),
                                 prompt.caption, validation.negative, 9, 32, 64,
                                 generator=torch.Generator().manual_seed(7), dtype=torch.float32,
                                 first_frame=prompt.first_frame, **settings)
    theirs = pipe(prompt=PROMPTS[0], num_frames=9, height=32, width=64, generator=torch.Generator().manual_seed(7),
                  output_type="latent", max_sequence_length=spec.max_text_seq_length,
                  **({"image": Image.open(image)} if i2v else {}), **settings).frames
    padding = spec.frame_padding(spec.latent_frames(9))
    assert padding == (1 if i2v else 0)
    assert ours.shape == theirs[:, padding:].shape
    assert torch.allclose(ours, theirs[:, padding:], atol=1e-4), (ours - theirs[:, padding:]).abs().max()


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory, models, demo_data):
    """Preprocess with two validation prompts, then train 4 steps with validation every 2 steps and
    tensorboard, in this process, counting every T5 and VAE built while training."""
    import transformers
    from diffusers import AutoencoderKLCogVideoX

    root = tmp_path_factory.mktemp("validated")
    config = write_config(root / "c.toml", models["2b"], demo_data, root / "cache", root / "out",
                          validation_prompt=":::".join(PROMPTS), validation_steps=2,
                          validation_num_inference_steps=2, report_to="tensorboard", max_train_steps=4)
    preprocessed = cogtune_here("preprocess", "--config", config).stdout
    built = {"t5": 0, "vae": []}
    t5_init, vae_from_pretrained = transformers.T5EncoderModel.__init__, AutoencoderKLCogVideoX.from_pretrained

    def counting_t5(self, *args, **kwargs):
        built["t5"] += 1
        t5_init(self, *args, **kwargs)

    def counting_vae(*args, **kwargs):
        vae = vae_from_pretrained(*args, **kwargs)
        built["vae"].append(weakref.ref(vae))
        return vae

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.T5EncoderModel, "__init__", counting_t5)
        patch.setattr(AutoencoderKLCogVideoX, "from_pretrained", counting_vae)
        trained = cogtune_here("train", "--config", config)
    gc.collect()
    return dict(config=config, out=root / "out", cache=cache_path_of(preprocessed), preprocessed=preprocessed,
                trained=trained, built=built, model=models["2b"])


def test_training_writes_validation_videos_and_contact_sheets_without_t5(validated_run):
    assert "validation: 3 prompt embedding(s)" in validated_run["preprocessed"]  # two prompts and the negative
    built = validated_run["built"]
    assert built["t5"] == 0  # the training process never built T5
    assert len(built["vae"]) == 2  # the VAE, once per validation round, only to decode...
    assert all(ref() is None for ref in built["vae"])  # ...and freed afterwards
    out = validated_run["out"]
    for step in (2, 4):
        folder = out / "validation" / f"step-{step:06d}"
        videos = sorted(folder.glob("*.mp4"))
        assert [v.name for v in videos] == ["000-DEMO-a-red-square-moves-seed42.mp4", "001-DEMO-a-blue-circle-seed42.mp4"]
        for video in videos:
            with av.open(str(video)) as container:
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            assert len(frames) == 9 and frames[0].shape == (32, 64, 3)
        sheet = Image.open(folder / CONTACT_SHEET_NAME)
        assert sheet.size == (8 * 64, 2 * (32 + LINE_HEIGHT))  # 8 frames of each video, a row per video under its label
        assert np.asarray(sheet).std() > 0
    assert Image.open(out / report.LOSS_CURVE_NAME).size == (800, 450)


def test_tensorboard_holds_the_logged_scalars_and_validation_images(validated_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (validated_run["out"] / "logs").iterdir()
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    log = [json.loads(line) for line in (validated_run["out"] / "train_log.jsonl").read_text().splitlines()]
    tags = events.Tags()
    for name in ("loss", "lr", "grad_norm", "step_seconds", "peak_memory_mib"):
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == [1, 2, 3, 4]
        assert [s.value for s in scalars] == pytest.approx([r[name] for r in log], rel=1e-6)
    assert "validation/contact_sheet" in tags["images"]
    assert [image.step for image in events.Images("validation/contact_sheet")] == [2, 4]
    for index in (0, 1):  # each validation video, as an animated GIF (what add_video writes)
        videos = events.Images(f"validation/video_{index}")
        assert [v.step for v in videos] == [2, 4]
        gif = Image.open(io.BytesIO(videos[-1].encoded_image_string))
        assert gif.format == "GIF" and gif.n_frames == 9 and gif.size == (64, 32)


def test_model_card_fields(validated_run):
    from huggingface_hub import ModelCard

    out = validated_run["out"]
    card = ModelCard.load(out / "README.md")
    assert card.data.instance_prompt == "DEMO"
    assert "lora" in card.data.tags and "text-to-video" in card.data.tags and card.data.library_name == "diffusers"
    assert card.data.base_model is None  # a local folder is no hub id; the text names it instead
    assert [w["text"] for w in card.data.widget] == list(PROMPTS)
    assert all((out / w["output"]["url"]).is_file() for w in card.data.widget)
    text = card.text
    assert f"`{Path(validated_run['model']).resolve()}` (a local folder)" in text
    assert "| LoRA rank / alpha | 4 / 2 |" in text and "| Steps | 4 |" in text
    assert "| Clips | 9 frames of 32x64 at 8 fps |" in text
    assert "pipe.load_lora_weights(" in text and "from diffusers import CogVideoXPipeline" in text
    assert "validation/step-000004/contact_sheet.png" in text and "loss_curve.png" in text
    assert ": seed 42, guidance scale 6, 9 frames of 32x64" in text  # each video's own settings
    for row in ("| Timestep sampling | uniform (the reference) |", "| Caption dropout | none |", "| EMA | none |",
                "| Frame extraction | head (the first frames at the clips' fps) |", "| Dataset repeats | 1 |"):
        assert row in text, row

    # The snippet, run here (the local model and LoRA, on the CPU): the family's dtype, the LoRA in, no
    # deprecated keyword on this diffusers, whichever it is of those the ranges admit.
    import warnings

    snippet = text.split("```python\n", 1)[1].split("pipe.set_adapters", 1)[0]
    snippet = snippet.replace('.to("cuda")', "").replace(f'"{out.name}"', repr(str(out)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scope = {}
        exec(snippet, scope)
    assert scope["pipe"].transformer.dtype == torch.float16  # CogVideoX-2b's card precision
    assert "cogtune" in scope["pipe"].get_active_adapters()
    assert not [w for w in caught if "dtype" in str(w.message)]
    info = json.loads((out / "cogtune_lora.json").read_text())
    assert info["settings"]["learning_rate"] == 1e-2 and info["frame_extraction"] == "head"
    assert info["validation"][0] == {"prompt": PROMPTS[0], "seed": 42, "guidance_scale": 6.0, "num_frames": 9,
                                     "height": 32, "width": 64}

    # The same card for a hub base model names it in the header, as the hub expects.
    models = ModelConfigs.load(str(validated_run["model"]))
    models = dataclasses.replace(models, source=dict(models.source, pretrained_model_name_or_path="THUDM/CogVideoX-2b"))
    data = report.card_data(models, models.spec(), read_manifest(validated_run["cache"]), [], out)
    assert data["base_model"] == "THUDM/CogVideoX-2b" and "widget" not in data


def test_comfyui_export_has_the_documented_keys_and_merges_to_the_trained_lora(validated_run, tmp_path):
    """The exported file, applied as ComfyUI-CogVideoXWrapper's merge does (names resolved by walking
    the transformer's attributes, W += alpha / rank * up @ down), gives the outputs of the LoRA
    loaded with diffusers."""
    from diffusers import CogVideoXPipeline

    out = validated_run["out"]
    exported = tmp_path / "comfy.safetensors"
    result = cogtune_here("export", "--format", "comfyui", "--output_dir", out, "--output", exported)
    assert f"exported: {exported}" in result.stdout
    state = load_file(exported)
    original = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(re.fullmatch(r"lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in state)
    assert len(state) == len(original) // 2 * 3
    assert state["lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight"].equal(
        original["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"])
    assert state["lora_unet_transformer_blocks_0_attn1_to_q.alpha"].item() == 2.0  # the trained alpha
    assert to_comfyui(original, None)["lora_unet_transformer_blocks_0_attn1_to_q.alpha"].item() == 4.0  # = rank

    with_lora = CogVideoXPipeline.from_pretrained(validated_run["model"])
    with_lora.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors", adapter_name="lora")
    merged = CogVideoXPipeline.from_pretrained(validated_run["model"]).transformer
    for name in {k.split(".")[0] for k in state}:
        parts, module, piece = name[len("lora_unet_"):].split("_"), merged, ""
        while parts:  # the wrapper's walk: join pieces with "_" until a submodule of that name exists
            piece = f"{piece}_{parts.pop(0)}" if piece else parts.pop(0)
            if piece in module._modules:  # what nn.Module.__getattr__ finds (not methods such as .to)
                module, piece = module._modules[piece], ""
        assert piece == "", name
        up, down = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"]
        module.weight.data += state[f"{name}.alpha"] / down.shape[0] * up @ down
    generator = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 3, 4, 4, 8, generator=generator),
                  encoder_hidden_states=torch.randn(1, 32, 32, generator=generator), timestep=torch.tensor([500]))
    with torch.no_grad():
        expected = with_lora.transformer(**inputs).sample
        assert not torch.allclose(expected, with_lora.transformer(**inputs, attention_kwargs={"scale": 0.0}).sample)
        assert torch.allclose(merged(**inputs).sample, expected, atol=1e-5)


def test_a_validation_prompt_the_cache_lacks_is_refused_then_preprocess_adds_only_it(tmp_path, models, demo_data):
    config = write_config(tmp_path / "c.toml", models["2b"], demo_data, tmp_path / "cache", tmp_path / "out")
    cogtune_here("preprocess", "--config", config)
    refused = cogtune_here("train", "--config", config, "--validation_prompt", "DEMO a cat", check=False)
    assert refused.returncode == 2
    # (the empty negative prompt is in every cache: preprocess stores it for caption dropout too)
    assert "no encoding of these validation inputs: 'DEMO a cat'. Run" in refused.stderr and "cogtune preprocess" in refused.stderr
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
    again = cogtune_here("preprocess", "--config", config, "--validation_prompt", "DEMO a cat").stdout
    assert "encoded: 0 videos, 0 captions" in again and "validation: 1 prompt embedding(s)" in again


def test_bad_validation_and_tracking_settings_are_refused_before_any_work(tmp_path, models, demo_data, image,
                                                                          monkeypatch):
    from huggingface_hub import constants

    config = write_config(tmp_path / "c.toml", models["1.5-5b-i2v"], demo_data, tmp_path / "cache", tmp_path / "out")
    for flags, message in [
        (["--validation_prompt", "a:::b", "--validation_images", str(image)], "names 1 image(s) for 2"),
        (["--validation_prompt", "a"], "give one --validation_images entry per --validation_prompt"),
        (["--validation_prompt", "a", "--validation_images", "missing.png"], "missing.png does not exist"),
    ]:
        result = cogtune_here("preprocess", "--config", config, *flags, check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "cache").exists() or not list_caches(tmp_path / "cache")

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    for flags, message in [(["--push_to_hub"], "--push_to_hub needs a Hugging Face token"),
                           (["--report_to", "wandb"], "--report_to wandb needs the wandb package")]:
        result = cogtune_here("train", "--config", config, "--data_cache", tmp_path, *flags, check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_json_logs_are_one_event_per_line(validated_run, tmp_path):
    out = tmp_path / "out"
    result = cogtune_here("train", "--config", validated_run["config"], "--output_dir", out, "--log_format", "json",
                          "--max_train_steps", "2", "--report_to", "none")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert all({"time", "event"} <= set(e) for e in events)
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]
    assert [e["step"] for e in events if e["event"] == "validation"] == [2]
    assert events[-1]["event"] == "result" and events[-1]["lora"] == str(out.resolve() / "pytorch_lora_weights.safetensors")
    progress = [e for e in events if e["event"] == "progress" and e["task"] == "training"]
    assert progress[-1]["done"] == progress[-1]["total"] == 2 and progress[-1]["eta_s"] == 0
    assert (out / report.LOSS_CURVE_NAME).is_file()


def test_validation_is_due_every_n_steps_or_at_the_end_of_every_nth_epoch():
    from cogtune.config import make_config
    from cogtune.train.validation import validation_due

    def due(steps_per_epoch, **settings):
        config = make_config("train", dict(pretrained_model_name_or_path="m", validation_prompt="p", **settings))
        return [step for step in range(1, 31) if validation_due(step, steps_per_epoch, config)]

    assert due(4, validation_steps=7) == [7, 14, 21, 28]
    assert due(4, validation_epochs=3) == [12, 24]  # the end of epochs 3 and 6
    assert due(1) == []  # within 30 one-step epochs: the default is every 50 epochs, as in the scripts
    assert [s for s in range(1, 101) if validation_due(s, 1, make_config(
        "train", dict(pretrained_model_name_or_path="m")))] == [50, 100]


def test_the_first_frame_reaches_the_vae_the_same_in_preprocess_and_infer(tmp_path, models, demo_data,
                                                                         monkeypatch):
    """A 40x24 JPEG whose EXIF says "turn 90 degrees clockwise": preprocess (whose cached latents
    in-training validation uses) and `cogtune infer` both hand the VAE the upright image,
    cover-resized to 32x64 and centre-cropped, not the raw one plain-resized by the pipeline."""
    from diffusers import AutoencoderKLCogVideoX
    from PIL import ImageOps

    from cogtune.data.video import first_frame_pixels

    picture = tmp_path / "phone.jpg"
    stored = np.random.default_rng(1).integers(0, 256, (40, 24, 3), dtype=np.uint8)  # stored portrait
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned clockwise: landscape, 24 x 40
    Image.fromarray(stored).save(picture, exif=exif, quality=95)
    with Image.open(picture) as raw:
        upright = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
    assert upright.shape == (24, 40, 3)
    expected = first_frame_pixels(picture, 32, 64)
    # independent of our resize: the upright image scaled by 64/40 covers 32x64 (38x64), centre rows 3..35
    scaled = torch.nn.functional.interpolate(torch.from_numpy(upright.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1,
                                             size=(38, 64), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(expected[:, 0], scaled[0, :, 3:35].clamp(-1, 1), atol=1e-6)

    seen = []
    original = AutoencoderKLCogVideoX.encode

    def recording_encode(self, x, *args, **kwargs):
        seen.append(x.detach().float().clone())
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKLCogVideoX, "encode", recording_encode)
    config = write_config(tmp_path / "c.toml", models["1.5-5b-i2v"], demo_data, tmp_path / "cache", tmp_path / "out",
                          validation_prompt=PROMPTS[0], validation_images=str(picture), image_noise_variants=1)
    cogtune_here("preprocess", "--config", config)
    from_preprocess = seen[-1]  # the validation image is encoded last
    cogtune_here("train", "--config", config, "--max_train_steps", "1")
    seen.clear()
    cogtune_here("infer", "--config", config, "--image", picture)
    assert len(seen) == 1
    assert torch.equal(from_preprocess, expected[None])
    assert torch.allclose(seen[0], expected[None], atol=1e-6)  # [0, 1] -> the pipeline's normalisation -> [-1, 1]


def mp4_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_a_validation_file_sets_each_videos_size_seed_and_guidance(tmp_path, models, demo_data):
    """Two rows, one with its own size, seed and guidance, one with none: each video has its own
    size and seed, and the row without settings gives the video --validation_prompt gives."""
    validation = tmp_path / "validation.jsonl"
    validation.write_text(
        json.dumps({"prompt": "DEMO a red square", "num_frames": 17, "height": 32, "width": 32, "seed": 7,
                    "guidance_scale": 1.0}) + "\n" + json.dumps({"prompt": "DEMO a blue square"}) + "\n")
    common = dict(validation_steps=1, validation_num_inference_steps=2, max_train_steps=1, checkpointing_steps=5)
    config = write_config(tmp_path / "c.toml", models["2b"], demo_data, tmp_path / "cache", tmp_path / "out",
                          validation_file=str(validation), **common)
    preprocessed = cogtune_here("preprocess", "--config", config).stdout
    assert "validation: 3 prompt embedding(s)" in preprocessed  # both prompts and the empty one
    cogtune_here("train", "--config", config)
    folder = tmp_path / "out" / "validation" / "step-000001"
    seed = load_config("train", ["--config", str(config)]).seed
    own, plain = folder / "000-DEMO-a-red-square-seed7.mp4", folder / f"001-DEMO-a-blue-square-seed{seed}.mp4"
    assert mp4_frames(own).shape == (17, 32, 32, 3) and mp4_frames(plain).shape == (9, 32, 64, 3)

    flags = write_config(tmp_path / "f.toml", models["2b"], demo_data, tmp_path / "cache", tmp_path / "out-flags",
                         validation_prompt="DEMO a blue square", **common)
    cogtune_here("preprocess", "--config", flags)
    cogtune_here("train", "--config", flags)
    from_flags = tmp_path / "out-flags" / "validation" / "step-000001" / f"000-DEMO-a-blue-square-seed{seed}.mp4"
    assert np.array_equal(mp4_frames(from_flags), mp4_frames(plain))

    validation.write_text(json.dumps({"prompt": "x", "num_frames": 6}) + "\n")
    refused = cogtune_here("preprocess", "--config", config, check=False)
    assert refused.returncode == 2 and f"--validation_file {validation}, line 1: num_frames 6 is not of the form 4k+1" \
        in refused.stderr
    both = write_config(tmp_path / "both.toml", models["2b"], demo_data, tmp_path / "cache", tmp_path / "out",
                        validation_file=str(validation), validation_prompt="y")
    refused = cogtune_here("preprocess", "--config", both, check=False)
    assert refused.returncode == 2 and "either --validation_file or --validation_prompt" in refused.stderr
    # a flag wins over the file: --validation_prompt given here replaces the file's --validation_file
    flag = cogtune_here("preprocess", "--config", config, "--validation_prompt", "DEMO y").stdout
    assert "validation: 1 prompt embedding(s)" in flag


def test_a_validation_file_gives_image_to_video_images_at_each_rows_size(tmp_path, models, demo_data, image):
    (tmp_path / "images").mkdir()
    Image.open(image).save(tmp_path / "images" / "first.png")
    validation = tmp_path / "validation.csv"
    validation.write_text("prompt,image,height,width\nDEMO a red square,images/first.png,32,32\n"
                          "DEMO a red square,images/first.png,,\n")
    config = write_config(tmp_path / "c.toml", models["1.5-5b-i2v"], demo_data, tmp_path / "cache", tmp_path / "out",
                          validation_file=str(validation), validation_steps=1, validation_num_inference_steps=2,
                          max_train_steps=1, checkpointing_steps=5)
    cache = cache_path_of(cogtune_here("preprocess", "--config", config).stdout)
    sizes = sorted(path.name.rsplit("-", 1)[1] for path in (cache / "validation").glob("image-*.safetensors"))
    assert sizes == ["32x32.safetensors", "32x64.safetensors"]  # the row's size, and the clips' size
    cogtune_here("train", "--config", config)
    videos = sorted((tmp_path / "out" / "validation" / "step-000001").glob("*.mp4"))
    assert [mp4_frames(video).shape[1:3] for video in videos] == [(32, 32), (32, 64)]


def test_the_card_and_record_name_every_option_that_shapes_the_lora(tmp_path, models, demo_data):
    validation = tmp_path / "validation.jsonl"
    validation.write_text(json.dumps({"prompt": "DEMO a red square", "seed": 7, "guidance_scale": 3.5}) + "\n")
    config = write_config(tmp_path / "c.toml", models["2b"], demo_data, tmp_path / "cache", tmp_path / "out",
                          validation_file=str(validation), validation_num_inference_steps=2, max_train_steps=2,
                          frame_extraction="chunk", max_windows_per_clip=2, use_ema=True, ema_validation=True,
                          caption_dropout_p=0.25, timestep_sampling="logit_normal", snr_gamma=5.0, use_rslora=True)
    cogtune_here("preprocess", "--config", config)
    cogtune_here("train", "--config", config)
    text = (tmp_path / "out" / "README.md").read_text()
    for row in ("| Timestep sampling | logit-normal (mean 0, std 1), min-SNR gamma 5 |",
                "| Caption dropout | 0.25 (empty) |",
                "| EMA | decay 0.9999, saved as `pytorch_lora_weights_ema.safetensors` (the validation videos use it) |",
                "| Frame extraction | chunk, max 2 |", "| LoRA variant | rsLoRA"):
        assert row in text, row
    assert ": seed 7, guidance scale 3.5, 9 frames of 32x64" in text and "guidance_scale=3.5" in text
    assert "manual_seed(7)" in text and "[2 / 4 ** 0.5]" in text
    info = json.loads((tmp_path / "out" / "cogtune_lora.json").read_text())
    assert info["ema_weights"] == "pytorch_lora_weights_ema.safetensors" and info["frame_extraction"] == "chunk, max 2"
    assert info["settings"]["caption_dropout_p"] == 0.25 and info["settings"]["timestep_sampling"] == "logit_normal"
    assert info["validation"] == [{"prompt": "DEMO a red square", "seed": 7, "guidance_scale": 3.5, "num_frames": 9,
                                   "height": 32, "width": 64}]
