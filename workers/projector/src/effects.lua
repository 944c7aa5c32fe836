-- (Sent as `#!lua`, then counter.lua, then this file: plan.rs.)
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
--   L   latest (constant: its layout, below), if above the stored version
--   I   invalidate: delete the key (constant 0)
--   G   invalidate_groups: delete every key of the group (a sorted set), and the group (constant 0)
--   C   count: +1 (constant: the TTL set when the counter is created)
--   H   history: XADD MAXLEN ~ <constant> {event, stream, entry_id}
-- A latest's layout: its flags, `f` (a member: one field of the hash per member), `t` (a TTL),
-- `g` (a group), `p` (a projection into the hash: its field names follow, one per line); '' is
-- the whole event into the hash: {event, stream, entry_id, version}. Its arguments: the key, the
-- version, then for `f` the member and its value (a JSON object that starts with its version:
-- `{"version":"…"` or `{"_version":"…"`), for `p` one value per field ('=' and the value, or ''
-- for a field the event lacks, removed), then for `t` the TTL ('' for none: PERSIST), then for `g`
-- the group (a KEYS index). A group is a sorted set of keys scored by when each expires (ms, or
-- inf): it forgets expired keys as it is written, and expires with its last key.
-- then the number of history TTLs this call refreshes and as many pairs (key, TTL); then per
-- entry with effects: entry id, dedup set (a KEYS index, 0 for none), event id, the event's
-- JSON, its shape's number, and per op its key (a KEYS index) and, for L, its arguments.
-- Returns {applied, duplicates, skipped, checkpoint, entry number, error, ...} with the entries
-- it rejects (numbered from 1 among those with effects; left pending, for a dead letter), where
-- checkpoint is 1 when written (or already further), 0 when none was asked, -1 when the
-- checkpoints key holds another type than a hash; or {-1, error} when the group is gone.
--
-- Nothing that can fail runs after an entry's XACK but its history appends, which are undone if
-- they fail. Before the XACK, the entry's effects are judged the way Redis will judge them,
-- without writing anything: the type of every latest key (read with its stored version, or its
-- member's), group and
-- counter (once per key per call), a counter's value as `INCRBY` parses it and whether the call's
-- increments overflow it (counter.lua), the dedup set's type. An entry that fails a check is
-- rejected whole (nothing written, left pending for a dead letter naming the key and the reason).
-- After its XACK come its deletions (invalidate, invalidate_groups: in stream order, so that a
-- state written before a deletion in the same call is deleted, and one written after it stays)
-- and its history appends, then, once per key after every entry, the gathered counters, latest
-- states, TTLs and group entries, which cannot fail on keys of the checked types. An
-- append can fail (a key of another type: its type is left to the append, as a TYPE per history
-- key per call cost about as much as the append; or a stream whose last id is the largest
-- possible one, with no id left for `XADD *`): the entry is then put back whole, its earlier
-- appends deleted (`XDEL`) and the entry pending again (`XCLAIM ... FORCE`), neither of which can
-- fail on a stream and a group that exist, and rejected; the key's type is then known, and the
-- call's later entries on it are refused before their XACK.
--
-- Versions (`latest`) compare as strings of one format: a mode letter and fixed-width digits
-- (plan.rs). A stored version of another mode or format (the route's `version` changed, or an
-- older release wrote it) is not comparable: the next event replaces it, and the new mode orders
-- from then on.
local call, try = redis.call, redis.pcall
local tonumber, ARGV, KEYS = tonumber, ARGV, KEYS
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local result = {0, 0, 0, 0}

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

-- A latest op's layout (its constant): offsets of its arguments from its key's.
local PLAIN = {width = 2, vfield = 'version'}
local function describe(c)
  if c == '' then return PLAIN end
  local nl = string.find(c, '\n', 1, true)
  local flags = nl and string.sub(c, 1, nl - 1) or c
  local d, w = {vfield = 'version'}, 2
  if string.find(flags, 'f', 1, true) then
    d.field, w = true, 4
  elseif nl then
    d.names, d.vfield = {}, '_version'
    for name in string.gmatch(string.sub(c, nl + 1), '[^\n]+') do d.names[#d.names + 1] = name end
    w = 2 + #d.names
  end
  if string.find(flags, 't', 1, true) then d.ttl, w = w, w + 1 end
  if string.find(flags, 'g', 1, true) then d.group, w = w, w + 1 end
  d.width = w
  return d
end

-- The shapes: per op its letter, constant, width (its arguments) and, for L, its layout;
-- `width`, the arguments an entry has for them.
local i = 6 + plain
local shapes = {}
for n = 1, tonumber(ARGV[i]) do
  local letters = ARGV[i + 1]
  local shape = {width = 0, counts = 0, histories = 0}
  for o = 1, #letters do
    local op, constant = string.sub(letters, o, o), ARGV[i + 1 + o]
    local d = op == 'L' and describe(constant) or nil
    local width = d and d.width or 1
    shape[o] = {op, constant, width, d}
    shape.width = shape.width + width
    if op == 'C' then shape.counts = shape.counts + 1 end
    if op == 'H' then shape.histories = shape.histories + 1 end
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

-- Key types as the writes will find them ('integer': a string INCRBY can add to), the values of
-- other strings (for the reason given), what each counter can still take (counter.lua), and the
-- versions stored under latest keys (false for none): a whole state's per key, members' per key
-- and member (no table per key for the usual whole state: one per key per call cost the drain).
local types, strings, room, stored, stored_members = {}, {}, {}, {}, {}
local function type_of(k)
  local t = types[k]
  if t then return t end
  t = call('TYPE', KEYS[k]).ok
  if t == 'string' then
    local v = call('GET', KEYS[k])
    room[k] = headroom(v)
    if room[k] then t = 'integer' else strings[k] = v end
  elseif t == 'none' then
    room[k] = HEADROOM_CAP
  end
  types[k] = t
  return t
end
-- The version stored under hash field `f` of latest key `k` (a member's: its value's first
-- property), read once; returns the key's type (an HGET refused: another type).
local function latest_type(k, f, member)
  local v = try('HGET', KEYS[k], f)
  if type(v) == 'table' and v.err then return type_of(k) end
  if member then
    local versions = stored_members[k]
    if not versions then versions = {}; stored_members[k] = versions end
    versions[f] = v and string.match(v, '^{"_?version":"([^"]*)"') or false
  else
    stored[k] = v
  end
  types[k] = 'hash'
  return 'hash'
end

-- Whether version `v` replaces `than`: by their order within one format, else always. (Called
-- as `v > than or newer(v, than)`: the comparison alone decides the usual case.)
local function newer(v, than)
  return #v ~= #than or string.byte(v) ~= string.byte(than) or v > than
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

local WANT = {L = 'hash', C = 'integer', H = 'stream', G = 'zset'}
local NAME = {L = 'latest', C = 'count', H = 'history', I = 'invalidate', G = 'invalidate_groups'}
local settled, counts, count_ttl, appended, adds = {}, {}, {}, {}, {}
-- Per latest key, the newest version of the call: its op's position (its key's argument), its
-- entry's start and its layout; per key with members, per member the op's position, and the
-- layout at each such position.
local latest, latest_entry, latest_desc, latest_f, desc_at = {}, {}, {}, {}, {}
local function reject(n, why)
  result[#result + 1] = n
  result[#result + 1] = why
end
local function kind(t)
  if t == 'integer' then return 'string' end
  if t == 'zset' then return 'sorted set' end
  return t
end

-- Why the entry starting at `s` cannot be applied, or nil and the types its new keys take (nil
-- when it creates none). Writes nothing.
-- Whether key `k` (of type `t` when known) can be a `want` for op `op`: the reason it cannot, or
-- nil and `created` (the types the entry's new keys take, a table made on first need).
local function fits(k, op, want, t, created)
  t = t or (created and created[k]) or types[k] or type_of(k)
  if t == 'none' then
    created = created or {}
    created[k] = want
  elseif t ~= want then
    return KEYS[k] .. ' holds a ' .. kind(t) .. ', not a ' .. kind(want) .. ' (' .. NAME[op] .. ')'
  end
  return nil, created
end

local function check(s, shape, d)
  if d > 0 and types[d] ~= 'set' then
    return KEYS[d] .. ' holds a ' .. type_of(d) .. ', not the dedup set'
  end
  local created, why
  local j = s + 5
  for o = 1, #shape do
    local op, k = shape[o][1], tonumber(ARGV[j])
    local want = WANT[op]
    if op == 'L' then
      local l = shape[o][4]
      local t = (created and created[k]) or types[k]
      if t ~= 'none' then
        if l.field then
          local versions = stored_members[k]
          if not (versions and versions[ARGV[j + 2]] ~= nil) then t = latest_type(k, ARGV[j + 2], true) end
        elseif stored[k] == nil then
          t = latest_type(k, l.vfield, false)
        end
      end
      why, created = fits(k, op, want, t, created)
      if why then return why end
      if l.group then
        why, created = fits(tonumber(ARGV[j + l.group]), 'G', 'zset', nil, created)
        if why then return (string.gsub(why, '%(invalidate_groups%)$', '(latest group)')) end
      end
    elseif op == 'G' then
      why, created = fits(k, op, want, nil, created)
      if why then return why end
    elseif want then
      local t = (created and created[k]) or types[k]
      if not t then
        -- A history key's type is left to its append (a TYPE per key would cost about as much
        -- as the append): see the header.
        if op == 'H' then t = 'none' else t = type_of(k) end
      end
      if t == 'none' then
        created = created or {}
        created[k] = want
      elseif t ~= want then
        if strings[k] and op == 'C' then
          local v = strings[k]
          if #v > 40 then v = string.sub(v, 1, 40) .. '...' end
          return KEYS[k] .. " holds '" .. v .. "', which INCRBY refuses (not an integer) (count)"
        end
        return KEYS[k] .. ' holds a ' .. kind(t) .. ', not a '
          .. (want == 'integer' and 'counter' or want) .. ' (' .. NAME[op] .. ')'
      end
      if op == 'C' then
        -- This entry's increments of the key (one per count action naming it), on top of the call's.
        local add = 1
        if shape.counts > 1 then
          local w = s + 5
          for p = 1, o - 1 do
            if shape[p][1] == 'C' and ARGV[w] == ARGV[j] then add = add + 1 end
            w = w + shape[p][3]
          end
        end
        if (counts[k] or 0) + add > room[k] then
          return KEYS[k] .. ' holds ' .. call('GET', KEYS[k]) .. ': adding '
            .. ((counts[k] or 0) + add) .. ' would overflow a 64-bit integer (count)'
        end
      end
    end
    j = j + shape[o][3]
  end
  return nil, created
end

-- A key deleted by this call: what the call gathered for it is dropped, and it is known empty.
-- `at` is the deleting op's position: a group deleted there keeps no key written before it.
local gone_at = {}
local function forget(k, at)
  gone_at[k] = at
  latest[k], latest_f[k], counts[k] = nil, nil, nil
  stored[k], stored_members[k], strings[k] = false, nil, nil
  types[k], room[k] = 'none', HEADROOM_CAP
end

-- invalidate_groups: every key of group `g` deleted (those registered, and those this call was
-- to register), and the group.
local key_index
local function drop_group(g, at)
  local doomed = call('ZRANGE', KEYS[g], 0, -1)
  for k, j in pairs(latest) do
    local l = latest_desc[k]
    if l.group and tonumber(ARGV[j + l.group]) == g then doomed[#doomed + 1] = KEYS[k] end
  end
  for k, members in pairs(latest_f) do
    for _, j in pairs(members) do
      local l = desc_at[j]
      if l.group and tonumber(ARGV[j + l.group]) == g then
        doomed[#doomed + 1] = KEYS[k]
        break
      end
    end
  end
  -- Tolerant: on a cluster a name that is not in the group's slot (not one a projector
  -- registered: a sorted set someone else filled) is refused, and nothing may fail after the XACK.
  if #doomed > 0 then chunked('DEL', {}, doomed, 1, #doomed) end
  call('DEL', KEYS[g])
  types[g] = 'none'
  if not key_index then
    key_index = {}
    for x = 3, #KEYS do key_index[KEYS[x]] = x end
  end
  for _, name in ipairs(doomed) do
    local x = key_index[name]
    if x then forget(x, at) end
  end
end

-- Its history appends; on a failure, what it appended is deleted: nil and the reason. (The
-- appends to undo are kept in one table reused by every entry: nothing is allocated per append.)
local undo = {}
local function append(s, shape, id)
  local j, done = s + 5, 0
  for o = 1, #shape do
    local op = shape[o][1]
    if op == 'H' then
      local k = tonumber(ARGV[j])
      local r = try('XADD', KEYS[k], 'MAXLEN', '~', shape[o][2], '*', 'event', ARGV[s + 3],
        'stream', stream, 'entry_id', id)
      if type(r) == 'table' and r.err then
        for w = 1, done do call('XDEL', KEYS[undo[2 * w - 1]], undo[2 * w]) end
        -- Later entries of the call are refused before their XACK.
        local kind = call('TYPE', KEYS[k]).ok
        types[k] = kind
        if kind ~= 'stream' and kind ~= 'none' then
          return nil, KEYS[k] .. ' holds a ' .. kind .. ', not a stream (history)'
        end
        return nil, KEYS[k] .. ': ' .. r.err .. ' (history)'
      end
      if shape.histories > 1 then
        done = done + 1
        undo[2 * done - 1], undo[2 * done] = k, r
      end
    end
    j = j + shape[o][3]
  end
  return true
end

for n, s in ipairs(starts) do
  local id, shape = ARGV[s], shape_of[n]
  local d = tonumber(ARGV[s + 1])
  if seen[n] then
    -- A retry of an event applied within the window: settled with no effect.
    settled[#settled + 1] = id
    result[2] = result[2] + 1
  else
    local why, created = check(s, shape, d)
    if why then
      reject(n, why)
    elseif call('XACK', stream, group, id) == 0 then
      -- Not pending: applied already (or another consumer's, settled).
      result[2] = result[2] + 1
    else
      local ok, failed = true, nil
      if shape.histories > 0 then ok, failed = append(s, shape, id) end
      if not ok then
        call('XCLAIM', stream, group, consumer, 0, id, 'FORCE', 'JUSTID')
        reject(n, failed)
      else
        result[1] = result[1] + 1
        if created then
          for k, t in pairs(created) do types[k] = t end
        end
        local j = s + 5
        for o = 1, #shape do
          local op, k = shape[o][1], tonumber(ARGV[j])
          if op == 'L' then
            local l, v = shape[o][4], ARGV[j + 1]
            if l.field then
              local members = latest_f[k]
              if not members then members = {}; latest_f[k] = members end
              local m = ARGV[j + 2]
              local c = members[m]
              if not c or v > ARGV[c + 1] or newer(v, ARGV[c + 1]) then
                members[m] = j
                desc_at[j] = l
              end
            else
              local c = latest[k]
              if not c or v > ARGV[c + 1] or newer(v, ARGV[c + 1]) then
                latest[k], latest_entry[k], latest_desc[k] = j, s, l
              end
            end
          elseif op == 'I' then
            call('DEL', KEYS[k])
            forget(k, j)
          elseif op == 'G' then
            drop_group(k, j)
          elseif op == 'C' then
            counts[k] = (counts[k] or 0) + 1
            count_ttl[k] = tonumber(shape[o][2])
          elseif op == 'H' then
            appended[k] = true
          end
          j = j + shape[o][3]
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
local now
local function now_ms()
  if not now then
    local t = call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now
end
-- A latest key written by the op at `j`: its TTL, and its entry in its group (gathered).
local joins = {}
local function written(k, j, l)
  local ttl
  if l.ttl then
    ttl = ARGV[j + l.ttl]
    if ttl == '' then call('PERSIST', KEYS[k]) else call('EXPIRE', KEYS[k], ttl) end
  end
  local g = l.group and tonumber(ARGV[j + l.group])
  if g and not (gone_at[g] and gone_at[g] > j) then
    local list = joins[g]
    if not list then list = {}; joins[g] = list end
    list[#list + 1] = (ttl and ttl ~= '') and (now_ms() + tonumber(ttl) * 1000) or 'inf'
    list[#list + 1] = KEYS[k]
  end
end
for k, j in pairs(latest) do
  local version, s, l = ARGV[j + 1], latest_entry[k], latest_desc[k]
  local was = stored[k]
  if not was or version > was or newer(version, was) then
    if l.names then
      local set, gone = {}, {}
      for x, name in ipairs(l.names) do
        local v = ARGV[j + 1 + x]
        if v == '' then
          gone[#gone + 1] = name
        else
          set[#set + 1] = name
          set[#set + 1] = string.sub(v, 2)
        end
      end
      set[#set + 1] = '_version'
      set[#set + 1] = version
      call('HSET', KEYS[k], unpack(set))
      if #gone > 0 then call('HDEL', KEYS[k], unpack(gone)) end
    else
      call('HSET', KEYS[k], 'event', ARGV[s + 3], 'stream', stream, 'entry_id', ARGV[s],
        'version', version)
    end
    if l ~= PLAIN then written(k, j, l) end
  end
end
for k, members in pairs(latest_f) do
  local versions, set, last = stored_members[k] or {}, {}, nil
  for m, j in pairs(members) do
    local was, version = versions[m], ARGV[j + 1]
    if not was or version > was or newer(version, was) then
      set[#set + 1] = m
      set[#set + 1] = ARGV[j + 3]
      if not last or j > last then last = j end
    end
  end
  -- The key's TTL and group follow its last member written, in stream order.
  if last then
    must('HSET', {KEYS[k]}, set)
    written(k, last, desc_at[last])
  end
end
for g, list in pairs(joins) do
  must('ZADD', {KEYS[g]}, list)
  call('ZREMRANGEBYSCORE', KEYS[g], '-inf', '(' .. now_ms())
  -- Its last key's expiry, as an integer: a sorted set someone else filled may hold any score,
  -- and nothing may fail here, after the acknowledgements.
  local last = call('ZRANGE', KEYS[g], -1, -1, 'WITHSCORES')[2]
  if last == 'inf' then
    call('PERSIST', KEYS[g])
  elseif last then
    local at = math.floor(tonumber(last) or 0)
    if at > 0 and at < 1e15 then call('PEXPIREAT', KEYS[g], string.format('%.0f', at)) end
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

-- The checkpoint moves forward only, into a hash (a key of another type is left alone, and said).
if ARGV[3] ~= '' then
  local t = call('TYPE', KEYS[2]).ok
  if t ~= 'hash' and t ~= 'none' then
    result[4] = -1
  else
    result[4] = 1
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
end
return result
