"""What the chart renders: lint, Kubernetes schemas, Pod Security, serving, settings, values schema.

No cluster: ``helm template`` with the capabilities each test names.
"""

from __future__ import annotations

import base64
import copy
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml

from kubetune import observability
from kubetune.finetunejob import LABEL_BASE_MODEL, VLLM_LORA_RANKS
from kubetune.settings import Mode, Settings
from kubetune_api.auth import KeyStore
from tests.chart.chart import (
    ACME_KEY,
    CHART,
    CUSTOM_RESOURCE_CRDS,
    FULL_VALUES,
    MONITORING_API,
    MONITORING_KINDS,
    NAMESPACE,
    RELEASE,
    by_kind,
    container,
    crd_kind,
    env_of,
    pod_templates,
    render,
    schema_of_crd,
    template_args,
    write_values,
)
from tests.harness.paths import REPO_ROOT
from tests.harness.tools import Tool

FULLNAME = f"{RELEASE}-kubetune"
# Kubernetes versions whose schemas every rendered object must satisfy: a current one and the
# newest kubernetes-validate knows. (The install tests cover the 1.20 apiserver.)
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
ALL_CAPABILITIES = (MONITORING_API, "policy/v1")


@pytest.fixture(scope="module")
def full_docs(helm_local: Tool, full_values: Path) -> list[dict[str, Any]]:
    return render(helm_local, full_values, api_versions=ALL_CAPABILITIES)


@pytest.fixture(scope="module")
def default_docs(helm_local: Tool) -> list[dict[str, Any]]:
    return render(helm_local, api_versions=ALL_CAPABILITIES)


# --------------------------------------------------------------------------- lint and schemas


@pytest.mark.parametrize("values", ["default", "full"])
def test_helm_lint_is_clean(helm_local: Tool, full_values: Path, values: str) -> None:
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    if values == "full":
        args += ["-f", str(full_values)]
    out = helm_local(*args)
    assert "1 chart(s) linted, 0 chart(s) failed" in out
    assert "[WARNING]" not in out, out
    assert "[ERROR]" not in out, out


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", ["default", "full"])
def test_every_object_validates_against_the_kubernetes_schemas(
    default_docs: list[dict[str, Any]], full_docs: list[dict[str, Any]], values: str, version: str
) -> None:
    docs = default_docs if values == "default" else full_docs
    checked = []
    custom = {crd_kind(path) for path in CUSTOM_RESOURCE_CRDS}
    for doc in docs:
        if doc["kind"] in custom:
            continue  # custom resources: see the next test
        # strict: unknown fields fail too, as `kubectl --validate=strict` would
        kubernetes_validate.validate(doc, version, strict=True)
        checked.append(doc["kind"])
    assert {"Deployment", "Service", "Role", "NetworkPolicy", "Secret"} <= set(checked)


def _strict(schema: Any) -> Any:
    """A CRD schema that rejects the fields it does not list (as kubeconform's strict mode):
    the apiserver would silently prune them instead."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def test_custom_resources_validate_against_their_upstream_crds(
    full_docs: list[dict[str, Any]],
) -> None:
    schemas = {crd_kind(path): _strict(schema_of_crd(path)) for path in CUSTOM_RESOURCE_CRDS}
    kinds = [doc["kind"] for doc in full_docs if doc["kind"] in schemas]
    assert (
        sorted(kinds)
        == ["ClusterTrainingRuntime", "KopfPeering", "PodMonitor", "PrometheusRule"]
        + ["ServiceMonitor"] * 3
    )
    for doc in full_docs:
        if doc["kind"] in schemas:
            jsonschema.Draft7Validator(schemas[doc["kind"]]).validate(doc)
    # and the check is not vacuous: an unknown field fails
    bad = copy.deepcopy(by_kind(full_docs, "ServiceMonitor")[f"{FULLNAME}-api"])
    bad["spec"]["endpoints"][0]["portt"] = "http"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schemas["ServiceMonitor"]).validate(bad)
    runtime = copy.deepcopy(by_kind(full_docs, "ClusterTrainingRuntime")[f"{FULLNAME}-trainer"])
    runtime["spec"]["template"]["spec"]["failurePolicy"]["maxRestartz"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schemas["ClusterTrainingRuntime"]).validate(runtime)


def test_monitoring_objects_need_the_prometheus_operator_api(
    helm_local: Tool, full_values: Path
) -> None:
    without = render(helm_local, full_values)
    assert not [d["kind"] for d in without if d["kind"] in MONITORING_KINDS]
    with_api = render(helm_local, full_values, api_versions=[MONITORING_API])
    assert {d["kind"] for d in with_api} >= MONITORING_KINDS
    switched_off = render(
        helm_local,
        full_values,
        api_versions=[MONITORING_API],
        sets=[
            "monitoring.serviceMonitor.enabled=false",
            "monitoring.podMonitor.enabled=false",
            "monitoring.rules.enabled=false",
        ],
    )
    assert not [d["kind"] for d in switched_off if d["kind"] in MONITORING_KINDS]


def test_the_chart_ships_the_crds_from_crds(helm_local: Tool) -> None:
    out = helm_local(*template_args(), "--include-crds")
    crds = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "CustomResourceDefinition"]
    committed = [
        yaml.safe_load((REPO_ROOT / "crds" / name).read_text())
        for name in (
            "finetunejobs.kubetune.io.yaml",
            "basemodels.kubetune.io.yaml",
            "kopf-peering.yaml",
        )
    ]
    assert sorted(crds, key=lambda c: c["metadata"]["name"]) == sorted(
        committed, key=lambda c: c["metadata"]["name"]
    )


def test_several_operator_replicas_peer(full_docs: list[dict[str, Any]]) -> None:
    operator = by_kind(full_docs, "Deployment")[f"{FULLNAME}-operator"]
    assert operator["spec"]["replicas"] == 2
    assert operator["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0},
    }
    env = env_of(container(operator["spec"]["template"], "operator"))
    (peering,) = by_kind(full_docs, "KopfPeering").values()
    assert env["KUBETUNE_OPERATOR__PEERING"] == peering["metadata"]["name"]
    assert peering["metadata"]["namespace"] == NAMESPACE


# --------------------------------------------------------------------------- values schema


@pytest.mark.parametrize(
    ("sets", "complaint"),
    [
        (["api.replicas=notanumber"], "/api/replicas"),
        (["api.replica=2"], "replica"),  # a typo is an unknown key
        (["vllm.maxLoraRank=7"], "/vllm/maxLoraRank"),
        (["models[0].id=x,models[0].name=Bad_Name,models[0].path=p"], "/models/0/name"),
        (["models[0].id=x,models[0].name=x"], "path"),  # required
        (["models[0].id=a:b,models[0].name=x,models[0].path=p"], "/models/0/id"),
        (
            ["apiKeys.keys[0].name=a,apiKeys.keys[0].org=acme,apiKeys.keys[0].sha256=abc"],
            "/apiKeys/keys/0/sha256",
        ),
        (["objectStore.backend=local"], "/objectStore/backend"),
        (["monitoring.rules.throughputDropRatio=1.5"], "/monitoring/rules/throughputDropRatio"),
        (["monitoring.serviceMonitor.interval=30 seconds"], "/monitoring/serviceMonitor/interval"),
    ],
)
def test_values_schema_rejects_a_wrong_value(
    helm_local: Tool, sets: list[str], complaint: str
) -> None:
    proc = helm_local.run(*template_args(sets=sets), check=False)
    assert proc.returncode != 0, f"{sets} rendered:\n{proc.stdout[:500]}"
    assert "values don't meet the specifications of the schema" in proc.stderr or (
        "schema" in proc.stderr
    ), proc.stderr
    assert complaint in proc.stderr, proc.stderr


def test_values_schema_lora_ranks_are_vllms() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    vllm_rank = schema["properties"]["vllm"]["properties"]["maxLoraRank"]["enum"]
    model_rank = schema["properties"]["models"]["items"]["properties"]["serving"]["properties"][
        "maxLoraRank"
    ]["enum"]
    assert vllm_rank == model_rank == list(VLLM_LORA_RANKS)


def test_every_default_value_is_described_by_the_schema() -> None:
    """values.yaml and values.schema.json describe the same keys (the docs table needs both)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(value: Any, node: dict[str, Any], path: str) -> list[str]:
        missing = []
        if isinstance(value, dict) and "properties" in node:
            for key, child in value.items():
                if key not in node["properties"]:
                    missing.append(f"{path}.{key}")
                else:
                    missing += walk(child, node["properties"][key], f"{path}.{key}")
        described = "properties" in node or node.get("type") not in ("object", "array")
        if described and path and not node.get("description"):
            missing.append(f"{path} (no description)")
        return missing

    assert walk(values, schema, "") == []


# --------------------------------------------------------------------------- Pod Security

ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(template: dict[str, Any]) -> list[str]:
    """Breaches of the "restricted" Pod Security Standard (Kubernetes' policy list, v1.30),
    plus our own rule that every root filesystem is read-only."""
    spec = template["spec"]
    pod = spec.get("securityContext", {})
    found = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(key)
    if pod.get("sysctls"):
        found.append("sysctls")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            found.append(f"volume {volume['name']}: {kinds}")
    containers = (
        spec.get("containers", [])
        + spec.get("initContainers", [])
        + spec.get("ephemeralContainers", [])
    )
    for c in containers:
        sc = c.get("securityContext", {})
        name = c["name"]
        if sc.get("privileged"):
            found.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation not false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            found.append(f"{name}: capabilities not dropped")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities {caps['add']}")
        non_root = sc.get("runAsNonRoot", pod.get("runAsNonRoot"))
        if non_root is not True:
            found.append(f"{name}: runAsNonRoot not true")
        if 0 in (sc.get("runAsUser"), pod.get("runAsUser")):
            found.append(f"{name}: runs as uid 0")
        seccomp = sc.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile {seccomp}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{name}: hostPort")
        if sc.get("readOnlyRootFilesystem") is not True:
            found.append(f"{name}: root filesystem writable")
    return found


def test_every_pod_meets_the_restricted_pod_security_standard(
    full_docs: list[dict[str, Any]],
) -> None:
    templates = dict(pod_templates(full_docs))
    assert len(templates) == 4  # api, operator, two vLLM models
    assert {name: restricted_violations(t) for name, t in templates.items()} == {
        name: [] for name in templates
    }
    # the checker itself catches a breach
    broken = copy.deepcopy(next(iter(templates.values())))
    broken["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    broken["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert len(restricted_violations(broken)) == 2


def test_the_optional_namespace_enforces_restricted(helm_local: Tool) -> None:
    docs = render(helm_local, sets=["namespace.create=true"])
    ns = by_kind(docs, "Namespace")[NAMESPACE]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert "Namespace" not in {d["kind"] for d in render(helm_local)}


# --------------------------------------------------------------------------- serving


def test_one_vllm_deployment_and_service_per_served_model(full_docs: list[dict[str, Any]]) -> None:
    deployments = by_kind(full_docs, "Deployment")
    services = by_kind(full_docs, "Service")
    served = [m for m in FULL_VALUES["models"] if m.get("serving", {}).get("enabled", True)]
    assert len(served) == 2
    for model in FULL_VALUES["models"]:
        name = f"{FULLNAME}-vllm-{model['name']}"
        if model not in served:
            assert name not in deployments
            assert name not in services
            continue
        deployment, service = deployments[name], services[name]
        template = deployment["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert labels[LABEL_BASE_MODEL] == model["name"]
        # the Service selects exactly this model's pods
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"]["selector"][LABEL_BASE_MODEL] == model["name"]
        assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]

        serving = {**FULL_VALUES.get("vllm", {}), **model.get("serving", {})}
        vllm = container(template, "vllm")
        args = vllm["args"]
        assert vllm["command"] == ["vllm", "serve"]
        assert args[0] == model.get("serving", {}).get("model", model["path"])
        assert f"--served-model-name={model['id']}" in args
        assert "--enable-lora" in args
        assert f"--max-loras={serving.get('maxLoras', 8)}" in args
        assert f"--max-lora-rank={serving.get('maxLoraRank', 64)}" in args
        assert f"--tensor-parallel-size={serving.get('gpus', 1)}" in args
        assert f"--max-model-len={model['contextLength']}" in args
        assert deployment["spec"]["replicas"] == serving.get("replicas", 1)
        env = env_of(vllm)
        assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert env["VLLM_LORA_RESOLVER_CACHE_DIR"] == "/adapters"
        assert env["HF_TOKEN"] == "<from>"
        gpus = serving.get("gpus", 1)
        # a string: server-side apply (helm 4) rejects a number where a quantity goes
        assert vllm["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
        assert vllm["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)
        assert vllm["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert vllm["ports"][0]["containerPort"] == observability.VLLM_PORT

        # adapters: the sidecar writes the volume vLLM reads
        sync = container(template, "adapter-sync")
        assert sync["command"] == ["python", "-m", "kubetune_operator.adapter_sync"]
        assert sync["image"] == "ghcr.io/kubetune/operator:0.1.0"
        vllm_mounts = {m["mountPath"]: m for m in vllm["volumeMounts"]}
        sync_mounts = {m["mountPath"]: m for m in sync["volumeMounts"]}
        assert vllm_mounts["/adapters"]["name"] == sync_mounts["/adapters"]["name"]
        assert vllm_mounts["/adapters"].get("readOnly") is True
        assert not sync_mounts["/adapters"].get("readOnly")
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert "emptyDir" in volumes[vllm_mounts["/adapters"]["name"]]
        assert env_of(sync)["KUBETUNE_SERVING__BASE_MODEL"] == model["id"]
        assert env_of(sync)["KUBETUNE_SERVING__VLLM_MODEL"] == args[0]
        assert env_of(sync)["KUBETUNE_OBJECT_STORE__BUCKET"] == "kubetune-data"
        assert template["spec"]["automountServiceAccountToken"] is False


def test_replicated_models_get_a_disruption_budget_and_spread(
    helm_local: Tool, tmp_path: Path
) -> None:
    spread = {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone"}
    values = {
        "models": [
            {"id": "a", "name": "a", "path": "/a", "serving": {"replicas": 3}},
            {"id": "b", "name": "b", "path": "/b"},  # one replica: nothing to budget
        ],
        "vllm": {"topologySpreadConstraints": [{**spread, "whenUnsatisfiable": "DoNotSchedule"}]},
    }
    docs = render(helm_local, write_values(tmp_path, values), api_versions=["policy/v1"])
    budgets = by_kind(docs, "PodDisruptionBudget")
    deployment = by_kind(docs, "Deployment")[f"{FULLNAME}-vllm-a"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    budget = budgets[f"{FULLNAME}-vllm-a"]
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert f"{FULLNAME}-vllm-b" not in budgets
    (constraint,) = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert constraint.items() >= spread.items()
    selector = constraint["labelSelector"]["matchLabels"]
    assert selector["kubetune.io/base-model"] == "a"
    assert selector.items() <= pod_labels.items()


def test_vllm_cannot_serve_from_the_object_store(helm_local: Tool, tmp_path: Path) -> None:
    model = {"id": "m", "name": "m", "path": "store:models/m"}
    proc = helm_local.run(*template_args(write_values(tmp_path, {"models": [model]})), check=False)
    assert proc.returncode != 0
    assert "set its serving.model" in proc.stderr
    served = {**model, "serving": {"model": "org/m"}}
    docs = render(helm_local, write_values(tmp_path, {"models": [served]}))
    vllm = by_kind(docs, "Deployment")[f"{FULLNAME}-vllm-m"]["spec"]["template"]
    assert container(vllm, "vllm")["args"][0] == "org/m"
    catalogue = json.loads(
        env_of(
            container(by_kind(docs, "Deployment")[f"{FULLNAME}-api"]["spec"]["template"], "api")
        )["KUBETUNE_MODELS"]
    )
    assert catalogue[0]["path"] == "store:models/m"  # trainers still read the store


def test_images_default_to_the_app_version(default_docs: list[dict[str, Any]]) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    images = {
        c["name"]: c["image"]
        for _, t in pod_templates(default_docs)
        for c in t["spec"]["containers"]
    }
    assert images["api"] == f"ghcr.io/kubetune/api:{chart['appVersion']}"
    assert images["operator"] == f"ghcr.io/kubetune/operator:{chart['appVersion']}"
    assert images["vllm"].startswith("vllm/vllm-openai:v")
    operator = by_kind(default_docs, "Deployment")[f"{FULLNAME}-operator"]["spec"]["template"]
    trainer_image = env_of(container(operator, "operator"))["KUBETUNE_OPERATOR__TRAINER_IMAGE"]
    assert trainer_image == f"ghcr.io/kubetune/trainer:{chart['appVersion']}"


def test_a_digest_pins_each_image(helm_local: Tool) -> None:
    digest = "sha256:" + "ab" * 32
    sets = [
        f"{component}.image.digest={digest}" for component in ("api", "operator", "trainer", "vllm")
    ]
    docs = render(helm_local, sets=[*sets, "models[0].id=m,models[0].name=m,models[0].path=/m"])
    images = {c["image"] for _, t in pod_templates(docs) for c in t["spec"]["containers"]}
    assert images == {
        f"ghcr.io/kubetune/api@{digest}",
        f"ghcr.io/kubetune/operator@{digest}",
        f"vllm/vllm-openai@{digest}",
    }
    operator = by_kind(docs, "Deployment")[f"{FULLNAME}-operator"]["spec"]["template"]
    env = env_of(container(operator, "operator"))
    assert env["KUBETUNE_OPERATOR__TRAINER_IMAGE"] == f"ghcr.io/kubetune/trainer@{digest}"
    (runtime,) = by_kind(docs, "ClusterTrainingRuntime").values()
    node = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert (
        node["template"]["spec"]["containers"][0]["image"] == f"ghcr.io/kubetune/trainer@{digest}"
    )


def test_chart_ports_are_the_declared_ones(default_docs: list[dict[str, Any]]) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["api"]["port"] == observability.API_PORT
    assert values["operator"]["metricsPort"] == observability.OPERATOR_METRICS_PORT
    assert values["trainer"]["metricsPort"] == observability.TRAINER_METRICS_PORT
    assert values["vllm"]["port"] == observability.VLLM_PORT
    assert values["vllm"]["adapterSync"]["port"] == observability.ADAPTER_SYNC_PORT


# --------------------------------------------------------------------------- API settings


def test_the_api_environment_is_understood_by_the_settings(
    full_docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    template = by_kind(full_docs, "Deployment")[f"{FULLNAME}-api"]["spec"]["template"]
    api = container(template, "api")
    env = env_of(api)
    for name in list(os.environ):
        if name.startswith("KUBETUNE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if value != "<from>":
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.mode is Mode.KUBERNETES
    assert settings.kubernetes.namespace == NAMESPACE
    assert settings.api.port == observability.API_PORT
    assert settings.object_store.bucket == "kubetune-data"
    assert settings.object_store.prefix == "prod"
    assert settings.object_store.endpoint_url == "https://s3.eu-west-1.amazonaws.com"
    assert [m.id for m in settings.models] == [m["id"] for m in FULL_VALUES["models"]]
    assert settings.models[0].context_length == 8192
    catalogue = json.loads(env["KUBETUNE_MODELS"])
    assert catalogue[0]["serving_url"] == (
        f"http://{FULLNAME}-vllm-llama-3-1-8b.{NAMESPACE}.svc:{observability.VLLM_PORT}"
    )
    assert "serving_url" not in catalogue[2]  # not served

    # the keys file the settings name is the Secret's key, mounted there
    keys_file = settings.api.api_keys_file
    assert keys_file is not None
    mount = next(m for m in api["volumeMounts"] if str(keys_file).startswith(m["mountPath"] + "/"))
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
    secret = by_kind(full_docs, "Secret")[volume["secret"]["secretName"]]
    item = volume["secret"]["items"][0]
    assert keys_file.name == item["path"]
    local = tmp_path / "keys.json"
    local.write_text(secret["stringData"][item["key"]])
    principal = KeyStore.from_file(local).authenticate(f"Bearer {ACME_KEY}")
    assert principal.org == "acme"
    # The API enforces the queue allow-list and the GPU caps.
    queueing = settings.queueing
    assert queueing.default_queue_of("acme") == "acme-queue"
    assert queueing.default_queue_of("other") == "shared"
    assert queueing.queue_allowed("acme", "acme-urgent")
    assert queueing.queue_allowed("other", "shared-spot")
    assert not queueing.queue_allowed("other", "acme-urgent")
    assert (queueing.max_gpus_per_job, queueing.gpu_types) == (16, ["NVIDIA-H100-80GB-HBM3"])


def _is_setting(name: str) -> bool:
    """Whether ``KUBETUNE_A__B`` names a field of :class:`Settings` (nested with ``__``)."""
    from pydantic import BaseModel

    model: type[BaseModel] = Settings
    parts = name.removeprefix("KUBETUNE_").lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i < len(parts) - 1:
            nested = field.annotation
            if not (isinstance(nested, type) and issubclass(nested, BaseModel)):
                return False
            model = nested
    return True


def test_every_kubetune_variable_is_a_setting(full_docs: list[dict[str, Any]]) -> None:
    """The API and the operator read every KUBETUNE_* variable the chart sets: a misspelt or
    invented one would be ignored silently (the settings ignore unknown variables)."""
    assert _is_setting("KUBETUNE_OPERATOR__TRAINER_IMAGE")
    assert not _is_setting("KUBETUNE_OPERATOR__TRAINER_IMAGES")
    unknown = []
    for name, template in pod_templates(full_docs):
        for c in template["spec"]["containers"]:
            if c["name"] == "adapter-sync":
                # KUBETUNE_SERVING__*: the sidecar's settings come with it (serving issue)
                continue
            unknown += [
                f"{name}/{c['name']}: {var}"
                for var in env_of(c)
                if var.startswith("KUBETUNE_") and not _is_setting(var)
            ]
    assert unknown == []


def test_the_operator_environment_is_understood_by_the_settings(
    full_docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    template = by_kind(full_docs, "Deployment")[f"{FULLNAME}-operator"]["spec"]["template"]
    env = env_of(container(template, "operator"))
    for name in list(os.environ):
        if name.startswith("KUBETUNE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if value != "<from>":
            monkeypatch.setenv(name, value)
    settings = Settings()
    operator = settings.operator
    assert settings.mode is Mode.KUBERNETES
    assert settings.kubernetes.namespace == NAMESPACE
    assert operator.trainer_image == "ghcr.io/kubetune/trainer:0.1.0"
    assert operator.service_account == f"{FULLNAME}-trainer"
    assert operator.metrics_port == observability.OPERATOR_METRICS_PORT
    assert operator.trainer_metrics_port == observability.TRAINER_METRICS_PORT
    assert operator.node_selector == FULL_VALUES["trainer"]["nodeSelector"]
    assert [t.model_dump(exclude_none=True) for t in operator.tolerations] == FULL_VALUES[
        "trainer"
    ]["tolerations"]
    assert operator.priority_class == "training"
    assert operator.credentials_secret == "trainer-env"
    queueing = settings.queueing
    assert queueing.kueue is True
    assert queueing.max_queued_seconds == 86400
    assert queueing.max_gpus_per_org == 64
    assert [m.id for m in settings.models] == [m["id"] for m in FULL_VALUES["models"]]
    assert settings.object_store.bucket == "kubetune-data"


def test_an_existing_keys_secret_is_mounted_instead(helm_local: Tool, tmp_path: Path) -> None:
    values = write_values(
        tmp_path, {"apiKeys": {"existingSecret": "my-keys", "secretKey": "k.json"}}
    )
    docs = render(helm_local, values)
    assert list(by_kind(docs, "Secret")) == [f"{FULLNAME}-vllm-api-key"]  # no keys Secret
    template = by_kind(docs, "Deployment")[f"{FULLNAME}-api"]["spec"]["template"]
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == "my-keys"
    assert env_of(container(template, "api"))["KUBETUNE_API__API_KEYS_FILE"].endswith("/k.json")


def test_workload_identity_reaches_every_object_store_client(
    full_docs: list[dict[str, Any]],
) -> None:
    accounts = by_kind(full_docs, "ServiceAccount")
    role = FULL_VALUES["objectStore"]["serviceAccountAnnotations"]
    assert sorted(accounts) == sorted(
        f"{FULLNAME}-{c}" for c in ("api", "operator", "trainer", "vllm")
    )
    for sa in accounts.values():
        assert sa["metadata"]["annotations"].items() >= role.items()
    for name, template in pod_templates(full_docs):
        assert template["metadata"]["labels"]["azure.workload.identity/use"] == "true", name
    operator = by_kind(full_docs, "Deployment")[f"{FULLNAME}-operator"]["spec"]["template"]
    env = env_of(container(operator, "operator"))
    assert env["KUBETUNE_OPERATOR__SERVICE_ACCOUNT"] == f"{FULLNAME}-trainer"


def test_network_policies_keep_clients_away_from_vllm(full_docs: list[dict[str, Any]]) -> None:
    policies = by_kind(full_docs, "NetworkPolicy")
    deny = policies[f"{FULLNAME}-default-deny"]
    assert deny["spec"]["policyTypes"] == ["Ingress"]
    assert "ingress" not in deny["spec"]
    vllm = policies[f"{FULLNAME}-vllm"]["spec"]
    for rule in vllm["ingress"]:
        assert rule.get("from"), f"a vLLM ingress rule admits everyone: {rule}"
    inference = vllm["ingress"][0]
    components = {
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in inference["from"]
    }
    assert components == {"api", "operator"}
    sync = next(r for r in vllm["ingress"] if r["ports"][0]["port"] == "adapter-sync")
    assert [
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in sync["from"]
    ] == ["operator"]


def test_a_jobs_trainer_pods_reach_each_other_and_are_scraped(
    full_docs: list[dict[str, Any]],
) -> None:
    """The default-deny policy selects the trainer pods the chart's runtime labels; without a
    policy of their own a multi-node job's ranks could not rendezvous."""
    policies = by_kind(full_docs, "NetworkPolicy")
    (runtime,) = [
        r
        for r in by_kind(full_docs, "ClusterTrainingRuntime").values()
        if "-trainer" in r["metadata"]["name"]
    ][:1]
    node = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]
    labels = node["template"]["metadata"]["labels"]

    def selects(policy: dict[str, Any]) -> bool:
        wanted: dict[str, str] = policy["spec"]["podSelector"]["matchLabels"]
        return all(labels.get(k) == v for k, v in wanted.items())

    assert selects(policies[f"{FULLNAME}-default-deny"])
    trainer = policies[f"{FULLNAME}-trainer"]
    assert selects(trainer)
    peers, metrics = trainer["spec"]["ingress"]
    assert "ports" not in peers  # every port: rendezvous, gloo, NCCL
    (peer,) = peers["from"]
    assert peer["podSelector"]["matchLabels"].items() <= labels.items()
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics["from"] == FULL_VALUES.get("networkPolicy", {}).get(
        "metricsFrom",
        yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]["metricsFrom"],
    )


def test_vllm_runs_with_an_api_key_only_the_proxy_and_the_sidecar_hold(
    full_docs: list[dict[str, Any]],
) -> None:
    secret = by_kind(full_docs, "Secret")[f"{FULLNAME}-vllm-api-key"]
    assert len(base64.b64decode(secret["data"]["api-key"])) == 48
    holders = {}
    for name, template in pod_templates(full_docs):
        for c in template["spec"]["containers"]:
            for var in c.get("env") or []:
                ref = (var.get("valueFrom") or {}).get("secretKeyRef") or {}
                if ref.get("name") == secret["metadata"]["name"]:
                    holders[f"{name}/{c['name']}"] = var["name"]
    served = [m["name"] for m in FULL_VALUES["models"] if m.get("serving", {}).get("enabled", True)]
    expected = {f"Deployment/{FULLNAME}-api/api": "KUBETUNE_SERVING__VLLM_API_KEY"}
    for model in served:
        deployment = f"Deployment/{FULLNAME}-vllm-{model}"
        expected[f"{deployment}/vllm"] = "VLLM_API_KEY"
        expected[f"{deployment}/adapter-sync"] = "KUBETUNE_SERVING__VLLM_API_KEY"
    assert holders == expected


def test_a_models_weight_claim_reaches_vllm_and_the_catalogue(
    full_docs: list[dict[str, Any]],
) -> None:
    deployment = by_kind(full_docs, "Deployment")[f"{FULLNAME}-vllm-qwen2-5-0-5b"]
    spec = deployment["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "weights")
    assert volume["persistentVolumeClaim"] == {"claimName": "qwen-weights", "readOnly": True}
    mount = next(
        m
        for m in container(deployment["spec"]["template"], "vllm")["volumeMounts"]
        if m["name"] == "weights"
    )
    assert mount == {
        "name": "weights",
        "mountPath": "/models/Qwen2.5-0.5B-Instruct",
        "readOnly": True,
    }
    operator = by_kind(full_docs, "Deployment")[f"{FULLNAME}-operator"]["spec"]["template"]
    catalogue = json.loads(env_of(container(operator, "operator"))["KUBETUNE_MODELS"])
    claims = {entry["id"]: entry.get("volume_claim") for entry in catalogue}
    assert claims["qwen2.5-0.5b-instruct"] == "qwen-weights"
    for name, template in pod_templates(full_docs):
        for v in template["spec"].get("volumes") or []:
            if "emptyDir" in v and name.startswith(("Deployment/" + FULLNAME + "-vllm",)):
                assert "sizeLimit" in v["emptyDir"], f"{name}: {v['name']} has no size limit"


def test_helm_test_checks_the_api_from_inside_the_cluster(
    full_docs: list[dict[str, Any]],
) -> None:
    (pod,) = [d for d in full_docs if d["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert restricted_violations({"metadata": pod["metadata"], "spec": pod["spec"]}) == []
    (check,) = pod["spec"]["containers"]
    script = check["command"][-1]
    compile(script, "helm-test", "exec")  # the check itself is valid Python
    service = by_kind(full_docs, "Service")[f"{FULLNAME}-api"]
    port = service["spec"]["ports"][0]["port"]
    assert f"http://{FULLNAME}-api.{NAMESPACE}.svc:{port}" in script
    # Not one of the release's pods: the default-deny policy does not select it.
    deny = by_kind(full_docs, "NetworkPolicy")[f"{FULLNAME}-default-deny"]
    selector = deny["spec"]["podSelector"]["matchLabels"]
    assert not all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items())
