#!/usr/bin/env bash
# Fuzz every operation of the OpenAPI schema (/api/schema/: the management API and the /v1 gateway) against a live
# server with schemathesis, and fail on any server error (5xx). `make schemathesis`; .ci/run runs it.
#
# The script starts what it tests: the bundled mock vLLM and the platform (uvicorn, debug off, plain HTTP) on free
# loopback ports, on a fresh SQLite database in a temporary state folder with the demo registry (pool `demo`,
# backend `demo-mock-1`, models `mock-chat` / `mock-embed`), and calls it with the master key as the bearer token.
# Everything it started is stopped on exit.
#
# Environment (default):
#   ST_SEED          the random seed, so that a run is reproducible (20261202)
#   ST_MAX_EXAMPLES  test cases per operation and phase (10; about two minutes on 2 shared cores)
#   ST_PHASES        schemathesis phases (examples,coverage,fuzzing,stateful: all)
#   DATABASE_URL     run on another database instead, e.g. the PostgreSQL test database
#   PYTHON           the interpreter with the requirements (.venv/bin/python)
# Arguments go to `schemathesis run`, e.g. `bash scripts/schemathesis.sh --include-path-regex '^/api/usage'`.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
SEED=${ST_SEED:-20261202}
MAX_EXAMPLES=${ST_MAX_EXAMPLES:-10}
PHASES=${ST_PHASES:-examples,coverage,fuzzing,stateful}
STATE=$(mktemp -d "${TMPDIR:-/tmp}/schemathesis.XXXXXX")
PIDS=()

log() { printf '[schemathesis] %s\n' "$*" >&2; }
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
stop() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$STATE"
}
trap stop EXIT
wait_ready() {  # URL PID: until the URL answers 200, the process died, or 30 s passed
  local i
  for i in $(seq 150); do
    kill -0 "$2" 2>/dev/null || { log "the process behind $1 exited"; return 1; }
    "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  log "$1 did not answer within 30 s"
  return 1
}

export LOCAL_STATE_DIR="$STATE" DJANGO_SETTINGS_MODULE=llm_platform.settings DJANGO_DEBUG=0 DJANGO_HTTPS=0
export DATABASE_URL=${DATABASE_URL:-sqlite:///$STATE/db.sqlite3}
export ROUTER_MASTER_KEY="sk-router-st-$("$PY" -c 'import secrets; print(secrets.token_urlsafe(16))')"
export ROUTER_REGISTRY_POLL_S=0.2 ROUTER_PROBE_TIMEOUT_S=2 LOG_LEVEL=ERROR CHECKS_WEBHOOK_URL=
unset REDIS_URL CELERY_BROKER_URL

MOCK_PORT=$(free_port)
"$PY" -m backends.mock_vllm --host 127.0.0.1 --port "$MOCK_PORT" --model mock-chat --embed-model mock-embed \
  >"$STATE/mock.log" 2>&1 &
PIDS+=($!)
wait_ready "http://127.0.0.1:$MOCK_PORT/health" "$!"

"$PY" manage.py migrate --noinput -v 0
"$PY" manage.py setup_platform --mock-url "http://127.0.0.1:$MOCK_PORT" >/dev/null

PORT=$(free_port)
"$PY" -m uvicorn llm_platform.asgi:application --host 127.0.0.1 --port "$PORT" --lifespan on \
  --no-access-log --log-level warning >"$STATE/web.log" 2>&1 &
PIDS+=($!)
wait_ready "http://127.0.0.1:$PORT/readyz" "$!"

log "fuzzing http://127.0.0.1:$PORT/api/schema/ (seed $SEED, at most $MAX_EXAMPLES cases per operation, $PHASES)"
status=0
"$(dirname "$PY")/schemathesis" run "http://127.0.0.1:$PORT/api/schema/" \
  --url "http://127.0.0.1:$PORT" \
  --header "Authorization: Bearer $ROUTER_MASTER_KEY" \
  --checks not_a_server_error \
  --phases "$PHASES" \
  --seed "$SEED" \
  --max-examples "$MAX_EXAMPLES" \
  --generation-database none \
  --request-timeout 20 \
  --workers 1 \
  --no-color \
  --report junit --report-junit-path "$STATE/junit.xml" \
  "$@" || status=$?

if [[ $status -ne 0 ]]; then
  log "server errors found; the server's log (last 80 lines):"
  tail -n 80 "$STATE/web.log" >&2 || true
fi
exit "$status"
