{{/*
Name of the chart, or nameOverride. Truncated to 63 characters (the DNS label limit).
*/}}
{{- define "meshwarden.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name used as the prefix of every resource: fullnameOverride, else the release name
when it already contains the chart name, else "<release>-<name>".
*/}}
{{- define "meshwarden.fullname" -}}
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
Value of the helm.sh/chart label: "<chart>-<version>".
*/}}
{{- define "meshwarden.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the operator pods. They never change across upgrades, because a
Deployment's selector is immutable.
*/}}
{{- define "meshwarden.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshwarden.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Standard labels on every resource of the chart.
*/}}
{{- define "meshwarden.labels" -}}
helm.sh/chart: {{ include "meshwarden.chart" . }}
{{ include "meshwarden.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: meshwarden
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Name of the ServiceAccount the operator runs as.
*/}}
{{- define "meshwarden.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "meshwarden.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: repository, then "@digest" when a digest is set, else ":tag" (the tag
defaults to the chart's appVersion).
*/}}
{{- define "meshwarden.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}
