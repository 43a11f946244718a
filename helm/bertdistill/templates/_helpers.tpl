{{/* Names are truncated to 63 characters: the limit for labels and DNS names. */}}
{{- define "bertdistill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bertdistill.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels for metadata; selectors get only the stable name and instance. */}}
{{- define "bertdistill.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | trunc 63 | trimSuffix "-" }}
{{ include "bertdistill.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "bertdistill.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bertdistill.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The service account the pipeline's step pods run as: it is granted nothing. */}}
{{- define "bertdistill.stepsServiceAccount" -}}
{{- printf "%s-steps" (include "bertdistill.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
