"""ServiceMonitor, PodMonitor, PrometheusRule and the Grafana dashboard: shape and metric names."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

import tars_agent
from tars_contract import metric_names

from .conftest import CHART, NAMESPACE, VALUES_ALL, Obj, Render, one

FULLNAME = "t-tars-operator"
# Every metric the project exports (tars_contract/metric_names.py is the contract) ...
TARS_METRICS = {
    v for k, v in vars(metric_names).items() if k.isupper() and isinstance(v, str) and k != "PREFIX"
}
# ... plus the few series from elsewhere the chart may use, each with its source.
FOREIGN_METRICS = {
    "process_resident_memory_bytes",  # prometheus_client's process collector, in every agent
    "kube_pod_container_resource_limits",  # kube-state-metrics: the agent container's memory limit
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
PROMQL_KEYWORDS |= {"group_left", "group_right", "inf", "nan"}


def metric_names_in(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are neither functions, keywords,
    label names (inside {...} or the by/on/... lists), durations nor strings."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", text)  # grouping label lists
    text = re.sub(r"\b(group_left|group_right)\s*(\([^)]*\))?", " ", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        name = match.group(0)
        if following.startswith("(") or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def base_name(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in TARS_METRICS:
            return name.removesuffix(suffix)
    return name


def unknown_metrics(expr: str) -> set[str]:
    return {n for n in metric_names_in(expr) if base_name(n) not in TARS_METRICS | FOREIGN_METRICS}


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (namespace, pool) (rate(tars_llm_requests_total{code="429"}[5m])) '
        "/ on (namespace) group_left max by (pod) (kube_pod_container_resource_limits) > 0.05 "
        "and histogram_quantile(0.99, sum by (le) (rate(tars_task_duration_seconds_bucket[5m])))"
    )
    assert metric_names_in(expr) == {
        "tars_llm_requests_total",
        "kube_pod_container_resource_limits",
        "tars_task_duration_seconds_bucket",
    }
    assert unknown_metrics("rate(tars_not_a_metric_total[5m]) > 0") == {"tars_not_a_metric_total"}


def rules(render: Render) -> list[Obj]:
    rule = one(render({"prometheusRule": {"enabled": True}}), "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_alerts_cover_the_architecture(render: Render) -> None:
    alerts = {r["alert"]: r for r in rules(render)}
    # architecture's monitoring row: 429 > 5 %, memory > 70 %, timeouts > 1 %, queue > 500,
    # p99 > 10 s, errors > 5 %; plus the operator's own failures.
    expected = {
        "TarsLLMRateLimited": ('tars_llm_requests_total{code="429"}', "> 0.05"),
        "TarsAgentMemoryHigh": ("process_resident_memory_bytes", "> 0.9"),
        "TarsLLMTimeouts": ('tars_llm_requests_total{code=~"error|408|504"}', "> 0.01"),
        "TarsQueueBacklog": ("tars_queue_depth", "> 500"),
        "TarsTaskLatencyP99High": ("histogram_quantile(0.99", ") > 10"),
        "TarsTaskErrorsHigh": ('tars_tasks_total{outcome=~"failed|dead_letter|error"}', "> 0.05"),
        "TarsOperatorReconcileErrors": ("tars_operator_errors_total", "> 0"),
    }
    assert sorted(alerts) == sorted(expected)
    for name, (selects, compares) in expected.items():
        rule = alerts[name]
        assert selects in rule["expr"], name
        assert rule["expr"].rstrip().endswith(compares), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert set(rule["annotations"]) == {"summary", "description"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_alert_expressions_use_only_known_metrics(render: Render) -> None:
    for rule in rules(render):
        assert unknown_metrics(rule["expr"]) == set(), rule["alert"]


def test_alert_labels_exist_on_the_metrics() -> None:
    """The label values the alerts select on are the ones the agent really writes."""
    agent = Path(tars_agent.__file__).parent
    worker = (agent / "worker.py").read_text()
    for outcome in ("failed", "dead_letter", "error"):
        assert f'"{outcome}"' in worker
    llm = (agent / "llm.py").read_text()
    assert 'code = "error"' in llm and "llm_requests.labels(code)" in llm


def test_thresholds_come_from_values(render: Render) -> None:
    values = {
        "prometheusRule": {
            "enabled": True,
            "rateWindow": "10m",
            "thresholds": {"queueDepth": 1000, "rateLimited": 0.02},
            "for": {"queueDepth": "30m"},
            "severity": {"queueDepth": "critical"},
        }
    }
    rule = one(render(values), "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts["TarsQueueBacklog"]["expr"].rstrip().endswith("> 1000")
    assert alerts["TarsQueueBacklog"]["for"] == "30m"
    assert alerts["TarsQueueBacklog"]["labels"]["severity"] == "critical"
    assert alerts["TarsLLMRateLimited"]["expr"].rstrip().endswith("> 0.02")
    assert "[10m]" in alerts["TarsLLMRateLimited"]["expr"]


def test_promtool_accepts_the_rules(render: Render, promtool: str, tmp_path: Path) -> None:
    rule = one(render(None, VALUES_ALL), "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 7 rules found" in proc.stdout


def test_service_monitor(render: Render) -> None:
    sm = one(render(None, VALUES_ALL), "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"] == {
        "selector": {
            "matchLabels": {
                "app.kubernetes.io/name": "tars-operator",
                "app.kubernetes.io/instance": "t",
                "app.kubernetes.io/component": "operator",
            }
        },
        "namespaceSelector": {"matchNames": [NAMESPACE]},
        "endpoints": [
            {
                "port": "metrics",
                "path": "/metrics",
                "interval": "30s",
                "scrapeTimeout": "10s",
                "honorLabels": True,
            }
        ],
    }


def test_pod_monitor(render: Render) -> None:
    pm = one(render(None, VALUES_ALL), "PodMonitor")
    assert pm["spec"] == {
        "selector": {"matchExpressions": [{"key": "tars.dev/pool", "operator": "Exists"}]},
        "namespaceSelector": {"matchNames": ["team-a", "team-b"]},  # = watchNamespaces
        "podMetricsEndpoints": [
            {
                "path": "/metrics",
                "interval": "15s",
                "scrapeTimeout": "10s",
                "honorLabels": True,
                "relabelings": [
                    {
                        "sourceLabels": ["__meta_kubernetes_pod_container_port_number"],
                        "regex": "8080",
                        "action": "keep",
                    },
                    {
                        "sourceLabels": ["__meta_kubernetes_pod_label_tars_dev_pool"],
                        "targetLabel": "pool",
                        "action": "replace",
                    },
                ],
            }
        ],
    }
    everywhere = one(render({"podMonitor": {"enabled": True}}), "PodMonitor")
    assert everywhere["spec"]["namespaceSelector"] == {"any": True}


def test_pod_monitor_port_is_the_agent_contract() -> None:
    from tars_contract import contract

    assert contract.HTTP_PORT == 8080
    assert contract.PATH_METRICS == "/metrics"
    assert contract.POOL_LABEL == "tars.dev/pool"


DASHBOARD = CHART / "dashboards" / "tars.json"


def dashboard_exprs(dashboard: dict[str, Any]) -> dict[str, list[str]]:
    return {
        p["title"]: [t["expr"] for t in p.get("targets", [])]
        for p in dashboard["panels"]
        if p["type"] != "row"
    }


def test_dashboard_config_map(render: Render) -> None:
    cm = one(render(None, VALUES_ALL), "ConfigMap")
    assert cm["metadata"]["name"] == f"{FULLNAME}-dashboard"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "TARS"}
    assert list(cm["data"]) == ["tars.json"]
    assert json.loads(cm["data"]["tars.json"]) == json.loads(DASHBOARD.read_text())
    elsewhere = one(render({"dashboard": {"enabled": True, "namespace": "monitoring"}}), "ConfigMap")
    assert elsewhere["metadata"]["namespace"] == "monitoring"


def test_dashboard_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard)
    everything = " ".join(e for es in exprs.values() for e in es)
    for needed in (
        metric_names.OPERATOR_DESIRED_REPLICAS,
        metric_names.AGENT_BUSY,
        metric_names.QUEUE_DEPTH,
        metric_names.LLM_REQUESTS_TOTAL,
        metric_names.LIMITER_WAIT_SECONDS + "_bucket",
        metric_names.CIRCUIT_STATE,
        "process_resident_memory_bytes",
    ):
        assert needed in everything, needed
    assert any("priority" in e and "tars_queue_depth" in e for e in everything.split(" / "))
    assert "histogram_quantile(0.95" in " ".join(exprs["Limiter wait p95 by priority"])
    assert "by (code)" in " ".join(exprs["LLM requests by code"])
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_uses_only_known_metrics(promtool: str, tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    recording = []
    for title, exprs in dashboard_exprs(dashboard).items():
        for i, expr in enumerate(exprs):
            assert unknown_metrics(expr) == set(), title
            # Grafana's variables, replaced by what they stand for, give plain PromQL.
            plain = expr.replace("$__rate_interval", "5m").replace("$namespace", ".*").replace("$pool", ".*")
            recording.append({"record": f"dashboard:panel_{len(recording)}_{i}", "expr": plain})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
