{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "kiln.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "kiln.fullname" -}}
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

{{- define "kiln.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kiln.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiln.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kiln.labels" -}}
helm.sh/chart: {{ include "kiln.chart" . }}
{{ include "kiln.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: inference-server
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kiln.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kiln.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag[@digest]; the tag follows gpu.enabled unless set. */}}
{{- define "kiln.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion (ternary "gpu" "cpu" .Values.gpu.enabled)) }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "kiln.backend" -}}
{{- .Values.server.backend | default (ternary "tensorrt" "onnxruntime" .Values.gpu.enabled) }}
{{- end }}

{{- define "kiln.storeClaimName" -}}
{{- .Values.store.persistence.existingClaim | default (printf "%s-store" (include "kiln.fullname" .)) }}
{{- end }}

{{- define "kiln.apiKeysSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-api-keys" (include "kiln.fullname" .)) }}
{{- end }}

{{- define "kiln.apiKeysSecretKey" -}}
{{- ternary .Values.auth.existingSecretKey "api-keys" (ne .Values.auth.existingSecret "") }}
{{- end }}

{{/* True when API keys are configured (the chart's Secret or an existing one). */}}
{{- define "kiln.authEnabled" -}}
{{- if not .Values.auth.allowUnauthenticated }}true{{ end }}
{{- end }}

{{/* The store can be shared by several pods only on a ReadWriteMany volume. */}}
{{- define "kiln.storeShared" -}}
{{- if or (not .Values.store.persistence.enabled) (has "ReadWriteMany" .Values.store.persistence.accessModes) }}true{{ end }}
{{- end }}

{{/* True when replicas share a PostgreSQL catalog. */}}
{{- define "kiln.catalogEnabled" -}}
{{- if or .Values.catalog.url .Values.catalog.existingSecret }}true{{ end }}
{{- end }}

{{- define "kiln.catalogSecretName" -}}
{{- .Values.catalog.existingSecret | default (printf "%s-catalog" (include "kiln.fullname" .)) }}
{{- end }}

{{- define "kiln.catalogSecretKey" -}}
{{- ternary .Values.catalog.existingSecretKey "url" (ne .Values.catalog.existingSecret "") }}
{{- end }}

{{/* Refuse settings that would break a graceful shutdown or several replicas. */}}
{{- define "kiln.validate" -}}
{{- $needed := add .Values.lifecycle.preStopSleepSeconds .Values.server.drainTimeoutSeconds }}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than lifecycle.preStopSleepSeconds + server.drainTimeoutSeconds (%d): queued requests would be killed before they drain" (int .Values.terminationGracePeriodSeconds) (int $needed)) }}
{{- end }}
{{- if and .Values.gpu.enabled (hasSuffix ".shared" .Values.gpu.resourceName) (gt (int .Values.gpu.count) 1) }}
{{- fail (printf "gpu.count must be 1 with the time-sliced resource %s" .Values.gpu.resourceName) }}
{{- end }}
{{- if and (not (include "kiln.catalogEnabled" .)) (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}
{{- fail "replicaCount > 1 and autoscaling need a catalog: set catalog.url or catalog.existingSecret to a PostgreSQL database (docs/OPERATIONS.md, \"Several replicas\"). Without one, replicas on one store serve different versions and destroy each other's files" }}
{{- end }}
{{- if gt (mulf (float64 .Values.catalog.resyncSeconds) 3.0) (float64 .Values.catalog.leaseTtlSeconds) }}
{{- fail (printf "catalog.resyncSeconds (%v) must be at most a third of catalog.leaseTtlSeconds (%v): a replica must catch up with the catalog several times within one lease" .Values.catalog.resyncSeconds .Values.catalog.leaseTtlSeconds) }}
{{- end }}
{{- if and .Values.catalog.url .Values.catalog.existingSecret }}
{{- fail "catalog: set only one of url and existingSecret" }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) }}
{{- fail "podDisruptionBudget: set only one of minAvailable and maxUnavailable (set the other to null)" }}
{{- end }}
{{- end }}
