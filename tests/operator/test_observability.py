"""Tests of observability.py: a deleted pool's series go with it."""

from prometheus_client import generate_latest

from tars_operator import observability as o


def test_a_deleted_pools_series_are_dropped_and_the_others_kept() -> None:
    for pool in ("gone", "kept"):
        labels = {"namespace": "ns-obs", "pool": pool}
        o.RECONCILE_SECONDS.labels(**labels).observe(0.1)
        o.DECISION_SECONDS.labels(**labels).observe(0.1)
        o.PODS_CREATED.labels(**labels, reason="scale-up").inc()
        o.PODS_DELETED.labels(**labels, reason="drained").inc()
        o.DESIRED_REPLICAS.labels(**labels).set(2)
        o.DECISIONS.labels(**labels, reason="Warm").inc()
        o.ERRORS.labels(**labels, stage="create").inc()
        o.LOOP_CRASHES.labels(**labels).inc()
    o.forget_pool("ns-obs", "gone")
    text = generate_latest().decode()
    assert 'pool="gone"' not in text
    assert text.count('namespace="ns-obs",pool="kept"') >= 8
