"""A stand-in for Kubeflow's training-operator (and the kubelet) for PyTorchJobs in a namespace.

The test apiserver runs no controllers and no kubelet, so this fixture plays both: it watches
(polls) PyTorchJobs in one namespace, runs each replica as a local process, and writes the
PyTorchJob's status as the training-operator does. Multi-node training is thus real: several
processes that rendezvous over gloo on loopback.

What it implements of the training-operator's documented contract (kubeflow.org/v1,
training-operator release 1.9; pkg/controller.v1/pytorch and pkg/controller.v1/common):

- Replicas: ``Master`` (rank 0) and ``Worker`` (ranks 1..n) of ``pytorchReplicaSpecs``; only
  the container named ``pytorch`` runs. Its ``command`` if given, else the image's ENTRYPOINT
  (the fixture's ``entrypoint``), followed by its ``args``.
- Environment, as ``setPodEnv``/``MasterEnvVarGenerator`` set it, after the container's own
  ``env`` (and ``envFrom`` Secrets/ConfigMaps, read from the apiserver):
  ``PYTHONUNBUFFERED``, ``MASTER_ADDR``, ``MASTER_PORT``, ``PET_MASTER_ADDR``,
  ``PET_MASTER_PORT``, ``WORLD_SIZE`` (replicas x nprocPerNode), ``RANK`` (workers: index+1),
  ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_NPROC_PER_NODE``.
- Volumes, as the kubelet mounts them: ``configMap`` volumes are the ConfigMap's data written
  to a folder when the replica starts, ``emptyDir`` volumes a fresh folder per pod. Paths in
  ``args`` and ``env`` under a mount point are rewritten to that folder; a mount at ``/tmp``
  becomes the process' ``TMPDIR``.
- ``restartPolicy: ExitCode``: exit codes 1-127 are permanent (the job fails at once),
  128-255 retryable (the replica is restarted as a new pod: new emptyDirs). Exit 0 of the
  Master completes the job.
- ``runPolicy.backoffLimit``: more retryable failures than the limit fail the job ("…has
  reached the specified backoff limit").
- ``runPolicy.suspend``: the replicas' pods are deleted (SIGTERM, then SIGKILL after the
  grace period), ``Running`` turns False and ``Suspended`` True (reason
  ``PyTorchJobSuspended``); clearing it sets ``Suspended`` False (``PyTorchJobResumed``),
  resets ``startTime`` and starts new pods.
- Deleting the PyTorchJob deletes its pods (as the garbage collector would).
- Status: conditions ``Created``, ``Running``, ``Restarting``, ``Succeeded``, ``Failed``,
  ``Suspended`` with reasons ``PyTorchJob<Type>`` and the controller's messages, updated with
  its ``setCondition`` rules (transition time kept while the status is unchanged; Running and
  Restarting replace each other; Succeeded/Failed turn Running False; nothing changes after
  Failed), plus ``replicaStatuses``, ``startTime`` and ``completionTime``.

Deviations, because every replica runs on this one host:

- ``MASTER_ADDR`` is 127.0.0.1 (there is no cluster DNS for ``<job>-master-0``) and the port is
  a free one per PyTorchJob instead of 23456 (tests run in parallel).
- The kubelet's SIGTERM goes to the replica's main process, as to a container's PID 1; the
  grace period is capped (``grace_cap``) and SIGKILL then kills the process group.
- Backoff is counted as retryable replica failures, not as the controller's mix of container
  restart counts and work-queue requeues; a Worker that dies while the Master runs is restarted
  alone (as a pod would be).
- No scheduling, resources, services, init containers, sidecars or elastic policy.
  ``cleanPodPolicy`` is always None (the operator's choice): replicas of a finished job are
  left to exit on their own, but as this host keeps no pods, one still running after the grace
  period is stopped.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from tests.harness.kubelet import ControllerStandIn, Pod
from tests.harness.paths import free_port

GROUP: Final = "kubeflow.org"
VERSION: Final = "v1"
PLURAL: Final = "pytorchjobs"
KIND: Final = "PyTorchJob"
CONTAINER: Final = "pytorch"
REPLICA_TYPES: Final = ("Master", "Worker")
# The trainer image's ENTRYPOINT (trainer-image/Dockerfile): a launcher that turns the
# PyTorchJob environment into torchrun's arguments and the workers' exit codes into the pod's.


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]], type_: str, status: str, reason: str, message: str
) -> list[dict[str, Any]]:
    """The training-operator's ``UpdateJobConditions`` (pkg/util/status.go), on dicts."""
    if any(c["type"] == "Failed" and c["status"] == "True" for c in conditions):
        return conditions  # nothing changes once a job failed
    current = next((c for c in conditions if c["type"] == type_), None)
    if current is not None and current["status"] == status and current.get("reason") == reason:
        return conditions
    now = _now()
    new = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastUpdateTime": now,
        "lastTransitionTime": now,
    }
    if current is not None and current["status"] == status:
        new["lastTransitionTime"] = current.get("lastTransitionTime", now)
    kept = []
    for cond in conditions:
        if type_ == "Restarting" and cond["type"] == "Running":
            continue
        if type_ == "Running" and cond["type"] == "Restarting":
            continue
        if cond["type"] == type_:
            continue
        if type_ in ("Failed", "Succeeded") and cond["type"] == "Running":
            cond = {**cond, "status": "False"}
        kept.append(cond)
    return [*kept, new]


def is_true(conditions: Sequence[Mapping[str, Any]], type_: str) -> bool:
    """Whether the condition ``type_`` is True."""
    return any(c["type"] == type_ and c["status"] == "True" for c in conditions)


def is_retryable(code: int) -> bool:
    """restartPolicy ExitCode: 128 and above is retryable (pkg/util/train.IsRetryableExitCode)."""
    return code >= 128


@dataclass
class Replica(Pod):
    """One replica (pod) of a PyTorchJob, across its restarts."""

    rtype: str = ""
    index: int = 0
    rank: int = 0
    restart_at: float = 0.0
    succeeded: bool = False


def replica(rtype: str, index: int, rank: int) -> Replica:
    """A replica named as the training-operator names its pods: ``master-0``, ``worker-0``…"""
    return Replica(f"{rtype.lower()}-{index}", rtype=rtype, index=index, rank=rank)


@dataclass
class JobRun:
    """What the fixture tracks of one PyTorchJob (by uid)."""

    name: str
    uid: str
    port: int
    workdir: Path
    replicas: dict[tuple[str, int], Replica] = field(default_factory=dict)
    failures: int = 0
    finished_at: float | None = None


class TrainingOperator(ControllerStandIn[JobRun]):
    """Runs the replicas of the PyTorchJobs of ``namespace`` as local processes (see above)."""

    group, version, plural = GROUP, VERSION, PLURAL

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        workdir: Path,
        *,
        restart_delay: float = 1.0,
        **options: Any,
    ) -> None:
        """``options`` are :class:`ControllerStandIn`'s (entrypoint, node_env, grace_cap,
        poll); ``restart_delay`` is how long a failed replica waits before it restarts.
        """
        super().__init__(api_client, namespace, workdir, **options)
        self.restart_delay = restart_delay

    def _new_run(self, obj: Mapping[str, Any]) -> JobRun:
        meta = obj["metadata"]
        run = JobRun(
            name=meta["name"],
            uid=meta["uid"],
            port=free_port(),
            workdir=self.workdir / f"{meta['name']}-{meta['uid'][:8]}",
        )
        specs = obj["spec"]["pytorchReplicaSpecs"]
        for rtype in REPLICA_TYPES:
            for index in range(int((specs.get(rtype) or {}).get("replicas", 0))):
                rank = index + 1 if rtype == "Worker" else index
                run.replicas[(rtype, index)] = replica(rtype, index, rank)
        return run

    def _pods_of(self, run: JobRun) -> Iterable[Pod]:
        return run.replicas.values()

    # -- what tests look at ----------------------------------------------------------------------
    def replicas(self, name: str) -> list[Replica]:
        """The replicas of the newest PyTorchJob named ``name``."""
        with self._lock:
            runs = [r for r in self._runs.values() if r.name == name]
            return list(runs[-1].replicas.values()) if runs else []

    def failures(self, name: str) -> int:
        """Retryable replica failures of the newest PyTorchJob named ``name`` (backoff count)."""
        with self._lock:
            runs = [r for r in self._runs.values() if r.name == name]
            return runs[-1].failures if runs else 0

    def starts(self, name: str) -> int:
        """How many replica processes were started for ``name`` (restarts included)."""
        return sum(r.starts for r in self.replicas(name))

    def alive(self, name: str) -> int:
        """How many replica processes of ``name`` run now."""
        return sum(1 for r in self.replicas(name) if r.alive())

    def signal(self, name: str, rtype: str, index: int, sig: int) -> None:
        """Send ``sig`` to a replica's main process (a preemption: the kubelet's SIGTERM)."""
        found = next(r for r in self.replicas(name) if (r.rtype, r.index) == (rtype, index))
        if not found.alive():
            raise AssertionError(f"{name} {found.name} is not running")
        found.signal(sig)

    def logs(self, name: str, lines: int = 30) -> str:
        """The last lines of every replica log of ``name``, for failure messages."""
        parts = []
        for replica in self.replicas(name):
            for path in replica.logs:
                with contextlib.suppress(OSError):
                    text = path.read_text(errors="replace").splitlines()[-lines:]
                    parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    # -- the control loop ------------------------------------------------------------------------
    def _sync(self, obj: dict[str, Any]) -> None:
        run = self._run_for(obj)
        name = run.name
        status = copy.deepcopy(obj.get("status") or {})
        conditions: list[dict[str, Any]] = status.get("conditions") or []
        before = copy.deepcopy(status)
        conditions = set_condition(
            conditions, "Created", "True", "PyTorchJobCreated", f"PyTorchJob {name} is created."
        )
        run_policy = obj["spec"].get("runPolicy") or {}
        if is_true(conditions, "Succeeded") or is_true(conditions, "Failed"):
            self._wind_down(run, obj)
        elif run_policy.get("suspend"):
            conditions = self._suspend(run, obj, conditions)
        else:
            if is_true(conditions, "Suspended"):
                conditions = set_condition(
                    conditions,
                    "Suspended",
                    "False",
                    "PyTorchJobResumed",
                    f"PyTorchJob {name} is resumed.",
                )
                status["startTime"] = _now()
            conditions = self._reconcile_replicas(run, obj, conditions, run_policy)
            status.setdefault("startTime", _now())
            if is_true(conditions, "Succeeded") or is_true(conditions, "Failed"):
                status["completionTime"] = _now()
        status["conditions"] = conditions
        status["replicaStatuses"] = self._replica_statuses(run)
        if status != before:
            with contextlib.suppress(Exception):  # deleted meanwhile: the next list tells
                self._custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, self.namespace, PLURAL, name, {"status": status}
                )

    def _replica_statuses(self, run: JobRun) -> dict[str, Any]:
        result: dict[str, dict[str, int]] = {}
        for replica in run.replicas.values():
            entry = result.setdefault(replica.rtype, {"active": 0, "succeeded": 0, "failed": 0})
            entry["active"] += int(replica.alive())
            entry["succeeded"] += int(replica.succeeded)
            entry["failed"] += sum(1 for c in replica.exit_codes if c != 0)
        return result

    def _reconcile_replicas(
        self,
        run: JobRun,
        obj: dict[str, Any],
        conditions: list[dict[str, Any]],
        run_policy: dict[str, Any],
    ) -> list[dict[str, Any]]:
        name = run.name
        backoff_limit = run_policy.get("backoffLimit")
        now = time.monotonic()
        for replica in run.replicas.values():
            code = replica.reap()
            if code is not None:
                if code == 0:
                    replica.succeeded = True
                elif is_retryable(code):
                    run.failures += 1
                    if backoff_limit is not None and run.failures > int(backoff_limit):
                        return self._fail(
                            conditions,
                            f"Job {name} has failed because it has reached the specified "
                            "backoff limit",
                        )
                    conditions = set_condition(
                        conditions,
                        "Restarting",
                        "True",
                        "PyTorchJobRestarting",
                        f"PyTorchJob {name} is restarting because 1 {replica.rtype} replica(s) "
                        "failed.",
                    )
                    replica.restart_at = now + self.restart_delay
                else:
                    return self._fail(
                        conditions,
                        f"PyTorchJob {name} is failed because 1 {replica.rtype} replica(s) failed.",
                    )
        master = run.replicas.get(("Master", 0))
        if master is not None and master.succeeded:
            return set_condition(
                conditions,
                "Succeeded",
                "True",
                "PyTorchJobSucceeded",
                f"PyTorchJob {name} is successfully completed.",
            )
        for replica in run.replicas.values():
            if replica.proc is None and not replica.succeeded and now >= replica.restart_at:
                self._start(run, obj, replica)
        if all(r.alive() or r.succeeded for r in run.replicas.values()):
            conditions = set_condition(
                conditions, "Running", "True", "PyTorchJobRunning", f"PyTorchJob {name} is running."
            )
        return conditions

    @staticmethod
    def _fail(conditions: list[dict[str, Any]], message: str) -> list[dict[str, Any]]:
        # cleanPodPolicy None: the other replicas are left to exit on their own (see _wind_down).
        return set_condition(conditions, "Failed", "True", "PyTorchJobFailed", message)

    def _suspend(
        self, run: JobRun, obj: dict[str, Any], conditions: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        name = run.name
        grace = self._grace(obj)
        now = time.monotonic()
        for replica in run.replicas.values():
            replica.stop(grace, now)
            replica.reap()
            replica.restart_at = 0.0
        if any(r.alive() for r in run.replicas.values()):
            return conditions  # the pods are terminating
        message = f"PyTorchJob {name} is suspended."
        if is_true(conditions, "Running"):
            conditions = set_condition(
                conditions, "Running", "False", "PyTorchJobSuspended", message
            )
        if not is_true(conditions, "Suspended"):
            conditions = set_condition(
                conditions, "Suspended", "True", "PyTorchJobSuspended", message
            )
        return conditions

    def _wind_down(self, run: JobRun, obj: dict[str, Any]) -> None:
        """Replicas of a finished job exit on their own (cleanPodPolicy None keeps their pods);
        one still running after the grace period is stopped, as this host has no pods to keep.
        """
        for replica in run.replicas.values():
            code = replica.reap()
            replica.succeeded = replica.succeeded or code == 0
        now = time.monotonic()
        if run.finished_at is None:
            run.finished_at = now
        if now - run.finished_at < self._grace(obj):
            return
        for replica in run.replicas.values():
            replica.stop(5.0, now)

    def _delete(self, run: JobRun) -> None:
        now = time.monotonic()
        for replica in run.replicas.values():
            replica.stop(self.kubelet.grace_cap, now)
        if not any(r.alive() for r in run.replicas.values()):
            with self._lock:
                self._runs.pop(run.uid, None)

    def _grace(self, obj: dict[str, Any]) -> float:
        return self.kubelet.grace(obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"])

    # -- processes -------------------------------------------------------------------------------
    def _operator_env(self, run: JobRun, obj: dict[str, Any], replica: Replica) -> dict[str, str]:
        """What setPodEnv adds, after the container's own variables (so it wins)."""
        specs = obj["spec"]["pytorchReplicaSpecs"]
        total = sum(int(s.get("replicas", 0)) for s in specs.values())
        nproc = str(obj["spec"].get("nprocPerNode") or "1")
        per_node = int(nproc) if nproc.isdigit() else 1
        return {
            # The controller sets "0": any non-empty value makes CPython unbuffered.
            "PYTHONUNBUFFERED": "0",
            "MASTER_PORT": str(run.port),
            "MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(run.port),
            "PET_MASTER_ADDR": "127.0.0.1",
            "WORLD_SIZE": str(total * per_node),
            "RANK": str(replica.rank),
            "PET_NPROC_PER_NODE": nproc,
            "PET_NODE_RANK": str(replica.rank),
            "PET_NNODES": str(total),
        }

    def _start(self, run: JobRun, obj: dict[str, Any], replica: Replica) -> None:
        pod = obj["spec"]["pytorchReplicaSpecs"][replica.rtype]["template"]["spec"]
        attempt = replica.starts
        try:
            self.kubelet.start(
                replica,
                pod,
                CONTAINER,
                injected=self._operator_env(run, obj, replica),
                root=run.workdir / f"{replica.name}-{attempt}",
                log_path=run.workdir / f"{replica.name}-{attempt}.log",
            )
        except Exception as exc:  # e.g. the ConfigMap is not there yet: the pod would wait
            self.errors.append(f"{run.name} {replica.name}: {exc!r}")


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, detail: Callable[[], str] = str
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``detail()`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{detail()}")
        time.sleep(0.2)
