"""``finetune-job submit | wait | status | logs | delete | list``: runs (MPIJobs or TrainJobs)
from pipelines.

``deploy.entry`` calls :func:`register` to add these subcommands to ``finetune-job``, whose
one guard (``job.cli.run_guarded``) turns their errors into one line and an exit code. This
module declares their arguments; ``deploy.commands`` runs them and prints. Nothing here
imports the kubernetes package until a subcommand talks to a cluster.

``submit`` starts from the MPIJob that Helm rendered (``--from-manifest``, or ``helm
template`` of ``--chart`` with ``--values``/``--set``) and changes only the run's fields
(see ``deploy.manifest``). Exit codes: the one table, ``job.exitcodes`` (README, "Exit
codes"). Every error is one line on stderr: ``finetune-job: error: ...``.
"""

from __future__ import annotations

import argparse
from typing import Any

from deploy import commands, manifest
from deploy import constants as c
from job.exitcodes import ExitCode

SUBMIT_EXAMPLE = """example:
  finetune-job submit --from-manifest flowers.yaml --wait --timeout 21600 \\
      --min-accuracy 0.9 --not-worse      # flowers.yaml: helm template flowers CHART -f prod.yaml
  finetune-job submit --values prod.yaml --set training.epochs=5 --follow   # runs helm template
  finetune-job submit --from-manifest flowers.yaml --dry-run   # print the run's objects

The MPIJob is the one Helm rendered; submit changes only the run's name, labels, output and
ConfigMap. Each run writes to <training.output>/runs/<run name>/. With --wait, a run that
succeeds and passes the gate becomes <training.output>/latest; its summary.json is printed.
"""


def exit_codes_epilog() -> str:
    """The exit-code line of the help, from the one table."""
    codes = ", ".join(f"{int(e)} {e.name.lower().replace('_', ' ')}" for e in ExitCode)
    return f'exit codes (README, "Exit codes"): {codes}\n'


STATUS_EXAMPLE = """example:
  finetune-job status finetune-job-20240601-030000-x7k2 -n ml
  finetune-job status finetune-job-20240601-030000-x7k2 --output json
"""
LOGS_EXAMPLE = """example:
  finetune-job logs finetune-job-20240601-030000-x7k2 --follow
  finetune-job logs finetune-job-20240601-030000-x7k2 --save launcher.log
  finetune-job logs finetune-job-20240601-030000-x7k2 --all-pods    # every launcher attempt
  finetune-job logs finetune-job-20240601-030000-x7k2 --previous    # before the last restart
"""
WAIT_EXAMPLE = """example:
  finetune-job wait finetune-job-20240601-030000-x7k2 --timeout 21600
  finetune-job wait finetune-job-20240601-030000-x7k2 --start-timeout 600

Exit codes: 0 succeeded, 1 failed (or a pod cannot start), 2 timed out, 3 bad input.
"""
DELETE_EXAMPLE = """example:
  finetune-job delete finetune-job-20240601-030000-x7k2 -n ml
"""
LIST_EXAMPLE = """example:
  finetune-job list -n ml
  finetune-job list -o wide
  finetune-job list -o json | jq -r '.[] | select(.phase == "Failed") | .name'
  finetune-job list --selector finetune-job/schedule=finetune-job
"""


def register(sub: Any) -> None:
    """Add submit, status, logs, delete and list to the ``finetune-job`` subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "submit",
        help="submit a fine-tuning run, an MPIJob or a TrainJob (and wait for it)",
        epilog=SUBMIT_EXAMPLE + exit_codes_epilog(),
        formatter_class=fmt,
    )
    p.add_argument(
        "--from-manifest",
        default="",
        metavar="FILE",
        help="the run as Helm rendered it (the MPIJob and its config ConfigMap, or the "
        "TrainJob with its TrainingRuntime): `helm template` output, multi-document YAML "
        "('-': standard input)",
    )
    p.add_argument(
        "--values",
        "-f",
        action="append",
        default=[],
        metavar="FILE",
        help="without --from-manifest: chart values file for `helm template` (repeatable)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="without --from-manifest: one chart value for `helm template`, e.g. "
        "training.epochs=5 (repeatable)",
    )
    p.add_argument(
        "--chart",
        default=manifest.default_chart(),
        metavar="DIR|URL",
        help="the chart `helm template` renders (default: this checkout's charts/finetune-job)",
    )
    p.add_argument("--helm", default="helm", metavar="BINARY", help="the helm command")
    p.add_argument(
        "--name-prefix", default="", help="run name prefix (default: the rendered MPIJob's name)"
    )
    p.add_argument(
        "--release",
        default=manifest.CHART,
        help="with --values/--set: the release name `helm template` renders",
    )
    p.add_argument(
        "--schedule",
        default="",
        help=f"schedule name for the {c.SCHEDULE_LABEL} label (default: {c.MANUAL_SCHEDULE})",
    )
    p.add_argument(
        "--first-pretrained",
        default="zoo",
        metavar="URI",
        help="weights while <root>/latest does not exist yet (default: zoo)",
    )
    p.add_argument("--wait", action="store_true", help="wait until the run ends")
    p.add_argument("--follow", action="store_true", help="stream the launcher log (implies --wait)")
    p.add_argument(
        "--timeout",
        type=float,
        default=c.WAIT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up waiting after this long (default: {c.WAIT_TIMEOUT:g})",
    )
    _stuck_args(p)
    p.add_argument(
        "--min-accuracy",
        type=float,
        default=None,
        metavar="X",
        help="gate: summary val_top1 must reach X to become latest",
    )
    p.add_argument(
        "--not-worse",
        action="store_true",
        help="gate: val_top1 must not be below the current latest's",
    )
    p.add_argument(
        "--max-class-drop",
        type=float,
        default=None,
        metavar="X",
        help="gate: no class's recall may drop more than X vs latest's eval.json "
        "(default: training.max_class_drop; 0: off)",
    )
    p.add_argument(
        "--delete-after",
        action="store_true",
        help="delete the MPIJob once it ended and its logs are saved",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the MPIJob and ConfigMap as YAML; submit nothing",
    )
    p.add_argument(
        "--allow-overlap",
        action="store_true",
        help="with --schedule: start even while a run of the schedule has not finished",
    )
    _cluster_args(p)
    p.set_defaults(func=commands.submit)

    p = sub.add_parser(
        "wait",
        help="wait until a run ends (fail early when its pods cannot start)",
        epilog=WAIT_EXAMPLE,
        formatter_class=fmt,
    )
    p.add_argument("name", help="run name (an MPIJob or a TrainJob)")
    p.add_argument(
        "--timeout",
        type=float,
        default=c.WAIT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up waiting after this long (default: {c.WAIT_TIMEOUT:g})",
    )
    _stuck_args(p)
    _cluster_args(p)
    p.set_defaults(func=commands.wait)

    p = sub.add_parser(
        "status",
        help="phase and conditions of a run",
        epilog=STATUS_EXAMPLE,
        formatter_class=fmt,
    )
    p.add_argument("name", help="run name (an MPIJob or a TrainJob)")
    p.add_argument("--output", "-o", choices=("text", "json"), default="text")
    _cluster_args(p)
    p.set_defaults(func=commands.status)

    p = sub.add_parser(
        "logs", help="the launcher's log of a run", epilog=LOGS_EXAMPLE, formatter_class=fmt
    )
    p.add_argument("name", help="run name (an MPIJob or a TrainJob)")
    p.add_argument("--follow", action="store_true", help="stream until the launcher ends")
    p.add_argument(
        "--previous",
        action="store_true",
        help="the launcher container before its last restart (as kubectl logs --previous)",
    )
    p.add_argument(
        "--all-pods",
        action="store_true",
        help="every launcher pod of the run (one per attempt), oldest first, each after a "
        "line naming it",
    )
    p.add_argument("--tail", type=int, default=None, metavar="N", help="last N lines only")
    p.add_argument("--save", default="", metavar="URI", help="also write it here (path or s3://)")
    p.add_argument(
        "--timeout",
        type=float,
        default=c.WAIT_TIMEOUT,
        metavar="SECONDS",
        help="with --follow: stop after this long",
    )
    _stuck_args(p)
    _cluster_args(p)
    p.set_defaults(func=commands.logs)

    p = sub.add_parser(
        "delete",
        help="delete a run (its pods and ConfigMap go with it)",
        epilog=DELETE_EXAMPLE,
        formatter_class=fmt,
    )
    p.add_argument("name", help="run name (an MPIJob or a TrainJob)")
    _cluster_args(p)
    p.set_defaults(func=commands.delete)

    p = sub.add_parser(
        "list",
        help="this chart's runs (MPIJobs and TrainJobs) in the namespace",
        epilog=LIST_EXAMPLE,
        formatter_class=fmt,
    )
    p.add_argument(
        "--selector", "-l", default=f"{c.NAME_LABEL}={c.APP_NAME}", help="label selector"
    )
    p.add_argument(
        "--output",
        "-o",
        choices=("text", "wide", "json"),
        default="text",
        help="text: a table with a header; wide: more columns; json: a list of objects",
    )
    _cluster_args(p)
    p.set_defaults(func=commands.list_jobs)


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--namespace",
        "-n",
        default=None,
        help="namespace (default: the pod's, or the kubeconfig context's)",
    )
    p.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig file (default: in-cluster, then $KUBECONFIG, ~/.kube/config)",
    )
    p.add_argument("--context", default=None, help="kubeconfig context")


def _stuck_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--start-timeout",
        type=float,
        default=c.START_TIMEOUT,
        metavar="SECONDS",
        help="fail when a pod of the run cannot start for this long: image pull errors, a "
        "missing Secret, ConfigMap or ServiceAccount, a volume that does not mount "
        f"(default: {c.START_TIMEOUT:g}; 0: never)",
    )
    p.add_argument(
        "--unschedulable-timeout",
        type=float,
        default=c.UNSCHEDULABLE_TIMEOUT,
        metavar="SECONDS",
        help="fail when no node fits a pod of the run for this long "
        f"(default: {c.UNSCHEDULABLE_TIMEOUT:g}; 0: never)",
    )
