"""A mock OpenAI-compatible upstream for tests, e2e, benchmarks and the demo (aiohttp.web).

It enforces request and token limits with continuously refilling buckets (the
provider model: a bucket of `limit` refilling at limit/window), counts every
admitted request whether it then fails or not, answers 429 with Retry-After
and x-ratelimit-* headers, and logs every admitted request (GET /admin/log,
optionally a JSONL file) so a test can check no window exceeded a limit; the
arrival of every refused request is logged too. With `count_refused` a refused
request also uses up what is left in the buckets, as OpenAI counts failed
requests against the limit: clients that keep knocking keep the bucket empty.

Admin: GET /admin/log, POST /admin/reset, POST /admin/config (JSON fields of MockConfig).
A message containing POISON_MARKER is refused with 400 (a task that can never succeed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from aiohttp import web

POISON_MARKER = "__poison__"


@dataclass
class MockConfig:
    requests_per_minute: float = 0  # 0 = unlimited
    tokens_per_minute: float = 0
    window_s: float = 60.0  # the window the two limits above refer to (tests shorten it)
    latency_s: float = 0.0  # before the first byte
    chunk_delay_s: float = 0.0  # between streamed chunks
    response_tokens: int = 16  # words in each answer (capped by max_tokens)
    fail_status: int = 0  # answer every admitted request with this status (e.g. 503); 0 = off
    ignore_stream: bool = False  # answer streamed requests with one plain JSON body, as some servers do
    api_key: str = ""  # if set, require "Authorization: Bearer <key>"
    count_refused: bool = False  # a refused request costs what it asked for too (the level stops at 0)


@dataclass
class _Bucket:
    """Continuously refilling bucket of `capacity` units refilling at capacity/window."""

    capacity: float
    window_s: float
    level: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.capacity / self.window_s)
        self.updated = now

    def wait_for(self, cost: float) -> float:
        return max(cost - self.level, 0.0) * self.window_s / self.capacity

    def reset_after(self) -> float:
        return (self.capacity - self.level) * self.window_s / self.capacity


def _duration(seconds: float) -> str:
    """OpenAI style reset durations: 6m0s, 1.5s, 20ms."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.3g}s" if minutes else f"{rest:.3g}s"


class MockLLM:
    def __init__(self, config: MockConfig | None = None, log_file: Path | None = None) -> None:
        self.config = config or MockConfig()
        self.log_file = log_file
        self.admitted: list[dict[str, Any]] = []
        self.rejected = 0
        self.refused: list[dict[str, float]] = []  # arrival of every 429, same clocks as `admitted`
        self._lock = asyncio.Lock()
        self._reset_buckets()
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_get("/admin/log", self._log)
        self.app.router.add_post("/admin/reset", self._reset)
        self.app.router.add_post("/admin/config", self._configure)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _reset_buckets(self) -> None:
        c = self.config
        self._requests = _Bucket(c.requests_per_minute, c.window_s) if c.requests_per_minute else None
        self._tokens = _Bucket(c.tokens_per_minute, c.window_s) if c.tokens_per_minute else None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0][1]
        self.url = f"http://{host}:{bound}/v1"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for kind, bucket in (("requests", self._requests), ("tokens", self._tokens)):
            if bucket is not None:
                # per minute like OpenAI's headers, whatever window the mock was given
                out[f"x-ratelimit-limit-{kind}"] = str(int(bucket.capacity * 60 / bucket.window_s))
                out[f"x-ratelimit-remaining-{kind}"] = str(max(int(bucket.level), 0))
                out[f"x-ratelimit-reset-{kind}"] = _duration(bucket.reset_after())
        return out

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        c = self.config
        if c.api_key and request.headers.get("Authorization") != f"Bearer {c.api_key}":
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        try:
            body = await request.json()
            messages = body["messages"]
            max_tokens = int(body.get("max_tokens") or 256)
            prompt_tokens = sum(math.ceil(len(m["content"]) / 4) + 4 for m in messages) + 3
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": {"message": f"bad request: {exc!r}"}}, status=400)
        cost = prompt_tokens + max_tokens  # charged up front like OpenAI: max(max_tokens) + prompt
        async with self._lock:
            now = time.monotonic()
            waits = []
            for bucket, need in ((self._requests, 1.0), (self._tokens, float(cost))):
                if bucket is not None:
                    bucket.refill(now)
                    waits.append(bucket.wait_for(need))
            wait = max(waits, default=0.0)
            headers = self._headers()
            if wait > 0:
                self.rejected += 1
                self.refused.append({"ts": time.time(), "mono": now})
                if c.count_refused:
                    for bucket, need in ((self._requests, 1.0), (self._tokens, float(cost))):
                        if bucket is not None:
                            bucket.level = max(bucket.level - need, 0.0)
                headers["Retry-After"] = str(math.ceil(wait))
                headers["retry-after-ms"] = str(math.ceil(wait * 1000))
                return web.json_response(
                    {"error": {"message": "rate limit exceeded", "type": "rate_limit"}},
                    status=429,
                    headers=headers,
                )
            if self._requests is not None:
                self._requests.level -= 1
            if self._tokens is not None:
                self._tokens.level -= cost
            entry = {"ts": time.time(), "mono": now, "tokens": cost, "stream": bool(body.get("stream"))}
            self.admitted.append(entry)
            if self.log_file is not None:
                with self.log_file.open("a") as f:  # tiny appends; the mock is a test tool
                    f.write(json.dumps(entry) + "\n")
            headers = self._headers()
        if c.latency_s:
            await asyncio.sleep(c.latency_s)
        if c.fail_status:
            return web.json_response({"error": {"message": "injected failure"}}, status=c.fail_status)
        if any(POISON_MARKER in str(m.get("content", "")) for m in messages):
            return web.json_response(
                {"error": {"message": "poison input refused"}}, status=400, headers=headers
            )
        words = [f"w{i}" for i in range(min(c.response_tokens, max_tokens))]
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        model = body.get("model", "mock")
        if not body.get("stream") or c.ignore_stream:
            return web.json_response(
                {
                    "id": "chatcmpl-mock",
                    "object": "chat.completion",
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": " ".join(words)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
                headers=headers,
            )
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        try:
            await response.prepare(request)
            for i, word in enumerate(words):
                chunk = {
                    "id": "chatcmpl-mock",
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word}}],
                }
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if c.chunk_delay_s:
                    await asyncio.sleep(c.chunk_delay_s)
            if (body.get("stream_options") or {}).get("include_usage"):
                final = {
                    "id": "chatcmpl-mock",
                    "object": "chat.completion.chunk",
                    "choices": [],
                    "usage": usage,
                }
                await response.write(f"data: {json.dumps(final)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away (a killed agent in a test): nothing to answer
        return response

    async def _log(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {"admitted": self.admitted, "rejected": self.rejected, "refused": self.refused}
        )

    async def _reset(self, _request: web.Request) -> web.Response:
        self.admitted.clear()
        self.rejected = 0
        self.refused.clear()
        self._reset_buckets()
        return web.json_response({"ok": True})

    async def _configure(self, request: web.Request) -> web.Response:
        changes = await request.json()
        known = {f.name for f in fields(MockConfig)}
        unknown = set(changes) - known
        if unknown:
            return web.json_response({"error": f"unknown settings: {sorted(unknown)}"}, status=400)
        for name, value in changes.items():
            setattr(self.config, name, value)
        self._reset_buckets()
        return web.json_response(asdict(self.config) | {"api_key": "***" if self.config.api_key else ""})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tars-mock-llm", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--requests-per-minute", type=float, default=0)
    parser.add_argument("--tokens-per-minute", type=float, default=0)
    parser.add_argument("--window-seconds", type=float, default=60.0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before the first byte")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between streamed chunks")
    parser.add_argument("--response-tokens", type=int, default=16)
    parser.add_argument("--fail-status", type=int, default=0)
    parser.add_argument(
        "--count-refused",
        action="store_true",
        help="a refused request uses up the limits too, as OpenAI counts failed requests",
    )
    parser.add_argument("--log-file", type=Path, help="append every admitted request as JSONL")
    args = parser.parse_args(argv)
    config = MockConfig(
        args.requests_per_minute,
        args.tokens_per_minute,
        args.window_seconds,
        args.latency,
        args.chunk_delay,
        args.response_tokens,
        args.fail_status,
        count_refused=args.count_refused,
    )
    mock = MockLLM(config, args.log_file)
    web.run_app(mock.app, host=args.host, port=args.port, access_log=None)


if __name__ == "__main__":
    main()
