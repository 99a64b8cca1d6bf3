//! The deferred set (`dm_deferred_set`), dm-thin's quiescing primitive
//! (spec §5.2).
//!
//! It answers one question: "has every I/O that was already in flight when I
//! queued this piece of work finished?" I/O takes a reference with
//! [`DeferredSet::inc`] when it is issued and drops it with
//! [`DeferredSet::dec`] on completion; work queued with
//! [`DeferredSet::add_work`] comes back out of the `dec` that retires the last
//! reference older than it. dm-thin keeps two per pool: `shared_read_ds`
//! (reads of shared blocks, which break-sharing mappings wait for) and
//! `all_io_ds` (all remapped non-discard I/O, which discards wait for).
//!
//! The structure is a ring of [`DEFERRED_SET_SIZE`] entries, each a count of
//! references and a list of work, with two cursors: `current`, the entry new
//! references and work join, and `sweeper`, the oldest entry not yet
//! drained. The model mirrors the 6.1 kernel step for step (the structure is
//! unchanged from 3.x to 6.x) because the order in which work is released
//! decides the order of metadata operations, and with it block placement.
//!
//! # Properties (all follow from the steps below)
//!
//! * `sweeper != current` implies `entries[sweeper].count > 0`: a sweep only
//!   stops short of `current` at a busy entry, and `add_work` only moves
//!   `current` away from a busy entry (when it is idle and equal to
//!   `sweeper`, nothing is in flight and the work is not queued at all).
//!   Hence "nothing in flight" (`sweeper == current` and its count is zero)
//!   is the same as "no outstanding references at all".
//! * Work added at time T is released only after every `inc` before T has
//!   been matched by its `dec`: those references sit in the work's entry or
//!   in older ones, and the sweep never passes a busy entry.
//! * While the ring has not wrapped, work is released by exactly the `dec`
//!   that retires the last reference older than it. Entries are never
//!   skipped, but an older entry only holds references older than the work
//!   anyway.
//! * Ring wrap: when the entry after `current` is still busy (64 generations
//!   of work are waiting behind one old reference), `current` stays put, so
//!   further work *and later references* join the same entry. That work then
//!   also waits for references taken after it was queued; there is no
//!   starvation guarantee.
//! * When the last outstanding reference is dropped, the sweep reaches
//!   `current` and releases everything: no work is ever stranded.
//!
//! # Release order
//!
//! The kernel queues work with `list_add` (at the head of the entry's list,
//! so each entry holds its work newest first) and the sweep moves each
//! entry's list with `list_splice_init` to the *front* of the caller's
//! (initially empty) output list, visiting entries from the oldest onwards.
//! The later entry therefore ends up in front, and the items released by one
//! `dec` come out in exact reverse order of their addition, newest first.
//! dm-thin's end-io handler consumes that list front to back (completing
//! mapping preparations, or appending discards to `prepared_discards`), so
//! the model returns it in that order.

use std::collections::VecDeque;

/// Number of entries in the ring (the kernel's `DEFERRED_SET_SIZE`).
pub const DEFERRED_SET_SIZE: usize = 64;

/// A reference taken by [`DeferredSet::inc`]: which ring entry it counts in.
/// The kernel hands out a pointer to the entry; this is its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeferredEntry(usize);

impl DeferredEntry {
    /// The ring index of the entry, for debugging and checks.
    pub fn index(self) -> usize {
        self.0
    }
}

/// Outcome of [`DeferredSet::add_work`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddWork<W> {
    /// Nothing was in flight: the work is handed back and the caller runs it
    /// now (the kernel returns 0 and dm-thin proceeds immediately).
    NothingInFlight(W),
    /// The work was queued; a later [`DeferredSet::dec`] returns it.
    Deferred,
}

/// One ring entry.
#[derive(Debug)]
struct Entry<W> {
    /// Outstanding references taken while this entry was `current`.
    count: u64,
    /// Queued work, newest at the front, as the kernel's `list_add` leaves it.
    work: VecDeque<W>,
}

/// The deferred set: a ring of entries {count, work} and the `current` and
/// `sweeper` cursors.
#[derive(Debug)]
pub struct DeferredSet<W> {
    entries: Vec<Entry<W>>,
    /// Entry that `inc` and `add_work` use.
    current: usize,
    /// Oldest entry not yet drained.
    sweeper: usize,
    /// The first broken precondition (a decrement of an idle entry).
    broken: Option<String>,
}

impl<W> Default for DeferredSet<W> {
    fn default() -> Self {
        Self::new()
    }
}

/// The ring successor of `index`.
fn ring_next(index: usize) -> usize {
    (index + 1) % DEFERRED_SET_SIZE
}

impl<W> DeferredSet<W> {
    /// An empty set: both cursors at entry 0, nothing in flight.
    pub fn new() -> Self {
        DeferredSet {
            entries: (0..DEFERRED_SET_SIZE).map(|_| Entry { count: 0, work: VecDeque::new() }).collect(),
            current: 0,
            sweeper: 0,
            broken: None,
        }
    }

    /// The first broken precondition, if any: a reference dropped that the
    /// entry does not hold (the kernel's `BUG_ON` in
    /// `dm_deferred_entry_dec`), kept rather than panicking, in every
    /// build.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Takes a reference in the current entry (`dm_deferred_entry_inc`). The
    /// caller keeps the returned handle and passes it to [`DeferredSet::dec`]
    /// when its I/O completes.
    pub fn inc(&mut self) -> DeferredEntry {
        self.entries[self.current].count += 1;
        DeferredEntry(self.current)
    }

    /// Drops a reference (`dm_deferred_entry_dec`), then sweeps; returns the
    /// released work, newest first (see the module docs for why that is the
    /// kernel's order).
    ///
    /// Dropping a reference the entry does not hold is a caller bug (the
    /// kernel's `BUG_ON`): it is recorded ([`Self::broken`]), the count
    /// stays at zero and the sweep still runs.
    pub fn dec(&mut self, entry: DeferredEntry) -> Vec<W> {
        let count = &mut self.entries[entry.0].count;
        if *count == 0 {
            if self.broken.is_none() {
                self.broken = Some(format!("deferred-set dec of idle entry {}", entry.0));
            }
        } else {
            *count -= 1;
        }
        let mut out = VecDeque::new();
        self.sweep(&mut out);
        out.into()
    }

    /// The kernel's `__sweep`: drain idle entries from `sweeper` up to (not
    /// past) `current`, then drain `current` itself if it is idle too. Each
    /// drained list goes to the front of `out`, as `list_splice_init` does.
    fn sweep(&mut self, out: &mut VecDeque<W>) {
        while self.sweeper != self.current && self.entries[self.sweeper].count == 0 {
            Self::splice_front(&mut self.entries[self.sweeper].work, out);
            self.sweeper = ring_next(self.sweeper);
        }
        if self.sweeper == self.current && self.entries[self.sweeper].count == 0 {
            Self::splice_front(&mut self.entries[self.sweeper].work, out);
        }
    }

    /// Moves all of `from` to the front of `to`, keeping `from`'s order.
    fn splice_front(from: &mut VecDeque<W>, to: &mut VecDeque<W>) {
        while let Some(item) = from.pop_back() {
            to.push_front(item);
        }
    }

    /// Queues `work` behind every reference taken so far
    /// (`dm_deferred_set_add_work`), or hands it back if nothing is in
    /// flight.
    ///
    /// Queued work goes to the front of the current entry's list, and
    /// `current` then advances unless the next entry is still busy (ring
    /// wrap; see the module docs), so that references taken from now on do
    /// not hold this work back.
    pub fn add_work(&mut self, work: W) -> AddWork<W> {
        if self.sweeper == self.current && self.entries[self.current].count == 0 {
            return AddWork::NothingInFlight(work);
        }
        self.entries[self.current].work.push_front(work);
        let next = ring_next(self.current);
        if self.entries[next].count == 0 {
            self.current = next;
        }
        AddWork::Deferred
    }

    /// Total outstanding references, for invariant checks.
    pub fn in_flight(&self) -> u64 {
        self.entries.iter().map(|e| e.count).sum()
    }

    /// Number of queued work items not yet released, for invariant checks.
    pub fn pending_work(&self) -> usize {
        self.entries.iter().map(|e| e.work.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn add_work_with_nothing_in_flight_runs_now() {
        let mut ds = DeferredSet::new();
        assert_eq!(ds.add_work("a"), AddWork::NothingInFlight("a"));
        let e = ds.inc();
        assert_eq!(ds.dec(e), Vec::<&str>::new());
        assert_eq!(ds.add_work("b"), AddWork::NothingInFlight("b"));
        assert_eq!(ds.in_flight(), 0);
        assert_eq!(ds.pending_work(), 0);
    }

    #[test]
    fn work_waits_for_earlier_references_only() {
        let mut ds = DeferredSet::new();
        let a = ds.inc();
        let b = ds.inc();
        assert_eq!(ds.add_work(1), AddWork::Deferred);
        // A reference taken after the work does not hold it back.
        let c = ds.inc();
        assert_ne!(c, a);
        assert_eq!(ds.dec(a), Vec::<i32>::new());
        assert_eq!(ds.dec(b), vec![1]);
        assert_eq!(ds.in_flight(), 1);
        assert_eq!(ds.add_work(2), AddWork::Deferred);
        assert_eq!(ds.dec(c), vec![2]);
        assert_eq!(ds.add_work(3), AddWork::NothingInFlight(3));
    }

    #[test]
    fn one_sweep_releases_newest_first() {
        let mut ds = DeferredSet::new();
        let a = ds.inc();
        for w in 0..3 {
            assert_eq!(ds.add_work(w), AddWork::Deferred);
        }
        // Each add advanced `current`: the work sits in entries 0, 1 and 2.
        assert_eq!(ds.inc().index(), 3);
        let later = DeferredEntry(3);
        assert_eq!(ds.dec(a), vec![2, 1, 0]);
        assert_eq!(ds.add_work(3), AddWork::Deferred);
        assert_eq!(ds.add_work(4), AddWork::Deferred);
        assert_eq!(ds.dec(later), vec![4, 3]);
    }

    #[test]
    fn a_younger_entry_drains_only_behind_older_ones() {
        let mut ds = DeferredSet::new();
        let a = ds.inc();
        assert_eq!(ds.add_work("after a"), AddWork::Deferred);
        let b = ds.inc();
        assert_eq!(ds.add_work("after b"), AddWork::Deferred);
        // b's entry is idle, but the sweeper is stuck at a's.
        assert_eq!(ds.dec(b), Vec::<&str>::new());
        assert_eq!(ds.pending_work(), 2);
        assert_eq!(ds.dec(a), vec!["after b", "after a"]);
    }

    #[test]
    fn a_full_ring_stops_current_and_later_references_join_it() {
        let mut ds = DeferredSet::new();
        let old = ds.inc();
        assert_eq!(old.index(), 0);
        // 63 adds walk `current` from entry 0 to entry 63.
        for w in 0..63 {
            assert_eq!(ds.add_work(w), AddWork::Deferred);
        }
        // The entry after 63 is 0, still busy: `current` stays at 63 from now on.
        assert_eq!(ds.add_work(63), AddWork::Deferred);
        assert_eq!(ds.add_work(64), AddWork::Deferred);
        let young = ds.inc();
        assert_eq!(young.index(), 63);
        // Retiring the old reference drains entries 0..=62 (newest first); the
        // work in entry 63 now also waits for the reference taken after it.
        let first: Vec<i32> = (0..63).rev().collect();
        assert_eq!(ds.dec(old), first);
        assert_eq!(ds.pending_work(), 2);
        // Entry 0 is idle again, so this add finally moves `current` on, round
        // the ring to entry 0.
        assert_eq!(ds.add_work(65), AddWork::Deferred);
        assert_eq!(ds.inc().index(), 0);
        let wrapped = DeferredEntry(0);
        // Within one entry, newest first too.
        assert_eq!(ds.dec(young), vec![65, 64, 63]);
        assert_eq!(ds.pending_work(), 0);
        assert_eq!(ds.add_work(66), AddWork::Deferred);
        assert_eq!(ds.inc().index(), 1);
        assert_eq!(ds.dec(wrapped), vec![66]);
        assert_eq!(ds.in_flight(), 1);
    }

    #[test]
    fn dec_of_an_idle_entry_is_a_recorded_bug() {
        let mut ds = DeferredSet::<u8>::new();
        let e = ds.inc();
        ds.dec(e);
        assert_eq!(ds.broken(), None);
        // In every build: recorded, and the count stays at zero.
        assert_eq!(ds.dec(e), Vec::<u8>::new());
        assert_eq!(ds.in_flight(), 0);
        assert_eq!(ds.broken(), Some("deferred-set dec of idle entry 0"));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Inc,
        /// Drop the outstanding reference at this position (modulo).
        Dec(usize),
        AddWork,
    }

    fn ops(max_len: usize) -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![3 => Just(Op::Inc), 3 => any::<usize>().prop_map(Op::Dec), 2 => Just(Op::AddWork)],
            0..max_len,
        )
    }

    /// The reference: outstanding references as (token, entry), and for each
    /// queued work item the tokens that were outstanding when it was added.
    #[derive(Default)]
    struct Reference {
        outstanding: Vec<(u64, DeferredEntry)>,
        next_token: u64,
        /// (work seq, tokens outstanding when added)
        waiting: Vec<(u64, Vec<u64>)>,
        next_seq: u64,
        released: Vec<u64>,
    }

    /// Runs `ops` against both; `exact` also demands that work comes out at
    /// the first moment its older references are all gone (true while the
    /// ring never wraps).
    fn check(ops: Vec<Op>, exact: bool) -> Result<(), TestCaseError> {
        let mut ds = DeferredSet::new();
        let mut r = Reference::default();
        let apply_dec = |ds: &mut DeferredSet<u64>, r: &mut Reference, at: usize| {
            let (token, entry) = r.outstanding.remove(at);
            let out = ds.dec(entry);
            for (_, tokens) in r.waiting.iter_mut() {
                tokens.retain(|&t| t != token);
            }
            // Newest first within one release.
            prop_assert!(out.windows(2).all(|w| w[0] > w[1]), "not newest first: {:?}", out);
            for seq in &out {
                let at = r.waiting.iter().position(|(s, _)| s == seq);
                let Some(at) = at else {
                    return Err(TestCaseError::fail(format!("work {seq} released twice or never added")));
                };
                let (_, tokens) = r.waiting.remove(at);
                // Safety: every reference older than the work has been dropped.
                prop_assert!(tokens.is_empty(), "work {} released with {:?} outstanding", seq, tokens);
            }
            if exact {
                let ready: Vec<u64> =
                    r.waiting.iter().filter(|(_, t)| t.is_empty()).map(|(s, _)| *s).collect();
                prop_assert!(ready.is_empty(), "work {:?} should have been released", ready);
            }
            // Liveness: nothing is stranded once all references are gone.
            if r.outstanding.is_empty() {
                prop_assert_eq!(ds.pending_work(), 0);
            }
            r.released.extend(out);
            Ok(())
        };

        for op in ops {
            match op {
                Op::Inc => {
                    let entry = ds.inc();
                    r.outstanding.push((r.next_token, entry));
                    r.next_token += 1;
                }
                Op::Dec(pick) => {
                    if !r.outstanding.is_empty() {
                        let at = pick % r.outstanding.len();
                        apply_dec(&mut ds, &mut r, at)?;
                    }
                }
                Op::AddWork => {
                    let seq = r.next_seq;
                    r.next_seq += 1;
                    match ds.add_work(seq) {
                        AddWork::NothingInFlight(w) => {
                            prop_assert_eq!(w, seq);
                            prop_assert!(r.outstanding.is_empty());
                            r.released.push(seq);
                        }
                        AddWork::Deferred => {
                            prop_assert!(!r.outstanding.is_empty());
                            let tokens = r.outstanding.iter().map(|(t, _)| *t).collect();
                            r.waiting.push((seq, tokens));
                        }
                    }
                }
            }
            prop_assert_eq!(ds.in_flight(), r.outstanding.len() as u64);
            prop_assert_eq!(ds.pending_work(), r.waiting.len());
        }

        // Drain: every work item comes out exactly once.
        while !r.outstanding.is_empty() {
            apply_dec(&mut ds, &mut r, 0)?;
        }
        prop_assert!(r.waiting.is_empty());
        r.released.sort_unstable();
        prop_assert_eq!(r.released, (0..r.next_seq).collect::<Vec<_>>());
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Long runs with few references and many adds make the ring wrap.
        #[test]
        fn work_runs_only_after_every_earlier_reference(ops in ops(600)) {
            check(ops, false)?;
        }

        /// Fewer than 63 adds can never make the ring wrap, so release timing is exact.
        #[test]
        fn without_wrap_work_runs_as_soon_as_earlier_references_are_gone(ops in ops(100)) {
            let adds = ops.iter().filter(|o| matches!(o, Op::AddWork)).count();
            prop_assume!(adds <= 62);
            check(ops, true)?;
        }

        /// One reference held across more than 64 adds: the ring always wraps.
        #[test]
        fn a_pinned_old_reference_with_many_adds(tail in ops(300)) {
            let mut ops = vec![Op::Inc];
            ops.extend((0..70).map(|_| Op::AddWork));
            ops.extend(tail);
            check(ops, false)?;
        }
    }
}
