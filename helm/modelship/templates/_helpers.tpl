{{/* Names and labels shared by every template. */}}
{{- define "modelship.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "modelship.labels" -}}
app.kubernetes.io/name: modelship-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "modelship.selectorLabels" -}}
app.kubernetes.io/name: modelship-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "modelship.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "modelship.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "modelship.image" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{/* The EC2NodeClass every NodePool uses: an existing one, the chart's default, or none. */}}
{{- define "modelship.nodeClassName" -}}
{{- if .Values.nodePools.nodeClassName -}}
{{- .Values.nodePools.nodeClassName -}}
{{- else if .Values.nodePools.defaultNodeClass.create -}}
{{- .Values.nodePools.defaultNodeClass.name -}}
{{- end -}}
{{- end -}}

{{/* Namespaces that get the runtime ServiceAccount. */}}
{{- define "modelship.runtimeNamespaces" -}}
{{- $namespaces := .Values.runtimeServiceAccount.namespaces -}}
{{- if not $namespaces -}}
{{- $namespaces = prepend .Values.watchNamespaces .Release.Namespace -}}
{{- end -}}
{{- $namespaces | uniq | toJson -}}
{{- end -}}

{{/* Verbs on the kinds the operator applies (server-side apply needs create and patch) and
prunes (list, delete); `get` reads before applying and observes the workload. */}}
{{- define "modelship.writeVerbs" -}}[get, list, watch, create, update, patch, delete]{{- end -}}

{{/* Namespaced permissions, from operator/handlers.py, apply.py and kopf. Children are watched
(a change wakes their owner), applied, replaced when edited by hand (update) and deleted. An
optional integration that is off keeps `list` and `watch` only: pruning lists every kind it could
ever have created and finds nothing of a kind that is off. */}}
{{- define "modelship.namespacedRules" -}}
# kopf: watch ModelDeployments, keep its finalizer and annotations on them.
- apiGroups: [modelship.dev]
  resources: [modeldeployments]
  verbs: [get, list, watch, patch]
# kopf writes status through the status subresource.
- apiGroups: [modelship.dev]
  resources: [modeldeployments/status]
  verbs: [get, patch]
# Children carry ownerReferences with blockOwnerDeletion (OwnerReferencesPermissionEnforcement).
- apiGroups: [modelship.dev]
  resources: [modeldeployments/finalizers]
  verbs: [update]
# Events for every condition and phase transition (status.py, kopf.event).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Runtime workload and its Service and PodDisruptionBudget (render.py, apply.py).
- apiGroups: [apps]
  resources: [deployments]
  verbs: {{ include "modelship.writeVerbs" . }}
- apiGroups: [""]
  resources: [services]
  verbs: {{ include "modelship.writeVerbs" . }}
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: {{ include "modelship.writeVerbs" . }}
# The one-off Neuron compile Job of a model whose serving node cannot compile it
# (operator/compilejob.py); watched to apply the serving workload when it succeeds.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
# Runtime pods are watched to tell NodeProvisioning, WeightsLoading and crash loops apart.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [leaderworkerset.x-k8s.io]
  resources: [leaderworkersets]
  verbs: {{ if .Values.leaderWorkerSet.enabled }}{{ include "modelship.writeVerbs" . }}{{ else }}[list, watch]{{ end }}
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: {{ if eq .Values.autoscaler "keda" }}{{ include "modelship.writeVerbs" . }}{{ else }}[list, watch]{{ end }}
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: {{ if eq .Values.autoscaler "hpa" }}{{ include "modelship.writeVerbs" . }}{{ else }}[list, watch]{{ end }}
- apiGroups: [monitoring.coreos.com]
  resources: [podmonitors]
  verbs: {{ if .Values.monitoring.podMonitor }}{{ include "modelship.writeVerbs" . }}{{ else }}[list, watch]{{ end }}
{{- end -}}

{{/* Cluster-scoped permissions: kopf's discovery and Karpenter's pools. */}}
{{- define "modelship.clusterRules" -}}
# kopf: runtime observation of CRDs and namespaces (kopf's documented RBAC).
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
# Shared Karpenter pools: applied as the combination of their users and deleted with the last
# (apply.py sync_pool), watched so a deleted pool comes back; NodeClaims are watched to report
# node provisioning.
- apiGroups: [karpenter.sh]
  resources: [nodepools]
  verbs: {{ if eq .Values.nodePools.mode "karpenter" }}{{ include "modelship.writeVerbs" . }}{{ else }}[list, watch]{{ end }}
- apiGroups: [karpenter.sh]
  resources: [nodeclaims]
  verbs: [list, watch]
- apiGroups: [karpenter.k8s.aws]
  resources: [ec2nodeclasses]
  verbs: {{ if eq .Values.nodePools.mode "karpenter" }}{{ include "modelship.writeVerbs" . }}{{ else }}[list, watch]{{ end }}
{{- end -}}
