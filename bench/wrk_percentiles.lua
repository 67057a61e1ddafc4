-- wsgi_overhead.py / asgi_overhead.py: the run's counts and its latency quantile function on a
-- grid fine enough near the tail (0.5% steps to 99%, then 0.01% steps), so that short runs can
-- be merged into one distribution.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests=%d duration_us=%d errors=%d\n", summary.requests,
    summary.duration, e.connect + e.read + e.write + e.status + e.timeout))
  local parts = {}
  for i = 1, 198 do parts[#parts + 1] = string.format("%d", latency:percentile(i * 0.5)) end
  for i = 1, 100 do parts[#parts + 1] = string.format("%d", latency:percentile(99 + i * 0.01)) end
  io.write("QUANTILES " .. table.concat(parts, " ") .. "\n")
end
