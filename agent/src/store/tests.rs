use super::*;

pub(crate) fn volume(id: &str) -> VolumeRecord {
    VolumeRecord {
        format: FORMAT,
        id: id.to_string(),
        name: format!("name-{id}"),
        capacity_bytes: 1 << 20,
        block: true,
        access_modes: vec![1],
        fs_type: String::new(),
        parameters: BTreeMap::new(),
        source: None,
        port: Some(10900),
        export_name: "secret".into(),
        read_only: false,
        published: BTreeMap::new(),
        tls: ExportTls::Off,
    }
}

fn vid(n: u8) -> String {
    format!("vol-{}", format!("{n:02x}").repeat(16))
}

#[test]
fn ids_are_checked_before_they_become_paths() {
    assert!(is_volume_id(&vid(1)));
    assert!(!is_volume_id("vol-../../etc/passwd"));
    assert!(!is_volume_id(&format!("snap-{}", "0".repeat(32))));
    assert!(is_snapshot_id(&format!("snap-{}", "a".repeat(32))));
    assert!(!is_snapshot_id(&format!("snap-{}", "A".repeat(32))));
    let token = random_hex(32).unwrap();
    assert_eq!(token.len(), 64);
    assert_ne!(token, random_hex(32).unwrap());
}

#[test]
fn records_and_images_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (store, loaded) = Store::open(dir.path()).unwrap();
    assert!(loaded.volumes.is_empty());
    let id = vid(1);
    store.create_volume_image(&id, 8 << 20, None).unwrap();
    let mut record = volume(&id);
    store.save_volume(&record).unwrap();
    record.published.insert(
        "node-a".into(),
        Publication { read_only: false, access_mode: 1, addresses: Some(vec!["192.0.2.1".parse().unwrap()]) },
    );
    store.save_volume(&record).unwrap();
    std::fs::OpenOptions::new().write(true).open(store.volume_image(&id)).unwrap();
    let (store, loaded) = Store::open(dir.path()).unwrap();
    assert_eq!(loaded.volumes.get(&id), Some(&record));
    assert_eq!(fs::metadata(store.volume_image(&id)).unwrap().len(), 8 << 20);
    store.remove_volume(&id).unwrap();
    let (_, loaded) = Store::open(dir.path()).unwrap();
    assert!(loaded.volumes.is_empty());
}

#[test]
fn crash_leftovers_are_cleaned_and_acknowledged_state_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let kept = vid(1);
    store.create_volume_image(&kept, 1 << 20, None).unwrap();
    store.save_volume(&volume(&kept)).unwrap();
    let vols = dir.path().join(VOLUMES);
    // A crash while writing a record update: the temp file holds half of it.
    fs::write(vols.join(format!("{kept}.json.tmp")), b"{\"format\": 1, \"id\": \"vo").unwrap();
    // A crash while preparing an image, and one after the image but before its record.
    let unacked = vid(2);
    fs::write(vols.join(format!("{unacked}.img.tmp")), b"x").unwrap();
    fs::write(vols.join(format!("{}.img", vid(3))), b"x").unwrap();
    let (_, loaded) = Store::open(dir.path()).unwrap();
    assert_eq!(loaded.volumes.keys().cloned().collect::<Vec<_>>(), vec![kept.clone()]);
    let mut left: Vec<_> =
        fs::read_dir(&vols).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    assert_eq!(left, vec![format!("{kept}.img"), format!("{kept}.json")]);
}

#[test]
fn partially_written_record_is_a_clear_error_and_data_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let id = vid(4);
    store.create_volume_image(&id, 1 << 20, None).unwrap();
    fs::write(store.volume_image(&id), b"precious").unwrap();
    let json = dir.path().join(VOLUMES).join(format!("{id}.json"));
    let full = serde_json::to_vec(&volume(&id)).unwrap();
    fs::write(&json, &full[..full.len() / 2]).unwrap();
    let err = Store::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("corrupt record") && err.contains(&id), "{err}");
    assert_eq!(fs::read(store.volume_image(&id)).unwrap(), b"precious");
    assert!(json.exists());
    // A record whose id does not match its file name is corrupt too.
    fs::write(&json, serde_json::to_vec(&volume(&vid(5))).unwrap()).unwrap();
    assert!(Store::open(dir.path()).unwrap_err().to_string().contains("does not match"));
    // So is a record from a newer format.
    let mut newer = volume(&id);
    newer.format = FORMAT + 1;
    fs::write(&json, serde_json::to_vec(&newer).unwrap()).unwrap();
    assert!(Store::open(dir.path()).unwrap_err().to_string().contains("format"));
}

/// The TLS mode survives a save and a reload; records of plaintext volumes
/// (and of versions before TLS) carry no `tls` key and load as off.
#[test]
fn a_volumes_tls_mode_is_kept_in_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let (required, plain) = (vid(6), vid(7));
    for id in [&required, &plain] {
        store.create_volume_image(id, 1 << 20, None).unwrap();
    }
    store.save_volume(&VolumeRecord { tls: ExportTls::Required, ..volume(&required) }).unwrap();
    store.save_volume(&volume(&plain)).unwrap();
    let on_disk = fs::read_to_string(dir.path().join(VOLUMES).join(format!("{required}.json"))).unwrap();
    assert!(on_disk.contains(r#""tls": "required""#), "{on_disk}");
    let plain_json = fs::read_to_string(dir.path().join(VOLUMES).join(format!("{plain}.json"))).unwrap();
    assert!(!plain_json.contains("tls"), "a plaintext record is as before TLS: {plain_json}");
    let (_, loaded) = Store::open(dir.path()).unwrap();
    assert_eq!(loaded.volumes[&required].tls, ExportTls::Required);
    assert_eq!(loaded.volumes[&plain].tls, ExportTls::Off);
    let allowed = serde_json::to_string(&volume(&plain)).unwrap().replacen('{', r#"{"tls":"allowed","#, 1);
    assert_eq!(serde_json::from_str::<VolumeRecord>(&allowed).unwrap().tls, ExportTls::Allowed);
    let bad = serde_json::to_string(&volume(&plain)).unwrap().replacen('{', r#"{"tls":"on","#, 1);
    assert!(serde_json::from_str::<VolumeRecord>(&bad).is_err(), "an unknown mode is refused, not read as off");
    assert!(ExportTls::Off < ExportTls::Allowed && ExportTls::Allowed < ExportTls::Required);
}

#[test]
fn capacity_check_refuses_more_than_free_space() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let space = store.space().unwrap();
    assert!(space.total >= space.available && space.available > 0);
    store.check_space(1).unwrap();
    let err = store.check_space(space.total.saturating_mul(4).max(u64::MAX / 2)).unwrap_err();
    assert_eq!(err.kind(), crate::error::Kind::ResourceExhausted);
}

#[test]
fn clone_copies_content_and_grows() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path()).unwrap();
    let (a, b) = (vid(6), vid(7));
    store.create_volume_image(&a, 1 << 20, None).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &File::options().write(true).open(store.volume_image(&a)).unwrap(),
        b"abc",
        100,
    )
    .unwrap();
    let snap = format!("snap-{}", "1".repeat(32));
    store.create_snapshot_image(&snap, &store.volume_image(&a)).unwrap();
    store.create_volume_image(&b, 2 << 20, Some(&store.snapshot_image(&snap))).unwrap();
    let data = fs::read(store.volume_image(&b)).unwrap();
    assert_eq!(data.len(), 2 << 20);
    assert_eq!(&data[100..103], b"abc");
}

fn mode(path: &Path) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&fs::metadata(path).unwrap().permissions()) & 0o7777
}

/// Every file and directory under `root` (root included) with its mode.
fn modes(root: &Path) -> Vec<(PathBuf, u32)> {
    let mut found = vec![(root.to_path_buf(), mode(root))];
    for entry in fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(modes(&path));
        } else {
            found.push((path.clone(), mode(&path)));
        }
    }
    found
}

fn snapshot(id: &str, source: &str) -> SnapshotRecord {
    SnapshotRecord {
        format: FORMAT,
        id: id.to_string(),
        name: format!("name-{id}"),
        source_volume_id: source.to_string(),
        size_bytes: 1 << 20,
        created_seconds: 1,
        created_nanos: 2,
        parameters: BTreeMap::new(),
        source_block: Some(true),
        source_tls: Default::default(),
    }
}

#[test]
fn records_images_and_directories_are_private_under_the_usual_umask() {
    use nix::sys::stat::{Mode, umask};
    // 022, the usual default, under which the old code made 0644 files in
    // 0755 directories. The umask is per process and other tests run in
    // parallel threads, so it is only ever set to that default here.
    let old = umask(Mode::from_bits_truncate(0o022));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let (store, _) = Store::open(&root).unwrap();
    let id = vid(8);
    store.create_volume_image(&id, 1 << 20, None).unwrap();
    store.save_volume(&volume(&id)).unwrap();
    store.save_volume(&volume(&id)).unwrap();
    let snap = format!("snap-{}", "2".repeat(32));
    store.create_snapshot_image(&snap, &store.volume_image(&id)).unwrap();
    store.save_snapshot(&snapshot(&snap, &id)).unwrap();
    umask(old);
    let found = modes(&root);
    for (path, mode) in &found {
        let want = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(*mode, want, "{} is {mode:o}", path.display());
    }
    // Three directories, two images, two records and the metadata reserve.
    assert_eq!(found.len(), 3 + 4 + 1, "{found:?}");
}

#[test]
fn a_store_made_world_readable_by_an_older_version_is_made_private_at_open() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let id = vid(9);
    let snap = format!("snap-{}", "3".repeat(32));
    // What the old code left under umask 022.
    for sub in ["", VOLUMES, SNAPSHOTS] {
        fs::create_dir_all(root.join(sub)).unwrap();
        fs::set_permissions(root.join(sub), fs::Permissions::from_mode(0o755)).unwrap();
    }
    let files = [
        (root.join(VOLUMES).join(format!("{id}.json")), serde_json::to_vec(&volume(&id)).unwrap()),
        (root.join(VOLUMES).join(format!("{id}.img")), vec![0; 4096]),
        (root.join(SNAPSHOTS).join(format!("{snap}.json")), serde_json::to_vec(&snapshot(&snap, &id)).unwrap()),
        (root.join(SNAPSHOTS).join(format!("{snap}.img")), vec![0; 4096]),
    ];
    for (path, bytes) in &files {
        fs::write(path, bytes).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (_, loaded) = Store::open(&root).unwrap();
    assert_eq!(loaded.volumes.len(), 1);
    assert_eq!(loaded.snapshots.len(), 1);
    for (path, want) in modes(&root).into_iter().map(|(p, _)| {
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        (p, want)
    }) {
        assert_eq!(mode(&path), want, "{}", path.display());
    }
}

#[test]
fn snapshot_records_of_older_versions_load_without_the_source_access_type() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _) = Store::open(dir.path()).unwrap();
    let snap = format!("snap-{}", "4".repeat(32));
    let mut json = serde_json::to_value(snapshot(&snap, &vid(1))).unwrap();
    json.as_object_mut().unwrap().remove("source_block").unwrap();
    fs::write(dir.path().join(SNAPSHOTS).join(format!("{snap}.json")), json.to_string()).unwrap();
    fs::write(dir.path().join(SNAPSHOTS).join(format!("{snap}.img")), b"").unwrap();
    let (_, loaded) = Store::open(dir.path()).unwrap();
    assert_eq!(loaded.snapshots[&snap].source_block, None);
}

#[test]
fn a_failed_record_write_on_a_full_disk_leaves_no_temp_file() {
    let fs = crate::testing::Tmpfs::mount(1 << 20);
    crate::testing::fill(&fs.path().join("filler"), 2 << 20);
    let err = atomic::write(fs.path(), "a.json", &[b'x'; 8192]).unwrap_err();
    assert!(reserve::is_full(&err), "{err}");
    let mut names: Vec<_> = fs::read_dir(fs.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, vec![std::ffi::OsString::from("filler")]);
}

#[test]
fn record_writes_on_a_full_disk_draw_on_the_reserve_which_refills_when_space_is_freed() {
    let fs = crate::testing::Tmpfs::mount(4 << 20);
    let (store, _) = Store::open(fs.path()).unwrap();
    assert_eq!(store.reserve_len().unwrap(), reserve::SIZE);
    let id = vid(10);
    store.create_volume_image(&id, 1 << 20, None).unwrap();
    store.save_volume(&volume(&id)).unwrap();
    let filler = fs.path().join("filler");
    crate::testing::fill(&filler, 8 << 20);
    assert_eq!(store.space().unwrap().available, 0);

    let mut record = volume(&id);
    for n in 0..reserve::MAX_SLICES_PER_WRITE * 4 {
        record.published.insert(format!("node-{n}"), Publication { read_only: false, access_mode: 1, addresses: None });
        store.save_volume(&record).unwrap();
    }
    assert!(store.reserve_len().unwrap() < reserve::SIZE);
    assert!(crate::testing::temp_files(fs.path()).is_empty());
    let (store, loaded) = Store::open(fs.path()).unwrap();
    assert_eq!(loaded.volumes[&id], record);

    fs::remove_file(&filler).unwrap();
    store.refill_reserve();
    assert_eq!(store.reserve_len().unwrap(), reserve::SIZE);
    let reserve_file = fs.path().join(reserve::NAME);
    assert!(std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&reserve_file).unwrap()) * 512 >= reserve::SIZE);
    assert_eq!(mode(&reserve_file), 0o600);
}
