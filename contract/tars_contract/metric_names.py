"""Every Prometheus metric name of the project, in one place.

These names are the contract between agents, Prometheus, the operator and the
alerts in the Helm chart (see ARCHITECTURE.md); code and PromQL import them
from here instead of spelling them again.
"""

PREFIX = "tars_"

# Agent pods.
AGENT_BUSY = "tars_agent_busy"  # gauge: tasks in flight (0 = idle)
AGENT_DRAINING = "tars_agent_draining"  # gauge: 1 once the agent stopped taking work
TASKS_TOTAL = "tars_tasks_total"  # counter{outcome}
TASK_DURATION_SECONDS = "tars_task_duration_seconds"  # histogram
TASK_PICKUP_SECONDS = "tars_task_pickup_seconds"  # histogram{priority}: queued -> attempt start, Redis clock
QUEUE_DEPTH = "tars_queue_depth"  # gauge{pool,priority}
LLM_REQUESTS_TOTAL = "tars_llm_requests_total"  # counter{code}
LLM_LATENCY_SECONDS = "tars_llm_latency_seconds"  # histogram
LIMITER_WAIT_SECONDS = "tars_limiter_wait_seconds"  # histogram{priority}
LIMITER_DENIED_TOTAL = "tars_limiter_denied_total"  # counter{priority}
CIRCUIT_STATE = "tars_circuit_state"  # gauge: 0 closed, 1 half-open, 2 open
LIMITER_ADMITTED_TOTAL = "tars_limiter_admitted_total"  # counter{priority}
LIMITER_TIMEOUTS_TOTAL = "tars_limiter_timeouts_total"  # counter{priority}: gave up at the deadline
LIMITER_ESTIMATION_ERROR_TOKENS = "tars_limiter_estimation_error_tokens"  # histogram: actual - reserved
LIMITER_UPSTREAM_429_TOTAL = "tars_limiter_upstream_429_total"  # counter{budget}
LIMITER_DEGRADED = "tars_limiter_degraded"  # gauge: 1 while Redis is unreachable (local fallback)

# Operator.
OPERATOR_RECONCILE_SECONDS = "tars_operator_reconcile_seconds"
# histogram: from the start of a pool's observation (its pods, its agents' state) to the plan made from it
OPERATOR_DECISION_SECONDS = "tars_operator_decision_seconds"
OPERATOR_PODS_CREATED_TOTAL = "tars_operator_pods_created_total"  # counter{reason}
OPERATOR_PODS_DELETED_TOTAL = "tars_operator_pods_deleted_total"  # counter{reason}
OPERATOR_DESIRED_REPLICAS = "tars_operator_desired_replicas"
OPERATOR_DECISIONS_TOTAL = "tars_operator_decisions_total"  # counter{reason}
OPERATOR_ERRORS_TOTAL = "tars_operator_errors_total"  # counter{stage}
OPERATOR_LOOP_CRASHES_TOTAL = "tars_operator_loop_crashes_total"  # counter: a pool loop step raised
OPERATOR_LEADER = "tars_operator_leader"  # gauge: 1 while this replica leads (its fence holds)
OPERATOR_LEADER_FENCED_WRITES_TOTAL = "tars_operator_leader_fenced_writes_total"  # counter

# Shared limiter, per budget (added for the operator's budget-aware ceiling).
# gauge{budget,window}: units admitted over about the last window / what the limit sustains
# per window (1 = saturated; a little more right after a burst)
LIMITER_BUDGET_UTILIZATION = "tars_limiter_budget_utilization"
