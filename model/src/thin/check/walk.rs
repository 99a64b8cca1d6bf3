//! The checking walk: visits every btree node once, validates it, counts
//! metadata references and (for mapping leaves) data references.
//!
//! # Reference counting and shared nodes
//!
//! The kernel's space maps count *references from blocks that exist*, not
//! paths through the trees. A node's metadata count is the number of
//! distinct parent slots (plus superblock roots) pointing at it; when a
//! node is shared by two parents, each parent holds one reference, but the
//! node itself exists once, so the references *it* holds (to its children,
//! or, for a mapping leaf, to data blocks) are held once. That is what the
//! kernel maintains: shadowing a shared node copies it and increments the
//! counts of everything the copy points at (`dm_btree`'s inc callbacks),
//! because the copy is a new block holding new references.
//!
//! thin-provisioning-tools agrees: the C++ checker's counting visitor
//! increments a node's count on every visit but descends only on the first
//! one, and the Rust checker (1.x) walks the set of distinct nodes in use
//! and increments the data space map once per entry of each distinct leaf,
//! including leaves reachable only from the metadata snapshot. So here:
//! every reference to a node increments its metadata count; a node is
//! validated and descended on its first visit only; a mapping leaf's
//! entries are added to the expected data counts on that first visit.
//! Per-device mapping totals (which *do* count a shared subtree once per
//! device) come from per-node summaries memoised on the first visit.

use std::collections::BTreeMap;

use crate::pdata::layout::space_map::REF_COUNT_VALUE_SIZE;
use crate::pdata::layout::space_map::{INDEX_ENTRY_SIZE, MAX_METADATA_BLOCKS};
use crate::pdata::layout::thin::{unpack_block_time, DEVICE_DETAILS_SIZE, MAPPING_VALUE_SIZE};

use super::block::Reader;
use super::node::{read_node, MAX_DEPTH};
use super::report::{Problem, Severity, Structure};

/// The btrees of a thin pool, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum TreeKind {
    /// Device details (value: 24-byte record).
    Details,
    /// Top level of the mapping tree (value: subtree root).
    TopLevel,
    /// A bottom-level mapping tree (value: block/time).
    Mapping,
    /// The data space map's index tree (value: index entry).
    DataIndex,
    /// The metadata space map's overflow tree (value: le32 count).
    MetadataOverflow,
    /// The data space map's overflow tree (value: le32 count).
    DataOverflow,
    /// The btree of a dm-array (value: the location of an array block,
    /// a reference to it).
    ArrayIndex,
}

impl TreeKind {
    /// Leaf value size of this tree.
    pub(crate) fn value_size(self) -> usize {
        match self {
            TreeKind::Details => DEVICE_DETAILS_SIZE,
            TreeKind::TopLevel | TreeKind::Mapping | TreeKind::ArrayIndex => MAPPING_VALUE_SIZE,
            TreeKind::DataIndex => INDEX_ENTRY_SIZE,
            TreeKind::MetadataOverflow | TreeKind::DataOverflow => REF_COUNT_VALUE_SIZE,
        }
    }

    fn name(self) -> &'static str {
        match self {
            TreeKind::Details => "device details tree",
            TreeKind::TopLevel => "top-level mapping tree",
            TreeKind::Mapping => "bottom-level mapping tree",
            TreeKind::DataIndex => "data space map index tree",
            TreeKind::MetadataOverflow => "metadata space map overflow tree",
            TreeKind::DataOverflow => "data space map overflow tree",
            TreeKind::ArrayIndex => "array btree",
        }
    }
}

/// What a metadata block was found to be used as. A block may be reached
/// many times in the same role (sharing), never in two roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    /// Not (yet) reached.
    Unused,
    /// The superblock.
    Superblock,
    /// The metadata snapshot's superblock copy.
    SnapshotSuperblock,
    /// A node of a tree of this kind.
    Node(TreeKind),
    /// The metadata space map index block.
    MetadataIndex,
    /// A metadata space map bitmap.
    MetadataBitmap,
    /// A data space map bitmap.
    DataBitmap,
    /// A dm-array block.
    ArrayBlock,
}

impl Use {
    fn name(self) -> &'static str {
        match self {
            Use::Unused => "nothing",
            Use::Superblock => "the superblock",
            Use::SnapshotSuperblock => "the metadata snapshot superblock",
            Use::Node(k) => k.name(),
            Use::MetadataIndex => "the metadata space map index",
            Use::MetadataBitmap => "a metadata space map bitmap",
            Use::DataBitmap => "a data space map bitmap",
            Use::ArrayBlock => "an array block",
        }
    }
}

/// What a subtree holds, memoised per node on its first visit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Summary {
    /// Leaf entries below (saturating).
    pub entries: u64,
    /// Levels below: 0 for a leaf.
    pub height: u32,
    /// Smallest and largest key below, if any.
    pub span: Option<(u64, u64)>,
    /// Whether the whole subtree was valid (counts are exact).
    pub ok: bool,
}

impl Summary {
    const BAD: Summary = Summary { entries: 0, height: 0, span: None, ok: false };
}

#[derive(Debug, Clone, Copy)]
enum NodeState {
    InProgress,
    Done(Summary),
}

/// Checker state shared by all walks.
pub(crate) struct Ctx<'a> {
    pub reader: Reader<'a>,
    /// Blocks in the metadata device.
    pub nr_blocks: u64,
    /// Expected metadata reference counts, by block (< nr_blocks).
    pub meta_counts: Vec<u32>,
    /// What each metadata block is used as.
    pub uses: Vec<Use>,
    /// Blocks tracked by the metadata space map; references at or past it
    /// cannot be counted there.
    pub meta_sm_nr_blocks: u64,
    /// Blocks tracked by the data space map.
    pub data_nr_blocks: u64,
    /// Expected data reference counts (only referenced blocks).
    pub data_counts: super::data_counts::DataCounts,
    /// Distinct mapping leaf entries seen.
    pub mapping_entries: u64,
    /// Bottom-level roots found in first-visited top-level leaves, with
    /// the device id and whether it was reached from the snapshot.
    pub pending_subtrees: Vec<(u64, u64, bool)>,
    /// Array blocks named by first-visited array btree leaves, as (array
    /// block index, location), in walk order; their references are
    /// already counted.
    pub pending_ablocks: Vec<(u64, u64)>,
    nodes: BTreeMap<u64, NodeState>,
    /// Problems found so far.
    pub problems: Vec<Problem>,
}

impl<'a> Ctx<'a> {
    /// A fresh context over `reader`.
    pub(crate) fn new(reader: Reader<'a>) -> Self {
        let nr_blocks = reader.nr_blocks();
        // The device size bounds these vectors (never an on-disk field).
        let n = usize::try_from(nr_blocks).unwrap_or(usize::MAX);
        Ctx {
            reader,
            nr_blocks,
            meta_counts: vec![0; n],
            uses: vec![Use::Unused; n],
            meta_sm_nr_blocks: 0,
            data_nr_blocks: 0,
            data_counts: super::data_counts::DataCounts::new(),
            mapping_entries: 0,
            pending_subtrees: Vec::new(),
            pending_ablocks: Vec::new(),
            nodes: BTreeMap::new(),
            problems: Vec::new(),
        }
    }

    /// Records a problem.
    /// Checks the metadata space map's size (its root's `nr_blocks`)
    /// against the device's `device_blocks` and the format's maximum, and
    /// records it for the reference-count checks. Shared by the thin and
    /// the cache checkers.
    pub(crate) fn check_metadata_sm_size(&mut self, nr_blocks: u64, device_blocks: u64) {
        if nr_blocks > device_blocks {
            self.problem(
                Severity::Damage,
                Structure::MetadataSpaceMap,
                None,
                format!("space map tracks {nr_blocks} blocks, the device holds {device_blocks}"),
            );
        }
        if nr_blocks > MAX_METADATA_BLOCKS {
            self.problem(
                Severity::Damage,
                Structure::MetadataSpaceMap,
                None,
                format!("space map tracks {nr_blocks} blocks, more than the maximum {MAX_METADATA_BLOCKS}"),
            );
        }
        self.meta_sm_nr_blocks = nr_blocks;
    }

    pub(crate) fn problem(
        &mut self,
        severity: Severity,
        structure: Structure,
        block: Option<u64>,
        message: String,
    ) {
        self.problems.push(Problem { severity, structure, block, message });
    }

    /// Counts one reference to metadata block `b` held by `structure`.
    /// Returns false (after reporting) when `b` cannot be a metadata block.
    pub(crate) fn count_ref(&mut self, b: u64, structure: Structure, what: &str) -> bool {
        if b >= self.nr_blocks {
            self.problem(
                Severity::Damage,
                structure,
                Some(b),
                format!("{what} is beyond the end of the metadata device ({} blocks)", self.nr_blocks),
            );
            return false;
        }
        if b >= self.meta_sm_nr_blocks {
            self.problem(
                Severity::Damage,
                structure,
                Some(b),
                format!("{what} is beyond the metadata space map's {} blocks", self.meta_sm_nr_blocks),
            );
        }
        let c = &mut self.meta_counts[b as usize];
        *c = c.saturating_add(1);
        true
    }

    /// Claims block `b` (< nr_blocks) for `role`. Returns false (after
    /// reporting) if it is already used as something else; true if it is
    /// unused or already used in the same role.
    pub(crate) fn claim(&mut self, b: u64, role: Use, structure: Structure) -> bool {
        let Some(slot) = self.uses.get_mut(b as usize) else { return false };
        match *slot {
            Use::Unused => {
                *slot = role;
                true
            }
            r if r == role => true,
            other => {
                self.problem(
                    Severity::Damage,
                    structure,
                    Some(b),
                    format!("block used both as {} and as {}", other.name(), role.name()),
                );
                false
            }
        }
    }

    /// Counts a reference to the root of a tree and walks it.
    pub(crate) fn walk_root(&mut self, root: u64, kind: TreeKind, structure: Structure) -> Summary {
        if !self.count_ref(root, structure, "tree root") {
            return Summary::BAD;
        }
        self.visit(root, kind, structure, 0, (0, None), true)
    }

    /// Walks the subtree at `b` (whose reference was already counted).
    /// `range` is the key range the parent allows: [lo, hi).
    pub(crate) fn visit(
        &mut self,
        b: u64,
        kind: TreeKind,
        structure: Structure,
        depth: u32,
        range: (u64, Option<u64>),
        is_root: bool,
    ) -> Summary {
        if depth > MAX_DEPTH {
            self.problem(
                Severity::Damage,
                structure,
                Some(b),
                format!("tree deeper than {MAX_DEPTH} levels"),
            );
            return Summary::BAD;
        }
        if !self.claim(b, Use::Node(kind), structure) {
            return Summary::BAD;
        }
        let summary = match self.nodes.get(&b) {
            Some(NodeState::InProgress) => {
                self.problem(Severity::Damage, structure, Some(b), "node is its own ancestor (cycle)".into());
                return Summary::BAD;
            }
            Some(NodeState::Done(s)) => *s,
            None => {
                self.nodes.insert(b, NodeState::InProgress);
                let s = self.first_visit(b, kind, structure, depth, is_root);
                self.nodes.insert(b, NodeState::Done(s));
                s
            }
        };
        // Range check on every reference, so that a shared subtree is
        // judged against each parent that points at it.
        if let Some((first, last)) = summary.span {
            let (lo, hi) = range;
            if first < lo || hi.is_some_and(|h| last >= h) {
                let hi_s = hi.map_or("end".to_string(), |h| h.to_string());
                self.problem(
                    Severity::Damage,
                    structure,
                    Some(b),
                    format!("keys {first}..={last} lie outside the parent's range [{lo}, {hi_s})"),
                );
                return Summary { ok: false, ..summary };
            }
        }
        summary
    }

    fn first_visit(
        &mut self,
        b: u64,
        kind: TreeKind,
        structure: Structure,
        depth: u32,
        is_root: bool,
    ) -> Summary {
        let node = match read_node(&mut self.reader, b, kind.value_size()) {
            Ok((node, remark)) => {
                if let Some(r) = remark {
                    self.problem(Severity::NonFatal, structure, Some(b), r);
                }
                node
            }
            Err(e) => {
                self.problem(Severity::Damage, structure, Some(b), format!("btree node: {e}"));
                return Summary::BAD;
            }
        };
        let min = node.max_entries / 3;
        if !is_root && node.nr_entries < min {
            self.problem(
                Severity::NonFatal,
                structure,
                Some(b),
                format!("too few entries: {} (a non-root node needs at least {min})", node.nr_entries),
            );
        }
        let span = node.key_span();
        if !node.internal {
            self.leaf_values(b, kind, structure, &node);
            return Summary { entries: node.nr_entries as u64, height: 0, span, ok: true };
        }
        let mut out = Summary { entries: 0, height: 0, span, ok: true };
        let mut child_height: Option<u32> = None;
        for i in 0..node.nr_entries {
            let child = node.value_u64(i);
            let lo = node.key(i);
            let hi = if i + 1 < node.nr_entries { Some(node.key(i + 1)) } else { None };
            if !self.count_ref(child, structure, &format!("child {i} of node {b}")) {
                out.ok = false;
                continue;
            }
            let s = self.visit(child, kind, structure, depth + 1, (lo, hi), false);
            out.ok &= s.ok;
            out.entries = out.entries.saturating_add(s.entries);
            if s.ok {
                match child_height {
                    None => child_height = Some(s.height),
                    Some(h) if h != s.height => {
                        self.problem(
                            Severity::Damage,
                            structure,
                            Some(b),
                            format!(
                                "leaves at unequal depths: child {i} has height {}, earlier children {h}",
                                s.height
                            ),
                        );
                        out.ok = false;
                    }
                    Some(_) => {}
                }
            }
        }
        out.height = child_height.map_or(1, |h| h.saturating_add(1));
        out
    }

    /// Per-entry work for a leaf seen for the first time.
    fn leaf_values(&mut self, b: u64, kind: TreeKind, structure: Structure, node: &super::node::Node) {
        match kind {
            TreeKind::Mapping => {
                let mut beyond = 0u64;
                let mut first_beyond = None;
                for i in 0..node.nr_entries {
                    let (data, _time) = unpack_block_time(node.value_u64(i));
                    if data >= self.data_nr_blocks {
                        beyond += 1;
                        first_beyond.get_or_insert((node.key(i), data));
                        continue;
                    }
                    self.data_counts.add(data);
                }
                self.mapping_entries = self.mapping_entries.saturating_add(node.nr_entries as u64);
                if let Some((key, data)) = first_beyond {
                    self.problem(
                        Severity::Damage,
                        structure,
                        Some(b),
                        format!(
                            "{beyond} mapping(s) to data blocks past the data device's {} blocks \
                             (first: virtual block {key} -> data block {data})",
                            self.data_nr_blocks
                        ),
                    );
                }
            }
            TreeKind::TopLevel => {
                // Each first-visited top-level leaf holds one reference to
                // each subtree root it names.
                let snap = matches!(structure, Structure::TopLevelMappingTree { snap: true });
                for i in 0..node.nr_entries {
                    let (dev, root) = (node.key(i), node.value_u64(i));
                    let st = Structure::MappingTree { dev, snap };
                    if self.count_ref(root, st, "subtree root") {
                        self.pending_subtrees.push((dev, root, snap));
                    }
                }
            }
            TreeKind::ArrayIndex => {
                // Each first-visited leaf holds one reference to each
                // array block it names.
                for i in 0..node.nr_entries {
                    let (index, ablock) = (node.key(i), node.value_u64(i));
                    if self.count_ref(ablock, structure, "array block") {
                        self.pending_ablocks.push((index, ablock));
                    }
                }
            }
            TreeKind::Details | TreeKind::DataIndex | TreeKind::MetadataOverflow | TreeKind::DataOverflow => {
            }
        }
    }

    /// The memoised summary of a node already walked.
    pub(crate) fn summary_of(&self, b: u64) -> Option<Summary> {
        match self.nodes.get(&b) {
            Some(NodeState::Done(s)) => Some(*s),
            _ => None,
        }
    }
}
