//! Coverage probes of a thin run: which rare states it reached, by name.
//!
//! A run's probes ([`ThinProbes`]) gather what the model counted itself
//! ([`PoolProbes`]: btree splits, merges and collapses, the deepest tree,
//! break-sharing copies, passdown second passes, the no-space timeout,
//! aborts and failed commits), what the trace shows (the pool's mode
//! changes, a power cut of a pool a metadata error left read-only), the run's
//! counters ([`ThinStats`]: ENOSPC, EIO, leaks) and the faults that fired
//! ([`FaultCoverage`]). [`ProbeTally`] adds runs up by seed: how many
//! seeds reached each probe, and which seeds alone reached a rare one, so
//! that a campaign can keep them (`dmsim check` prints both). Everything
//! is listed in the fixed order of [`PROBES`] followed by the fault
//! probes, so reports are the same bytes for the same runs.

use dmsim_faults::FaultCoverage;
use dmsim_model::probes::{PoolProbes, TreeProbes};
use dmsim_traces::Event;

use crate::thin::ThinStats;

/// The probes of the model and the trace, in report order: name and what
/// reaching it means. The fault probes of [`FaultCoverage`] follow them
/// in a [`ThinProbes`].
pub const PROBES: [(&str, &str); 27] = [
    ("btree-root-split", "a full btree root split beneath itself: a tree grew a level"),
    ("btree-node-split", "a full non-root btree node split"),
    ("btree-insert-rebalance", "an insert moved entries into a sibling instead of splitting"),
    ("btree-merge", "a removal merged btree siblings"),
    ("btree-collapse", "a removal collapsed a node with a single child"),
    ("btree-collapse-shared-child", "a collapse whose only child a snapshot shares (finding 10)"),
    ("btree-three-levels", "an insert descended a tree of three or more levels"),
    ("metadata-sm-tree-split", "the metadata space map's own overflow btree split (inside its recursion)"),
    ("metadata-sm-tree-shrink", "the metadata space map's own overflow btree merged or collapsed"),
    ("break-sharing-copy", "a write to a shared block scheduled a break-sharing copy"),
    ("passdown-second-pass", "a passdown discard ran its second pass"),
    ("passdown-failed", "a passdown discard to the data device failed (its second pass runs anyway)"),
    ("no-space-timeout", "the no-space timeout fired"),
    ("metadata-abort", "a metadata operation failed and the transaction was aborted"),
    ("commit-failed", "a commit failed on an I/O error"),
    ("reclaim-commit", "an allocation found no free block and committed first (in 6.1 that frees nothing)"),
    ("queued-for-space", "a bio queued until the pool has data space again"),
    ("low-water-mark", "free data blocks fell to the low water mark"),
    ("mode-out-of-data-space", "the pool went out-of-data-space"),
    ("mode-out-of-metadata-space", "the pool went out-of-metadata-space"),
    ("mode-read-only", "the pool went read-only"),
    ("mode-fail", "the pool went to fail mode"),
    ("mode-write-again", "the pool came back to write mode from another"),
    ("enospc", "a request failed with ENOSPC"),
    ("eio-after-fault", "a request failed with EIO after an injected fault"),
    ("leak-after-crash", "the final check found data blocks a crash or a failed I/O leaked"),
    ("crash-while-degraded", "a power cut of a read-only or failed pool: recovery past needs_check"),
];

/// How many of [`PROBES`], from the first, are the btrees' probes.
pub const TREE_PROBES: usize = 9;

/// A probe is rare when at most this many seeds of a campaign reached it
/// (and at least one did): [`ProbeTally::rare`].
pub const RARE_SEEDS: usize = 2;

/// What one run reached: a count per probe, in the fixed order of
/// [`PROBES`] and then [`FaultCoverage`]'s probes. A count is how often
/// the state was reached (for `btree-three-levels`, the depth of the
/// deepest tree when it is three or more).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThinProbes {
    counts: Vec<(&'static str, u64)>,
}

impl ThinProbes {
    /// The probes of a thin run: the model's counters (`pool`, over every
    /// pool of the run: [`crate::thin::ThinSim::pool_probes`]), its
    /// counters, the faults that fired and its recorded events.
    pub fn of_run(pool: &PoolProbes, stats: &ThinStats, coverage: &FaultCoverage, events: &[Event]) -> Self {
        let mut modes = [0u64; 5];
        let mut degraded_crashes = 0;
        let mut previous = "write";
        for e in events {
            match e {
                Event::Mode(m) => {
                    let i = match m.as_str() {
                        "out-of-data-space" => 0,
                        "out-of-metadata-space" => 1,
                        "read-only" => 2,
                        "fail" => 3,
                        _ => 4,
                    };
                    if i < 4 || previous != "write" {
                        modes[i] += 1;
                    }
                    previous = m.as_str();
                }
                Event::Crashed { .. } => {
                    degraded_crashes += u64::from(matches!(previous, "read-only" | "fail"));
                }
                _ => {}
            }
        }
        let own = [
            pool.break_sharing_copies,
            pool.passdown_second_passes,
            pool.passdown_failures,
            pool.no_space_timeouts,
            pool.aborts,
            pool.failed_commits,
            pool.reclaim_commits,
            pool.bios_queued_for_space,
            pool.low_water_events,
            modes[0],
            modes[1],
            modes[2],
            modes[3],
            modes[4],
            stats.enospc,
            stats.io_errors,
            stats.leaked_after_crash,
            degraded_crashes,
        ];
        let mut counts = Self::of_trees(&pool.tree).counts;
        counts.extend(PROBES[TREE_PROBES..].iter().map(|(name, _)| *name).zip(own));
        counts.extend(coverage.iter());
        ThinProbes { counts }
    }

    /// Every probe with its count, in report order (zero counts included).
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.counts.iter().copied()
    }

    /// The btree probes alone (the first [`TREE_PROBES`] of [`PROBES`]) of one
    /// transaction manager's trees, or several added up: what the
    /// metadata crash campaign reports, where there is no pool.
    pub fn of_trees(t: &TreeProbes) -> Self {
        let own = [
            t.root_splits,
            t.node_splits,
            t.insert_rebalances,
            t.merges,
            t.collapses,
            t.shared_collapses,
            if t.deepest >= 3 { u64::from(t.deepest) } else { 0 },
            t.metadata_sm_splits,
            t.metadata_sm_shrinks,
        ];
        ThinProbes { counts: PROBES[..TREE_PROBES].iter().map(|(name, _)| *name).zip(own).collect() }
    }

    /// The count of the probe called `name` (`None`: no such probe).
    pub fn get(&self, name: &str) -> Option<u64> {
        self.counts.iter().find(|(n, _)| *n == name).map(|&(_, c)| c)
    }

    /// The probes reached (a count above zero), in report order.
    pub fn reached(&self) -> Vec<&'static str> {
        self.iter().filter(|&(_, c)| c > 0).map(|(n, _)| n).collect()
    }
}

/// One probe over a campaign's seeds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeRow {
    /// The probe's name.
    pub name: &'static str,
    /// The seeds that reached it, in the order they were added.
    pub seeds: Vec<u64>,
    /// Its counts over every seed.
    pub count: u64,
}

/// Probes added up over a campaign's seeds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeTally {
    /// Seeds added.
    pub runs: u64,
    rows: Vec<ProbeRow>,
}

impl ProbeTally {
    /// No seed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds seed `seed`'s probes (seeds are best added in order: rows
    /// list their seeds in the order they came).
    pub fn add(&mut self, seed: u64, probes: &ThinProbes) {
        self.runs += 1;
        if self.rows.is_empty() {
            self.rows = probes.iter().map(|(name, _)| ProbeRow { name, ..ProbeRow::default() }).collect();
        }
        for (name, count) in probes.iter() {
            let row = match self.rows.iter_mut().find(|r| r.name == name) {
                Some(r) => r,
                None => {
                    self.rows.push(ProbeRow { name, ..ProbeRow::default() });
                    self.rows.last_mut().expect("just pushed")
                }
            };
            row.count += count;
            if count > 0 {
                row.seeds.push(seed);
            }
        }
    }

    /// Every probe, in report order.
    pub fn rows(&self) -> &[ProbeRow] {
        &self.rows
    }

    /// The probes reached by at least one seed and at most `max_seeds`,
    /// in report order.
    pub fn rare(&self, max_seeds: usize) -> Vec<&ProbeRow> {
        self.rows.iter().filter(|r| !r.seeds.is_empty() && r.seeds.len() <= max_seeds).collect()
    }

    /// The seeds worth keeping: those that reached a probe reached by at
    /// most `max_seeds` seeds, in ascending order, each once.
    pub fn keep(&self, max_seeds: usize) -> Vec<u64> {
        let mut seeds: Vec<u64> = self.rare(max_seeds).iter().flat_map(|r| r.seeds.iter().copied()).collect();
        seeds.sort_unstable();
        seeds.dedup();
        seeds
    }

    /// The probes no seed reached, in report order.
    pub fn unreached(&self) -> Vec<&'static str> {
        self.rows.iter().filter(|r| r.seeds.is_empty()).map(|r| r.name).collect()
    }
}

#[cfg(test)]
mod tests {
    use dmsim_faults::Probe;

    use super::*;

    fn probes(pool: PoolProbes, events: &[Event]) -> ThinProbes {
        ThinProbes::of_run(&pool, &ThinStats::default(), &FaultCoverage::default(), events)
    }

    #[test]
    fn names_are_unique_and_follow_with_the_fault_probes() {
        let p = probes(PoolProbes::default(), &[]);
        let names: Vec<_> = p.iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), PROBES.len() + Probe::ALL.len());
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "duplicate probe names: {names:?}");
        assert_eq!(names[PROBES.len()], Probe::ALL[0].name());
        assert!(p.reached().is_empty());
    }

    #[test]
    fn the_model_counters_and_the_trace_map_to_their_probes() {
        let mut pool = PoolProbes { passdown_second_passes: 2, ..PoolProbes::default() };
        pool.tree.deepest = 2;
        pool.tree.shared_collapses = 1;
        let events = [
            Event::Mode("out-of-data-space".into()),
            Event::Mode("write".into()),
            Event::Crashed { metadata: (1, 3), data: (0, 0), torn: false },
            Event::Mode("read-only".into()),
            Event::Crashed { metadata: (0, 0), data: (2, 2), torn: false },
            Event::Mode("write".into()),
        ];
        let p = probes(pool, &events);
        assert_eq!(p.get("passdown-second-pass"), Some(2));
        assert_eq!(p.get("btree-collapse-shared-child"), Some(1));
        assert_eq!(p.get("btree-three-levels"), Some(0), "two levels is not three");
        assert_eq!(p.get("mode-out-of-data-space"), Some(1));
        assert_eq!(p.get("mode-write-again"), Some(2));
        assert_eq!(p.get("mode-read-only"), Some(1));
        assert_eq!(p.get("mode-fail"), Some(0));
        assert_eq!(p.get("crash-while-degraded"), Some(1), "the crash after read-only mode only");
        assert_eq!(p.get("no-such-probe"), None);
        pool.tree.deepest = 3;
        assert_eq!(probes(pool, &[]).get("btree-three-levels"), Some(3));
        let trees = ThinProbes::of_trees(&pool.tree);
        assert_eq!(trees.iter().count(), 9, "the btree probes only");
        assert_eq!(trees.get("btree-collapse-shared-child"), Some(1));
        assert_eq!(trees.get("btree-three-levels"), Some(3));
        assert_eq!(trees.get("passdown-second-pass"), None);
    }

    #[test]
    fn a_tally_counts_seeds_and_keeps_those_of_rare_probes() {
        let mut t = ProbeTally::new();
        let common = PoolProbes { break_sharing_copies: 1, ..PoolProbes::default() };
        let rare = PoolProbes { break_sharing_copies: 1, no_space_timeouts: 4, ..PoolProbes::default() };
        for seed in 0..5 {
            t.add(seed, &probes(if seed == 3 { rare } else { common }, &[]));
        }
        assert_eq!(t.runs, 5);
        let row = |name: &str| t.rows().iter().find(|r| r.name == name).cloned().expect("a row");
        assert_eq!(row("break-sharing-copy").seeds, vec![0, 1, 2, 3, 4]);
        assert_eq!(row("no-space-timeout").seeds, vec![3]);
        assert_eq!(row("no-space-timeout").count, 4);
        let rare: Vec<_> = t.rare(RARE_SEEDS).iter().map(|r| r.name).collect();
        assert_eq!(rare, vec!["no-space-timeout"]);
        assert_eq!(t.keep(RARE_SEEDS), vec![3]);
        assert_eq!(t.keep(5), vec![0, 1, 2, 3, 4]);
        assert!(t.unreached().contains(&"mode-fail"));
        assert!(!t.unreached().contains(&"no-space-timeout"));
    }
}
