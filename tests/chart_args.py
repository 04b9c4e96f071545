#!/usr/bin/env python3
"""Runs the command line of every container of a rendered chart that starts
one of our binaries, as the kubelet would start it, in the binaries'
validation mode (NBD_CSI_VALIDATE_ARGS=1: parse and check everything a real
start does, print the settings, touch nothing).

    chart_args.py RENDERED.yaml --bin-dir DIR [--expect CONTAINER.KEY=VALUE]...
                  [--skip-container NAME]...

The container's argv is its command + args (the image has no ENTRYPOINT),
with $(VAR) references expanded from the container's env the way Kubernetes
does; the process gets exactly that env. On top of "the binary accepts it":
  - every --expect holds for the printed settings;
  - the node plugin's state directory lies on a hostPath volume, mounted at
    the same path as on the host (a restart must find it again);
  - the CSI socket each binary serves is the one every sidecar of the pod
    dials (same volume, same path inside it);
  - the controller's data directory is on a volume, not the container's root
    (in embedded mode: in cluster mode it keeps no data);
  - a storage agent's (`nbd-csi-controller agent`) data directory is on a
    hostPath volume and its export-key file on a Secret volume, read-only.
A container named by --skip-container is reported as skipped, not run (a
mode whose flags the binary does not have yet).
Prints "ok: ..." / "FAILED: ..." lines; exits 1 on any failure.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import yaml

from checks import bad, failed, ok

OUR_BINARIES = ("nbd-csi-controller", "nbd-csi-node")
# What the API server fills in for the downward API, for these checks.
FIELD_VALUES = {
    "spec.nodeName": "node-1",
    "spec.serviceAccountName": "nbd-csi",
    "status.podIP": "10.244.1.7",
    "status.hostIP": "192.0.2.10",
    "metadata.name": "pod-0",
    "metadata.namespace": "kube-system",
}
VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")

def expand(text, env):
    """Kubernetes' $(VAR) expansion: a defined variable is replaced, $$ is
    a literal $, an undefined reference stays as written."""

    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return VAR_REF.sub(sub, text)


def container_env(container, where):
    """The container's env as the kubelet builds it: in order, each value
    expanded against the variables defined before it."""
    env = {}
    if container.get("envFrom"):
        bad(f"{where}: envFrom cannot be resolved offline")
    for var in container.get("env") or []:
        name = var["name"]
        if "value" in var:
            env[name] = expand(str(var["value"]), env)
        elif "valueFrom" in var:
            source = var["valueFrom"]
            if "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                if path not in FIELD_VALUES:
                    bad(f"{where}: env {name} uses fieldRef {path}, unknown to this test")
                env[name] = FIELD_VALUES.get(path, "unknown")
            elif "resourceFieldRef" in source:
                env[name] = "1"
            else:
                env[name] = f"value-of-{name.lower()}"
        else:
            env[name] = ""
    return env


def pod_specs(docs):
    """(workload name, pod spec, claim template names) of every workload."""
    for doc in docs:
        kind = doc.get("kind")
        name = f"{kind}/{doc['metadata']['name']}"
        if kind == "Pod":
            yield name, doc["spec"], set()
        elif kind in ("DaemonSet", "StatefulSet", "Deployment", "ReplicaSet", "Job"):
            claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates") or []}
            yield name, doc["spec"]["template"]["spec"], claims
        elif kind == "CronJob":
            yield name, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"], set()


def mount_of(container, path):
    """(volumeMount, path inside that volume) of the mount holding `path`."""
    best = None
    for m in container.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/") or "/"
        if path == mp or path.startswith(mp + "/") or mp == "/":
            if best is None or len(mp) > len(best[0]["mountPath"].rstrip("/")):
                best = (m, os.path.relpath(path, mp))
    return best


def socket_path(endpoint):
    if endpoint.startswith("unix://"):
        return endpoint[len("unix://"):]
    return endpoint if endpoint.startswith("/") else None


def run_binary(bin_dir, argv, env, where):
    """Runs argv with our binary from bin_dir; returns the printed settings or None."""
    with tempfile.TemporaryDirectory() as cwd:
        try:
            proc = subprocess.run(
                [os.path.join(os.path.abspath(bin_dir), os.path.basename(argv[0]))] + argv[1:],
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env, "NBD_CSI_VALIDATE_ARGS": "1"},
                cwd=cwd, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            bad(f"{where}: {' '.join(argv)} did not exit within 30 s")
            return None
        if os.listdir(cwd):
            bad(f"{where}: validation mode created {os.listdir(cwd)}")
    if proc.returncode != 0:
        bad(f"{where}: the binary refuses its command line {argv} (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-600:]}")
        return None
    settings = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    if "would_run" not in settings:
        bad(f"{where}: {argv} printed no settings (validation mode missing?): {proc.stdout.strip()[:300]}")
        return None
    ok(f"{where}: {' '.join(argv)} accepted ({settings['would_run']})")
    return settings


def check_socket_shared(spec, container, endpoint, where):
    """The socket the binary serves is the one the pod's sidecars dial."""
    path = socket_path(endpoint)
    served = mount_of(container, path) if path else None
    if served is None:
        bad(f"{where}: the CSI socket {endpoint} is not on a volume the sidecars can share")
        return
    target = (served[0]["name"], served[1])
    dialers = 0
    for other in spec.get("containers") or []:
        if other is container:
            continue
        env = container_env(other, where)
        for arg in other.get("args") or []:
            arg = expand(arg, env)
            if not arg.startswith("--csi-address="):
                continue
            dialers += 1
            dialed = mount_of(other, socket_path(arg.split("=", 1)[1]) or "")
            got = (dialed[0]["name"], dialed[1]) if dialed else None
            if got != target:
                bad(f"{where}: {other['name']} dials {arg} (volume, path) {got}, the binary serves {target}")
    if dialers:
        ok(f"{where}: {dialers} sidecar(s) dial the socket it serves ({target[0]}:{target[1]})")


def check_node(spec, container, settings, where):
    state_dir = settings.get("state_dir", "")
    found = mount_of(container, state_dir)
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    volume = volumes.get(found[0]["name"]) if found else None
    host = volume.get("hostPath") if volume else None
    if host is None:
        bad(f"{where}: state directory {state_dir} is not on a hostPath volume "
            f"(mount: {found[0]['name'] if found else 'none, the container root'}): a restart forgets every staged volume")
        return
    on_host = os.path.normpath(os.path.join(host["path"], found[1]))
    if on_host != state_dir:
        bad(f"{where}: state directory {state_dir} is {on_host} on the host; the same path is expected")
    else:
        ok(f"{where}: state directory {state_dir} is hostPath volume {found[0]['name']} ({host['path']})")


def check_agent(spec, container, settings, where):
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    data_dir = settings.get("data_dir", "")
    found = mount_of(container, data_dir)
    host = volumes.get(found[0]["name"], {}).get("hostPath") if found else None
    if host is None:
        bad(f"{where}: data directory {data_dir} is not on a hostPath volume: a new pod would start empty")
    else:
        ok(f"{where}: data directory {data_dir} is hostPath volume {found[0]['name']} ({host['path']})")
    key_file = settings.get("export_key_file", "")
    found = mount_of(container, key_file)
    secret = volumes.get(found[0]["name"], {}).get("secret") if found else None
    if secret is None or not found[0].get("readOnly"):
        bad(f"{where}: export-key file {key_file} is not on a read-only Secret volume")
    else:
        ok(f"{where}: export-key file {key_file} from Secret {secret.get('secretName')}, read-only")


def check_controller(spec, claims, container, settings, where):
    if settings.get("storage_mode") == "cluster":
        ok(f"{where}: cluster mode keeps no data directory")
        return
    data_dir = settings.get("data_dir", "")
    found = mount_of(container, data_dir)
    names = {v["name"] for v in spec.get("volumes") or []} | claims
    if found is None or found[0]["name"] not in names:
        bad(f"{where}: data directory {data_dir} is not on a volume")
    else:
        ok(f"{where}: data directory {data_dir} on volume {found[0]['name']}")


def check_tls_dir(spec, container, settings, where):
    """A --tls-dir is a writable mount of a memory emptyDir (the certificate
    sync in the same container writes it; no key reaches a disk), not the
    container's own root."""
    tls_dir = settings.get("tls_dir", "")
    if not tls_dir:
        return
    found = mount_of(container, tls_dir)
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    volume = volumes.get(found[0]["name"]) if found else None
    if (volume is None or (volume.get("emptyDir") or {}).get("medium") != "Memory"
            or found[0].get("readOnly")):
        bad(f"{where}: --tls-dir {tls_dir} is not a writable mount of a memory emptyDir volume")
    else:
        ok(f"{where}: --tls-dir {tls_dir} is memory emptyDir volume {found[0]['name']}, writable")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("rendered")
    parser.add_argument("--bin-dir", required=True)
    parser.add_argument("--expect", action="append", default=[], help="CONTAINER.KEY=VALUE")
    parser.add_argument("--skip-container", action="append", default=[], help="NAME")
    opts = parser.parse_args()
    with open(opts.rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    expectations = {}
    for e in opts.expect:
        target, value = e.split("=", 1)
        name, key = target.split(".", 1)
        expectations.setdefault(name, {})[key] = value
    seen = set()
    for workload, spec, claims in pod_specs(docs):
        for container in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            argv = list(container.get("command") or []) + list(container.get("args") or [])
            binary = os.path.basename(argv[0]) if argv else ""
            if binary not in OUR_BINARIES:
                continue
            where = f"{workload}/{container['name']}"
            if container["name"] in opts.skip_container:
                print(f"skip: {where}")
                continue
            env = container_env(container, where)
            argv = [expand(a, env) for a in argv]
            settings = run_binary(opts.bin_dir, argv, env, where)
            if settings is None:
                continue
            seen.add(container["name"])
            for key, want in expectations.get(container["name"], {}).items():
                got = settings.get(key)
                if got == want:
                    ok(f"{where}: {key}={got}")
                else:
                    bad(f"{where}: {key}={got!r}, expected {want!r}")
            check_tls_dir(spec, container, settings, where)
            if settings["would_run"] == "agent":
                check_agent(spec, container, settings, where)
                continue
            check_socket_shared(spec, container, settings.get("endpoint", ""), where)
            if binary == "nbd-csi-node":
                check_node(spec, container, settings, where)
            else:
                check_controller(spec, claims, container, settings, where)
    for name in expectations:
        if name not in seen:
            bad(f"no accepted container {name} in {opts.rendered}")
    return 1 if failed() else 0


if __name__ == "__main__":
    sys.exit(main())
