"""The runs the family contract tests share: every variant of every family the registry knows, as a
tiny random-weight model (seed 3), each preprocessed, trained 4 steps, validated and generated once
per session (the `trained` fixture of conftest.py), and helpers to run stages in this process."""

from pathlib import Path

import av
import torch

from cogtune import infer, preprocess, train
from cogtune.config import data_settings, load_config
from cogtune.dev.tiny import TINY_ALIASES
from cogtune.families import VARIANTS

# Contract runs: name -> (variant, its settings beyond the demo's). Variants whose tiny models are the
# same structure (Wan 2.1 T2V 1.3B and 14B, I2V 480P and 720P) run once; a model with two modes or two
# experts runs each mode and each expert once.
CONTRACT = {variant: (variant, {}) for variant in VARIANTS if variant not in TINY_ALIASES}
CONTRACT["wan2.2-ti2v-5b-i2v"] = ("wan2.2-ti2v-5b", {"image_to_video": True})
CONTRACT["wan2.2-t2v-a14b"] = ("wan2.2-t2v-a14b", {"expert": "low_noise"})
CONTRACT["wan2.2-i2v-a14b"] = ("wan2.2-i2v-a14b", {"expert": "high_noise"})
I2V = {"5b-i2v", "1.5-5b-i2v", "wan2.1-i2v-14b-480p", "wan2.2-ti2v-5b-i2v", "wan2.2-i2v-a14b"}
COGVIDEOX = [name for name, (variant, _) in CONTRACT.items() if VARIANTS[variant][0].name == "CogVideoX"]
WAN = [name for name, (variant, _) in CONTRACT.items() if VARIANTS[variant][0].name == "Wan"]


def run_stages(config: Path, *stages, extra=()):
    """The stages in this process, through the same config and flag parsing as the command line."""
    argv = ["--config", str(config), *map(str, extra)]
    results = {}
    if "preprocess" in stages:
        results["preprocess"] = preprocess.run(load_config("preprocess", argv))
    if "train" in stages:
        train_config = load_config("train", argv)
        results["train"] = train.run(train_config, data_settings(train_config, argv))
    if "infer" in stages:
        results["infer"] = infer.run(load_config("infer", argv))
    return results


def read_video(path: Path):
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def training_transformer(model: Path, settings: dict, argv=(), precision: str = "no"):
    """A variant's transformer as training builds it (rank-4 LoRA), on the CPU, and its family."""
    from cogtune.families import ModelConfigs
    from cogtune.train.model import build_transformer

    flags = ["--pretrained_model_name_or_path", str(model), "--mixed_precision", precision, "--rank", "4",
             "--lora_alpha", "4", *argv]
    for key, value in settings.items():
        flags += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    config = load_config("train", flags)
    models = ModelConfigs.of(config)
    spec = models.spec()
    return build_transformer(config, models, spec, "cpu"), spec


def transformer_loss(transformer, spec, backward=True, dtype=torch.float32):
    """An MSE loss of the transformer's output on fixed random inputs of the shapes training gives it
    (the LoRA's B filled with fixed values, so that A's gradients are not zero), and with backward the
    gradient of every LoRA weight."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    shape = [transformer.config.out_channels, 3, 4, 8]
    inputs = spec.memory_inputs(1, shape, transformer.config.in_channels, dtype, "cpu")
    for name, value in inputs.items():
        if torch.is_tensor(value) and value.is_floating_point() and name != "image_rotary_emb":
            value.copy_(torch.randn(value.shape, generator=generator))
        elif torch.is_tensor(value) and not value.is_floating_point():
            value.fill_(500)
    with torch.set_grad_enabled(backward), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = transformer(**inputs, return_dict=False)[0]
        loss = (out.float() - torch.randn(out.shape, generator=generator)).pow(2).mean()
    if not backward:
        return loss.detach(), {}
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in transformer.named_parameters() if p.requires_grad}
