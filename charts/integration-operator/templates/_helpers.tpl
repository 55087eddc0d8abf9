{{/* The release's full name, at most 63 characters. */}}
{{- define "integration-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "integration-operator.serviceAccountName" -}}
{{- default (include "integration-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "integration-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "integration-operator.labels" -}}
{{ include "integration-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The operator image; the agent in every server pod runs the same one. */}}
{{- define "integration-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* What the operator may do in the namespaces it watches: the same rules
as manifests/rbac.yaml (a test compares them). */}}
{{- define "integration-operator.rules" -}}
- apiGroups: [integration.dev]
  resources: [integrationclusters]
  verbs: [get, list, watch, patch, update]        # patch/update: the cleanup finalizer
- apiGroups: [integration.dev]
  resources: [integrationclusters/status]
  verbs: [get, patch, update]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete, patch]   # patch: the desired-state annotation for the agent
- apiGroups: [""]
  resources: [pods/status]
  verbs: [patch]                                  # the integration.dev/online readiness gate
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, patch]        # database admin URL and configFrom (read; watched as metadata only, so a rotation rolls at once), generated credentials (create once)
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [get, list, watch, create, patch]        # managed cache and database servers
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, list, watch, create, patch]        # the agents' identity
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, watch, create, patch]        # the agents' permissions (a subset of ours)
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch]
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, list, watch, create, patch, update]  # listener Leases: created empty; the agents' Role (get/list/watch/update) is granted from here
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch]                       # cordoned nodes: their server pods are moved through the node workflow
{{- end -}}
