"""Validates the Kubernetes objects rendered from deploy/kustomize (multi-document YAML files given
as arguments): core kinds against the Kubernetes schemas of PyPI's kubernetes-validate, strictly
(an unknown field fails; so does an unknown kind), the custom kinds (KEDA, Prometheus operator)
with validate-crds.js, then the facts the deployment promises (probes, consumer names, grace
periods, security context, resources, scaling, setup; per worker: its command and which
credentials it gets; the worker's FLEET_CONFIG as it ships, and the keys it names against the
worker's Redis ACL user and its streams' hash slot, and the Pub/Sub channels it publishes on
against the user's channel patterns). The gateway (server-sent events to browsers: no consumer
group) is held to its own: its routes subscribe where the notifier publishes and resume from keys
the projector writes, its ACL user reads those keys, writes its registry and may subscribe to any
channel but publish on none, its preStop sleep and grace period, its Service without affinity,
its Ingress (only /events, the annotations a stream needs), its KEDA trigger on its connections.
redis_exporter (the Redis alerts' and the dashboard's metrics) is held to its own: a pinned
image, non-root, its password from a Secret, the Redis the workers use, an ACL user that grants
exactly the commands its settings make it send and reads only the sizes of the streams the setup
Job creates, and how Prometheus scrapes it (one Redis: a ServiceMonitor on /metrics, /scrape
off; a cluster: --is-cluster and a ScrapeConfig that discovers and scrapes every node through it,
in the overlay's namespace). The retention CronJob (`fleetctl trim`) is held to its own: Forbid,
its schedule, start and run deadlines, retries and history, exit 2 failing it at once, the
workers' image; its `[[retention]]` rules parse as fleetctl parses them, cover every stream the
setup Job creates and its dead letters, and each applies to some stream; its ACL user `retention`
grants exactly the commands trim sends for those rules, on the keys they name and no other, and
`operator` may dry-run it. One line per check; exit 1 on a failure.

An overlay whose KEDA triggers are `redis-cluster-streams` deploys on a Redis Cluster, and is held
to what a cluster needs (deploy/README.md, "Redis Cluster"): every stream it creates has a hash
tag, the shards' slots spread evenly over the masters (the setup Job's annotation
`streamfleet/redis-cluster-masters`, slots split as `redis-cli --cluster create` splits them),
every projector template can keep its keys in its stream's slot (the projector's own start check,
workers/projector/src/slots.rs, and each key's slot computed here, CRC16 as Redis Cluster does),
every key a worker touches (its streams, the keys beside them, rate-limit budgets, the projector's
keys) is inside its ACL user's patterns, the workers' globs match no stream they write, the
workers log in with several seed nodes, and each worker's triggers cover every shard.

    validate.py NODE_MODULES RULES_YML FILE.yaml[=USERS.acl]...

USERS.acl is the Redis ACL file the overlay's Redis loads (deploy/redis/users.acl by default).
"""
import base64
import fnmatch
import functools
import json
import math
import os
import re
import subprocess
import sys
import tomllib
from urllib.parse import urlsplit

import kubernetes_validate as kv
import yaml

K8S_VERSION = "1.32"
CUSTOM = {"keda.sh/v1alpha1", "monitoring.coreos.com/v1", "monitoring.coreos.com/v1alpha1"}
ACL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "redis", "users.acl")
# The setup Job's annotation: how many masters the overlay's Redis Cluster has (its slots split
# evenly among them).
MASTERS_ANNOTATION = "streamfleet/redis-cluster-masters"

# Every worker each overlay deploys, by its Deployment's name (= its command, its Service, its
# default group, its Redis ACL user): whether it uses PostgreSQL, whether its FLEET_CONFIG
# must declare projector actions (the projector exits 2 without any), and whether it publishes
# every routed event on Pub/Sub (the notifier: each route's `publish` template, else
# DEFAULT_CHANNEL, must fall inside its ACL user's channel patterns).
WORKERS = {
    "persister": {"database": True, "actions": False, "publish": False},
    "projector": {"database": False, "actions": True, "publish": False},
    "notifier": {"database": False, "actions": False, "publish": True},
}
# The gateway: no consumer group, no stream, no database (check_gateway).
GATEWAY = "gateway"
# What the gateway sends to Redis (workers/gateway/src: its subscription, SUBSCRIBE for an exact
# topic and PSUBSCRIBE for a wildcard one; registry.rs, one HSET); XREVRANGE, XRANGE (the seam
# after a resume) and HGETALL only where a route names a `history` or a `latest` key.
GATEWAY_COMMANDS = ("auth", "hello", "ping", "select", "cluster|slots", "client|setname", "subscribe",
                    "unsubscribe", "psubscribe", "punsubscribe", "hset", "hdel", "pexpire", "del",
                    "zadd", "zrem", "zremrangebyscore")
# redis_exporter (deploy/kustomize/base/redis-exporter): its Deployment, Service and ACL user, the
# job the Redis alerts select (the Service's name), and its image (pinned to a release tag).
REDIS_EXPORTER = "redis-exporter"
REDIS_EXPORTER_IMAGE = re.compile(r"^(?:[\w.-]+/)?oliver006/redis_exporter(?::v\d+\.\d+\.\d+(?:-alpine)?)?(?:@sha256:[0-9a-f]{64})?$")
# What redis_exporter v1.88.0 sends on each scrape (exporter/exporter.go, scrapeRedisHost), by
# the settings that decide it: AUTH at connection; CLIENT SETNAME unless
# REDIS_EXPORTER_SET_CLIENT_NAME=false; INFO ALL; CONFIG GET * unless REDIS_EXPORTER_CONFIG_COMMAND
# is "-"; LATENCY LATEST and HISTOGRAM unless REDIS_EXPORTER_EXCLUDE_LATENCY_HISTOGRAM_METRICS;
# SLOWLOG LEN and GET always; PING with REDIS_EXPORTER_PING_ON_CONNECT; for each key of
# REDIS_EXPORTER_CHECK_SINGLE_KEYS TYPE, MEMORY USAGE and its length (XLEN for a stream), after a
# SELECT on one Redis; on a cluster CLUSTER INFO (INFO says cluster_enabled), CLUSTER SLOTS (the
# cluster connection, --is-cluster), CLUSTER NODES (/discover-cluster-nodes), ASKING (a key lookup
# during a slot migration). (COMMANDLOG LEN, which it also sends, is unknown to Redis 7: an error
# reply, not an ACL refusal.)
REDIS_EXPORTER_ALWAYS = {"auth", "info", "slowlog|len", "slowlog|get"}
REDIS_EXPORTER_HARMLESS = {"auth", "hello", "ping"}
# The retention CronJob (deploy/kustomize/base/retention): `fleetctl trim`, its ACL user, and the
# user an engineer dry-runs it as.
RETENTION = "retention"
OPERATOR = "operator"
# What `fleetctl trim` sends (workers/fleetctl/src/trim.rs, streams.rs): at connection AUTH and
# HELLO (one server or a cluster?), SELECT for a database other than 0, on a cluster CLUSTER SLOTS
# and PING (the client's slot map and node checks); TIME (Redis's clock, for the age caps); per
# rule TYPE of a named key, or SCAN MATCH <glob> TYPE stream for a glob (on a cluster on every
# master: CLUSTER SLOTS); per stream XLEN, XINFO GROUPS, XPENDING (summary form) of each group with
# pending entries, XRANGE from the head for a length cap (`max_len`), and XTRIM MINID (its only
# write; not sent with --dry-run).
RETENTION_ALWAYS = {"auth", "hello", "time", "xlen", "xinfo|groups", "xpending", "xtrim"}
RETENTION_HARMLESS = {"auth", "hello", "ping", "select", "cluster|slots"}
# A FLEET_CONFIG's tables, and a `[[retention]]` rule's fields (shared/src/runtime/config.rs: both
# refuse unknown fields; a rule sets max_age_s or max_len, max_len >= 1, max_age_s 1 to ten years).
CONFIG_TABLES = {"tuning", "route", "backpressure", "retention"}
RETENTION_FIELDS = {"streams", "max_age_s", "max_len", "cut_unread"}
MAX_TTL_S = 10 * 365 * 86400
# Its registry key when FLEET_GATEWAY_REGISTRY_KEY is not set (workers/gateway/src/args.rs).
GATEWAY_REGISTRY = "streamfleet:gateways"
# ingress-nginx's annotations.
NGINX = "nginx.ingress.kubernetes.io/"
# The notifier's channel for a route without `publish` (workers/notifier/src/sink.rs).
DEFAULT_CHANNEL = "fleet:{channel}"
# A FLEET_CONFIG without any [[route]] routes this (docs/src/configuration.md).
DEFAULT_ROUTES = [{"pattern": "user.#", "strict": True}]
# What a worker keeps beside each stream it reads (shared/src/stream/keys.rs): `<stream><suffix>`;
# `:dedup:` is followed by the group and a bucket (the projector's dedup window).
BESIDE = (":dlq", ":trials", ":checkpoints", ":dedup:{group}:")
SLOTS = 16384


def fail(msg):
    print(f"check-deploy: FAIL {msg}", flush=True)
    sys.exit(1)


def ok(msg):
    print(f"check-deploy: ok   {msg}", flush=True)


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


@functools.cache
def acl_users(path=ACL_FILE):
    """An ACL file as {user: [rule, ...]}: the root rule first, then one per selector; a rule is
    (key patterns, granted commands, channel patterns, partial key patterns) with commands
    lowercased (`client|list`, `@all`); key patterns grant both reads and writes (`~p`, `%RW~p`),
    partial ones are (perm, pattern) for `%R~p` (reads only) and `%W~p` (writes only)."""
    users = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"\s*user\s+(\S+)\s+(.*)$", line)
            if not m:
                continue
            rules = []
            for text in [re.sub(r"\([^)]*\)", " ", m.group(2))] + re.findall(r"\(([^)]*)\)", m.group(2)):
                keys, cmds, channels, partial = [], set(), [], []
                for tok in text.split():
                    if tok == "resetkeys":
                        keys, partial = [], []
                    elif tok == "resetchannels":
                        channels = []
                    elif tok == "allchannels":
                        channels.append("*")
                    elif tok.startswith("&"):
                        channels.append(tok[1:])
                    elif tok in ("allkeys", "~*"):
                        keys.append("*")
                    elif tok.startswith("%") and "~" in tok:
                        perm, pattern = tok[1:].split("~", 1)
                        if {"R", "W"} <= set(perm.upper()):
                            keys.append(pattern)
                        else:
                            partial.append((perm.upper(), pattern))
                    elif tok.startswith("~"):
                        keys.append(tok[1:])
                    elif tok in ("-@all", "nocommands"):
                        cmds = set()
                    elif tok in ("+@all", "allcommands"):
                        cmds.add("@all")
                    elif tok.startswith("+"):
                        cmds.add(tok[1:].lower())
                    elif tok.startswith("-"):
                        cmds.discard(tok[1:].lower())
                rules.append((keys, cmds, channels, partial))
            users[m.group(1)] = rules
    return users


def acl_user(acl, user, where):
    rules = acl_users(acl).get(user)
    if not rules:
        fail(f"{where}: no ACL user {user} in {os.path.relpath(acl)}")
    return rules


def covers(pattern, prefix):
    """Whether the ACL key pattern matches every key that starts with `prefix`."""
    head = re.split(r"[*?\[\\]", pattern, maxsplit=1)[0]
    if pattern == head + "*":
        return prefix.startswith(head)
    return fnmatch.fnmatchcase(prefix, pattern) and not re.search(r"[*?\[]", pattern)


def key_access(rule, key, perm):
    """Whether an ACL rule grants `perm` ("R" or "W") on every key `key` stands for: a NUL in
    `key` stands for any text (a placeholder of a template). Sound for patterns whose only
    wildcard is `*` (a NUL, which no pattern's literal holds, can only fall inside a `*`)."""
    keys, _, _, partial = rule
    patterns = keys + [p for perms, p in partial if perm in perms]
    for pattern in patterns:
        if re.search(r"[?\[\\]", pattern) and "\0" in key:
            continue
        if fnmatch.fnmatchcase(key, pattern):
            return True
    return False


def template_key(parts):
    """A template's key with every placeholder as a NUL (see key_access)."""
    return "".join(text if kind == "lit" else "\0" for kind, text in parts)


def is_glob(item):
    return bool(re.search(r"[*?\[]", item))


def glob_matches(glob, key):
    """Redis's glob (SCAN MATCH) for the patterns used here: `*`, `?`, `[…]`; a brace is literal."""
    return fnmatch.fnmatchcase(key, glob.replace("[^", "[!"))


def may_match(prefix, glob):
    """Whether some key starting with `prefix` can match `glob` (conservative: True past a
    wildcard of the glob)."""
    i = 0
    for ch in glob:
        if ch in "*?[\\":
            return True
        if i == len(prefix):
            return True
        if prefix[i] != ch:
            return False
        i += 1
    return i == len(prefix)


def hash_tag(key):
    """The part of a key Redis Cluster hashes: between the first `{` and the next `}`, if not
    empty; None when the key (or the known start of it) has no complete tag."""
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    return key[start + 1:end] if start >= 0 and end > start + 1 else None


def crc16(data):
    """CRC16-XMODEM (polynomial 0x1021, initial 0): Redis Cluster's key hash."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def slot(key):
    """The hash slot of a key: CRC16 of its hash tag, or of the whole key without one."""
    tag = hash_tag(key)
    return crc16((key if tag is None else tag).encode()) % SLOTS


# Redis Cluster's own examples (`CLUSTER KEYSLOT`), and the shards of shared/src/stream/keys.rs.
assert slot("foo") == 12182 and slot("user1000") == 3443 and slot("{user1000}.following") == 3443
assert [slot(f"events:{{{t}}}") for t in ("0.1", "1", "2.4")] == [1598, 9842, 14587]


def master_ranges(masters):
    """The slots of each master of a cluster created by `redis-cli --cluster create` (its split:
    16384 / masters each, rounded half away from zero, the last one up to 16383)."""
    per, first, cursor, ranges = SLOTS / masters, 0, 0.0, []
    for i in range(masters):
        last = math.floor(cursor + per - 1 + 0.5)
        if last > SLOTS or i == masters - 1:
            last = SLOTS - 1
        last = max(last, first)
        ranges.append((first, last))
        first, cursor = last + 1, cursor + per
    return ranges


assert master_ranges(3) == [(0, 5460), (5461, 10922), (10923, 16383)]


def parse_template(template):
    """A template's parts as the workers parse them (shared/src/event/template.rs): ("lit", text)
    with doubled braces undoubled, or ("ph", name); None if it does not parse."""
    parts, lit, i = [], "", 0
    while i < len(template):
        two = template[i:i + 2]
        if two in ("{{", "}}"):
            lit += two[0]
            i += 2
        elif template[i] == "{":
            end = template.find("}", i + 1)
            if end < 0 or "{" in template[i + 1:end]:
                return None
            if lit:
                parts.append(("lit", lit))
                lit = ""
            parts.append(("ph", template[i + 1:end]))
            i = end + 1
        elif template[i] == "}":
            return None
        else:
            lit += template[i]
            i += 1
    if lit:
        parts.append(("lit", lit))
    return parts


def render_prefix(parts, stream):
    """The known start of the keys a template renders for an event of `stream`: its literals,
    `{stream}` and `{tag}` (the stream's hash tag in braces, or its whole name in braces), up to
    the first part that depends on the event; and whether that is the whole key."""
    out = ""
    for kind, text in parts:
        if kind == "lit":
            out += text
        elif text == "stream":
            out += stream
        elif text == "tag":
            out += "{" + (hash_tag(stream) or stream) + "}"
        else:
            return out, False
    return out, True


def copartition_refusal(parts, items):
    """Why a template cannot keep its keys in their stream's slot, given the consumed FLEET_STREAMS
    items (keys or globs): the projector's start check on a cluster (workers/projector/src/slots.rs,
    `refusal`: where the keys' hash tag comes from), None if it can."""
    hint = "start the key with {tag} (the stream's hash tag, e.g. app:{tag}:flow:{channel[1]}:state)"
    for kind, text in parts:
        if kind == "ph" and text == "tag":
            return None
        if kind == "ph" and text == "stream":
            untagged = [s for s in items if hash_tag(s) is None]
            return (f"{{stream}} keeps a key in its stream's slot only when the stream name has a "
                    f"hash tag, and {untagged[0]} has none: {hint}") if untagged else None
        if kind == "lit" and "{" in text:
            tag = hash_tag(text[text.index("{"):])
            if tag is None:
                return f"its hash tag depends on the event: {hint}"
            other = [s for s in items if hash_tag(s) is None or slot("{" + hash_tag(s) + "}") != slot("{" + tag + "}")]
            return f"its literal tag {{{tag}}} is not the slot of {other[0]}: {hint}" if other else None
    return f"it has no hash tag, so its keys land in any slot: {hint}"


def action_templates(config):
    """(route index, pattern, kind, template) of every projector action of a parsed FLEET_CONFIG."""
    for i, route in enumerate(config.get("route", [])):
        for action in route.get("actions", []):
            for kind in ("latest", "count", "history"):
                if kind in action:
                    yield i, route.get("pattern"), kind, action[kind]
            for t in action.get("invalidate", []):
                yield i, route.get("pattern"), "invalidate", t


def budget_prefix(items, group):
    """Where the rate-limit budget keys of `group` start (shared/src/pipeline/budget.rs,
    `key_prefix`): after the hash tag every FLEET_STREAMS item shares, else after the group's."""
    tags = {hash_tag(s) for s in items}
    if len(tags) == 1 and None not in tags:
        return f"{{{tags.pop()}}}:rate:{group}:"
    return f"streamfleet:rate:{{{group}}}:"


def worker_config(d, objects, where):
    """The FLEET_CONFIG file a Deployment's container reads, parsed, from its ConfigMap."""
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    return mounted_config(pod, c, env_of(c).get("FLEET_CONFIG", {}).get("value", ""), objects, where)


def mounted_config(pod, c, path, objects, where):
    """The configuration file at `path` in container `c` of `pod`, parsed, from the ConfigMap
    mounted there."""
    mounts = [m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    cm_name = volumes.get(mounts[0]["name"], {}).get("configMap", {}).get("name") if mounts else None
    cms = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == cm_name]
    if not path or not cms:
        fail(f"{where}: FLEET_CONFIG ({path or 'unset'}) is not a file of a ConfigMap mounted in the pod")
    key = path[len(mounts[0]["mountPath"].rstrip("/")) + 1:]
    text = cms[0].get("data", {}).get(key)
    if text is None:
        fail(f"{where}: FLEET_CONFIG {path}: ConfigMap {cm_name} has no key {key}")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        fail(f"{where}: FLEET_CONFIG {path} (ConfigMap {cm_name}): {e}")


def secret_value(ref, objects, where):
    """A key of a Secret rendered with the overlay (None if the Secret is not part of it, e.g. made
    by a secret manager)."""
    for o in objects:
        if o["kind"] == "Secret" and o["metadata"]["name"] == ref.get("name"):
            raw = o.get("stringData", {}).get(ref.get("key"))
            if raw is None and ref.get("key") in o.get("data", {}):
                raw = base64.b64decode(o["data"][ref["key"]]).decode()
            if raw is None:
                fail(f"{where}: Secret {ref.get('name')} has no key {ref.get('key')}")
            return raw
    return None


def redis_seeds(var, objects, where):
    """The seed URLs of a FLEET_REDIS_URL from a Secret (comma-separated), each split; None if the
    Secret is not part of the overlay."""
    raw = secret_value(var.get("valueFrom", {}).get("secretKeyRef", {}), objects, where)
    if raw is None:
        return None
    return [urlsplit(u.strip()) for u in raw.split(",") if u.strip()]


def redis_user(var, objects, where, cluster):
    """The one ACL user every seed of a FLEET_REDIS_URL logs in as (None if its Secret is not part
    of the overlay); on a cluster, at least two seeds and no database but 0."""
    seeds = redis_seeds(var, objects, where)
    if seeds is None:
        return None
    users = {u.username for u in seeds}
    if len(users) != 1:
        fail(f"{where}: the seeds of FLEET_REDIS_URL log in as different users ({', '.join(sorted(map(str, users)))})")
    if cluster:
        if len(seeds) < 2:
            fail(f"{where}: FLEET_REDIS_URL names one node of the cluster: give several seeds "
                 "(comma-separated; any one alive is enough to start)")
        if any(u.path.strip("/") not in ("", "0") for u in seeds):
            fail(f"{where}: FLEET_REDIS_URL names a database other than 0: a Redis Cluster has only 0")
    return users.pop()


def setup_creates(objects, source):
    """The setup Job's `fleetctl groups create`: {group: [streams]}, and the Jobs' commands."""
    jobs = [o for o in objects if o["kind"] == "Job"]
    commands = [c.get("command", []) for j in jobs
                for c in j["spec"]["template"]["spec"].get("initContainers", []) + j["spec"]["template"]["spec"]["containers"]]

    def flag(cmd, name):
        return cmd[cmd.index(name) + 1] if name in cmd[:-1] else None

    creates = {}
    for c in commands:
        if c[:3] == ["fleetctl", "groups", "create"]:
            streams = [s.strip() for s in (flag(c, "--streams") or "").split(",") if s.strip()]
            creates.setdefault(flag(c, "--group"), []).extend(streams)
    return jobs, commands, creates


def check_shards(objects, creates, source):
    """On a cluster: the streams the setup Job creates (the shards) each have a hash tag, in slots
    of their own, spread evenly over the masters. Returns the shards."""
    shards = sorted({s for streams in creates.values() for s in streams}, key=slot)
    untagged = [s for s in shards if hash_tag(s) is None]
    if untagged:
        fail(f"{source}: stream {untagged[0]} has no hash tag: on a Redis Cluster the keys beside it "
             "and the projector's keys cannot share its slot; name each shard <prefix>:{<tag>} "
             "(`fleetctl shards --stream <prefix> --count N`)")
    by_slot = {}
    for s in shards:
        by_slot.setdefault(slot(s), []).append(s)
    same = [v for v in by_slot.values() if len(v) > 1]
    if same:
        fail(f"{source}: streams {' and '.join(same[0])} share hash slot {slot(same[0][0])}: "
             "they are one shard of the cluster, never on two masters")
    annotations = [j["metadata"].get("annotations", {}).get(MASTERS_ANNOTATION)
                   for j in objects if j["kind"] == "Job"]
    declared = [a for a in annotations if a is not None]
    if not declared or not declared[0].isdigit() or int(declared[0]) < 1:
        fail(f"{source}: the setup Job does not say how many masters the cluster has "
             f"(annotation {MASTERS_ANNOTATION}: \"3\")")
    masters = int(declared[0])
    ranges = master_ranges(masters)
    owner = {s: next(i for i, (lo, hi) in enumerate(ranges) if lo <= slot(s) <= hi) for s in shards}
    counts = [sum(1 for s in shards if owner[s] == i) for i in range(masters)]
    if len(shards) < masters:
        fail(f"{source}: {len(shards)} shards for {masters} masters: some masters serve no "
             "shard; shard the input over at least as many streams as masters")
    if max(counts) - min(counts) > 1:
        busy = counts.index(max(counts))
        fail(f"{source}: the shards' slots do not spread over the {masters} masters "
             f"({'/'.join(map(str, counts))} shards per master; master {busy}, slots "
             f"{ranges[busy][0]}-{ranges[busy][1]}, holds "
             f"{', '.join(s for s in shards if owner[s] == busy)}): name shard i of N with the tag "
             "`fleetctl shards --stream <prefix> --count N` prints")
    ok(f"{source}: {len(shards)} shards, each with a hash tag, spread "
       f"{'/'.join(map(str, counts))} over {masters} masters: "
       + ", ".join(f"{s} (slot {slot(s)}, master {owner[s]})" for s in shards))
    return shards


def check_keys(name, group, items, concrete, config, rules, user, acl, tagged, where):
    """The worker's keys against its Redis ACL user and, where streams have a hash tag (always on
    a cluster), its streams' hash slot: its streams and globs, what the pipeline writes beside
    them, its rate-limit budgets, and every key its actions name. Returns the number of action
    keys checked and the known starts of the streams it writes (history keys)."""
    root_keys = rules[0][0]
    acl_name = os.path.relpath(acl)

    def inside(key, what):
        if not any(covers(p, key) for p in root_keys):
            fail(f"{where}: {what} {key!r} is outside the keys of ACL user {user} "
                 f"({' '.join('~' + p for p in root_keys)}, {acl_name})")

    for item in items:
        if is_glob(item):
            inside(re.split(r"[*?\[\\]", item, maxsplit=1)[0], f"every stream of the glob {item}, starting")
    for st in concrete:
        inside(st, "stream")
        for suffix in BESIDE:
            inside(st + suffix.format(group=group), "key beside a stream")
    budgets = 0
    for rule in config.get("backpressure", []):
        if rule.get("mode") == "rate_limit" and rule.get("scope", "fleet") != "replica":
            inside(budget_prefix(items, group) + rule.get("pattern", ""), "rate-limit budget")
            budgets += 1
    n, writes = 0, []
    for i, pattern, kind, template in action_templates(config):
        parts = parse_template(template)
        if parts is None:
            fail(f"{where}: route[{i}] ({pattern}): {kind} key {template!r} does not parse")
        if tagged:
            why = copartition_refusal(parts, items)
            if why:
                fail(f"{where}: route[{i}] ({pattern}): {kind} key {template!r}: on a Redis Cluster "
                     "every key a route writes must share its stream's hash slot (its effects and "
                     f"XACK are one script): {why} (the projector exits 2)")
        for st in concrete:
            prefix, whole = render_prefix(parts, st)
            n += 1
            inside(prefix, f"{kind} key {template!r} for {st}, starting")
            if kind == "invalidate" and not any(
                    ("del" in cmds or "@all" in cmds) and any(covers(p, prefix) for p in keys)
                    for keys, cmds, _, _ in rules):
                fail(f"{where}: invalidate key {template!r} (starts {prefix!r}): ACL user {user} "
                     f"may not DEL it ({acl_name})")
            if tagged and (hash_tag(prefix) is None and not whole or slot(prefix) != slot(st)):
                fail(f"{where}: route[{i}] ({pattern}): {kind} key {template!r} renders "
                     f"{prefix!r}… for {st}: not in the stream's hash slot ({slot(st)}), so "
                     "Redis Cluster refuses the script (CROSSSLOT)")
            if kind == "history":
                writes.append((prefix, template, st))
    return n, budgets, writes


def check_channels(streams, config, rules, user, acl, where):
    """Every Pub/Sub channel the notifier publishes on (each route's `publish` template, else the
    default) against its ACL user's channel patterns and its PUBLISH (or, on a `sharded` route,
    SPUBLISH) grant. Channels are no keys: PUBLISH reaches every node of a cluster; SPUBLISH the
    master of the channel's slot (no slot is shared with a stream: it is a command of its own)."""
    channels = [p for _, _, chans, _ in rules for p in chans]
    routes = config.get("route") or DEFAULT_ROUTES
    for route in routes:
        command = "spublish" if route.get("sharded") else "publish"
        if not any(command in cmds or "@all" in cmds for _, cmds, _, _ in rules):
            fail(f"{where}: route {route.get('pattern')!r} is {'' if route.get('sharded') else 'not '}"
                 f"sharded, and ACL user {user} may not {command.upper()} ({os.path.relpath(acl)})")
        template = route.get("publish", DEFAULT_CHANNEL)
        parts = parse_template(template)
        if parts is None:
            fail(f"{where}: route {route.get('pattern')!r}: publish template {template!r} does not parse")
        for st in streams:
            prefix, _ = render_prefix(parts, st)
            if any(covers(p, prefix) for p in channels):
                continue
            fail(f"{where}: route {route.get('pattern')!r} publishes on {template!r} (starts "
                 f"{prefix!r}), outside the channels of ACL user {user} "
                 f"({' '.join('&' + p for p in channels) or 'none: resetchannels'}); Redis refuses "
                 "the PUBLISH (NOPERM) and the batch is retried without end")
    return len(routes)


def pre_stop_sleep(container):
    """The seconds of the container's preStop sleep action (0 without one)."""
    return container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)


def check_pod(d, objects, name, where):
    """What every Deployment of the fleet promises: its command is its name, /livez and /readyz
    probes, the drain (its preStop sleep, then FLEET_SHUTDOWN_GRACE_MS) within the grace period,
    FLEET_REDIS_URL from a Secret, non-root with a read-only root filesystem, a memory request and
    limit, a PodDisruptionBudget and a ServiceMonitor. Returns the pod, its container and its env."""
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = env_of(c)
    if c.get("command") != [name]:
        fail(f"{where}: command is {c.get('command')}, not [{name!r}]")
    probes = (c.get("livenessProbe", {}).get("httpGet", {}).get("path"),
              c.get("readinessProbe", {}).get("httpGet", {}).get("path"))
    if probes != ("/livez", "/readyz"):
        fail(f"{where}: probes are {probes}, not /livez and /readyz")
    grace_ms = int(env.get("FLEET_SHUTDOWN_GRACE_MS", {}).get("value", "25000"))
    if pod.get("terminationGracePeriodSeconds", 30) * 1000 <= pre_stop_sleep(c) * 1000 + grace_ms:
        fail(f"{where}: terminationGracePeriodSeconds must exceed the preStop sleep plus FLEET_SHUTDOWN_GRACE_MS")
    if "secretKeyRef" not in env.get("FLEET_REDIS_URL", {}).get("valueFrom", {}):
        fail(f"{where}: FLEET_REDIS_URL does not come from a Secret")
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    if not (psc.get("runAsNonRoot") and csc.get("readOnlyRootFilesystem")
            and csc.get("allowPrivilegeEscalation") is False):
        fail(f"{where}: not non-root, read-only root filesystem, no privilege escalation")
    res = c.get("resources", {})
    if not (res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory")):
        fail(f"{where}: memory request and limit missing")
    kinds = {o["kind"] for o in objects
             if o["kind"] in ("PodDisruptionBudget", "ServiceMonitor") and selects(o, d)}
    if kinds != {"PodDisruptionBudget", "ServiceMonitor"}:
        fail(f"{where}: missing {sorted({'PodDisruptionBudget', 'ServiceMonitor'} - kinds)}")
    return pod, c, env


def selects(o, d):
    """Whether object `o`'s label selector selects the pods of Deployment `d`."""
    labels = d["spec"]["selector"]["matchLabels"]
    sel = o.get("spec", {}).get("selector", {})
    if o["kind"] != "Service":  # a Service's selector is the labels themselves
        sel = sel.get("matchLabels", {})
    return bool(sel) and all(labels.get(k) == v for k, v in sel.items())


def check_worker(d, objects, source, acl, cluster, creates):
    name = d["metadata"]["name"]
    where = f"{source}: Deployment {name}"
    spec = WORKERS.get(name)
    if spec is None:
        fail(f"{where}: not a known worker ({', '.join(list(WORKERS) + [GATEWAY])}): add it to "
             "validate.py's WORKERS")
    pod, c, env = check_pod(d, objects, name, where)
    consumer = env.get("FLEET_CONSUMER", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    if consumer != "metadata.name":
        fail(f"{where}: FLEET_CONSUMER is not the pod name (downward API)")
    if spec["database"] and "secretKeyRef" not in env.get("FLEET_DATABASE_URL", {}).get("valueFrom", {}):
        fail(f"{where}: FLEET_DATABASE_URL does not come from a Secret")
    if not spec["database"] and "FLEET_DATABASE_URL" in env:
        fail(f"{where}: FLEET_DATABASE_URL is set, but the {name} uses no database: "
             "no database credentials in its pod")
    config = worker_config(d, objects, where)
    if spec["actions"] and not any(r.get("actions") for r in config.get("route", [])):
        fail(f"{where}: no route of its FLEET_CONFIG declares actions (the {name} exits 2)")
    items = [st.strip() for st in env.get("FLEET_STREAMS", {}).get("value", "").split(",") if st.strip()]
    if not items:
        fail(f"{where}: FLEET_STREAMS is not set")
    group = env.get("FLEET_GROUP", {}).get("value", name)
    # The streams it reads for certain: the keys it names, and those the setup Job creates for its
    # group (a glob's, which it finds with SCAN); each must be one it reads.
    concrete = list(dict.fromkeys([s for s in items if not is_glob(s)] + creates.get(group, [])))
    for st in concrete:
        if not any(glob_matches(item, st) for item in items):
            fail(f"{where}: the setup Job creates {st} for group {group}, which FLEET_STREAMS "
                 f"({', '.join(items)}) does not read")
    for item in items:
        if is_glob(item) and not any(glob_matches(item, st) for st in concrete):
            fail(f"{where}: the glob {item} matches none of the streams the setup Job creates "
                 f"for group {group} ({', '.join(concrete) or 'none'})")
    if cluster:
        untagged = [s for s in concrete if hash_tag(s) is None]
        if untagged:
            fail(f"{where}: stream {untagged[0]} has no hash tag: on a Redis Cluster the keys "
                 "beside it and the projector's keys cannot share its slot")
    user = redis_user(env["FLEET_REDIS_URL"], objects, where, cluster) or name
    if user != name:
        fail(f"{where}: FLEET_REDIS_URL logs in as {user}, not as its own ACL user {name}")
    rules = acl_user(acl, user, where)
    tagged = cluster or any(hash_tag(s) is not None for s in items)
    keys, budgets, writes = check_keys(name, group, items, concrete, config, rules, user, acl, tagged, where)
    publishes = check_channels(concrete, config, rules, user, acl, where) if spec["publish"] else 0
    scaled = [o for o in objects if o["kind"] == "ScaledObject" and o["spec"]["scaleTargetRef"]["name"] == name]
    if not scaled:
        fail(f"{where}: no ScaledObject")
    triggered = []
    for t in scaled[0]["spec"]["triggers"]:
        m = t["metadata"]
        wanted = "redis-cluster-streams" if cluster else "redis-streams"
        if t["type"] != wanted:
            fail(f"{where}: trigger {t['type']}, not {wanted} (every trigger of the overlay must be "
                 "of one kind: one Redis, or one cluster)")
        if m.get("consumerGroup") != group or "lagCount" not in m or "activationLagCount" not in m:
            fail(f"{where}: the trigger must use lagCount and activationLagCount on group {group}")
        if not any(glob_matches(item, m.get("stream", "")) for item in items):
            fail(f"{where}: the trigger's stream {m.get('stream')} is not one FLEET_STREAMS reads ({', '.join(items)})")
        if m.get("stream") in triggered:
            fail(f"{where}: two triggers on {m.get('stream')}")
        if cluster and not (m.get("addresses") or m.get("hosts")):
            fail(f"{where}: the trigger on {m.get('stream')} names no cluster nodes (addresses)")
        if not all(isinstance(v, str) for v in m.values()):
            fail(f"{where}: trigger metadata values must be strings")
        triggered.append(m.get("stream"))
    if cluster:
        missing = [s for s in concrete if s not in triggered]
        if missing:
            fail(f"{where}: no trigger on {', '.join(missing)}: KEDA scales on the largest lag of "
                 "its triggers, one per shard (redis-cluster-streams reads one stream), so a "
                 "shard without one never scales the worker")
    ok(f"{where}: command, probes, pod-name consumer, grace period, "
       f"{'Redis and PostgreSQL' if spec['database'] else 'Redis only (no database)'} Secret, "
       f"ConfigMap, security, resources, PDB, ServiceMonitor, "
       f"ScaledObject ({len(triggered)} {scaled[0]['spec']['triggers'][0]['type']} trigger"
       f"{'s' if len(triggered) > 1 else ''}{', one per shard' if cluster else ''}), "
       f"keys of {len(concrete)} stream{'s' if len(concrete) > 1 else ''} (and beside them) inside ACL user {user}"
       f" ({os.path.relpath(acl)})"
       + (f", {budgets} rate-limit budget{'s' if budgets > 1 else ''} too" if budgets else "")
       + (f", {keys} action keys inside it and in their stream's hash slot" if spec["actions"] else "")
       + (f", channels inside its channel patterns ({publishes} routes' publish)" if spec["publish"] else ""))
    return {"name": name, "group": group, "items": items, "streams": concrete, "writes": writes,
            "triggered": triggered}


def deployment(objects, name):
    return next((o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name), None)


def check_gateway(d, objects, source, acl, cluster):
    """The gateway's promises (deploy/README.md, "The gateway"): the shared pod checks; no consumer
    settings; its registry name unique per pod; its token secret from a Secret; its routes
    subscribe where the notifier publishes (PUBLISH: it PSUBSCRIBEs) and resume from keys the
    projector writes; its ACL user; its Service, Ingress and KEDA trigger."""
    name = d["metadata"]["name"]
    where = f"{source}: Deployment {name}"
    pod, c, env = check_pod(d, objects, name, where)
    for var in ("FLEET_STREAMS", "FLEET_GROUP", "FLEET_CONSUMER", "FLEET_DATABASE_URL"):
        if var in env:
            fail(f"{where}: {var} is set, but the gateway reads no stream and no database")
    instance = env.get("FLEET_GATEWAY_INSTANCE")
    if instance is not None and instance.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
        fail(f"{where}: FLEET_GATEWAY_INSTANCE is not the pod name (downward API): two pods of one "
             "name share their registry entries, and the drain of one deletes the other's")
    jwt, jwks = env.get("FLEET_GATEWAY_JWT_SECRET"), env.get("FLEET_GATEWAY_JWKS_FILE", {}).get("value")
    if jwt is not None and "secretKeyRef" not in jwt.get("valueFrom", {}):
        fail(f"{where}: FLEET_GATEWAY_JWT_SECRET does not come from a Secret")
    mounts = [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts", [])]
    if jwks and not any(jwks.startswith(m) for m in mounts):
        fail(f"{where}: FLEET_GATEWAY_JWKS_FILE {jwks} is not in a volume mounted in the pod")
    if jwt is None and not jwks and "FLEET_GATEWAY_ANONYMOUS_TOPICS" not in env:
        fail(f"{where}: neither FLEET_GATEWAY_JWT_SECRET, FLEET_GATEWAY_JWKS_FILE nor "
             "FLEET_GATEWAY_ANONYMOUS_TOPICS: every browser would be refused")
    if pre_stop_sleep(c) < 1:
        fail(f"{where}: no preStop sleep: SIGTERM would end the streams while the pod is still an "
             "endpoint of the Service and an upstream of the ingress, and reconnects could come back to it")

    # Its routes, against the notifier's (where it publishes) and the projector's (what it writes).
    config = worker_config(d, objects, where)
    routes = config.get("route", [])
    if not routes:
        fail(f"{where}: its FLEET_CONFIG has no route: the gateway would serve nothing")
    notifier, projector = deployment(objects, "notifier"), deployment(objects, "projector")
    published = {r.get("pattern"): r for r in
                 (worker_config(notifier, objects, where).get("route") or DEFAULT_ROUTES if notifier else [])}
    written = {}
    for _, pattern, kind, template in (action_templates(worker_config(projector, objects, where)) if projector else []):
        written.setdefault((pattern, kind), []).append(template)
    reads, channels = [], []
    for route in routes:
        pattern = route.get("pattern")
        theirs = published.get(pattern)
        if theirs is None:
            fail(f"{where}: route {pattern!r}: the notifier has no route {pattern!r}, so nothing is "
                 "published for it")
        mine = (route.get("publish", DEFAULT_CHANNEL), bool(route.get("sharded")))
        if mine != (theirs.get("publish", DEFAULT_CHANNEL), bool(theirs.get("sharded"))):
            fail(f"{where}: route {pattern!r} subscribes to {mine[0]!r} (sharded {str(mine[1]).lower()}), "
                 f"the notifier publishes on {theirs.get('publish', DEFAULT_CHANNEL)!r} (sharded "
                 f"{str(bool(theirs.get('sharded'))).lower()}): give both files the same")
        if mine[1]:
            fail(f"{where}: route {pattern!r} is published with SPUBLISH (sharded): the gateway "
                 "subscribes by pattern (PSUBSCRIBE) and gets none of its events; publish it with "
                 "PUBLISH (sharded = false) in the notifier's file and the gateway's")
        channels.append(mine[0])
        for kind, template in (route.get("gateway") or {}).items():
            parts = parse_template(template) if kind in ("history", "latest") else None
            if parts is None:
                fail(f"{where}: route {pattern!r}: gateway.{kind} = {template!r}: not a history or "
                     "latest template that parses")
            named = [text for k, text in parts if k == "ph" and not re.fullmatch(r"channel(\[\d+\])?", text)]
            if named:
                fail(f"{where}: route {pattern!r}: gateway.{kind} {template!r} names {{{named[0]}}}: a "
                     "gateway names keys from the topic alone ({channel}, {channel[N]}), it exits 2"
                     + ("; on a Redis Cluster the projector's keys carry the stream's {tag}, which no "
                        "topic names: leave the gateway table out (no resume)" if cluster else ""))
            if template not in written.get((pattern, kind), []):
                fail(f"{where}: route {pattern!r}: gateway.{kind} {template!r} is no {kind} key of the "
                     f"projector's route {pattern!r} ({', '.join(written.get((pattern, kind), [])) or 'none'}): "
                     "a resume would read a key nothing writes")
            reads.append((kind, template, parts))

    # Its ACL user: subscribes to anything, publishes nothing, reads those keys, writes its registry.
    user = redis_user(env["FLEET_REDIS_URL"], objects, where, cluster) or name
    if user != name:
        fail(f"{where}: FLEET_REDIS_URL logs in as {user}, not as its own ACL user {name}")
    rules = acl_user(acl, user, where)
    root, acl_name = rules[0], os.path.relpath(acl)
    if "*" not in root[2]:
        fail(f"{where}: ACL user {user} may subscribe to {' '.join('&' + p for p in root[2]) or 'no channel'} "
             f"({acl_name}): the gateway PSUBSCRIBEs one pattern per topic (e.g. "
             f"{render_prefix(parse_template(channels[0]), '')[0]}flow.42.progress), which Redis compares "
             "literally with the user's & patterns; only allchannels admits them")
    cmds = set().union(*(r[1] for r in rules))
    if cmds & {"publish", "spublish", "@all"}:
        fail(f"{where}: ACL user {user} may publish ({acl_name}): with every channel readable, it "
             "must publish on none")
    needed = list(GATEWAY_COMMANDS) + [cmd for cmd, kind in (("xrevrange", "history"), ("hgetall", "latest"))
                                       if any(k == kind for k, _, _ in reads)]
    missing = [cmd for cmd in needed if cmd not in cmds]
    if missing:
        fail(f"{where}: ACL user {user} may not run {', '.join(missing)} ({acl_name})")
    for kind, template, parts in reads:
        if not key_access(root, template_key(parts), "R"):
            fail(f"{where}: gateway.{kind} key {template!r}: ACL user {user} may not read every key "
                 f"it names ({acl_name})")
    registry = env.get("FLEET_GATEWAY_REGISTRY_KEY", {}).get("value", GATEWAY_REGISTRY)
    for key in (registry, registry + ":\0"):
        if not key_access(root, key, "W"):
            fail(f"{where}: registry key {key.replace(chr(0), '<instance>')!r}: ACL user {user} may not "
                 f"write it ({acl_name})")

    # Its Service (no affinity), its Ingress (/events alone, what a stream needs), its scaling.
    services = [o for o in objects if o["kind"] == "Service" and selects(o, d)
                and any(p.get("targetPort") == "http" for p in o["spec"].get("ports", []))]
    if not services:
        fail(f"{where}: no Service sends traffic to its http port")
    service = services[0]["metadata"]["name"]
    if services[0]["spec"].get("sessionAffinity", "None") != "None":
        fail(f"{where}: Service {service} has session affinity: a browser resumes on any pod, and "
             "affinity sends the reconnects of a stopping pod back to it")
    ingresses = [o for o in objects if o["kind"] == "Ingress" and any(
        p["backend"].get("service", {}).get("name") == service
        for r in o["spec"].get("rules", []) for p in r.get("http", {}).get("paths", []))]
    if not ingresses:
        fail(f"{where}: no Ingress routes to Service {service}")
    ingress = ingresses[0]
    paths = [p["path"] for r in ingress["spec"]["rules"] for p in r.get("http", {}).get("paths", [])
             if p["backend"].get("service", {}).get("name") == service]
    if paths != ["/events"] * len(paths):
        fail(f"{where}: Ingress {ingress['metadata']['name']} routes {', '.join(paths)} to the "
             "gateway: only /events (/metrics, /livez and /readyz share its port)")
    ann = ingress["metadata"].get("annotations", {})
    keepalive_s = int(env.get("FLEET_GATEWAY_KEEPALIVE_MS", {}).get("value", "15000")) / 1000
    wanted = {"proxy-buffering": "off", "proxy-http-version": "1.1"}
    for key, value in wanted.items():
        if ann.get(NGINX + key) != value:
            fail(f"{where}: Ingress {ingress['metadata']['name']}: {NGINX}{key} is "
                 f"{ann.get(NGINX + key)!r}, not {value!r}")
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        value = ann.get(NGINX + key, "")
        if not value.isdigit() or int(value) < 2 * keepalive_s:
            fail(f"{where}: Ingress {ingress['metadata']['name']}: {NGINX}{key} is {value or 'unset'}: "
                 f"at least twice the keep-alive interval ({keepalive_s:g} s, FLEET_GATEWAY_KEEPALIVE_MS), "
                 "or nginx cuts idle streams")
    for key in ("enable-cors", "affinity"):
        if NGINX + key in ann:
            fail(f"{where}: Ingress {ingress['metadata']['name']}: {NGINX}{key}: "
                 + ("the gateway answers CORS itself (FLEET_GATEWAY_CORS_ORIGINS)" if key == "enable-cors"
                    else "no affinity: a browser resumes on any pod"))
    scaled = [o for o in objects if o["kind"] == "ScaledObject" and o["spec"]["scaleTargetRef"]["name"] == name]
    if not scaled:
        fail(f"{where}: no ScaledObject")
    triggers = scaled[0]["spec"]["triggers"]
    namespace = d["metadata"].get("namespace", "default")
    query = triggers[0]["metadata"].get("query", "") if len(triggers) == 1 else ""
    if [t["type"] for t in triggers] != ["prometheus"] or "fleet_gateway_connections" not in query:
        fail(f"{where}: its ScaledObject must have one prometheus trigger whose query sums "
             "fleet_gateway_connections (it has no consumer group, hence no lag), not "
             + ", ".join(f"{t['type']} {t['metadata'].get('query', '')!r}".strip() for t in triggers))
    for label, value in (("namespace", namespace), ("job", services[0]["metadata"]["name"])):
        if not re.search(rf'{label}\s*=\s*"{re.escape(value)}"', query):
            fail(f"{where}: the trigger's query {query!r} does not select {label}=\"{value}\": it "
                 "would scale on another deployment's connections, or none")
    if not triggers[0]["metadata"].get("threshold", "").isdigit():
        fail(f"{where}: the trigger's threshold (connections per pod) must be a whole number, as a string")
    if scaled[0]["spec"].get("minReplicaCount", 0) < 2:
        fail(f"{where}: minReplicaCount below 2: a stopping pod's browsers need another pod to go to")
    ok(f"{where}: command, probes, preStop sleep {pre_stop_sleep(c)} s and grace period, Redis "
       f"and token Secrets, ConfigMap, security, resources, PDB, ServiceMonitor; {len(routes)} "
       f"route{'s' if len(routes) > 1 else ''} subscribed where the notifier publishes (PUBLISH), "
       + (f"{len(reads)} resume key{'s' if len(reads) > 1 else ''} the projector writes"
          if reads else "no resume (no gateway table)")
       + f"; ACL user {user} ({acl_name}): every channel, no publish, "
       + ("reads its resume keys, " if reads else "")
       + f"writes its registry {registry}; Service {service} without affinity; Ingress "
       f"{ingress['metadata']['name']} on /events (buffering off, timeouts "
       f"{ann[NGINX + 'proxy-read-timeout']} s >= 2 x {keepalive_s:g} s keep-alive, HTTP/1.1); "
       f"ScaledObject on fleet_gateway_connections ({triggers[0]['metadata']['threshold']} per pod, "
       f"{scaled[0]['spec']['minReplicaCount']} to {scaled[0]['spec'].get('maxReplicaCount', 100)} pods)")


def env_flag(env, name, default):
    value = env.get(name, {}).get("value")
    return default if value is None else value.strip().lower() in ("1", "t", "true")


def check_redis_exporter(d, objects, source, acl, cluster, creates):
    """redis_exporter's promises (deploy/README.md, "Redis: what the fleet needs and how it is
    watched"; deploy/redis/README.md):
    see the module's docstring."""
    where = f"{source}: Deployment {REDIS_EXPORTER}"
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = env_of(c)
    namespace = d["metadata"].get("namespace", "default")
    image = c.get("image", "")
    if not REDIS_EXPORTER_IMAGE.match(image) or ":" not in image.rsplit("/", 1)[-1] and "@" not in image:
        fail(f"{where}: image {image!r} is not oliver006/redis_exporter pinned to a release (vX.Y.Z): "
             "a new release may send commands its ACL user does not grant, or rename the metrics the alerts use")
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    if not (psc.get("runAsNonRoot") and csc.get("readOnlyRootFilesystem")
            and csc.get("allowPrivilegeEscalation") is False):
        fail(f"{where}: not non-root, read-only root filesystem, no privilege escalation")
    res = c.get("resources", {})
    if not (res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory")):
        fail(f"{where}: memory request and limit missing")
    if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/health":
        fail(f"{where}: no liveness probe on /health")
    # Where and as whom it logs in.
    ref = env.get("REDIS_PASSWORD", {}).get("valueFrom", {}).get("secretKeyRef")
    if not ref or env.get("REDIS_PASSWORD", {}).get("value") is not None:
        fail(f"{where}: REDIS_PASSWORD does not come from a Secret")
    secret_value(ref, objects, where)
    addr = urlsplit(env.get("REDIS_ADDR", {}).get("value", "redis://localhost:6379"))
    if addr.username or addr.password:
        fail(f"{where}: REDIS_ADDR carries credentials: the user is REDIS_USER, the password the Secret's "
             "(on a cluster, /scrape logs in to each node with them, not with the seed's URL)")
    if addr.path.strip("/") not in ("",):
        fail(f"{where}: REDIS_ADDR names a database: the fleet's keys are in database 0")
    user = env.get("REDIS_USER", {}).get("value")
    if user != REDIS_EXPORTER:
        fail(f"{where}: REDIS_USER is {user!r}, not its own ACL user {REDIS_EXPORTER}")
    hosts = set()
    for w in (o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] in WORKERS):
        seeds = redis_seeds(env_of(w["spec"]["template"]["spec"]["containers"][0]).get("FLEET_REDIS_URL", {}),
                            objects, where) or []
        hosts |= {(u.hostname, u.port or 6379) for u in seeds}
    if hosts and (addr.hostname, addr.port or 6379) not in hosts:
        fail(f"{where}: REDIS_ADDR {addr.hostname}:{addr.port or 6379} is not a Redis the workers use "
             f"({', '.join(sorted(f'{h}:{p}' for h, p in hosts))})")
    # What it sends, against what its user may run.
    keys = [k.strip() for k in env.get("REDIS_EXPORTER_CHECK_SINGLE_KEYS", {}).get("value", "").split(",") if k.strip()]
    needed = set(REDIS_EXPORTER_ALWAYS)
    if env_flag(env, "REDIS_EXPORTER_SET_CLIENT_NAME", True):
        needed.add("client|setname")
    if env.get("REDIS_EXPORTER_CONFIG_COMMAND", {}).get("value", "CONFIG") != "-":
        needed.add("config|get")
    if not env_flag(env, "REDIS_EXPORTER_EXCLUDE_LATENCY_HISTOGRAM_METRICS", False):
        needed |= {"latency|latest", "latency|histogram"}
    if env_flag(env, "REDIS_EXPORTER_PING_ON_CONNECT", False):
        needed.add("ping")
    if keys:
        needed |= {"type", "memory|usage", "xlen"} | (set() if cluster else {"select"})
    for unsupported in ("REDIS_EXPORTER_CHECK_KEYS", "REDIS_EXPORTER_CHECK_STREAMS", "REDIS_EXPORTER_CHECK_SINGLE_STREAMS",
                        "REDIS_EXPORTER_COUNT_KEYS", "REDIS_EXPORTER_CHECK_KEY_GROUPS", "REDIS_EXPORTER_SCRIPT",
                        "REDIS_EXPORTER_EXPORT_CLIENT_LIST", "REDIS_EXPORTER_INCL_CONFIG_METRICS"):
        if env.get(unsupported, {}).get("value") not in (None, "", "false"):
            fail(f"{where}: {unsupported} makes it send commands (SCAN, XINFO, EVAL, CLIENT LIST, CONFIG GET) "
                 "or read key contents its ACL user is not meant to: grant them in the ACL files and teach "
                 "this check, or leave it unset")
    scrape = not env_flag(env, "REDIS_EXPORTER_DISABLE_SCRAPE_ENDPOINT", False)
    if cluster:
        if not env_flag(env, "REDIS_EXPORTER_IS_CLUSTER", False):
            fail(f"{where}: REDIS_EXPORTER_IS_CLUSTER is not true: no /discover-cluster-nodes, and "
                 "one node alone would be watched")
        if not scrape:
            fail(f"{where}: REDIS_EXPORTER_DISABLE_SCRAPE_ENDPOINT is true: Prometheus scrapes every "
                 "node through /scrape")
        needed |= {"cluster|info", "cluster|slots", "cluster|nodes", "asking"}
    elif scrape:
        fail(f"{where}: /scrape is on (REDIS_EXPORTER_DISABLE_SCRAPE_ENDPOINT): on one Redis nothing "
             "scrapes it, and it connects wherever it is told to with its user's password")
    rules = acl_user(acl, REDIS_EXPORTER, where)
    root_keys, granted, channels, partial = rules[0]
    if "@all" in granted or len(rules) > 1:
        fail(f"{where}: ACL user {REDIS_EXPORTER} grants @all or has selectors: grant its commands one by one")
    missing = needed - granted
    if missing:
        fail(f"{where}: it sends {', '.join(sorted(c.upper() for c in missing))}, which ACL user "
             f"{REDIS_EXPORTER} ({os.path.relpath(acl)}) does not grant: a NOPERM and an ACL LOG entry "
             "every scrape, and the figures it needs missing")
    extra = granted - needed - REDIS_EXPORTER_HARMLESS
    if extra:
        fail(f"{where}: ACL user {REDIS_EXPORTER} ({os.path.relpath(acl)}) grants "
             f"{', '.join(sorted(c.upper() for c in extra))}, which it does not send: least privilege")
    if root_keys or any("W" in perms for perms, _ in partial) or channels:
        fail(f"{where}: ACL user {REDIS_EXPORTER} may write keys or use channels: it reads sizes only "
             "(%R~ patterns, resetchannels)")
    streams = sorted({st for group in creates.values() for st in group})
    for key in keys:
        if not key_access(rules[0], key, "R"):
            fail(f"{where}: REDIS_EXPORTER_CHECK_SINGLE_KEYS names {key}, which ACL user {REDIS_EXPORTER} "
                 f"({os.path.relpath(acl)}) may not read")
        if key not in streams and key.removesuffix(":dlq") not in streams:
            fail(f"{where}: REDIS_EXPORTER_CHECK_SINGLE_KEYS names {key}, neither a stream the setup Job "
                 "creates nor its dead letters")
    unreported = [st for st in streams if st not in keys]
    if unreported:
        fail(f"{where}: REDIS_EXPORTER_CHECK_SINGLE_KEYS leaves out {', '.join(unreported)}: the "
             "dashboard's stream memory would miss them")
    # How Prometheus scrapes it: job = the Service's name, which the Redis alerts select.
    port = next((p for p in c.get("ports", []) if p.get("name") == "metrics"), None)
    services = [o for o in objects if o["kind"] == "Service" and selects(o, d)]
    if not port or [s["metadata"]["name"] for s in services] != [REDIS_EXPORTER]:
        fail(f"{where}: needs a port `metrics` and one Service named {REDIS_EXPORTER} (the job the "
             "Redis alerts select)")
    service_port = next((p["port"] for p in services[0]["spec"]["ports"] if p.get("name") == "metrics"), None)
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"
                and all(services[0]["metadata"].get("labels", {}).get(k) == v
                        for k, v in o["spec"].get("selector", {}).get("matchLabels", {"": None}).items())]
    scrapes = [o for o in objects if o["kind"] == "ScrapeConfig"]
    def seconds(text):
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", str(text).strip())
        return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)] if m else None
    timeout = seconds(env.get("REDIS_EXPORTER_CONNECTION_TIMEOUT", {}).get("value", "15s"))
    scrape_timeouts = [seconds(e.get("scrapeTimeout", "10s")) for o in monitors for e in o["spec"]["endpoints"]]
    scrape_timeouts += [seconds(o["spec"].get("scrapeTimeout", "10s")) for o in scrapes]
    if timeout is None or any(t is None or timeout >= t for t in scrape_timeouts):
        fail(f"{where}: REDIS_EXPORTER_CONNECTION_TIMEOUT must be shorter than the scrape timeout: a "
             "Redis that does not answer would fail the scrape (up 0) instead of redis_up 0")
    if cluster:
        if monitors:
            fail(f"{where}: a ServiceMonitor scrapes its /metrics on a cluster: one node, twice")
        url = f"http://{REDIS_EXPORTER}.{namespace}.svc:{service_port}/discover-cluster-nodes"
        address = f"{REDIS_EXPORTER}.{namespace}.svc:{service_port}"
        found = None
        for o in scrapes:
            if any(h.get("url") == url for h in o["spec"].get("httpSDConfigs", [])):
                found = o
        if not found:
            fail(f"{where}: no ScrapeConfig discovers the nodes from {url}")
        spec = found["spec"]
        sets = {r.get("targetLabel"): (tuple(r.get("sourceLabels", [])), r.get("replacement"))
                for r in spec.get("relabelings", []) if r.get("action", "replace") == "replace"}
        expected = {"__param_target": (("__address__",), None), "instance": (("__param_target",), None),
                    "__address__": ((), address), "job": ((), REDIS_EXPORTER), "namespace": ((), namespace)}
        wrong = [label for label, value in expected.items() if sets.get(label) != value]
        if spec.get("metricsPath") != "/scrape" or wrong:
            fail(f"{where}: ScrapeConfig {found['metadata']['name']} must scrape /scrape with the "
                 f"discovered node as target and instance, through {address}, as job {REDIS_EXPORTER} "
                 f"in namespace {namespace} (wrong: {', '.join(wrong) or 'metricsPath'})")
        how = (f"ScrapeConfig {found['metadata']['name']}: every node discovered from {url}, scraped "
               f"through /scrape as job {REDIS_EXPORTER}")
    else:
        if len(monitors) != 1 or scrapes:
            fail(f"{where}: one ServiceMonitor must scrape its Service (and no ScrapeConfig)")
        instance = [r.get("replacement") for e in monitors[0]["spec"]["endpoints"]
                    for r in e.get("relabelings", []) if r.get("targetLabel") == "instance"]
        if instance != [env.get("REDIS_ADDR", {}).get("value")]:
            fail(f"{where}: the ServiceMonitor's `instance` ({instance}) is not REDIS_ADDR: the alerts "
                 "name the Redis server by it")
        how = f"ServiceMonitor {monitors[0]['metadata']['name']} on /metrics, instance {instance[0]}, /scrape off"
    ok(f"{where}: {image}, non-root, password from a Secret, REDIS_ADDR {addr.hostname}:{addr.port or 6379} "
       f"(the workers' Redis) as ACL user {REDIS_EXPORTER} ({os.path.relpath(acl)}) granted exactly what "
       f"it sends ({len(needed)} commands), sizes of {len(keys)} keys read-only; {how}")


def cron_field(text, lo, hi):
    """The values of one field of a cron schedule (`*`, `*/N`, `A`, `A-B`, `A-B/N`, lists of
    them); None if it uses what this check does not read (names, `?`, `L`, `W`, `#`)."""
    out = set()
    for part in text.split(","):
        m = re.fullmatch(r"(\*|\d+)(?:-(\d+))?(?:/(\d+))?", part)
        if not m or (m.group(1) == "*" and m.group(2)):
            return None
        first = lo if m.group(1) == "*" else int(m.group(1))
        last = hi if m.group(1) == "*" else int(m.group(2) or (hi if m.group(3) else first))
        step = int(m.group(3) or 1)
        if not lo <= first <= last <= hi or step < 1:
            return None
        out.update(range(first, last + 1, step))
    return out


def cron_interval(schedule):
    """The shortest time in seconds between two runs of a cron schedule, over a week (the day of
    the month and the month must be `*`); None if this check cannot tell."""
    macros = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0"}
    fields = macros.get(schedule.strip(), schedule).split()
    if len(fields) != 5 or fields[2] != "*" or fields[3] != "*":
        return None
    minutes, hours, days = cron_field(fields[0], 0, 59), cron_field(fields[1], 0, 23), cron_field(fields[4], 0, 7)
    if not minutes or not hours or not days:
        return None
    days = {d % 7 for d in days}
    runs = [((d * 24 + h) * 60 + m) * 60 for d in sorted(days) for h in sorted(hours) for m in sorted(minutes)]
    week = 7 * 86400
    return min((b - a) % week or week for a, b in zip(runs, runs[1:] + runs[:1]))


assert cron_interval("*/10 * * * *") == 600 and cron_interval("5 * * * *") == 3600
assert cron_interval("0,50 * * * *") == 600 and cron_interval("0 3 * * 1") == 7 * 86400


def retention_rules(config, where):
    """The `[[retention]]` rules of a parsed FLEET_CONFIG, held to what fleetctl's own parser
    (shared/src/runtime/config.rs) accepts: at least one, each naming streams and setting
    max_age_s or max_len, no unknown field."""
    unknown = set(config) - CONFIG_TABLES
    if unknown:
        fail(f"{where}: unknown table {', '.join(sorted(unknown))} (fleetctl exits 2: its file takes "
             f"{', '.join(sorted(CONFIG_TABLES))})")
    rules = config.get("retention")
    if not isinstance(rules, list) or not rules:
        fail(f"{where}: no [[retention]] rule: `fleetctl trim` exits 2 and trims nothing")
    for i, r in enumerate(rules):
        name = f"retention[{i}] ({r.get('streams')})"
        if set(r) - RETENTION_FIELDS:
            fail(f"{where}: {name}: unknown field {', '.join(sorted(set(r) - RETENTION_FIELDS))} "
                 f"(a rule takes {', '.join(sorted(RETENTION_FIELDS))}; fleetctl exits 2)")
        if not isinstance(r.get("streams"), str) or not r["streams"].strip():
            fail(f"{where}: retention[{i}].streams must name streams (a key or a glob)")
        if "max_age_s" not in r and "max_len" not in r:
            fail(f"{where}: {name} sets neither max_age_s nor max_len: it would trim nothing "
                 "(fleetctl exits 2)")
        for field, top in (("max_age_s", MAX_TTL_S), ("max_len", None)):
            value = r.get(field)
            if value is not None and (type(value) is not int or value < 1 or top and value > top):
                fail(f"{where}: {name}.{field} is {value!r}: a whole number from 1"
                     + (f" to {top} (ten years)" if top else ""))
        if type(r.get("cut_unread", False)) is not bool:
            fail(f"{where}: {name}.cut_unread must be true or false")
    return rules


def rule_matches(rule, key):
    """Whether a retention rule applies to `key`, as `fleetctl trim` resolves it: a named key is
    itself (TYPE), a glob is SCAN MATCH (dead letter streams included). A NUL in `key` stands
    for any text (a template's placeholder), which only a glob's `*` covers."""
    streams = rule["streams"].strip()
    return glob_matches(streams, key) if is_glob(streams) else streams == key


def first_rule(rules, key):
    return next((i for i, r in enumerate(rules) if rule_matches(r, key)), None)


def rule_access(acl_rule, streams, perm):
    """Whether an ACL rule grants `perm` on every key a retention rule's `streams` names: a named
    key; a glob whose wildcards are `*` (each as a NUL, see key_access); another glob only through
    a pattern that is the same glob."""
    streams = streams.strip()
    if not is_glob(streams):
        return key_access(acl_rule, streams, perm)
    keys, _, _, partial = acl_rule
    if streams in keys + [p for perms, p in partial if perm in perms]:
        return True
    return not re.search(r"[?\[\\]", streams) and key_access(acl_rule, streams.replace("*", "\0"), perm)


def render_key(parts, stream):
    """The key a template renders for an event of `stream`, a NUL for each part that depends on
    the event (see render_prefix)."""
    out = ""
    for kind, text in parts:
        if kind == "lit":
            out += text
        elif text == "stream":
            out += stream
        elif text == "tag":
            out += "{" + (hash_tag(stream) or stream) + "}"
        else:
            out += "\0"
    return out


def check_retention(objects, source, acl, cluster, creates):
    """The retention CronJob's promises (deploy/README.md, "Retention"): one CronJob runs
    `fleetctl trim` (not a dry run) on a schedule, never two at once (Forbid), each run started
    within its deadline, ended before the next is due, retried a bounded number of times and
    failed at once on a configuration error, the last runs kept for their logs; the workers'
    image, non-root, read-only, with memory bounds, no database credentials; its rules from a
    mounted ConfigMap that fleetctl parses; every stream the setup Job creates and its dead
    letters under a rule, every rule applying to some stream of the deployment; its ACL user
    `retention` granted exactly what trim sends for these rules, on the keys the rules name and no
    other; and `operator` able to dry-run it."""
    crons = [o for o in objects if o["kind"] == "CronJob" and any(
        c.get("command", [])[:2] == ["fleetctl", "trim"]
        for c in o["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"])]
    if len(crons) != 1:
        fail(f"{source}: {len(crons) or 'no'} CronJob{'s' if len(crons) > 1 else ''} running `fleetctl trim`: "
             "one must apply the [[retention]] rules (nothing else trims the streams; two would race)")
    cron = crons[0]
    where = f"{source}: CronJob {cron['metadata']['name']}"
    spec = cron["spec"]
    job = spec["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    c = next(c for c in pod["containers"] if c.get("command", [])[:2] == ["fleetctl", "trim"])
    cmd = c["command"]
    env = env_of(c)

    # When and how it runs.
    if spec.get("concurrencyPolicy") != "Forbid":
        fail(f"{where}: concurrencyPolicy is {spec.get('concurrencyPolicy', 'Allow')!r}, not Forbid: "
             "two trims at once would read and trim the same streams side by side")
    if spec.get("suspend"):
        fail(f"{where}: suspended: nothing trims the streams")
    interval = cron_interval(spec.get("schedule", ""))
    if interval is None:
        fail(f"{where}: schedule {spec.get('schedule')!r}: give minutes, hours and days of the week "
             "in numbers (`*/10 * * * *`), the day of the month and the month `*`")
    start = spec.get("startingDeadlineSeconds")
    if type(start) is not int or not 10 <= start <= interval:
        fail(f"{where}: startingDeadlineSeconds is {start if start is not None else 'unset'}: from 10 (the controller looks every 10 s) "
             f"to the schedule's interval ({interval} s): without it a CronJob that missed more than 100 "
             "schedules (its controller down, the CronJob suspended) never starts again, and a run "
             "may start late next to the following one")
    active = job.get("activeDeadlineSeconds")
    if type(active) is not int or active >= interval:
        fail(f"{where}: activeDeadlineSeconds is {active}: it must end a run (retries included) before "
             f"the next is due ({interval} s), or a run hung on Redis makes every later one skip (Forbid)")
    backoff = job.get("backoffLimit")
    if type(backoff) is not int or not 0 <= backoff <= 6:
        fail(f"{where}: backoffLimit is {backoff}: set it (0 to 6): the next run retries anyway")
    history = (spec.get("successfulJobsHistoryLimit"), spec.get("failedJobsHistoryLimit"))
    if any(type(h) is not int for h in history) or history[1] < 1:
        fail(f"{where}: successfulJobsHistoryLimit and failedJobsHistoryLimit are {history}: set both, "
             "and keep at least one failed Job, whose log says why")
    if pod.get("restartPolicy") != "Never":
        fail(f"{where}: restartPolicy is {pod.get('restartPolicy')!r}, not Never: each attempt a pod "
             "of its own, whose log stays readable (and what podFailurePolicy needs)")
    fails_on_config = any(
        r.get("action") == "FailJob" and r.get("onExitCodes", {}).get("operator") == "In"
        and 2 in r["onExitCodes"].get("values", []) and r["onExitCodes"].get("containerName", c["name"]) == c["name"]
        for r in job.get("podFailurePolicy", {}).get("rules", []))
    if not fails_on_config:
        fail(f"{where}: no podFailurePolicy rule fails the Job on exit code 2 (a configuration error): "
             "it would be retried backoffLimit times for nothing")

    # The pod.
    if "--dry-run" in cmd:
        fail(f"{where}: `fleetctl trim --dry-run` trims nothing")
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    if not (psc.get("runAsNonRoot") and csc.get("readOnlyRootFilesystem")
            and csc.get("allowPrivilegeEscalation") is False):
        fail(f"{where}: not non-root, read-only root filesystem, no privilege escalation")
    res = c.get("resources", {})
    if not (res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory")):
        fail(f"{where}: memory request and limit missing")
    persister = deployment(objects, "persister")
    image = persister["spec"]["template"]["spec"]["containers"][0]["image"] if persister else None
    if image and c.get("image") != image:
        fail(f"{where}: image {c.get('image')!r} is not the workers' ({image!r}): one release, one image")
    if "FLEET_DATABASE_URL" in env:
        fail(f"{where}: FLEET_DATABASE_URL is set, but trim uses no database: no database credentials "
             "in its pod")
    if "secretKeyRef" not in env.get("FLEET_REDIS_URL", {}).get("valueFrom", {}):
        fail(f"{where}: FLEET_REDIS_URL does not come from a Secret")
    path = next((a.split("=", 1)[1] for a in cmd if a.startswith("--config=")), None)
    if path is None and "--config" in cmd[:-1]:
        path = cmd[cmd.index("--config") + 1]
    if path is None:
        path = env.get("FLEET_CONFIG", {}).get("value", "")
    rules = retention_rules(mounted_config(pod, c, path, objects, where), f"{where}: {path}")

    # What the rules reach: the streams the setup Job creates and their dead letters (each must
    # have a rule), the projector's histories (bounded by their maxlen and ttl_s anyway).
    streams = sorted({st for group in creates.values() for st in group})
    covered = {}
    for key in streams + [st + ":dlq" for st in streams]:
        i = first_rule(rules, key)
        if i is None:
            fail(f"{where}: no [[retention]] rule matches {key}: it keeps every entry until Redis is "
                 "full (name it, or a glob that matches it)")
        covered[key] = i
    projector = deployment(objects, "projector")
    histories = set()
    for _, _, kind, template in (action_templates(worker_config(projector, objects, where)) if projector else []):
        parts = parse_template(template) if kind == "history" else None
        histories |= {render_key(parts, st) for st in streams} if parts else set()
    for key in sorted(histories):
        i = first_rule(rules, key)
        if i is not None:
            covered[key] = i
    known = ", ".join(k.replace(chr(0), "…") for k in streams + [st + ":dlq" for st in streams] + sorted(histories))
    for i, r in enumerate(rules):
        if i in covered.values():
            continue
        taken = [(k, covered[k]) for k in covered if rule_matches(r, k)]
        if taken:
            key, j = taken[0]
            fail(f"{where}: retention[{i}] ({r['streams']}) applies to no stream: "
                 f"{key.replace(chr(0), '…')} matches it, but retention[{j}] ({rules[j]['streams']}) "
                 "comes first, and a stream's rule is the first that matches it: put the narrower rule first")
        fail(f"{where}: retention[{i}] ({r['streams']}) matches none of the deployment's streams "
             f"({known}): a typo?")

    # Its ACL user: exactly what trim sends for these rules, on the keys they name.
    user = redis_user(env["FLEET_REDIS_URL"], objects, where, cluster) or RETENTION
    if user != RETENTION:
        fail(f"{where}: FLEET_REDIS_URL logs in as {user}, not as its own ACL user {RETENTION}")
    acl_name = os.path.relpath(acl)
    acl_rules = acl_user(acl, user, where)
    root_keys, granted, channels, partial = acl_rules[0]
    if "@all" in granted or len(acl_rules) > 1:
        fail(f"{where}: ACL user {user} grants @all or has selectors: grant its commands one by one")
    if channels or partial:
        fail(f"{where}: ACL user {user} ({acl_name}) has channels or %R~/%W~ key patterns: it uses no "
             "channel, and reads and trims the same keys (~ patterns)")
    named = [r for r in rules if not is_glob(r["streams"].strip())]
    needed = set(RETENTION_ALWAYS)
    needed |= {"type"} if named else set()
    needed |= {"scan"} if len(named) < len(rules) else set()
    needed |= {"xrange"} if any("max_len" in r for r in rules) else set()
    needed |= {"cluster|slots", "ping"} if cluster else set()
    missing = needed - granted
    if missing:
        fail(f"{where}: trim sends {', '.join(sorted(m.upper() for m in missing))}, which ACL user {user} "
             f"({acl_name}) does not grant: NOPERM, the run fails at the first stream and trims none after it")
    extra = granted - needed - RETENTION_HARMLESS
    if extra:
        fail(f"{where}: ACL user {user} ({acl_name}) grants {', '.join(sorted(e.upper() for e in extra))}, "
             "which trim does not send for these rules: least privilege")
    for r in rules:
        for perm in ("R", "W"):
            if not rule_access(acl_rules[0], r["streams"], perm):
                fail(f"{where}: rule {r['streams']!r}: ACL user {user} may not "
                     f"{'read' if perm == 'R' else 'trim (a write)'} every key it names "
                     f"({' '.join('~' + p for p in root_keys)}, {acl_name}): add `~{r['streams'].strip()}`")
    wide = [p for p in root_keys if p not in {r["streams"].strip() for r in rules}]
    if wide:
        fail(f"{where}: ACL user {user} ({acl_name}) has key pattern ~{wide[0]}, which is no rule's "
             "`streams`: least privilege, its patterns are the rules' keys and globs")
    # An engineer's dry run, as `operator`: every read, no XTRIM.
    operator = acl_users(acl).get(OPERATOR)
    if operator:
        lacking = sorted(m.upper() for m in needed - {"xtrim"} - RETENTION_HARMLESS - operator[0][1])
        unreadable = [r["streams"] for r in rules if not rule_access(operator[0], r["streams"], "R")]
        if lacking or unreadable:
            fail(f"{where}: ACL user {OPERATOR} ({acl_name}) cannot run `fleetctl trim --dry-run` "
                 "(deploy/README.md, \"Retention\"): "
                 + "; ".join(x for x in (f"it may not run {', '.join(lacking)}" if lacking else None,
                                         f"it may not read the keys of {', '.join(unreadable)}" if unreadable else None) if x))

    def span(seconds):
        for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
            if seconds % size == 0:
                return f"{seconds // size} {unit}"
        return f"{seconds} s"

    def caps(i, r):
        out = [f"max_age {span(r['max_age_s'])}" if "max_age_s" in r else None,
               f"max_len {r['max_len']:,}".replace(",", " ") if "max_len" in r else None,
               ("cut_unread" if r.get("cut_unread") else "never past a group's unsettled entries")
               if any(covered.get(st) == i for st in streams) else None]
        return ", ".join(x for x in out if x)

    ok(f"{where}: {spec['schedule']} (every {interval // 60} min), Forbid, started within {start} s, "
       f"ended within {active} s, backoffLimit {backoff} (exit 2 fails it at once), history "
       f"{history[0]}/{history[1]}; the workers' image, non-root, read-only, memory bounds, no database; "
       f"`fleetctl trim --config {path}` ({len(rules)} rules): "
       + "; ".join(f"{r['streams']} ({caps(i, r)})" for i, r in enumerate(rules))
       + f"; every stream the setup Job creates and its dead letters under a rule"
       + (f", {len(histories)} history key{'s' if len(histories) > 1 else ''} too" if histories else "")
       + f"; ACL user {user} ({acl_name}) granted exactly what trim sends ({len(needed)} commands) on "
       f"the rules' keys only; {OPERATOR} may dry-run it")


def check_globs(workers, source):
    """No worker's FLEET_STREAMS matches a stream another one writes (the projector's histories):
    it would read it as input. Dead letters (`<stream>:dlq`) are never read; the other keys beside
    a stream are no streams (SCAN … TYPE stream skips them)."""
    items = {item for w in workers for item in w["items"]}
    n = 0
    for w in workers:
        for prefix, template, st in w["writes"]:
            n += 1
            for item in items:
                if may_match(prefix, item):
                    fail(f"{source}: the {w['name']}'s history {template!r} (for {st}, starting "
                         f"{prefix!r}) may match FLEET_STREAMS {item}: a worker would read it as input")
    ok(f"{source}: the workers' streams ({', '.join(sorted(items))}) match none of the projector's "
       f"histories ({n} keys checked)"
       + ("; the dead letters a glob matches are never read" if any(map(is_glob, items)) else ""))


def check_setup(objects, workers, creates, commands, acl, cluster, source):
    if ["fleetctl", "migrate"] not in commands:
        fail(f"{source}: no Job running `fleetctl migrate`")
    for w in workers:
        made = set(creates.get(w["group"], []))
        if not made or not set(w["streams"]) <= made:
            fail(f"{source}: no setup Job runs `fleetctl groups create --streams {','.join(w['streams'])} "
                 f"--group {w['group']}` (the {w['name']}'s group; KEDA misreads a missing group)")
    # The setup Job's and KEDA's ACL users reach every stream (and the Job the checkpoints).
    users = []
    for j in (o for o in objects if o["kind"] == "Job"):
        for c in j["spec"]["template"]["spec"]["containers"]:
            var = env_of(c).get("FLEET_REDIS_URL")
            if var and c.get("command", [])[:3] == ["fleetctl", "groups", "create"]:
                users.append((redis_user(var, objects, f"{source}: Job {j['metadata']['name']} container {c['name']}", cluster),
                              [s for s in c["command"][c["command"].index("--streams") + 1].split(",")], True))
    for auth in (o for o in objects if o["kind"] == "TriggerAuthentication"):
        for p in auth["spec"].get("secretTargetRef", []):
            if p.get("parameter") == "username":
                user = secret_value(p, objects, f"{source}: TriggerAuthentication {auth['metadata']['name']}")
                streams = [t["metadata"].get("stream") for o in objects if o["kind"] == "ScaledObject"
                           for t in o["spec"]["triggers"]
                           if t.get("authenticationRef", {}).get("name") == auth["metadata"]["name"]]
                users.append((user, streams, False))
    for user, streams, checkpoints in users:
        if user is None:
            continue
        root_keys = acl_user(acl, user, source)[0][0]
        for st in streams:
            for key in [st] + ([st + ":checkpoints"] if checkpoints else []):
                if not any(covers(p, key) for p in root_keys):
                    fail(f"{source}: {key} is outside the keys of ACL user {user} "
                         f"({' '.join('~' + p for p in root_keys)}, {os.path.relpath(acl)})")
    ok(f"{source}: setup Job migrates and creates the groups of "
       + ", ".join(f"{w['name']} ({w['group']}, {len(w['streams'])} stream{'s' if len(w['streams']) > 1 else ''})" for w in workers)
       + "; the setup and KEDA ACL users reach them")


def check_rules(objects, rules_file, source):
    with open(rules_file) as f:
        groups = yaml.safe_load(f)["groups"]
    rules = [o for o in objects if o["kind"] == "PrometheusRule"]
    if len(rules) != 1 or rules[0]["spec"]["groups"] != groups:
        fail(f"{source}: the PrometheusRule is not {rules_file} (run deploy/check/prometheusrule.py)")
    ok(f"{source}: PrometheusRule holds {rules_file}")


def main():
    modules, rules_file, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    for arg in files:
        source, _, acl = arg.partition("=")
        acl = os.path.abspath(acl) if acl else ACL_FILE
        with open(source) as f:
            objects = [o for o in yaml.safe_load_all(f) if o]
        custom = []
        for o in objects:
            if o["apiVersion"] in CUSTOM:
                custom.append(o)
                continue
            try:
                kv.validate(o, K8S_VERSION, strict=True)
            except kv.SchemaNotFoundError:
                fail(f"{source}: no schema for {o['apiVersion']} {o['kind']}")
            except kv.ValidationError as e:
                fail(f"{source}: {o['kind']} {o['metadata']['name']}: {e.message}")
        ok(f"{source}: {len(objects) - len(custom)} objects valid against Kubernetes {K8S_VERSION} (strict)")
        out = subprocess.run(["node", __file__.replace("validate.py", "validate-crds.js"), modules],
                             input=json.dumps(custom), text=True, capture_output=True)
        if out.returncode != 0:
            fail(f"{source}: {out.stderr.strip()}")
        ok(f"{source}: {len(custom)} KEDA and Prometheus operator objects valid against their CRDs")
        deployments = [o for o in objects if o["kind"] == "Deployment"]
        missing = (set(WORKERS) | {GATEWAY, REDIS_EXPORTER}) - {d["metadata"]["name"] for d in deployments}
        if missing:
            fail(f"{source}: no Deployment of {', '.join(sorted(missing))}")
        kinds = {t["type"] for o in objects if o["kind"] == "ScaledObject" for t in o["spec"]["triggers"]}
        cluster = "redis-cluster-streams" in kinds
        jobs, commands, creates = setup_creates(objects, source)
        if cluster:
            check_shards(objects, creates, source)
        workers = [check_worker(d, objects, source, acl, cluster, creates) for d in deployments
                   if d["metadata"]["name"] not in (GATEWAY, REDIS_EXPORTER)]
        for d in deployments:
            if d["metadata"]["name"] == GATEWAY:
                check_gateway(d, objects, source, acl, cluster)
            if d["metadata"]["name"] == REDIS_EXPORTER:
                check_redis_exporter(d, objects, source, acl, cluster, creates)
        check_globs(workers, source)
        check_setup(objects, workers, creates, commands, acl, cluster, source)
        check_retention(objects, source, acl, cluster, creates)
        check_rules(objects, rules_file, source)


main()
