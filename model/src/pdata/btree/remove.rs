//! Removal (`dm_btree_remove`, `dm_btree_remove_leaves`; spec §1.8): on the
//! way down, the children of each internal node around the search key are
//! rebalanced or merged so that the removal never underfills a node.

use super::node::{self, Node};
use super::{corrupt, BtreeInfo, ShadowSpine, ValueType};
use crate::block_device::BlockDevice;
use crate::pdata::layout::{BlockKind, BLOCK_SIZE};
use crate::pdata::transaction::TransactionManager;
use crate::pdata::{BlockNr, PdataError, Result};

type Block = [u8; BLOCK_SIZE];

/// A child of the node being rebalanced, as a working copy.
struct Child {
    index: usize,
    block: BlockNr,
    data: Box<Block>,
}

fn nr(b: &[u8]) -> usize {
    Node::new(b).nr_entries()
}

fn merge_threshold(b: &[u8]) -> usize {
    Node::new(b).max_entries() / 3
}

fn shape_error(what: &str) -> PdataError {
    PdataError::Invalid(format!("btree rebalance: {what}"))
}

/// Copies entries between siblings: negative `shift` appends the first
/// `-shift` entries of `right` to `left`; positive copies the last `shift`
/// entries of `left` to the start of `right`.
fn node_copy(left: &mut [u8], right: &mut [u8], shift: i64) -> Result<()> {
    let (l, r) = (Node::new(left), Node::new(right));
    if l.value_size() != r.value_size() {
        return Err(shape_error("mismatched value size"));
    }
    let nr_left = l.nr_entries();
    if shift < 0 {
        let s = (-shift) as usize;
        if nr_left + s > l.max_entries() {
            return Err(shape_error("bad shift"));
        }
        node::copy_entries(left, nr_left, right, 0, s);
    } else {
        let s = shift as usize;
        if s > r.max_entries() || s > nr_left {
            return Err(shape_error("bad shift"));
        }
        node::copy_entries(right, 0, left, nr_left - s, s);
    }
    Ok(())
}

/// Moves `count` entries from `left`'s end to `right`'s start (or, when
/// negative, from `right`'s start to `left`'s end).
fn shift(left: &mut [u8], right: &mut [u8], count: i64) -> Result<()> {
    let (nr_left, nr_right) = (nr(left) as i64, nr(right) as i64);
    let max = Node::new(left).max_entries() as i64;
    if max != Node::new(right).max_entries() as i64 {
        return Err(shape_error("max_entries mismatch"));
    }
    if !(0..=max).contains(&(nr_left - count)) || !(0..=max).contains(&(nr_right + count)) {
        return Err(shape_error("node shift out of bounds"));
    }
    if count == 0 {
        return Ok(());
    }
    if count > 0 {
        node::node_shift(right, count);
        node_copy(left, right, count)?;
    } else {
        node_copy(left, right, count)?;
        node::node_shift(right, count);
    }
    node::set_nr_entries(left, (nr_left - count) as usize);
    node::set_nr_entries(right, (nr_right + count) as usize);
    Ok(())
}

impl<D: BlockDevice> TransactionManager<D> {
    /// Removes `keys`; returns the new root. A missing key is
    /// [`PdataError::NoData`] — and, as in the kernel, the nodes already
    /// shadowed on the way down stay shadowed.
    pub fn btree_remove(&mut self, info: &BtreeInfo, mut root: BlockNr, keys: &[u64]) -> Result<BlockNr> {
        let mut s = ShadowSpine::default();
        let mut index = 0usize;
        let last = info.levels - 1;
        for (level, &key) in keys.iter().enumerate().take(info.levels) {
            let vt = info.level_type(level);
            index = self.remove_raw(&mut s, vt, root, key, index, false)?.ok_or(PdataError::NoData)?;
            let cur = s.current();
            if level != last {
                root = Node::new(self.bm.read(cur, BlockKind::BtreeNode)?).value64(index);
                continue;
            }
            let old = Node::new(self.bm.read(cur, BlockKind::BtreeNode)?).value(index).to_vec();
            self.value_dec(vt, &old, 1)?;
            node::delete_at(self.bm.write(cur, BlockKind::BtreeNode)?, index);
        }
        Ok(s.root)
    }

    /// Descends one level for a removal, rebalancing children on the way.
    /// With `nearest`, returns the leaf's lower_bound for the key (possibly
    /// -1 as `None`... see callers); otherwise the exact index or `None`.
    fn remove_raw(
        &mut self,
        s: &mut ShadowSpine,
        vt: ValueType,
        mut root: BlockNr,
        key: u64,
        index: usize,
        nearest: bool,
    ) -> Result<Option<usize>> {
        let mut i = index;
        loop {
            self.shadow_step(s, root, vt)?;
            self.patch_parent(s, i)?;
            if let Some(r) = self.leaf_index(s.current(), key, nearest)? {
                return Ok(r);
            }
            self.rebalance_children(s, vt, key)?;
            if let Some(r) = self.leaf_index(s.current(), key, nearest)? {
                return Ok(r);
            }
            let n = Node::new(self.bm.read(s.current(), BlockKind::BtreeNode)?);
            let lb = n.lower_bound(key);
            if lb < 0 {
                return Err(PdataError::NoData);
            }
            i = lb as usize;
            root = n.value64(i);
        }
    }

    /// At a leaf: `Some(result)`; at an internal node: `None`. For an exact
    /// removal the result is the key's index (or `None` if absent); for a
    /// nearest one, lower_bound clamped to 0 (`None` past the end).
    fn leaf_index(&mut self, b: BlockNr, key: u64, nearest: bool) -> Result<Option<Option<usize>>> {
        let n = Node::new(self.bm.read(b, BlockKind::BtreeNode)?);
        if !n.is_leaf() {
            return Ok(None);
        }
        if nearest {
            let i = n.lower_bound(key).max(0) as usize;
            return Ok(Some((i < n.nr_entries()).then_some(i)));
        }
        Ok(Some(n.index_of(key)))
    }

    fn init_child(&mut self, parent: BlockNr, index: usize, vt: ValueType) -> Result<Child> {
        let block = self.shadow_child(parent, index, vt)?;
        Ok(Child { index, block, data: Box::new(*self.bm.read(block, BlockKind::BtreeNode)?) })
    }

    fn store(&mut self, b: BlockNr, data: &Block) -> Result<()> {
        self.bm.write(b, BlockKind::BtreeNode)?.copy_from_slice(data);
        Ok(())
    }

    fn rebalance_children(&mut self, s: &ShadowSpine, vt: ValueType, key: u64) -> Result<()> {
        let pb = s.current();
        let n = Node::new(self.bm.read(pb, BlockKind::BtreeNode)?);
        if n.nr_entries() == 1 {
            // Collapse a level: the only child's bytes replace this node.
            // A shared child stays in the other tree, so its children get
            // a reference for the copy (6.1.175 and later; before, they
            // did not, and a snapshot sharing the child lost data blocks:
            // docs/findings.md, finding 10).
            let child = n.value64(0);
            let shared = self.metadata_sm_count_is_more_than_one(child)?;
            self.probes.collapses += 1;
            self.probes.shared_collapses += u64::from(shared);
            let data = *self.read_node(child, vt)?;
            self.store(pb, &data)?;
            if shared && !self.mutations.collapse_forgets_shared_child {
                self.inc_children(pb, vt)?;
            }
            return self.dec(child);
        }
        let i = n.lower_bound(key);
        if i < 0 {
            return Err(PdataError::NoData);
        }
        let i = i as usize;
        let last = n.nr_entries() - 1;
        if i == 0 {
            self.rebalance2(pb, vt, i)
        } else if i == last {
            self.rebalance2(pb, vt, i - 1)
        } else {
            self.rebalance3(pb, vt, i - 1)
        }
    }

    fn rebalance2(&mut self, pb: BlockNr, vt: ValueType, left_index: usize) -> Result<()> {
        let mut left = self.init_child(pb, left_index, vt)?;
        let mut right = self.init_child(pb, left_index + 1, vt)?;
        let mut parent = Box::new(*self.bm.read(pb, BlockKind::BtreeNode)?);
        let freed = rebalance2_nodes(&mut parent[..], &mut left, &mut right)?;
        self.probes.merges += u64::from(freed.is_some());
        self.store(left.block, &left.data)?;
        self.store(right.block, &right.data)?;
        self.store(pb, &parent)?;
        if let Some(b) = freed {
            self.dec(b)?;
        }
        Ok(())
    }

    fn rebalance3(&mut self, pb: BlockNr, vt: ValueType, left_index: usize) -> Result<()> {
        let mut l = self.init_child(pb, left_index, vt)?;
        let mut c = self.init_child(pb, left_index + 1, vt)?;
        let mut r = self.init_child(pb, left_index + 2, vt)?;
        let mut parent = Box::new(*self.bm.read(pb, BlockKind::BtreeNode)?);
        let max = Node::new(&l.data[..]).max_entries();
        if max != Node::new(&c.data[..]).max_entries() || max != Node::new(&r.data[..]).max_entries() {
            return Err(corrupt(pb, "children's max_entries differ"));
        }
        let (nl, nc, nr_) = (nr(&l.data[..]), nr(&c.data[..]), nr(&r.data[..]));
        let threshold = merge_threshold(&l.data[..]) * 4 + 1;
        let mut freed = Vec::new();
        if nl + nc + nr_ < threshold {
            // Empty the centre into its neighbours and drop it.
            let s = (max - nl).min(nc);
            node_copy(&mut l.data[..], &mut c.data[..], -(s as i64))?;
            node::set_nr_entries(&mut l.data[..], nl + s);
            if s != nc {
                let rest = nc - s;
                if nr_ + rest > max {
                    return Err(shape_error("node shift out of bounds"));
                }
                node::node_shift(&mut r.data[..], rest as i64);
                node_copy(&mut c.data[..], &mut r.data[..], rest as i64)?;
                node::set_nr_entries(&mut r.data[..], nr_ + rest);
            }
            node::set_key(&mut parent[..], r.index, Node::new(&r.data[..]).key(0));
            node::delete_at(&mut parent[..], c.index);
            r.index -= 1;
            freed.push(c.block);
            if let Some(b) = rebalance2_nodes(&mut parent[..], &mut l, &mut r)? {
                freed.push(b);
            }
        } else {
            redistribute3(&mut parent[..], &mut l, &mut c, &mut r)?;
        }
        self.probes.merges += u64::from(!freed.is_empty());
        self.store(l.block, &l.data)?;
        self.store(c.block, &c.data)?;
        self.store(r.block, &r.data)?;
        self.store(pb, &parent)?;
        // The kernel drops the centre's reference before rebalancing the
        // other two; no allocation happens in between, so doing both after
        // the copies gives the same counts.
        for b in freed {
            self.dec(b)?;
        }
        Ok(())
    }

    /// Removes the first key in `keys[last]..end_key` (earlier levels exact);
    /// advances `keys[last]` past it. Returns the new root and whether one
    /// was removed.
    fn remove_one(
        &mut self,
        info: &BtreeInfo,
        mut root: BlockNr,
        keys: &mut [u64],
        end_key: u64,
    ) -> (Option<BlockNr>, Result<bool>) {
        let mut s = ShadowSpine::default();
        let last = info.levels - 1;
        let r = (|| {
            let mut index = 0usize;
            for &key in keys.iter().take(last) {
                index = self
                    .remove_raw(&mut s, ValueType::MetadataBlocks, root, key, index, false)?
                    .ok_or(PdataError::NoData)?;
                root = Node::new(self.bm.read(s.current(), BlockKind::BtreeNode)?).value64(index);
            }
            let Some(index) = self.remove_raw(&mut s, info.value_type, root, keys[last], index, true)? else {
                return Ok(false);
            };
            let cur = s.current();
            let n = Node::new(self.bm.read(cur, BlockKind::BtreeNode)?);
            let k = n.key(index);
            if k < keys[last] || k >= end_key {
                return Ok(false);
            }
            let old = n.value(index).to_vec();
            self.value_dec(info.value_type, &old, 1)?;
            node::delete_at(self.bm.write(cur, BlockKind::BtreeNode)?, index);
            keys[last] = k + 1;
            Ok(true)
        })();
        let root = (s.count > 0).then_some(s.root);
        match r {
            Err(PdataError::NoData) => (root, Ok(false)),
            r => (root, r),
        }
    }

    /// Removes the run of keys in `keys[last]..end_key` that follow each
    /// other in the tree, one full descent per key (`dm_btree_remove_leaves`).
    /// Returns the new root and how many keys went.
    pub fn btree_remove_leaves(
        &mut self,
        info: &BtreeInfo,
        mut root: BlockNr,
        keys: &mut [u64],
        end_key: u64,
    ) -> Result<(BlockNr, u64)> {
        let mut removed = 0;
        loop {
            let (new_root, r) = self.remove_one(info, root, keys, end_key);
            if let Some(new_root) = new_root {
                root = new_root;
            }
            if !r? {
                return Ok((root, removed));
            }
            removed += 1;
        }
    }
}

/// Merges two siblings if together they are small, else evens them out.
/// Returns the block whose reference the caller must drop (the right node,
/// after a merge).
fn rebalance2_nodes(parent: &mut [u8], l: &mut Child, r: &mut Child) -> Result<Option<BlockNr>> {
    let (nl, nr_) = (nr(&l.data[..]), nr(&r.data[..]));
    let threshold = 2 * (merge_threshold(&l.data[..]) + 1);
    if nl + nr_ < threshold {
        node_copy(&mut l.data[..], &mut r.data[..], -(nr_ as i64))?;
        node::set_nr_entries(&mut l.data[..], nl + nr_);
        node::delete_at(parent, r.index);
        Ok(Some(r.block))
    } else {
        let target_left = (nl + nr_) / 2;
        shift(&mut l.data[..], &mut r.data[..], nl as i64 - target_left as i64)?;
        node::set_key(parent, r.index, Node::new(&r.data[..]).key(0));
        Ok(None)
    }
}

/// Evens out three siblings (removal side; the kernel's moves, in its order).
fn redistribute3(parent: &mut [u8], l: &mut Child, c: &mut Child, r: &mut Child) -> Result<()> {
    let (mut nl, nc, mut nr_) = (nr(&l.data[..]) as i64, nr(&c.data[..]) as i64, nr(&r.data[..]) as i64);
    let max = Node::new(&l.data[..]).max_entries() as i64;
    let total = nl + nc + nr_;
    let target_right = total / 3;
    let target_left = target_right + i64::from(target_right * 3 != total);
    if target_left > max || target_right > max {
        return Err(shape_error("targets exceed max_entries"));
    }
    if nl < nr_ {
        let mut s = nl - target_left;
        if s < 0 && nc < -s {
            // Not enough in the centre.
            shift(&mut l.data[..], &mut c.data[..], -nc)?;
            s += nc;
            shift(&mut l.data[..], &mut r.data[..], s)?;
            nr_ += s;
        } else {
            shift(&mut l.data[..], &mut c.data[..], s)?;
        }
        shift(&mut c.data[..], &mut r.data[..], target_right - nr_)?;
    } else {
        let mut s = target_right - nr_;
        if s > 0 && nc < s {
            shift(&mut c.data[..], &mut r.data[..], nc)?;
            s -= nc;
            shift(&mut l.data[..], &mut r.data[..], s)?;
            nl -= s;
        } else {
            shift(&mut c.data[..], &mut r.data[..], s)?;
        }
        shift(&mut l.data[..], &mut c.data[..], nl - target_left)?;
    }
    node::set_key(parent, c.index, Node::new(&c.data[..]).key(0));
    node::set_key(parent, r.index, Node::new(&r.data[..]).key(0));
    Ok(())
}
