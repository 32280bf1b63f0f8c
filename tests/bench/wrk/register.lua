-- POST /auth/anon, each request a device never seen before (a registration that creates a user).
-- The prefix (first script argument) keeps runs apart; wrk runs one Lua state per thread.
local prefix = "wrk"
local n = 0

function init(args)
  prefix = (args[1] or "wrk") .. "-" .. tostring(math.random(1, 2^30))
end

function request()
  n = n + 1
  return wrk.format("POST", "/auth/anon", {["Content-Type"] = "application/json"},
                    '{"device_hash":"' .. prefix .. "-" .. n .. '"}')
end
