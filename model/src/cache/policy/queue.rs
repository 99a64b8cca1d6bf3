//! smq's multilevel queue (`struct queue`): an array of LRU lists, one per
//! level, head = oldest. Entries move up a level when used; redistribution
//! keeps each level near a target count.

use super::entry::{next, EntrySpace, IList};

/// The most levels a queue has (`MAX_LEVELS`).
pub const MAX_LEVELS: u32 = 64;

/// A multilevel queue over an [`EntrySpace`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    /// Non-sentinel entries on the queue.
    pub nr_elts: u32,
    /// Levels in use.
    pub nr_levels: u32,
    qs: Vec<IList>,
    last_target_nr_elts: u32,
    /// Levels at the top that share `nr_in_top_levels` entries.
    pub nr_top_levels: u32,
    /// Entries the top levels should hold.
    pub nr_in_top_levels: u32,
    target_count: Vec<u32>,
}

fn safe_div(n: u32, d: u32) -> u32 {
    n.checked_div(d).unwrap_or(0)
}

fn safe_mod(n: u32, d: u32) -> u32 {
    n.checked_rem(d).unwrap_or(0)
}

impl Queue {
    /// An empty queue of `nr_levels` levels (`q_init`).
    pub fn new(nr_levels: u32) -> Self {
        assert!(nr_levels <= MAX_LEVELS);
        Queue {
            nr_elts: 0,
            nr_levels,
            qs: vec![IList::default(); nr_levels as usize],
            last_target_nr_elts: 0,
            nr_top_levels: 0,
            nr_in_top_levels: 0,
            target_count: vec![0; nr_levels as usize],
        }
    }

    /// Non-sentinel entries (`q_size`).
    pub fn size(&self) -> u32 {
        self.nr_elts
    }

    /// Level `level`'s list.
    pub fn level(&self, level: u32) -> &IList {
        &self.qs[level as usize]
    }

    fn list(&mut self, es: &EntrySpace, e: u32) -> &mut IList {
        &mut self.qs[es.get(e).level as usize]
    }

    /// Appends `e` to the tail of its level (`q_push`).
    pub fn push(&mut self, es: &mut EntrySpace, e: u32) {
        assert!(!es.get(e).pending_work, "queueing an entry with pending work");
        if !es.get(e).sentinel {
            self.nr_elts += 1;
        }
        self.list(es, e).add_tail(es, e);
    }

    /// Inserts `e` at the head of its level (`q_push_front`).
    pub fn push_front(&mut self, es: &mut EntrySpace, e: u32) {
        assert!(!es.get(e).pending_work, "queueing an entry with pending work");
        if !es.get(e).sentinel {
            self.nr_elts += 1;
        }
        self.list(es, e).add_head(es, e);
    }

    /// Inserts `e` before `old` in `e`'s level (`q_push_before`).
    pub fn push_before(&mut self, es: &mut EntrySpace, old: u32, e: u32) {
        assert!(!es.get(e).pending_work, "queueing an entry with pending work");
        if !es.get(e).sentinel {
            self.nr_elts += 1;
        }
        self.list(es, e).add_before(es, old, e);
    }

    /// Unlinks `e` (`q_del`).
    pub fn del(&mut self, es: &mut EntrySpace, e: u32) {
        self.list(es, e).del(es, e);
        if !es.get(e).sentinel {
            self.nr_elts -= 1;
        }
    }

    /// The oldest entry of the lowest populated level below `max_level`
    /// (`q_peek`); a sentinel ends the search of its level unless
    /// `can_cross_sentinel`.
    pub fn peek(&self, es: &EntrySpace, max_level: u32, can_cross_sentinel: bool) -> Option<u32> {
        let max_level = max_level.min(self.nr_levels);
        for level in 0..max_level {
            let mut cur = self.qs[level as usize].head();
            while let Some(e) = cur {
                if !es.get(e).sentinel {
                    return Some(e);
                }
                if !can_cross_sentinel {
                    break;
                }
                cur = next(es, e);
            }
        }
        None
    }

    /// Removes the oldest entry of the lowest populated level, crossing
    /// sentinels (`q_pop`).
    pub fn pop(&mut self, es: &mut EntrySpace) -> Option<u32> {
        let e = self.peek(es, self.nr_levels, true)?;
        self.del(es, e);
        Some(e)
    }

    /// The first non-sentinel entry of the lowest level from `level` up,
    /// unlinked without changing `nr_elts` (`__redist_pop_from`).
    fn redist_pop_from(&mut self, es: &mut EntrySpace, level: u32) -> Option<u32> {
        for l in level..self.nr_levels {
            let mut cur = self.qs[l as usize].head();
            while let Some(e) = cur {
                if !es.get(e).sentinel {
                    self.qs[l as usize].del(es, e);
                    return Some(e);
                }
                cur = next(es, e);
            }
        }
        None
    }

    fn set_targets_subrange(&mut self, nr_elts: u32, lbegin: u32, lend: u32) {
        let nr_levels = lend - lbegin;
        let per_level = safe_div(nr_elts, nr_levels);
        let remainder = safe_mod(nr_elts, nr_levels);
        for level in lbegin..lend {
            self.target_count[level as usize] =
                if level < lbegin + remainder { per_level + 1 } else { per_level };
        }
    }

    /// Recomputes the target counts when the size changed (`q_set_targets`).
    fn set_targets(&mut self) {
        if self.last_target_nr_elts == self.nr_elts {
            return;
        }
        self.last_target_nr_elts = self.nr_elts;
        if self.nr_top_levels > self.nr_levels {
            self.set_targets_subrange(self.nr_elts, 0, self.nr_levels);
        } else {
            let split = self.nr_levels - self.nr_top_levels;
            self.set_targets_subrange(self.nr_in_top_levels, split, self.nr_levels);
            let rest = self.nr_elts.saturating_sub(self.nr_in_top_levels);
            self.set_targets_subrange(rest, 0, split);
        }
    }

    /// The target count of each level (as last computed).
    pub fn target_counts(&self) -> &[u32] {
        &self.target_count
    }

    /// Moves entries between adjacent levels until each level below the top
    /// holds its target count (`q_redistribute`): pulls the oldest entries
    /// down from above, pushes the newest up to the tail of the next level.
    pub fn redistribute(&mut self, es: &mut EntrySpace) {
        self.set_targets();
        for level in 0..self.nr_levels.saturating_sub(1) {
            let target = self.target_count[level as usize];
            while self.qs[level as usize].nr_elts < target {
                let Some(e) = self.redist_pop_from(es, level + 1) else { break };
                es.get_mut(e).level = level;
                self.qs[level as usize].add_tail(es, e);
            }
            while self.qs[level as usize].nr_elts > target {
                let Some(e) = self.qs[level as usize].pop_tail(es) else { break };
                es.get_mut(e).level = level + 1;
                self.qs[level as usize + 1].add_tail(es, e);
            }
        }
    }

    /// Moves `e` to the tail of the level `extra_levels` higher (capped at
    /// the top), swapping the first non-sentinel entry of that level down to
    /// `e`'s old level (`q_requeue`). For the dirty queue `s1`/`s2` are the
    /// old and current writeback sentinels of `e`'s old level: the swapped
    /// entry goes before `s1` if no sentinel preceded it, before `s2` if one
    /// did, else to the tail.
    pub fn requeue(&mut self, es: &mut EntrySpace, e: u32, extra_levels: u32, s: Option<(u32, u32)>) {
        let level = es.get(e).level;
        let new_level = (self.nr_levels - 1).min(level + extra_levels);
        if extra_levels > 0 && level < self.nr_levels - 1 {
            let mut sentinels_passed = 0;
            let mut cur = self.qs[new_level as usize].head();
            while let Some(d) = cur {
                if !es.get(d).sentinel {
                    break;
                }
                sentinels_passed += 1;
                cur = next(es, d);
            }
            if let Some(de) = cur {
                self.del(es, de);
                es.get_mut(de).level = level;
                match (s, sentinels_passed) {
                    (Some((s1, _)), 0) => self.push_before(es, s1, de),
                    (Some((_, s2)), 1) => self.push_before(es, s2, de),
                    _ => self.push(es, de),
                }
            }
        }
        self.del(es, e);
        es.get_mut(e).level = new_level;
        self.push(es, e);
    }

    /// The entries of every level, lowest level first, each head to tail
    /// (sentinels included).
    pub fn entries<'a>(&'a self, es: &'a EntrySpace) -> impl Iterator<Item = u32> + 'a {
        self.qs.iter().flat_map(move |l| l.iter(es))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::entry::EntryAlloc;

    fn setup(n: u32, levels: u32) -> (EntrySpace, EntryAlloc, Queue) {
        let mut es = EntrySpace::new(n as usize);
        let a = EntryAlloc::new(&mut es, 0, n);
        (es, a, Queue::new(levels))
    }

    #[test]
    fn peek_takes_the_oldest_of_the_lowest_level() {
        let (mut es, mut a, mut q) = setup(8, 4);
        for lvl in [2, 1, 1, 3] {
            let e = a.alloc(&mut es).unwrap();
            es.get_mut(e).pending_work = false;
            es.get_mut(e).level = lvl;
            q.push(&mut es, e);
        }
        assert_eq!(q.peek(&es, 4, true), Some(1));
        assert_eq!(q.peek(&es, 1, true), None);
        assert_eq!(q.pop(&mut es), Some(1));
        assert_eq!(q.pop(&mut es), Some(2));
        assert_eq!(q.pop(&mut es), Some(0));
        assert_eq!(q.size(), 1);
    }

    #[test]
    fn sentinel_blocks_peek_unless_crossing() {
        let (mut es, mut a, mut q) = setup(4, 2);
        let s = a.alloc(&mut es).unwrap();
        es.get_mut(s).sentinel = true;
        q.push(&mut es, s);
        let e = a.alloc(&mut es).unwrap();
        q.push(&mut es, e);
        assert_eq!(q.peek(&es, 2, false), None);
        assert_eq!(q.peek(&es, 2, true), Some(e));
        assert_eq!(q.size(), 1);
    }

    #[test]
    fn redistribute_fills_levels_to_their_targets() {
        let (mut es, mut a, mut q) = setup(10, 4);
        q.nr_top_levels = 1;
        q.nr_in_top_levels = 1;
        for _ in 0..10 {
            let e = a.alloc(&mut es).unwrap();
            q.push(&mut es, e);
        }
        q.redistribute(&mut es);
        // 1 at the top, 9 over levels 0..3: 3 each.
        assert_eq!(q.target_counts(), &[3, 3, 3, 1]);
        let counts: Vec<u32> = (0..4).map(|l| q.level(l).nr_elts).collect();
        assert_eq!(counts, vec![3, 3, 3, 1]);
        // The oldest stay low; the surplus is popped from the tail and
        // appended above, which reverses it level by level.
        assert_eq!(q.level(0).iter(&es).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(q.level(1).iter(&es).collect::<Vec<_>>(), vec![9, 8, 7]);
        assert_eq!(q.level(2).iter(&es).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(q.level(3).iter(&es).collect::<Vec<_>>(), vec![6]);
    }

    #[test]
    fn requeue_swaps_with_the_first_entry_above() {
        let (mut es, mut a, mut q) = setup(4, 4);
        let lo = a.alloc(&mut es).unwrap();
        let hi = a.alloc(&mut es).unwrap();
        es.get_mut(hi).level = 1;
        q.push(&mut es, lo);
        q.push(&mut es, hi);
        q.requeue(&mut es, lo, 1, None);
        assert_eq!(es.get(lo).level, 1);
        assert_eq!(es.get(hi).level, 0);
        assert_eq!(q.size(), 2);
    }

    #[test]
    fn requeue_places_the_swapped_entry_by_sentinels_passed() {
        // Level 0 holds [e, s1, s2]; level 1 holds `above` then d. The first
        // non-sentinel entry of level 1 swaps down: before s1 if no sentinel
        // preceded it, before s2 after one, at the tail after two.
        for nr_sentinels_above in 0..3u32 {
            let (mut es, mut a, mut q) = setup(8, 2);
            let mut add = |es: &mut EntrySpace, q: &mut Queue, sentinel: bool, level: u32| {
                let i = a.alloc(es).unwrap();
                es.get_mut(i).sentinel = sentinel;
                es.get_mut(i).level = level;
                q.push(es, i);
                i
            };
            let e = add(&mut es, &mut q, false, 0);
            let s1 = add(&mut es, &mut q, true, 0);
            let s2 = add(&mut es, &mut q, true, 0);
            for _ in 0..nr_sentinels_above {
                add(&mut es, &mut q, true, 1);
            }
            let d = add(&mut es, &mut q, false, 1);
            q.requeue(&mut es, e, 1, Some((s1, s2)));
            let level0: Vec<u32> = q.level(0).iter(&es).collect();
            let want = match nr_sentinels_above {
                0 => vec![d, s1, s2],
                1 => vec![s1, d, s2],
                _ => vec![s1, s2, d],
            };
            assert_eq!(level0, want);
            assert_eq!((es.get(e).level, es.get(d).level), (1, 0));
            assert_eq!(q.level(1).tail(), Some(e));
            assert_eq!(q.size(), 2);
        }
    }
}
