-- wrk script for `python -m bench.rest --address-rules`: each request from another IPv6 client,
-- 65,536 addresses in 4,096 /64 networks, named in X-Forwarded-For as a proxy would.
local n = 0

request = function()
  n = n + 1
  local address = string.format("2001:db8:%x:1::%x", n % 4096, n % 65536)
  return wrk.format(nil, nil, { ["X-Forwarded-For"] = address })
end
