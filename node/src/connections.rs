//! How many connections to open to an export: the rule this project exists for.

use nbd::consts::transmission_flags::CAN_MULTI_CONN;

/// Most connections the node opens to one export.
pub const MAX_CONNECTIONS: usize = 8;

/// The default: one connection per CPU, within [1, MAX_CONNECTIONS].
pub fn default_connections() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_CONNECTIONS)
}

/// Several connections only when the server set NBD_FLAG_CAN_MULTI_CONN
/// (bit 8): only then are FLUSH and FUA visible across connections. Any other
/// bit, SEND_CACHE (bit 10, which qemu 3.0 put on bit 8) included, means one.
pub fn connection_count(transmission_flags: u16, wanted: usize) -> usize {
    if transmission_flags & CAN_MULTI_CONN != 0 { wanted.clamp(1, MAX_CONNECTIONS) } else { 1 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd::consts::transmission_flags as tf;

    #[test]
    fn multi_conn_bit_8_allows_several() {
        assert_eq!(connection_count(tf::HAS_FLAGS | (1 << 8), 4), 4);
        assert_eq!(connection_count(tf::HAS_FLAGS | tf::CAN_MULTI_CONN, 64), MAX_CONNECTIONS);
        assert_eq!(connection_count(tf::CAN_MULTI_CONN, 0), 1);
    }

    #[test]
    fn send_cache_bit_10_never_allows_several() {
        assert_eq!(connection_count(tf::HAS_FLAGS | (1 << 10), 4), 1);
    }

    #[test]
    fn no_other_bit_allows_several() {
        for bit in (0..16).filter(|&b| b != 8) {
            assert_eq!(connection_count(1 << bit, 8), 1, "bit {bit}");
        }
        assert_eq!(connection_count(!tf::CAN_MULTI_CONN, 8), 1);
    }

    #[test]
    fn default_is_within_bounds() {
        assert!((1..=MAX_CONNECTIONS).contains(&default_connections()));
    }
}
