//! Byte-level access to btree nodes (spec §1.3, §1.5).
//!
//! Nodes are handled as whole 4 KiB buffers and every move is a byte copy
//! over the kernel's layout, so that the bytes the kernel leaves behind in
//! unused slots are left behind here too: checksums cover them.

use crate::pdata::layout::node::{HEADER_SIZE, INTERNAL, LEAF, MAX_ENTRIES, NR_ENTRIES, VALUE_SIZE};
use crate::pdata::layout::{get_u32, get_u64, node::FLAGS, put_u32, put_u64};

/// A read-only view of a node.
#[derive(Clone, Copy)]
pub struct Node<'a> {
    b: &'a [u8],
}

impl<'a> Node<'a> {
    /// Views `b` (a 4 KiB block) as a node.
    pub fn new(b: &'a [u8]) -> Self {
        Node { b }
    }

    /// The node's bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.b
    }

    /// Header flags.
    pub fn flags(&self) -> u32 {
        get_u32(self.b, FLAGS)
    }

    /// Whether the node is a leaf (the kernel tests the LEAF bit).
    pub fn is_leaf(&self) -> bool {
        self.flags() & LEAF != 0
    }

    /// Whether the node is internal (the kernel tests the INTERNAL bit).
    pub fn is_internal(&self) -> bool {
        self.flags() & INTERNAL != 0
    }

    /// Entries in use.
    pub fn nr_entries(&self) -> usize {
        get_u32(self.b, NR_ENTRIES) as usize
    }

    /// Capacity.
    pub fn max_entries(&self) -> usize {
        get_u32(self.b, MAX_ENTRIES) as usize
    }

    /// Bytes per value.
    pub fn value_size(&self) -> usize {
        get_u32(self.b, VALUE_SIZE) as usize
    }

    /// Key `i`.
    pub fn key(&self, i: usize) -> u64 {
        get_u64(self.b, HEADER_SIZE + 8 * i)
    }

    /// Offset of value `i`.
    pub fn value_offset(&self, i: usize) -> usize {
        HEADER_SIZE + 8 * self.max_entries() + self.value_size() * i
    }

    /// Value `i`'s bytes.
    pub fn value(&self, i: usize) -> &'a [u8] {
        let off = self.value_offset(i);
        &self.b[off..off + self.value_size()]
    }

    /// Value `i` read as a little-endian u64 (child pointers, mappings).
    pub fn value64(&self, i: usize) -> u64 {
        get_u64(self.b, self.value_offset(i))
    }

    fn bsearch(&self, key: u64, want_hi: bool) -> isize {
        let (mut lo, mut hi) = (-1isize, self.nr_entries() as isize);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let mid_key = self.key(mid as usize);
            if mid_key == key {
                return mid;
            }
            if mid_key < key {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        if want_hi {
            hi
        } else {
            lo
        }
    }

    /// Index of the largest key `<= key`, or -1.
    pub fn lower_bound(&self, key: u64) -> isize {
        self.bsearch(key, false)
    }

    /// Index of `key` if present, else of the smallest key `> key` (may be
    /// `nr_entries`).
    pub fn upper_bound(&self, key: u64) -> isize {
        self.bsearch(key, true)
    }

    /// Where `key` is, if the node holds it.
    pub fn index_of(&self, key: u64) -> Option<usize> {
        let i = self.lower_bound(key);
        (i >= 0 && (i as usize) < self.nr_entries() && self.key(i as usize) == key).then_some(i as usize)
    }
}

/// Sets the entry count.
pub fn set_nr_entries(b: &mut [u8], n: usize) {
    put_u32(b, NR_ENTRIES, n as u32);
}

/// Sets the header of a node.
pub fn set_header(b: &mut [u8], flags: u32, nr_entries: usize, max_entries: usize, value_size: usize) {
    put_u32(b, FLAGS, flags);
    put_u32(b, NR_ENTRIES, nr_entries as u32);
    put_u32(b, MAX_ENTRIES, max_entries as u32);
    put_u32(b, VALUE_SIZE, value_size as u32);
}

/// Sets key `i`.
pub fn set_key(b: &mut [u8], i: usize, key: u64) {
    put_u64(b, HEADER_SIZE + 8 * i, key);
}

/// Sets value `i`.
pub fn set_value(b: &mut [u8], i: usize, value: &[u8]) {
    let off = Node::new(b).value_offset(i);
    b[off..off + value.len()].copy_from_slice(value);
}

/// Sets value `i` to a little-endian u64.
pub fn set_value64(b: &mut [u8], i: usize, v: u64) {
    set_value(b, i, &v.to_le_bytes());
}

/// A node has no room for another entry (the kernel's -ENOMEM from
/// `insert_at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeFull;

/// Inserts (key, value) at `index`, shifting later entries up. Fails like
/// the kernel when the node is full.
pub fn insert_at(b: &mut [u8], index: usize, key: u64, value: &[u8]) -> Result<(), NodeFull> {
    let n = Node::new(b);
    let (nr, max) = (n.nr_entries(), n.max_entries());
    if index > nr || index >= max || nr >= max {
        return Err(NodeFull);
    }
    move_entries(b, index + 1, index, nr - index);
    set_key(b, index, key);
    set_value(b, index, value);
    set_nr_entries(b, nr + 1);
    Ok(())
}

/// Deletes entry `index`, shifting later entries down.
pub fn delete_at(b: &mut [u8], index: usize) {
    let nr = Node::new(b).nr_entries();
    let to_move = nr - (index + 1);
    if to_move > 0 {
        move_entries(b, index, index + 1, to_move);
    }
    set_nr_entries(b, nr - 1);
}

/// Moves `count` entries of a node from `src` to `dest` (may overlap).
pub fn move_entries(b: &mut [u8], dest: usize, src: usize, count: usize) {
    if count == 0 {
        return;
    }
    let n = Node::new(b);
    let vs = n.value_size();
    let (vdest, vsrc) = (n.value_offset(dest), n.value_offset(src));
    let kdest = HEADER_SIZE + 8 * dest;
    let ksrc = HEADER_SIZE + 8 * src;
    b.copy_within(ksrc..ksrc + 8 * count, kdest);
    b.copy_within(vsrc..vsrc + vs * count, vdest);
}

/// Copies `count` entries from node `src` at `src_off` into node `dest` at
/// `dest_off` (value size taken from `dest`, as the kernel does).
pub fn copy_entries(dest: &mut [u8], dest_off: usize, src: &[u8], src_off: usize, count: usize) {
    if count == 0 {
        return;
    }
    let vs = Node::new(dest).value_size();
    let kd = HEADER_SIZE + 8 * dest_off;
    let ks = HEADER_SIZE + 8 * src_off;
    dest[kd..kd + 8 * count].copy_from_slice(&src[ks..ks + 8 * count]);
    let vd = Node::new(dest).value_offset(dest_off);
    let vsrc = Node::new(src).value_offset(src_off);
    dest[vd..vd + vs * count].copy_from_slice(&src[vsrc..vsrc + vs * count]);
}

/// Shifts a node's entries: negative `shift` drops the first `-shift`
/// entries (moving the rest down), positive moves all up by `shift`.
pub fn node_shift(b: &mut [u8], shift: i64) {
    let nr = Node::new(b).nr_entries();
    if shift < 0 {
        let s = (-shift) as usize;
        move_entries(b, 0, s, nr - s);
    } else {
        move_entries(b, shift as usize, 0, nr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdata::layout::node::max_entries_for;

    #[test]
    fn bounds_and_insert_delete() {
        let mut b = vec![0u8; 4096];
        set_header(&mut b, LEAF, 0, max_entries_for(8) as usize, 8);
        for (i, k) in [10u64, 20, 30].iter().enumerate() {
            insert_at(&mut b, i, *k, &(k * 100).to_le_bytes()).unwrap();
        }
        let n = Node::new(&b);
        assert_eq!(n.lower_bound(5), -1);
        assert_eq!(n.lower_bound(25), 1);
        assert_eq!(n.upper_bound(25), 2);
        assert_eq!(n.upper_bound(30), 2);
        assert_eq!(n.upper_bound(31), 3);
        assert_eq!(n.index_of(20), Some(1));
        assert_eq!(n.index_of(21), None);
        delete_at(&mut b, 0);
        let n = Node::new(&b);
        assert_eq!((n.key(0), n.value64(0), n.nr_entries()), (20, 2000, 2));
        // The vacated slot keeps its old bytes, as in the kernel.
        assert_eq!(n.key(2), 30);
    }
}
