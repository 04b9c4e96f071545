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
#     cert-manager's CRDs, in a namespace and release of its own.

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

# A TLS session between what the issuer made: nbdinfo (GnuTLS) as worker-a
# against an export served with storage-1's certificate.
tls_session() { # LABEL: nbdinfo reads the size of an 8 MiB export over TLS, served with storage-1's files now
    local port srv size
    port=$(free_port)
    NO_COLOR=1 "$controller_bin" serve-file "$work/tls-export.img" --listen "${agent_addr[storage-1]}:$port" \
        --export-name tls --tls required --tls-dir "$work/tls/storage-1" >"$work/serve-file-$1.log" 2>&1 &
    srv=$!
    wait_until 10 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "${agent_addr[storage-1]}" "$port"
    size=$(nbdinfo --size "nbds://${agent_addr[storage-1]}:$port/tls?tls-certificates=$work/libnbd-worker-a" 2>"$work/nbdinfo-$1.err")
    kill "$srv" 2>/dev/null
    wait "$srv" 2>/dev/null
    check "nbdinfo with worker-a's certificate (libnbd verifies the server's for ${agent_addr[storage-1]}) reads the export served with storage-1's, $1" \
        "8388608" "$size$(sed 's/^/ /' "$work/nbdinfo-$1.err")"
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
    tls_session "as issued"
    # Renewal: two thirds into the lifetime, the Secret is issued again and the
    # holders' files follow.
    agent_serial=$(serial "$work/tls/storage-1/tls.crt")
    node_serial=$(serial "$node_tls/tls.crt")
    renewed() { [ "$(serial "$work/tls/storage-1/tls.crt")" != "$agent_serial" ] && [ "$(serial "$node_tls/tls.crt")" != "$node_serial" ]; }
    renew_start=$SECONDS
    if wait_until $((cert_lifetime + 15)) renewed; then
        ok "storage-1's and worker-a's certificates renewed and written into their directories within $((SECONDS - renew_start)) s (lifetime ${cert_lifetime} s, renewed two thirds in): $("$kubectl" -n "$ns" get secret "$tls_prefix-storage-storage-1" -o jsonpath='{.metadata.annotations.nbd\.csi\.dev/renew-after}') next"
        tls_session "after the renewal"
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
