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
    args = parser.parse_args(argv)
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
    )
