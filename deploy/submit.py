"""Submit a fine-tuning run and, when asked, wait for it, gate it and promote it.

The workflow behind ``finetune-job submit``, callable from a pipeline without argparse::

    from deploy.submit import SubmitOptions, submit

    result = submit(SubmitOptions(values=("prod.yaml",), wait=True, not_worse=True))
    print(result.run.name, result.summary["val_top1"])

Steps: what Helm rendered (a manifest, or ``helm template`` of the chart now) → for a
schedule, single flight and the resumable predecessor → ``<root>/latest`` resolved to a
model → the run's fields patched → submitted → with ``wait``: waited for, its launcher log
saved next to its output, gated and promoted to ``latest``. Failures raise the errors of
``deploy.errors`` (a failed gate ``GateError``, with the run's summary).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from deploy import constants as c
from deploy import kinds, manifest
from deploy import schedule as schedule_mod
from deploy.errors import BadInputError, DeployError, JobFailedError, JobTimeoutError
from deploy.stuck import StuckBounds
from job import config, layout, rules
from job import storage as st
from job.errors import JobError
from job.outputs import registry
from job.rules import ConfigError, Rule

# The bounded options of submit (and wait), checked by job.rules as Config's keys are;
# --max-class-drop overrides training.max_class_drop and takes its rule.
SUBMIT_RULES = {
    "--start-timeout": Rule(help="seconds a pod may fail to start", minimum=0),
    "--unschedulable-timeout": Rule(help="seconds a pod may stay unschedulable", minimum=0),
    "--max-class-drop": config.rule("max_class_drop"),
}


def check_option(flag: str, value: float) -> None:
    """``value`` against the flag's rule in SUBMIT_RULES; BadInputError names the flag."""
    try:
        rules.typed(float, SUBMIT_RULES[flag], value, flag)
    except ConfigError as e:
        raise BadInputError(str(e)) from e


def check_stuck(stuck: StuckBounds) -> None:
    """The bounds of a wait for pods that cannot start (submit, wait, logs --follow)."""
    check_option("--start-timeout", stuck.start)
    check_option("--unschedulable-timeout", stuck.unschedulable)


@dataclass(frozen=True)
class SubmitOptions:
    """What ``finetune-job submit`` takes, flag for flag."""

    from_manifest: str = ""  # the run as Helm rendered it ('-': standard input)
    values: Sequence[str] = ()  # without from_manifest: values files for `helm template`
    set: Sequence[str] = ()  # without from_manifest: KEY=VALUE for `helm template`
    chart: str = field(default_factory=manifest.default_chart)
    helm: str = "helm"
    release: str = manifest.CHART
    namespace: str | None = None
    kubeconfig: str | None = None
    context: str | None = None
    name_prefix: str = ""
    schedule: str = ""
    first_pretrained: str = "zoo"  # weights while <root>/latest does not exist yet
    wait: bool = False
    follow: bool = False  # stream the launcher log (implies wait)
    timeout: float = c.WAIT_TIMEOUT
    stuck: StuckBounds = field(default_factory=StuckBounds)
    min_accuracy: float | None = None
    not_worse: bool = False
    max_class_drop: float | None = None  # None: training.max_class_drop of the rendered run
    delete_after: bool = False
    dry_run: bool = False  # build the objects, submit nothing
    allow_overlap: bool = False

    def check(self) -> None:
        """Bad input, found before anything is submitted."""
        check_stuck(self.stuck)
        if self.max_class_drop is not None:
            check_option("--max-class-drop", self.max_class_drop)
        if self.from_manifest and (self.values or self.set):
            raise BadInputError(
                "--values/--set go to `helm template`; with --from-manifest the manifest is "
                "used as rendered (render it again with those values)"
            )


@dataclass
class Submitted:
    """What a submit did: the run, where, and with ``wait`` what it ended with."""

    run: manifest.Run
    namespace: str = ""  # empty for a dry run
    summary: dict[str, Any] | None = None  # the run's summary.json, once gated
    pointer: dict[str, Any] | None = None  # the new <root>/latest

    @property
    def objects(self) -> list[dict[str, Any]]:
        """The objects submitted (or, for a dry run, that would be)."""
        return [self.run.job] + ([self.run.config_map] if self.run.config_map else [])


def _quiet(_: str) -> None:
    """The default for notes and log lines: none."""


def submit(
    opts: SubmitOptions,
    *,
    note: Callable[[str], None] = _quiet,
    log_line: Callable[[str], None] = _quiet,
) -> Submitted:
    """Submit a run as ``opts`` says. ``note`` receives the progress lines, ``log_line``
    the launcher's log with ``follow``."""
    opts.check()
    rendered = _rendered(opts)
    storage = _storage(rendered)
    # Of the rendered kind only: a schedule's runs are all of it, and the CronJob's Role
    # grants that kind alone.
    client = None if opts.dry_run else client_for(opts, kinds.of(rendered.job))
    predecessor = _single_flight(opts, client, storage)
    pretrained = str(rendered.training.get("pretrained") or "")
    resolved = resume_from = None
    if predecessor is not None:  # the failed run's own start, so the fingerprints agree
        resume_from, resolved = predecessor
        note(f"resuming the failed run in {resume_from} (pretrained {resolved})")
    elif pretrained and registry.is_latest_uri(pretrained):
        resolved = registry.resolve_pretrained(
            pretrained, storage, if_missing=opts.first_pretrained
        )
        note(f"pretrained {pretrained} -> {resolved}")
    run = manifest.build_run(
        rendered,
        schedule=opts.schedule,
        prefix=opts.name_prefix,
        pretrained=resolved,
        resume_from=resume_from,
    )
    if opts.wait or opts.follow:  # the run stops by itself when this submit gives up
        schedule_mod.cap_deadline(run.job, opts.timeout)
    if client is None:
        return Submitted(run)
    client.submit(run.job, run.config_map)
    note(f"submitted {run.job['kind']} {client.namespace}/{run.name}; output {run.output}")
    done = Submitted(run, client.namespace)
    if not (opts.wait or opts.follow):
        return done
    max_drop = opts.max_class_drop
    if max_drop is None:  # the CronJob's form: the chart's training values carry it
        max_drop = float(rendered.training.get("max_class_drop") or 0.0)
    gate = registry.Gate(opts.min_accuracy, opts.not_worse, max_drop)
    _wait(opts, client, storage, run, note, log_line)
    root = str(rendered.training["output"])
    done.summary, done.pointer = registry.finish_run(storage, root, run.name, gate)
    metric = registry.METRIC
    note(f"{registry.LATEST} -> {done.pointer['run']} ({metric} {done.pointer[metric]:.4f})")
    return done


def client_for(opts: Any, kind: kinds.Kind | None = None) -> Any:
    """The client of the cluster ``opts`` names (namespace, kubeconfig, context)."""
    from deploy.client import MPIJobClient

    return MPIJobClient(opts.namespace, kubeconfig=opts.kubeconfig, context=opts.context, kind=kind)


def _storage(rendered: manifest.Rendered) -> st.Storage:
    """Storage reaching S3 as the run's pods do (credentials: the standard AWS chain)."""
    endpoint, region = manifest.s3_endpoint_and_region(rendered)
    return st.Storage(st.S3Settings(endpoint_url=endpoint, region=region))


def _rendered(opts: SubmitOptions) -> manifest.Rendered:
    """What Helm rendered: the given manifest, or `helm template` of the chart now."""
    if opts.from_manifest:
        return manifest.read(opts.from_manifest)
    return manifest.render(
        opts.chart,
        opts.release,
        list(opts.values),
        list(opts.set),
        namespace=opts.namespace,
        helm=opts.helm,
    )


def _single_flight(opts: SubmitOptions, client: Any, storage: Any) -> tuple[str, str] | None:
    """For a scheduled submit: refuse while the schedule's last run is unfinished, and find
    a failed predecessor to resume ((output, pretrained), or None)."""
    schedule = manifest.label_value(opts.schedule)
    if client is None or not schedule:
        return None
    if not opts.allow_overlap:
        schedule_mod.refuse_overlap(client, schedule)
    return schedule_mod.resumable_predecessor(client, storage, schedule)


def _wait(
    opts: SubmitOptions,
    client: Any,
    storage: Any,
    run: manifest.Run,
    note: Callable[[str], None],
    log_line: Callable[[str], None],
) -> None:
    """Until the run ends; its launcher log saved, and the run deleted if asked."""
    deadline = time.monotonic() + opts.timeout
    if opts.follow:
        for line in client.logs(run.name, follow=True, timeout=opts.timeout, stuck=opts.stuck):
            log_line(line)
    try:
        client.wait(
            run.name,
            max(0.0, deadline - time.monotonic()),
            on_change=lambda s: note(f"{s.kind} {s.describe()}"),
            stuck=opts.stuck,
        )
    except JobTimeoutError as e:
        left = schedule_mod.cap_deadline(run.job, opts.timeout)  # as submitted
        raise JobTimeoutError(
            f"{e}; left running: {run.job['kind']} {client.namespace}/{run.name} "
            f"(output {run.output}), "
            f"ungated; its activeDeadlineSeconds {left} stops it at the latest; "
            f"`finetune-job delete {run.name}` stops it now"
        ) from e
    except JobFailedError:
        _save_logs(client, storage, run, note)
        _cleanup(opts, client, run.name)
        raise
    _save_logs(client, storage, run, note)
    _cleanup(opts, client, run.name)


def _save_logs(client: Any, storage: Any, run: manifest.Run, note: Callable[[str], None]) -> None:
    """Keep the launcher's log next to the run's output before anything is cleaned up."""
    uri = st.join(run.output, layout.LAUNCHER_LOG)
    try:  # every launcher attempt: the earlier ones say why the launcher was restarted
        storage.write_bytes(uri, client.launcher_log_text(run.name).encode())
        note(f"launcher log saved to {uri}")
    except (DeployError, JobError) as e:
        note(f"warning: launcher log not saved: {e}")


def _cleanup(opts: SubmitOptions, client: Any, name: str) -> None:
    if opts.delete_after:
        client.delete(name)
