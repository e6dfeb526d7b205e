"""Kueue, as the operator sees it: the Workload Kueue makes for each queued TrainJob or
PyTorchJob, and what it says about the job's admission (pure functions).

With Kueue, admission belongs to Kueue alone: a job's workload is created suspended (Kueue's
webhook would suspend it anyway), Kueue unsuspends it when it admits it and suspends it again
when it preempts it. The operator never writes ``suspend`` of such a workload; a pause sets the
Kueue Workload's ``spec.active`` to false (Kueue evicts it and keeps it out of the queue), a
resume sets it back to true (Kueue queues it again). See Kueue's "Workload" concept page,
section "Active".

Kueue names the Workload ``<kind>-<job name>-<hash>`` and makes the job its controlling owner;
the operator finds it by that owner reference, never by guessing the name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from kubetune_operator.kube import Kind
from kubetune_runtime.observed import Waiting

KUEUE_WORKLOAD: Final = Kind("kueue.x-k8s.io", "v1beta2", "workloads", "Workload")

# Kueue's condition types and reasons (apis/kueue/v1beta2/workload_types.go).
QUOTA_RESERVED: Final = "QuotaReserved"
ADMITTED: Final = "Admitted"
EVICTED: Final = "Evicted"
PREEMPTED: Final = "Preempted"
EVICTED_BY_PREEMPTION: Final = "Preempted"


@dataclass(frozen=True)
class Admission:
    """A Kueue Workload, reduced to what the operator reads of it."""

    name: str
    resource_version: str
    active: bool
    conditions: tuple[Mapping[str, Any], ...]

    def condition(self, type_: str) -> Mapping[str, Any] | None:
        """The condition of ``type_`` when it is True."""
        return next(
            (c for c in self.conditions if c.get("type") == type_ and c.get("status") == "True"),
            None,
        )

    def reason_of(self, type_: str) -> Mapping[str, Any] | None:
        """The condition of ``type_``, whatever its status."""
        return next((c for c in self.conditions if c.get("type") == type_), None)


def admission(body: Mapping[str, Any]) -> Admission:
    """Read a Kueue Workload object."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    return Admission(
        name=meta.get("name", ""),
        resource_version=meta.get("resourceVersion", ""),
        active=bool(spec.get("active", True)),
        conditions=tuple((body.get("status") or {}).get("conditions") or ()),
    )


def owner_name(body: Mapping[str, Any], kind: Kind) -> str | None:
    """The name of the workload of ``kind`` (TrainJob, PyTorchJob) that owns a Kueue Workload."""
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == kind.kind and ref.get("apiVersion", "").startswith(kind.group + "/"):
            name = ref.get("name")
            if name:
                return str(name)
    return None


def waiting(admitted: Admission | None, queue: str) -> Waiting:
    """Why a job queued through Kueue is not running, in the words its events use.

    Preempted (evicted, back in the queue): a warning that says the trainer resumes from its
    checkpoint. Waiting for quota: Kueue's own reason and message (which flavor lacks what).
    Admitted: its pods are starting.
    """
    where = f"in queue {queue}"
    if admitted is None:
        return Waiting("Queueing", f"waiting for Kueue to queue the job {where}")
    evicted = admitted.condition(EVICTED)
    if evicted is not None and evicted.get("reason") == EVICTED_BY_PREEMPTION:
        preempted = admitted.condition(PREEMPTED) or evicted
        return Waiting(
            "Preempted",
            f"preempted by Kueue ({preempted.get('reason')}: {preempted.get('message', '')}); "
            f"waiting for quota {where} to resume from the latest checkpoint",
            warning=True,
        )
    if admitted.condition(ADMITTED) is not None:
        return Waiting("Admitted", f"admitted {where}; waiting for the trainer pods to start")
    reserved = admitted.reason_of(QUOTA_RESERVED)
    if reserved is not None and reserved.get("status") == "True":
        return Waiting(
            "AdmissionChecks", f"quota reserved {where}; waiting for Kueue's admission checks"
        )
    # No QuotaReserved condition yet: Kueue's scheduler has not looked at it.
    reason = str((reserved or {}).get("reason") or "PendingEvaluation")
    detail = (reserved or {}).get("message")
    return Waiting(reason, f"waiting for quota {where}" + (f": {detail}" if detail else ""))


def active_patch(active: bool) -> dict[str, Any]:
    """The patch that deactivates (pauses) or reactivates (resumes) a Kueue Workload."""
    return {"spec": {"active": active}}
