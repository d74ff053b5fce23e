{{/*
Chart name, cut to 63 characters (the DNS label limit of Kubernetes names).
*/}}
{{- define "ftune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name `<release>-<chart>` (or the release name alone if it already contains the chart
name), cut to 63 characters. Every resource name starts with it.
*/}}
{{- define "ftune.fullname" -}}
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
A component's resource name: `<fullname>-<component>`, still at most 63 characters.
Usage: include "ftune.componentName" (list . "api")
*/}}
{{- define "ftune.componentName" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- printf "%s-%s" (include "ftune.fullname" $root | trunc (int (sub 62 (len $component))) | trimSuffix "-") $component }}
{{- end }}

{{- define "ftune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource.
*/}}
{{- define "ftune.labels" -}}
helm.sh/chart: {{ include "ftune.chart" . }}
{{ include "ftune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ftune
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels of the release; components add app.kubernetes.io/component.
*/}}
{{- define "ftune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ftune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels and selector labels of one component. Usage: include "ftune.componentLabels" (list . "api")
*/}}
{{- define "ftune.componentLabels" -}}
{{ include "ftune.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "ftune.componentSelectorLabels" -}}
{{ include "ftune.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "ftune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ftune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference from an image block: repository@digest, else repository:tag (tag defaults to appVersion).
Usage: include "ftune.image" (list .Values.api.image .Chart.AppVersion)
*/}}
{{- define "ftune.image" -}}
{{- $image := index . 0 }}
{{- $appVersion := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $appVersion $image.tag | toString) }}
{{- end }}
{{- end }}

{{/*
GPU resources of the worker container: worker.resources plus the GPU count in requests and
limits (extended resources cannot be overcommitted, so both must be equal).
*/}}
{{- define "ftune.worker.resources" -}}
{{- $gpu := required "worker.gpu is required: set worker.gpu.count (GPUs per worker pod) and worker.gpu.resourceName (e.g. nvidia.com/gpu)" .Values.worker.gpu }}
{{- $count := required "worker.gpu.count is required: the GPUs each worker pod gets, e.g. 1" $gpu.count | int }}
{{- if lt $count 1 }}
{{- fail (printf "worker.gpu.count must be at least 1 (got %d): a worker trains on a GPU; for a CPU-only smoke test run `ftune dev` instead of this chart" $count) }}
{{- end }}
{{- $name := required "worker.gpu.resourceName is required: the device plugin's resource, e.g. nvidia.com/gpu" $gpu.resourceName }}
{{- $resources := deepCopy (default dict .Values.worker.resources) }}
{{- $requests := default dict $resources.requests }}
{{- $limits := default dict $resources.limits }}
{{- $_ := set $requests $name $count }}
{{- $_ := set $limits $name $count }}
{{- $_ := set $resources "requests" $requests }}
{{- $_ := set $resources "limits" $limits }}
{{- toYaml $resources }}
{{- end }}

{{/*
Redis: the URL, secret names and keys, whichever of bundled / external / existingSecret applies.
*/}}
{{- define "ftune.redis.host" -}}
{{- include "ftune.componentName" (list . "redis") }}
{{- end }}

{{- define "ftune.redis.passwordSecretName" -}}
{{- default (include "ftune.componentName" (list . "redis")) .Values.redis.auth.existingSecret }}
{{- end }}

{{- define "ftune.redis.passwordKey" -}}
{{- if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretPasswordKey }}{{ else }}redis-password{{ end }}
{{- end }}

{{- define "ftune.redis.urlSecretName" -}}
{{- default (include "ftune.componentName" (list . "redis-url")) .Values.redis.external.existingSecret }}
{{- end }}

{{- define "ftune.redis.urlKey" -}}
{{- if .Values.redis.external.existingSecret }}{{ .Values.redis.external.existingSecretUrlKey }}{{ else }}redis-url{{ end }}
{{- end }}

{{/*
The bundled Redis password: inline, else the one already in the cluster (kept across
upgrades), else a new random one.
*/}}
{{- define "ftune.redis.password" -}}
{{- if .Values.redis.auth.password }}
{{- .Values.redis.auth.password }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "ftune.componentName" (list . "redis")) }}
{{- if and $existing $existing.data (hasKey $existing.data "redis-password") }}
{{- index $existing.data "redis-password" | b64dec }}
{{- else }}
{{- randAlphaNum 32 }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ftune.store.isFile" -}}
{{- if hasPrefix "file://" .Values.store.url }}true{{ end }}
{{- end }}

{{- define "ftune.store.path" -}}
{{- trimPrefix "file://" .Values.store.url }}
{{- end }}

{{- define "ftune.store.claimName" -}}
{{- default (include "ftune.componentName" (list . "store")) .Values.store.persistence.existingClaim }}
{{- end }}

{{- define "ftune.s3.enabled" -}}
{{- if or .Values.secrets.s3.existingSecret .Values.secrets.s3.accessKeyId }}true{{ end }}
{{- end }}

{{/*
Fail early on combinations that would deploy but not work.
*/}}
{{- define "ftune.validate" -}}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) }}
{{- fail "redis.enabled is false but no external Redis is set: give redis.external.url or redis.external.existingSecret" }}
{{- end }}
{{- if not (or (hasPrefix "file://" .Values.store.url) (hasPrefix "s3://" .Values.store.url)) }}
{{- fail (printf "store.url must start with file:// or s3:// (got %q)" .Values.store.url) }}
{{- end }}
{{- if and (include "ftune.store.isFile" .) (not .Values.store.persistence.enabled) }}
{{- fail "store.url is file:// but store.persistence.enabled is false: the API and the workers would each see their own empty directory. Enable store.persistence (a ReadWriteMany claim) or use an s3:// store" }}
{{- end }}
{{- if and .Values.secrets.s3.accessKeyId (not .Values.secrets.s3.secretAccessKey) (not .Values.secrets.s3.existingSecret) }}
{{- fail "secrets.s3.accessKeyId is set without secrets.s3.secretAccessKey" }}
{{- end }}
{{- if and .Values.worker.keda.enabled (eq .Values.worker.keda.trigger "redis") (not .Values.redis.enabled) (not .Values.worker.keda.redis.address) }}
{{- fail "worker.keda.trigger is redis with an external Redis: set worker.keda.redis.address (host:port) and, if it has a password, worker.keda.redis.passwordSecret" }}
{{- end }}
{{- if and .Values.worker.keda.enabled (eq .Values.worker.keda.trigger "prometheus") (not .Values.worker.keda.prometheus.serverAddress) }}
{{- fail "worker.keda.trigger is prometheus: set worker.keda.prometheus.serverAddress" }}
{{- end }}
{{- if le (int .Values.worker.terminationGracePeriodSeconds) (int .Values.worker.shutdownMarginSeconds) }}
{{- fail "worker.terminationGracePeriodSeconds must be larger than worker.shutdownMarginSeconds" }}
{{- end }}
{{- end }}

{{/*
Environment shared by the API and the workers: Redis, blob store, S3 credentials, limits.
*/}}
{{- define "ftune.commonEnv" -}}
- name: HOME
  value: /tmp
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth.enabled }}
- name: FTUNE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "ftune.redis.passwordSecretName" . }}
      key: {{ include "ftune.redis.passwordKey" . }}
- name: FTUNE_REDIS_URL
  value: {{ printf "redis://:$(FTUNE_REDIS_PASSWORD)@%s:%d/%d" (include "ftune.redis.host" .) (int .Values.redis.port) (int .Values.redis.database) | quote }}
{{- else }}
- name: FTUNE_REDIS_URL
  value: {{ printf "redis://%s:%d/%d" (include "ftune.redis.host" .) (int .Values.redis.port) (int .Values.redis.database) | quote }}
{{- end }}
{{- else }}
- name: FTUNE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "ftune.redis.urlSecretName" . }}
      key: {{ include "ftune.redis.urlKey" . }}
{{- end }}
- name: FTUNE_QUEUE_NAME
  value: {{ .Values.config.queueName | quote }}
- name: FTUNE_STORE_URL
  value: {{ .Values.store.url | quote }}
{{- with .Values.store.s3EndpointUrl }}
- name: FTUNE_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- if include "ftune.s3.enabled" . }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ default (include "ftune.componentName" (list . "s3")) .Values.secrets.s3.existingSecret }}
      key: {{ if .Values.secrets.s3.existingSecret }}{{ .Values.secrets.s3.accessKeyIdKey }}{{ else }}AWS_ACCESS_KEY_ID{{ end }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ default (include "ftune.componentName" (list . "s3")) .Values.secrets.s3.existingSecret }}
      key: {{ if .Values.secrets.s3.existingSecret }}{{ .Values.secrets.s3.secretAccessKeyKey }}{{ else }}AWS_SECRET_ACCESS_KEY{{ end }}
{{- end }}
- name: FTUNE_MODELS_DIR
  value: {{ .Values.config.modelsDir | quote }}
- name: FTUNE_MAX_DATASET_BYTES
  value: {{ .Values.config.maxDatasetBytes | int64 | toString | quote }}
- name: FTUNE_JOB_TIMEOUT_HOURS
  value: {{ .Values.config.jobTimeoutHours | toString | quote }}
- name: FTUNE_MAX_ATTEMPTS
  value: {{ .Values.config.maxAttempts | toString | quote }}
- name: FTUNE_LEASE_SECONDS
  value: {{ .Values.config.leaseSeconds | toString | quote }}
{{- end }}

{{/*
The Hub endpoint and tokens: the workers publish artifacts with them, and the API's scheduler
publishes the models that retraining policies promote.
*/}}
{{- define "ftune.hubEnv" -}}
{{- with .Values.config.hfEndpoint }}
- name: HF_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- if or .Values.secrets.hfToken.existingSecret .Values.secrets.hfToken.value }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ default (include "ftune.componentName" (list . "hf")) .Values.secrets.hfToken.existingSecret }}
      key: {{ if .Values.secrets.hfToken.existingSecret }}{{ .Values.secrets.hfToken.key }}{{ else }}HF_TOKEN{{ end }}
{{- end }}
{{- $root := . }}
{{- range .Values.secrets.namedHfTokens }}
- name: {{ printf "FTUNE_HF_TOKEN_%s" (upper .name) }}
  valueFrom:
    secretKeyRef:
      {{- if .existingSecret }}
      name: {{ .existingSecret }}
      key: {{ required (printf "secrets.namedHfTokens[%s].key is required with existingSecret" .name) .key }}
      {{- else }}
      name: {{ include "ftune.componentName" (list $root "hf") }}
      key: {{ printf "FTUNE_HF_TOKEN_%s" (upper .name) }}
      {{- end }}
{{- end }}
{{- end }}

{{/*
Volume and mount of a file:// blob store (nothing for s3://).
*/}}
{{- define "ftune.store.volume" -}}
{{- if include "ftune.store.isFile" . -}}
- name: store
  persistentVolumeClaim:
    claimName: {{ include "ftune.store.claimName" . }}
{{- end }}
{{- end }}

{{- define "ftune.store.volumeMount" -}}
{{- if include "ftune.store.isFile" . -}}
- name: store
  mountPath: {{ include "ftune.store.path" . }}
{{- end }}
{{- end }}

{{/*
Pod annotations that roll the pods when a Secret the chart renders changes.
*/}}
{{- define "ftune.secretsChecksum" -}}
checksum/secrets: {{ include (print .Template.BasePath "/secrets.yaml") . | sha256sum }}
{{- end }}
