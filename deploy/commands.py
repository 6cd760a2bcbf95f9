"""The bodies of ``finetune-job submit | wait | status | logs | delete | list``: each takes
the parsed arguments (``deploy.cli`` declares them), calls the client or the submit
workflow (``deploy.submit``) and prints. Errors propagate to the command's one guard.

stdout carries what a pipeline reads (a run's name, its summary JSON, a table or JSON);
progress notes go to stderr as ``finetune-job: ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from deploy import submit as submit_mod
from deploy.errors import DeployError, JobFailedError
from deploy.stuck import StuckBounds
from job.errors import GateError
from job.exitcodes import ExitCode


def _bounds(args: argparse.Namespace) -> StuckBounds:
    bounds = StuckBounds(start=args.start_timeout, unschedulable=args.unschedulable_timeout)
    submit_mod.check_stuck(bounds)
    return bounds


def _client(args: argparse.Namespace) -> Any:
    return submit_mod.client_for(args)


def _note(msg: str) -> None:
    print(f"finetune-job: {msg}", file=sys.stderr)


def submit(args: argparse.Namespace) -> int:
    opts = submit_mod.SubmitOptions(
        from_manifest=args.from_manifest,
        values=tuple(args.values),
        set=tuple(args.set),
        chart=args.chart,
        helm=args.helm,
        release=args.release,
        namespace=args.namespace,
        kubeconfig=args.kubeconfig,
        context=args.context,
        name_prefix=args.name_prefix,
        schedule=args.schedule,
        first_pretrained=args.first_pretrained,
        wait=args.wait,
        follow=args.follow,
        timeout=args.timeout,
        stuck=_bounds(args),
        min_accuracy=args.min_accuracy,
        not_worse=args.not_worse,
        max_class_drop=args.max_class_drop,
        delete_after=args.delete_after,
        dry_run=args.dry_run,
        allow_overlap=args.allow_overlap,
    )
    try:
        done = submit_mod.submit(opts, note=_note, log_line=lambda line: print(line, flush=True))
    except GateError as e:
        if e.summary is not None:
            print(json.dumps(e.summary, indent=2, sort_keys=True))
        raise
    if opts.dry_run:
        print(yaml.safe_dump_all(done.objects, sort_keys=False), end="")
    elif done.summary is None:
        print(done.run.name)  # stdout: the name alone; with --wait, stdout is the summary JSON
    else:
        print(json.dumps(done.summary, indent=2, sort_keys=True))
    return ExitCode.OK


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
    from deploy.logs import pod_header

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
