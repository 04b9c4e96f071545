#!/usr/bin/env python3
"""Renews the heartbeat Lease of each listed Node, as a kubelet does (stdlib only).

    node_heartbeats.py API_URL CA_FILE NODES_FILE [PERIOD_SECONDS]

The bearer token comes from $KUBE_TOKEN. Every PERIOD_SECONDS (default 2)
it reads NODES_FILE, one Node name a line, and for each creates or renews
the Lease kube-node-lease/NAME (holder NAME, 40 s, owned by the Node), which
is what kube-controller-manager's node lifecycle controller reads as the
node's heartbeat. A name removed from the file stops beating: that node
looks dead to the node lifecycle controller after its grace period, as a
node whose kubelet stopped does. Each request is bounded (5 s); a failure is
printed and the next round tries again. Runs until killed.
"""

import datetime
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

LEASES = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"


def call(api, context, token, method, path, body=None, content_type="application/json"):
    request = urllib.request.Request(
        api + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": content_type},
    )
    with urllib.request.urlopen(request, context=context, timeout=5) as reply:
        return json.load(reply)


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def beat(api, context, token, node, owners):
    patch = {"spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": now()}}
    try:
        call(api, context, token, "PATCH", f"{LEASES}/{node}", patch, "application/merge-patch+json")
        return
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
    if node not in owners:
        owners[node] = call(api, context, token, "GET", f"/api/v1/nodes/{node}")["metadata"]["uid"]
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": node,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": owners[node]}],
        },
        "spec": patch["spec"],
    }
    call(api, context, token, "POST", LEASES, lease)


def main():
    if len(sys.argv) not in (4, 5) or not os.environ.get("KUBE_TOKEN"):
        print(__doc__, file=sys.stderr)
        return 1
    api, ca, nodes_file = sys.argv[1:4]
    period = float(sys.argv[4]) if len(sys.argv) == 5 else 2.0
    context = ssl.create_default_context(cafile=ca)
    token = os.environ["KUBE_TOKEN"]
    owners = {}
    while True:
        started = time.monotonic()
        try:
            with open(nodes_file) as f:
                nodes = [line.strip() for line in f if line.strip()]
        except OSError as e:
            print(f"reading {nodes_file}: {e}", flush=True)
            nodes = []
        for node in nodes:
            try:
                beat(api, context, token, node, owners)
            except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
                print(f"{now()} heartbeat of {node} failed: {e}", flush=True)
        time.sleep(max(0.0, period - (time.monotonic() - started)))


if __name__ == "__main__":
    sys.exit(main())
