//! Coverage probes: counters of the rare states the model reached.
//!
//! A campaign that never splits a btree root, never runs a passdown
//! discard's second pass or never fires the no-space timeout tests none of
//! the code behind them. These counters say which of such states a run
//! reached, so that a campaign can report them and keep the seeds that
//! reached the rare ones (`dmsim check`'s probe table, the fuzz target).
//!
//! They are plain counts kept in the model's own structures (the
//! transaction manager's [`TreeProbes`], the pool's [`PoolProbes`]) and
//! read by the caller; counting changes nothing the model does.

/// What the btrees of one transaction manager did (every btree: mapping
/// trees, the device details tree, the space maps' own trees). Kept across
/// aborts, as the transaction manager is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeProbes {
    /// A full root split beneath itself (`btree_split_beneath`): the tree
    /// grew a level.
    pub root_splits: u64,
    /// A full non-root node split, one into two or two into three.
    pub node_splits: u64,
    /// An insert that moved entries into a sibling with room instead of
    /// splitting.
    pub insert_rebalances: u64,
    /// A removal that merged two siblings into one (or emptied a centre
    /// node into its neighbours).
    pub merges: u64,
    /// A removal that collapsed a level: a node with a single child took
    /// the child's place.
    pub collapses: u64,
    /// A collapse whose only child was shared with another tree (a
    /// snapshot): docs/findings.md, finding 10.
    pub shared_collapses: u64,
    /// The most levels of a single tree an insert descended through (a
    /// leaf root is 1).
    pub deepest: u32,
    /// Splits (root or node) of the metadata space map's own overflow
    /// tree, the counts of metadata blocks referenced three times or more:
    /// the space map changing its own btree while it allocates for it
    /// (its recursion, the queued count changes).
    pub metadata_sm_splits: u64,
    /// Merges and collapses of the metadata space map's overflow tree (a
    /// metadata block's count falling back below three).
    pub metadata_sm_shrinks: u64,
}

impl TreeProbes {
    /// Adds `other`'s counts to these (`deepest`: the larger).
    pub fn add(&mut self, other: &TreeProbes) {
        self.root_splits += other.root_splits;
        self.node_splits += other.node_splits;
        self.insert_rebalances += other.insert_rebalances;
        self.merges += other.merges;
        self.collapses += other.collapses;
        self.shared_collapses += other.shared_collapses;
        self.deepest = self.deepest.max(other.deepest);
        self.metadata_sm_splits += other.metadata_sm_splits;
        self.metadata_sm_shrinks += other.metadata_sm_shrinks;
    }
}

/// What a thin pool did, beyond its metadata's btrees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolProbes {
    /// The btrees of its metadata.
    pub tree: TreeProbes,
    /// A write to a shared block scheduled a break-sharing copy (or a
    /// whole-block overwrite of the new block).
    pub break_sharing_copies: u64,
    /// A passdown discard ran its second pass.
    pub passdown_second_passes: u64,
    /// A passdown discard to the data device failed (kernel 6.1 ignores
    /// the error: `passdown_endio` queues the second pass all the same).
    pub passdown_failures: u64,
    /// The no-space timeout fired: queued bios failed with ENOSPC.
    pub no_space_timeouts: u64,
    /// A metadata operation failed and the transaction was aborted.
    pub aborts: u64,
    /// A commit failed (an I/O error of either device during it).
    pub failed_commits: u64,
    /// An allocation found no free data block and committed before giving
    /// up (`alloc_data_block`; in 6.1 that commit frees nothing: the free
    /// count already counts the blocks the open transaction freed).
    pub reclaim_commits: u64,
    /// A bio queued until a resume (out of data space, no
    /// `error_if_no_space`).
    pub bios_queued_for_space: u64,
    /// The low water mark was crossed (a dm event).
    pub low_water_events: u64,
}

impl PoolProbes {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &PoolProbes) {
        self.tree.add(&other.tree);
        self.break_sharing_copies += other.break_sharing_copies;
        self.passdown_second_passes += other.passdown_second_passes;
        self.passdown_failures += other.passdown_failures;
        self.no_space_timeouts += other.no_space_timeouts;
        self.aborts += other.aborts;
        self.failed_commits += other.failed_commits;
        self.reclaim_commits += other.reclaim_commits;
        self.bios_queued_for_space += other.bios_queued_for_space;
        self.low_water_events += other.low_water_events;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_sums_counts_and_keeps_the_deepest() {
        let mut a = PoolProbes { aborts: 1, ..PoolProbes::default() };
        a.tree.deepest = 3;
        a.tree.root_splits = 2;
        let mut b = PoolProbes { aborts: 2, no_space_timeouts: 1, ..PoolProbes::default() };
        b.tree.deepest = 2;
        b.tree.root_splits = 1;
        a.add(&b);
        assert_eq!(a.aborts, 3);
        assert_eq!(a.no_space_timeouts, 1);
        assert_eq!(a.tree.root_splits, 3);
        assert_eq!(a.tree.deepest, 3);
    }
}
