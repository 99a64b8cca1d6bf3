//! The block manager: a write-back cache of 4 KiB metadata blocks over a
//! [`BlockDevice`], standing in for the kernel's dm-block-manager and
//! dm-bufio.
//!
//! Blocks are validated when they are read from the device (location and
//! checksum, per [`BlockKind`]) and sealed when they are written back,
//! because the kernel computes checksums at write-out time, not when a
//! block is modified. Dirty blocks stay in memory until [`BlockManager::flush`]
//! writes them all and issues a device flush — the kernel's `dm_bm_flush`.
//! The kernel may also write dirty blocks early (bufio write-back); the
//! simulator models that through [`BlockManager::write_back`].

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use super::layout::{self, BlockKind, BLOCK_SECTORS, BLOCK_SIZE};
use super::{BlockNr, PdataError, Result};
use crate::block_device::{BlockDevice, WriteFlags};

/// One 4 KiB block's bytes.
pub type BlockData = [u8; BLOCK_SIZE];

#[derive(Debug, Clone)]
struct CachedBlock {
    data: Box<BlockData>,
    /// The validator the block was read or created with; `None` for raw
    /// reads (the superblock's all-zero test).
    kind: Option<BlockKind>,
    dirty: bool,
}

/// Most clean blocks kept in memory before the cache drops them. Only a
/// bound on memory: which blocks are cached never changes what is written.
const MAX_CLEAN_BLOCKS: usize = 1 << 16;

/// The cache's hasher: block numbers are small integers, looked up on
/// every block access, so a multiply (Fibonacci hashing) serves where
/// the standard library's SipHash cost 7% of the metadata campaign. Not
/// keyed: nothing here hashes input chosen to collide, and the map is
/// never iterated where order matters.
#[derive(Debug, Default, Clone, Copy)]
struct BlockNrHasher(u64);

impl Hasher for BlockNrHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(23) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
}

/// A write-back cache of metadata blocks.
#[derive(Debug, Clone)]
pub struct BlockManager<D> {
    dev: D,
    /// By block number. A hash map: it is looked up on every block access
    /// and iterated only where order does not matter or is sorted
    /// ([`Self::dirty_blocks`]).
    cache: HashMap<BlockNr, CachedBlock, BuildHasherDefault<BlockNrHasher>>,
    nr_clean: usize,
    /// The device failed a read or a write, or a block read from it was
    /// not valid, since the last [`Self::reset`] (see
    /// [`Self::failed_since_reset`]).
    failed: bool,
    /// A write of [`Self::reset`]'s write-back failed: dm-bufio keeps it as
    /// the client's `async_write_error`, and the next flush reports it.
    async_write_error: Option<PdataError>,
    /// Cached blocks that read without error but failed validation
    /// ([`Self::holds_invalid_blocks`]).
    invalid: BTreeSet<BlockNr>,
}

impl<D: BlockDevice> BlockManager<D> {
    /// A block manager over `dev`; its size is the device size in whole
    /// 4 KiB blocks.
    pub fn new(dev: D) -> Self {
        BlockManager {
            dev,
            cache: HashMap::default(),
            nr_clean: 0,
            failed: false,
            async_write_error: None,
            invalid: BTreeSet::new(),
        }
    }

    /// Blocks in the device: its size now, in whole 4 KiB blocks, read
    /// afresh each time as the kernel's `dm_bm_nr_blocks` does (a metadata
    /// device grown under the pool shows its new size at once).
    pub fn nr_blocks(&self) -> u64 {
        self.dev.nr_sectors() / BLOCK_SECTORS
    }

    /// The device underneath.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The device underneath, mutable (for fault injection between steps).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.dev
    }

    /// Consumes the block manager, dropping unwritten changes, and returns
    /// the device.
    pub fn into_device(self) -> D {
        self.dev
    }

    fn check_bounds(&self, b: BlockNr) -> Result<()> {
        let nr_blocks = self.nr_blocks();
        if b >= nr_blocks {
            return Err(PdataError::OutOfBounds { block: b, nr_blocks });
        }
        Ok(())
    }

    /// Whether the device failed a read or a write, or gave a block that
    /// is not valid, since the last [`Self::reset`] (an abort): the
    /// operation that met it failed part-way, and until the transaction is
    /// aborted its in-core state is whatever that left.
    pub fn failed_since_reset(&self) -> bool {
        self.failed
    }

    fn load(&mut self, b: BlockNr, kind: Option<BlockKind>) -> Result<&mut CachedBlock> {
        self.check_bounds(b)?;
        if !self.cache.contains_key(&b) {
            let mut data = Box::new([0u8; BLOCK_SIZE]);
            if let Err(source) = self.dev.read(b * BLOCK_SECTORS, &mut data[..]) {
                self.failed = true;
                return Err(PdataError::Io { block: b, source });
            }
            // Cached before it is validated (below), and kept when it is
            // not valid (a flipped bit, a misdirected write): dm-bufio
            // frees a buffer on release only after a read *error*
            // (`dm_bufio_release`), and dm-block-manager sets a buffer's
            // validator only once it passed (`dm_bm_validate_buffer`), so
            // every later read of the block checks the same bad bytes
            // again and fails again, until an abort resets the cache.
            self.trim_clean();
            self.nr_clean += 1;
            self.cache.insert(b, CachedBlock { data, kind: None, dirty: false });
        }
        let cached = self.cache.get_mut(&b).expect("just inserted");
        match (cached.kind, kind) {
            (Some(have), Some(want)) if have != want => Err(PdataError::Invalid(format!(
                "block {b} is cached as a {have} but was asked for as a {want}"
            ))),
            (None, Some(want)) if !cached.dirty => {
                if let Err(e) = validate(&cached.data[..], b, want) {
                    self.failed = true;
                    self.invalid.insert(b);
                    return Err(e);
                }
                cached.kind = Some(want);
                self.invalid.remove(&b);
                Ok(cached)
            }
            _ => Ok(cached),
        }
    }

    fn trim_clean(&mut self) {
        if self.nr_clean >= MAX_CLEAN_BLOCKS {
            self.cache.retain(|_, c| c.dirty);
            self.nr_clean = 0;
            self.invalid.clear();
        }
    }

    /// Reads block `b`, checking it is a valid block of `kind`.
    pub fn read(&mut self, b: BlockNr, kind: BlockKind) -> Result<&BlockData> {
        Ok(&self.load(b, Some(kind))?.data)
    }

    /// Reads block `b` with no validation.
    pub fn read_raw(&mut self, b: BlockNr) -> Result<&BlockData> {
        Ok(&self.load(b, None)?.data)
    }

    /// Write-locks block `b` in place: reads it (validated) and marks it
    /// dirty.
    pub fn write(&mut self, b: BlockNr, kind: BlockKind) -> Result<&mut BlockData> {
        let cached = self.load(b, Some(kind))?;
        if !cached.dirty {
            cached.dirty = true;
            self.nr_clean -= 1;
        }
        Ok(&mut self.cache.get_mut(&b).expect("loaded").data)
    }

    /// Write-locks block `b` without reading it: the buffer starts zeroed.
    pub fn write_zero(&mut self, b: BlockNr, kind: BlockKind) -> Result<&mut BlockData> {
        self.check_bounds(b)?;
        let was_clean = self.cache.get(&b).is_some_and(|c| !c.dirty);
        if was_clean {
            self.nr_clean -= 1;
        }
        self.invalid.remove(&b);
        let cached = self.cache.entry(b).or_insert_with(|| CachedBlock {
            data: Box::new([0u8; BLOCK_SIZE]),
            kind: None,
            dirty: true,
        });
        cached.data.fill(0);
        cached.kind = Some(kind);
        cached.dirty = true;
        Ok(&mut cached.data)
    }

    /// The blocks modified since they were last written, in block order.
    pub fn dirty_blocks(&self) -> Vec<BlockNr> {
        let mut dirty: Vec<BlockNr> = self.cache.iter().filter(|(_, c)| c.dirty).map(|(&b, _)| b).collect();
        dirty.sort_unstable();
        dirty
    }

    /// Writes one dirty block to the device now (bufio's early write-back),
    /// sealing it; it stays cached, clean. Does nothing to a clean block.
    pub fn write_back(&mut self, b: BlockNr) -> Result<()> {
        let Some(cached) = self.cache.get_mut(&b) else { return Ok(()) };
        if !cached.dirty {
            return Ok(());
        }
        let kind = cached.kind.expect("dirty blocks always have a kind");
        kind.prepare_for_write(&mut cached.data[..], b);
        // dm-bufio clears a buffer's dirty bit when it submits the write
        // and does not set it again when the write fails: a block whose
        // write failed is clean, and a later write-back (the abort's) does
        // not retry it.
        cached.dirty = false;
        self.nr_clean += 1;
        if let Err(source) = self.dev.write(b * BLOCK_SECTORS, &cached.data[..], WriteFlags::default()) {
            self.failed = true;
            return Err(PdataError::Io { block: b, source });
        }
        Ok(())
    }

    /// The kernel's `dm_bm_flush`: writes every dirty block (plain writes,
    /// in block order), then flushes the device.
    pub fn flush(&mut self) -> Result<()> {
        for b in self.dirty_blocks() {
            self.write_back(b)?;
        }
        let flushed = self.dev.flush().map_err(|source| {
            self.failed = true;
            PdataError::Io { block: 0, source }
        });
        // `dm_bufio_write_dirty_buffers`: a write error of an earlier
        // write-back of the client's comes first.
        if let Some(e) = self.async_write_error.take() {
            self.failed = true;
            return Err(e);
        }
        flushed
    }

    /// Writes every dirty block back, sealed and unflushed, in block order
    /// (dm-bufio's `drop_buffers`, when a client is reset or destroyed);
    /// the first write error, if any.
    pub fn write_back_all(&mut self) -> Option<PdataError> {
        let mut first = None;
        for b in self.dirty_blocks() {
            if let Err(e) = self.write_back(b) {
                first.get_or_insert(e);
            }
        }
        first
    }

    /// The kernel's `dm_block_manager_reset` (thin's abort): dm-bufio's
    /// `drop_buffers` writes the dirty blocks back (unflushed), then every
    /// cached block is forgotten. A write that fails there is kept, as
    /// bufio's `async_write_error`, for the next [`Self::flush`] to report.
    pub fn reset(&mut self) {
        if let Some(e) = self.write_back_all() {
            self.async_write_error.get_or_insert(e);
        }
        self.cache.clear();
        self.nr_clean = 0;
        self.failed = false;
        self.invalid.clear();
    }

    /// Whether the cache holds a block that read without error but failed
    /// validation: every read of it fails again until a [`Self::reset`]
    /// (or a write-lock that zeroes it), so any request whose path reads
    /// it may fail, however long after the fault that corrupted it.
    pub fn holds_invalid_blocks(&self) -> bool {
        !self.invalid.is_empty()
    }

    /// Drops a write error [`Self::reset`] kept (the client it belonged to
    /// was destroyed, as the cache's abort destroys its old one).
    pub fn forget_write_errors(&mut self) {
        self.async_write_error = None;
    }
}

/// Checks a block read from disk against its kind's validator: the
/// self-location field first (-ENOTBLK), then the checksum (-EILSEQ), then,
/// for btree nodes, the kernel's header sanity checks.
pub fn validate(data: &[u8], b: BlockNr, kind: BlockKind) -> Result<()> {
    let claimed = layout::get_u64(data, kind.blocknr_offset());
    if claimed != b {
        return Err(PdataError::WrongLocation { kind, block: b, claimed });
    }
    let stored = super::checksum::stored_checksum(data);
    let computed = super::checksum::block_checksum(data, kind.salt());
    if stored != computed {
        return Err(PdataError::Checksum { kind, block: b, stored, computed });
    }
    if kind == BlockKind::BtreeNode {
        use layout::node;
        let nr_entries = layout::get_u32(data, node::NR_ENTRIES) as u64;
        let max_entries = layout::get_u32(data, node::MAX_ENTRIES) as u64;
        let value_size = layout::get_u32(data, node::VALUE_SIZE) as u64;
        let flags = layout::get_u32(data, node::FLAGS);
        let corrupt = |what: &str| PdataError::Corrupt { kind, block: b, what: what.into() };
        if node::HEADER_SIZE as u64 + (8 + value_size) * max_entries > BLOCK_SIZE as u64 {
            return Err(corrupt("max_entries too large"));
        }
        if nr_entries > max_entries {
            return Err(corrupt("too many entries"));
        }
        if flags & (node::INTERNAL | node::LEAF) == 0 {
            return Err(corrupt("node is neither internal nor leaf"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_device::{IoError, MemDevice};

    #[test]
    fn dirty_blocks_are_sealed_at_flush_and_validated_on_read() {
        let mut bm = BlockManager::new(MemDevice::new(8 * 4));
        bm.write_zero(2, BlockKind::Bitmap).unwrap()[100] = 9;
        assert_eq!(bm.dirty_blocks(), vec![2]);
        bm.flush().unwrap();
        assert!(bm.dirty_blocks().is_empty());

        let dev = bm.into_device();
        let mut bm = BlockManager::new(dev.clone());
        assert_eq!(bm.read(2, BlockKind::Bitmap).unwrap()[100], 9);
        // The same bytes are not a valid index block (different salt).
        let mut bm = BlockManager::new(dev);
        assert!(matches!(bm.read(2, BlockKind::MetadataIndex), Err(PdataError::Checksum { .. })));
        // And a block read at the wrong place is caught by its location.
        assert!(matches!(bm.read(1, BlockKind::Bitmap), Err(PdataError::WrongLocation { .. })));
        assert!(matches!(bm.read(4, BlockKind::Bitmap), Err(PdataError::OutOfBounds { .. })));
    }

    /// dm-bufio keeps a buffer that read without error but failed its
    /// validator, and dm-block-manager checks it again at every read: a
    /// bit flipped once on the way from the disk fails every read of the
    /// block until an abort resets the cache — a read error, by contrast,
    /// is not cached.
    #[test]
    fn a_block_that_failed_its_checksum_stays_cached_and_fails_again_until_a_reset() {
        let mut bm = BlockManager::new(MemDevice::new(8 * 4));
        bm.write_zero(2, BlockKind::Bitmap).unwrap()[100] = 9;
        bm.flush().unwrap();
        let good = bm.into_device();
        let mut flipped = good.clone().into_bytes();
        flipped[2 * 4096 + 200] ^= 1;
        let mut bm = BlockManager::new(MemDevice::from_bytes(flipped));
        assert!(matches!(bm.read(2, BlockKind::Bitmap), Err(PdataError::Checksum { .. })));
        assert!(bm.failed_since_reset());
        // The disk now holds the good bytes (the flip was on the way).
        *bm.device_mut() = good;
        assert!(matches!(bm.read(2, BlockKind::Bitmap), Err(PdataError::Checksum { .. })), "still cached");
        assert!(bm.holds_invalid_blocks());
        bm.reset();
        assert!(!bm.holds_invalid_blocks());
        assert_eq!(bm.read(2, BlockKind::Bitmap).unwrap()[100], 9, "read afresh after the reset");
        assert!(!bm.failed_since_reset());
    }

    /// A memory device whose writes to one sector fail while `fail` is set.
    struct Failing {
        mem: MemDevice,
        sector: u64,
        fail: bool,
    }

    impl BlockDevice for Failing {
        fn nr_sectors(&self) -> u64 {
            self.mem.nr_sectors()
        }
        fn read(&mut self, sector: u64, buf: &mut [u8]) -> std::result::Result<(), IoError> {
            self.mem.read(sector, buf)
        }
        fn write(&mut self, sector: u64, buf: &[u8], flags: WriteFlags) -> std::result::Result<(), IoError> {
            if self.fail && sector == self.sector {
                return Err(IoError::Failed { sector, reason: "injected".into() });
            }
            self.mem.write(sector, buf, flags)
        }
        fn flush(&mut self) -> std::result::Result<(), IoError> {
            self.mem.flush()
        }
    }

    #[test]
    fn reset_writes_dirty_blocks_back_and_the_next_flush_reports_its_failed_write() {
        let dev = Failing { mem: MemDevice::new(8 * 4), sector: 3 * BLOCK_SECTORS, fail: true };
        let mut bm = BlockManager::new(dev);
        bm.write_zero(2, BlockKind::Bitmap).unwrap()[100] = 9;
        bm.write_zero(3, BlockKind::Bitmap).unwrap()[100] = 7;
        // The abort's reset: block 2 is written back (unflushed), block 3's
        // write fails; nothing is cached afterwards.
        bm.reset();
        assert!(bm.dirty_blocks().is_empty());
        assert!(!bm.failed_since_reset());
        bm.device_mut().fail = false;
        assert_eq!(bm.read(2, BlockKind::Bitmap).unwrap()[100], 9);
        // The next flush has nothing of its own to write and succeeds on
        // the device, but reports the reset's failed write, once.
        assert!(matches!(bm.flush(), Err(PdataError::Io { block: 3, .. })));
        assert!(bm.flush().is_ok());
    }

    #[test]
    fn a_block_whose_write_failed_is_clean_and_not_written_again() {
        let dev = Failing { mem: MemDevice::new(8 * 4), sector: 0, fail: true };
        let mut bm = BlockManager::new(dev);
        bm.write_zero(0, BlockKind::Bitmap).unwrap()[100] = 5;
        assert!(bm.flush().is_err());
        assert!(bm.dirty_blocks().is_empty(), "dm-bufio clears the dirty bit when it submits the write");
        bm.device_mut().fail = false;
        bm.reset();
        assert!(bm.flush().is_ok());
        assert_eq!(bm.into_device().mem.into_bytes()[..4096], [0u8; 4096], "block 0 never reached the disk");
    }
}
