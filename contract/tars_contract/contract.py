"""The operator <-> agent pod contract: labels, environment, ports, paths.

Both sides import these names, so a rename cannot leave one side behind.
"""

# Labels and annotations on every agent pod.
POOL_LABEL = "tars.dev/pool"

# Environment the operator adds to the agent container.
ENV_POOL = "TARS_POOL"
ENV_NAMESPACE = "TARS_NAMESPACE"
ENV_POD_NAME = "TARS_POD_NAME"  # from the downward API (metadata.name)
ENV_REDIS_URL = "TARS_REDIS_URL"
ENV_REDIS_PASSWORD = "TARS_REDIS_PASSWORD"  # from a Secret, never logged
ENV_BUDGET = "TARS_BUDGET"
ENV_REQUESTS_PER_MINUTE = "TARS_REQUESTS_PER_MINUTE"
ENV_REQUESTS_PER_HOUR = "TARS_REQUESTS_PER_HOUR"
ENV_TOKENS_PER_MINUTE = "TARS_TOKENS_PER_MINUTE"
ENV_QUEUE_MAX_DEPTH = "TARS_QUEUE_MAX_DEPTH"
ENV_LLM_BASE_URL = "TARS_LLM_BASE_URL"
ENV_LLM_API_KEY = "TARS_LLM_API_KEY"  # from a Secret, never logged
ENV_LLM_MODEL = "TARS_LLM_MODEL"
ENV_HTTP_PORT = "TARS_HTTP_PORT"

# One HTTP port per agent for /metrics, /healthz, /readyz, /status, /drain.
HTTP_PORT = 8080
PATH_METRICS = "/metrics"
PATH_HEALTHZ = "/healthz"
PATH_READYZ = "/readyz"
PATH_STATUS = "/status"  # GET: JSON {"inflight": int, "draining": bool, "slots": int}
PATH_DRAIN = "/drain"  # POST: stop taking new work (the operator's soft drain signal)

# Pool defaults shared by operator and agent.
DEFAULT_QUEUE_MAX_DEPTH = 500

# Operator bookkeeping on agent pods (the agent may read them; only the operator writes them).
DRAINING_ANNOTATION = "tars.dev/draining-since"  # RFC 3339 time the operator sent POST /drain
REPLACES_ANNOTATION = "tars.dev/replaces"  # name of the pod a rotation surge pod replaces
TEMPLATE_HASH_LABEL = "tars.dev/template-hash"  # hash of the rendered pod; a change rolls the pool

# Agent-side settings (optional; defaults in tars_agent.settings).
ENV_HTTP_BIND = "TARS_HTTP_BIND"  # listen address, default 0.0.0.0 (own pod netns)
ENV_CONCURRENCY = "TARS_CONCURRENCY"  # max tasks in flight per agent
ENV_DRAIN_GRACE_SECONDS = "TARS_DRAIN_GRACE_SECONDS"  # <= terminationGracePeriodSeconds
ENV_MAX_ATTEMPTS = "TARS_MAX_ATTEMPTS"  # attempts before a task is dead-lettered
ENV_CLAIM_IDLE_SECONDS = "TARS_CLAIM_IDLE_SECONDS"  # idle time before others reclaim work
ENV_RESULT_TTL_SECONDS = "TARS_RESULT_TTL_SECONDS"
ENV_LLM_HTTP2 = "TARS_LLM_HTTP2"

DEFAULT_DRAIN_GRACE_SECONDS = 30.0


# Memory: the agent halves its intake at MEMORY_HALF_AT of its cgroup limit and takes no new
# work from MEMORY_STOP_AT; the operator's right-sizer puts the p95 usage at
# memory.targetUtilization, which the CRD bounds below both, so the two never fight.
MEMORY_HALF_AT = 0.8
MEMORY_STOP_AT = 0.9
MAX_MEMORY_TARGET_UTILIZATION = 0.75

# Rate limits of a budget: what the AgentPool API accepts, the agent runs. At least 2: the
# limiter keeps a burst of at least one unit below the limit. Requests refill at most one per
# microsecond (the limiter's clock); tokens are counted in blocks above that (gcra.LimitParams).
MIN_RATE_LIMIT = 2
MAX_REQUESTS_PER_MINUTE = 50_000_000
MAX_REQUESTS_PER_HOUR = 1_000_000_000
MAX_TOKENS_PER_MINUTE = 1_000_000_000

# Authentication of the operator to its agents: GET /status and POST /drain need
# `Authorization: Bearer <token>`; /metrics, /healthz and /readyz stay open (scrapes, probes).
ENV_AGENT_TOKEN = "TARS_AGENT_TOKEN"  # from the pool's Secret, never logged


def pool_key_prefix(namespace: str, pool: str) -> str:
    """Every Redis key of a pool starts with this; the {namespace/pool} hash tag keeps a pool's keys
    in one cluster slot. The operator removes a deleted pool's keys by it."""
    return f"tars:{{{namespace}/{pool}}}"


# The task queue: one Redis stream per priority, read by the consumer group QUEUE_GROUP. Tasks
# waiting (not yet taken) = XLEN - the group's pending count (acknowledged entries are deleted):
# the agents export it as tars_queue_depth, and the operator reads it from the default Redis.
QUEUE_PRIORITIES = ("critical", "high", "normal", "low")
QUEUE_GROUP = "agents"


def queue_stream_key(namespace: str, pool: str, priority: str) -> str:
    return f"{pool_key_prefix(namespace, pool)}:q:{priority}"


# Tasks waiting in each of a pool's streams, counted in Redis: its XLEN minus the queue group's
# pending count (taken, not yet acknowledged), as the agents export tars_queue_depth; -1 where the
# stream or its group is missing (an idle pool's streams expire; the agents recreate them). One
# reply, and no XINFO GROUPS of a missing stream from the client: its error replies, which
# redis-py keeps as exceptions in reference cycles (~80 objects per read), kept the operator's
# collector busy at 100 pools. KEYS: the streams; ARGV[1]: QUEUE_GROUP.
WAITING_TASKS_SCRIPT = """
local counts = {}
for i, stream in ipairs(KEYS) do
  counts[i] = -1
  if redis.call('EXISTS', stream) == 1 then
    for _, group in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
      local fields = {}
      for j = 1, #group, 2 do fields[group[j]] = group[j + 1] end
      if fields['name'] == ARGV[1] then
        counts[i] = math.max(redis.call('XLEN', stream) - fields['pending'], 0)
      end
    end
  end
end
return counts
"""


# Agents publish what GET /status answers ({"inflight": int, "draining": bool, "slots": int}: the
# tasks it holds, whether it drains, the tasks it may hold now; JSON) to the pool's
# Redis under this key, on every change and every AGENT_STATE_REFRESH_SECONDS, expiring after
# AGENT_STATE_TTL_SECONDS: the operator reads a pool's agents in one round trip (MGET) instead of
# one GET /status each, and asks /status only of agents whose key is missing.
AGENT_STATE_REFRESH_SECONDS = 5.0
AGENT_STATE_TTL_SECONDS = 15
# Changes within this long of the last write go out together: in a burst, one write per start and
# end of each task was ~4 % of an agent's CPU, for an operator that reads once a second.
AGENT_STATE_MIN_GAP_SECONDS = 0.1


def agent_state_key(namespace: str, pool: str, pod: str) -> str:
    """Under the pool's prefix: removed with the pool's other keys (and by its TTL)."""
    return f"{pool_key_prefix(namespace, pool)}:agent-state:{pod}"
