#!/usr/bin/env bash
# The platform image, built and run here (`make container-smoke`, in .ci/run; docs/deploy.md "Container image").
#
#  1. podman (with runc), debootstrap: installed with apt-get when missing (root); a local Debian bookworm base
#     with python3.11 and this machine's CA bundle, built once and kept (no image registry is reachable here)
#  2. deploy/Dockerfile built on it (layers cached between runs)
#  3. a fresh database $CS_DB on 127.0.0.1:5432 (the tests' `test` database is not touched), Redis db /5
#  4. containers, all with --network host: the bundled mock vLLM (from the image), `migrate` (with
#     REGISTRY_FILE: the mock's pool and models), an API key, then `web` (two workers), `worker`, `beat`
#  5. SDK smoke checks through the web container (scripts/container_smoke_sdk.py: models, chat "Paris", a stream,
#     an embedding); the Celery worker answers a ping
#  6. a long stream, and during it `podman stop` (SIGTERM) of web, worker and beat: the stream ends normally,
#     every container exits 0, its usage row is in the database, nothing of this run is left running
# Containers are removed at the end (also on failure); images stay cached.
#
# Environment (default): CS_IMAGE (localhost/llm-platform:ci), CS_BASE_IMAGE (localhost/python:3.11-slim-bookworm),
# CS_DB (llm_container_ci), CS_PG (postgres://postgres@127.0.0.1:5432), CS_REDIS (redis://127.0.0.1:6379/5),
# CS_PORT (a free port), CS_GRACE_S (30), CS_REBUILD_BASE=1 rebuilds the base image.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
IMAGE=${CS_IMAGE:-localhost/llm-platform:ci}
BASE=${CS_BASE_IMAGE:-localhost/python:3.11-slim-bookworm}
DB=${CS_DB:-llm_container_ci}
PG=${CS_PG:-postgres://postgres@127.0.0.1:5432}
REDIS=${CS_REDIS:-redis://127.0.0.1:6379/5}
NAME=llm-cs-$$
GRACE_S=${CS_GRACE_S:-30}  # web's GRACEFUL_TIMEOUT_S; CS_GRACE_S=1 cuts the long stream: the run must then fail
STOP_TIMEOUT_S=$((GRACE_S + 10))  # podman sends SIGKILL only after this
t0=$SECONDS

log() { printf '[container-smoke %3ds] %s\n' $((SECONDS - t0)) "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# --- 1. podman and the base image ------------------------------------------------------------------------------
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  [[ $(id -u) == 0 ]] || die "podman, runc and debootstrap are needed (apt-get install podman runc debootstrap, as root)"
  log "installing podman, runc, debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi
# crun refuses this machine's hybrid cgroups ("cgroups in hybrid mode not supported"), and the default
# RLIMIT_NOFILE ulimit cannot be set here ("setrlimit RLIMIT_NOFILE: Operation not permitted").
if ! grep -qs 'runtime = "runc"' /etc/containers/containers.conf; then
  [[ $(id -u) == 0 ]] || die "/etc/containers/containers.conf needs runtime = \"runc\" and default_ulimits = []"
  [[ ! -s /etc/containers/containers.conf ]] || die "/etc/containers/containers.conf exists without runtime = \"runc\"; add it"
  mkdir -p /etc/containers
  printf '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n' > /etc/containers/containers.conf
fi

if [[ ${CS_REBUILD_BASE:-0} == 1 ]] || ! podman image exists "$BASE"; then
  if [[ ${CS_REBUILD_BASE:-0} == 1 ]] || ! podman image exists localhost/debian:bookworm; then
    log "debootstrap Debian bookworm (minbase) -> localhost/debian:bookworm"
    rootfs=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$rootfs" >/dev/null
    tar -C "$rootfs" -c . | podman import -q - localhost/debian:bookworm >/dev/null
    rm -rf "$rootfs"
  fi
  log "building $BASE (python3.11, venv, this machine's CA bundle)"
  ctx=$(mktemp -d)
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/ca.crt"
  cat > "$ctx/Containerfile" <<'CF'
FROM localhost/debian:bookworm
COPY ca.crt /etc/ssl/certs/host-ca.crt
ENV PIP_CERT=/etc/ssl/certs/host-ca.crt SSL_CERT_FILE=/etc/ssl/certs/host-ca.crt
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python-is-python3 ca-certificates curl && rm -rf /var/lib/apt/lists/*
CF
  podman build -q --network host -t "$BASE" "$ctx" >/dev/null
  rm -rf "$ctx"
else
  log "base image $BASE cached"
fi

# --- 2. the platform image -------------------------------------------------------------------------------------
log "building $IMAGE from deploy/Dockerfile"
previous=$(podman image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
# docker format: OCI images drop HEALTHCHECK. The ignore file is the one `docker build` reads next to the Dockerfile.
podman build -q --format docker --network host --build-arg PYTHON_IMAGE="$BASE" \
  --ignorefile deploy/Dockerfile.dockerignore -f deploy/Dockerfile -t "$IMAGE" . >/dev/null
current=$(podman image inspect -f '{{.Id}}' "$IMAGE")
# The previous build's image (untagged now) goes; the cached layers (the requirements' virtualenv) stay.
[[ -z $previous || $previous == "$current" ]] || podman rmi -i "$previous" >/dev/null 2>&1 || true
log "image built: $(podman image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%d MB", $1 / 1e6}')"

# --- 3. database, Redis, settings --------------------------------------------------------------------------------
work=$(mktemp -d)
chmod 0755 "$work"
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=${CS_PORT:-$(free_port)}
MOCK_PORT=$(free_port)

cleanup() {
  local status=$?
  set +e
  if [[ $status != 0 ]]; then
    for c in $(podman ps -a --filter "name=^$NAME-" --format '{{.Names}}'); do
      log "--- logs of $c (last 30 lines)"
      podman logs --tail 30 "$c" 2>&1 | sed 's/^/    /' >&2
    done
  fi
  podman ps -a -q --filter "name=^$NAME-" | xargs -r podman rm -f -t 5 >/dev/null 2>&1
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

# Containers of an earlier run that was killed before its cleanup (its process is gone): removed.
for c in $(podman ps -a --filter "name=^llm-cs-[0-9]+-" --format '{{.Names}}'); do
  owner=${c#llm-cs-}
  owner=${owner%%-*}
  kill -0 "$owner" 2>/dev/null || { log "removing $c, left by an earlier run"; podman rm -f -t 5 "$c" >/dev/null; }
done

log "fresh database $DB, Redis ${REDIS##*/} flushed"
psql "$PG/postgres" -q -v ON_ERROR_STOP=1 -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null
"$PY" -c 'import sys, redis; redis.Redis.from_url(sys.argv[1]).flushdb()' "$REDIS"

secret() { "$PY" -c 'import secrets; print(secrets.token_urlsafe(48))'; }
# Secrets in a file (mode 0600), not on podman's command line.
umask 077
cat > "$work/env" <<EOF
DJANGO_SECRET_KEY=$(secret)
ROUTER_MASTER_KEY=$(secret)
DATABASE_URL=$PG/$DB
REDIS_URL=$REDIS
DJANGO_ALLOWED_HOSTS=127.0.0.1,localhost
DJANGO_HTTPS=0
PORT=$PORT
REGISTRY_FILE=/ci/registry.yaml
EOF
umask 022
cat > "$work/registry.yaml" <<EOF
pools:
  - name: ci-mock
    backends:
      - name: ci-mock-0
        base_url: http://127.0.0.1:$MOCK_PORT
models:
  - name: mock-chat
    pool: ci-mock
  - name: mock-embed
    kind: embedding
    pool: ci-mock
EOF
chmod 0644 "$work/registry.yaml"

run() {  # run NAME [podman run options...] -- ROLE ARGS...
  local name=$1
  shift
  local opts=()
  while [[ $1 != -- ]]; do opts+=("$1"); shift; done
  shift
  # The pods' security context of deploy/k8s: read-only root (tmpfs on /tmp, /run), no capability, no setuid.
  # No healthcheck timer (podman needs systemd for it, absent here): the image's command is run once below.
  podman run --name "$NAME-$name" --network host --read-only --cap-drop ALL --security-opt no-new-privileges \
    --no-healthcheck --env-file "$work/env" -v "$work/registry.yaml:/ci/registry.yaml:ro" "${opts[@]}" "$IMAGE" "$@"
}

wait_http() {  # URL SECONDS CONTAINER
  local deadline=$((SECONDS + $2))
  until curl -fs -o /dev/null --max-time 2 "$1"; do
    [[ $(podman inspect -f '{{.State.Running}}' "$3" 2>/dev/null) == true ]] || die "$3 stopped before $1 answered"
    ((SECONDS < deadline)) || die "$1 did not answer within $2 s"
    sleep 0.5
  done
}

# --- 4. mock vLLM, migrate, API key, web / worker / beat ---------------------------------------------------------
log "mock vLLM from the image on :$MOCK_PORT"
run mock -d -- python -m backends.mock_vllm --host 127.0.0.1 --port "$MOCK_PORT" \
  --model mock-chat --embed-model mock-embed --token-delay-s 0.05 >/dev/null
wait_http "http://127.0.0.1:$MOCK_PORT/health" 30 "$NAME-mock"

log "migrate (+ import_registry REGISTRY_FILE)"
run migrate --rm -- migrate >"$work/migrate.log" 2>&1 || { cat "$work/migrate.log" >&2; die "migrate failed"; }
applied=$(grep -c '^  Applying .* OK$' "$work/migrate.log" || true)
log "migrate: $applied migrations applied; $(grep -ci 'created\|updated' "$work/migrate.log" || true) registry lines"
key=$(run apikey --rm -- manage create_api_key --name container-smoke 2>/dev/null | tail -n 1)
[[ $key == *?????????????* ]] || die "create_api_key printed no key"

log "web (2 workers) on :$PORT, worker, beat"
run web -d -e WEB_CONCURRENCY=2 -e GRACEFUL_TIMEOUT_S="$GRACE_S" -- web >/dev/null
run worker -d -- worker >/dev/null
run beat -d -- beat >/dev/null
wait_http "http://127.0.0.1:$PORT/readyz" 90 "$NAME-web"
log "web ready"
# The image's HEALTHCHECK command (kept by --format docker), in each long-running container.
healthcheck=$(podman image inspect -f '{{range $i, $a := .HealthCheck.Test}}{{if $i}}{{$a}} {{end}}{{end}}' "$IMAGE")
[[ -n $healthcheck ]] || die "the image has no HEALTHCHECK"
for role in web worker beat; do
  # shellcheck disable=SC2086  # the command's words, none with spaces
  podman exec "$NAME-$role" $healthcheck >/dev/null || die "HEALTHCHECK ($healthcheck) fails in $role"
done

# --- 5. SDK smoke checks ------------------------------------------------------------------------------------------
"$PY" scripts/container_smoke_sdk.py smoke "http://127.0.0.1:$PORT" "$key" || die "SDK smoke checks"
ping=$(podman exec "$NAME-worker" python -m celery -A llm_platform inspect ping --timeout 10 2>&1) \
  || die "the Celery worker did not answer a ping: $ping"
log "worker: $(grep -c 'pong' <<<"$ping") pong"
for role in web worker beat; do
  [[ $(podman inspect -f '{{.State.Running}}' "$NAME-$role") == true ]] || die "$role is not running"
done

# --- 6. SIGTERM during a stream -----------------------------------------------------------------------------------
log "a long stream; SIGTERM to web, worker and beat after its first token"
marker=$work/streaming
"$PY" scripts/container_smoke_sdk.py drain "http://127.0.0.1:$PORT" "$key" "$marker" >"$work/drain.log" 2>&1 &
drain_pid=$!
deadline=$((SECONDS + 30))
until [[ -e $marker ]]; do
  kill -0 "$drain_pid" 2>/dev/null || { cat "$work/drain.log" >&2; die "the long stream ended before its first token"; }
  ((SECONDS < deadline)) || die "no first token within 30 s"
  sleep 0.1
done
stop_started=$SECONDS
date +%s.%N >"$work/sigterm_at"
podman stop -t "$STOP_TIMEOUT_S" "$NAME-web" "$NAME-worker" "$NAME-beat" >/dev/null
log "web, worker and beat stopped in $((SECONDS - stop_started)) s"
drain_status=0
wait "$drain_pid" || drain_status=$?
cat "$work/drain.log" >&2
[[ $drain_status == 0 ]] || die "the stream running at SIGTERM did not finish"
after=$(awk -v end="$(sed -n 's/^ended_at=//p' "$work/drain.log")" '{ printf "%.1f", end - $1 }' "$work/sigterm_at")
log "the stream ended ${after} s after SIGTERM, with every token"
awk -v a="$after" 'BEGIN { exit !(a > 0.5) }' || die "the stream did not outlive SIGTERM: nothing was tested"

failed=0
for role in web worker beat; do
  code=$(podman inspect -f '{{.State.ExitCode}}' "$NAME-$role")
  log "$role exited with $code"
  [[ $code == 0 ]] || failed=1
done
podman stop -t 10 "$NAME-mock" >/dev/null
code=$(podman inspect -f '{{.State.ExitCode}}' "$NAME-mock")
log "mock exited with $code"
[[ $code == 0 ]] || failed=1
((failed == 0)) || die "a container did not exit 0 on SIGTERM"

# Nothing lost: the usage rows written by the web workers, the interrupted stream's included (written at shutdown).
rows=$(psql "$PG/$DB" -Atq -c "SELECT endpoint || ':' || stream::int || ':' || status || ':' || completion_tokens \
  FROM governance_usagerecord ORDER BY created_at" | tr '\n' ' ')
log "usage rows (endpoint:stream:status:completion_tokens): $rows"
drained=$(sed -n 's/^completion_tokens=//p' "$work/drain.log")
[[ $(wc -w <<<"$rows") == 4 ]] || die "expected 4 usage rows (chat, stream, embeddings, long stream)"
[[ $rows == *":1:200:$drained "* ]] || die "no usage row for the stream running at SIGTERM ($drained tokens)"

left=$(podman ps -q --filter "name=^$NAME-")
[[ -z $left ]] || die "containers still running: $left"
log "PASS: nothing left running ($(podman ps -a -q --filter "name=^$NAME-" | wc -l) stopped containers, removed now)"
