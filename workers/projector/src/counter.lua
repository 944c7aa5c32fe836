-- How much `INCRBY` can still add to a counter holding the string `v`, judged the way Redis
-- judges it (string2ll, then the overflow check), so that `effects.lua` refuses an event before
-- its XACK rather than meet the error after it: nil when Redis would refuse the value itself
-- (`007`, `-0`, ` 1`, `+1`, `1e3`, '', more than 19 digits, past a signed 64-bit integer),
-- else the headroom up to 2^63 - 1, capped at 2^52 (more than any call adds; Lua numbers are
-- doubles, exact below 2^53). A 19-digit value is split at 10 + 9 digits to stay exact.
-- (Prepended to effects.lua; tests/tests/projector_counters.rs holds it against real INCRBY.)
local HEADROOM_CAP = 2 ^ 52
local MAX_HI, MAX_LO = 9223372036, 854775807
local function headroom(v)
  if v == '0' then return HEADROOM_CAP end
  local sign, digits = string.match(v, '^(%-?)([1-9]%d*)$')
  if not digits or #digits > 19 then return nil end
  if #digits < 19 then return HEADROOM_CAP end
  local hi, lo = tonumber(string.sub(digits, 1, 10)), tonumber(string.sub(digits, 11))
  -- Negative values reach down to -2^63 (one further than the positive side).
  local lo_max = MAX_LO + (sign == '-' and 1 or 0)
  if hi > MAX_HI or (hi == MAX_HI and lo > lo_max) then return nil end
  if sign == '-' then return HEADROOM_CAP end
  return math.min(HEADROOM_CAP, (MAX_HI - hi) * 1e9 + (MAX_LO - lo))
end
