"""Least privilege: the rendered RBAC, and what the real apiserver lets each account do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.chart.chart import CHART, MONITORING_API, RELEASE, by_kind, pod_templates, render
from tests.harness.tools import Tool

FULLNAME = f"{RELEASE}-kubetune"
COMPONENTS = ("api", "operator", "trainer", "vllm")


@pytest.fixture(scope="module")
def docs(helm_local: Tool, full_values: Path) -> list[dict[str, Any]]:
    return render(helm_local, full_values, api_versions=[MONITORING_API, "policy/v1"])


def _rules(docs: list[dict[str, Any]], component: str) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = by_kind(docs, "Role")[f"{FULLNAME}-{component}"]["rules"]
    return rules


def test_rbac_is_namespaced_only(docs: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    assert sorted(by_kind(docs, "Role")) == [f"{FULLNAME}-api", f"{FULLNAME}-operator"]


def test_no_wildcards_and_no_secrets(docs: list[dict[str, Any]]) -> None:
    for name, role in by_kind(docs, "Role").items():
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(field, []), (name, rule)
            assert not {r.split("/")[0] for r in rule["resources"]} & {"secrets"}, (name, rule)
            assert "resourceNames" not in rule or rule["resourceNames"], (name, rule)


def test_the_api_may_only_create_and_flip_finetunejobs(docs: list[dict[str, Any]]) -> None:
    assert _rules(docs, "api") == [
        {
            "apiGroups": ["kubetune.io"],
            "resources": ["finetunejobs"],
            "verbs": ["get", "list", "watch", "create", "patch"],
        },
        # Base models an org's admin registers: no watch, no patch (the status is the
        # operator's), no update.
        {
            "apiGroups": ["kubetune.io"],
            "resources": ["basemodels"],
            "verbs": ["get", "list", "create", "delete"],
        },
        # Idempotency-Key claims (no list or watch: the API reads a claim by its name only).
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "create", "patch", "delete"],
        },
    ]


@pytest.mark.parametrize(
    ("controller", "workload"),
    [
        ("trainjob", ("trainer.kubeflow.org", "trainjobs")),
        ("pytorchjob", ("kubeflow.org", "pytorchjobs")),
    ],
)
def test_the_operator_touches_only_what_it_must(
    helm_local: Tool, full_values: Path, controller: str, workload: tuple[str, str]
) -> None:
    docs = render(
        helm_local,
        full_values,
        api_versions=[MONITORING_API, "policy/v1"],
        sets=[f"trainer.controller={controller}"],
    )
    granted = {
        (group, resource): set(rule["verbs"])
        for rule in _rules(docs, "operator")
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    read = {"get", "list", "watch"}
    assert granted == {
        ("kubetune.io", "finetunejobs"): read | {"patch", "update"},
        ("kubetune.io", "finetunejobs/status"): {"get", "patch", "update"},
        # Registered base models: read, and their check's outcome written, nothing else.
        ("kubetune.io", "basemodels"): read,
        ("kubetune.io", "basemodels/status"): {"get", "patch"},
        workload: read | {"create", "patch", "update", "delete"},
        ("", "configmaps"): read | {"create", "patch", "update", "delete"},
        # The Jobs that merge a LoRA model for a download, or check a registered base model,
        # deleted once they ended.
        ("batch", "jobs"): read | {"create", "patch", "delete"},
        ("", "events"): {"create", "patch"},
        ("events.k8s.io", "events"): {"create", "patch"},
        ("", "pods"): read,
        ("", "endpoints"): read,
        # full_values turn Kueue on: Workloads read and patched (spec.active), never created.
        ("kueue.x-k8s.io", "workloads"): read | {"patch"},
        # and run two operator replicas, which peer through the KopfPeering object.
        ("kopf.dev", "kopfpeerings"): read | {"patch"},
    }


def test_only_with_kueue_the_operator_reads_and_patches_kueue_workloads(
    helm_local: Tool, full_values: Path
) -> None:
    def kueue_rules(kueue: bool) -> list[dict[str, Any]]:
        docs = render(helm_local, full_values, sets=[f"queueing.kueue={str(kueue).lower()}"])
        return [r for r in _rules(docs, "operator") if "kueue.x-k8s.io" in r["apiGroups"]]

    (rule,) = kueue_rules(True)
    assert (rule["resources"], set(rule["verbs"])) == (
        ["workloads"],
        {"get", "list", "watch", "patch"},
    )
    assert kueue_rules(False) == []


def test_each_role_is_bound_to_the_account_its_pods_run_as(docs: list[dict[str, Any]]) -> None:
    accounts = {name: t["spec"]["serviceAccountName"] for name, t in pod_templates(docs)}
    bindings = by_kind(docs, "RoleBinding")
    for component in ("api", "operator"):
        binding = bindings[f"{FULLNAME}-{component}"]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": f"{FULLNAME}-{component}",
        }
        assert [s["name"] for s in binding["subjects"]] == [
            accounts[f"Deployment/{FULLNAME}-{component}"]
        ]
    bound = {s["name"] for b in bindings.values() for s in b["subjects"]}
    assert f"{FULLNAME}-trainer" not in bound
    assert f"{FULLNAME}-vllm" not in bound


# What each account may do on the real apiserver after `helm install`, as RBAC evaluates it:
# (verb, resource, extra kubectl arguments, allowed). "-A" asks cluster-wide.
CAN_I: dict[str, list[tuple[str, str, tuple[str, ...], bool]]] = {
    "api": [
        ("create", "finetunejobs.kubetune.io", (), True),
        ("patch", "finetunejobs.kubetune.io", (), True),
        ("watch", "finetunejobs.kubetune.io", (), True),
        ("patch", "finetunejobs.kubetune.io", ("--subresource=status",), False),
        ("update", "finetunejobs.kubetune.io", ("--subresource=status",), False),
        ("delete", "finetunejobs.kubetune.io", (), False),
        ("list", "finetunejobs.kubetune.io", ("-A",), False),
        ("create", "basemodels.kubetune.io", (), True),
        ("delete", "basemodels.kubetune.io", (), True),
        ("patch", "basemodels.kubetune.io", ("--subresource=status",), False),
        ("create", "pytorchjobs.kubeflow.org", (), False),
        ("create", "trainjobs.trainer.kubeflow.org", (), False),
        ("get", "configmaps", (), False),
        ("get", "secrets", (), False),
        ("list", "secrets", ("-A",), False),
        ("create", "pods", (), False),
    ],
    "operator": [
        ("patch", "finetunejobs.kubetune.io", ("--subresource=status",), True),
        ("watch", "finetunejobs.kubetune.io", (), True),
        ("create", "finetunejobs.kubetune.io", (), False),
        ("delete", "finetunejobs.kubetune.io", (), False),
        ("patch", "basemodels.kubetune.io", ("--subresource=status",), True),
        ("create", "basemodels.kubetune.io", (), False),
        ("create", "trainjobs.trainer.kubeflow.org", (), True),
        ("delete", "trainjobs.trainer.kubeflow.org", (), True),
        ("create", "pytorchjobs.kubeflow.org", (), False),  # trainer.controller is trainjob
        ("create", "clustertrainingruntimes.trainer.kubeflow.org", ("-A",), False),
        ("create", "configmaps", (), True),
        ("create", "events", (), True),
        ("list", "pods", (), True),
        ("watch", "endpoints", (), True),
        ("create", "pods", (), False),
        ("delete", "pods", (), False),
        ("get", "pods", ("--subresource=log",), False),
        ("create", "pods", ("--subresource=exec",), False),
        ("get", "secrets", (), False),
        ("list", "secrets", ("-A",), False),
        ("list", "trainjobs.trainer.kubeflow.org", ("-A",), False),
        ("create", "deployments.apps", (), False),
        ("create", "rolebindings.rbac.authorization.k8s.io", (), False),
    ],
    "trainer": [
        ("get", "finetunejobs.kubetune.io", (), False),
        ("get", "secrets", (), False),
        ("get", "configmaps", (), False),
    ],
    "vllm": [
        ("get", "finetunejobs.kubetune.io", (), False),
        ("list", "endpoints", (), False),
        ("get", "secrets", (), False),
    ],
}


def test_the_apiserver_grants_each_account_exactly_that(
    cluster_tools: tuple[Tool, Tool], namespace: str, full_values: Path
) -> None:
    helm, kubectl = cluster_tools
    helm("install", RELEASE, str(CHART), "-n", namespace, "-f", str(full_values))
    wrong = []
    for component, checks in CAN_I.items():
        user = f"system:serviceaccount:{namespace}:{FULLNAME}-{component}"
        for verb, resource, extra, allowed in checks:
            scope = list(extra) if "-A" in extra else [*extra, "-n", namespace]
            proc = kubectl.run(
                "auth",
                "can-i",
                verb,
                resource,
                *scope,
                "--as",
                user,
                # the groups a real ServiceAccount token carries
                "--as-group",
                "system:serviceaccounts",
                "--as-group",
                f"system:serviceaccounts:{namespace}",
                "--as-group",
                "system:authenticated",
                check=False,
            )
            answer = proc.stdout.strip()
            assert answer in ("yes", "no"), proc.stderr
            if (answer == "yes") is not allowed:
                wrong.append(f"{component}: {verb} {resource} {' '.join(extra)} -> {answer}")
    assert wrong == []
    # and the accounts exist where the bindings point
    for component in ("api", "operator"):
        kubectl("get", "serviceaccount", f"{FULLNAME}-{component}", "-n", namespace)
