"""The container images kubetune builds, and what each Dockerfile says (read as text: no Docker
engine runs here)."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@dataclass(frozen=True)
class Image:
    """One image: its Dockerfile, the extras it installs, the packages it copies, its user."""

    name: str
    dockerfile: Path
    extras: tuple[str, ...]
    packages: tuple[str, ...]
    uid: int

    @property
    def text(self) -> str:
        """The Dockerfile."""
        return self.dockerfile.read_text()

    def pins(self) -> dict[str, str]:
        """Package → version, from the ``ARG <PACKAGE>_VERSION=`` lines."""
        return {
            name.lower().replace("_", "-"): version
            for name, version in re.findall(r"^ARG ([A-Z0-9_]+)_VERSION=(\S+)$", self.text, re.M)
        }

    def user(self) -> str | None:
        """The ``USER`` it runs as."""
        found = re.findall(r"^USER (\S+)", self.text, re.M)
        return found[-1] if found else None

    def copied(self) -> set[str]:
        """The Python packages it copies from the repository (the source roots' packages)."""
        return {Path(src).name for src in re.findall(r"^COPY (\S+) \./\S+$", self.text, re.M)}


IMAGES = (
    Image(
        "trainer",
        REPO / "trainer-image" / "Dockerfile",
        ("trainer", "gpu", "tracking"),
        ("kubetune", "kubetune_runtime", "kubetune_trainer"),
        10001,
    ),
    Image(
        "api",
        REPO / "api" / "Dockerfile",
        ("api",),
        ("kubetune", "kubetune_runtime", "kubetune_api"),
        65532,
    ),
    Image(
        "operator",
        REPO / "operator" / "Dockerfile",
        ("operator",),
        ("kubetune", "kubetune_runtime", "kubetune_operator"),
        65532,
    ),
)


def requirements(extras: tuple[str, ...]) -> Iterator[Requirement]:
    """The project's own dependencies and those of ``extras``, with ``kubetune[x]`` (an extra
    naming another) expanded.
    """
    for line in PROJECT["dependencies"]:
        yield Requirement(line)
    seen: set[str] = set()
    pending = list(extras)
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in PROJECT["optional-dependencies"][extra]:
            requirement = Requirement(line)
            if requirement.name == PROJECT["name"]:
                pending.extend(requirement.extras)
            else:
                yield requirement
