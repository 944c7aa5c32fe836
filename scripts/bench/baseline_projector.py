#!/usr/bin/env python3
"""The batched Python consumer the projector's benchmark compares against.

The projector's bench job written by hand with redis-py: XREADGROUP 500 entries; decode and check
each v1 entry in Python (the required fields, `v` = 1, `data` a JSON object, `time` parsed for
the minute); route it (`flow.*.progress` has effects, `user.#` none, as in the bench's
configuration); render its keys like the templates

    latest  = "bench:state:{channel[1]}"           (version: the entry id, fixed width)
    count   = "bench:count:{type}:{minute}"
    history = "bench:history:{channel[1]}", maxlen = 1000

and send the batch as one EVALSHA of a Lua script that, for each entry with effects, XACKs it
and, only if XACK answered 1 (still pending: not applied before), writes the latest hash if the
version is above the stored one, INCRBYs the counter and XADDs to the history (MAXLEN ~ 1000);
the entries with no effect are acknowledged by one XACK. Each batch's EVALSHA travels in one
pipeline with the next XREADGROUP: one round trip per batch. No dedup window, no TTLs, no
checkpoint (the projector does all three). It stops when the group has nothing left to deliver
and prints `events=N applied=A seconds=S`.

usage: baseline_projector.py REDIS_URL STREAM
"""
import json
import re
import sys
import time
from datetime import datetime, timezone

import redis

BATCH = 500
GROUP = "baseline"
MAXLEN = 1000
REQUIRED = ("v", "id", "type", "channel", "source", "time", "data")

# KEYS[1] the stream, then per entry with effects its state, count and history keys.
# ARGV[1] group, ARGV[2] the number M of entries with no effect, ARGV[3..2+M] their ids, then per
# entry with effects: entry id, version, the event's JSON.
SCRIPT = """
local stream, group = KEYS[1], ARGV[1]
local plain = tonumber(ARGV[2])
if plain > 0 then
  redis.call('XACK', stream, group, unpack(ARGV, 3, 2 + plain))
end
local applied, k = 0, 2
for i = 3 + plain, #ARGV, 3 do
  local id, version, event = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local state, count, history = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  k = k + 3
  if redis.call('XACK', stream, group, id) == 1 then
    local stored = redis.call('HGET', state, 'version')
    if not stored or version > stored then
      redis.call('HSET', state, 'event', event, 'stream', stream, 'entry_id', id, 'version', version)
    end
    redis.call('INCRBY', count, 1)
    redis.call('XADD', history, 'MAXLEN', '~', %d, '*', 'event', event, 'stream', stream,
      'entry_id', id)
    applied = applied + 1
  end
end
return applied
""" % MAXLEN


def compile_pattern(pattern):
    """A channel pattern: `*` one segment, `#` any number of segments (zero included)."""
    parts = []
    for seg in pattern.split("."):
        parts.append({"*": r"[^.]+", "#": r".*"}.get(seg, re.escape(seg)))
    rx = r"\.".join(parts).replace(r"\..*", r"(?:\..*)?")
    return re.compile(rx + "$")


# First matching route wins; True: the route has effects.
ROUTES = [(compile_pattern("flow.*.progress"), True), (compile_pattern("user.#"), False)]


def minute(t):
    """`{minute}` of an RFC 3339 time: its UTC minute, `2026-11-26T12:25`."""
    return datetime.fromisoformat(t).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M")


def plan(stream, entries):
    """The EVALSHA arguments of one batch: (keys, args)."""
    plain, keys, effects = [], [stream], []
    for entry_id, raw in entries:
        entry_id = entry_id.decode()
        f = {k.decode(): v.decode() for k, v in raw.items()}
        if any(k not in f for k in REQUIRED) or f["v"] != "1":
            plain.append(entry_id)  # the projector dead-letters these; none in the bench
            continue
        try:
            data = json.loads(f["data"])
            bucket = minute(f["time"])
        except ValueError:
            plain.append(entry_id)
            continue
        if not isinstance(data, dict):
            plain.append(entry_id)
            continue
        channel = f["channel"]
        route = next((fx for rx, fx in ROUTES if rx.match(channel)), False)
        if not route:
            plain.append(entry_id)
            continue
        segment = channel.split(".")[1]
        keys += [f"bench:state:{segment}", f"bench:count:{f['type']}:{bucket}", f"bench:history:{segment}"]
        ms, seq = entry_id.split("-")
        event = {"v": 1, "id": f["id"], "type": f["type"], "channel": channel, "source": f["source"],
                 "time": f["time"], "data": data}
        for opt in ("key", "correlation_id"):
            if opt in f:
                event[opt] = f[opt]
        effects += [entry_id, f"e{int(ms):020d}{int(seq):020d}", json.dumps(event, separators=(",", ":"))]
    return keys, [GROUP, len(plain), *plain, *effects]


def main():
    redis_url, stream = sys.argv[1:3]
    r = redis.Redis.from_url(redis_url)
    try:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError:
        pass
    sha = r.script_load(SCRIPT)
    total = applied = 0
    started = time.monotonic()
    pending = None  # the batch read last, applied with the next read
    while True:
        pipe = r.pipeline(transaction=False)
        if pending:
            keys, args = pending
            pipe.evalsha(sha, len(keys), *keys, *args)
        pipe.xreadgroup(GROUP, "c1", {stream: ">"}, count=BATCH, block=200)
        replies = pipe.execute()
        if pending:
            applied += replies[0]
        reply = replies[-1]
        if not reply:
            break
        entries = reply[0][1]
        total += len(entries)
        pending = plan(stream, entries)
    # The last, empty read waited `block` ms for nothing: not part of the work.
    elapsed = time.monotonic() - started - 0.2
    print(f"events={total} applied={applied} seconds={elapsed:.3f}")


if __name__ == "__main__":
    main()
