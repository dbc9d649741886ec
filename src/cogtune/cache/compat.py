"""Whether a cache fits the model a run trains: the same family and encoders (and their weights),
the same kind of model, the same tensors and text length."""

from __future__ import annotations

from pathlib import Path

from cogtune import data_schema as schema
from cogtune.errors import CogtuneError
from cogtune.families import ModelFamily


def check_compatible(manifest: schema.Manifest, model: dict, cache_path: Path) -> None:
    """Refuse a cache whose tensors came from another family, other encoders or other encoder weights
    than model's (ModelConfigs.identity())."""
    built_for = manifest.model
    expected = {"family": model["family"], "components": model["components"]}
    if built_for.weights_sha256 is not None and model.get(schema.WEIGHTS_DIGEST) is not None:
        expected[schema.WEIGHTS_DIGEST] = model[schema.WEIGHTS_DIGEST]  # the same configs, other weights
    differences = schema.describe_differences(expected, {k: getattr(built_for, k) for k in expected})
    if differences:
        raise CogtuneError(
            f"The cache {cache_path} was built for another model: {built_for.pretrained_model_name_or_path}, "
            f"a {built_for.description} model, not {model['pretrained_model_name_or_path']}, a "
            f"{model['description']} model. Their encoders differ:\n  " + "\n  ".join(differences)
            + "\nPreprocess the data with the model you train, or train the model the cache was built for."
        )


def check_for_training(manifest: schema.Manifest, model: dict, spec: ModelFamily, cache_path: Path) -> None:
    """Refuse a cache that the model to train cannot use: another VAE or T5, the other kind of model
    (text- or image-to-video), another text length."""
    check_compatible(manifest, model, cache_path)
    variants = manifest.settings.image_noise_variants
    if spec.image_conditioned and not variants:
        raise CogtuneError(
            f"The cache {cache_path} was built for a text-to-video model and holds no first-frame latents, but "
            f"the model to train is a {spec.description} model. Preprocess the data with this model first."
        )
    if variants and not spec.image_conditioned:
        raise CogtuneError(
            f"The cache {cache_path} was built for an image-to-video model, but the model to train is a "
            f"{spec.description} model. Preprocess the data with this model first."
        )
    if manifest.tensors != spec.tensors:
        raise CogtuneError(
            f"The cache {cache_path} holds the tensors {manifest.tensors.to_json()}, but a {spec.description} model "
            f"trains on {spec.tensors.to_json()}. Preprocess the data with this model first.")
    cached_text_length = manifest.settings.text_length
    if cached_text_length != spec.text_length:
        raise CogtuneError(
            f"The cache {cache_path} holds text embeddings of {cached_text_length} tokens but the transformer takes "
            f"{spec.text_length}."
        )
