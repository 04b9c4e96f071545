use std::os::unix::fs::MetadataExt;

use super::*;

const MIB: u64 = 1 << 20;

fn file(len: u64) -> File {
    let file = tempfile::tempfile().unwrap();
    file.set_len(len).unwrap();
    file
}

fn read(file: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn chunks_are_a_mib_until_the_map_would_pass_its_cap() {
    assert_eq!(chunk_size(0), MIN_CHUNK);
    assert_eq!(chunk_size(4 << 30), MIB, "4 GiB: 4096 chunks of 1 MiB");
    assert_eq!(chunk_size(64 << 30), MIB, "64 GiB is exactly the cap");
    assert_eq!(chunk_size((64 << 30) + 1), 2 * MIB);
    assert_eq!(chunk_size(1 << 40), 16 * MIB);
    for size in [1, MIB + 1, 5 << 30, (1 << 40) + 12345, u64::MAX / 2] {
        assert!(size.div_ceil(chunk_size(size)) <= MAX_CHUNKS, "{size}");
    }
    let guard = CopyBeforeWrite::new(file(0), 3 * MIB + 1).unwrap();
    assert_eq!((guard.chunk(), guard.chunks()), (MIB, 4), "a partial last chunk counts");
}

#[test]
fn a_write_copies_exactly_the_chunks_it_touches_and_only_once() {
    let source = file(8 * MIB);
    source.write_all_at(&[1; 3 * MIB as usize], 2 * MIB).unwrap();
    let target = file(0);
    let guard = CopyBeforeWrite::new(target.try_clone().unwrap(), 8 * MIB).unwrap();
    assert_eq!(target.metadata().unwrap().len(), 8 * MIB, "the target is the source's size");
    assert!((0..8).all(|i| !guard.is_copied(i)) && !guard.is_complete());

    // 8 KiB across the boundary of chunks 2 and 3.
    guard.preserve(&source, 3 * MIB - 4096, 8192);
    source.write_all_at(&[2; 8192], 3 * MIB - 4096).unwrap();
    let copied: Vec<usize> = (0..8).filter(|&i| guard.is_copied(i)).collect();
    assert_eq!(copied, [2, 3]);
    assert_eq!(guard.copied_by_writes(), 2);
    assert_eq!(read(&target, 2 * MIB, 2 * MIB as usize), vec![1; 2 * MIB as usize], "the old data, saved first");

    // A chunk already copied costs nothing: its copy is not made again
    // (the marker planted in the target stays).
    target.write_all_at(b"marker", 2 * MIB).unwrap();
    guard.preserve(&source, 2 * MIB, 4096);
    guard.preserve(&source, 3 * MIB, 1);
    assert_eq!(guard.copied_by_writes(), 2);
    assert_eq!(read(&target, 2 * MIB, 6), b"marker");
    target.write_all_at(&[1; 6], 2 * MIB).unwrap();

    // Past the end and empty ranges touch nothing.
    guard.preserve(&source, 8 * MIB, 4096);
    guard.preserve(&source, 0, 0);
    assert_eq!(guard.copied_by_writes(), 2);

    guard.copy_rest(&source).unwrap();
    assert!(guard.is_complete());
    assert_eq!(guard.copied_by_writes(), 2, "the copier did the rest");
    let mut expected = vec![0u8; 8 * MIB as usize];
    expected[2 * MIB as usize..5 * MIB as usize].fill(1);
    assert_eq!(read(&target, 0, 8 * MIB as usize), expected, "the source as it was when the guard was made");
}

#[test]
fn the_copy_keeps_holes() {
    let source = file(64 * MIB);
    source.write_all_at(b"data", 5 * MIB + 17).unwrap();
    source.write_all_at(&[9; 4096], 60 * MIB).unwrap();
    let target = file(0);
    let guard = CopyBeforeWrite::new(target.try_clone().unwrap(), 64 * MIB).unwrap();
    guard.preserve(&source, 0, 64 * MIB);
    assert_eq!(guard.copied_by_writes(), 64, "every chunk, holes included, counts as copied");
    guard.copy_rest(&source).unwrap();
    assert_eq!(read(&target, 5 * MIB + 17, 4), b"data");
    assert_eq!(read(&target, 60 * MIB, 4096), vec![9; 4096]);
    assert!(target.metadata().unwrap().blocks() * 512 <= 4 * MIB, "64 MiB with 8 KiB of data stays sparse");
}
