#!lua
-- The projector's batch for one stream: the effects of exactly the entries still pending for this
-- consumer, and their XACK, in one atomic step. An entry delivered again (after a crash, or to
-- another replica) applies nothing here: it is acknowledged already, or another consumer's now.
-- The `#!lua` line (no `allow-oom`) makes Redis refuse the whole call up front at maxmemory.
--
-- KEYS[1] the stream, KEYS[2] its checkpoints hash, KEYS[3..] the keys the effects write.
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] checkpoint ('' for none), ARGV[4] dedup TTL (s),
-- ARGV[5], ARGV[6] the lowest and highest entry id of the call; then per entry: entry id, dedup
-- set (a KEYS index, 0 for none), event id, the event's JSON, number of op arguments, op
-- arguments, each op one of
--   L key version        latest: {event, stream, entry_id, version}, if above the stored version
--   I key                invalidate: delete the key
--   C key ttl            count: +1 (TTL set when the counter is created)
--   H key maxlen ttl     history: XADD MAXLEN ~ {event, stream, entry_id}, TTL refreshed
-- (key: a KEYS index). Returns {applied, duplicates, entry number, error, ...} with the entries
-- it rejects (numbered from 1, left pending for a dead letter), or {-1, error} without the group.
--
-- A script that fails half-way keeps its writes, so nothing may fail once an entry's first
-- write is made: the types of its keys are checked first (a latest key's with the read of its
-- stored version, a counter's once per call), and a history append, its first write, is made
-- with `pcall`; an entry whose key holds another type is rejected, with nothing written.
-- Counters, latest states and deletions are gathered over the call and written once per key.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local result = {0, 0}

-- Where each entry's arguments start.
local starts, i, last = {}, 7, #ARGV
while i <= last do
  starts[#starts + 1] = i
  i = i + 5 + tonumber(ARGV[i + 4])
end

-- `command head... items` in chunks (Lua's unpack has a stack limit); nil and the error if one
-- fails.
local function chunked(command, head, items)
  local out = {}
  for a = 1, #items, 1000 do
    local args = {}
    for _, h in ipairs(head) do args[#args + 1] = h end
    for b = a, math.min(a + 999, #items) do args[#args + 1] = items[b] end
    local r = redis.pcall(command, unpack(args))
    if type(r) == 'table' and r.err then return nil, r.err end
    if type(r) == 'table' then
      for _, v in ipairs(r) do out[#out + 1] = v end
    end
  end
  return out
end
local function must(command, head, items)
  local out, err = chunked(command, head, items)
  if not out then error(err) end
  return out
end

-- Which entries are still pending for this consumer: an entry delivered again elsewhere (another
-- replica reclaimed it) is that replica's to apply; one acknowledged already is nobody's.
local pending = {}
if #starts > 0 then
  local r = redis.pcall('XPENDING', stream, group, ARGV[5], ARGV[6], 100000, consumer)
  if r.err then
    if string.find(r.err, 'NOGROUP', 1, true) then return {-1, r.err} end
    return redis.error_reply(r.err)
  end
  for _, p in ipairs(r) do pending[p[1]] = true end
end

-- Key types as the writes will find them ('integer': a string a counter can add to), and the
-- versions stored under latest keys.
local types, stored = {}, {}
local function type_of(k)
  local t = types[k]
  if t then return t end
  t = redis.call('TYPE', KEYS[k]).ok
  if t == 'string' then
    local v = redis.call('GET', KEYS[k])
    if string.match(v, '^-?%d+$') and #v < 19 then t = 'integer' end
  end
  types[k] = t
  return t
end
local function latest_type(k)
  if types[k] then return types[k] end
  local v = redis.pcall('HGET', KEYS[k], 'version')
  if type(v) == 'table' and v.err then return type_of(k) end
  stored[k] = v
  types[k] = 'hash'
  return 'hash'
end

-- Event ids the dedup window has seen (a producer's retry at a new entry).
local seen, asked = {}, {}
for n, s in ipairs(starts) do
  local d = tonumber(ARGV[s + 1])
  if d > 0 and pending[ARGV[s]] then
    asked[d] = asked[d] or {}
    table.insert(asked[d], n)
  end
end
for d, ns in pairs(asked) do
  local t = type_of(d)
  if t == 'none' or t == 'set' then
    local members = {}
    for x, n in ipairs(ns) do members[x] = ARGV[starts[n] + 2] end
    local found = must('SMISMEMBER', {KEYS[d]}, members)
    for x, n in ipairs(ns) do
      if found[x] == 1 then seen[n] = true end
    end
    types[d] = 'set'
  end
end

local STEP = {L = 3, I = 2, C = 3, H = 4}
local acks, latest, counts, count_ttl, dels, history_ttl, adds = {}, {}, {}, {}, {}, {}, {}
for n, s in ipairs(starts) do
  local id = ARGV[s]
  local from, to = s + 5, s + 4 + tonumber(ARGV[s + 4])
  if not pending[id] then
    result[2] = result[2] + 1
  elseif seen[n] then
    acks[#acks + 1] = id
    result[2] = result[2] + 1
  else
    local why
    local d = tonumber(ARGV[s + 1])
    if d > 0 and types[d] ~= 'set' then
      why = KEYS[d] .. ' holds a ' .. type_of(d) .. ', not the dedup set'
    end
    -- Reads first: the types of its latest keys and counters, and the keys earlier entries of
    -- the call claimed for another kind.
    local claims = {}
    local j = from
    while not why and j <= to do
      local op, k = ARGV[j], tonumber(ARGV[j + 1])
      if op ~= 'I' then
        local want = (op == 'L' and 'hash') or (op == 'C' and 'integer') or 'stream'
        local t = claims[k] or types[k]
        if not t then
          if op == 'L' then t = latest_type(k)
          elseif op == 'C' then t = type_of(k)
          else t = 'none' end -- a history key's type is learnt from its append
        end
        if t ~= 'none' and t ~= want then
          why = KEYS[k] .. ' holds a ' .. t .. ', not a ' .. want .. ' (' .. op .. ')'
        end
        claims[k] = want
      end
      j = j + STEP[op]
    end
    -- Then its history appends, its first writes.
    local written
    j = from
    while not why and j <= to do
      if ARGV[j] == 'H' then
        local k = tonumber(ARGV[j + 1])
        local r = redis.pcall('XADD', KEYS[k], 'MAXLEN', '~', ARGV[j + 2], '*', 'event', ARGV[s + 3],
          'stream', stream, 'entry_id', id)
        if type(r) == 'table' and r.err then
          why = KEYS[k] .. ': ' .. r.err .. ' (H)'
          if written then why = why .. '; written before it: ' .. written end
        else
          written = (written and written .. ', ' or '') .. KEYS[k]
          history_ttl[k] = tonumber(ARGV[j + 3])
        end
      end
      j = j + STEP[ARGV[j]]
    end
    if why then
      result[#result + 1] = n
      result[#result + 1] = why
    else
      for k, want in pairs(claims) do types[k] = want end
      acks[#acks + 1] = id
      if to >= from then result[1] = result[1] + 1 end
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

-- The gathered writes, once per key. A latest op's entry is found again from the op's position.
local deleted = {}
for key in pairs(dels) do deleted[#deleted + 1] = key end
if #deleted > 0 then must('DEL', {}, deleted) end
local owner = {}
for n, s in ipairs(starts) do owner[s] = n end
for k, j in pairs(latest) do
  local was = stored[k]
  if dels[KEYS[k]] then was = false end
  if not was or ARGV[j + 2] > was then
    -- The op's entry: the nearest start before it.
    local s = j
    while not owner[s] do s = s - 1 end
    redis.call('HSET', KEYS[k], 'event', ARGV[s + 3], 'stream', stream, 'entry_id', ARGV[s],
      'version', ARGV[j + 2])
  end
end
for k, c in pairs(counts) do
  if redis.call('INCRBY', KEYS[k], c) == c and count_ttl[k] > 0 then
    redis.call('EXPIRE', KEYS[k], count_ttl[k])
  end
end
for k, ttl in pairs(history_ttl) do
  if ttl > 0 then redis.call('EXPIRE', KEYS[k], ttl) end
end
for d, ids in pairs(adds) do
  must('SADD', {KEYS[d]}, ids)
  redis.call('EXPIRE', KEYS[d], ARGV[4])
end
if #acks > 0 then must('XACK', {stream, group}, acks) end

-- The checkpoint moves forward only.
if ARGV[3] ~= '' then
  local function parse(id)
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    return tonumber(ms), tonumber(seq)
  end
  local at = redis.call('HGET', KEYS[2], group)
  local ms, seq = parse(ARGV[3])
  local sms, sseq = 0, -1
  if at then sms, sseq = parse(at) end
  if not sms or ms > sms or (ms == sms and seq > sseq) then
    redis.call('HSET', KEYS[2], group, ARGV[3])
  end
end
return result
