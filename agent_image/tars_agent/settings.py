"""Agent configuration from the environment (names in tars_contract.contract)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from tars_contract import contract as c

# Settings that only the agent reads (not part of the operator's contract).
ENV_TASK_TIMEOUT_SECONDS = "TARS_TASK_TIMEOUT_SECONDS"
ENV_RESERVE_FRACTION = "TARS_RESERVE_FRACTION"
ENV_BURST_FRACTION = "TARS_BURST_FRACTION"
ENV_CIRCUIT_FAILURES = "TARS_CIRCUIT_FAILURES"
ENV_CIRCUIT_OPEN_SECONDS = "TARS_CIRCUIT_OPEN_SECONDS"
ENV_LLM_MAX_RETRIES = "TARS_LLM_MAX_RETRIES"
ENV_LLM_CACHE_ENTRIES = "TARS_LLM_CACHE_ENTRIES"
ENV_LOG_LEVEL = "TARS_LOG_LEVEL"


class AgentSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    pool: str = Field("default", min_length=1)
    namespace: str = Field("default", min_length=1)
    pod_name: str = Field(default_factory=socket.gethostname, min_length=1)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password: SecretStr | None = None
    budget: str = "default"
    requests_per_minute: int | None = Field(None, ge=c.MIN_RATE_LIMIT, le=c.MAX_REQUESTS_PER_MINUTE)
    requests_per_hour: int | None = Field(None, ge=c.MIN_RATE_LIMIT, le=c.MAX_REQUESTS_PER_HOUR)
    tokens_per_minute: int | None = Field(None, ge=c.MIN_RATE_LIMIT, le=c.MAX_TOKENS_PER_MINUTE)
    queue_max_depth: int = Field(c.DEFAULT_QUEUE_MAX_DEPTH, ge=1)
    llm_base_url: str = "http://127.0.0.1:8000/v1"
    llm_api_key: SecretStr | None = None
    llm_model: str = "gpt-4o-mini"
    llm_http2: bool = False
    llm_max_retries: int = Field(4, ge=0)
    llm_cache_entries: int = Field(0, ge=0)
    http_port: int = Field(c.HTTP_PORT, ge=0, le=65535)
    http_bind: str = "0.0.0.0"
    # Without a token the control endpoints (/status, /drain) refuse every request.
    agent_token: SecretStr | None = None
    concurrency: int = Field(4, ge=1, le=1000)
    drain_grace_seconds: float = Field(c.DEFAULT_DRAIN_GRACE_SECONDS, gt=0)
    max_attempts: int = Field(3, ge=1)
    claim_idle_seconds: float = Field(30.0, gt=0)
    result_ttl_seconds: int = Field(86_400, ge=1)
    task_timeout_seconds: float = Field(300.0, gt=0)
    reserve_fraction: float = Field(0.1, ge=0, lt=1)
    # None: one second of a minute's requests, 5 % of its tokens (limiter.Budget.from_rates)
    burst_fraction: float | None = Field(None, gt=0, lt=1)
    circuit_failures: int = Field(5, ge=1)
    circuit_open_seconds: float = Field(30.0, gt=0)
    log_level: str = "INFO"


_ENV_FIELDS = {
    c.ENV_POOL: "pool",
    c.ENV_NAMESPACE: "namespace",
    c.ENV_POD_NAME: "pod_name",
    c.ENV_REDIS_URL: "redis_url",
    c.ENV_REDIS_PASSWORD: "redis_password",
    c.ENV_BUDGET: "budget",
    c.ENV_REQUESTS_PER_MINUTE: "requests_per_minute",
    c.ENV_REQUESTS_PER_HOUR: "requests_per_hour",
    c.ENV_TOKENS_PER_MINUTE: "tokens_per_minute",
    c.ENV_QUEUE_MAX_DEPTH: "queue_max_depth",
    c.ENV_LLM_BASE_URL: "llm_base_url",
    c.ENV_LLM_API_KEY: "llm_api_key",
    c.ENV_LLM_MODEL: "llm_model",
    c.ENV_LLM_HTTP2: "llm_http2",
    c.ENV_HTTP_PORT: "http_port",
    c.ENV_HTTP_BIND: "http_bind",
    c.ENV_AGENT_TOKEN: "agent_token",
    c.ENV_CONCURRENCY: "concurrency",
    c.ENV_DRAIN_GRACE_SECONDS: "drain_grace_seconds",
    c.ENV_MAX_ATTEMPTS: "max_attempts",
    c.ENV_CLAIM_IDLE_SECONDS: "claim_idle_seconds",
    c.ENV_RESULT_TTL_SECONDS: "result_ttl_seconds",
    ENV_TASK_TIMEOUT_SECONDS: "task_timeout_seconds",
    ENV_RESERVE_FRACTION: "reserve_fraction",
    ENV_BURST_FRACTION: "burst_fraction",
    ENV_CIRCUIT_FAILURES: "circuit_failures",
    ENV_CIRCUIT_OPEN_SECONDS: "circuit_open_seconds",
    ENV_LLM_MAX_RETRIES: "llm_max_retries",
    ENV_LLM_CACHE_ENTRIES: "llm_cache_entries",
    ENV_LOG_LEVEL: "log_level",
}


class SettingsError(ValueError):
    pass


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> AgentSettings:
    """Read settings from the environment; errors name the variable, never its (maybe secret) value."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {field: env[name] for name, field in _ENV_FIELDS.items() if env.get(name)}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AgentSettings.model_validate(values)
    except ValidationError as exc:
        by_field = {field: name for name, field in _ENV_FIELDS.items()}
        problems = [
            f"{by_field.get(str(e['loc'][0]), e['loc'][0]) if e['loc'] else 'settings'}: {e['msg']}"
            for e in exc.errors()
        ]
        raise SettingsError("invalid agent settings: " + "; ".join(problems)) from None
