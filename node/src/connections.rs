//! How many connections to open to an export: the rule this project exists for.

use nbd::TransmissionFlags;

/// Most connections the node opens to one export.
pub const MAX_CONNECTIONS: usize = 8;

/// The default: one connection per CPU, within [1, MAX_CONNECTIONS].
pub fn default_connections() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_CONNECTIONS)
}

/// Several connections only when the server set NBD_FLAG_CAN_MULTI_CONN
/// (bit 8): only then are FLUSH and FUA visible across connections. Any other
/// bit, SEND_CACHE (bit 10, which qemu 3.0 put on bit 8) included, means one.
pub fn connection_count(transmission_flags: TransmissionFlags, wanted: usize) -> usize {
    if transmission_flags.contains(TransmissionFlags::CAN_MULTI_CONN) { wanted.clamp(1, MAX_CONNECTIONS) } else { 1 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd::TransmissionFlags as tf;

    /// Flags exactly as a server may send them, unknown bits included.
    fn raw(bits: u16) -> tf {
        tf::from_bits_retain(bits)
    }

    #[test]
    fn multi_conn_bit_8_allows_several() {
        assert_eq!(connection_count(raw(1 | 1 << 8), 4), 4);
        assert_eq!(connection_count(tf::HAS_FLAGS | tf::CAN_MULTI_CONN, 64), MAX_CONNECTIONS);
        assert_eq!(connection_count(tf::CAN_MULTI_CONN, 0), 1);
    }

    #[test]
    fn send_cache_bit_10_never_allows_several() {
        assert_eq!(connection_count(raw(1 | 1 << 10), 4), 1);
    }

    #[test]
    fn no_other_bit_allows_several() {
        for bit in (0..16).filter(|&b| b != 8) {
            assert_eq!(connection_count(raw(1 << bit), 8), 1, "bit {bit}");
        }
        assert_eq!(connection_count(raw(!(1 << 8)), 8), 1);
        assert_eq!(connection_count(raw(u16::MAX).difference(tf::CAN_MULTI_CONN), 8), 1);
    }

    #[test]
    fn default_is_within_bounds() {
        assert!((1..=MAX_CONNECTIONS).contains(&default_connections()));
    }
}
