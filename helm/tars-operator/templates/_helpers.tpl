{{/* The chart name, or nameOverride. */}}
{{- define "tars-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: fullnameOverride, else <release>-<chart> (just <release> when it
already contains the chart name). Truncated so that suffixes such as "-redis" stay within 63.
*/}}
{{- define "tars-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tars-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "tars-operator.labels" -}}
helm.sh/chart: {{ include "tars-operator.chart" . }}
{{ include "tars-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tars
{{- end }}

{{/* The operator pods' selector (immutable in a Deployment: never add to it). */}}
{{- define "tars-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tars-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tars-operator.operatorSelectorLabels" -}}
{{ include "tars-operator.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "tars-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tars-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tars-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "tars-operator.redisName" -}}
{{- printf "%s-redis" (include "tars-operator.fullname" .) }}
{{- end }}

{{/* The Redis URL passed to the operator; empty: let the operator use its own default. */}}
{{- define "tars-operator.redisUrl" -}}
{{- if .Values.redisUrl }}
{{- .Values.redisUrl }}
{{- else if .Values.redis.enabled }}
{{- printf "%s://%s.%s.svc:%d/0" (ternary "rediss" "redis" .Values.redis.tls.enabled) (include "tars-operator.redisName" .) .Release.Namespace (int .Values.redis.port) }}
{{- end }}
{{- end }}

{{/* The Secret and key holding the bundled Redis's password (generated unless auth.existingSecret). */}}
{{- define "tars-operator.redisSecret" -}}
{{- .Values.redis.auth.existingSecret | default (include "tars-operator.redisName" .) }}
{{- end }}

{{/*
The password of the operator's default Redis, as an EnvVar valueFrom (empty: none): redisUrl's
from redisPasswordSecret, else the bundled Redis's.
*/}}
{{- define "tars-operator.redisPasswordFrom" -}}
{{- if .Values.redisUrl }}
{{- with .Values.redisPasswordSecret.name }}
secretKeyRef:
  name: {{ . }}
  key: {{ $.Values.redisPasswordSecret.key }}
{{- end }}
{{- else if .Values.redis.enabled }}
secretKeyRef:
  name: {{ include "tars-operator.redisSecret" . }}
  key: {{ .Values.redis.auth.existingSecretKey }}
{{- end }}
{{- end }}

{{/* The rules the operator needs wherever it watches AgentPools (ClusterRole or per-namespace Role). */}}
{{- define "tars-operator.watchRules" -}}
# kopf lists and watches AgentPools (the per-pool loops start from these events) and patches them
# only to remove a finalizer a previous version left behind; get is implied by list anyway.
- apiGroups: ["tars.dev"]
  resources: ["agentpools"]
  verbs: ["get", "list", "watch", "patch"]
# Each reconcile cycle writes .status (replicas, ready, warm, conditions) with a merge patch.
- apiGroups: ["tars.dev"]
  resources: ["agentpools/status"]
  verbs: ["get", "patch"]
# Agent pods: kopf's pod index lists/watches them; the operator creates agents (warm pool,
# scale-up, rotation surge), annotates them draining (patch) and deletes idle/rotated ones.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
# Memory right-sizing resizes running agents in place: a patch of the pods/resize subresource
# (Kubernetes >= 1.33; patching .spec.containers[].resources on the pod itself is refused).
- apiGroups: [""]
  resources: ["pods/resize"]
  verbs: ["patch"]
# Agents carry an owner reference to their pool with blockOwnerDeletion, so that deleting a pool
# in the foreground waits for its agents. Clusters with the OwnerReferencesPermissionEnforcement
# admission plugin (common in hardened clusters) then require update on the owner's finalizers.
- apiGroups: ["tars.dev"]
  resources: ["agentpools/finalizers"]
  verbs: ["update"]
# Each pool's Secret (its agents' token, the default Redis's password) is server-side applied
# (tars_operator/security.py): an apply is a patch, and one that creates the object is also
# authorized as create. No get/list/watch: the operator derives tokens from its own key and never
# reads a Secret back.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create", "patch"]
{{- if .Values.networkPolicy.enabled }}
# Each pool's NetworkPolicy (ingress to the agents' port from the operator and Prometheus only),
# server-side applied like the Secret.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "patch"]
{{- end }}
# core/v1 Events about pools (ScaledUp, Draining, CreateFailed, ...): created, and patched to
# count a repeat on the first one (events.py aggregates like client-go), as kopf's own are created.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
