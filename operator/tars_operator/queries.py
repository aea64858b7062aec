"""The PromQL the operator runs for a pool, built from metric_names (pure: text in, text out).

Every agent exports the queue depth it sees, so the per-priority values are de-duplicated
with `max` before summing; `namespace` is the label Prometheus' Kubernetes discovery
(and a PodMonitor) attaches to every scraped series.
"""

from tars_contract import metric_names
from tars_operator.models import AgentPoolSpec


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
