"""The PromQL of the chart's dashboards and alerts, parsed with a real PromQL parser.

``promql-parser`` (Python bindings of the Rust ``promql-parser`` crate, which follows
Prometheus' grammar) gives the syntax tree; Grafana's variables are substituted first, as
Grafana does before it sends a query.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser

# What Grafana puts in place of its variables (any valid value does for parsing).
GRAFANA_BUILTINS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
DASHBOARD_VARIABLES = {"namespace": "kubetune", "job_id": ".*", "base_model": ".*"}
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.*),\s*(?P<label>\w+)\)$")


def substitute(expr: str, variables: dict[str, str] = DASHBOARD_VARIABLES) -> str:
    """``expr`` with Grafana's variables replaced; an unknown variable raises KeyError."""
    for name, value in GRAFANA_BUILTINS.items():
        expr = expr.replace(name, value)
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables[m.group(1)], expr)


@dataclass
class Usage:
    """What one expression uses: metric names, label matchers and grouping labels."""

    metrics: set[str] = field(default_factory=set)
    matchers: dict[str, set[str]] = field(default_factory=dict)
    # (labels grouped by, the metrics aggregated): grouped labels must exist on those metrics
    groupings: list[tuple[set[str], set[str]]] = field(default_factory=list)


def _selectors(node: Any) -> list[Any]:
    found: list[Any] = []

    def visit(n: Any) -> None:
        if isinstance(n, promql_parser.VectorSelector):
            found.append(n)

    promql_parser.walk(node, visit)
    return found


def usage(expr: str) -> Usage:
    """Parse ``expr`` (raises ValueError on a syntax error) and report what it uses."""
    tree = promql_parser.parse(expr)
    result = Usage()
    for selector in _selectors(tree):
        name = selector.name
        names = [m.value for m in selector.matchers.matchers if m.name == "__name__"]
        name = name or (names[0] if names else None)
        if name is None:
            raise ValueError(f"selector without a metric name in {expr!r}")
        result.metrics.add(name)
        labels = {m.name for m in selector.matchers.matchers if m.name != "__name__"}
        result.matchers.setdefault(name, set()).update(labels)

    def visit(n: Any) -> None:
        if (
            isinstance(n, promql_parser.AggregateExpr)
            and n.modifier is not None
            and n.modifier.type == promql_parser.AggModifierType.By
        ):
            metrics = {s.name for s in _selectors(n.expr)}
            result.groupings.append((set(n.modifier.labels), metrics))

    promql_parser.walk(tree, visit)
    return result


@dataclass(frozen=True)
class Query:
    """One PromQL expression of the chart, with where it comes from."""

    where: str
    expr: str


def dashboard_queries(path: Path) -> Iterator[Query]:
    """Every panel target and every variable query of a Grafana dashboard JSON file."""
    dashboard = json.loads(path.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield Query(f"{path.name}: {panel['title']} [{target['refId']}]", target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = LABEL_VALUES.match(text)
        if match is None:
            raise ValueError(f"{path.name}: variable {variable['name']}: unsupported {text!r}")
        yield Query(f"{path.name}: variable {variable['name']}", match["selector"])


def rule_queries(rule_doc: dict[str, Any]) -> Iterator[Query]:
    """Every expression of a rendered PrometheusRule."""
    for group in rule_doc["spec"]["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule["record"]
            yield Query(f"rule {group['name']}/{name}", str(rule["expr"]))
