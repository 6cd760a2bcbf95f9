"""finetune-job: Horovod-distributed fine-tuning of pretrained ResNets with MXNet Gluon."""

from typing import Any


def __getattr__(name: str) -> Any:
    """``job.__version__``: the installed distribution's, written once in pyproject.toml
    (looked up on first use, not at import)."""
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("finetune-job")
        except PackageNotFoundError:
            return "0+unknown"  # run from a source tree that was never installed
    raise AttributeError(f"module 'job' has no attribute {name!r}")
