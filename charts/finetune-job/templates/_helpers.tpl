{{/*
Chart name (nameOverride wins), at most 63 characters.
*/}}
{{- define "finetune-job.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the MPIJob and of every resource: the release name, plus the chart name when the
release name does not hold it. At most 63 characters (DNS label).
*/}}
{{- define "finetune-job.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "finetune-job.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "finetune-job.labels" -}}
helm.sh/chart: {{ include "finetune-job.chart" . }}
{{ include "finetune-job.selectorLabels" . }}
app.kubernetes.io/version: {{ include "finetune-job.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune-job
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "finetune-job.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-job.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
ServiceAccount of the launcher and worker pods.
*/}}
{{- define "finetune-job.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-job.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
ServiceAccount of the scheduled submit Job (RBAC for MPIJobs in the namespace).
*/}}
{{- define "finetune-job.submitServiceAccountName" -}}
{{- printf "%s-submit" (include "finetune-job.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name of the ConfigMap holding the job's config file.
*/}}
{{- define "finetune-job.configMapName" -}}
{{- printf "%s-training" (include "finetune-job.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-job.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "finetune-job.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "finetune-job.imageTag" .) }}
{{- end }}

{{/*
The job's config file (config.yaml), from .Values.training. The checksum/config annotation
hashes this same text.
*/}}
{{- define "finetune-job.configYaml" -}}
{{- toYaml .Values.training }}
{{- end }}

{{/*
OMP_NUM_THREADS of each training process: workers.ompNumThreads, or the worker's whole-core
CPU limit (else request) divided by slotsPerWorker, at least 1.
*/}}
{{- define "finetune-job.ompNumThreads" -}}
{{- $n := int .Values.workers.ompNumThreads }}
{{- if eq $n 0 }}
{{- $res := .Values.workers.resources | default dict }}
{{- $cpu := dig "limits" "cpu" (dig "requests" "cpu" "" $res) $res | toString }}
{{- if regexMatch "^[0-9]+(\\.0+)?$" $cpu }}
{{- $n = div (int (float64 $cpu)) (int .Values.slotsPerWorker) | int }}
{{- end }}
{{- end }}
{{- max $n 1 }}
{{- end }}

{{/*
Environment of the launcher and workers, as a YAML list. Processes started by mpirun over SSH
do not inherit a pod's environment: every name here is also forwarded with `-x`.
*/}}
{{- define "finetune-job.env" -}}
- name: OMP_NUM_THREADS
  value: {{ include "finetune-job.ompNumThreads" . | quote }}
{{- with include "finetune-job.s3Env" . | trim }}
{{ . }}
{{- end }}
{{- if .Values.metrics.pushgatewayAuth.existingSecret }}
- name: FINETUNE_PUSHGATEWAY_USERNAME_FILE
  value: {{ printf "%s/username" (include "finetune-job.pushgatewayAuthPath" .) | quote }}
- name: FINETUNE_PUSHGATEWAY_PASSWORD_FILE
  value: {{ printf "%s/password" (include "finetune-job.pushgatewayAuthPath" .) | quote }}
{{- end }}
{{- if .Values.cudaCache.enabled }}
- name: CUDA_CACHE_PATH
  value: {{ .Values.cudaCache.path | quote }}
- name: CUDA_CACHE_MAXSIZE
  value: {{ .Values.cudaCache.maxSize | int64 | quote }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
S3 endpoint, region and keys, as a YAML list (empty when none is set): the one place the
launcher, the workers and the scheduled submit pod get their S3 access from. A web identity
comes from the ServiceAccount instead ("finetune-job.serviceAccountAnnotations").
*/}}
{{- define "finetune-job.s3Env" -}}
{{- with .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}
{{- end }}

{{/*
Annotations of the ServiceAccounts of the job pods and of the submit pod (cloud identity,
e.g. eks.amazonaws.com/role-arn): both reach the same S3.
*/}}
{{- define "finetune-job.serviceAccountAnnotations" -}}
{{- with .Values.serviceAccount.annotations }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/*
Names passed to mpirun with -x: the fixed ones of the launcher line, then every variable of
"finetune-job.env" (OMP_NUM_THREADS is among the fixed ones) and the web-identity pair.
*/}}
{{- define "finetune-job.forwardedEnv" -}}
{{- $names := list "LD_LIBRARY_PATH" "PATH" "OMP_NUM_THREADS" }}
{{- range (include "finetune-job.env" . | fromYamlArray) }}
{{- if not (has .name $names) }}
{{- $names = append $names .name }}
{{- end }}
{{- end }}
{{- if .Values.s3.webIdentity }}
{{- $names = concat $names (list "AWS_ROLE_ARN" "AWS_WEB_IDENTITY_TOKEN_FILE") }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/*
The launcher's command: mpirun over workers.replicas × slotsPerWorker processes, the flags of
the MPI Operator's Open MPI launcher line, then `finetune-job train --config`.
*/}}
{{- define "finetune-job.launcherCommand" -}}
{{- $np := mul (int .Values.workers.replicas) (int .Values.slotsPerWorker) }}
{{- $cmd := list "mpirun" "-np" (toString $np) "-bind-to" "none" "-map-by" "slot" }}
{{- range (include "finetune-job.forwardedEnv" . | fromJsonArray) }}
{{- $cmd = concat $cmd (list "-x" .) }}
{{- end }}
{{- $cmd = concat $cmd (list "-mca" "pml" "ob1" "-mca" "btl" "^openib") }}
{{- /* On SIGTERM, mpirun forwards it to the ranks and SIGKILLs them after this many seconds
  (Open MPI's default is a few): leave them the pod's grace period, less a margin, to write
  the step's checkpoint. */}}
{{- $sigkill := max 1 (sub (int .Values.terminationGracePeriodSeconds) 10) }}
{{- $cmd = concat $cmd (list "-mca" "odls_base_sigkill_timeout" (toString $sigkill)) }}
{{- $cmd = concat $cmd (.Values.mpirun.extraArgs | default list) }}
{{- $cmd = concat $cmd (list "finetune-job" "train" "--config" "/etc/finetune-job/config.yaml") }}
{{- toJson $cmd }}
{{- end }}

{{/*
Volumes of the launcher and worker pods ($.worker: also /dev/shm and the CUDA cache).
Call with (dict "root" $ "worker" true).
*/}}
{{- define "finetune-job.volumes" -}}
{{- $v := .root.Values -}}
- name: config
  configMap:
    name: {{ include "finetune-job.configMapName" .root }}
{{- if and .worker $v.workers.shmSize }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $v.workers.shmSize }}
{{- end }}
{{- with and .worker $v.metrics.pushgatewayAuth.existingSecret }}
- name: pushgateway-auth
  secret:
    secretName: {{ . }}
    defaultMode: 0440  # read by the non-root user through fsGroup
    items:
      - key: {{ $v.metrics.pushgatewayAuth.usernameKey }}
        path: username
      - key: {{ $v.metrics.pushgatewayAuth.passwordKey }}
        path: password
{{- end }}
{{- if and .worker $v.cudaCache.enabled }}
- name: cuda-cache
  {{- toYaml (required "cudaCache.enabled needs cudaCache.volume, a volume source such as persistentVolumeClaim" ($v.cudaCache.volume | default nil)) | nindent 2 }}
{{- end }}
{{- with $v.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Where the workers see the Pushgateway's basic-auth Secret (files username and password).
*/}}
{{- define "finetune-job.pushgatewayAuthPath" -}}
/var/run/secrets/finetune-job/pushgateway
{{- end }}

{{- define "finetune-job.volumeMounts" -}}
{{- $v := .root.Values -}}
- name: config
  mountPath: /etc/finetune-job
  readOnly: true
{{- if and .worker $v.workers.shmSize }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- if and .worker $v.metrics.pushgatewayAuth.existingSecret }}
- name: pushgateway-auth
  mountPath: {{ include "finetune-job.pushgatewayAuthPath" .root }}
  readOnly: true
{{- end }}
{{- if and .worker $v.cudaCache.enabled }}
- name: cuda-cache
  mountPath: {{ $v.cudaCache.path }}
{{- end }}
{{- with $v.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Metrics ports of a worker: one per slot, training.metrics_port + local rank. Empty when
metrics_port is 0. A list of {name, port}.
*/}}
{{- define "finetune-job.metricsPorts" -}}
{{- $ports := list }}
{{- $base := int (.Values.training.metrics_port | default 0) }}
{{- if gt $base 0 }}
{{- range $r := until (int .Values.slotsPerWorker) }}
{{- $name := ternary "metrics" (printf "metrics-%d" $r) (eq $r 0) }}
{{- $ports = append $ports (dict "name" $name "port" (add $base $r)) }}
{{- end }}
{{- end }}
{{- toJson $ports }}
{{- end }}
