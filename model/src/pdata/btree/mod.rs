//! Copy-on-write btrees in the kernel's layout and with its algorithms
//! (dm-btree.c, dm-btree-remove.c, dm-btree-spine.c; spec §1.3–1.8).
//!
//! Every modification walks a "spine" from the root, shadowing each node
//! through the transaction manager, and restructures nodes exactly where and
//! how the kernel does (pre-emptive splits on insert, rebalancing of
//! children on removal), so that the same operations allocate the same
//! blocks and leave the same bytes.

pub mod node;

mod del;
mod insert;
mod remove;

use self::node::Node;
use super::layout::node::{max_entries_for, INTERNAL, LEAF};
use super::layout::thin::unpack_block_time;
use super::layout::BlockKind;
use super::space_map::{LlRef, SmSel};
use super::transaction::TransactionManager;
use super::{BlockNr, PdataError, Result};
use crate::block_device::BlockDevice;

/// Deepest tree the code walks before calling the metadata corrupt (the
/// kernel's deletion stack is 64 frames; real trees are a handful deep).
pub const MAX_DEPTH: usize = 64;

/// What a walk past [`MAX_DEPTH`] says ([`PdataError::Runaway`]).
const DEEPER: &str = "tree deeper than any real tree (a cycle?)";

/// What a tree's leaf values are, and how references through them are
/// counted (the kernel's `dm_btree_value_type` callbacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// Values of this many bytes that reference nothing.
    Plain(usize),
    /// Metadata block numbers, each holding a reference (the upper levels
    /// of multi-level trees; the kernel's le64 type).
    MetadataBlocks,
    /// Thin mappings: data block and time, each holding a data block
    /// reference; two values are equal when their data blocks are.
    DataBlockTimes,
    /// Roots of per-device mapping trees (the thin top level used on its
    /// own): dropping one deletes the device's tree.
    SubtreeRoots,
    /// Locations of dm-array blocks (the btree of a dm-array): every value
    /// holds a reference to its array block, counted one block at a time
    /// (dm-array.c `block_inc` / `block_dec`); the values inside array
    /// blocks reference nothing for every array the kernel's cache uses.
    ArrayBlocks,
}

/// Which reference counts a question about sharing is asked of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountsAsOf {
    /// The current transaction's.
    Now,
    /// The last commit's: what a crash would go back to.
    LastCommit,
}

impl ValueType {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            ValueType::Plain(n) => n,
            _ => 8,
        }
    }

    fn counts_references(self) -> bool {
        !matches!(self, ValueType::Plain(_))
    }

    /// Whether overwriting `old` with `new` keeps the same reference.
    fn equal(self, old: &[u8], new: &[u8]) -> bool {
        match self {
            ValueType::DataBlockTimes => {
                let o = unpack_block_time(u64::from_le_bytes(old.try_into().expect("8")));
                let n = unpack_block_time(u64::from_le_bytes(new.try_into().expect("8")));
                o.0 == n.0
            }
            _ => old == new,
        }
    }
}

/// A tree's shape: how many levels of keys, and the last level's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BtreeInfo {
    /// Levels; every level but the last maps a key to the next level's root.
    pub levels: usize,
    /// Values of the last level.
    pub value_type: ValueType,
}

impl BtreeInfo {
    /// The value type used at `level`.
    pub fn level_type(&self, level: usize) -> ValueType {
        if level + 1 == self.levels {
            self.value_type
        } else {
            ValueType::MetadataBlocks
        }
    }
}

fn u64s(values: &[u8], count: usize) -> impl Iterator<Item = u64> + '_ {
    values.chunks_exact(8).take(count).map(|c| u64::from_le_bytes(c.try_into().expect("8")))
}

/// The path of at most two locked nodes a modification walks down.
#[derive(Debug, Default)]
pub(crate) struct ShadowSpine {
    nodes: [BlockNr; 2],
    count: usize,
    root: BlockNr,
    depth: usize,
}

impl ShadowSpine {
    fn current(&self) -> BlockNr {
        self.nodes[self.count - 1]
    }
    fn parent(&self) -> Option<BlockNr> {
        (self.count == 2).then_some(self.nodes[0])
    }
    fn set_current(&mut self, b: BlockNr) {
        self.nodes[self.count - 1] = b;
    }
}

impl<D: BlockDevice> TransactionManager<D> {
    /// A reference-count update's result as the operation sees it: the
    /// error with [`TransactionManager::refcount_errors_fail`], nothing
    /// otherwise (6.1's value types return nothing; the next value is
    /// still updated).
    pub(crate) fn refcount_result(&self, r: Result<()>) -> Result<()> {
        if self.refcount_errors_fail {
            r
        } else {
            Ok(())
        }
    }

    /// Applies `metadata` (metadata blocks) or `data` (data block-times) to
    /// each run of consecutive blocks among `count` values of type `vt`
    /// (`dm_tm_with_runs`), each run's error as [`Self::refcount_result`]
    /// says.
    fn runs_of_counted_blocks(
        &mut self,
        vt: ValueType,
        values: &[u8],
        count: usize,
        metadata: fn(&mut Self, u64, u64) -> Result<()>,
        data: fn(&mut Self, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let (blocks, f): (Vec<u64>, _) = match vt {
            ValueType::DataBlockTimes => {
                (u64s(values, count).map(|v| unpack_block_time(v).0).collect(), data)
            }
            _ => (u64s(values, count).collect(), metadata),
        };
        self.for_each_run(blocks, |tm, b, e| {
            let r = f(tm, b, e);
            tm.refcount_result(r)
        })
    }

    /// Adds references for `count` values of type `vt` stored in `values`
    /// (`dm_btree_value_type.inc`; see [`Self::refcount_result`]).
    pub(crate) fn value_inc(&mut self, vt: ValueType, values: &[u8], count: usize) -> Result<()> {
        match vt {
            ValueType::Plain(_) => Ok(()),
            ValueType::MetadataBlocks | ValueType::DataBlockTimes => {
                self.runs_of_counted_blocks(vt, values, count, Self::inc_range, Self::data_sm_inc)
            }
            // `inc` applies `refcount_result` itself (`dm_tm_inc`).
            ValueType::SubtreeRoots | ValueType::ArrayBlocks => {
                for root in u64s(values, count) {
                    self.inc(root)?;
                }
                Ok(())
            }
        }
    }

    /// Drops references for `count` values of type `vt` stored in `values`
    /// (`dm_btree_value_type.dec`; see [`Self::refcount_result`]). As 6.1
    /// does when errors are skipped: a subtree whose deletion fails
    /// part-way (`subtree_dec`: "btree delete failed") keeps the references
    /// it had not dropped yet, and an array block that cannot be read keeps
    /// its own (`block_dec` returns before `dm_tm_dec`): leaks the next
    /// commit persists.
    pub(crate) fn value_dec(&mut self, vt: ValueType, values: &[u8], count: usize) -> Result<()> {
        match vt {
            ValueType::Plain(_) => Ok(()),
            ValueType::MetadataBlocks | ValueType::DataBlockTimes => {
                self.runs_of_counted_blocks(vt, values, count, Self::dec_range, Self::data_sm_dec)
            }
            ValueType::SubtreeRoots => {
                const BOTTOM: BtreeInfo = BtreeInfo { levels: 1, value_type: ValueType::DataBlockTimes };
                for root in u64s(values, count).collect::<Vec<_>>() {
                    let r = self.btree_del(&BOTTOM, root);
                    self.refcount_result(r)?;
                }
                Ok(())
            }
            ValueType::ArrayBlocks => {
                for b in u64s(values, count).collect::<Vec<_>>() {
                    let r = self.array_block_dec(b);
                    self.refcount_result(r)?;
                }
                Ok(())
            }
        }
    }

    /// Drops a reference to array block `b`: on the last one the kernel
    /// reads the block to drop its values' references (none here), which
    /// also validates it; a block that cannot be read keeps its reference.
    fn array_block_dec(&mut self, b: BlockNr) -> Result<()> {
        if self.ref_count(b)? == 1 {
            self.read(b, BlockKind::Array)?;
        }
        self.dec(b)
    }

    /// A node's bytes, checked to be the kind of node the tree expects at
    /// this point: the kernel trusts these fields; a model reading damaged
    /// metadata must not.
    pub(crate) fn read_node(&mut self, b: BlockNr, vt: ValueType) -> Result<&[u8; 4096]> {
        let data = self.bm.read(b, BlockKind::BtreeNode)?;
        check_node_shape(data, b, vt)?;
        self.bm.read(b, BlockKind::BtreeNode)
    }

    /// Gives the new copy of a shared node its own references to its
    /// children (`inc_children`).
    pub(crate) fn inc_children(&mut self, b: BlockNr, vt: ValueType) -> Result<()> {
        let data = *self.bm.read(b, BlockKind::BtreeNode)?;
        let n = Node::new(&data);
        let off = n.value_offset(0);
        if n.is_internal() {
            self.value_inc(ValueType::MetadataBlocks, &data[off..], n.nr_entries())
        } else if vt.counts_references() {
            self.value_inc(vt, &data[off..], n.nr_entries())
        } else {
            Ok(())
        }
    }

    /// Shadows `b` as the next node of the spine.
    pub(crate) fn shadow_step(&mut self, s: &mut ShadowSpine, b: BlockNr, vt: ValueType) -> Result<()> {
        s.depth += 1;
        if s.depth > MAX_DEPTH {
            return Err(self.runaway(BlockKind::BtreeNode, b, DEEPER));
        }
        if s.count == 2 {
            s.nodes[0] = s.nodes[1];
            s.count = 1;
        }
        // The kernel's order (`__shadow_block`): a new block allocated and
        // the original's reference dropped before the original is read and
        // validated, so a read error or bad checksum there leaves the
        // original counted one less (and the new block leaked) in a
        // transaction that may still commit. The shape is checked on the
        // copy, which has the original's bytes.
        let shadow = self.shadow_block(b, BlockKind::BtreeNode)?;
        self.read_node(shadow.block, vt)?;
        if shadow.inc_children {
            self.inc_children(shadow.block, vt)?;
        }
        if s.count == 0 {
            s.root = shadow.block;
        }
        s.nodes[s.count] = shadow.block;
        s.count += 1;
        Ok(())
    }

    /// Shadows child `index` of `parent` (already writable) and points the
    /// parent at the copy.
    fn shadow_child(&mut self, parent: BlockNr, index: usize, vt: ValueType) -> Result<BlockNr> {
        let child = Node::new(self.bm.read(parent, BlockKind::BtreeNode)?).value64(index);
        // The kernel's order, as in `shadow_step`.
        let shadow = self.shadow_block(child, BlockKind::BtreeNode)?;
        self.read_node(shadow.block, vt)?;
        let skip = self.mutations.shadow_child_skips_internal_children
            && Node::new(self.bm.read(shadow.block, BlockKind::BtreeNode)?).is_internal();
        if shadow.inc_children && !skip {
            self.inc_children(shadow.block, vt)?;
        }
        node::set_value64(self.bm.write(parent, BlockKind::BtreeNode)?, index, shadow.block);
        Ok(shadow.block)
    }

    /// Points the spine's parent slot `index` at the spine's current node.
    fn patch_parent(&mut self, s: &ShadowSpine, index: usize) -> Result<()> {
        if let Some(parent) = s.parent() {
            let cur = s.current();
            node::set_value64(self.bm.write(parent, BlockKind::BtreeNode)?, index, cur);
        }
        Ok(())
    }

    /// Creates an empty tree: one leaf (`dm_btree_empty`).
    pub fn btree_empty(&mut self, vt: ValueType) -> Result<BlockNr> {
        let b = self.new_block(BlockKind::BtreeNode)?;
        let data = self.bm.write(b, BlockKind::BtreeNode)?;
        node::set_header(data, LEAF, 0, max_entries_for(vt.size()) as usize, vt.size());
        Ok(b)
    }

    /// Looks up `keys` (one per level); copies the value into `value` and
    /// returns true if found.
    pub fn btree_lookup(
        &mut self,
        info: &BtreeInfo,
        mut root: BlockNr,
        keys: &[u64],
        value: &mut [u8],
    ) -> Result<bool> {
        for (level, &key) in keys.iter().enumerate().take(info.levels) {
            let vt = info.level_type(level);
            let Some((k, leaf, i)) = self.lookup_raw(root, key, vt)? else { return Ok(false) };
            if k != key {
                return Ok(false);
            }
            let n = Node::new(self.bm.read(leaf, BlockKind::BtreeNode)?);
            if level + 1 == info.levels {
                value.copy_from_slice(&n.value(i)[..value.len()]);
            } else {
                root = n.value64(i);
            }
        }
        Ok(true)
    }

    /// Whether any node on the lookup path of `keys` — every level, the
    /// internal nodes too — has more than one reference, that is whether
    /// the value found may also be reached from another root. `None` when
    /// `keys` is not in the tree.
    ///
    /// With [`CountsAsOf::LastCommit`], `root` must be a committed root:
    /// its nodes are intact, as no block freed since the commit is reused
    /// before the next one.
    pub fn btree_path_shared(
        &mut self,
        info: &BtreeInfo,
        mut root: BlockNr,
        keys: &[u64],
        counts: CountsAsOf,
    ) -> Result<Option<bool>> {
        let mut shared = false;
        for (level, &key) in keys.iter().enumerate().take(info.levels) {
            let mut note_sharing = |tm: &mut Self, b: BlockNr| -> Result<()> {
                shared |= match counts {
                    CountsAsOf::Now => tm.metadata_sm_count_is_more_than_one(b)?,
                    CountsAsOf::LastCommit => tm.ll_lookup(LlRef::Old(SmSel::Metadata), b)? > 1,
                };
                Ok(())
            };
            let Some((k, leaf, i)) =
                self.lookup_visiting(root, key, info.level_type(level), &mut note_sharing)?
            else {
                return Ok(None);
            };
            if k != key {
                return Ok(None);
            }
            root = Node::new(self.bm.read(leaf, BlockKind::BtreeNode)?).value64(i);
        }
        Ok(Some(shared))
    }

    /// Walks down from `root` with lower_bound; returns the leaf key found,
    /// the leaf and the index, or `None` when the search falls off.
    fn lookup_raw(&mut self, b: BlockNr, key: u64, vt: ValueType) -> Result<Option<(u64, BlockNr, usize)>> {
        self.lookup_visiting(b, key, vt, |_, _| Ok(()))
    }

    /// [`Self::lookup_raw`], calling `visit` with every node on the way
    /// down before reading it.
    fn lookup_visiting(
        &mut self,
        mut b: BlockNr,
        key: u64,
        vt: ValueType,
        mut visit: impl FnMut(&mut Self, BlockNr) -> Result<()>,
    ) -> Result<Option<(u64, BlockNr, usize)>> {
        for _ in 0..MAX_DEPTH {
            visit(self, b)?;
            let n = Node::new(self.read_node(b, vt)?);
            let i = n.lower_bound(key);
            if i < 0 || i as usize >= n.nr_entries() {
                return Ok(None);
            }
            let i = i as usize;
            if n.is_leaf() {
                return Ok(Some((n.key(i), b, i)));
            }
            b = n.value64(i);
        }
        Err(self.runaway(BlockKind::BtreeNode, b, DEEPER))
    }

    /// The first key `>= keys[last]` in the last level, the earlier levels
    /// matching exactly (`dm_btree_lookup_next`).
    pub fn btree_lookup_next(
        &mut self,
        info: &BtreeInfo,
        mut root: BlockNr,
        keys: &[u64],
        value: &mut [u8],
    ) -> Result<Option<u64>> {
        let last = info.levels - 1;
        for (level, &key) in keys.iter().enumerate().take(last) {
            let Some((k, leaf, i)) = self.lookup_raw(root, key, ValueType::MetadataBlocks)? else {
                return Ok(None);
            };
            if k != key {
                return Ok(None);
            }
            let _ = level;
            root = Node::new(self.bm.read(leaf, BlockKind::BtreeNode)?).value64(i);
        }
        self.lookup_next_single(root, keys[last], info.value_type, value, 0)
    }

    fn lookup_next_single(
        &mut self,
        b: BlockNr,
        key: u64,
        vt: ValueType,
        value: &mut [u8],
        depth: usize,
    ) -> Result<Option<u64>> {
        if depth > MAX_DEPTH {
            return Err(self.runaway(BlockKind::BtreeNode, b, DEEPER));
        }
        let n = Node::new(self.read_node(b, vt)?);
        let nr = n.nr_entries();
        if n.is_internal() {
            let i = n.lower_bound(key).max(0) as usize;
            if i >= nr {
                return Ok(None);
            }
            let (child, next) = (n.value64(i), (i + 1 < nr).then(|| n.value64(i + 1)));
            if let Some(k) = self.lookup_next_single(child, key, vt, value, depth + 1)? {
                return Ok(Some(k));
            }
            match next {
                Some(next) => self.lookup_next_single(next, key, vt, value, depth + 1),
                None => Ok(None),
            }
        } else {
            let i = n.upper_bound(key);
            if i < 0 || i as usize >= nr {
                return Ok(None);
            }
            value.copy_from_slice(&n.value(i as usize)[..value.len()]);
            Ok(Some(n.key(i as usize)))
        }
    }

    /// Levels of the single-level tree at `root` (1: a single leaf),
    /// counted down its leftmost path.
    pub fn btree_levels(&mut self, root: BlockNr, vt: ValueType) -> Result<u32> {
        let mut b = root;
        for levels in 1..=MAX_DEPTH as u32 {
            let n = Node::new(self.read_node(b, vt)?);
            if !n.is_internal() || n.nr_entries() == 0 {
                return Ok(levels);
            }
            b = n.value64(0);
        }
        Err(self.runaway(BlockKind::BtreeNode, root, DEEPER))
    }

    /// Visits every (key, value) of a single-level tree in key order.
    pub fn btree_walk(
        &mut self,
        root: BlockNr,
        vt: ValueType,
        f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.walk_node(root, vt, f, 0)
    }

    fn walk_node(
        &mut self,
        b: BlockNr,
        vt: ValueType,
        f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
        depth: usize,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(self.runaway(BlockKind::BtreeNode, b, DEEPER));
        }
        let data = *self.read_node(b, vt)?;
        let n = Node::new(&data);
        for i in 0..n.nr_entries() {
            if n.is_internal() {
                self.walk_node(n.value64(i), vt, f, depth + 1)?;
            } else {
                f(n.key(i), n.value(i))?;
            }
        }
        Ok(())
    }
}

/// Checks the fields the algorithms rely on: internal nodes hold 8-byte
/// child pointers, leaves the tree's value size, and the capacity is the
/// one the kernel computes for that size.
fn check_node_shape(data: &[u8], b: BlockNr, vt: ValueType) -> Result<()> {
    let n = Node::new(data);
    let want = if n.is_internal() { 8 } else { vt.size() };
    if n.flags() & (INTERNAL | LEAF) == (INTERNAL | LEAF) {
        return Err(corrupt(b, "node is both internal and leaf"));
    }
    if n.value_size() != want {
        return Err(corrupt(b, &format!("value size {} where {want} was expected", n.value_size())));
    }
    if n.max_entries() != max_entries_for(want) as usize {
        return Err(corrupt(b, &format!("max_entries {} for value size {want}", n.max_entries())));
    }
    if n.nr_entries() > n.max_entries() {
        return Err(corrupt(b, "more entries than max_entries"));
    }
    Ok(())
}

fn corrupt(block: BlockNr, what: &str) -> PdataError {
    PdataError::Corrupt { kind: BlockKind::BtreeNode, block, what: what.to_string() }
}
