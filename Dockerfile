# syntax=docker/dockerfile:1
# nbd-csi image: nbd-csi-controller and nbd-csi-node plus the tools the node
# plugin runs (mkfs.ext4/xfs, resize2fs, xfs_growfs, and modprobe for the
# chart's init container). Build from the repository root:
#   docker build -t nbd-csi:0.1.0 .
# Both stages are Debian bookworm, so the binaries link against the glibc
# they run with.
#
# Without a registry (tests/cluster/images.sh), the binaries come from an
# image holding /out/nbd-csi-controller and /out/nbd-csi-node built on a
# bookworm host, and the runtime base from a local image that has the tools:
#   buildah bud --pull=never --target prebuilt-image \
#     --build-arg BINARIES_FROM=localhost/nbd-csi-binaries:0.1.0 \
#     --build-arg RUNTIME_IMAGE=localhost/nbd-csi-runtime-base:bookworm .
# It is a second final stage rather than a build arg naming the stage to copy
# from, because buildah 1.28 does not resolve a stage name given by an ARG;
# both builders skip the stages their target does not use.

ARG RUST_IMAGE=rust:1.95.0-slim-bookworm
ARG RUNTIME_IMAGE=debian:12.11-slim
ARG BINARIES_FROM=scratch

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# The workspace members and nothing else of the repository (cargo loads
# every member, tests/tools too, though the image builds only the two
# binaries; tests/chart.sh checks this list against Cargo.toml's members).
COPY Cargo.toml Cargo.lock ./
COPY nbd nbd
COPY agent agent
COPY proto proto
COPY events events
COPY controller controller
COPY node node
COPY tests/tools tests/tools
# The release profile keeps line tables for backtraces; the image drops them
# (about three quarters of each binary: 76 MB to 20 MB for the controller, 58
# to 15 for the node plugin), as tests/cluster/images.sh does. Backtraces keep
# the function names.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nbd-csi-controller -p nbd-csi-node --bins \
    && install -D -m 0755 -t /out target/release/nbd-csi-controller target/release/nbd-csi-node \
    && objcopy --strip-debug /out/nbd-csi-controller \
    && objcopy --strip-debug /out/nbd-csi-node

# Binaries built elsewhere (see above); unused by the default target.
FROM ${BINARIES_FROM} AS prebuilt

FROM ${RUNTIME_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="nbd-csi" \
      org.opencontainers.image.description="Kubernetes CSI driver serving block volumes over NBD" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/nbd-csi/nbd-csi" \
      org.opencontainers.image.licenses="Apache-2.0"
# e2fsprogs: mkfs.ext4, resize2fs; xfsprogs: mkfs.xfs, xfs_growfs;
# util-linux: blkid, blockdev, findmnt; mount: mount, umount; kmod: modprobe.
# A base that has them already (the local one, which has no apt) skips this.
RUN missing=; \
    for tool in mkfs.ext4 resize2fs mkfs.xfs xfs_growfs blkid blockdev findmnt mount umount modprobe; do \
        command -v "$tool" >/dev/null || missing="$missing $tool"; \
    done; \
    if [ -n "$missing" ]; then \
        echo "installing the packages of:$missing" \
        && apt-get update \
        && apt-get install -y --no-install-recommends e2fsprogs xfsprogs util-linux mount kmod \
        && rm -rf /var/lib/apt/lists/*; \
    fi
# The chart sets the command per component; this default prints the help.
ENTRYPOINT []
CMD ["nbd-csi-controller", "--help"]

FROM runtime AS prebuilt-image
COPY --from=prebuilt /out/nbd-csi-controller /out/nbd-csi-node /usr/local/bin/

FROM runtime
COPY --from=builder /out/nbd-csi-controller /out/nbd-csi-node /usr/local/bin/
