{{/*
The worker pod, shared by the Deployment (replicas or KEDA ScaledObject) and the KEDA
ScaledJob. Usage: include "ftune.worker.pod" (dict "root" . "burst" false)
With burst the worker trains one job and exits (`ftune worker --burst`), and the pod is not
restarted: a Job's pod.
*/}}
{{- define "ftune.worker.pod" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $grace := int $v.worker.terminationGracePeriodSeconds -}}
metadata:
  labels:
    {{- include "ftune.podLabels" (list $root "worker") | nindent 4 }}
    {{- with $v.worker.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    {{- include "ftune.secretsChecksum" (list $root "worker") | nindent 4 }}
    {{- if $v.worker.protectFromDisruption }}
    # Neither the cluster-autoscaler nor Karpenter removes this node to consolidate while a
    # job trains here.
    cluster-autoscaler.kubernetes.io/safe-to-evict: "false"
    karpenter.sh/do-not-disrupt: "true"
    {{- end }}
    {{- with $v.worker.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "ftune.serviceAccountName" $root }}
  automountServiceAccountToken: {{ $v.serviceAccount.automountToken }}
  {{- if .burst }}
  restartPolicy: Never
  {{- end }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.worker.runtimeClassName }}
  runtimeClassName: {{ . | quote }}
  {{- end }}
  {{- with $v.worker.priorityClassName }}
  priorityClassName: {{ . | quote }}
  {{- end }}
  # On SIGTERM the worker stops taking jobs, has the training process save a checkpoint at
  # its next step (waiting at most FTUNE_WORKER_GRACE_SECONDS), and re-queues the job, which
  # resumes from that step elsewhere, all before this runs out.
  terminationGracePeriodSeconds: {{ $grace }}
  securityContext:
    {{- toYaml $v.worker.podSecurityContext | nindent 4 }}
  {{- with $v.worker.cache.prewarm }}
  initContainers:
    # Base models into the cache before training starts: `hf download` skips files already
    # there, so on a shared cache only the first pod pays for the download.
    - name: prewarm
      image: {{ include "ftune.image" (list $v.worker.image $root.Chart.AppVersion) | quote }}
      imagePullPolicy: {{ $v.worker.image.pullPolicy }}
      command:
        - sh
        - -ec
        - |
          for ref in "$@"; do
            model="${ref%@*}"
            if [ "$model" = "$ref" ]; then hf download "$model"
            else hf download "$model" --revision "${ref##*@}"; fi
          done
        - prewarm
        {{- range . }}
        - {{ . | quote }}
        {{- end }}
      env:
        - name: HOME
          value: /tmp
        - name: HF_HOME
          value: {{ printf "%s/huggingface" $v.worker.cache.mountPath | quote }}
        {{- with include "ftune.hubEnv" $root | trim }}{{ . | nindent 8 }}{{ end }}
      resources:
        requests:
          cpu: "1"
          memory: 4Gi
        limits:
          memory: 4Gi
      securityContext:
        {{- toYaml $v.worker.securityContext | nindent 8 }}
      volumeMounts:
        - name: cache
          mountPath: {{ $v.worker.cache.mountPath }}
        - name: tmp
          mountPath: /tmp
  {{- end }}
  containers:
    - name: worker
      image: {{ include "ftune.image" (list $v.worker.image $root.Chart.AppVersion) | quote }}
      imagePullPolicy: {{ $v.worker.image.pullPolicy }}
      args:
        - worker
        {{- if .burst }}
        - --burst
        {{- end }}
      ports:
        - name: metrics
          containerPort: {{ $v.worker.metricsPort }}
          protocol: TCP
      env:
        {{- include "ftune.commonEnv" $root | nindent 8 }}
        - name: FTUNE_DEVICE
          value: {{ $v.worker.device | quote }}
        - name: FTUNE_WORK_DIR
          value: /var/lib/ftune/work
        - name: FTUNE_WORKER_METRICS_PORT
          value: {{ $v.worker.metricsPort | quote }}
        - name: FTUNE_WORKER_GRACE_SECONDS
          value: {{ $v.worker.stopGraceSeconds | toString | quote }}
        {{- if or $v.secrets.apiKeys.existingSecret $v.secrets.apiKeys.keys }}
        # The tenants file: the worker checks each job's grants again before it downloads
        # or uploads anything (it holds key hashes, never keys). Read again for every job,
        # so a change reaches the worker through the mounted Secret, without a restart.
        - name: FTUNE_API_KEYS_FILE
          value: /etc/ftune/api-keys/{{ $v.secrets.apiKeys.key }}
        {{- end }}
        - name: HF_HOME
          value: {{ printf "%s/huggingface" $v.worker.cache.mountPath | quote }}
        - name: XDG_CACHE_HOME
          value: {{ printf "%s/xdg" $v.worker.cache.mountPath | quote }}
        - name: TRITON_CACHE_DIR
          value: {{ printf "%s/triton" $v.worker.cache.mountPath | quote }}
        {{- with include "ftune.hubEnv" $root | trim }}{{ . | nindent 8 }}{{ end }}
        {{- with $v.worker.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $v.worker.livenessProbe }}
      livenessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- include "ftune.worker.resources" $root | nindent 8 }}
      securityContext:
        {{- toYaml $v.worker.securityContext | nindent 8 }}
      volumeMounts:
        - name: cache
          mountPath: {{ $v.worker.cache.mountPath }}
        - name: work
          mountPath: /var/lib/ftune/work
        - name: models
          mountPath: {{ $v.config.modelsDir }}
          readOnly: true
        - name: tmp
          mountPath: /tmp
        - name: dshm
          mountPath: /dev/shm
        {{- if or $v.secrets.apiKeys.existingSecret $v.secrets.apiKeys.keys }}
        - name: api-keys
          mountPath: /etc/ftune/api-keys
          readOnly: true
        {{- end }}
        {{- with include "ftune.store.volumeMount" $root }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with $v.worker.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: cache
      {{- if eq $v.worker.cache.type "persistentVolumeClaim" }}
      persistentVolumeClaim:
        claimName: {{ default (include "ftune.componentName" (list $root "worker-cache")) $v.worker.cache.existingClaim }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ $v.worker.cache.sizeLimit | quote }}
      {{- end }}
    - name: work
      emptyDir:
        sizeLimit: {{ $v.worker.workDirSizeLimit | quote }}
    - name: models
      {{- if $v.worker.models.volume }}
      {{- toYaml $v.worker.models.volume | nindent 6 }}
      {{- else }}
      emptyDir:
        sizeLimit: 1Mi
      {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ $v.worker.tmpSizeLimit | quote }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.worker.shmSizeLimit | quote }}
    {{- if or $v.secrets.apiKeys.existingSecret $v.secrets.apiKeys.keys }}
    - name: api-keys
      secret:
        secretName: {{ default (include "ftune.componentName" (list $root "api-keys")) $v.secrets.apiKeys.existingSecret }}
        items:
          - key: {{ if $v.secrets.apiKeys.existingSecret }}{{ $v.secrets.apiKeys.key }}{{ else }}keys.json{{ end }}
            path: {{ $v.secrets.apiKeys.key }}
    {{- end }}
    {{- with include "ftune.store.volume" $root }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- with $v.worker.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.worker.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.worker.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.worker.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
