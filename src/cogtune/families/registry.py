"""Which family reads a pipeline: keyed by its model_index.json `_class_name`, never by its name."""

from __future__ import annotations

from cogtune.errors import CogtuneError
from cogtune.families.base import ModelFamily
from cogtune.families.cogvideox import CogVideoX
from cogtune.families.wan import Wan

FAMILIES: tuple[type[ModelFamily], ...] = (CogVideoX, Wan)
BY_PIPELINE: dict[str, type[ModelFamily]] = {name: family for family in FAMILIES for name in family.pipelines}
# `cogtune init --family` and `cogtune make-tiny-model --family` names -> (family, description)
VARIANTS: dict[str, tuple[type[ModelFamily], str]] = {
    variant: (family, description) for family in FAMILIES for variant, description in family.variants.items()}


def supported_pipelines() -> str:
    return ", ".join(BY_PIPELINE)


def family_class(pipeline_class_name: str | None, where: str) -> type[ModelFamily]:
    """The family of a pipeline whose model_index.json names this class; a one-line refusal naming
    the supported pipelines for any other."""
    family = BY_PIPELINE.get(pipeline_class_name or "")
    if family is None:
        raise CogtuneError(f"{where} is a {pipeline_class_name or 'pipeline without a _class_name'}, which cogtune "
                           f"does not train; it supports {supported_pipelines()}.")
    return family


def published_folder_name(hub_id: str) -> str | None:
    """The folder of shipped config files of a published hub id (any case), or None."""
    key = hub_id.strip("/").lower()
    return next((family.published[key] for family in FAMILIES if key in family.published), None)
