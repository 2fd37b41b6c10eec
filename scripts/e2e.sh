#!/usr/bin/env bash
# scripts/e2e.sh — what `make e2e` runs: the E2E suite (tests/integration, marker e2e) through the platform
# against a REAL vLLM, and the contract suite (tests/contract, its e2e half) straight against that vLLM.
#
# Two modes:
#   * local (default): starts the CPU vLLM pool of scripts/real_backend.sh (installs it on first run; cached
#     after), exports its environment, lets the failover test stop and restart one server
#     (E2E_CAN_KILL_BACKEND=1) and requires every test to PASS: a skipped E2E test fails the run
#     (E2E_REQUIRE=1, plus a check of pytest's summary line). Servers this script started are stopped at the
#     end; servers that were already running are left running. Local runs on one machine take turns (flock on
#     <cache>/e2e.lock), since the failover test stops a server of the shared pool.
#   * external: VLLM_BACKEND_URL is already set (e.g. a GPU vLLM behind `kubectl port-forward`). Nothing is
#     started or stopped; tests needing what is not there (VLLM_EMBED_URL, a pool we may stop) are skipped.
#
# Extra arguments go to pytest, e.g. `bash scripts/e2e.sh -k capital`. Exits with pytest's status.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
RB=scripts/real_backend.sh
t_start=$(date +%s.%N)
ours=()   # ports of the servers this run started (stopped again on exit)

log() { printf '[e2e] %s\n' "$*" >&2; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

cleanup() {
  local port
  for port in "${ours[@]}"; do
    bash "$RB" stop-one "$port" 9>&- || log "could not stop the server on :$port"
  done
}

if [[ -n ${VLLM_BACKEND_URL:-} ]]; then
  log "external backend: VLLM_BACKEND_URL=$VLLM_BACKEND_URL VLLM_MODEL_NAME=${VLLM_MODEL_NAME:-<discovered>}"
else
  # One local E2E run at a time on this machine: the failover test stops a server of the shared pool.
  lock_dir=${REAL_BACKEND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-platform-real-backend}
  mkdir -p "$lock_dir"
  if command -v flock >/dev/null; then
    exec 9>"$lock_dir/e2e.lock"
    flock -n 9 || { log "another E2E run holds $lock_dir/e2e.lock; waiting for it"; flock -w 1800 9; } \
      || { log "gave up waiting for $lock_dir/e2e.lock"; exit 1; }
  fi
  # Which servers are down now? Only those are ours to stop at the end.
  while read -r state port _; do
    [[ $state == stopped ]] && ours+=("${port#:}")
  done < <(bash "$RB" status 2>/dev/null)
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  if ((${#ours[@]})); then
    log "starting the real vLLM pool (servers down: ${ours[*]}); the first run installs it (~1-2 min)"
  else
    log "the real vLLM pool is already running; it stays running afterwards"
  fi
  t_backend=$(date +%s.%N)
  bash "$RB" start 9>&- || { log "could not start the real vLLM pool (logs: ~/.cache/llm-platform-real-backend/run/)"; exit 1; }
  log "backends ready in $(elapsed "$t_backend") s"
  eval "$(bash "$RB" env)"
  export E2E_CAN_KILL_BACKEND=1 E2E_REQUIRE=1
fi

summary=$(mktemp)
t_tests=$(date +%s.%N)
# 9>&-: the lock must not leak into the vLLM servers the failover test restarts (they outlive this script).
"$PY" -m pytest -m e2e tests/contract tests/integration tests/backends/checks/test_checks_e2e.py -p no:cacheprovider -rs "$@" 9>&- | tee "$summary"
rc=${PIPESTATUS[0]}
tests_s=$(elapsed "$t_tests")

# Belt and braces for E2E_REQUIRE: in local mode nothing may be skipped or deselected away to nothing.
if [[ ${E2E_REQUIRE:-0} == 1 && $rc == 0 ]]; then
  last=$(grep -E '(passed|failed|skipped|error|no tests ran)' "$summary" | tail -n 1)
  if [[ $last == *skipped* || $last != *passed* ]]; then
    log "the E2E run must report passed tests and no skipped ones; pytest said: $last"
    rc=1
  fi
fi
rm -f "$summary"

log "pytest exit status $rc; tests ${tests_s} s; total E2E time $(elapsed "$t_start") s"
exit "$rc"
