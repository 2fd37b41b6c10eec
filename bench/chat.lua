-- wrk script of the benchmark: non-streaming chat completions with exact accounting.
--
--   wrk -t1 -c64 -d<duration + drain>s -s bench/chat.lua <url>/v1/chat/completions -- <duration_s> <key> <model> <max_tokens>
--
-- Every connection sends requests back to back until <duration_s> has passed (a monotonic clock read through
-- LuaJIT's FFI), then finishes the request it has in flight and sends nothing more: `delay()` parks it for an
-- hour, longer than wrk's own -d. So wrk's -d only needs a drain margin above the slowest request, no answer
-- is cut off at the stop, and "sent" (counted in `delay()`, which wrk calls before every request) must equal
-- "answered" (counted in `response()`) and the backend's request counter. `done()` prints one line
-- `BENCH_JSON {...}` with the counts, the status histogram, the measuring window and latency percentiles.
-- An empty <key> sends no Authorization header (direct to the mock).

local ffi = require("ffi")
ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]])
local CLOCK_MONOTONIC = 1
local timespec = ffi.new("bench_timespec")

local function now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) * 1e-9
end

local PARK_MS = 3600 * 1000
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local duration = tonumber(args[1] or "10")
  local key = args[2] or ""
  local model = args[3] or "mock-chat"
  local max_tokens = tonumber(args[4] or "4")
  wrk.method = "POST"
  wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"Hello, how are you today?"}],'
    .. '"max_tokens":' .. max_tokens .. "}"
  wrk.headers["Content-Type"] = "application/json"
  if key ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. key
  end
  deadline = now() + duration
  sent = 0
  answered = 0
  ok = 0
  bad_body = 0
  statuses = {}
  first_sent = 0
  last_answer = 0
end

function delay()
  local t = now()
  if t >= deadline then
    return PARK_MS
  end
  if sent == 0 then
    first_sent = t
  end
  sent = sent + 1
  return 0
end

function response(status, headers, body)
  last_answer = now()
  answered = answered + 1
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  if status == 200 then
    if body ~= nil and string.find(body, '"choices"', 1, true) then
      ok = ok + 1
    else
      bad_body = bad_body + 1
    end
  end
end

local function json_statuses(merged)
  local parts = {}
  for code, n in pairs(merged) do
    table.insert(parts, string.format('"%s":%d', code, n))
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

function done(summary, latency, requests)
  local total = { sent = 0, answered = 0, ok = 0, bad_body = 0 }
  local merged = {}
  local first, last = nil, 0
  for _, thread in ipairs(threads) do
    total.sent = total.sent + thread:get("sent")
    total.answered = total.answered + thread:get("answered")
    total.ok = total.ok + thread:get("ok")
    total.bad_body = total.bad_body + thread:get("bad_body")
    local f = thread:get("first_sent")
    if f > 0 and (first == nil or f < first) then
      first = f
    end
    local l = thread:get("last_answer")
    if l > last then
      last = l
    end
    for code, n in pairs(thread:get("statuses")) do
      merged[code] = (merged[code] or 0) + n
    end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"sent":%d,"answered":%d,"ok":%d,"bad_body":%d,"statuses":%s,'
      .. '"window_s":%.6f,"wrk_requests":%d,"wrk_duration_s":%.6f,'
      .. '"socket_errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},"wrk_status_errors":%d,'
      .. '"latency_ms":{"mean":%.4f,"p50":%.4f,"p90":%.4f,"p99":%.4f,"max":%.4f}}\n',
    total.sent, total.answered, total.ok, total.bad_body, json_statuses(merged),
    (first ~= nil and last > first) and (last - first) or 0, summary.requests, summary.duration / 1e6,
    e.connect, e.read, e.write, e.timeout, e.status,
    latency.mean / 1000, latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000
  ))
end
