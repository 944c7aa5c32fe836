#!/usr/bin/env python3
"""The batched Python consumer the benchmark compares against (issue: performance).

What a careful team would write by hand: XREADGROUP 500 entries, validate each (JSON data, the
required fields), deduplicate with pipelined SET NX on the event id, one INSERT ... SELECT FROM
UNNEST per batch for the strict user.* events, one XACK per batch. It stops when the group has
nothing left to deliver and prints `events=N seconds=S`.

usage: baseline_consumer.py REDIS_URL DATABASE_URL STREAM
"""
import json
import sys
import time

import psycopg
import redis

BATCH = 500
GROUP = "baseline"
INSERT = """
INSERT INTO events (event_id, channel, type, source, occurred_at, data, stream, stream_id, correlation_id)
SELECT e.i, e.c, e.t, e.s, e.o, e.d::jsonb, e.st, e.si, e.ci
FROM UNNEST(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::text[], %s::text[], %s::text[], %s::text[])
  AS e(i, c, t, s, o, d, st, si, ci)
ON CONFLICT (event_id) DO NOTHING
"""
REQUIRED = ("v", "id", "type", "channel", "source", "time", "data")


def main():
    redis_url, database_url, stream = sys.argv[1:4]
    r = redis.Redis.from_url(redis_url)
    try:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError:
        pass
    pg = psycopg.connect(database_url)
    # A prefix of this run's own, so runs never see each other's dedup keys; they expire.
    prefix = f"baseline:dedup:{time.time_ns()}:"
    total = 0
    started = time.monotonic()
    while True:
        reply = r.xreadgroup(GROUP, "c1", {stream: ">"}, count=BATCH, block=200)
        if not reply:
            break
        entries = reply[0][1]
        valid = []
        for entry_id, f in entries:
            f = {k.decode(): v.decode() for k, v in f.items()}
            if any(k not in f for k in REQUIRED) or f["v"] != "1":
                continue
            try:
                if not isinstance(json.loads(f["data"]), dict):
                    continue
            except ValueError:
                continue
            valid.append((entry_id.decode(), f))
        pipe = r.pipeline(transaction=False)
        for _, f in valid:
            pipe.set(prefix + f["id"], 1, nx=True, ex=600)
        fresh = [v for v, new in zip(valid, pipe.execute()) if new]
        rows = [(eid, f) for eid, f in fresh if f["channel"].startswith("user.")]
        if rows:
            cols = [list(c) for c in zip(*[
                (f["id"], f["channel"], f["type"], f["source"], f["time"], f["data"], stream, eid, f.get("correlation_id"))
                for eid, f in rows
            ])]
            with pg.transaction():
                pg.execute(INSERT, cols)
        r.xack(stream, GROUP, *[eid for eid, _ in entries])
        total += len(entries)
    # The last, empty read waited `block` ms for nothing: not part of the work.
    elapsed = time.monotonic() - started - 0.2
    print(f"events={total} seconds={elapsed:.3f}")


if __name__ == "__main__":
    main()
