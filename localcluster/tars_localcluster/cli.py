"""`tars-localcluster up|down|env|status`: the local Kubernetes cluster."""

from __future__ import annotations

import argparse
import sys

from tars_localcluster.cluster import Cluster, env_lines
from tars_localcluster.config import ClusterConfig
from tars_localcluster.procs import exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tars-localcluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build (first time) and start the cluster; idempotent")
    up.add_argument("--no-build", action="store_true", help="use the binaries already in the cache")
    sub.add_parser("down", help="stop everything and remove pods' network namespaces and cgroups")
    sub.add_parser("env", help="print shell exports for the running cluster")
    sub.add_parser("status", help="show which daemons run; exit 1 unless all do")
    demo = sub.add_parser(
        "demo", help="up + the operator + a pool of real agents working through a burst of tasks"
    )
    demo.add_argument("--tasks", type=int, default=120)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from tars_localcluster import demo as demo_module  # imports the agent's client: only here

        return demo_module.main([f"--tasks={args.tasks}"])
    cluster = Cluster(ClusterConfig.default())

    def command() -> int:
        if args.command == "up":
            cluster.up(build=not args.no_build)
        elif args.command == "down":
            cluster.down()
        elif args.command == "env":
            print("\n".join(env_lines(cluster.cfg)))
        elif args.command == "status":
            for name, pid in cluster.status().items():
                print(f"{name:<24} {'running (pid ' + str(pid) + ')' if pid else 'stopped'}")
            return 0 if cluster.is_up() else 1
        return 0

    return exit_code("cluster", command)


if __name__ == "__main__":
    sys.exit(main())
