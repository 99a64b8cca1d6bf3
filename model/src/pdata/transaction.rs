//! The transaction manager: copy-on-write shadowing over the block manager,
//! with the metadata space map that accounts for every metadata block.
//!
//! The kernel splits this between dm-transaction-manager and
//! dm-space-map-metadata; here one struct owns the block manager, both
//! space maps' in-memory state and the shadow table, because the metadata
//! space map keeps its own bookkeeping in metadata blocks and so calls back
//! into shadowing while it works. Those nested calls must see the space map
//! exactly as the kernel's do (the index as last saved, pending operations
//! queued), which is why every low-level step borrows the state only
//! briefly and by name. See spec §1.9 and §1.12.

use std::collections::{BTreeSet, VecDeque};

use super::block_manager::BlockManager;
use super::layout::{BlockKind, BLOCK_SIZE};
use super::space_map::disk::DiskSpaceMap;
use super::space_map::metadata::{BlockOp, MetadataSpaceMap};
use super::space_map::SmSel;
use super::{BlockNr, PdataError, Result};
use crate::block_device::BlockDevice;

/// Copy-on-write transactions over a metadata device.
#[derive(Debug, Clone)]
pub struct TransactionManager<D> {
    /// The block cache.
    pub(crate) bm: BlockManager<D>,
    /// The metadata space map.
    pub(crate) msm: MetadataSpaceMap,
    /// The data (disk) space map of the pool, when there is one. It lives
    /// here so that its operations, which allocate metadata, can reach the
    /// metadata space map without aliasing.
    pub(crate) dsm: Option<DiskSpaceMap>,
    /// Blocks created or shadowed in this transaction.
    shadows: BTreeSet<BlockNr>,
    /// Deliberate bugs for detector tests (none by default).
    pub mutations: crate::mutation::Mutations,
    /// Whether a reference count that cannot be updated fails the btree
    /// operation that changes it (true, the default) or is skipped, as
    /// 6.1's value types do (`KernelFixes::refcount_errors_fail_the_operation`
    /// in the thin pool).
    pub refcount_errors_fail: bool,
    /// The first inconsistency an operation met (see [`Self::broken`]).
    broken: Option<String>,
    /// What the btrees did (coverage probes; kept across aborts).
    pub(crate) probes: crate::probes::TreeProbes,
}

/// What [`TransactionManager::shadow_block`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shadow {
    /// Where the writable copy is.
    pub block: BlockNr,
    /// The original was shared: the copy's children need an extra reference.
    pub inc_children: bool,
}

impl<D: BlockDevice> TransactionManager<D> {
    /// Formats a new metadata space map over the whole device, with the
    /// superblock at `superblock` (the kernel's `dm_tm_create_with_sm`).
    pub fn create(dev: D, superblock: BlockNr) -> Result<Self> {
        let bm = BlockManager::new(dev);
        let mut tm = TransactionManager {
            msm: MetadataSpaceMap::new_bootstrap(superblock + 1),
            bm,
            dsm: None,
            shadows: BTreeSet::new(),
            mutations: Default::default(),
            refcount_errors_fail: true,
            broken: None,
            probes: Default::default(),
        };
        tm.metadata_sm_create(superblock)?;
        Ok(tm)
    }

    /// Opens an existing metadata space map from its root as stored in the
    /// superblock (the kernel's `dm_tm_open_with_sm`).
    pub fn open(dev: D, sm_root: &[u8]) -> Result<Self> {
        let mut tm = Self::unopened(dev);
        tm.metadata_sm_open(sm_root)?;
        Ok(tm)
    }

    /// A transaction manager whose space maps are not open yet: only raw
    /// reads make sense until [`Self::metadata_sm_open`].
    pub fn unopened(dev: D) -> Self {
        TransactionManager {
            msm: MetadataSpaceMap::new_bootstrap(0),
            bm: BlockManager::new(dev),
            dsm: None,
            shadows: BTreeSet::new(),
            mutations: Default::default(),
            refcount_errors_fail: true,
            broken: None,
            probes: Default::default(),
        }
    }

    /// Forgets everything not on disk (abort, before reopening): cached
    /// blocks, after the dirty ones are written back unflushed as the
    /// kernel's block manager reset does ([`BlockManager::reset`]),
    /// shadows, both space maps.
    pub fn reset(&mut self) {
        self.bm.reset();
        self.shadows.clear();
        self.msm = MetadataSpaceMap::new_bootstrap(0);
        self.dsm = None;
    }

    /// The first inconsistency an operation of this transaction manager
    /// met, if any ([`PdataError::is_inconsistency`]: a walk that ran past
    /// its bound, a reference count below zero, a runaway recursion of the
    /// metadata space map). The operation failed with that error as the
    /// kernel's would (or the kernel would have spun for ever); it is also
    /// kept here, across aborts, because callers handle a failed operation
    /// the kernel's way (abort, read-only mode) or ignore it, as the kernel
    /// does on some paths. On metadata the model wrote itself it is a model
    /// bug. Not kept while the device has failed since the last abort: an
    /// operation cut short by a device error leaves the open transaction
    /// half-done until the abort throws it away.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// What the btrees of this transaction manager did so far: splits,
    /// merges, collapses, the deepest tree (coverage probes, kept across
    /// aborts).
    pub fn probes(&self) -> crate::probes::TreeProbes {
        self.probes
    }

    /// Returns `e`, keeping it as [`Self::broken`] first if it is an
    /// inconsistency — unless the device failed since the last abort: an
    /// operation cut short by an I/O or checksum error leaves the open
    /// transaction half-done (queued space-map operations applied over a
    /// shadow that never happened, say), the kernel's as much as the
    /// model's, and the abort that follows throws it away.
    pub(crate) fn noted(&mut self, e: PdataError) -> PdataError {
        if e.is_inconsistency() && self.broken.is_none() && !self.bm.failed_since_reset() {
            self.broken = Some(e.to_string());
        }
        e
    }

    /// A [`PdataError::Runaway`] at `block` of `kind`, noted.
    pub(crate) fn runaway(&mut self, kind: BlockKind, block: BlockNr, what: impl Into<String>) -> PdataError {
        self.noted(PdataError::Runaway { kind, block, what: what.into() })
    }

    /// Queues a metadata space-map operation; too many is a runaway.
    fn queue_op(&mut self, op: BlockOp) -> Result<()> {
        self.msm.push_op(op).map_err(|e| self.noted(e))
    }

    /// The block manager.
    pub fn block_manager(&mut self) -> &mut BlockManager<D> {
        &mut self.bm
    }

    /// Consumes the transaction manager and returns the device; uncommitted
    /// changes are dropped.
    pub fn into_device(self) -> D {
        self.bm.into_device()
    }

    /// Whether `b` was created or shadowed in this transaction.
    pub fn is_shadow(&self, b: BlockNr) -> bool {
        self.shadows.contains(&b)
    }

    /// Allocates a zeroed block of `kind`, writable in this transaction.
    pub fn new_block(&mut self, kind: BlockKind) -> Result<BlockNr> {
        let b = self.metadata_sm_new_block()?;
        self.bm.write_zero(b, kind)?;
        self.shadows.insert(b);
        Ok(b)
    }

    /// Makes `orig` writable: in place if this transaction already owns it,
    /// otherwise as a copy in a new block (the original loses a reference).
    pub fn shadow_block(&mut self, orig: BlockNr, kind: BlockKind) -> Result<Shadow> {
        let shared = self.metadata_sm_count_is_more_than_one(orig)?;
        let reuse = self.mutations.reuse_freed_before_commit && !shared;
        if (self.is_shadow(orig) || reuse) && !shared {
            self.bm.write(orig, kind)?;
            return Ok(Shadow { block: orig, inc_children: false });
        }
        // The kernel's order: allocate, drop the original's reference, then
        // copy. The order of allocation is visible in block numbers.
        let new = self.metadata_sm_new_block()?;
        self.metadata_sm_dec(orig, orig + 1)?;
        let copy: Box<[u8; BLOCK_SIZE]> = Box::new(*self.bm.read(orig, kind)?);
        self.bm.write_zero(new, kind)?.copy_from_slice(&copy[..]);
        self.shadows.insert(new);
        Ok(Shadow { block: new, inc_children: shared })
    }

    /// Reads a block of `kind`.
    pub fn read(&mut self, b: BlockNr, kind: BlockKind) -> Result<&[u8; BLOCK_SIZE]> {
        self.bm.read(b, kind)
    }

    /// A block already made writable in this transaction (by
    /// [`Self::new_block`] or [`Self::shadow_block`]).
    pub fn write_locked(&mut self, b: BlockNr, kind: BlockKind) -> Result<&mut [u8; BLOCK_SIZE]> {
        self.bm.write(b, kind)
    }

    /// Adds a reference to metadata block `b` (`dm_tm_inc`, which returns
    /// nothing in 6.1: an error is the operation's only with
    /// [`Self::refcount_errors_fail`]).
    pub fn inc(&mut self, b: BlockNr) -> Result<()> {
        let r = self.metadata_sm_inc(b, b + 1);
        self.refcount_result(r)
    }

    /// Adds a reference to every metadata block in `b..e` (as [`Self::inc`]).
    pub fn inc_range(&mut self, b: BlockNr, e: BlockNr) -> Result<()> {
        let r = self.metadata_sm_inc(b, e);
        self.refcount_result(r)
    }

    /// Drops a reference to metadata block `b` (`dm_tm_dec`, void in 6.1:
    /// as [`Self::inc`]).
    pub fn dec(&mut self, b: BlockNr) -> Result<()> {
        let r = self.metadata_sm_dec(b, b + 1);
        self.refcount_result(r)
    }

    /// Drops a reference to every metadata block in `b..e` (as [`Self::dec`]).
    pub fn dec_range(&mut self, b: BlockNr, e: BlockNr) -> Result<()> {
        let r = self.metadata_sm_dec(b, e);
        self.refcount_result(r)
    }

    /// The reference count of metadata block `b`.
    pub fn ref_count(&mut self, b: BlockNr) -> Result<u32> {
        self.metadata_sm_get_count(b)
    }

    /// First half of a commit: commit the metadata space map, write every
    /// dirty block and flush the device (`dm_tm_pre_commit`).
    pub fn pre_commit(&mut self) -> Result<()> {
        self.metadata_sm_commit()?;
        if self.mutations.superblock_before_flush {
            // Deliberately broken: the shadows go out with the superblock.
            return Ok(());
        }
        self.bm.flush()
    }

    /// Second half: the caller has filled in the superblock (write-locked in
    /// place); forget the shadows, write it and flush (`dm_tm_commit`).
    pub fn commit(&mut self) -> Result<()> {
        self.shadows.clear();
        self.bm.flush()
    }

    /// Runs `f` over the runs of consecutive numbers in `blocks` (the
    /// kernel batches reference count changes this way, `dm_tm_with_runs`).
    pub fn for_each_run(
        &mut self,
        blocks: impl IntoIterator<Item = u64>,
        mut f: impl FnMut(&mut Self, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let mut run: Option<(u64, u64)> = None;
        for b in blocks {
            run = match run {
                Some((begin, end)) if b == end => Some((begin, end + 1)),
                Some((begin, end)) => {
                    f(self, begin, end)?;
                    Some((b, b + 1))
                }
                None => Some((b, b + 1)),
            };
        }
        if let Some((begin, end)) = run {
            f(self, begin, end)?;
        }
        Ok(())
    }

    // ---- the metadata space map's public face (dm-space-map-metadata) ----

    /// Allocates a metadata block (`sm_metadata_new_block`).
    pub fn metadata_sm_new_block(&mut self) -> Result<BlockNr> {
        if self.msm.bootstrap {
            // While formatting the whole device is known to be free.
            if self.msm.begin == self.msm.ll.nr_blocks {
                return Err(PdataError::NoSpace("metadata"));
            }
            let b = self.msm.begin;
            self.msm.begin += 1;
            return Ok(b);
        }
        let begin = self.msm.begin;
        let nr_blocks = self.msm.ll.nr_blocks;
        let b = match self.find_common_free_block(SmSel::Metadata, begin, nr_blocks)? {
            Some(b) => b,
            None => self
                .find_common_free_block(SmSel::Metadata, 0, begin)?
                .ok_or(PdataError::NoSpace("metadata"))?,
        };
        self.msm.begin = b + 1;
        if self.msm.recursing() {
            self.queue_op(BlockOp::Inc(b, b + 1))?;
        } else {
            self.msm.recursion_count += 1;
            let r = self.ll_inc(SmSel::Metadata, b, b + 1);
            let r2 = self.metadata_sm_out();
            r?;
            r2?;
        }
        self.msm.allocated_this_transaction += 1;
        let nr_free = self.metadata_sm_nr_free();
        self.msm.threshold.check(nr_free);
        Ok(b)
    }

    /// Adds a reference to each block of `b..e`.
    pub fn metadata_sm_inc(&mut self, b: BlockNr, e: BlockNr) -> Result<()> {
        self.metadata_sm_mutate(BlockOp::Inc(b, e))
    }

    /// Drops a reference to each block of `b..e`.
    pub fn metadata_sm_dec(&mut self, b: BlockNr, e: BlockNr) -> Result<()> {
        self.metadata_sm_mutate(BlockOp::Dec(b, e))
    }

    fn metadata_sm_mutate(&mut self, op: BlockOp) -> Result<()> {
        if self.msm.bootstrap || self.msm.recursing() {
            return self.queue_op(op);
        }
        self.msm.recursion_count += 1;
        let r = self.apply_op(op);
        let r2 = self.metadata_sm_out();
        r?;
        r2
    }

    fn apply_op(&mut self, op: BlockOp) -> Result<()> {
        match op {
            BlockOp::Inc(b, e) => self.ll_inc(SmSel::Metadata, b, e).map(|_| ()),
            BlockOp::Dec(b, e) => self.ll_dec(SmSel::Metadata, b, e).map(|_| ()),
        }
    }

    /// Leaves one level of recursion; the outermost level applies the
    /// operations queued meanwhile, in order (which may queue more).
    fn metadata_sm_out(&mut self) -> Result<()> {
        let r = if self.msm.recursion_count == 1 { self.apply_queued_ops() } else { Ok(()) };
        self.msm.recursion_count -= 1;
        r
    }

    fn apply_queued_ops(&mut self) -> Result<()> {
        // The op stays queued while it is applied, so that nested count
        // queries still see it (as in the kernel's ring buffer).
        while let Some(&op) = self.msm.uncommitted.front() {
            self.apply_op(op)?;
            self.msm.uncommitted.pop_front();
        }
        Ok(())
    }

    /// Net adjustment of the queued operations for block `b`.
    fn pending_adjustment(queue: &VecDeque<BlockOp>, b: BlockNr) -> i64 {
        queue
            .iter()
            .map(|op| match *op {
                BlockOp::Inc(s, e) if s <= b && b < e => 1,
                BlockOp::Dec(s, e) if s <= b && b < e => -1,
                _ => 0,
            })
            .sum()
    }

    /// The reference count of `b`, including queued operations.
    pub fn metadata_sm_get_count(&mut self, b: BlockNr) -> Result<u32> {
        if self.msm.bootstrap {
            return Ok(u32::from(b < self.msm.begin));
        }
        let adjustment = Self::pending_adjustment(&self.msm.uncommitted, b);
        let count = self.ll_lookup(super::space_map::LlRef::Cur(SmSel::Metadata), b)?;
        Ok((i64::from(count) + adjustment) as u32)
    }

    /// Whether `b` has more than one reference, the way the kernel decides
    /// it (a bitmap value of 3 answers yes without reading the overflow tree).
    pub fn metadata_sm_count_is_more_than_one(&mut self, b: BlockNr) -> Result<bool> {
        if self.msm.bootstrap {
            return Ok(false);
        }
        let adjustment = Self::pending_adjustment(&self.msm.uncommitted, b);
        if adjustment > 1 {
            return Ok(true);
        }
        let raw = self.ll_lookup_bitmap(super::space_map::LlRef::Cur(SmSel::Metadata), b)?;
        Ok(raw == 3 || i64::from(raw) + adjustment > 1)
    }

    /// Free metadata blocks as the kernel reports them: blocks freed in this
    /// transaction are not counted until it commits.
    pub fn metadata_sm_nr_free(&self) -> u64 {
        if self.msm.bootstrap {
            return self.msm.ll.nr_blocks.saturating_sub(self.msm.begin);
        }
        // Saturating: a damaged image may claim more than it has.
        (self.msm.old_ll.nr_blocks.saturating_sub(self.msm.old_ll.nr_allocated))
            .saturating_sub(self.msm.allocated_this_transaction)
    }

    /// Blocks the metadata space map tracks.
    pub fn metadata_sm_nr_blocks(&self) -> u64 {
        self.msm.ll.nr_blocks
    }

    /// Commits the metadata space map: writes its index block if changed.
    pub fn metadata_sm_commit(&mut self) -> Result<()> {
        if self.msm.bootstrap {
            return Ok(());
        }
        self.ll_commit(SmSel::Metadata)?;
        self.msm.old_ll = self.msm.ll.clone();
        self.msm.allocated_this_transaction = 0;
        Ok(())
    }

    /// The metadata space map's root, as stored in a superblock.
    pub fn metadata_sm_root(&self) -> super::layout::space_map::SmRoot {
        self.msm.ll.root()
    }

    /// Registers the low-water threshold (in free blocks).
    pub fn metadata_sm_set_threshold(&mut self, threshold: u64) {
        self.msm.threshold.set(threshold);
    }

    /// Times the threshold callback has fired since it was last asked.
    pub fn metadata_sm_take_threshold_events(&mut self) -> u64 {
        std::mem::take(&mut self.msm.threshold.fired)
    }

    fn metadata_sm_create(&mut self, superblock: BlockNr) -> Result<()> {
        // Bootstrap: blocks are handed out linearly and every count change
        // is queued until the bitmaps exist.
        self.ll_new_metadata()?;
        let nr_blocks = self.bm.nr_blocks().min(super::layout::space_map::MAX_METADATA_BLOCKS);
        let r = self.ll_extend(SmSel::Metadata, nr_blocks);
        self.msm.bootstrap = false;
        r?;
        let begin = self.msm.begin;
        self.queue_op(BlockOp::Inc(superblock, begin))?;
        self.apply_queued_ops()?;
        self.metadata_sm_commit()
    }

    /// Opens the metadata space map from its root in a superblock; the
    /// allocation cursor starts at 0.
    pub fn metadata_sm_open(&mut self, root: &[u8]) -> Result<()> {
        self.ll_open_metadata(root)?;
        self.msm.begin = 0;
        self.msm.bootstrap = false;
        self.msm.old_ll = self.msm.ll.clone();
        Ok(())
    }

    /// Grows the metadata space map by `extra` blocks (`sm_metadata_extend`):
    /// new bitmaps are allocated from the new region, then accounted for,
    /// round after round until no more are needed.
    pub fn metadata_sm_extend(&mut self, extra: u64) -> Result<()> {
        let mut old_len = self.msm.ll.nr_blocks;
        self.msm.begin = old_len;
        self.msm.bootstrap = true;
        let r = (|| {
            self.ll_extend(SmSel::Metadata, extra)?;
            loop {
                let begin = self.msm.begin;
                self.queue_op(BlockOp::Inc(old_len, begin))?;
                old_len = begin;
                self.apply_queued_ops()?;
                self.ll_commit(SmSel::Metadata)?;
                if old_len == self.msm.begin {
                    return Ok(());
                }
            }
        })();
        self.msm.bootstrap = false;
        r
    }

    // ---- the data space map (dm-space-map-disk) ----

    /// Creates the pool's data space map with `nr_blocks` blocks.
    pub fn data_sm_create(&mut self, nr_blocks: u64) -> Result<()> {
        self.dsm = Some(DiskSpaceMap::new());
        self.ll_new_disk()?;
        self.ll_extend(SmSel::Data, nr_blocks)?;
        self.data_sm_commit()
    }

    /// Opens the pool's data space map from its root in the superblock.
    pub fn data_sm_open(&mut self, root: &[u8]) -> Result<()> {
        let mut dsm = DiskSpaceMap::new();
        dsm.ll = super::space_map::LowLevel::open_disk(root);
        self.dsm = Some(dsm);
        self.data_sm_commit()
    }

    /// Whether the data space map is open (a transaction manager made
    /// for metadata alone has none).
    pub fn has_data_sm(&self) -> bool {
        self.dsm.is_some()
    }

    pub(crate) fn dsm(&mut self) -> &mut DiskSpaceMap {
        self.dsm.as_mut().expect("the data space map is open")
    }

    /// Allocates a data block.
    pub fn data_sm_new_block(&mut self) -> Result<u64> {
        self.data_sm_new_block_skipping(&|_| false)
    }

    /// Allocates a data block, passing over the free blocks `skip` names
    /// as if they were counted (blocks a caller holds in core).
    pub fn data_sm_new_block_skipping(&mut self, skip: &dyn Fn(u64) -> bool) -> Result<u64> {
        let begin = self.dsm().begin;
        let nr_blocks = self.dsm().ll.nr_blocks;
        let b = match self.find_common_free_block_skipping(SmSel::Data, begin, nr_blocks, skip)? {
            Some(b) => b,
            None => self
                .find_common_free_block_skipping(SmSel::Data, 0, begin, skip)?
                .ok_or(PdataError::NoSpace("data"))?,
        };
        self.dsm().begin = b + 1;
        let n = self.ll_inc(SmSel::Data, b, b + 1)?;
        self.dsm().nr_allocated_this_transaction += n;
        Ok(b)
    }

    /// The first data block from `begin` on that is free in both the open
    /// transaction and the last commit and that `skip` does not name (no
    /// wrap-around, nothing allocated).
    pub fn data_sm_find_free_in_both(
        &mut self,
        begin: u64,
        skip: &dyn Fn(u64) -> bool,
    ) -> Result<Option<u64>> {
        let nr_blocks = self.dsm().ll.nr_blocks;
        if begin >= nr_blocks {
            return Ok(None);
        }
        self.find_common_free_block_skipping(SmSel::Data, begin, nr_blocks, skip)
    }

    /// Adds a reference to each data block of `b..e`.
    pub fn data_sm_inc(&mut self, b: u64, e: u64) -> Result<()> {
        let n = self.ll_inc(SmSel::Data, b, e)?;
        self.dsm().nr_allocated_this_transaction += n;
        Ok(())
    }

    /// Drops a reference to each data block of `b..e`.
    pub fn data_sm_dec(&mut self, b: u64, e: u64) -> Result<()> {
        let n = self.ll_dec(SmSel::Data, b, e)?;
        self.dsm().nr_allocated_this_transaction += n;
        Ok(())
    }

    /// The reference count of data block `b`.
    pub fn data_sm_get_count(&mut self, b: u64) -> Result<u32> {
        self.ll_lookup(super::space_map::LlRef::Cur(SmSel::Data), b)
    }

    /// The reference count of data block `b` as of the last commit (0 for
    /// a block beyond the committed space map).
    pub fn data_sm_get_committed_count(&mut self, b: u64) -> Result<u32> {
        if b >= self.dsm().old_ll.nr_blocks {
            return Ok(0);
        }
        self.ll_lookup(super::space_map::LlRef::Old(SmSel::Data), b)
    }

    /// Data blocks tracked as of the last commit (what the kernel reports).
    pub fn data_sm_nr_blocks(&mut self) -> u64 {
        self.dsm().old_ll.nr_blocks
    }

    /// Free data blocks: frees count at once, unlike the metadata space map.
    pub fn data_sm_nr_free(&mut self) -> u64 {
        let dsm = self.dsm();
        // A damaged image may claim more allocated blocks than it has.
        (dsm.old_ll.nr_blocks.saturating_sub(dsm.old_ll.nr_allocated) as i64
            - dsm.nr_allocated_this_transaction)
            .max(0) as u64
    }

    /// Grows the data space map by `extra` blocks.
    pub fn data_sm_extend(&mut self, extra: u64) -> Result<()> {
        self.ll_extend(SmSel::Data, extra)
    }

    /// Commits the data space map (writes back its index entry cache).
    pub fn data_sm_commit(&mut self) -> Result<()> {
        self.ll_commit(SmSel::Data)?;
        let dsm = self.dsm();
        dsm.old_ll = dsm.ll.clone();
        dsm.nr_allocated_this_transaction = 0;
        Ok(())
    }

    /// The data space map's root, as stored in a superblock.
    pub fn data_sm_root(&mut self) -> super::layout::space_map::SmRoot {
        self.dsm().ll.root()
    }
}
