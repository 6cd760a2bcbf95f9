"""Generate charts/<chart>/README.md from Chart.yaml and the ``# --`` comments of values.yaml.

The helm-docs convention: a ``# -- description`` comment (continued on the following ``#``
lines) right above a key documents that key; its default is the key's value in values.yaml.
Commented examples below a key (``# - name: x``) are not descriptions. Every key of
values.yaml that has such a comment becomes one row of the values table, whatever the key;
a key without one is covered by its documented parent (its default shows in the parent's).

    python charts/chartdoc.py            # rewrite charts/finetune-job/README.md
    python charts/chartdoc.py --check    # exit 1 when the committed README is stale
    make generate                        # with the other generated files

This script lives outside the chart folder, so ``helm package`` never ships it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent / "finetune-job"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/]+|\"[^\"]+\"|'[^']+'):(\s|$)")
DOC = re.compile(r"^ *# -- ?(?P<text>.*)$")
CONTINUED = re.compile(r"^ *# ?(?P<text>.*)$")


@dataclass(frozen=True)
class Value:
    key: str  # dotted path, e.g. metrics.podMonitor.interval
    description: str
    default: Any


def documented_values(text: str) -> list[Value]:
    """Every key of a values.yaml text with a ``# --`` comment, in file order."""
    defaults = yaml.safe_load(text) or {}
    values: list[Value] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the mapping keys above this line
    pending: list[str] | None = None  # the description being read
    list_indent: int | None = None  # inside a list item's mapping: its keys are not values
    for line in text.splitlines():
        doc, cont = DOC.match(line), CONTINUED.match(line)
        if doc:
            pending = [doc["text"].strip()]
            continue
        if cont:
            if pending is not None:
                pending.append(cont["text"].strip())
            continue
        if not line.strip():
            pending = None
            continue
        indent = len(line) - len(line.lstrip(" "))
        if line.lstrip().startswith("- "):
            list_indent = indent if list_indent is None else min(list_indent, indent)
            pending = None
            continue
        match = KEY.match(line)
        if match is None or (list_indent is not None and indent > list_indent):
            pending = None
            continue
        list_indent = None
        key = match["key"].strip("\"'")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [key]
        stack.append((indent, key))
        if pending is not None:
            description = " ".join(p for p in pending if p)
            values.append(Value(".".join(path), description, _lookup(defaults, path)))
        pending = None
    return values


def undocumented_keys(text: str) -> list[str]:
    """Keys of values.yaml with no ``# --`` comment on them or on any parent."""
    documented = {v.key for v in documented_values(text)}
    missing = []

    def walk(node: Any, path: list[str]) -> None:
        for key, child in (node or {}).items():
            dotted = ".".join([*path, str(key)])
            if dotted in documented:
                continue
            if isinstance(child, dict) and child:
                walk(child, [*path, str(key)])
            else:
                missing.append(dotted)

    walk(yaml.safe_load(text), [])
    return missing


def _lookup(node: Any, path: list[str]) -> Any:
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "string"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def values_table(values: list[Value]) -> str:
    rows = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for v in values:
        default = json.dumps(v.default, ensure_ascii=False)
        rows.append(
            f"| `{v.key}` | {_type(v.default)} | `{_cell(default)}` | {_cell(v.description)} |"
        )
    return "\n".join(rows)


def render(chart_dir: Path = CHART) -> str:
    chart = yaml.safe_load((chart_dir / "Chart.yaml").read_text(encoding="utf-8"))
    values = documented_values((chart_dir / "values.yaml").read_text(encoding="utf-8"))
    notes = chart.get("annotations", {})
    operator = notes.get("finetune-job/mpi-operator-min-version", "")
    name, version = chart["name"], chart["version"]
    lines = [
        f"# {name}",
        "",
        "<!-- Generated by charts/chartdoc.py from Chart.yaml and values.yaml "
        "(`make generate`); do not edit. -->",
        "",
        f"Version {version} · app version {chart.get('appVersion', '')} · "
        f"type {chart.get('type', 'application')}",
        "",
        " ".join(str(chart.get("description", "")).split()),
        "",
        f"**Homepage:** <{chart['home']}>" if chart.get("home") else "",
        "",
        "## Requirements",
        "",
        f"- Kubernetes `{chart.get('kubeVersion', 'any')}`",
    ]
    if operator:
        lines.append(
            f"- The Kubeflow MPI Operator {operator} or later "
            f"(`{notes.get('finetune-job/mpijob-api-version', 'kubeflow.org/v2beta1')}` "
            "MPIJobs with `launcherCreationPolicy`)"
        )
    lines += [
        "- Or, with `launch.kind: TrainJob`, Kubeflow Trainer v2 (`trainer.kubeflow.org/v1alpha1`"
        " TrainJob and TrainingRuntime) instead of the MPI Operator",
        "- Optional: the Prometheus Operator (`metrics.podMonitor`, `metrics.prometheusRule`)",
        "",
        "## Installing",
        "",
        "```console",
        f"helm install flowers oci://REGISTRY/charts/{name} --version {version} \\",
        "  --set training.data=s3://bucket/datasets/flowers \\",
        "  --set training.output=s3://bucket/runs/flowers \\",
        "  --set s3.existingSecret=s3-credentials",
        "```",
        "",
        "`values.schema.json` checks every value; unknown keys are rejected.",
        "",
    ]
    if chart.get("maintainers"):
        lines += ["## Maintainers", "", "| Name | Email | Url |", "|---|---|---|"]
        lines += [
            f"| {m.get('name', '')} | {m.get('email', '')} | {m.get('url', '')} |"
            for m in chart["maintainers"]
        ]
        lines.append("")
    if chart.get("sources"):
        lines += ["## Source Code", ""] + [f"- <{s}>" for s in chart["sources"]] + [""]
    lines += ["## Values", "", values_table(values), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail when README.md is stale")
    parser.add_argument("--chart", type=Path, default=CHART, help="chart folder")
    args = parser.parse_args(argv)
    readme = args.chart / "README.md"
    text = render(args.chart)
    if args.check:
        if not readme.is_file() or readme.read_text(encoding="utf-8") != text:
            print(f"{readme} is stale: run `make generate`", file=sys.stderr)
            return 1
        return 0
    readme.write_text(text, encoding="utf-8")
    print(f"wrote {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
