{{/* The chart's name (app.kubernetes.io/name). */}}
{{- define "sep.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The name of every object: the release name if it already contains the chart name. */}}
{{- define "sep.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "sep.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "sep.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "sep.labels" -}}
app.kubernetes.io/name: {{ include "sep.name" . }}
app.kubernetes.io/part-of: secured-endpoint-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "sep.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sep.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sep.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sep.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The watched namespaces (namespaced mode), checked. */}}
{{- define "sep.namespaces" -}}
{{- if not (has .Values.mode (list "cluster" "namespaced")) }}
{{- fail (printf "mode must be cluster or namespaced, not %q" .Values.mode) }}
{{- end }}
{{- if and (eq .Values.mode "namespaced") (not .Values.namespaces) }}
{{- fail "mode namespaced needs namespaces: the namespaces the operator watches" }}
{{- end }}
{{- if eq .Values.mode "namespaced" }}
{{- toJson .Values.namespaces }}
{{- else }}
{{- toJson list }}
{{- end }}
{{- end }}

{{/* Does a namespace name use a pattern (then kopf must list namespaces to match it)? */}}
{{- define "sep.patterns" -}}
{{- $patterns := list }}
{{- range (include "sep.namespaces" . | fromJsonArray) }}
{{- if regexMatch "[!*?,]" . }}{{ $patterns = append $patterns . }}{{ end }}
{{- end }}
{{- if $patterns }}true{{ end }}
{{- end }}

{{/* What the operator may do in a namespace it serves (rbac-namespaced.yaml's Role). */}}
{{- define "sep.namespacedRules" -}}
# The custom resource (watched; its finalizer set by a merge patch), its status, and the finalizers
# subresource (for blockOwnerDeletion on the token Secret's ownerReference).
- apiGroups: [secured-endpoint.io]
  resources: [securedendpoints]
  verbs: [get, list, watch, patch]
- apiGroups: [secured-endpoint.io]
  resources: [securedendpoints/status]
  verbs: [patch]
- apiGroups: [secured-endpoint.io]
  resources: [securedendpoints/finalizers]
  verbs: [update]
# Credentials and trust stores are read and watched; token Secrets are created, patched and deleted.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}
