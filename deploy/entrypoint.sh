#!/usr/bin/env bash
# One entry point for every role of the platform image (deploy/Dockerfile); also usable on one box from the
# repository with the virtualenv on PATH (docs/deploy.md). The roles run the same commands as `make run`:
#
#   web                       the ASGI server: scripts/serve.sh (uvicorn, WEB_CONCURRENCY workers) — `make serve`
#   worker                    Celery worker (health probes, scheduled checks, usage rollups)
#   beat                      Celery beat with the database scheduler — exactly one per deployment
#   migrate                   manage.py migrate; then import_registry REGISTRY_FILE when set; then the admin user
#                             DJANGO_SUPERUSER_USERNAME when DJANGO_SUPERUSER_PASSWORD is set (a one-shot job)
#   import-registry FILE ...  manage.py import_registry FILE (e.g. --dry-run, --prune)
#   wait-migrations           wait until no migration is pending (init container: new pods start after `migrate`)
#   healthcheck               the image's HEALTHCHECK: GET /healthz for web; the other roles have no HTTP server
#   manage ARGS...            any manage.py command
#   anything else             run as given (e.g. bash)
#
# Secrets (DJANGO_SECRET_KEY, DATABASE_URL, ...) come from the environment and are never printed here.
set -euo pipefail
cd "$(dirname "$0")/.."
export DJANGO_SETTINGS_MODULE=${DJANGO_SETTINGS_MODULE:-llm_platform.settings}
ROLE_FILE=${ROLE_FILE:-${TMPDIR:-/tmp}/llm-platform-role}

log() { printf '[entrypoint] %s\n' "$*" >&2; }

# Remember the long-running role for `healthcheck` (run later by the container engine in the same container).
remember_role() { printf '%s\n' "$1" > "$ROLE_FILE" 2>/dev/null || true; }

ensure_admin() {
  python manage.py shell -c '
import os
from django.contrib.auth import get_user_model

name = os.environ.get("DJANGO_SUPERUSER_USERNAME", "admin")
password = os.environ["DJANGO_SUPERUSER_PASSWORD"]
user, created = get_user_model().objects.get_or_create(username=name, defaults={"is_staff": True, "is_superuser": True})
if created or not user.check_password(password):
    user.set_password(password)
    user.is_staff = user.is_superuser = True
    user.save()
print("admin user", repr(name), "created" if created else "ready")
'
}

# A deployment whose secrets are still the placeholders of deploy/k8s or deploy/compose.env.example stops here.
refuse_placeholders() {
  local name
  for name in DJANGO_SECRET_KEY ROUTER_MASTER_KEY DATABASE_URL REDIS_URL VLLM_API_KEY DJANGO_SUPERUSER_PASSWORD \
              METRICS_TOKEN; do
    if [[ ${!name:-} == *CHANGE-ME* ]]; then
      log "$name is still a CHANGE-ME placeholder: set the real value (docs/deploy.md, Secrets)"
      exit 78
    fi
  done
}

role=${1:-web}
[[ $# -gt 0 ]] && shift
[[ $role == healthcheck ]] || refuse_placeholders
# Multiprocess metric files belong to the web processes (serve.sh prepares the folder); nothing else writes there.
[[ $role == web ]] || unset PROMETHEUS_MULTIPROC_DIR

case $role in
  web)
    remember_role web
    exec bash scripts/serve.sh "$@"
    ;;
  worker)
    remember_role worker
    exec python -m celery -A llm_platform worker \
      --loglevel "${CELERY_LOG_LEVEL:-warning}" --concurrency "${CELERY_CONCURRENCY:-2}" "$@"
    ;;
  beat)
    remember_role beat
    # The schedule lives in the database (django-celery-beat); the file is only beat's local state.
    exec python -m celery -A llm_platform beat --loglevel "${CELERY_LOG_LEVEL:-warning}" \
      --scheduler django_celery_beat.schedulers:DatabaseScheduler \
      --schedule "${TMPDIR:-/tmp}/celerybeat-schedule" "$@"
    ;;
  migrate)
    DB_STATEMENT_TIMEOUT_MS=0 python manage.py migrate --noinput  # a migration may run longer than a request's bound
    if [[ -n ${REGISTRY_FILE:-} ]]; then
      log "importing the registry from $REGISTRY_FILE"
      python manage.py import_registry "$REGISTRY_FILE"
    fi
    if [[ -n ${DJANGO_SUPERUSER_PASSWORD:-} ]]; then
      ensure_admin
    fi
    ;;
  import-registry)
    [[ $# -ge 1 ]] || { log "usage: import-registry FILE [--dry-run] [--prune]"; exit 2; }
    exec python manage.py import_registry "$@"
    ;;
  wait-migrations)
    deadline=$((SECONDS + ${MIGRATIONS_WAIT_S:-600}))
    until out=$(python manage.py migrate --check --noinput 2>&1); do
      if ((SECONDS >= deadline)); then
        log "migrations still pending (or the database unreachable) after ${MIGRATIONS_WAIT_S:-600}s:"
        [[ -z $out ]] || printf '%s\n' "$out" | tail -n 5 >&2
        exit 1
      fi
      sleep 3
    done
    log "no migration pending"
    ;;
  healthcheck)
    case $(cat "$ROLE_FILE" 2>/dev/null || echo web) in
      web)
        exec python -c 'import os, sys, urllib.request
try:
    urllib.request.urlopen("http://127.0.0.1:" + os.environ.get("PORT", "8000") + "/healthz", timeout=3)
except Exception as exc:
    sys.exit(f"unhealthy: {exc}")'
        ;;
      *) exit 0 ;;  # worker and beat: the container ends when the process does
    esac
    ;;
  manage)
    exec python manage.py "$@"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
