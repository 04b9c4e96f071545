//! Copy-before-write through a real session: with a guard installed on the
//! export, WRITE, TRIM and WRITE_ZEROES first save the old data of the
//! chunks they touch into the copy, then change the file; a chunk already
//! saved is not copied again; the background pass finishes the copy, which
//! is the file as it was when the guard went in, whatever was written since.

mod common;

use std::sync::Arc;

use common::*;
use nbd::server::CopyBeforeWrite;
use nbd::{CommandFlags, cmd};

#[tokio::test]
async fn writes_trims_and_zeroes_save_the_old_data_first() {
    // The first 16 MiB hold the pattern; the rest is a hole.
    let file = file_with_data(0, 16 * MIB as usize);
    let mut h = start_with(file, config());
    h.client.negotiate(false, false).await;
    let before = read_file(&h.file, 0, SIZE as usize);

    let target = tempfile::tempfile().unwrap();
    let copy = Arc::new(CopyBeforeWrite::new(target.try_clone().unwrap(), SIZE).unwrap());
    {
        let _paused = h.export.write_gate().pause().await;
        h.export.start_copy(Arc::clone(&copy));
    }
    assert_eq!(h.export.copies_in_progress(), 1);

    // One chunk each: a write, a trim, zeroes (with and without NO_HOLE),
    // and a write into the hole.
    assert_eq!(h.client.write_simple(CommandFlags::empty(), 0, &[0xee; 4096]).await, 0);
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::TRIM, 2 * MIB, MIB as u32).await, 0);
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::WRITE_ZEROES, 4 * MIB + 512, 4096).await, 0);
    assert_eq!(h.client.command(CommandFlags::NO_HOLE, cmd::WRITE_ZEROES, 6 * MIB, 8192).await, 0);
    assert_eq!(h.client.write_simple(CommandFlags::empty(), 40 * MIB, &[0xab; 4096]).await, 0);
    // Each request copies the chunks it touches, no more: one chunk each
    // but the 1 MiB trim, which covers 1 MiB of chunks.
    let chunk = SIZE / copy.chunks() as u64;
    assert!(chunk < MIB && MIB.is_multiple_of(chunk), "chunks of {chunk} bytes");
    let at = |offset: u64| (offset / chunk) as usize;
    let trimmed: Vec<usize> = (at(2 * MIB)..at(3 * MIB)).collect();
    let mut want = vec![at(0)];
    want.extend(&trimmed);
    want.extend([at(4 * MIB), at(6 * MIB), at(40 * MIB)]);
    assert_eq!(copy.copied_by_writes(), want.len() as u64);
    let saved: Vec<usize> = (0..copy.chunks()).filter(|&i| copy.is_copied(i)).collect();
    assert_eq!(saved, want);
    assert_eq!(read_file(&target, 2 * MIB, MIB as usize), before[2 * MIB as usize..3 * MIB as usize]);

    // The same chunks again, and a refused request: nothing more is copied.
    assert_eq!(h.client.write_simple(CommandFlags::empty(), 4096, &[0xcd; 4096]).await, 0);
    assert_eq!(h.client.command(CommandFlags::empty(), cmd::TRIM, 2 * MIB + 4096, 4096).await, 0);
    assert_ne!(h.client.command(CommandFlags::empty(), cmd::TRIM, SIZE, 4096).await, 0);
    assert_eq!(copy.copied_by_writes(), want.len() as u64);

    let (source, rest) = (h.file.try_clone().unwrap(), Arc::clone(&copy));
    tokio::task::spawn_blocking(move || rest.copy_rest(&source)).await.unwrap().unwrap();
    h.export.end_copy(&copy);
    assert_eq!(h.export.copies_in_progress(), 0);
    assert_eq!(read_file(&target, 0, SIZE as usize), before, "the copy is the file at the instant");
    assert_ne!(read_file(&h.file, 0, SIZE as usize), before, "while the file moved on");

    // Guard gone: writes copy nothing.
    assert_eq!(h.client.write_simple(CommandFlags::empty(), 50 * MIB, &[1; 4096]).await, 0);
    assert_eq!(read_file(&target, 50 * MIB, 4096), vec![0; 4096]);
}
