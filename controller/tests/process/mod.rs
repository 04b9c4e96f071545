//! The real `nbd-csi-controller` binary as a child process on a temp data
//! directory: started, probed, SIGKILLed or SIGTERMed, restarted on the same
//! directory; plus a tonic channel to its CSI socket and the operator CLI.
//! Needs the `common` module next to it.

#![allow(dead_code)] // each test binary uses a different subset

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::CommandFactory;
use nbd_csi_controller::cli;
use nbd_csi_controller::command_line::{Cli, VALIDATE_ENV};
use nbd_csi_controller::service::Endpoint;
use tonic::transport::Channel;

use crate::common::{QUICK, describe, run};

pub const BIN: &str = env!("CARGO_BIN_EXE_nbd-csi-controller");

/// Every variable the binary reads (its flags' fallbacks, from its own
/// command-line definition, and the validation switch): each would point
/// it somewhere else than the test says.
fn variables() -> Vec<String> {
    fn collect(cmd: &clap::Command, out: &mut Vec<String>) {
        out.extend(cmd.get_arguments().filter_map(|a| a.get_env()).map(|v| v.to_string_lossy().into_owned()));
        cmd.get_subcommands().for_each(|sub| collect(sub, out));
    }
    let mut out = vec![VALIDATE_ENV.to_owned()];
    collect(&Cli::command(), &mut out);
    out.sort();
    out.dedup();
    out
}

/// `nbd-csi-controller` with a clean environment for its flags.
pub fn command(cwd: &Path) -> Command {
    command_with_nofile(cwd, None)
}

/// [`command`], started by util-linux `prlimit` with this open-file limit
/// (soft, hard) when one is given.
fn command_with_nofile(cwd: &Path, nofile: Option<(u64, u64)>) -> Command {
    let mut cmd = match nofile {
        None => Command::new(BIN),
        Some((soft, hard)) => {
            let mut cmd = Command::new("prlimit");
            cmd.arg(format!("--nofile={soft}:{hard}")).arg(BIN);
            cmd
        }
    };
    for var in variables() {
        cmd.env_remove(var);
    }
    cmd.env_remove("KUBERNETES_SERVICE_HOST").env("NO_COLOR", "1").current_dir(cwd).stdin(Stdio::null());
    cmd
}

/// Runs the operator CLI in `cwd` (so it finds the default endpoint
/// there) and asserts it succeeds; returns its stdout.
#[track_caller]
pub fn cli_ok(cwd: &Path, args: &[&str]) -> String {
    let output = run(command(cwd).args(args), QUICK);
    assert!(output.status.success(), "nbd-csi-controller {args:?} failed\n{}", describe(&output));
    String::from_utf8(output.stdout).expect("utf-8 output")
}

/// `count` consecutive loopback ports that are free right now, from a
/// pseudo-random base, so parallel runs on one machine rarely collide.
/// Below the Linux ephemeral range, where clients' ports come from.
pub fn free_port_block(count: u16) -> (u16, u16) {
    let mut seed = u64::from(std::process::id()) ^ Instant::now().elapsed().as_nanos() as u64;
    seed ^= std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    for attempt in 0..200u64 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407 + attempt);
        let base = 20_000 + ((seed >> 33) % 10_000) as u16;
        let listeners: Vec<_> = (base..base + count).map_while(|p| TcpListener::bind(("127.0.0.1", p)).ok()).collect();
        if listeners.len() == count as usize {
            return (base, base + count - 1);
        }
    }
    panic!("no block of {count} free loopback ports found in 20000-30000");
}

pub struct Controller {
    child: Option<Child>,
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub ports: (u16, u16),
    log_path: PathBuf,
    /// Byte offset in the log where the current run starts.
    run_start: u64,
    /// Started without flags: the embedded defaults (data and socket under
    /// `./nbd-csi-data`), only the port range from the environment.
    defaults: bool,
    /// Open-file limit (soft, hard) to start with instead of ours.
    nofile: Option<(u64, u64)>,
    /// Further environment variables (flag fallbacks).
    env: Vec<(String, String)>,
}

impl Controller {
    /// Starts the controller with `--data-dir DIR/data`, `--endpoint
    /// unix://DIR/csi.sock` and the given port range; returns once the
    /// socket accepts connections.
    pub fn start(dir: &Path, ports: (u16, u16)) -> Self {
        let mut c = Self {
            child: None,
            dir: dir.to_path_buf(),
            data_dir: dir.join("data"),
            socket: dir.join("csi.sock"),
            ports,
            log_path: dir.join("controller.log"),
            run_start: 0,
            defaults: false,
            nofile: None,
            env: Vec::new(),
        };
        c.restart();
        c
    }

    /// Starts the controller as `nbd-csi-controller` with no arguments in
    /// `dir` (only `NBD_CSI_NBD_PORT_RANGE` set): the README's run command.
    pub fn start_with_defaults(dir: &Path, ports: (u16, u16)) -> Self {
        Self::start_with_defaults_and(dir, ports, None, &[])
    }

    /// [`start_with_defaults`](Self::start_with_defaults) with an open-file
    /// limit (soft, hard) and further environment variables.
    pub fn start_with_defaults_and(
        dir: &Path,
        ports: (u16, u16),
        nofile: Option<(u64, u64)>,
        env: &[(&str, &str)],
    ) -> Self {
        let data_dir = dir.join("nbd-csi-data");
        let mut c = Self {
            child: None,
            dir: dir.to_path_buf(),
            socket: data_dir.join("csi.sock"),
            data_dir,
            ports,
            log_path: dir.join("controller.log"),
            run_start: 0,
            defaults: true,
            nofile,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        c.restart();
        c
    }

    /// Starts (again) on the same data directory and ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "controller already running");
        let mut log = OpenOptions::new().create(true).append(true).open(&self.log_path).expect("log file");
        self.run_start = log.metadata().expect("log metadata").len();
        writeln!(log, "==== start").expect("write log");
        let mut cmd = command_with_nofile(&self.dir, self.nofile);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let ports = format!("{}-{}", self.ports.0, self.ports.1);
        if self.defaults {
            cmd.env("NBD_CSI_NBD_PORT_RANGE", ports);
        } else {
            cmd.arg("--data-dir")
                .arg(&self.data_dir)
                .arg("--endpoint")
                .arg(format!("unix://{}", self.socket.display()))
                .args(["--nbd-listen-address", "127.0.0.1", "--nbd-port-range", &ports]);
        }
        let child =
            cmd.env("RUST_LOG", "info").stdout(Stdio::null()).stderr(log).spawn().expect("spawn nbd-csi-controller");
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30));
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait")) {
                panic!("controller exited with {status} while starting\n{}", self.log());
            }
            // A socket left by a killed run refuses until the new one binds.
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("controller did not listen on {} within {timeout:?}\n{}", self.socket.display(), self.log());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, no chance to clean up anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("wait");
        }
    }

    /// SIGTERM and wait up to 20 s; panics if the process ignores it or
    /// exits with an error.
    pub fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("/bin/sh").args(["-c", "kill -TERM \"$1\"", "sh", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("try_wait") {
                assert!(status.success(), "controller exited with {status} on SIGTERM\n{}", self.log());
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("controller ignored SIGTERM for 20 s\n{}", self.log());
    }

    /// The whole log, every run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The log of the current (last) run.
    pub fn run_log(&self) -> String {
        let log = std::fs::read(&self.log_path).unwrap_or_default();
        String::from_utf8_lossy(&log[(self.run_start as usize).min(log.len())..]).into_owned()
    }

    /// A gRPC channel to the CSI socket; every RPC gives up after `timeout`.
    pub async fn channel(&self, timeout: Duration) -> Channel {
        cli::connect(&Endpoint::Unix(self.socket.clone()), timeout).await.expect("connect to the CSI socket")
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- controller log ----\n{}", self.log());
        }
    }
}

/// A sparse local file of `size` bytes with `regions` (offset, length,
/// byte) filled: the reference a volume is compared against.
pub fn reference_file(path: &Path, size: u64, regions: &[(u64, u64, u8)]) {
    use std::os::unix::fs::FileExt;
    let file = File::create(path).expect("create reference");
    file.set_len(size).expect("size reference");
    for &(offset, len, byte) in regions {
        file.write_all_at(&vec![byte; len as usize], offset).expect("write reference");
    }
}
