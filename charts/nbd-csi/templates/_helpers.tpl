{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "nbd-csi.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified app name: the release name, prefixed with the chart name
unless it already contains it. Suffixes ("-controller", "-node") are added
to it, so it leaves them room.
*/}}
{{- define "nbd-csi.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "nbd-csi.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Labels on every object.
*/}}
{{- define "nbd-csi.labels" -}}
helm.sh/chart: {{ include "nbd-csi.chart" . }}
app.kubernetes.io/name: {{ include "nbd-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nbd-csi
{{- end -}}

{{/*
Selector labels; call with (dict "ctx" $ "component" "controller").
*/}}
{{- define "nbd-csi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nbd-csi.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "nbd-csi.componentLabels" -}}
{{ include "nbd-csi.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "nbd-csi.controller.fullname" -}}
{{- printf "%s-controller" (include "nbd-csi.fullname" .) -}}
{{- end -}}

{{- define "nbd-csi.node.fullname" -}}
{{- printf "%s-node" (include "nbd-csi.fullname" .) -}}
{{- end -}}

{{- define "nbd-csi.storage.fullname" -}}
{{- printf "%s-storage" (include "nbd-csi.fullname" .) -}}
{{- end -}}

{{- define "nbd-csi.storage.serviceAccountName" -}}
{{- if .Values.serviceAccount.storage.create -}}
{{- default (include "nbd-csi.storage.fullname" .) .Values.serviceAccount.storage.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.storage.name -}}
{{- end -}}
{{- end -}}

{{/*
The Secret holding the cluster's export-name key (cluster mode).
*/}}
{{- define "nbd-csi.exportKeySecret" -}}
{{- default (printf "%s-export-key" (include "nbd-csi.fullname" .)) .Values.storage.exportKeySecret -}}
{{- end -}}

{{/*
The prefix of the certificate Secrets: <prefix>-ca, <prefix>-node-<node>,
<prefix>-storage-<node>, <prefix>-controller.
*/}}
{{- define "nbd-csi.tlsSecretPrefix" -}}
{{- include "nbd-csi.fullname" . -}}
{{- end -}}

{{/*
Where the node plugin, the storage agent and the controller keep their TLS
files (ca.crt, tls.crt, tls.key), written from their certificate Secret: a
memory-backed emptyDir, so no key reaches a disk.
*/}}
{{- define "nbd-csi.tlsDir" -}}
/run/nbd-csi/tls
{{- end -}}

{{/*
The arguments and the volume mount that keep a component's TLS files from
its Secret (the node plugin and the storage agent).
*/}}
{{- define "nbd-csi.tlsSyncArgs" -}}
- --tls-dir={{ include "nbd-csi.tlsDir" . }}
- --tls-secret-prefix={{ include "nbd-csi.tlsSecretPrefix" . }}
{{- end -}}

{{/*
"true" when the node plugins (and in cluster mode the storage agents) get
pod certificates (tls.certificateDelivery, see values.yaml); empty when
they read a Secret. auto leaves tls.mode=off installs on Secrets: a pod
certificate makes every holder's start wait for the controller's signature.
*/}}
{{- define "nbd-csi.podCertificates" -}}
{{- $mode := toString .Values.tls.certificateDelivery -}}
{{- if not (has $mode (list "auto" "podCertificate" "secret")) -}}
{{- fail (printf "tls.certificateDelivery must be auto, podCertificate or secret, not %q" $mode) -}}
{{- end -}}
{{- if and (eq $mode "podCertificate") (ne .Values.tls.issuer "builtin") -}}
{{- fail "tls.certificateDelivery=podCertificate needs tls.issuer=builtin (the controller signs them)" -}}
{{- end -}}
{{- if or (eq $mode "podCertificate") (and (eq $mode "auto") (include "nbd-csi.tlsEnabled" .) (eq .Values.tls.issuer "builtin") (.Capabilities.APIVersions.Has "certificates.k8s.io/v1/PodCertificateRequest")) -}}
true
{{- end -}}
{{- end -}}

{{/*
A pod certificate signer: (dict "ctx" . "role" "node"|"storage").
*/}}
{{- define "nbd-csi.signer" -}}
{{ .ctx.Values.driverName }}/{{ .role }}
{{- end -}}

{{/*
A holder's TLS directory with pod certificates, (dict "ctx" . "role"
"node"|"storage"): the credential bundle the kubelet keeps (key made on the
node, renewed before its end) and the CA from the controller's ConfigMap,
in one read-only projected volume.
*/}}
{{- define "nbd-csi.podCertificateVolume" -}}
- name: {{ include "nbd-csi.tlsVolume" .ctx }}
  projected:
    defaultMode: 0400
    sources:
      - podCertificate:
          signerName: {{ include "nbd-csi.signer" . }}
          keyType: ECDSAP256
          credentialBundlePath: credentials.pem
          # The longest the API server allows; the controller issues
          # tls.certLifetime when that is shorter.
          maxExpirationSeconds: 7862400
      - configMap:
          name: {{ include "nbd-csi.tlsSecretPrefix" .ctx }}-ca
          items:
            - key: ca.crt
              path: ca.crt
{{- end -}}

{{/*
A holder's TLS arguments: its Secret followed into its directory, or with
pod certificates the directory alone (the kubelet keeps it).
*/}}
{{- define "nbd-csi.holderTlsArgs" -}}
{{- if include "nbd-csi.podCertificates" . -}}
- --tls-dir={{ include "nbd-csi.tlsDir" . }}
{{- else -}}
{{ include "nbd-csi.tlsSyncArgs" . }}
{{- end -}}
{{- end -}}

{{/*
A holder's TLS volume, (dict "ctx" . "role" "node"|"storage").
*/}}
{{- define "nbd-csi.holderTlsVolume" -}}
{{- if include "nbd-csi.podCertificates" .ctx -}}
{{ include "nbd-csi.podCertificateVolume" . }}
{{- else -}}
{{ include "nbd-csi.tlsPodVolume" .ctx }}
{{- end -}}
{{- end -}}

{{- define "nbd-csi.tlsVolume" -}}
tls-certs
{{- end -}}

{{/*
The container's mount of that directory (under volumeMounts; writable: the
sync writes there), and the pod's volume for it (under volumes).
*/}}
{{- define "nbd-csi.tlsVolumeMount" -}}
- name: {{ include "nbd-csi.tlsVolume" . }}
  mountPath: {{ include "nbd-csi.tlsDir" . }}
{{- end -}}

{{- define "nbd-csi.tlsPodVolume" -}}
- name: {{ include "nbd-csi.tlsVolume" . }}
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end -}}

{{/*
The controller's issuer arguments.
*/}}
{{- define "nbd-csi.tlsIssuerArgs" -}}
{{- $t := .Values.tls -}}
- --tls-issuer={{ $t.issuer }}
- --tls-secret-prefix={{ include "nbd-csi.tlsSecretPrefix" . }}
- --tls-cert-lifetime={{ $t.certLifetime }}
- --tls-ca-lifetime={{ $t.caLifetime }}
{{- if eq $t.issuer "cert-manager" }}
- --tls-cert-manager-issuer={{ include "nbd-csi.tlsSecretPrefix" . }}-ca
{{- end }}
{{- if include "nbd-csi.podCertificates" . }}
- --tls-certificate-delivery=pod
- --tls-node-service-account={{ include "nbd-csi.node.serviceAccountName" . }}
{{- if eq .Values.storage.mode "cluster" }}
- --tls-storage-service-account={{ include "nbd-csi.storage.serviceAccountName" . }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "nbd-csi.controller.serviceAccountName" -}}
{{- if .Values.serviceAccount.controller.create -}}
{{- default (include "nbd-csi.controller.fullname" .) .Values.serviceAccount.controller.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.controller.name -}}
{{- end -}}
{{- end -}}

{{- define "nbd-csi.node.serviceAccountName" -}}
{{- if .Values.serviceAccount.node.create -}}
{{- default (include "nbd-csi.node.fullname" .) .Values.serviceAccount.node.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.node.name -}}
{{- end -}}
{{- end -}}

{{/*
The driver's image.
*/}}
{{- define "nbd-csi.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
A sidecar's image from its values block.
*/}}
{{- define "nbd-csi.sidecarImage" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{/*
The kubelet's plugin directory for this driver, and the socket kubelet dials.
*/}}
{{- define "nbd-csi.node.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) .Values.driverName -}}
{{- end -}}

{{/*
The node plugin's staging state on the host, inside its kubelet plugin
directory, so it outlives the container (the binary's default for the
default kubeletDir).
*/}}
{{- define "nbd-csi.node.stateDir" -}}
{{- printf "%s/state" (include "nbd-csi.node.pluginDir" .) -}}
{{- end -}}

{{/*
A port range "first-last", after checking the order and the size; call with
(dict "range" .Values.controller.nbd.portRange "key" "controller.nbd.portRange").
*/}}
{{- define "nbd-csi.checkedPortRange" -}}
{{- $r := .range -}}
{{- if gt (int $r.first) (int $r.last) -}}
{{- fail (printf "%s: first (%d) must not be greater than last (%d)" .key (int $r.first) (int $r.last)) -}}
{{- end -}}
{{- if gt (sub (int $r.last) (int $r.first)) 999 -}}
{{- fail (printf "%s: at most 1000 ports (%d-%d has %d)" .key (int $r.first) (int $r.last) (add1 (sub (int $r.last) (int $r.first)))) -}}
{{- end -}}
{{- printf "%d-%d" (int $r.first) (int $r.last) -}}
{{- end -}}

{{/*
The controller's NBD port range "first-last", checked.
*/}}
{{- define "nbd-csi.nbdPortRange" -}}
{{- include "nbd-csi.checkedPortRange" (dict "range" .Values.controller.nbd.portRange "key" "controller.nbd.portRange") -}}
{{- end -}}

{{/*
The storage agents' NBD port range "first-last", checked.
*/}}
{{- define "nbd-csi.storage.nbdPortRange" -}}
{{- include "nbd-csi.checkedPortRange" (dict "range" .Values.storage.nbd.portRange "key" "storage.nbd.portRange") -}}
{{- end -}}

{{/*
Checks the schema cannot express; included once by the controller's template.
*/}}
{{- define "nbd-csi.validate" -}}
{{- $r := .Values.controller.nbd.portRange -}}
{{- $ports := dict "controller.healthPort" .Values.controller.healthPort "node.healthPort" .Values.node.healthPort "node.registrarHealthPort" .Values.node.registrarHealthPort -}}
{{- if .Values.controller.metrics.enabled -}}
{{- $_ := set $ports "controller.metrics.port" .Values.controller.metrics.port -}}
{{- end -}}
{{- if .Values.node.metrics.enabled -}}
{{- $_ := set $ports "node.metrics.port" .Values.node.metrics.port -}}
{{- end -}}
{{- range $name, $port := $ports -}}
{{- if and (ge (int $port) (int $r.first)) (le (int $port) (int $r.last)) -}}
{{- fail (printf "%s (%d) lies inside controller.nbd.portRange %d-%d" $name (int $port) (int $r.first) (int $r.last)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.controller.metrics.enabled (eq (int .Values.controller.healthPort) (int .Values.controller.metrics.port)) -}}
{{- fail "controller.healthPort and controller.metrics.port must differ" -}}
{{- end -}}
{{- if eq (int .Values.node.healthPort) (int .Values.node.registrarHealthPort) -}}
{{- fail "node.healthPort and node.registrarHealthPort must differ (the node pod shares the host's ports)" -}}
{{- end -}}
{{- /* The node plugin's ports are the host's. */ -}}
{{- $hostPorts := dict "node.healthPort" .Values.node.healthPort "node.registrarHealthPort" .Values.node.registrarHealthPort -}}
{{- if .Values.node.metrics.enabled -}}
{{- range $name, $port := $hostPorts -}}
{{- if eq (int $port) (int $.Values.node.metrics.port) -}}
{{- fail (printf "node.metrics.port (%d) is %s too (the node pod shares the host's ports)" (int $.Values.node.metrics.port) $name) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $hostPorts "node.metrics.port" .Values.node.metrics.port -}}
{{- end -}}
{{- if and (eq .Values.storage.mode "cluster") .Values.storage.metrics.enabled -}}
{{- /* The agent and the node plugin both use the host's ports. */ -}}
{{- $s := .Values.storage -}}
{{- range $name, $port := $hostPorts -}}
{{- if eq (int $port) (int $s.metrics.port) -}}
{{- fail (printf "storage.metrics.port (%d) is %s too: the storage agent and the node plugin share the host's ports" (int $s.metrics.port) $name) -}}
{{- end -}}
{{- end -}}
{{- if and (ge (int $s.metrics.port) (int $s.nbd.portRange.first)) (le (int $s.metrics.port) (int $s.nbd.portRange.last)) -}}
{{- fail (printf "storage.metrics.port (%d) lies inside storage.nbd.portRange %d-%d" (int $s.metrics.port) (int $s.nbd.portRange.first) (int $s.nbd.portRange.last)) -}}
{{- end -}}
{{- end -}}
{{- $names := dict -}}
{{- range .Values.storageClasses -}}
{{- if hasKey $names .name -}}
{{- fail (printf "storageClasses: the name %q appears twice" .name) -}}
{{- end -}}
{{- $_ := set $names .name true -}}
{{- end -}}
{{- if eq .Values.controller.storage.type "persistentVolumeClaim" -}}
{{- with .Values.controller.storage.persistentVolumeClaim.storageClassName -}}
{{- if hasKey $names . -}}
{{- fail (printf "controller.storage.persistentVolumeClaim.storageClassName %q must not use a StorageClass of this driver: the controller's own data cannot live on its volumes" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* A StatefulSet's volumeClaimTemplates are immutable: say so before the API server does. */ -}}
{{- $existing := lookup "apps/v1" "StatefulSet" .Release.Namespace (include "nbd-csi.controller.fullname" .) -}}
{{- if $existing -}}
{{- $hadClaim := not (empty $existing.spec.volumeClaimTemplates) -}}
{{- $wantClaim := and (eq .Values.storage.mode "embedded") (eq .Values.controller.storage.type "persistentVolumeClaim") -}}
{{- if and $hadClaim (eq .Values.storage.mode "cluster") -}}
{{- fail "storage.mode cannot become cluster on a release whose controller keeps its volumes on a claim: the volumes' files stay there. Move the data and reinstall instead (see the chart README)." -}}
{{- end -}}
{{- if ne $hadClaim $wantClaim -}}
{{- fail (printf "controller.storage.type cannot change on an existing release (the installed controller uses %s): the volumes' files stay where they are. Move the data and reinstall instead (see the chart README)." ($hadClaim | ternary "persistentVolumeClaim" "hostPath")) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.volumeSnapshotClass.create (not .Values.sidecars.snapshotter.enabled) -}}
{{- fail "volumeSnapshotClass.create needs sidecars.snapshotter.enabled" -}}
{{- end -}}
{{- end -}}

{{/*
Security context of the containers that need no privileges.
*/}}
{{- define "nbd-csi.restrictedSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{- /*
Leader election of a controller sidecar, in cluster mode only: there
several controller replicas run and each sidecar kind elects one leader
(its Lease in the pod's namespace, the sidecars' default). Embedded mode
runs one replica.
*/ -}}
{{- define "nbd-csi.leaderElectionArgs" -}}
{{- if eq .Values.storage.mode "cluster" -}}
{{- $le := .Values.sidecars.leaderElection -}}
- --leader-election
- --leader-election-lease-duration={{ $le.leaseDuration }}
- --leader-election-renew-deadline={{ $le.renewDeadline }}
- --leader-election-retry-period={{ $le.retryPeriod }}
{{- if $le.releaseOnExit }}
- --feature-gates=ReleaseLeaderElectionOnExit=true
{{- end }}
{{- end -}}
{{- end -}}

{{/*
TLS of the volumes' NBD exports by default (tls.mode). "true" unless it is
off: the nodes' init container then requires tls.ko. (The TLS directory and
its sync are there whatever the mode: a StorageClass may require TLS.)
*/}}
{{- define "nbd-csi.tlsEnabled" -}}
{{- if ne (toString .Values.tls.mode) "off" -}}true{{- end -}}
{{- end -}}
