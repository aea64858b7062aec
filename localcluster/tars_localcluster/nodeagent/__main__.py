"""`python -m tars_localcluster.nodeagent`: run the node agent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import yaml

from tars_localcluster.config import ClusterConfig, read_versions
from tars_localcluster.nodeagent.agent import NodeAgent


def parse_args(argv: list[str]) -> argparse.Namespace:
    cfg = ClusterConfig.default()
    parser = argparse.ArgumentParser(prog="tars-node-agent", description=__doc__)
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--node-name", default=cfg.node_name)
    parser.add_argument("--state-dir", type=Path, default=cfg.root / "node")
    parser.add_argument("--scrape-targets-file", type=Path, help="Prometheus file_sd output")
    parser.add_argument("--health-port", type=int, default=cfg.node_agent_health_port)
    parser.add_argument(
        "--image-commands",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "image-commands.yaml",
        help="YAML map of image (or repository) to the local command run for containers that set no command",
    )
    # The kubelet starts at 10s and caps at 300s; a test cluster wants faster feedback.
    parser.add_argument("--restart-backoff-base", type=float, default=1.0)
    parser.add_argument("--restart-backoff-max", type=float, default=30.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per status patch is noise
    if os.geteuid() != 0:
        sys.exit("tars node agent: needs root to create network namespaces and memory cgroups")
    image_commands: dict[str, list[str]] = {}
    if args.image_commands.exists():
        image_commands = yaml.safe_load(args.image_commands.read_text()) or {}
    cfg = ClusterConfig.default()
    cfg = ClusterConfig(root=cfg.root, node_name=args.node_name)
    agent = NodeAgent(
        cfg=cfg,
        kubeconfig=args.kubeconfig,
        state_dir=args.state_dir,
        health_port=args.health_port,
        image_commands=image_commands,
        backoff_base=args.restart_backoff_base,
        backoff_max=args.restart_backoff_max,
        kubernetes_version=read_versions()["KUBERNETES_VERSION"],
        scrape_targets_file=args.scrape_targets_file,
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
