//! `nbd-csi-node serve`'s arguments, checked before anything on the system
//! is touched: the validation mode the chart's tests run every rendered
//! command line through (`NBD_CSI_VALIDATE_ARGS=1`), the default state
//! directory on the host, and a TCP endpoint refused.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Variables that would change what the test asks for.
const ENV: [&str; 6] = [
    "CSI_ENDPOINT",
    "NODE_NAME",
    "NBD_CSI_DRIVER_NAME",
    "NBD_CSI_STATE_DIR",
    "NBD_CSI_CONNECTIONS",
    "NBD_CSI_VALIDATE_ARGS",
];

/// Runs the binary in `cwd`; it must exit on its own within 30 s.
fn node(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbd-csi-node"));
    for var in ENV {
        cmd.env_remove(var);
    }
    let mut child = cmd
        .args(args)
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nbd-csi-node");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!("nbd-csi-node {args:?} kept running\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait")
}

fn validate(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut all = env.to_vec();
    all.push(("NBD_CSI_VALIDATE_ARGS", "1"));
    node(cwd, args, &all)
}

#[track_caller]
fn setting(out: &Output, key: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "refused: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key} in\n{stdout}"))
        .to_owned()
}

#[test]
fn the_state_directory_defaults_to_the_hosts_kubelet_plugin_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let serve = ["serve", "--endpoint=unix:///csi/csi.sock", "--node-id=node-1"];
    let out = validate(dir.path(), &serve, &[]);
    assert_eq!(setting(&out, "would_run"), "serve");
    assert_eq!(setting(&out, "state_dir"), "/var/lib/kubelet/plugins/nbd.csi.dev/state");
    assert_eq!(setting(&out, "node_id"), "node-1");
    // Per driver, as the kubelet's plugin directory is.
    let out = validate(dir.path(), &[&serve[..], &["--driver-name=other.csi.example"]].concat(), &[]);
    assert_eq!(setting(&out, "state_dir"), "/var/lib/kubelet/plugins/other.csi.example/state");
    // The flag, else the environment, overrides it.
    let out = validate(dir.path(), &serve, &[("NBD_CSI_STATE_DIR", "/srv/nbd/state")]);
    assert_eq!(setting(&out, "state_dir"), "/srv/nbd/state");
    let out = validate(dir.path(), &["serve", "--node-id=n", "--state-dir=/a"], &[("NBD_CSI_STATE_DIR", "/b")]);
    assert_eq!(setting(&out, "state_dir"), "/a");
    // The node name comes from NODE_NAME in a pod.
    let out = validate(dir.path(), &["serve"], &[("NODE_NAME", "node-7")]);
    assert_eq!(setting(&out, "node_id"), "node-7");
    assert!(std::fs::read_dir(dir.path()).expect("read dir").next().is_none(), "validation created files");
}

#[test]
fn bad_arguments_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (args, want) in [
        (&["serve", "--node-id=n", "--state-dir=state"][..], "--state-dir state is not an absolute path"),
        (&["serve", "--node-id="][..], "--node-id (NODE_NAME) is empty"),
        (&["serve", "--node-id=n", "--connections=0"][..], "--connections must be at least 1"),
        (&["serve", "--node-id=n", "--endpoint=csi.sock"][..], "is neither unix:///path nor /path"),
        (&["--endpoint=unix:///csi/csi.sock", "--node-id=n"][..], "unexpected argument '--endpoint'"),
    ] {
        let out = validate(dir.path(), args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(want), "{args:?}: want an error with {want:?}\n{stderr}");
    }
}

#[test]
fn a_tcp_endpoint_is_refused_before_anything_is_touched() {
    for validation in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let args = [
            "serve",
            "--endpoint=tcp://0.0.0.0:10000",
            "--node-id=node-1",
            &format!("--state-dir={}", state.display()),
        ];
        let out = if validation { validate(dir.path(), &args, &[]) } else { node(dir.path(), &args, &[]) };
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "validation={validation}: tcp endpoint accepted\n{stderr}");
        assert!(
            stderr.contains("serves CSI only on a Unix socket"),
            "validation={validation}: no clear error for the tcp endpoint\n{stderr}"
        );
        // Neither a socket named after the URL nor the state directory.
        assert!(
            std::fs::read_dir(dir.path()).expect("read dir").next().is_none(),
            "validation={validation}: files created"
        );
    }
}
