{{/*
RBAC rules of each component, used by rbac.yaml. The sidecars' rules are
the ones their projects document for the pinned versions, without leader
election and without group snapshots (neither is enabled here).
*/}}

{{- define "nbd-csi.rules.events" -}}
# Events: create, and patch for the series count of a repeated event.
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{- define "nbd-csi.rules.provisioner" -}}
- apiGroups: [""]
  resources: [persistentvolumes]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, watch, update]
- apiGroups: [storage.k8s.io]
  resources: [storageclasses]
  verbs: [get, list, watch]
- apiGroups: [storage.k8s.io]
  resources: [csinodes]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch]
- apiGroups: [storage.k8s.io]
  resources: [volumeattachments]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [list, watch, create, update, patch]
{{- if .Values.sidecars.snapshotter.enabled }}
# Volumes restored from a snapshot.
- apiGroups: [snapshot.storage.k8s.io]
  resources: [volumesnapshots]
  verbs: [get, list, watch, update]
- apiGroups: [snapshot.storage.k8s.io]
  resources: [volumesnapshotcontents]
  verbs: [get, list]
{{- end }}
{{- end -}}

{{- define "nbd-csi.rules.attacher" -}}
- apiGroups: [""]
  resources: [persistentvolumes]
  verbs: [get, list, watch, patch]
- apiGroups: [storage.k8s.io]
  resources: [csinodes]
  verbs: [get, list, watch]
- apiGroups: [storage.k8s.io]
  resources: [volumeattachments]
  verbs: [get, list, watch, patch]
- apiGroups: [storage.k8s.io]
  resources: [volumeattachments/status]
  verbs: [patch]
{{- end -}}

{{- define "nbd-csi.rules.resizer" -}}
- apiGroups: [""]
  resources: [persistentvolumes]
  verbs: [get, list, watch, patch]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [persistentvolumeclaims/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [storage.k8s.io]
  resources: [volumeattributesclasses]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [list, watch, create, update, patch]
{{- end -}}

{{- define "nbd-csi.rules.snapshotter" -}}
- apiGroups: [snapshot.storage.k8s.io]
  resources: [volumesnapshotclasses]
  verbs: [get, list, watch]
- apiGroups: [snapshot.storage.k8s.io]
  resources: [volumesnapshotcontents]
  verbs: [get, list, watch, update, patch]
- apiGroups: [snapshot.storage.k8s.io]
  resources: [volumesnapshotcontents/status]
  verbs: [update, patch]
- apiGroups: [""]
  resources: [events]
  verbs: [list, watch, create, update, patch]
{{- end -}}

{{- define "nbd-csi.rules.controller" -}}
# nbd-csi-controller: a Node's addresses for the export allowlist (one
# watch of every Node); a volume's PersistentVolume (its claim) to put
# Events on; the CSINodes, whose nodes run the node plugin and get a
# client certificate.
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch]
- apiGroups: [storage.k8s.io]
  resources: [csinodes]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [persistentvolumes]
  verbs: [get]
{{ include "nbd-csi.rules.events" . }}
{{- end -}}

{{- define "nbd-csi.rules.controller-cluster" -}}
# nbd-csi-controller in cluster mode: it writes the specs of the volume and
# snapshot objects, and places volumes on live storage nodes.
- apiGroups: [nbd.csi.dev]
  resources: [nbdvolumes, nbdsnapshots]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [nbd.csi.dev]
  resources: [nbdstoragenodes]
  verbs: [get, list, watch]
{{- end -}}

{{- define "nbd-csi.namespacedRules.controller-cluster" -}}
# The agents' Leases (who is alive), the sidecars' leader-election Leases
# (several replicas run) and the export-name key: created when missing,
# and only that Secret may be read.
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, list, watch, create, update]
- apiGroups: [""]
  resources: [secrets]
  verbs: [create]
- apiGroups: [""]
  resources: [secrets]
  resourceNames: [{{ include "nbd-csi.exportKeySecret" . }}]
  verbs: [get]
{{- end -}}

{{- define "nbd-csi.namespacedRules.controller-tls" -}}
{{- if eq .Values.tls.issuer "cert-manager" }}
# One cert-manager Certificate per node and agent (server-side apply);
# cert-manager writes their Secrets.
- apiGroups: [cert-manager.io]
  resources: [certificates]
  verbs: [get, create, patch]
{{- else }}
# The certificate Secrets it issues (their names follow the nodes, so RBAC
# cannot list them): created, read and renewed in place; the CA's among them.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, get, update]
{{- if include "nbd-csi.podCertificates" . }}
# The node plugins' pod certificates: the kubelets' requests from this
# namespace, answered through their status; the CA certificate published
# for them in one ConfigMap.
- apiGroups: [certificates.k8s.io]
  resources: [podcertificaterequests]
  verbs: [get, list, watch]
- apiGroups: [certificates.k8s.io]
  resources: [podcertificaterequests/status]
  verbs: [update, patch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create]
- apiGroups: [""]
  resources: [configmaps]
  resourceNames: [{{ include "nbd-csi.tlsSecretPrefix" . }}-ca]
  verbs: [get, update]
{{- end }}
{{- end }}
{{- if ne .Values.storage.mode "cluster" }}
# Embedded, it serves the volumes itself: its own server certificate's
# Secret, followed by a watch of that one name (a field selector on
# metadata.name, which RBAC matches against resourceNames).
- apiGroups: [""]
  resources: [secrets]
  resourceNames: [{{ include "nbd-csi.tlsSecretPrefix" . }}-controller]
  verbs: [get, list, watch]
{{- end }}
{{- end -}}

{{- define "nbd-csi.rules.certificate-signer" -}}
# Pod certificates: signing for the node plugins' signer and, in cluster
# mode, the storage agents', nothing else.
- apiGroups: [certificates.k8s.io]
  resources: [signers]
  resourceNames:
    - {{ include "nbd-csi.signer" (dict "ctx" . "role" "node") }}
    {{- if eq .Values.storage.mode "cluster" }}
    - {{ include "nbd-csi.signer" (dict "ctx" . "role" "storage") }}
    {{- end }}
  verbs: [sign]
{{- end -}}

{{- define "nbd-csi.namespacedRules.tls-holder" -}}
# Its own certificate Secret, followed by a watch of that one name. RBAC
# cannot narrow a DaemonSet's pods to their own node's Secret, so this is
# every Secret of the namespace (see the chart README).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch]
{{- end -}}

{{- define "nbd-csi.rules.storage" -}}
# nbd-csi-controller agent: the volume and snapshot objects of its node
# (watched with a field selector, which RBAC cannot narrow), their
# finalizer and status; its own NbdStorageNode; the addresses of the Nodes
# it serves (one watch of every Node); Events on the objects.
- apiGroups: [nbd.csi.dev]
  resources: [nbdvolumes, nbdsnapshots]
  verbs: [get, list, watch, patch]
- apiGroups: [nbd.csi.dev]
  resources: [nbdvolumes/status, nbdsnapshots/status]
  verbs: [patch]
- apiGroups: [nbd.csi.dev]
  resources: [nbdstoragenodes]
  verbs: [get, create, patch]
- apiGroups: [nbd.csi.dev]
  resources: [nbdstoragenodes/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{- define "nbd-csi.namespacedRules.storage" -}}
# Its Lease, which says it is alive.
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, create, patch]
{{- end -}}

{{- define "nbd-csi.rules.node" -}}
# nbd-csi-node: Events only.
{{ include "nbd-csi.rules.events" . }}
{{- end -}}
