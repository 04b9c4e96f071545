#!/usr/bin/env python3
"""Checks that the ServiceMonitors of a chart render cover every pod that
serves metrics:

    chart_metrics.py RENDERED.yaml EXPECTED_COMPONENTS

Every workload with a container port named `metrics` (the controller, the
node plugins, the storage agents) must be selected by a Service with a port
named `metrics` that targets it, and that Service by a ServiceMonitor
scraping that port; EXPECTED_COMPONENTS (comma-separated) names the
components that must be covered, exactly.
Prints "ok: ..." / "FAILED: ..." lines; exits 1 on any failure.
"""

import sys

import yaml

from checks import bad, failed, ok


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def main():
    path, expected = sys.argv[1], set(sys.argv[2].split(","))
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    services = [d for d in docs if d["kind"] == "Service"]
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    covered = set()
    for w in (d for d in docs if d["kind"] in ("DaemonSet", "Deployment", "StatefulSet")):
        pod = w["spec"]["template"]
        ports = [p for c in pod["spec"]["containers"] for p in c.get("ports", []) if p.get("name") == "metrics"]
        if not ports:
            continue
        component = pod["metadata"]["labels"]["app.kubernetes.io/component"]
        name = f"{w['kind']}/{w['metadata']['name']}"
        svcs = [s for s in services if selects(s["spec"].get("selector"), pod["metadata"]["labels"])
                and any(p["name"] == "metrics" and p["targetPort"] == "metrics" for p in s["spec"]["ports"])]
        mons = [m for m in monitors for s in svcs
                if selects(m["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
                and any(e["port"] == "metrics" and e["path"] == "/metrics" for e in m["spec"]["endpoints"])]
        if len(mons) == 1:
            ok(f"{name} (port {ports[0]['containerPort']}) is scraped: Service {svcs[0]['metadata']['name']}, "
               f"ServiceMonitor {mons[0]['metadata']['name']}")
            covered.add(component)
        else:
            bad(f"{name} serves metrics on {ports[0]['containerPort']}, but {len(svcs)} Services and "
                f"{len(mons)} ServiceMonitors reach it (one of each expected)")
    if covered == expected:
        ok(f"ServiceMonitors cover exactly {sorted(covered)}")
    else:
        bad(f"ServiceMonitors cover {sorted(covered)}, expected {sorted(expected)}")
    return 1 if failed() else 0


if __name__ == "__main__":
    sys.exit(main())
