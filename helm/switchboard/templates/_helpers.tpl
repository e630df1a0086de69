{{/* Names and labels. */}}
{{- define "switchboard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchboard.fullname" -}}
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

{{- define "switchboard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "switchboard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: switchboard
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "edge"). */}}
{{- define "switchboard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchboard.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "switchboard.componentLabels" -}}
{{ include "switchboard.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The Prometheus job names the alerts and the dashboard select on (a fixed contract). */}}
{{- define "switchboard.edgeJob" -}}switchboard-edge{{- end }}
{{- define "switchboard.routerJob" -}}switchboard-router{{- end }}

{{/* (dict "ctx" $ "repository" .Values.edge.image.repository) */}}
{{- define "switchboard.image" -}}
{{ .repository }}:{{ .ctx.Values.image.tag | default .ctx.Chart.AppVersion }}
{{- end }}

{{/* Secret holding keys: ours, or the one named by auth.existingSecret. */}}
{{- define "switchboard.secretName" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecret }}{{ else }}{{ include "switchboard.fullname" . }}{{ end }}
{{- end }}

{{/* Secret keys in use; empty when that key is not configured. */}}
{{- define "switchboard.jwtSecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKeys.jwtSecret }}{{ else if .Values.auth.jwtSecret }}jwt-secret{{ end }}
{{- end }}
{{- define "switchboard.jwtPublicKeyKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKeys.jwtPublicKey }}{{ else if .Values.auth.jwtPublicKey }}jwt-public-key.pem{{ end }}
{{- end }}
{{- define "switchboard.apiKeyKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKeys.apiKey }}{{ else if .Values.auth.apiKey }}api-key{{ end }}
{{- end }}
{{- define "switchboard.adminKeyKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKeys.adminKey }}{{ else if .Values.auth.adminKey }}admin-key{{ end }}
{{- end }}

{{/* Subchart Service names follow the upstream charts' fullname rule. */}}
{{- define "switchboard.subchartFullname" -}}
{{- $values := index .ctx.Values .chart }}
{{- if $values.fullnameOverride }}{{ $values.fullnameOverride }}
{{- else if contains .chart .ctx.Release.Name }}{{ .ctx.Release.Name }}
{{- else }}{{ printf "%s-%s" .ctx.Release.Name .chart }}
{{- end }}
{{- end }}

{{/* The Redis URL of externalRedis, by mode (ADR 0018), without the password. */}}
{{- define "switchboard.redisUrl" -}}
{{- $r := .Values.externalRedis }}
{{- if eq $r.mode "sentinel" }}
{{- printf "redis+sentinel://%s/%s" (join "," $r.hosts) $r.sentinelMaster }}
{{- if and $r.database (ne (int $r.database) 0) }}{{ printf "/%d" (int $r.database) }}{{ end }}
{{- else if eq $r.mode "cluster" }}
{{- printf "redis+cluster://%s" (join "," $r.hosts) }}
{{- else }}
{{- $r.url }}
{{- end }}
{{- end }}

{{/* Env entries for NATS and Redis, shared by edges and routers. */}}
{{- define "switchboard.backendEnv" -}}
{{- if .Values.nats.enabled }}
- name: SWITCHBOARD_NATS_URL
  value: {{ printf "nats://%s:4222" (include "switchboard.subchartFullname" (dict "ctx" . "chart" "nats")) | quote }}
{{- else if .Values.externalNats.existingSecret }}
- name: SWITCHBOARD_NATS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalNats.existingSecret }}
      key: {{ .Values.externalNats.existingSecretUrlsKey }}
{{- else }}
- name: SWITCHBOARD_NATS_URL
  value: {{ join "," .Values.externalNats.urls | quote }}
{{- end }}
{{- $redisUrl := include "switchboard.redisUrl" . }}
{{- $pwSecret := .Values.externalRedis.existingSecret }}
{{- $pwKey := .Values.externalRedis.existingSecretPasswordKey }}
{{- if .Values.redis.enabled }}
{{- $redisName := include "switchboard.subchartFullname" (dict "ctx" . "chart" "redis") }}
{{- $redisUrl = printf "redis://%s-master:6379" $redisName }}
{{- $pwSecret = ternary $redisName "" (eq (toString .Values.redis.auth.enabled) "true") }}
{{- $pwKey = "redis-password" }}
{{- end }}
{{- if $pwSecret }}
{{- $parts := splitList "://" $redisUrl }}
# Not a SWITCHBOARD_* name: only the URL below is a setting.
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $pwSecret }}
      key: {{ $pwKey }}
- name: SWITCHBOARD_REDIS_URL
  value: {{ printf "%s://:$(REDIS_PASSWORD)@%s" (first $parts) (last $parts) | quote }}
{{- else }}
- name: SWITCHBOARD_REDIS_URL
  value: {{ $redisUrl | quote }}
{{- end }}
- name: SWITCHBOARD_PRESENCE_TTL_MS
  value: {{ .Values.cluster.presenceTtlMs | int64 | quote }}
{{- if include "switchboard.apiKeyKey" . }}
- name: SWITCHBOARD_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "switchboard.secretName" . }}
      key: {{ include "switchboard.apiKeyKey" . }}
{{- end }}
{{- if include "switchboard.adminKeyKey" . }}
- name: SWITCHBOARD_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "switchboard.secretName" . }}
      key: {{ include "switchboard.adminKeyKey" . }}
{{- end }}
- name: SWITCHBOARD_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- with .Values.tracing }}
{{- if .otlpEndpoint }}
- name: SWITCHBOARD_OTLP_ENDPOINT
  value: {{ .otlpEndpoint | quote }}
- name: SWITCHBOARD_TRACE_SAMPLE_RATIO
  value: {{ .sampleRatio | toString | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* A flat map as TOML. Hand-written because Helm reads every YAML number
as float64 and toToml would write 1000 as 1000.0, which the edge refuses
for integer settings. */}}
{{- define "switchboard.toml" -}}
{{- range $k, $v := . }}
{{ $k }} = {{ include "switchboard.tomlValue" (dict "key" $k "v" $v) }}
{{- end }}
{{- end }}

{{- define "switchboard.tomlValue" -}}
{{- $v := .v }}
{{- if kindIs "slice" $v }}
{{- $items := list }}
{{- range $v }}{{ $items = append $items (include "switchboard.tomlValue" (dict "key" $.key "v" .)) }}{{ end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else if kindIs "map" $v }}
{{- fail (printf "edge.settings.%s: nested tables are not edge settings" .key) }}
{{- else if kindIs "bool" $v }}
{{- $v }}
{{- else if kindIs "string" $v }}
{{- toJson $v }}
{{- else if kindIs "invalid" $v }}
{{- fail (printf "edge.settings.%s: a value is required (remove the key to use the default)" .key) }}
{{- else if eq (float64 $v) (floor $v) }}
{{- int64 $v }}
{{- else }}
{{- $v }}
{{- end }}
{{- end }}

{{/* Edge settings the chart writes itself; edge.settings may not repeat them. */}}
{{- define "switchboard.chartOwnedEdgeKeys" -}}
listen node_id max_connections shutdown_grace_ms drain_batch_size reconnect_jitter_max_ms jwt_secret jwt_public_key_file api_key admin_key log_format tls_cert_file tls_key_file nats redis presence_ttl_ms history_max_messages history_max_age_ms max_payload_bytes log dev event_tap event_tap_stream event_tap_max_age_secs event_tap_max_bytes event_tap_replicas
{{- end }}

{{/* The edge's TOML file: chart-derived settings, then edge.settings. */}}
{{- define "switchboard.edgeToml" -}}
{{- $owned := dict
  "drain_batch_size" .Values.edge.drain.batchSize
  "reconnect_jitter_max_ms" .Values.edge.drain.reconnectJitterMaxMs
  "history_max_messages" .Values.cluster.historyMaxMessages
  "history_max_age_ms" .Values.cluster.historyMaxAgeMs
  "max_payload_bytes" .Values.cluster.maxPayloadBytes
  "log" .Values.edge.log }}
{{- with .Values.cluster.eventTap }}
{{- if .enabled }}
{{- $_ := set $owned "event_tap" true }}
{{- $_ := set $owned "event_tap_stream" .stream }}
{{- $_ := set $owned "event_tap_max_age_secs" .maxAgeSecs }}
{{- $_ := set $owned "event_tap_max_bytes" .maxBytes }}
{{- $_ := set $owned "event_tap_replicas" .replicas }}
{{- end }}
{{- end }}
# Set by the chart from its values.
{{- include "switchboard.toml" $owned }}
{{- with .Values.edge.settings }}
# From edge.settings.
{{- include "switchboard.toml" . }}
{{- end }}
{{- end }}

{{/* Fails the render on a configuration that cannot work. */}}
{{- define "switchboard.validate" -}}
{{- $a := .Values.auth }}
{{- if and $a.existingSecret (or $a.jwtSecret $a.jwtPublicKey $a.apiKey $a.adminKey) }}
{{- fail "auth: set either auth.existingSecret (with auth.existingSecretKeys) or the inline auth.jwtSecret/jwtPublicKey/apiKey/adminKey, not both" }}
{{- end }}
{{- if and $a.adminKey (eq $a.adminKey $a.apiKey) }}
{{- fail "auth.adminKey: must differ from auth.apiKey (docs/adr/0037)" }}
{{- end }}
{{- with .Values.tracing }}
{{- if and .otlpEndpoint (not (hasPrefix "http://" (toString .otlpEndpoint))) }}
{{- fail (printf "tracing.otlpEndpoint: expected http://host:port (OTLP over gRPC), not %q" (toString .otlpEndpoint)) }}
{{- end }}
{{- if or (lt (float64 .sampleRatio) 0.0) (gt (float64 .sampleRatio) 1.0) }}
{{- fail (printf "tracing.sampleRatio: expected 0.0 to 1.0, not %v" .sampleRatio) }}
{{- end }}
{{- end }}
{{- if not (has (toString .Values.logFormat) (list "text" "json")) }}
{{- fail (printf "logFormat: expected text or json, not %q" (toString .Values.logFormat)) }}
{{- end }}
{{- if not (or (include "switchboard.jwtSecretKey" .) (include "switchboard.jwtPublicKeyKey" .)) }}
{{- fail "auth: no JWT key configured. Set auth.jwtSecret (HS256) or auth.jwtPublicKey (RS256/ES256 PEM), or auth.existingSecret with auth.existingSecretKeys.jwtSecret or .jwtPublicKey" }}
{{- end }}
{{- if not (or .Values.nats.enabled .Values.externalNats.existingSecret (compact .Values.externalNats.urls)) }}
{{- fail "nats: the chart deploys cluster mode and needs NATS. Set externalNats.urls (or externalNats.existingSecret), or nats.enabled=true for the subchart" }}
{{- end }}
{{- $r := .Values.externalRedis }}
{{- if not (has $r.mode (list "single" "sentinel" "cluster")) }}
{{- fail (printf "externalRedis.mode: expected single, sentinel or cluster, not %q" (toString $r.mode)) }}
{{- end }}
{{- if and .Values.redis.enabled (ne $r.mode "single") }}
{{- fail "externalRedis.mode: the redis subchart (redis.enabled) is one server; for sentinel or cluster point externalRedis at your deployment" }}
{{- end }}
{{- if and (not .Values.redis.enabled) (ne $r.mode "single") }}
{{- if not (compact $r.hosts) }}
{{- fail (printf "externalRedis.hosts: %s mode needs host:port entries (%s)" $r.mode (ternary "the sentinels" "seed nodes of the Redis Cluster" (eq $r.mode "sentinel"))) }}
{{- end }}
{{- if and (eq $r.mode "sentinel") (not $r.sentinelMaster) }}
{{- fail "externalRedis.sentinelMaster: sentinel mode needs the master name the sentinels monitor (sentinel monitor NAME ...)" }}
{{- end }}
{{- range $r.hosts }}
{{- if or (contains "@" .) (contains "/" .) }}
{{- fail (printf "externalRedis.hosts: %q: give host:port only; the password comes from externalRedis.existingSecret" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not (or .Values.redis.enabled (ne $r.mode "single") $r.url) }}
{{- fail "redis: the chart deploys cluster mode and needs Redis. Set externalRedis.url, or redis.enabled=true for the subchart" }}
{{- end }}
{{- if and (not .Values.redis.enabled) (eq $r.mode "single") .Values.externalRedis.existingSecret (contains "@" .Values.externalRedis.url) }}
{{- fail "externalRedis.url: leave credentials out of the URL when externalRedis.existingSecret supplies the password" }}
{{- end }}
{{- if and (not .Values.redis.enabled) (eq $r.mode "single") .Values.externalRedis.url (not (hasPrefix "redis://" .Values.externalRedis.url)) }}
{{- fail "externalRedis.url: expected redis://host:port (TLS to Redis, rediss://, is not built into Switchboard yet; see docs/operations.md#redis)" }}
{{- end }}
{{- if and .Values.alerts.enabled (not .Values.serviceMonitor.enabled) (not .Values.alerts.scrapedElsewhere) }}
{{- fail "alerts.enabled: the alerts select the job, namespace and pod labels the chart's ServiceMonitors set; enable serviceMonitor, or set alerts.scrapedElsewhere=true if your scrape config sets the same labels" }}
{{- end }}
{{- if and .Values.edge.httpRoute.enabled (not .Values.edge.httpRoute.parentRefs) }}
{{- fail "edge.httpRoute.parentRefs: name the Gateway (and listener) the route attaches to" }}
{{- end }}
{{- if and .Values.edge.ingress.enabled (not .Values.edge.ingress.hosts) }}
{{- fail "edge.ingress.hosts: give at least one host with its paths (e.g. /ws)" }}
{{- end }}
{{- if and .Values.edge.ingress.enabled (lt (int .Values.edge.ingress.webSocketTimeoutSeconds) 60) }}
{{- fail "edge.ingress.webSocketTimeoutSeconds: at least 60, above two heartbeat intervals (25 s each by default), or the proxy cuts idle sockets" }}
{{- end }}
{{- if and .Values.edge.tls.enabled (not .Values.edge.tls.secretName) }}
{{- fail "edge.tls.enabled: set edge.tls.secretName to a kubernetes.io/tls Secret" }}
{{- end }}
{{- $owned := splitList " " (include "switchboard.chartOwnedEdgeKeys" .) }}
{{- range $k, $_ := .Values.edge.settings }}
{{- if eq $k "dev" }}
{{- fail "edge.settings.dev: dev mode mints tokens for anyone; it is never deployed by this chart" }}
{{- end }}
{{- if has $k $owned }}
{{- fail (printf "edge.settings.%s: the chart sets this itself; use the matching chart value (see values.yaml)" $k) }}
{{- end }}
{{- end }}
{{- if not (gt (int .Values.edge.maxConnections) 0) }}
{{- fail "edge.maxConnections: set a positive socket cap sized to the memory limit" }}
{{- end }}
{{- if not (and (gt (int .Values.edge.drain.preStopSeconds) 0) (gt (int .Values.edge.drain.shutdownGraceSeconds) 0)) }}
{{- fail "edge.drain: preStopSeconds and shutdownGraceSeconds must be positive" }}
{{- end }}
{{- end }}

{{/* Pod anti-affinity: (dict "ctx" $ "component" "edge" "cfg" .Values.edge.affinity). */}}
{{- define "switchboard.affinity" -}}
{{- $term := dict "topologyKey" .cfg.topologyKey "labelSelector" (dict "matchLabels" (include "switchboard.selectorLabels" (dict "ctx" .ctx "component" .component) | fromYaml)) }}
{{- if eq .cfg.podAntiAffinity "hard" }}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    {{- toYaml (list $term) | nindent 4 }}
{{- else if eq .cfg.podAntiAffinity "soft" }}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        {{- toYaml $term | nindent 8 }}
{{- else if ne .cfg.podAntiAffinity "none" }}
{{- fail (printf "%s.affinity.podAntiAffinity: expected soft, hard or none, got %q" .component .cfg.podAntiAffinity) }}
{{- end }}
{{- end }}

{{/* Security settings for a distroless, non-root image. */}}
{{- define "switchboard.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "switchboard.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
capabilities:
  drop:
    - ALL
{{- end }}

{{/* One alert's runbook link: (dict "ctx" $ "name" "SwitchboardEdgeDown"). */}}
{{- define "switchboard.runbook" -}}
{{ trimSuffix "/" .ctx.Values.alerts.runbookBaseUrl }}/docs/operations.md#{{ lower .name }}
{{- end }}

{{/* The pods' ServiceAccount: ours, the one named, or the namespace default. */}}
{{- define "switchboard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}{{ .Values.serviceAccount.name | default (include "switchboard.fullname" .) }}{{ else }}{{ .Values.serviceAccount.name }}{{ end }}
{{- end }}

{{/* Peers allowed to call the backend API: networkPolicy.apiFrom, or this namespace's pods. */}}
{{- define "switchboard.networkPolicyApiFrom" -}}
{{- if .Values.networkPolicy.apiFrom }}
{{- toYaml .Values.networkPolicy.apiFrom }}
{{- else }}
- podSelector: {}
{{- end }}
{{- end }}

{{/* Egress both tiers need: DNS, NATS, Redis (sentinels too) and the extra rules. */}}
{{- define "switchboard.networkPolicyEgress" -}}
{{- $n := .Values.networkPolicy -}}
egress:
  - ports:
      - port: 53
        protocol: UDP
      - port: 53
        protocol: TCP
  - ports:
      {{- range $n.egress.backendPorts }}
      - port: {{ . }}
        protocol: TCP
      {{- end }}
    {{- with $n.egress.backendsTo }}
    to:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  {{- with $n.egress.extra }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
