"""A quantized frozen base (--quant_backend, --quant_type): training runs with every backend a CPU
can run, its loss stays close to the unquantized loss, its LoRA loads into an unquantized pipeline,
and the --dry_run estimate counts the quantized weights as they are stored."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cogtune import quantize
from cogtune.config import load_config
from cogtune.errors import CogtuneError
from cogtune.families import ModelConfigs
from cogtune.train.memory import memory_estimate
from cogtune.train.model import build_transformer

from conftest import cogtune_here, write_config
from test_memory import MAX_OVER, MAX_UNDER, inner_tensors, measured_peak

# What a CPU runs: bitsandbytes quantizes on a CUDA GPU only (diffusers), and torchao's int4wo
# needs the mslk kernels package (CUDA); neither is checked here.
CPU_BACKENDS = [("torchao", "int8wo"), ("torchao", "float8wo"), ("quanto", "int8"), ("quanto", "float8"),
                ("quanto", "int4")]
# The stated tolerance on the first step's loss (the frozen base alone: LoRA's B starts at zero),
# relative to the unquantized loss. 8-bit weights with a scale per row change each weight by at most
# half a step, 1/254 of its row's largest (int8) or 1/16 of its own size (float8 e4m3's 3-bit mantissa);
# 4-bit weights by up to 1/30 of their group's range.
LOSS_TOLERANCE = {"int8wo": 0.02, "int8": 0.02, "float8wo": 0.06, "float8": 0.06, "int4": 0.15}


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: for tensor subclasses (torchao's, quanto's), their parts'."""
    return sum(t.untyped_storage().nbytes() for t in inner_tensors(tensor))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, demo_data):
    """The same 3-step run, unquantized and under each CPU backend: (first loss, LoRA) by name."""
    root = tmp_path_factory.mktemp("quantized")
    runs = {}
    for backend, kind in [("none", None)] + CPU_BACKENDS:
        name = f"{backend}-{kind}"
        config = write_config(root / f"{name}.toml", tiny_model, demo_data, root / "cache", root / name,
                              max_train_steps=3, checkpointing_steps=2)
        if not runs:
            cogtune_here("preprocess", "--config", config)
        flags = [] if backend == "none" else ["--quant_backend", backend, "--quant_type", kind]
        cogtune_here("train", "--config", config, *flags)
        first = json.loads((root / name / "train_log.jsonl").read_text().splitlines()[0])["loss"]
        runs[kind] = (first, load_file(root / name / "pytorch_lora_weights.safetensors"), config, flags)
    return runs


@pytest.mark.parametrize("backend, kind", CPU_BACKENDS)
def test_a_quantized_base_trains_close_to_the_unquantized_one(trained, tiny_model, backend, kind):
    plain_loss, plain_lora, _, _ = trained[None]
    loss, lora, _, _ = trained[kind]
    assert abs(loss - plain_loss) <= LOSS_TOLERANCE[kind] * plain_loss, (loss, plain_loss)
    assert loss != plain_loss  # the weights were quantized
    assert lora.keys() == plain_lora.keys()  # the names of an unquantized model's LoRA
    assert all(tensor.dtype == torch.float32 for tensor in lora.values())
    assert any(lora[key].abs().sum() > 0 for key in lora if "lora_B" in key)  # it trained
    # It loads into the unquantized pipeline.
    from diffusers import CogVideoXPipeline

    pipeline = CogVideoXPipeline.from_pretrained(tiny_model)
    pipeline.load_lora_weights(lora)
    assert pipeline.get_active_adapters()


def test_a_quantized_run_resumes_as_if_never_stopped(trained, tmp_path):
    _, uninterrupted, config, flags = trained["int8wo"]
    output = load_config("train", ["--config", str(config)]).output_dir
    (tmp_path / "resumed").mkdir()
    cogtune_here("train", "--config", config, *flags, "--output_dir", tmp_path / "resumed",
                 "--resume_from_checkpoint", f"{output}/checkpoint-2")
    resumed = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    for key in uninterrupted:
        assert torch.allclose(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-7), key


@pytest.mark.parametrize("checkpointing", [[], ["--gradient_checkpointing"]])
@pytest.mark.parametrize("backend, kind", CPU_BACKENDS)
def test_the_estimate_counts_quantized_weights_as_stored(tiny_models, backend, kind, checkpointing):
    models = ModelConfigs.load(str(tiny_models("5b")))
    config = load_config("train", ["--pretrained_model_name_or_path", models.location, "--mixed_precision", "no",
                                   "--rank", "8", "--quant_backend", backend, "--quant_type", kind, *checkpointing])
    transformer = build_transformer(config, models, models.spec(), torch.device("cpu"))
    frozen = [t for t in [*transformer.parameters(), *transformer.buffers()] if not t.requires_grad]
    stored = sum(stored_bytes(t) for t in frozen)
    plain = sum(t.numel() * t.element_size() for t in frozen)
    estimate = memory_estimate(config, models, [4, 3, 16, 16])
    assert stored < 0.6 * plain  # (the tiny model's norms and embeddings are a large share of it)
    assert abs(estimate.weights - stored) <= 0.02 * stored, (estimate.weights, stored)
    measured = measured_peak(config, models, [4, 3, 16, 16])
    assert measured * (1 - MAX_UNDER) <= estimate.total <= measured * (1 + MAX_OVER), (estimate, measured)


def test_bitsandbytes_on_a_cpu_and_mixed_options_are_refused_before_loading(tmp_path, tiny_model, demo_data):
    config = write_config(tmp_path / "c.toml", tiny_model, demo_data, tmp_path / "cache", tmp_path / "out")
    with pytest.raises(CogtuneError, match="not a type of --quant_backend torchao: use one of int8wo"):
        load_config("train", ["--config", str(config), "--quant_backend", "torchao", "--quant_type", "nf4"])
    with pytest.raises(CogtuneError, match="pick one"):
        load_config("train", ["--config", str(config), "--quant_backend", "quanto", "--layerwise_casting_storage_dtype",
                              "float8_e4m3fn"])
    with pytest.raises(CogtuneError, match="--quant_type int8 needs --quant_backend"):
        load_config("train", ["--config", str(config), "--quant_type", "int8"])
    with pytest.raises(CogtuneError, match="--components_to_quantize: unet is not a part of the pipeline"):
        load_config("infer", ["--config", str(config), "--quant_backend", "torchao", "--components_to_quantize",
                              "transformer", "unet"])
    with pytest.raises(CogtuneError, match="pick one"):
        load_config("infer", ["--config", str(config), "--enable_sequential_cpu_offload", "--enable_model_cpu_offload"])
    with pytest.raises(CogtuneError, match="CUDA GPU only"):
        quantize.require("bitsandbytes_4bit", torch.device("cpu"))
    # The estimate of a GPU-only backend needs no GPU.
    nf4 = load_config("train", ["--pretrained_model_name_or_path", str(tiny_model), "--quant_backend",
                                "bitsandbytes_4bit", "--mixed_precision", "no"])
    models = ModelConfigs.load(str(tiny_model))
    plain = load_config("train", ["--pretrained_model_name_or_path", str(tiny_model), "--mixed_precision", "no"])
    assert memory_estimate(nf4, models, [4, 3, 4, 8]).weights < memory_estimate(plain, models, [4, 3, 4, 8]).weights


@pytest.mark.parametrize("backend, kind", [("torchao", "int8wo"), ("quanto", "int8")])
def test_infer_quantizes_the_parts_it_is_told_and_generates(trained, tiny_model, tmp_path, backend, kind):
    import av
    import diffusers

    from cogtune.util.devices import precision_dtype

    _, _, config, _ = trained[None]
    components = ["transformer", "text_encoder"]
    quantization = quantize.pipeline_config(backend, kind, components, precision_dtype("no"))
    pipe = ModelConfigs.load(str(tiny_model)).load_part(diffusers.CogVideoXPipeline, None, dtype=torch.float32,
                                                        quantization_config=quantization)
    plain_weights = {name: type(getattr(pipe, name).get_submodule(path).weight) for name, path in
                     [("transformer", "transformer_blocks.0.attn1.to_q"), ("text_encoder", "encoder.block.0.layer.0.SelfAttention.q"),
                      ("vae", "encoder.conv_in.conv")]}
    assert plain_weights["transformer"] is not torch.nn.Parameter and plain_weights["text_encoder"] is not torch.nn.Parameter
    assert plain_weights["vae"] is torch.nn.Parameter  # not in components_to_quantize
    out = cogtune_here("infer", "--config", config, "--quant_backend", backend, "--quant_type", kind,
                       "--video_output_dir", tmp_path, "--num_inference_steps", "2").stdout
    with av.open(out.split("video: ")[1].strip()) as container:
        assert len(list(container.decode(video=0))) == 9


def test_preprocess_with_a_quantized_t5_writes_another_cache_of_close_embeddings(tmp_path, tiny_model, demo_data):
    from cogtune.cache.reader import Cache

    from conftest import cache_path_of

    config = write_config(tmp_path / "c.toml", tiny_model, demo_data, tmp_path / "cache", tmp_path / "out")
    plain = cache_path_of(cogtune_here("preprocess", "--config", config).stdout)
    quantized = cache_path_of(cogtune_here("preprocess", "--config", config, "--text_encoder_quant_backend",
                                           "torchao").stdout)
    assert plain != quantized
    settings = [json.loads((path / "manifest.json").read_text())["settings"] for path in (plain, quantized)]
    assert "text_encoder_quantization" not in settings[0]  # an unquantized cache keeps the name it had
    assert settings[1]["text_encoder_quantization"] == "torchao int8wo"
    a, b = Cache.open(plain), Cache.open(quantized)
    rows = {row.sample_id: row for row in b.samples}
    assert sorted(rows) == sorted(row.sample_id for row in a.samples)
    for row in a.samples:
        embeds = a.caption_tensors(row)["prompt_embeds"]
        quantized_embeds = b.caption_tensors(rows[row.sample_id])["prompt_embeds"]
        error = (embeds - quantized_embeds).norm() / embeds.norm()
        assert 0 < error <= 0.05, error  # int8 weights, the tolerance of the training loss above, with margin
        mine, theirs = a.video_tensors(row), b.video_tensors(rows[row.sample_id])
        assert all(torch.equal(mine[name], theirs[name]) for name in ("mean", "logvar"))
