"""A stand-in for Kubernetes' Job controller (and the kubelet) for ``batch/v1`` Jobs with a
label, in one namespace: the operator's merge Jobs.

The test apiserver runs no controllers, so this plays the Job controller's documented contract
(kubernetes.io/docs/concepts/workloads/controllers/job, batch/v1) for what the merge Jobs use:

- One pod at a time (``parallelism``/``completions`` 1), run by :class:`Kubelet` from the
  template: its first container, ``restartPolicy: Never``.
- A pod that exits 0 completes the Job: ``status.succeeded`` 1, ``completionTime``, and the
  conditions ``SuccessCriteriaMet`` then ``Complete`` (reason ``CompletionsReached``).
- A pod that fails counts in ``status.failed``; a new pod is started until more than
  ``backoffLimit`` failed, then the conditions ``FailureTarget`` and ``Failed`` (reason
  ``BackoffLimitExceeded``, message "Job has reached the specified backoff limit").
- ``status.active``, ``status.startTime``; nothing changes once the Job completed or failed.
- Deleting the Job stops its pod (the garbage collector's part).

Deviations: the image's ``python`` is this host's interpreter (the trainer image's venv is this
venv); no ``activeDeadlineSeconds``, pod failure policy, backoff delay or indexed completions.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from tests.harness.kubelet import ControllerStandIn, Pod

BACKOFF_MESSAGE: Final = "Job has reached the specified backoff limit"
COMPLETE_MESSAGE: Final = "Reached expected number of succeeded pods"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(type_: str, reason: str, message: str) -> dict[str, Any]:
    now = _now()
    return {
        "type": type_,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": now,
        "lastTransitionTime": now,
    }


@dataclass
class JobRun:
    """One Job's pod, across its retries."""

    name: str
    uid: str
    workdir: Path
    pod: Pod = field(default_factory=lambda: Pod("pod"))
    started: str | None = None


class BatchJobs(ControllerStandIn[JobRun]):
    """Runs the Jobs with ``labels`` in a namespace (see the module docstring)."""

    group = "batch"
    version = "v1"
    plural = "jobs"

    def __init__(self, *args: Any, labels: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.labels = dict(labels)

    def runs(self, name: str) -> list[Pod]:
        """The pod of every Job named ``name`` seen so far."""
        with self._lock:
            return [run.pod for run in self._runs.values() if run.name == name]

    def _new_run(self, obj: Mapping[str, Any]) -> JobRun:
        meta = obj["metadata"]
        return JobRun(meta["name"], meta["uid"], self.workdir / f"{meta['name']}-{meta['uid'][:8]}")

    def _pods_of(self, run: JobRun) -> Iterable[Pod]:
        return [run.pod]

    def _delete(self, run: JobRun) -> None:
        run.pod.stop(self.kubelet.grace_cap, time.monotonic())
        if not run.pod.alive():
            with self._lock:
                self._runs.pop(run.uid, None)

    def _sync(self, obj: dict[str, Any]) -> None:
        labels = obj["metadata"].get("labels") or {}
        if any(labels.get(k) != v for k, v in self.labels.items()):
            return
        status = copy.deepcopy(obj.get("status") or {})
        conditions = status.get("conditions") or []
        if any(c["type"] in ("Complete", "Failed") for c in conditions):
            return
        run = self._run_for(obj)
        code = run.pod.reap()
        failed = sum(1 for c in run.pod.exit_codes if c != 0)
        if code == 0:
            status.update(succeeded=1, active=0, completionTime=_now())
            status["conditions"] = [
                *conditions,
                _condition("SuccessCriteriaMet", "CompletionsReached", COMPLETE_MESSAGE),
                _condition("Complete", "CompletionsReached", COMPLETE_MESSAGE),
            ]
        elif failed > int(obj["spec"].get("backoffLimit", 6)):
            status.update(failed=failed, active=0)
            status["conditions"] = [
                *conditions,
                _condition("FailureTarget", "BackoffLimitExceeded", BACKOFF_MESSAGE),
                _condition("Failed", "BackoffLimitExceeded", BACKOFF_MESSAGE),
            ]
        else:
            if not run.pod.alive():
                self._start(run, obj)
            status.update(active=int(run.pod.alive()), failed=failed)
            status.setdefault("startTime", _now())
        if status != (obj.get("status") or {}):
            self._custom.patch_namespaced_custom_object_status(
                self.group, self.version, self.namespace, self.plural, run.name, {"status": status}
            )

    def _start(self, run: JobRun, obj: dict[str, Any]) -> None:
        spec = copy.deepcopy(obj["spec"]["template"]["spec"])
        container = spec["containers"][0]
        attempt = run.pod.starts
        try:
            self.kubelet.start(
                run.pod,
                spec,
                container["name"],
                injected={},
                root=run.workdir / f"pod-{attempt}",
                log_path=run.workdir / f"pod-{attempt}.log",
            )
        except Exception as exc:  # e.g. the ConfigMap is not there yet: the pod would wait
            self.errors.append(f"{run.name}: {exc!r}")
