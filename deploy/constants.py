"""Names shared by the Kubernetes side: the MPIJob API, its conditions, our labels.

The MPIJob is the MPI Operator's ``kubeflow.org/v2beta1`` custom resource. The launcher
pod labels are the operator's own (``training.kubeflow.org/*``); ours carry the
``finetune-job/`` prefix and link each run to the schedule that started it.
"""

from __future__ import annotations

# The custom resource.
GROUP = "kubeflow.org"
VERSION = "v2beta1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "MPIJob"
PLURAL = "mpijobs"

# MPIJob status condition types (status.conditions[].type), and their status values.
CREATED = "Created"
RUNNING = "Running"
RESTARTING = "Restarting"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
CONDITION_TYPES = (CREATED, RUNNING, RESTARTING, SUCCEEDED, FAILED, SUSPENDED)
TERMINAL = (SUCCEEDED, FAILED)
# What a job with no condition yet reports.
PENDING = "Pending"

# Labels the MPI Operator puts on the pods it creates.
OPERATOR_JOB_NAME_LABEL = "training.kubeflow.org/job-name"
OPERATOR_JOB_ROLE_LABEL = "training.kubeflow.org/job-role"
LAUNCHER_ROLE = "launcher"
WORKER_ROLE = "worker"

# Our labels (Kubernetes recommended ones, plus run and schedule).
NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
RUN_LABEL = "finetune-job/run"
SCHEDULE_LABEL = "finetune-job/schedule"
APP_NAME = "finetune-job"
MANAGED_BY = "finetune-job-deploy"
MANUAL_SCHEDULE = "manual"
# Annotation naming the run's output URI (where summary.json and model.params land).
OUTPUT_ANNOTATION = "finetune-job/output"

# The training config: a ConfigMap key mounted into every pod at CONFIG_PATH.
CONFIG_DIR = "/etc/finetune-job"
CONFIG_KEY = "config.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
CONFIG_VOLUME = "training-config"

# Kubernetes object names (DNS-1123 labels). Run names are shorter, to leave room for the
# names the MPI Operator derives from them: see job.outputs.registry.MAX_RUN_NAME.
MAX_NAME = 63
# A run that cannot start. The MPI Operator sets no condition for these, so the client reads
# them from the run's pods (container waiting reasons, the PodScheduled condition) and from
# Warning events (the launcher Job's FailedCreate, the operator's on the MPIJob).
LAUNCHER_JOB_SUFFIX = "-launcher"  # the operator's batch/v1 Job that runs the launcher pod
JOB_KIND = "Job"
POD_KIND = "Pod"
IMAGE_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
CONFIG_REASONS = ("CreateContainerConfigError", "CreateContainerError")
UNSCHEDULABLE = "Unschedulable"  # PodScheduled=False reason
POD_SCHEDULED = "PodScheduled"
POD_STARTED_PHASES = ("Running", "Succeeded", "Failed")  # its containers ran
FAILED_CREATE = "FailedCreate"  # the Job controller's event when it cannot create a pod
OPERATOR_FAILED = "MPIJobFailed"  # the operator's event when it cannot create a worker pod
FAILED_MOUNT = "FailedMount"  # kubelet's event when a volume (Secret, ConfigMap) is missing
WARNING = "Warning"
# How long a wait (submit --wait, wait, logs --follow) lasts by default (seconds).
WAIT_TIMEOUT = 24 * 3600.0
# How long such a state may last before waiting gives up (seconds; 0: never give up).
# Unschedulable waits longer: a cluster autoscaler may be adding a node.
START_TIMEOUT = 300.0
UNSCHEDULABLE_TIMEOUT = 1800.0
