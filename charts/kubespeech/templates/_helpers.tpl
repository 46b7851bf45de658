{{/*
kubespeech.name: the chart name, or nameOverride; trimmed to a DNS label.
*/}}
{{- define "kubespeech.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
kubespeech.fullname: the base name of every object: fullnameOverride, else "<release>-<name>" (or just the
release name when it already contains the chart name).
*/}}
{{- define "kubespeech.fullname" -}}
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
kubespeech.chart: "<chart>-<version>" for the helm.sh/chart label.
*/}}
{{- define "kubespeech.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
kubespeech.selectorLabels: the immutable labels the operator Deployment selects its pod by.
*/}}
{{- define "kubespeech.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubespeech.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
kubespeech.labels: the standard labels on every object of the chart.
*/}}
{{- define "kubespeech.labels" -}}
helm.sh/chart: {{ include "kubespeech.chart" . }}
{{ include "kubespeech.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubespeech
{{- end }}

{{/*
kubespeech.serviceAccountName: the operator's ServiceAccount, created or given.
*/}}
{{- define "kubespeech.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubespeech.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
kubespeech.image: "repository:tag" or "repository@digest"; the tag defaults to the chart's appVersion.
*/}}
{{- define "kubespeech.image" -}}
{{- $image := .Values.operator.image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
kubespeech.namespacedRules: what the operator does inside a watched namespace. Children are read with get,
created with create and changed with JSON merge patch (never list/watch: kopf watches only
SpeechDeployments); Jobs are also deleted (a Job's template is immutable); pods are only read for
scheduling messages; Events are posted on SpeechDeployments.
*/}}
{{- define "kubespeech.namespacedRules" -}}
- apiGroups: ["kubespeech.io"]
  resources: ["speechdeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kubespeech.io"]
  resources: ["speechdeployments/status"]
  verbs: ["get", "patch"]
- apiGroups: [""]
  resources: ["serviceaccounts", "secrets", "configmaps", "persistentvolumeclaims", "services"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies", "ingresses"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
kubespeech.clusterRules: cluster-scoped reads: namespaces (kopf resolves watched namespaces) and CRDs
(kopf's resource scanning; the ServiceMonitor check uses discovery, open to every authenticated client).
*/}}
{{- define "kubespeech.clusterRules" -}}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
{{- end }}
