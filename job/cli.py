"""finetune-job: fine-tune a pretrained ResNet with Horovod, on data streamed from S3.

Runbook (the same lines the Helm chart renders for the MPI Operator's launcher)::

    # one process, no launcher
    finetune-job train --data s3://bucket/ds --output s3://bucket/runs/r1

    # 2 workers on this machine
    horovodrun -np 2 -H localhost:2 finetune-job train --data DIR --output OUT \\
        --pretrained OUT0/model.params

    # what the MPIJob launcher runs (hostfile from the MPI Operator)
    mpirun -np 8 -bind-to none -map-by slot -x LD_LIBRARY_PATH -x PATH \\
        -mca pml ob1 -mca btl ^openib finetune-job train --config /etc/finetune-job/config.yaml

Exit codes: one table for every subcommand, ``job.exitcodes`` (README, "Exit codes").

The training side's subcommands are ``job.commands``; ``deploy.entry`` adds the Kubernetes
side's to them for the ``finetune-job`` command. The subcommands load what they need when they run:
``train``, ``prepare``, ``evaluate``, ``predict`` and ``export`` need the ``[train]`` extra
(MXNet, numpy, OpenCV); a missing one is named in one line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import job
from job import logs
from job.exitcodes import ExitCode
from job.rules import ConfigError

log = logging.getLogger("finetune_job")

# The extra that brings each optional top-level module (Horovod is built by `make install`).
EXTRAS = {
    "mxnet": "train",
    "numpy": "train",
    "cv2": "train",
    "prometheus_client": "train",
    "kubernetes": "deploy",
}


class Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the command, with the hint to ask for --help
    (argparse's default prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.BAD_INPUT, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        """Unknown options are reported by the command they were given to, so the hint
        names that command's --help."""
        ns, extras = super().parse_known_args(args, namespace)
        if extras and self._commands is not None:
            command = self._commands.get(getattr(ns, "command", None) or "", self)
            command.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras

    _commands: Mapping[str, argparse.ArgumentParser] | None = None


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Epilogs as written, and each option's default (train's come from Config's help)."""


AddCommands = Callable[[Any], None]  # adds subcommands to an argparse subparsers object


def build_parser(*more: AddCommands) -> argparse.ArgumentParser:
    """The training subcommands, and those each of ``more`` adds (the upper layer's)."""
    from job import commands

    parser = Parser(
        prog="finetune-job",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {job.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_commands(sub, HelpFormatter)
    for add in more:
        add(sub)
    parser._commands = sub.choices  # for usage errors naming the command
    return parser


def main(
    argv: Sequence[str] | None = None,
    build: Callable[[], argparse.ArgumentParser] = build_parser,
) -> int:
    """Parse ``argv`` with the parser ``build`` makes and run the command under the guard."""
    logs.configure("text")  # train switches to its config's log_format once it is known
    try:
        args = build().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed in one line
        return e.code if isinstance(e.code, int) else ExitCode.BAD_INPUT
    func: Callable[[argparse.Namespace], int] = args.func
    return run_guarded(func, args)


def run_guarded(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; known failures become one line on stderr and an exit code. The one
    guard of every subcommand, the Kubernetes side's included."""
    from job.errors import JobError

    try:
        return func(args)
    except ConfigError as e:
        return _fail(e, ExitCode.BAD_INPUT)
    except JobError as e:
        code = _fail(e, e.exit_code)
        _settle_mxnet()
        return code
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").partition(".")[0])
        if extra is None and (e.name or "").partition(".")[0] != "horovod":
            raise  # not a missing extra: a bug, with its traceback
        return _fail(missing_extra(args.command, e.name or "", extra), ExitCode.BAD_INPUT)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except Exception as e:
        if not _another_rank_failed(e):
            raise
        # This rank only saw the collective break; the rank that failed said why.
        _settle_mxnet()
        return _fail("stopped because another rank failed (its error is above)", ExitCode.FAILED)


def _another_rank_failed(e: BaseException) -> bool:
    """Horovod's way of telling a rank that a peer exited: HorovodInternalError, or an
    MXNetError from a collective saying Horovod has been shut down."""
    return type(e).__name__ == "HorovodInternalError" or "Horovod has been shut down" in str(e)


def _settle_mxnet() -> None:
    """Collect MXNet's pending asynchronous error (a collective broken by a peer's exit), so
    it is not raised again, with a traceback, by MXNet's exit hook."""
    if "mxnet" not in sys.modules:
        return
    import mxnet as mx

    try:
        mx.nd.waitall()
    except Exception:  # noqa: BLE001 - already reported in one line; only silence it here
        log.debug("pending MXNet error collected at exit", exc_info=True)


def missing_extra(command: str, module: str, extra: str | None) -> str:
    """One line saying what to install for ``command``."""
    if extra is None:
        return (
            f"{command} needs Horovod (no module '{module}'); `make install` builds it with "
            "MXNet, Gloo and MPI support (see the README)"
        )
    return (
        f"{command} needs the [{extra}] extra (no module '{module}'): "
        f"pip install 'finetune-job[{extra}]'"
    )


def _fail(e: object, code: int) -> int:
    """The one error line: plain text, or a JSON object when the logs are JSON."""
    if logs.active_format() == "json":
        log.error(str(e), extra={"event": "error"})
    else:
        print(f"finetune-job: error: {e}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
