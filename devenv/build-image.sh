#!/usr/bin/env bash
# The operator's image without a registry (`make image`): a Debian bookworm base with Debian's python3 made
# locally with mmdebstrap, then the top-level Dockerfile built on it with podman, then saved as an archive
# that containerd imports (`ctr -n k8s.io images import ARCHIVE`).
#
#   devenv/build-image.sh                  build (cached), print the image, its size and the archive
#   devenv/build-image.sh --refresh-base   make the base again first (picks up Debian security updates)
#   devenv/build-image.sh podman ARGS...   podman with this script's storage and runtime flags, e.g.
#                                          `podman run --rm --user 65532:65532 --read-only ... IMAGE --version`
#   devenv/build-image.sh show NAME        print image | cluster-image | archive | cache
#
# Everything lives under SEP_IMAGE_CACHE_DIR (default ~/.cache/secured-endpoint-operator/image): the base
# rootfs tarball, podman's own storage (apart from any other podman storage on the machine), the pip cache
# of the build and the archive. Needs root: apt-get installs what is missing (podman, runc, mmdebstrap), and
# mmdebstrap and podman run as root here.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${SEP_IMAGE_CACHE_DIR:-$HOME/.cache/secured-endpoint-operator/image}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml" | head -n 1)
image=localhost/secured-endpoint-operator:$version
# What manifests/deployment.yaml's `secured-endpoint-operator:VERSION` means to containerd and the kubelet.
cluster_image=docker.io/library/secured-endpoint-operator:$version
# The builder stage, tagged so that pruning old images keeps its layers as the next build's cache (podman
# prunes an untagged final stage with everything under it).
builder_image=localhost/secured-endpoint-operator-builder:$version
archive=$cache/secured-endpoint-operator-$version.docker.tar

# The base: what python:3.11-slim-bookworm offers the Dockerfile (python3 on the PATH, apt, CA
# certificates), from Debian's packages. Its tag names a hash of this recipe, so a changed recipe makes a
# new base and an unchanged one is reused.
suite=bookworm
base_packages=python3,ca-certificates
base_sources=(
  "deb http://deb.debian.org/debian $suite main"
  "deb http://deb.debian.org/debian $suite-updates main"
  "deb http://deb.debian.org/debian-security $suite-security main"
)
# As Debian's slim images: no manuals, documentation (copyright files aside) or translations; merged /usr
# made by mmdebstrap's hook rather than by the usrmerge package, which would bring perl (46 MB).
base_options=(
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/lintian/*'
)
base_env=(
  "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  "LANG=C.UTF-8"
)
recipe_hash=$(printf '%s\n' "$suite" "$base_packages" "${base_sources[@]}" "${base_options[@]}" \
  "${base_env[@]}" | sha256sum | cut -c1-12)
base=localhost/secured-endpoint-operator-base:$suite-$recipe_hash
base_tarball=$cache/base-$suite-$recipe_hash.tar

# podman's state (locks, container runtime files) must not outlive a reboot: under /run, one per cache
# (short: podman refuses a runroot longer than 50 characters).
run_dir=/run/sep-podman/$(printf '%s' "$cache" | sha256sum | cut -c1-8)
podman_flags=()  # set by init_podman

# The storage driver: overlay where the kernel and the cache's file system allow it (measured here: a build
# with every step cached ~4 s, after a changed source ~30 s, 1 GB of disk), else vfs, which copies every
# layer in full (the same builds ~35-70 s and ~110-145 s, 2-4 GB). SEP_IMAGE_STORAGE_DRIVER chooses; the probe's answer
# is kept in the cache. One storage directory per driver: podman's database names the driver it was made with.
init_podman() {
  local driver=${SEP_IMAGE_STORAGE_DRIVER:-}
  if [[ -z $driver ]]; then
    driver=$(cat "$cache/storage-driver" 2>/dev/null || true)
  fi
  if [[ -z $driver ]]; then
    mkdir -p "$cache"
    if command podman --root "$cache/storage-overlay" --runroot "$run_dir/storage-overlay" \
        --tmpdir "$run_dir/libpod-overlay" --storage-driver overlay info >/dev/null 2>&1; then
      driver=overlay
    else
      driver=vfs
      rm -rf "$cache/storage-overlay"
    fi
    echo "$driver" >"$cache/storage-driver"
  fi
  podman_flags=(
    --root "$cache/storage-$driver" --runroot "$run_dir/storage-$driver" --tmpdir "$run_dir/libpod-$driver"
    --storage-driver "$driver" --runtime /usr/sbin/runc --cgroup-manager cgroupfs --events-backend file
  )
}

say() { echo "[image] $*"; }
die() { echo "[image] error: $*" >&2; exit 1; }
# TMPDIR: buildah keeps RUN --mount=type=cache directories (the pip cache) there.
pod() { TMPDIR=$cache/tmp command podman "${podman_flags[@]}" "$@"; }

ensure_tools() {  # ensure_tools DEBIAN-PACKAGE...: install those whose command is missing
  local missing=() package
  for package in "$@"; do
    case $package in
      runc) [[ -x /usr/sbin/runc ]] || missing+=(runc) ;;
      *) command -v "$package" >/dev/null || missing+=("$package") ;;
    esac
  done
  ((${#missing[@]})) || return 0
  [[ $(id -u) == 0 ]] || die "${missing[*]} missing, and installing Debian packages needs root"
  say "installing ${missing[*]} (Debian packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_base() {  # ensure_base REFRESH(0|1)
  if [[ $1 == 0 ]] && pod image exists "$base"; then
    say "base $base (cached)"
    return
  fi
  if [[ $1 == 1 || ! -s $base_tarball ]]; then
    say "base: mmdebstrap $suite with $base_packages (Debian packages) -> $base_tarball"
    local started=$SECONDS
    rm -f "$base_tarball.partial"
    if ! mmdebstrap --variant=minbase --include="$base_packages" --format=tar \
        --aptopt='APT::Install-Recommends "false"' "${base_options[@]}" \
        "$suite" "$base_tarball.partial" "${base_sources[@]}" >"$cache/base.log" 2>&1; then
      tail -n 30 "$cache/base.log" >&2
      die "mmdebstrap failed (log: $cache/base.log)"
    fi
    mv "$base_tarball.partial" "$base_tarball"
    say "base: rootfs made in $((SECONDS - started)) s"
  fi
  say "base: podman import -> $base"
  local changes=() variable
  for variable in "${base_env[@]}"; do changes+=(--change "ENV $variable"); done
  pod import --quiet "${changes[@]}" --change 'CMD ["python3"]' "$base_tarball" "$base" >/dev/null
}

podman_build() {  # podman_build ARGS...: STEP lines (cut short) here, the whole output in build.log
  if ! pod build "$@" 2>&1 | tee -a "$cache/build.log" \
      | awk '/^(\[[0-9]+\/[0-9]+\] )?STEP [0-9]+\/[0-9]+/ { print "[image]   " substr($0, 1, 100); fflush() }'
  then
    tail -n 40 "$cache/build.log" >&2
    die "podman build failed (log: $cache/build.log)"
  fi
}

prune() {  # drop what no tag of this build needs: older bases, older builds and their layers
  local tag
  for tag in $(pod images --format '{{.Repository}}:{{.Tag}}' --filter reference="${base%%:*}"); do
    [[ $tag == "$base" ]] || pod rmi "$tag" >/dev/null || say "could not remove $tag (in use?)"
  done
  find "$cache" -maxdepth 1 -name 'base-*.tar' ! -path "$base_tarball" -delete
  pod image prune --force >/dev/null
}

build() {  # build REFRESH-BASE(0|1)
  local started=$SECONDS
  [[ $(id -u) == 0 ]] || die "run as root (mmdebstrap and podman run as root here)"
  mkdir -p "$cache/tmp"
  # One build at a time per cache (make image and the image tests may overlap).
  exec 9>"$cache/.lock"
  flock 9
  ensure_tools podman runc mmdebstrap
  init_podman
  ensure_base "$1"

  local revision
  revision=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)
  if [[ $revision != unknown && -n $(git -C "$root" status --porcelain -- Dockerfile pyproject.toml README.md \
      operator gateway 2>/dev/null) ]]; then
    revision=$revision-dirty
  fi
  # pip in the build trusts what pip here trusts (this machine may reach PyPI through a TLS-inspecting
  # proxy with a CA of its own), and uses the same index if one is set.
  local pip_args=() ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
  if [[ -f $ca ]]; then
    pip_args+=(--volume "$ca:/run/build-ca.crt:ro" --build-arg PIP_CERT=/run/build-ca.crt)
  fi
  if [[ -n ${PIP_INDEX_URL:-} ]]; then
    pip_args+=(--build-arg PIP_INDEX_URL="$PIP_INDEX_URL")
  fi
  say "image: podman build --build-arg BASE=$base -> $image"
  : >"$cache/build.log"
  local build_args=(--network host --pull=never --layers "${pip_args[@]}" --file "$root/Dockerfile"
    --build-arg BASE="$base"
    # labels, not build arguments: buildah 1.28's layer cache ignores a changed ARG in a LABEL
    --label org.opencontainers.image.version="$version" --label org.opencontainers.image.revision="$revision")
  podman_build --tag "$image" --tag "$cluster_image" "${build_args[@]}" "$root"
  # The builder stage's image is the last "--> ID" before the first step of the last stage ("[N/N] STEP 1/").
  local builder_id
  builder_id=$(awk -F'[][/ ]+' '/^--> [0-9a-f]+$/ { id = $2 }
    /^\[[0-9]+\/[0-9]+\] STEP 1\// && $2 == $3 { print id; exit }' "$cache/build.log")
  if [[ -n $builder_id ]]; then
    pod tag "$builder_id" "$builder_image"
  else
    say "warning: builder stage not found in build.log; the next build may rebuild the wheels"
  fi
  prune

  local id
  id=$(pod image inspect --format '{{.Id}}' "$image")
  if [[ -s $archive && $(cat "$archive.id" 2>/dev/null) == "$id" ]]; then
    say "archive $archive (cached, same image)"
  else
    say "archive: podman save -> $archive"
    rm -f "$archive.partial"
    pod save --quiet --format docker-archive --output "$archive.partial" "$cluster_image"
    mv "$archive.partial" "$archive"
    echo "$id" >"$archive.id"
  fi
  local size
  size=$(pod image inspect --format '{{.Size}}' "$image")
  say "done in $((SECONDS - started)) s: $image (also $cluster_image), $((size / 1000000)) MB, id ${id:0:12}"
  say "into containerd: ctr -n k8s.io images import $archive"
  say "run it: $0 podman run --rm --network host --user 65532:65532 --read-only" \
    "--ulimit nofile=1024:1024 --ulimit nproc=1024:1024 $image --version"
}

case ${1:-build} in
  build) build 0 ;;
  --refresh-base) build 1 ;;
  podman)
    shift
    ensure_tools podman runc
    mkdir -p "$cache/tmp"
    init_podman
    pod "$@"
    ;;
  show)
    case ${2:-} in
      image) echo "$image" ;;
      cluster-image) echo "$cluster_image" ;;
      archive) echo "$archive" ;;
      cache) echo "$cache" ;;
      *) die "show image | cluster-image | archive | cache" ;;
    esac
    ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  *) die "unknown command ${1} (see --help)" ;;
esac
