-- The mixed workload of the HTTP benchmark: sessions of 7 requests, each request sent only once
-- the one before it in its session has been answered (wrk gives request() no connection, so
-- answers are matched to sessions by the job or user id they carry):
--   POST /auth/anon, POST /jobs (Idempotency-Key), POST confirm-upload, POST execute,
--   GET /jobs/{id}, GET /me, POST callback (signed as the GPU worker signs it).
-- Commands are the 5 POSTs. Sessions come from a file tests/bench/api.py writes beforehand (one
-- per line, tab-separated): device hash, user id, token, job id, Idempotency-Key, callback body,
-- timestamp, nonce, signature. Their input photos are uploaded beforehand too (untimed).
-- Arguments: the sessions file, then optionally a request rate (requests/s, all connections
-- together): each request is then scheduled at start + i / rate (wrk2-style pacing; wrk measures
-- latency from the moment a request is written).
-- Run it with one wrk thread (-t1: done() reads that thread's counts). Output (done): one JSON line {"requests", "commands", "sessions", "errors", "duration_s",
-- "p50_ms", "p99_ms", "rate_offered"}.

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } wrk_timespec;
int clock_gettime(int clk_id, wrk_timespec *tp);
]]
local ts = ffi.new("wrk_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local sessions = {}
local by_id = {}       -- user id or job id -> session
local ready = {}       -- sessions whose next request may go (FIFO)
local ready_head, ready_tail = 1, 0
local next_new = 1     -- the next session not started
commands, finished, failures, sent = 0, 0, 0, 0
local interval, start = nil, nil
offered = nil  -- the request rate asked for (global: done() reads it)

local function split(line)
  local out = {}
  for field in (line .. "\t"):gmatch("([^\t]*)\t") do out[#out + 1] = field end
  return out
end

function init(args)
  for line in io.lines(args[1]) do
    local f = split(line)
    local s = {device = f[1], user = f[2], token = f[3], job = f[4], key = f[5], body = f[6],
               timestamp = f[7], nonce = f[8], signature = f[9], step = 0}
    sessions[#sessions + 1] = s
    by_id[s.user] = s
    by_id[s.job] = s
  end
  if args[2] then
    offered = tonumber(args[2])
    interval = 1000 / offered
  end
end

local function push(s)
  ready_tail = ready_tail + 1
  ready[ready_tail] = s
end

local function pop()
  if ready_head <= ready_tail then  -- sessions under way first: the number open stays small
    local s = ready[ready_head]
    ready[ready_head] = nil
    ready_head = ready_head + 1
    return s
  end
  local s = sessions[next_new]
  if s ~= nil then next_new = next_new + 1 end
  return s
end

function delay()
  if interval == nil then return 0 end
  local now = now_ms()
  if start == nil then start = now end
  sent = sent + 1
  local due = start + (sent - 1) * interval
  return due > now and math.floor(due - now) or 0
end

local JSON = {["Content-Type"] = "application/json"}

local function step_request(s)
  local auth = {["Authorization"] = "Bearer " .. s.token}
  local job = "/jobs/" .. s.job
  s.step = s.step + 1
  if s.step == 1 then
    return wrk.format("POST", "/auth/anon", JSON, '{"device_hash":"' .. s.device .. '"}')
  elseif s.step == 2 then
    return wrk.format("POST", "/jobs", {["Authorization"] = auth.Authorization, ["Content-Type"] = "application/json",
                      ["Idempotency-Key"] = s.key}, '{"preset":"interior","item_count":1}')
  elseif s.step == 3 then
    return wrk.format("POST", job .. "/confirm-upload", auth)
  elseif s.step == 4 then
    return wrk.format("POST", job .. "/execute", {["Authorization"] = auth.Authorization,
                      ["Content-Type"] = "application/json"}, '{"concepts":{"wall":{"action":"tone","value":"warm"}}}')
  elseif s.step == 5 then
    return wrk.format("GET", job, auth)
  elseif s.step == 6 then
    return wrk.format("GET", "/me", auth)
  end
  return wrk.format("POST", job .. "/callback", {["Content-Type"] = "application/json",
                    ["X-Palette-Timestamp"] = s.timestamp, ["X-Palette-Nonce"] = s.nonce,
                    ["X-Palette-Signature"] = s.signature}, s.body)
end

function request()
  local s = pop()
  if s == nil then  -- every session is used: the run ends here
    wrk.thread:stop()
    return wrk.format("GET", "/health")
  end
  return step_request(s)
end

function response(status, headers, body)
  if status >= 300 then
    failures = failures + 1  -- its session stops there
    return
  end
  local id = body:match('"job_id":"([%x-]+)"') or body:match('"user_id":"([%x-]+)"')
  local s = id and by_id[id]
  if s == nil then
    if body:find('"outcome"', 1, true) then  -- the callback's answer: its session is done
      commands = commands + 1
      finished = finished + 1
    end
    return
  end
  if s.step <= 4 then commands = commands + 1 end
  push(s)
end

local thread_ref
function setup(thread)
  thread_ref = thread
end

function done(summary, latency, requests)
  local commands_done = thread_ref:get("commands")
  io.write(string.format('{"requests": %d, "commands": %d, "sessions": %d, "errors": %d, "duration_s": %.3f, '
    .. '"p50_ms": %.3f, "p99_ms": %.3f, "rate_offered": %s}\n',
    summary.requests, commands_done, thread_ref:get("finished"), thread_ref:get("failures")
      + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    thread_ref:get("offered") and string.format("%.1f", thread_ref:get("offered")) or "null"))
end
