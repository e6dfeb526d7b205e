"""The chart on a real kube-apiserver (1.20, RBAC, our CRDs and the Prometheus Operator's).

No controllers run, so Deployments never become ready: the tests check what the apiserver
stored, never readiness (and never use ``helm install --wait``).
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.chart import (
    CHART,
    FULL_VALUES,
    MONITORING_KINDS,
    RELEASE,
    by_kind,
    parse_manifests,
    write_values,
)
from tests.harness.tools import Tool

FULLNAME = f"{RELEASE}-kubetune"


def _ref(doc: dict[str, Any]) -> str:
    group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
    resource = doc["kind"].lower() + (f".{group}" if group else "")
    return f"{resource}/{doc['metadata']['name']}"


def _stored(
    kubectl: Tool, docs: list[dict[str, Any]], namespace: str, tmp_path: Path
) -> dict[str, dict[str, Any]]:
    """The objects the apiserver holds for ``docs`` (one ``kubectl get``), by reference."""
    manifest = tmp_path / "objects.yaml"
    manifest.write_text("---\n".join(json.dumps(d) + "\n" for d in docs))
    out = kubectl("get", "-f", str(manifest), "-n", namespace, "--ignore-not-found", "-o", "json")
    if not out.strip():
        return {}
    listed = json.loads(out)
    items = listed["items"] if listed.get("kind") == "List" else [listed]
    return {_ref(item): item for item in items}


def _missing(rendered: Any, stored: Any, path: str = "") -> list[str]:
    """Where ``stored`` lacks or changed something of ``rendered`` (what the apiserver
    dropped or rewrote); fields the apiserver adds (defaults, status) are fine, and so is an
    empty string, map or list left out (Kubernetes' omitempty)."""
    if isinstance(rendered, dict):
        if not isinstance(stored, dict):
            return [f"{path}: {stored!r}"]
        out = []
        for key, value in rendered.items():
            if key not in stored:
                if value not in ("", {}, []):
                    out.append(f"{path}.{key} dropped")
            else:
                out += _missing(value, stored[key], f"{path}.{key}")
        return out
    if isinstance(rendered, list):
        if not isinstance(stored, list) or len(stored) != len(rendered):
            return [f"{path}: {rendered!r} stored as {stored!r}"]
        return [
            m
            for i, (r, s) in enumerate(zip(rendered, stored, strict=True))
            for m in _missing(r, s, f"{path}[{i}]")
        ]
    if rendered != stored and str(rendered) != str(stored):
        return [f"{path}: {rendered!r} stored as {stored!r}"]
    return []


def _as_stored(doc: dict[str, Any]) -> dict[str, Any]:
    """A rendered object as the apiserver keeps it: Secret stringData becomes data."""
    doc = copy.deepcopy(doc)
    if doc["kind"] == "Secret" and "stringData" in doc:
        data = doc.setdefault("data", {})
        for key, value in doc.pop("stringData").items():
            data[key] = base64.b64encode(value.encode()).decode()
    return doc


def _release_objects(helm: Tool, namespace: str) -> list[dict[str, Any]]:
    return parse_manifests(helm("get", "manifest", RELEASE, "-n", namespace))


def _install(helm: Tool, namespace: str, values: Path, command: str = "install") -> None:
    # never --wait: no controller or kubelet runs, nothing becomes ready
    helm(command, RELEASE, str(CHART), "-n", namespace, "-f", str(values), "--timeout", "60s")


def test_rendered_objects_pass_the_apiservers_validation(
    cluster_tools: tuple[Tool, Tool], namespace: str, full_values: Path, tmp_path: Path
) -> None:
    helm, kubectl = cluster_tools
    # --validate renders with the cluster's real capabilities and checks its OpenAPI schema
    out = helm(
        "template", RELEASE, str(CHART), "-n", namespace, "-f", str(full_values), "--validate"
    )
    docs = parse_manifests(out)
    kinds = {d["kind"] for d in docs}
    assert kinds >= MONITORING_KINDS  # the CRDs are served, so the monitoring objects render
    assert "PodDisruptionBudget" not in kinds  # 1.20 serves policy/v1beta1 only
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(out)
    applied = kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", str(manifest)
    )
    assert applied.count("(server dry run)") == len(docs)

    # the same validation refuses an unknown field
    broken = out.replace("imagePullPolicy:", "imagePullPolcy:", 1)
    manifest.write_text(broken)
    proc = kubectl.run(
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-n",
        namespace,
        "-f",
        str(manifest),
        check=False,
    )
    assert proc.returncode != 0
    assert 'unknown field "imagePullPolcy"' in proc.stderr


def test_install_upgrade_and_uninstall(
    cluster_tools: tuple[Tool, Tool], namespace: str, full_values: Path, tmp_path: Path
) -> None:
    helm, kubectl = cluster_tools
    _install(helm, namespace, full_values)
    assert json.loads(helm("status", RELEASE, "-n", namespace, "-o", "json"))["info"]["status"] == (
        "deployed"
    )

    # every rendered object was created, and the apiserver kept every field of it
    objects = _release_objects(helm, namespace)
    assert len(objects) >= 25
    stored = _stored(kubectl, objects, namespace, tmp_path)
    assert sorted(stored) == sorted(_ref(d) for d in objects)
    dropped = {}
    for doc in objects:
        problems = _missing(_as_stored(doc), stored[_ref(doc)])
        if problems:
            dropped[_ref(doc)] = problems
    assert dropped == {}
    deployments = by_kind(objects, "Deployment")
    assert {f"{FULLNAME}-api", f"{FULLNAME}-operator"} <= set(deployments)
    assert {d["kind"] for d in objects} >= MONITORING_KINDS | {"Ingress", "NetworkPolicy"}

    # upgrade: more API replicas, one model retired, one added
    values = copy.deepcopy(FULL_VALUES)
    values["api"]["replicas"] = 3
    values["models"] = [m for m in values["models"] if m["name"] != "qwen2-5-0-5b"] + [
        {"id": "phi-3.5-mini", "name": "phi-3-5-mini", "path": "/models/Phi-3.5-mini-instruct"}
    ]
    values["apiKeys"]["keys"][0]["name"] = "acme-key-2"
    api_ref = f"deployment.apps/{FULLNAME}-api"
    before = stored[api_ref]
    _install(helm, namespace, write_values(tmp_path, values), "upgrade")
    api = _stored(kubectl, [deployments[f"{FULLNAME}-api"]], namespace, tmp_path)[api_ref]
    assert api["spec"]["replicas"] == 3
    checksum = "checksum/api-keys"
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations[checksum] != before["spec"]["template"]["metadata"]["annotations"][checksum]
    catalogue = next(
        e["value"]
        for e in api["spec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"] == "KUBETUNE_MODELS"
    )
    assert [m["id"] for m in json.loads(catalogue)] == [m["id"] for m in values["models"]]
    retired = f"{FULLNAME}-vllm-qwen2-5-0-5b"
    for kind in ("deployment.apps", "service"):
        assert kubectl.run("get", f"{kind}/{retired}", "-n", namespace, check=False).returncode != 0
        kubectl("get", f"{kind}/{FULLNAME}-vllm-phi-3-5-mini", "-n", namespace)
    assert json.loads(helm("status", RELEASE, "-n", namespace, "-o", "json"))["version"] == 2

    # uninstall removes everything it created
    upgraded = _release_objects(helm, namespace)
    helm("uninstall", RELEASE, "-n", namespace)
    assert _stored(kubectl, upgraded, namespace, tmp_path) == {}
    # the CRD stays (Helm never deletes crds/), so FineTuneJobs survive an uninstall
    kubectl("get", "crd", "finetunejobs.kubetune.io")


def test_a_wrong_value_stops_the_install(cluster_tools: tuple[Tool, Tool], namespace: str) -> None:
    helm, kubectl = cluster_tools
    proc = helm.run(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        namespace,
        "--set",
        "api.replicas=notanumber",
        check=False,
    )
    assert proc.returncode != 0
    assert "/api/replicas" in proc.stderr
    assert kubectl("get", "deployments,secrets,roles", "-n", namespace, "-o", "name") == ""


@pytest.mark.parametrize("monitoring", [False, True])
def test_default_values_install(
    cluster_tools: tuple[Tool, Tool], namespace: str, tmp_path: Path, monitoring: bool
) -> None:
    helm, kubectl = cluster_tools
    sets = {
        "monitoring": {
            "serviceMonitor": {"enabled": monitoring},
            "podMonitor": {"enabled": monitoring},
            "rules": {"enabled": monitoring},
        }
    }
    _install(helm, namespace, write_values(tmp_path, sets))
    objects = _release_objects(helm, namespace)
    kinds = {d["kind"] for d in objects}
    assert (kinds >= MONITORING_KINDS) is monitoring
    assert not (MONITORING_KINDS & kinds) or monitoring
    assert sorted(_stored(kubectl, objects, namespace, tmp_path)) == sorted(
        _ref(d) for d in objects
    )
    helm("uninstall", RELEASE, "-n", namespace)


def test_the_documented_crd_upgrade_step_upgrades_an_installed_crd(
    cluster_tools: tuple[Tool, Tool], tmp_path: Path
) -> None:
    """Helm installs crds/ on a first install only; docs/helm-gpu.md's upgrade step
    (``kubectl apply --server-side --force-conflicts -f charts/kubetune/crds/``) brings an
    installed CRD up to date. Played on a copy under a group of its own, so the cluster's real
    CRD, which other tests use, is left alone."""
    _, kubectl = cluster_tools
    current = yaml.safe_load((CHART / "crds" / "finetunejobs.kubetune.io.yaml").read_text())
    group = "upgrade-test.kubetune.io"
    current["spec"]["group"] = group
    current["metadata"]["name"] = f"{current['spec']['names']['plural']}.{group}"
    # The previous release's CRD: the same, before resources.profile existed, installed the way
    # helm installs crds/ (a plain create).
    previous = copy.deepcopy(current)
    schema = previous["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    resources = schema["properties"]["spec"]["properties"]["resources"]
    del resources["properties"]["profile"]
    old_file, new_file = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old_file.write_text(yaml.safe_dump(previous))
    new_file.write_text(yaml.safe_dump(current))
    kubectl("create", "-f", str(old_file))
    try:
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(new_file))
        stored = json.loads(kubectl("get", "crd", current["metadata"]["name"], "-o", "json"))
        served = stored["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert "profile" in served["properties"]["spec"]["properties"]["resources"]["properties"]
    finally:
        kubectl("delete", "-f", str(new_file), "--wait=false")
