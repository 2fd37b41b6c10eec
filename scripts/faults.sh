#!/usr/bin/env bash
# make faults: the fault-injection suite (tests/faults/, marker `faults`) across real network namespaces.
# Backends and Redis run in namespaces llmfx-N behind veth pairs (10.200.N.0/30, on this machine only); faults are
# iptables DROP / statistic rules and tc netem inside those namespaces. Needs root, iproute2 and iptables (installed
# with apt-get when missing and possible); without root or `ip netns` the tests skip and say why.
# Whatever happens, the namespaces (and with them their veth pairs, rules and qdiscs) are removed on exit.
# Extra arguments go to pytest: bash scripts/faults.sh -k blackhole
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"

cleanup() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^llmfx-/ {print $1}'); do
    # the servers the tests started in it (a namespace outlives its deletion while a process is inside)
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  for link in fx1h fx2h fx3h; do ip link del "$link" 2>/dev/null || true; done
}

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  command -v ip >/dev/null || missing+=(iproute2)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v redis-server >/dev/null || missing+=(redis-server)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "faults: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null ||
      { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; } ||
      echo "faults: could not install ${missing[*]}; the tests that need them skip"
  fi
fi

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
cleanup
# bounded as a whole: the suite takes about 2.5 minutes on a busy 2-core machine
timeout -k 30 "${FAULTS_TIMEOUT_S:-420}" "$PY" -m pytest tests/faults -m faults -p no:cacheprovider -rs "$@"
