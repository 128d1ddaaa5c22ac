"""The Grafana dashboard without a server: one source shipped twice, rendered by the chart
for Grafana's sidecar, and every query naming only metrics the code exports.

Its queries against a real Prometheus are in test_dashboard.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from support.prometheus import (
    DASHBOARD,
    dashboard_panels,
    dashboard_queries,
    dashboard_variables,
    exported_metric_names,
    grafana_expr,
    label_values_queries,
    load_dashboard,
    metric_names,
)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mulambda"


@pytest.mark.parametrize("expr, names", [
    ("up", {"up"}),
    ('sum by (executor, reason) (rate(mulambda_selector_decisions_total{executor=~"$executor"}'
     "[$__rate_interval]))", {"mulambda_selector_decisions_total"}),
    ("histogram_quantile(0.95, sum by (le) (rate(a_bucket[5m])))", {"a_bucket"}),
    ("sum(x == bool 0) / on(instance) group_left(pod) y offset 5m", {"x", "y"}),
    ('a{l="not_a_metric(x)"} and ignoring(job) b or c unless d', {"a", "b", "c", "d"}),
    ("rate(x[1m:10s]) * 1e3 + 0.5", {"x"}),
    ("max_over_time(deriv(z[5m])[1h:])", {"z"}),
    ('{__name__="only_matchers"}', set()),
    ("vector(0)", set()),
])
def test_metric_names_are_read_out_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_grafana_variables_are_replaced_longest_name_first() -> None:
    expr = grafana_expr('rate(m{executor=~"$executor"}[$__rate_interval])')
    assert expr == 'rate(m{executor=~".*"}[1m])'


def test_the_chart_dashboard_is_a_byte_identical_copy() -> None:
    copy = CHART / "dashboards" / "mulambda.json"
    assert copy.read_bytes() == DASHBOARD.read_bytes(), (
        "charts/mulambda/dashboards/mulambda.json differs: cp docs/grafana/mulambda.json there")


def test_dashboard_covers_every_part_of_the_fleet() -> None:
    board = load_dashboard()
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Fleet overview", "Selection", "Latency", "Scaling", "Asynchronous tasks",
                    "Companion model loads", "Store and API errors"]
    ids = [p["id"] for p in dashboard_panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dashboard_panels(board):
        if p["type"] != "row":
            assert p["targets"] and p["description"], p["title"]
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            grid = p["gridPos"]
            assert grid["x"] + grid["w"] <= 24, p["title"]
    names = {n for _, expr in dashboard_queries(board) for n in metric_names(expr)}
    for needed in ("mulambda_selector_decisions_total", "mulambda_selector_score_bucket",
                   "mulambda_executor_desired_replicas", "mulambda_executor_ready_replicas",
                   "mulambda_cold_start_seconds_count", "mulambda_scaling_decisions_total",
                   "mulambda_gateway_upstream_seconds_bucket",
                   "mulambda_gateway_client_seconds_bucket",
                   "mulambda_companion_client_rtt_seconds",
                   "mulambda_companion_model_load_bytes",
                   "mulambda_companion_model_load_errors_total",
                   "mulambda_operator_errors_total", "mulambda_task_queue_depth"):
        assert needed in names, needed


def test_no_query_names_a_metric_the_code_does_not_export() -> None:
    exported = set().union(*exported_metric_names().values())
    board = load_dashboard()
    read = [(title, name) for title, expr in dashboard_queries(board)
            for name in metric_names(expr)]
    read += [(f"variable {name}", found[0]) for name, q in dashboard_variables(board)
             if (found := label_values_queries(q)) is not None]
    assert read
    unknown = [(title, name) for title, name in read if name not in exported]
    assert unknown == [], f"not exported by the operator, selector or companion: {unknown}"
    assert all(label_values_queries(q) for _, q in dashboard_variables(board))


def test_a_query_with_a_misspelt_metric_is_caught() -> None:
    exported = set().union(*exported_metric_names().values())
    assert metric_names("sum(rate(mulambda_selector_decision_total[1m]))") - exported == {
        "mulambda_selector_decision_total"}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = helm_python.Chart.load(CHART).render(values, name="mulambda",
                                                    namespace="mulambda")
    return [d for path, text in rendered.items() if not path.endswith(".txt")
            for d in yaml.safe_load_all(text)
            if d and d.get("kind") == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]


def test_chart_ships_the_dashboard_for_the_grafana_sidecar_only_when_asked() -> None:
    assert render({}) == []  # off by default
    [cm] = render({"grafanaDashboard": {"enabled": True}})
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "mulambda"
    assert "annotations" not in cm["metadata"]
    assert cm["data"]["mulambda.json"].encode() == DASHBOARD.read_bytes()

    [moved] = render({"grafanaDashboard": {"enabled": True, "namespace": "monitoring",
                                           "label": "dashboards", "labelValue": "mulambda",
                                           "folder": "ML platform"}})
    assert moved["metadata"]["namespace"] == "monitoring"
    assert moved["metadata"]["labels"]["dashboards"] == "mulambda"
    assert moved["metadata"]["annotations"] == {"grafana_folder": "ML platform"}
