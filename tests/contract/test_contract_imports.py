"""The contract (``kubetune``) imports with nothing but what its package declares.

A fresh virtualenv gets only the distributions of ``[project] dependencies`` (and theirs), linked
from this environment, plus the ``kubetune`` package itself. Every module of the contract is
imported there, and nothing outside the standard library and those distributions may be loaded.
The runtime package, linked in beside it, must fail there: the virtualenv really lacks the
runtime's dependencies, so the first check is not vacuous.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]

CHECK = """
import importlib, json, pkgutil, sys, sysconfig
allowed = set(json.loads(sys.argv[1]))
stdlib = (sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib"))
import kubetune
for info in pkgutil.walk_packages(kubetune.__path__, "kubetune."):
    importlib.import_module(info.name)
# Modules loaded from a file outside the standard library (extension modules create file-less
# helpers such as Cython's), and not of an allowed distribution.
outside = sorted(
    name for name, module in sys.modules.items()
    if (path := getattr(module, "__file__", None))
    and not path.startswith(stdlib)
    and name.split(".")[0] not in allowed
)
print(json.dumps(outside))
"""


def _closure(requirements: list[str]) -> set[str]:
    """The installed distributions ``requirements`` need, transitively (markers evaluated here,
    extras not taken).
    """
    found: set[str] = set()
    pending = [Requirement(r) for r in requirements]
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = metadata.distribution(requirement.name).metadata["Name"]
        if name.lower() in found:
            continue
        found.add(name.lower())
        pending.extend(Requirement(r) for r in metadata.requires(name) or [])
    return found


def _top_level(distribution: str) -> set[str]:
    """The entries a distribution installs at the top of site-packages (packages, modules,
    its dist-info).
    """
    files = metadata.distribution(distribution).files or []
    return {f.parts[0] for f in files if f.parts and f.parts[0] not in ("..", "__pycache__")}


@pytest.fixture(scope="module")
def contract_python(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A virtualenv holding the contract's declared dependencies only, and their top-level
    names.
    """
    root = tmp_path_factory.mktemp("contract-venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    site = Path(sysconfig.get_path("purelib"))
    deps, source = root / "deps", root / "source"
    deps.mkdir()
    source.mkdir()
    names: set[str] = set()
    for distribution in _closure(declared):
        for entry in _top_level(distribution):
            (deps / entry).symlink_to(site / entry)
            names.add(entry.split(".")[0])
    for package in ("kubetune", "runtime/kubetune_runtime"):
        (source / Path(package).name).symlink_to(REPO / package)
    (venv_site := _site_packages(venv)).mkdir(parents=True, exist_ok=True)
    (venv_site / "contract.pth").write_text(f"{source}\n{deps}\n")
    return venv / "bin" / "python", sorted(names | {"kubetune"})


def _site_packages(venv: Path) -> Path:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return venv / "lib" / version / "site-packages"


def _run(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(
        [str(python), *args], capture_output=True, text=True, env=env, cwd="/", check=False
    )


def test_every_contract_module_imports_with_the_declared_dependencies_alone(
    contract_python: tuple[Path, list[str]],
) -> None:
    python, allowed = contract_python
    result = _run(python, "-c", CHECK, json.dumps(allowed))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [], "the contract loaded modules it does not declare"


def test_that_environment_lacks_what_the_runtime_needs(
    contract_python: tuple[Path, list[str]],
) -> None:
    python, _ = contract_python
    result = _run(python, "-c", "import kubetune_runtime.webhooks")
    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr
