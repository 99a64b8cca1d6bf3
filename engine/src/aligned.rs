//! A page-aligned bounce buffer: `O_DIRECT` needs the memory, the offset
//! and the length aligned to the device's logical block; callers' buffers
//! are not.

/// Alignment of the bounce buffer: a page, enough for every logical block
/// size Linux supports.
pub const ALIGN: usize = 4096;

/// A growable buffer whose usable part starts on an [`ALIGN`] boundary.
#[derive(Debug, Default)]
pub struct AlignedBuf {
    /// Backing memory, `ALIGN` bytes longer than the usable part.
    raw: Vec<u8>,
    /// Start of the usable part in `raw`.
    start: usize,
    /// Usable length.
    len: usize,
}

impl AlignedBuf {
    /// The first `len` bytes of the buffer, grown as needed (contents
    /// unspecified).
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        if len > self.len {
            self.raw = vec![0u8; len + ALIGN];
            let addr = self.raw.as_ptr() as usize;
            self.start = addr.next_multiple_of(ALIGN) - addr;
            self.len = len;
        }
        &mut self.raw[self.start..self.start + len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slice_starts_on_a_page_boundary() {
        let mut b = AlignedBuf::default();
        for len in [512, 4096, 3 * 4096 + 512, 100, 1 << 20] {
            let s = b.get(len);
            assert_eq!(s.len(), len);
            assert_eq!(s.as_ptr() as usize % ALIGN, 0, "{len}");
        }
    }
}
