//! The operator CLI end to end: the real binary serving with its embedded
//! defaults (as the README's run command), driven by its own `volume` and
//! `snapshot` subcommands from the same directory, with the exports checked
//! by nbdinfo and qemu-io at the nbdUri the CLI prints.

mod common;
mod process;

use std::path::Path;
use std::process::Output;

use common::*;
use process::{Controller, cli_ok, command, free_port_block};
use serde_json::Value;

/// Runs the CLI in `cwd` (so it finds the default endpoint there).
fn cli(cwd: &Path, args: &[&str]) -> Output {
    run(command(cwd).args(args), QUICK)
}

#[track_caller]
fn cli_json(cwd: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    json_doc(&cli_ok(cwd, &all))
}

fn json_doc(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

/// stderr of a CLI run that must fail with exit status 1.
#[track_caller]
fn cli_err(cwd: &Path, args: &[&str]) -> String {
    let output = cli(cwd, args);
    assert_eq!(output.status.code(), Some(1), "nbd-csi-controller {args:?} should fail\n{}", describe(&output));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn export_size(uri: &str) -> u64 {
    let doc = json_doc(&run_ok(tool("nbdinfo").args(["--json", uri]), QUICK));
    doc["exports"][0]["export-size"].as_u64().unwrap_or_else(|| panic!("no export-size in {doc:#}"))
}

fn qemu_io(uri: &str, command: &str) -> String {
    let out = run_ok(tool("qemu-io").args(["-f", "raw", uri, "-c", command]), QUICK);
    assert!(!out.contains("failed"), "qemu-io {command:?} on {uri}: {out}");
    out
}

/// qemu-io opening the image read-only (`-r`).
fn qemu_io_read_only(uri: &str, command: &str) -> String {
    let out = run_ok(tool("qemu-io").args(["-r", "-f", "raw", uri, "-c", command]), QUICK);
    assert!(!out.contains("failed"), "qemu-io -r {command:?} on {uri}: {out}");
    out
}

#[test]
fn cli_drives_a_controller_started_with_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cwd = dir.path();
    let ports = free_port_block(16);
    let mut server = Controller::start_with_defaults(cwd, ports);

    // Nothing yet; the default endpoint is found without flags.
    assert_eq!(cli_ok(cwd, &["volume", "list"]), "no volumes\n");
    let info = cli_ok(cwd, &["info"]);
    assert!(info.contains("ready:      true"), "{info}");
    assert!(info.contains(&format!("unix://{}", server.socket.display())), "{info}");

    // create (JSON), then the same again as text: idempotent by name.
    let created = cli_json(cwd, &["volume", "create", "demo", "--size", "64M", "--block"]);
    let id = created["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("vol-"), "{created:#}");
    assert_eq!(created["name"], "demo");
    assert_eq!(created["capacity_bytes"], 64 << 20);
    assert_eq!(created["volume_context"]["accessType"], "block");
    let again = cli_ok(cwd, &["volume", "create", "demo", "--size", "64M", "--block"]);
    assert!(again.contains(&format!("volume:     {id}")) && again.contains("64 MiB (67108864 bytes)"), "{again}");
    // Same name, other properties: ALREADY_EXISTS.
    let err = cli_err(cwd, &["volume", "create", "demo", "--size", "64M"]);
    assert!(err.contains("CreateVolume failed: AlreadyExists"), "{err}");

    // publish prints the nbdUri, which nbdinfo and qemu-io accept.
    let uri = cli_ok(cwd, &["volume", "publish", &id, "--node", "node-1"]).trim().to_string();
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    let port: u16 = uri["nbd://127.0.0.1:".len()..].split('/').next().unwrap().parse().expect("port in nbdUri");
    assert!((ports.0..=ports.1).contains(&port), "port {port} outside {ports:?}");
    assert_eq!(export_size(&uri), 64 << 20);
    qemu_io(&uri, "write -P 0x5a 0 1M");

    // snapshot create / list / get; later writes do not reach it.
    let snap = cli_json(cwd, &["snapshot", "create", "before", "--volume", &id]);
    let snap_id = snap["id"].as_str().expect("snapshot id").to_string();
    assert_eq!(snap["source_volume_id"], id.as_str());
    assert_eq!(snap["size_bytes"], 64 << 20);
    assert_eq!(snap["ready_to_use"], true);
    qemu_io(&uri, "write -P 0x77 0 1M");
    let listed = cli_ok(cwd, &["snapshot", "list"]);
    assert!(listed.starts_with("ID") && listed.contains(&snap_id) && listed.contains(&id), "{listed}");
    let of_volume = cli_json(cwd, &["snapshot", "list", "--volume", &id]);
    assert_eq!(of_volume.as_array().map(Vec::len), Some(1), "{of_volume:#}");
    assert_eq!(
        cli_json(cwd, &["snapshot", "list", "--volume", "vol-00000000000000000000000000000000"]),
        Value::Array(vec![])
    );
    let got = cli_ok(cwd, &["snapshot", "get", &snap_id]);
    assert!(got.contains(&format!("snapshot:   {snap_id}")) && got.contains("ready:      true"), "{got}");

    // Restore the snapshot into a new volume: it holds the first pattern.
    let restored = cli_json(cwd, &["volume", "create", "restored", "--block", "--from-snapshot", &snap_id]);
    let restored_id = restored["id"].as_str().expect("id").to_string();
    assert_eq!(restored["capacity_bytes"], 64 << 20, "a restore without --size takes the snapshot's size");
    assert_eq!(restored["source"]["snapshot"], snap_id.as_str());
    let published = cli_json(cwd, &["volume", "publish", &restored_id, "--node", "node-1", "--readonly"]);
    let restored_uri = published["publish_context"]["nbdUri"].as_str().expect("nbdUri").to_string();
    assert_eq!(published["publish_context"]["readOnly"], "true");
    qemu_io_read_only(&restored_uri, "read -P 0x5a 0 1M");
    // The export itself is read-only for that publication: qemu cannot
    // open it for writing.
    let rw = tool("qemu-io").args(["-f", "raw", &restored_uri, "-c", "write -P 0x11 0 4k"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&rw.stderr);
    assert!(!rw.status.success() && stderr.contains("Permission denied"), "{stderr}");
    qemu_io(&uri, "read -P 0x77 0 1M");

    // list and get show names, sizes, nodes, condition.
    let table = cli_ok(cwd, &["volume", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("ID") && lines[0].contains("PUBLISHED"), "{table}");
    for (vid, name) in [(&id, "demo"), (&restored_id, "restored")] {
        let line = lines.iter().find(|l| l.starts_with(vid.as_str())).unwrap_or_else(|| panic!("{vid}: {table}"));
        assert!(
            line.contains(name) && line.contains("64 MiB") && line.contains("node-1") && line.contains("ok"),
            "{line}"
        );
    }
    let got = cli_json(cwd, &["volume", "get", &id]);
    assert_eq!(got["published_node_ids"], serde_json::json!(["node-1"]));
    assert_eq!(got["condition"]["abnormal"], false);

    // expand is online: the connected export grows.
    let expanded = cli_ok(cwd, &["volume", "expand", &id, "--size", "128M"]);
    assert_eq!(
        expanded,
        format!("volume {id} is 128 MiB (134217728 bytes) (NodeExpandVolume finishes it on the node)\n")
    );
    assert_eq!(export_size(&uri), 128 << 20);

    // An explicit --endpoint reaches the same server; a wrong one says so.
    let endpoint = format!("unix://{}", server.socket.display());
    let other = tempfile::tempdir().expect("tempdir");
    let got = cli_json(other.path(), &["volume", "get", &id, "--endpoint", &endpoint]);
    assert_eq!(got["capacity_bytes"], 128 << 20);
    let missing = format!("unix://{}/none.sock", other.path().display());
    let err = cli_err(cwd, &["volume", "list", "--endpoint", &missing]);
    assert!(err.contains("cannot reach the controller") && !err.contains("backtrace"), "{err}");

    // Errors carry the CSI code: published volumes cannot be deleted,
    // unknown ids are NOT_FOUND.
    let err = cli_err(cwd, &["volume", "delete", &id]);
    assert!(err.contains("DeleteVolume failed: FailedPrecondition"), "{err}");
    let err = cli_err(cwd, &["volume", "get", "vol-00000000000000000000000000000000"]);
    assert!(err.contains("NotFound"), "{err}");

    // unpublish revokes: the export stops admitting anyone.
    assert_eq!(
        cli_ok(cwd, &["volume", "unpublish", &id, "--node", "node-1"]),
        format!("unpublished {id} from node node-1\n")
    );
    let refused = run(tool("nbdinfo").arg(&uri), QUICK);
    assert!(!refused.status.success(), "nbdinfo after unpublish should fail\n{}", describe(&refused));

    // Clean up through the CLI: everything goes.
    assert_eq!(cli_ok(cwd, &["volume", "delete", &id]), format!("deleted volume {id}\n"));
    cli_ok(cwd, &["volume", "unpublish", &restored_id, "--node", "node-1"]);
    cli_ok(cwd, &["volume", "delete", &restored_id]);
    assert_eq!(cli_ok(cwd, &["snapshot", "delete", &snap_id]), format!("deleted snapshot {snap_id}\n"));
    assert_eq!(cli_ok(cwd, &["volume", "list"]), "no volumes\n");
    assert_eq!(cli_ok(cwd, &["snapshot", "list"]), "no snapshots\n");
    assert_eq!(cli_json(cwd, &["volume", "list"]), Value::Array(vec![]));
    let images = std::fs::read_dir(server.data_dir.join("volumes")).expect("volumes dir").count();
    assert_eq!(images, 0, "deleted volumes leave no files");

    server.terminate();
}
