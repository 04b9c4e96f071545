# shellcheck shell=bash
# Pinned Kubernetes-side tools, built with `go` from the module proxy into a
# versioned cache outside the repository. Sourced by tests/chart.sh and
# tests/k8s/*.sh; bump a version here and the next run rebuilds that tool.
#
# Cache layout ($NBD_CSI_TOOLS, default ~/.cache/nbd-csi/tools-v1):
#   bin/                 the binaries (GOBIN)
#   stamps/NAME-VERSION  written after NAME was built at VERSION
#   build/NAME-VERSION/  throwaway Go modules for tools that cannot be `go install`ed
#   build-times.txt      one line per build: tool, version, seconds

HELM_VERSION=v3.22.0
KUBECONFORM_VERSION=v0.8.0
ETCD_VERSION=v3.7.3
KUBERNETES_VERSION=v1.37.2

NBD_CSI_TOOLS=${NBD_CSI_TOOLS:-$HOME/.cache/nbd-csi/tools-v1}
TOOLS_BIN=$NBD_CSI_TOOLS/bin
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}
# Every tool static, as their releases are: the cluster VM runs them without
# the host's libc, and one setting lets a cold run compile the standard
# library and the modules the tools share once instead of once per setting.
export CGO_ENABLED=0
mkdir -p "$TOOLS_BIN" "$NBD_CSI_TOOLS/stamps" "$NBD_CSI_TOOLS/build"

tools_have() { # NAME VERSION
    [ -f "$NBD_CSI_TOOLS/stamps/$1-$2" ] && [ -x "$TOOLS_BIN/$1" ]
}

tools_built() { # NAME VERSION START_EPOCH
    local secs=$(($(date +%s) - $3))
    rm -f "$NBD_CSI_TOOLS/stamps/$1-"*
    touch "$NBD_CSI_TOOLS/stamps/$1-$2"
    printf '%s %s %ss %s\n' "$1" "$2" "$secs" "$(date -u +%FT%TZ)" >>"$NBD_CSI_TOOLS/build-times.txt"
    echo "built $1 $2 in ${secs}s"
}

# go install for modules without replace directives.
tools_go_install() { # NAME PACKAGE VERSION
    tools_have "$1" "$3" && return 0
    command -v go >/dev/null || { echo "go is needed to build $1 (install Go >= 1.26)" >&2; return 1; }
    local start; start=$(date +%s)
    echo "building $1 $3 (go install $2@$3)"
    GOBIN=$TOOLS_BIN nice -n 10 go install "$2@$3"
    tools_built "$1" "$3" "$start"
}

# Python grpcio (gRPC C-core) from PyPI, for the suites that call CSI
# endpoints through another gRPC implementation than ours; import it with
# PYTHONPATH=$GRPCIO_DIR.
GRPCIO_VERSION=1.85.3
GRPCIO_DIR=$NBD_CSI_TOOLS/python-grpcio-$GRPCIO_VERSION
ensure_grpcio() {
    PYTHONPATH=$GRPCIO_DIR python3 -c 'import grpc' 2>/dev/null && return 0
    echo "installing grpcio $GRPCIO_VERSION into $GRPCIO_DIR"
    python3 -m pip install --quiet --disable-pip-version-check --target "$GRPCIO_DIR.tmp" "grpcio==$GRPCIO_VERSION" &&
        rm -rf "$GRPCIO_DIR" && mv "$GRPCIO_DIR.tmp" "$GRPCIO_DIR"
}

ensure_helm() { tools_go_install helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"; }
ensure_kubeconform() { tools_go_install kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION"; }

# etcd has replace directives in its go.mod, so `go install` refuses it; a
# throwaway module that requires the server module builds it unchanged.
ensure_etcd() {
    tools_have etcd "$ETCD_VERSION" && return 0
    local start dir; start=$(date +%s)
    dir=$NBD_CSI_TOOLS/build/etcd-$ETCD_VERSION
    echo "building etcd $ETCD_VERSION in $dir"
    rm -rf "$dir" && mkdir -p "$dir"
    (
        cd "$dir" || exit 1
        go mod init nbd-csi.local/build/etcd >/dev/null 2>&1
        nice -n 10 go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
        nice -n 10 go build -trimpath -o "$TOOLS_BIN/etcd" go.etcd.io/etcd/server/v3
    )
    tools_built etcd "$ETCD_VERSION" "$start"
}

# The version ldflags the Kubernetes release build sets (otherwise every
# component reports v0.0.0).
kube_ldflags() {
    local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
    echo "-s -w
        -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION
        -X k8s.io/component-base/version.gitMajor=1
        -X k8s.io/component-base/version.gitMinor=$minor
        -X k8s.io/component-base/version.gitTreeState=clean
        -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z
        -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION
        -X k8s.io/client-go/pkg/version.gitMajor=1
        -X k8s.io/client-go/pkg/version.gitMinor=$minor"
}

# The Kubernetes commands the suites run, all from k8s.io/kubernetes.
KUBERNETES_COMMANDS="kube-apiserver kubectl kubelet kube-controller-manager kube-scheduler kube-proxy"

# The kubernetes-csi sidecars and Kubernetes' snapshot controller, as
# NAME:MODULE:VERSION:PACKAGE (the package relative to the module).
EXTERNAL_PROVISIONER_VERSION=v6.4.0
EXTERNAL_ATTACHER_VERSION=v4.13.0
EXTERNAL_RESIZER_VERSION=v2.3.0
EXTERNAL_SNAPSHOTTER_VERSION=v8.7.0
CSI_SIDECARS="csi-provisioner:github.com/kubernetes-csi/external-provisioner/v6:$EXTERNAL_PROVISIONER_VERSION:cmd/csi-provisioner
csi-attacher:github.com/kubernetes-csi/external-attacher/v4:$EXTERNAL_ATTACHER_VERSION:cmd/csi-attacher
csi-resizer:github.com/kubernetes-csi/external-resizer/v2:$EXTERNAL_RESIZER_VERSION:cmd/csi-resizer
csi-snapshotter:github.com/kubernetes-csi/external-snapshotter/v8:$EXTERNAL_SNAPSHOTTER_VERSION:cmd/csi-snapshotter
snapshot-controller:github.com/kubernetes-csi/external-snapshotter/v8:$EXTERNAL_SNAPSHOTTER_VERSION:cmd/snapshot-controller"

# A sidecar's stamp: its version and the Kubernetes modules it was built with.
sidecar_stamp() { echo "$1-k$KUBERNETES_VERSION"; }

# Writes DIR/go.mod: a throwaway module that requires k8s.io/kubernetes at
# $KUBERNETES_VERSION, and MODULE VERSION lines from stdin besides.
# k8s.io/kubernetes replaces each staging module with ./staging/src/...,
# which only works inside its repository: the throwaway module replaces
# each with its published v0.Y.Z instead.
kubernetes_module() { # DIR
    local gomod staging=v0.${KUBERNETES_VERSION#v1.}
    gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')
    [ -f "$gomod" ] || { echo "cannot download k8s.io/kubernetes@$KUBERNETES_VERSION" >&2; return 1; }
    {
        echo "module nbd-csi.local/build/$(basename "$1")"
        echo
        echo "go $(sed -n 's/^go //p' "$gomod")"
        echo
        echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
        sed '/^$/d; s/^/require /'
        echo
        grep -E '^[[:space:]]+k8s\.io/[^ ]+ v0\.0\.0$' "$gomod" | awk -v v="$staging" '{ printf "replace %s => %s %s\n", $1, $1, v }'
    } >"$1/go.mod"
}

# The Kubernetes commands with the version ldflags the release build sets
# (otherwise the server reports v0.0.0), exactly on the dependency versions
# Kubernetes pins. One `go build` for all of them: the packages they share
# compile once (built one by one with different CGO settings, a cold
# kubelet alone took 1169 s).
ensure_kubernetes() {
    local cmd missing=""
    for cmd in $KUBERNETES_COMMANDS; do tools_have "$cmd" "$KUBERNETES_VERSION" || missing=1; done
    [ -z "$missing" ] && return 0
    local start dir packages=""
    start=$(date +%s)
    dir=$NBD_CSI_TOOLS/build/kubernetes-$KUBERNETES_VERSION
    echo "building $KUBERNETES_COMMANDS $KUBERNETES_VERSION in $dir"
    rm -rf "$dir" && mkdir -p "$dir"
    kubernetes_module "$dir" </dev/null || return 1
    for cmd in $KUBERNETES_COMMANDS; do packages="$packages k8s.io/kubernetes/cmd/$cmd"; done
    local ldflags; ldflags=$(kube_ldflags)
    (
        cd "$dir" || exit 1
        # shellcheck disable=SC2086 # one word per package
        nice -n 10 go get $packages || exit 1
        # shellcheck disable=SC2086
        nice -n 10 go build -trimpath -ldflags "$ldflags" -o "$TOOLS_BIN/" $packages
    ) || { echo "building Kubernetes $KUBERNETES_VERSION failed" >&2; return 1; }
    for cmd in $KUBERNETES_COMMANDS; do
        rm -f "$NBD_CSI_TOOLS/stamps/$cmd-"*
        touch "$NBD_CSI_TOOLS/stamps/$cmd-$KUBERNETES_VERSION"
    done
    tools_built kubernetes "$KUBERNETES_VERSION" "$start"
}

# Every sidecar in one throwaway module. Their own go.mod files replace
# k8s.io modules with published versions, which `go install` refuses, and
# pin them differently (v0.36.1 to v0.37.1); built apart, each recompiled
# client-go, api, apimachinery, grpc and the rest, 194-220 s apiece on a
# cold cache. In one module they share one set of dependency versions, so
# those compile once. The price is that minimum version selection lifts
# each sidecar's dependencies to the newest any of them needs, and the
# k8s.io modules to $KUBERNETES_VERSION's (csi-provisioner's
# k8s.io/kubernetes from v1.36.3 to it, csi-lib-utils from v0.24 to v0.25
# for two of them): patch and minor steps of libraries, which the suites
# that run the sidecars check. Kubernetes' own commands stay in their own
# module above, on exactly the versions Kubernetes pins (its CEL, for one,
# decides what the CRD suite sees). Each sidecar gets its main.version;
# that only changes the link, so each `go build` after the first reuses the
# compiled packages. Static (CGO off above, as the upstream images are):
# the cluster VM's images hold the binary alone.
ensure_csi_sidecars() {
    local cmd module version package entry missing=""
    for entry in $CSI_SIDECARS; do
        IFS=: read -r cmd _ version _ <<<"$entry"
        tools_have "$cmd" "$(sidecar_stamp "$version")" || missing=1
    done
    [ -z "$missing" ] && return 0
    local start dir requires="" packages=""
    start=$(date +%s)
    dir=$NBD_CSI_TOOLS/build/csi-sidecars-k$KUBERNETES_VERSION
    echo "building the CSI sidecars with Kubernetes $KUBERNETES_VERSION modules in $dir"
    rm -rf "$dir" && mkdir -p "$dir"
    for entry in $CSI_SIDECARS; do
        IFS=: read -r _ module version package <<<"$entry"
        requires="$requires$module $version"$'\n'
        packages="$packages $module/$package"
    done
    # external-snapshotter replaces its client module with ./client, which
    # is not in the module zip: the client's release of the same version.
    requires="${requires}github.com/kubernetes-csi/external-snapshotter/client/v8 $EXTERNAL_SNAPSHOTTER_VERSION"
    sort -u <<<"$requires" | kubernetes_module "$dir" || return 1
    (
        cd "$dir" || exit 1
        # shellcheck disable=SC2086 # one word per package
        nice -n 10 go get $packages || exit 1
        for entry in $CSI_SIDECARS; do
            IFS=: read -r cmd module version package <<<"$entry"
            nice -n 10 go build -trimpath -ldflags "-s -w -X main.version=$version" -o "$TOOLS_BIN/$cmd" \
                "$module/$package" || exit 1
        done
    ) || { echo "building the CSI sidecars failed" >&2; return 1; }
    for entry in $CSI_SIDECARS; do
        IFS=: read -r cmd _ version _ <<<"$entry"
        rm -f "$NBD_CSI_TOOLS/stamps/$cmd-"*
        touch "$NBD_CSI_TOOLS/stamps/$cmd-$(sidecar_stamp "$version")"
    done
    tools_built csi-sidecars "k$KUBERNETES_VERSION" "$start"
}

# The cluster suite runs all five; one module builds them together.
ensure_cluster_sidecars() { ensure_csi_sidecars; }

# go_module_dir MODULE@VERSION: downloads it (module cache) and prints its directory.
go_module_dir() { go mod download -json "$1" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p'; }

# The snapshot CRDs live in the snapshotter's client module; prints their directory.
snapshot_crds_dir() {
    local dir
    dir=$(go_module_dir "github.com/kubernetes-csi/external-snapshotter/client/v8@$EXTERNAL_SNAPSHOTTER_VERSION")
    [ -d "$dir/config/crd" ] || { echo "cannot download the snapshot CRDs" >&2; return 1; }
    echo "$dir/config/crd"
}

# cert-manager's CRDs (plain YAML in its Go module), for checking the
# Certificates the controller makes with tls.issuer=cert-manager and the
# chart's Issuers; prints their directory. cert-manager itself is not run.
CERT_MANAGER_VERSION=v1.21.2
cert_manager_crds_dir() {
    local dir
    dir=$(go_module_dir "github.com/cert-manager/cert-manager@$CERT_MANAGER_VERSION")
    [ -f "$dir/deploy/crds/cert-manager.io_certificates.yaml" ] || { echo "cannot download cert-manager's CRDs" >&2; return 1; }
    echo "$dir/deploy/crds"
}
