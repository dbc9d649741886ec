"""The Wan families against diffusers' own Wan pipelines, on the contract runs (tests/contract.py):
the first step's loss recomputed from the cache with the pipelines' functions and the flow-matching
formula (no cogtune code), the image-to-video inputs of a training step equal to what the pipeline
feeds the transformer for the same image, the LoRA loaded with plain load_lora_weights."""

import json
from pathlib import Path

import pytest
import torch

from cogtune.cache.reader import Cache
from cogtune.config import load_config
from cogtune.data.video import read_clip, size_rule
from cogtune.errors import CogtuneError
from cogtune.train.log import TRAIN_LOG_NAME
from cogtune.train.lora import LORA_INFO_NAME, LORA_WEIGHT_NAME

from contract import I2V, WAN, run_stages

CHANNEL_I2V = {"wan2.1-i2v-14b-480p", "wan2.2-i2v-a14b"}  # mask and image latents joined on channels


def pipeline_of(trained, **parts):
    """The run's diffusers pipeline: WanImageToVideoPipeline for its image-to-video runs."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    cls = WanImageToVideoPipeline if trained["family"] in I2V else WanPipeline
    return cls.from_pretrained(trained["model"], **parts)


def expert_part(trained) -> str:
    return "transformer_2" if trained["settings"].get("expert") == "low_noise" else "transformer"


def first_frames(trained, rows):
    """Each row's clip's first frame as preprocess read it, [1, 3, H, W] in [-1, 1]."""
    config = load_config("preprocess", ["--config", str(trained["config"])])
    frames = []
    for row in rows:
        clip = read_clip(Path(row.source_path), size_rule(config, 4), config.fps, config.skip_frames_start,
                         config.skip_frames_end, config.video_reshape_mode, None)
        assert clip.frame_indices == row.frame_indices
        frames.append(clip.pixels[:, 0][None].float())
    return frames


def random_inputs(config, t: float, per_token: bool = False) -> dict:
    """Seeded random inputs of a transformer of this config: 3x4x8 latents, 512 text tokens, 17 CLIP
    tokens where it takes them; the timestep per token (TI2V) or per sample."""
    generator = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, config.in_channels, 3, 4, 8, generator=generator),
                  encoder_hidden_states=torch.randn(1, 512, config.text_dim, generator=generator),
                  timestep=torch.full((1, 3 * 2 * 4), t) if per_token else torch.tensor([t]), return_dict=False)
    if config.image_dim:
        inputs["encoder_hidden_states_image"] = torch.randn(1, 17, config.image_dim, generator=generator)
    return inputs


def pil(frame):
    from PIL import Image

    array = ((frame[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


@pytest.mark.parametrize("trained", WAN, indirect=True)
def test_wan_first_step_loss_equals_flow_matching(trained):
    """Step 1's logged loss, recomputed from the cache with the base transformer (LoRA B starts at
    zero) and diffusers alone: x0 = (posterior sample - latents_mean) / latents_std; sigma and t of
    FlowMatchEulerDiscreteScheduler(shift = the pipeline's flow_shift) at a uniform index (an A14B
    expert: among its timesteps only), x_t = scheduler.scale_noise(x0, t, eps); the I2V inputs from
    the pipeline's prepare_latents and encode_image for the clip's first frame; TI2V timesteps per
    token as its pipeline; loss = mean (pred - (eps - x0))^2 over the generated frames."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from cogtune.train.data import batch_generator, epoch_batches

    model, name = trained["model"], trained["family"]
    index_config = json.loads((model / "model_index.json").read_text())
    cache = Cache.open(trained["preprocess"].cache_path)
    rows = [cache.samples[i] for i in epoch_batches([tuple(r.latent_shape) for r in cache.samples], 2, 42, 0)[0]]
    mean = torch.stack([cache.video_tensors(r)["mean"] for r in rows])
    logvar = torch.stack([cache.video_tensors(r)["logvar"] for r in rows])
    text = torch.stack([cache.caption_tensors(r)["prompt_embeds"] for r in rows])
    vae_config = AutoencoderKLWan.load_config(model, subfolder="vae")
    channels = vae_config["z_dim"]
    latents_mean = torch.tensor(vae_config["latents_mean"]).view(1, channels, 1, 1, 1)
    latents_std = torch.tensor(vae_config["latents_std"]).view(1, channels, 1, 1, 1)
    transformer = WanTransformer3DModel.from_pretrained(model, subfolder=expert_part(trained))
    shift = json.loads((model / "scheduler" / "scheduler_config.json").read_text())["flow_shift"]
    flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)

    generator = batch_generator(42, 0)
    posterior = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
    x0 = (posterior - latents_mean) / latents_std
    allowed = torch.arange(1000)
    if index_config.get("boundary_ratio"):
        high = flow.timesteps >= index_config["boundary_ratio"] * 1000
        allowed = allowed[~high if trained["settings"]["expert"] == "low_noise" else high]
    index = allowed[0] + torch.randint(0, len(allowed), (2,), generator=generator)
    t = flow.timesteps[index]
    noise = torch.randn(x0.shape, generator=generator)
    x_t = flow.scale_noise(x0, t, noise)

    model_input, timestep, extra, first = x_t, t, {}, 0
    latent_frames, height, width = x0.shape[2:]
    frame_mask = torch.ones(latent_frames, height, width)
    if name in I2V:
        pipe = pipeline_of(trained, transformer=transformer)
        conditions, frames = [], first_frames(trained, rows)
        for frame in frames:
            out = pipe.prepare_latents(frame, 1, channels, 32, 64, 9, torch.float32, torch.device("cpu"))
            conditions.append(out[1])
        condition = torch.cat(conditions)
        if name in CHANNEL_I2V:
            model_input = torch.cat([x_t, condition], dim=1)
            if pipe.image_encoder is not None:
                extra["encoder_hidden_states_image"] = torch.cat(
                    [pipe.encode_image(pil(frame), torch.device("cpu")) for frame in frames])
        else:  # TI2V: the first latent frame is the image, its tokens at timestep 0
            frame_mask[0] = 0
            model_input = (1 - frame_mask) * condition + frame_mask * x_t
            first = 1
    if index_config.get("expand_timesteps"):
        timestep = torch.stack([(frame_mask[:, ::2, ::2] * step).flatten() for step in t])
    with torch.no_grad():
        pred = transformer(hidden_states=model_input, timestep=timestep, encoder_hidden_states=text,
                           return_dict=False, **extra)[0]
    target = noise - x0
    expected = torch.stack([((pred[b, :, first:] - target[b, :, first:]) ** 2).mean() for b in range(2)]).mean()

    logged = json.loads((trained["out"] / TRAIN_LOG_NAME).read_text().splitlines()[0])["loss"]
    assert logged == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("trained", sorted(I2V & set(WAN)), indirect=True)
def test_wan_image_to_video_training_inputs_equal_the_pipelines(trained):
    """A training step's transformer inputs beside the noisy latents (the mask and image latents, the
    CLIP image tokens, the prompt embedding, the timestep layout) equal what a one-step call of the
    diffusers pipeline feeds the transformer for the same first frame and caption."""
    from cogtune.data_schema import TrainingBatch
    from cogtune.families import ModelConfigs
    from cogtune.families.objectives import Objective
    from cogtune.train.data import LatentDataset
    from cogtune.util.draws import Draws

    cache = Cache.open(trained["preprocess"].cache_path)
    row = cache.samples[0]
    models = ModelConfigs.load(str(trained["model"]))
    if trained["settings"].get("image_to_video"):
        models = models.as_image_to_video()
    spec = models.spec().with_expert(trained["settings"].get("expert"))
    batch = TrainingBatch.collate([LatentDataset(cache)[0]])
    inputs = spec.step_inputs(batch, Draws(torch.Generator().manual_seed(0)), spec.noise_schedule(models), Objective())
    ours = spec.model_inputs(inputs, torch.float32)

    pipe = pipeline_of(trained)
    seen = {}

    def capture(module, args, kwargs):
        seen.setdefault("kwargs", kwargs)

    getattr(pipe, expert_part(trained)).register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        pipe(image=pil(first_frames(trained, [row])[0]), prompt=row.caption, num_frames=9, height=32, width=64,
             num_inference_steps=1, guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(0),
             **({"guidance_scale_2": 1.0} if pipe.config.boundary_ratio else {}))
    theirs = seen["kwargs"]
    channels = spec.latent_channels
    assert ours["hidden_states"].shape == theirs["hidden_states"].shape
    if trained["family"] in CHANNEL_I2V:
        torch.testing.assert_close(ours["hidden_states"][:, channels:], theirs["hidden_states"][:, channels:],
                                   rtol=1e-5, atol=1e-5)
    else:  # TI2V: the first latent frame is the image's latents, at timestep 0
        torch.testing.assert_close(ours["hidden_states"][:, :, :1], theirs["hidden_states"][:, :, :1],
                                   rtol=1e-5, atol=1e-5)
        assert (ours["timestep"] == 0).sum() == (theirs["timestep"] == 0).sum() > 0
    assert ours["timestep"].shape == theirs["timestep"].shape
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"], rtol=1e-5, atol=1e-6)
    if "encoder_hidden_states_image" in ours or theirs.get("encoder_hidden_states_image") is not None:
        torch.testing.assert_close(ours["encoder_hidden_states_image"], theirs["encoder_hidden_states_image"],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trained", WAN, indirect=True)
def test_wan_lora_loads_into_its_diffusers_pipeline(trained):
    """diffusers alone loads the LoRA into the family's pipeline (a low-noise expert's with
    load_into_transformer_2=True), that transformer then computes what the trained one does, and
    the pipeline generates."""
    pipe = pipeline_of(trained)
    low = trained["settings"].get("expert") == "low_noise"
    pipe.load_lora_weights(str(trained["out"]), weight_name=LORA_WEIGHT_NAME,
                           **({"load_into_transformer_2": True} if low else {}))
    transformer = getattr(pipe, expert_part(trained))
    per_token = bool(json.loads((trained["model"] / "model_index.json").read_text()).get("expand_timesteps"))
    kwargs = random_inputs(transformer.config, 500.0, per_token)
    with torch.no_grad():
        loaded = transformer(**kwargs)[0]
        trained_output = trained["train"].transformer.float().eval()(**kwargs)[0]
    assert torch.allclose(loaded, trained_output, atol=1e-5)
    if low:  # the other expert is untouched
        assert not any("lora" in name for name, _ in pipe.transformer.named_parameters())

    frame = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    image = {"image": pil(frame)} if trained["family"] in I2V else {}
    video = pipe(prompt="DEMO a red square", num_frames=9, height=32, width=64, num_inference_steps=2,
                 output_type="np", generator=torch.Generator().manual_seed(0), **image).frames[0]
    assert video.shape == (9, 32, 64, 3) and torch.isfinite(torch.from_numpy(video)).all()


@pytest.mark.parametrize("trained", ["wan2.2-t2v-a14b"], indirect=True)
def test_wan_a14b_expert_is_required_and_recorded(trained, tmp_path):
    info = json.loads((trained["out"] / LORA_INFO_NAME).read_text())
    assert info["expert"] == "low_noise"
    config = tmp_path / "no-expert.toml"
    config.write_text("\n".join(line for line in trained["config"].read_text().splitlines()
                                if not line.startswith("expert")) + "\n")
    with pytest.raises(CogtuneError, match="has two experts: give --expert high_noise"):
        run_stages(config, "train", extra=["--output_dir", tmp_path / "out"])
    assert not (tmp_path / "out").exists()


def test_wan_refuses_what_only_cogvideox_has(models, demo_data, tmp_path):
    from cogtune.families import ModelConfigs

    spec = ModelConfigs.load(str(models["wan2.1-t2v-1.3b"])).spec()
    with pytest.raises(CogtuneError, match="--expert high_noise is for models with two experts"):
        spec.with_expert("high_noise")
    with pytest.raises(CogtuneError, match="--image_to_video is for models that do both"):
        ModelConfigs.load(str(models["wan2.1-t2v-1.3b"])).as_image_to_video()
    assert spec.size_multiple == 16 and ModelConfigs.load(str(models["wan2.2-ti2v-5b"])).spec().size_multiple == 32


# The renames of diffusers' scripts/convert_wan_to_diffusers.py (TRANSFORMER_KEYS_RENAME_DICT) for a
# block's linear layers, applied in its order: Wan's original module names -> diffusers'.
CONVERSION_RENAMES = {"ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2", "self_attn.q": "attn1.to_q",
                      "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v", "self_attn.o": "attn1.to_out.0",
                      "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
                      "cross_attn.o": "attn2.to_out.0", "attn2.to_k_img": "attn2.add_k_proj",
                      "attn2.to_v_img": "attn2.add_v_proj"}
ORIGINAL_BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                          "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")


@pytest.mark.parametrize("trained", ["wan2.1-i2v-14b-480p"], indirect=True)
def test_wan_comfyui_export_loads_as_comfyui_maps_wan_keys(trained, tmp_path):
    """The exported file, applied as ComfyUI applies it to its WanModel (whose modules keep Wan's
    original names: `lora_unet_<name, "." -> "_">` -> `diffusion_model.<name>.weight`, W += alpha /
    rank * up @ down), gives the trained transformer's output. The original names are mapped to the
    diffusers modules here by the conversion script's renames, not by cogtune's table."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    from conftest import cogtune_here

    exported = tmp_path / "comfy.safetensors"
    cogtune_here("export", "--format", "comfyui", "--lora", trained["out"], "--output", exported)
    state = load_file(exported)
    base = WanTransformer3DModel.from_pretrained(trained["model"], subfolder="transformer")
    modules = dict(base.named_modules())
    comfy_names = {}
    for block in range(len(base.blocks)):
        for original in ORIGINAL_BLOCK_LINEARS:
            name = f"blocks.{block}.{original}"
            converted = name
            for old, new in CONVERSION_RENAMES.items():
                converted = converted.replace(old, new)
            comfy_names["lora_unet_" + name.replace(".", "_")] = converted
    adapted = {key.rsplit(".", 2)[0] for key in state if key.endswith(".lora_down.weight")}
    assert adapted and adapted <= set(comfy_names), sorted(adapted - set(comfy_names))
    for name in adapted:
        module = modules[comfy_names[name]]
        up, down = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"]
        module.weight.data += state[f"{name}.alpha"].item() / down.shape[0] * up @ down
    kwargs = random_inputs(base.config, 500.0)
    with torch.no_grad():
        merged = base(**kwargs)[0]
        expected = trained["train"].transformer.float().eval()(**kwargs)[0]
    assert torch.allclose(merged, expected, atol=1e-5)


@pytest.mark.parametrize("trained", ["wan2.1-i2v-14b-480p"], indirect=True)
def test_wan_on_two_processes_equals_one_process_with_the_same_global_batch(trained, tmp_path):
    """DDP over two processes (gloo), a sample each: the losses and the LoRA of the one-process run
    with batches of two (its image conditions and CLIP tokens included)."""
    from test_distributed import assert_same_training, torchrun

    out = tmp_path / "two"
    torchrun("-m", "cogtune.cli", "train", "--config", trained["config"], "--train_batch_size", "1",
             "--output_dir", out)
    assert_same_training(out, trained["out"], tolerance=1e-3)  # to a thousandth of each tensor's scale


def test_wan_takes_the_training_options_and_merges(models, demo_data, tmp_path):
    """Wan 2.1 I2V through what a CogVideoX run has beyond one size: buckets of two sizes, every
    window of a clip (chunk), caption dropout to the empty prompt's embedding, EMA, DoRA on every
    linear layer of its blocks (the added image K/V projections included), a warm start from a LoRA,
    and `cogtune merge`, whose pipeline computes what base + LoRA does."""
    from diffusers import WanImageToVideoPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    from conftest import cogtune_here, write_config

    model = models["wan2.1-i2v-14b-480p"]
    config = write_config(tmp_path / "c.toml", model, demo_data, tmp_path / "cache", tmp_path / "first",
                          buckets=["9x32x64", "5x32x32"], frame_extraction="chunk", caption_dropout_p=0.5,
                          max_train_steps=2)
    cogtune_here("preprocess", "--config", config)
    cogtune_here("train", "--config", config)
    common = ["--config", config, "--output_dir", tmp_path / "out", "--use_ema", "--use_dora",
              "--lora_target_preset", "all_linear", "--init_lora", tmp_path / "first" / LORA_WEIGHT_NAME,
              "--lora_alpha", "2", "--rank", "4"]
    result = cogtune_here("train", *common)
    assert "LoRA: starts from" in result.stderr + result.stdout
    saved = load_file(tmp_path / "out" / LORA_WEIGHT_NAME)
    assert any("attn2.add_k_proj" in key for key in saved) and any("ffn.net.2" in key for key in saved)
    assert any(key.endswith("lora_magnitude_vector") for key in saved)
    assert (tmp_path / "out" / "pytorch_lora_weights_ema.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "out" / TRAIN_LOG_NAME).read_text().splitlines()]
    assert len(log) == 2 and all(0 < r["loss"] < 100 for r in log)

    cogtune_here("merge", "--lora", tmp_path / "out", "--merged_dir", tmp_path / "merged", "--dtype", "no")
    merged = WanImageToVideoPipeline.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.transformer.modules())
    pipe = WanImageToVideoPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(tmp_path / "out"), weight_name=LORA_WEIGHT_NAME)
    kwargs = random_inputs(merged.transformer.config, 300.0)
    with torch.no_grad():
        assert torch.allclose(merged.transformer(**kwargs)[0], pipe.transformer(**kwargs)[0], atol=1e-5)


@pytest.mark.parametrize("trained", ["wan2.2-t2v-a14b"], indirect=True)
def test_wan_a14b_infer_loads_each_experts_lora_into_its_expert(trained, tmp_path):
    """`cogtune infer --lora HIGH --expert_lora LOW` generates what diffusers does with the high-noise
    LoRA in `transformer` and the low-noise one in `transformer_2` (the same mp4 bytes); two LoRAs of
    one expert are refused."""
    import numpy as np
    from diffusers import WanPipeline

    from cogtune.util.media import write_mp4

    high = tmp_path / "high"
    run_stages(trained["config"], "train", extra=["--expert", "high_noise", "--output_dir", high,
                                                  "--max_train_steps", "2"])
    (video,) = run_stages(trained["config"], "infer", extra=["--lora", high, "--expert_lora", trained["out"],
                                                             "--video_output_dir", tmp_path / "videos"])["infer"]
    pipe = WanPipeline.from_pretrained(trained["model"])
    pipe.load_lora_weights(str(high), weight_name=LORA_WEIGHT_NAME, adapter_name="high")
    pipe.load_lora_weights(str(trained["out"]), weight_name=LORA_WEIGHT_NAME, adapter_name="low",
                           load_into_transformer_2=True)
    frames = pipe(prompt="DEMO a red square moves", num_frames=9, height=32, width=64, num_inference_steps=2,
                  guidance_scale=6.0, generator=torch.Generator().manual_seed(42), output_type="np",
                  max_sequence_length=512).frames[0]
    expected = tmp_path / "expected.mp4"
    write_mp4(expected, (np.clip(frames, 0, 1) * 255).round().astype(np.uint8), 8)
    assert video.read_bytes() == expected.read_bytes()
    with pytest.raises(CogtuneError, match="experts low_noise and low_noise"):
        run_stages(trained["config"], "infer", extra=["--expert_lora", trained["out"]])


@pytest.mark.parametrize("trained", ["wan2.2-ti2v-5b-i2v"], indirect=True)
def test_wan_blocks_swap_and_offload_their_checkpoints_exactly(trained, tmp_path):
    """Block swap over Wan's `blocks` and checkpoints kept in CPU memory wrap every block call (its
    arguments, its saved states, its outputs) and change no number: the losses and the LoRA equal
    plain gradient checkpointing's, byte for byte. (On a CPU the tensors stay in CPU memory; what is
    checked is that the hooks take Wan's blocks as they are.)"""
    runs = {}
    for name, flags in (("plain", []), ("moved", ["--blocks_to_swap", "1", "--gradient_checkpointing_cpu_offload"])):
        out = tmp_path / name
        runs[name] = run_stages(trained["config"], "train", extra=["--output_dir", out, "--max_train_steps", "2",
                                                                   "--validation_steps", "100",
                                                                   "--gradient_checkpointing", *flags])["train"]
    assert runs["moved"].losses == runs["plain"].losses
    assert (tmp_path / "moved" / LORA_WEIGHT_NAME).read_bytes() == (tmp_path / "plain" / LORA_WEIGHT_NAME).read_bytes()
