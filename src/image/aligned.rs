//! Chunk buffers for O_DIRECT: bytes that start on a DIRECT_ALIGN boundary,
//! in safe code (a larger Vec, used from its first aligned byte), and the
//! check that a transfer may go direct.

/// What O_DIRECT transfers must be aligned to (a multiple of every logical
/// sector size).
pub const DIRECT_ALIGN: usize = 4096;

pub struct AlignedBuf {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(capacity: usize) -> AlignedBuf {
        let v = vec![0u8; capacity + DIRECT_ALIGN];
        let off = v.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf { v, off, len: 0 }
    }

    /// How many bytes [`AlignedBuf::take`] can give.
    pub fn capacity(&self) -> usize {
        self.v.len() - self.off
    }

    /// The first `len` bytes (at most the capacity).
    pub fn take(&mut self, len: usize) -> &mut [u8] {
        self.len = len;
        &mut self.v[self.off..self.off + len]
    }

    pub fn bytes(&self) -> &[u8] {
        &self.v[self.off..self.off + self.len]
    }
}

/// Whether a transfer of `buf` at `offset` meets O_DIRECT's alignment.
pub fn direct_ok(buf: &[u8], offset: u64) -> bool {
    buf.as_ptr().align_offset(DIRECT_ALIGN) == 0
        && buf.len() % DIRECT_ALIGN == 0
        && offset % DIRECT_ALIGN as u64 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_whatever_the_allocator_gives() {
        for cap in [0, 1, 4096, 1 << 20] {
            let mut b = AlignedBuf::new(cap);
            let s = b.take(cap);
            assert_eq!(s.len(), cap);
            assert!(direct_ok(b.bytes(), 0) || cap % DIRECT_ALIGN != 0);
        }
        assert!(!direct_ok(AlignedBuf::new(8192).take(8192), 512));
    }
}
