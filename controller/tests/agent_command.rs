//! `nbd-csi-controller agent` as the real binary, without an API server:
//! its validation mode (what the chart's tests run its command line
//! through) prints its settings and touches nothing, bad flags are refused
//! with a message naming them, and a start that cannot work (no export key,
//! no Kubernetes) fails at once with a clear error before the data
//! directory is created. The agent against a real kube-apiserver is
//! `tests/k8s/agent.sh` (run by `tests/k8s/crds.sh`).

mod common;
mod process;

use std::path::Path;
use std::process::Output;

use common::{QUICK, describe, run};
use nbd_csi_controller::command_line::VALIDATE_ENV;
use process::command;

/// `agent` with the flags every case starts from, each replaced by the
/// same flag in `extra`, and the rest of `extra` added.
fn agent(cwd: &Path, extra: &[&str], validate: bool) -> Output {
    let base = ["--node-name=storage-1", "--data-dir=data", "--listen-address=127.0.1.2", "--export-key-file=key"];
    let flag = |arg: &str| arg.split('=').next().unwrap_or_default().to_owned();
    let replaced: Vec<String> = extra.iter().map(|a| flag(a)).collect();
    let mut cmd = command(cwd);
    cmd.arg("agent").args(base.iter().filter(|a| !replaced.contains(&flag(a)))).args(extra);
    if validate {
        cmd.env(VALIDATE_ENV, "1");
    }
    run(&mut cmd, QUICK)
}

#[test]
fn validation_mode_prints_the_agents_settings_and_touches_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = agent(dir.path(), &["--nbd-port-range=20000-20009", "--namespace=storage"], true);
    assert!(out.status.success(), "refused\n{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in [
        "would_run=agent".to_owned(),
        "node_name=storage-1".to_owned(),
        format!("data_dir={}", dir.path().join("data").display()),
        "listen_address=127.0.1.2".to_owned(),
        "nbd_port_range=20000-20009".to_owned(),
        "nbd_max_connections=128".to_owned(),
        "nbd_max_connections_per_peer=32".to_owned(),
        "export_key_file=key".to_owned(),
        "namespace=storage".to_owned(),
        "kubeconfig=".to_owned(),
        "metrics_address=".to_owned(),
    ] {
        assert!(stdout.lines().any(|l| l == line), "no {line:?} in\n{stdout}");
    }
    assert!(std::fs::read_dir(dir.path()).expect("read dir").next().is_none(), "validation created files");
}

#[test]
fn the_environment_gives_what_the_chart_sets_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = command(dir.path());
    cmd.args(["agent", "--data-dir=/var/lib/nbd-csi-storage", "--export-key-file=/etc/nbd-csi/export-key/key"])
        .env("NODE_NAME", "worker-3")
        .env("POD_NAMESPACE", "kube-system")
        .env("NBD_CSI_AGENT_ADDRESS", "192.0.2.10")
        .env(VALIDATE_ENV, "1");
    let out = run(&mut cmd, QUICK);
    assert!(out.status.success(), "refused\n{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in
        ["node_name=worker-3", "namespace=kube-system", "listen_address=192.0.2.10", "nbd_port_range=10900-10999"]
    {
        assert!(stdout.lines().any(|l| l == line), "no {line:?} in\n{stdout}");
    }
}

#[test]
fn bad_flags_are_refused_naming_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (extra, want) in [
        (&["--node-name=Storage_1"][..], "--node-name \"Storage_1\" is not a Node name"),
        (&["--listen-address=0.0.0.0"][..], "--listen-address 0.0.0.0 is not one address"),
        (&["--listen-address=storage.example"][..], "invalid value 'storage.example' for '--listen-address"),
        (&["--nbd-port-range=11000-10000"][..], "must be FIRST-LAST"),
        (&["--nbd-max-connections=0"][..], "invalid value '0' for '--nbd-max-connections"),
        (&["--namespace=a.b"][..], "--namespace \"a.b\" is not a namespace name"),
        (&["--metrics-address=:9812"][..], "invalid value ':9812' for '--metrics-address"),
    ] {
        let out = agent(dir.path(), extra, true);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(want), "{extra:?}: want an error with {want:?}\n{stderr}");
    }
    let mut cmd = command(dir.path());
    cmd.args(["agent", "--data-dir=data", "--listen-address=127.0.1.2", "--export-key-file=key"])
        .env(VALIDATE_ENV, "1");
    let out = run(&mut cmd, QUICK);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--node-name"), "no node name accepted\n{stderr}");
}

#[test]
fn a_start_without_its_key_or_kubernetes_fails_before_touching_the_data_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = agent(dir.path(), &[], false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("reading the export-name key"), "{}", describe(&out));

    std::fs::write(dir.path().join("key"), [7u8; 16]).expect("short key");
    let out = agent(dir.path(), &[], false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("has 16 bytes; it needs at least 32"), "{}", describe(&out));

    std::fs::write(dir.path().join("key"), [7u8; 32]).expect("key");
    let out = agent(dir.path(), &[], false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("give --kubeconfig, or run it in a pod"),
        "started without Kubernetes\n{}",
        describe(&out)
    );
    assert!(!dir.path().join("data").exists(), "the data directory was created before the checks");
}
