"""finetune-job: Horovod-distributed fine-tuning of pretrained ResNets with MXNet Gluon."""

from typing import Any


def __getattr__(name: str) -> Any:
    """``__version__`` from the installed package's metadata: the version is written once,
    in pyproject.toml, and read only when asked for (no work at import time)."""
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("finetune-job")
        except PackageNotFoundError:  # a source tree that was never installed
            return "unknown"
    raise AttributeError(f"module 'job' has no attribute {name!r}")
