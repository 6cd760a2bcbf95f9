{{/*
The two objects of a run: the MPIJob and the ConfigMap with its config.yaml. mpijob.yaml and
configmap.yaml render them for `helm install`; submit-configmap.yaml renders the same two into
the manifest that the scheduled `finetune-job submit` starts from (it changes only the run's
name, labels, output and ConfigMap).
*/}}
{{- define "finetune-job.mpijob" -}}
{{- $gpus := dig "limits" "nvidia.com/gpu" "" (.Values.workers.resources | default dict) | toString }}
{{- if and $gpus (ne $gpus (toString .Values.slotsPerWorker)) }}
{{- fail (printf "slotsPerWorker (%v) must equal workers.resources.limits.nvidia.com/gpu (%s): one process per GPU" .Values.slotsPerWorker $gpus) }}
{{- end -}}
apiVersion: kubeflow.org/v2beta1
kind: MPIJob
metadata:
  name: {{ include "finetune-job.fullname" . }}
  labels:
    {{- include "finetune-job.labels" . | nindent 4 }}
    {{- with include "finetune-job.kueueLabels" . | trim }}
    {{- . | nindent 4 }}
    {{- end }}
spec:
  slotsPerWorker: {{ .Values.slotsPerWorker }}
  launcherCreationPolicy: {{ .Values.launcherCreationPolicy }}
  sshAuthMountPath: {{ .Values.sshAuthMountPath }}
  mpiImplementation: OpenMPI
  runPolicy:
    {{- include "finetune-job.runPolicy" . | nindent 4 }}
  mpiReplicaSpecs:
    Launcher:
      replicas: 1
      restartPolicy: {{ .Values.launcher.restartPolicy }}
      template:
        {{- include "finetune-job.podTemplate" (dict "root" . "worker" false) | nindent 8 }}
    Worker:
      replicas: {{ .Values.workers.replicas }}
      restartPolicy: {{ .Values.workers.restartPolicy }}
      template:
        {{- include "finetune-job.podTemplate" (dict "root" . "worker" true) | nindent 8 }}
{{- end }}

{{- define "finetune-job.trainingConfigMap" -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "finetune-job.configMapName" . }}
  labels:
    {{- include "finetune-job.labels" . | nindent 4 }}
data:
  # Read by every process as `finetune-job train --config /etc/finetune-job/config.yaml`.
  config.yaml: |
    {{- include "finetune-job.configYaml" . | nindent 4 }}
{{- end }}

{{/*
The manifest of the scheduled `finetune-job submit`: the MPIJob and its ConfigMap as above,
as one multi-document YAML (the same form as `helm template` output).
*/}}
{{- define "finetune-job.submitManifest" -}}
{{ include "finetune-job.mpijob" . }}
---
{{ include "finetune-job.trainingConfigMap" . }}
{{- end }}
