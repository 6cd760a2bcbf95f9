{{/*
runPolicy of the MPIJob.
*/}}
{{- define "finetune-job.runPolicy" -}}
{{- $rp := .Values.runPolicy -}}
cleanPodPolicy: {{ $rp.cleanPodPolicy }}
backoffLimit: {{ $rp.backoffLimit }}
{{- if not (kindIs "invalid" $rp.ttlSecondsAfterFinished) }}
ttlSecondsAfterFinished: {{ $rp.ttlSecondsAfterFinished | int64 }}
{{- end }}
{{- if not (kindIs "invalid" $rp.activeDeadlineSeconds) }}
activeDeadlineSeconds: {{ $rp.activeDeadlineSeconds | int64 }}
{{- end }}
{{- with include "finetune-job.schedulingPolicy" . | trim }}
{{ . }}
{{- end }}
{{- end }}

{{/*
Pod template of the launcher (worker false) or of the workers (worker true).
Call with (dict "root" $ "worker" bool), plus for Kubeflow Trainer's JobSet templates
"containerName" (its MPI plugin mounts the ssh keys and hostfile only into a container named
"node") and "restartPolicy" (a batch Job's pod template needs one).
*/}}
{{- define "finetune-job.podTemplate" -}}
{{- $ := .root }}
{{- $v := $.Values }}
{{- $role := ternary "worker" "launcher" .worker -}}
metadata:
  labels:
    {{- include "finetune-job.labels" $ | nindent 4 }}
    app.kubernetes.io/component: {{ $role }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "finetune-job.configYaml" $ | sha256sum }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "finetune-job.serviceAccountName" $ }}
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds | int64 }}
  {{- with $v.image.pullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .worker }}
  {{- with $v.workers.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $v.workers.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.workers.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.workers.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- else }}
  {{- with $v.launcher.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.launcher.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- with .restartPolicy }}
  restartPolicy: {{ . }}
  {{- end }}
  containers:
    - name: {{ .containerName | default $role }}
      image: {{ include "finetune-job.image" $ }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- if .worker }}
      command:
        {{- toYaml $v.workers.command | nindent 8 }}
      {{- else }}
      # The image's entrypoint waits until every host of the hostfile answers on its sshd
      # (bounded), then runs the mpirun line.
      command:
        - /usr/bin/tini
        - --
        - /usr/local/bin/finetune-job-entrypoint
        - launcher
      args:
        {{- include "finetune-job.launcherCommand" $ | fromJsonArray | toYaml | nindent 8 }}
      {{- end }}
      env:
        {{- include "finetune-job.env" $ | nindent 8 }}
        {{- if not .worker }}
        - name: LAUNCHER_WAIT_SECONDS
          value: {{ $v.launcher.waitForHostsSeconds | int | quote }}
        {{- end }}
      {{- if .worker }}
      {{- $ports := include "finetune-job.metricsPorts" $ | fromJsonArray }}
      {{- with $ports }}
      ports:
        {{- range . }}
        - name: {{ .name }}
          containerPort: {{ .port }}
          protocol: TCP
        {{- end }}
      {{- end }}
      {{- with $v.workers.readinessProbe }}
      readinessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- end }}
      {{- with (ternary $v.workers.resources $v.launcher.resources .worker) }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        {{- include "finetune-job.volumeMounts" . | nindent 8 }}
  volumes:
    {{- include "finetune-job.volumes" . | nindent 4 }}
{{- end }}
