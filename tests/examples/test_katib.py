"""examples/katib-experiment.yaml: a Katib v1beta1 Experiment whose trial template is this
chart's MPIJob (launcher as primary pod), current with the chart, and whose metrics are the ones
the job prints."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from chart_tools import (
    launcher_command_and_config,
    one,
    render,
    replica_container,
    validate_mpijob,
)

from deploy import constants as c
from job import config as config_mod
from job import sources
from job.cli import build_parser
from job.training.progress import METRIC_KEYS

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
EXPERIMENT = yaml.safe_load((EXAMPLES / "katib-experiment.yaml").read_text(encoding="utf-8"))
VALUES = yaml.safe_load((EXAMPLES / "katib-values.yaml").read_text(encoding="utf-8"))
SPEC = EXPERIMENT["spec"]
TEMPLATE = SPEC["trialTemplate"]
PLACEHOLDER = re.compile(r"\$\{trialParameters\.(\w+)\}")
# Fields of Katib's v1beta1 API (kubeflow/katib pkg/apis/controller/experiments/v1beta1
# experiment_types.go and common/v1beta1): a typo here would be dropped by the API server.
EXPERIMENT_SPEC_FIELDS = {
    "parameters",
    "objective",
    "algorithm",
    "trialTemplate",
    "parallelTrialCount",
    "maxTrialCount",
    "maxFailedTrialCount",
    "metricsCollectorSpec",
    "nasConfig",
    "resumePolicy",
    "earlyStopping",
}
TRIAL_TEMPLATE_FIELDS = {
    "retain",
    "trialSpec",
    "configMap",
    "trialParameters",
    "primaryPodLabels",
    "primaryContainerName",
    "successCondition",
    "failureCondition",
}
OBJECTIVE_FIELDS = {
    "type",
    "goal",
    "objectiveMetricName",
    "additionalMetricNames",
    "metricStrategies",
}
PARAMETER_TYPES = {"double", "int", "discrete", "categorical"}


def substituted(value: float | str = "0.02", mult: str = "5", name: str = "finetune-lr-x1"):
    """The trial spec as Katib creates it for one suggestion: placeholders replaced in the
    template's JSON text, so they stay strings."""
    text = json.dumps(TEMPLATE["trialSpec"])
    for placeholder, new in (("learningRate", value), ("headLrMult", mult), ("trialName", name)):
        text = text.replace(f"${{trialParameters.{placeholder}}}", str(new))
    trial = json.loads(text)
    trial["metadata"]["name"] = name
    return trial


@pytest.fixture(scope="module")
def chart_docs(helm):
    return render(helm, {**VALUES, "runOnInstall": True}, release="tune", namespace="ml")


def test_says_which_trial_resource_katib_must_watch():
    text = (EXAMPLES / "katib-experiment.yaml").read_text(encoding="utf-8")
    kind, version = TEMPLATE["trialSpec"]["kind"], TEMPLATE["trialSpec"]["apiVersion"]
    group, api = version.split("/")
    assert f"{kind}.{api}.{group}" in text  # katib-config trialResources: Kind.version.group


def test_is_a_katib_v1beta1_experiment_with_known_fields():
    assert EXPERIMENT["apiVersion"] == "kubeflow.org/v1beta1"
    assert EXPERIMENT["kind"] == "Experiment"
    assert set(SPEC) <= EXPERIMENT_SPEC_FIELDS
    assert set(TEMPLATE) <= TRIAL_TEMPLATE_FIELDS
    assert set(SPEC["objective"]) <= OBJECTIVE_FIELDS
    for p in SPEC["parameters"]:
        assert set(p) == {"name", "parameterType", "feasibleSpace"}
        assert p["parameterType"] in PARAMETER_TYPES
        assert set(p["feasibleSpace"]) <= {"min", "max", "list", "step", "distribution"}


def test_tunes_lr_and_head_lr_mult_within_the_configs_bounds():
    spaces = {p["name"]: p["feasibleSpace"] for p in SPEC["parameters"]}
    assert set(spaces) == {"lr", "head_lr_mult"}
    for key, space in spaces.items():
        for bound in (space["min"], space["max"]):
            # Config accepts every value of the space (lr > 0, head_lr_mult >= 0).
            config_mod.Config(output="o", synthetic=True, **{key: float(bound)})
        assert float(space["min"]) < float(space["max"])


def test_metrics_are_the_ones_the_job_prints_and_read_with_katibs_default_filter():
    objective = SPEC["objective"]
    names = [objective["objectiveMetricName"], *objective.get("additionalMetricNames", [])]
    assert objective["objectiveMetricName"] == "val_top1" and objective["type"] == "maximize"
    assert set(names) <= set(METRIC_KEYS)
    collector = SPEC["metricsCollectorSpec"]
    assert collector["collector"]["kind"] == "StdOut"
    assert "source" not in collector  # Katib's default filter reads our name=value lines


def test_launcher_is_the_primary_pod_and_conditions_are_the_mpijobs(chart_docs):
    assert TEMPLATE["primaryPodLabels"] == {c.OPERATOR_JOB_ROLE_LABEL: c.LAUNCHER_ROLE}
    launcher = replica_container(one(chart_docs, "MPIJob"), "Launcher")
    assert TEMPLATE["primaryContainerName"] == launcher["name"]
    assert f'type=="{c.SUCCEEDED}"' in TEMPLATE["successCondition"]
    assert f'type=="{c.FAILED}"' in TEMPLATE["failureCondition"]
    assert TEMPLATE["successCondition"].endswith('#(status=="True")#')


def test_trial_parameters_are_used_and_reference_the_search_space():
    text = yaml.safe_dump(TEMPLATE["trialSpec"])
    used = set(PLACEHOLDER.findall(text))
    declared = {p["name"]: p["reference"] for p in TEMPLATE["trialParameters"]}
    assert used == set(declared)
    parameters = {p["name"] for p in SPEC["parameters"]}
    for reference in declared.values():
        assert reference in parameters or reference == "${trialSpec.Name}", reference


def test_trial_template_is_the_charts_mpijob_plus_the_tuned_flags(chart_docs):
    mpijob = one(chart_docs, "MPIJob")
    trial = copy.deepcopy(TEMPLATE["trialSpec"])
    assert "name" not in trial["metadata"]  # Katib names the job after the trial
    command = replica_container(trial, "Launcher")["args"]
    base = replica_container(mpijob, "Launcher")["args"]
    assert command[: len(base)] == base
    extra = command[len(base) :]
    assert extra[0::2] == ["--lr", "--head-lr-mult", "--output"]
    replica_container(trial, "Launcher")["args"] = base
    expected = copy.deepcopy(mpijob)
    del expected["metadata"]["name"]
    assert trial == expected


def test_a_trial_validates_as_an_mpijob_and_its_command_parses(chart_docs, tmp_path):
    trial = substituted("0.02", "5", "finetune-lr-x1")
    validate_mpijob(trial)
    command = replica_container(trial, "Launcher")["args"]
    argv = command[command.index("finetune-job") + 1 :]
    _, config_text = launcher_command_and_config(chart_docs)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_text, encoding="utf-8")
    argv[argv.index("--config") + 1] = str(config_file)
    cfg = sources.load(vars(build_parser().parse_args(argv)), environ={})
    assert cfg.lr == 0.02 and cfg.head_lr_mult == 5.0  # the flags win over the config file
    assert cfg.output == "s3://runs/katib/flowers/finetune-lr-x1"
    assert cfg.data == VALUES["training"]["data"] and cfg.model == VALUES["training"]["model"]
