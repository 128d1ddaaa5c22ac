{{/* Chart name, truncated to a DNS label. */}}
{{- define "mulambda.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every resource name: RELEASE, or RELEASE-NAME when the release name lacks the chart name. */}}
{{- define "mulambda.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mulambda.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "mulambda.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mulambda
{{- end }}

{{/* Selector labels of one component: include "mulambda.selectorLabels" (list . "operator") */}}
{{- define "mulambda.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "mulambda.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "mulambda.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "mulambda.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-operator" (include "mulambda.fullname" .)) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Fully qualified so companions in other namespaces reach it too. With per-role
users it names the companions' user: the operator copies this URL into every
executor pod; the operator and the selector log in as themselves
(MULAMBDA_REDIS_USERNAME wins over the URL's user). */}}
{{- define "mulambda.redisUrl" -}}
{{- $url := "" }}
{{- if .Values.redis.enabled }}
{{- $url = printf "redis://%s-redis.%s.svc.%s:6379/0" (include "mulambda.fullname" .) .Release.Namespace .Values.settings.clusterDomain }}
{{- else }}
{{- $url = required "redis.url is required when redis.enabled is false" .Values.redis.url }}
{{- end }}
{{- if and .Values.redis.acl.enabled (regexMatch "^rediss?://" $url) }}
{{- $url = regexReplaceAll "^(rediss?://)([^@/]*@)?" $url "${1}mulambda-companion@" }}
{{- end }}
{{- $url }}
{{- end }}

{{/* Name of the Secret with one store role's credentials: include "mulambda.storeSecret" (list . "operator") */}}
{{- define "mulambda.storeSecret" -}}
{{- printf "%s-store-%s" (include "mulambda.fullname" (index . 0)) (index . 1) }}
{{- end }}

{{/*
One store role's password: include "mulambda.storePassword" (list . "operator").
Kept from the release namespace's Secret when it exists (helm lookup), else
generated, once per render: every template that asks gets the same one (it is
remembered in .Values for the rest of the render), so the Secrets and the
checksums below agree.
*/}}
{{- define "mulambda.storePassword" -}}
{{- $root := index . 0 }}
{{- $role := index . 1 }}
{{- if not (hasKey $root.Values "_storePasswords") }}
{{- $_ := set $root.Values "_storePasswords" (dict) }}
{{- end }}
{{- $known := $root.Values._storePasswords }}
{{- if not (hasKey $known $role) }}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace (include "mulambda.storeSecret" (list $root $role)) }}
{{- if and $existing $existing.data (hasKey $existing.data "password") }}
{{- $_ := set $known $role (index $existing.data "password" | b64dec) }}
{{- else }}
{{- $_ := set $known $role (randAlphaNum 32) }}
{{- end }}
{{- end }}
{{- get $known $role }}
{{- end }}

{{/*
What pods that log in to the store roll on: the roles' passwords, nothing else.
A checksum of the rendered store-users.yaml also changed when a namespace got a
copy of a Secret, and on every upgrade after the first install (whose passwords
were generated again for each template that included it): the store restarted
empty.
*/}}
{{- define "mulambda.storeUsersChecksum" -}}
{{- $root := . }}
{{- $lines := list }}
{{- range $role := include "mulambda.storeRoles" . | splitList "," }}
{{- $lines = append $lines (printf "%s %s" $role (include "mulambda.storePassword" (list $root $role))) }}
{{- end }}
{{- join "\n" $lines | sha256sum }}
{{- end }}

{{- define "mulambda.storeRoles" -}}
operator,selector,companion,sdk,client
{{- end }}

{{/* Namespaces where executors run (the companions' Secret is copied there). */}}
{{- define "mulambda.executorNamespaces" -}}
{{- $list := list .Release.Namespace }}
{{- if .Values.redis.acl.executorNamespaces }}
{{- $list = concat $list .Values.redis.acl.executorNamespaces }}
{{- else if not .Values.watch.clusterwide }}
{{- $list = concat $list .Values.watch.namespaces }}
{{- end }}
{{- $list | uniq | join "," }}
{{- end }}

{{/* How a process logs in to the store: its role's user from its Secret, or (per-role
users off) the one password of redis.existingSecret. include "mulambda.storeLoginEnv" (list . "operator") */}}
{{- define "mulambda.storeLoginEnv" -}}
{{- $root := index . 0 -}}
{{- if $root.Values.redis.acl.enabled }}
- name: MULAMBDA_REDIS_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "mulambda.storeSecret" . }}
      key: username
- name: MULAMBDA_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "mulambda.storeSecret" . }}
      key: password
{{- else if $root.Values.redis.existingSecret }}
- name: MULAMBDA_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.redis.existingSecret }}
      key: password
{{- end }}
{{- end }}

{{- define "mulambda.s3Endpoint" -}}
{{- if .Values.s3.endpoint }}
{{- .Values.s3.endpoint }}
{{- else if .Values.minio.enabled }}
{{- printf "%s-minio.%s.svc.%s:9000" (include "mulambda.fullname" .) .Release.Namespace .Values.settings.clusterDomain }}
{{- end }}
{{- end }}

{{/* Injected into Client workloads; empty when the chart runs no selector. */}}
{{- define "mulambda.selectorUrl" -}}
{{- if .Values.selector.enabled }}
{{- printf "http://%s-selector.%s.svc.%s:%v" (include "mulambda.fullname" .) .Release.Namespace .Values.settings.clusterDomain .Values.selector.service.port }}
{{- end }}
{{- end }}

{{- define "mulambda.s3SecretName" -}}
{{- default (printf "%s-s3" (include "mulambda.fullname" .)) .Values.s3.existingSecret }}
{{- end }}

{{/* Namespaces the operator watches when not cluster-wide. */}}
{{- define "mulambda.watchNamespaces" -}}
{{- if .Values.watch.namespaces }}
{{- join "," .Values.watch.namespaces }}
{{- else }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{/* Pod-level hardening shared by every pod of the chart. */}}
{{- define "mulambda.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "mulambda.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}
