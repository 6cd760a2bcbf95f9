"""Runs of the chart as Helm renders it, for tests of the client (rendered once per session)."""

from __future__ import annotations

from functools import cache
from typing import Any

import yaml
from chart_tools import find_or_install_helm, render

from deploy import manifest

TRAINING = {"synthetic": True, "output": "s3://b/flowers"}


@cache
def rendered(release: str = "ft") -> manifest.Rendered:
    """`helm template` of the chart with a synthetic-data run, parsed."""
    docs = render(find_or_install_helm(), {"training": TRAINING}, release=release)
    return manifest.parse(yaml.safe_dump_all(docs), f"helm template {release}")


def new_run(name_prefix: str = "ft", **kwargs: Any) -> manifest.Run:
    """A uniquely named run of the rendered chart."""
    return manifest.build_run(rendered(), prefix=name_prefix, **kwargs)
