"""The operator's settings: flags, with environment variables as defaults,
so `make run` locally and the Deployment in the chart use the same code."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field


@dataclass(frozen=True)
class OperatorSettings:
    kubeconfig: str | None = None  # None: in-cluster service account
    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    prometheus_url: str = "http://prometheus:9090"
    redis_url: str = "redis://redis:6379/0"  # for pools that name none
    metrics_port: int = 9100
    health_port: int = 8081
    leader_election: bool = True
    lease_namespace: str = "default"
    lease_name: str = "tars-operator"
    identity: str = field(default_factory=socket.gethostname)
    log_format: str = "json"  # json: one object per line, for log pipelines; text: for people
    # How the agents' in-flight counts are read: "redis" (what they publish, one MGET per pool;
    # GET /status only for those without a published state) or "http" (GET /status of each).
    agent_state: str = "redis"
    # Secrets come from the environment only (the chart: secretKeyRef), never from flags, and
    # are kept out of repr. The key derives each pool's agent token (security.agent_token).
    agent_token_key: str | None = field(default=None, repr=False)
    redis_password: str | None = field(default=None, repr=False)  # of redis_url's Redis
    # A NetworkPolicy per pool: agents' port reachable from the operator's pods (these labels in
    # operator_namespace) and from the Prometheus namespaces only.
    network_policy: bool = False
    operator_namespace: str = "default"
    operator_pod_labels: tuple[tuple[str, str], ...] = ()
    prometheus_namespaces: tuple[str, ...] = ()


ENV_AGENT_TOKEN_KEY = "TARS_AGENT_TOKEN_KEY"
ENV_REDIS_PASSWORD = "TARS_REDIS_PASSWORD"


def labels(text: str) -> tuple[tuple[str, str], ...]:
    """Parse "k=v,k2=v2" into ((k, v), (k2, v2)); argparse reports a ValueError as a bad value."""
    pairs = [item.partition("=") for item in text.split(",") if item]
    if not pairs or any(not k or not sep or not v for k, sep, v in pairs):
        raise ValueError(text)
    return tuple((k, v) for k, _, v in pairs)


def parse(argv: list[str]) -> OperatorSettings:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="tars-operator", description="The AgentPool operator.")
    parser.add_argument(
        "--kubeconfig", default=env("KUBECONFIG"), help="default: $KUBECONFIG, else in-cluster"
    )
    parser.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable); default: all",
    )
    parser.add_argument(
        "--prometheus-url", default=env("TARS_PROMETHEUS_URL", OperatorSettings.prometheus_url)
    )
    parser.add_argument("--redis-url", default=env("TARS_REDIS_URL", OperatorSettings.redis_url))
    parser.add_argument("--metrics-port", type=int, default=int(env("TARS_METRICS_PORT", "9100")))
    parser.add_argument("--health-port", type=int, default=int(env("TARS_HEALTH_PORT", "8081")))
    parser.add_argument("--no-leader-election", dest="leader_election", action="store_false")
    parser.add_argument(
        "--lease-namespace", default=env("TARS_LEASE_NAMESPACE", env("POD_NAMESPACE", "default"))
    )
    parser.add_argument("--lease-name", default=OperatorSettings.lease_name)
    parser.add_argument("--identity", default=env("POD_NAME", socket.gethostname()))
    parser.add_argument("--log-format", choices=("json", "text"), default=env("TARS_LOG_FORMAT", "json"))
    parser.add_argument(
        "--agent-state",
        choices=("redis", "http"),
        default=env("TARS_AGENT_STATE", OperatorSettings.agent_state),
        help="redis: read the agents' published state from the default Redis, one round trip per "
        "pool (GET /status only for agents without one, and for pools with a Redis of their own); "
        "http: GET /status of every agent every second",
    )
    parser.add_argument(
        "--network-policy",
        action="store_true",
        help="create a NetworkPolicy per pool: ingress to the agents' port only from the operator "
        "(--operator-pod-labels in $POD_NAMESPACE) and the --prometheus-namespace namespaces",
    )
    parser.add_argument(
        "--operator-pod-labels",
        type=labels,
        default=(),
        metavar="K=V,...",
        help="labels that select the operator's own pods (the chart's selector labels)",
    )
    parser.add_argument(
        "--prometheus-namespace",
        action="append",
        default=[],
        help="namespace whose pods may scrape the agents (repeatable)",
    )
    args = parser.parse_args(argv)
    if "@" in args.redis_url:
        # It would be in every agent pod's env: the password goes in $TARS_REDIS_PASSWORD.
        parser.error(f"--redis-url must not contain credentials: set ${ENV_REDIS_PASSWORD} instead")
    if args.network_policy and not args.operator_pod_labels:
        parser.error("--network-policy needs --operator-pod-labels (else it would lock the operator out)")
    return OperatorSettings(
        kubeconfig=args.kubeconfig or None,
        namespaces=tuple(args.namespace),
        prometheus_url=args.prometheus_url,
        redis_url=args.redis_url,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        leader_election=args.leader_election,
        lease_namespace=args.lease_namespace,
        lease_name=args.lease_name,
        identity=args.identity,
        log_format=args.log_format,
        agent_state=args.agent_state,
        agent_token_key=env(ENV_AGENT_TOKEN_KEY) or None,
        redis_password=env(ENV_REDIS_PASSWORD) or None,
        network_policy=args.network_policy,
        operator_namespace=env("POD_NAMESPACE", OperatorSettings.operator_namespace),
        operator_pod_labels=args.operator_pod_labels,
        prometheus_namespaces=tuple(args.prometheus_namespace),
    )
