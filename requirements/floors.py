"""Print pip constraints that pin every dependency of pyproject.toml (and its test extra) to its
floor, the lowest release its range allows: `make test-oldest` installs and tests against them.

    python requirements/floors.py > floors.txt
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def floors(pyproject: Path = ROOT / "pyproject.toml", extras: tuple[str, ...] = ("test",)) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = []
    for text in project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        if len(lower) != 1:
            raise SystemExit(f"pyproject.toml: {text!r} needs exactly one floor (>=) for make test-oldest")
        lines.append(f"{requirement.name}=={lower[0]}")
    return lines


if __name__ == "__main__":
    sys.stdout.write("".join(f"{line}\n" for line in floors()))
