//! Btree nodes read from untrusted blocks: header validation and a
//! bounded, cycle-proof in-order scan of a tree's leaf entries.
//!
//! This is deliberately separate from the writer's btree code (in
//! `pdata::btree`): a checker that shared its reader with the writer would
//! agree with the writer's mistakes.

use crate::pdata::layout::node::{self, HEADER_SIZE};
use crate::pdata::layout::{BlockKind, BLOCK_SIZE};

use super::block::{le32, le64, Block, BlockFault, Reader};

/// Deepest tree accepted. A 4 KiB-node btree over 2^64 keys with the
/// smallest legal fan-out (internal nodes hold ≥ 84 entries) is at most
/// 11 levels deep; anything deeper is corrupt (or a cycle).
pub(crate) const MAX_DEPTH: u32 = 16;

/// A node whose header passed validation: every key and value slot up to
/// `nr_entries` lies inside the block.
pub(crate) struct Node {
    /// The block's bytes.
    pub block: Block,
    /// Internal (values are child block numbers) or leaf.
    pub internal: bool,
    /// Entries in use.
    pub nr_entries: usize,
    /// Slots in the node.
    pub max_entries: usize,
    /// Bytes per value.
    pub value_size: usize,
}

impl Node {
    /// Key `i` (i < nr_entries).
    pub(crate) fn key(&self, i: usize) -> u64 {
        le64(&self.block[..], node::key_offset(i))
    }

    /// Value `i` (i < nr_entries); empty if out of range (cannot happen
    /// after validation).
    pub(crate) fn value(&self, i: usize) -> &[u8] {
        let start = node::value_offset(self.max_entries, self.value_size, i);
        start.checked_add(self.value_size).and_then(|end| self.block.get(start..end)).unwrap_or(&[])
    }

    /// Value `i` read as a little-endian u64 (child pointers, mappings).
    pub(crate) fn value_u64(&self, i: usize) -> u64 {
        le64(self.value(i), 0)
    }

    /// First and last key, if any.
    pub(crate) fn key_span(&self) -> Option<(u64, u64)> {
        let n = self.nr_entries;
        (n > 0).then(|| (self.key(0), self.key(n - 1)))
    }
}

/// Why a node was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NodeFault {
    /// Unreadable, wrong checksum or wrong location.
    Block(BlockFault),
    /// A header field or the key order is impossible.
    Header(String),
}

impl std::fmt::Display for NodeFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeFault::Block(b) => b.fmt(f),
            NodeFault::Header(s) => f.write_str(s),
        }
    }
}

/// Validates the header of a node that checksummed correctly: flags,
/// value size (8 for internal nodes, `leaf_value_size` for leaves), that
/// `max_entries` slots fit in the block, `nr_entries <= max_entries`, and
/// strictly increasing keys. Returns the node and a non-fatal remark
/// (max_entries not a multiple of three) if any.
pub(crate) fn parse(block: Block, leaf_value_size: usize) -> Result<(Node, Option<String>), NodeFault> {
    let b = &block[..];
    let flags = le32(b, node::FLAGS);
    let internal = match flags {
        node::INTERNAL => true,
        node::LEAF => false,
        f => return Err(NodeFault::Header(format!("bad flags {f:#x} (neither internal nor leaf)"))),
    };
    let nr_entries = le32(b, node::NR_ENTRIES) as usize;
    let max_entries = le32(b, node::MAX_ENTRIES) as usize;
    let value_size = le32(b, node::VALUE_SIZE) as usize;
    let expected = if internal { 8 } else { leaf_value_size };
    if value_size != expected {
        return Err(NodeFault::Header(format!(
            "value size mismatch: expected {expected}, found {value_size}"
        )));
    }
    // 32 + (8 + value_size) * max_entries <= 4096, computed without overflow.
    let fits = (max_entries as u64)
        .checked_mul(8 + value_size as u64)
        .is_some_and(|body| body <= (BLOCK_SIZE - HEADER_SIZE) as u64);
    if !fits {
        return Err(NodeFault::Header(format!(
            "max entries too large: {max_entries} entries of {value_size}-byte values do not fit"
        )));
    }
    if nr_entries > max_entries {
        return Err(NodeFault::Header(format!("nr_entries {nr_entries} exceeds max_entries {max_entries}")));
    }
    let node = Node { block, internal, nr_entries, max_entries, value_size };
    for i in 1..nr_entries {
        let (prev, key) = (node.key(i - 1), node.key(i));
        if key <= prev {
            return Err(NodeFault::Header(format!("keys out of order at index {i}: {key} follows {prev}")));
        }
    }
    let remark =
        (!max_entries.is_multiple_of(3)).then(|| format!("max_entries {max_entries} is not a multiple of 3"));
    Ok((node, remark))
}

/// Reads block `b` and validates it as a node of a tree with leaf values
/// of `leaf_value_size` bytes.
pub(crate) fn read_node(
    reader: &mut Reader<'_>,
    b: u64,
    leaf_value_size: usize,
) -> Result<(Node, Option<String>), NodeFault> {
    let block = reader.read_as(b, BlockKind::BtreeNode).map_err(NodeFault::Block)?;
    parse(block, leaf_value_size)
}

/// The callback of [`scan`]: (key, value bytes) of each leaf entry.
pub(crate) type EntryVisitor<'v> = dyn FnMut(u64, &[u8]) -> Result<(), ScanError> + 'v;

/// A scan failure: where and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScanError {
    /// The node at fault.
    pub block: u64,
    /// What is wrong.
    pub what: String,
}

/// Visits the leaf entries of the tree rooted at `root` in key order.
///
/// Used to *collect* entries (device ids, subtree roots, index entries,
/// mappings for the dump), not to count references: a subtree shared with
/// another tree is scanned again here. The scan is bounded whatever the
/// image holds: depth is capped, at most `budget` nodes are read, keys
/// must increase strictly across the whole scan and lie within the
/// parent's key range, so neither a cycle nor a node referenced many
/// times can make it loop or blow up.
///
/// With `strict`, the first fault ends the scan with an error (the
/// dumper). Without, a faulty node is skipped and the scan goes on (the
/// checker, which reports faults through its own walk).
pub(crate) fn scan(
    reader: &mut Reader<'_>,
    root: u64,
    leaf_value_size: usize,
    strict: bool,
    visit: &mut EntryVisitor<'_>,
) -> Result<(), ScanError> {
    let budget = reader.nr_blocks().saturating_mul(2).saturating_add(16);
    let mut st = ScanState { strict, leaf_value_size, budget, last_key: None };
    st.node(reader, root, 0, 0, None, true, visit)
}

struct ScanState {
    strict: bool,
    leaf_value_size: usize,
    budget: u64,
    last_key: Option<u64>,
}

impl ScanState {
    fn fail(&self, block: u64, what: String) -> Result<(), ScanError> {
        if self.strict {
            Err(ScanError { block, what })
        } else {
            Ok(())
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn node(
        &mut self,
        reader: &mut Reader<'_>,
        b: u64,
        depth: u32,
        lo: u64,
        hi: Option<u64>,
        is_root: bool,
        visit: &mut EntryVisitor<'_>,
    ) -> Result<(), ScanError> {
        if depth > MAX_DEPTH {
            return self.fail(b, format!("tree deeper than {MAX_DEPTH} levels (cycle?)"));
        }
        if self.budget == 0 {
            // Not skippable: without a budget the scan could run for ever.
            return Err(ScanError { block: b, what: "too many nodes visited (cycle?)".into() });
        }
        self.budget -= 1;
        let n = match read_node(reader, b, self.leaf_value_size) {
            Ok((n, _)) => n,
            Err(e) => return self.fail(b, e.to_string()),
        };
        if !is_root && n.nr_entries == 0 {
            return self.fail(b, "empty non-root node".into());
        }
        if let Some((first, last)) = n.key_span() {
            if first < lo || hi.is_some_and(|h| last >= h) {
                return self.fail(b, format!("keys {first}..={last} outside the parent's range"));
            }
        }
        for i in 0..n.nr_entries {
            let key = n.key(i);
            if n.internal {
                let next = if i + 1 < n.nr_entries { Some(n.key(i + 1)) } else { hi };
                self.node(reader, n.value_u64(i), depth + 1, key, next, false, visit)?;
            } else {
                if self.last_key.is_some_and(|l| key <= l) {
                    // Only reachable on a corrupt tree whose fault was
                    // skipped (non-strict); never visit a key twice.
                    self.fail(b, format!("key {key} repeats or goes backwards"))?;
                    continue;
                }
                self.last_key = Some(key);
                visit(key, n.value(i))?;
            }
        }
        Ok(())
    }
}
