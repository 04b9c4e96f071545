use std::os::unix::fs::MetadataExt;

use super::*;

const KIB: u64 = 1 << 10;
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

/// What a write does: save first, then change the file.
fn write(guard: &CopyBeforeWrite, source: &File, data: &[u8], offset: u64) {
    guard.preserve(source, offset, data.len() as u64);
    source.write_all_at(data, offset).unwrap();
}

#[test]
fn chunks_are_64_kib_until_the_map_would_pass_its_cap() {
    assert_eq!(chunk_size(0), MIN_CHUNK);
    assert_eq!(chunk_size(4 << 30), 64 * KIB, "4 GiB: 65536 chunks of 64 KiB");
    assert_eq!(chunk_size(256 << 30), 64 * KIB, "256 GiB is exactly the cap");
    assert_eq!(chunk_size((256 << 30) + 1), 128 * KIB);
    assert_eq!(chunk_size(4 << 40), MIB);
    for size in [1, MIB + 1, 5 << 30, (1 << 40) + 12345, u64::MAX / 2] {
        assert!(size.div_ceil(chunk_size(size)) <= MAX_CHUNKS, "{size}");
    }
    let guard = CopyBeforeWrite::new(file(0), 3 * MIB + 1).unwrap();
    assert_eq!((guard.chunk(), guard.chunks()), (64 * KIB, 49), "a partial last chunk counts");
}

#[test]
fn a_write_copies_exactly_the_chunks_it_touches_and_only_once() {
    let source = file(8 * MIB);
    source.write_all_at(&[1; 3 * MIB as usize], 2 * MIB).unwrap();
    let target = file(0);
    let guard = CopyBeforeWrite::new(target.try_clone().unwrap(), 8 * MIB).unwrap();
    let chunk = guard.chunk();
    assert_eq!(target.metadata().unwrap().len(), 8 * MIB, "the target is the source's size");
    assert!((0..guard.chunks()).all(|i| !guard.is_copied(i)) && !guard.is_complete());

    // 8 KiB across the boundary of the chunks around 3 MiB.
    write(&guard, &source, &[2; 8192], 3 * MIB - 4096);
    let copied: Vec<usize> = (0..guard.chunks()).filter(|&i| guard.is_copied(i)).collect();
    let at = (3 * MIB / chunk) as usize;
    assert_eq!(copied, [at - 1, at]);
    assert_eq!(guard.copied_by_writes(), 2);
    assert_eq!(
        read(&target, 3 * MIB - chunk, 2 * chunk as usize),
        vec![1; 2 * chunk as usize],
        "the old data, saved first"
    );

    // A chunk already copied costs nothing: its copy is not made again
    // (the marker planted in the target stays).
    target.write_all_at(b"marker", 3 * MIB).unwrap();
    write(&guard, &source, &[3; 4096], 3 * MIB);
    write(&guard, &source, &[3; 1], 3 * MIB - 1);
    assert_eq!(guard.copied_by_writes(), 2);
    assert_eq!(read(&target, 3 * MIB, 6), b"marker");
    target.write_all_at(&[1; 6], 3 * MIB).unwrap();

    // Past the end and empty ranges touch nothing.
    guard.preserve(&source, 8 * MIB, 4096);
    guard.preserve(&source, 0, 0);
    assert_eq!(guard.copied_by_writes(), 2);

    guard.copy_rest(&source).unwrap();
    assert!(guard.is_complete());
    assert_eq!(guard.copied_by_writes(), 2, "the pass did the rest");
    let mut expected = vec![0u8; 8 * MIB as usize];
    expected[2 * MIB as usize..5 * MIB as usize].fill(1);
    assert_eq!(read(&target, 0, 8 * MIB as usize), expected, "the source as it was when the guard was made");
}

/// What a write waits for is what it copies: a 4 KiB write copies its
/// 64 KiB chunk, not the whole MiB around it (16 times the I/O, which a
/// queue of random writes paid once per write during a copy).
#[test]
fn a_small_write_copies_64_kib_not_the_mib_around_it() {
    let source = file(4 * MIB);
    source.write_all_at(&[1; 4 * MIB as usize], 0).unwrap();
    let target = file(0);
    let guard = CopyBeforeWrite::new(target.try_clone().unwrap(), 4 * MIB).unwrap();
    let before = target.metadata().unwrap().blocks() * 512;

    write(&guard, &source, &[2; 4096], MIB + 68 * KIB);
    assert_eq!(read(&target, MIB + 64 * KIB, 64 * KIB as usize), vec![1; 64 * KIB as usize], "its chunk, saved");
    let rest_of_the_mib = [read(&target, MIB, 64 * KIB as usize), read(&target, MIB + 128 * KIB, 896 * KIB as usize)];
    assert!(rest_of_the_mib.iter().all(|r| r.iter().all(|&b| b == 0)), "the rest of the MiB is not copied");
    let written = target.metadata().unwrap().blocks() * 512 - before;
    assert!(written <= 64 * KIB, "the write copied {written} bytes");

    guard.copy_rest(&source).unwrap();
    assert_eq!(read(&target, 0, 4 * MIB as usize), vec![1; 4 * MIB as usize]);
}

#[test]
fn the_copy_keeps_holes() {
    let source = file(64 * MIB);
    source.write_all_at(b"data", 5 * MIB + 17).unwrap();
    source.write_all_at(&[9; 4096], 60 * MIB).unwrap();
    let target = file(0);
    let guard = CopyBeforeWrite::new(target.try_clone().unwrap(), 64 * MIB).unwrap();
    guard.preserve(&source, 0, 64 * MIB);
    assert_eq!(guard.copied_by_writes(), 1024, "every chunk, holes included, counts as copied");
    guard.copy_rest(&source).unwrap();
    assert_eq!(read(&target, 5 * MIB + 17, 4), b"data");
    assert_eq!(read(&target, 60 * MIB, 4096), vec![9; 4096]);
    assert!(target.metadata().unwrap().blocks() * 512 <= 4 * MIB, "64 MiB with 8 KiB of data stays sparse");
}

/// The two ways a reader can lose the race for a chunk, made to happen in
/// that order: what it read is dropped, and the target keeps the data of
/// the instant that the winner wrote.
#[test]
fn a_copy_that_loses_the_race_for_a_chunk_writes_nothing() {
    let source = file(2 * MIB);
    source.write_all_at(&[1; 2 * MIB as usize], 0).unwrap();
    let target = file(0);
    let guard = CopyBeforeWrite::new(target.try_clone().unwrap(), 2 * MIB).unwrap();
    let chunk = guard.chunk();
    let per_read = MIB / chunk;

    // A write claims chunk 3 and changes it; then the pass reads the first
    // MiB (chunk 3 already new) and claims the rest of it.
    write(&guard, &source, &[2; 4096], 3 * chunk);
    let mut buf = vec![0; MIB as usize];
    read_with_holes(&source, 0, &mut buf).unwrap();
    assert_eq!(guard.claim_and_write(0, per_read, &buf).unwrap(), per_read - 1, "all but the written chunk");
    assert_eq!(read(&target, 3 * chunk, chunk as usize), vec![1; chunk as usize], "the pass did not overwrite it");

    // A write reads chunk 20 (in the second MiB), the pass claims that MiB
    // first, and the chunk changes (a write that found it claimed): the
    // first write's read is stale, and it must not land in the target.
    let mut stale = vec![0; chunk as usize];
    let mut ahead = vec![0; MIB as usize];
    read_with_holes(&source, MIB, &mut ahead).unwrap();
    assert_eq!(guard.claim_and_write(per_read, 2 * per_read, &ahead).unwrap(), per_read);
    source.write_all_at(&vec![3; chunk as usize], 20 * chunk).unwrap();
    read_with_holes(&source, 20 * chunk, &mut stale).unwrap();
    assert_eq!(guard.claim_and_write(20, 21, &stale).unwrap(), 0, "the pass had it");
    assert_eq!(read(&target, 20 * chunk, chunk as usize), vec![1; chunk as usize]);

    guard.copy_rest(&source).unwrap();
    assert_eq!(read(&target, 0, 2 * MIB as usize), vec![1; 2 * MIB as usize]);
}

#[test]
fn holes_read_as_zeros_and_data_as_data() {
    let source = file(3 * MIB);
    source.write_all_at(&[5; 8192], MIB - 4096).unwrap();
    let mut buf = vec![7; 2 * MIB as usize];
    read_with_holes(&source, 0, &mut buf).unwrap();
    let mut expected = vec![0; 2 * MIB as usize];
    expected[(MIB - 4096) as usize..(MIB + 4096) as usize].fill(5);
    assert_eq!(buf, expected, "stale bytes in the buffer are cleared where the file has holes");
    let mut tail = vec![7; MIB as usize];
    read_with_holes(&source, 2 * MIB, &mut tail).unwrap();
    assert!(tail.iter().all(|&b| b == 0), "a range past the last data is all zeros");
}

/// Writers on several threads (as several connections are) and the pass,
/// all at once, with no order imposed: the target is still the source at
/// the instant, byte for byte.
#[test]
fn writers_racing_the_pass_still_copy_the_instant() {
    const SIZE: u64 = 32 * MIB;
    const WRITERS: u64 = 4;
    const WRITES: u64 = 3000;
    let source = file(SIZE);
    // Every 4 KiB block of the instant is different, and part is a hole.
    for block in 0..SIZE / 4096 - 256 {
        source.write_all_at(&[(block % 251) as u8 + 1; 4096], block * 4096).unwrap();
    }
    let instant = read(&source, 0, SIZE as usize);
    let target = file(0);
    let guard = CopyBeforeWrite::new(target.try_clone().unwrap(), SIZE).unwrap();
    // The pass starts once every writer has made a few writes.
    let started = std::sync::Barrier::new(WRITERS as usize + 1);
    std::thread::scope(|s| {
        for writer in 0..WRITERS {
            let (guard, source, started) = (&guard, &source, &started);
            s.spawn(move || {
                let mut rng = 0x2545_f491_4f6c_dd1du64 ^ writer;
                for n in 0..WRITES {
                    if n == 10 {
                        started.wait();
                    }
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    // Mostly 4 KiB, some unaligned and across chunks.
                    let len = if n % 8 == 0 { 4096 + rng % (200 * KIB) } else { 4096 };
                    let offset = (rng >> 20) % (SIZE - len);
                    write(guard, source, &vec![0xf0 | writer as u8; len as usize], offset);
                }
            });
        }
        started.wait();
        guard.copy_rest(&source).unwrap();
    });
    assert!(guard.copied_by_writes() > 0, "the writes before the pass copied their chunks");
    assert!(read(&target, 0, SIZE as usize) == instant, "the target is the source at the instant");
}
