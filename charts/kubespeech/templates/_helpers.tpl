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
kubespeech.namespacedRules: what the operator does inside a watched namespace. Children are listed by the
stack's labels (to find and prune the ones no longer wanted), written with server-side apply (patch, and
create when the apply creates the object) and deleted when pruned; Deployments and StatefulSets are also watched so the status follows their readiness;
pods are read for scheduling messages and annotated with a deletion cost before a pool scales down; Events are posted on SpeechDeployments.
tests/operator/test_rbac.py runs the operator with exactly these rules and compares them with the requests
it made.
*/}}
{{- define "kubespeech.namespacedRules" -}}
- apiGroups: ["kubespeech.io"]
  resources: ["speechdeployments"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["kubespeech.io"]
  resources: ["speechdeployments/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["serviceaccounts", "configmaps", "persistentvolumeclaims", "services"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies", "ingresses"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects", "triggerauthentications"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/*
kubespeech.clusterRules: cluster-scoped reads: CRDs (kopf scans them to resolve the resources it watches;
the ServiceMonitor check uses discovery, open to every authenticated client), and namespaces only when the
operator watches a list of them (kopf then watches namespaces to follow which of them exist).
*/}}
{{- define "kubespeech.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.operator.watchNamespaces }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}

{{/*
kubespeech.stackName: the name of the SpeechDeployment the chart creates: speechDeployment.name, else the
full name cut to the CRD's 30 characters (children are named "<name>-<component>").
*/}}
{{- define "kubespeech.stackName" -}}
{{- default (include "kubespeech.fullname" . | trunc 30 | trimSuffix "-") .Values.speechDeployment.name }}
{{- end }}

{{/*
kubespeech.stackLabels: labels of the objects that belong to the chart's SpeechDeployment (its Secrets and
itself); not the operator's selector labels, so the operator Deployment never selects them.
*/}}
{{- define "kubespeech.stackLabels" -}}
helm.sh/chart: {{ include "kubespeech.chart" . }}
app.kubernetes.io/name: {{ include "kubespeech.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: speech-stack
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubespeech
{{- end }}
