{{/* Chart name, truncated to the 63 characters names allow. */}}
{{- define "kord.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the operator's objects. */}}
{{- define "kord.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Conventional labels. */}}
{{- define "kord.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "kord.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kord
{{- end }}

{{/* Selects the operator pod. */}}
{{- define "kord.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kord.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kord.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kord.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the operator's (Cluster)Role and binding: a ClusterRole is cluster-wide, so it also
names the release's namespace (two releases in two namespaces must not collide). */}}
{{- define "kord.rbacName" -}}
{{- if .Values.operator.watchNamespaceOnly }}
{{- include "kord.fullname" . }}
{{- else }}
{{- printf "%s-%s" (include "kord.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
