#!/usr/bin/env bash
# Builds the operator image without a container engine daemon, with buildah (Debian's package,
# installed with apt-get when missing), with the contract of the Dockerfile's final stage:
# user 65532:65532, no shell and no package manager, CA certificates, entrypoint /meshwarden
# with the command run, port 8080, the same OCI labels. Prints the image's name and size.
#
# The binary here links glibc dynamically and the image carries the libraries it needs.
# The Dockerfile (the published, multi-arch recipe) builds a static musl binary for
# distroless/static; this machine has only the x86_64-unknown-linux-gnu target (the musl
# target cannot be installed), and a static glibc binary is not the answer: glibc loads its
# NSS modules at run time for name resolution even when linked statically, and warns or fails
# without them. So the image holds the release binary as the gnu target builds it (stripped
# like the Dockerfile's, CARGO_PROFILE_RELEASE_STRIP=symbols), the shared libraries `ldd`
# names with the dynamic loader (glibc 2.36 of Debian 12, whose NSS files and dns modules are
# built into libc.so.6) and their copyright files, Debian's CA bundle, and /etc/passwd,
# /etc/group and /etc/nsswitch.conf as distroless has them. Nothing else: no shell, no
# coreutils, no package database.
#
# Usage: hack/image.sh [--config]
#   --config   print the configuration the image gets (user, entrypoint, cmd, port, labels),
#              one `key=value` a line, and exit; tests/image.rs compares it with the
#              Dockerfile's final stage
# Environment:
#   IMAGE            name of the image (default localhost/meshwarden:<version in Cargo.toml>)
#   MESHWARDEN_BIN   use this binary instead of building one (`cargo build --release --locked
#                    --bin meshwarden`, into $CARGO_TARGET_DIR or target/)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# The contract, the same as the Dockerfile's final stage (tests/image.rs checks it).
IMAGE_USER=65532:65532
ENTRYPOINT=/meshwarden
CMD=run
PORT=8080
LABELS=(
  "org.opencontainers.image.title=meshwarden"
  "org.opencontainers.image.description=Kubernetes operator that keeps an Istio service mesh in production posture"
  "org.opencontainers.image.licenses=Apache-2.0"
)

if [ "${1:-}" = --config ]; then
  echo "user=$IMAGE_USER"
  echo "entrypoint=$ENTRYPOINT"
  echo "cmd=$CMD"
  echo "port=$PORT/tcp"
  for l in "${LABELS[@]}"; do echo "label=$l"; done
  exit 0
elif [ $# -gt 0 ]; then
  echo "usage: hack/image.sh [--config]" >&2
  exit 2
fi

log() { echo "image: $*" >&2; }
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
IMAGE=${IMAGE:-localhost/meshwarden:$VERSION}

missing=()
command -v buildah > /dev/null || missing+=(buildah)
# podman and runc run the image (tests/image_run.rs); crun, podman's default, refuses
# the cgroups of some hosts.
command -v podman > /dev/null || missing+=(podman)
command -v runc > /dev/null || missing+=(runc)
command -v strip > /dev/null || missing+=(binutils)
[ -f /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
if [ "${#missing[@]}" -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  SUDO=
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq > /dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
fi

start=$(date +%s)
BIN=${MESHWARDEN_BIN:-}
if [ -z "$BIN" ]; then
  log "cargo build --release --locked --bin meshwarden"
  cargo build --release --locked --bin meshwarden >&2
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/meshwarden"
fi
[ -x "$BIN" ] || { log "no binary at $BIN"; exit 1; }

WORK=$(mktemp -d)
CTR=
cleanup() {
  [ -z "$CTR" ] || buildah rm "$CTR" > /dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# The root filesystem, staged here and copied into an empty image in one layer.
FS="$WORK/rootfs"
mkdir -p "$FS/etc/ssl/certs"
strip --strip-all -o "$FS/meshwarden" "$BIN"
chmod 0555 "$FS/meshwarden"
# The shared libraries and the dynamic loader, at the paths the binary names.
for lib in $(ldd "$BIN" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
  mkdir -p "$FS$(dirname "$lib")"
  cp -L "$lib" "$FS$lib"
  pkg=$( (dpkg -S "$lib" || dpkg -S "$(readlink -f "$lib")") 2>/dev/null | head -n1 | cut -d: -f1) || pkg=
  if [ -n "$pkg" ] && [ -f "/usr/share/doc/$pkg/copyright" ]; then
    mkdir -p "$FS/usr/share/doc/$pkg"
    cp "/usr/share/doc/$pkg/copyright" "$FS/usr/share/doc/$pkg/"
  fi
done
cp /etc/ssl/certs/ca-certificates.crt "$FS/etc/ssl/certs/"
cat > "$FS/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat > "$FS/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
echo "hosts: files dns" > "$FS/etc/nsswitch.conf"
mkdir -p "$FS/home/nonroot"
chmod -R u=rwX,go=rX "$FS/etc" "$FS/usr" "$FS/lib"* 2>/dev/null || true
if find "$FS" -name sh -o -name bash -o -name busybox | grep -q .; then
  log "a shell got into the image: $(find "$FS" -name sh -o -name bash -o -name busybox)"
  exit 1
fi

CTR=$(buildah from --name "meshwarden-image-$$" scratch)
buildah copy --chown 0:0 "$CTR" "$FS" / > /dev/null
label_args=()
for l in "${LABELS[@]}"; do label_args+=(--label "$l"); done
buildah config --user "$IMAGE_USER" --entrypoint "[\"$ENTRYPOINT\"]" --cmd "$CMD" --port "$PORT/tcp" \
  --workingdir /home/nonroot --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --os linux --arch amd64 "${label_args[@]}" "$CTR"
OLD=$(buildah images --quiet "$IMAGE" 2>/dev/null || true)
NEW=$(buildah commit --quiet --rm "$CTR" "$IMAGE")
CTR=
# The image this name stood for before, left without a name, goes.
if [ -n "$OLD" ] && [ "${NEW#sha256:}" != "$OLD" ] && [[ "${NEW#sha256:}" != "$OLD"* ]]; then
  buildah rmi "$OLD" > /dev/null 2>&1 || true
fi

# The committed image has the configuration above. buildah adds its own label,
# io.buildah.version, at commit (buildah 1.28 cannot leave it out); it is not compared.
buildah inspect --type image "$IMAGE" > "$WORK/inspect.json"
python3 - "$WORK/inspect.json" "$(bash "$0" --config)" <<'EOF'
import json, sys
config, want = json.load(open(sys.argv[1]))["OCIv1"]["config"], sys.argv[2].splitlines()
got = [f"user={config.get('User')}", "entrypoint=" + " ".join(config.get("Entrypoint") or []),
       "cmd=" + " ".join(config.get("Cmd") or [])]
got += [f"port={p}" for p in sorted(config.get("ExposedPorts") or {})]
got += [f"label={k}={v}" for k, v in sorted((config.get("Labels") or {}).items())
        if k != "io.buildah.version"]
if sorted(got) != sorted(want):
    sys.exit(f"image: the committed image's configuration differs:\n  got  {sorted(got)}\n  want {sorted(want)}")
EOF

# The image's size as `podman images` shows it (its one layer, uncompressed); without
# podman, the size of the files in that layer.
SIZE=$(podman image inspect --format '{{.Size}}' "$IMAGE" 2>/dev/null || du -sb "$FS" | cut -f1)
log "built in $(( $(date +%s) - start ))s: $(cd "$FS" && find . -type f | sort | tr '\n' ' ')"
echo "$IMAGE $SIZE bytes ($(( SIZE / 1024 / 1024 )) MiB; binary $(stat -c %s "$FS/meshwarden") bytes, glibc dynamic)"
