# shellcheck shell=bash
# The certificates case of tests/k8s/scale-out.sh (issue 16), sourced after
# tests/k8s/cluster.sh; it uses the suite's $ns, $agents, $agent_addr,
# $controller_bin, $tls_prefix and $cert_lifetime:
#   - certs_issued_and_renewed: after the agents started, the built-in
#     issuer's CA and Secrets, the agents' and a node plugin's files, a TLS
#     session between them (nbdinfo against serve-file), and a renewal that
#     reaches the files; starts the node plugin ($node_pid);
#   - certs_ca_kept: after the controller's restart, the same CA;
#   - certs_cert_manager: the controller's cert-manager mode against
#     cert-manager's CRDs, in a namespace and release of its own;
#   - certs_pod_certificates: the controller as the signer of the node
#     plugins' pod certificates (tls.certificateDelivery=podCertificate), with
#     the chart's RBAC for it: PodCertificateRequests made as the kubelet
#     makes them (a pod on worker-a, an empty CSR signed by a new P-256 key),
#     answered through the real API server's validation.

secret_data() { # NAME KEY: a data key of Secret NAME in $ns, decoded
    "$kubectl" -n "$ns" get secret "$1" -o "jsonpath={.data.${2//./\\.}}" 2>/dev/null | base64 -d
}
san() { openssl x509 -in "$1" -noout -ext subjectAltName 2>/dev/null | tail -n +2 | tr -d ' '; }
serial() { openssl x509 -in "$1" -noout -serial 2>/dev/null; }

holder_files() { # WHO DIR SAN PURPOSE LOG: WHO wrote its certificate into DIR, naming SAN, chained to the CA for PURPOSE
    if wait_until 30 test -s "$2/tls.crt"; then
        check "$1 wrote its certificate into its --tls-dir, naming $3" "$3" "$(san "$2/tls.crt")"
        check "$1: its certificate chains to the CA, for $4" "$2/tls.crt: OK" \
            "$(openssl verify -CAfile "$work/ca.crt" -purpose "$4" "$2/tls.crt" 2>&1)"
    else
        logs "$5" controller.log
        bad "$1: no TLS files in $2: $(ls -A "$2" 2>&1 | paste -sd' ')"
    fi
}

# A TLS session between what the issuer made: nbdinfo (GnuTLS) with the
# client files in CLIENT_DIR (libnbd's layout) against an export served on
# storage-1's address with the server files in SERVER_DIR.
tls_session() { # LABEL SERVER_DIR CLIENT_DIR WHAT: nbdinfo reads the size of an 8 MiB export over TLS
    local port srv size
    port=$(free_port)
    NO_COLOR=1 "$controller_bin" serve-file "$work/tls-export.img" --listen "${agent_addr[storage-1]}:$port" \
        --export-name tls --tls required --tls-dir "$2" >"$work/serve-file-$1.log" 2>&1 &
    srv=$!
    wait_until 10 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "${agent_addr[storage-1]}" "$port"
    size=$(nbdinfo --size "nbds://${agent_addr[storage-1]}:$port/tls?tls-certificates=$3" 2>"$work/nbdinfo-$1.err")
    kill "$srv" 2>/dev/null
    wait "$srv" 2>/dev/null
    check "$4, $1" "8388608" "$size$(sed 's/^/ /' "$work/nbdinfo-$1.err")"
}
issued_session() { # LABEL
    tls_session "$1" "$work/tls/storage-1" "$work/libnbd-worker-a" \
        "nbdinfo with worker-a's certificate (libnbd verifies the server's for ${agent_addr[storage-1]}) reads the export served with storage-1's"
}

certs_issued_and_renewed() {
    if wait_until 30 "$kubectl" -n "$ns" get secret "$tls_prefix-ca"; then
        ok "the controller created the CA Secret $ns/$tls_prefix-ca ($(jp -n "$ns" secret "$tls_prefix-ca" -o jsonpath='{.type}'))"
    else
        logs controller.log
        bad "no CA Secret $tls_prefix-ca"
    fi
    secret_data "$tls_prefix-ca" ca.crt >"$work/ca.crt"
    secret_data "$tls_prefix-ca" tls.key >"$work/ca.key"
    for a in "${agents[@]}"; do
        if [ -n "${agent_tls_sync[$a]:-}" ]; then
            holder_files "agent $a (Secret $tls_prefix-storage-$a)" "$work/tls/$a" \
                "IPAddress:${agent_addr[$a]},DNS:$a" sslserver "agent-$a.log"
        else # issued, though this agent is not given it
            mkdir -p "$work/issued/$a"
            wait_until 30 "$kubectl" -n "$ns" get secret "$tls_prefix-storage-$a"
            secret_data "$tls_prefix-storage-$a" tls.crt >"$work/issued/$a/tls.crt"
            check "agent $a's Secret $tls_prefix-storage-$a names its address and node" \
                "IPAddress:${agent_addr[$a]},DNS:$a" "$(san "$work/issued/$a/tls.crt")"
        fi
    done
    check "no client certificate for a node whose CSINode does not list the driver (storage-1)" "" \
        "$(jp -n "$ns" secret "$tls_prefix-node-storage-1" -o name)"
    node_bin=$(node_binary) || exit 1
    cluster_kubeconfig "$work/node.kubeconfig" nbd-csi-node "$("$kubectl" -n "$ns" create token nbd-csi-node --duration 2h)"
    node_tls=$work/tls/node-worker-a
    NO_COLOR=1 "$node_bin" serve --endpoint "unix://$work/node.sock" --node-id worker-a --state-dir "$work/node-state" \
        --kubeconfig "$work/node.kubeconfig" --tls-dir "$node_tls" --tls-secret-prefix "$tls_prefix" \
        --tls-secret-namespace "$ns" >"$work/node.log" 2>&1 &
    node_pid=$!
    pids+=("$node_pid")
    holder_files "worker-a's node plugin (Secret $tls_prefix-node-worker-a; one DNS name, the node)" "$node_tls" \
        "DNS:worker-a" sslclient node.log
    leaked=$(for s in "$tls_prefix-node-worker-a" "${agents[@]/#/$tls_prefix-storage-}"; do
        secret_data "$s" tls.key | cmp -s - "$work/ca.key" && echo "$s"; done | paste -sd' ')
    check "the CA key is in no holder's Secret" "" "$leaked"
    truncate -s 8M "$work/tls-export.img"
    mkdir -p "$work/libnbd-worker-a"
    ln -s "$node_tls/ca.crt" "$work/libnbd-worker-a/ca-cert.pem"
    ln -s "$node_tls/tls.crt" "$work/libnbd-worker-a/client-cert.pem"
    ln -s "$node_tls/tls.key" "$work/libnbd-worker-a/client-key.pem"
    issued_session "as issued"
    # Renewal: two thirds into the lifetime, the Secret is issued again and the
    # holders' files follow.
    agent_serial=$(serial "$work/tls/storage-1/tls.crt")
    node_serial=$(serial "$node_tls/tls.crt")
    renewed() { [ "$(serial "$work/tls/storage-1/tls.crt")" != "$agent_serial" ] && [ "$(serial "$node_tls/tls.crt")" != "$node_serial" ]; }
    renew_start=$SECONDS
    if wait_until $((cert_lifetime + 15)) renewed; then
        ok "storage-1's and worker-a's certificates renewed and written into their directories within $((SECONDS - renew_start)) s (lifetime ${cert_lifetime} s, renewed two thirds in): $("$kubectl" -n "$ns" get secret "$tls_prefix-storage-storage-1" -o jsonpath='{.metadata.annotations.nbd\.csi\.dev/renew-after}') next"
        issued_session "after the renewal"
    else
        logs controller.log node.log agent-storage-1.log
        bad "no renewal reached the files within $((cert_lifetime + 15)) s"
    fi
}

certs_ca_kept() {
    check "the restarted controller kept the CA (the CA Secret's certificate unchanged)" "" \
        "$(secret_data "$tls_prefix-ca" ca.crt | cmp - "$work/ca.crt" 2>&1)"
    check "worker-a's files still chain to that CA" "$node_tls/tls.crt: OK" \
        "$(openssl verify -CAfile "$work/ca.crt" -purpose sslclient "$node_tls/tls.crt" 2>&1)"
}

certs_cert_manager() {
    if crds=$(cert_manager_crds_dir) &&
        "$kubectl" apply --server-side -f "$crds/cert-manager.io_certificates.yaml" -f "$crds/cert-manager.io_issuers.yaml" >"$work/cm-crds.txt" 2>&1 &&
        "$kubectl" wait --for=condition=Established --timeout=60s crd/certificates.cert-manager.io crd/issuers.cert-manager.io >>"$work/cm-crds.txt" 2>&1; then
        ok "cert-manager $CERT_MANAGER_VERSION's Certificate and Issuer CRDs Established"
        cm_ns=nbd-csi-cm
        "$kubectl" create namespace "$cm_ns" >/dev/null
        # Another release name, so its cluster-wide RBAC does not replace the first's.
        "$helm" template nbd-csi-cm charts/nbd-csi --namespace "$cm_ns" --set storage.mode=cluster --set tls.issuer=cert-manager \
            --show-only templates/certificates.yaml --show-only templates/rbac.yaml \
            --show-only templates/serviceaccounts.yaml >"$work/cm-chart.yaml"
        if "$kubectl" apply --validate=strict -f "$work/cm-chart.yaml" >"$work/cm-apply.txt" 2>&1; then
            ok "the chart's self-signed Issuer, CA Certificate and CA Issuer (and its ServiceAccounts and RBAC for cert-manager mode) apply strictly: $("$kubectl" -n "$cm_ns" get issuers,certificates -o name | paste -sd' ')"
        else
            cat "$work/cm-apply.txt" >&2
            bad "the chart's cert-manager objects did not apply"
        fi
        cluster_kubeconfig "$work/cm-controller.kubeconfig" nbd-csi-cm-controller "$("$kubectl" -n "$cm_ns" create token nbd-csi-cm-controller --duration 1h)"
        NO_COLOR=1 "$controller_bin" --endpoint "unix://$work/cm.sock" --driver-name "$driver" --storage-mode cluster \
            --export-key-secret nbd-csi-cm-export-key --namespace "$cm_ns" --kubeconfig "$work/cm-controller.kubeconfig" \
            --tls-issuer cert-manager --tls-secret-prefix nbd-csi-cm --tls-cert-manager-issuer nbd-csi-cm-ca --tls-cert-lifetime 24h \
            >"$work/cm-controller.log" 2>&1 &
        cm_pid=$!
        pids+=("$cm_pid")
        cm_certs() { "$kubectl" -n "$cm_ns" get certificates.cert-manager.io -l nbd.csi.dev/certificate -o name | sort | paste -sd' '; }
        # One per CSINode listing the driver (worker-a, and worker-b once the
        # suite has registered it) and one per agent.
        want_certs=$( {
            "$kubectl" get csinodes -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.spec.drivers[*].name}{"\n"}{end}' |
                awk -v d="$driver" '{ for (i = 2; i <= NF; i++) if ($i == d) print "certificate.cert-manager.io/nbd-csi-cm-node-" $1 }'
            for a in "${agents[@]}"; do echo "certificate.cert-manager.io/nbd-csi-cm-storage-$a"; done
        } | sort | paste -sd' ')
        cm_certs_made() { [ "$(cm_certs)" = "$want_certs" ]; }
        if wait_until 30 cm_certs_made; then
            ok "the controller in cert-manager mode made one Certificate per CSINode with the driver and per NbdStorageNode: $(cm_certs)"
        else
            logs cm-controller.log
            bad "Certificates: got '$(cm_certs)', want '$want_certs'"
        fi
        spec() { "$kubectl" -n "$cm_ns" get certificates.cert-manager.io "$1" -o jsonpath='{.spec.secretName} {.spec.issuerRef.kind}/{.spec.issuerRef.name} {.spec.dnsNames} {.spec.ipAddresses} {.spec.usages} {.spec.duration}/{.spec.renewBefore} {.spec.privateKey.rotationPolicy} {.metadata.ownerReferences[0].kind}'; }
        check "worker-a's Certificate: its Secret, the CA Issuer, its one DNS name, client auth, renewed a third before its end, owned by its CSINode" \
            'nbd-csi-cm-node-worker-a Issuer/nbd-csi-cm-ca ["worker-a"]  ["digital signature","client auth"] 86400s/28800s Always CSINode' \
            "$(spec nbd-csi-cm-node-worker-a)"
        check "storage-1's Certificate: its address and node name, server auth, owned by its NbdStorageNode" \
            'nbd-csi-cm-storage-storage-1 Issuer/nbd-csi-cm-ca ["storage-1"] ["127.0.1.1"] ["digital signature","server auth"] 86400s/28800s Always NbdStorageNode' \
            "$(spec nbd-csi-cm-storage-storage-1)"
        check "no CA Secret made by the controller in cert-manager mode (cert-manager's CA Certificate makes it)" "" \
            "$(jp -n "$cm_ns" secret nbd-csi-cm-ca -o name)"
        kill "$cm_pid" 2>/dev/null
    else
        cat "$work/cm-crds.txt" >&2
        bad "cert-manager's CRDs could not be applied"
    fi
}

# A PodCertificateRequest for pod $1 (ServiceAccount $2) on node $3, signer
# $driver/$4, for a new P-256 key written to $5, as the kubelet creates one;
# prints its name.
pod_certificate_request() { # POD SERVICEACCOUNT NODE SIGNER KEYFILE
    local pod_uid sa_uid node_uid csr
    "$kubectl" -n "$pc_ns" apply -f - >/dev/null <<POD
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  nodeName: $3
  serviceAccountName: $2
  containers: [{name: c, image: registry.invalid/none}]
POD
    pod_uid=$(jp -n "$pc_ns" pod "$1" -o jsonpath='{.metadata.uid}')
    sa_uid=$(jp -n "$pc_ns" serviceaccount "$2" -o jsonpath='{.metadata.uid}')
    node_uid=$(jp node "$3" -o jsonpath='{.metadata.uid}')
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$5" 2>/dev/null
    csr=$(openssl req -new -key "$5" -subj / -outform DER 2>/dev/null | base64 -w0)
    "$kubectl" -n "$pc_ns" create -o name -f - <<PCR
apiVersion: certificates.k8s.io/v1
kind: PodCertificateRequest
metadata: {generateName: $1-}
spec:
  signerName: $driver/$4
  podName: $1
  podUID: $pod_uid
  serviceAccountName: $2
  serviceAccountUID: $sa_uid
  nodeName: $3
  nodeUID: $node_uid
  maxExpirationSeconds: 86400
  stubPKCS10Request: $csr
PCR
}

# Waits for PodCertificateRequest $1 to be issued and writes its chain to $2.
pod_certificate_issued() { # REQUEST CHAINFILE WHAT
    issued() { [ -n "$(jp -n "$pc_ns" "$1" -o jsonpath='{.status.certificateChain}')" ]; }
    if wait_until 30 issued "$1"; then
        jp -n "$pc_ns" "$1" -o jsonpath='{.status.certificateChain}' >"$2"
        return 0
    fi
    logs pc-controller.log
    bad "$3: not issued: $(jp -n "$pc_ns" "$1" -o jsonpath='{.status}')"
    return 1
}

certs_pod_certificates() {
    pc_ns=nbd-csi-pc
    "$kubectl" create namespace "$pc_ns" >/dev/null
    "$helm" template nbd-csi-pc charts/nbd-csi --namespace "$pc_ns" --set storage.mode=cluster \
        --set tls.certificateDelivery=podCertificate --show-only templates/rbac.yaml \
        --show-only templates/serviceaccounts.yaml >"$work/pc-chart.yaml"
    if ! "$kubectl" apply --validate=strict -f "$work/pc-chart.yaml" >"$work/pc-apply.txt" 2>&1; then
        cat "$work/pc-apply.txt" >&2
        bad "the chart's RBAC for pod certificates did not apply"
        return
    fi
    cluster_kubeconfig "$work/pc-controller.kubeconfig" nbd-csi-pc-controller "$("$kubectl" -n "$pc_ns" create token nbd-csi-pc-controller --duration 1h)"
    NO_COLOR=1 "$controller_bin" --endpoint "unix://$work/pc.sock" --driver-name "$driver" --storage-mode cluster \
        --export-key-secret nbd-csi-pc-export-key --namespace "$pc_ns" --kubeconfig "$work/pc-controller.kubeconfig" \
        --tls-issuer builtin --tls-secret-prefix nbd-csi-pc --tls-cert-lifetime 2h --tls-certificate-delivery pod \
        --tls-node-service-account nbd-csi-pc-node --tls-storage-service-account nbd-csi-pc-storage \
        >"$work/pc-controller.log" 2>&1 &
    pc_pid=$!
    pids+=("$pc_pid")
    if wait_until 30 "$kubectl" -n "$pc_ns" get configmap nbd-csi-pc-ca; then
        "$kubectl" -n "$pc_ns" get configmap nbd-csi-pc-ca -o jsonpath='{.data.ca\.crt}' >"$work/pc-ca.crt"
        check "ConfigMap nbd-csi-pc-ca holds the CA certificate of Secret nbd-csi-pc-ca (the holders' ca.crt)" "" \
            "$("$kubectl" -n "$pc_ns" get secret nbd-csi-pc-ca -o jsonpath='{.data.ca\.crt}' | base64 -d | cmp - "$work/pc-ca.crt" 2>&1)"
    else
        logs pc-controller.log
        bad "no CA ConfigMap nbd-csi-pc-ca"
        return
    fi
    local request node_ok=false storage_ok=false
    # The node plugin on worker-a.
    if request=$(pod_certificate_request node-plugin nbd-csi-pc-node worker-a node "$work/pc-node.key" 2>"$work/pc-create.err") &&
        pod_certificate_issued "$request" "$work/pc-node.crt" "the node plugin's PodCertificateRequest"; then
        check "the node plugin's PodCertificateRequest is Issued: a client certificate chained to the CA" \
            "Issued/True $work/pc-node.crt: OK" \
            "$(jp -n "$pc_ns" "$request" -o jsonpath='{.status.conditions[0].type}/{.status.conditions[0].status}') $(openssl verify -CAfile "$work/pc-ca.crt" -purpose sslclient "$work/pc-node.crt" 2>&1)"
        check "its one name is the pod's node, and its key the kubelet's (the request's)" \
            "DNS:worker-a $(openssl pkey -in "$work/pc-node.key" -pubout 2>/dev/null | sha256sum)" \
            "$(san "$work/pc-node.crt") $(openssl x509 -in "$work/pc-node.crt" -noout -pubkey | sha256sum)"
        local nb na
        nb=$(date -d "$(jp -n "$pc_ns" "$request" -o jsonpath='{.status.notBefore}')" +%s)
        na=$(date -d "$(jp -n "$pc_ns" "$request" -o jsonpath='{.status.notAfter}')" +%s)
        check "it lives --tls-cert-lifetime (2 h, under the request's 24 h), as the status says" \
            "7200 $(date -d "$(openssl x509 -in "$work/pc-node.crt" -noout -enddate | cut -d= -f2)" +%s)" "$((na - nb)) $na"
        node_ok=true
    elif [ -s "$work/pc-create.err" ]; then
        cat "$work/pc-create.err" >&2
        bad "the API server refused the node plugin's PodCertificateRequest"
    fi
    # The storage agent on storage-1: a server certificate for the Node's address.
    if request=$(pod_certificate_request agent nbd-csi-pc-storage storage-1 storage "$work/pc-storage.key" 2>"$work/pc-create.err") &&
        pod_certificate_issued "$request" "$work/pc-storage.crt" "the storage agent's PodCertificateRequest"; then
        check "the storage agent's PodCertificateRequest is Issued: a server certificate for storage-1's InternalIP and name" \
            "IPAddress:${agent_addr[storage-1]},DNS:storage-1 $work/pc-storage.crt: OK" \
            "$(san "$work/pc-storage.crt") $(openssl verify -CAfile "$work/pc-ca.crt" -purpose sslserver "$work/pc-storage.crt" 2>&1)"
        storage_ok=true
    elif [ -s "$work/pc-create.err" ]; then
        cat "$work/pc-create.err" >&2
        bad "the API server refused the storage agent's PodCertificateRequest"
    fi
    check "no storage Secret issued when the agents get pod certificates" "" \
        "$(jp -n "$pc_ns" secret nbd-csi-pc-storage-storage-1 -o name)"
    if $node_ok && $storage_ok; then
        # A session between the two: nbdinfo as worker-a with its pod
        # certificate against serve-file with storage-1's.
        mkdir -p "$work/pc-storage-1" "$work/pc-libnbd"
        cp "$work/pc-storage.crt" "$work/pc-storage-1/tls.crt"
        cp "$work/pc-storage.key" "$work/pc-storage-1/tls.key"
        cp "$work/pc-ca.crt" "$work/pc-storage-1/ca.crt"
        cp "$work/pc-ca.crt" "$work/pc-libnbd/ca-cert.pem"
        cp "$work/pc-node.crt" "$work/pc-libnbd/client-cert.pem"
        cp "$work/pc-node.key" "$work/pc-libnbd/client-key.pem"
        tls_session "pod certificates" "$work/pc-storage-1" "$work/pc-libnbd" \
            "nbdinfo with worker-a's pod certificate reads an export served with storage-1's pod certificate"
    fi
    # A pod of another ServiceAccount on worker-a asks for worker-a's
    # identity: Denied.
    "$kubectl" -n "$pc_ns" create serviceaccount intruder >/dev/null
    if request=$(pod_certificate_request intruder intruder worker-a node "$work/pc-intruder.key" 2>"$work/pc-create.err"); then
        denied() { [ "$(jp -n "$pc_ns" "$1" -o jsonpath='{.status.conditions[0].type}')" = Denied ]; }
        if wait_until 30 denied "$request"; then
            check "a pod of another ServiceAccount is Denied, with no certificate" "NotTheHolder " \
                "$(jp -n "$pc_ns" "$request" -o jsonpath='{.status.conditions[0].reason}') $(jp -n "$pc_ns" "$request" -o jsonpath='{.status.certificateChain}')"
        else
            logs pc-controller.log
            bad "the intruder's request was not denied: $(jp -n "$pc_ns" "$request" -o jsonpath='{.status}')"
        fi
    else
        cat "$work/pc-create.err" >&2
        bad "the API server refused the intruder's PodCertificateRequest"
    fi
    kill "$pc_pid" 2>/dev/null
}
