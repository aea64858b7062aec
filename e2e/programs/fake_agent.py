"""A stand-in agent for operator e2e tests: speaks the agent side of the
operator <-> agent contract (tars_contract.contract) and nothing else. It runs in
the agent image (python + redis-py), mounted from a ConfigMap.

GET  /metrics      tars_agent_busy, tars_agent_draining, tars_queue_depth{pool,priority}
                   (the pool's queue in Redis, counted by the contract's script as agents count it),
                   tars_limiter_budget_utilization{budget}, process_resident_memory_bytes
GET  /healthz      200
GET  /readyz       200 until drained, then 503
GET  /status       {"inflight": n, "draining": bool, "memoryLimitBytes": the cgroup's limit}
POST /drain        stop taking work
                   (both need `Authorization: Bearer $TARS_AGENT_TOKEN`, as from a real agent:
                   401 without it or with another token, 503 when the agent has no token)
POST /test/busy?n= set the in-flight count (the test's remote control)
POST /test/alloc?mb= allocate and hold that much more memory

The pool's backlog is what a test put in the pool's queue streams (placeholders nobody takes: the
operator counts the same streams itself), its budget use what a test wrote to the Redis key
`tars-e2e:<namespace>/<pool>:budget` (absent: 0); both read at every scrape.
"""

import hmac
import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import redis

from tars_contract import contract

STATE = {"inflight": 0, "draining": False}
HELD: list[bytearray] = []  # memory a test asked this agent to hold
POOL = os.environ.get("TARS_POOL", "")
NAMESPACE = os.environ.get("TARS_NAMESPACE", "")
BUDGET = os.environ.get("TARS_BUDGET", "")
TOKEN = os.environ.get("TARS_AGENT_TOKEN", "")
REDIS = redis.Redis.from_url(
    os.environ["TARS_REDIS_URL"],
    password=os.environ.get("TARS_REDIS_PASSWORD") or None,
    socket_timeout=1,
    socket_connect_timeout=1,
)
CONTROL_KEY = f"tars-e2e:{NAMESPACE}/{POOL}"
STREAMS = [contract.queue_stream_key(NAMESPACE, POOL, p) for p in contract.QUEUE_PRIORITIES]
WAITING = REDIS.register_script(contract.WAITING_TASKS_SCRIPT)


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_limit() -> int:
    """The limit the kernel enforces on this container (cgroup v1 or v2)."""
    for path in ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        return -1 if text == "max" else int(text)
    return -1


def queue_depth() -> str:
    counts = WAITING(keys=STREAMS, args=[contract.QUEUE_GROUP])
    return "".join(
        f'tars_queue_depth{{pool="{POOL}",priority="{p}"}} {max(int(n), 0)}\n'
        for p, n in zip(contract.QUEUE_PRIORITIES, counts, strict=True)
    )


def control(name: str) -> float:
    """A value the test set for the pool; a Redis error is not a value, so no metric is exported."""
    raw = REDIS.get(f"{CONTROL_KEY}:{name}")
    return float(raw or 0)


class Handler(BaseHTTPRequestHandler):
    def _authorized(self) -> bool:
        """The real agent's check (tars_agent.worker): replies and returns False when refused."""
        if not TOKEN:
            self._reply(503, "control endpoints disabled: TARS_AGENT_TOKEN is not set")
            return False
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            problem = "missing Authorization: Bearer <token> header"
        elif hmac.compare_digest(given.strip().encode(), TOKEN.encode()):
            return True
        else:
            problem = "invalid token"
        self._reply(401, problem)
        return False

    def do_GET(self) -> None:
        path = urlparse(self.path).path
        if path == "/metrics":
            try:
                body = (
                    f"tars_agent_busy {STATE['inflight']}\n"
                    f"tars_agent_draining {int(bool(STATE['draining']))}\n"
                    f"{queue_depth()}"
                    f"process_resident_memory_bytes {resident_bytes()}\n"
                )
                if BUDGET:
                    body += f'tars_limiter_budget_utilization{{budget="{BUDGET}"}} {control("budget"):g}\n'
            except redis.RedisError as exc:
                self._reply(503, f"redis: {exc}")
                return
            self._reply(200, body, "text/plain; version=0.0.4")
        elif path == "/healthz":
            self._reply(200, "ok")
        elif path == "/readyz":
            self._reply(503 if STATE["draining"] else 200, "draining" if STATE["draining"] else "ready")
        elif path == "/status":
            if not self._authorized():
                return
            self._reply(200, json.dumps({**STATE, "memoryLimitBytes": memory_limit()}), "application/json")
        else:
            self._reply(404, "not found")

    def do_POST(self) -> None:
        url = urlparse(self.path)
        if url.path == "/drain":
            if not self._authorized():
                return
            STATE["draining"] = True
            self._reply(202, json.dumps(STATE), "application/json")
        elif url.path == "/test/alloc":
            HELD.append(bytearray(b"x" * int(parse_qs(url.query)["mb"][0]) * 1024 * 1024))
            self._reply(200, "held", "text/plain")
        elif url.path == "/test/busy":
            STATE["inflight"] = int(parse_qs(url.query)["n"][0])
            self._reply(200, json.dumps(STATE), "application/json")
        else:
            self._reply(404, "not found")

    def _reply(self, code: int, body: str, kind: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("TARS_HTTP_PORT", "8080"))), Handler).serve_forever()
