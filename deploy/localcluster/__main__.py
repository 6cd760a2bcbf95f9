"""``python -m deploy.localcluster {build,up,down,status,load,readme}``: what `make cluster`
runs."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from deploy.localcluster import build, cluster, components, node
from job.exitcodes import ExitCode

DEFAULT_STATE = Path(".cluster")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.localcluster",
        description="A local Kubernetes control plane with the MPI Operator, Kueue and kwok "
        "nodes, and on request a real node (kubelet, containerd, CoreDNS) that runs pods.",
    )
    parser.add_argument(
        "command",
        choices=("build", "up", "down", "status", "load", "readme"),
        help="build the binaries (once); start or stop the cluster; show it; load an image "
        "from podman into the real node; regenerate README.md's versions table",
    )
    parser.add_argument(
        "image", nargs="?", help="for load: the image in podman's store, e.g. localhost/x:tag"
    )
    parser.add_argument(
        "--real-node",
        action="store_true",
        help="for up: add a real node (kubelet, Debian's containerd, CoreDNS); its pods run",
    )
    parser.add_argument(
        "--state",
        type=Path,
        default=DEFAULT_STATE,
        help="state folder: pids, logs, kubeconfig (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        if args.command == "build":
            print(f"binaries in {build.build().popitem()[1].parent}")
        elif args.command == "up":
            started = cluster.up(args.state, real_node=args.real_node)
            print(f"cluster up: {started.server}, logs in {started.state / 'logs'}")
            print(f"export KUBECONFIG={started.kubeconfig}")
        elif args.command == "down":
            stopped = cluster.down(args.state)
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        elif args.command == "load":
            if not args.image:
                parser.error("load needs an image")
            running = cluster.load(args.state)
            if running is None or not running.real_node:
                raise cluster.ClusterError(f"no cluster with a real node in {args.state}")
            print(f"loaded {args.image} ({node.load_image(running, args.image)[:19]})")
        elif args.command == "readme":
            readme = Path("README.md")
            readme.write_text(components.render_readme(readme.read_text()))
        else:
            return _status(args.state)
    except (build.BuildError, cluster.ClusterError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return ExitCode.FAILED
    return ExitCode.OK


def _status(state: Path) -> int:
    found = cluster.load(state)
    if found is None:
        print(f"no cluster in {state}")
        return ExitCode.FAILED
    running = found.running()
    for name in found.processes:
        print(
            f"{name:24} {'running' if name in running else 'stopped'}  {found.proc(name).log_file}"
        )
    print(f"binaries in {build.cache_dir() / 'bin'}")
    print(f"export KUBECONFIG={found.kubeconfig.resolve()}")
    return ExitCode.OK if running == list(found.processes) else ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
