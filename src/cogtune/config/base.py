"""What a setting is: a dataclass field that also describes its flag (`opt`), with its bounds
declared beside it (`rules`), in a group of settings that checks itself (`Group`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from cogtune.errors import CogtuneError
from cogtune.util.seeds import SEED_LIMIT

__all__ = ["RULES", "SEED_LIMIT", "TENSOR_DTYPES", "Group", "opt"]
TENSOR_DTYPES = ("fp32", "fp16", "bf16")

# A rule a number must keep: (test, what the message says of it). NaN fails every one.
RULES = {
    "positive": (lambda v: v > 0, "must be positive"),
    "nonnegative": (lambda v: v >= 0, "must be zero or more"),
    "finite": (math.isfinite, "must be a finite number"),  # NaN too: it would reach the weights
    "positive_finite": (lambda v: 0 < v < math.inf, "must be a positive number"),
    "unit": (lambda v: 0 <= v < 1, "must be at least 0 and below 1"),
    "open_unit": (lambda v: 0 < v < 1, "must be above 0 and below 1"),
    "probability": (lambda v: 0 <= v <= 1, "is a probability (0 to 1)"),
    "count_or_fraction": (lambda v: v >= 0, "takes a count (10) or a fraction (0.05)"),
    # the mode density's map of [0, 1) stays monotone below 1 / (pi / 2 - 1)
    "mode_scale": (lambda v: 0 <= v < 1 / (math.pi / 2 - 1), "must be at least 0 and below 1.75"),
}


def opt(default: Any, help: str, choices: tuple | None = None, file_only: bool = False, rules: tuple = (),
        **kwargs) -> Any:
    """A dataclass field that also describes its command-line flag (none for a file_only setting, which
    only a config file can give), and the rules its value keeps (RULES). Choices are lower case; values
    are taken in any case."""
    unknown = set(rules) - set(RULES)
    assert not unknown, unknown
    metadata = {"help": help, "choices": choices, "file_only": file_only, "rules": tuple(rules)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class Group:
    """Settings of one concern. A stage's config inherits the groups it takes, so that every setting
    is one flat flag named as in the diffusers scripts; `check` runs each group's rules and own check.
    A function that needs one concern takes its group (`OptimizerArgs.of(config)`)."""

    @classmethod
    def of(cls, config) -> "Group":
        """This group's settings of a stage config (which holds them among others)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def own_fields(cls) -> list[str]:
        """The settings this group itself declares (not those of groups it builds on)."""
        return [name for name in cls.__dict__.get("__annotations__", {}) if name in cls.__dataclass_fields__]

    def check(self) -> None:
        """Every field's rules, then each group's own check (in the order the groups are listed)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for rule in f.metadata.get("rules", ()):
                test, says = RULES[rule]
                if value is not None and not test(value):
                    raise CogtuneError(f"--{f.name} {says}, got {value}.")
        for group in [*type(self).__mro__[1:], type(self)]:  # the groups as listed, then the stage's own check
            own = group.__dict__.get("check_own")
            if own is not None:
                own(self)
