"""The Wan family's own rules, from its published config files, against diffusers' own objects."""

import json
from pathlib import Path

import pytest
import torch


def published(name: str):
    from cogtune.families import PUBLISHED_DIR, ModelConfigs

    return ModelConfigs.load(str(PUBLISHED_DIR / name))


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-i2v-14b-720p", "wan2.2-ti2v-5b", "wan2.2-t2v-a14b",
                                  "wan2.2-i2v-a14b"])
def test_each_published_wan_pipeline_is_told_apart_by_its_configs(name):
    spec = published(name).spec()
    index = json.loads((Path(published(name).location) / "model_index.json").read_text())
    assert spec.pipeline_class_name == index["_class_name"]
    assert spec.image_conditioned == ("i2v" in name and "ti2v" not in name)
    assert spec.two_experts == ("a14b" in name) and spec.expand_timesteps == ("ti2v" in name)
    assert (spec.latent_channels, spec.vae_scale_spatial, spec.size_multiple) == \
        ((48, 16, 32) if "ti2v" in name else (16, 8, 16))
    assert spec.tensors.first_frame == {"wan2.1-i2v-14b-720p": ("condition", "image_embeds"),
                                        "wan2.2-i2v-a14b": ("condition",)}.get(name, ())
    assert spec.image_tokens == (257 if name == "wan2.1-i2v-14b-720p" else 0)  # CLIP ViT-H/14 at 224


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_the_training_sigmas_are_the_flow_match_schedulers(shift):
    """Our 1000 sigma levels and timesteps are FlowMatchEulerDiscreteScheduler's (what the Wan pipelines'
    flow-matching schedulers give at each sigma), computed in float64."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cogtune.families.wan import FlowSchedule

    ours = FlowSchedule.shifted(shift)
    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    torch.testing.assert_close(ours.sigmas.float(), theirs.sigmas, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.timesteps.float(), theirs.timesteps, rtol=1e-6, atol=1e-4)


def test_an_a14b_expert_draws_only_its_timesteps():
    """The high-noise expert's levels are those the pipeline gives `transformer` (t >= boundary_ratio x
    1000), the low-noise expert's those below; together, every level once."""
    models = published("wan2.2-t2v-a14b")
    high, low = (models.spec().with_expert(expert).noise_schedule(models) for expert in ("high_noise", "low_noise"))
    boundary = 0.875 * 1000
    assert (high.first, high.first + len(high), low.first, low.first + len(low)) == (0, high.first + len(high),
                                                                                   len(high), 1000)
    assert (high.timesteps[:len(high)] >= boundary).all() and (low.timesteps[low.first:] < boundary).all()
    assert models.spec().with_expert("low_noise").transformer_part == "transformer_2"


def test_wan_module_names_export_as_the_original_checkpoints_name_them():
    spec = published("wan2.1-i2v-14b-480p").spec()
    assert spec.exported_module("blocks.3.attn1.to_out.0") == "blocks.3.self_attn.o"
    assert spec.exported_module("blocks.0.attn2.add_k_proj") == "blocks.0.cross_attn.k_img"
    assert spec.exported_module("blocks.12.ffn.net.0.proj") == "blocks.12.ffn.0"
    from cogtune.errors import CogtuneError

    with pytest.raises(CogtuneError, match="no name in Wan's original layout"):
        spec.exported_module("blocks.0.norm2")


def test_options_of_the_other_family_are_refused_by_each():
    """--snr_gamma weighs v-prediction (CogVideoX), --flow_shift is a flow sampler's (Wan)."""
    from cogtune.errors import CogtuneError
    from cogtune.families import PUBLISHED_DIR, ModelConfigs
    from cogtune.families.objectives import Objective

    wan = published("wan2.1-t2v-1.3b").spec()
    cogvideox = ModelConfigs.load(str(PUBLISHED_DIR / "cogvideox-5b")).spec()
    with pytest.raises(CogtuneError, match="--snr_gamma weights a v-prediction loss"):
        wan.check_objective(Objective(snr_gamma=5.0))
    wan.check_objective(Objective(timestep_sampling="logit_normal"))
    cogvideox.check_objective(Objective(snr_gamma=5.0))
    with pytest.raises(CogtuneError, match="--flow_shift is for flow-matching models"):
        cogvideox.check_flow_shift(5.0)
    wan.check_flow_shift(5.0)
