{{/*
Expand the name of the chart.
*/}}
{{- define "lineguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, truncated to 63 chars (DNS label limit).
*/}}
{{- define "lineguard.fullname" -}}
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
Chart name and version, as used by the chart label.
*/}}
{{- define "lineguard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "lineguard.labels" -}}
helm.sh/chart: {{ include "lineguard.chart" . }}
{{ include "lineguard.selectorLabels" . }}
app.kubernetes.io/version: {{ include "lineguard.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels (must stay stable across upgrades).
*/}}
{{- define "lineguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lineguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Image tag: .Values.image.tag, defaulting to the chart appVersion.
*/}}
{{- define "lineguard.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion | toString }}
{{- end }}

{{/*
Full image reference.
*/}}
{{- define "lineguard.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "lineguard.imageTag" .) }}
{{- end }}

{{/*
Path of the pipeline file inside the container.
*/}}
{{- define "lineguard.pipelineDir" -}}
/etc/lineguard
{{- end }}

{{/*
Drain timeout from the pipeline TOML (`drain_timeout_secs = N`), default 30.
Regex-based: good enough for the flat `[shutdown]` table the service uses.
*/}}
{{- define "lineguard.drainTimeoutSecs" -}}
{{- $m := regexFind "drain_timeout_secs[ \t]*=[ \t]*[0-9]+" (.Values.pipeline | default "") }}
{{- if $m }}
{{- regexFind "[0-9]+$" $m }}
{{- else }}
{{- 30 }}
{{- end }}
{{- end }}

{{/*
Fail early on inconsistent values.
*/}}
{{- define "lineguard.validate" -}}
{{- if not .Values.pipeline }}
{{- fail "values.pipeline must contain the pipeline TOML" }}
{{- end }}
{{- if regexMatch "(?m)^[ \t]*(\"?(sasl[._]password|ssl[._]key[._]password|ssl[._]key[._]pem|sasl[._]oauthbearer[._]client[._]secret)\"?|signing_key)[ \t]*=" .Values.pipeline }}
{{- fail "values.pipeline holds a credential (a SASL or TLS key password, a private key, or a retrain signing_key): the ConfigMap would show it to anyone who can read it. Put it in a Secret and name it under secrets.* (see values.yaml)" }}
{{- end }}
{{- $drain := include "lineguard.drainTimeoutSecs" . | atoi }}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- if le $grace $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than shutdown.drain_timeout_secs (%d) in the pipeline, or Kubernetes kills lineguard before it has drained and committed offsets" $grace $drain) }}
{{- end }}
{{- if include "lineguard.trainerEnabled" . }}
{{- range concat (.Values.extraArgs | default list) (.Values.trainer.extraArgs | default list) }}
{{- if or (eq (toString .) "--role") (hasPrefix "--role=" (toString .)) }}
{{- fail "with trainer.enabled the chart sets --role itself (inference for the main Deployment, trainer for the trainer); remove --role from extraArgs / trainer.extraArgs" }}
{{- end }}
{{- end }}
{{- if not .Values.trainer.persistence.mountPath }}
{{- fail "trainer.persistence.mountPath must be set: the trainer's writable state volume is mounted there" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Whether the chart runs a separate trainer (trainer.enabled); "true" or "".
*/}}
{{- define "lineguard.trainerEnabled" -}}
{{- if (.Values.trainer).enabled }}true{{ end }}
{{- end }}

{{/*
Name of the trainer's Deployment, Service and PVC: <fullname>-trainer (63 chars at most).
*/}}
{{- define "lineguard.trainer.fullname" -}}
{{- printf "%s-trainer" (include "lineguard.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/*
Labels of the trainer's objects (Deployment, Service, PVC): the common labels plus the component.
They keep app.kubernetes.io/name, so a ServiceMonitor selecting the chart's Services also finds the
trainer's Service.
*/}}
{{- define "lineguard.trainer.labels" -}}
{{ include "lineguard.labels" . }}
app.kubernetes.io/component: trainer
{{- end }}

{{/*
Selector labels of the trainer pod (must stay stable across upgrades). The main Deployment and
Service select on name + instance, which cannot change (a Deployment selector is immutable), so the
trainer pod carries its own app.kubernetes.io/name: otherwise the inference Deployment's selector, the
Service (and with it the ServiceMonitor) and any HPA/PDB on the inference pods would also match it.
*/}}
{{- define "lineguard.trainer.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-trainer" (include "lineguard.name" . | trunc 55 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: trainer
{{- end }}

{{/*
Labels of the trainer pod.
*/}}
{{- define "lineguard.trainer.podLabels" -}}
helm.sh/chart: {{ include "lineguard.chart" . }}
{{ include "lineguard.trainer.selectorLabels" . }}
app.kubernetes.io/version: {{ include "lineguard.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
PVC holding the trainer's state: trainer.persistence.existingClaim or the chart's own.
*/}}
{{- define "lineguard.trainer.claimName" -}}
{{- .Values.trainer.persistence.existingClaim | default (include "lineguard.trainer.fullname" .) }}
{{- end }}

{{/*
Line names of the pipeline's [lines.<name>.retrain] tables (regex-based, like drainTimeoutSecs),
joined with ", "; empty when there is none.
*/}}
{{- define "lineguard.retrainLines" -}}
{{- $names := list }}
{{- range regexFindAll "(?m)^[ \t]*\\[[ \t]*lines\\.[^\\]]+\\.retrain[ \t]*\\]" (.Values.pipeline | default "") -1 }}
{{- $names = append $names (regexReplaceAll "^[ \t]*\\[[ \t]*lines\\.([^\\]]+)\\.retrain[ \t]*\\]$" . "${1}") }}
{{- end }}
{{- join ", " $names }}
{{- end }}

{{/*
Pod annotations shared by the inference and trainer pods (without podAnnotations from values).
*/}}
{{- define "lineguard.podAnnotations" -}}
checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if .Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metrics.port | quote }}
prometheus.io/path: "/metrics"
{{- end }}
{{- end }}

{{/*
Pod spec fields shared by the inference and trainer pods, up to the containers.
*/}}
{{- define "lineguard.podSpecCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.initContainers }}
initContainers:
  {{- tpl (toYaml .) $ | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Container image and command.
*/}}
{{- define "lineguard.containerImage" -}}
image: {{ include "lineguard.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- with .Values.command }}
command:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The leading container args: run --pipeline <file>.
*/}}
{{- define "lineguard.runArgs" -}}
- run
- --pipeline
- {{ printf "%s/pipeline.toml" (include "lineguard.pipelineDir" .) | quote }}
{{- end }}

{{/*
Container environment list entries (metrics listener, brokers, extraEnv).
*/}}
{{- define "lineguard.containerEnv" -}}
- name: LINEGUARD__METRICS__LISTEN
  value: {{ printf "0.0.0.0:%v" .Values.metrics.port | quote }}
{{- with .Values.kafka.brokers }}
- name: LINEGUARD__KAFKA__BROKERS
  value: {{ . | quote }}
{{- end }}
{{- include "lineguard.secretEnv" . }}
{{- with .Values.extraEnv }}
{{- tpl (toYaml .) $ | nindent 0 }}
{{- end }}
{{- end }}

{{/*
Where each credential Secret is mounted.
*/}}
{{- define "lineguard.secretsDir" -}}
/etc/lineguard/secrets
{{- end }}

{{/*
Environment entries that point lineguard at the mounted credential files: paths only, never values.
Underscores in kafka.secret_files keys stand for the dots of librdkafka property names.
*/}}
{{- define "lineguard.secretEnv" -}}
{{- $dir := include "lineguard.secretsDir" . }}
{{- with .Values.secrets.kafkaSasl }}
{{- if .existingSecret }}
- name: LINEGUARD__KAFKA__SECRET_FILES__SASL_USERNAME
  value: {{ printf "%s/kafka-sasl/%s" $dir .usernameKey | quote }}
- name: LINEGUARD__KAFKA__SECRET_FILES__SASL_PASSWORD
  value: {{ printf "%s/kafka-sasl/%s" $dir .passwordKey | quote }}
{{- end }}
{{- end }}
{{- with .Values.secrets.kafkaTls }}
{{- if .existingSecret }}
- name: LINEGUARD__KAFKA__SECRET_FILES__SSL_CA_PEM
  value: {{ printf "%s/kafka-tls/%s" $dir .caKey | quote }}
{{- if .certKey }}
- name: LINEGUARD__KAFKA__SECRET_FILES__SSL_CERTIFICATE_PEM
  value: {{ printf "%s/kafka-tls/%s" $dir .certKey | quote }}
- name: LINEGUARD__KAFKA__SECRET_FILES__SSL_KEY_PEM
  value: {{ printf "%s/kafka-tls/%s" $dir .keyKey | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.secrets.modelSigning.existingSecret }}
{{- $file := printf "%s/model-signing/%s" $dir .Values.secrets.modelSigning.key }}
{{- range splitList ", " (include "lineguard.retrainLines" .) }}
{{- if . }}
- name: {{ printf "LINEGUARD__LINES__%s__RETRAIN__SIGNING_KEY_FILE" (upper .) }}
  value: {{ $file | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Volume mounts and volumes of the credential Secrets (read-only; readable by the pod's fsGroup, not by others).
*/}}
{{- define "lineguard.secretVolumeMounts" -}}
{{- range $name, $secret := dict "kafka-sasl" .Values.secrets.kafkaSasl "kafka-tls" .Values.secrets.kafkaTls "model-signing" .Values.secrets.modelSigning }}
{{- if $secret.existingSecret }}
- name: {{ $name }}
  mountPath: {{ printf "%s/%s" (include "lineguard.secretsDir" $) $name }}
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{- define "lineguard.secretVolumes" -}}
{{- range $name, $secret := dict "kafka-sasl" .Values.secrets.kafkaSasl "kafka-tls" .Values.secrets.kafkaTls "model-signing" .Values.secrets.modelSigning }}
{{- if $secret.existingSecret }}
- name: {{ $name }}
  secret:
    secretName: {{ $secret.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end }}

{{/*
envFrom, the metrics port and the probes.
*/}}
{{- define "lineguard.containerPortsAndProbes" -}}
{{- with .Values.extraEnvFrom }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
ports:
  - name: metrics
    containerPort: {{ .Values.metrics.port }}
    protocol: TCP
{{- with .Values.startupProbe }}
startupProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.livenessProbe }}
livenessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.readinessProbe }}
readinessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Volume mounts shared by the inference and trainer containers (pipeline, models, /tmp).
*/}}
{{- define "lineguard.volumeMounts" -}}
- name: pipeline
  mountPath: {{ include "lineguard.pipelineDir" . }}
  readOnly: true
- name: models
  mountPath: {{ .Values.model.mountPath }}
  {{- with .Values.model.subPath }}
  subPath: {{ . }}
  {{- end }}
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- include "lineguard.secretVolumeMounts" . }}
{{- end }}

{{/*
Volumes shared by the inference and trainer pods (pipeline, models, tmp).
*/}}
{{- define "lineguard.volumes" -}}
- name: pipeline
  configMap:
    name: {{ include "lineguard.fullname" . }}
    items:
      - key: pipeline.toml
        path: pipeline.toml
- name: models
  {{- if .Values.model.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.existingClaim }}
    readOnly: true
  {{- else if .Values.model.hostPath }}
  hostPath:
    path: {{ .Values.model.hostPath }}
    {{- with .Values.model.hostPathType }}
    type: {{ . }}
    {{- end }}
  {{- else }}
  emptyDir:
    {{- with .Values.model.emptyDir.sizeLimit }}
    sizeLimit: {{ . }}
    {{- else }} {}
    {{- end }}
  {{- end }}
- name: tmp
  {{- if or .Values.tmp.medium .Values.tmp.sizeLimit }}
  emptyDir:
    {{- with .Values.tmp.medium }}
    medium: {{ . }}
    {{- end }}
    {{- with .Values.tmp.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- include "lineguard.secretVolumes" . }}
{{- end }}
