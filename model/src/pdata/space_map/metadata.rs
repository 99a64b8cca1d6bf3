//! In-memory state of the metadata space map (dm-space-map-metadata).
//! Its operations live on [`crate::pdata::TransactionManager`].

use std::collections::VecDeque;

use super::LowLevel;
use crate::pdata::{PdataError, Result};

/// Most count changes that may be queued while the space map is busy
/// changing itself (the kernel's ring of 1024 block ops).
pub const MAX_RECURSIVE_ALLOCATIONS: usize = 1024;

/// A queued reference count change over a block range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    /// Add one reference to each block of the range.
    Inc(u64, u64),
    /// Drop one reference from each block of the range.
    Dec(u64, u64),
}

/// The low-water callback: fires when the free count falls to the threshold
/// (edge-triggered, as in the kernel).
#[derive(Debug, Clone, Default)]
pub struct Threshold {
    threshold: Option<u64>,
    current: Option<u64>,
    /// Times the callback fired and nobody has asked yet.
    pub fired: u64,
}

impl Threshold {
    /// Registers the threshold.
    pub fn set(&mut self, threshold: u64) {
        self.threshold = Some(threshold);
    }

    fn below(&self, value: u64) -> bool {
        self.threshold.is_some_and(|t| value <= t)
    }

    /// Records a new free count.
    pub fn check(&mut self, value: u64) {
        let already = self.current.is_some_and(|c| self.below(c));
        if self.below(value) && !already {
            self.fired += 1;
        }
        self.current = Some(value);
    }
}

/// The metadata space map's state.
#[derive(Debug, Clone)]
pub struct MetadataSpaceMap {
    /// Counts as of now.
    pub ll: LowLevel,
    /// Counts as of the last commit: a block must be free in both to be
    /// handed out, so nothing freed in this transaction is reused before it
    /// commits.
    pub old_ll: LowLevel,
    /// The allocation cursor (next fit).
    pub begin: u64,
    /// Nesting depth of space map operations.
    pub recursion_count: u32,
    /// Successful allocations since the last commit.
    pub allocated_this_transaction: u64,
    /// Count changes queued while recursing.
    pub uncommitted: VecDeque<BlockOp>,
    /// Formatting or extending: blocks come linearly from `begin` and every
    /// count change is queued.
    pub bootstrap: bool,
    /// The low-water callback.
    pub threshold: Threshold,
}

impl MetadataSpaceMap {
    /// A space map in bootstrap mode with its cursor at `begin`.
    pub fn new_bootstrap(begin: u64) -> Self {
        MetadataSpaceMap {
            ll: LowLevel::new_metadata(),
            old_ll: LowLevel::new_metadata(),
            begin,
            recursion_count: 0,
            allocated_this_transaction: 0,
            uncommitted: VecDeque::new(),
            bootstrap: true,
            threshold: Threshold::default(),
        }
    }

    /// Whether an operation is in progress (nested calls get queued).
    pub fn recursing(&self) -> bool {
        self.recursion_count > 0
    }

    /// Queues a count change.
    pub fn push_op(&mut self, op: BlockOp) -> Result<()> {
        if self.uncommitted.len() >= MAX_RECURSIVE_ALLOCATIONS {
            return Err(PdataError::TooManyRecursiveOps);
        }
        self.uncommitted.push_back(op);
        Ok(())
    }
}
