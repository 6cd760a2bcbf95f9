"""``finetune-job submit | wait | status | logs | delete | list``: runs (MPIJobs or TrainJobs)
from pipelines.

``deploy.entry`` calls :func:`register` to add these subcommands to ``finetune-job``, whose
one guard (``job.cli.run_guarded``) turns their errors into one line and an exit code.
Nothing here imports the kubernetes package until a subcommand talks to a cluster.

``submit`` starts from the MPIJob that Helm rendered (``--from-manifest``, or ``helm
template`` of ``--chart`` with ``--values``/``--set``) and changes only the run's fields
(see ``deploy.manifest``). Exit codes: the one table, ``job.exitcodes`` (README, "Exit
codes"). Every error is one line on stderr: ``finetune-job: error: ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import yaml

from deploy import constants as c
from deploy import kinds, manifest
from deploy import schedule as schedule_mod
from deploy.errors import BadInputError, DeployError, JobFailedError, JobTimeoutError
from deploy.status import StuckBounds
from job import layout, registry
from job import storage as st
from job.errors import GateError, JobError
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
    p.set_defaults(func=submit)

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
    p.set_defaults(func=wait)

    p = sub.add_parser(
        "status",
        help="phase and conditions of a run",
        epilog=STATUS_EXAMPLE,
        formatter_class=fmt,
    )
    p.add_argument("name", help="run name (an MPIJob or a TrainJob)")
    p.add_argument("--output", "-o", choices=("text", "json"), default="text")
    _cluster_args(p)
    p.set_defaults(func=status)

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
    p.set_defaults(func=logs)

    p = sub.add_parser(
        "delete",
        help="delete a run (its pods and ConfigMap go with it)",
        epilog=DELETE_EXAMPLE,
        formatter_class=fmt,
    )
    p.add_argument("name", help="run name (an MPIJob or a TrainJob)")
    _cluster_args(p)
    p.set_defaults(func=delete)

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


def _bounds(args: argparse.Namespace) -> StuckBounds:
    for flag, value in (
        ("--start-timeout", args.start_timeout),
        ("--unschedulable-timeout", args.unschedulable_timeout),
    ):
        if not math.isfinite(value) or value < 0:
            raise BadInputError(f"{flag} must be a number of seconds >= 0 (got {value:g})")
    return StuckBounds(start=args.start_timeout, unschedulable=args.unschedulable_timeout)


def _client(args: argparse.Namespace, kind: kinds.Kind | None = None) -> Any:
    from deploy.client import MPIJobClient

    return MPIJobClient(args.namespace, kubeconfig=args.kubeconfig, context=args.context, kind=kind)


def _storage(rendered: manifest.Rendered) -> Any:
    """Storage reaching S3 as the run's pods do (credentials: the standard AWS chain)."""
    from job.storage import S3Settings, Storage

    endpoint, region = manifest.s3_endpoint_and_region(rendered)
    return Storage(S3Settings(endpoint_url=endpoint, region=region))


def _rendered(args: argparse.Namespace) -> manifest.Rendered:
    """What Helm rendered: the given manifest, or `helm template` of the chart now."""
    if args.from_manifest:
        if args.values or args.set:
            raise BadInputError(
                "--values/--set go to `helm template`; with --from-manifest the manifest is "
                "used as rendered (render it again with those values)"
            )
        return manifest.read(args.from_manifest)
    return manifest.render(
        args.chart, args.release, args.values, args.set, namespace=args.namespace, helm=args.helm
    )


def _note(msg: str) -> None:
    print(f"finetune-job: {msg}", file=sys.stderr)


def submit(args: argparse.Namespace) -> int:
    _bounds(args)  # bad input, found before anything is submitted
    drop = args.max_class_drop
    if drop is not None and not 0 <= drop <= 1:  # not-a-number fails this too
        raise BadInputError(f"--max-class-drop must be a recall drop in [0, 1] (got {drop:g})")
    rendered = _rendered(args)
    storage = _storage(rendered)
    # Of the rendered kind only: a schedule's runs are all of it, and the CronJob's Role
    # grants that kind alone.
    client = None if args.dry_run else _client(args, kinds.of(rendered.job))
    predecessor = _single_flight(args, client, storage)
    pretrained = str(rendered.training.get("pretrained") or "")
    resolved = resume_from = None
    if predecessor is not None:  # the failed run's own start, so the fingerprints agree
        resume_from, resolved = predecessor
        _note(f"resuming the failed run in {resume_from} (pretrained {resolved})")
    elif pretrained and registry.is_latest_uri(pretrained):
        resolved = registry.resolve_pretrained(
            pretrained, storage, if_missing=args.first_pretrained
        )
        _note(f"pretrained {pretrained} -> {resolved}")
    run = manifest.build_run(
        rendered,
        schedule=args.schedule,
        prefix=args.name_prefix,
        pretrained=resolved,
        resume_from=resume_from,
    )
    if args.wait or args.follow:  # the run stops by itself when this submit gives up
        schedule_mod.cap_deadline(run.job, args.timeout)
    if client is None:
        objects = [run.job] + ([run.config_map] if run.config_map else [])
        print(yaml.safe_dump_all(objects, sort_keys=False), end="")
        return ExitCode.OK
    client.submit(run.job, run.config_map)
    _note(f"submitted {run.job['kind']} {client.namespace}/{run.name}; output {run.output}")
    if not (args.wait or args.follow):
        print(run.name)  # stdout: the name alone; with --wait, stdout is the summary JSON
        return ExitCode.OK
    root = str(rendered.training["output"])
    max_drop = args.max_class_drop
    if max_drop is None:  # the CronJob's form: the chart's training values carry it
        max_drop = float(rendered.training.get("max_class_drop") or 0.0)
    gate = registry.Gate(args.min_accuracy, args.not_worse, max_drop)
    return _wait_and_gate(args, client, storage, root, run, gate)


def _single_flight(args: argparse.Namespace, client: Any, storage: Any) -> tuple[str, str] | None:
    """For a scheduled submit: refuse while the schedule's last run is unfinished, and find
    a failed predecessor to resume ((output, pretrained), or None)."""
    schedule = manifest.label_value(args.schedule)
    if client is None or not schedule:
        return None
    if not args.allow_overlap:
        schedule_mod.refuse_overlap(client, schedule)
    return schedule_mod.resumable_predecessor(client, storage, schedule)


def _wait_and_gate(
    args: argparse.Namespace,
    client: Any,
    storage: Any,
    root: str,
    run: manifest.Run,
    gate: registry.Gate,
) -> int:
    deadline = time.monotonic() + args.timeout
    if args.follow:
        for line in client.logs(run.name, follow=True, timeout=args.timeout, stuck=_bounds(args)):
            print(line, flush=True)
    try:
        client.wait(
            run.name,
            max(0.0, deadline - time.monotonic()),
            on_change=lambda s: _note(f"{s.kind} {s.describe()}"),
            stuck=_bounds(args),
        )
    except JobTimeoutError as e:
        left = schedule_mod.cap_deadline(run.job, args.timeout)  # as submitted
        raise JobTimeoutError(
            f"{e}; left running: {run.job['kind']} {client.namespace}/{run.name} "
            f"(output {run.output}), "
            f"ungated; its activeDeadlineSeconds {left} stops it at the latest; "
            f"`finetune-job delete {run.name}` stops it now"
        ) from e
    except JobFailedError:
        _save_logs(client, storage, run)
        _cleanup(args, client, run.name)
        raise
    _save_logs(client, storage, run)
    _cleanup(args, client, run.name)
    try:
        summary, pointer = registry.finish_run(storage, root, run.name, gate)
    except GateError as e:
        if e.summary is not None:
            print(json.dumps(e.summary, indent=2, sort_keys=True))
        raise
    print(json.dumps(summary, indent=2, sort_keys=True))
    metric = registry.METRIC
    _note(f"{registry.LATEST} -> {pointer['run']} ({metric} {pointer[metric]:.4f})")
    return ExitCode.OK


def _save_logs(client: Any, storage: Any, run: manifest.Run) -> None:
    """Keep the launcher's log next to the run's output before anything is cleaned up."""
    uri = st.join(run.output, layout.LAUNCHER_LOG)
    try:  # every launcher attempt: the earlier ones say why the launcher was restarted
        storage.write_bytes(uri, client.launcher_log_text(run.name).encode())
        _note(f"launcher log saved to {uri}")
    except (DeployError, JobError) as e:
        _note(f"warning: launcher log not saved: {e}")


def _cleanup(args: argparse.Namespace, client: Any, name: str) -> None:
    if args.delete_after:
        client.delete(name)


def wait(args: argparse.Namespace) -> int:
    client = _client(args)
    state = client.wait(
        args.name,
        args.timeout,
        on_change=lambda s: _note(f"{s.kind} {s.describe()}"),
        stuck=_bounds(args),
    )
    print(state.describe())
    return ExitCode.OK


def status(args: argparse.Namespace) -> int:
    client = _client(args)
    state = client.status(args.name)
    problems = _problems(client, args.name) if not state.finished else []
    if args.output == "json":
        doc = state.to_dict()
        doc["problems"] = [
            {k: getattr(p, k) for k in ("subject", "pod", "container", "reason", "message")}
            for p in problems
        ]
        print(json.dumps(doc, indent=2))
    else:
        print(state.describe())
        for cond in state.conditions:
            print(
                f"  {cond.type:<10} {cond.status:<5} {cond.last_transition_time:<20} "
                f"{cond.reason}: {cond.message}".rstrip(": ")
            )
        for p in problems:  # what the conditions do not say: pods that cannot start
            print(f"  cannot start: {p.subject}: {p.reason}: {p.message}".rstrip(": "))
        if state.output:
            print(f"  output: {state.output}")
    return JobFailedError.exit_code if state.failed else ExitCode.OK


def _problems(client: Any, name: str) -> list[Any]:
    """The run's pods that cannot start; none when this identity may not list pods."""
    try:
        problems: list[Any] = client.problems(name)
    except DeployError as e:
        _note(f"warning: pods of {client.namespace}/{name} not checked: {e}")
        return []
    return problems


def logs(args: argparse.Namespace) -> int:
    client = _client(args)
    lines: list[str] = []

    def emit(line: str) -> None:
        print(line, flush=args.follow)
        if args.save:
            lines.append(line)

    pods = client.launcher_pod_names(args.name) if args.all_pods else []
    for i, pod in enumerate(pods[:-1] if args.follow else pods, 1):
        emit(_header(pod, i, len(pods)))
        for line in client.logs(args.name, pod=pod, previous=args.previous, tail_lines=args.tail):
            emit(line)
    if not args.all_pods or args.follow or not pods:  # no pod: say so, as without
        if pods:
            emit(_header(pods[-1], len(pods), len(pods)))
        for line in client.logs(
            args.name,
            follow=args.follow,
            previous=args.previous,
            tail_lines=args.tail,
            timeout=args.timeout,
            stuck=_bounds(args),
        ):
            emit(line)
    if args.save:
        from job.storage import Storage

        Storage().write_bytes(args.save, "".join(line + "\n" for line in lines).encode())
        _note(f"saved to {args.save}")
    return ExitCode.OK


def _header(pod: str, attempt: int, attempts: int) -> str:
    from deploy.client import pod_header

    return pod_header(pod, attempt, attempts)


def delete(args: argparse.Namespace) -> int:
    client = _client(args)
    client.delete(args.name)
    _note(f"deleted {client.kind_of(args.name).name} {client.namespace}/{args.name}")
    return ExitCode.OK


LIST_COLUMNS = ("NAME", "PHASE", "SCHEDULE", "CREATED")
WIDE_COLUMNS = (*LIST_COLUMNS, "COMPLETED", "REASON", "OUTPUT", "KIND")


def list_jobs(args: argparse.Namespace) -> int:
    client = _client(args)
    states = client.list_jobs(args.selector)
    if args.output == "json":
        print(json.dumps([s.to_dict() for s in states], indent=2))
        return ExitCode.OK
    if not states:  # as kubectl: a note on stderr, stdout stays empty
        _note(f"no MPIJobs or TrainJobs in namespace {client.namespace} match {args.selector}")
        return ExitCode.OK
    columns = WIDE_COLUMNS if args.output == "wide" else LIST_COLUMNS
    rows = [
        (s.name, s.phase, s.schedule, s.created, s.completed, s.reason, s.output, s.kind)[
            : len(columns)
        ]
        for s in states
    ]
    print(_table(columns, rows))
    return ExitCode.OK


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Columns as wide as their widest cell, two spaces apart; '-' for an empty cell."""
    cells = [header, *[tuple(v or "-" for v in row) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )
