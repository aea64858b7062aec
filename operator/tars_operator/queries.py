"""The PromQL the operator runs for a pool, built from metric_names (pure: text in, text out).

Every agent exports the queue depth it sees, so the per-priority values are de-duplicated
with `max` before summing; `namespace` is the label Prometheus' Kubernetes discovery
(and a PodMonitor) attaches to every scraped series.
"""

import datetime as dt

from tars_contract import metric_names
from tars_operator.models import AgentPoolSpec

# agent_memory_usage's series: the label that says which number each one is, and its values.
MEMORY_STAT_LABEL = "stat"
MEMORY_STATS = ("p95", "peak", "samples")


def _pool(name: str, namespace: str) -> str:
    return f'pool="{name}",namespace="{namespace}"'


def queue_depth(spec: AgentPoolSpec, name: str, namespace: str) -> str:
    """The pool's own query if it has one, else the sum over priorities of tars_queue_depth."""
    if spec.scaling.queue_depth.query is not None:
        return spec.scaling.queue_depth.query
    return f"sum(max by (priority) ({metric_names.QUEUE_DEPTH}{{{_pool(name, namespace)}}}))"


def budget_utilization(budget: str) -> str:
    """The most-used limit of the shared budget: its share used over about the last window
    (1 = saturated). Every agent reports the budget-wide value; the max is the freshest."""
    return f'max({metric_names.LIMITER_BUDGET_UTILIZATION}{{budget="{budget}"}})'


def limiter_wait_seconds(name: str, namespace: str) -> str:
    """Mean limiter wait per acquisition over the last minute, across the pool's agents."""
    series = f"{metric_names.LIMITER_WAIT_SECONDS}_%s{{{_pool(name, namespace)}}}"
    return f"sum(rate({series % 'sum'}[1m])) / sum(rate({series % 'count'}[1m]))"


def agent_memory(name: str, namespace: str) -> str:
    """Resident memory of the pool's agents, from their own process collector.

    Not cAdvisor's container_memory_working_set_bytes: that needs a kubelet's cAdvisor,
    while every agent exports its own process metrics wherever it is scraped. The agent is
    its container's main process, so its RSS is the container's working set to within the
    page cache. The pool's pods are those whose tars_queue_depth carries its pool label (the
    agent's own label): their names cannot tell, as generateName is cut to 58 characters and
    a regex of the name lets '.' match any character.
    """
    pool_pods = f"{metric_names.QUEUE_DEPTH}{{{_pool(name, namespace)}}}"
    return f'process_resident_memory_bytes{{namespace="{namespace}"}} and on (namespace, pod) {pool_pods}'


def agent_memory_usage(name: str, namespace: str, window: dt.timedelta, step: dt.timedelta) -> str:
    """The pool's agents' memory over `window`, summed up by Prometheus in three series
    labelled `stat`: p95 (the highest of the agents' own 95th percentiles), peak (the highest
    sample) and samples (how many), each agent sampled every `step` like a range query would.

    Summed up where the samples are, not shipped: at 100 pools x 20 agents a 1 h window sampled
    every 10 s is ~720,000 samples per scaling interval for the operator to decode and hold.
    The highest per-agent p95 is never below the p95 of all samples pooled (were it below, more
    than 5 % of every agent's samples, and so of all, would lie above it): on the safe side for
    a limit that every agent must fit.
    """
    selected = f"({agent_memory(name, namespace)})[{_seconds(window)}:{_seconds(step)}]"
    exprs = (
        f"max(quantile_over_time(0.95, {selected}))",
        f"max(max_over_time({selected}))",
        f"sum(count_over_time({selected}))",
    )
    return " or ".join(
        f'label_replace({expr}, "{MEMORY_STAT_LABEL}", "{stat}", "", "")'
        for stat, expr in zip(MEMORY_STATS, exprs, strict=True)
    )


def _seconds(delta: dt.timedelta) -> str:
    return f"{max(1, int(delta.total_seconds()))}s"
