"""Prometheus metrics of one agent process, on their own registry.

A registry per instance (not the global default) lets tests run several agents
in one process; the process collector is added to it for memory and CPU.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from tars_contract import metric_names as m

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60)
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
# Pickup: 1 ms (the stream id's resolution) to 10 s, fine where warm pickup targets sit (10-30 ms).
_PICKUP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip
_TOKEN_ERROR_BUCKETS = (-4096, -1024, -256, -64, -16, 0, 16, 64, 256, 1024, 4096)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, process_collector: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        if process_collector:
            ProcessCollector(registry=self.registry)
        r = self.registry
        self.busy = Gauge(m.AGENT_BUSY, "Tasks in flight in this agent (0 = idle)", registry=r)
        self.draining = Gauge(m.AGENT_DRAINING, "1 once the agent stopped taking work", registry=r)
        self.tasks = Counter(m.TASKS_TOTAL, "Tasks finished, by outcome", ["outcome"], registry=r)
        self.task_duration = Histogram(
            m.TASK_DURATION_SECONDS,
            "Time from taking a task to its outcome",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.task_pickup = Histogram(
            m.TASK_PICKUP_SECONDS,
            "Time from a task's queue entry to its attempt's start, both on Redis' clock; once per "
            "attempt (a requeued retry: its new entry's wait; a reclaimed entry: since it was queued)",
            ["priority"],
            buckets=_PICKUP_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            m.QUEUE_DEPTH, "Tasks waiting (not yet taken) per priority", ["pool", "priority"], registry=r
        )
        self.llm_requests = Counter(
            m.LLM_REQUESTS_TOTAL,
            "Upstream LLM responses by HTTP status ('error' = no response)",
            ["code"],
            registry=r,
        )
        self.llm_latency = Histogram(
            m.LLM_LATENCY_SECONDS, "Upstream LLM request latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.limiter_wait = Histogram(
            m.LIMITER_WAIT_SECONDS,
            "Time waited for the shared budget",
            ["priority"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.limiter_denied = Counter(
            m.LIMITER_DENIED_TOTAL, "Limiter decisions that said 'wait'", ["priority"], registry=r
        )
        self.limiter_admitted = Counter(
            m.LIMITER_ADMITTED_TOTAL, "Limiter admissions", ["priority"], registry=r
        )
        self.limiter_timeouts = Counter(
            m.LIMITER_TIMEOUTS_TOTAL,
            "Callers that gave up waiting at their deadline",
            ["priority"],
            registry=r,
        )
        self.estimation_error = Histogram(
            m.LIMITER_ESTIMATION_ERROR_TOKENS,
            "Actual minus reserved tokens per request",
            buckets=_TOKEN_ERROR_BUCKETS,
            registry=r,
        )
        self.upstream_429 = Counter(
            m.LIMITER_UPSTREAM_429_TOTAL, "429 responses from the upstream", ["budget"], registry=r
        )
        self.limiter_degraded = Gauge(
            m.LIMITER_DEGRADED, "1 while Redis is unreachable and the local fallback decides", registry=r
        )
        self.budget_utilization = Gauge(
            m.LIMITER_BUDGET_UTILIZATION,
            "Units admitted over about the last window / what the limit sustains per window (1 = saturated)",
            ["budget", "window"],
            registry=r,
        )
        self.circuit_state = Gauge(
            m.CIRCUIT_STATE, "Circuit breaker: 0 closed, 1 half-open, 2 open", registry=r
        )
