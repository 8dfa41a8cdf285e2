-- wrk script for bench/peers.py: one X-Session-Token per request, chosen from a token file.
--
-- Environment:
--   BENCH_TOKENS           file with one token per line
--   BENCH_COUNT            use only its first N lines (default: all)
--   BENCH_PATTERN          "rotate" (1, 2, ..., N, 1, ...) or "zipf" (rank k with weight k^-s)
--   BENCH_ZIPF_S           Zipf exponent s (default 1.1)
--   BENCH_INVALID_PERCENT  share of requests, in percent, that carry a fresh random token
--                          of Kratos's shape ("ory_st_" + 32 alphanumerics) instead
--   BENCH_SEED             seed of the random choices (Zipf ranks, which requests are invalid,
--                          the invalid tokens): the same seed gives the same sequence
--   BENCH_HEADERS          more headers for every request, one "Name: value" per line
--
-- done() prints "bench-sent valid N invalid M" and one "bench-status CODE COUNT" line per
-- answer status, which peers.py reads beside wrk's own summary.

local tokens = {}
local extra = {}
local pattern, invalid_percent, cdf
-- Globals, so that done() can read them from each thread with thread:get().
sent = {valid = 0, invalid = 0}
statuses = {}
local i = 0
local ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

local function zipf_cdf(n, s)
  local cumulative, total = {}, 0
  for k = 1, n do
    total = total + k ^ -s
    cumulative[k] = total
  end
  for k = 1, n do cumulative[k] = cumulative[k] / total end
  return cumulative
end

local function zipf_index()
  local u = math.random()
  local lo, hi = 1, #cdf
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return lo
end

local function invalid_token()
  local chars = {}
  for c = 1, 32 do
    local at = math.random(#ALNUM)
    chars[c] = ALNUM:sub(at, at)
  end
  return "ory_st_" .. table.concat(chars)
end

function init(args)
  local limit = tonumber(os.getenv("BENCH_COUNT") or "") or math.huge
  for line in io.lines(os.getenv("BENCH_TOKENS")) do
    if #tokens >= limit then break end
    if line ~= "" then tokens[#tokens + 1] = line end
  end
  for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
    local name, value = line:match("^([^:]+):%s*(.*)$")
    if name then extra[name] = value end
  end
  pattern = os.getenv("BENCH_PATTERN") or "rotate"
  invalid_percent = tonumber(os.getenv("BENCH_INVALID_PERCENT") or "0")
  math.randomseed(tonumber(os.getenv("BENCH_SEED") or "1"))
  if pattern == "zipf" then
    cdf = zipf_cdf(#tokens, tonumber(os.getenv("BENCH_ZIPF_S") or "1.1"))
  end
end

function request()
  local token
  if invalid_percent > 0 and math.random() * 100 < invalid_percent then
    token = invalid_token()
    sent.invalid = sent.invalid + 1
  else
    if pattern == "zipf" then
      token = tokens[zipf_index()]
    else
      i = i + 1
      token = tokens[(i - 1) % #tokens + 1]
    end
    sent.valid = sent.valid + 1
  end
  local headers = {["X-Session-Token"] = token}
  for name, value in pairs(extra) do headers[name] = value end
  return wrk.format("GET", nil, headers)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function done(summary, latency, requests)
  local valid, invalid, counts = 0, 0, {}
  for _, thread in ipairs(threads) do
    local thread_sent = thread:get("sent")
    valid = valid + thread_sent.valid
    invalid = invalid + thread_sent.invalid
    for code, count in pairs(thread:get("statuses")) do
      counts[code] = (counts[code] or 0) + count
    end
  end
  io.write(string.format("bench-sent valid %d invalid %d\n", valid, invalid))
  for code, count in pairs(counts) do
    io.write(string.format("bench-status %d %d\n", code, count))
  end
end
