"""Upstream CRDs (``../shared/reference/``) as the test apiserver can install them.

The test apiserver is Kubernetes 1.20, older than these CRDs. ``../shared/reference/README.md``
lists the three mechanical changes that make them load there; :func:`for_old_apiserver` makes
them, and changes nothing else, so the rest of each schema (types, enums, required fields,
patterns, bounds) is enforced on every object the operator and the chart create:

1. drop every ``x-kubernetes-validations`` key (CEL rules need Kubernetes 1.25; a test that
   relies on such a rule states the rule itself);
2. drop every ``default: ""`` (1.20 reads it as null and rejects it);
3. list the keys of every ``x-kubernetes-list-map-keys`` array under its items' ``required``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from tests.harness.paths import REFERENCE_DIR

TRAINER_V2: Final = REFERENCE_DIR / "kubeflow-trainer-v2"
TRAINER_V2_CRDS: Final = tuple(
    TRAINER_V2 / f"trainer.kubeflow.org_{plural}.yaml"
    for plural in ("trainjobs", "trainingruntimes", "clustertrainingruntimes")
)
JOBSET_CRDS: Final = (REFERENCE_DIR / "jobset" / "jobset.x-k8s.io_jobsets.yaml",)
KUEUE_CRDS: Final = tuple(
    REFERENCE_DIR / "kueue" / f"kueue.x-k8s.io_{plural}.yaml"
    for plural in (
        "workloads",
        "localqueues",
        "clusterqueues",
        "resourceflavors",
        "workloadpriorityclasses",
    )
)
MONITORING_CRDS: Final = tuple(
    REFERENCE_DIR / "prometheus-operator" / f"monitoring.coreos.com_{plural}.yaml"
    for plural in ("podmonitors", "servicemonitors", "prometheusrules")
)


def for_old_apiserver(node: Any) -> Any:
    """A copy of a CRD (or any part of one) with the three changes above made."""
    if isinstance(node, list):
        return [for_old_apiserver(item) for item in node]
    if not isinstance(node, dict):
        return node
    result = {
        key: for_old_apiserver(value)
        for key, value in node.items()
        if key != "x-kubernetes-validations" and not (key == "default" and value == "")
    }
    keys = result.get("x-kubernetes-list-map-keys")
    items = result.get("items")
    if keys and isinstance(items, dict):
        required = list(items.get("required") or [])
        items["required"] = required + [k for k in keys if k not in required]
    return result


def is_upstream(path: Path) -> bool:
    """Whether ``path`` is one of the reference CRDs (ours load as they are)."""
    return REFERENCE_DIR in path.parents
