{{- define "ksb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ksb.fullname" -}}
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

{{- define "ksb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ksb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ksb.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ksb.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ksb.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ksb.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ksb.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "ksb.secretName" -}}
{{- default (include "ksb.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "ksb.jwtSecretName" -}}
{{- default (printf "%s-jwt" (include "ksb.fullname" .)) .Values.jwt.existingSecret }}
{{- end }}

{{- define "ksb.rulesConfigMapName" -}}
{{- default (printf "%s-rules" (include "ksb.fullname" .)) .Values.rulesExistingConfigMap }}
{{- end }}

{{- define "ksb.hasRules" -}}
{{- if or .Values.rules .Values.rulesExistingConfigMap }}true{{ end }}
{{- end }}

{{- define "ksb.hasJwtKeys" -}}
{{- if or .Values.jwt.keys .Values.jwt.existingSecret }}true{{ end }}
{{- end }}

{{/*
Percent-encodes a user name or password for the URL's userinfo. urlquery is Go's
QueryEscape, which writes a space as "+" (and a "+" as %2B); the bridge unquotes userinfo
without turning "+" into a space, so the space must be %20.
*/}}
{{- define "ksb.userinfoEscape" -}}
{{- urlquery . | replace "+" "%20" }}
{{- end }}

{{/*
BRIDGE_REDIS_URL from .Values.redis (README, "Configuration": the three forms), unless
redis.url gives it whole.
*/}}
{{- define "ksb.redisUrl" -}}
{{- $r := .Values.redis }}
{{- if $r.url }}
{{- $r.url }}
{{- else }}
{{- if not $r.hosts }}
{{- fail "redis.hosts: at least one host:port is required (or redis.url)" }}
{{- end }}
{{- $scheme := ternary "rediss" "redis" $r.tls.enabled }}
{{- $userinfo := "" }}
{{- if or $r.username $r.password }}
{{- $userinfo = printf "%s:%s@" (include "ksb.userinfoEscape" $r.username) (include "ksb.userinfoEscape" $r.password) }}
{{- end }}
{{- $hosts := join "," $r.hosts }}
{{- $query := list }}
{{- if and $r.tls.enabled $r.tls.caSecret }}
{{- $query = append $query "ssl_ca_certs=/etc/bridge/redis-tls/ca.crt" }}
{{- end }}
{{- if and $r.tls.enabled (not $r.tls.checkHostname) }}
{{- $query = append $query "ssl_check_hostname=false" }}
{{- end }}
{{- $suffix := ternary "" (printf "?%s" (join "&" $query)) (empty $query) }}
{{- if eq $r.mode "standalone" }}
{{- if ne (len $r.hosts) 1 }}
{{- fail "redis.hosts: standalone mode takes exactly one host:port (sentinel or cluster take several)" }}
{{- end }}
{{- printf "%s://%s%s/%d%s" $scheme $userinfo $hosts (int $r.db) $suffix }}
{{- else if eq $r.mode "sentinel" }}
{{- printf "%s+sentinel://%s%s/%s/%d%s" $scheme $userinfo $hosts $r.sentinelService (int $r.db) $suffix }}
{{- else if eq $r.mode "cluster" }}
{{- if ne (int $r.db) 0 }}
{{- fail "redis.db: a Redis Cluster has database 0 only" }}
{{- end }}
{{- printf "%s+cluster://%s%s%s" $scheme $userinfo $hosts $suffix }}
{{- else }}
{{- fail (printf "redis.mode: %q is not standalone, sentinel or cluster" $r.mode) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The optional secret keys this release provides: the chart's Secret has a key for each value
set; an existing Secret has those listed in secrets.existingSecretOptionalKeys.
*/}}
{{- define "ksb.optionalSecretKeys" -}}
{{- $s := .Values.secrets }}
{{- $keys := list }}
{{- if $s.existingSecret }}
{{- $keys = $s.existingSecretOptionalKeys }}
{{- else }}
{{- if $s.kratosAdminToken }}{{ $keys = append $keys "kratos-admin-token" }}{{ end }}
{{- if $s.hookSecret }}{{ $keys = append $keys "hook-secret" }}{{ end }}
{{- if $s.appToken }}{{ $keys = append $keys "app-token" }}{{ end }}
{{- if .Values.redis.sentinelPassword }}{{ $keys = append $keys "redis-sentinel-password" }}{{ end }}
{{- end }}
{{- toJson $keys }}
{{- end }}
