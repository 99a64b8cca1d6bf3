//! smq's entry space: one array of entries addressed by 28-bit indexes,
//! intrusive doubly linked lists threaded through it, and the allocators
//! that partition it (dm-cache-policy-smq.c, `entry_space`, `ilist`,
//! `entry_alloc`).
//!
//! Every list operation here is the kernel's, including where a sentinel is
//! skipped and which end an entry is taken from, because the order of the
//! lists decides which block is promoted, demoted or written back next.

/// The null index (`INDEXER_NULL`, 2^28 − 1).
pub const NULL: u32 = (1 << 28) - 1;

/// One entry: a cache block's mapping, a hotspot block, or a sentinel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Next entry in the hash chain.
    pub hash_next: u32,
    /// Previous entry in the list the entry is on.
    pub prev: u32,
    /// Next entry in the list the entry is on.
    pub next: u32,
    /// The queue level (0..=63).
    pub level: u32,
    /// Whether the cache block is dirty (the entry is on the dirty queue).
    pub dirty: bool,
    /// Whether the entry is allocated.
    pub allocated: bool,
    /// Whether the entry is a sentinel.
    pub sentinel: bool,
    /// Whether background work on the entry is queued or in flight (the
    /// entry is then on no queue).
    pub pending_work: bool,
    /// The origin block (cache entries) or hotspot block (hotspot entries).
    pub oblock: u64,
}

impl Entry {
    /// An entry as `vzalloc` leaves it (all zero).
    const ZERO: Entry = Entry {
        hash_next: 0,
        prev: 0,
        next: 0,
        level: 0,
        dirty: false,
        allocated: false,
        sentinel: false,
        pending_work: false,
        oblock: 0,
    };
}

/// The entry array (`entry_space`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntrySpace {
    entries: Vec<Entry>,
}

impl EntrySpace {
    /// `nr_entries` zeroed entries.
    pub fn new(nr_entries: usize) -> Self {
        assert!(nr_entries < NULL as usize, "entry space beyond 28-bit indexes");
        EntrySpace { entries: vec![Entry::ZERO; nr_entries] }
    }

    /// Entry `i`.
    pub fn get(&self, i: u32) -> &Entry {
        &self.entries[i as usize]
    }

    /// Entry `i`, mutable.
    pub fn get_mut(&mut self, i: u32) -> &mut Entry {
        &mut self.entries[i as usize]
    }

    /// The index, or None for [`NULL`].
    fn to_entry(i: u32) -> Option<u32> {
        (i != NULL).then_some(i)
    }
}

/// An intrusive list of entries (`ilist`); `nr_elts` excludes sentinels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IList {
    /// Non-sentinel entries on the list.
    pub nr_elts: u32,
    /// First (oldest) entry.
    pub head: u32,
    /// Last (newest) entry.
    pub tail: u32,
}

impl Default for IList {
    fn default() -> Self {
        IList { nr_elts: 0, head: NULL, tail: NULL }
    }
}

impl IList {
    /// The first entry.
    pub fn head(&self) -> Option<u32> {
        EntrySpace::to_entry(self.head)
    }

    /// The last entry.
    pub fn tail(&self) -> Option<u32> {
        EntrySpace::to_entry(self.tail)
    }

    /// Whether the list has no entries at all (sentinels count).
    pub fn is_empty(&self) -> bool {
        self.head == NULL
    }

    /// The indexes on the list, head to tail (sentinels included).
    pub fn iter<'a>(&self, es: &'a EntrySpace) -> impl Iterator<Item = u32> + 'a {
        let mut cur = self.head();
        std::iter::from_fn(move || {
            let i = cur?;
            cur = next(es, i);
            Some(i)
        })
    }

    /// Adds `e` at the head (`l_add_head`).
    pub fn add_head(&mut self, es: &mut EntrySpace, e: u32) {
        let old = self.head;
        let ent = es.get_mut(e);
        ent.next = old;
        ent.prev = NULL;
        let sentinel = ent.sentinel;
        if old != NULL {
            es.get_mut(old).prev = e;
            self.head = e;
        } else {
            self.head = e;
            self.tail = e;
        }
        if !sentinel {
            self.nr_elts += 1;
        }
    }

    /// Adds `e` at the tail (`l_add_tail`).
    pub fn add_tail(&mut self, es: &mut EntrySpace, e: u32) {
        let old = self.tail;
        let ent = es.get_mut(e);
        ent.next = NULL;
        ent.prev = old;
        let sentinel = ent.sentinel;
        if old != NULL {
            es.get_mut(old).next = e;
            self.tail = e;
        } else {
            self.head = e;
            self.tail = e;
        }
        if !sentinel {
            self.nr_elts += 1;
        }
    }

    /// Adds `e` just before `old` (`l_add_before`).
    pub fn add_before(&mut self, es: &mut EntrySpace, old: u32, e: u32) {
        let prev = es.get(old).prev;
        if prev == NULL {
            self.add_head(es, e);
            return;
        }
        let ent = es.get_mut(e);
        ent.prev = prev;
        ent.next = old;
        let sentinel = ent.sentinel;
        es.get_mut(prev).next = e;
        es.get_mut(old).prev = e;
        if !sentinel {
            self.nr_elts += 1;
        }
    }

    /// Unlinks `e` (`l_del`).
    pub fn del(&mut self, es: &mut EntrySpace, e: u32) {
        let Entry { prev, next, sentinel, .. } = *es.get(e);
        if prev != NULL {
            es.get_mut(prev).next = next;
        } else {
            self.head = next;
        }
        if next != NULL {
            es.get_mut(next).prev = prev;
        } else {
            self.tail = prev;
        }
        if !sentinel {
            self.nr_elts -= 1;
        }
    }

    /// Removes and returns the first non-sentinel entry (`l_pop_head`).
    pub fn pop_head(&mut self, es: &mut EntrySpace) -> Option<u32> {
        let mut cur = self.head();
        while let Some(i) = cur {
            if !es.get(i).sentinel {
                self.del(es, i);
                return Some(i);
            }
            cur = next(es, i);
        }
        None
    }

    /// Removes and returns the last non-sentinel entry (`l_pop_tail`).
    pub fn pop_tail(&mut self, es: &mut EntrySpace) -> Option<u32> {
        let mut cur = self.tail();
        while let Some(i) = cur {
            if !es.get(i).sentinel {
                self.del(es, i);
                return Some(i);
            }
            cur = prev(es, i);
        }
        None
    }
}

/// The entry after `e` on its list.
pub fn next(es: &EntrySpace, e: u32) -> Option<u32> {
    EntrySpace::to_entry(es.get(e).next)
}

/// The entry before `e` on its list.
pub fn prev(es: &EntrySpace, e: u32) -> Option<u32> {
    EntrySpace::to_entry(es.get(e).prev)
}

/// An allocator over the index range `begin..end` (`entry_alloc`): a free
/// list built in index order; allocation takes the head, freeing appends at
/// the tail, so entries are reused first-freed first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryAlloc {
    /// First index of the range.
    pub begin: u32,
    /// Entries allocated.
    pub nr_allocated: u32,
    free: IList,
}

impl EntryAlloc {
    /// Every entry of `begin..end` free, in index order (`init_allocator`).
    pub fn new(es: &mut EntrySpace, begin: u32, end: u32) -> Self {
        let mut free = IList::default();
        for i in begin..end {
            free.add_tail(es, i);
        }
        EntryAlloc { begin, nr_allocated: 0, free }
    }

    /// Resets an entry as the kernel's `init_entry` does (new entries start
    /// dirty; the caller sets the real state).
    fn init_entry(es: &mut EntrySpace, i: u32) {
        let e = es.get_mut(i);
        e.hash_next = NULL;
        e.next = NULL;
        e.prev = NULL;
        e.level = 0;
        e.dirty = true;
        e.allocated = true;
        e.sentinel = false;
        e.pending_work = false;
    }

    /// Takes the first free entry (`alloc_entry`).
    pub fn alloc(&mut self, es: &mut EntrySpace) -> Option<u32> {
        if self.free.is_empty() {
            return None;
        }
        let i = self.free.pop_head(es)?;
        Self::init_entry(es, i);
        self.nr_allocated += 1;
        Some(i)
    }

    /// Takes the entry at offset `n` of the range, which must be free
    /// (`alloc_particular_entry`).
    pub fn alloc_particular(&mut self, es: &mut EntrySpace, n: u32) -> u32 {
        let i = self.begin + n;
        assert!(!es.get(i).allocated, "entry {n} is already allocated");
        self.free.del(es, i);
        Self::init_entry(es, i);
        self.nr_allocated += 1;
        i
    }

    /// Returns `i` to the tail of the free list (`free_entry`).
    pub fn free(&mut self, es: &mut EntrySpace, i: u32) {
        assert!(self.nr_allocated > 0 && es.get(i).allocated, "freeing a free entry");
        self.nr_allocated -= 1;
        es.get_mut(i).allocated = false;
        self.free.add_tail(es, i);
    }

    /// Whether no entry is free (`allocator_empty`).
    pub fn is_empty(&self) -> bool {
        self.free.is_empty()
    }

    /// The entry's offset in the range (`get_index`).
    pub fn index_of(&self, i: u32) -> u32 {
        i - self.begin
    }

    /// The entry index at offset `n` (`get_entry`).
    pub fn entry(&self, n: u32) -> u32 {
        self.begin + n
    }

    /// The free entries' indexes in allocation order.
    pub fn free_list<'a>(&self, es: &'a EntrySpace) -> impl Iterator<Item = u32> + 'a {
        self.free.iter(es)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_takes_the_head_and_frees_to_the_tail() {
        let mut es = EntrySpace::new(8);
        let mut a = EntryAlloc::new(&mut es, 2, 6);
        assert_eq!(a.alloc(&mut es), Some(2));
        assert_eq!(a.alloc(&mut es), Some(3));
        a.free(&mut es, 2);
        assert_eq!(a.free_list(&es).collect::<Vec<_>>(), vec![4, 5, 2]);
        assert_eq!(a.alloc_particular(&mut es, 3), 5);
        assert_eq!(a.free_list(&es).collect::<Vec<_>>(), vec![4, 2]);
        assert_eq!(a.nr_allocated, 2);
        assert!(es.get(5).dirty, "init_entry starts entries dirty");
    }

    #[test]
    fn pops_skip_sentinels() {
        let mut es = EntrySpace::new(4);
        es.get_mut(0).sentinel = true;
        es.get_mut(3).sentinel = true;
        let mut l = IList::default();
        for i in 0..4 {
            l.add_tail(&mut es, i);
        }
        assert_eq!(l.nr_elts, 2);
        assert_eq!(l.pop_head(&mut es), Some(1));
        assert_eq!(l.pop_tail(&mut es), Some(2));
        assert_eq!(l.pop_tail(&mut es), None);
        assert_eq!(l.iter(&es).collect::<Vec<_>>(), vec![0, 3]);
        l.add_before(&mut es, 3, 1);
        l.add_before(&mut es, 0, 2);
        assert_eq!(l.iter(&es).collect::<Vec<_>>(), vec![2, 0, 1, 3]);
    }
}
