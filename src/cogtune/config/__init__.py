"""Settings: groups of settings by concern, composed into one dataclass per stage, filled from a TOML
file and then from command-line flags.

    base.py            opt (a setting and its flag), the rules numbers keep, Group (a group checks itself)
    common.py          the groups several stages take: model, VAE memory, sizes, folders, validation, ...
    preprocessing.py   the dataset, the clips, the cache's contents, the text encoder, the preview
    training.py        the LoRA, batches, checkpoints, optimizer, schedule, objective, memory, tracking
    generation.py      what infer generates, and its memory

Flag names and meanings follow the diffusers CogVideoX example scripts: every setting is one flat
flag, whatever its group. A config file is flat (`key = value`, the flag names without dashes) and
may hold `[preprocess]`, `[train]` and `[infer]` tables whose keys apply to that stage only, so one
file can drive all three stages.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from cogtune.config.common import (AttentionArgs, CacheRootArgs, CompileArgs, GuidanceArgs, LoaderArgs, ModelArgs,
                                   OutputArgs, QuantArgs, ValidationArgs, VaeArgs, VideoSizeArgs)
from cogtune.config.generation import GenerationArgs, OffloadArgs
from cogtune.config.preprocessing import CacheArgs, ClipArgs, DataArgs, PreviewArgs, TextEncoderArgs
from cogtune.config.training import (BatchArgs, CheckpointArgs, EmaArgs, LoraArgs, MemoryArgs, ObjectiveArgs,
                                     OptimizerArgs, ScheduleArgs, TrackingArgs, TrainDataArgs, ValidationRunArgs)
from cogtune.errors import CogtuneError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["InferConfig", "PreprocessConfig", "STAGE_CONFIGS", "TrainConfig", "data_settings", "load_config",
           "make_config", "read_toml", "relative_to", "settings_fields", "stage_file_values", "values_for_stage"]

STAGE_TABLES = ("preprocess", "train", "infer")


@dataclass
class PreprocessConfig(ModelArgs, VaeArgs, DataArgs, VideoSizeArgs, ClipArgs, CacheRootArgs, CacheArgs, TextEncoderArgs,
                       ValidationArgs, PreviewArgs, LoaderArgs):
    """Decode, resize and encode a video dataset (and the validation prompts) into a cache."""

    def check_own(self) -> None:  # (frame and size rules are the model's: its family checks them)
        from cogtune.data.buckets import configured_buckets

        check_datasets(self.datasets, self)
        configured_buckets(self)


@dataclass
class TrainConfig(ModelArgs, VaeArgs, TrainDataArgs, CacheRootArgs, OutputArgs, LoraArgs, BatchArgs, OptimizerArgs,
                  ScheduleArgs, ObjectiveArgs, CheckpointArgs, MemoryArgs, QuantArgs, CompileArgs, AttentionArgs, EmaArgs,
                  ValidationArgs, ValidationRunArgs, GuidanceArgs, TrackingArgs, LoaderArgs):
    """Train a LoRA on the transformer from a cache; the text encoder is never loaded, the VAE only to decode
    validation videos."""

    def check_own(self) -> None:
        if self.blocks_to_swap:
            for flag, used in (("--compile", self.compile),
                               ("--layerwise_casting_storage_dtype", self.layerwise_casting_storage_dtype != "none"),
                               ("--quant_backend", self.quant_backend != "none")):
                if used:
                    raise CogtuneError(f"--blocks_to_swap and {flag} both act on the blocks' weights: use one.")
        if self.offload_optimizer and self.mixed_precision == "fp16":
            raise CogtuneError("--offload_optimizer does not work with --mixed_precision fp16 (the gradient scaler "
                               "unscales on the GPU); use bf16.")
        if self.offload_optimizer and self.use_8bit_adam:
            raise CogtuneError("--offload_optimizer and --use_8bit_adam are two ways to shrink the optimizer "
                               "state; pick one (8-bit Adam runs on the GPU only).")
        if self.context_parallel_degree > 1 and self.compile:
            raise CogtuneError("--context_parallel_degree and --compile do not combine yet; use one.")
        if self.fp8_compute and self.quant_backend != "none":
            raise CogtuneError("--fp8_compute runs the frozen weights as FP8 matmuls, --quant_backend stores them "
                               "quantized: pick one.")
        if self.fp8_compute and self.mixed_precision != "bf16":
            raise CogtuneError("--fp8_compute needs --mixed_precision bf16 (the FP8 matmuls' inputs and outputs).")
        if self.quant_backend != "none" and self.layerwise_casting_storage_dtype != "none":
            raise CogtuneError("--quant_backend and --layerwise_casting_storage_dtype both shrink the frozen weights: "
                               "pick one.")


@dataclass
class InferConfig(ModelArgs, VaeArgs, GenerationArgs, VideoSizeArgs, OutputArgs, GuidanceArgs, QuantArgs, OffloadArgs,
                  CompileArgs, AttentionArgs):
    """Generate videos with the base pipeline plus a trained LoRA."""

    model_required: ClassVar[bool] = False  # the base model the LoRA was trained on, by default


# A flag given on the command line replaces these settings of the config file too: it wins over the
# file consistently, even where the file's setting would otherwise take precedence (max_train_steps
# over num_train_epochs) or conflict (a validation file and validation prompts).
REPLACES = {"prompt": ("prompt_file",), "prompt_file": ("prompt",),
            "validation_file": ("validation_prompt", "validation_images"), "validation_prompt": ("validation_file",),
            "validation_images": ("validation_file",), "num_train_epochs": ("max_train_steps",)}
STAGE_CONFIGS = {"preprocess": PreprocessConfig, "train": TrainConfig, "infer": InferConfig}


def settings_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a stage's dataclass that are settings (flags and config keys)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


KNOWN_KEYS = {f.name for cls in STAGE_CONFIGS.values() for f in settings_fields(cls)}
# Settings whose values are paths: a relative one in a config file is relative to that file's folder.
# The second group may also be hub ids; they are taken as paths when that path exists.
PATH_SETTINGS = ("instance_data_root", "cache_root", "data_cache", "output_dir", "video_output_dir", "prompt_file",
                 "image", "cache_dir", "resume_from_checkpoint", "validation_images", "preview_dir", "validation_file")
PATH_OR_HUB_SETTINGS = ("pretrained_model_name_or_path", "dataset_name", "lora", "init_lora")


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _base_type(f: dataclasses.Field, cls: type) -> type:
    """The type a setting's values take (X of Optional[X])."""
    hint = _type_hints(cls)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def build_parser(stage: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per setting, named as the field, in a section per group of
    settings. It takes the flags of every stage, so that one command line (or a diffusers script's,
    pasted whole) serves each stage: a flag of another stage is accepted and left to that stage."""
    cls = STAGE_CONFIGS[stage]
    parser = argparse.ArgumentParser(prog=f"cogtune {stage}", description=(cls.__doc__ or "").strip() or None,
                                     argument_default=argparse.SUPPRESS, allow_abbrev=False,
                                     usage=f"cogtune {stage} [--config FILE.toml] [--setting VALUE ...]")
    parser.add_argument("--config", help="A TOML file of settings; flags given here override it. Relative paths in "
                                          "it are relative to its folder.")
    parser.add_argument("--unset", nargs="+", metavar="SETTING", help="Settings of the config file to leave out "
                        "(back to their defaults), for example --unset max_train_steps validation_prompt.")
    fields = {f.name: f for f in settings_fields(cls)}
    for group in cls.__bases__:  # the stage's groups, in the order it lists them
        section = parser.add_argument_group((group.__doc__ or group.__name__).strip().splitlines()[0].rstrip("."))
        for name in group.own_fields():
            if name in fields and not fields[name].metadata.get("file_only"):
                _add_flag(section, fields[name], cls, _help_text(fields[name]))
    added = set(fields)
    for other in STAGE_CONFIGS.values():  # hidden from --help: `cogtune <that stage> --help` describes them
        for f in settings_fields(other):
            if f.name not in added and not f.metadata.get("file_only"):
                added.add(f.name)
                _add_flag(parser, f, other, argparse.SUPPRESS)
    parser.epilog = ("The flags of the other stages are accepted too, and left to them, so that one command line "
                     "(or a diffusers script's, pasted whole) serves every stage.")
    return parser


def _help_text(f: dataclasses.Field) -> str:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return f"{f.metadata['help']} (default: {default})"


def _add_flag(group, f: dataclasses.Field, cls: type, help_text: str) -> None:
    kind = _base_type(f, cls)
    name = f"--{f.name}"
    if kind is bool:
        group.add_argument(name, action=argparse.BooleanOptionalAction, help=help_text)
    elif kind is list:
        group.add_argument(name, nargs="+", help=help_text)
    elif f.metadata.get("choices"):  # in any case: users type Adam / AdamW, as in the reference README
        group.add_argument(name, type=str.lower, choices=f.metadata["choices"], help=help_text)
    else:
        group.add_argument(name, type=kind, choices=f.metadata.get("choices"), help=help_text)


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise CogtuneError(f"Config file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as e:
        raise CogtuneError(f"Config file {path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise CogtuneError(f"Config file {path} is not UTF-8 text; save it as UTF-8.") from None


def values_for_stage(document: dict, stage: str, source: str) -> dict:
    """The flat settings a config document gives one stage: top-level keys, then its own table."""
    unknown = [k for k in document if k not in KNOWN_KEYS and k not in STAGE_TABLES]
    for table in STAGE_TABLES:
        if not isinstance(document.get(table, {}), dict):
            raise CogtuneError(f"{source}: [{table}] must be a table of settings.")
        unknown += [f"{table}.{k}" for k in document.get(table, {}) if k not in KNOWN_KEYS]
    if unknown:
        raise CogtuneError(
            f"{source}: unknown setting(s) {', '.join(sorted(unknown))}. "
            f"Run `cogtune {stage} --help` for the settings each stage takes."
        )
    names = {f.name for f in settings_fields(STAGE_CONFIGS[stage])}
    values = {k: v for k, v in document.items() if k in names}
    values.update({k: v for k, v in document.get(stage, {}).items() if k in names})
    return values


def relative_to(values: dict, folder: Path, separator: str = ":::") -> dict:
    """values with their relative paths made relative to folder (a config file's): the paths of
    PATH_SETTINGS always, those of PATH_OR_HUB_SETTINGS when that path exists (else a hub id)."""
    resolved = dict(values)

    def under(text: str) -> str:
        path = Path(text).expanduser()
        return str(path) if path.is_absolute() else str(folder / path)

    for name, value in values.items():
        if name == "datasets" and isinstance(value, list):  # each table's paths, as the top-level ones
            resolved[name] = [relative_to(table, folder, separator) if isinstance(table, dict) else table
                              for table in value]
        if not isinstance(value, str) or not value:
            continue
        if name == "resume_from_checkpoint" and value == "latest":
            continue
        if name == "validation_images":
            resolved[name] = separator.join(under(part.strip()) for part in value.split(separator))
        elif name in PATH_SETTINGS:
            resolved[name] = under(value)
        elif name in PATH_OR_HUB_SETTINGS and not Path(value).expanduser().is_absolute() and (folder / value).exists():
            resolved[name] = str(folder / value)
    return resolved


def _default_folders_beside(values: dict, folder: Path, fields: dict) -> None:
    """The default cache_root and output_dir, where values give none, in the config file's folder:
    relative to it, as every path in the file is."""
    for name in ("cache_root", "output_dir"):
        if name in fields and name not in values:
            values[name] = str(folder / fields[name].default)


def stage_file_values(config_path: str, stage: str, names: tuple[str, ...]) -> dict:
    """The values a config file gives a stage for these settings (its [stage] table over its top-level
    keys, relative paths relative to its folder), checked as the stage itself checks them: for the
    commands that take a few settings of a stage (export, merge)."""
    document = values_for_stage(read_toml(config_path), stage, str(config_path))
    folder = Path(config_path).resolve().parent
    values = relative_to(document, folder)
    fields = {f.name: f for f in settings_fields(STAGE_CONFIGS[stage])}
    _default_folders_beside(values, folder, fields)
    wanted = {name: values[name] for name in names if values.get(name) is not None}
    for name, value in wanted.items():
        kind = _base_type(fields[name], STAGE_CONFIGS[stage])
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            wanted[name] = value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise CogtuneError(f"{config_path}: {name} must be of type {kind.__name__}, got {value!r}.")
    return wanted


def make_config(stage: str, values: dict, source: str = "settings", origin: dict | None = None):
    """Build and validate a stage's dataclass from flat values; origin: config_file and command_line."""
    origin = origin or {}
    cls = STAGE_CONFIGS[stage]
    fields = {f.name: f for f in settings_fields(cls)}
    for name, value in values.items():
        kind = _base_type(fields[name], cls)
        if value is None:
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CogtuneError(f"{source}: {name} must be of type {kind.__name__}, got {value!r}.")
        choices = fields[name].metadata.get("choices")
        if choices:  # checked and normalised here, once, wherever the value came from
            values[name] = str(values[name]).lower()
            if values[name] not in choices:
                raise CogtuneError(f"{source}: {name} must be one of {', '.join(choices)}, got {value!r}.")
    config = cls(**values, **origin)
    config.check()
    return config


def load_config(stage: str, argv: list[str]) -> Any:
    """Parse a stage's command line: defaults, then the --config file (its [stage] table over its
    top-level keys; relative paths relative to its folder), then flags. Flags of the other stages
    are accepted and ignored."""
    cls = STAGE_CONFIGS[stage]
    flags = vars(build_parser(stage).parse_args(argv))
    own = {f.name for f in settings_fields(cls)}
    flags = {name: value for name, value in flags.items() if name in own or name in ("config", "unset")}
    values = {}
    config_path = flags.pop("config", None)
    unset = flags.pop("unset", None) or []
    unknown = [name for name in unset if name not in KNOWN_KEYS]
    if unknown:
        raise CogtuneError(f"--unset {' '.join(unknown)}: no such setting. Run `cogtune {stage} --help` for the settings.")
    if config_path:
        document = values_for_stage(read_toml(config_path), stage, str(config_path))
        separator = flags.get("validation_prompt_separator", document.get("validation_prompt_separator", ":::"))
        values.update(relative_to(document, Path(config_path).resolve().parent, separator))
        for given, replaced in REPLACES.items():  # --prompt_file on the command line replaces the file's prompt, ...
            if given in flags:
                for name in replaced:
                    if name not in flags:
                        values.pop(name, None)
        for name in unset:
            values.pop(name, None)
    values.update(flags)
    if config_path:
        _default_folders_beside(values, Path(config_path).resolve().parent, {f.name: f for f in settings_fields(cls)})
    origin = {"config_file": str(Path(config_path).resolve()) if config_path else None,
              "command_line": tuple(sorted(flags))}
    return make_config(stage, values, source=str(config_path) if config_path else "command line", origin=origin)


def check_datasets(datasets: list, config=None) -> None:
    """[[datasets]] tables: tables, of known keys, each naming its data once, with a whole positive
    repeats, and clip settings of their own checked as the top-level ones are (choices lower-cased)."""
    from cogtune.data.sources import CLIP_KEYS, DATASET_KEYS

    keys = (*DATASET_KEYS, *CLIP_KEYS, "repeats")
    seen = {}
    for number, table in enumerate(datasets, start=1):
        if not isinstance(table, dict):
            raise CogtuneError(f"datasets: entry {number} is {table!r}; give each dataset as a [[datasets]] table in "
                               "the config file (instance_data_root or dataset_name, repeats, ...).")
        unknown = sorted(set(table) - set(keys))
        if unknown:
            raise CogtuneError(f"[[datasets]] table {number}: unknown key(s) {', '.join(unknown)}; a dataset takes "
                               f"{', '.join(keys)}.")
        if not table.get("instance_data_root") and not table.get("dataset_name"):
            raise CogtuneError(f"[[datasets]] table {number} names no data: give its instance_data_root or dataset_name.")
        repeats = table.get("repeats", 1)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise CogtuneError(f"[[datasets]] table {number}: repeats must be a whole number, 1 or more, got {repeats!r}.")
        same = tuple(str(table.get(key) or (getattr(config, key, None) if config is not None else None) or "")
                     for key in (*DATASET_KEYS, *CLIP_KEYS))
        if same in seen:  # the same samples twice: every clip trained twice as often, without a word
            raise CogtuneError(f"[[datasets]] tables {seen[same]} and {number} name the same data "
                               f"({same[0] or same[1]}) with the same settings; give it once, with repeats = 2 to "
                               "train it twice as often.")
        seen[same] = number
        own = {key: table[key] for key in CLIP_KEYS if key in table}
        if own and config is not None:
            if any(key in own for key in ("height", "width", "max_num_frames")) and (
                    config.buckets or config.height_buckets or config.width_buckets or config.frame_buckets):
                raise CogtuneError(f"[[datasets]] table {number} gives its own clip size, and buckets are set for "
                                   "all: use one or the other.")
            try:
                checked = make_config("preprocess", {**{f.name: getattr(config, f.name)
                                                        for f in settings_fields(PreprocessConfig)},
                                                     "datasets": [], **own}, f"[[datasets]] table {number}")
            except CogtuneError as e:
                raise CogtuneError(f"[[datasets]] table {number}: {str(e).removeprefix(f'[[datasets]] table {number}: ')}")
            table.update({key: getattr(checked, key) for key in own})  # normalised (frame_extraction = "Chunk")


# Flags of a training command line that are training's own settings, though preprocess has settings of
# the same names: the transformer's precision is not the encoders', decoding validation videos tiled
# is not encoding clips tiled, and so on. They never choose the cache a training run reads.
TRAINING_MEANINGS = ("mixed_precision", "enable_tiling", "enable_slicing", "seed", "dataloader_num_workers",
                     "dry_run")


def data_settings(stage_config, argv: list[str]) -> "PreprocessConfig":
    """The preprocess settings of a train (or infer) command line: the same config file and flags, read
    as `cogtune preprocess` reads them (its [preprocess] table, its flags), with this stage's model and
    cache root. They name the cache that preprocess wrote for this command line. A flag that is also a
    training setting (TRAINING_MEANINGS: --mixed_precision bf16 for the transformer after a preprocess
    at fp16, as the diffusers command runs) is left out: only settings of the cached tensors choose it,
    and the latest preprocess run of the config says which it used."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    fields = {f.name: f for f in settings_fields(PreprocessConfig)}
    for name in TRAINING_MEANINGS:
        _add_flag(own, fields[name], PreprocessConfig, None)
    _, argv = own.parse_known_args(argv)
    data = load_config("preprocess", argv)
    return dataclasses.replace(data, **{name: getattr(stage_config, name) for name in
                                        ("pretrained_model_name_or_path", "revision", "variant", "cache_dir",
                                         "cache_root") if hasattr(stage_config, name)})
