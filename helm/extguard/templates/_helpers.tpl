{{/*
The chart name, or nameOverride.
*/}}
{{- define "extguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: fullnameOverride, or the release name with the chart
name appended unless the release name already contains it. Kubernetes names are at most 63
characters.
*/}}
{{- define "extguard.fullname" -}}
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

{{- define "extguard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The labels of every object. The component is "guard" for the server's own objects.
*/}}
{{- define "extguard.labels" -}}
helm.sh/chart: {{ include "extguard.chart" . }}
{{ include "extguard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: guard
app.kubernetes.io/part-of: extguard
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The labels that select the pods. They must never change after the first install, because a
Deployment's selector is immutable.
*/}}
{{- define "extguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "extguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "extguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "extguard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "extguard.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Paths inside the container. */}}
{{- define "extguard.policyPath" -}}/etc/extguard/policy.yaml{{- end }}
{{- define "extguard.apiKeysDir" -}}/etc/extguard/api-keys{{- end }}
{{- define "extguard.spoolFile" -}}{{ .Values.spool.mountPath }}/usage.spool{{- end }}

{{/* Names of the environment variables that carry the Redis credentials. */}}
{{- define "extguard.redisPasswordEnv" -}}EXTGUARD_REDIS_PASSWORD{{- end }}
{{- define "extguard.redisUsernameEnv" -}}EXTGUARD_REDIS_USERNAME{{- end }}
{{- define "extguard.sentinelPasswordEnv" -}}EXTGUARD_REDIS_SENTINEL_PASSWORD{{- end }}

{{/*
The environment variable of the hash mask key: the policy's hash_key_env, else extguard's
default. With an existing policy ConfigMap the chart cannot read it, so the default applies.
*/}}
{{- define "extguard.hashKeyEnv" -}}
{{- if .Values.existingPolicy.configMap }}EXTGUARD_HASH_KEY
{{- else }}{{ default "EXTGUARD_HASH_KEY" .Values.policy.hash_key_env }}
{{- end }}
{{- end }}

{{/* Whether the spool volume is mounted: Redis is the store and the spool is on. */}}
{{- define "extguard.spoolMounted" -}}
{{- if and .Values.redis.enabled .Values.spool.enabled }}true{{ end }}
{{- end }}

{{/*
The policy file: `policy` from the values, with the settings that the chart owns written into
tenancy: the Redis store (redis.*), its credential variables (redis.auth), the spool file
(spool.*) and the API key hashes file (apiKeys.*). Fields of tenancy.store that the values do not
set keep the policy's own value. Without a `policy` value and without those settings, the
chart's files/policy.yaml is used as it is, comments included.
*/}}
{{- define "extguard.policy" -}}
{{- $chartOwned := or .Values.redis.enabled .Values.apiKeys.existingSecret }}
{{- if and (not .Values.policy) (not $chartOwned) }}
{{- .Files.Get "files/policy.yaml" }}
{{- else }}
{{- $policy := deepCopy (.Values.policy | default (.Files.Get "files/policy.yaml" | fromYaml)) }}
{{- if $chartOwned }}
{{- if not (kindIs "map" $policy.tenancy) }}
{{- fail "redis.enabled and apiKeys.existingSecret need a `tenancy` section with tenants in `policy`" }}
{{- end }}
{{- end }}
{{- if .Values.redis.enabled }}
{{- $store := dict "backend" "redis" "url" .Values.redis.url "timeout_ms" .Values.redis.timeoutMs "failure_mode" .Values.redis.failureMode "spool_max" .Values.redis.spoolMax }}
{{- if ne .Values.redis.mode "standalone" }}
{{- $_ := set $store "mode" .Values.redis.mode }}
{{- end }}
{{- if eq .Values.redis.mode "sentinel" }}
{{- if or (not .Values.redis.sentinelMaster) (not .Values.redis.sentinels) }}
{{- fail "redis.mode sentinel needs redis.sentinelMaster and at least one entry in redis.sentinels" }}
{{- end }}
{{- $_ := set $store "sentinel_master" .Values.redis.sentinelMaster }}
{{- $_ := set $store "sentinels" .Values.redis.sentinels }}
{{- end }}
{{- if .Values.redis.auth.existingSecret }}
{{- $_ := set $store "password_env" (include "extguard.redisPasswordEnv" .) }}
{{- if .Values.redis.auth.usernameKey }}
{{- $_ := set $store "username_env" (include "extguard.redisUsernameEnv" .) }}
{{- end }}
{{- if and (eq .Values.redis.mode "sentinel") .Values.redis.auth.sentinelPasswordKey }}
{{- $_ := set $store "sentinel_password_env" (include "extguard.sentinelPasswordEnv" .) }}
{{- end }}
{{- end }}
{{- if .Values.spool.enabled }}
{{- $_ := set $store "spool_file" (include "extguard.spoolFile" .) }}
{{- end }}
{{- $_ := set $policy.tenancy "store" (mergeOverwrite (deepCopy (default (dict) $policy.tenancy.store)) $store) }}
{{- end }}
{{- if .Values.apiKeys.existingSecret }}
{{- $_ := set $policy.tenancy "api_keys_file" (printf "%s/%s" (include "extguard.apiKeysDir" .) .Values.apiKeys.key) }}
{{- end }}
{{- toYaml $policy }}
{{- end }}
{{- end }}

{{/*
The name of the ConfigMap that holds the policy, and the key of the file in it.
*/}}
{{- define "extguard.policyConfigMap" -}}
{{- default (printf "%s-policy" (include "extguard.fullname" .)) .Values.existingPolicy.configMap }}
{{- end }}
{{- define "extguard.policyKey" -}}
{{- if .Values.existingPolicy.configMap }}{{ .Values.existingPolicy.key }}{{ else }}policy.yaml{{ end }}
{{- end }}

{{/* The namespace of the Envoy Gateway policies. */}}
{{- define "extguard.gatewayNamespace" -}}
{{- default .Release.Namespace .Values.gateway.namespace }}
{{- end }}

{{/* A backendRef to extguard's gRPC Service port, with its namespace when that differs. */}}
{{- define "extguard.backendRef" -}}
- name: {{ include "extguard.fullname" . }}
  {{- if ne (include "extguard.gatewayNamespace" .) .Release.Namespace }}
  namespace: {{ .Release.Namespace }}
  {{- end }}
  port: {{ .Values.service.grpcPort }}
{{- end }}

{{/*
The container's environment: secrets as secretKeyRef variables, the OTEL_* settings and extraEnv.
*/}}
{{- define "extguard.env" -}}
{{- if .Values.hashKey.existingSecret }}
- name: {{ include "extguard.hashKeyEnv" . }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.hashKey.existingSecret }}
      key: {{ .Values.hashKey.key }}
{{- end }}
{{- if .Values.redis.auth.existingSecret }}
- name: {{ include "extguard.redisPasswordEnv" . }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.auth.existingSecret }}
      key: {{ .Values.redis.auth.passwordKey }}
{{- if .Values.redis.auth.usernameKey }}
- name: {{ include "extguard.redisUsernameEnv" . }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.auth.existingSecret }}
      key: {{ .Values.redis.auth.usernameKey }}
{{- end }}
{{- if and (eq .Values.redis.mode "sentinel") .Values.redis.auth.sentinelPasswordKey }}
- name: {{ include "extguard.sentinelPasswordEnv" . }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.auth.existingSecret }}
      key: {{ .Values.redis.auth.sentinelPasswordKey }}
{{- end }}
{{- end }}
{{- if .Values.tracing.enabled }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ required "tracing.endpoint is required when tracing.enabled is true" .Values.tracing.endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ default (include "extguard.fullname" .) .Values.tracing.serviceName | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.namespace.name={{ .Release.Namespace }},k8s.pod.name=$(POD_NAME)"
- name: OTEL_TRACES_SAMPLER
  value: {{ .Values.tracing.sampler | quote }}
{{- with .Values.tracing.samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{- toYaml . | nindent 0 }}
{{- end }}
{{- end }}
