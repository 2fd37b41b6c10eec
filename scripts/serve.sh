#!/usr/bin/env bash
# The production web server (`make serve`, and the `web` role of deploy/entrypoint.sh in the image).
#
# uvicorn (through llm_platform/serve.py) with WEB_CONCURRENCY worker processes, uvloop + httptools, the ASGI
# lifespan on (it starts and stops the registry poller, the runtime publisher and the upstream connection pool),
# proxy headers from trusted proxies, and a graceful shutdown: on SIGTERM the listening sockets close at once (new
# connections are refused), idle keep-alive connections close, and requests in flight — streams included — get
# GRACEFUL_TIMEOUT_S seconds to finish before they are cancelled. Migrations are not run here: they run once per
# release, before the rollout (docs/deploy.md).
#
# Environment (default):
#   HOST / PORT              where to listen (127.0.0.1 / 8000; the image sets HOST=0.0.0.0)
#   WEB_CONCURRENCY          worker processes (the number of CPU cores available to this process)
#   GRACEFUL_TIMEOUT_S       seconds open requests and streams get to finish after SIGTERM (30)
#   FORWARDED_ALLOW_IPS      proxies whose X-Forwarded-For/-Proto are trusted: their own addresses, never "*"
#                            (127.0.0.1; docs/security.md)
#   KEEPALIVE_TIMEOUT_S      idle keep-alive timeout; keep it above the proxy's upstream idle timeout (75)
#   MAX_REQUEST_HEAD_BYTES   largest request head, request line + header lines; larger: 431 and close (65536)
#   REQUEST_HEAD_TIMEOUT_S   seconds a request head may take to arrive; later: 408 and close (10)
#   ACCESS_LOG               1: log every request (0)
#   SHARED_SOCKET            1: uvicorn's own supervisor, one socket shared by the workers (unset: one
#                            SO_REUSEPORT socket per worker, balanced by the kernel; see llm_platform/serve.py)
#   UVICORN_LOG_LEVEL        uvicorn's own log level (info)
#   COLLECTSTATIC            1: run collectstatic first (1; the image collects at build time and sets 0)
#   PROMETHEUS_MULTIPROC_DIR where the workers' metric files go; emptied at each start
#                            (default ${TMPDIR:-/tmp}/llm-platform-metrics-$PORT)
# Everything else (DATABASE_URL, REDIS_URL, DJANGO_*) is read by the settings; see .env.example.
set -euo pipefail
cd "$(dirname "$0")/.."

HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
WEB_CONCURRENCY=${WEB_CONCURRENCY:-$(nproc)}
GRACEFUL_TIMEOUT_S=${GRACEFUL_TIMEOUT_S:-30}
FORWARDED_ALLOW_IPS=${FORWARDED_ALLOW_IPS:-127.0.0.1}
KEEPALIVE_TIMEOUT_S=${KEEPALIVE_TIMEOUT_S:-75}
MAX_REQUEST_HEAD_BYTES=${MAX_REQUEST_HEAD_BYTES:-65536}
REQUEST_HEAD_TIMEOUT_S=${REQUEST_HEAD_TIMEOUT_S:-10}
export DJANGO_SETTINGS_MODULE=${DJANGO_SETTINGS_MODULE:-llm_platform.settings}

log() { printf '[serve] %s\n' "$*" >&2; }

if [[ ${COLLECTSTATIC:-1} == 1 ]]; then
  # Not one of the server's processes: it must leave no metric files behind.
  env -u PROMETHEUS_MULTIPROC_DIR python manage.py collectstatic --noinput -v 0
fi

# Multiprocess Prometheus metrics: every worker writes its series to files in this folder and /metrics merges
# them. It must exist before the workers start and hold no files of an earlier run (their counters would be
# added to this run's).
export PROMETHEUS_MULTIPROC_DIR=${PROMETHEUS_MULTIPROC_DIR:-${TMPDIR:-/tmp}/llm-platform-metrics-$PORT}
mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
find "$PROMETHEUS_MULTIPROC_DIR" -mindepth 1 -maxdepth 1 -name '*.db' -delete

access_log=
[[ ${ACCESS_LOG:-0} =~ ^(1|true|yes)$ ]] && access_log=--access-log
shared_socket=
[[ ${SHARED_SOCKET:-0} =~ ^(1|true|yes)$ ]] && shared_socket=--shared-socket

log "uvicorn on $HOST:$PORT: $WEB_CONCURRENCY worker(s), graceful shutdown ${GRACEFUL_TIMEOUT_S}s"
# llm_platform/serve.py: with several workers each one listens on its own SO_REUSEPORT socket so that the kernel
# spreads connections evenly (uvicorn's own --workers shares one accept queue, which a few workers dominate).
exec python -m llm_platform.serve \
  --host "$HOST" --port "$PORT" \
  --workers "$WEB_CONCURRENCY" \
  --graceful-timeout "$GRACEFUL_TIMEOUT_S" \
  --keepalive-timeout "$KEEPALIVE_TIMEOUT_S" \
  --max-head-bytes "$MAX_REQUEST_HEAD_BYTES" --head-timeout "$REQUEST_HEAD_TIMEOUT_S" \
  --forwarded-allow-ips "$FORWARDED_ALLOW_IPS" \
  --log-level "${UVICORN_LOG_LEVEL:-info}" \
  ${access_log:+"$access_log"} ${shared_socket:+"$shared_socket"}
