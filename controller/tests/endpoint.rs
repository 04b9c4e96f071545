//! The CSI endpoint is never silently open: the real binary refuses a TCP
//! endpoint other hosts could reach unless `--allow-insecure-tcp-endpoint`
//! (or its environment variable) accepts the risk, and then logs a warning;
//! loopback TCP serves as before. Also the validation mode the chart's tests
//! use (`NBD_CSI_VALIDATE_ARGS=1`). Traffic stays on 127.0.0.1.

mod common;
mod process;

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use csi_proto::GetPluginInfoRequest;
use csi_proto::identity_client::IdentityClient;
use nbd_csi_controller::cli;
use nbd_csi_controller::command_line::VALIDATE_ENV;
use nbd_csi_controller::service::Endpoint;
use process::{command, free_port_block};

const FLAG: &str = "--allow-insecure-tcp-endpoint";
const ENV: &str = "NBD_CSI_ALLOW_INSECURE_TCP_ENDPOINT";

struct Started {
    child: Child,
    log: PathBuf,
    data_dir: PathBuf,
}

impl Started {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The controller on `endpoint` with its own data directory and NBD ports,
/// plus `extra` arguments and environment; stderr goes to a log file.
fn start(dir: &Path, endpoint: &str, extra: &[&str], env: &[(&str, &str)]) -> Started {
    let (first, last) = free_port_block(4);
    let log = dir.join("controller.log");
    let data_dir = dir.join("data");
    let mut cmd = command(dir);
    cmd.arg("--endpoint")
        .arg(endpoint)
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--nbd-listen-address", "127.0.0.1", "--nbd-port-range", &format!("{first}-{last}")])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    for (key, value) in env {
        cmd.env(key, value);
    }
    Started { child: cmd.spawn().expect("spawn nbd-csi-controller"), log, data_dir }
}

/// Waits (bounded) for the process to exit on its own.
fn wait_exit(started: &mut Started) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(status) = started.child.try_wait().expect("try_wait") {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the controller kept running for 30 s\n{}", started.log());
}

/// GetPluginInfo over TCP on 127.0.0.1:port, retried until the server
/// answers (bounded); returns the driver name.
fn plugin_name(started: &mut Started, port: u16) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = started.child.try_wait().expect("try_wait") {
            panic!("the controller exited with {status}\n{}", started.log());
        }
        let answer = runtime.block_on(async {
            let endpoint = Endpoint::Tcp(format!("127.0.0.1:{port}"));
            let channel = cli::connect(&endpoint, Duration::from_secs(5)).await.ok()?;
            IdentityClient::new(channel).get_plugin_info(GetPluginInfoRequest {}).await.ok()
        });
        if let Some(reply) = answer {
            return reply.into_inner().name;
        }
        assert!(Instant::now() < deadline, "no GetPluginInfo answer on port {port} within 30 s\n{}", started.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn csi_port() -> u16 {
    free_port_block(1).0
}

#[test]
fn a_tcp_endpoint_other_hosts_can_reach_is_refused_before_anything_starts() {
    for host in ["0.0.0.0", "[::]", "192.0.2.1", "csi.example.invalid"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let endpoint = format!("tcp://{host}:{}", csi_port());
        let mut started = start(dir.path(), &endpoint, &[], &[]);
        let status = wait_exit(&mut started);
        let log = started.log();
        assert!(!status.success(), "{endpoint} was accepted\n{log}");
        assert!(log.contains(&format!("refusing to serve CSI on {endpoint}")), "{endpoint}: no clear error\n{log}");
        assert!(
            log.contains(FLAG) && log.contains("export name"),
            "{endpoint}: the error names neither the risk nor the flag\n{log}"
        );
        assert!(!started.data_dir.exists(), "{endpoint}: the store was opened before refusing");
    }
}

#[test]
fn the_allow_variable_set_to_false_still_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = format!("tcp://0.0.0.0:{}", csi_port());
    let mut started = start(dir.path(), &endpoint, &[], &[(ENV, "false")]);
    assert!(!wait_exit(&mut started).success(), "{ENV}=false accepted {endpoint}\n{}", started.log());
}

#[test]
fn a_loopback_tcp_endpoint_serves_without_a_warning() {
    for host in ["127.0.0.1", "localhost"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = csi_port();
        let mut started = start(dir.path(), &format!("tcp://{host}:{port}"), &[], &[]);
        assert_eq!(plugin_name(&mut started, port), "nbd.csi.dev");
        let log = started.log();
        assert!(!log.contains("WARN"), "tcp://{host}:{port} logged a warning\n{log}");
    }
}

#[test]
fn accepting_the_risk_serves_on_every_address_and_warns() {
    for (extra, env) in [(&[FLAG][..], &[][..]), (&[][..], &[(ENV, "true")][..])] {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = csi_port();
        let endpoint = format!("tcp://0.0.0.0:{port}");
        let mut started = start(dir.path(), &endpoint, extra, env);
        // Bound to every address; reached here through loopback only.
        assert_eq!(plugin_name(&mut started, port), "nbd.csi.dev");
        let log = started.log();
        let warning = log.lines().find(|l| l.contains("WARN") && l.contains("not loopback"));
        assert!(
            warning.is_some_and(|w| w.contains(&endpoint)),
            "{extra:?} {env:?}: no warning naming {endpoint}\n{log}"
        );
    }
}

/// A run in validation mode; it must exit on its own within 30 s.
fn validate(cwd: &Path, args: &[&str]) -> Output {
    let mut child = command(cwd)
        .args(args)
        .env(VALIDATE_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nbd-csi-controller");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!("{args:?} kept running in validation mode\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait")
}

#[test]
fn validation_mode_prints_the_settings_and_touches_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = format!("unix://{}", dir.path().join("csi.sock").display());
    let out = validate(
        dir.path(),
        &[
            &format!("--endpoint={endpoint}"),
            "--data-dir=data",
            "--nbd-listen-address=0.0.0.0",
            "--advertise-address=10.0.0.5",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "refused: {}", String::from_utf8_lossy(&out.stderr));
    let data_dir = dir.path().join("data");
    for line in [
        "would_run=controller".to_owned(),
        format!("endpoint={endpoint}"),
        format!("data_dir={}", data_dir.display()),
        "advertise_address=10.0.0.5".to_owned(),
        "nbd_port_range=10900-10999".to_owned(),
    ] {
        assert!(stdout.lines().any(|l| l == line), "no {line:?} in\n{stdout}");
    }
    assert!(std::fs::read_dir(dir.path()).expect("read dir").next().is_none(), "validation created files");

    // The start-up checks run: the same refusals as a real start.
    for (args, want) in [
        (&["--endpoint=tcp://0.0.0.0:7000"][..], "refusing to serve CSI on tcp://0.0.0.0:7000"),
        (&["--nbd-listen-address=0.0.0.0"][..], "--advertise-address is required"),
        (&["--driver-name=Bad_Name"][..], "driver name"),
        (&["--metrics-address=:9810"][..], "invalid value ':9810' for '--metrics-address"),
        (&["serve", "--endpoint=unix:///x"][..], "unrecognized subcommand 'serve'"),
        (&["--storage-mode=cluster"][..], "--storage-mode cluster needs --export-key-secret"),
        (&["--storage-mode=cluster", "--export-key-secret=Key_1"][..], "--export-key-secret \"Key_1\""),
        (&["--storage-mode=distributed"][..], "invalid value 'distributed' for '--storage-mode"),
    ] {
        let out = validate(dir.path(), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(want), "{args:?}: want an error with {want:?}\n{stderr}");
    }

    // Cluster mode's flags, checked without reaching Kubernetes.
    let out = validate(
        dir.path(),
        &[
            "--storage-mode=cluster",
            "--export-key-secret=nbd-csi-export-key",
            "--namespace=storage",
            "--storage-timeout=12",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "refused: {}", String::from_utf8_lossy(&out.stderr));
    for line in
        ["storage_mode=cluster", "export_key_secret=nbd-csi-export-key", "namespace=storage", "storage_timeout=12"]
    {
        assert!(stdout.lines().any(|l| l == line), "no {line:?} in\n{stdout}");
    }
}
