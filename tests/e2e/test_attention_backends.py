"""--attention_backend: through diffusers' dispatcher, every family's transformer gives the output, the
loss and the LoRA gradients of its own attention processor (CogVideoX's is replaced by ours of the same
math); a backend that cannot run here is refused before any weights load."""

import shutil

import pytest
import torch
from contract import CONTRACT, training_transformer, transformer_loss

from cogtune.config import load_config
from cogtune.errors import CogtuneError
from cogtune.families import ModelConfigs
from cogtune.families.attention import check_attention_backend
from cogtune.train.model import build_transformer


@pytest.fixture
def restored_backend():
    """set_attention_backend also sets diffusers' process-wide default: put it back for the next test."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    saved = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(saved)


def loss_and_lora_gradients(model, settings, backward=True, backend=None, then=None):
    """transformer_loss of the family's transformer built for training (with --attention_backend backend);
    then: a backend to switch the built transformer to first (as infer switches a pipeline's), past the
    training checks of --attention_backend."""
    transformer, spec = training_transformer(model, settings, ["--attention_backend", backend] if backend else [])
    if then:
        spec.use_attention_backend(transformer, then)
    return transformer_loss(transformer, spec, backward)


@pytest.mark.parametrize("name", list(CONTRACT))
def test_native_backends_give_each_familys_loss_and_lora_gradients(models, name, restored_backend):
    variant, settings = CONTRACT[name]
    loss, gradients = loss_and_lora_gradients(models[variant], settings)
    assert gradients and any(g.abs().sum() > 0 for g in gradients.values())
    for backend in ("native", "_native_math"):
        other_loss, other = loss_and_lora_gradients(models[variant], settings, backend=backend)
        torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=1e-6)
        assert other.keys() == gradients.keys()
        for key in gradients:
            torch.testing.assert_close(other[key], gradients[key], rtol=1e-4, atol=1e-6, msg=f"{backend}: {key}")


@pytest.mark.parametrize("name", list(CONTRACT))
def test_flex_attention_gives_each_familys_loss(models, name, restored_backend):
    """FlexAttention runs forward only on the CPU (its backward needs a GPU): the loss, not the gradients."""
    variant, settings = CONTRACT[name]
    loss, _ = loss_and_lora_gradients(models[variant], settings, backward=False)
    with pytest.raises(CogtuneError, match="no backward pass there"):
        loss_and_lora_gradients(models[variant], settings, backend="flex")
    flex_loss, _ = loss_and_lora_gradients(models[variant], settings, backward=False, then="flex")
    torch.testing.assert_close(flex_loss, loss, rtol=1e-5, atol=1e-6)


def test_cogvideox_gets_our_dispatching_processor_only_with_the_flag(models, restored_backend):
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    from cogtune.families.cogvideox import DispatchingCogVideoXAttnProcessor

    def processors(backend):
        transformer, _ = training_transformer(models["2b"], {}, ["--attention_backend", backend] if backend else [])
        return [block.attn1.processor for block in transformer.transformer_blocks]

    assert all(type(p) is CogVideoXAttnProcessor2_0 for p in processors(None))
    native = processors("native")
    assert all(isinstance(p, DispatchingCogVideoXAttnProcessor) and p._attention_backend == "native" for p in native)


@pytest.mark.parametrize("backend, training, says", [
    ("sage", True, "refused for training: SageAttention"),
    ("flash", False, "flash-attn"),
    ("_native_cudnn", False, "needs a CUDA GPU"),
    ("xformers", False, "xformers"),
    ("flex", True, "no backward pass there"),
])
def test_a_backend_that_cannot_run_here_is_refused_naming_what_to_do(backend, training, says):
    with pytest.raises(CogtuneError, match=says):
        check_attention_backend(backend, torch.device("cpu"), torch.float32, training=training)


def test_half_precision_kernels_are_refused_in_fp32_and_sage_may_train_when_the_user_accepts_it(monkeypatch):
    import diffusers.models.attention_dispatch as dispatch

    monkeypatch.setattr(dispatch, "_check_attention_backend_requirements", lambda backend: None)  # as if installed
    with pytest.raises(CogtuneError, match="fp16 or bf16 only"):
        check_attention_backend("flash", torch.device("cuda"), torch.float32, training=False)
    with pytest.raises(CogtuneError, match="needs a CUDA GPU"):
        check_attention_backend("sage", torch.device("cpu"), torch.bfloat16, training=True, allow_inexact=True)


def test_the_backend_is_checked_before_any_weights_load(models, tmp_path):
    """A pipeline folder whose transformer has no weights: the refusal comes first, not a loading error."""
    folder = tmp_path / "no-weights"
    shutil.copytree(models["wan2.1-t2v-1.3b"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    config = load_config("train", ["--pretrained_model_name_or_path", str(folder), "--attention_backend", "flash"])
    configs = ModelConfigs.of(config)
    with pytest.raises(CogtuneError, match="--attention_backend flash"):
        build_transformer(config, configs, configs.spec(), "cpu")


def test_a_run_with_the_native_backend_trains_validates_and_generates_as_without(models, demo_data, tmp_path,
                                                                                 restored_backend):
    """The flag through the stages: the same per-step losses, and validation and infer run with it."""
    import json

    from conftest import write_config
    from contract import run_stages

    config = write_config(tmp_path / "c.toml", models["5b"], demo_data, tmp_path / "cache", tmp_path / "out",
                          max_train_steps=2, validation_prompt="DEMO a red square", validation_steps=2,
                          validation_num_inference_steps=2)
    run_stages(config, "preprocess", "train")
    plain = [json.loads(line)["loss"] for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    run_stages(config, "train", "infer", extra=["--attention_backend", "native", "--overwrite_output_dir"])
    native = [json.loads(line)["loss"] for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert native == pytest.approx(plain, rel=1e-5) and len(native) == 2
    assert list((tmp_path / "out" / "validation").rglob("*.mp4")) and list((tmp_path / "out" / "videos").glob("*.mp4"))
