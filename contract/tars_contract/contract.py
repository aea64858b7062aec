"""The operator <-> agent pod contract: labels, environment, ports, paths.

Both sides import these names, so a rename cannot leave one side behind.
"""

from typing import Any

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


def waiting_tasks(length: int, groups: object) -> int:
    """Tasks waiting in one priority's stream: its XLEN minus the group's pending count (XINFO
    GROUPS), as the agents export tars_queue_depth; WAITING_TASKS_SCRIPT counts the same in Redis."""
    return max(int(length) - int(queue_group_field(groups, "pending") or 0), 0)


# The operator's count of waiting_tasks over a pool's streams, in Redis: one reply, and no XINFO
# GROUPS of a stream that is not there (an idle pool's streams expire), whose error replies
# redis-py turns into exceptions held in reference cycles: ~80 objects per read, 100 pools' worth
# each second kept the operator's collector busy. KEYS: the streams; ARGV[1]: QUEUE_GROUP.
WAITING_TASKS_SCRIPT = """
local waiting = 0
for _, stream in ipairs(KEYS) do
  local length = redis.call('XLEN', stream)
  if length > 0 then
    local pending = 0
    for _, group in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
      local fields = {}
      for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
      if fields['name'] == ARGV[1] then pending = fields['pending'] end
    end
    waiting = waiting + math.max(length - pending, 0)
  end
end
return waiting
"""


def queue_group_field(groups: object, name: str) -> Any:
    """A field of group QUEUE_GROUP in an XINFO GROUPS reply (None if missing, or if the reply is
    an error: a stream not created yet)."""
    if not isinstance(groups, list):
        return None
    for group in groups:
        fields = {_text(k): v for k, v in group.items()}
        if _text(fields.get("name", "")) == QUEUE_GROUP:
            return fields.get(name)
    return None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# Agents publish what GET /status answers ({"inflight": int, "draining": bool, "slots": int}: the
# tasks it holds, whether it drains, the tasks it may hold now; JSON) to the pool's
# Redis under this key, on every change and every AGENT_STATE_REFRESH_SECONDS, expiring after
# AGENT_STATE_TTL_SECONDS: the operator reads a pool's agents in one round trip (MGET) instead of
# one GET /status each, and asks /status only of agents whose key is missing.
AGENT_STATE_REFRESH_SECONDS = 5.0
AGENT_STATE_TTL_SECONDS = 15


def agent_state_key(namespace: str, pool: str, pod: str) -> str:
    """Under the pool's prefix: removed with the pool's other keys (and by its TTL)."""
    return f"{pool_key_prefix(namespace, pool)}:agent-state:{pod}"
