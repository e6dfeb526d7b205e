"""Fixtures of the lifecycle suite: ``make_deployment`` builds the runtime a test is
parametrised with (``pytorchjob`` on the real apiserver, ``subprocess`` for local mode), with a
loopback webhook receiver and, when asked, a real vLLM on the CPU serving the results.

The jobs train the base model vLLM serves (head_dim 32, built by the trainer's own
``tiny_model``), so a result can be served; the operator testbed's ``tiny_model`` is overridden.
"""

from __future__ import annotations

import json
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.settings import (
    BaseModelEntry,
    LimitSettings,
    LocalSettings,
    Mode,
    ServingSettings,
    Settings,
    StaticWebhookEndpoint,
    WebhookSettings,
)
from kubetune_runtime.webhooks import new_secret
from tests.harness.vllm import VllmServer, build_serving_model
from tests.lifecycle.deployments import (
    ClusterDeployment,
    Deployment,
    LocalDeployment,
    PyTorchJobDeployment,
    TrainJobDeployment,
)
from tests.operator.conftest import CONTEXT_LENGTH, MODEL, ORG, Testbed, make_testbed
from tests.serving.conftest import start_replica, start_sidecar
from tests.webhooks.receiver import Receiver

__all__ = ["make_testbed", "start_sidecar"]  # fixtures of the operator and serving tests

RUNTIMES = [
    pytest.param("trainjob", marks=pytest.mark.cluster),
    pytest.param("pytorchjob", marks=pytest.mark.cluster),
    "subprocess",
]
MAX_LORA_RANK = 16


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base model both the trainers and vLLM use."""
    return build_serving_model(tmp_path_factory.mktemp("lifecycle-model"))


@pytest.fixture(scope="session")
def vllm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """A vLLM server on the CPU with LoRA enabled, started once per session (xdist group
    ``vllm``: the tests that use it run on one worker).
    """
    server = VllmServer.start(
        tiny_model, MODEL, tmp_path_factory.mktemp("vllm"), max_lora_rank=MAX_LORA_RANK
    )
    yield server
    server.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """The org's webhook endpoint on loopback, verifying every signature."""
    receiver = Receiver(new_secret()).start()
    yield receiver
    receiver.stop()


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    """The runtime under test."""
    return str(request.param)


def failing_trainer(folder: Path, code: int) -> Path:
    """An executable that exits with ``code`` at once, whatever its arguments."""
    path = folder / f"trainer-exits-{code}"
    path.write_text(f"#!/bin/sh\nexit {code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def local_settings(
    data: Path,
    model: Path,
    receiver: Receiver,
    *,
    backoff_limit: int | None,
    vllm: VllmServer | None,
) -> Settings:
    """Local mode's settings: polling fast, webhooks to the receiver, vLLM when given."""
    local = LocalSettings(
        poll_seconds=0.25, progress_seconds=0.5, max_running_jobs=2, trainer_grace_seconds=60
    )
    if backoff_limit is not None:
        local = local.model_copy(update={"backoff_limit": backoff_limit})
    serving = ServingSettings(sync_seconds=2, max_lora_rank=MAX_LORA_RANK)
    if vllm is not None:
        serving = serving.model_copy(
            update={
                "vllm_urls": {MODEL: vllm.base_url},
                "vllm_model": str(model),
                "adapter_dir": data / "adapters",
            }
        )
    endpoint = StaticWebhookEndpoint(org=ORG, url=receiver.url, secret=receiver.secret)
    return Settings(
        mode=Mode.LOCAL,
        data_dir=data,
        models=[BaseModelEntry(id=MODEL, path=str(model), context_length=CONTEXT_LENGTH)],
        limits=LimitSettings(min_examples=10),
        local=local,
        serving=serving,
        webhooks=WebhookSettings(
            allow_insecure_targets=True,
            allow_private_targets=True,
            poll_seconds=0.2,
            backoff_base_seconds=0.2,
            backoff_cap_seconds=1,
            endpoints=[endpoint],
        ),
    )


def cluster_deployment(
    request: pytest.FixtureRequest,
    receiver: Receiver,
    runtime: str,
    *,
    entrypoint: list[str] | None,
    backoff_limit: int | None,
    vllm: VllmServer | None,
) -> ClusterDeployment:
    """The operator testbed with webhooks to the receiver and, with a vLLM, one replica."""
    make: Callable[..., Testbed] = request.getfixturevalue("make_testbed")
    settings: dict[str, str] = {}
    if backoff_limit is not None:
        settings["backoff_limit"] = str(backoff_limit)
    extra: dict[str, Any] = {"entrypoint": entrypoint} if entrypoint else {}
    testbed = make(start_operator=False, runtime=runtime, **extra, **settings)
    endpoints = [{"org": ORG, "url": receiver.url, "secret": receiver.secret}]
    testbed.operator.env.update(
        {
            "KUBETUNE_WEBHOOKS__ALLOW_INSECURE_TARGETS": "true",
            "KUBETUNE_WEBHOOKS__ALLOW_PRIVATE_TARGETS": "true",
            "KUBETUNE_WEBHOOKS__POLL_SECONDS": "0.2",
            "KUBETUNE_WEBHOOKS__BACKOFF_BASE_SECONDS": "0.2",
            "KUBETUNE_WEBHOOKS__BACKOFF_CAP_SECONDS": "1",
            "KUBETUNE_WEBHOOKS__ENDPOINTS": json.dumps(endpoints),
            "KUBETUNE_SERVING__SYNC_SECONDS": "2",
        }
    )
    testbed.operator.start()
    if vllm is not None:
        # The sidecar turns ready on the operator's first push, so the operator runs first.
        start: Callable[[VllmServer, str], Any] = request.getfixturevalue("start_sidecar")
        start_replica(testbed, "vllm-0", start(vllm, "0"))
    if runtime == "trainjob":
        return TrainJobDeployment(testbed, receiver)
    return PyTorchJobDeployment(testbed, receiver)


@pytest.fixture
def make_deployment(
    runtime: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    tiny_model: Path,
    receiver: Receiver,
) -> Iterator[Callable[..., Deployment]]:
    """``make_deployment(trainer_exit=None, backoff_limit=None, vllm=None)``: the runtime under
    test, its trainer replaced by a program that exits with ``trainer_exit`` when given, with
    the runtime's own backoff limit unless told, serving on ``vllm`` when given.
    """
    made: list[Deployment] = []

    def make(
        *,
        trainer_exit: int | None = None,
        backoff_limit: int | None = None,
        vllm: VllmServer | None = None,
    ) -> Deployment:
        deployment: Deployment
        if runtime != "subprocess":
            entrypoint = None
            if trainer_exit is not None:
                entrypoint = [sys.executable, "-c", f"import sys; sys.exit({trainer_exit})"]
            deployment = cluster_deployment(
                request,
                receiver,
                runtime,
                entrypoint=entrypoint,
                backoff_limit=backoff_limit,
                vllm=vllm,
            )
        else:
            settings = local_settings(
                tmp_path / "local", tiny_model, receiver, backoff_limit=backoff_limit, vllm=vllm
            )
            trainer = failing_trainer(tmp_path, trainer_exit) if trainer_exit is not None else None
            deployment = LocalDeployment(settings, receiver, trainer=trainer)
        made.append(deployment)
        return deployment

    yield make
    for deployment in made:
        deployment.close()


@pytest.fixture
def deployment(make_deployment: Callable[..., Deployment]) -> Deployment:
    """The runtime under test with the real trainer, no vLLM."""
    return make_deployment()
