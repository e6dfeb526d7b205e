"""Benchmark the operator: many FineTuneJobs at once, until each has its PyTorchJob.

A real kube-apiserver + etcd (``tests.harness.kube``) with the FineTuneJob and PyTorchJob CRDs,
moto's S3 server (``tests.harness.s3``) and the real operator process
(``tests.harness.operator.OperatorProcess``, environment as ``tests/operator/conftest.py``
builds it) are started. No training-operator runs: the PyTorchJobs the operator creates just
sit there, which is the point — what is measured is the operator's own work.

One valid training file is stored as the API stores it (bytes, then metadata with the
validation report), then ``--jobs`` FineTuneJobs referencing it are created as fast as a thread
pool of kubernetes clients can. Watches on FineTuneJobs and PyTorchJobs record, on the client's
clock, when each job's ``queued`` phase and each PyTorchJob appear. Per job:

- reconcile latency: PyTorchJob arrival minus the FineTuneJob's creation (the earlier of the
  create call's return and the job's ADDED watch event), p50/p90/p99/max;
- time to ``queued`` likewise;

and overall: the time from the first create until every PyTorchJob exists, the operator's RSS
(``VmHWM`` peak and ``VmRSS`` at the end, from ``/proc``), its CPU seconds (while the jobs were
launched and while ``--jobs`` queued jobs sit idle for ``--idle-seconds``), and its
``/metrics`` (reconcile errors must be 0). Every PyTorchJob must belong to exactly one
FineTuneJob and every FineTuneJob must have exactly one.

Results are printed and written to ``benchmarks/results/operator.json`` and ``.txt``.

    .venv/bin/python benchmarks/operator_bench.py [--jobs 500] [--threads 16]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import ssl
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import (  # noqa: E402
    machine_info,
    percentile,
    proc_status_mib,
    start_cluster_and_s3,
)
from kubetune.finetunejob import GROUP, LABEL_ORG, PLURAL, VERSION, JobPhase  # noqa: E402
from kubetune.ids import new_job_id  # noqa: E402
from kubetune.settings import ObjectStoreSettings  # noqa: E402
from kubetune_runtime.datasets import validate_jsonl  # noqa: E402
from kubetune_runtime.objectstore import S3ObjectStore  # noqa: E402
from tests.harness.files import store_training_file  # noqa: E402
from tests.harness.kube import KubeCluster  # noqa: E402
from tests.harness.operator import OperatorProcess  # noqa: E402
from tests.harness.s3 import S3Server  # noqa: E402

DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "operator.json"
PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
ORG = "default"
MODEL = "tiny-llama"
CONTEXT_LENGTH = 256
# The catalogue needs a location; the operator only writes it into the trainer config.
MODEL_PATH = "/models/tiny-llama"
CREDENTIALS_SECRET = "trainer-env"  # noqa: S105 - the name of a Secret
N_EXAMPLES = 40
WATCH_TIMEOUT_S = 30  # each watch request is re-opened (from the last resourceVersion) after this
RECONCILE_ERRORS = "kubetune_operator_reconcile_errors_total"
JOBS_GAUGE = "kubetune_operator_jobs"
# The operator's production defaults (kubetune.settings.OperatorSettings): the test suite's
# env polls every second, which says nothing about a real deployment with 500 jobs.
DEFAULT_OPERATOR_SETTINGS = {"reconcile_seconds": "10", "progress_seconds": "15"}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def training_rows(n: int = N_EXAMPLES) -> list[dict[str, Any]]:
    """``n`` small, valid chat examples."""
    return [
        {
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": f"What is {i} plus {i + 1}?"},
                {"role": "assistant", "content": f"{i} plus {i + 1} is {2 * i + 1}."},
            ]
        }
        for i in range(n)
    ]


def upload_training_file(s3: S3Server, prefix: str) -> str:
    """Store one training file as the API does: bytes, then metadata with its report."""
    data = b"".join(json.dumps(row).encode() + b"\n" for row in training_rows())
    report = validate_jsonl([data], min_examples=1)
    if not report.valid:  # a bench of jobs that all fail validation would measure nothing
        raise RuntimeError(f"the bench's training file is invalid: {report.error_message()}")
    store = S3ObjectStore(s3.bucket, client=s3.client(), internal_prefix=prefix)
    layout = ObjectStoreSettings(backend="s3", bucket=s3.bucket, prefix=prefix).layout()
    return store_training_file(store, layout, ORG, data)


def job_manifest(namespace: str, name: str, training_file: str) -> dict[str, Any]:
    """A FineTuneJob on the tiny model: 2 CPU nodes, LoRA."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace, "labels": {LABEL_ORG: ORG}},
        "spec": {
            "org": ORG,
            "model": MODEL,
            "trainingFile": training_file,
            "seed": 1234,
            "method": {"type": "supervised", "hyperparameters": {"nEpochs": 1, "batchSize": 4}},
            "adapter": {"type": "lora", "r": 8, "alpha": 16},
            "resources": {"nodes": 2, "gpusPerNode": 0},
        },
    }


def operator_env(
    kube: KubeCluster, s3: S3Server, namespace: str, **settings: str
) -> dict[str, str]:
    """The operator's environment, as ``tests/operator/conftest.py`` builds it; ``settings``
    (``KUBETUNE_OPERATOR__<NAME>``) default to the production polling intervals.
    """
    env = {
        **kube.env(),
        **s3.env(),
        "KUBETUNE_MODE": "kubernetes",
        "KUBETUNE_KUBERNETES__NAMESPACE": namespace,
        "KUBETUNE_OBJECT_STORE__PREFIX": namespace,
        "KUBETUNE_MODELS": json.dumps(
            [{"id": MODEL, "path": MODEL_PATH, "context_length": CONTEXT_LENGTH}]
        ),
        "KUBETUNE_OPERATOR__RUNTIME": "pytorchjob",  # what this benchmark has measured so far
        "KUBETUNE_OPERATOR__CREDENTIALS_SECRET": CREDENTIALS_SECRET,
        "KUBETUNE_OPERATOR__TRAINER_METRICS_PORT": "0",
        "KUBETUNE_OPERATOR__TERMINATION_GRACE_SECONDS": "60",
        "KUBETUNE_LIMITS__MIN_EXAMPLES": "10",
    }
    merged = {**DEFAULT_OPERATOR_SETTINGS, **settings}
    env.update({f"KUBETUNE_OPERATOR__{k.upper()}": v for k, v in merged.items()})
    return env


def bench_api_client(kube: KubeCluster, pool_size: int) -> Any:
    """An admin ApiClient whose connection pool fits ``pool_size`` threads."""
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(kube.kubeconfig), client_configuration=configuration
    )
    configuration.connection_pool_maxsize = max(pool_size, 4)
    return client.ApiClient(configuration)


# ---------------------------------------------------------------------------------------------
# Observation: watches and /proc
# ---------------------------------------------------------------------------------------------


class Recorder:
    """Watches one resource in a namespace from a thread and records, per object name, when
    (``time.perf_counter``) it was first seen and when it was first seen in each phase.
    """

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        group: str,
        version: str,
        plural: str,
        *,
        key: Callable[[dict[str, Any]], str | None] | None = None,
    ) -> None:
        from kubernetes import client

        self._custom: Any = client.CustomObjectsApi(api_client)
        self._args = (group, version, namespace, plural)
        self._key = key
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self.added: dict[str, float] = {}  # first sighting of each object
        self.added_events: dict[str, int] = {}  # ADDED events per object (duplicates show)
        self.phase_seen: dict[str, dict[str, float]] = {}  # phase -> name -> first sighting
        self.keys: dict[str, str] = {}  # name -> key(object), e.g. the owning job
        self.objects: dict[str, dict[str, Any]] = {}
        self.errors: list[str] = []
        listing: Any = self._custom.list_namespaced_custom_object(*self._args)
        self._resource_version: str = listing["metadata"]["resourceVersion"]
        now = time.perf_counter()
        for item in listing["items"]:
            self._record("ADDED", item, now)
        self._thread = threading.Thread(target=self._run, name=f"watch-{plural}", daemon=True)
        self._thread.start()

    def _record(self, kind: str, obj: dict[str, Any], now: float) -> None:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name", ""))
        with self._changed:
            if kind == "DELETED":
                self.objects.pop(name, None)
            else:
                self.objects[name] = obj
            if kind == "ADDED":
                self.added_events[name] = self.added_events.get(name, 0) + 1
            self.added.setdefault(name, now)
            if self._key is not None and name not in self.keys:
                key = self._key(obj)
                if key is not None:
                    self.keys[name] = key
            phase = (obj.get("status") or {}).get("phase")
            if phase:
                self.phase_seen.setdefault(str(phase), {}).setdefault(name, now)
            self._changed.notify_all()

    def _run(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            stream: Any = watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for event in stream.stream(
                    self._custom.list_namespaced_custom_object,
                    *self._args,
                    resource_version=self._resource_version,
                    timeout_seconds=WATCH_TIMEOUT_S,
                    allow_watch_bookmarks=True,
                ):
                    now = time.perf_counter()
                    obj = event["object"]
                    version = (obj.get("metadata") or {}).get("resourceVersion")
                    if version:
                        self._resource_version = str(version)
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._record(event["type"], obj, now)
                    if self._stop.is_set():
                        stream.stop()
            except Exception as exc:  # reported in the results; the watch is re-opened
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                if self._stop.wait(0.5):
                    return

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate`` (called with the lock held) is true; False on timeout."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def snapshot_keys(self) -> dict[str, str]:
        """A copy of ``keys``."""
        with self._lock:
            return dict(self.keys)

    def stop(self) -> None:
        """Stop watching (the thread ends at the next event or watch timeout)."""
        self._stop.set()


def controller_owner(obj: Mapping[str, Any]) -> str | None:
    """The name of the FineTuneJob that controls ``obj``."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == "FineTuneJob":
            return str(ref.get("name"))
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pids(kube: KubeCluster, s3: S3Server) -> dict[str, int]:
    """The pids of the apiserver, etcd and the S3 server (from the harness' handles)."""
    procs: list[Any] = [*getattr(kube, "_procs", []), getattr(s3, "_proc", None)]
    return {proc.name: proc.proc.pid for proc in procs if proc is not None}


def cpu_by_process(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process, and of this one (the bench client)."""
    result = {name: cpu_seconds(pid) for name, pid in pids.items()}
    result["bench client"] = time.process_time()
    return result


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used (``/proc/stat``), all cores."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    busy = sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def apiserver_requests(kube: KubeCluster) -> dict[str, float]:
    """``apiserver_request_total`` by ``VERB resource[/subresource] code`` (all clients)."""
    ctx = ssl.create_default_context(cafile=str(kube.ca_file))
    request = urllib.request.Request(  # noqa: S310 - https to our own loopback apiserver
        kube.server + "/metrics", headers={"Authorization": f"Bearer {kube.token}"}
    )
    with urllib.request.urlopen(request, context=ctx, timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    counts: dict[str, float] = {}
    for name, samples in parse_metrics(text).items():
        if name != "apiserver_request_total":
            continue
        for labels, value in samples.items():
            parts = dict(item.split("=", 1) for item in labels.split(",") if "=" in item)
            if not parts.get("resource"):
                continue  # /readyz, /metrics and the like
            resource = parts["resource"] + (
                f"/{parts['subresource']}" if parts.get("subresource") else ""
            )
            key = f"{parts.get('verb')} {resource} {parts.get('code')}"
            counts[key] = counts.get(key, 0.0) + value
    return counts


S3_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<code>\d+)')


def s3_log_offset(s3: S3Server) -> int:
    """The current size of the S3 server's request log."""
    return moto_log(s3).stat().st_size


def moto_log(s3: S3Server) -> Path:
    """The S3 server's log, one line per request (the harness keeps it in the server's workdir)."""
    return Path(getattr(s3, "_workdir", "/nonexistent")) / "moto.log"


def s3_requests(s3: S3Server, since: int) -> dict[str, float]:
    """S3 requests logged since the offset ``since``, by ``OPERATION code``."""
    with moto_log(s3).open("rb") as handle:
        handle.seek(since)
        text = handle.read().decode(errors="replace")
    counts: dict[str, float] = {}
    for match in S3_LINE.finditer(text):
        method, path = match["method"], match["path"]
        operation = "LIST" if method == "GET" and "list-type=" in path else method
        key = f"{operation} {match['code']}"
        counts[key] = counts.get(key, 0.0) + 1
    return counts


def delta(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    """``after - before`` per key, without the keys that did not change."""
    changed = {key: value - before.get(key, 0.0) for key, value in after.items()}
    return dict(sorted((k, v) for k, v in changed.items() if v))


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """The samples of ``/metrics`` by name, each by its labels rendered as ``k=v,…``."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = float(sample.value)
    return samples


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


@dataclass
class Distribution:
    """Seconds, over jobs."""

    count: int
    p50_s: float
    p90_s: float
    p99_s: float
    max_s: float
    min_s: float
    mean_s: float

    @classmethod
    def of(cls, values: list[float]) -> Distribution | None:
        """The distribution of ``values`` (None when empty)."""
        if not values:
            return None
        ordered = sorted(values)
        return cls(
            count=len(ordered),
            p50_s=round(percentile(ordered, 50), 3),
            p90_s=round(percentile(ordered, 90), 3),
            p99_s=round(percentile(ordered, 99), 3),
            max_s=round(ordered[-1], 3),
            min_s=round(ordered[0], 3),
            mean_s=round(sum(ordered) / len(ordered), 3),
        )


@dataclass
class OperatorBench:
    """What one run measured."""

    jobs: int
    create_threads: int
    operator_settings: dict[str, str]
    create_wall_s: float  # first create sent → last create answered
    create_errors: int
    creates_per_s: float
    all_pytorchjobs_s: float | None  # first create sent → last PyTorchJob seen
    all_queued_s: float | None
    pytorchjobs: int  # PyTorchJobs in the namespace at the end
    pytorchjob_owners: int  # distinct FineTuneJobs that own one
    duplicate_pytorchjobs: int  # PyTorchJobs beyond one per FineTuneJob, ever
    orphan_pytorchjobs: int  # PyTorchJobs owned by no FineTuneJob of the run
    jobs_without_pytorchjob: int
    reconcile_latency: Distribution | None  # FineTuneJob created → its PyTorchJob seen
    queued_latency: Distribution | None  # FineTuneJob created → seen in phase queued
    server_latency: Distribution | None  # same as reconcile, from creationTimestamps (1 s)
    phases: dict[str, int]  # FineTuneJobs by phase at the end
    operator_rss_idle_mib: float  # before the first create
    operator_rss_peak_mib: float  # VmHWM
    operator_rss_end_mib: float  # VmRSS after the idle period
    operator_cpu_launch_s: float  # CPU seconds from the first create to the last PyTorchJob
    cpu_launch_s_by_process: dict[str, float]  # the same for every process of the bench
    machine_cores_busy_launch: float  # their sum over the launch's wall time
    other_cores_busy_launch: float  # what every other process on the machine used meanwhile
    apiserver_requests_launch: dict[str, float]  # by "VERB resource code", every client
    s3_requests_launch: dict[str, float]  # by "OPERATION code"
    operator_cpu_idle_s: float  # CPU seconds over the idle period with every job queued
    idle_seconds: float
    operator_cpu_idle_pct: float  # of one core
    reconcile_errors: float
    reconcile_errors_by_handler: dict[str, float]
    metrics_jobs_by_phase: dict[str, float]
    operator_log_errors: int  # lines with ERROR/Traceback in the operator's log
    operator_log_error_lines: list[str]  # the first few of them
    watch_errors: list[str] = field(default_factory=list)
    first_create_error: str | None = None
    timed_out: bool = False


def run_bench(
    kube: KubeCluster,
    s3: S3Server,
    namespace: str,
    workdir: Path,
    *,
    jobs: int,
    threads: int = 16,
    timeout: float = 600.0,
    idle_seconds: float = 10.0,
    settings: Mapping[str, str] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> OperatorBench:
    """Start the operator on ``namespace`` (which must exist), create ``jobs`` FineTuneJobs
    from ``threads`` threads, wait until each has its PyTorchJob and measure.
    """
    from kubernetes import client

    say = on_progress or (lambda _: None)
    api_client = bench_api_client(kube, threads + 4)
    custom: Any = client.CustomObjectsApi(api_client)
    core: Any = client.CoreV1Api(api_client)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": CREDENTIALS_SECRET}, "stringData": {"K": "v"}}
    )
    training_file = upload_training_file(s3, namespace)
    env = operator_env(kube, s3, namespace, **dict(settings or {}))
    op_settings = {
        k.removeprefix("KUBETUNE_OPERATOR__").lower(): v
        for k, v in env.items()
        if k.startswith("KUBETUNE_OPERATOR__")
    }
    operator = OperatorProcess(env, workdir)
    with ExitStack() as stack:
        operator.start()
        stack.callback(operator.stop)
        pid = operator.pid
        assert pid is not None
        ftjs = Recorder(api_client, namespace, GROUP, VERSION, PLURAL)
        stack.callback(ftjs.stop)
        ptjs = Recorder(
            api_client,
            namespace,
            PYTORCHJOB_GROUP,
            PYTORCHJOB_VERSION,
            PYTORCHJOB_PLURAL,
            key=controller_owner,
        )
        stack.callback(ptjs.stop)
        time.sleep(1.0)  # let the operator settle after its start (initial listings)
        idle = proc_status_mib(pid)

        names = [new_job_id() for _ in range(jobs)]
        returned: dict[str, float] = {}
        create_errors: list[str] = []
        lock = threading.Lock()

        def create(name: str) -> None:
            try:
                custom.create_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, job_manifest(namespace, name, training_file)
                )
            except Exception as exc:
                with lock:
                    create_errors.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
                return
            done = time.perf_counter()
            with lock:
                returned[name] = done

        say(f"creating {jobs} FineTuneJobs from {threads} threads")
        pids = {"operator": pid, **server_pids(kube, s3)}
        cpu_before = cpu_by_process(pids)
        machine_before = machine_busy_seconds()
        api_before = apiserver_requests(kube)
        s3_offset = s3_log_offset(s3)
        cpu_start = cpu_seconds(pid)
        started = time.perf_counter()
        with ThreadPoolExecutor(threads, thread_name_prefix="create") as pool:
            list(pool.map(create, names))
        created_at = time.perf_counter()
        expected = set(returned)
        say(
            f"created {len(expected)} in {created_at - started:.1f} s "
            f"({len(create_errors)} errors); waiting for their PyTorchJobs"
        )

        deadline = started + timeout
        last_report = started

        def all_launched() -> bool:
            return expected <= set(ptjs.keys.values())

        while not ptjs.wait(all_launched, 1.0) and time.perf_counter() < deadline:
            now = time.perf_counter()
            if now - last_report >= 10:
                seen = len(expected & set(ptjs.snapshot_keys().values()))
                say(f"  {now - started:6.1f} s: {seen}/{len(expected)} PyTorchJobs")
                last_report = now
        launched_at = time.perf_counter()
        cpu_launched = cpu_seconds(pid)
        cpu_after = cpu_by_process(pids)
        machine_after = machine_busy_seconds()
        api_launch = delta(apiserver_requests(kube), api_before)
        s3_launch = s3_requests(s3, s3_offset)
        timed_out = not ptjs.wait(all_launched, 0)
        queued_phase = JobPhase.QUEUED.value
        ftjs.wait(
            lambda: expected <= set(ftjs.phase_seen.get(queued_phase, {})),
            max(1.0, deadline - time.perf_counter()),
        )

        say(f"all launched; measuring the operator idle with {jobs} queued jobs")
        idle_start = cpu_seconds(pid)
        time.sleep(idle_seconds)
        cpu_end = cpu_seconds(pid)
        end = proc_status_mib(pid)
        metrics = parse_metrics(operator.metrics())
        ftjs.stop()
        ptjs.stop()

        # Final state, from listings rather than watches.
        items = custom.list_namespaced_custom_object(
            PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, namespace, PYTORCHJOB_PLURAL
        )["items"]
        job_items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]

    log_lines = operator.log_path.read_text(errors="replace").splitlines()
    error_lines = [line for line in log_lines if " ERROR " in line or line.startswith("Traceback")]
    owners = [controller_owner(item) for item in items]
    owned = [o for o in owners if o in expected]
    job_created = {
        name: min(returned[name], ftjs.added.get(name, returned[name])) for name in expected
    }
    by_owner = {owner: name for name, owner in ptjs.keys.items()}
    reconcile = [
        ptjs.added[by_owner[name]] - job_created[name] for name in expected if name in by_owner
    ]
    queued_seen = ftjs.phase_seen.get(queued_phase, {})
    queued = [queued_seen[name] - job_created[name] for name in expected if name in queued_seen]
    job_stamps = {
        item["metadata"]["name"]: parse_stamp(item["metadata"]["creationTimestamp"])
        for item in job_items
    }
    server = [
        parse_stamp(item["metadata"]["creationTimestamp"]) - job_stamps[owner]
        for item, owner in zip(items, owners, strict=True)
        if owner in job_stamps
    ]
    phases: dict[str, int] = {}
    for item in job_items:
        phase = str((item.get("status") or {}).get("phase") or "none")
        phases[phase] = phases.get(phase, 0) + 1
    errors_by_handler = {
        labels.removeprefix("handler="): value
        for labels, value in metrics.get(RECONCILE_ERRORS, {}).items()
    }
    last_launch = max((ptjs.added[by_owner[n]] for n in expected if n in by_owner), default=None)
    last_queued = max((queued_seen[n] for n in expected if n in queued_seen), default=None)
    return OperatorBench(
        jobs=jobs,
        create_threads=threads,
        operator_settings=op_settings,
        create_wall_s=round(created_at - started, 3),
        create_errors=len(create_errors),
        creates_per_s=round(len(expected) / (created_at - started), 1),
        all_pytorchjobs_s=None
        if timed_out or last_launch is None
        else round(last_launch - started, 3),
        all_queued_s=None if last_queued is None else round(last_queued - started, 3),
        pytorchjobs=len(items),
        pytorchjob_owners=len(set(owned)),
        duplicate_pytorchjobs=(len(owned) - len(set(owned)))
        + sum(max(0, n - 1) for n in ptjs.added_events.values()),
        orphan_pytorchjobs=len(owners) - len(owned),
        jobs_without_pytorchjob=len(expected - set(owned)),
        reconcile_latency=Distribution.of(reconcile),
        queued_latency=Distribution.of(queued),
        server_latency=Distribution.of(server),
        phases=phases,
        operator_rss_idle_mib=round(idle["VmRSS"], 1),
        operator_rss_peak_mib=round(end["VmHWM"], 1),
        operator_rss_end_mib=round(end["VmRSS"], 1),
        operator_cpu_launch_s=round(cpu_launched - cpu_start, 2),
        cpu_launch_s_by_process={
            name: round(cpu_after[name] - cpu_before[name], 2) for name in cpu_after
        },
        machine_cores_busy_launch=round(
            (sum(cpu_after.values()) - sum(cpu_before.values())) / (launched_at - started), 2
        ),
        other_cores_busy_launch=round(
            max(
                0.0,
                (machine_after - machine_before)
                - (sum(cpu_after.values()) - sum(cpu_before.values())),
            )
            / (launched_at - started),
            2,
        ),
        apiserver_requests_launch=api_launch,
        s3_requests_launch=s3_launch,
        operator_cpu_idle_s=round(cpu_end - idle_start, 2),
        idle_seconds=idle_seconds,
        operator_cpu_idle_pct=round(100 * (cpu_end - idle_start) / idle_seconds, 1)
        if idle_seconds > 0
        else 0.0,
        reconcile_errors=sum(errors_by_handler.values()),
        reconcile_errors_by_handler=errors_by_handler,
        metrics_jobs_by_phase={
            labels.removeprefix("phase="): value
            for labels, value in metrics.get(JOBS_GAUGE, {}).items()
            if value
        },
        operator_log_errors=len(error_lines),
        operator_log_error_lines=[line[:300] for line in error_lines[:5]],
        watch_errors=ftjs.errors + ptjs.errors,
        first_create_error=create_errors[0] if create_errors else None,
        timed_out=timed_out,
    )


def parse_stamp(value: str) -> float:
    """A Kubernetes timestamp (RFC 3339, seconds) as epoch seconds."""
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report_lines(bench: OperatorBench) -> list[str]:
    """The tables, as printed."""
    lines = [
        f"{bench.jobs} FineTuneJobs created from {bench.create_threads} threads in "
        f"{bench.create_wall_s:.1f} s ({bench.creates_per_s:.0f}/s, "
        f"{bench.create_errors} errors)",
        f"all PyTorchJobs exist after   {_s(bench.all_pytorchjobs_s)} s (from the first create)"
        + ("  TIMED OUT" if bench.timed_out else ""),
        f"all jobs queued after         {_s(bench.all_queued_s)} s",
        "",
        f"{'per job (s)':<34} {'n':>5} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}",
    ]
    rows = (
        ("created → PyTorchJob (watch)", bench.reconcile_latency),
        ("created → queued (watch)", bench.queued_latency),
        ("creationTimestamp diff (1 s res.)", bench.server_latency),
    )
    for label, dist in rows:
        if dist is None:
            lines.append(f"{label:<34} {0:>5} {'-':>8} {'-':>8} {'-':>8} {'-':>8}")
        else:
            lines.append(
                f"{label:<34} {dist.count:>5} {dist.p50_s:>8.2f} {dist.p90_s:>8.2f} "
                f"{dist.p99_s:>8.2f} {dist.max_s:>8.2f}"
            )
    lines += [
        "",
        f"PyTorchJobs {bench.pytorchjobs}, owned by {bench.pytorchjob_owners} distinct jobs; "
        f"duplicates {bench.duplicate_pytorchjobs}, orphans {bench.orphan_pytorchjobs}, "
        f"jobs without one {bench.jobs_without_pytorchjob}",
        f"FineTuneJobs by phase: {bench.phases}",
        f"operator RSS: idle {bench.operator_rss_idle_mib:.0f} MiB, peak (VmHWM) "
        f"{bench.operator_rss_peak_mib:.0f} MiB, end {bench.operator_rss_end_mib:.0f} MiB",
        f"operator CPU: {bench.operator_cpu_launch_s:.1f} s to launch the jobs; "
        f"{bench.operator_cpu_idle_s:.1f} s over {bench.idle_seconds:.0f} s idle with every "
        f"job queued ({bench.operator_cpu_idle_pct:.0f}% of a core)",
        f"CPU seconds while launching: {bench.cpu_launch_s_by_process} "
        f"= {bench.machine_cores_busy_launch:.2f} cores busy "
        f"(other processes on the machine: {bench.other_cores_busy_launch:.2f} cores)",
        "requests per job while launching (every client, the bench's creates and watches too):",
        "  apiserver: "
        + ", ".join(
            f"{k} {v / bench.jobs:.2f}" for k, v in bench.apiserver_requests_launch.items()
        ),
        "  S3:        "
        + ", ".join(f"{k} {v / bench.jobs:.2f}" for k, v in bench.s3_requests_launch.items()),
        f"operator /metrics: reconcile errors {bench.reconcile_errors:.0f} "
        f"{bench.reconcile_errors_by_handler or ''}; jobs gauge {bench.metrics_jobs_by_phase}",
        f"operator log: {bench.operator_log_errors} ERROR/Traceback lines; watch errors "
        f"{len(bench.watch_errors)}",
    ]
    lines += [f"  {line}" for line in bench.operator_log_error_lines]
    if bench.first_create_error:
        lines.append(f"first create error: {bench.first_create_error}")
    return lines


def check(bench: OperatorBench) -> list[str]:
    """What makes the run invalid (empty when it is fine)."""
    problems = []
    if bench.timed_out:
        problems.append("not every FineTuneJob got its PyTorchJob in time")
    if bench.create_errors:
        problems.append(f"{bench.create_errors} creates failed")
    if bench.duplicate_pytorchjobs or bench.orphan_pytorchjobs or bench.jobs_without_pytorchjob:
        problems.append("PyTorchJobs are not exactly one per FineTuneJob")
    if bench.reconcile_errors:
        problems.append(f"{bench.reconcile_errors:.0f} reconcile errors")
    return problems


@dataclass
class Results:
    """Everything the run measured, as written to the JSON file."""

    machine: dict[str, Any]
    command: str
    date: str
    config: dict[str, Any]
    result: OperatorBench | None = None
    problems: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=500, help="FineTuneJobs to create")
    parser.add_argument("--threads", type=int, default=16, help="client threads creating them")
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for every PyTorchJob"
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=10.0,
        help="seconds to measure the operator's CPU with every job queued",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an operator setting (KUBETUNE_OPERATOR__NAME), e.g. reconcile_seconds=1",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables and write the JSON and text results."""
    args = parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.set)
    started = time.perf_counter()
    results = Results(
        machine=machine_info(("kopf", "kubernetes", "aiohttp", "boto3", "moto", "pydantic")),
        command=shlex.join([sys.executable, *(sys.argv if argv is None else ["", *argv])]),
        date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        config={
            "jobs": args.jobs,
            "threads": args.threads,
            "timeout_s": args.timeout,
            "idle_seconds": args.idle_seconds,
            "operator_settings": {**DEFAULT_OPERATOR_SETTINGS, **settings},
            "client": "kubernetes.client CustomObjectsApi from a thread pool, on loopback; "
            "client, operator, apiserver, etcd and the S3 server share the machine's CPUs",
            "times": "client clock (perf_counter): a job's creation is the earlier of its create "
            "call's return and its ADDED watch event; a PyTorchJob's the ADDED watch event",
        },
    )
    printed: list[str] = []

    def say(line: str = "") -> None:
        printed.append(line)
        print(line, flush=True)

    say(
        f"kubetune operator benchmark: {results.machine['cpu_count']} CPUs, Python "
        f"{results.machine['python']}, kopf {results.machine['packages']['kopf']}"
    )
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kubetune-opbench-")))
        say("starting kube-apiserver + etcd and the S3 server")
        namespace = "kubetune-bench"
        cluster, s3 = start_cluster_and_s3(stack, namespace)
        bench = run_bench(
            cluster,
            s3,
            namespace,
            tmp,
            jobs=args.jobs,
            threads=args.threads,
            timeout=args.timeout,
            idle_seconds=args.idle_seconds,
            settings=settings,
            on_progress=say,
        )
        operator_log = (tmp / "operator-1.log").read_text(errors="replace")
    results.result = bench
    results.problems = check(bench)
    results.wall_s = round(time.perf_counter() - started, 1)
    say()
    for line in report_lines(bench):
        say(line)
    for problem in results.problems:
        say(f"PROBLEM: {problem}")
    if results.problems:
        say("operator log tail:")
        for line in operator_log.splitlines()[-30:]:
            say(f"  {line}")
    output: Path = args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(asdict(results), indent=2) + "\n")
    say(f"\nwrote {output} and {output.with_suffix('.txt').name} ({results.wall_s:.0f} s)")
    output.with_suffix(".txt").write_text("\n".join(printed) + "\n")
    return 1 if results.problems else 0


if __name__ == "__main__":
    sys.exit(main())
