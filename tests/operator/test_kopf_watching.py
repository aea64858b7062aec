"""handlers.configure_kopf: what kopf asks the API server for when it lists and watches; and
handlers.configure_gc."""

from __future__ import annotations

import gc

import kopf

from tars_contract import contract
from tars_operator import models
from tars_operator.handlers import POD_LIST_CHUNK, configure_gc, configure_kopf

PODS = kopf.Resource("", "v1", "pods", kind="Pod", namespaced=True)
AGENT_POOLS = kopf.Resource(models.GROUP, models.VERSION, models.PLURAL, kind=models.KIND, namespaced=True)


def test_only_agent_pods_are_listed_and_watched_and_in_chunks() -> None:
    settings = kopf.OperatorSettings()
    assert settings.watching.label_selectors.collect(PODS) == [], "kopf's default: every pod"
    configure_kopf(settings)
    # Filtered by the API server (a label selector on the list and watch), not by kopf after it
    # received every pod of the cluster.
    assert settings.watching.label_selectors.collect(PODS) == [contract.POOL_LABEL]
    assert settings.watching.label_selectors.collect(AGENT_POOLS) == [], "every pool is ours"
    assert settings.watching.chunk_size == POD_LIST_CHUNK


def test_after_startup_the_collector_leaves_what_lives_forever_alone() -> None:
    try:
        configure_gc()
        assert gc.get_freeze_count() > 0, "imported modules, classes and functions are frozen"
    finally:
        gc.unfreeze()
