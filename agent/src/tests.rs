//! The agent through its own API, with real NBD servers on loopback TCP
//! driven by the test client: data written through a volume's server
//! survives a restart on the same port; access admits exactly the
//! addresses it names and fences the ones it drops; copies are
//! point-in-time; failures are reported and healed by the refresh pass.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::testing::Client;

const MIB: u64 = 1 << 20;
/// How long a fence may take here: the stopped connections are idle.
const FENCE: Duration = Duration::from_secs(5);
/// NBD's EPERM: a write refused on a read-only connection.
const EPERM: u32 = 1;

/// Each agent gets its own ports so parallel tests do not collide.
static NEXT_PORT: AtomicU16 = AtomicU16::new(29200);

pub(crate) fn config() -> Config {
    let first = NEXT_PORT.fetch_add(16, Ordering::Relaxed);
    Config { listen: loopback(), ports: first..=first + 15, connection_caps: ConnectionCaps::default(), tls_dir: None }
}

fn loopback() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

/// What the agent reported, in order.
#[derive(Debug, Default)]
struct Recorded(Mutex<Vec<String>>);

impl Recorded {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl Reporter for Recorded {
    fn server_down(&self, volume: &VolumeRecord, error: &Error) {
        self.0.lock().unwrap().push(format!("server down {} {}: {error}", volume.id, volume.name));
    }

    fn image_missing(&self, volume: &VolumeRecord, reason: &str) {
        self.0.lock().unwrap().push(format!("image missing {} {}: {reason}", volume.id, volume.name));
    }
}

async fn open(config: &Config, dir: &Path) -> (Arc<Agent>, Arc<Recorded>) {
    let recorded = Arc::new(Recorded::default());
    let reporter: Arc<dyn Reporter> = Arc::clone(&recorded) as Arc<dyn Reporter>;
    let agent = Agent::open(config.clone(), dir, reporter).await.expect("agent opens");
    (agent, recorded)
}

fn new_volume(name: &str, size: u64, source: Option<Source>) -> NewVolume {
    NewVolume {
        id: None,
        name: name.into(),
        capacity_bytes: size,
        block: true,
        access_modes: vec![1],
        fs_type: String::new(),
        parameters: BTreeMap::new(),
        source,
        read_only: false,
        export_name: None,
        tls: Default::default(),
    }
}

/// Published to one node reaching the agent from `addresses`.
fn access(addresses: &[&str], read_only: bool) -> BTreeMap<String, Publication> {
    let addresses = addresses.iter().map(|a| a.parse().unwrap()).collect();
    let publication = Publication { read_only, access_mode: 1, addresses: Some(addresses) };
    [("node-a".to_string(), publication)].into()
}

/// Publishes volume `id` to `published`; returns its record, which names
/// the port its server took.
async fn publish(agent: &Agent, id: &str, published: BTreeMap<String, Publication>) -> VolumeRecord {
    let change = agent.set_access(id, published, FENCE).await.unwrap();
    let record = agent.volume(id).unwrap().record;
    assert_eq!(record.port, change.port);
    record
}

fn address(record: &VolumeRecord) -> String {
    SocketAddr::new(loopback(), record.port.expect("a published volume has a port")).to_string()
}

async fn connect(record: &VolumeRecord) -> Client {
    Client::connect(&address(record), &record.export_name).await.expect("the volume's server admits the client")
}

/// The client's connection is refused: closed before or during the
/// handshake.
async fn refused(record: &VolumeRecord) -> bool {
    tokio::time::timeout(FENCE, Client::connect(&address(record), &record.export_name))
        .await
        .expect("a refused connection ends in time")
        .is_err()
}

#[tokio::test]
async fn a_volume_serves_the_same_data_on_the_same_port_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = config();
    let (agent, _) = open(&config, dir.path()).await;
    let record = agent.create_volume(new_volume("restart", 4 * MIB, None)).await.unwrap();
    assert_eq!(agent.find_volume_by_name("restart").as_ref(), Some(&record));
    let record = publish(&agent, &record.id, access(&["127.0.0.1"], false)).await;
    let port = record.port.unwrap();
    assert!(config.ports.contains(&port), "port {port} is from the range");
    let mut client = connect(&record).await;
    assert_eq!(client.size, 4 * MIB);
    assert_eq!(client.write(MIB, &[0x5a; 4096]).await.unwrap(), 0);
    assert_eq!(client.flush().await.unwrap(), 0);
    drop(client);
    agent.shutdown().await;
    drop(agent);

    let (agent, recorded) = open(&config, dir.path()).await;
    assert!(agent.ready(), "every volume serves again");
    let reloaded = agent.volume(&record.id).expect("the volume is still there");
    assert_eq!(reloaded.condition, Condition::Serving);
    assert_eq!(reloaded.record.port, record.port, "same port");
    assert_eq!(reloaded.record.published, access(&["127.0.0.1"], false), "same access");
    let mut client = connect(&record).await;
    assert_eq!(client.read(MIB, 4096).await.unwrap(), vec![0x5a; 4096]);
    assert!(recorded.take().is_empty());

    // Deleting takes the access away first.
    let still = agent.delete_volume(&record.id).await.unwrap_err();
    assert_eq!(still.kind(), Kind::FailedPrecondition, "{still}");
    agent.set_access(&record.id, BTreeMap::new(), FENCE).await.unwrap();
    assert!(client.is_closed().await, "a client whose access is gone is stopped");
    agent.delete_volume(&record.id).await.unwrap();
    agent.delete_volume(&record.id).await.expect("deleting what is gone succeeds");
    assert!(agent.volume(&record.id).is_none());
    assert!(refused(&record).await, "nothing serves a deleted volume");
    agent.shutdown().await;
}

#[tokio::test]
async fn access_admits_only_the_addresses_it_names_and_fences_the_ones_it_drops() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = open(&config(), dir.path()).await;
    let record = agent.create_volume(new_volume("access", MIB, None)).await.unwrap();
    assert_eq!(record.port, None, "a volume published nowhere has no server");

    let record = publish(&agent, &record.id, access(&["127.0.0.2"], false)).await;
    assert!(refused(&record).await, "a client from 127.0.0.1 is refused when only 127.0.0.2 may connect");

    let record = publish(&agent, &record.id, access(&["127.0.0.1"], true)).await;
    let mut reader = connect(&record).await;
    assert_eq!(reader.write(0, &[1; 512]).await.unwrap(), EPERM, "a read-only peer may not write");
    assert_eq!(reader.read(0, 512).await.unwrap(), vec![0; 512]);

    // The peer may now write: its read-only connection is stopped, and the
    // fence resolves once it is done with the file.
    let change = agent.set_access(&record.id, access(&["127.0.0.1"], false), FENCE).await.unwrap();
    assert_eq!(change, AccessChange { stopped: 1, port: record.port }, "the same server, the same port");
    assert!(reader.is_closed().await);
    let mut writer = connect(&record).await;
    assert_eq!(writer.write(0, &[2; 512]).await.unwrap(), 0);

    let change = agent.set_access(&record.id, access(&["127.0.0.2"], false), FENCE).await.unwrap();
    assert_eq!(change.stopped, 1, "the dropped address's connection is stopped");
    assert!(writer.is_closed().await);
    assert!(refused(&record).await);

    let missing = agent.set_access("vol-00000000000000000000000000000000", BTreeMap::new(), FENCE);
    let missing = missing.await.unwrap_err();
    assert_eq!(missing.kind(), Kind::NotFound);
    agent.shutdown().await;
}

#[tokio::test]
async fn snapshots_and_clones_are_point_in_time_copies_and_volumes_grow_online() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = open(&config(), dir.path()).await;
    let source = agent.create_volume(new_volume("source", 2 * MIB, None)).await.unwrap();
    let source = publish(&agent, &source.id, access(&["127.0.0.1"], false)).await;
    let mut client = connect(&source).await;
    assert_eq!(client.write(0, &[1; 4096]).await.unwrap(), 0);

    let new =
        NewSnapshot { id: None, name: "snap".into(), source_volume_id: source.id.clone(), parameters: BTreeMap::new() };
    let snapshot = agent.create_snapshot(new).await.unwrap();
    assert_eq!((snapshot.size_bytes, snapshot.source_block), (2 * MIB, Some(true)));
    assert_eq!(agent.find_snapshot_by_name("snap").as_ref(), Some(&snapshot));
    assert_eq!(client.write(0, &[2; 4096]).await.unwrap(), 0, "the source is writable again after the copy");

    let clone = agent.create_volume(new_volume("clone", 2 * MIB, Some(Source::Volume(source.id.clone()))));
    let clone = clone.await.unwrap();
    let restored = new_volume("restored", 3 * MIB, Some(Source::Snapshot(snapshot.id.clone())));
    let restored = agent.create_volume(restored).await.unwrap();
    let too_small = new_volume("small", MIB, Some(Source::Snapshot(snapshot.id.clone())));
    assert_eq!(agent.create_volume(too_small).await.unwrap_err().kind(), Kind::InvalidArgument);
    let gone = new_volume("gone", MIB, Some(Source::Snapshot("snap-00000000000000000000000000000000".into())));
    assert_eq!(agent.create_volume(gone).await.unwrap_err().kind(), Kind::NotFound);

    for (record, byte, size) in [(&clone, 2, 2 * MIB), (&restored, 1, 3 * MIB)] {
        let record = publish(&agent, &record.id, access(&["127.0.0.1"], false)).await;
        let mut copy = connect(&record).await;
        assert_eq!(copy.size, size);
        assert_eq!(copy.read(0, 4096).await.unwrap(), vec![byte; 4096], "{} holds its source's data", record.name);
    }

    assert_eq!(agent.expand_volume(&source.id, 4 * MIB).await.unwrap(), 4 * MIB);
    assert_eq!(agent.expand_volume(&source.id, MIB).await.unwrap(), 4 * MIB, "never shrinks");
    assert_eq!(agent.volume(&source.id).unwrap().record.capacity_bytes, 4 * MIB);
    assert_eq!(connect(&source).await.size, 4 * MIB, "a new connection sees the new size");

    agent.delete_snapshot(&snapshot.id).await.unwrap();
    assert!(agent.snapshot(&snapshot.id).is_none() && agent.snapshots().is_empty());
    assert_eq!(agent.volume_ids().len(), 3);
    drop(client);
    agent.shutdown().await;
}

#[tokio::test]
async fn a_missing_image_and_a_taken_port_are_reported_and_healed_by_the_refresh_pass() {
    let dir = tempfile::tempdir().unwrap();
    let config = config();
    let (agent, _) = open(&config, dir.path()).await;
    let lost = agent.create_volume(new_volume("lost", MIB, None)).await.unwrap();
    let lost = publish(&agent, &lost.id, access(&["127.0.0.1"], false)).await;
    let blocked = agent.create_volume(new_volume("blocked", MIB, None)).await.unwrap();
    let blocked = publish(&agent, &blocked.id, access(&["127.0.0.1"], false)).await;
    agent.shutdown().await;
    drop(agent);

    let image = dir.path().join("volumes").join(format!("{}.img", lost.id));
    let kept = dir.path().join("kept.img");
    std::fs::rename(&image, &kept).unwrap();
    let squatter = std::net::TcpListener::bind(address(&blocked)).unwrap();

    let (agent, recorded) = open(&config, dir.path()).await;
    let reports = recorded.take();
    assert_eq!(reports.len(), 2, "{reports:?}");
    let reported = |prefix: String| reports.iter().any(|r| r.starts_with(&prefix));
    assert!(reported(format!("image missing {} lost: image file", lost.id)), "{reports:?}");
    assert!(reported(format!("server down {} blocked: serving volume", blocked.id)), "{reports:?}");
    assert!(!agent.ready(), "a server that can start later holds readiness back");
    let broken = agent.volume(&lost.id).unwrap();
    assert!(matches!(&broken.condition, Condition::Broken(reason) if reason.contains("missing")), "{broken:?}");
    assert_eq!(broken.check_usable().unwrap_err().kind(), Kind::FailedPrecondition);
    let new = NewSnapshot {
        id: None,
        name: "of-lost".into(),
        source_volume_id: lost.id.clone(),
        parameters: BTreeMap::new(),
    };
    assert_eq!(agent.create_snapshot(new).await.unwrap_err().kind(), Kind::FailedPrecondition);
    assert_eq!(agent.volume(&blocked.id).unwrap().condition, Condition::NotServing);

    // Still down: reported again.
    agent.refresh().await;
    assert_eq!(recorded.take().len(), 1);

    drop(squatter);
    std::fs::rename(&kept, &image).unwrap();
    agent.refresh().await;
    assert!(recorded.take().is_empty());
    assert!(agent.ready());
    for record in [&lost, &blocked] {
        assert_eq!(agent.volume(&record.id).unwrap().condition, Condition::Serving);
        assert_eq!(connect(record).await.size, MIB, "{} serves on its port {:?}", record.name, record.port);
    }
    agent.shutdown().await;
}

#[tokio::test]
async fn creating_under_a_chosen_id_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = open(&config(), dir.path()).await;
    let id = format!("vol-{}", "ab".repeat(16));
    let new = NewVolume { id: Some(id.clone()), ..new_volume("chosen", MIB, None) };
    let created = agent.create_volume(new.clone()).await.unwrap();
    assert_eq!(created.id, id);
    assert_eq!(agent.create_volume(new).await.unwrap(), created, "the second creation finds the first");
    assert_eq!(agent.volume_ids(), std::slice::from_ref(&id));
    let bad = NewVolume { id: Some("vol-../../etc".into()), ..new_volume("bad", MIB, None) };
    assert_eq!(agent.create_volume(bad).await.unwrap_err().kind(), Kind::InvalidArgument);

    let snapshot_id = format!("snap-{}", "cd".repeat(16));
    let new = NewSnapshot {
        id: Some(snapshot_id.clone()),
        name: "chosen".into(),
        source_volume_id: id.clone(),
        parameters: BTreeMap::new(),
    };
    let taken = agent.create_snapshot(new.clone()).await.unwrap();
    assert_eq!(taken.id, snapshot_id);
    assert_eq!(agent.create_snapshot(new.clone()).await.unwrap(), taken);
    assert_eq!(agent.snapshots(), [taken]);
    let bad = NewSnapshot { id: Some(id), ..new };
    assert_eq!(agent.create_snapshot(bad).await.unwrap_err().kind(), Kind::InvalidArgument, "a volume id");
    agent.shutdown().await;
}

#[tokio::test]
async fn a_chosen_export_name_is_served_and_kept_and_a_bad_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = open(&config(), dir.path()).await;
    let chosen = "d".repeat(64);
    let new = NewVolume { export_name: Some(chosen.clone()), ..new_volume("named", MIB, None) };
    let record = agent.create_volume(new).await.unwrap();
    assert_eq!(record.export_name, chosen);
    let record = publish(&agent, &record.id, access(&["127.0.0.1"], false)).await;
    assert_eq!(connect(&record).await.size, MIB, "served under the chosen name");
    for bad in [String::new(), "x".repeat(4097)] {
        let new = NewVolume { export_name: Some(bad), ..new_volume("bad", MIB, None) };
        assert_eq!(agent.create_volume(new).await.unwrap_err().kind(), Kind::InvalidArgument);
    }
    let random = agent.create_volume(new_volume("random", MIB, None)).await.unwrap();
    assert_eq!(random.export_name.len(), 64, "without a chosen name, a random one as before");
    assert_ne!(random.export_name, chosen);
    agent.shutdown().await;
}

#[tokio::test]
async fn a_quarantined_volume_stops_serving_and_its_files_move_aside_intact() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = open(&config(), dir.path()).await;
    let record = agent.create_volume(new_volume("orphan", MIB, None)).await.unwrap();
    let kept = agent.create_volume(new_volume("kept", MIB, None)).await.unwrap();
    let record = publish(&agent, &record.id, access(&["127.0.0.1"], false)).await;
    let mut client = connect(&record).await;
    assert_eq!(client.write(0, &[0xab; 512]).await.unwrap(), 0);
    assert_eq!(client.flush().await.unwrap(), 0);
    drop(client);
    let aside = agent.quarantine_volume(&record.id).await.unwrap();
    assert_eq!(aside, dir.path().join(crate::QUARANTINE).join(&record.id));
    assert_eq!(agent.volume_ids(), std::slice::from_ref(&kept.id), "no longer the agent's");
    assert!(tokio::net::TcpStream::connect(address(&record)).await.is_err(), "its server is stopped");
    let image = std::fs::read(aside.join(format!("{}.img", record.id))).unwrap();
    assert_eq!(image.len() as u64, MIB);
    assert!(image[..512].iter().all(|b| *b == 0xab), "the data is kept");
    assert!(aside.join(format!("{}.json", record.id)).exists(), "and the record with it");
    assert!(!dir.path().join("volumes").join(format!("{}.img", record.id)).exists());
    agent.shutdown().await;
    // A restart does not bring it back, nor remove it.
    let (agent, _) = open(&config(), dir.path()).await;
    assert_eq!(agent.volume_ids(), std::slice::from_ref(&kept.id));
    assert!(aside.join(format!("{}.img", record.id)).exists());
    assert_eq!(agent.quarantine_volume(&record.id).await.unwrap_err().kind(), Kind::NotFound);
    agent.shutdown().await;
}

/// The port range bounds how many volumes are published at once, not how
/// many exist: a port is taken at the first publication, kept across a
/// restart, and given back at the last unpublication.
#[tokio::test]
async fn ports_are_taken_at_publication_and_given_back_at_the_last_unpublication() {
    let dir = tempfile::tempdir().unwrap();
    let base = config();
    let config = Config { ports: *base.ports.start()..=*base.ports.start() + 1, ..base };
    let (agent, _) = open(&config, dir.path()).await;
    let mut created = Vec::new();
    for name in ["a", "b", "c"] {
        let record = agent.create_volume(new_volume(name, MIB, None)).await.expect("more volumes than ports");
        assert_eq!(record.port, None);
        assert_eq!(agent.volume(&record.id).unwrap().condition, Condition::Unpublished);
        created.push(record);
    }
    assert!(agent.ready(), "nothing published, nothing to serve");
    let a = publish(&agent, &created[0].id, access(&["127.0.0.1"], false)).await;
    let b = publish(&agent, &created[1].id, access(&["127.0.0.1"], false)).await;
    assert_eq!([a.port, b.port], [Some(*config.ports.start()), Some(*config.ports.end())]);

    let full = agent.set_access(&created[2].id, access(&["127.0.0.1"], false), FENCE).await.unwrap_err();
    assert_eq!(full.kind(), Kind::ResourceExhausted, "{full}");
    let c = agent.volume(&created[2].id).unwrap().record;
    assert!(c.published.is_empty() && c.port.is_none(), "a refused publication changes nothing: {c:?}");

    let mut client = connect(&a).await;
    assert_eq!(client.write(0, &[7; 512]).await.unwrap(), 0);
    let change = agent.set_access(&a.id, BTreeMap::new(), FENCE).await.unwrap();
    assert_eq!(change, AccessChange { stopped: 1, port: None });
    assert!(client.is_closed().await);
    assert_eq!(agent.volume(&a.id).unwrap().condition, Condition::Unpublished);
    assert!(tokio::net::TcpStream::connect(address(&a)).await.is_err(), "its server is stopped");

    let c = publish(&agent, &c.id, access(&["127.0.0.1"], false)).await;
    assert_eq!(c.port, a.port, "the port given back is the first free one");
    agent.shutdown().await;
    drop(agent);

    // An older version kept a port for every volume: give back the ones of
    // volumes published nowhere.
    let path = dir.path().join("volumes").join(format!("{}.json", a.id));
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert!(json.get("port").is_none(), "{json}");
    json["port"] = serde_json::json!(*config.ports.end() + 100);
    std::fs::write(&path, json.to_string()).unwrap();

    let (agent, _) = open(&config, dir.path()).await;
    assert!(agent.ready());
    for record in [&b, &c] {
        let reopened = agent.volume(&record.id).unwrap();
        assert_eq!((reopened.condition, reopened.record.port), (Condition::Serving, record.port), "same port");
        assert_eq!(connect(record).await.size, MIB);
    }
    let mut reader = connect(&c).await;
    assert_eq!(reader.read(0, 512).await.unwrap(), vec![0; 512], "c's own data, not a's");
    assert_eq!(agent.volume(&a.id).unwrap().record.port, None, "the legacy port is given back");
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert!(saved.get("port").is_none(), "and the record saved without it: {saved}");
    agent.set_access(&b.id, BTreeMap::new(), FENCE).await.unwrap();
    let a = publish(&agent, &a.id, access(&["127.0.0.1"], false)).await;
    assert_eq!(connect(&a).await.read(0, 512).await.unwrap(), vec![7; 512], "a keeps its data unpublished");
    agent.shutdown().await;
}

#[tokio::test]
async fn usage_counts_the_blocks_each_image_allocated_and_the_free_space() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = open(&config(), dir.path()).await;
    let written = agent.create_volume(new_volume("written", 8 * MIB, None)).await.unwrap();
    let empty = agent.create_volume(new_volume("empty", 8 * MIB, None)).await.unwrap();
    let before = agent.usage().unwrap();
    assert_eq!(before.data_dir, dir.path());
    let allocated = |usage: &Usage, id: &str| usage.volumes.iter().find(|v| v.id == id).unwrap().allocated_bytes;
    assert!(allocated(&before, &written.id) < MIB, "a new image is sparse");
    let record = publish(&agent, &written.id, access(&["127.0.0.1"], false)).await;
    let mut client = connect(&record).await;
    for offset in (0..2 * MIB).step_by(64 * 1024) {
        assert_eq!(client.write(offset, &[0xa5; 64 * 1024]).await.unwrap(), 0);
    }
    assert_eq!(client.flush().await.unwrap(), 0);
    let after = agent.usage().unwrap();
    assert_eq!(after.volumes.len(), 2);
    assert!(after.volumes.iter().all(|v| v.capacity_bytes == 8 * MIB), "{:?}", after.volumes);
    let used = allocated(&after, &written.id);
    assert!((2 * MIB..8 * MIB).contains(&used), "2 MiB written, {used} bytes allocated");
    assert!(allocated(&after, &empty.id) < MIB, "nothing written, {} allocated", allocated(&after, &empty.id));
    // The free space is the data directory's filesystem's, as statvfs says.
    let st = nix::sys::statvfs::statvfs(dir.path()).unwrap();
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    assert!(after.space.available.abs_diff(free) < 64 * MIB, "{} vs {free}", after.space.available);
    assert!(after.space.available <= after.space.total);
    // A deleted volume is no longer counted.
    drop(client);
    agent.set_access(&empty.id, BTreeMap::new(), FENCE).await.unwrap();
    agent.delete_volume(&empty.id).await.unwrap();
    assert_eq!(agent.usage().unwrap().volumes.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), [written.id]);
    agent.shutdown().await;
}
