//! Recycled payload buffers, so the I/O path does not allocate per request.
//!
//! Buffers come in power-of-two size classes and a request only ever gets
//! a buffer of its own class: a 1-byte READ never walks away with the 4 MiB
//! buffer a WRITE left behind. What a buffer holds is therefore known before
//! it is taken ([`BufferPool::capacity_for`]), and that capacity, not the
//! request length, is what the connection's byte budget is charged, so the
//! budget bounds real memory. Idle buffers kept for reuse are bounded in
//! bytes, so a connection at rest holds a few MiB at most, whatever it did
//! before.

use std::sync::Mutex;

/// The smallest class: one page; small requests share it.
const MIN_CLASS: usize = 4 << 10;
/// Buffers above this are allocated for their request alone and not kept:
/// a burst of 32 MiB requests must not pin that memory forever.
const MAX_POOLED_CLASS: usize = 4 << 20;
const CLASSES: usize = (MAX_POOLED_CLASS / MIN_CLASS).trailing_zeros() as usize + 1;
/// Idle bytes kept across all classes; beyond it a returned buffer is
/// freed, unless its class has none idle (so a steady request size stays
/// allocation-free even after a burst of another size filled the pool).
/// With that exception the idle total stays under twice this.
const IDLE_LIMIT: usize = 8 << 20;

#[derive(Debug, Default)]
pub struct BufferPool {
    idle: Mutex<Idle>,
}

#[derive(Debug, Default)]
struct Idle {
    classes: [Vec<Vec<u8>>; CLASSES],
    bytes: usize,
}

/// The class index of a capacity that is a pooled class.
fn class_index(capacity: usize) -> Option<usize> {
    let pooled = capacity.is_power_of_two() && (MIN_CLASS..=MAX_POOLED_CLASS).contains(&capacity);
    pooled.then(|| (capacity / MIN_CLASS).trailing_zeros() as usize)
}

impl BufferPool {
    /// The capacity of the buffer [`take`](Self::take) hands out for `len`
    /// bytes: charge this much, not `len`, against a memory budget.
    pub fn capacity_for(len: usize) -> usize {
        if len > MAX_POOLED_CLASS { len } else { len.next_power_of_two().max(MIN_CLASS) }
    }

    /// A buffer of exactly `len` bytes whose capacity is exactly
    /// [`capacity_for`](Self::capacity_for)`(len)`. Contents are whatever
    /// was there before: callers overwrite all of it. Only growth is
    /// zero-filled, so a steady request size costs no memset.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let capacity = Self::capacity_for(len);
        let recycled = class_index(capacity).and_then(|class| {
            let mut idle = self.idle.lock().ok()?;
            let buf = idle.classes[class].pop()?;
            idle.bytes -= capacity;
            Some(buf)
        });
        // `with_capacity` allocates exactly what it is asked for, and a
        // resize within the capacity never reallocates.
        let mut buf = recycled.unwrap_or_else(|| Vec::with_capacity(capacity));
        if buf.len() < len {
            buf.resize(len, 0);
        }
        buf.truncate(len);
        buf
    }

    pub fn give(&self, buf: Vec<u8>) {
        let capacity = buf.capacity();
        let Some(class) = class_index(capacity) else { return };
        if let Ok(mut idle) = self.idle.lock()
            && (idle.bytes + capacity <= IDLE_LIMIT || idle.classes[class].is_empty())
        {
            idle.bytes += capacity;
            idle.classes[class].push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle_bytes(pool: &BufferPool) -> usize {
        pool.idle.lock().unwrap().bytes
    }

    #[test]
    fn reuses_buffers_of_the_same_class_without_growing() {
        let pool = BufferPool::default();
        let mut a = pool.take(4096);
        a.fill(7);
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(512);
        assert_eq!((b.len(), b.capacity()), (512, 4096));
        assert_eq!(b.as_ptr(), ptr, "the freed buffer is reused");
        pool.give(b);
        let c = pool.take(4096);
        assert_eq!(c.len(), 4096);
        assert_eq!(c.as_ptr(), ptr);
    }

    #[test]
    fn a_small_request_never_takes_a_big_buffer() {
        let pool = BufferPool::default();
        let big = pool.take(4 << 20);
        assert_eq!(big.capacity(), 4 << 20);
        pool.give(big);
        let small = pool.take(1);
        assert_eq!((small.len(), small.capacity()), (1, MIN_CLASS));
        assert_eq!(idle_bytes(&pool), 4 << 20, "the big buffer stays idle for the next big request");
    }

    #[test]
    fn capacity_is_what_take_hands_out() {
        let pool = BufferPool::default();
        for len in [0, 1, 4095, 4096, 4097, 65535, 65536, (1 << 20) + 1, 4 << 20, (4 << 20) + 1, 32 << 20] {
            let buf = pool.take(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.capacity(), BufferPool::capacity_for(len), "len {len}");
            assert!(buf.capacity() <= (2 * len).max(MIN_CLASS), "len {len}: at most twice the request");
            pool.give(buf);
        }
    }

    #[test]
    fn idle_memory_is_bounded_in_bytes() {
        let pool = BufferPool::default();
        let held: Vec<_> = (0..64).map(|_| pool.take(1 << 20)).collect();
        held.into_iter().for_each(|buf| pool.give(buf));
        assert_eq!(idle_bytes(&pool), IDLE_LIMIT);
        // A full pool still keeps one buffer of a class it has none of.
        pool.give(pool.take(4 << 20));
        assert_eq!(idle_bytes(&pool), IDLE_LIMIT + (4 << 20));
        pool.give(vec![0; 4 << 20]);
        assert_eq!(idle_bytes(&pool), IDLE_LIMIT + (4 << 20));
    }

    #[test]
    fn drops_oversized_and_odd_buffers() {
        let pool = BufferPool::default();
        pool.give(vec![0; MAX_POOLED_CLASS * 2]);
        pool.give(Vec::with_capacity(5000));
        pool.give(pool.take((4 << 20) + 1));
        assert_eq!(idle_bytes(&pool), 0);
        assert!(pool.idle.lock().unwrap().classes.iter().all(Vec::is_empty));
    }
}
