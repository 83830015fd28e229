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
{{- $drain := include "lineguard.drainTimeoutSecs" . | atoi }}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- if le $grace $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than shutdown.drain_timeout_secs (%d) in the pipeline, or Kubernetes kills lineguard before it has drained and committed offsets" $grace $drain) }}
{{- end }}
{{- end }}
