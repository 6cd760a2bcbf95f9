"""``finetune-job``: the combined command line, above both layers.

The training side's subcommands (``job.cli``: train, prepare, evaluate, predict, export)
and the Kubernetes side's (``deploy.cli``: submit, wait, status, logs, delete, list) under
one parser and one error guard. ``job`` never imports ``deploy``; this module joins them.
Neither half loads MXNet or kubernetes until one of its subcommands runs, so a client-only
install (``pip install 'finetune-job[deploy]'``) has a working ``finetune-job`` too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from deploy import cli as deploy_cli
from job import cli as job_cli


def build_parser() -> argparse.ArgumentParser:
    return job_cli.build_parser(deploy_cli.register)


def main(argv: Sequence[str] | None = None) -> int:
    return job_cli.main(argv, build_parser)


if __name__ == "__main__":
    sys.exit(main())
