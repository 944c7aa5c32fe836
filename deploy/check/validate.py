"""Validates the Kubernetes objects rendered from deploy/kustomize (multi-document YAML files given
as arguments): core kinds against the Kubernetes schemas of PyPI's kubernetes-validate, strictly
(an unknown field fails; so does an unknown kind), the custom kinds (KEDA, Prometheus operator)
with validate-crds.js, then the facts the deployment promises (probes, consumer names, grace
periods, security context, resources, scaling, setup; per worker: its command and which
credentials it gets; the worker's FLEET_CONFIG as it ships, and the keys it names against the
worker's Redis ACL user in deploy/redis/users.acl and its streams' hash slot, and the Pub/Sub
channels it publishes on against the user's channel patterns). One line per check; exit 1 on a
failure.

    validate.py NODE_MODULES RULES_YML FILE.yaml...
"""
import base64
import fnmatch
import json
import os
import re
import subprocess
import sys
import tomllib
from urllib.parse import urlsplit

import kubernetes_validate as kv
import yaml

K8S_VERSION = "1.32"
CUSTOM = {"keda.sh/v1alpha1", "monitoring.coreos.com/v1"}
ACL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "redis", "users.acl")

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
# The notifier's channel for a route without `publish` (workers/notifier/src/sink.rs).
DEFAULT_CHANNEL = "fleet:{channel}"
# A FLEET_CONFIG without any [[route]] routes this (README: "The configuration file").
DEFAULT_ROUTES = [{"pattern": "user.#", "strict": True}]


def fail(msg):
    print(f"check-deploy: FAIL {msg}", flush=True)
    sys.exit(1)


def ok(msg):
    print(f"check-deploy: ok   {msg}", flush=True)


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def acl_users(path=ACL_FILE):
    """users.acl as {user: [rule, ...]}: the root rule first, then one per selector; a rule is
    (key patterns, granted commands, channel patterns) with commands lowercased (`client|list`,
    `@all`)."""
    users = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"\s*user\s+(\S+)\s+(.*)$", line)
            if not m:
                continue
            rules = []
            for text in [re.sub(r"\([^)]*\)", " ", m.group(2))] + re.findall(r"\(([^)]*)\)", m.group(2)):
                keys, cmds, channels = [], set(), []
                for tok in text.split():
                    if tok == "resetkeys":
                        keys = []
                    elif tok == "resetchannels":
                        channels = []
                    elif tok == "allchannels":
                        channels.append("*")
                    elif tok.startswith("&"):
                        channels.append(tok[1:])
                    elif tok in ("allkeys", "~*"):
                        keys.append("*")
                    elif tok.startswith("~") or tok.startswith("%"):
                        keys.append(tok.split("~", 1)[1])
                    elif tok in ("-@all", "nocommands"):
                        cmds = set()
                    elif tok in ("+@all", "allcommands"):
                        cmds.add("@all")
                    elif tok.startswith("+"):
                        cmds.add(tok[1:].lower())
                    elif tok.startswith("-"):
                        cmds.discard(tok[1:].lower())
                rules.append((keys, cmds, channels))
            users[m.group(1)] = rules
    return users


def covers(pattern, prefix):
    """Whether the ACL key pattern matches every key that starts with `prefix`."""
    head = re.split(r"[*?\[\\]", pattern, maxsplit=1)[0]
    if pattern == head + "*":
        return prefix.startswith(head)
    return fnmatch.fnmatchcase(prefix, pattern) and not re.search(r"[*?\[]", pattern)


def hash_tag(key):
    """The part of a key Redis Cluster hashes: between the first `{` and the next `}`, if not
    empty; None when the key (or the known start of it) has no complete tag."""
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    return key[start + 1:end] if start >= 0 and end > start + 1 else None


def template_prefix(template, streams):
    """The literal start of a key template, braces undoubled (`{{app}}:x:{channel[1]}` gives
    `{app}:x:`); a template that starts with `{stream}` starts with each stream's name. Returns
    the prefixes, one per stream when it names the stream."""
    out, i = "", 0
    while i < len(template):
        two = template[i:i + 2]
        if two in ("{{", "}}"):
            out += two[0]
            i += 2
        elif template[i] == "{":
            if not out and template.startswith("{stream}", i):
                return [st + template_prefix(template[i + len("{stream}"):], [])[0] for st in streams]
            break
        else:
            out += template[i]
            i += 1
    return [out]


def action_templates(config):
    """(kind, template) of every projector action of a parsed FLEET_CONFIG."""
    for route in config.get("route", []):
        for action in route.get("actions", []):
            for kind in ("latest", "count", "history"):
                if kind in action:
                    yield kind, action[kind]
            for t in action.get("invalidate", []):
                yield "invalidate", t


def worker_config(d, objects, where):
    """The FLEET_CONFIG file a Deployment's container reads, parsed, from its ConfigMap."""
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    path = env_of(c).get("FLEET_CONFIG", {}).get("value", "")
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


def redis_user(var, objects, where):
    """The user name in the Redis URL of a Secret rendered with the overlay (None if the Secret
    is not part of it, e.g. made by a secret manager)."""
    ref = var.get("valueFrom", {}).get("secretKeyRef", {})
    for o in objects:
        if o["kind"] == "Secret" and o["metadata"]["name"] == ref.get("name"):
            raw = o.get("stringData", {}).get(ref.get("key"))
            if raw is None and ref.get("key") in o.get("data", {}):
                raw = base64.b64decode(o["data"][ref["key"]]).decode()
            if raw is None:
                fail(f"{where}: Secret {ref.get('name')} has no key {ref.get('key')}")
            return urlsplit(raw).username
    return None


def check_keys(name, streams, config, user, where):
    """The worker's keys against its Redis ACL user and its streams' hash slot: its streams (and
    what the pipeline writes beside them, `<stream>:…`) and every key its actions name."""
    rules = acl_users().get(user)
    if not rules:
        fail(f"{where}: no ACL user {user} in deploy/redis/users.acl")
    root_keys = rules[0][0]
    for st in streams:
        if not any(covers(p, st) for p in root_keys):
            fail(f"{where}: stream {st} (and {st}:dlq, :trials, :checkpoints) is outside the keys "
                 f"of ACL user {user} ({' '.join(root_keys)})")
    tags = {hash_tag(st) for st in streams}
    n = 0
    for kind, template in action_templates(config):
        for prefix in template_prefix(template, streams):
            n += 1
            if not any(covers(p, prefix) for p in root_keys):
                fail(f"{where}: {kind} key {template!r} (starts {prefix!r}) is outside the keys of "
                     f"ACL user {user} ({' '.join(root_keys)})")
            if kind == "invalidate" and not any(
                    ("del" in cmds or "@all" in cmds) and any(covers(p, prefix) for p in keys)
                    for keys, cmds, _ in rules):
                fail(f"{where}: invalidate key {template!r} (starts {prefix!r}): ACL user {user} "
                     "may not DEL it (deploy/redis/users.acl)")
            if tags != {None} and hash_tag(prefix) not in tags:
                fail(f"{where}: {kind} key {template!r} (starts {prefix!r}) does not carry the hash "
                     f"tag of its stream ({', '.join(streams)}): on Redis Cluster it is in another "
                     "slot than the script's stream (CROSSSLOT)")
    return n


def check_channels(streams, config, user, where):
    """Every Pub/Sub channel the notifier publishes on (each route's `publish` template, else the
    default) against its ACL user's channel patterns and its PUBLISH grant. Channels are no keys:
    no hash slot applies (a PUBLISH reaches every node of a cluster)."""
    rules = acl_users()[user]
    if not any("publish" in cmds or "@all" in cmds for _, cmds, _ in rules):
        fail(f"{where}: ACL user {user} may not PUBLISH (deploy/redis/users.acl)")
    channels = [p for _, _, chans in rules for p in chans]
    routes = config.get("route") or DEFAULT_ROUTES
    for route in routes:
        template = route.get("publish", DEFAULT_CHANNEL)
        for prefix in template_prefix(template, streams):
            if any(covers(p, prefix) for p in channels):
                continue
            fail(f"{where}: route {route.get('pattern')!r} publishes on {template!r} (starts "
                 f"{prefix!r}), outside the channels of ACL user {user} "
                 f"({' '.join('&' + p for p in channels) or 'none: resetchannels'}); Redis refuses "
                 "the PUBLISH (NOPERM) and the batch is retried without end")
    return len(routes)


def check_worker(d, objects, source):
    name = d["metadata"]["name"]
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = env_of(c)
    where = f"{source}: Deployment {name}"
    spec = WORKERS.get(name)
    if spec is None:
        fail(f"{where}: not a known worker ({', '.join(WORKERS)}): add it to validate.py's WORKERS")
    if c.get("command") != [name]:
        fail(f"{where}: command is {c.get('command')}, not [{name!r}]")
    probes = (c.get("livenessProbe", {}).get("httpGet", {}).get("path"),
              c.get("readinessProbe", {}).get("httpGet", {}).get("path"))
    if probes != ("/livez", "/readyz"):
        fail(f"{where}: probes are {probes}, not /livez and /readyz")
    consumer = env.get("FLEET_CONSUMER", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    if consumer != "metadata.name":
        fail(f"{where}: FLEET_CONSUMER is not the pod name (downward API)")
    grace_ms = int(env.get("FLEET_SHUTDOWN_GRACE_MS", {}).get("value", "25000"))
    if pod.get("terminationGracePeriodSeconds", 30) * 1000 <= grace_ms:
        fail(f"{where}: terminationGracePeriodSeconds must exceed FLEET_SHUTDOWN_GRACE_MS")
    for var in ("FLEET_REDIS_URL", "FLEET_DATABASE_URL") if spec["database"] else ("FLEET_REDIS_URL",):
        if "secretKeyRef" not in env.get(var, {}).get("valueFrom", {}):
            fail(f"{where}: {var} does not come from a Secret")
    if not spec["database"] and "FLEET_DATABASE_URL" in env:
        fail(f"{where}: FLEET_DATABASE_URL is set, but the {name} uses no database: "
             "no database credentials in its pod")
    config = worker_config(d, objects, where)
    if spec["actions"] and not any(r.get("actions") for r in config.get("route", [])):
        fail(f"{where}: no route of its FLEET_CONFIG declares actions (the {name} exits 2)")
    streams = [st.strip() for st in env.get("FLEET_STREAMS", {}).get("value", "").split(",") if st.strip()]
    if not streams:
        fail(f"{where}: FLEET_STREAMS is not set")
    user = redis_user(env["FLEET_REDIS_URL"], objects, where) or name
    if user != name:
        fail(f"{where}: FLEET_REDIS_URL logs in as {user}, not as its own ACL user {name}")
    keys = check_keys(name, streams, config, user, where)
    publishes = check_channels(streams, config, user, where) if spec["publish"] else 0
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    if not (psc.get("runAsNonRoot") and csc.get("readOnlyRootFilesystem")
            and csc.get("allowPrivilegeEscalation") is False):
        fail(f"{where}: not non-root, read-only root filesystem, no privilege escalation")
    res = c.get("resources", {})
    if not (res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory")):
        fail(f"{where}: memory request and limit missing")
    labels = d["spec"]["selector"]["matchLabels"]

    def selects(o):
        sel = o["spec"].get("selector", {}).get("matchLabels", {})
        return sel and all(labels.get(k) == v for k, v in sel.items())

    kinds = {o["kind"] for o in objects if o["kind"] in ("PodDisruptionBudget", "ServiceMonitor") and selects(o)}
    if kinds != {"PodDisruptionBudget", "ServiceMonitor"}:
        fail(f"{where}: missing {sorted({'PodDisruptionBudget', 'ServiceMonitor'} - kinds)}")
    scaled = [o for o in objects if o["kind"] == "ScaledObject" and o["spec"]["scaleTargetRef"]["name"] == name]
    if not scaled:
        fail(f"{where}: no ScaledObject")
    group = env.get("FLEET_GROUP", {}).get("value", name)
    for t in scaled[0]["spec"]["triggers"]:
        m = t["metadata"]
        if t["type"] not in ("redis-streams", "redis-cluster-streams"):
            fail(f"{where}: trigger {t['type']}")
        if m.get("consumerGroup") != group or "lagCount" not in m or "activationLagCount" not in m:
            fail(f"{where}: the trigger must use lagCount and activationLagCount on group {group}")
        if m.get("stream") not in streams:
            fail(f"{where}: the trigger's stream {m.get('stream')} is not one of FLEET_STREAMS ({', '.join(streams)})")
        if not all(isinstance(v, str) for v in m.values()):
            fail(f"{where}: trigger metadata values must be strings")
    ok(f"{where}: command, probes, pod-name consumer, grace period, "
       f"{'Redis and PostgreSQL' if spec['database'] else 'Redis only (no database)'} Secret, "
       f"ConfigMap, security, resources, PDB, ServiceMonitor, "
       f"ScaledObject ({scaled[0]['spec']['triggers'][0]['type']}), keys inside ACL user {user}"
       + (f" and their stream's hash slot ({keys} action keys)" if spec["actions"] else "")
       + (f", channels inside its channel patterns ({publishes} routes' publish)" if spec["publish"] else ""))
    return {"name": name, "group": group, "streams": streams}


def check_setup(objects, workers, source):
    jobs = [o for o in objects if o["kind"] == "Job"]
    commands = [c.get("command", []) for j in jobs
                for c in j["spec"]["template"]["spec"].get("initContainers", []) + j["spec"]["template"]["spec"]["containers"]]
    if ["fleetctl", "migrate"] not in commands:
        fail(f"{source}: no Job running `fleetctl migrate`")

    def flag(cmd, name):
        return cmd[cmd.index(name) + 1] if name in cmd[:-1] else None

    creates = [c for c in commands if c[:3] == ["fleetctl", "groups", "create"]]
    for w in workers:
        made = [set((flag(c, "--streams") or "").split(",")) for c in creates if flag(c, "--group") == w["group"]]
        if not any(set(w["streams"]) <= m for m in made):
            fail(f"{source}: no setup Job runs `fleetctl groups create --streams {','.join(w['streams'])} "
                 f"--group {w['group']}` (the {w['name']}'s group; KEDA misreads a missing group)")
    ok(f"{source}: setup Job migrates and creates the groups of "
       + ", ".join(f"{w['name']} ({w['group']})" for w in workers))


def check_rules(objects, rules_file, source):
    with open(rules_file) as f:
        groups = yaml.safe_load(f)["groups"]
    rules = [o for o in objects if o["kind"] == "PrometheusRule"]
    if len(rules) != 1 or rules[0]["spec"]["groups"] != groups:
        fail(f"{source}: the PrometheusRule is not {rules_file} (run deploy/check/prometheusrule.py)")
    ok(f"{source}: PrometheusRule holds {rules_file}")


def main():
    modules, rules_file, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    for source in files:
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
        missing = set(WORKERS) - {d["metadata"]["name"] for d in deployments}
        if missing:
            fail(f"{source}: no Deployment of {', '.join(sorted(missing))}")
        workers = [check_worker(d, objects, source) for d in deployments]
        check_setup(objects, workers, source)
        check_rules(objects, rules_file, source)


main()
