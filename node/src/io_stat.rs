//! The kernel's I/O counters of a block device: `/sys/block/nbdX/stat`,
//! one line of decimal fields (the kernel's Documentation/block/stat.rst).
//! Kernels before 4.18 write 11 fields, 4.18 adds 4 for discards, 5.5 two
//! for flushes; fields a later kernel appends are ignored. Sector counts are
//! in 512-byte units whatever the device's block size, times in
//! milliseconds.

use std::io::Read as _;
use std::path::Path;

/// A `stat` file is one short line; anything longer is not one.
pub const MAX_STAT_FILE: u64 = 4096;

/// The kernel's sector unit in `stat`, whatever the logical block size.
const SECTOR: u64 = 512;

/// The fields of one device's `stat` file that the metrics report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoStat {
    pub reads_completed: u64,
    pub read_sectors: u64,
    pub read_ms: u64,
    pub writes_completed: u64,
    pub write_sectors: u64,
    pub write_ms: u64,
    /// Requests issued to the driver and not yet completed.
    pub in_flight: u64,
    /// Milliseconds the device had at least one request in flight.
    pub io_ms: u64,
    /// Since Linux 4.18.
    pub discards_completed: Option<u64>,
    /// Since Linux 5.5.
    pub flushes_completed: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0} fields, at least 11 expected")]
    TooFew(usize),
    #[error("field {index} ({field:?}) is not a decimal counter")]
    NotANumber { index: usize, field: String },
}

impl IoStat {
    pub fn read_bytes(&self) -> u64 {
        self.read_sectors.saturating_mul(SECTOR)
    }

    pub fn written_bytes(&self) -> u64 {
        self.write_sectors.saturating_mul(SECTOR)
    }
}

/// Parses the contents of a `stat` file.
pub fn parse(text: &str) -> Result<IoStat, ParseError> {
    let mut fields = Vec::with_capacity(17);
    for (index, field) in text.split_ascii_whitespace().take(17).enumerate() {
        let value = field
            .parse::<u64>()
            .map_err(|_| ParseError::NotANumber { index: index + 1, field: field.chars().take(32).collect() })?;
        fields.push(value);
    }
    if fields.len() < 11 {
        return Err(ParseError::TooFew(fields.len()));
    }
    // A kernel with discards but not flushes writes 15 fields.
    let optional = |i: usize| fields.get(i).copied();
    Ok(IoStat {
        reads_completed: fields[0],
        read_sectors: fields[2],
        read_ms: fields[3],
        writes_completed: fields[4],
        write_sectors: fields[6],
        write_ms: fields[7],
        in_flight: fields[8],
        io_ms: fields[9],
        discards_completed: optional(11),
        flushes_completed: optional(15),
    })
}

/// Reads and parses a `stat` file (at most [`MAX_STAT_FILE`] bytes). A
/// blocking read of sysfs: call it off the async runtime.
pub fn read(path: &Path) -> std::io::Result<IoStat> {
    let mut text = String::new();
    std::fs::File::open(path)?.take(MAX_STAT_FILE).read_to_string(&mut text)?;
    parse(&text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/sys/block/nbd0/stat` of a 5.10 kernel after a dd write and read
    /// (17 fields, right-aligned as the kernel prints them).
    const LINUX_5_10: &str = "     312      0    18424     156     2051        0  1048584    8212        2     8304     8368        7        0     2048        3       11       40\n";

    #[test]
    fn parses_every_field_of_a_recent_kernel() {
        let s = parse(LINUX_5_10).unwrap();
        assert_eq!(
            s,
            IoStat {
                reads_completed: 312,
                read_sectors: 18424,
                read_ms: 156,
                writes_completed: 2051,
                write_sectors: 1048584,
                write_ms: 8212,
                in_flight: 2,
                io_ms: 8304,
                discards_completed: Some(7),
                flushes_completed: Some(11),
            }
        );
        assert_eq!(s.read_bytes(), 18424 * 512);
        assert_eq!(s.written_bytes(), 1048584 * 512);
    }

    #[test]
    fn older_kernels_have_no_discard_or_flush_fields() {
        let eleven = "1 0 8 4 2 0 16 8 0 12 12\n";
        let s = parse(eleven).unwrap();
        assert_eq!((s.reads_completed, s.writes_completed, s.io_ms), (1, 2, 12));
        assert_eq!((s.discards_completed, s.flushes_completed), (None, None));
        let fifteen = "1 0 8 4 2 0 16 8 0 12 12 5 0 40 1\n";
        assert_eq!(parse(fifteen).unwrap().discards_completed, Some(5));
        assert_eq!(parse(fifteen).unwrap().flushes_completed, None);
        // Fields a later kernel appends are ignored.
        let later = format!("{} 99 98", LINUX_5_10.trim_end());
        assert_eq!(parse(&later).unwrap(), parse(LINUX_5_10).unwrap());
    }

    #[test]
    fn malformed_files_are_errors() {
        assert_eq!(parse(""), Err(ParseError::TooFew(0)));
        assert_eq!(parse("1 2 3 4 5 6 7 8 9 10\n"), Err(ParseError::TooFew(10)));
        assert_eq!(parse("1 0 8 4 x 0 16 8 0 12 12\n"), Err(ParseError::NotANumber { index: 5, field: "x".into() }));
        assert!(matches!(parse("1 0 -8 4 2 0 16 8 0 12 12"), Err(ParseError::NotANumber { index: 3, .. })));
        assert!(matches!(
            parse("1 0 8 4 2 0 99999999999999999999999 8 0 12 12"),
            Err(ParseError::NotANumber { index: 7, .. })
        ));
    }

    #[test]
    fn reads_a_file_and_names_it_in_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("stat");
        std::fs::write(&path, LINUX_5_10).unwrap();
        assert_eq!(read(&path).unwrap().writes_completed, 2051);
        std::fs::write(&path, "garbage\n").unwrap();
        let e = read(&path).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("stat") && e.to_string().contains("not a decimal"), "{e}");
        // A huge file is not read whole: only its first MAX_STAT_FILE bytes.
        std::fs::write(&path, "1 ".repeat(1 << 20)).unwrap();
        assert_eq!(read(&path).unwrap().reads_completed, 1);
        assert!(read(&tmp.path().join("missing")).is_err());
    }
}
