{{/*
runPolicy.schedulingPolicy of the MPIJob, when runPolicy.schedulingPolicy.enabled: the PodGroup
an MPI Operator started with --gang-scheduling (Volcano or scheduler-plugins) creates. The
operator also sets the pods' schedulerName itself, so the chart never renders one.

minAvailable defaults to what can ever be pending together: with WaitForWorkersReady the
launcher is created only after every worker is Ready, so the group is the workers alone; the
operator's own default (workers + 1) would wait for a launcher that never comes
(kubeflow/mpi-operator#608). With AtStartup the launcher starts with the workers: workers + 1.
*/}}
{{- define "finetune-job.schedulingPolicy" -}}
{{- $sp := .Values.runPolicy.schedulingPolicy | default dict }}
{{- if $sp.enabled }}
{{- $workers := int .Values.workers.replicas }}
{{- $waits := eq .Values.launcherCreationPolicy "WaitForWorkersReady" }}
{{- $min := ternary $workers (add1 $workers) $waits }}
{{- if not (kindIs "invalid" $sp.minAvailable) }}
{{- $min = int $sp.minAvailable }}
{{- if and $waits (gt $min $workers) }}
{{- fail (printf "runPolicy.schedulingPolicy.minAvailable (%d) is more than workers.replicas (%d): with launcherCreationPolicy WaitForWorkersReady the launcher starts only after every worker is Ready, so the PodGroup would never be complete" $min $workers) }}
{{- end }}
{{- end -}}
schedulingPolicy:
  minAvailable: {{ $min }}
  {{- with $sp.queue }}
  queue: {{ . | quote }}
  {{- end }}
  {{- with $sp.priorityClass }}
  priorityClass: {{ . | quote }}
  {{- end }}
  {{- with $sp.minResources }}
  minResources:
    {{- range $name, $quantity := . }}
    {{ $name }}: {{ $quantity | toString | quote }}
    {{- end }}
  {{- end }}
  {{- if not (kindIs "invalid" $sp.scheduleTimeoutSeconds) }}
  scheduleTimeoutSeconds: {{ $sp.scheduleTimeoutSeconds | int }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
Kueue's labels on the job object (MPIJob or TrainJob): the LocalQueue that admits it and its
WorkloadPriorityClass. Empty without kueue.queueName.
*/}}
{{- define "finetune-job.kueueLabels" -}}
{{- with .Values.kueue }}
{{- if .queueName }}
kueue.x-k8s.io/queue-name: {{ .queueName | quote }}
{{- with .priorityClass }}
kueue.x-k8s.io/priority-class: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
