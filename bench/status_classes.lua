-- wrk script: tally responses by status class and print one JSON line at the end.
--
-- wrk's own "Non-2xx or 3xx responses" line counts 3xx as success; a rollback
-- that answers redirects is not one we want to call clean. Socket errors never
-- reach `response`; they are in summary.errors and printed beside the classes.
-- `bad_seconds` maps a wall-clock second (os.time) to the non-2xx answers seen in
-- it, so failures can be lined up with the rollback's step timestamps.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  classes = { ["1xx"] = 0, ["2xx"] = 0, ["3xx"] = 0, ["4xx"] = 0, ["5xx"] = 0, ["other"] = 0 }
  bad_seconds = {}
end

function response(status, headers, body)
  local class
  if status >= 100 and status < 600 then
    class = tostring(math.floor(status / 100)) .. "xx"
  else
    class = "other"
  end
  classes[class] = classes[class] + 1
  if class ~= "2xx" then
    local now = os.time()
    bad_seconds[now] = (bad_seconds[now] or 0) + 1
  end
end

function done(summary, latency, requests)
  local total = { ["1xx"] = 0, ["2xx"] = 0, ["3xx"] = 0, ["4xx"] = 0, ["5xx"] = 0, ["other"] = 0 }
  local seconds = {}
  for _, thread in ipairs(threads) do
    local c = thread:get("classes")
    for k, v in pairs(c) do total[k] = total[k] + v end
    local b = thread:get("bad_seconds")
    for k, v in pairs(b) do seconds[k] = (seconds[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(total) do table.insert(parts, string.format('"%s":%d', k, v)) end
  local bad = {}
  for k, v in pairs(seconds) do table.insert(bad, string.format('"%d":%d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"classes":{%s},"bad_seconds":{%s},' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes, table.concat(parts, ","), table.concat(bad, ","),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
