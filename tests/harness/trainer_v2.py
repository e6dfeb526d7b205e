"""A stand-in for Kubeflow Trainer v2's controller and JobSet's (and the kubelet) for TrainJobs.

The test apiserver runs no controllers and no kubelet, so this fixture plays them: it watches
(polls) the TrainJobs of one namespace, builds each one's JobSet the way Trainer v2 does and
creates it in the apiserver (so the JobSet CRD validates it), runs the JobSet's pods as local
processes (``tests.harness.kubelet``), and writes the JobSet's and the TrainJob's status as their
controllers do. Multi-node training is thus real: several processes over gloo on loopback.

What it implements of the documented contract (``../shared/reference/kubeflow-trainer-v2/``,
Trainer v2's ``pkg/runtime/framework/plugins/{torch,jobset}`` and ``pkg/controller``, JobSet's
``pkg/controllers``):

- The JobSet: the (Cluster)TrainingRuntime's ``spec.template`` with the TrainJob's
  ``runtimePatches`` merged in (labels and annotations at every level; pod ``volumes`` and
  containers by name, a container's ``env`` and ``volumeMounts``; ``nodeSelector``,
  ``tolerations``, ``affinity``, ``serviceAccountName``, ``securityContext``,
  ``terminationGracePeriodSeconds``), then the trainer's fields on the ``node`` job:
  ``numNodes`` as its parallelism and completions (Indexed), the container's ``image``,
  ``command``, ``args``, ``resources`` (``resourcesPerNode``) and ``env``, and the torch
  plugin's ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK`` (the completion index),
  ``PET_MASTER_ADDR`` (``<trainjob>-node-0-0.<trainjob>``), ``PET_MASTER_PORT`` (29500) and the
  container port 29500; ``suspend`` from the TrainJob; an owner reference to it. An existing,
  running JobSet is never rebuilt; a suspended one is.
- Pods, per the ``node`` Job's rules: exit 0 completes an index; otherwise the
  ``podFailurePolicy`` rules decide in order (``onExitCodes`` with ``In``/``NotIn``: ``FailJob``
  fails the Job with reason ``PodFailurePolicy``, ``Ignore`` recreates the pod, ``Count``
  counts), and a counted failure beyond ``backoffLimit`` fails the Job
  (``BackoffLimitExceeded``). A pod that fails and still fits the limit is recreated.
- The JobSet's ``failurePolicy``: a failed Job is matched against the ``rules``
  (``onJobFailureReasons``, ``targetReplicatedJobs``): ``FailJobSet`` fails the JobSet,
  ``RestartJobSet`` (and no rule matching) restarts every Job while ``status.restarts`` is below
  ``maxRestarts`` (``Recreate``: every pod deleted, then recreated), else fails it with
  ``ReachedMaxRestarts``. All Jobs complete: ``Completed`` (``AllJobsCompleted``).
- Suspend: the JobSet's pods are deleted (SIGTERM, then SIGKILL after the grace period) and it
  reports ``Suspended`` (``SuspendedJobs``); resumed, new pods start (not a restart).
- The TrainJob's status: ``Suspended`` (``Suspended`` / ``Resumed``) from its own ``suspend``,
  ``Complete`` and ``Failed`` copied from the JobSet's ``Completed`` and ``Failed``, and
  ``jobsStatus`` from the JobSet's ``replicatedJobsStatus`` (``ready``, ``succeeded``,
  ``failed``, ``active``, ``suspended``).
- A deleted TrainJob takes its JobSet and pods with it (as the garbage collector would).

Deviations, because every pod runs on this one host: ``PET_MASTER_ADDR`` is 127.0.0.1 (no
cluster DNS) and ``PET_MASTER_PORT`` a free port per JobSet run (tests run in parallel); no
scheduling, resources, services, initializers or ``activeDeadlineSeconds``; only the ``node``
job runs pods.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tests.harness.kubelet import ControllerStandIn, Pod
from tests.harness.paths import free_port
from tests.harness.training_operator import is_true, set_condition

TRAINER: Final = ("trainer.kubeflow.org", "v1alpha1")
TRAINJOBS: Final = "trainjobs"
JOBSET: Final = ("jobset.x-k8s.io", "v1alpha2", "jobsets")
NODE: Final = "node"
TRAINER_PORT: Final = 29500


# ---------------------------------------------------------------------------------------------
# Building the JobSet (pure)
# ---------------------------------------------------------------------------------------------


def _merge_named(
    base: list[dict[str, Any]], patch: Sequence[Mapping[str, Any]], key: str
) -> list[dict[str, Any]]:
    """Lists of named items merged by ``key`` (a strategic merge patch's ``patchMergeKey``)."""
    result = [copy.deepcopy(item) for item in base]
    for item in patch:
        current = next((r for r in result if r.get(key) == item.get(key)), None)
        if current is None:
            result.append(copy.deepcopy(dict(item)))
        else:
            current.update(_merge_pod_level(current, item))
    return result


def _merge_pod_level(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """A pod spec, a container or an object's metadata with a runtime patch merged in."""
    result = copy.deepcopy(dict(base))
    for key, value in patch.items():
        if key in ("volumes", "containers", "initContainers", "env", "imagePullSecrets"):
            result[key] = _merge_named(result.get(key) or [], value, "name")
        elif key == "volumeMounts":
            result[key] = _merge_named(result.get(key) or [], value, "mountPath")
        elif key == "tolerations":
            result[key] = [*(result.get(key) or []), *copy.deepcopy(value)]
        elif key in ("labels", "annotations", "nodeSelector"):
            result[key] = {**(result.get(key) or {}), **value}
        elif isinstance(value, Mapping) and key in ("metadata", "spec", "template"):
            result[key] = _merge_pod_level(result.get(key) or {}, value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def apply_patches(
    template: Mapping[str, Any], patches: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The runtime's JobSet template with each runtime patch merged in, in order."""
    result = copy.deepcopy(dict(template))
    for patch in patches:
        spec = (patch.get("trainingRuntimeSpec") or {}).get("template") or {}
        if "metadata" in spec:
            result["metadata"] = _merge_pod_level(result.get("metadata") or {}, spec["metadata"])
        jobs = (spec.get("spec") or {}).get("replicatedJobs") or []
        for job in jobs:
            target = next(r for r in result["spec"]["replicatedJobs"] if r["name"] == job["name"])
            target["template"] = _merge_pod_level(target["template"], job.get("template") or {})
    return result


def _upsert_env(
    env: list[dict[str, Any]], values: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    return _merge_named(env, values, "name")


def build_jobset(trainjob: Mapping[str, Any], runtime: Mapping[str, Any]) -> dict[str, Any]:
    """The JobSet Trainer v2 makes of a TrainJob and its runtime (see the module docstring)."""
    name = trainjob["metadata"]["name"]
    spec = trainjob["spec"]
    trainer = spec.get("trainer") or {}
    template = apply_patches(runtime["spec"]["template"], spec.get("runtimePatches") or [])
    nodes = int(
        trainer.get("numNodes") or (runtime["spec"].get("mlPolicy") or {}).get("numNodes", 1)
    )
    node = next(r for r in template["spec"]["replicatedJobs"] if r["name"] == NODE)
    job_spec = node["template"]["spec"]
    job_spec.update({"parallelism": nodes, "completions": nodes, "completionMode": "Indexed"})
    container = next(c for c in job_spec["template"]["spec"]["containers"] if c["name"] == NODE)
    for key in ("image", "command", "args"):
        if trainer.get(key):
            container[key] = copy.deepcopy(trainer[key])
    if trainer.get("resourcesPerNode"):
        container["resources"] = copy.deepcopy(trainer["resourcesPerNode"])
    pet: list[dict[str, Any]] = [
        {"name": "PET_NNODES", "value": str(nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(trainer.get("numProcPerNode", 1))},
        {
            "name": "PET_NODE_RANK",
            "valueFrom": {
                "fieldRef": {
                    "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                }
            },
        },
        {"name": "PET_MASTER_ADDR", "value": f"{name}-{NODE}-0-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)},
    ]
    container["env"] = _upsert_env(
        _upsert_env(container.get("env") or [], trainer.get("env") or []), pet
    )
    ports = [p for p in container.get("ports") or [] if p.get("containerPort") != TRAINER_PORT]
    container["ports"] = [*ports, {"containerPort": TRAINER_PORT}]
    meta = trainjob["metadata"]
    return {
        "apiVersion": f"{JOBSET[0]}/{JOBSET[1]}",
        "kind": "JobSet",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": dict((template.get("metadata") or {}).get("labels") or {}),
            "annotations": dict((template.get("metadata") or {}).get("annotations") or {}),
            "ownerReferences": [
                {
                    "apiVersion": f"{TRAINER[0]}/{TRAINER[1]}",
                    "kind": "TrainJob",
                    "name": name,
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {**template["spec"], "suspend": bool(spec.get("suspend", False))},
    }


def exit_code_matches(rule: Mapping[str, Any], code: int) -> bool:
    """Whether a podFailurePolicy rule's ``onExitCodes`` matches ``code`` (of the one container)."""
    on = rule.get("onExitCodes")
    if not on:
        return False
    values = {int(v) for v in on.get("values") or []}
    return code in values if on.get("operator") == "In" else code not in values


# ---------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------


@dataclass
class NodePod(Pod):
    """One pod of the ``node`` job: its completion index."""

    index: int = 0
    succeeded: bool = False


@dataclass
class JobSetRun:
    """What the fixture tracks of one TrainJob (by uid) and its JobSet."""

    name: str
    uid: str
    workdir: Path
    port: int = field(default_factory=free_port)
    pods: dict[int, NodePod] = field(default_factory=dict)
    counted_failures: int = 0
    restarts: int = 0
    job_failed: str | None = None  # the node Job's failure reason
    finished_at: float | None = None
    created_jobsets: int = 0


class TrainerV2(ControllerStandIn[JobSetRun]):
    """Runs the TrainJobs of ``namespace`` (see the module docstring)."""

    group, version = TRAINER
    plural = TRAINJOBS

    def _new_run(self, obj: Mapping[str, Any]) -> JobSetRun:
        meta = obj["metadata"]
        return JobSetRun(
            meta["name"], meta["uid"], self.workdir / f"{meta['name']}-{meta['uid'][:8]}"
        )

    def _pods_of(self, run: JobSetRun) -> Iterable[Pod]:
        return run.pods.values()

    # -- what tests look at ----------------------------------------------------------------------
    def run_of(self, name: str) -> JobSetRun | None:
        """The newest run of the TrainJob named ``name``."""
        with self._lock:
            runs = [r for r in self._runs.values() if r.name == name]
            return runs[-1] if runs else None

    def pods(self, name: str) -> list[NodePod]:
        """The pods of the newest TrainJob named ``name``."""
        run = self.run_of(name)
        return list(run.pods.values()) if run else []

    def starts(self, name: str) -> int:
        """How many pod processes were started for ``name`` (restarts included)."""
        return sum(p.starts for p in self.pods(name))

    def alive(self, name: str) -> int:
        """How many pods of ``name`` run now."""
        return sum(1 for p in self.pods(name) if p.alive())

    def signal(self, name: str, index: int, sig: int) -> None:
        """Send ``sig`` to the main process of node ``index`` (the kubelet's SIGTERM)."""
        pod = next(p for p in self.pods(name) if p.index == index)
        if not pod.alive():
            raise AssertionError(f"{name} node {index} is not running")
        pod.signal(sig)

    def logs(self, name: str, lines: int = 30) -> str:
        """The last lines of every pod log of ``name``, for failure messages."""
        parts = []
        for pod in self.pods(name):
            for path in pod.logs:
                try:
                    text = path.read_text(errors="replace").splitlines()[-lines:]
                except OSError:
                    continue
                parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    # -- the control loop ------------------------------------------------------------------------
    def _runtime(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        ref = obj["spec"]["runtimeRef"]
        if ref.get("kind", "ClusterTrainingRuntime") == "ClusterTrainingRuntime":
            result: dict[str, Any] = self._custom.get_cluster_custom_object(
                *TRAINER, "clustertrainingruntimes", ref["name"]
            )
        else:
            result = self._custom.get_namespaced_custom_object(
                *TRAINER, self.namespace, "trainingruntimes", ref["name"]
            )
        return result

    def _jobset(self, run: JobSetRun, obj: Mapping[str, Any]) -> dict[str, Any]:
        """The TrainJob's JobSet: created, rebuilt while suspended, else as it is."""
        from kubernetes.client.exceptions import ApiException

        args = (*JOBSET[:2], self.namespace, JOBSET[2])
        try:
            current: dict[str, Any] | None = self._custom.get_namespaced_custom_object(
                *args, run.name
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            current = None
        suspended = bool(obj["spec"].get("suspend")) or bool(
            current and current["spec"].get("suspend")
        )
        if current is not None and not suspended:
            return current
        desired = build_jobset(obj, self._runtime(obj))
        if current is None:
            run.created_jobsets += 1
            created: dict[str, Any] = self._custom.create_namespaced_custom_object(*args, desired)
            return created
        patched: dict[str, Any] = self._custom.patch_namespaced_custom_object(
            *args, run.name, {"spec": desired["spec"]}
        )
        return patched

    def _sync(self, obj: dict[str, Any]) -> None:
        run = self._run_for(obj)
        status = copy.deepcopy(obj.get("status") or {})
        before = copy.deepcopy(status)
        conditions: list[dict[str, Any]] = status.get("conditions") or []
        if not (is_true(conditions, "Complete") or is_true(conditions, "Failed")):
            try:
                jobset = self._jobset(run, obj)
            except Exception as exc:  # the runtime may not exist yet: retried next poll
                self.errors.append(f"{run.name}: {exc!r}")
                return
            jobset_status = self._run_jobset(run, jobset)
            for source, target in (("Completed", "Complete"), ("Failed", "Failed")):
                cond = next((c for c in jobset_status["conditions"] if c["type"] == source), None)
                if cond is not None and cond["status"] == "True":
                    conditions = set_condition(
                        conditions, target, "True", cond["reason"], cond["message"]
                    )
            status["jobsStatus"] = [
                {
                    "name": r["name"],
                    **{k: r[k] for k in ("ready", "succeeded", "failed", "active", "suspended")},
                }
                for r in jobset_status["replicatedJobsStatus"]
            ]
        else:
            self._wind_down(run)
        if obj["spec"].get("suspend"):
            conditions = set_condition(
                conditions, "Suspended", "True", "Suspended", "TrainJob is suspended"
            )
        elif is_true(conditions, "Suspended"):
            conditions = set_condition(
                conditions, "Suspended", "False", "Resumed", "TrainJob is resumed"
            )
        status["conditions"] = conditions
        if status != before:
            self._write_status(TRAINER, TRAINJOBS, run.name, status)

    def _write_status(
        self, api: tuple[str, str], plural: str, name: str, status: Mapping[str, Any]
    ) -> None:
        try:
            self._custom.patch_namespaced_custom_object_status(
                *api, self.namespace, plural, name, {"status": status}
            )
        except Exception as exc:  # deleted meanwhile: the next list tells
            self.errors.append(f"{name} status: {exc!r}")

    # -- the JobSet ------------------------------------------------------------------------------
    def _run_jobset(self, run: JobSetRun, jobset: Mapping[str, Any]) -> dict[str, Any]:
        """Bring the JobSet's pods where its spec says; write and return its status."""
        status = copy.deepcopy(jobset.get("status") or {})
        conditions: list[dict[str, Any]] = status.get("conditions") or []
        spec = jobset["spec"]
        node = next(r for r in spec["replicatedJobs"] if r["name"] == NODE)
        job_spec = node["template"]["spec"]
        pod_spec = job_spec["template"]["spec"]
        finished = is_true(conditions, "Completed") or is_true(conditions, "Failed")
        if finished:
            self._wind_down(run, self.kubelet.grace(pod_spec))
        elif spec.get("suspend"):
            self._suspend(run, pod_spec)
            conditions = set_condition(
                conditions, "Suspended", "True", "SuspendedJobs", "jobset is suspended"
            )
        else:
            if is_true(conditions, "Suspended"):
                conditions = set_condition(
                    conditions, "Suspended", "False", "ResumeJobs", "jobset is resumed"
                )
            conditions = self._run_node_job(run, spec, job_spec, conditions)
        status["conditions"] = conditions
        status["restarts"] = run.restarts
        status["replicatedJobsStatus"] = [self._job_status(run, bool(spec.get("suspend")))]
        if status != (jobset.get("status") or {}):
            self._write_status(JOBSET[:2], JOBSET[2], run.name, status)
        return status

    def _job_status(self, run: JobSetRun, suspended: bool) -> dict[str, Any]:
        pods = list(run.pods.values())
        completed = bool(pods) and all(p.succeeded for p in pods)
        ready = bool(pods) and all(p.alive() or p.succeeded for p in pods) and not completed
        return {
            "name": NODE,
            "ready": int(ready),
            "succeeded": int(completed),
            "failed": int(run.job_failed is not None),
            "active": int(any(p.alive() for p in pods)),
            "suspended": int(suspended),
        }

    def _run_node_job(
        self,
        run: JobSetRun,
        spec: Mapping[str, Any],
        job_spec: Mapping[str, Any],
        conditions: list[dict[str, Any]],
    ) -> list[dict[str, Any]]:
        completions = int(job_spec.get("completions") or 1)
        for index in range(completions):
            run.pods.setdefault(index, NodePod(f"{NODE}-{index}", index=index))
        failure = self._reap(run, job_spec)
        if failure is not None:
            return self._job_failed(run, spec, job_spec["template"]["spec"], failure, conditions)
        if all(p.succeeded for p in run.pods.values()):
            run.finished_at = time.monotonic()
            return set_condition(
                conditions, "Completed", "True", "AllJobsCompleted", "jobset completed successfully"
            )
        for pod in run.pods.values():
            if pod.proc is None and not pod.succeeded:
                self._start(run, job_spec, pod, completions)
        return conditions

    def _reap(self, run: JobSetRun, job_spec: Mapping[str, Any]) -> str | None:
        """Record exited pods; the node Job's failure reason if the Job failed."""
        rules = (job_spec.get("podFailurePolicy") or {}).get("rules") or []
        backoff_limit = int(job_spec.get("backoffLimit", 6))
        for pod in run.pods.values():
            code = pod.reap()
            if code is None:
                continue
            if code == 0:
                pod.succeeded = True
                continue
            action = next((r["action"] for r in rules if exit_code_matches(r, code)), "Count")
            if action == "FailJob":
                return "PodFailurePolicy"
            if action == "Count":
                run.counted_failures += 1
                if run.counted_failures > backoff_limit:
                    return "BackoffLimitExceeded"
        return None

    def _job_failed(
        self,
        run: JobSetRun,
        spec: Mapping[str, Any],
        pod_spec: Mapping[str, Any],
        reason: str,
        conditions: list[dict[str, Any]],
    ) -> list[dict[str, Any]]:
        policy = spec.get("failurePolicy") or {}
        rule = next(
            (
                r
                for r in policy.get("rules") or []
                if reason in (r.get("onJobFailureReasons") or [reason])
                and NODE in (r.get("targetReplicatedJobs") or [NODE])
            ),
            None,
        )
        action = rule["action"] if rule else "RestartJobSet"
        if action == "FailJobSet":
            run.job_failed = reason
            run.finished_at = time.monotonic()
            return set_condition(
                conditions,
                "Failed",
                "True",
                "FailJobSetFailurePolicyAction",
                "applying FailJobSet failure policy action",
            )
        if run.restarts >= int(policy.get("maxRestarts", 0)):
            run.job_failed = reason
            run.finished_at = time.monotonic()
            return set_condition(
                conditions,
                "Failed",
                "True",
                "ReachedMaxRestarts",
                "jobset failed due to reaching max number of restarts",
            )
        self._recreate(run, pod_spec)
        return conditions

    def _recreate(self, run: JobSetRun, pod_spec: Mapping[str, Any]) -> None:
        """Restart the JobSet: every pod deleted (waited for), the Job counted afresh."""
        grace = self.kubelet.grace(pod_spec)
        deadline = time.monotonic() + grace + 5
        while any(p.alive() for p in run.pods.values()) and time.monotonic() < deadline:
            for pod in run.pods.values():
                pod.stop(grace, time.monotonic())
            time.sleep(0.1)
        for pod in run.pods.values():
            pod.kill()
            pod.reap()
            pod.succeeded = False
        run.restarts += 1
        run.counted_failures = 0
        run.port = free_port()

    def _suspend(self, run: JobSetRun, pod_spec: Mapping[str, Any]) -> None:
        grace = self.kubelet.grace(pod_spec)
        now = time.monotonic()
        for pod in run.pods.values():
            pod.stop(grace, now)
            pod.reap()

    def _wind_down(self, run: JobSetRun, grace: float = 30.0) -> None:
        """Pods of a finished JobSet exit on their own; one still running after the grace period
        is stopped, as this host keeps no pods.
        """
        now = time.monotonic()
        for pod in run.pods.values():
            code = pod.reap()
            pod.succeeded = pod.succeeded or code == 0
        if run.finished_at is None:
            run.finished_at = now
        if now - run.finished_at >= grace:
            for pod in run.pods.values():
                pod.stop(5.0, now)

    def _delete(self, run: JobSetRun) -> None:
        now = time.monotonic()
        for pod in run.pods.values():
            pod.stop(self.kubelet.grace_cap, now)
        if not any(p.alive() for p in run.pods.values()):
            with self._lock:
                self._runs.pop(run.uid, None)
            from kubernetes.client.exceptions import ApiException

            try:
                self._custom.delete_namespaced_custom_object(
                    *JOBSET[:2], self.namespace, JOBSET[2], run.name
                )
            except ApiException as exc:
                if exc.status != 404:
                    self.errors.append(f"{run.name}: {exc!r}")

    def _start(
        self, run: JobSetRun, job_spec: Mapping[str, Any], pod: NodePod, completions: int
    ) -> None:
        pod_spec = job_spec["template"]["spec"]
        container = next(c for c in pod_spec["containers"] if c["name"] == NODE)
        env = {e["name"]: e.get("value") for e in container.get("env") or []}
        injected = {
            # The downward API's completion index, and the deviations: loopback, a free port.
            "JOB_COMPLETION_INDEX": str(pod.index),
            "PET_NODE_RANK": str(pod.index),
            "PET_NNODES": str(env.get("PET_NNODES") or completions),
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(run.port),
        }
        attempt = pod.starts
        try:
            self.kubelet.start(
                pod,
                pod_spec,
                NODE,
                injected=injected,
                root=run.workdir / f"{pod.name}-{attempt}",
                log_path=run.workdir / f"{pod.name}-{attempt}.log",
            )
        except Exception as exc:  # e.g. the ConfigMap is not there yet: the pod would wait
            self.errors.append(f"{run.name} {pod.name}: {exc!r}")
