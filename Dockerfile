# syntax=docker/dockerfile:1.7
#
# Image of the meshwarden operator.
#
#   docker buildx build -t ghcr.io/meshwarden/meshwarden:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/meshwarden/meshwarden:0.1.0 .
#
# The binary is linked statically against musl (target <arch>-unknown-linux-musl), not
# glibc: a statically linked glibc still loads NSS modules at run time for name
# resolution and warns or fails without them, while a musl binary needs nothing from the
# image. That lets the final stage be distroless/static, which holds no libc and no shell,
# only CA certificates, time zone data and the nonroot user. musl's own allocator is not
# used: the binary brings mimalloc (src/allocator.rs), the same as on glibc builds.
# TLS is rustls with ring, whose C and assembly parts musl-gcc (musl-tools) compiles, as it
# compiles mimalloc.
#
# The builder runs on the platform it builds for (emulated when cross-building with
# buildx), so the Rust target follows `uname -m` and no cross linker is needed.

FROM rust:1.95-bookworm AS builder

# hadolint ignore=DL3008
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt,sharing=locked \
    rm -f /etc/apt/apt.conf.d/docker-clean \
    && apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rustup target add "$(uname -m)-unknown-linux-musl"
# DL3008 (pin apt versions) is ignored above: musl-tools comes from the Debian release the
# pinned rust:1.95-bookworm image is built on, which only ships security updates.

WORKDIR /src
# The build context is only what .dockerignore lets through: the Cargo manifests and lock
# file, src/ and the other workspace members.
COPY . .

# Release build with symbols stripped. The registry, git checkouts and target/ live in
# cache mounts, so a rebuild only compiles what changed; the binary is copied out of the
# target cache in the same step.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,id=meshwarden-target \
    TARGET="$(uname -m)-unknown-linux-musl" \
    && cargo build --release --locked --bin meshwarden --target "$TARGET" \
    && cp "target/$TARGET/release/meshwarden" /meshwarden

FROM gcr.io/distroless/static-debian12:nonroot

LABEL org.opencontainers.image.title="meshwarden" \
      org.opencontainers.image.description="Kubernetes operator that keeps an Istio service mesh in production posture" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder --chown=0:0 --chmod=0555 /meshwarden /meshwarden

# 65532 is the nonroot user and group of the distroless image; the Helm chart runs the
# container as the same IDs with a read-only root filesystem.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/meshwarden"]
CMD ["run"]
