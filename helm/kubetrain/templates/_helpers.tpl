{{/*
Names, labels and checks shared by the templates. The chart is the one renderer
of every manifest: `kubetrain render` and `kubetrain submit` run it with helm.
*/}}

{{/* helm.sh/chart: name-version, as `helm create` spells it. */}}
{{- define "kubetrain.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetrain.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end -}}

{{/* Every object's labels; the experiment label is what `kubetrain list` selects on. */}}
{{- define "kubetrain.labels" -}}
helm.sh/chart: {{ include "kubetrain.chart" . }}
{{ include "kubetrain.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetrain
kubetrain.io/experiment: {{ .Release.Name | quote }}
{{- end -}}

{{/* A digest of the chart version and the values, on the job: `kubetrain submit` reads it to tell
the same values submitted again (nothing to do) from different ones under a taken name. */}}
{{- define "kubetrain.specHash" -}}
{{- list .Chart.Version .Values | toJson | sha256sum | trunc 16 -}}
{{- end -}}

{{/* The trainer pods: what the metrics Service and the PodMonitor select. */}}
{{- define "kubetrain.trainerSelectorLabels" -}}
{{ include "kubetrain.selectorLabels" . }}
app.kubernetes.io/component: trainer
{{- end -}}

{{/* A scalar as a string: numbers as JSON spells them (1000000, never 1e+06). */}}
{{- define "kubetrain.string" -}}
{{- if kindIs "string" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{- define "kubetrain.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{ .Release.Name }}
{{- else -}}
{{ .Values.serviceAccount.name | default "default" }}
{{- end -}}
{{- end -}}

{{/* The Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or nothing. */}}
{{- define "kubetrain.s3SecretName" -}}
{{- if .Values.s3.credentialsSecret -}}
{{ .Values.s3.credentialsSecret }}
{{- else if .Values.s3.devSecret.enabled -}}
{{ .Release.Name }}-s3-dev
{{- end -}}
{{- end -}}

{{/* The most pods the job can have: job.nodes, or job.elastic.maxNodes when elastic. */}}
{{- define "kubetrain.maxNodes" -}}
{{- $nodes := int .Values.job.nodes -}}
{{- if and .Values.job.elastic.enabled (gt (int .Values.job.elastic.maxNodes) 0) -}}
{{ int .Values.job.elastic.maxNodes }}
{{- else -}}
{{ $nodes }}
{{- end -}}
{{- end -}}

{{/*
Checks the schema cannot express. The messages are files/messages.yaml's, which
trainer/controller/checks.py also reads: `kubetrain run`, render and submit check
the same, in the same order, before anything runs.
*/}}
{{- define "kubetrain.validate" -}}
{{- $say := .Files.Get "files/messages.yaml" | fromYaml -}}
{{- $name := .Release.Name -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf $say.experimentName $name) -}}
{{- end -}}
{{- $lastWorker := printf "%s-worker-%d" $name (max 0 (sub (include "kubetrain.maxNodes" . | int) 2)) -}}
{{- if gt (len $lastWorker) 63 -}}
{{- fail (printf $say.podNameTooLong $name $lastWorker) -}}
{{- end -}}
{{- $job := .Values.job -}}
{{- if $job.elastic.enabled -}}
{{- if gt (int $job.elastic.minNodes) (int $job.nodes) -}}
{{- fail (printf $say.elasticMinNodes (int $job.elastic.minNodes) (int $job.nodes)) -}}
{{- end -}}
{{- if lt (include "kubetrain.maxNodes" . | int) (int $job.nodes) -}}
{{- fail (printf $say.elasticMaxNodes (int $job.elastic.maxNodes) (int $job.nodes)) -}}
{{- end -}}
{{- end -}}
{{- if .Values.metrics.enabled -}}
{{- $first := int .Values.metrics.port -}}
{{- $last := add $first (int $job.nprocPerNode) -1 -}}
{{- if gt $last 65535 -}}
{{- fail (printf $say.metricsPortRange $first (int $job.nprocPerNode)) -}}
{{- end -}}
{{- if ne $job.kind "TrainJob" -}}
{{- if and (ge (int $job.masterPort) $first) (le (int $job.masterPort) $last) -}}
{{- fail (printf $say.masterPortCollides (int $job.masterPort) $first $last) -}}
{{- end -}}
{{- else if and (ge 29500 $first) (le 29500 $last) -}}
{{- fail (printf $say.trainJobPortCollides $first $last 29500) -}}
{{- end -}}
{{- end -}}
{{- if eq $job.kind "TrainJob" -}}
{{- /* values.yaml's defaults of the settings a TrainJob cannot always carry (a template cannot read
values.yaml itself; tests/test_chart_tie.py fails if these and trainer/values_model.py part). */ -}}
{{- $defaults := dict "image" (dict "pullPolicy" "IfNotPresent") "job" (dict "masterPort" 23456 "restartPolicy" "ExitCode" "backoffLimit" 3) -}}
{{- if $job.elastic.enabled -}}
{{- fail $say.trainJobElastic -}}
{{- end -}}
{{- if eq $job.restartPolicy "Always" -}}
{{- fail $say.trainJobRestartAlways -}}
{{- end -}}
{{- if ne $job.cleanPodPolicy "None" -}}
{{- fail $say.trainJobCleanPodPolicy -}}
{{- end -}}
{{- if ne (int $job.masterPort) (int $defaults.job.masterPort) -}}
{{- fail (printf $say.trainJobMasterPort 29500 (int $defaults.job.masterPort)) -}}
{{- end -}}
{{- with $job.runtime -}}
{{- if ne $.Values.image.pullPolicy $defaults.image.pullPolicy -}}
{{- fail (printf $say.trainJobRuntimeOwns "image.pullPolicy" . $defaults.image.pullPolicy) -}}
{{- end -}}
{{- if ne $job.restartPolicy $defaults.job.restartPolicy -}}
{{- fail (printf $say.trainJobRuntimeOwns "job.restartPolicy" . $defaults.job.restartPolicy) -}}
{{- end -}}
{{- if ne (int $job.backoffLimit) (int $defaults.job.backoffLimit) -}}
{{- fail (printf $say.trainJobRuntimeOwns "job.backoffLimit" . (toString (int $defaults.job.backoffLimit))) -}}
{{- end -}}
{{- end -}}
{{- if or $job.schedulingPolicy.queue $job.schedulingPolicy.priorityClass (gt (int $job.schedulingPolicy.minAvailable) 0) -}}
{{- fail $say.trainJobGangScheduling -}}
{{- end -}}
{{- if not (kindIs "invalid" $job.ttlSecondsAfterFinished) -}}
{{- fail $say.trainJobTtl -}}
{{- end -}}
{{- if and $job.runtime (or .Values.priorityClassName .Values.schedulerName) -}}
{{- fail (printf $say.trainJobPodScheduling $job.runtime) -}}
{{- end -}}
{{- range .Values.env -}}
{{- if hasPrefix "PET_" (toString .name) -}}
{{- fail (printf $say.trainJobReservedEnv .name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.s3.devSecret.enabled .Values.s3.credentialsSecret -}}
{{- fail $say.devSecretExclusive -}}
{{- end -}}
{{- if and .Values.s3.devSecret.enabled (not (and .Values.s3.devSecret.accessKeyId .Values.s3.devSecret.secretAccessKey)) -}}
{{- fail $say.devSecretKeys -}}
{{- end -}}
{{- include "kubetrain.validatePod" . -}}
{{- end -}}

{{/*
The user's volumes, mounts and env against the pod's own (what the chart itself renders: the
kubetrain.chart* helpers below), and mounts against volumes: rules that span keys, which the schema
cannot hold. trainer/controller/checks.py checks the same, in the same order.
*/}}
{{- define "kubetrain.validatePod" -}}
{{- $say := .Files.Get "files/messages.yaml" | fromYaml -}}
{{- $chartVolumes := list -}}
{{- range include "kubetrain.chartVolumes" . | fromYamlArray -}}
{{- $chartVolumes = append $chartVolumes .name -}}
{{- end -}}
{{- $volumes := $chartVolumes -}}
{{- range $i, $volume := .Values.volumes -}}
{{- if has $volume.name $chartVolumes -}}
{{- fail (printf $say.volumeReserved $i $volume.name (join ", " $chartVolumes)) -}}
{{- end -}}
{{- if has $volume.name $volumes -}}
{{- fail (printf $say.volumeTwice $i $volume.name) -}}
{{- end -}}
{{- $volumes = append $volumes $volume.name -}}
{{- end -}}
{{- $paths := dict -}}
{{- range include "kubetrain.chartVolumeMounts" . | fromYamlArray -}}
{{- $_ := set $paths .mountPath .name -}}
{{- end -}}
{{- $userPaths := list -}}
{{- range $i, $mount := .Values.volumeMounts -}}
{{- if not (has $mount.name $volumes) -}}
{{- fail (printf $say.mountNoVolume $i $mount.name (join ", " $chartVolumes)) -}}
{{- end -}}
{{- $path := trimSuffix "/" $mount.mountPath | default "/" -}}
{{- if hasKey $paths $path -}}
{{- fail (printf $say.mountPathReserved $i $mount.mountPath (get $paths $path)) -}}
{{- end -}}
{{- if has $path $userPaths -}}
{{- fail (printf $say.mountPathTwice $i $mount.mountPath) -}}
{{- end -}}
{{- $userPaths = append $userPaths $path -}}
{{- end -}}
{{- $chartEnv := list -}}
{{- range include "kubetrain.chartEnv" . | fromYamlArray -}}
{{- $chartEnv = append $chartEnv .name -}}
{{- end -}}
{{- range $i, $var := .Values.env -}}
{{- if has $var.name $chartEnv -}}
{{- fail (printf $say.envReserved $i $var.name (join ", " $chartEnv)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The trainer's command: torchrun reads PET_* (set by the operator) for nodes, rank and rendezvous. */}}
{{- define "kubetrain.command" -}}
- python
{{- if or (gt (int .Values.job.nprocPerNode) 1) .Values.job.elastic.enabled (eq .Values.job.kind "TrainJob") }}
{{- /* torchrun that keeps the workers' exit codes (restartPolicy: ExitCode); Trainer v2 sets only PET_* */}}
- -m
- trainer.worker.launch
{{- end }}
- -m
- trainer
- --config
- /etc/kubetrain/config.json
{{- end -}}

{{/* The pod template of the Master and Worker replicas (identical but for the operator's labels). */}}
{{- define "kubetrain.podTemplate" -}}
{{- $nproc := int .Values.job.nprocPerNode -}}
metadata:
  {{- include "kubetrain.podMetadata" . | nindent 2 }}
spec:
  serviceAccountName: {{ include "kubetrain.serviceAccountName" . | quote }}
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: {{ int .Values.terminationGracePeriodSeconds }}
  {{- with .Values.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.image.pullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . | quote }}
    {{- end }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . | quote }}
  {{- end }}
  {{- with .Values.schedulerName }}
  schedulerName: {{ . | quote }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: pytorch
      image: {{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      {{- /* the trainer writes its JSON summary to /dev/termination-log; a process that died before it could
             leaves its last log lines instead (a TrainJob's runtime patch cannot set this: the file alone) */}}
      terminationMessagePolicy: FallbackToLogsOnError
      command:
        {{- include "kubetrain.command" . | nindent 8 }}
      env:
        {{- include "kubetrain.env" . | nindent 8 }}
      ports:
        - name: pytorchjob-port
          containerPort: {{ int .Values.job.masterPort }}
          protocol: TCP
        {{- if .Values.metrics.enabled }}
        {{- range $rank := until $nproc }}
        - name: {{ if eq $rank 0 }}metrics{{ else }}metrics-{{ $rank }}{{ end }}
          containerPort: {{ add (int $.Values.metrics.port) $rank }}
          protocol: TCP
        {{- end }}
        {{- end }}
      resources:
        requests:
          {{- include "kubetrain.resourceList" . | nindent 10 }}
        limits:
          {{- include "kubetrain.resourceList" . | nindent 10 }}
      {{- with .Values.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        {{- include "kubetrain.volumeMounts" . | nindent 8 }}
  volumes:
    {{- include "kubetrain.volumes" . | nindent 4 }}
{{- end -}}

{{/* The trainer pods' labels and annotations (PyTorchJob replicas and TrainJob nodes alike). */}}
{{- define "kubetrain.podMetadata" -}}
labels:
  {{- mergeOverwrite (dict) (.Values.podLabels | default dict) (include "kubetrain.labels" . | fromYaml) (include "kubetrain.trainerSelectorLabels" . | fromYaml) | toYaml | nindent 2 }}
annotations:
  {{- mergeOverwrite (dict "sidecar.istio.io/inject" "false") (.Values.podAnnotations | default dict) | toYaml | nindent 2 }}
{{- end -}}

{{/* The trainer container's environment: the chart's, then the user's env. */}}
{{- define "kubetrain.env" -}}
{{ include "kubetrain.chartEnv" . }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "kubetrain.chartEnv" -}}
{{- $s3Secret := include "kubetrain.s3SecretName" . -}}
# A writable home on the read-only root filesystem (torch hub, triton caches).
- name: HOME
  value: /tmp
{{- if $s3Secret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $s3Secret | quote }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $s3Secret | quote }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}
{{- range $key, $value := .Values.ncclEnv }}
- name: {{ $key }}
  value: {{ include "kubetrain.string" $value | quote }}
{{- end }}
{{- end -}}

{{/* The trainer container's mounts: the config, shared memory, a writable /tmp, the user's. */}}
{{- define "kubetrain.volumeMounts" -}}
{{ include "kubetrain.chartVolumeMounts" . }}
{{- with .Values.volumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "kubetrain.chartVolumeMounts" -}}
- name: config
  mountPath: /etc/kubetrain
  readOnly: true
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "kubetrain.volumes" -}}
{{ include "kubetrain.chartVolumes" . }}
{{- with .Values.volumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "kubetrain.chartVolumes" -}}
- name: config
  configMap:
    name: {{ .Release.Name }}-config
- name: dshm
  emptyDir:
    medium: Memory
    {{- with .Values.shm.sizeLimit }}
    sizeLimit: {{ . | quote }}
    {{- end }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{/* requests = limits: cpu, memory and nvidia.com/gpu when GPUs are asked for. */}}
{{- define "kubetrain.resourceList" -}}
cpu: {{ include "kubetrain.string" .Values.resources.cpu | quote }}
memory: {{ include "kubetrain.string" .Values.resources.memory | quote }}
{{- if gt (int .Values.resources.gpu) 0 }}
nvidia.com/gpu: {{ int .Values.resources.gpu | quote }}
{{- end }}
{{- end -}}

{{/*
The Grafana dashboard's uid: one per release (Grafana allows 40 characters; release names have 53).
*/}}
{{- define "kubetrain.dashboardUid" -}}
kubetrain-{{ .Release.Name | sha256sum | trunc 12 }}
{{- end }}
