"""A Kubeflow Pipelines v2 component and pipeline: submit a fine-tuning run, wait for it, log
its metrics as KFP artifacts.

The component runs in the job's image (it has ``finetune-job`` and its ``deploy`` side) and
does what a scheduled retraining does: ``finetune-job submit --from-manifest --wait`` takes
the MPIJob the chart rendered, makes it this run's, submits it, waits for it (and for the
promotion gate), and prints the run's summary.json on stdout. The component turns that
summary into the same metrics document ``--metrics-file`` writes
(job/outputs/pipeline_metrics.py) and logs it into a ``Metrics`` artifact (name → number)
and, when the run's evaluation gave one, a ``ClassificationMetrics`` confusion matrix, which
the KFP UI shows and compares across runs.

    pip install -e ".[kfp]"
    python examples/kfp_pipeline.py finetune.yaml       # compile; upload it in the KFP UI
    helm template flowers charts/finetune-job -f my-values.yaml > manifest.yaml
                                                        # the pipeline's manifest_yaml input

The pipeline's pod needs RBAC for MPIJobs in its namespace: the chart's submit Role
(templates/submit-role.yaml) bound to the pipeline runner's ServiceAccount.
"""

# No `from __future__ import annotations`: KFP reads the component's annotations as types.
import sys

from kfp import compiler, dsl
from kfp.dsl import ClassificationMetrics, Metrics, Output

# The job's image (Dockerfile; `make image`), as the chart's image.repository:appVersion.
IMAGE = "finetune-job:0.1.0"


@dsl.component(base_image=IMAGE)
def finetune(
    manifest_yaml: str,
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    namespace: str = "",
    extra_args: str = "",
    timeout_seconds: int = 86400,
) -> str:
    """Submit one run of the chart's rendered MPIJob (``helm template`` output, YAML text),
    wait for it, log its metrics; returns the run's output folder. ``extra_args``: more
    `finetune-job submit` flags, shell-quoted (e.g. ``--min-accuracy 0.9 --not-worse``)."""
    # Imports inside the body: KFP runs this function's source alone in the container.
    import json
    import shlex
    import subprocess
    import tempfile

    from job.outputs import pipeline_metrics

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        fh.write(manifest_yaml)
    cmd = ["finetune-job", "submit", "--from-manifest", fh.name, "--wait"]
    cmd += ["--timeout", str(timeout_seconds)]
    if namespace:
        cmd += ["--namespace", namespace]
    cmd += shlex.split(extra_args)
    # stderr (progress of the wait, the launcher's log lines) goes to the component's log;
    # stdout is the run's summary.json.
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout_seconds + 600)
    if proc.returncode != 0:
        raise RuntimeError(f"finetune-job submit exited {proc.returncode}")
    summary = json.loads(proc.stdout)
    pipeline_metrics.to_kfp(pipeline_metrics.build(summary), metrics, classification)
    return str(summary.get("config", {}).get("output", ""))


@dsl.pipeline(name="finetune-job", description="Fine-tune a ResNet as an MPIJob; log metrics")
def finetune_pipeline(manifest_yaml: str, namespace: str = "", extra_args: str = "") -> None:
    finetune(manifest_yaml=manifest_yaml, namespace=namespace, extra_args=extra_args)


def main(argv: list[str]) -> int:
    target = argv[0] if argv else "finetune-pipeline.yaml"
    compiler.Compiler().compile(finetune_pipeline, package_path=target)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
