#!lua
-- The projector's batch for one stream: the effects of exactly the entries still pending in the
-- group, and their XACK, in one atomic step. An entry delivered again (after a crash, or to
-- another replica) is no longer pending: it is acknowledged already and applies nothing.
-- The `#!lua` line (no `allow-oom`) makes Redis refuse the whole call up front at maxmemory.
--
-- KEYS[1] the stream, KEYS[2] its checkpoints hash, KEYS[3..] the keys the effects write.
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] checkpoint ('' for none), ARGV[4] dedup TTL (s);
-- then per entry: entry id, dedup set (a KEYS index, 0 for none), event id, number of op
-- arguments, op arguments, each op one of
--   L key version n f1 v1 .. fn vn   latest: the fields, if version is above the stored one
--   I key                            invalidate: delete the key
--   C key ttl                        count: +1 (TTL set when the counter is created)
--   H key maxlen ttl n f1 v1 ..      history: XADD MAXLEN ~ maxlen, TTL refreshed
-- (key: a KEYS index). Returns {applied, duplicates, entry number, error, ...} with the entries
-- it rejects (numbered from 1, left pending for a dead letter), or {-1, error} without the group.
--
-- Pass one reads: which entries are pending, which event ids the dedup window has seen, and the
-- type of every key, so that no write fails in pass two (a script that fails half-way keeps its
-- writes): an entry whose key holds another type is rejected before anything is written.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]

local entries, i = {}, 5
while i <= #ARGV do
  local nargs = tonumber(ARGV[i + 3])
  entries[#entries + 1] = {
    id = ARGV[i], dedup = tonumber(ARGV[i + 1]), event = ARGV[i + 2],
    from = i + 4, to = i + 3 + nargs,
  }
  i = i + 4 + nargs
end

-- `command head... items[a..b] tail` in chunks (Lua's unpack has a stack limit).
local function chunked(command, head, items, tail)
  local out = {}
  for a = 1, #items, 1000 do
    local args = {}
    for _, h in ipairs(head) do args[#args + 1] = h end
    for b = a, math.min(a + 999, #items) do args[#args + 1] = items[b] end
    if tail then args[#args + 1] = tail end
    local r = redis.pcall(command, unpack(args))
    if type(r) == 'table' and r.err then return nil, r.err end
    if type(r) == 'table' then
      for _, v in ipairs(r) do out[#out + 1] = v end
    end
  end
  return out
end

-- A write that fails after pass one (which should not happen) fails the call, with what came
-- before it kept: the pipeline retries, and entries acknowledged meanwhile apply nothing.
local function must(command, head, items, tail)
  local out, err = chunked(command, head, items, tail)
  if not out then error(err) end
  return out
end

-- Which entries are still pending (XCLAIM JUSTID returns exactly those, and does not count a
-- delivery).
local pending = {}
if #entries > 0 then
  local ids = {}
  for n, e in ipairs(entries) do ids[n] = e.id end
  local claimed, err = chunked('XCLAIM', {stream, group, consumer, 0}, ids, 'JUSTID')
  if not claimed then
    if string.find(err, 'NOGROUP', 1, true) then return {-1, err} end
    return redis.error_reply(err)
  end
  for _, id in ipairs(claimed) do pending[id] = true end
end

-- The type of a key, as pass two will find it: 'integer' for a string a counter can add to.
local types = {}
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

-- Event ids the dedup window has seen (a producer's retry at a new entry).
local seen, asked = {}, {}
for n, e in ipairs(entries) do
  if pending[e.id] and e.dedup > 0 then
    asked[e.dedup] = asked[e.dedup] or {}
    table.insert(asked[e.dedup], n)
  end
end
local dedup_ok = {}
for k, ns in pairs(asked) do
  local t = type_of(k)
  if t == 'none' or t == 'set' then
    dedup_ok[k] = true
    local members = {}
    for x, n in ipairs(ns) do members[x] = entries[n].event end
    local found = must('SMISMEMBER', {KEYS[k]}, members)
    for x, n in ipairs(ns) do
      if found[x] == 1 then seen[n] = true end
    end
    types[k] = 'set'
  end
end

-- Pass one: reject the entries whose keys hold another type than their effects need.
local WANT = {L = 'hash', C = 'integer', H = 'stream'}
local function step(j)
  local op = ARGV[j]
  if op == 'L' then return j + 4 + 2 * tonumber(ARGV[j + 3])
  elseif op == 'I' then return j + 2
  elseif op == 'C' then return j + 3
  else return j + 5 + 2 * tonumber(ARGV[j + 4]) end
end
local rejected, result = {}, {0, 0}
for n, e in ipairs(entries) do
  if pending[e.id] and not seen[n] then
    local why
    if e.dedup > 0 and not dedup_ok[e.dedup] then
      why = KEYS[e.dedup] .. ' holds a ' .. type_of(e.dedup) .. ', not the dedup set'
    end
    local claims = {}
    local j = e.from
    while not why and j <= e.to do
      local want, k = WANT[ARGV[j]], tonumber(ARGV[j + 1])
      if want then
        local t = claims[k] or type_of(k)
        if t ~= 'none' and t ~= want then
          why = KEYS[k] .. ' holds a ' .. t .. ', not a ' .. want .. ' (' .. ARGV[j] .. ')'
        end
        claims[k] = want
      end
      j = step(j)
    end
    if why then
      rejected[n] = true
      result[#result + 1] = n
      result[#result + 1] = why
    else
      for k, want in pairs(claims) do types[k] = want end
    end
  end
end

-- Pass two: gather the effects of the accepted entries, then write them.
local acks, latest, counts, count_ttl, dels, history, adds = {}, {}, {}, {}, {}, {}, {}
for n, e in ipairs(entries) do
  if not pending[e.id] then
    result[2] = result[2] + 1
  elseif not rejected[n] then
    acks[#acks + 1] = e.id
    if seen[n] then
      result[2] = result[2] + 1
    else
      if e.to >= e.from then result[1] = result[1] + 1 end
      local j = e.from
      while j <= e.to do
        local op, k = ARGV[j], tonumber(ARGV[j + 1])
        if op == 'L' then
          local c = latest[k]
          if not c or ARGV[j + 2] > c.version then
            latest[k] = {version = ARGV[j + 2], at = j + 4, n = tonumber(ARGV[j + 3])}
          end
        elseif op == 'I' then
          dels[#dels + 1] = KEYS[k]
        elseif op == 'C' then
          counts[k] = (counts[k] or 0) + 1
          count_ttl[k] = tonumber(ARGV[j + 2])
        else
          history[#history + 1] = j
        end
        j = step(j)
      end
      if e.dedup > 0 then
        adds[e.dedup] = adds[e.dedup] or {}
        table.insert(adds[e.dedup], e.event)
      end
    end
  end
end

if #dels > 0 then must('DEL', {}, dels) end
for k, c in pairs(latest) do
  local stored = redis.call('HGET', KEYS[k], 'fleet:version')
  if not stored or c.version > stored then
    redis.call('DEL', KEYS[k])
    local fields = {}
    for a = c.at, c.at + 2 * c.n - 1 do fields[#fields + 1] = ARGV[a] end
    fields[#fields + 1] = 'fleet:version'
    fields[#fields + 1] = c.version
    must('HSET', {KEYS[k]}, fields)
  end
end
for k, c in pairs(counts) do
  if redis.call('INCRBY', KEYS[k], c) == c and count_ttl[k] > 0 then
    redis.call('EXPIRE', KEYS[k], count_ttl[k])
  end
end
local history_ttl = {}
for _, j in ipairs(history) do
  local k = tonumber(ARGV[j + 1])
  local args = {KEYS[k], 'MAXLEN', '~', ARGV[j + 2], '*'}
  for a = j + 5, j + 4 + 2 * tonumber(ARGV[j + 4]) do args[#args + 1] = ARGV[a] end
  redis.call('XADD', unpack(args))
  history_ttl[k] = tonumber(ARGV[j + 3])
end
for k, ttl in pairs(history_ttl) do
  if ttl > 0 then redis.call('EXPIRE', KEYS[k], ttl) end
end
for k, ids in pairs(adds) do
  must('SADD', {KEYS[k]}, ids)
  redis.call('EXPIRE', KEYS[k], ARGV[4])
end
if #acks > 0 then must('XACK', {stream, group}, acks) end

-- The checkpoint moves forward only.
if ARGV[3] ~= '' then
  local function parse(id)
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    return tonumber(ms), tonumber(seq)
  end
  local stored = redis.call('HGET', KEYS[2], group)
  local ms, seq = parse(ARGV[3])
  local sms, sseq = 0, -1
  if stored then sms, sseq = parse(stored) end
  if not sms or ms > sms or (ms == sms and seq > sseq) then
    redis.call('HSET', KEYS[2], group, ARGV[3])
  end
end
return result
