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
-- ARGV[5] the number M of entries with no effect, ARGV[6..5+M] their ids; then the number of
-- shapes and each shape: its op letters (one per op, in order), then one constant per op:
--   L   latest: {event, stream, entry_id, version}, if above the stored version (constant 0)
--   I   invalidate: delete the key (constant 0)
--   C   count: +1 (constant: the TTL set when the counter is created)
--   H   history: XADD MAXLEN ~ <constant> {event, stream, entry_id}
-- then the number of history TTLs this call refreshes and as many pairs (key, TTL); then per
-- entry with effects: entry id, dedup set (a KEYS index, 0 for none), event id, the event's
-- JSON, its shape's number, and per op its key (a KEYS index), for L followed by the version.
-- Returns {applied, duplicates, skipped, entry number, error, ...} with the entries it rejects
-- (numbered from 1 among those with effects; left pending, for a dead letter), or {-1, error}
-- when the group is gone.
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

-- The shapes: per op its letter and constant; `width`, the arguments an entry has for them.
local i = 6 + plain
local shapes = {}
for n = 1, tonumber(ARGV[i]) do
  local letters = ARGV[i + 1]
  local shape = {width = 0}
  for o = 1, #letters do
    local op = string.sub(letters, o, o)
    shape[o] = {op, ARGV[i + 1 + o]}
    shape.width = shape.width + (op == 'L' and 2 or 1)
  end
  shapes[n] = shape
  i = i + 1 + #letters
end
i = i + 1
local expire = {}
for _ = 1, tonumber(ARGV[i]) do
  expire[tonumber(ARGV[i + 1])] = tonumber(ARGV[i + 2])
  i = i + 2
end
i = i + 1

-- Where each entry with effects has its arguments, and its shape.
local starts, shape_of, last = {}, {}, #ARGV
while i <= last do
  local n = #starts + 1
  starts[n] = i
  shape_of[n] = shapes[tonumber(ARGV[i + 4])]
  i = i + 5 + shape_of[n].width
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

local WANT = {L = 'hash', C = 'integer', H = 'stream'}
local settled, counts, count_ttl, dels, appended, adds = {}, {}, {}, {}, {}, {}
-- Per latest key, the newest version of the call: its argument, and its entry's start.
local latest, latest_entry = {}, {}
local function reject(n, why)
  result[#result + 1] = n
  result[#result + 1] = why
end
for n, s in ipairs(starts) do
  local id, shape = ARGV[s], shape_of[n]
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
    local j = s + 5
    for o = 1, #shape do
      if why then break end
      local op, k = shape[o][1], tonumber(ARGV[j])
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
      j = j + (op == 'L' and 2 or 1)
    end
    if why then
      reject(n, why)
    elseif call('XACK', stream, group, id) == 0 then
      -- Not pending: applied already (or another consumer's, settled).
      result[2] = result[2] + 1
    else
      -- Acknowledged: its history appends, then its gathered effects.
      j = s + 5
      for o = 1, #shape do
        local op = shape[o][1]
        if op == 'H' then
          local k = tonumber(ARGV[j])
          local r = try('XADD', KEYS[k], 'MAXLEN', '~', shape[o][2], '*', 'event', ARGV[s + 3],
            'stream', stream, 'entry_id', id)
          if type(r) == 'table' and r.err then
            why = KEYS[k] .. ' holds a ' .. call('TYPE', KEYS[k]).ok .. ', not a stream (H)'
            -- The appends before it (an entry's ops stop at the first failure).
            local written, w = {}, s + 5
            for p = 1, o - 1 do
              if shape[p][1] == 'H' then written[#written + 1] = KEYS[tonumber(ARGV[w])] end
              w = w + (shape[p][1] == 'L' and 2 or 1)
            end
            if #written > 0 then why = why .. '; appended before it: ' .. table.concat(written, ', ') end
            break
          end
          appended[k] = true
        end
        j = j + (op == 'L' and 2 or 1)
      end
      if why then
        call('XCLAIM', stream, group, consumer, 0, id, 'FORCE', 'JUSTID')
        reject(n, why)
      else
        result[1] = result[1] + 1
        j = s + 5
        for o = 1, #shape do
          local op, k = shape[o][1], tonumber(ARGV[j])
          if op == 'L' then
            local c = latest[k]
            if not c or ARGV[j + 1] > ARGV[c] then
              latest[k], latest_entry[k] = j + 1, s
            end
            j = j + 2
          else
            if op == 'I' then
              dels[KEYS[k]] = true
            elseif op == 'C' then
              counts[k] = (counts[k] or 0) + 1
              count_ttl[k] = tonumber(shape[o][2])
            end
            j = j + 1
          end
        end
        if d > 0 then
          adds[d] = adds[d] or {}
          table.insert(adds[d], ARGV[s + 2])
        end
      end
    end
  end
end

-- The gathered writes, once per key.
local deleted = {}
for key in pairs(dels) do deleted[#deleted + 1] = key end
if #deleted > 0 then must('DEL', {}, deleted) end
for k, at in pairs(latest) do
  local was, version, s = stored[k], ARGV[at], latest_entry[k]
  if dels[KEYS[k]] then was = false end
  if not was or version > was then
    call('HSET', KEYS[k], 'event', ARGV[s + 3], 'stream', stream, 'entry_id', ARGV[s],
      'version', version)
  end
end
for k, c in pairs(counts) do
  if call('INCRBY', KEYS[k], c) == c and count_ttl[k] > 0 then
    call('EXPIRE', KEYS[k], count_ttl[k])
  end
end
for k in pairs(appended) do
  if expire[k] then call('EXPIRE', KEYS[k], expire[k]) end
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
