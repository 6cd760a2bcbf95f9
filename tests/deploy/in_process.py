"""The deploy subcommands run in-process as ``finetune-job`` runs them: parsed by the
combined parser and under the one error guard (the caller's logging left as it is)."""

from __future__ import annotations

from deploy import entry
from job.cli import run_guarded


def guarded(*argv: str) -> int:
    args = entry.build_parser().parse_args(argv)
    return run_guarded(args.func, args)
