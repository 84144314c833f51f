{{/* Names, labels and the pieces every component's resources share. */}}

{{- define "aimesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "aimesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The resource name of a component: (dict "root" $ "component" "identity"). */}}
{{- define "aimesh.componentName" -}}
{{- printf "%s-%s" (include "aimesh.fullname" .root) .component }}
{{- end }}

{{- define "aimesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aimesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "aimesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "aimesh.selectorLabels" . }}
app.kubernetes.io/part-of: aimesh
app.kubernetes.io/version: {{ .root.Values.image.tag | default .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{/* Selects every pod of the release (components and the migrations Job). */}}
{{- define "aimesh.releaseSelector" -}}
app.kubernetes.io/name: {{ include "aimesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "aimesh.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
What the chart knows about each component beyond its values: how it is probed and which stores
it is given. Components are rendered in this order.
*/}}
{{- define "aimesh.catalog" -}}
identity: {protocol: grpc, postgres: true}
chat: {protocol: grpc, postgres: true}
usage: {protocol: grpc, postgres: true}
files: {protocol: grpc, postgres: true}
analytics: {protocol: grpc, postgres: false}
gateway: {protocol: http, postgres: false}
{{- end }}

{{- define "aimesh.componentOrder" -}}
[identity, chat, usage, files, analytics, gateway]
{{- end }}

{{/* http://<service>:<port> of an enabled component. */}}
{{- define "aimesh.url" -}}
{{- $c := index .root.Values.components .component }}
{{- printf "http://%s:%d" (include "aimesh.componentName" .) (int $c.port) }}
{{- end }}

{{/*
A nested settings map as AIMESH_ environment variables: (dict "prefix" "AIMESH_" "map" $m).
Nested maps join with __ like the configuration loader expects; empty strings and nulls are
left out so the binary keeps its default. Numbers are printed as integers (values arrive as
float64, which would otherwise print as 2.592e+06).
*/}}
{{- define "aimesh.settingsEnv" -}}
{{- $prefix := .prefix }}
{{- range $key, $value := .map }}
{{- $name := printf "%s%s" $prefix (upper $key) }}
{{- if kindIs "map" $value }}
{{- include "aimesh.settingsEnv" (dict "prefix" (printf "%s__" $name) "map" $value) }}
{{- else if or (kindIs "invalid" $value) (eq (toString $value) "") }}
{{- else if kindIs "float64" $value }}
{{ $name }}: {{ int64 $value | toString | quote }}
{{- else if kindIs "slice" $value }}
{{- /* A list as the loader reads one from the environment: ["a", "b"]. */}}
{{- $items := list }}
{{- range $value }}{{ $items = append $items (toString . | toJson) }}{{ end }}
{{ $name }}: {{ printf "[%s]" (join ", " $items) | quote }}
{{- else }}
{{ $name }}: {{ toString $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The ConfigMap data of a component: (dict "root" $ "component" "chat"). */}}
{{- define "aimesh.configData" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $c := index $v.components .component }}
{{- $upper := upper .component }}
{{- include "aimesh.settingsEnv" (dict "prefix" "AIMESH_" "map" $v.config) }}
AIMESH_METRICS__LISTEN: {{ printf "0.0.0.0:%d" (int $v.metrics.port) | quote }}
AIMESH_{{ $upper }}__LISTEN: {{ printf "0.0.0.0:%d" (int $c.port) | quote }}
{{- /* The one table of peer addresses (services.<name>): each component reads what it calls. */}}
{{- range $peer := list "identity" "chat" "usage" "files" "analytics" }}
{{- if (index $v.components $peer).enabled }}
AIMESH_SERVICES__{{ upper $peer }}: {{ include "aimesh.url" (dict "root" $root "component" $peer) | quote }}
{{- end }}
{{- end }}
{{- include "aimesh.settingsEnv" (dict "prefix" (printf "AIMESH_%s__" $upper) "map" $c.config) }}
{{- end }}

{{/* An env entry from a Secret: (dict "name" "AIMESH_X" "secret" "s" "key" "k"). */}}
{{- define "aimesh.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
{{- end }}

{{/*
The database settings of the migrations Job and of the components with a database:
(dict "root" $ "components" (list "chat") "replicas" true). Each URL is read from the Secret
the component's values name: database_url (the primary, perhaps through PgBouncer),
database_migration_url (the primary directly) and, with "replicas", database_replica_urls;
the Job only migrates, so it is given no replicas.
*/}}
{{- define "aimesh.databaseEnv" -}}
{{- $v := .root.Values }}
{{- /* [setting, the component's value naming its Secret] */}}
{{- $settings := list (list "DATABASE_URL" "databaseUrlSecret") (list "DATABASE_MIGRATION_URL" "databaseMigrationUrlSecret") }}
{{- if .replicas }}
{{- $settings = append $settings (list "DATABASE_REPLICA_URLS" "databaseReplicaUrlsSecret") }}
{{- end }}
{{- include "aimesh.secretEnv" (dict "name" "AIMESH_POSTGRES_URL" "secret" $v.secrets.postgresUrl.name "key" $v.secrets.postgresUrl.key) }}
{{- range $component := .components }}
{{- $c := index $v.components $component }}
{{- range $setting := $settings }}
{{- $ref := index $c (index $setting 1) | default dict }}
{{- if $ref.name }}
{{ include "aimesh.secretEnv" (dict "name" (printf "AIMESH_%s__%s" (upper $component) (index $setting 0)) "secret" $ref.name "key" $ref.key) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* terminationGracePeriodSeconds: the drain and the in-flight grace, plus room to exit. */}}
{{- define "aimesh.terminationGrace" -}}
{{- $server := .Values.config.server | default dict }}
{{- add (int (dig "drain_secs" 0 $server)) (int (dig "shutdown_grace_secs" 20 $server)) 10 }}
{{- end }}
