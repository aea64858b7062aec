"""Task payloads and results: validated models shared by the client, the CLI and the worker."""

from __future__ import annotations

import json
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# The one definition of the priorities, highest first (queues, weights, limiter, CLI, demo).
Priority = Literal["critical", "high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = get_args(Priority)
MAX_PAYLOAD_BYTES = 256 * 1024  # a task is a prompt, not a file transfer; keeps stream entries small


class InvalidTask(ValueError):
    """A task payload that cannot run; the message names every problem."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=128 * 1024)


class TaskSpec(BaseModel):
    """What a submitter asks for: an OpenAI-style chat completion."""

    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1, max_length=256)
    model: str | None = Field(default=None, min_length=1, max_length=200)
    max_tokens: int = Field(default=256, ge=1, le=65536)
    temperature: float | None = Field(default=None, ge=0, le=2)
    stream: bool = True
    metadata: dict[str, str] = Field(default_factory=dict, max_length=32)


class Task(BaseModel):
    """A task as it sits in a queue stream."""

    # Parsed from JSON once per task: pydantic-core's process-wide string cache would keep each
    # task's unique values (its id) after the task is gone, up to 16,384 of them (~1.3 MB).
    model_config = ConfigDict(extra="forbid", cache_strings="keys")
    id: str = Field(min_length=1, max_length=128)
    priority: Priority
    spec: TaskSpec
    submitted_at: float


class TaskResult(BaseModel):
    task_id: str
    status: Literal["queued", "running", "done", "dead"]
    output: str = ""
    error: str | None = None
    attempts: int = 0
    worker: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finished_at: float | None = None  # Redis server time of the stored result


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "payload"
        problems.append(f"{where}: {err['msg']}")
    return "; ".join(problems)


def parse_spec(raw: str | bytes | dict[str, Any]) -> TaskSpec:
    """Validate a submitted payload, raising InvalidTask that names each bad field."""
    if isinstance(raw, str | bytes):
        if len(raw) > MAX_PAYLOAD_BYTES:
            raise InvalidTask(
                f"invalid task: payload is {len(raw)} bytes, more than the {MAX_PAYLOAD_BYTES} allowed"
            )
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidTask(f"invalid task: payload is not JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise InvalidTask(f"invalid task: payload must be a JSON object, got {type(raw).__name__}")
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as exc:
        raise InvalidTask(f"invalid task: {_describe(exc)}") from exc
    size = len(spec.model_dump_json())
    if size > MAX_PAYLOAD_BYTES:
        raise InvalidTask(f"invalid task: payload is {size} bytes, more than the {MAX_PAYLOAD_BYTES} allowed")
    return spec


def parse_task(raw: str | bytes) -> Task:
    """Parse a queued task (written by TaskClient; anything else in the stream is refused)."""
    try:
        return Task.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidTask(f"invalid queued task: {_describe(exc)}") from exc
