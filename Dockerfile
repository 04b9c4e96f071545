# syntax=docker/dockerfile:1
# nbd-csi image: nbd-csi-controller and nbd-csi-node plus the tools the node
# plugin runs (mkfs.ext4/xfs, blkid, mount, modprobe). Build from the
# repository root:
#   docker build -t nbd-csi:0.1.0 .
# Both stages are Debian bookworm, so the binaries link against the glibc
# they run with.

ARG RUST_IMAGE=rust:1.95.0-slim-bookworm
ARG RUNTIME_IMAGE=debian:12.11-slim

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# Only the workspace members the binaries need (tests/chart.sh checks this
# list against Cargo.toml's members).
COPY Cargo.toml Cargo.lock ./
COPY nbd nbd
COPY proto proto
COPY events events
COPY controller controller
COPY node node
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nbd-csi-controller -p nbd-csi-node \
    && install -D -m 0755 -t /out target/release/nbd-csi-controller target/release/nbd-csi-node

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="nbd-csi" \
      org.opencontainers.image.description="Kubernetes CSI driver serving block volumes over NBD" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/nbd-csi/nbd-csi" \
      org.opencontainers.image.licenses="Apache-2.0"
# e2fsprogs: mkfs.ext4, resize2fs; xfsprogs: mkfs.xfs, xfs_growfs;
# util-linux: blkid, blockdev, findmnt; mount: mount, umount; kmod: modprobe.
RUN apt-get update \
    && apt-get install -y --no-install-recommends e2fsprogs xfsprogs util-linux mount kmod \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/nbd-csi-controller /out/nbd-csi-node /usr/local/bin/
# The chart sets the command per component; this default prints the help.
ENTRYPOINT []
CMD ["nbd-csi-controller", "--help"]
