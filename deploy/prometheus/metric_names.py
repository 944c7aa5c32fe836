#!/usr/bin/env python3
"""Prints every fleet_* and redis_* metric name the alerting rules and the Grafana dashboard query.

One name per line, sorted, each once; histogram series (`_bucket`, `_sum`, `_count`) are
reduced to the histogram's base name, so the list can be compared with the names a running
worker exports on /metrics (its `# TYPE` lines). With `--worker NAME`, only the names that
worker exports: the gateway's own (`fleet_gateway_*`) and the runtime's (`fleet_ready`,
`fleet_fault`, `fleet_reconnects_total`) for `gateway`, which has no consumer group; every other
fleet_* name for the consumer workers (persister, projector, notifier). The `redis_*` names are
no worker's: they are oliver006/redis_exporter's (deploy/kustomize/base/redis-exporter), listed
with `--worker redis_exporter` (or its job name, `redis-exporter`) and by no worker.

Sources: the `expr` of every rule in deploy/prometheus/rules.yml (not the annotations), and in
deploy/grafana/streamfleet.json every `expr` (panel targets) and the queries of the template
variables (`label_values(...)`).

    python3 deploy/prometheus/metric_names.py [--rules FILE] [--dashboard FILE] [--by-source]
                                              [--worker NAME]

Needs only the Python 3 standard library (PyYAML is used when present, else a small reader for
this file's `expr:` entries).
"""

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RULES = os.path.join(HERE, "rules.yml")
DEFAULT_DASHBOARD = os.path.join(HERE, "..", "grafana", "streamfleet.json")

# A metric name starting with fleet_ (the workers') or redis_ (redis_exporter's), not part of a
# longer identifier.
NAME = re.compile(r"(?<![A-Za-z0-9_:])(?:fleet|redis)_[A-Za-z0-9_:]*")
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")
# The gateway's own metrics; the runtime's, which every binary exports, the gateway included.
GATEWAY_PREFIX = "fleet_gateway_"
RUNTIME = {"fleet_ready", "fleet_fault", "fleet_reconnects_total"}
# redis_exporter's metrics (Redis's INFO and the exporter's own): no worker exports them.
REDIS_EXPORTER_PREFIX = "redis_"
REDIS_EXPORTER = {"redis_exporter", "redis-exporter"}
# PromQL string literals ("..." or '...'): label values are not metric names.
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
# Where PromQL names labels, not metrics: the matchers of a selector (`{redis_mode="…"}`, once the
# strings are out) and the lists of by, without, on, ignoring, group_left and group_right. Some
# of redis_exporter's label names start with redis_ (redis_instance_info's `redis_version`).
MATCHERS = re.compile(r"\{[^{}]*\}")
LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")


def names_in(expr):
    """fleet_* and redis_* metric names in one PromQL expression (outside string literals,
    label matchers and label lists)."""
    # Keep the selector inside label_values(...), drop quoted values, then what names labels.
    bare = STRING.sub('""', expr)
    bare = LABEL_LIST.sub(r"\1 ()", MATCHERS.sub("{}", bare))
    return {HISTOGRAM_SUFFIX.sub("", n) for n in NAME.findall(bare)}


def rule_exprs_yaml(text):
    import yaml  # noqa: PLC0415 (optional dependency)

    doc = yaml.safe_load(text) or {}
    for group in doc.get("groups") or []:
        for rule in group.get("rules") or []:
            if "expr" in rule:
                yield str(rule["expr"])


def rule_exprs_plain(text):
    """`expr:` values of a rules file without a YAML library: a plain or quoted value on the
    same line, or a block scalar (`|`, `>`, with modifiers) made of the following lines that
    are more indented than the key (or blank)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(?:-\s+)?expr:\s*(.*?)\s*$", lines[i])
        i += 1
        if not m:
            continue
        indent = len(m.group(1))
        value = re.sub(r"\s+#.*$", "", m.group(2))
        if value and value[0] in "|>":
            block = []
            while i < len(lines) and (not lines[i].strip() or
                                      len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i])
                i += 1
            yield "\n".join(block)
        else:
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            yield value


def rule_exprs(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return list(rule_exprs_yaml(text))
    except ImportError:
        return list(rule_exprs_plain(text))


def dashboard_exprs(path):
    with open(path, encoding="utf-8") as f:
        dash = json.load(f)
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dash.get("panels", []))
    for var in (dash.get("templating") or {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str):
            found.append(query)
        walk(var)  # any `expr` a variable may carry
    return found


def exported_by(worker, name):
    """Whether `worker` exports the metric `name` (see the module's docstring)."""
    if name.startswith(REDIS_EXPORTER_PREFIX):
        return worker in REDIS_EXPORTER
    if worker in REDIS_EXPORTER:
        return False
    if worker == "gateway":
        return name.startswith(GATEWAY_PREFIX) or name in RUNTIME
    return not name.startswith(GATEWAY_PREFIX)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", default=DEFAULT_RULES)
    parser.add_argument("--dashboard", default=DEFAULT_DASHBOARD)
    parser.add_argument("--by-source", action="store_true",
                        help="prefix each name with rules/dashboard (a name may appear twice)")
    parser.add_argument("--worker", metavar="NAME",
                        help="only the names this worker exports (gateway, a consumer worker, or "
                             "redis_exporter)")
    args = parser.parse_args(argv)

    sources = {
        "rules": set().union(*[names_in(e) for e in rule_exprs(args.rules)] or [set()]),
        "dashboard": set().union(*[names_in(e) for e in dashboard_exprs(args.dashboard)] or [set()]),
    }
    if args.worker:
        sources = {k: {n for n in v if exported_by(args.worker, n)} for k, v in sources.items()}
    if args.by_source:
        for source, names in sources.items():
            for name in sorted(names):
                print(f"{source}\t{name}")
    else:
        for name in sorted(sources["rules"] | sources["dashboard"]):
            print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
