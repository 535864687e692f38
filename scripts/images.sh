#!/usr/bin/env bash
# Build every leukofed image from infra/Dockerfile (one target each) and report size and time.
#
#   scripts/images.sh [TARGET ...]      # default: the images the compose stack runs
#
# The base: BASE_IMAGE if set; else python:3.11-slim-bookworm when it is present or can be
# pulled; else a Debian bookworm base made here with debootstrap (no registry needed), kept
# as leukofed/base:bookworm. When the public redis/postgres images are missing and cannot be
# pulled either, the redis and postgres targets are built from the same base instead, and
# their names (and the base's) are written to infra/images.env, which the compose scripts read.
#
# The CA bundle pip trusts on this machine (a proxy's CA, say) goes to the build as the
# BuildKit secret "pip_ca": used by pip and uv in one RUN, never stored in an image.
# Results (seconds, bytes) go to benchmarks/results/images.json.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=${LEUKOFED_VERSION:-latest}
PUBLIC_BASE=python:3.11-slim-bookworm
LOCAL_BASE=leukofed/base:bookworm
PUBLIC_REDIS=redis:7.4-bookworm
PUBLIC_POSTGRES=postgres:16-bookworm
DEFAULT_TARGETS=(client aggregator inference mlflow)
TARGETS=("$@")
((${#TARGETS[@]})) || TARGETS=("${DEFAULT_TARGETS[@]}")
RESULTS=${IMAGES_RESULTS:-benchmarks/results/images.json}
IMAGES_ENV=infra/images.env

# BuildKit is needed for the secret mount. Docker >= 23 without the buildx plugin cannot use
# it, while Debian's docker.io 20.10 client has it built in: use whichever works.
docker_build() {
    if docker buildx version >/dev/null 2>&1; then
        docker buildx build --load "$@"
    elif [[ -x /usr/bin/docker ]] && /usr/bin/docker version --format '{{.Client.Version}}' 2>/dev/null | grep -q '^20\.'; then
        DOCKER_BUILDKIT=1 /usr/bin/docker build "$@"
    else
        DOCKER_BUILDKIT=1 docker build "$@"
    fi
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }
# A pull that cannot reach a registry fails in seconds here; give it 60 s at most.
can_pull() { have_image "$1" || timeout 60 docker pull -q "$1" >/dev/null 2>&1; }

ca_bundle() {
    local cert
    cert=$(pip config get global.cert 2>/dev/null || true)
    for f in "${PIP_CERT:-}" "$cert" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
        [[ -n $f && -s $f ]] && { echo "$f"; return; }
    done
}

debootstrap_base() {
    command -v debootstrap >/dev/null || {
        echo "images: no registry and no debootstrap: apt-get install debootstrap" >&2; exit 1; }
    local rootfs
    rootfs=$(mktemp -d /var/tmp/leukofed-rootfs.XXXXXX)
    echo "images: building $LOCAL_BASE with debootstrap (bookworm, Python 3.11 from Debian)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
    # What an image does not need: downloaded packages, package lists, documentation.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' \
        - "$LOCAL_BASE" >/dev/null
    rm -rf "$rootfs"
}

base=${BASE_IMAGE:-}
if [[ -z $base ]]; then
    if can_pull "$PUBLIC_BASE"; then base=$PUBLIC_BASE
    else
        have_image "$LOCAL_BASE" || debootstrap_base
        base=$LOCAL_BASE
    fi
fi
echo "images: base $base"

echo "BASE_IMAGE=$base" >"$IMAGES_ENV.tmp"
if [[ $base == "$LOCAL_BASE" ]]; then
    # No registry: the stack's third-party services come from Debian too, unless present.
    can_pull "$PUBLIC_REDIS" || { TARGETS+=(redis); echo "REDIS_IMAGE=leukofed/redis:$VERSION" >>"$IMAGES_ENV.tmp"; }
    can_pull "$PUBLIC_POSTGRES" || { TARGETS+=(postgres); echo "POSTGRES_IMAGE=leukofed/postgres:$VERSION" >>"$IMAGES_ENV.tmp"; }
fi
mv "$IMAGES_ENV.tmp" "$IMAGES_ENV"

secret=()
ca=$(ca_bundle || true)
[[ -n $ca ]] && secret=(--secret "id=pip_ca,src=$ca")

rows=()
for target in "${TARGETS[@]}"; do
    tag="leukofed/$target:$VERSION"
    echo "images: building $tag"
    start=$(date +%s.%N)
    docker_build -f infra/Dockerfile --target "$target" --build-arg "BASE_IMAGE=$base" \
        "${secret[@]}" -t "$tag" . >"/tmp/leukofed-build-$target.log" 2>&1 || {
        tail -40 "/tmp/leukofed-build-$target.log" >&2
        echo "images: building $tag failed (log: /tmp/leukofed-build-$target.log)" >&2
        exit 1
    }
    seconds=$(python3 -c "import sys; print(round($(date +%s.%N) - $start, 1))")
    bytes=$(docker image inspect "$tag" --format '{{.Size}}')
    # The leukofed services' code layer (/opt/app): what an upgrade pulls; null for others.
    code=$(docker history --human=false --no-trunc --format '{{.Size}}\t{{.CreatedBy}}' "$tag" \
           | awk -F'\t' '/COPY \/opt\/app/ {print $1; exit}')
    printf 'images: %-28s %7.0f MB  %6.1f s\n' "$tag" "$(python3 -c "print($bytes/1e6)")" "$seconds"
    rows+=("{\"image\": \"$tag\", \"target\": \"$target\", \"bytes\": $bytes, \"code_layer_bytes\": ${code:-null}, \"build_s\": $seconds}")
done

mkdir -p "$(dirname "$RESULTS")"
python3 - "$RESULTS" "$base" "${rows[@]}" <<'PY'
import datetime, json, os, platform, sys
out, base, *rows = sys.argv[1:]
doc = {"command": "make images", "base": base, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "images": [json.loads(r) for r in rows]}
json.dump(doc, open(out, "w"), indent=1)
PY
echo "images: results in $RESULTS"
