//! The bio prison (version 1), which dm-thin uses to serialise bios that touch
//! the same virtual or data blocks (spec §5.1).
//!
//! A *cell* is identified by a [`CellKey`]; the first bio to claim a key
//! becomes the cell's holder and every later bio whose key collides queues
//! behind it, first in first out, until the owner releases the cell. Cells
//! exist only between the first detain and their release; there is no other
//! way for a cell to disappear.
//!
//! This is a plain data structure: the pool keeps it inside a
//! [`crate::sync::Mutex`], which plays the part of the kernel's prison
//! spinlock, so every method here is one atomic step with respect to the
//! other threads of the model. 6.1 has exactly one such lock per pool; the
//! per-region locks of 6.4 (spec §5.7) do not change cell semantics.
//!
//! # Keys and collisions
//!
//! Keys order by `virtual_key` (data-block keys first), then by device id,
//! then by block range, and two keys *collide* when they agree on the first
//! two and their ranges overlap. Data-block ("physical") keys carry the id of
//! the thin device that built them, exactly as in the kernel: two thin
//! devices never contend for the same data-block cell even when they map the
//! same (shared) data block. The model must not "fix" that; the spec relies on
//! it (§5.5: reads from other devices keep going to the old block while one
//! device breaks sharing).
//!
//! # Invariant: live cells never collide with each other
//!
//! A cell is created only by [`BioPrison::detain`], and only when no live
//! cell collides with its key; keys never change afterwards. By induction,
//! live cells are pairwise non-colliding at all times. Within one
//! (`virtual_key`, `dev`) class they are therefore disjoint intervals, sorted
//! consistently by their start. That is also what makes the kernel's rb-tree
//! search sound: at a node whose range lies entirely after the query, every
//! cell the query could overlap lies to the left, and symmetrically, so the
//! search finds a colliding cell whenever one exists.
//!
//! A new *range* key may still overlap several live cells at once (a discard
//! range over blocks that are each held by a single-block cell). The kernel
//! then returns whichever colliding cell its root-to-leaf path meets first,
//! which depends on the rb-tree's shape. This model picks the colliding cell
//! with the lowest key, deterministically. dm-thin's callers only use the
//! answer "held or not" plus the bio's queuing, so which of several cells
//! the bio waits in is the one visible difference: it is released when *that*
//! cell is released.
//!
//! Empty ranges (`block_begin == block_end`) are not supported: the
//! kernel's comparison is not a consistent order for them, and dm-thin never
//! builds one (a discard smaller than a block is completed before any
//! detain). `detain` checks this (see below).
//!
//! # Handles
//!
//! A [`CellId`] is the model's stand-in for the kernel's cell pointer. Ids come
//! from a counter and are never reused within one prison, so a handle kept
//! after its cell was released is recognisably stale rather than silently
//! naming a newer cell (the kernel would reuse the freed memory).
//!
//! Contract for stale handles: the read-only queries ([`BioPrison::key`],
//! [`BioPrison::holder`], [`BioPrison::holder_mut`], [`BioPrison::contains`])
//! answer `None`/`false`, because asking is legitimate. The operations that
//! change a cell ([`BioPrison::take_holder`] and the three releases) treat a
//! stale handle as a caller bug: the kernel equivalent is an `rb_erase` of a
//! node that is no longer in the tree, i.e. memory corruption. They do
//! nothing, return an empty result and record the bug.
//!
//! # Broken preconditions are recorded, in every build
//!
//! What the kernel would `BUG_ON` or corrupt memory over — a stale handle
//! released or taken from, an empty key detained, the index out of step
//! with the cells — is checked in release builds too (each check is a
//! comparison the operation makes anyway). The first such bug is kept and
//! [`BioPrison::broken`] reports it, so that a caller (the simulator, a
//! concurrency harness) reports a violation instead of the process
//! dying.
//!
//! Not modelled: `dm_cell_promote_or_release` (unused by dm-thin) and the
//! cell mempool (allocation is infallible here; the kernel's allocation may
//! sleep but cannot fail). `dm_get_cell` is `detain(key, None)`; `dm_cell_error`
//! is [`BioPrison::release`] followed by completing every returned bio.

use std::collections::{BTreeMap, VecDeque};

/// Key of a cell: physical (data-block) keys sort before virtual ones, then by device id, then by block
/// range; overlapping ranges collide.
///
/// The range is half-open, `block_begin..block_end`, and must not be empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellKey {
    /// `true` for a key in a thin device's virtual block space, `false` for a
    /// key on the pool's data device.
    pub virtual_key: bool,
    /// The thin device id. Data-block keys carry it too, so different devices
    /// never collide even on the same data block (spec §5.1).
    pub dev: u64,
    /// First block covered.
    pub block_begin: u64,
    /// One past the last block covered.
    pub block_end: u64,
}

impl CellKey {
    /// The key dm-thin builds for one virtual block of device `dev` (its
    /// `build_virtual_key`).
    pub fn virtual_block(dev: u64, block: u64) -> Self {
        Self::virtual_range(dev, block, block + 1)
    }

    /// A key over the virtual blocks `begin..end` of device `dev`, as a thin
    /// discard builds it.
    pub fn virtual_range(dev: u64, begin: u64, end: u64) -> Self {
        CellKey { virtual_key: true, dev, block_begin: begin, block_end: end }
    }

    /// The key for one data block, built by device `dev` (its
    /// `build_data_key`).
    pub fn data_block(dev: u64, block: u64) -> Self {
        Self::data_range(dev, block, block + 1)
    }

    /// A key over the data blocks `begin..end`, built by device `dev`, as a
    /// passdown discard builds it for one mapped run.
    pub fn data_range(dev: u64, begin: u64, end: u64) -> Self {
        CellKey { virtual_key: false, dev, block_begin: begin, block_end: end }
    }

    /// Whether the two keys collide, i.e. the kernel's key comparison calls
    /// them equal: same space, same device, overlapping ranges.
    pub fn overlaps(&self, other: &CellKey) -> bool {
        self.virtual_key == other.virtual_key
            && self.dev == other.dev
            && self.block_begin < other.block_end
            && other.block_begin < self.block_end
    }

    /// Where the key sorts among non-colliding keys. Because live cells never
    /// collide, the range start alone orders them within a (space, device)
    /// class.
    fn sort_key(&self) -> (bool, u64, u64) {
        (self.virtual_key, self.dev, self.block_begin)
    }
}

/// Handle of a cell; never reused within one prison (ids come from a
/// monotonic counter), so a handle kept past its cell's release is detectably
/// stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CellId(u64);

impl CellId {
    /// The region whose prison made this handle, in a pool of `regions`
    /// regions (see [`BioPrison::for_region`]); always 0 for one region.
    pub fn region(self, regions: usize) -> usize {
        (self.0 % regions as u64) as usize
    }
}

/// Blocks per prison region in the 6.4 design (`BIO_PRISON_MAX_RANGE`): a
/// key's range must stay inside one aligned stretch of this many blocks.
pub const REGION_BLOCKS: u64 = 1024;

/// log2 of [`REGION_BLOCKS`] (the kernel's `BIO_PRISON_MAX_RANGE_SHIFT`).
pub const REGION_SHIFT: u32 = 10;

/// The region of `key` among `regions` (a power of two) in the 6.4 design:
/// `(block_begin >> 10) & (regions - 1)`. Only the start counts, which is
/// why keys must not cross a region boundary ([`key_fits_region`]).
pub fn region_of(key: &CellKey, regions: usize) -> usize {
    // The model's own constant (1 or PRISON_REGIONS), not run-time state.
    assert!(regions.is_power_of_two(), "{regions} regions");
    ((key.block_begin >> REGION_SHIFT) & (regions as u64 - 1)) as usize
}

/// Whether `key` obeys the 6.4 rule (`dm_cell_key_has_valid_range`): at
/// most [`REGION_BLOCKS`] blocks, not crossing a boundary aligned to them.
/// Two colliding keys then always start in the same region, so checking
/// one region's tree finds every collision.
pub fn key_fits_region(key: &CellKey) -> bool {
    key.block_end - key.block_begin <= REGION_BLOCKS
        && key.block_begin >> REGION_SHIFT == (key.block_end - 1) >> REGION_SHIFT
}

/// Outcome of [`BioPrison::detain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detained {
    /// No live cell collided: a new cell was created and the bio (if any) is
    /// its holder. The caller now owns the cell and must release it.
    New(CellId),
    /// A live cell collided: the bio (if any) was queued in it and belongs to
    /// the cell's owner until release.
    AlreadyHeld(CellId),
}

/// One live cell.
#[derive(Debug)]
struct Cell<B> {
    key: CellKey,
    /// `None` when detained without a bio, or after `take_holder`.
    holder: Option<B>,
    /// Bios that collided while the cell was live, oldest first.
    waiters: VecDeque<B>,
}

/// The bio prison: live cells indexed by key.
#[derive(Debug)]
pub struct BioPrison<B> {
    /// Live cells by handle.
    cells: BTreeMap<CellId, Cell<B>>,
    /// Live cells by key order; plays the kernel's rb-tree. Unique because
    /// live cells never collide and keys are non-empty.
    index: BTreeMap<(bool, u64, u64), CellId>,
    /// The next handle to hand out.
    next_id: u64,
    /// How far apart consecutive handles are: the number of regions, so
    /// that a handle names its region (see [`BioPrison::for_region`]).
    id_stride: u64,
    /// The first broken precondition (see the module docs).
    broken: Option<String>,
}

impl<B> Default for BioPrison<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B> BioPrison<B> {
    /// An empty prison.
    pub fn new() -> Self {
        Self::for_region(0, 1)
    }

    /// An empty prison for region `region` of `regions` (the 6.4 design,
    /// spec §5.7): its handles are `region`, `region + regions`, … so that
    /// [`CellId::region`] finds the region's lock again from a handle alone,
    /// and handles stay unique across the regions of one pool.
    pub fn for_region(region: usize, regions: usize) -> Self {
        // Construction arguments, not run-time state.
        assert!(region < regions, "region {region} of {regions}");
        BioPrison {
            cells: BTreeMap::new(),
            index: BTreeMap::new(),
            next_id: region as u64,
            id_stride: regions as u64,
            broken: None,
        }
    }

    /// The first broken precondition, if any: a bug of the caller (the
    /// kernel would crash or corrupt memory), kept rather than panicking.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    fn bug(&mut self, what: String) {
        if self.broken.is_none() {
            self.broken = Some(what);
        }
    }

    /// The kernel's `bio_detain`: if a live cell collides with `key`, append
    /// `bio` (if `Some`) to its waiters and return [`Detained::AlreadyHeld`];
    /// otherwise create a cell with `bio` as its holder and return
    /// [`Detained::New`].
    ///
    /// If `key` overlaps several live cells (only possible for range keys),
    /// the one with the lowest key is chosen; see the module docs for how the
    /// kernel differs.
    ///
    /// An empty key is a caller bug: recorded, and detained as the key of
    /// its first block so that the caller's protocol goes on.
    pub fn detain(&mut self, mut key: CellKey, bio: Option<B>) -> Detained {
        if key.block_begin >= key.block_end {
            self.bug(format!("detain with empty key {key:?}"));
            key.block_end = key.block_begin.saturating_add(1);
        }
        if let Some(id) = self.find_colliding(&key) {
            if let Some(bio) = bio {
                self.cells.get_mut(&id).expect("index names a live cell").waiters.push_back(bio);
            }
            return Detained::AlreadyHeld(id);
        }
        let id = CellId(self.next_id);
        self.next_id += self.id_stride;
        self.cells.insert(id, Cell { key, holder: bio, waiters: VecDeque::new() });
        if let Some(previous) = self.index.insert(key.sort_key(), id) {
            self.bug(format!("two live cells share a start: {key:?} ({previous:?} and {id:?})"));
        }
        Detained::New(id)
    }

    /// The lowest-keyed live cell colliding with `key`, if any.
    ///
    /// Live cells of one class are disjoint and sorted, so only two
    /// candidates can be the lowest collider: the last cell starting at or
    /// before `key` starts (it collides iff it reaches past that start), and
    /// otherwise the first cell starting after it (it collides iff it starts
    /// before `key` ends).
    fn find_colliding(&self, key: &CellKey) -> Option<CellId> {
        let class_start = (key.virtual_key, key.dev, 0);
        let at = key.sort_key();
        let before = self.index.range(class_start..=at).next_back();
        if let Some((_, &id)) = before {
            if self.cells[&id].key.overlaps(key) {
                return Some(id);
            }
        }
        let after = self.index.range((std::ops::Bound::Excluded(at), std::ops::Bound::Unbounded)).next();
        match after {
            Some((_, &id)) if self.cells[&id].key.overlaps(key) => Some(id),
            _ => None,
        }
    }

    /// Whether `cell` is live.
    pub fn contains(&self, cell: CellId) -> bool {
        self.cells.contains_key(&cell)
    }

    /// The key of a live cell; `None` for a stale handle.
    pub fn key(&self, cell: CellId) -> Option<CellKey> {
        self.cells.get(&cell).map(|c| c.key)
    }

    /// The holder of a live cell; `None` if the cell has none (detained
    /// without a bio, or taken) or the handle is stale.
    pub fn holder(&self, cell: CellId) -> Option<&B> {
        self.cells.get(&cell).and_then(|c| c.holder.as_ref())
    }

    /// The holder of a live cell, mutably (dm-thin marks the holder's per-bio
    /// data, e.g. its deferred-set entries, while the bio is still in the
    /// cell). `None` as for [`BioPrison::holder`].
    pub fn holder_mut(&mut self, cell: CellId) -> Option<&mut B> {
        self.cells.get_mut(&cell).and_then(|c| c.holder.as_mut())
    }

    /// Takes the holder out of the cell (the caller now owns that bio); the
    /// cell stays live and keeps blocking colliding keys.
    ///
    /// This is how the model expresses dm-thin issuing the holder while the
    /// cell is still held (e.g. a write that covers a whole block is issued
    /// before the mapping is inserted, and a provisioned block's holder is
    /// issued just before the waiters are visited). The kernel merely stops
    /// looking at `cell->holder`; with Rust ownership the bio has to move.
    ///
    /// Returns `None` if there is no holder. A stale handle is a caller bug
    /// (recorded; `None`).
    pub fn take_holder(&mut self, cell: CellId) -> Option<B> {
        match self.cells.get_mut(&cell) {
            Some(live) => live.holder.take(),
            None => {
                self.bug(format!("take_holder on stale cell {cell:?}"));
                None
            }
        }
    }

    /// Removes the cell from the prison, forgetting its handle.
    fn remove(&mut self, cell: CellId) -> Option<Cell<B>> {
        let removed = self.cells.remove(&cell)?;
        let indexed = self.index.remove(&removed.key.sort_key());
        if indexed != Some(cell) {
            self.bug(format!("index out of step with cells: {cell:?} indexed as {indexed:?}"));
        }
        Some(removed)
    }

    /// Removes the cell; returns the holder (if still there) and then the
    /// waiters in FIFO order — the order of the kernel's `dm_cell_release`,
    /// which appends the holder and then merges the waiting list.
    ///
    /// A stale handle is a caller bug (recorded; empty).
    pub fn release(&mut self, cell: CellId) -> Vec<B> {
        let Some(removed) = self.remove(cell) else {
            self.bug(format!("release of stale cell {cell:?}"));
            return Vec::new();
        };
        removed.holder.into_iter().chain(removed.waiters).collect()
    }

    /// Removes the cell; returns the holder separately (if still there) and
    /// the waiters in FIFO order.
    ///
    /// The kernel's `dm_cell_release_no_holder` only hands back the waiters
    /// because its caller already owns the holder through a plain pointer;
    /// here the holder, if still in the cell, is returned so that ownership is
    /// never lost. dm-thin's `cell_defer_no_holder` puts the waiters back on
    /// the device's deferred list and does nothing with the holder.
    ///
    /// A stale handle is a caller bug (recorded; empty).
    pub fn release_no_holder(&mut self, cell: CellId) -> (Option<B>, Vec<B>) {
        let Some(removed) = self.remove(cell) else {
            self.bug(format!("release_no_holder of stale cell {cell:?}"));
            return (None, Vec::new());
        };
        (removed.holder, removed.waiters.into())
    }

    /// The kernel's `dm_cell_visit_release`: calls `f` on every bio in the
    /// cell (holder if still there, then waiters in FIFO order) while the cell
    /// still exists, then removes it and returns those bios in the same order.
    ///
    /// Since the whole call is one step under the prison lock, no bio can
    /// join the cell between the visit and the removal. dm-thin relies on
    /// that to take deferred-set increments for the waiters it is about to
    /// issue *before* the cell disappears, so a discard that detains after
    /// the release is guaranteed to see them (spec §5.5).
    ///
    /// dm-thin's visitors touch only the waiters: the holder has already been
    /// issued (and counted) by then. In this model that corresponds to
    /// calling [`BioPrison::take_holder`] first; a holder still in the cell is
    /// visited and returned like the waiters.
    ///
    /// A stale handle is a caller bug (recorded; `f` is not called and the
    /// result is empty).
    pub fn visit_release(&mut self, cell: CellId, mut f: impl FnMut(&mut B)) -> Vec<B> {
        let Some(live) = self.cells.get_mut(&cell) else {
            self.bug(format!("visit_release of stale cell {cell:?}"));
            return Vec::new();
        };
        live.holder.iter_mut().chain(live.waiters.iter_mut()).for_each(&mut f);
        self.release(cell)
    }

    /// Number of live cells.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Whether no cell is live.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// The live cells in key order, for invariant checks and debugging.
    pub fn cells(&self) -> impl Iterator<Item = (CellId, CellKey)> + '_ {
        self.index.values().map(|&id| (id, self.cells[&id].key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn new_id(d: Detained) -> CellId {
        match d {
            Detained::New(id) => id,
            Detained::AlreadyHeld(id) => panic!("expected a new cell, got held {id:?}"),
        }
    }

    fn held_id(d: Detained) -> CellId {
        match d {
            Detained::AlreadyHeld(id) => id,
            Detained::New(id) => panic!("expected a held cell, got new {id:?}"),
        }
    }

    #[test]
    fn block_keys_collide_only_on_the_same_block() {
        let mut p = BioPrison::new();
        let a = new_id(p.detain(CellKey::virtual_block(1, 10), Some("w1")));
        assert_eq!(p.detain(CellKey::virtual_block(1, 10), Some("w2")), Detained::AlreadyHeld(a));
        new_id(p.detain(CellKey::virtual_block(1, 11), Some("w3")));
        new_id(p.detain(CellKey::virtual_block(1, 9), Some("w4")));
        assert_eq!(p.len(), 3);
        assert_eq!(p.holder(a), Some(&"w1"));
        assert_eq!(p.release(a), vec!["w1", "w2"]);
        // Once released, the same key makes a fresh cell with a fresh handle.
        let b = new_id(p.detain(CellKey::virtual_block(1, 10), Some("w5")));
        assert_ne!(a, b);
    }

    #[test]
    fn range_keys_collide_with_any_overlap() {
        let mut p = BioPrison::new();
        let r = new_id(p.detain(CellKey::virtual_range(3, 10, 20), Some("discard")));
        assert_eq!(p.detain(CellKey::virtual_block(3, 10), Some("a")), Detained::AlreadyHeld(r));
        assert_eq!(p.detain(CellKey::virtual_block(3, 19), Some("b")), Detained::AlreadyHeld(r));
        assert_eq!(p.detain(CellKey::virtual_range(3, 0, 11), Some("c")), Detained::AlreadyHeld(r));
        assert_eq!(p.detain(CellKey::virtual_range(3, 19, 40), Some("d")), Detained::AlreadyHeld(r));
        assert_eq!(p.detain(CellKey::virtual_range(3, 0, 100), Some("e")), Detained::AlreadyHeld(r));
        // Half-open: touching ranges do not collide.
        new_id(p.detain(CellKey::virtual_block(3, 9), Some("f")));
        new_id(p.detain(CellKey::virtual_block(3, 20), Some("g")));
        new_id(p.detain(CellKey::virtual_range(3, 20 + 1, 30), None));
        assert_eq!(p.release(r), vec!["discard", "a", "b", "c", "d", "e"]);
    }

    #[test]
    fn a_range_over_several_cells_joins_the_lowest() {
        let mut p = BioPrison::new();
        let c5 = new_id(p.detain(CellKey::data_block(0, 5), Some(1)));
        let c7 = new_id(p.detain(CellKey::data_block(0, 7), Some(2)));
        let c9 = new_id(p.detain(CellKey::data_block(0, 9), Some(3)));
        assert_eq!(p.detain(CellKey::data_range(0, 0, 100), Some(4)), Detained::AlreadyHeld(c5));
        assert_eq!(p.detain(CellKey::data_range(0, 6, 100), Some(5)), Detained::AlreadyHeld(c7));
        assert_eq!(p.detain(CellKey::data_range(0, 8, 10), Some(6)), Detained::AlreadyHeld(c9));
        assert_eq!(p.release(c5), vec![1, 4]);
        assert_eq!(p.release(c7), vec![2, 5]);
        assert_eq!(p.release(c9), vec![3, 6]);
    }

    #[test]
    fn spaces_and_devices_never_collide() {
        let mut p = BioPrison::new();
        let keys = [
            CellKey::virtual_block(1, 7),
            CellKey::virtual_block(2, 7),
            CellKey::data_block(1, 7),
            CellKey::data_block(2, 7),
        ];
        for (i, k) in keys.iter().enumerate() {
            new_id(p.detain(*k, Some(i)));
        }
        assert!(!keys[0].overlaps(&keys[2]));
        assert!(!keys[2].overlaps(&keys[3]));
        assert!(keys[2].overlaps(&CellKey::data_range(1, 0, 8)));
        // Key order: data-block keys first, then by device.
        let order: Vec<CellKey> = p.cells().map(|(_, k)| k).collect();
        assert_eq!(order, vec![keys[2], keys[3], keys[0], keys[1]]);
    }

    #[test]
    fn waiters_come_out_first_in_first_out() {
        let mut p = BioPrison::new();
        let c = new_id(p.detain(CellKey::virtual_block(0, 0), Some(0)));
        for i in 1..=5 {
            held_id(p.detain(CellKey::virtual_block(0, 0), Some(i)));
        }
        // Detaining with no bio does not queue anything.
        held_id(p.detain(CellKey::virtual_block(0, 0), None));
        assert_eq!(p.release(c), vec![0, 1, 2, 3, 4, 5]);
        assert!(p.is_empty());
    }

    #[test]
    fn cell_detained_without_a_bio_has_no_holder() {
        let mut p = BioPrison::<u32>::new();
        let c = new_id(p.detain(CellKey::data_range(4, 100, 164), None));
        assert_eq!(p.holder(c), None);
        assert_eq!(p.key(c), Some(CellKey::data_range(4, 100, 164)));
        held_id(p.detain(CellKey::data_block(4, 130), Some(9)));
        assert_eq!(p.release_no_holder(c), (None, vec![9]));
    }

    #[test]
    fn release_no_holder_separates_the_holder() {
        let mut p = BioPrison::new();
        let c = new_id(p.detain(CellKey::virtual_block(0, 1), Some("h")));
        held_id(p.detain(CellKey::virtual_block(0, 1), Some("x")));
        held_id(p.detain(CellKey::virtual_block(0, 1), Some("y")));
        assert_eq!(p.release_no_holder(c), (Some("h"), vec!["x", "y"]));
        assert!(!p.contains(c));
    }

    #[test]
    fn take_holder_keeps_the_cell() {
        let mut p = BioPrison::new();
        let c = new_id(p.detain(CellKey::virtual_block(0, 1), Some(String::from("h"))));
        p.holder_mut(c).unwrap().push('!');
        assert_eq!(p.take_holder(c).as_deref(), Some("h!"));
        assert_eq!(p.take_holder(c), None);
        // The cell still blocks its key.
        assert_eq!(p.detain(CellKey::virtual_block(0, 1), Some("w".into())), Detained::AlreadyHeld(c));
        assert_eq!(p.release(c), vec![String::from("w")]);
    }

    #[test]
    fn visit_release_sees_every_bio_before_removal() {
        let mut p = BioPrison::new();
        let c = new_id(p.detain(CellKey::virtual_block(0, 1), Some((0, false))));
        held_id(p.detain(CellKey::virtual_block(0, 1), Some((1, false))));
        held_id(p.detain(CellKey::virtual_block(0, 1), Some((2, false))));
        let mut seen = Vec::new();
        let out = p.visit_release(c, |bio| {
            seen.push(bio.0);
            bio.1 = true;
        });
        assert_eq!(seen, vec![0, 1, 2]);
        assert_eq!(out, vec![(0, true), (1, true), (2, true)]);
        assert!(p.is_empty());

        // With the holder taken first (dm-thin's pattern) only waiters are visited.
        let c = new_id(p.detain(CellKey::virtual_block(0, 1), Some((3, false))));
        held_id(p.detain(CellKey::virtual_block(0, 1), Some((4, false))));
        assert_eq!(p.take_holder(c), Some((3, false)));
        let mut seen = Vec::new();
        assert_eq!(p.visit_release(c, |b| seen.push(b.0)), vec![(4, false)]);
        assert_eq!(seen, vec![4]);
    }

    #[test]
    fn stale_handles_answer_none_to_queries() {
        let mut p = BioPrison::new();
        let c = new_id(p.detain(CellKey::virtual_block(0, 1), Some(1)));
        p.release(c);
        // A new cell for the same key gets a different handle; the old one
        // does not alias it.
        let d = new_id(p.detain(CellKey::virtual_block(0, 1), Some(2)));
        assert_ne!(c, d);
        assert!(!p.contains(c));
        assert_eq!(p.key(c), None);
        assert_eq!(p.holder(c), None);
        assert_eq!(p.holder_mut(c), None);
        assert_eq!(p.holder(d), Some(&2));
    }

    #[test]
    fn releasing_a_stale_handle_is_a_recorded_bug() {
        let mut p = BioPrison::new();
        let c = new_id(p.detain(CellKey::virtual_block(0, 1), Some(1)));
        let d = new_id(p.detain(CellKey::virtual_block(0, 2), Some(2)));
        p.release(c);
        assert_eq!(p.broken(), None);
        // A no-op that leaves other cells alone, in every build, and the
        // first bug is kept.
        assert_eq!(p.release(c), Vec::<i32>::new());
        assert_eq!(p.broken(), Some(format!("release of stale cell {c:?}").as_str()));
        assert_eq!(p.release_no_holder(c), (None, vec![]));
        assert_eq!(p.visit_release(c, |_| panic!("visited a stale cell")), Vec::<i32>::new());
        assert_eq!(p.take_holder(c), None);
        assert_eq!(p.holder(d), Some(&2));
        assert_eq!(p.broken(), Some(format!("release of stale cell {c:?}").as_str()));
    }

    #[test]
    fn an_empty_key_is_a_recorded_bug() {
        let mut p = BioPrison::new();
        let c = new_id(p.detain(CellKey::virtual_range(0, 5, 5), Some(1)));
        assert!(p.broken().unwrap().starts_with("detain with empty key"), "{:?}", p.broken());
        // Detained as its first block.
        assert_eq!(p.key(c), Some(CellKey::virtual_block(0, 5)));
        assert_eq!(p.release(c), vec![1]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Detain {
            virtual_key: bool,
            dev: u64,
            begin: u64,
            len: u64,
            with_bio: bool,
        },
        /// Release the live cell at this position (modulo) in key order.
        Release {
            pick: usize,
            how: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (any::<bool>(), 0..2u64, 0..24u64, prop_oneof![3 => Just(1u64), 1 => 1..8u64], any::<bool>())
                .prop_map(|(virtual_key, dev, begin, len, with_bio)| Op::Detain {
                    virtual_key, dev, begin, len, with_bio
                }),
            1 => (any::<usize>(), 0..4u8).prop_map(|(pick, how)| Op::Release { pick, how }),
        ]
    }

    /// The reference: live cells as a plain list, searched exhaustively.
    struct RefCell {
        id: CellId,
        key: CellKey,
        holder: Option<u64>,
        waiters: Vec<u64>,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_detains_and_releases_match_a_reference(ops in prop::collection::vec(op(), 0..120)) {
            let mut p = BioPrison::new();
            let mut reference: Vec<RefCell> = Vec::new();
            let mut next_bio = 0u64;
            let mut detained = Vec::new();
            let mut released = Vec::new();

            for op in ops {
                match op {
                    Op::Detain { virtual_key, dev, begin, len, with_bio } => {
                        let key = CellKey { virtual_key, dev, block_begin: begin, block_end: begin + len };
                        let bio = with_bio.then(|| {
                            next_bio += 1;
                            detained.push(next_bio);
                            next_bio
                        });
                        let lowest = reference
                            .iter_mut()
                            .filter(|c| c.key.overlaps(&key))
                            .min_by_key(|c| c.key.sort_key());
                        match (p.detain(key, bio), lowest) {
                            (Detained::AlreadyHeld(id), Some(c)) => {
                                prop_assert_eq!(id, c.id);
                                c.waiters.extend(bio);
                            }
                            (Detained::New(id), None) => {
                                prop_assert!(reference.iter().all(|c| c.id != id));
                                reference.push(RefCell { id, key, holder: bio, waiters: Vec::new() });
                            }
                            (got, want) => prop_assert!(false, "got {:?}, reference {:?}", got, want.map(|c| c.id)),
                        }
                    }
                    Op::Release { pick, how } => {
                        if reference.is_empty() {
                            continue;
                        }
                        let (id, _) = p.cells().nth(pick % p.len()).unwrap();
                        let at = reference.iter().position(|c| c.id == id).unwrap();
                        let c = reference.swap_remove(at);
                        let mut want: Vec<u64> = c.holder.into_iter().chain(c.waiters).collect();
                        let got = match how {
                            0 => p.release(id),
                            1 => {
                                let (h, w) = p.release_no_holder(id);
                                h.into_iter().chain(w).collect()
                            }
                            2 => {
                                let mut visited = Vec::new();
                                let out = p.visit_release(id, |b| visited.push(*b));
                                prop_assert_eq!(&visited, &out);
                                out
                            }
                            _ => {
                                let h = p.take_holder(id);
                                prop_assert!(p.contains(id));
                                let rest = p.release(id);
                                h.into_iter().chain(rest).collect()
                            }
                        };
                        prop_assert_eq!(&got, &want);
                        released.append(&mut want);
                        prop_assert!(!p.contains(id));
                    }
                }

                // Invariant: live cells are pairwise non-colliding, listed in
                // strictly increasing key order, and match the reference.
                let live: Vec<(CellId, CellKey)> = p.cells().collect();
                prop_assert_eq!(live.len(), reference.len());
                prop_assert_eq!(p.len(), reference.len());
                for (i, (_, a)) in live.iter().enumerate() {
                    for (_, b) in &live[i + 1..] {
                        prop_assert!(!a.overlaps(b), "live cells {:?} and {:?} collide", a, b);
                        prop_assert!(a.sort_key() < b.sort_key());
                    }
                }
                for c in &reference {
                    prop_assert_eq!(p.key(c.id), Some(c.key));
                    prop_assert_eq!(p.holder(c.id), c.holder.as_ref());
                }
            }

            // Drain; every detained bio comes out exactly once.
            let ids: Vec<CellId> = p.cells().map(|(id, _)| id).collect();
            for id in ids {
                released.extend(p.release(id));
            }
            prop_assert!(p.is_empty());
            released.sort_unstable();
            prop_assert_eq!(released, detained);
        }
    }
}
