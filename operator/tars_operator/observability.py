"""The operator's own Prometheus metrics (names from tars_contract.metric_names)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from tars_contract import metric_names

RECONCILE_SECONDS = Histogram(
    metric_names.OPERATOR_RECONCILE_SECONDS,
    "Duration of one reconcile cycle of a pool",
    ["namespace", "pool"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# How old an observation is when a plan is made from it: observing the pool (the pod index, its
# agents' in-flight counts), reading Prometheus when due, planning. Not the writes that follow.
DECISION_SECONDS = Histogram(
    metric_names.OPERATOR_DECISION_SECONDS,
    "Time from the start of a pool's observation to the plan made from it",
    ["namespace", "pool"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PODS_CREATED = Counter(
    metric_names.OPERATOR_PODS_CREATED_TOTAL, "Agent pods created", ["namespace", "pool", "reason"]
)
PODS_DELETED = Counter(
    metric_names.OPERATOR_PODS_DELETED_TOTAL, "Agent pods deleted", ["namespace", "pool", "reason"]
)
DESIRED_REPLICAS = Gauge(
    metric_names.OPERATOR_DESIRED_REPLICAS, "Desired agent pods of a pool", ["namespace", "pool"]
)
DECISIONS = Counter(
    metric_names.OPERATOR_DECISIONS_TOTAL, "Scaling decisions by reason", ["namespace", "pool", "reason"]
)
ERRORS = Counter(
    metric_names.OPERATOR_ERRORS_TOTAL, "Errors while reconciling", ["namespace", "pool", "stage"]
)
LEADER = Gauge(metric_names.OPERATOR_LEADER, "1 while this replica holds the leader Lease and may write")
LEADER_FENCED_WRITES = Counter(
    metric_names.OPERATOR_LEADER_FENCED_WRITES_TOTAL,
    "Writes refused because this replica's leadership had lapsed (its fence no longer held)",
)
LOOP_CRASHES = Counter(
    metric_names.OPERATOR_LOOP_CRASHES_TOTAL,
    "Steps of a pool's loop that raised (the loop restarts after a backoff)",
    ["namespace", "pool"],
)

_PER_POOL = (
    RECONCILE_SECONDS,
    DECISION_SECONDS,
    PODS_CREATED,
    PODS_DELETED,
    DESIRED_REPLICAS,
    DECISIONS,
    ERRORS,
    LOOP_CRASHES,
)


def forget_pool(namespace: str, pool: str) -> None:
    """Drop a deleted pool's series: an operator that lives through many pools must not grow."""
    for metric in _PER_POOL:
        metric.remove_by_labels({"namespace": namespace, "pool": pool})
