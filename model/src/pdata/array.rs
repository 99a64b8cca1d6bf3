//! dm-array (drivers/md/persistent-data/dm-array.c, spec §1.15): an array
//! of fixed-size values packed into array blocks, found through a
//! single-level btree from array block index to block location.
//!
//! The btree's values hold the references to the array blocks
//! ([`ValueType::ArrayBlocks`]), so sharing, shadowing and deletion of
//! array blocks follow the btree's rules. Every operation allocates,
//! shadows and frees blocks in the kernel's order, so the same operations
//! give the same metadata blocks.
//!
//! The values of every array the kernel's cache target uses (mappings,
//! hints, bitset words) reference nothing, so this module has no value
//! reference counting of its own.

use super::btree::node::Node;
use super::btree::{BtreeInfo, ValueType};
use super::layout::array::{self as ab, max_entries_for};
use super::layout::{get_u32, put_u32, BlockKind, BLOCK_SIZE};
use super::transaction::TransactionManager;
use super::{BlockNr, PdataError, Result};
use crate::block_device::BlockDevice;

/// The btree of array block locations.
pub const ARRAY_BTREE: BtreeInfo = BtreeInfo { levels: 1, value_type: ValueType::ArrayBlocks };

/// What an array holds: values of one size (the kernel's `dm_array_info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArrayInfo {
    value_size: usize,
}

/// The blocks one array occupies (for checkers and leak accounting).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArrayBlocks {
    /// Btree nodes, in walk order (root first, depth first).
    pub nodes: Vec<BlockNr>,
    /// Array blocks, by array block index.
    pub ablocks: Vec<BlockNr>,
}

/// The fields of an array block header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AblockHeader {
    /// Capacity in values.
    pub max_entries: u32,
    /// Values in use.
    pub nr_entries: u32,
    /// Bytes per value.
    pub value_size: u32,
}

impl AblockHeader {
    /// Reads the header of an array block.
    pub fn decode(b: &[u8]) -> Self {
        AblockHeader {
            max_entries: get_u32(b, ab::MAX_ENTRIES),
            nr_entries: get_u32(b, ab::NR_ENTRIES),
            value_size: get_u32(b, ab::VALUE_SIZE),
        }
    }
}

impl ArrayInfo {
    /// An array of `value_size`-byte values.
    pub const fn new(value_size: usize) -> Self {
        ArrayInfo { value_size }
    }

    /// Bytes per value.
    pub fn value_size(&self) -> usize {
        self.value_size
    }

    /// Values per array block (509 for 8 bytes, 1018 for 4).
    pub fn max_entries(&self) -> u32 {
        max_entries_for(self.value_size)
    }

    /// Checks an array block's header against this array's shape: the
    /// kernel trusts these fields; a model reading damaged metadata must not.
    pub fn check_ablock(&self, data: &[u8], b: BlockNr) -> Result<AblockHeader> {
        let h = AblockHeader::decode(data);
        let corrupt = |what: String| PdataError::Corrupt { kind: BlockKind::Array, block: b, what };
        if h.value_size as usize != self.value_size {
            return Err(corrupt(format!(
                "value size {} where {} was expected",
                h.value_size, self.value_size
            )));
        }
        if h.max_entries != self.max_entries() {
            return Err(corrupt(format!("max_entries {} for value size {}", h.max_entries, self.value_size)));
        }
        if h.nr_entries > h.max_entries {
            return Err(corrupt(format!(
                "{} entries, more than max_entries {}",
                h.nr_entries, h.max_entries
            )));
        }
        Ok(h)
    }

    fn read_ablock<'a, D: BlockDevice>(
        &self,
        tm: &'a mut TransactionManager<D>,
        b: BlockNr,
    ) -> Result<&'a [u8; BLOCK_SIZE]> {
        let data = tm.read(b, BlockKind::Array)?;
        self.check_ablock(data, b)?;
        tm.read(b, BlockKind::Array)
    }

    /// An empty array: one empty btree leaf (`dm_array_empty`).
    pub fn empty<D: BlockDevice>(&self, tm: &mut TransactionManager<D>) -> Result<BlockNr> {
        tm.btree_empty(ValueType::ArrayBlocks)
    }

    /// A new, empty array block (`alloc_ablock`).
    fn alloc_ablock<D: BlockDevice>(&self, tm: &mut TransactionManager<D>) -> Result<BlockNr> {
        let b = tm.new_block(BlockKind::Array)?;
        let data = tm.write_locked(b, BlockKind::Array)?;
        put_u32(data, ab::MAX_ENTRIES, self.max_entries());
        put_u32(data, ab::NR_ENTRIES, 0);
        put_u32(data, ab::VALUE_SIZE, self.value_size as u32);
        Ok(b)
    }

    /// Appends copies of `value` up to `new_nr` entries (`fill_ablock`).
    fn fill_ablock<D: BlockDevice>(
        &self,
        tm: &mut TransactionManager<D>,
        b: BlockNr,
        value: &[u8],
        new_nr: u32,
    ) -> Result<()> {
        let vs = self.value_size;
        let data = tm.write_locked(b, BlockKind::Array)?;
        let nr = get_u32(data, ab::NR_ENTRIES);
        for i in nr as usize..new_nr as usize {
            data[ab::value_offset(vs, i)..ab::value_offset(vs, i + 1)].copy_from_slice(value);
        }
        put_u32(data, ab::NR_ENTRIES, new_nr);
        Ok(())
    }

    /// Drops entries from the back (`trim_ablock`); their bytes stay.
    fn trim_ablock<D: BlockDevice>(
        &self,
        tm: &mut TransactionManager<D>,
        b: BlockNr,
        new_nr: u32,
    ) -> Result<()> {
        put_u32(tm.write_locked(b, BlockKind::Array)?, ab::NR_ENTRIES, new_nr);
        Ok(())
    }

    /// Points array block index `index` at `b` (`insert_ablock`).
    fn insert_ablock<D: BlockDevice>(
        &self,
        tm: &mut TransactionManager<D>,
        index: u32,
        b: BlockNr,
        root: BlockNr,
    ) -> Result<BlockNr> {
        Ok(tm.btree_insert(&ARRAY_BTREE, root, &[u64::from(index)], &b.to_le_bytes())?.0)
    }

    /// The location of array block `index` (`lookup_ablock` without the lock).
    fn lookup_ablock<D: BlockDevice>(
        &self,
        tm: &mut TransactionManager<D>,
        root: BlockNr,
        index: u32,
    ) -> Result<BlockNr> {
        let mut v = [0u8; 8];
        if !tm.btree_lookup(&ARRAY_BTREE, root, &[u64::from(index)], &mut v)? {
            return Err(PdataError::NoData);
        }
        Ok(u64::from_le_bytes(v))
    }

    /// Makes array block `index` writable (`shadow_ablock`): a copy made of
    /// a block this transaction does not own is put in the btree, with the
    /// kernel's extra increment of the original first (the shadow already
    /// dropped one reference, and the btree overwrite drops another).
    /// Updates `root`; returns the writable block.
    fn shadow_ablock<D: BlockDevice>(
        &self,
        tm: &mut TransactionManager<D>,
        root: &mut BlockNr,
        index: u32,
    ) -> Result<BlockNr> {
        let b = self.lookup_ablock(tm, *root, index)?;
        if tm.mutations.array_set_in_place {
            // Deliberately broken: the committed block is changed in place.
            self.read_ablock(tm, b)?;
            tm.write_locked(b, BlockKind::Array)?;
            return Ok(b);
        }
        // The kernel's order (`__shadow_block`): the original read and
        // validated after its reference is dropped; its shape checked on
        // the copy.
        let shadow = tm.shadow_block(b, BlockKind::Array)?;
        self.read_ablock(tm, shadow.block)?;
        // inc_ablock_entries: the values reference nothing.
        if shadow.block != b {
            tm.inc(b)?;
            *root = self.insert_ablock(tm, index, shadow.block, *root)?;
        }
        Ok(shadow.block)
    }

    /// Allocates a full or partial array block filled with `value` and puts
    /// it at `index` (`insert_new_ablock`).
    fn insert_new_ablock<D: BlockDevice>(
        &self,
        tm: &mut TransactionManager<D>,
        index: u32,
        nr: u32,
        value: &[u8],
        root: BlockNr,
    ) -> Result<BlockNr> {
        let b = self.alloc_ablock(tm)?;
        self.fill_ablock(tm, b, value, nr)?;
        self.insert_ablock(tm, index, b, root)
    }

    /// Builds a new array of `size` values block by block, asking `value`
    /// for each (`dm_array_new`).
    pub fn new_array<D: BlockDevice>(
        &self,
        tm: &mut TransactionManager<D>,
        size: u32,
        mut value: impl FnMut(u32, &mut [u8]) -> Result<()>,
    ) -> Result<BlockNr> {
        let mut root = self.empty(tm)?;
        let max = self.max_entries();
        let vs = self.value_size;
        let mut remaining = size;
        for index in 0..size.div_ceil(max) {
            let b = self.alloc_ablock(tm)?;
            let nr = max.min(remaining);
            let mut buf = vec![0u8; vs];
            for i in 0..nr {
                // The kernel lets the callback write the value in place.
                let off = ab::value_offset(vs, i as usize);
                buf.copy_from_slice(&tm.write_locked(b, BlockKind::Array)?[off..off + vs]);
                value(index * max + i, &mut buf)?;
                tm.write_locked(b, BlockKind::Array)?[off..off + vs].copy_from_slice(&buf);
            }
            put_u32(tm.write_locked(b, BlockKind::Array)?, ab::NR_ENTRIES, nr);
            root = self.insert_ablock(tm, index, b, root)?;
            remaining = remaining.saturating_sub(max);
        }
        Ok(root)
    }

    /// Resizes from `old_size` to `new_size` values (`dm_array_resize`):
    /// growing fills the old last block, then appends new blocks filled
    /// with `value`; shrinking removes the dropped blocks from the btree in
    /// ascending index order, then trims the new last block (the trimmed
    /// values' bytes stay in the block, as in the kernel).
    pub fn resize<D: BlockDevice>(
        &self,
        tm: &mut TransactionManager<D>,
        root: BlockNr,
        old_size: u32,
        new_size: u32,
        value: &[u8],
    ) -> Result<BlockNr> {
        if old_size == new_size {
            return Ok(root);
        }
        let max = self.max_entries();
        let r = Resize {
            old_full: old_size / max,
            old_tail: old_size % max,
            new_full: new_size / max,
            new_tail: new_size % max,
        };
        let mut root = root;
        if new_size > old_size {
            self.grow(tm, &mut root, &r, value)?;
        } else {
            self.shrink(tm, &mut root, &r)?;
        }
        Ok(root)
    }

    fn shrink<D: BlockDevice>(
        &self,
        tm: &mut TransactionManager<D>,
        root: &mut BlockNr,
        r: &Resize,
    ) -> Result<()> {
        if r.new_full < r.old_full {
            let begin = r.new_full + u32::from(r.new_tail > 0);
            let end = r.old_full + u32::from(r.old_tail > 0);
            for key in begin..end {
                *root = tm.btree_remove(&ARRAY_BTREE, *root, &[u64::from(key)])?;
            }
        }
        if r.new_tail > 0 {
            let b = self.shadow_ablock(tm, root, r.new_full)?;
            self.trim_ablock(tm, b, r.new_tail)?;
        }
        Ok(())
    }

    fn grow<D: BlockDevice>(
        &self,
        tm: &mut TransactionManager<D>,
        root: &mut BlockNr,
        r: &Resize,
        value: &[u8],
    ) -> Result<()> {
        let max = self.max_entries();
        if r.new_full > r.old_full {
            let mut old_blocks = r.old_full;
            if r.old_tail > 0 {
                old_blocks += 1;
                let b = self.shadow_ablock(tm, root, r.old_full)?;
                self.fill_ablock(tm, b, value, max)?;
            }
            for index in old_blocks..r.new_full {
                *root = self.insert_new_ablock(tm, index, max, value, *root)?;
            }
            if r.new_tail > 0 {
                *root = self.insert_new_ablock(tm, r.new_full, r.new_tail, value, *root)?;
            }
        } else if r.old_tail > 0 {
            let b = self.shadow_ablock(tm, root, r.old_full)?;
            self.fill_ablock(tm, b, value, r.new_tail)?;
        } else {
            *root = self.insert_new_ablock(tm, r.new_full, r.new_tail, value, *root)?;
        }
        Ok(())
    }

    /// Copies value `index` into `out` (`dm_array_get_value`); `NoData`
    /// beyond the end.
    pub fn get<D: BlockDevice>(
        &self,
        tm: &mut TransactionManager<D>,
        root: BlockNr,
        index: u32,
        out: &mut [u8],
    ) -> Result<()> {
        let max = self.max_entries();
        let b = self.lookup_ablock(tm, root, index / max)?;
        let data = self.read_ablock(tm, b)?;
        let entry = (index % max) as usize;
        if entry >= get_u32(data, ab::NR_ENTRIES) as usize {
            return Err(PdataError::NoData);
        }
        let off = ab::value_offset(self.value_size, entry);
        out.copy_from_slice(&data[off..off + self.value_size]);
        Ok(())
    }

    /// Overwrites value `index` (`dm_array_set_value`). Like the kernel,
    /// the array block is shadowed (and `root` updated) before the index
    /// is checked against the block's entries.
    pub fn set<D: BlockDevice>(
        &self,
        tm: &mut TransactionManager<D>,
        root: &mut BlockNr,
        index: u32,
        value: &[u8],
    ) -> Result<()> {
        let max = self.max_entries();
        let b = self.shadow_ablock(tm, root, index / max)?;
        let data = tm.write_locked(b, BlockKind::Array)?;
        let entry = (index % max) as usize;
        if entry >= get_u32(data, ab::NR_ENTRIES) as usize {
            return Err(PdataError::NoData);
        }
        let off = ab::value_offset(self.value_size, entry);
        data[off..off + self.value_size].copy_from_slice(value);
        Ok(())
    }

    /// Visits every value in index order (`dm_array_walk`).
    pub fn walk<D: BlockDevice>(
        &self,
        tm: &mut TransactionManager<D>,
        root: BlockNr,
        f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut blocks = Vec::new();
        tm.btree_walk(root, ValueType::ArrayBlocks, &mut |k, v| {
            blocks.push((k, u64::from_le_bytes(v.try_into().expect("8 bytes"))));
            Ok(())
        })?;
        let vs = self.value_size;
        for (key, b) in blocks {
            let data = self.read_ablock(tm, b)?;
            let h = AblockHeader::decode(data);
            for i in 0..h.nr_entries as usize {
                let off = ab::value_offset(vs, i);
                f(key * u64::from(h.max_entries) + i as u64, &data[off..off + vs])?;
            }
        }
        Ok(())
    }

    /// Every value, in index order (a convenience over [`Self::walk`]).
    pub fn values<D: BlockDevice>(
        &self,
        tm: &mut TransactionManager<D>,
        root: BlockNr,
    ) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        self.walk(tm, root, &mut |_, v| {
            out.push(v.to_vec());
            Ok(())
        })?;
        Ok(out)
    }

    /// Drops the array (`dm_array_del`).
    pub fn del<D: BlockDevice>(&self, tm: &mut TransactionManager<D>, root: BlockNr) -> Result<()> {
        tm.btree_del(&ARRAY_BTREE, root)
    }

    /// The blocks the array occupies: its btree nodes and its array blocks
    /// (each array block checked). Errors if the btree's keys are not
    /// 0, 1, 2, … without gaps.
    pub fn blocks<D: BlockDevice>(
        &self,
        tm: &mut TransactionManager<D>,
        root: BlockNr,
    ) -> Result<ArrayBlocks> {
        let mut out = ArrayBlocks::default();
        let mut stack = vec![root];
        while let Some(b) = stack.pop() {
            if out.nodes.len() > 1 << 24 {
                return Err(tm.runaway(BlockKind::BtreeNode, b, "array btree has a cycle"));
            }
            out.nodes.push(b);
            let data = *tm.read_node(b, ValueType::ArrayBlocks)?;
            let n = Node::new(&data);
            if n.is_internal() {
                stack.extend((0..n.nr_entries()).rev().map(|i| n.value64(i)));
            } else {
                for i in 0..n.nr_entries() {
                    if n.key(i) != out.ablocks.len() as u64 {
                        return Err(PdataError::Corrupt {
                            kind: BlockKind::BtreeNode,
                            block: b,
                            what: format!("array key {} where {} was expected", n.key(i), out.ablocks.len()),
                        });
                    }
                    out.ablocks.push(n.value64(i));
                }
            }
        }
        for &b in &out.ablocks {
            self.read_ablock(tm, b)?;
        }
        Ok(out)
    }
}

/// Block counts before and after a resize (the kernel's `struct resize`).
struct Resize {
    old_full: u32,
    old_tail: u32,
    new_full: u32,
    new_tail: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_device::MemDevice;

    fn tm() -> TransactionManager<MemDevice> {
        TransactionManager::create(MemDevice::new(8 * 2048), 0).unwrap()
    }

    #[test]
    fn array_block_header_fields() {
        let mut tm = tm();
        let a = ArrayInfo::new(8);
        let root = a
            .new_array(&mut tm, 600, |i, v| {
                v.copy_from_slice(&u64::from(i).to_le_bytes());
                Ok(())
            })
            .unwrap();
        let blocks = a.blocks(&mut tm, root).unwrap();
        assert_eq!(blocks.nodes, vec![root]);
        assert_eq!(blocks.ablocks.len(), 2);
        let h = AblockHeader::decode(tm.read(blocks.ablocks[1], BlockKind::Array).unwrap());
        assert_eq!(h, AblockHeader { max_entries: 509, nr_entries: 91, value_size: 8 });
        assert_eq!(ArrayInfo::new(4).max_entries(), 1018);
        let mut v = [0u8; 8];
        a.get(&mut tm, root, 599, &mut v).unwrap();
        assert_eq!(u64::from_le_bytes(v), 599);
        assert_eq!(a.get(&mut tm, root, 600, &mut v), Err(PdataError::NoData));
    }

    #[test]
    fn resize_grows_and_shrinks_like_the_kernel() {
        let mut tm = tm();
        let a = ArrayInfo::new(4);
        let mut root = a.empty(&mut tm).unwrap();
        root = a.resize(&mut tm, root, 0, 3000, &7u32.to_le_bytes()).unwrap();
        assert_eq!(a.values(&mut tm, root).unwrap().len(), 3000);
        root = a.resize(&mut tm, root, 3000, 1500, &0u32.to_le_bytes()).unwrap();
        root = a.resize(&mut tm, root, 1500, 2100, &9u32.to_le_bytes()).unwrap();
        let vals: Vec<u32> = a
            .values(&mut tm, root)
            .unwrap()
            .iter()
            .map(|v| u32::from_le_bytes(v[..].try_into().unwrap()))
            .collect();
        assert_eq!(vals.len(), 2100);
        assert!(vals[..1500].iter().all(|&v| v == 7));
        assert!(vals[1500..].iter().all(|&v| v == 9));
        a.set(&mut tm, &mut root, 2099, &1u32.to_le_bytes()).unwrap();
        assert_eq!(a.set(&mut tm, &mut root, 2100, &1u32.to_le_bytes()), Err(PdataError::NoData));
        let blocks = a.blocks(&mut tm, root).unwrap();
        assert_eq!(blocks.ablocks.len(), 3);
    }
}
