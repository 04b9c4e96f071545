//! Recycled payload buffers, so the I/O path does not allocate per request.

use std::sync::Mutex;

/// Buffers larger than this are not kept: a burst of 32 MiB requests must
/// not pin that memory forever.
const MAX_POOLED_CAPACITY: usize = 4 << 20;
const MAX_POOLED: usize = 256;

#[derive(Debug, Default)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// A buffer of exactly `len` bytes. Contents are whatever was there
    /// before: callers overwrite all of it. Only growth is zero-filled, so a
    /// steady request size costs no memset.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let recycled = self.free.lock().ok().and_then(|mut free| free.pop());
        let mut buf = recycled.unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        buf.truncate(len);
        buf
    }

    pub fn give(&self, buf: Vec<u8>) {
        if buf.capacity() > MAX_POOLED_CAPACITY {
            return;
        }
        if let Ok(mut free) = self.free.lock()
            && free.len() < MAX_POOLED
        {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_buffers_without_growing() {
        let pool = BufferPool::default();
        let mut a = pool.take(4096);
        a.fill(7);
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(512);
        assert_eq!(b.len(), 512);
        assert_eq!(b.as_ptr(), ptr, "the freed buffer is reused");
        pool.give(b);
        let c = pool.take(4096);
        assert_eq!(c.len(), 4096);
        assert_eq!(c.as_ptr(), ptr);
    }

    #[test]
    fn drops_oversized_buffers() {
        let pool = BufferPool::default();
        pool.give(vec![0; MAX_POOLED_CAPACITY + 1]);
        assert!(pool.free.lock().unwrap().is_empty());
    }
}
