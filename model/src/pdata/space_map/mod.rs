//! Space maps: reference counts for every block of a device, kept in
//! bitmap blocks (two bits a block) with an overflow btree for counts of
//! three or more (spec §1.10–1.14).
//!
//! The "low level" (`ll`) operations here are shared by the metadata space
//! map, which indexes its bitmaps from one index block held in memory, and
//! the disk space map, which indexes them with a btree behind a 64-slot
//! cache. Both are reached through [`SmSel`] on the transaction manager.

pub mod disk;
pub mod metadata;

use super::btree::{BtreeInfo, ValueType};
use super::layout::space_map::{
    bitmap_get, bitmap_set, bitmap_word_full, IndexEntry, SmRoot, BITMAP_HEADER_SIZE, ENTRIES_PER_BITMAP,
    INDEX_ENTRY_SIZE, INDEX_HEADER_SIZE, MAX_METADATA_BITMAPS,
};
use super::layout::{get_u32, put_u32, BlockKind};
use super::transaction::TransactionManager;
use super::{PdataError, Result};
use crate::block_device::BlockDevice;

/// Which space map of the transaction manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmSel {
    /// The metadata space map.
    Metadata,
    /// The data (disk) space map.
    Data,
}

/// A space map's counts now, or as of the last commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlRef {
    /// The current counts.
    Cur(SmSel),
    /// The counts as of the last commit.
    Old(SmSel),
}

/// One slot of the disk space map's index entry cache.
#[derive(Debug, Clone, Copy, Default)]
pub struct IeSlot {
    valid: bool,
    dirty: bool,
    index: u64,
    ie: IndexEntry,
}

/// Slots in the disk space map's index entry cache.
pub const IE_CACHE_SIZE: usize = 64;

/// Where a space map keeps its index entries.
#[derive(Debug, Clone)]
pub enum IndexStore {
    /// The metadata space map: the whole index block in memory (its
    /// padding word and 255 entries).
    Metadata {
        /// The header's padding word, kept as read.
        padding: u32,
        /// The index entries.
        entries: Box<[IndexEntry; MAX_METADATA_BITMAPS]>,
    },
    /// The disk space map: a cache in front of the bitmap index btree.
    Disk(Box<[IeSlot; IE_CACHE_SIZE]>),
}

/// The low-level state of a space map (the kernel's `ll_disk`).
#[derive(Debug, Clone)]
pub struct LowLevel {
    /// Blocks tracked.
    pub nr_blocks: u64,
    /// Blocks with a non-zero count.
    pub nr_allocated: u64,
    /// Metadata: the index block; disk: the root of the bitmap index tree.
    pub bitmap_root: u64,
    /// Root of the overflow tree.
    pub ref_count_root: u64,
    /// Index entries changed since the last commit.
    pub bitmap_index_changed: bool,
    /// The index entries.
    pub index: IndexStore,
}

const REF_COUNT_INFO: BtreeInfo = BtreeInfo { levels: 1, value_type: ValueType::Plain(4) };
const BITMAP_INDEX_INFO: BtreeInfo = BtreeInfo { levels: 1, value_type: ValueType::Plain(16) };

/// The cache slot of a bitmap index: the kernel's block hash, in 32-bit
/// arithmetic.
fn ie_cache_slot(index: u64) -> usize {
    ((index as u32).wrapping_mul(4_294_967_291) & (IE_CACHE_SIZE as u32 - 1)) as usize
}

impl LowLevel {
    /// Empty state for a metadata space map.
    pub fn new_metadata() -> Self {
        LowLevel {
            nr_blocks: 0,
            nr_allocated: 0,
            bitmap_root: 0,
            ref_count_root: 0,
            bitmap_index_changed: false,
            index: IndexStore::Metadata {
                padding: 0,
                entries: Box::new([IndexEntry::default(); MAX_METADATA_BITMAPS]),
            },
        }
    }

    /// Empty state for a disk space map.
    pub fn new_disk() -> Self {
        LowLevel {
            index: IndexStore::Disk(Box::new([IeSlot::default(); IE_CACHE_SIZE])),
            ..Self::new_metadata()
        }
    }

    /// A disk space map's state from its root in a superblock.
    pub fn open_disk(root: &[u8]) -> Self {
        let r = SmRoot::decode(root);
        LowLevel {
            nr_blocks: r.nr_blocks,
            nr_allocated: r.nr_allocated,
            bitmap_root: r.bitmap_root,
            ref_count_root: r.ref_count_root,
            ..Self::new_disk()
        }
    }

    /// The root to store in a superblock.
    pub fn root(&self) -> SmRoot {
        SmRoot {
            nr_blocks: self.nr_blocks,
            nr_allocated: self.nr_allocated,
            bitmap_root: self.bitmap_root,
            ref_count_root: self.ref_count_root,
        }
    }

    fn max_index_entries(&self) -> u64 {
        match self.index {
            IndexStore::Metadata { .. } => MAX_METADATA_BITMAPS as u64,
            IndexStore::Disk(_) => u64::MAX,
        }
    }
}

/// The bitmap data area of a bitmap block.
fn bitmap_data(block: &[u8]) -> &[u8] {
    &block[BITMAP_HEADER_SIZE..]
}

/// First entry in `begin..end` whose count is zero, skipping whole words of
/// used entries as the kernel's scan does.
fn find_free_in_bitmap(data: &[u8], mut begin: u64, end: u64) -> Option<u64> {
    while begin < end {
        if begin.is_multiple_of(32) && bitmap_word_full(data, begin) {
            begin += 32;
            continue;
        }
        if bitmap_get(data, begin) == 0 {
            return Some(begin);
        }
        begin += 1;
    }
    None
}

impl<D: BlockDevice> TransactionManager<D> {
    pub(crate) fn ll_mut(&mut self, r: LlRef) -> &mut LowLevel {
        match r {
            LlRef::Cur(SmSel::Metadata) => &mut self.msm.ll,
            LlRef::Old(SmSel::Metadata) => &mut self.msm.old_ll,
            LlRef::Cur(SmSel::Data) => &mut self.dsm().ll,
            LlRef::Old(SmSel::Data) => &mut self.dsm().old_ll,
        }
    }

    fn ie_cache_writeback(&mut self, sel: SmSel, slot: usize) -> Result<()> {
        let ll = self.ll_mut(LlRef::Cur(sel));
        let IndexStore::Disk(cache) = &mut ll.index else { unreachable!("disk only") };
        cache[slot].dirty = false;
        let (index, ie, root) = (cache[slot].index, cache[slot].ie, ll.bitmap_root);
        let (new_root, _) = self.btree_insert(&BITMAP_INDEX_INFO, root, &[index], &ie.to_bytes())?;
        self.ll_mut(LlRef::Cur(sel)).bitmap_root = new_root;
        Ok(())
    }

    /// The index entry of bitmap `index`.
    fn load_ie(&mut self, r: LlRef, index: u64) -> Result<IndexEntry> {
        let ll = self.ll_mut(r);
        if index >= ll.max_index_entries() {
            return Err(PdataError::Invalid(format!("bitmap index {index} out of range")));
        }
        let root = ll.bitmap_root;
        let slot = ie_cache_slot(index);
        match &mut ll.index {
            IndexStore::Metadata { entries, .. } => Ok(entries[index as usize]),
            IndexStore::Disk(cache) => {
                let cached = cache[slot];
                if cached.valid {
                    if cached.index == index {
                        return Ok(cached.ie);
                    }
                    if cached.dirty {
                        // Only the current counts are ever dirty.
                        let LlRef::Cur(sel) = r else { unreachable!("old counts are clean") };
                        self.ie_cache_writeback(sel, slot)?;
                    }
                }
                let root = match r {
                    LlRef::Cur(_) => self.ll_mut(r).bitmap_root,
                    LlRef::Old(_) => root,
                };
                let mut buf = [0u8; 16];
                if !self.btree_lookup(&BITMAP_INDEX_INFO, root, &[index], &mut buf)? {
                    return Err(PdataError::Invalid(format!(
                        "space map bitmap index {index} is missing from the index tree"
                    )));
                }
                let ie = IndexEntry::decode(&buf);
                if let IndexStore::Disk(cache) = &mut self.ll_mut(r).index {
                    cache[slot] = IeSlot { valid: true, dirty: false, index, ie };
                }
                Ok(ie)
            }
        }
    }

    fn save_ie(&mut self, sel: SmSel, index: u64, ie: IndexEntry) -> Result<()> {
        let ll = self.ll_mut(LlRef::Cur(sel));
        ll.bitmap_index_changed = true;
        let slot = ie_cache_slot(index);
        match &mut ll.index {
            IndexStore::Metadata { entries, .. } => {
                entries[index as usize] = ie;
                Ok(())
            }
            IndexStore::Disk(cache) => {
                let cached = cache[slot];
                if cached.valid {
                    if cached.index == index {
                        cache[slot].ie = ie;
                        cache[slot].dirty = true;
                        return Ok(());
                    }
                    if cached.dirty {
                        self.ie_cache_writeback(sel, slot)?;
                    }
                }
                if let IndexStore::Disk(cache) = &mut self.ll_mut(LlRef::Cur(sel)).index {
                    cache[slot] = IeSlot { valid: true, dirty: true, index, ie };
                }
                Ok(())
            }
        }
    }

    /// The two-bit bitmap value of block `b` (3 means "see the overflow tree").
    pub(crate) fn ll_lookup_bitmap(&mut self, r: LlRef, b: u64) -> Result<u32> {
        let ie = self.load_ie(r, b / ENTRIES_PER_BITMAP)?;
        let block = self.bm.read(ie.blocknr, BlockKind::Bitmap)?;
        Ok(bitmap_get(bitmap_data(block), b % ENTRIES_PER_BITMAP))
    }

    /// The reference count of block `b`.
    pub(crate) fn ll_lookup(&mut self, r: LlRef, b: u64) -> Result<u32> {
        let raw = self.ll_lookup_bitmap(r, b)?;
        if raw != 3 {
            return Ok(raw);
        }
        let root = self.ll_mut(r).ref_count_root;
        let mut buf = [0u8; 4];
        if !self.btree_lookup(&REF_COUNT_INFO, root, &[b], &mut buf)? {
            return Err(PdataError::Invalid(format!(
                "block {b} has bitmap count 3 but no overflow tree entry"
            )));
        }
        Ok(u32::from_le_bytes(buf))
    }

    /// First block in `begin..end` free in the given counts.
    fn ll_find_free_block(&mut self, r: LlRef, begin: u64, end: u64) -> Result<Option<u64>> {
        let index_end = end.div_ceil(ENTRIES_PER_BITMAP);
        let mut offset = begin % ENTRIES_PER_BITMAP;
        let end_offset = match end % ENTRIES_PER_BITMAP {
            0 => ENTRIES_PER_BITMAP,
            e => e,
        };
        for i in begin / ENTRIES_PER_BITMAP..index_end {
            let ie = self.load_ie(r, i)?;
            let start = offset.max(u64::from(ie.none_free_before));
            offset = 0;
            if ie.nr_free == 0 {
                continue;
            }
            let bit_end = if i == index_end - 1 { end_offset } else { ENTRIES_PER_BITMAP };
            let block = self.bm.read(ie.blocknr, BlockKind::Bitmap)?;
            if let Some(pos) = find_free_in_bitmap(bitmap_data(block), start, bit_end) {
                return Ok(Some(i * ENTRIES_PER_BITMAP + pos));
            }
        }
        Ok(None)
    }

    /// A block free both now and as of the last commit, searching from
    /// `begin` to the end of the device. (The kernel passes an end but its
    /// search always runs to the end; so does this one.)
    pub(crate) fn find_common_free_block(&mut self, sel: SmSel, begin: u64, end: u64) -> Result<Option<u64>> {
        self.find_common_free_block_skipping(sel, begin, end, &|_| false)
    }

    /// [`Self::find_common_free_block`], passing over the blocks `skip`
    /// names.
    pub(crate) fn find_common_free_block_skipping(
        &mut self,
        sel: SmSel,
        mut begin: u64,
        _end: u64,
        skip: &dyn Fn(u64) -> bool,
    ) -> Result<Option<u64>> {
        loop {
            let nr_blocks = self.ll_mut(LlRef::Cur(sel)).nr_blocks;
            let Some(b) = self.ll_find_free_block(LlRef::Cur(sel), begin, nr_blocks)? else {
                return Ok(None);
            };
            if !skip(b) {
                if b >= self.ll_mut(LlRef::Old(sel)).nr_blocks {
                    return Ok(Some(b));
                }
                if self.ll_lookup(LlRef::Old(sel), b)? == 0 {
                    return Ok(Some(b));
                }
            }
            begin = b + 1;
        }
    }

    /// The part of `b..e` in `b`'s bitmap, with that bitmap made writable:
    /// (bitmap index, first entry, end entry, index entry pointing at the
    /// writable copy). The index entry is saved by the caller when done.
    fn writable_bitmap(&mut self, sel: SmSel, b: u64, e: u64) -> Result<(u64, u64, u64, IndexEntry)> {
        let index = b / ENTRIES_PER_BITMAP;
        let bit = b % ENTRIES_PER_BITMAP;
        let mut ie = self.load_ie(LlRef::Cur(sel), index)?;
        ie.blocknr = self.shadow_block(ie.blocknr, BlockKind::Bitmap)?.block;
        Ok((index, bit, (bit + (e - b)).min(ENTRIES_PER_BITMAP), ie))
    }

    /// Adds a reference to each block of `b..e`; returns the number of
    /// blocks that went from free to allocated.
    pub(crate) fn ll_inc(&mut self, sel: SmSel, mut b: u64, e: u64) -> Result<i64> {
        let mut nr_allocations = 0;
        while b != e {
            let (index, mut bit, bit_end, mut ie) = self.writable_bitmap(sel, b, e)?;
            let mut overflow_leaf = None;
            while bit != bit_end {
                let bitmap = &mut self.bm.write(ie.blocknr, BlockKind::Bitmap)?[BITMAP_HEADER_SIZE..];
                match bitmap_get(bitmap, bit) {
                    0 => {
                        bitmap_set(bitmap, bit, 1);
                        nr_allocations += 1;
                        self.ll_mut(LlRef::Cur(sel)).nr_allocated += 1;
                        ie.nr_free = ie.nr_free.wrapping_sub(1);
                        if u64::from(ie.none_free_before) == bit {
                            ie.none_free_before = bit as u32 + 1;
                        }
                    }
                    1 => bitmap_set(bitmap, bit, 2),
                    2 => {
                        bitmap_set(bitmap, bit, 3);
                        overflow_leaf = None;
                        let root = self.ll_mut(LlRef::Cur(sel)).ref_count_root;
                        let before = self.probes;
                        let (root, _) =
                            self.btree_insert(&REF_COUNT_INFO, root, &[b], &3u32.to_le_bytes())?;
                        self.ll_mut(LlRef::Cur(sel)).ref_count_root = root;
                        if sel == SmSel::Metadata {
                            self.probes.metadata_sm_splits += (self.probes.root_splits
                                + self.probes.node_splits)
                                - (before.root_splits + before.node_splits);
                        }
                    }
                    _ => self.overflow_adjust(sel, b, &mut overflow_leaf, true).map(|_| ())?,
                }
                bit += 1;
                b += 1;
            }
            self.save_ie(sel, index, ie)?;
        }
        Ok(nr_allocations)
    }

    /// Drops a reference from each block of `b..e`; returns minus the number
    /// of blocks freed.
    pub(crate) fn ll_dec(&mut self, sel: SmSel, mut b: u64, e: u64) -> Result<i64> {
        let mut nr_allocations = 0;
        while b != e {
            let (index, mut bit, bit_end, mut ie) = self.writable_bitmap(sel, b, e)?;
            let mut overflow_leaf = None;
            while bit != bit_end {
                let bitmap = &mut self.bm.write(ie.blocknr, BlockKind::Bitmap)?[BITMAP_HEADER_SIZE..];
                match bitmap_get(bitmap, bit) {
                    0 => return Err(self.noted(PdataError::RefCountUnderflow(b))),
                    1 => {
                        bitmap_set(bitmap, bit, 0);
                        nr_allocations -= 1;
                        self.ll_mut(LlRef::Cur(sel)).nr_allocated -= 1;
                        ie.nr_free = ie.nr_free.wrapping_add(1);
                        ie.none_free_before = ie.none_free_before.min(bit as u32);
                    }
                    2 => bitmap_set(bitmap, bit, 1),
                    _ => {
                        let old = self.overflow_adjust(sel, b, &mut overflow_leaf, false)?;
                        if old == 3 {
                            let bitmap =
                                &mut self.bm.write(ie.blocknr, BlockKind::Bitmap)?[BITMAP_HEADER_SIZE..];
                            bitmap_set(bitmap, bit, 2);
                        }
                    }
                }
                bit += 1;
                b += 1;
            }
            self.save_ie(sel, index, ie)?;
        }
        Ok(nr_allocations)
    }

    /// Increments or decrements block `b`'s count in the overflow tree,
    /// reusing the leaf found for the previous block when it holds `b`.
    /// Returns the count before the change; a decrement from 3 removes the
    /// entry (the caller sets the bitmap back to 2).
    fn overflow_adjust(
        &mut self,
        sel: SmSel,
        b: u64,
        leaf_cache: &mut Option<u64>,
        increment: bool,
    ) -> Result<u32> {
        use super::btree::node::Node;
        if let Some(leaf) = *leaf_cache {
            let node = Node::new(self.bm.read(leaf, BlockKind::BtreeNode)?);
            if let Some(i) = node.index_of(b) {
                let off = node.value_offset(i);
                let rc = get_u32(node.bytes(), off);
                if increment || rc > 3 {
                    let new = if increment { rc.wrapping_add(1) } else { rc - 1 };
                    put_u32(self.bm.write(leaf, BlockKind::BtreeNode)?, off, new);
                    return Ok(rc);
                }
                *leaf_cache = None;
                self.overflow_remove(sel, b)?;
                return Ok(rc);
            }
        }
        *leaf_cache = None;
        let root = self.ll_mut(LlRef::Cur(sel)).ref_count_root;
        let (root, leaf, index) = self.btree_get_overwrite_leaf(&REF_COUNT_INFO, root, b)?;
        self.ll_mut(LlRef::Cur(sel)).ref_count_root = root;
        let node = Node::new(self.bm.read(leaf, BlockKind::BtreeNode)?);
        if node.index_of(b) != Some(index) {
            return Err(PdataError::Invalid(format!("overflow btree is missing block {b}")));
        }
        let off = node.value_offset(index);
        let rc = get_u32(node.bytes(), off);
        if !increment && rc == 3 {
            self.overflow_remove(sel, b)?;
            return Ok(rc);
        }
        let new = if increment { rc.wrapping_add(1) } else { rc - 1 };
        put_u32(self.bm.write(leaf, BlockKind::BtreeNode)?, off, new);
        *leaf_cache = Some(leaf);
        Ok(rc)
    }

    fn overflow_remove(&mut self, sel: SmSel, b: u64) -> Result<()> {
        let root = self.ll_mut(LlRef::Cur(sel)).ref_count_root;
        let before = self.probes;
        let root = self.btree_remove(&REF_COUNT_INFO, root, &[b])?;
        self.ll_mut(LlRef::Cur(sel)).ref_count_root = root;
        if sel == SmSel::Metadata {
            self.probes.metadata_sm_shrinks +=
                (self.probes.merges + self.probes.collapses) - (before.merges + before.collapses);
        }
        Ok(())
    }

    /// Grows the space map by `extra` blocks, allocating and indexing new
    /// (empty) bitmaps.
    pub(crate) fn ll_extend(&mut self, sel: SmSel, extra: u64) -> Result<()> {
        let ll = self.ll_mut(LlRef::Cur(sel));
        let nr_blocks = ll.nr_blocks + extra;
        let old_bitmaps = ll.nr_blocks.div_ceil(ENTRIES_PER_BITMAP);
        let bitmaps = nr_blocks.div_ceil(ENTRIES_PER_BITMAP);
        if bitmaps > ll.max_index_entries() {
            return Err(PdataError::Invalid("space map too large".into()));
        }
        // Set before allocating: the bootstrap allocator checks it.
        ll.nr_blocks = nr_blocks;
        for i in old_bitmaps..bitmaps {
            let blocknr = self.new_block(BlockKind::Bitmap)?;
            let ie = IndexEntry { blocknr, nr_free: ENTRIES_PER_BITMAP as u32, none_free_before: 0 };
            self.save_ie(sel, i, ie)?;
        }
        Ok(())
    }

    /// Writes the index if it changed: the metadata space map shadows its
    /// index block (which may change the index, so it is copied after), the
    /// disk one writes back its cache in slot order.
    pub(crate) fn ll_commit(&mut self, sel: SmSel) -> Result<()> {
        if !self.ll_mut(LlRef::Cur(sel)).bitmap_index_changed {
            return Ok(());
        }
        match sel {
            SmSel::Metadata => {
                let root = self.msm.ll.bitmap_root;
                let shadow = self.shadow_block(root, BlockKind::MetadataIndex)?;
                let IndexStore::Metadata { padding, entries } = &self.msm.ll.index else {
                    unreachable!("metadata index")
                };
                let (padding, entries) = (*padding, entries.clone());
                let block = self.bm.write(shadow.block, BlockKind::MetadataIndex)?;
                put_u32(block, 4, padding);
                for (i, ie) in entries.iter().enumerate() {
                    ie.encode(&mut block[INDEX_HEADER_SIZE + i * INDEX_ENTRY_SIZE..]);
                }
                self.msm.ll.bitmap_root = shadow.block;
            }
            SmSel::Data => {
                let mut result = Ok(());
                for slot in 0..IE_CACHE_SIZE {
                    let IndexStore::Disk(cache) = &self.dsm().ll.index else { unreachable!() };
                    if cache[slot].valid && cache[slot].dirty {
                        // Like the kernel, carry on after a failure and
                        // report the last one.
                        result = self.ie_cache_writeback(sel, slot);
                    }
                }
                result?;
            }
        }
        self.ll_mut(LlRef::Cur(sel)).bitmap_index_changed = false;
        Ok(())
    }

    pub(crate) fn ll_new_metadata(&mut self) -> Result<()> {
        self.msm.ll = LowLevel::new_metadata();
        self.msm.ll.bitmap_root = self.new_block(BlockKind::MetadataIndex)?;
        self.msm.ll.ref_count_root = self.btree_empty(ValueType::Plain(4))?;
        Ok(())
    }

    pub(crate) fn ll_open_metadata(&mut self, root: &[u8]) -> Result<()> {
        let r = SmRoot::decode(root);
        let block = self.bm.read(r.bitmap_root, BlockKind::MetadataIndex)?;
        let padding = get_u32(block, 4);
        let mut entries = Box::new([IndexEntry::default(); MAX_METADATA_BITMAPS]);
        for (i, ie) in entries.iter_mut().enumerate() {
            *ie = IndexEntry::decode(&block[INDEX_HEADER_SIZE + i * INDEX_ENTRY_SIZE..]);
        }
        self.msm.ll = LowLevel {
            nr_blocks: r.nr_blocks,
            nr_allocated: r.nr_allocated,
            bitmap_root: r.bitmap_root,
            ref_count_root: r.ref_count_root,
            bitmap_index_changed: false,
            index: IndexStore::Metadata { padding, entries },
        };
        Ok(())
    }

    pub(crate) fn ll_new_disk(&mut self) -> Result<()> {
        self.dsm().ll = LowLevel::new_disk();
        let bitmap_root = self.btree_empty(ValueType::Plain(16))?;
        self.dsm().ll.bitmap_root = bitmap_root;
        let ref_count_root = self.btree_empty(ValueType::Plain(4))?;
        self.dsm().ll.ref_count_root = ref_count_root;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ie_cache_slots_follow_the_kernel_hash() {
        // (u32)index * 4294967291 mod 64 == -5 * index mod 64.
        for index in 0..1000u64 {
            assert_eq!(ie_cache_slot(index) as i64, (-5 * index as i64).rem_euclid(64));
        }
    }

    #[test]
    fn free_scan_skips_full_words_and_finds_gaps() {
        let mut data = vec![0u8; 4080];
        for e in 0..70 {
            bitmap_set(&mut data, e, 1);
        }
        assert_eq!(find_free_in_bitmap(&data, 0, 16320), Some(70));
        assert_eq!(find_free_in_bitmap(&data, 0, 70), None);
        bitmap_set(&mut data, 5, 0);
        assert_eq!(find_free_in_bitmap(&data, 0, 16320), Some(5));
        assert_eq!(find_free_in_bitmap(&data, 6, 16320), Some(70));
    }

    #[test]
    fn a_count_below_zero_is_an_error_the_transaction_manager_keeps() {
        use crate::block_device::MemDevice;
        let mut tm = TransactionManager::create(MemDevice::new(2048), 0).unwrap();
        tm.data_sm_create(100).unwrap();
        tm.data_sm_inc(5, 6).unwrap();
        tm.data_sm_dec(5, 6).unwrap();
        assert_eq!(tm.broken(), None);
        assert_eq!(tm.data_sm_dec(5, 6), Err(PdataError::RefCountUnderflow(5)));
        assert_eq!(tm.broken(), Some("unable to decrement the reference count of block 5 below 0"));
        // The first is kept.
        let _ = tm.data_sm_dec(7, 8);
        assert_eq!(tm.broken(), Some("unable to decrement the reference count of block 5 below 0"));
    }
}
