#!/usr/bin/env python3
"""Measures what a stream of v1 events costs Redis, per entry: the figures docs/src/capacity.md
plans Redis memory with. Starts its own throwaway redis-server (no persistence, loopback, a free
port, a temporary directory) and never touches another server.

For each entry shape it XADDs N entries to a fresh stream and reads `MEMORY USAGE <stream>
SAMPLES 0` (the whole stream, exactly) and the change in `used_memory`; then, on the last shape,
what a consumer group's pending entries cost (XREADGROUP without XACK: the group's and the
consumer's pending lists), and what a dead letter costs (the entry plus the dlq_* fields the
workers add, shared/src/pipeline/dlq.rs).

    python3 deploy/redis/stream_memory.py [--entries N] [--redis-server PATH]

Needs redis-server on the PATH (scripts/services installs Debian's) and only the Python standard
library. Prints one line per figure.
"""
import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

# The v1 contract's required fields (docs/src/events.md); `data` and the optional
# fields vary by shape.
SOURCE = "accounts-api"
TIME = "2026-11-24T10:00:00.123456Z"


class Redis:
    """A minimal RESP2 client: pipelined commands, replies parsed in order."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buf = b""

    @staticmethod
    def encode(args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("redis-server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("redis-server closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RuntimeError(f"unexpected reply {line!r}")

    def pipeline(self, commands):
        self.sock.sendall(b"".join(self.encode(c) for c in commands))
        return [self._reply() for _ in commands]

    def call(self, *args):
        return self.pipeline([args])[0]

    def used_memory(self):
        for line in self.call("INFO", "memory").decode().splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":")[1])
        raise RuntimeError("no used_memory in INFO memory")


def event(i, data_bytes, optional):
    """The fields of one v1 event, `data` padded to about `data_bytes` bytes."""
    head = '{"seq":%d,"step":%d,"note":"' % (i, i % 17)
    data = head + "x" * max(0, data_bytes - len(head) - 2) + '"}'
    fields = ["v", "1", "id", str(uuid.uuid7() if hasattr(uuid, "uuid7") else uuid.uuid4()),
              "type", "flow.progress", "channel", f"flow.{i % 1000}.progress",
              "source", SOURCE, "time", TIME, "data", data]
    if optional:
        fields += ["key", f"flow.{i % 1000}", "correlation_id", f"req-{i:012d}"]
    return fields


def fill(r, key, n, data_bytes, optional_every=0, batch=1000):
    """XADD n entries; every `optional_every`-th carries `key` and `correlation_id` (0: none)."""
    for start in range(0, n, batch):
        cmds = []
        for i in range(start, min(n, start + batch)):
            optional = optional_every and i % optional_every == 0
            cmds.append(["XADD", key, "*"] + event(i, data_bytes, optional))
        r.pipeline(cmds)


def raw_size(n, data_bytes, optional_every=0):
    """Bytes of field names and values of n entries, what a producer sends."""
    total = 0
    for i in range(min(n, 1000)):
        optional = optional_every and i % optional_every == 0
        total += sum(len(f.encode()) for f in event(i, data_bytes, optional))
    return total / min(n, 1000)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    args = parser.parse_args()
    n = args.entries

    workdir = tempfile.mkdtemp(prefix="stream-memory-")
    port = free_port()
    server = subprocess.Popen(
        [args.redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir, "--maxmemory", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                r = Redis(port)
                r.call("PING")
                break
            except (ConnectionError, OSError, RuntimeError):
                time.sleep(0.05)
        else:
            sys.exit("redis-server did not start")
        info = r.call("INFO", "server").decode()
        version = next(l.split(":")[1] for l in info.splitlines() if l.startswith("redis_version:"))
        config = dict(zip(*[iter(r.call("CONFIG", "GET", "stream-node-max-*"))] * 2))
        print(f"# redis-server {version}, {n} entries per shape, "
              + ", ".join(f"{k.decode()} {v.decode()}" for k, v in sorted(config.items())))

        shapes = [
            ("bench-like: 7 fields, data ~50 B", 50, 0),
            ("7 fields, data ~250 B", 250, 0),
            ("7 fields, data ~1 KiB", 1024, 0),
            ("data ~250 B, 1 in 2 with key + correlation_id", 250, 2),
        ]
        for name, data_bytes, optional_every in shapes:
            key = "{m}:events"
            r.call("DEL", key)
            before = r.used_memory()
            fill(r, key, n, data_bytes, optional_every)
            after = r.used_memory()
            usage = r.call("MEMORY", "USAGE", key, "SAMPLES", "0")
            print(f"{name}: {usage / n:.0f} bytes/entry (MEMORY USAGE), "
                  f"{(after - before) / n:.0f} (used_memory), "
                  f"{raw_size(n, data_bytes, optional_every):.0f} bytes of fields and values")

        # Pending entries: one group reads everything and acknowledges nothing.
        key = "{m}:events"
        r.call("XGROUP", "CREATE", key, "g1", "0")
        before = r.used_memory()
        ids = []
        while len(ids) < n:
            got = r.call("XREADGROUP", "GROUP", "g1", "c1", "COUNT", 10_000, "STREAMS", key, ">")
            if not got:
                break
            ids += [e[0] for e in got[0][1]]
        read = len(ids)
        after = r.used_memory()
        print(f"pending entries: {(after - before) / read:.0f} bytes per entry pending in a group "
              f"({read} delivered, none acknowledged; used_memory)")
        before = r.used_memory()
        for start in range(0, len(ids), 10_000):
            r.call("XACK", key, "g1", *ids[start:start + 10_000])
        after = r.used_memory()
        print(f"after XACK of all: {(before - after) / len(ids):.0f} bytes per entry freed; "
              f"the stream itself keeps {r.call('MEMORY', 'USAGE', key, 'SAMPLES', '0') / n:.0f} bytes/entry")

        # Dead letters: the entry, plus the fields the workers add.
        dlq = "{m}:events:dlq"
        before = r.used_memory()
        for start in range(0, n, 1000):
            cmds = []
            for i in range(start, min(n, start + 1000)):
                cmds.append(["XADD", dlq, "*"] + event(i, 250, 0) + [
                    "dlq_reason", "handler_error",
                    "dlq_error", "PostgreSQL rejected the event: 22P05 unsupported Unicode escape",
                    "dlq_stream", key, "dlq_entry_id", f"{1764000000000 + i}-0",
                    "dlq_group", "persister", "dlq_deliveries", "1",
                    "dlq_at", "2026-11-24T10:00:01.5Z"])
            r.pipeline(cmds)
        print(f"dead letters (data ~250 B): {r.call('MEMORY', 'USAGE', dlq, 'SAMPLES', '0') / n:.0f} "
              f"bytes/entry (MEMORY USAGE), {(r.used_memory() - before) / n:.0f} (used_memory)")

        # The projector's keys, for events with ~250 B of data (docs/src/performance.md measured them
        # for the benchmark's): a history entry (`event` = the v1 JSON, `stream`, `entry_id`), a
        # `latest` state hash (the same and `version`), a dedup set's member (an event id, its 16
        # bytes: workers/projector/src/plan.rs).
        hist = "{m}:flow:1:history"
        for start in range(0, n, 1000):
            cmds = []
            for i in range(start, min(n, start + 1000)):
                f = event(i, 250, 0)
                doc = json.dumps(dict(zip(f[0::2], f[1::2])))
                cmds.append(["XADD", hist, "*", "event", doc, "stream", key,
                             "entry_id", f"{1764000000000 + i}-0"])
            r.pipeline(cmds)
        print(f"projector history entries (data ~250 B): "
              f"{r.call('MEMORY', 'USAGE', hist, 'SAMPLES', '0') / n:.0f} bytes/entry (MEMORY USAGE)")
        states = min(n, 10_000)
        cmds = []
        for i in range(states):
            f = event(i, 250, 0)
            doc = json.dumps(dict(zip(f[0::2], f[1::2])))
            cmds.append(["HSET", f"{{m}}:flow:{i}:state", "event", doc, "stream", key,
                         "entry_id", f"{1764000000000 + i}-0", "version", f"{1764000000000 + i:020d}"])
        r.pipeline(cmds)
        total = sum(r.pipeline([["MEMORY", "USAGE", f"{{m}}:flow:{i}:state", "SAMPLES", "0"]
                                for i in range(states)]))
        print(f"projector latest states (data ~250 B): {total / states:.0f} bytes/key (MEMORY USAGE, "
              f"{states} keys)")
        dedup = "{m}:events:dedup:projector:0"
        for start in range(0, n, 10_000):
            r.call("SADD", dedup, *[uuid.uuid4().bytes for _ in range(min(10_000, n - start))])
        print(f"projector dedup set: {r.call('MEMORY', 'USAGE', dedup, 'SAMPLES', '0') / n:.1f} "
              f"bytes per event id (MEMORY USAGE)")

        # Trimming frees whole nodes: half the stream cut with MINID.
        mid = ids[len(ids) // 2].decode()
        before = r.call("MEMORY", "USAGE", key, "SAMPLES", "0")
        r.call("XTRIM", key, "MINID", mid)
        after = r.call("MEMORY", "USAGE", key, "SAMPLES", "0")
        print(f"XTRIM MINID of half the entries: the stream from {before / 2**20:.1f} MiB "
              f"to {after / 2**20:.1f} MiB ({r.call('XLEN', key)} entries left)")
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
