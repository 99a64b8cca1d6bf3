//! A disk's bytes in shared 4 KiB chunks: cloned in proportion to the
//! disk's chunk count, copied in proportion to what is written after.
//!
//! The simulated disk keeps two images (what reads see and what is
//! durable), hands out the durable one as the base of every recorded
//! stretch, and is cloned whole by the campaigns' in-core checks. Between
//! two of those moments only a handful of blocks change, so an [`Image`]
//! is a vector of reference-counted chunks: a clone shares every chunk,
//! and a write copies only the chunk it lands in, and only when that
//! chunk is shared (a write of a whole chunk copies nothing old). A fresh
//! image of one fill byte shares a single chunk.

use std::ops::{Index, Range};
use std::sync::Arc;

use dmsim_model::block_device::{byte_range, BlockDevice, IoError, WriteFlags, SECTOR_SIZE};

/// Bytes per chunk: the metadata's block size and the host's page.
pub const CHUNK: usize = 4096;

type Chunk = Arc<[u8; CHUNK]>;

/// A disk image of any whole number of bytes, copy-on-write by 4 KiB
/// chunk (see the module's documentation). The last chunk may hold fewer
/// valid bytes than [`CHUNK`]; the rest of it is never read.
#[derive(Clone)]
pub struct Image {
    chunks: Vec<Chunk>,
    len: usize,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("len", &self.len).field("chunks", &self.chunks.len()).finish()
    }
}

impl Image {
    /// An image of `len` bytes, every one `fill` (one chunk, shared).
    pub fn filled(len: usize, fill: u8) -> Self {
        let chunk: Chunk = Arc::new([fill; CHUNK]);
        Image { chunks: vec![chunk; len.div_ceil(CHUNK)], len }
    }

    /// An image holding `bytes` (copied into chunks).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let chunks = bytes
            .chunks(CHUNK)
            .map(|piece| {
                let mut c = [0u8; CHUNK];
                c[..piece.len()].copy_from_slice(piece);
                Arc::new(c)
            })
            .collect();
        Image { chunks, len: bytes.len() }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Chunk `c`'s valid bytes ([`CHUNK`] of them but at the end of an
    /// image that is not a whole number of chunks; empty past the end).
    pub fn block(&self, c: u64) -> &[u8] {
        let Some(chunk) = usize::try_from(c).ok().and_then(|c| self.chunks.get(c)) else {
            return &[];
        };
        let start = c as usize * CHUNK;
        &chunk[..(self.len - start).min(CHUNK)]
    }

    /// Copies the bytes at `at..at + buf.len()` into `buf`.
    ///
    /// # Panics
    /// When the range reaches past the end (callers check requests with
    /// [`byte_range`] first).
    pub fn read(&self, at: usize, buf: &mut [u8]) {
        assert!(at + buf.len() <= self.len, "a read past the end of an image");
        for (c, off, part) in pieces(at, buf.len()) {
            let n = part.len();
            buf[part].copy_from_slice(&self.chunks[c][off..off + n]);
        }
    }

    /// Writes `data` at byte `at`, copying a shared chunk it lands in
    /// unless it covers all of it.
    ///
    /// # Panics
    /// When the range reaches past the end.
    pub fn write(&mut self, at: usize, data: &[u8]) {
        assert!(at + data.len() <= self.len, "a write past the end of an image");
        for (c, off, part) in pieces(at, data.len()) {
            let (n, piece) = (part.len(), &data[part]);
            if n == CHUNK {
                match Arc::get_mut(&mut self.chunks[c]) {
                    Some(owned) => owned.copy_from_slice(piece),
                    None => {
                        let mut fresh = [0u8; CHUNK];
                        fresh.copy_from_slice(piece);
                        self.chunks[c] = Arc::new(fresh);
                    }
                }
            } else {
                Arc::make_mut(&mut self.chunks[c])[off..off + n].copy_from_slice(piece);
            }
        }
    }

    /// The bytes in `range`, copied out.
    ///
    /// # Panics
    /// When the range reaches past the end.
    pub fn range(&self, range: Range<usize>) -> Vec<u8> {
        assert!(range.end <= self.len, "a read past the end of an image");
        // Appended chunk by chunk: no zeroing first (to_vec copies whole
        // disks for the checkers).
        let mut out = Vec::with_capacity(range.len());
        for (c, off, part) in pieces(range.start, range.len()) {
            out.extend_from_slice(&self.chunks[c][off..off + part.len()]);
        }
        out
    }

    /// Every byte, copied out.
    pub fn to_vec(&self) -> Vec<u8> {
        self.range(0..self.len)
    }

    /// Grows the image to `len` bytes (nothing if it is that long), the
    /// new bytes `fill`.
    pub fn grow(&mut self, len: usize, fill: u8) {
        if len <= self.len {
            return;
        }
        // The tail of the last chunk, past the old end, takes the fill.
        let tail = self.len % CHUNK;
        if tail != 0 {
            let end = (self.len - tail + CHUNK).min(len);
            let fill_bytes = vec![fill; end - self.len];
            let at = self.len;
            self.len = end;
            self.write(at, &fill_bytes);
        }
        let shared: Chunk = Arc::new([fill; CHUNK]);
        self.chunks.resize(len.div_ceil(CHUNK), shared);
        self.len = len;
    }

    /// The chunks whose bytes differ from `other`'s (the images being the
    /// same length; shared chunks are not compared).
    pub fn differing_chunks(&self, other: &Image) -> Vec<u64> {
        (0..self.chunks.len().max(other.chunks.len()))
            .filter(|&c| {
                let same_chunk = match (self.chunks.get(c), other.chunks.get(c)) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                };
                !same_chunk && self.block(c as u64) != other.block(c as u64)
            })
            .map(|c| c as u64)
            .collect()
    }
}

/// The pieces of `len` bytes at byte `at`, one per chunk they touch: the
/// chunk, the offset in it, and the piece's range within the `len` bytes.
fn pieces(at: usize, len: usize) -> impl Iterator<Item = (usize, usize, Range<usize>)> {
    let mut done = 0;
    std::iter::from_fn(move || {
        (done < len).then(|| {
            let pos = at + done;
            let (c, off) = (pos / CHUNK, pos % CHUNK);
            let n = (len - done).min(CHUNK - off);
            done += n;
            (c, off, done - n..done)
        })
    })
}

impl From<Vec<u8>> for Image {
    fn from(bytes: Vec<u8>) -> Self {
        Image::from_bytes(&bytes)
    }
}

impl From<&[u8]> for Image {
    fn from(bytes: &[u8]) -> Self {
        Image::from_bytes(bytes)
    }
}

impl Index<usize> for Image {
    type Output = u8;
    fn index(&self, i: usize) -> &u8 {
        assert!(i < self.len, "byte {i} of an image of {} bytes", self.len);
        &self.chunks[i / CHUNK][i % CHUNK]
    }
}

impl PartialEq for Image {
    fn eq(&self, other: &Image) -> bool {
        self.len == other.len
            && self
                .chunks
                .iter()
                .zip(&other.chunks)
                .enumerate()
                .all(|(c, (a, b))| Arc::ptr_eq(a, b) || self.block(c as u64) == other.block(c as u64))
    }
}

impl Eq for Image {}

impl PartialEq<[u8]> for Image {
    fn eq(&self, other: &[u8]) -> bool {
        self.len == other.len()
            && other.chunks(CHUNK).enumerate().all(|(c, piece)| self.block(c as u64) == piece)
    }
}

impl PartialEq<&[u8]> for Image {
    fn eq(&self, other: &&[u8]) -> bool {
        *self == **other
    }
}

impl PartialEq<Vec<u8>> for Image {
    fn eq(&self, other: &Vec<u8>) -> bool {
        *self == other[..]
    }
}

impl PartialEq<&Image> for Image {
    fn eq(&self, other: &&Image) -> bool {
        *self == **other
    }
}

impl PartialEq<Image> for Vec<u8> {
    fn eq(&self, other: &Image) -> bool {
        *other == self[..]
    }
}

impl PartialEq<&Image> for Vec<u8> {
    fn eq(&self, other: &&Image) -> bool {
        **other == self[..]
    }
}

/// An image is a device with no write cache: every write is durable at
/// once (as `MemDevice`), and a clone of it costs its chunk count.
impl BlockDevice for Image {
    fn nr_sectors(&self) -> u64 {
        self.len as u64 / SECTOR_SIZE
    }

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let r = byte_range(sector, buf.len(), self.nr_sectors() * SECTOR_SIZE)?;
        Image::read(self, r.start, buf);
        Ok(())
    }

    fn write(&mut self, sector: u64, buf: &[u8], _flags: WriteFlags) -> Result<(), IoError> {
        let r = byte_range(sector, buf.len(), self.nr_sectors() * SECTOR_SIZE)?;
        Image::write(self, r.start, buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_clone_shares_its_chunks_until_one_side_writes() {
        let mut a = Image::filled(3 * CHUNK + 512, 7);
        let b = a.clone();
        a.write(CHUNK + 100, &[1, 2, 3]);
        assert_eq!(b, vec![7u8; 3 * CHUNK + 512], "the clone is unchanged");
        assert_eq!(a.range(CHUNK + 99..CHUNK + 104), vec![7, 1, 2, 3, 7]);
        assert_eq!(a.differing_chunks(&b), vec![1]);
        a.write(CHUNK, &[7u8; CHUNK]);
        assert_eq!(a, b, "equal again, in bytes");
        assert!(a.differing_chunks(&b).is_empty());
    }

    #[test]
    fn growing_fills_the_last_chunk_and_new_ones() {
        let mut a = Image::from_bytes(&[1u8; 1024]);
        a.grow(CHUNK + 512, 9);
        let mut want = vec![1u8; 1024];
        want.resize(CHUNK + 512, 9);
        assert_eq!(a, want);
        a.grow(512, 0);
        assert_eq!(a.len(), CHUNK + 512, "never shrinks");
    }

    proptest! {
        /// Any sequence of writes (aligned or not, within a chunk or
        /// across several) leaves the image holding what a plain vector
        /// holds, a clone taken midway holds what the vector held then,
        /// and reads of any range agree.
        #[test]
        fn an_image_reads_as_a_vector_written_the_same(
            len in 1usize..5 * CHUNK,
            writes in prop::collection::vec((0usize..5 * CHUNK, 0usize..2 * CHUNK + 10, any::<u8>()), 0..12),
            snapshot_after in 0usize..12,
            read in (0usize..5 * CHUNK, 0usize..5 * CHUNK),
        ) {
            let mut image = Image::filled(len, 0xa5);
            let mut plain = vec![0xa5u8; len];
            let mut snapshot = None;
            for (i, (at, n, byte)) in writes.into_iter().enumerate() {
                if i == snapshot_after {
                    snapshot = Some((image.clone(), plain.clone()));
                }
                let at = at % len;
                let n = n.min(len - at);
                image.write(at, &vec![byte; n]);
                plain[at..at + n].fill(byte);
            }
            prop_assert!(image == plain);
            prop_assert_eq!(image.to_vec(), plain.clone());
            let (a, b) = (read.0 % len, read.1 % len);
            let r = a.min(b)..a.max(b);
            prop_assert_eq!(image.range(r.clone()), plain[r].to_vec());
            if let Some((old, old_plain)) = snapshot {
                prop_assert!(old == old_plain);
            }
        }
    }
}
