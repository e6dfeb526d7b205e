{{/* Names, labels and the pieces every workload shares. */}}

{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's base name; object names append "-api", "-vllm-<model>", ... (≤ 63). */}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 32 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 32 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 32 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end -}}

{{/* Image reference: repository@digest when a digest is given, else repository:tag (the tag
defaulting to the chart's appVersion). */}}
{{- define "kubetune.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* ServiceAccount names: given, or <fullname>-<component>. */}}
{{- define "kubetune.serviceAccountName" -}}
{{- $sa := index . 0 -}}
{{- $root := index . 1 -}}
{{- $component := index . 2 -}}
{{- if $sa.create -}}
{{- default (printf "%s-%s" (include "kubetune.fullname" $root) $component) $sa.name -}}
{{- else -}}
{{- default "default" $sa.name -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "kubetune.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{/* The ClusterTrainingRuntime the release's TrainJobs reference: <fullname>-trainer. */}}
{{- define "kubetune.trainingRuntimeName" -}}
{{- printf "%s-trainer" (include "kubetune.fullname" .) -}}
{{- end -}}

{{/* The Secret with vLLM's API key: given, or <fullname>-vllm-api-key. */}}
{{- define "kubetune.vllmApiKeySecret" -}}
{{- default (printf "%s-vllm-api-key" (include "kubetune.fullname" .)) .Values.vllm.apiKey.existingSecret -}}
{{- end -}}

{{/* vLLM's API key, as an env entry named by the argument. */}}
{{- define "kubetune.vllmApiKeyEnv" -}}
{{- $name := index . 0 -}}
{{- $root := index . 1 -}}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "kubetune.vllmApiKeySecret" $root }}
      key: {{ $root.Values.vllm.apiKey.secretKey }}
{{- end -}}

{{/* The vLLM Service of one model: <fullname>-vllm-<model.name>. */}}
{{- define "kubetune.vllmName" -}}
{{- $model := index . 0 -}}
{{- $root := index . 1 -}}
{{- printf "%s-vllm-%s" (include "kubetune.fullname" $root) $model.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* A model's serving settings: the vllm defaults overlaid with the model's `serving`. */}}
{{- define "kubetune.servingOf" -}}
{{- $model := index . 0 -}}
{{- $root := index . 1 -}}
{{- $defaults := pick $root.Values.vllm "enabled" "replicas" "gpus" "maxLoras" "maxLoraRank" "maxCpuLoras" "gpuMemoryUtilization" "dtype" "extraArgs" "env" "resources" "nodeSelector" "tolerations" "affinity" "topologySpreadConstraints" "podDisruptionBudget" "podAnnotations" "shmSize" -}}
{{- $serving := mergeOverwrite (deepCopy $defaults) (deepCopy (default dict $model.serving)) -}}
{{- toYaml $serving -}}
{{- end -}}

{{/* The restricted Pod Security Standard: pod level. */}}
{{- define "kubetune.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The restricted Pod Security Standard: container level. */}}
{{- define "kubetune.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Settings every component reads: the object store (KUBETUNE_OBJECT_STORE__*). */}}
{{- define "kubetune.objectStoreEnv" -}}
- name: KUBETUNE_OBJECT_STORE__BACKEND
  value: {{ .Values.objectStore.backend | quote }}
- name: KUBETUNE_OBJECT_STORE__BUCKET
  value: {{ .Values.objectStore.bucket | quote }}
- name: KUBETUNE_OBJECT_STORE__PREFIX
  value: {{ .Values.objectStore.prefix | quote }}
{{- with .Values.objectStore.endpointUrl }}
- name: KUBETUNE_OBJECT_STORE__ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.objectStore.region }}
- name: KUBETUNE_OBJECT_STORE__REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.objectStore.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}
{{- end -}}

{{/* The hardware profiles (KUBETUNE_OPERATOR__HARDWARE_PROFILES): the API checks the names,
the operator applies them. */}}
{{- define "kubetune.hardwareProfilesEnv" -}}
- name: KUBETUNE_OPERATOR__HARDWARE_PROFILES
  value: {{ toJson .Values.trainer.hardwareProfiles | quote }}
{{- end -}}

{{/* Admission and job limits (KUBETUNE_QUEUEING__*) and the tracking servers jobs may name
(KUBETUNE_TRACKING__*) and where registered base models may be read from
(KUBETUNE_MODEL_REGISTRY__*): the API enforces them, the operator too. */}}
{{- define "kubetune.queueingEnv" -}}
{{- with .Values.queueing }}
- name: KUBETUNE_QUEUEING__KUEUE
  value: {{ .kueue | quote }}
{{- with .defaultQueue }}
- name: KUBETUNE_QUEUEING__DEFAULT_QUEUE
  value: {{ . | quote }}
{{- end }}
- name: KUBETUNE_QUEUEING__ORG_QUEUES
  value: {{ toJson .orgQueues | quote }}
- name: KUBETUNE_QUEUEING__ALLOWED_QUEUES
  value: {{ toJson .allowedQueues | quote }}
{{- with .maxGpusPerJob }}
- name: KUBETUNE_QUEUEING__MAX_GPUS_PER_JOB
  value: {{ . | quote }}
{{- end }}
{{- with .maxGpusPerOrg }}
- name: KUBETUNE_QUEUEING__MAX_GPUS_PER_ORG
  value: {{ . | quote }}
{{- end }}
- name: KUBETUNE_QUEUEING__GPU_TYPES
  value: {{ toJson .gpuTypes | quote }}
{{- with .maxQueuedSeconds }}
- name: KUBETUNE_QUEUEING__MAX_QUEUED_SECONDS
  value: {{ . | quote }}
{{- end }}
{{- end }}
- name: KUBETUNE_TRACKING__MLFLOW_TRACKING_URIS
  value: {{ toJson .Values.tracking.mlflowTrackingUris | quote }}
- name: KUBETUNE_MODEL_REGISTRY__ALLOWED_PATHS
  value: {{ toJson .Values.modelRegistry.allowedPaths | quote }}
- name: KUBETUNE_MODEL_REGISTRY__ALLOWED_VOLUME_CLAIMS
  value: {{ toJson .Values.modelRegistry.allowedVolumeClaims | quote }}
{{- end -}}

{{/* The base-model catalogue as the API reads it (KUBETUNE_MODELS, JSON). */}}
{{- define "kubetune.catalogue" -}}
{{- $root := . -}}
{{- $entries := list -}}
{{- range .Values.models -}}
{{- $entry := dict "id" .id "name" .name "owned_by" (default "kubetune" .ownedBy) "created" (int (default 0 .created)) "context_length" (int (default 4096 .contextLength)) "path" .path -}}
{{- with .tokenizer }}{{ $_ := set $entry "tokenizer" . }}{{ end -}}
{{- with .volumeClaim }}{{ $_ := set $entry "volume_claim" . }}{{ end -}}
{{- $serving := include "kubetune.servingOf" (list . $root) | fromYaml -}}
{{- if and $root.Values.vllm.enabled $serving.enabled -}}
{{- $_ := set $entry "serving_url" (printf "http://%s.%s.svc:%d" (include "kubetune.vllmName" (list . $root)) $root.Release.Namespace (int $root.Values.vllm.port)) -}}
{{- end -}}
{{- $entries = append $entries $entry -}}
{{- end -}}
{{- toJson $entries -}}
{{- end -}}

{{/* Whether the Prometheus Operator's API is served (ServiceMonitor, PodMonitor, rules). */}}
{{- define "kubetune.hasMonitoringApi" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
{{- end -}}
