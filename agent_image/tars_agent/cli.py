"""`tars`: submit tasks, read or stream results, inspect queues.

Exit codes: 0 ok, 1 unknown task, 2 invalid task, 3 queue full (retry later),
4 timed out waiting, 5 the task was dead-lettered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import redis.asyncio as aioredis

from tars_agent.client import TaskClient
from tars_agent.queue import QueueFull
from tars_agent.tasks import PRIORITIES, InvalidTask, TaskResult
from tars_contract import contract

EXIT_UNKNOWN, EXIT_INVALID, EXIT_FULL, EXIT_TIMEOUT, EXIT_DEAD = 1, 2, 3, 4, 5


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {value!r}")
    return number


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tars", description="Submit tasks to TARS agent pools and read results.")
    p.add_argument(
        "--redis-url",
        default=os.environ.get(contract.ENV_REDIS_URL, "redis://127.0.0.1:6379/0"),
        help=f"default: env {contract.ENV_REDIS_URL} (password from env {contract.ENV_REDIS_PASSWORD})",
    )
    p.add_argument("--namespace", default=os.environ.get(contract.ENV_NAMESPACE, "default"))
    p.add_argument("--pool", default=os.environ.get(contract.ENV_POOL, "default"))
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("submit", help="submit a task")
    s.add_argument("--priority", default="normal", choices=PRIORITIES)
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="a single user message")
    src.add_argument("--file", help="a JSON task payload ('-' for stdin)")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--model")
    s.add_argument("--no-stream", action="store_true", help="ask the upstream for one non-streamed answer")
    s.add_argument("--idempotency-key", help="a retried submit with the same key does not run twice")
    s.add_argument("--wait", action="store_true", help="wait for the result and print it")
    s.add_argument("--follow", action="store_true", help="print the output as it is written")
    s.add_argument("--timeout", type=float, default=300.0)
    s.add_argument(
        "--max-depth",
        type=_positive,
        default=os.environ.get(contract.ENV_QUEUE_MAX_DEPTH) or None,
        help="the pool's spec.queue.maxDepth: refused beyond it even before any agent ran "
        f"(default: env {contract.ENV_QUEUE_MAX_DEPTH}; the limit stored for the pool, "
        f"else {contract.DEFAULT_QUEUE_MAX_DEPTH}; with both, the stricter)",
    )

    r = sub.add_parser("result", help="show a task's result")
    r.add_argument("task_id")
    r.add_argument("--wait", action="store_true")
    r.add_argument("--follow", action="store_true")
    r.add_argument("--timeout", type=float, default=300.0)
    r.add_argument("--json", action="store_true")

    q = sub.add_parser("queue", help="queue statistics of the pool")
    q.add_argument("--dead", type=int, default=0, metavar="N", help="also list the last N dead letters")
    q.add_argument(
        "--set-max-depth",
        type=_positive,
        metavar="N",
        help="store the pool's queue limit for every submitter",
    )
    return p


def _print_result(result: TaskResult, as_json: bool) -> int:
    if as_json:
        print(result.model_dump_json())
    elif result.status == "dead":
        print(
            f"task {result.task_id} dead-lettered after {result.attempts} attempts: {result.error}",
            file=sys.stderr,
        )
    else:
        print(result.output)
    return EXIT_DEAD if result.status == "dead" else 0


async def _follow(client: TaskClient, task_id: str, timeout_s: float) -> int:
    printed = False
    async for event in client.follow(task_id, timeout_s):
        if event.kind == "start":
            if printed:  # stdout cannot take text back: say where the new attempt's text begins
                print()
                print(f"[tars: task {task_id} restarted; the text above is void]", file=sys.stderr)
                printed = False
            continue
        if event.kind == "text":
            sys.stdout.write(event.text)
            sys.stdout.flush()
            printed = True
        elif event.kind == "dead":
            print(f"\ntask {task_id} dead-lettered: {event.text}", file=sys.stderr)
            return EXIT_DEAD
    print()
    return 0


async def _run(args: argparse.Namespace) -> int:
    password = os.environ.get(contract.ENV_REDIS_PASSWORD) or None
    redis = aioredis.Redis.from_url(
        args.redis_url, password=password, decode_responses=True, socket_timeout=10
    )
    client = TaskClient(redis, args.namespace, args.pool, getattr(args, "max_depth", None))
    try:
        if args.command == "submit":
            payload: Any
            if args.file:
                payload = sys.stdin.read() if args.file == "-" else open(args.file).read()  # noqa: ASYNC230, SIM115
            else:
                payload = {
                    "messages": [{"role": "user", "content": args.prompt}],
                    "max_tokens": args.max_tokens,
                    "stream": not args.no_stream,
                } | ({"model": args.model} if args.model else {})
            try:
                submitted = await client.submit_payload(payload, args.priority, args.idempotency_key)
            except InvalidTask as exc:
                print(f"tars: {exc}", file=sys.stderr)
                return EXIT_INVALID
            except QueueFull as exc:
                print(f"tars: {exc}", file=sys.stderr)
                return EXIT_FULL
            note = " (already submitted with this idempotency key)" if submitted.duplicate else ""
            print(f"{submitted.task_id}{note}", file=sys.stderr if (args.wait or args.follow) else sys.stdout)
            task_id = submitted.task_id
            if args.follow:
                return await _follow(client, task_id, args.timeout)
            if args.wait:
                return _print_result(await client.wait(task_id, args.timeout), False)
            return 0
        if args.command == "result":
            if args.follow:
                return await _follow(client, args.task_id, args.timeout)
            result = await (
                client.wait(args.task_id, args.timeout) if args.wait else client.result(args.task_id)
            )
            if result is None:
                print(
                    f"tars: no task {args.task_id} in pool {client.pool_name} (unknown or expired)",
                    file=sys.stderr,
                )
                return EXIT_UNKNOWN
            if result.status not in ("done", "dead"):
                print(f"task {result.task_id} is {result.status} (attempts so far: {result.attempts})")
                return 0
            return _print_result(result, args.json)
        if args.set_max_depth:
            await client.set_max_depth(args.set_max_depth)
        stats = await client.stats()
        if args.dead:
            stats["dead_letters"] = await client.dead_letters(args.dead)
        print(json.dumps(stats, indent=2))
        return 0
    except TimeoutError as exc:
        print(f"tars: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except KeyError as exc:
        print(f"tars: {exc.args[0]}", file=sys.stderr)
        return EXIT_UNKNOWN
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> None:
    sys.exit(asyncio.run(_run(_parser().parse_args(argv))))


if __name__ == "__main__":
    main()
