"""What the chart runs of kubetune's own images matches their Dockerfiles: the module each
container starts is in the image it names, the pod runs as the image's user, and the trainer
image the operator is given is the trainer's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune_operator.manifests import TRAINER_UID
from tests.chart.chart import container, env_of, pod_templates, render
from tests.harness.tools import Tool
from tests.images.dockerfiles import IMAGES

REPOSITORY = "ghcr.io/kubetune/"
BY_NAME = {image.name: image for image in IMAGES}


def _ours(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) of every container that runs one of kubetune's images."""
    found = []
    for where, template in pod_templates(docs):
        spec = template["spec"]
        for c in spec["containers"]:
            if c["image"].startswith(REPOSITORY):
                found.append((f"{where}/{c['name']}", spec, c))
    return found


def test_each_container_runs_a_module_its_image_holds(helm_local: Tool, full_values: Path) -> None:
    docs = render(helm_local, full_values)
    ours = _ours(docs)
    assert {c["image"].removeprefix(REPOSITORY).split(":")[0] for _, _, c in ours} == {
        "api",
        "operator",
    }
    for where, spec, c in ours:
        image = BY_NAME[c["image"].removeprefix(REPOSITORY).split(":")[0]]
        python, flag, module = c["command"]
        assert (python, flag) == ("python", "-m"), where
        assert module.split(".")[0] in image.packages, f"{where} runs {module} from {image.name}"
        user = (c.get("securityContext") or {}).get("runAsUser") or spec["securityContext"][
            "runAsUser"
        ]
        assert user == image.uid, where


def test_the_operator_launches_the_trainer_image_as_its_user(
    helm_local: Tool, full_values: Path
) -> None:
    docs = render(helm_local, full_values)
    operator = next(spec for where, spec in pod_templates(docs) if where.endswith("-operator"))
    env = env_of(container(operator, "operator"))
    assert env["KUBETUNE_OPERATOR__TRAINER_IMAGE"].startswith(f"{REPOSITORY}trainer:")
    assert BY_NAME["trainer"].uid == TRAINER_UID
