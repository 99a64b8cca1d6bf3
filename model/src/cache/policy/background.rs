//! The background work tracker (dm-cache-background-tracker.c): the
//! policy's queue of promotions, demotions and writebacks for the cache
//! core to carry out.
//!
//! The kernel's rules, all kept here:
//!
//! * at most one work item per origin block, queued or issued (an rb-tree
//!   keyed by oblock); a second one is refused (`-EINVAL`, "race");
//! * a capacity of `max_work` items counting queued and issued ones
//!   (`-ENOMEM` when reached);
//! * items come from a `GFP_NOWAIT` slab allocation, which can fail under
//!   memory pressure (`-ENOMEM`) — the model fails one only when the caller
//!   asked for it ([`BackgroundTracker::fail_next_allocs`]);
//! * the queue is **LIFO**: queueing adds at the head, issuing takes the
//!   head, so the most recently queued item is issued first;
//! * an item handed straight back to the caller (`pwork`, the overwrite
//!   promotion path) goes to the issued list, never to the queue;
//! * the counts of pending promotions, demotions and writebacks include
//!   issued items until they complete.

use std::collections::{BTreeMap, VecDeque};

use crate::errno::Errno;

/// What the core is asked to do (`enum policy_operation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyOp {
    /// Copy the origin block into the cache block and map it.
    Promote,
    /// Drop a clean cache block's mapping.
    Demote,
    /// Copy a dirty cache block back to the origin, keeping the mapping.
    Writeback,
}

/// One item of background work (`struct policy_work`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyWork {
    /// The operation.
    pub op: PolicyOp,
    /// The origin block.
    pub oblock: u64,
    /// The cache block.
    pub cblock: u32,
}

/// Where a tracked item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    Issued,
}

/// The background tracker (`struct background_tracker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackgroundTracker {
    max_work: u32,
    pending: BTreeMap<u64, (PolicyWork, State)>,
    /// Queued oblocks, head first (the kernel's `queued` list).
    queued: VecDeque<u64>,
    pending_promotes: u32,
    pending_demotes: u32,
    pending_writebacks: u32,
    fail_allocs: u32,
}

impl BackgroundTracker {
    /// An empty tracker holding at most `max_work` items (`btracker_create`).
    pub fn new(max_work: u32) -> Self {
        BackgroundTracker {
            max_work,
            pending: BTreeMap::new(),
            queued: VecDeque::new(),
            pending_promotes: 0,
            pending_demotes: 0,
            pending_writebacks: 0,
            fail_allocs: 0,
        }
    }

    /// The capacity.
    pub fn max_work(&self) -> u32 {
        self.max_work
    }

    /// Makes the next `n` work-item allocations fail as a `GFP_NOWAIT`
    /// allocation can (fault injection; the kernel's only nondeterminism
    /// inside the tracker).
    pub fn fail_next_allocs(&mut self, n: u32) {
        self.fail_allocs = n;
    }

    fn count(&mut self, op: PolicyOp) -> &mut u32 {
        match op {
            PolicyOp::Promote => &mut self.pending_promotes,
            PolicyOp::Demote => &mut self.pending_demotes,
            PolicyOp::Writeback => &mut self.pending_writebacks,
        }
    }

    fn max_work_reached(&self) -> bool {
        self.pending_promotes + self.pending_writebacks + self.pending_demotes >= self.max_work
    }

    /// Tracks `work` (`btracker_queue`): with `issue_now` the item is handed
    /// straight back (issued), else queued at the head. Fails with ENOMEM
    /// (capacity reached or allocation failed) or EINVAL (an item for the
    /// oblock exists).
    pub fn queue(&mut self, work: PolicyWork, issue_now: bool) -> Result<Option<PolicyWork>, Errno> {
        if self.max_work_reached() {
            return Err(Errno::ENOMEM);
        }
        if self.fail_allocs > 0 {
            self.fail_allocs -= 1;
            return Err(Errno::ENOMEM);
        }
        if self.pending.contains_key(&work.oblock) {
            return Err(Errno::EINVAL);
        }
        let state = if issue_now { State::Issued } else { State::Queued };
        self.pending.insert(work.oblock, (work, state));
        if !issue_now {
            self.queued.push_front(work.oblock);
        }
        *self.count(work.op) += 1;
        Ok(issue_now.then_some(work))
    }

    /// Issues the most recently queued item (`btracker_issue`), or None
    /// (`-ENODATA`).
    pub fn issue(&mut self) -> Option<PolicyWork> {
        let oblock = self.queued.pop_front()?;
        let item = self.pending.get_mut(&oblock).expect("queued item is pending");
        item.1 = State::Issued;
        Some(item.0)
    }

    /// Forgets a completed item (`btracker_complete`). Panics if `work` is
    /// not the item tracked for its oblock.
    pub fn complete(&mut self, work: &PolicyWork) {
        let (tracked, state) = self.pending.remove(&work.oblock).expect("completing untracked work");
        assert_eq!(&tracked, work, "completing work the tracker did not hand out");
        if state == State::Queued {
            self.queued.retain(|&o| o != work.oblock);
        }
        *self.count(work.op) -= 1;
    }

    /// Whether any item for `oblock` is queued or issued
    /// (`btracker_promotion_already_present`, despite its name).
    pub fn promotion_already_present(&self, oblock: u64) -> bool {
        self.pending.contains_key(&oblock)
    }

    /// Demotions queued or issued and not complete
    /// (`btracker_nr_demotions_queued`).
    pub fn nr_demotions_queued(&self) -> u32 {
        self.pending_demotes
    }

    /// Writebacks queued or issued and not complete.
    pub fn nr_writebacks_queued(&self) -> u32 {
        self.pending_writebacks
    }

    /// Promotions queued or issued and not complete.
    pub fn nr_promotions_queued(&self) -> u32 {
        self.pending_promotes
    }

    /// The queued items, next to issue first.
    pub fn queued(&self) -> impl Iterator<Item = PolicyWork> + '_ {
        self.queued.iter().map(|o| self.pending[o].0)
    }

    /// The issued, not yet completed items, by oblock.
    pub fn issued(&self) -> impl Iterator<Item = PolicyWork> + '_ {
        self.pending.values().filter(|(_, s)| *s == State::Issued).map(|(w, _)| *w)
    }

    /// Items tracked (queued and issued).
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(op: PolicyOp, oblock: u64) -> PolicyWork {
        PolicyWork { op, oblock, cblock: oblock as u32 }
    }

    #[test]
    fn queue_is_lifo_and_one_item_per_oblock() {
        let mut b = BackgroundTracker::new(10);
        b.queue(w(PolicyOp::Promote, 1), false).unwrap();
        b.queue(w(PolicyOp::Demote, 2), false).unwrap();
        assert_eq!(b.queue(w(PolicyOp::Writeback, 1), false), Err(Errno::EINVAL));
        assert_eq!(b.issue(), Some(w(PolicyOp::Demote, 2)));
        assert_eq!(b.nr_demotions_queued(), 1, "issued demotions still count");
        assert_eq!(b.issue(), Some(w(PolicyOp::Promote, 1)));
        assert_eq!(b.issue(), None);
        b.complete(&w(PolicyOp::Demote, 2));
        assert_eq!(b.nr_demotions_queued(), 0);
        assert!(b.promotion_already_present(1));
        assert!(!b.promotion_already_present(2));
    }

    #[test]
    fn capacity_counts_issued_items_and_pwork_skips_the_queue() {
        let mut b = BackgroundTracker::new(2);
        assert_eq!(b.queue(w(PolicyOp::Promote, 1), true), Ok(Some(w(PolicyOp::Promote, 1))));
        assert_eq!(b.issue(), None, "handed-back work is never queued");
        b.queue(w(PolicyOp::Writeback, 2), false).unwrap();
        assert_eq!(b.queue(w(PolicyOp::Writeback, 3), false), Err(Errno::ENOMEM));
        b.complete(&w(PolicyOp::Promote, 1));
        b.fail_next_allocs(1);
        assert_eq!(b.queue(w(PolicyOp::Writeback, 3), false), Err(Errno::ENOMEM));
        assert!(b.queue(w(PolicyOp::Writeback, 3), false).is_ok());
        assert_eq!(b.len(), 2);
    }
}
