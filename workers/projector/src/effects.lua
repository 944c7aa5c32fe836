#!lua
-- The projector's batch for one stream: each entry's effects and its XACK in one atomic step.
-- XACK answers 1 only for an entry still pending in the group, so the script applies the
-- effects of exactly the entries it acknowledges: an entry delivered again (after a crash, or
-- reclaimed by another replica) applies nothing, with any number of replicas, and no per-event
-- mark is kept. The `#!lua` line (no `allow-oom`) makes Redis refuse the whole call up front at
-- maxmemory, so a call never stops half-way for memory.
--
-- KEYS[1] the stream, KEYS[2] its checkpoints hash, KEYS[3..] the keys the effects write.
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] checkpoint ('' for none), ARGV[4] dedup TTL (s),
-- ARGV[5] the number M of entries with no effect, ARGV[6..5+M] their ids; then per entry with
-- effects: entry id, dedup set (a KEYS index, 0 for none), event id, the event's JSON, number of
-- op arguments, op arguments, each op one of
--   L key version        latest: {event, stream, entry_id, version}, if above the stored version
--   I key                invalidate: delete the key
--   C key ttl            count: +1 (TTL set when the counter is created)
--   H key maxlen ttl     history: XADD MAXLEN ~ {event, stream, entry_id}, TTL refreshed
-- (key: a KEYS index). Returns {applied, duplicates, skipped, entry number, error, ...} with the
-- entries it rejects (numbered from 1 among those with effects; left pending, for a dead letter),
-- or {-1, error} when the group is gone.
--
-- Nothing may fail once an entry is acknowledged: the types of its latest keys (read with their
-- stored version) and counters are checked before its XACK, once per key per call; its history
-- appends come right after the XACK, each its own type check (`pcall`): one that fails puts the
-- entry back in the pending list (`XCLAIM ... FORCE`) and rejects it. Counters, latest states and
-- deletions are gathered over the call and written once per key, after every entry.
local call, try = redis.call, redis.pcall
local tonumber, ARGV, KEYS = tonumber, ARGV, KEYS
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local result = {0, 0, 0}

-- `command head... items` in chunks (Lua's unpack has a stack limit): the sum of the replies, or
-- nil and the error.
local function chunked(command, head, items, from, to)
  local sum = 0
  for a = from, to, 1000 do
    local args = {}
    for _, h in ipairs(head) do args[#args + 1] = h end
    for b = a, math.min(a + 999, to) do args[#args + 1] = items[b] end
    local r = try(command, unpack(args))
    if type(r) == 'table' and r.err then return nil, r.err end
    if type(r) == 'number' then sum = sum + r end
  end
  return sum
end
local function must(command, head, items)
  local out, err = chunked(command, head, items, 1, #items)
  if not out then error(err) end
  return out
end

-- Entries with no effect: acknowledged, first (nothing to keep atomic with them); this is also
-- where a missing group shows.
local plain = tonumber(ARGV[5])
if plain > 0 then
  local acked, err = chunked('XACK', {stream, group}, ARGV, 6, 5 + plain)
  if not acked then
    if string.find(err, 'NOGROUP', 1, true) then return {-1, err} end
    error(err)
  end
  result[3] = acked
  result[2] = plain - acked
end

-- Where each entry with effects has its arguments.
local starts, i, last = {}, 6 + plain, #ARGV
while i <= last do
  starts[#starts + 1] = i
  i = i + 5 + tonumber(ARGV[i + 4])
end

-- Key types as the writes will find them ('integer': a string a counter can add to), and the
-- versions stored under latest keys.
local types, stored = {}, {}
local function type_of(k)
  local t = types[k]
  if t then return t end
  t = call('TYPE', KEYS[k]).ok
  if t == 'string' then
    local v = call('GET', KEYS[k])
    if string.match(v, '^-?%d+$') and #v < 19 then t = 'integer' end
  end
  types[k] = t
  return t
end
local function latest_type(k)
  local v = try('HGET', KEYS[k], 'version')
  if type(v) == 'table' and v.err then return type_of(k) end
  stored[k] = v
  types[k] = 'hash'
  return 'hash'
end

-- Event ids the dedup window has seen (a producer's retry at a new entry), asked once per set.
local seen, asked = {}, {}
for n, s in ipairs(starts) do
  local d = tonumber(ARGV[s + 1])
  if d > 0 then
    asked[d] = asked[d] or {}
    table.insert(asked[d], n)
  end
end
for d, ns in pairs(asked) do
  local t = type_of(d)
  if t == 'none' or t == 'set' then
    for a = 1, #ns, 1000 do
      local members = {}
      for x = a, math.min(a + 999, #ns) do members[#members + 1] = ARGV[starts[ns[x]] + 2] end
      local found = call('SMISMEMBER', KEYS[d], unpack(members))
      for x, f in ipairs(found) do
        if f == 1 then seen[ns[a + x - 1]] = true end
      end
    end
    types[d] = 'set'
  end
end

local STEP = {L = 3, I = 2, C = 3, H = 4}
local WANT = {L = 'hash', C = 'integer', H = 'stream'}
local settled, latest, counts, count_ttl, dels, history_ttl, adds = {}, {}, {}, {}, {}, {}, {}
local function reject(n, why)
  result[#result + 1] = n
  result[#result + 1] = why
end
for n, s in ipairs(starts) do
  local id = ARGV[s]
  local from, to = s + 5, s + 4 + tonumber(ARGV[s + 4])
  local d = tonumber(ARGV[s + 1])
  local why
  if seen[n] then
    -- A retry of an event applied within the window: settled with no effect.
    settled[#settled + 1] = id
    result[2] = result[2] + 1
  else
    if d > 0 and types[d] ~= 'set' then
      why = KEYS[d] .. ' holds a ' .. type_of(d) .. ', not the dedup set'
    end
    -- The types its effects need, against what the keys hold or what earlier entries of the call
    -- made of them (a key two kinds of effect write fails the later ones).
    local j = from
    while not why and j <= to do
      local op, k = ARGV[j], tonumber(ARGV[j + 1])
      local want = WANT[op]
      if want then
        local t = types[k]
        if not t then
          if op == 'L' then t = latest_type(k)
          elseif op == 'C' then t = type_of(k)
          else t = 'none' end -- a history key: its append checks it
        end
        if t ~= 'none' and t ~= want then
          why = KEYS[k] .. ' holds a ' .. t .. ', not a ' .. want .. ' (' .. op .. ')'
        else
          types[k] = want
        end
      end
      j = j + STEP[op]
    end
    if why then
      reject(n, why)
    elseif call('XACK', stream, group, id) == 0 then
      -- Not pending: applied already (or another consumer's, settled).
      result[2] = result[2] + 1
    else
      -- Acknowledged: its history appends, then its gathered effects.
      local written
      j = from
      while not why and j <= to do
        if ARGV[j] == 'H' then
          local k = tonumber(ARGV[j + 1])
          local r = try('XADD', KEYS[k], 'MAXLEN', '~', ARGV[j + 2], '*', 'event', ARGV[s + 3],
            'stream', stream, 'entry_id', id)
          if type(r) == 'table' and r.err then
            why = KEYS[k] .. ' holds a ' .. call('TYPE', KEYS[k]).ok .. ', not a stream (H)'
            if written then why = why .. '; appended before it: ' .. written end
          else
            written = (written and written .. ', ' or '') .. KEYS[k]
            history_ttl[k] = tonumber(ARGV[j + 3])
          end
        end
        j = j + STEP[ARGV[j]]
      end
      if why then
        call('XCLAIM', stream, group, consumer, 0, id, 'FORCE', 'JUSTID')
        reject(n, why)
      else
        result[1] = result[1] + 1
        j = from
        while j <= to do
          local op, k = ARGV[j], tonumber(ARGV[j + 1])
          if op == 'L' then
            local c = latest[k]
            if not c or ARGV[j + 2] > ARGV[c + 2] then latest[k] = j end
          elseif op == 'I' then
            dels[KEYS[k]] = true
          elseif op == 'C' then
            counts[k] = (counts[k] or 0) + 1
            count_ttl[k] = tonumber(ARGV[j + 2])
          end
          j = j + STEP[op]
        end
        if d > 0 then
          adds[d] = adds[d] or {}
          table.insert(adds[d], ARGV[s + 2])
        end
      end
    end
  end
end

-- The gathered writes, once per key. A latest op's entry is the nearest start before it.
local deleted = {}
for key in pairs(dels) do deleted[#deleted + 1] = key end
if #deleted > 0 then must('DEL', {}, deleted) end
local owner = {}
for _, s in ipairs(starts) do owner[s] = true end
for k, j in pairs(latest) do
  local was = stored[k]
  if dels[KEYS[k]] then was = false end
  if not was or ARGV[j + 2] > was then
    local s = j
    while not owner[s] do s = s - 1 end
    call('HSET', KEYS[k], 'event', ARGV[s + 3], 'stream', stream, 'entry_id', ARGV[s],
      'version', ARGV[j + 2])
  end
end
for k, c in pairs(counts) do
  if call('INCRBY', KEYS[k], c) == c and count_ttl[k] > 0 then
    call('EXPIRE', KEYS[k], count_ttl[k])
  end
end
for k, ttl in pairs(history_ttl) do
  if ttl > 0 then call('EXPIRE', KEYS[k], ttl) end
end
for d, ids in pairs(adds) do
  must('SADD', {KEYS[d]}, ids)
  call('EXPIRE', KEYS[d], ARGV[4])
end
if #settled > 0 then must('XACK', {stream, group}, settled) end

-- The checkpoint moves forward only.
if ARGV[3] ~= '' then
  local function parse(id)
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    return tonumber(ms), tonumber(seq)
  end
  local at = call('HGET', KEYS[2], group)
  local ms, seq = parse(ARGV[3])
  local sms, sseq = 0, -1
  if at then sms, sseq = parse(at) end
  if not sms or ms > sms or (ms == sms and seq > sseq) then
    call('HSET', KEYS[2], group, ARGV[3])
  end
end
return result
