"""Validates the Kubernetes objects rendered from deploy/kustomize (multi-document YAML files given
as arguments): core kinds against the Kubernetes schemas of PyPI's kubernetes-validate, strictly
(an unknown field fails; so does an unknown kind), the custom kinds (KEDA, Prometheus operator)
with validate-crds.js, then the facts the deployment promises (probes, consumer names, grace
periods, security context, resources, scaling, setup). One line per check; exit 1 on a failure.

    validate.py NODE_MODULES RULES_YML FILE.yaml...
"""
import json
import subprocess
import sys

import kubernetes_validate as kv
import yaml

K8S_VERSION = "1.32"
CUSTOM = {"keda.sh/v1alpha1", "monitoring.coreos.com/v1"}


def fail(msg):
    print(f"check-deploy: FAIL {msg}", flush=True)
    sys.exit(1)


def ok(msg):
    print(f"check-deploy: ok   {msg}", flush=True)


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def check_worker(d, objects, source):
    name = d["metadata"]["name"]
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = env_of(c)
    where = f"{source}: Deployment {name}"
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
    for var in ("FLEET_REDIS_URL", "FLEET_DATABASE_URL"):
        if "secretKeyRef" not in env.get(var, {}).get("valueFrom", {}):
            fail(f"{where}: {var} does not come from a Secret")
    if not any(v.get("configMap") for v in pod.get("volumes", [])) or "FLEET_CONFIG" not in env:
        fail(f"{where}: FLEET_CONFIG does not come from a ConfigMap")
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
        if not all(isinstance(v, str) for v in m.values()):
            fail(f"{where}: trigger metadata values must be strings")
    ok(f"{where}: probes, pod-name consumer, grace period, Secret, ConfigMap, security, "
       f"resources, PDB, ServiceMonitor, ScaledObject ({scaled[0]['spec']['triggers'][0]['type']})")


def check_setup(objects, source):
    jobs = [o for o in objects if o["kind"] == "Job"]
    commands = [c.get("command", []) for j in jobs
                for c in j["spec"]["template"]["spec"].get("initContainers", []) + j["spec"]["template"]["spec"]["containers"]]
    if ["fleetctl", "migrate"] not in commands or not any(c[:3] == ["fleetctl", "groups", "create"] for c in commands):
        fail(f"{source}: no Job running `fleetctl migrate` and `fleetctl groups create`")
    ok(f"{source}: setup Job migrates and creates the groups")


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
        for d in (o for o in objects if o["kind"] == "Deployment"):
            check_worker(d, objects, source)
        check_setup(objects, source)
        check_rules(objects, rules_file, source)


main()
