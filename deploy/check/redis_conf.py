"""Checks deploy/redis/redis.conf, the example configuration of the Redis the fleet needs
(deploy/redis/README.md, "The Redis the fleet needs"): its REQUIRED settings as written
(maxmemory set, maxmemory-policy noeviction, appendonly yes, appendfsync everysec, an aclfile),
then, when redis-server is installed, that Redis 7 loads it with each ACL file of deploy/ (plus the
`user default off` line the README asks for) and runs with those settings: every user line
parses, and INFO reads them back as the alerts will. The server listens on a Unix socket in a
temporary directory only, and is stopped at once.

    python3 deploy/check/redis_conf.py [REDIS_CONF] [USERS.acl ...]

One line per check; exit 1 on a failure.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONF = os.path.join(ROOT, "deploy", "redis", "redis.conf")
ACLS = [os.path.join(ROOT, "deploy", "redis", "users.acl"),
        os.path.join(ROOT, "deploy", "kustomize", "overlays", "example-cluster", "users.acl")]
# directive: (the value it must have, or a test of its value; why).
REQUIRED = {
    "maxmemory": (lambda v: size(v) > 0,
                  "a limit above 0: without one Redis grows until it is killed, and the 80 % alert "
                  "cannot fire"),
    "maxmemory-policy": ("noeviction", "any other policy evicts streams, groups and dead letters"),
    "appendonly": ("yes", "without the AOF a restart loses the streams and their acknowledgements"),
    "appendfsync": ("everysec", "at most a second lost on a crash, as measured"),
    "aclfile": (lambda v: bool(v), "the fleet's least-privilege users"),
}


def fail(msg):
    print(f"check-deploy: FAIL {msg}", flush=True)
    sys.exit(1)


def ok(msg):
    print(f"check-deploy: ok   {msg}", flush=True)


def size(value):
    """A redis.conf memory size in bytes (`4gb`, `512mb`, `1000000`)."""
    m = re.fullmatch(r"(\d+)\s*(k|kb|m|mb|g|gb)?", value.strip().lower())
    if not m:
        return -1
    unit = {None: 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}
    return int(m.group(1)) * unit[m.group(2)]


def directives(path):
    """The last value of each directive of a redis.conf (later lines win, as in Redis)."""
    found = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, value = line.partition(" ")
            found[name.lower()] = value.strip().strip('"')
    return found


def check_static(path):
    conf = directives(path)
    for name, (want, why) in REQUIRED.items():
        value = conf.get(name)
        good = want(value) if callable(want) and value is not None else value == want
        if not good:
            fail(f"{os.path.relpath(path)}: {name} is {value!r}: the fleet needs "
                 f"{'it set' if callable(want) else repr(want)} ({why})")
    return conf


def info(sock, user, password, section):
    out = subprocess.run(["redis-cli", "-s", sock, "--user", user, "--pass", password, "--no-auth-warning",
                          "INFO", section], capture_output=True, text=True, timeout=10)
    if out.returncode != 0 or out.stdout.startswith(("ERR", "NOPERM", "WRONGPASS")):
        fail(f"redis-cli INFO {section} as {user}: {out.stdout.strip() or out.stderr.strip()}")
    return dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)


def check_loaded(path, acl, conf):
    """Starts redis-server with the file and `acl` (plus `user default off` and a user for this
    check), on a Unix socket only; reads the settings back."""
    work = tempfile.mkdtemp(prefix="redis-conf-")
    try:
        users = os.path.join(work, "users.acl")
        with open(acl) as f, open(users, "w") as out:
            out.write("user default off\nuser conf-check on >conf-check ~* &* +@all\n" + f.read())
        sock = os.path.join(work, "redis.sock")
        server = subprocess.Popen(
            ["redis-server", path, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700",
             "--dir", work, "--aclfile", users, "--daemonize", "no", "--logfile", os.path.join(work, "log")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for _ in range(100):
                if server.poll() is not None:
                    log = server.stdout.read().strip().splitlines()
                    if os.path.exists(os.path.join(work, "log")):
                        with open(os.path.join(work, "log")) as f:
                            log += f.read().strip().splitlines()
                    fail(f"redis-server refuses {os.path.relpath(path)} with {os.path.relpath(acl)}: "
                         f"{' / '.join(l.strip() for l in log[-2:] if l.strip())}")
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            memory = info(sock, "conf-check", "conf-check", "memory")
            persistence = info(sock, "conf-check", "conf-check", "persistence")
            server_info = info(sock, "conf-check", "conf-check", "server")
            fsync = subprocess.run(["redis-cli", "-s", sock, "--user", "conf-check", "--pass", "conf-check",
                                    "--no-auth-warning", "CONFIG", "GET", "appendfsync"],
                                   capture_output=True, text=True, timeout=10).stdout.split()
            got = {"maxmemory": int(memory.get("maxmemory", "0")),
                   "maxmemory-policy": memory.get("maxmemory_policy"),
                   "appendonly": "yes" if persistence.get("aof_enabled") == "1" else "no",
                   "appendfsync": fsync[-1] if fsync else None}
            if got != {"maxmemory": size(conf["maxmemory"]), "maxmemory-policy": "noeviction",
                       "appendonly": "yes", "appendfsync": "everysec"}:
                fail(f"redis-server with {os.path.relpath(path)} runs with {got}")
            users_loaded = subprocess.run(["redis-cli", "-s", sock, "--user", "conf-check", "--pass", "conf-check",
                                           "--no-auth-warning", "ACL", "USERS"],
                                          capture_output=True, text=True, timeout=10).stdout.split()
            shipped = re.findall(r"^user\s+(\S+)", open(acl).read(), re.M)
            if not set(shipped) <= set(users_loaded):
                fail(f"redis-server did not load every user of {os.path.relpath(acl)}: "
                     f"{sorted(set(shipped) - set(users_loaded))}")
            return server_info.get("redis_version", "?"), len(shipped), got
        finally:
            server.terminate()
            server.wait(timeout=10)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else CONF
    acls = sys.argv[2:] or ACLS
    conf = check_static(path)
    ok(f"{os.path.relpath(path)}: maxmemory {conf['maxmemory']}, maxmemory-policy noeviction, "
       f"appendonly yes, appendfsync everysec, aclfile {conf['aclfile']}")
    if not shutil.which("redis-server") or not shutil.which("redis-cli"):
        ok(f"{os.path.relpath(path)}: not loaded (redis-server is not installed; scripts/services installs it)")
        return 0
    for acl in acls:
        version, users, got = check_loaded(path, acl, conf)
        ok(f"{os.path.relpath(path)}: redis-server {version} loads it with {os.path.relpath(acl)} "
           f"({users} users, plus `user default off`) and runs with maxmemory {got['maxmemory']}, "
           f"noeviction, the AOF on, fsync everysec")
    return 0


if __name__ == "__main__":
    sys.exit(main())
