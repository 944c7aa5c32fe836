"""Writes deploy/kustomize/base/prometheusrule.yaml: the alerting rules of
deploy/prometheus/rules.yml (the plain `groups:` file, for a Prometheus without the operator) as
the Prometheus operator's PrometheusRule, so that the two never differ (validate.py checks it).

    python3 deploy/check/prometheusrule.py
"""
import os

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(ROOT, "deploy", "prometheus", "rules.yml")) as f:
    groups = yaml.safe_load(f)["groups"]
rule = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "PrometheusRule",
    "metadata": {"name": "streamfleet", "labels": {"app.kubernetes.io/name": "streamfleet"}},
    "spec": {"groups": groups},
}
header = ("# Generated from deploy/prometheus/rules.yml by deploy/check/prometheusrule.py: edit that file,\n"
          "# then run this script (scripts/test fails while the two differ). Runbooks: docs/src/runbooks.md.\n")
with open(os.path.join(ROOT, "deploy", "kustomize", "base", "prometheusrule.yaml"), "w") as f:
    f.write(header + yaml.safe_dump(rule, sort_keys=False, width=100))
