//! Insertion (`dm_btree_insert`, spec §1.7): pre-emptive splitting of full
//! nodes on the way down, rebalancing into siblings with room, one-into-two
//! and two-into-three splits.

use super::node::{self, Node};
use super::{corrupt, BtreeInfo, ShadowSpine, ValueType};
use crate::block_device::BlockDevice;
use crate::pdata::layout::node::{max_entries_for, INTERNAL};
use crate::pdata::layout::{BlockKind, BLOCK_SIZE};
use crate::pdata::transaction::TransactionManager;
use crate::pdata::{BlockNr, PdataError, Result};

/// A sibling needs this many free slots to be worth rebalancing into.
const SPACE_THRESHOLD: usize = 8;

type Block = [u8; BLOCK_SIZE];

impl<D: BlockDevice> TransactionManager<D> {
    fn node_copy(&mut self, b: BlockNr) -> Result<Box<Block>> {
        Ok(Box::new(*self.bm.read(b, BlockKind::BtreeNode)?))
    }

    fn node_store(&mut self, b: BlockNr, data: &Block) -> Result<()> {
        self.bm.write(b, BlockKind::BtreeNode)?.copy_from_slice(data);
        Ok(())
    }

    /// Inserts or overwrites `keys` → `value`; returns the new root and
    /// whether a new key was added.
    pub fn btree_insert(
        &mut self,
        info: &BtreeInfo,
        root: BlockNr,
        keys: &[u64],
        value: &[u8],
    ) -> Result<(BlockNr, bool)> {
        let mut spine = ShadowSpine::default();
        let mut index: isize = -1;
        let mut block = root;
        let last = info.levels - 1;
        for (level, &key) in keys.iter().enumerate().take(last) {
            index = self.insert_raw(&mut spine, block, ValueType::MetadataBlocks, key, index)?;
            let cur = spine.current();
            if need_insert(&Node::new(self.bm.read(cur, BlockKind::BtreeNode)?), key, index) {
                // The next level has no tree for this key yet: start one.
                let new_tree = self.btree_empty(info.value_type)?;
                let data = self.bm.write(cur, BlockKind::BtreeNode)?;
                node::insert_at(data, index as usize, keys[level], &new_tree.to_le_bytes())
                    .map_err(|_| corrupt(cur, "too many entries in node for insert"))?;
            }
            block = Node::new(self.bm.read(cur, BlockKind::BtreeNode)?).value64(index as usize);
        }
        let key = keys[last];
        index = self.insert_raw(&mut spine, block, info.value_type, key, index)?;
        let cur = spine.current();
        let i = index as usize;
        let inserted = need_insert(&Node::new(self.bm.read(cur, BlockKind::BtreeNode)?), key, index);
        if inserted {
            let data = self.bm.write(cur, BlockKind::BtreeNode)?;
            node::insert_at(data, i, key, value)
                .map_err(|_| corrupt(cur, "too many entries in node for insert"))?;
        } else {
            let old = Node::new(self.bm.read(cur, BlockKind::BtreeNode)?).value(i).to_vec();
            if info.value_type.counts_references() && !info.value_type.equal(&old, value) {
                self.value_dec(info.value_type, &old, 1)?;
            }
            node::set_value(self.bm.write(cur, BlockKind::BtreeNode)?, i, value);
        }
        Ok((spine.root, inserted))
    }

    /// Descends one level for an insert, making room in every full node on
    /// the way; returns the insertion index in the leaf reached.
    fn insert_raw(
        &mut self,
        s: &mut ShadowSpine,
        mut root: BlockNr,
        vt: ValueType,
        key: u64,
        index: isize,
    ) -> Result<isize> {
        let mut i = index;
        let mut top = true;
        let mut depth = 0u32;
        loop {
            depth += 1;
            self.shadow_step(s, root, vt)?;
            if i >= 0 {
                self.patch_parent(s, i as usize)?;
            }
            let full =
                !has_space_for_insert(&Node::new(self.bm.read(s.current(), BlockKind::BtreeNode)?), key);
            if full {
                if top {
                    self.split_beneath(s)?;
                } else {
                    self.rebalance_or_split(s, vt, i as usize, key)?;
                }
            }
            let cur = s.current();
            let n = Node::new(self.bm.read(cur, BlockKind::BtreeNode)?);
            i = n.lower_bound(key);
            if n.is_leaf() {
                if i < 0 || n.key(i as usize) != key {
                    i += 1;
                }
                self.probes.deepest = self.probes.deepest.max(depth);
                return Ok(i);
            }
            if i < 0 {
                // The new key becomes the node's lowest bound.
                if top || !self.mutations.below_min_key_lowers_root_only {
                    node::set_key(self.bm.write(cur, BlockKind::BtreeNode)?, 0, key);
                }
                i = 0;
            }
            root = Node::new(self.bm.read(cur, BlockKind::BtreeNode)?).value64(i as usize);
            top = false;
        }
    }

    /// The root is full: move its entries into two new children and make it
    /// an internal node over them (`btree_split_beneath`).
    fn split_beneath(&mut self, s: &ShadowSpine) -> Result<()> {
        self.probes.root_splits += 1;
        let pb = s.current();
        let mut parent = self.node_copy(pb)?;
        let pn = Node::new(&parent[..]);
        let (flags, nr, max, vs) = (pn.flags(), pn.nr_entries(), pn.max_entries(), pn.value_size());
        let nr_left = nr / 2;
        let nr_right = nr - nr_left;

        let lb = self.new_block(BlockKind::BtreeNode)?;
        let mut left = self.node_copy(lb)?;
        node::set_header(&mut left[..], flags, nr_left, max, vs);
        node::copy_entries(&mut left[..], 0, &parent[..], 0, nr_left);
        self.node_store(lb, &left)?;

        let rb = self.new_block(BlockKind::BtreeNode)?;
        let mut right = self.node_copy(rb)?;
        node::set_header(&mut right[..], flags, nr_right, max, vs);
        node::copy_entries(&mut right[..], 0, &parent[..], nr_left, nr_right);
        self.node_store(rb, &right)?;

        // Only the header and the first two entries are rewritten; the rest
        // of the old root's bytes stay where they were.
        node::set_header(&mut parent[..], INTERNAL, 2, max_entries_for(8) as usize, 8);
        node::set_key(&mut parent[..], 0, Node::new(&left[..]).key(0));
        node::set_value64(&mut parent[..], 0, lb);
        node::set_key(&mut parent[..], 1, Node::new(&right[..]).key(0));
        node::set_value64(&mut parent[..], 1, rb);
        self.node_store(pb, &parent)
    }

    /// A full non-root node: move entries into a sibling with room, or split.
    fn rebalance_or_split(&mut self, s: &mut ShadowSpine, vt: ValueType, pi: usize, key: u64) -> Result<()> {
        let parent = s.parent().expect("a non-root node has a parent");
        let pn = *self.bm.read(parent, BlockKind::BtreeNode)?;
        let pn = Node::new(&pn);
        let nr_parent = pn.nr_entries();
        let (mut left_shared, mut right_shared) = (false, false);

        if pi > 0 {
            let left = pn.value64(pi - 1);
            left_shared = self.metadata_sm_count_is_more_than_one(left)?;
            if !left_shared && self.free_space(left, vt)? >= SPACE_THRESHOLD {
                return self.rebalance_left(s, vt, pi, key);
            }
        }
        if pi + 1 < nr_parent {
            let right = pn.value64(pi + 1);
            right_shared = self.metadata_sm_count_is_more_than_one(right)?;
            if !right_shared && self.free_space(right, vt)? >= SPACE_THRESHOLD {
                return self.rebalance_right(s, vt, pi, key);
            }
        }
        // Sequential inserts fill nodes better split one into two; otherwise
        // two into three.
        if left_shared || right_shared || nr_parent <= 2 || pi == 0 || pi + 1 == nr_parent {
            self.split_one_into_two(s, pi, key)
        } else {
            self.split_two_into_three(s, vt, pi, key)
        }
    }

    fn free_space(&mut self, b: BlockNr, vt: ValueType) -> Result<usize> {
        let n = Node::new(self.read_node(b, vt)?);
        Ok(n.max_entries() - n.nr_entries())
    }

    fn rebalance_left(&mut self, s: &mut ShadowSpine, vt: ValueType, pi: usize, key: u64) -> Result<()> {
        self.probes.insert_rebalances += 1;
        let parent = s.parent().expect("parent");
        let sib = self.shadow_child(parent, pi - 1, vt)?;
        let (mut left, mut right) = (self.node_copy(sib)?, self.node_copy(s.current())?);
        redistribute2(&mut left[..], &mut right[..]);
        self.node_store(sib, &left)?;
        self.node_store(s.current(), &right)?;
        let right_first = Node::new(&right[..]).key(0);
        node::set_key(self.bm.write(parent, BlockKind::BtreeNode)?, pi, right_first);
        if key < right_first {
            s.set_current(sib);
        }
        Ok(())
    }

    fn rebalance_right(&mut self, s: &mut ShadowSpine, vt: ValueType, pi: usize, key: u64) -> Result<()> {
        self.probes.insert_rebalances += 1;
        let parent = s.parent().expect("parent");
        let sib = self.shadow_child(parent, pi + 1, vt)?;
        let (mut left, mut right) = (self.node_copy(s.current())?, self.node_copy(sib)?);
        redistribute2(&mut left[..], &mut right[..]);
        self.node_store(s.current(), &left)?;
        self.node_store(sib, &right)?;
        let right_first = Node::new(&right[..]).key(0);
        node::set_key(self.bm.write(parent, BlockKind::BtreeNode)?, pi + 1, right_first);
        if key >= right_first {
            s.set_current(sib);
        }
        Ok(())
    }

    fn split_one_into_two(&mut self, s: &mut ShadowSpine, pi: usize, key: u64) -> Result<()> {
        self.probes.node_splits += 1;
        let parent = s.parent().expect("parent");
        let lb = s.current();
        let rb = self.new_block(BlockKind::BtreeNode)?;
        let mut left = self.node_copy(lb)?;
        let mut right = self.node_copy(rb)?;
        let ln = Node::new(&left[..]);
        let (flags, max, vs) = (ln.flags(), ln.max_entries(), ln.value_size());
        node::set_header(&mut right[..], flags, 0, max, vs);
        redistribute2(&mut left[..], &mut right[..]);
        self.node_store(lb, &left)?;
        self.node_store(rb, &right)?;
        let right_first = Node::new(&right[..]).key(0);
        node::insert_at(self.bm.write(parent, BlockKind::BtreeNode)?, pi + 1, right_first, &rb.to_le_bytes())
            .map_err(|_| corrupt(parent, "too many entries in node for insert"))?;
        if key >= right_first {
            s.set_current(rb);
        }
        Ok(())
    }

    fn split_two_into_three(
        &mut self,
        s: &mut ShadowSpine,
        vt: ValueType,
        pi: usize,
        key: u64,
    ) -> Result<()> {
        self.probes.node_splits += 1;
        let parent = s.parent().expect("parent");
        let (middle_index, lb, rb) = if pi == 0 {
            let rb = self.shadow_child(parent, pi + 1, vt)?;
            (1, s.current(), rb)
        } else {
            let lb = self.shadow_child(parent, pi - 1, vt)?;
            (pi, lb, s.current())
        };
        let mb = self.new_block(BlockKind::BtreeNode)?;
        let mut left = self.node_copy(lb)?;
        let mut middle = self.node_copy(mb)?;
        let mut right = self.node_copy(rb)?;
        let ln = Node::new(&left[..]);
        let (flags, max, vs) = (ln.flags(), ln.max_entries(), ln.value_size());
        node::set_header(&mut middle[..], flags, 0, max, vs);
        redistribute3(&mut left[..], &mut middle[..], &mut right[..]);
        self.node_store(lb, &left)?;
        self.node_store(mb, &middle)?;
        self.node_store(rb, &right)?;
        let (middle_first, right_first) = (Node::new(&middle[..]).key(0), Node::new(&right[..]).key(0));
        let pdata = self.bm.write(parent, BlockKind::BtreeNode)?;
        node::set_key(pdata, middle_index, right_first);
        node::insert_at(pdata, middle_index, middle_first, &mb.to_le_bytes())
            .map_err(|_| corrupt(parent, "too many entries in node for insert"))?;
        s.set_current(if key < middle_first {
            lb
        } else if key < right_first {
            mb
        } else {
            rb
        });
        Ok(())
    }

    /// Shadows the path to the leaf holding `key` (which must exist) and
    /// returns (new root, leaf, index) so the caller can change the value in
    /// place (`btree_get_overwrite_leaf`, single-level trees only).
    pub fn btree_get_overwrite_leaf(
        &mut self,
        info: &BtreeInfo,
        root: BlockNr,
        key: u64,
    ) -> Result<(BlockNr, BlockNr, usize)> {
        let mut s = ShadowSpine::default();
        let mut i: isize = -1;
        let mut b = root;
        loop {
            self.shadow_step(&mut s, b, info.value_type)?;
            if i >= 0 {
                self.patch_parent(&s, i as usize)?;
            }
            let cur = s.current();
            let n = Node::new(self.bm.read(cur, BlockKind::BtreeNode)?);
            i = n.lower_bound(key);
            if i < 0 || i as usize >= n.nr_entries() {
                return Err(PdataError::Invalid(format!("key {key} is not in the tree")));
            }
            if n.is_leaf() {
                if n.key(i as usize) != key {
                    return Err(PdataError::Invalid(format!("key {key} is not in the tree")));
                }
                return Ok((s.root, cur, i as usize));
            }
            b = n.value64(i as usize);
        }
    }
}

fn has_space_for_insert(n: &Node, key: u64) -> bool {
    if n.nr_entries() == n.max_entries() {
        // A full leaf can still take an overwrite.
        return n.is_leaf() && n.index_of(key).is_some();
    }
    true
}

fn need_insert(n: &Node, key: u64, index: isize) -> bool {
    index as usize >= n.nr_entries() || n.key(index as usize) != key
}

/// Evens out two siblings: left gets half (rounded down) of all entries.
fn redistribute2(left: &mut [u8], right: &mut [u8]) {
    let nr_left = Node::new(left).nr_entries();
    let nr_right = Node::new(right).nr_entries();
    let total = nr_left + nr_right;
    let target_left = total / 2;
    let target_right = total - target_left;
    if nr_left < target_left {
        let delta = target_left - nr_left;
        node::copy_entries(left, nr_left, right, 0, delta);
        node::node_shift(right, -(delta as i64));
    } else if nr_left > target_left {
        let delta = nr_left - target_left;
        if nr_right > 0 {
            node::node_shift(right, delta as i64);
        }
        node::copy_entries(right, 0, left, target_left, delta);
    }
    node::set_nr_entries(left, target_left);
    node::set_nr_entries(right, target_right);
}

/// Spreads two full siblings over three nodes (the middle one new and
/// empty), with the kernel's exact copies: bytes past each node's new end
/// are whatever these copies leave there.
fn redistribute3(left: &mut [u8], center: &mut [u8], right: &mut [u8]) {
    let nr_left = Node::new(left).nr_entries();
    let nr_right = Node::new(right).nr_entries();
    let total = nr_left + nr_right;
    let target_left = total / 3;
    let target_center = (total - target_left) / 2;
    let target_right = total - target_left - target_center;
    if nr_left < target_left {
        let left_short = target_left - nr_left;
        node::copy_entries(left, nr_left, right, 0, left_short);
        node::copy_entries(center, 0, right, left_short, target_center);
        node::node_shift(right, -((nr_right - target_right) as i64));
    } else if nr_left < target_left + target_center {
        let left_to_center = nr_left - target_left;
        node::copy_entries(center, 0, left, target_left, left_to_center);
        node::copy_entries(center, left_to_center, right, 0, target_center - left_to_center);
        node::node_shift(right, -((nr_right - target_right) as i64));
    } else {
        let right_short = target_right - nr_right;
        node::node_shift(right, right_short as i64);
        node::copy_entries(right, 0, left, nr_left - right_short, right_short);
        node::copy_entries(center, 0, left, target_left, nr_left - target_left);
    }
    node::set_nr_entries(left, target_left);
    node::set_nr_entries(center, target_center);
    node::set_nr_entries(right, target_right);
}
