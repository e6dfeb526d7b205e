"""Render the Helm chart and walk what it renders: shared by the chart tests."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.harness.crds import MONITORING_CRDS, TRAINER_V2_CRDS
from tests.harness.paths import REPO_ROOT
from tests.harness.tools import Tool

CHART = REPO_ROOT / "charts" / "kubetune"
RELEASE = "kt"
NAMESPACE = "kubetune"
MONITORING_API = "monitoring.coreos.com/v1"
MONITORING_KINDS = frozenset({"ServiceMonitor", "PodMonitor", "PrometheusRule"})
# The custom resources the chart renders, and the upstream CRDs that define them.
# The CRDs of the custom resources the chart renders: upstream ones, and kopf's peering CRD the
# chart ships itself.
CUSTOM_RESOURCE_CRDS = (
    *MONITORING_CRDS,
    TRAINER_V2_CRDS[2],
    REPO_ROOT / "charts" / "kubetune" / "crds" / "kopfpeerings.kopf.dev.yaml",
)
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "Job"})

ACME_KEY = "kt-test-key-acme"  # a test key; the chart stores only its hash

# Values that switch on everything the chart can render: two served models and one catalogue
# model without serving, an Ingress, workload identity, and per-model overrides.
FULL_VALUES: dict[str, Any] = {
    "models": [
        {
            "id": "llama-3.1-8b-instruct",
            "name": "llama-3-1-8b",
            "path": "store:models/Llama-3.1-8B-Instruct",
            "ownedBy": "meta",
            "created": 1721692800,
            "contextLength": 8192,
            "tokenizer": "/models/llama-3.1-8b-instruct",
            "serving": {
                "model": "meta-llama/Llama-3.1-8B-Instruct",
                "replicas": 2,
                "gpus": 2,
                "maxLoras": 16,
                "maxLoraRank": 128,
            },
        },
        {
            "id": "qwen2.5-0.5b-instruct",
            "name": "qwen2-5-0-5b",
            "path": "/models/Qwen2.5-0.5B-Instruct",  # a folder both pods mount
            "volumeClaim": "qwen-weights",  # from this ReadOnlyMany claim
            "contextLength": 4096,
        },
        {
            "id": "mistral-7b-v0.3",
            "name": "mistral-7b",
            "path": "store:models/Mistral-7B-v0.3",
            "serving": {"enabled": False},
        },
    ],
    "apiKeys": {
        "keys": [
            {
                "name": "acme-key",
                "org": "acme",
                "role": "member",
                "sha256": hashlib.sha256(ACME_KEY.encode()).hexdigest(),
            }
        ]
    },
    "objectStore": {
        "bucket": "kubetune-data",
        "prefix": "prod",
        "endpointUrl": "https://s3.eu-west-1.amazonaws.com",
        "region": "eu-west-1",
        "serviceAccountAnnotations": {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/kubetune"
        },
        "podLabels": {"azure.workload.identity/use": "true"},
    },
    "api": {"ingress": {"enabled": True, "className": "nginx", "tlsSecret": "kubetune-tls"}},
    "operator": {"replicas": 2},
    "trainer": {
        "credentialsSecret": "trainer-env",
        "priorityClassName": "training",
        "nodeSelector": {"cloud.google.com/gke-spot": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "vllm": {"hfTokenSecret": "hf-token"},
    "queueing": {
        "kueue": True,
        "defaultQueue": "shared",
        "orgQueues": {"acme": "acme-queue"},
        "allowedQueues": {"acme": ["acme-urgent"], "*": ["shared-spot"]},
        "maxGpusPerJob": 16,
        "maxGpusPerOrg": 64,
        "gpuTypes": ["NVIDIA-H100-80GB-HBM3"],
        "maxQueuedSeconds": 86400,
    },
}


def write_values(directory: Path, values: dict[str, Any]) -> Path:
    """Write ``values`` as a values file in ``directory`` and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]
    path = directory / f"values-{digest}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def template_args(
    values_file: Path | None = None,
    *,
    api_versions: Sequence[str] = (),
    sets: Sequence[str] = (),
    namespace: str = NAMESPACE,
    release: str = RELEASE,
) -> list[str]:
    """Arguments of ``helm template`` for the chart."""
    args = ["template", release, str(CHART), "--namespace", namespace]
    if values_file is not None:
        args += ["-f", str(values_file)]
    for version in api_versions:
        args += ["--api-versions", version]
    for item in sets:
        args += ["--set", item]
    return args


def parse_manifests(text: str) -> list[dict[str, Any]]:
    """The objects of a multi-document YAML stream (empty documents dropped)."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render(
    helm: Tool,
    values_file: Path | None = None,
    *,
    api_versions: Sequence[str] = (),
    sets: Sequence[str] = (),
    namespace: str = NAMESPACE,
) -> list[dict[str, Any]]:
    """``helm template`` the chart and return the rendered objects."""
    out = helm(
        *template_args(values_file, api_versions=api_versions, sets=sets, namespace=namespace)
    )
    return parse_manifests(out)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """The rendered objects of one kind, by name."""
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each workload's pod template as ``("Kind/name", template)``."""
    for doc in docs:
        if doc["kind"] in WORKLOAD_KINDS:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]


def container(template: dict[str, Any], name: str) -> dict[str, Any]:
    """One container of a pod template."""
    for c in template["spec"]["containers"]:
        if c["name"] == name:
            return dict(c)
    raise KeyError(
        f"no container {name!r} in {[c['name'] for c in template['spec']['containers']]}"
    )


def env_of(c: dict[str, Any]) -> dict[str, str]:
    """A container's literal environment (``valueFrom`` entries map to ``"<from>"``)."""
    return {e["name"]: e.get("value", "<from>") for e in c.get("env", [])}


def schema_of_crd(path: Path) -> dict[str, Any]:
    """The served version's openAPIV3Schema of a CRD file."""
    crd = next(d for d in yaml.safe_load_all(path.read_text()) if d)
    version = next(v for v in crd["spec"]["versions"] if v["served"])
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def crd_kind(path: Path) -> str:
    """The kind a CRD file defines."""
    crd = next(d for d in yaml.safe_load_all(path.read_text()) if d)
    return str(crd["spec"]["names"]["kind"])
