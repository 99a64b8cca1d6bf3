//! dm-cache metadata (dm-cache-metadata.c, spec §4.1–4.4): format, open,
//! commit, abort and close, block for block as kernel 6.1 does them. The
//! mapping, dirty, discard and hint operations are in
//! [`super::mapping`].

use thiserror::Error;

use super::superblock::{CacheStats, CacheSuperblock};
use crate::block_device::BlockDevice;
use crate::pdata::array::ArrayInfo;
use crate::pdata::bitset::Bitset;
use crate::pdata::layout::cache::*;
use crate::pdata::layout::space_map::ROOT_AREA_SIZE;
use crate::pdata::layout::{put_u32, put_u64, BlockKind, BLOCK_SECTORS};
use crate::pdata::transaction::TransactionManager;
use crate::pdata::{BlockNr, PdataError};

/// The mapping array: le64 `(oblock << 16) | flags` per cache block.
pub const MAPPING_ARRAY: ArrayInfo = ArrayInfo::new(MAPPING_VALUE_SIZE);
/// The hint array: le32 per cache block (the only hint size the kernel
/// sets up its hint array for).
pub const HINT_ARRAY: ArrayInfo = ArrayInfo::new(4);

/// Failures of cache metadata operations, with the kernel's errno in the doc.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CacheError {
    /// -EPERM: block 0 is all zeroes and formatting was not allowed.
    #[error("cache metadata device is unformatted")]
    Unformatted,
    /// The superblock is not one the kernel opens (-EILSEQ / -EINVAL).
    #[error("cannot open cache metadata: {0}")]
    BadSuperblock(String),
    /// -EINVAL: the table's cache block size differs from the metadata's.
    #[error("changing the data block size (from {on_disk} to {table} sectors) is not supported")]
    DataBlockSize {
        /// In the superblock.
        on_disk: u32,
        /// In the table.
        table: u32,
    },
    /// -EINVAL: a previous abort could not reopen the metadata.
    #[error("cache metadata failed (fail_io): a previous abort could not reopen it")]
    FailIo,
    /// -EINVAL: the metadata is read-only.
    #[error("cache metadata is read-only")]
    ReadOnly,
    /// -EINVAL: shrinking would drop a dirty cache block.
    #[error("unable to shrink cache due to dirty blocks (cache block {0} is dirty)")]
    ShrinkDirty(u32),
    /// -EINVAL: the in-core dirty bitset is not the cache's size.
    #[error("dirty bitset is wrong size: {given} bits for {cache_blocks} cache blocks")]
    DirtyBitsSize {
        /// Bits given.
        given: usize,
        /// Cache blocks.
        cache_blocks: u32,
    },
    /// -EINVAL: an empty or too long policy name.
    #[error("invalid policy name {0:?}")]
    PolicyName(String),
    /// A persistent-data failure (-ENODATA for a cache block beyond the end).
    #[error(transparent)]
    Pdata(#[from] PdataError),
}

/// Result of cache metadata operations.
pub type Result<T, E = CacheError> = std::result::Result<T, E>;

/// Parameters of an open (the cache table's, `dm_cache_metadata_open`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    /// Cache block size in sectors.
    pub data_block_size: u32,
    /// Format the device if block 0 is all zeroes.
    pub may_format: bool,
    /// The policy's hint size (4 for smq).
    pub policy_hint_size: u32,
    /// Metadata version used when formatting (1, or 2 for `metadata2`).
    pub metadata_version: u32,
    /// Open read-only (no superblock update; refuses every change).
    pub read_only: bool,
}

impl OpenOptions {
    /// smq (hint size 4), may format, read-write.
    pub fn new(data_block_size: u32, metadata_version: u32) -> Self {
        OpenOptions {
            data_block_size,
            may_format: true,
            policy_hint_size: 4,
            metadata_version,
            read_only: false,
        }
    }
}

/// Cache metadata on a metadata device (the kernel's `dm_cache_metadata`).
#[derive(Debug)]
pub struct CacheMetadata<D> {
    pub(super) tm: TransactionManager<D>,
    pub(super) version: u32,
    pub(super) flags: u32,
    pub(super) root: BlockNr,
    pub(super) hint_root: BlockNr,
    pub(super) discard_root: BlockNr,
    pub(super) discard_block_size: u64,
    pub(super) discard_nr_blocks: u64,
    pub(super) data_block_size: u32,
    pub(super) cache_blocks: u32,
    pub(super) changed: bool,
    pub(super) clean_when_opened: bool,
    pub(super) policy_name: [u8; POLICY_NAME_SIZE],
    pub(super) policy_version: [u32; 3],
    pub(super) policy_hint_size: u32,
    pub(super) stats: CacheStats,
    pub(super) dirty_root: BlockNr,
    pub(super) dirty_info: Bitset,
    pub(super) discard_info: Bitset,
    pub(super) fail_io: bool,
    pub(super) read_only: bool,
    /// The statistics of the last commit (for the mutation
    /// `cache-commit-forgets-stats` only).
    pub(super) committed_stats: CacheStats,
}

impl<D: BlockDevice> CacheMetadata<D> {
    /// Opens cache metadata, formatting an all-zero device if allowed
    /// (`dm_cache_metadata_open`). A read-write open clears CLEAN_SHUTDOWN
    /// in the superblock in place and flushes at once.
    pub fn open(dev: D, opts: OpenOptions) -> Result<Self> {
        let mut tm = TransactionManager::unopened(dev);
        let unformatted = tm.block_manager().read_raw(SUPERBLOCK_LOCATION)?.iter().all(|&b| b == 0);
        if unformatted {
            if !opts.may_format || opts.read_only {
                return Err(CacheError::Unformatted);
            }
            if !(MIN_VERSION..=MAX_VERSION).contains(&opts.metadata_version) {
                return Err(CacheError::BadSuperblock(format!(
                    "cannot format metadata version {}",
                    opts.metadata_version
                )));
            }
            tm = TransactionManager::create(tm.into_device(), SUPERBLOCK_LOCATION)?;
        }
        let mut md = CacheMetadata {
            tm,
            version: opts.metadata_version,
            flags: 0,
            root: 0,
            hint_root: 0,
            discard_root: 0,
            discard_block_size: 0,
            discard_nr_blocks: 0,
            data_block_size: opts.data_block_size,
            cache_blocks: 0,
            changed: true,
            clean_when_opened: false,
            policy_name: [0; POLICY_NAME_SIZE],
            policy_version: [0; 3],
            policy_hint_size: opts.policy_hint_size,
            stats: CacheStats::default(),
            dirty_root: 0,
            dirty_info: Bitset::new(),
            discard_info: Bitset::new(),
            fail_io: false,
            read_only: opts.read_only,
            committed_stats: CacheStats::default(),
        };
        if unformatted {
            md.format_metadata()?;
        } else {
            md.open_metadata()?;
        }
        if opts.read_only {
            md.begin_transaction()?;
        } else {
            md.begin_transaction_flags(|f| f & !CLEAN_SHUTDOWN)?;
        }
        Ok(md)
    }

    /// Formats `dev` as empty cache metadata of `version` and opens it.
    pub fn format(dev: D, data_block_size: u32, version: u32) -> Result<Self> {
        Self::open(dev, OpenOptions::new(data_block_size, version))
    }

    /// `__format_metadata` (the space map was created by the caller): an
    /// empty mapping array, (v2) an empty dirty bitset, an empty discard
    /// bitset, the initial superblock.
    fn format_metadata(&mut self) -> Result<()> {
        self.root = MAPPING_ARRAY.empty(&mut self.tm)?;
        if self.separate_dirty_bits() {
            self.dirty_info = Bitset::new();
            self.dirty_root = Bitset::empty(&mut self.tm)?;
        }
        self.discard_info = Bitset::new();
        self.discard_root = Bitset::empty(&mut self.tm)?;
        self.discard_block_size = 0;
        self.discard_nr_blocks = 0;
        self.write_initial_superblock()?;
        self.clean_when_opened = true;
        Ok(())
    }

    fn write_initial_superblock(&mut self) -> Result<()> {
        self.tm.pre_commit()?;
        let sm_root = self.tm.metadata_sm_root();
        let (version, root, hint_root, discard_root, dirty_root) =
            (self.version, self.root, self.hint_root, self.discard_root, self.dirty_root);
        let (dbs, dnr, data_block_size) =
            (self.discard_block_size, self.discard_nr_blocks, self.data_block_size);
        let sb = self.tm.block_manager().write_zero(SUPERBLOCK_LOCATION, BlockKind::CacheSuperblock)?;
        put_u64(sb, SB_MAGIC, SUPERBLOCK_MAGIC);
        put_u32(sb, SB_VERSION, version);
        sm_root.encode(&mut sb[SB_METADATA_SM_ROOT..]);
        put_u64(sb, SB_MAPPING_ROOT, root);
        put_u64(sb, SB_HINT_ROOT, hint_root);
        put_u64(sb, SB_DISCARD_ROOT, discard_root);
        put_u64(sb, SB_DISCARD_BLOCK_SIZE, dbs);
        put_u64(sb, SB_DISCARD_NR_BLOCKS, dnr);
        put_u32(sb, SB_METADATA_BLOCK_SIZE, BLOCK_SECTORS as u32);
        put_u32(sb, SB_DATA_BLOCK_SIZE, data_block_size);
        if version >= 2 {
            put_u64(sb, SB_DIRTY_ROOT, dirty_root);
        }
        self.tm.commit()?;
        Ok(())
    }

    /// `__open_metadata`: check the superblock, open the space map.
    fn open_metadata(&mut self) -> Result<()> {
        let raw = *self.tm.block_manager().read_raw(SUPERBLOCK_LOCATION)?;
        let sb = CacheSuperblock::decode(&raw);
        if sb.magic != SUPERBLOCK_MAGIC {
            return Err(CacheError::BadSuperblock(sb.problems(true).expect("bad magic")));
        }
        self.tm.read(SUPERBLOCK_LOCATION, BlockKind::CacheSuperblock)?;
        if let Some(p) = sb.problems(true) {
            return Err(CacheError::BadSuperblock(p));
        }
        if sb.data_block_size != self.data_block_size {
            return Err(CacheError::DataBlockSize {
                on_disk: sb.data_block_size,
                table: self.data_block_size,
            });
        }
        if let Some(p) = sb.problems(self.read_only) {
            return Err(CacheError::BadSuperblock(p));
        }
        self.tm.metadata_sm_open(&raw[SB_METADATA_SM_ROOT..SB_METADATA_SM_ROOT + 32])?;
        self.dirty_info = Bitset::new();
        self.discard_info = Bitset::new();
        self.clean_when_opened = sb.clean_shutdown();
        Ok(())
    }

    fn read_superblock_fields(&mut self, sb: &CacheSuperblock) {
        self.version = sb.version;
        self.flags = sb.flags;
        self.root = sb.mapping_root;
        self.hint_root = sb.hint_root;
        self.discard_root = sb.discard_root;
        self.discard_block_size = sb.discard_block_size;
        self.discard_nr_blocks = sb.discard_nr_blocks;
        self.data_block_size = sb.data_block_size;
        self.cache_blocks = sb.cache_blocks;
        self.policy_name = sb.policy_name;
        self.policy_version = sb.policy_version;
        self.policy_hint_size = sb.policy_hint_size;
        self.stats = sb.stats;
        if sb.separate_dirty_bits() {
            self.dirty_root = sb.dirty_root;
        }
        self.changed = false;
    }

    /// `__begin_transaction_flags`: update the flags of block 0 in place,
    /// read the fields, flush (the superblock reaches the disk now).
    fn begin_transaction_flags(&mut self, mutator: impl Fn(u32) -> u32) -> Result<()> {
        let sb = self.tm.write_locked(SUPERBLOCK_LOCATION, BlockKind::CacheSuperblock)?;
        let flags = mutator(crate::pdata::layout::get_u32(sb, SB_FLAGS));
        put_u32(sb, SB_FLAGS, flags);
        let sb = CacheSuperblock::decode(&sb[..]);
        self.read_superblock_fields(&sb);
        self.tm.block_manager().flush()?;
        Ok(())
    }

    /// `__begin_transaction`: re-read the superblock's fields.
    fn begin_transaction(&mut self) -> Result<()> {
        let sb = CacheSuperblock::decode(self.tm.read(SUPERBLOCK_LOCATION, BlockKind::CacheSuperblock)?);
        self.read_superblock_fields(&sb);
        self.committed_stats = sb.stats;
        Ok(())
    }

    pub(super) fn write_lock(&self) -> Result<()> {
        if self.fail_io {
            return Err(CacheError::FailIo);
        }
        if self.read_only {
            return Err(CacheError::ReadOnly);
        }
        Ok(())
    }

    /// Commits (`dm_cache_commit`): flush the cached words of the dirty
    /// (v2) and discard bitsets, commit the space map, write and flush every
    /// block, then write block 0 in place with CLEAN_SHUTDOWN set or cleared
    /// as `clean_shutdown` says, and flush again; then re-read the
    /// superblock. Always writes, changed or not.
    pub fn commit(&mut self, clean_shutdown: bool) -> Result<()> {
        self.write_lock()?;
        if self.separate_dirty_bits() {
            self.dirty_info.flush(&mut self.tm, &mut self.dirty_root)?;
        }
        self.discard_info.flush(&mut self.tm, &mut self.discard_root)?;
        self.tm.pre_commit()?;
        let sm_root = self.tm.metadata_sm_root();
        let flags = if clean_shutdown { self.flags | CLEAN_SHUTDOWN } else { self.flags & !CLEAN_SHUTDOWN };
        let s = &*self;
        let fields = (s.root, s.hint_root, s.discard_root, s.discard_block_size, s.discard_nr_blocks);
        let (policy_name, policy_version, hint_size, mut stats) =
            (s.policy_name, s.policy_version, s.policy_hint_size, s.stats);
        if s.tm.mutations.cache_commit_forgets_stats {
            // Deliberately broken: the superblock keeps the last commit's
            // statistics.
            stats = s.committed_stats;
        }
        let (v2, dirty_root, cache_blocks) = (s.separate_dirty_bits(), s.dirty_root, s.cache_blocks);
        let sb = self.tm.write_locked(SUPERBLOCK_LOCATION, BlockKind::CacheSuperblock)?;
        put_u32(sb, SB_FLAGS, flags);
        put_u64(sb, SB_MAPPING_ROOT, fields.0);
        if v2 {
            put_u64(sb, SB_DIRTY_ROOT, dirty_root);
        }
        put_u64(sb, SB_HINT_ROOT, fields.1);
        put_u64(sb, SB_DISCARD_ROOT, fields.2);
        put_u64(sb, SB_DISCARD_BLOCK_SIZE, fields.3);
        put_u64(sb, SB_DISCARD_NR_BLOCKS, fields.4);
        put_u32(sb, SB_CACHE_BLOCKS, cache_blocks);
        // 6.1 copies the name with strncpy: NUL padded to 16 bytes.
        sb[SB_POLICY_NAME..SB_POLICY_NAME + POLICY_NAME_SIZE].copy_from_slice(&policy_name);
        for (i, v) in policy_version.iter().enumerate() {
            put_u32(sb, SB_POLICY_VERSION + 4 * i, *v);
        }
        put_u32(sb, SB_POLICY_HINT_SIZE, hint_size);
        put_u32(sb, SB_READ_HITS, stats.read_hits);
        put_u32(sb, SB_READ_MISSES, stats.read_misses);
        put_u32(sb, SB_WRITE_HITS, stats.write_hits);
        put_u32(sb, SB_WRITE_MISSES, stats.write_misses);
        // The kernel copies its 128-byte root buffer, of which the space
        // map sets the first 32 bytes; the rest is zero.
        sb[SB_METADATA_SM_ROOT..SB_METADATA_SM_ROOT + ROOT_AREA_SIZE].fill(0);
        sm_root.encode(&mut sb[SB_METADATA_SM_ROOT..]);
        self.tm.commit()?;
        self.begin_transaction()
    }

    /// Sets NEEDS_CHECK in memory and in block 0 in place; it reaches the
    /// disk with the next flush (`dm_cache_metadata_set_needs_check`).
    pub fn set_needs_check(&mut self) -> Result<()> {
        if self.fail_io {
            return Err(CacheError::FailIo);
        }
        self.flags |= NEEDS_CHECK;
        let flags = self.flags;
        put_u32(self.tm.write_locked(SUPERBLOCK_LOCATION, BlockKind::CacheSuperblock)?, SB_FLAGS, flags);
        Ok(())
    }

    /// Clears NEEDS_CHECK in memory (what `cache_check
    /// --clear-needs-check-flag` does after a clean check); the next commit
    /// writes it.
    pub fn clear_needs_check(&mut self) {
        self.flags &= !NEEDS_CHECK;
        self.changed = true;
    }

    /// Throws away the open transaction and reopens from the last commit
    /// (`dm_cache_metadata_abort`). A failure to reopen leaves the metadata
    /// in fail_io. As 6.1, `changed` is kept from the aborted transaction
    /// (the model used to clear it, so that a flush after the abort found
    /// nothing changed and succeeded without a commit; the stock kernel
    /// fails it: the withdrawn finding `read_only_flushes_fail`). Unlike
    /// 6.1 — which also keeps its in-core roots and sizes from the aborted
    /// transaction and never uses them again (the target goes read-only
    /// right after) — the model re-reads those from the superblock, so
    /// that the metadata afterwards is the last commit's.
    pub fn abort(&mut self) -> Result<()> {
        if self.fail_io {
            return Err(CacheError::FailIo);
        }
        // 6.1 opens a new block manager and destroys the old one, whose
        // dirty blocks are written back then; a write error there is lost
        // with the old client.
        self.tm.reset();
        self.tm.block_manager().forget_write_errors();
        // 6.1 reopens the transaction manager and space map from the
        // superblock (`__open_metadata`) and does not re-read its fields
        // (no `__begin_transaction`): `changed` stays the aborted
        // transaction's. So after an abort of a changed transaction every
        // later flush still asks for a commit, which read-only mode
        // refuses: the flush fails (seen on stock 6.1:
        // kernel-shim/tests/kernel_findings_one_boot.rs). The roots are
        // re-read here, where 6.1 keeps the aborted ones: it never uses
        // them again (read-only until a repair; a reload of the same
        // device shares this metadata and refuses it while needs_check is
        // set), and the model's metadata stays usable as the last commit's.
        let changed = self.changed;
        let r = self.open_metadata().and_then(|_| self.begin_transaction());
        self.changed = changed;
        if r.is_err() {
            self.fail_io = true;
        }
        r
    }

    /// Closes the metadata (`dm_cache_metadata_close`): nothing is
    /// committed; like bufio at teardown, dirty blocks are written back
    /// (unflushed). Commit first — [`Self::clean_shutdown`] — for a clean
    /// close.
    pub fn close(mut self) -> D {
        if !self.fail_io {
            for b in self.tm.block_manager().dirty_blocks() {
                // The kernel does not report teardown write errors.
                let _ = self.tm.block_manager().write_back(b);
            }
        }
        self.tm.into_device()
    }

    /// Drops all unwritten state and returns the device, as a crash would.
    pub fn crash(self) -> D {
        self.tm.into_device()
    }

    /// Turns deliberate bugs on (detector tests; see [`crate::mutation`]).
    pub fn set_mutations(&mut self, m: crate::mutation::Mutations) {
        self.tm.mutations = m;
    }

    /// Marks the transaction changed, so the next commit that asks
    /// [`Self::changed_this_transaction`] writes.
    pub fn mark_changed(&mut self) {
        self.changed = true;
    }

    /// The deliberate bugs in force ([`Self::set_mutations`]).
    pub fn mutations(&self) -> crate::mutation::Mutations {
        self.tm.mutations
    }

    /// Switches to read-only (`dm_cache_metadata_set_read_only`).
    pub fn set_read_only(&mut self) {
        self.read_only = true;
    }

    /// Switches back to read-write (`dm_cache_metadata_set_read_write`).
    pub fn set_read_write(&mut self) {
        self.read_only = false;
    }

    /// Whether the dirty bits live in a separate bitset (version 2).
    pub fn separate_dirty_bits(&self) -> bool {
        self.version >= 2
    }

    /// Metadata version in use (the on-disk one once opened).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Whether the superblock said CLEAN_SHUTDOWN when opened (after an
    /// unclean one the kernel treats every mapping as dirty, and ignores
    /// hints and discards).
    pub fn clean_when_opened(&self) -> bool {
        self.clean_when_opened
    }

    /// Whether anything changed since the last commit
    /// (`dm_cache_changed_this_transaction`).
    pub fn changed_this_transaction(&self) -> bool {
        self.changed
    }

    /// In-core superblock flags.
    pub fn flags(&self) -> u32 {
        self.flags
    }

    /// Whether NEEDS_CHECK is set.
    pub fn needs_check(&self) -> bool {
        self.flags & NEEDS_CHECK != 0
    }

    /// Number of cache blocks (`dm_cache_size`).
    pub fn cache_blocks(&self) -> u32 {
        self.cache_blocks
    }

    /// Cache block size in sectors.
    pub fn data_block_size(&self) -> u32 {
        self.data_block_size
    }

    /// Discard block size (sectors) and number of discard blocks.
    pub fn discard_geometry(&self) -> (u64, u64) {
        (self.discard_block_size, self.discard_nr_blocks)
    }

    /// The statistics counters (`dm_cache_metadata_get_stats`).
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Sets the statistics counters, saved at the next commit.
    pub fn set_stats(&mut self, stats: CacheStats) -> Result<()> {
        self.write_lock()?;
        self.stats = stats;
        Ok(())
    }

    /// Free metadata blocks (`dm_cache_get_free_metadata_block_count`).
    pub fn free_metadata_blocks(&self) -> Result<u64> {
        if self.fail_io {
            return Err(CacheError::FailIo);
        }
        Ok(self.tm.metadata_sm_nr_free())
    }

    /// Metadata blocks tracked (`dm_cache_get_metadata_dev_size`).
    pub fn metadata_dev_blocks(&self) -> Result<u64> {
        if self.fail_io {
            return Err(CacheError::FailIo);
        }
        Ok(self.tm.metadata_sm_nr_blocks())
    }

    /// The transaction manager (for tests and tools that inspect blocks).
    pub fn transaction_manager(&mut self) -> &mut TransactionManager<D> {
        &mut self.tm
    }

    /// The first inconsistency the metadata's operations met, kept across
    /// aborts (see [`TransactionManager::broken`]).
    pub fn broken(&self) -> Option<&str> {
        self.tm.broken()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_device::MemDevice;
    use crate::cache::inspect::read_image;

    /// 6.1's abort keeps `changed`: after an abort of a changed
    /// transaction a flush still asks for a commit (which read-only mode
    /// refuses); after an abort of an unchanged one it does not.
    #[test]
    fn an_abort_keeps_whether_the_transaction_changed() {
        let mut md = CacheMetadata::format(MemDevice::new(8 * 1024), 128, 2).unwrap();
        md.resize(4).unwrap();
        md.commit(false).unwrap();
        assert!(!md.changed_this_transaction());
        md.abort().unwrap();
        assert!(!md.changed_this_transaction(), "nothing changed, nothing to commit");
        md.insert_mapping(0, 7).unwrap();
        assert!(md.changed_this_transaction());
        md.abort().unwrap();
        assert!(md.changed_this_transaction(), "kept across the abort, as 6.1 keeps it");
        assert_eq!(md.lookup(0).unwrap(), None, "the mapping itself is gone with the transaction");
    }

    /// The fresh layout derived from `__format_metadata` (spec §4.3): 0
    /// superblock, 1 space map index, 2 overflow root, 3 bitmap, then the
    /// mapping array root, (v2) the dirty bitset root, the discard bitset
    /// root; every superblock field as the kernel writes it.
    #[test]
    fn format_layout_and_superblock_fields() {
        for version in [1, 2] {
            let md = CacheMetadata::format(MemDevice::new(8 * 1024), 128, version).unwrap();
            assert!(md.clean_when_opened());
            let mut dev = md.close();
            let img = read_image(&mut dev).unwrap();
            let sb = &img.superblock;
            assert_eq!((sb.magic, sb.version, sb.blocknr, sb.flags), (SUPERBLOCK_MAGIC, version, 0, 0));
            assert_eq!((sb.data_block_size, sb.metadata_block_size, sb.cache_blocks), (128, 8, 0));
            assert_eq!((sb.policy_hint_size, sb.policy_name, sb.policy_version), (0, [0; 16], [0; 3]));
            assert_eq!((sb.hint_root, sb.discard_block_size, sb.discard_nr_blocks), (0, 0, 0));
            assert_eq!((sb.metadata_sm_root.bitmap_root, sb.metadata_sm_root.ref_count_root), (1, 2));
            assert_eq!(sb.mapping_root, 4);
            if version == 2 {
                assert_eq!((sb.dirty_root, sb.discard_root), (5, 6));
            } else {
                assert_eq!((sb.dirty_root, sb.discard_root), (0, 5));
            }
            assert_eq!(sb.metadata_sm_root.nr_allocated, if version == 2 { 7 } else { 6 });
            assert!(sb.metadata_sm_root_area[32..].iter().all(|&b| b == 0));
        }
    }

    /// Commits always write; CLEAN_SHUTDOWN follows the argument; the
    /// cursor is not reset, so a second commit's shadows come after the
    /// first's.
    #[test]
    fn commit_writes_the_flag_it_is_given() {
        let mut md = CacheMetadata::format(MemDevice::new(8 * 1024), 128, 1).unwrap();
        md.resize(1000).unwrap();
        md.commit(true).unwrap();
        assert_eq!(md.flags() & CLEAN_SHUTDOWN, CLEAN_SHUTDOWN);
        md.insert_mapping(1, 2).unwrap();
        md.commit(false).unwrap();
        assert_eq!(md.flags() & CLEAN_SHUTDOWN, 0);
        assert_eq!(md.lookup(1).unwrap(), Some((2, false)));
        assert_eq!(md.resize(0), Ok(()));
        assert_eq!(md.mapping(0), Err(CacheError::Pdata(PdataError::NoData)));
    }
}
