//! A device's sectors as runs of equal state.
//!
//! A write, a discard or a device creation puts the same value into every
//! sector it covers, so neighbouring sectors mostly have equal states: the
//! oracle keeps one state per run of equal sectors and splits a run only
//! where an event treats its sectors differently. Its cost then follows
//! the number of runs an event touches, not the device's size in sectors.

use std::collections::BTreeMap;
use std::ops::Range;

/// `len` values indexed by sector, stored as runs: each run starts at a
/// key of `starts` and lasts to the next key (or `len`). Neighbouring runs
/// may hold equal values (a run is split before an update and merged back
/// with its neighbours after it, [`Runs::update`]); what a sector holds
/// never depends on where the runs fall.
#[derive(Debug, Clone)]
pub(super) struct Runs<T> {
    /// Run start → the value of every sector of the run. Holds the key 0
    /// whenever `len > 0`, and no key at or beyond `len`.
    starts: BTreeMap<u64, T>,
    len: u64,
}

impl<T: Clone + PartialEq> Runs<T> {
    /// `len` sectors, all holding `value`.
    pub(super) fn new(len: u64, value: T) -> Self {
        let mut starts = BTreeMap::new();
        if len > 0 {
            starts.insert(0, value);
        }
        Runs { starts, len }
    }

    /// `len` sectors from runs given by their starts, in increasing order
    /// from 0 (what [`Runs::iter_range`] gives, shifted to start at 0).
    pub(super) fn from_runs(len: u64, runs: impl IntoIterator<Item = (u64, T)>) -> Self {
        let starts: BTreeMap<u64, T> = runs.into_iter().filter(|(s, _)| *s < len).collect();
        debug_assert!(len == 0 || starts.contains_key(&0), "runs start at 0");
        Runs { starts, len }
    }

    /// The number of sectors.
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// The number of runs (at least the number of distinct neighbours).
    #[cfg(test)]
    pub(super) fn runs(&self) -> usize {
        self.starts.len()
    }

    /// The value of sector `i`, if there is one.
    pub(super) fn get(&self, i: u64) -> Option<&T> {
        if i >= self.len {
            return None;
        }
        self.starts.range(..=i).next_back().map(|(_, v)| v)
    }

    /// Grows to `len` sectors, the new ones holding `value` (nothing if
    /// there are that many already).
    pub(super) fn grow(&mut self, len: u64, value: T) {
        if len <= self.len {
            return;
        }
        let at = self.len;
        self.starts.insert(at, value);
        self.len = len;
        self.coalesce(at..at);
    }

    /// The same sectors, each value mapped by `f` (once per run).
    pub(super) fn map<U>(&self, mut f: impl FnMut(&T) -> U) -> Runs<U> {
        Runs { starts: self.starts.iter().map(|(&s, v)| (s, f(v))).collect(), len: self.len }
    }

    /// The runs that overlap `r` (clipped to it and to the device), in
    /// order, with the sectors of each.
    pub(super) fn iter_range(&self, r: Range<u64>) -> impl Iterator<Item = (Range<u64>, &T)> + '_ {
        let end = r.end.min(self.len);
        let first = self.starts.range(..=r.start).next_back().map_or(r.start, |(&s, _)| s);
        let stop = if r.start < end { end } else { first };
        let mut runs = self.starts.range(first..stop).peekable();
        std::iter::from_fn(move || {
            let (&s, v) = runs.next()?;
            let next = runs.peek().map_or(end, |(&n, _)| n);
            Some((s.max(r.start)..next.min(end), v))
        })
    }

    /// Every run, in order, with its sectors.
    pub(super) fn iter(&self) -> impl Iterator<Item = (Range<u64>, &T)> + '_ {
        self.iter_range(0..self.len)
    }

    /// Makes a run start at `at` (splitting the run holding it).
    fn split(&mut self, at: u64) {
        if at == 0 || at >= self.len || self.starts.contains_key(&at) {
            return;
        }
        let value = self.starts.range(..at).next_back().expect("a run starts at 0").1.clone();
        self.starts.insert(at, value);
    }

    /// Calls `f` on each run of the sectors `r` (clipped to the device),
    /// split first so that `f` changes only those sectors. Leaves the
    /// split runs split: [`Runs::coalesce`] merges them back.
    pub(super) fn apply(&mut self, r: Range<u64>, mut f: impl FnMut(Range<u64>, &mut T)) {
        let end = r.end.min(self.len);
        if r.start >= end {
            return;
        }
        self.split(r.start);
        self.split(end);
        let mut runs = self.starts.range_mut(r.start..end).peekable();
        while let Some((&start, value)) = runs.next() {
            let stop = runs.peek().map_or(end, |(&s, _)| s);
            f(start..stop, value);
        }
    }

    /// [`Runs::apply`], then the runs of `r` merged with equal neighbours.
    pub(super) fn update(&mut self, r: Range<u64>, f: impl FnMut(Range<u64>, &mut T)) {
        self.apply(r.clone(), f);
        self.coalesce(r);
    }

    /// Merges every run starting in `r.start..=r.end` into the run before
    /// it when their values are equal.
    pub(super) fn coalesce(&mut self, r: Range<u64>) {
        let mut from = r.start.max(1);
        while from <= r.end {
            let Some((&s, value)) = self.starts.range(from..=r.end).next() else { break };
            let (_, before) = self.starts.range(..s).next_back().expect("a run starts at 0");
            if before == value {
                self.starts.remove(&s);
            }
            from = s + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flat(runs: &Runs<u32>) -> Vec<u32> {
        let mut out = Vec::new();
        for (r, v) in runs.iter() {
            out.extend(r.map(|_| *v));
        }
        out
    }

    #[test]
    fn updates_split_and_merge_back() {
        let mut runs = Runs::new(16, 0u32);
        runs.update(4..8, |_, v| *v = 1);
        assert_eq!(runs.runs(), 3);
        assert_eq!(flat(&runs), [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        runs.update(4..8, |_, v| *v = 0);
        assert_eq!(runs.runs(), 1, "equal neighbours merge");
        runs.update(10..40, |_, v| *v = 2);
        assert_eq!(runs.len(), 16, "clipped to the device");
        assert_eq!(runs.get(15), Some(&2));
        assert_eq!(runs.get(16), None);
        runs.grow(20, 2);
        assert_eq!(runs.runs(), 2, "a grown tail equal to the last run merges with it");
        assert_eq!(
            runs.iter_range(8..12).map(|(r, v)| (r, *v)).collect::<Vec<_>>(),
            [(8..10, 0), (10..12, 2)]
        );
        assert_eq!(runs.iter_range(12..12).count(), 0);
        let shifted = runs.iter_range(8..12).map(|(r, v)| (r.start - 8, *v));
        assert_eq!(flat(&Runs::from_runs(4, shifted)), [0, 0, 2, 2]);
    }

    proptest! {
        /// Runs read as the plain vector they stand for, whatever the
        /// updates, and merged runs never differ from a split of them.
        #[test]
        fn runs_read_as_a_vector(
            len in 0u64..64,
            updates in proptest::collection::vec((0u64..70, 0u64..70, 0u32..3, any::<bool>()), 0..40),
        ) {
            let mut runs = Runs::new(len, 0u32);
            let mut plain = vec![0u32; len as usize];
            for (a, b, value, merge) in updates {
                let (a, b) = (a.min(b), a.max(b));
                let f = |r: Range<u64>, v: &mut u32| {
                    assert!(r.start >= a && r.end <= b && r.start < r.end);
                    *v = (*v + value) % 3;
                };
                if merge { runs.update(a..b, f) } else { runs.apply(a..b, f) }
                for x in plain.iter_mut().take(b.min(len) as usize).skip(a as usize) {
                    *x = (*x + value) % 3;
                }
                prop_assert_eq!(flat(&runs), plain.clone());
                for (i, x) in plain.iter().enumerate() {
                    prop_assert_eq!(runs.get(i as u64), Some(x));
                }
                let (c, d) = (a.min(len), b.min(len));
                let got: Vec<u32> = runs.iter_range(c..d).flat_map(|(r, v)| r.map(move |_| *v)).collect();
                prop_assert_eq!(&got[..], &plain[c as usize..d as usize]);
            }
            runs.coalesce(0..len);
            let mut distinct = plain.clone();
            distinct.dedup();
            prop_assert_eq!(runs.runs(), distinct.len(), "after a full merge, one run per value change");
        }
    }
}
