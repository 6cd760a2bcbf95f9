"""End to end on a real cluster (KUBECONFIG) with the MPI Operator: submit, wait, logs, delete.

Runs a tiny CPU job: 1 worker, synthetic data, 1 epoch of 32 images at 32x32. The image must
be pullable by the cluster: FINETUNE_TEST_IMAGE (default finetune-job-cpu:latest). Output goes
to FINETUNE_TEST_OUTPUT (default /tmp/finetune-job-cluster-test inside the pods).
"""

from __future__ import annotations

import os

import pytest
import yaml
from chart_tools import find_or_install_helm, render

from deploy import manifest
from deploy.client import MPIJobClient

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        not os.environ.get("KUBECONFIG"),
        reason="needs a real Kubernetes cluster with the MPI Operator: set KUBECONFIG to run it",
    ),
]


def tiny_values(**extra: object) -> dict:
    """A tiny CPU run: 1 worker, synthetic data, 1 epoch of 32 images at 32x32."""
    image = os.environ.get("FINETUNE_TEST_IMAGE", "finetune-job-cpu:latest")
    repository, _, tag = image.rpartition(":")
    return {
        "image": {"repository": repository, "tag": tag},
        "workers": {"replicas": 1, "shmSize": ""},
        "training": {
            "synthetic": True,
            "epochs": 1,
            "synthetic_images": 32,
            "image_size": 32,
            "batch_size": 8,
            "pretrained": "none",
            "metrics_port": 0,
            "output": os.environ.get("FINETUNE_TEST_OUTPUT", "/tmp/finetune-job-cluster-test"),
        },
        **extra,
    }


def test_submit_wait_logs_delete():
    values = tiny_values(runPolicy={"backoffLimit": 0})
    docs = render(find_or_install_helm(), values, release="ft-e2e")
    rendered = manifest.parse(yaml.safe_dump_all(docs), "helm template ft-e2e")
    client = MPIJobClient(
        kubeconfig=os.environ["KUBECONFIG"], namespace=os.environ.get("FINETUNE_TEST_NAMESPACE")
    )
    run = manifest.build_run(
        rendered,
        schedule="cluster-test",
        namespace=client.namespace,
    )
    client.submit(run.job, run.config_map)
    try:
        state = client.wait(run.name, timeout=float(os.environ.get("FINETUNE_TEST_TIMEOUT", "900")))
        assert state.succeeded
        assert any("epoch" in line.lower() for line in client.logs(run.name))
        assert [s.name for s in client.list_jobs(f"finetune-job/run={run.name}")] == [run.name]
    finally:
        client.delete(run.name)


def test_a_trainjob_run_when_kubeflow_trainer_is_installed():
    """The same run as a TrainJob, when the cluster serves trainer.kubeflow.org/v1alpha1 and
    the release's TrainingRuntime is installed (`helm install ft-e2e-tj charts/finetune-job
    --set launch.kind=TrainJob --set runOnInstall=false ...`)."""
    from kubernetes import client as k8s

    from deploy import kinds

    client = MPIJobClient(
        kubeconfig=os.environ["KUBECONFIG"], namespace=os.environ.get("FINETUNE_TEST_NAMESPACE")
    )
    groups = k8s.ApisApi(client.api_client).get_api_versions().groups
    if kinds.TRAINJOB.group not in {g.name for g in groups}:
        pytest.skip("Kubeflow Trainer (trainer.kubeflow.org) is not installed in the cluster")
    values = tiny_values(launch={"kind": "TrainJob"})
    docs = render(find_or_install_helm(), values, release="ft-e2e-tj")
    rendered = manifest.parse(yaml.safe_dump_all(docs), "helm template ft-e2e-tj")
    run = manifest.build_run(rendered, schedule="cluster-test", namespace=client.namespace)
    client.submit(run.job, run.config_map)
    try:
        state = client.wait(run.name, timeout=float(os.environ.get("FINETUNE_TEST_TIMEOUT", "900")))
        assert state.succeeded and state.kind == "TrainJob"
        assert any("epoch" in line.lower() for line in client.logs(run.name))
    finally:
        client.delete(run.name)
