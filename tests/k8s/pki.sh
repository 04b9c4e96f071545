# Test certificates made with openssl, for the suites that run nbd-csi with
# TLS: a CA, then certificates it signs, each written as the files the
# binaries' --tls-dir reads (ca.crt, tls.crt, tls.key) and, for clients,
# also as the files libnbd's tls-certificates=DIR reads (ca-cert.pem,
# client-cert.pem, client-key.pem). Sourced; needs openssl.

pki_ca() { # DIR: a CA in DIR/ca.key and DIR/ca.crt
    mkdir -p "$1"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=nbd-csi test CA" -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$1/ca.key" -out "$1/ca.crt" 2>/dev/null
}

pki_issue() { # CA-DIR OUT-DIR CN SAN(e.g. IP:1.2.3.4 or DNS:node) serverAuth|clientAuth
    local ca=$1 out=$2
    mkdir -p "$out"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$3" \
        -keyout "$out/tls.key" -out "$out/tls.csr" 2>/dev/null &&
        openssl x509 -req -in "$out/tls.csr" -CA "$ca/ca.crt" -CAkey "$ca/ca.key" -CAcreateserial -days 2 \
            -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=%s\nkeyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n' "$4" "$5") \
            -out "$out/tls.crt" 2>/dev/null || return 1
    rm -f "$out/tls.csr"
    cp "$ca/ca.crt" "$out/ca.crt"
    # libnbd's names for the same files.
    cp "$ca/ca.crt" "$out/ca-cert.pem"
    cp "$out/tls.crt" "$out/client-cert.pem"
    cp "$out/tls.key" "$out/client-key.pem"
    chmod 0600 "$out/tls.key" "$out/client-key.pem"
}
