"""``finetune-job submit | status | logs | delete | list``: MPIJobs from pipelines.

``job.cli`` calls :func:`register` to add these subcommands to ``finetune-job``.

Exit codes (a pipeline can branch on them)::

    0  succeeded: submitted (without --wait), or the run succeeded and passed the gate;
       status: the job exists and has not failed; logs, delete, list: done
    1  failed: the MPIJob failed, or it succeeded but failed the gate (--min-accuracy,
       --not-worse, --max-class-drop; `latest` is left alone), or the API / storage
       failed unexpectedly
    2  timed out: --timeout passed first (the MPIJob keeps running)
    3  bad input: bad values or --set, unknown job (404), name taken (409), permission
       denied (403), no usable kubeconfig; nothing was changed

Every error is one line on stderr: ``finetune-job: error: ...``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import yaml

from deploy import constants as c
from deploy import manifest, retrain
from deploy.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_SUCCEEDED,
    DeployError,
    GateError,
    JobFailedError,
)
from job.errors import InputError, JobError

SUBMIT_EXAMPLE = """example:
  finetune-job submit --values prod.yaml --set training.epochs=5 --wait --timeout 21600 \\
      --min-accuracy 0.9 --not-worse
  finetune-job submit --values prod.yaml --set training.pretrained=s3://b/flowers/latest \\
      --follow
  finetune-job submit --values prod.yaml --dry-run      # print the MPIJob and ConfigMap

Each run writes to <training.output>/runs/<run name>/. With --wait, a run that succeeds and
passes the gate becomes <training.output>/latest; its summary.json is printed.
Exit codes: 0 succeeded, 1 failed (job or gate), 2 timed out, 3 bad input.
"""
STATUS_EXAMPLE = """example:
  finetune-job status finetune-job-20240601-030000-x7k2 -n ml
  finetune-job status finetune-job-20240601-030000-x7k2 --output json
"""
LOGS_EXAMPLE = """example:
  finetune-job logs finetune-job-20240601-030000-x7k2 --follow
  finetune-job logs finetune-job-20240601-030000-x7k2 --save launcher.log
"""
DELETE_EXAMPLE = """example:
  finetune-job delete finetune-job-20240601-030000-x7k2 -n ml
"""
LIST_EXAMPLE = """example:
  finetune-job list -n ml
  finetune-job list --selector finetune-job/schedule=finetune-job
"""


def register(sub: Any) -> None:
    """Add submit, status, logs, delete and list to the ``finetune-job`` subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "submit",
        help="submit a fine-tuning MPIJob (and wait for it)",
        epilog=SUBMIT_EXAMPLE,
        formatter_class=fmt,
    )
    p.add_argument(
        "--values",
        "-f",
        action="append",
        default=[],
        metavar="FILE",
        help="chart values file (repeatable; later wins)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one value, e.g. training.epochs=5 (VALUE read as YAML; repeatable)",
    )
    p.add_argument("--name-prefix", default="", help="run name prefix (default: full name)")
    p.add_argument(
        "--release",
        default=manifest.CHART,
        help="release name for names and labels (values 'release' wins)",
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
        default=24 * 3600.0,
        metavar="SECONDS",
        help="give up waiting after this long (default: 86400)",
    )
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
    _cluster_args(p)
    p.set_defaults(func=submit)

    p = sub.add_parser(
        "status",
        help="phase and conditions of an MPIJob",
        epilog=STATUS_EXAMPLE,
        formatter_class=fmt,
    )
    p.add_argument("name", help="MPIJob name")
    p.add_argument("--output", "-o", choices=("text", "json"), default="text")
    _cluster_args(p)
    p.set_defaults(func=status)

    p = sub.add_parser(
        "logs", help="the launcher's log of an MPIJob", epilog=LOGS_EXAMPLE, formatter_class=fmt
    )
    p.add_argument("name", help="MPIJob name")
    p.add_argument("--follow", action="store_true", help="stream until the launcher ends")
    p.add_argument("--tail", type=int, default=None, metavar="N", help="last N lines only")
    p.add_argument("--save", default="", metavar="URI", help="also write it here (path or s3://)")
    p.add_argument(
        "--timeout",
        type=float,
        default=24 * 3600.0,
        metavar="SECONDS",
        help="with --follow: stop after this long",
    )
    _cluster_args(p)
    p.set_defaults(func=logs)

    p = sub.add_parser(
        "delete",
        help="delete an MPIJob (its pods and ConfigMap go with it)",
        epilog=DELETE_EXAMPLE,
        formatter_class=fmt,
    )
    p.add_argument("name", help="MPIJob name")
    _cluster_args(p)
    p.set_defaults(func=delete)

    p = sub.add_parser(
        "list",
        help="this chart's MPIJobs in the namespace",
        epilog=LIST_EXAMPLE,
        formatter_class=fmt,
    )
    p.add_argument(
        "--selector", "-l", default=f"{c.NAME_LABEL}={c.APP_NAME}", help="label selector"
    )
    _cluster_args(p)
    p.set_defaults(func=list_jobs)


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


def guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Known failures become one stderr line and the documented exit code."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except DeployError as e:
            return _fail(e, e.exit_code)
        except InputError as e:
            return _fail(e, EXIT_BAD_INPUT)
        except JobError as e:
            return _fail(e, EXIT_FAILED)

    return run


def _fail(e: Exception, code: int) -> int:
    print(f"finetune-job: error: {e}", file=sys.stderr)
    return code


def _client(args: argparse.Namespace) -> Any:
    from deploy.client import MPIJobClient

    return MPIJobClient(args.namespace, kubeconfig=args.kubeconfig, context=args.context)


def _storage(values: dict[str, Any]) -> Any:
    from job.storage import S3Settings, Storage

    s3 = values.get("s3") or {}
    return Storage(S3Settings(endpoint_url=s3.get("endpoint") or "", region=s3.get("region") or ""))


def _note(msg: str) -> None:
    print(f"finetune-job: {msg}", file=sys.stderr)


@guarded
def submit(args: argparse.Namespace) -> int:
    values = manifest.load_values(args.values, args.set)
    release = manifest.Release.of(values, name=args.release)
    storage = _storage(values)
    pretrained = str(values["training"].get("pretrained") or "")
    resolved = None
    if pretrained and retrain.is_latest_uri(pretrained):
        resolved = retrain.resolve_pretrained(pretrained, storage, if_missing=args.first_pretrained)
        _note(f"pretrained {pretrained} -> {resolved}")
    run = manifest.build_run(
        values, release, schedule=args.schedule, prefix=args.name_prefix, pretrained=resolved
    )
    if args.dry_run:
        print(yaml.safe_dump_all([run.mpijob, run.config_map], sort_keys=False), end="")
        return EXIT_SUCCEEDED
    client = _client(args)
    client.submit(run.mpijob, run.config_map)
    _note(f"submitted MPIJob {client.namespace}/{run.name}; output {run.output}")
    if not (args.wait or args.follow):
        print(run.name)  # stdout: the name alone; with --wait, stdout is the summary JSON
        return EXIT_SUCCEEDED
    return _wait_and_gate(args, client, storage, values, run)


def _wait_and_gate(
    args: argparse.Namespace, client: Any, storage: Any, values: dict[str, Any], run: manifest.Run
) -> int:
    deadline = time.monotonic() + args.timeout
    if args.follow:
        client.follow_logs(run.name, sys.stdout, deadline)
    try:
        client.wait(
            run.name,
            max(0.0, deadline - time.monotonic()),
            on_change=lambda s: _note(f"MPIJob {s.describe()}"),
        )
    except JobFailedError:
        _save_logs(client, storage, run)
        _cleanup(args, client, run.name)
        raise
    _save_logs(client, storage, run)
    _cleanup(args, client, run.name)
    max_drop = args.max_class_drop
    if max_drop is None:
        max_drop = float(values["training"].get("max_class_drop") or 0.0)
    gate = retrain.Gate(args.min_accuracy, args.not_worse, max_drop)
    root = str(values["training"]["output"])
    try:
        summary, pointer = retrain.finish_run(storage, root, run.name, gate)
    except GateError as e:
        if e.summary is not None:
            print(json.dumps(e.summary, indent=2, sort_keys=True))
        raise
    print(json.dumps(summary, indent=2, sort_keys=True))
    _note(f"{retrain.LATEST} -> {pointer['run']} ({retrain.METRIC} {pointer[retrain.METRIC]:.4f})")
    return EXIT_SUCCEEDED


def _save_logs(client: Any, storage: Any, run: manifest.Run) -> None:
    """Keep the launcher's log next to the run's output before anything is cleaned up."""
    from job.storage import join

    uri = join(run.output, "launcher.log")
    try:
        storage.write_bytes(uri, client.logs(run.name).encode())
        _note(f"launcher log saved to {uri}")
    except (DeployError, JobError) as e:
        _note(f"warning: launcher log not saved: {e}")


def _cleanup(args: argparse.Namespace, client: Any, name: str) -> None:
    if args.delete_after:
        client.delete(name)


@guarded
def status(args: argparse.Namespace) -> int:
    state = _client(args).status(args.name)
    if args.output == "json":
        print(json.dumps(state.to_dict(), indent=2))
    else:
        print(state.describe())
        for cond in state.conditions:
            print(
                f"  {cond.type:<10} {cond.status:<5} {cond.last_transition_time:<20} "
                f"{cond.reason}: {cond.message}".rstrip(": ")
            )
        if state.output:
            print(f"  output: {state.output}")
    return EXIT_FAILED if state.failed else EXIT_SUCCEEDED


@guarded
def logs(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.follow:
        client.follow_logs(args.name, sys.stdout, time.monotonic() + args.timeout)
        return EXIT_SUCCEEDED
    text = client.logs(args.name, tail_lines=args.tail)
    sys.stdout.write(text)
    if args.save:
        from job.storage import Storage

        Storage().write_bytes(args.save, text.encode())
        _note(f"saved to {args.save}")
    return EXIT_SUCCEEDED


@guarded
def delete(args: argparse.Namespace) -> int:
    client = _client(args)
    client.delete(args.name)
    _note(f"deleted MPIJob {client.namespace}/{args.name}")
    return EXIT_SUCCEEDED


@guarded
def list_jobs(args: argparse.Namespace) -> int:
    for state in _client(args).list_jobs(args.selector):
        print(f"{state.name:<52} {state.phase:<10} {state.schedule or '-':<20} {state.created}")
    return EXIT_SUCCEEDED
