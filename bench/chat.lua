-- wrk script: POST a small chat completion with the bench virtual key.
-- BENCH_KEY: the bearer token; BENCH_DELAY_MS: the mock's answer delay (x-mock-delay-ms).
-- done() prints one JSON line (prefixed "BENCHJSON ") that bench/run.py reads.
wrk.method = "POST"
wrk.body = '{"model":"gpt-bench","messages":[{"role":"user","content":"Say hello."}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "none")
wrk.headers["x-mock-delay-ms"] = os.getenv("BENCH_DELAY_MS") or "0"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
