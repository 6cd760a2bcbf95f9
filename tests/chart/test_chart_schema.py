"""values.schema.json and values.yaml: in step with job.config, strict, documented."""

from __future__ import annotations

import json
import math
import re
import typing

import config_cases
import pytest
import yaml
from chart_tools import CHART, HelmError, lint, render

from job import config as job_config
from job import sources

SCHEMA = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
TRAINING = SCHEMA["properties"]["training"]
REQUIRED = {"training": {"data": "s3://datasets/flowers", "output": "s3://runs/flowers"}}
JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def test_training_keys_are_the_job_config_keys():
    assert set(TRAINING["properties"]) == set(job_config.FIELDS)
    assert TRAINING["additionalProperties"] is False
    assert set(TRAINING["required"]) == {"data", "output"}


@pytest.mark.parametrize("key", sorted(job_config.FIELDS))
def test_training_key_type_and_choices_match_the_config(key):
    prop = TRAINING["properties"][key]
    hint = typing.get_type_hints(job_config.Config)[key]
    if typing.get_origin(hint) is tuple:
        assert prop["type"] == "array"
        assert prop["items"]["type"] == JSON_TYPES[typing.get_args(hint)[0]]
    else:
        assert prop["type"] == JSON_TYPES[hint]
    choices = job_config.FIELDS[key].metadata["choices"]
    assert prop.get("enum") == (list(choices) if choices else None)
    assert prop["description"]


def _walk(schema, path="$"):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")


def test_every_property_is_described_and_our_objects_are_closed():
    for path, node in _walk(SCHEMA):
        if path != "$" and not path.endswith("[]"):
            assert node.get("description"), f"{path} has no description"
        if "properties" in node and not path.endswith("[]"):
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"


def test_values_yaml_starts_with_the_schema_modeline():
    first = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert first == "# yaml-language-server: $schema=values.schema.json"


def test_every_leaf_key_of_values_yaml_has_a_doc_comment():
    """A `# --` comment right above the key or above one of its parents (helm-docs style)."""
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    values = yaml.safe_load("\n".join(lines))
    key_line = re.compile(r"^(\s*)([A-Za-z_][\w./-]*):")
    stack: list[tuple[int, str, bool]] = []
    undocumented = []
    for i, line in enumerate(lines):
        m = key_line.match(line)
        if not m:
            continue
        j = i - 1
        while j >= 0 and lines[j].lstrip().startswith("#") and "# --" not in lines[j]:
            j -= 1
        documented = j >= 0 and "# --" in lines[j]
        indent = len(m.group(1))
        stack = [s for s in stack if s[0] < indent] + [(indent, m.group(2), documented)]
        node = values
        for _, key, _ in stack:
            node = node[key]
        is_parent = isinstance(node, dict) and node
        if not is_parent and not any(doc for _, _, doc in stack):
            undocumented.append(".".join(key for _, key, _ in stack))
    assert not undocumented


def test_defaults_plus_data_and_output_render(helm):
    docs = render(helm, REQUIRED)
    assert {d["kind"] for d in docs} >= {"MPIJob", "ConfigMap", "ServiceAccount", "Service"}


BAD_VALUES = {
    "unknown-top-level-key": (
        {"wokers": {"replicas": 2}},
        r"(?i)additional propert(y|ies) '?wokers'? (is )?not allowed",
    ),
    "unknown-training-key": (
        {"training": {"learning_rate": 0.1}},
        r"(?i)(training).*additional propert(y|ies) '?learning_rate'? (is )?not allowed",
    ),
    "replicas-0": (
        {"workers": {"replicas": 0}},
        r"(?i)workers.*replicas.*(minimum|must be greater than or equal to 1)",
    ),
    "slots-0": (
        {"slotsPerWorker": 0},
        r"(?i)slotsPerWorker.*(minimum|must be greater than or equal to 1)",
    ),
    "missing-training-data": (
        {"training": {"data": None}},
        r"(?i)(missing propert(y|ies) '?data'?|data is required)",
    ),
    "empty-training-data": (
        {"training": {"data": ""}},
        r"(?i)training.*data.*(minLength|length must be greater)",
    ),
    "missing-training-output": (
        {"training": {"output": None}},
        r"(?i)(missing propert(y|ies) '?output'?|output is required)",
    ),
    "wrong-type": (
        {"training": {"epochs": "ten"}},
        r"(?i)training.*epochs.*(got string, want integer|invalid type)",
    ),
    "negative-step-timeout": (
        {"training": {"step_timeout": -1}},
        r"(?i)training.*step_timeout.*(minimum|must be greater than or equal to 0)",
    ),
    "bad-model": (
        {"training": {"model": "vgg16"}},
        r"(?i)training.*model.*(must be one of|value must be one of)",
    ),
    "bad-clean-pod-policy": (
        {"runPolicy": {"cleanPodPolicy": "Always"}},
        r"(?i)cleanPodPolicy.*must be one of",
    ),
    "env-named-like-a-config-key": (
        {"env": [{"name": "FINETUNE_LR", "value": "1"}]},
        r"(?i)env.*name",
    ),
}


def _merged(extra):
    out = {"training": dict(REQUIRED["training"])}
    for key, value in extra.items():
        if key == "training":
            out["training"].update(value)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("values,message", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_fail_with_the_schemas_message(helm, values, message):
    with pytest.raises(HelmError) as template_err:
        render(helm, _merged(values))
    assert re.search(message, template_err.value.stderr), template_err.value.stderr
    with pytest.raises(HelmError) as lint_err:
        lint(helm, _merged(values))
    assert re.search(message, lint_err.value.stderr), lint_err.value.stderr


def test_the_chart_defaults_alone_fail_naming_data_and_output(helm):
    with pytest.raises(HelmError) as err:
        render(helm)
    assert "data" in err.value.stderr and "output" in err.value.stderr


def test_step_timeout_reaches_the_jobs_config_file(helm):
    docs = render(helm, _merged({"training": {"step_timeout": 45}}))
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d["data"]]
    assert yaml.safe_load(config_map["data"]["config.yaml"])["step_timeout"] == 45


def test_synthetic_runs_need_no_data(helm):
    docs = render(helm, {"training": {"synthetic": True, "output": "s3://runs/smoke"}})
    assert any(d["kind"] == "MPIJob" for d in docs)


# --- the training block is generated from job.config, and rejects what the job rejects -----


def _schema_errors(stderr: str) -> set[str]:
    """Training keys that helm lint's schema errors name ("- at '/training/KEY...': ...")."""
    return set(re.findall(r"- at '/training/(\w+)", stderr))


def _by_kind(cases):
    kinds: dict[str, list] = {}
    for case in cases:
        kinds.setdefault(case.kind, []).append(case)
    return kinds


# Non-finite floats cannot be written as JSON: helm refuses the file before the schema.
FINITE_CASES = [
    c for c in config_cases.all_bad_cases() if c.kind not in ("nan", "inf", "minus-inf")
]
KIND_BATCHES = _by_kind(FINITE_CASES)


@pytest.mark.parametrize("kind", sorted(KIND_BATCHES))
def test_helm_lint_rejects_each_bad_training_value(helm, kind):
    """One lint per kind of bad value, every key with that kind in it; helm reports each."""
    cases = KIND_BATCHES[kind]
    with pytest.raises(HelmError) as err:
        lint(helm, _merged({"training": {case.key: case.value for case in cases}}))
    assert _schema_errors(err.value.stderr) >= {case.key for case in cases}, err.value.stderr


NONFINITE = [
    (key, value)
    for i, key in enumerate(
        k for k in config_cases.KEYS if typing.get_type_hints(job_config.Config)[k] is float
    )
    for value in [(math.nan, math.inf, -math.inf)[i % 3]]
]


@pytest.mark.parametrize(("key", "value"), NONFINITE, ids=[f"{k}-{v}" for k, v in NONFINITE])
def test_helm_refuses_non_finite_training_floats(helm, key, value):
    with pytest.raises(HelmError, match=r"unsupported value: [-+]?(NaN|Inf)"):
        lint(helm, _merged({"training": {key: value}}))


@pytest.mark.parametrize("edge", ["at-min", "at-max"])
def test_helm_lint_accepts_every_training_value_on_a_bound(helm, edge):
    training = {
        key: value
        for key in config_cases.KEYS
        for name, value in config_cases.edge_values(key)
        if name == edge
    }
    assert training
    lint(helm, _merged({"training": training}))
    sources.from_mapping({**REQUIRED["training"], **training}, "values training")
