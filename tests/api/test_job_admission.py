"""What a job may ask for, enforced before it is created, on both backends and through the
official SDK: the org's default queue and the queue allow-list (400), the GPU cap of one job
(400) and of an org's unfinished jobs (429), and the GPU types on offer (400). Each error is
in OpenAI's shape, names the parameter, and says what is allowed.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from kubetune.finetunejob import FineTuneJobStatus, JobPhase
from tests.api.conftest import backend_of, chat_file
from tests.harness.api import ApiServer, backend_env, error_of, start_api

H100 = "NVIDIA-H100-80GB-HBM3"
QUEUEING = {
    "KUBETUNE_QUEUEING__DEFAULT_QUEUE": "shared",
    "KUBETUNE_QUEUEING__ORG_QUEUES": json.dumps({"acme": "acme-queue"}),
    "KUBETUNE_QUEUEING__ALLOWED_QUEUES": json.dumps({"acme": ["acme-urgent"], "*": ["spot"]}),
    "KUBETUNE_QUEUEING__MAX_GPUS_PER_JOB": "8",
    "KUBETUNE_QUEUEING__MAX_GPUS_PER_ORG": "12",
    "KUBETUNE_QUEUEING__GPU_TYPES": json.dumps([H100]),
    "KUBETUNE_OPERATOR__HARDWARE_PROFILES": json.dumps(
        [
            {"name": "efa", "orgs": ["acme"], "resources": {"vpc.amazonaws.com/efa": "4"}},
            {"name": "nccl-debug", "env": {"NCCL_DEBUG": "INFO"}},
        ]
    ),
}


@pytest.fixture(
    scope="module", params=["local", pytest.param("kubernetes", marks=pytest.mark.cluster)]
)
def limited_api(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Path
) -> Iterator[ApiServer]:
    """An API with queues and GPU limits, per backend."""
    data = tmp_path_factory.mktemp(f"admission-{request.param}")
    if request.param == "local":
        env = backend_env("local", tokenizer=tiny_tokenizer)
    else:
        from kubernetes import client

        kube, s3 = request.getfixturevalue("kube"), request.getfixturevalue("s3")
        namespace = "kubetune-admission"
        core: Any = client.CoreV1Api(kube.api_client())
        core.create_namespace({"metadata": {"name": namespace}})
        env = backend_env(
            "kubernetes",
            tokenizer=tiny_tokenizer,
            s3_env=s3.env(),
            kubeconfig=kube.kubeconfig,
            namespace=namespace,
            prefix="admission",
        )
    server = start_api(data, {**env, **QUEUEING}, request.param)
    yield server
    server.stop()


def create(server: ApiServer, org: str, **extra: Any) -> Any:
    """Create a job of ``org`` with kubetune's extra fields."""
    client = server.client(org)
    training = client.files.create(file=("t.jsonl", io.BytesIO(chat_file(10))), purpose="fine-tune")
    return client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training.id, extra_body=extra
    )


def test_a_job_without_a_queue_gets_its_orgs_default(limited_api: ApiServer) -> None:
    backend = backend_of(limited_api)
    acme = create(limited_api, "acme")
    globex = create(limited_api, "globex")
    assert backend.get("acme", acme.id).spec.queue == "acme-queue"
    assert backend.get("globex", globex.id).spec.queue == "shared"
    urgent = create(limited_api, "acme", queue="acme-urgent")
    assert backend.get("acme", urgent.id).spec.queue == "acme-urgent"
    spot = create(limited_api, "globex", queue="spot")
    assert backend.get("globex", spot.id).spec.queue == "spot"


def test_a_queue_not_open_to_the_org_is_refused(limited_api: ApiServer) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        create(limited_api, "globex", queue="acme-urgent")
    assert excinfo.value.status_code == 400
    error = error_of(excinfo)
    assert error["code"] == "queue_not_allowed"
    assert error["param"] == "queue"
    assert error["type"] == "invalid_request_error"
    assert error["message"] == (
        "Queue 'acme-urgent' is not open to your organization; its queues: shared, spot."
    )


def test_a_job_over_the_per_job_gpu_cap_is_refused(limited_api: ApiServer) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        create(limited_api, "acme", resources={"nodes": 3, "gpus_per_node": 4})
    error = error_of(excinfo)
    assert (error["code"], error["param"]) == ("gpu_limit_exceeded", "resources")
    assert error["message"] == ("The job asks for 12 GPUs (3 nodes x 4); a job may use at most 8.")


def test_a_gpu_type_not_on_offer_is_refused(limited_api: ApiServer) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        create(limited_api, "acme", resources={"gpu_type": "NVIDIA-A10G"})
    error = error_of(excinfo)
    assert (error["code"], error["param"]) == ("invalid_gpu_type", "resources.gpu_type")
    assert H100 in error["message"]
    assert create(limited_api, "acme", resources={"gpu_type": H100}).status == "validating_files"


def test_an_org_over_its_gpu_quota_gets_429_until_a_job_finishes(limited_api: ApiServer) -> None:
    server = limited_api
    backend = backend_of(server)
    org = "globex"
    # The earlier tests' jobs of this org finish first (playing the operator), so it holds none.
    for job in backend.list(org, after=None, limit=1000).jobs:
        backend.update_status(org, job.metadata.name, FineTuneJobStatus(phase=JobPhase.SUCCEEDED))
    first = create(server, org, resources={"nodes": 2, "gpus_per_node": 4})
    with pytest.raises(openai.RateLimitError) as excinfo:
        create(server, org, resources={"nodes": 1, "gpus_per_node": 8})
    assert excinfo.value.status_code == 429
    assert excinfo.value.response.headers["x-should-retry"] == "false"
    error = error_of(excinfo)
    assert (error["type"], error["code"], error["param"]) == (
        "insufficient_quota",
        "gpu_quota_exceeded",
        "resources",
    )
    assert error["message"] == (
        "Your organization's unfinished jobs ask for 8 GPUs; this job's 8 more would exceed "
        "its limit of 12. Wait for a job to finish or cancel one."
    )
    # What fits still goes; another org has its own quota; a cancelled job frees its GPUs.
    create(server, org, resources={"nodes": 1, "gpus_per_node": 4})
    create(server, "acme", resources={"nodes": 1, "gpus_per_node": 8})
    server.client(org).fine_tuning.jobs.cancel(first.id)
    create(server, org, resources={"nodes": 1, "gpus_per_node": 8})


def test_a_hardware_profile_must_be_one_open_to_the_org(limited_api: ApiServer) -> None:
    backend = backend_of(limited_api)
    job = create(limited_api, "acme", resources={"profile": "efa"})
    assert backend.get("acme", job.id).spec.resources.profile == "efa"
    with pytest.raises(openai.BadRequestError) as excinfo:
        create(limited_api, "globex", resources={"profile": "efa"})
    error = error_of(excinfo)
    assert (error["code"], error["param"]) == ("invalid_hardware_profile", "resources.profile")
    assert error["message"] == (
        "Hardware profile 'efa' is not available; choose one of: nccl-debug."
    )


@pytest.fixture(scope="module")
def tracking_api(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Path
) -> Iterator[ApiServer]:
    """An API whose jobs may report to one MLflow server only (local backend)."""
    env = backend_env("local", tokenizer=tiny_tokenizer)
    allowed = {"KUBETUNE_TRACKING__MLFLOW_TRACKING_URIS": '["https://mlflow.example.com/team-a"]'}
    server = start_api(tmp_path_factory.mktemp("tracking"), {**env, **allowed}, "local")
    yield server
    server.stop()


@pytest.mark.parametrize(
    "uri",
    [
        "http://169.254.169.254/latest/meta-data/",  # the cloud metadata address
        "http://kubetune-api.kubetune.svc:8000",  # an internal service
        "https://mlflow.example.com/team-b",  # the allowed server, another team's path
        "https://mlflow.example.com@evil.example/team-a",  # user info hiding the real host
        "https://mlflow.example.com:8443/team-a",  # another port
    ],
)
def test_a_tracking_uri_not_allowed_is_refused_before_any_pod_calls_it(
    tracking_api: ApiServer, uri: str
) -> None:
    mlflow = {"type": "mlflow", "mlflow": {"experiment": "exp", "tracking_uri": uri}}
    with pytest.raises(openai.BadRequestError) as excinfo:
        create(tracking_api, "acme", integrations=[mlflow])
    error = error_of(excinfo)
    assert error["code"] == "tracking_uri_not_allowed"
    assert error["param"] == "integrations[0].mlflow.tracking_uri"
    assert "allowed: https://mlflow.example.com/team-a" in error["message"]


def test_an_allowed_tracking_uri_is_kept(tracking_api: ApiServer) -> None:
    uri = "https://mlflow.example.com/team-a/runs"
    mlflow = {"type": "mlflow", "mlflow": {"experiment": "exp", "tracking_uri": uri}}
    job = create(tracking_api, "acme", integrations=[mlflow])
    stored = backend_of(tracking_api).get("acme", job.id)
    assert stored.spec.integrations[0].mlflow is not None
    assert stored.spec.integrations[0].mlflow.tracking_uri == uri
