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

{{/*
Labels of a component's pods: without the chart's version (helm.sh/chart,
app.kubernetes.io/version), so that an upgrade that changes nothing a pod runs restarts no pod
(not Redis, not a training job). Usage: include "ftune.podLabels" (list . "api")
*/}}
{{- define "ftune.podLabels" -}}
{{ include "ftune.componentSelectorLabels" . }}
app.kubernetes.io/managed-by: {{ (index . 0).Release.Service }}
app.kubernetes.io/part-of: ftune
{{- with (index . 0).Values.commonLabels }}
{{ toYaml . }}
{{- end }}
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
{{- $memory := required "worker.resources.limits.memory is required: a training pod's memory is never overcommitted (requests = limits)" $limits.memory | toString }}
{{- if and (hasKey $requests "memory") (ne (toString $requests.memory) $memory) }}
{{- fail (printf "worker.resources.requests.memory (%v) must equal worker.resources.limits.memory (%s): a node that overcommits memory picks a training pod for its OOM killer; set both to the same size" $requests.memory $memory) }}
{{- end }}
{{- $_ := set $requests "memory" $memory }}
{{- if not (hasKey $requests "ephemeral-storage") }}
{{- /* The scheduler reserves node disk for the emptyDir volumes: scratch, /tmp and an emptyDir cache. */ -}}
{{- $mi := add (include "ftune.quantityMi" .Values.worker.workDirSizeLimit) (include "ftune.quantityMi" .Values.worker.tmpSizeLimit) }}
{{- if eq .Values.worker.cache.type "emptyDir" }}
{{- $mi = add $mi (include "ftune.quantityMi" .Values.worker.cache.sizeLimit) }}
{{- end }}
{{- $_ := set $requests "ephemeral-storage" (printf "%dMi" (int64 $mi)) }}
{{- end }}
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
upgrades), else, on a first install against a cluster, a new random one. Where `lookup`
cannot reach a cluster (`helm template`, Argo CD, a client-side dry run) it returns nothing:
a random password there would change on every render and lock the running pods out of
Redis, so the render fails and says what to set. A list of the namespace's ConfigMaps
(never empty on a live cluster: it is a ConfigMapList even with no items) tells the two apart.
*/}}
{{- define "ftune.redis.password" -}}
{{- if .Values.redis.auth.password }}
{{- .Values.redis.auth.password }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "ftune.componentName" (list . "redis")) }}
{{- if and $existing $existing.data (hasKey $existing.data "redis-password") }}
{{- index $existing.data "redis-password" | b64dec }}
{{- else if lookup "v1" "ConfigMap" .Release.Namespace "" }}
{{- randAlphaNum 32 }}
{{- else }}
{{- fail "redis.auth.password is empty and no cluster can be read to find the release's password (helm template, Argo CD, --dry-run): set redis.auth.password (URL-safe characters), or redis.auth.existingSecret with the name of a Secret holding it, so every render gives the same password" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A memory or disk quantity (Ki, Mi, Gi, Ti, k, M, G, T or plain bytes) in whole MiB, for the
sums and percentages the chart computes.
*/}}
{{- define "ftune.quantityMi" -}}
{{- $q := ternary (toString .) (printf "%d" (int64 .)) (kindIs "string" .) }}
{{- $units := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 }}
{{- $match := regexFindAll "^([0-9]+)(Ki|Mi|Gi|Ti|k|M|G|T)?$" $q 1 }}
{{- if not $match }}
{{- fail (printf "cannot size %q: give memory and volume sizes the chart adds up as a whole number with Ki, Mi, Gi, Ti, k, M, G or T" $q) }}
{{- end }}
{{- $number := regexReplaceAll "[^0-9].*$" $q "" | int64 }}
{{- $unit := regexReplaceAll "^[0-9]+" $q "" }}
{{- div (mul $number (ternary (index $units $unit) 1 (ne $unit ""))) 1048576 }}
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
{{- if le (int .Values.api.terminationGracePeriodSeconds) (add (int .Values.api.stopGraceSeconds) (int .Values.api.preStopSeconds)) }}
{{- fail (printf "api.preStopSeconds (%d) plus api.stopGraceSeconds (%d) must be below api.terminationGracePeriodSeconds (%d): the API needs the rest to end its streams and exit before it is killed" (int .Values.api.preStopSeconds) (int .Values.api.stopGraceSeconds) (int .Values.api.terminationGracePeriodSeconds)) }}
{{- end }}
{{- if le (int .Values.worker.terminationGracePeriodSeconds) (int .Values.worker.stopGraceSeconds) }}
{{- fail (printf "worker.stopGraceSeconds (%d) must be below worker.terminationGracePeriodSeconds (%d): the worker needs the rest to re-queue the job before it is killed" (int .Values.worker.stopGraceSeconds) (int .Values.worker.terminationGracePeriodSeconds)) }}
{{- end }}
{{- if and .Values.worker.keda.enabled (eq .Values.worker.keda.mode "scaledObject") (not .Values.worker.keda.scaleDownWhileBusy) (gt (int .Values.worker.keda.minReplicaCount) 0) }}
{{- fail "worker.keda.minReplicaCount > 0 with scaleDownWhileBusy false: scale-down is disabled, so the workers could only ever grow; set minReplicaCount to 0 (KEDA then scales to zero once the queue is empty), or scaleDownWhileBusy true, or use mode scaledJob" }}
{{- end }}
{{- if and .Values.redis.enabled (not .Values.redis.auth.enabled) (not .Values.networkPolicy.enabled) }}
{{- fail "redis.auth.enabled and networkPolicy.enabled are both false: any pod in the cluster could read and rewrite every job record. Enable one of them (both, preferably)" }}
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
- name: FTUNE_JOB_RETENTION_DAYS
  value: {{ .Values.config.jobRetentionDays | toString | quote }}
- name: FTUNE_MAX_CONCURRENT_UPLOADS
  value: {{ .Values.config.maxConcurrentUploads | toString | quote }}
{{- /* The workers train each job in one process per GPU; the API estimates memory per GPU. */}}
- name: FTUNE_WORKER_GPUS
  value: {{ .Values.worker.gpu.count | int | toString | quote }}
{{- with .Values.worker.gpu.memoryGb }}
{{- /* The API refuses at submit a job whose estimate does not fit; the workers log it. */}}
- name: FTUNE_WORKER_GPU_MEMORY_GB
  value: {{ . | toString | quote }}
{{- end }}
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
Pod annotations that roll a component's pods when a credential it mounts changes, and only
then: adding an API key restarts the API, never a GPU worker in the middle of a job. The sum
is over the values the component's Secrets are made from (inline values and the names of
existing Secrets), so it is the same on every render of the same values.
Usage: include "ftune.secretsChecksum" (list . "api"|"worker"|"redis")
*/}}
{{- define "ftune.secretsChecksum" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $v := $root.Values }}
{{- $mounted := dict "redis" (dict "auth" $v.redis.auth "external" $v.redis.external "enabled" $v.redis.enabled) }}
{{- if ne $component "redis" }}
{{- $_ := set $mounted "s3" $v.secrets.s3 }}
{{- end }}
{{- if eq $component "api" }}
{{- $_ := set $mounted "apiKeys" $v.secrets.apiKeys }}
{{- $_ := set $mounted "webhooks" $v.secrets.webhooks }}
{{- end }}
{{- if or (eq $component "worker") (eq $component "api") }}
{{- $_ := set $mounted "hf" (dict "token" $v.secrets.hfToken "named" $v.secrets.namedHfTokens) }}
{{- end -}}
checksum/secrets: {{ $mounted | toJson | sha256sum }}
{{- end }}
