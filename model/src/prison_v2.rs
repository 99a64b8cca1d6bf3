//! The bio prison, version 2: the shared/exclusive cell locks that dm-cache
//! uses to keep I/O away from a block while a migration moves it (spec §5.6,
//! §4.6, §4.7).
//!
//! Read from `drivers/md/dm-bio-prison-v2.c` and `.h`. No 6.1 tree has these
//! files in the source index, so copies from before and after 6.1 were
//! compared: mainline at v5.6-rc1, and a recent mainline-based tree that
//! already has the 2023 `unsigned` → `unsigned int` clean-up, an SPDX line
//! and `bio_list_merge_init` in place of `bio_list_merge` + `bio_list_init`.
//! The logic is identical in both; only those cosmetic changes lie between
//! them, so 6.1 (which still spells `unsigned`) has the same logic.
//!
//! # Cells
//!
//! A cell is identified by a key of the same shape and the same ordering as
//! dm-thin's ([`CellKey`], the kernel's `dm_cell_key_v2`; see
//! [`cmp_keys`]). dm-cache only ever builds one-block keys on the origin
//! device ([`origin_key`]). A cell holds:
//!
//! - a count of **shared** holders (bios in flight to the block),
//! - at most one **exclusive** lock, with a *level*,
//! - the bios that asked for a shared lock and were refused, oldest first,
//! - at most one stored *quiesce continuation*.
//!
//! The rules, each one step under the prison's single lock:
//!
//! - [`BioPrisonV2::get`] at level `l` is refused (the bio is queued in the
//!   cell) iff the cell is exclusively locked at a level `>= l`; otherwise the
//!   shared count goes up. dm-cache gets at [`WRITE_LOCK_LEVEL`] (0) for
//!   writes and [`READ_WRITE_LOCK_LEVEL`] (1) for everything else, so an
//!   exclusive lock at level 0 stops writes only and one at level 1 stops
//!   everything.
//! - [`BioPrisonV2::put`] drops one shared hold. When the count reaches zero
//!   the cell is removed if no exclusive lock is held; if one is held, the
//!   result says the cell has drained, and hands back the stored
//!   continuation (if any), which is now due.
//! - [`BioPrisonV2::lock`] takes the exclusive lock, or fails with `EBUSY` if
//!   it is already held. The lock is held at once either way; the answer says
//!   whether shared holders are still in flight (the caller must quiesce
//!   before touching the block). The kernel does not know at which levels the
//!   shared holders got in, so *all* of them count.
//! - [`BioPrisonV2::quiesce`] hands the continuation straight back if there
//!   are no shared holders, else stores it for the last `put`.
//! - [`BioPrisonV2::lock_promote`] sets a new level (`EINVAL` if not
//!   exclusively locked) and says whether shared holders exist.
//! - [`BioPrisonV2::unlock`] releases the exclusive lock and hands back every
//!   queued bio, oldest first; the cell is removed unless shared holders
//!   remain.
//!
//! # Work queue
//!
//! The kernel's prison owns a pointer to the cache's work queue and calls
//! `queue_work` on a continuation from `put` and `quiesce`. This model has no
//! work queues: the continuation (any value `C`, for instance an enum naming
//! the migration step) comes back in the result, and the caller queues or runs
//! it. The caller is therefore responsible for doing that *after* the call
//! returns, which is also when the kernel's work item could first run (the
//! work queue runs it in another context, never under the prison lock).
//!
//! # Kernel behaviour kept on purpose
//!
//! - Shared locks at a level above the exclusive level are still granted
//!   while the exclusive holder waits to quiesce, and each delays the
//!   continuation (the kernel's own FIXME: they can starve it).
//! - A second `quiesce` before the first continuation ran replaces the stored
//!   one; the kernel forgets the first. Here it comes back as
//!   [`Quiesce::Deferred::replaced`] so a caller can flag it.
//! - `quiesce` does not check that the cell is exclusively locked. If the
//!   cell then loses its last shared holder with no exclusive lock held, it is
//!   removed and the stored continuation is never queued; here it comes back
//!   as [`PutOutcome::orphaned`].
//! - `unlock` with shared holders remaining keeps a stored continuation in
//!   the cell; a later `lock` of the same cell inherits it, and the last `put`
//!   then hands it back.
//! - `lock_promote` may lower the level as well as raise it; lowering does not
//!   release bios already queued.
//!
//! # Handles and misuse
//!
//! A [`CellId`] stands for the kernel's cell pointer. Ids are never reused,
//! so a handle kept after its cell went away is detectably stale. What the
//! kernel treats as a bug (`BUG_ON`: a `put` with no shared holders, an
//! `unlock` without the exclusive lock) or as memory corruption (an operation
//! on a freed cell) is an error value here, never a panic, so that random
//! operation sequences can be checked.
//!
//! Not modelled: the cell mempool (`dm_bio_prison_alloc_cell_v2`; allocation
//! is infallible here). Where the kernel's caller compares the returned cell
//! with its preallocated one to learn whether it was used, the results here
//! carry `new_cell`.
//!
//! # Ranges
//!
//! Live cells never collide (a cell is created only when no live cell
//! collides with the key), so the lookup is the same as prison v1's: if a
//! range key overlaps several live cells, the one with the lowest key is
//! taken (the kernel takes whichever its rb-tree path meets first). dm-cache
//! never builds such keys. Empty ranges are not supported (a debug
//! assertion), as in prison v1.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::ops::Bound;

pub use crate::prison::CellKey;

use crate::errno::Errno;
use crate::sync::{self, Mutex};

/// Handle of a prison v2 cell (the kernel's cell pointer). Ids come from a
/// counter and are never reused within one prison, so a handle kept past its
/// cell's removal is detectably stale. Distinct from prison v1's handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CellId(u64);

/// dm-cache's lock level for writes: an exclusive lock at this level blocks
/// writes and lets reads through.
pub const WRITE_LOCK_LEVEL: u32 = 0;

/// dm-cache's lock level for reads (and every non-write bio): an exclusive
/// lock at this level blocks both reads and writes.
pub const READ_WRITE_LOCK_LEVEL: u32 = 1;

/// dm-cache's lock level for a bio: [`WRITE_LOCK_LEVEL`] for a write,
/// [`READ_WRITE_LOCK_LEVEL`] otherwise.
pub fn lock_level(is_write: bool) -> u32 {
    if is_write {
        WRITE_LOCK_LEVEL
    } else {
        READ_WRITE_LOCK_LEVEL
    }
}

/// The key dm-cache builds for origin block `block`: not virtual, device 0,
/// the one-block range `block..block + 1`.
pub fn origin_key(block: u64) -> CellKey {
    CellKey { virtual_key: false, dev: 0, block_begin: block, block_end: block + 1 }
}

/// The kernel's key comparison: by the virtual flag (physical keys first),
/// then the device, then the range, where two overlapping ranges compare
/// [`std::cmp::Ordering::Equal`].
///
/// This is not a total order over arbitrary keys (overlap is not
/// transitive); it is one over keys that pairwise do not overlap, which is
/// what live cells are.
pub fn cmp_keys(lhs: &CellKey, rhs: &CellKey) -> std::cmp::Ordering {
    use std::cmp::Ordering::*;
    lhs.virtual_key.cmp(&rhs.virtual_key).then(lhs.dev.cmp(&rhs.dev)).then(
        if lhs.block_end <= rhs.block_begin {
            Less
        } else if lhs.block_begin >= rhs.block_end {
            Greater
        } else {
            Equal
        },
    )
}

/// Why an operation on the prison failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrisonError {
    /// [`BioPrisonV2::lock`]: the cell is already exclusively locked (the
    /// kernel's `-EBUSY`).
    Busy(CellId),
    /// [`BioPrisonV2::lock_promote`] (the kernel's `-EINVAL`) or
    /// [`BioPrisonV2::unlock`] (a `BUG_ON` in the kernel) on a cell that is
    /// not exclusively locked.
    NotLocked(CellId),
    /// [`BioPrisonV2::put`] on a cell with no shared holders (a `BUG_ON` in
    /// the kernel).
    NoSharedHolders(CellId),
    /// The handle names a cell that has been removed (use after free in the
    /// kernel).
    StaleCell(CellId),
}

impl PrisonError {
    /// The errno the kernel returns for this, where it returns one rather
    /// than crashing: `EBUSY` for [`PrisonError::Busy`], `EINVAL` for
    /// [`PrisonError::NotLocked`] (the promote case).
    pub fn errno(self) -> Option<Errno> {
        match self {
            PrisonError::Busy(_) => Some(Errno::EBUSY),
            PrisonError::NotLocked(_) => Some(Errno::EINVAL),
            PrisonError::NoSharedHolders(_) | PrisonError::StaleCell(_) => None,
        }
    }
}

impl fmt::Display for PrisonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrisonError::Busy(c) => write!(f, "cell {c:?} is already exclusively locked"),
            PrisonError::NotLocked(c) => write!(f, "cell {c:?} is not exclusively locked"),
            PrisonError::NoSharedHolders(c) => write!(f, "cell {c:?} has no shared holders"),
            PrisonError::StaleCell(c) => write!(f, "cell {c:?} no longer exists"),
        }
    }
}

impl std::error::Error for PrisonError {}

/// Result of [`BioPrisonV2::get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Get<B> {
    /// The shared lock is granted: the caller keeps the bio and must
    /// [`BioPrisonV2::put`] the cell when the bio is done.
    Granted {
        /// The cell now holding one more shared lock.
        cell: CellId,
        /// The bio, handed back.
        bio: B,
        /// Whether the cell was created by this call (the kernel's "the
        /// preallocated cell was used").
        new_cell: bool,
    },
    /// An exclusive lock at this level or above is held: the bio now waits in
    /// the cell and comes back from the exclusive holder's
    /// [`BioPrisonV2::unlock`].
    Queued {
        /// The cell the bio waits in.
        cell: CellId,
    },
}

/// Result of [`BioPrisonV2::put`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOutcome<C> {
    /// The cell had no shared holder left and no exclusive lock, so it was
    /// removed (the kernel's return value: "you should free it").
    pub released: bool,
    /// The last shared holder left an exclusively locked cell: the exclusive
    /// holder may now touch the block. (The kernel does not return this; its
    /// caller learns it only through the continuation.)
    pub drained: bool,
    /// The last shared holder left an exclusively locked cell whose
    /// continuation was waiting: queue or run it now (the kernel's
    /// `queue_work` from `put`).
    pub run: Option<C>,
    /// The cell was removed while a continuation was stored in it (stored by
    /// a `quiesce` on a cell whose exclusive lock was later dropped, or never
    /// held). The kernel silently forgets it; a caller that expects every
    /// continuation to run wants to know.
    pub orphaned: Option<C>,
}

/// Result of a successful [`BioPrisonV2::lock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locked {
    /// The exclusively locked cell.
    pub cell: CellId,
    /// Whether the cell was created by this call.
    pub new_cell: bool,
    /// Shared holders are in flight (the kernel returns 1): the caller must
    /// [`BioPrisonV2::quiesce`] before touching the block. `false` is the
    /// kernel's 0.
    pub must_quiesce: bool,
}

/// Result of [`BioPrisonV2::quiesce`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quiesce<C> {
    /// No shared holders: queue or run the continuation now.
    RunNow(C),
    /// Stored; the last [`BioPrisonV2::put`] hands it back.
    Deferred {
        /// A continuation stored earlier that this one replaced (the kernel
        /// forgets it).
        replaced: Option<C>,
    },
}

/// Result of [`BioPrisonV2::unlock`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unlocked<B> {
    /// The bios that were refused a shared lock, oldest first; the caller
    /// re-issues them (dm-cache puts them back on its deferred list).
    pub bios: Vec<B>,
    /// No shared holders remained, so the cell was removed (the kernel's
    /// return value: "you should free it").
    pub released: bool,
}

/// One live cell.
#[derive(Debug)]
struct Cell<B, C> {
    key: CellKey,
    /// The exclusive lock's level, if the lock is held.
    exclusive: Option<u32>,
    /// Number of granted shared locks not yet put.
    shared: u32,
    /// The stored quiesce continuation.
    continuation: Option<C>,
    /// Bios refused a shared lock, oldest first.
    bios: VecDeque<B>,
}

/// A read-only view of one live cell, for checks and debugging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellView {
    /// The cell's key.
    pub key: CellKey,
    /// The exclusive lock's level, if it is held.
    pub exclusive: Option<u32>,
    /// Number of shared holders.
    pub shared: u32,
    /// Number of queued bios.
    pub queued: usize,
    /// Whether a continuation is stored.
    pub has_continuation: bool,
}

/// The prison's state without its lock: what the kernel keeps under the
/// prison spinlock. Every method is one of the kernel's `__`-prefixed
/// helpers, i.e. one atomic step when called with the lock held.
/// [`BioPrisonV2`] wraps it in the lock; use this directly where the caller
/// already serialises (the simulator, unit tests).
#[derive(Debug)]
pub struct CellTable<B, C> {
    cells: BTreeMap<CellId, Cell<B, C>>,
    /// Live cells by key order (the kernel's rb-tree).
    index: BTreeMap<(bool, u64, u64), CellId>,
    next_id: u64,
    /// The first broken precondition the operations met (an empty key, a
    /// continuation freed with its cell), kept in every build and reported
    /// by [`CellTable::check`].
    broken: Option<String>,
}

impl<B, C> Default for CellTable<B, C> {
    fn default() -> Self {
        Self::new()
    }
}

fn sort_key(key: &CellKey) -> (bool, u64, u64) {
    (key.virtual_key, key.dev, key.block_begin)
}

impl<B, C> CellTable<B, C> {
    /// An empty table.
    pub fn new() -> Self {
        CellTable { cells: BTreeMap::new(), index: BTreeMap::new(), next_id: 0, broken: None }
    }

    fn bug(&mut self, what: String) {
        if self.broken.is_none() {
            self.broken = Some(what);
        }
    }

    /// The lowest-keyed live cell colliding with `key`, if any (see the
    /// module docs on ranges).
    fn find(&self, key: &CellKey) -> Option<CellId> {
        let at = sort_key(key);
        let before = self.index.range((key.virtual_key, key.dev, 0)..=at).next_back();
        if let Some((_, &id)) = before {
            if cmp_keys(&self.cells[&id].key, key).is_eq() {
                return Some(id);
            }
        }
        match self.index.range((Bound::Excluded(at), Bound::Unbounded)).next() {
            Some((_, &id)) if cmp_keys(&self.cells[&id].key, key).is_eq() => Some(id),
            _ => None,
        }
    }

    /// The kernel's `__find_or_insert`: the colliding cell, or a new empty
    /// one; the flag says whether it is new.
    fn find_or_insert(&mut self, mut key: CellKey) -> (CellId, bool) {
        if key.block_begin >= key.block_end {
            self.bug(format!("empty cell key {key:?}"));
            key.block_end = key.block_begin.saturating_add(1);
        }
        if let Some(id) = self.find(&key) {
            return (id, false);
        }
        let id = CellId(self.next_id);
        self.next_id += 1;
        let cell = Cell { key, exclusive: None, shared: 0, continuation: None, bios: VecDeque::new() };
        self.cells.insert(id, cell);
        self.index.insert(sort_key(&key), id);
        (id, true)
    }

    fn live(&mut self, cell: CellId) -> Result<&mut Cell<B, C>, PrisonError> {
        self.cells.get_mut(&cell).ok_or(PrisonError::StaleCell(cell))
    }

    fn remove(&mut self, cell: CellId) -> Cell<B, C> {
        let removed = self.cells.remove(&cell).expect("removing a live cell");
        self.index.remove(&sort_key(&removed.key));
        removed
    }

    /// The kernel's `__get`; see [`BioPrisonV2::get`].
    pub fn get(&mut self, key: CellKey, level: u32, bio: B) -> Get<B> {
        let (id, new_cell) = self.find_or_insert(key);
        let cell = self.cells.get_mut(&id).expect("found or inserted");
        match cell.exclusive {
            Some(held) if level <= held => {
                cell.bios.push_back(bio);
                Get::Queued { cell: id }
            }
            _ => {
                cell.shared += 1;
                Get::Granted { cell: id, bio, new_cell }
            }
        }
    }

    /// The kernel's `__put`; see [`BioPrisonV2::put`].
    pub fn put(&mut self, cell: CellId) -> Result<PutOutcome<C>, PrisonError> {
        let c = self.live(cell)?;
        if c.shared == 0 {
            return Err(PrisonError::NoSharedHolders(cell));
        }
        c.shared -= 1;
        let mut out = PutOutcome { released: false, drained: false, run: None, orphaned: None };
        if c.shared == 0 {
            if c.exclusive.is_some() {
                out.drained = true;
                out.run = c.continuation.take();
            } else {
                out.orphaned = self.remove(cell).continuation;
                out.released = true;
            }
        }
        Ok(out)
    }

    /// The kernel's `__lock`; see [`BioPrisonV2::lock`].
    pub fn lock(&mut self, key: CellKey, level: u32) -> Result<Locked, PrisonError> {
        let (id, new_cell) = self.find_or_insert(key);
        let cell = self.cells.get_mut(&id).expect("found or inserted");
        if cell.exclusive.is_some() {
            return Err(PrisonError::Busy(id));
        }
        cell.exclusive = Some(level);
        Ok(Locked { cell: id, new_cell, must_quiesce: cell.shared > 0 })
    }

    /// The kernel's `__quiesce`; see [`BioPrisonV2::quiesce`].
    pub fn quiesce(&mut self, cell: CellId, continuation: C) -> Result<Quiesce<C>, PrisonError> {
        let c = self.live(cell)?;
        if c.shared == 0 {
            Ok(Quiesce::RunNow(continuation))
        } else {
            Ok(Quiesce::Deferred { replaced: c.continuation.replace(continuation) })
        }
    }

    /// The kernel's `__promote`; see [`BioPrisonV2::lock_promote`].
    pub fn lock_promote(&mut self, cell: CellId, new_level: u32) -> Result<bool, PrisonError> {
        let c = self.live(cell)?;
        match c.exclusive.as_mut() {
            None => Err(PrisonError::NotLocked(cell)),
            Some(level) => {
                *level = new_level;
                Ok(c.shared > 0)
            }
        }
    }

    /// The kernel's `__unlock`; see [`BioPrisonV2::unlock`].
    pub fn unlock(&mut self, cell: CellId) -> Result<Unlocked<B>, PrisonError> {
        let c = self.live(cell)?;
        if c.exclusive.is_none() {
            return Err(PrisonError::NotLocked(cell));
        }
        let bios = std::mem::take(&mut c.bios).into();
        if c.shared > 0 {
            c.exclusive = None;
            return Ok(Unlocked { bios, released: false });
        }
        let removed = self.remove(cell);
        if removed.continuation.is_some() {
            self.bug(format!("{cell:?} unlocked and freed with a continuation and no shared holders"));
        }
        Ok(Unlocked { bios, released: true })
    }

    /// A view of a live cell; `None` for a stale handle.
    pub fn view(&self, cell: CellId) -> Option<CellView> {
        self.cells.get(&cell).map(|c| CellView {
            key: c.key,
            exclusive: c.exclusive,
            shared: c.shared,
            queued: c.bios.len(),
            has_continuation: c.continuation.is_some(),
        })
    }

    /// The live cell colliding with `key` (lowest-keyed if several), if any.
    pub fn lookup(&self, key: &CellKey) -> Option<CellId> {
        self.find(key)
    }

    /// The live cells in the kernel's key order.
    pub fn cells(&self) -> impl Iterator<Item = (CellId, CellView)> + '_ {
        self.index.values().map(|&id| (id, self.view(id).expect("indexed cells are live")))
    }

    /// Number of live cells.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Whether no cell is live.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Checks the table's invariants; the first broken one is described in
    /// the error (first of all, a broken precondition an operation met:
    /// an empty key, a continuation freed with its cell). Every cell is in
    /// use (it has shared holders or an exclusive lock: a cell with neither
    /// is removed by the operation that emptied it); only an exclusively
    /// locked cell has queued bios; a stored continuation implies shared
    /// holders; live keys are pairwise disjoint and the index agrees with
    /// the cells.
    pub fn check(&self) -> Result<(), String> {
        if let Some(b) = &self.broken {
            return Err(b.clone());
        }
        if self.index.len() != self.cells.len() {
            return Err(format!("{} indexed, {} live", self.index.len(), self.cells.len()));
        }
        let mut previous: Option<CellKey> = None;
        for (&at, &id) in &self.index {
            let c = self.cells.get(&id).ok_or(format!("index names dead {id:?}"))?;
            if sort_key(&c.key) != at {
                return Err(format!("{id:?} indexed at {at:?}, key {:?}", c.key));
            }
            if c.shared == 0 && c.exclusive.is_none() {
                return Err(format!("{id:?} is live but unused"));
            }
            if c.exclusive.is_none() && !c.bios.is_empty() {
                return Err(format!("{id:?} queues bios without an exclusive lock"));
            }
            if c.shared == 0 && c.continuation.is_some() {
                return Err(format!("{id:?} stores a continuation with no shared holders"));
            }
            if let Some(p) = previous {
                if !cmp_keys(&p, &c.key).is_lt() {
                    return Err(format!("keys {p:?} and {:?} out of order or overlapping", c.key));
                }
            }
            previous = Some(c.key);
        }
        Ok(())
    }
}

/// The bio prison v2: a [`CellTable`] behind the prison's single lock (the
/// kernel's spinlock, here [`crate::sync::Mutex`], so that loom and shuttle
/// see it). Each method takes the lock once, like the kernel's exported
/// `dm_cell_*_v2` functions.
///
/// `B` is the bio type; `C` the continuation type (whatever the caller's
/// work item is).
#[derive(Debug)]
pub struct BioPrisonV2<B, C> {
    table: Mutex<CellTable<B, C>>,
}

impl<B, C> Default for BioPrisonV2<B, C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B, C> BioPrisonV2<B, C> {
    /// An empty prison (`dm_bio_prison_create_v2`). Under loom or shuttle,
    /// create it inside the checker's execution.
    pub fn new() -> Self {
        BioPrisonV2 { table: Mutex::new(CellTable::new()) }
    }

    /// `dm_cell_get_v2`: asks for a shared lock on `key` at `level` for
    /// `bio`. Refused, with the bio queued in the cell, iff the cell is
    /// exclusively locked at a level `>= level`; otherwise granted (creating
    /// the cell if no live cell collides with `key`).
    pub fn get(&self, key: CellKey, level: u32, bio: B) -> Get<B> {
        sync::lock(&self.table).get(key, level, bio)
    }

    /// `dm_cell_put_v2`: drops one shared lock on `cell`. When the last one
    /// goes, the cell is removed if it is not exclusively locked
    /// ([`PutOutcome::released`]); if it is, the cell has drained
    /// ([`PutOutcome::drained`]) and a stored continuation is due
    /// ([`PutOutcome::run`]).
    ///
    /// Errors: [`PrisonError::NoSharedHolders`], [`PrisonError::StaleCell`].
    pub fn put(&self, cell: CellId) -> Result<PutOutcome<C>, PrisonError> {
        sync::lock(&self.table).put(cell)
    }

    /// `dm_cell_lock_v2`: takes the exclusive lock on `key` at `level`,
    /// creating the cell if needed. The lock is held on return; `must_quiesce`
    /// says whether shared holders (of any level) are still in flight.
    ///
    /// Errors: [`PrisonError::Busy`] (`-EBUSY`) if the cell is already
    /// exclusively locked; the cell is left as it was.
    pub fn lock(&self, key: CellKey, level: u32) -> Result<Locked, PrisonError> {
        sync::lock(&self.table).lock(key, level)
    }

    /// `dm_cell_quiesce_v2`: the continuation comes straight back if `cell`
    /// has no shared holders, else it is stored for the last
    /// [`BioPrisonV2::put`] (replacing, and returning, one stored before).
    ///
    /// Errors: [`PrisonError::StaleCell`].
    pub fn quiesce(&self, cell: CellId, continuation: C) -> Result<Quiesce<C>, PrisonError> {
        sync::lock(&self.table).quiesce(cell, continuation)
    }

    /// `dm_cell_lock_promote_v2`: sets the exclusive lock's level to
    /// `new_level`; returns whether shared holders exist (the caller must
    /// quiesce again). Bios already queued stay queued.
    ///
    /// Errors: [`PrisonError::NotLocked`] (`-EINVAL`),
    /// [`PrisonError::StaleCell`].
    pub fn lock_promote(&self, cell: CellId, new_level: u32) -> Result<bool, PrisonError> {
        sync::lock(&self.table).lock_promote(cell, new_level)
    }

    /// `dm_cell_unlock_v2`: releases the exclusive lock and hands back the
    /// queued bios, oldest first. The cell is removed unless shared holders
    /// remain.
    ///
    /// Errors: [`PrisonError::NotLocked`] (a `BUG_ON` in the kernel),
    /// [`PrisonError::StaleCell`].
    pub fn unlock(&self, cell: CellId) -> Result<Unlocked<B>, PrisonError> {
        sync::lock(&self.table).unlock(cell)
    }

    /// Runs `f` on the table under the lock (for queries and checks).
    pub fn with_table<R>(&self, f: impl FnOnce(&CellTable<B, C>) -> R) -> R {
        f(&sync::lock(&self.table))
    }

    /// The table, taking the prison apart.
    pub fn into_table(self) -> CellTable<B, C> {
        sync::into_inner(self.table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    type Table = CellTable<u32, &'static str>;

    fn granted<B>(g: Get<B>) -> (CellId, B, bool) {
        match g {
            Get::Granted { cell, bio, new_cell } => (cell, bio, new_cell),
            Get::Queued { cell } => panic!("expected a grant, queued in {cell:?}"),
        }
    }

    fn queued<B: fmt::Debug>(g: Get<B>) -> CellId {
        match g {
            Get::Queued { cell } => cell,
            other => panic!("expected the bio to queue, got {other:?}"),
        }
    }

    #[test]
    fn keys_compare_like_the_kernel() {
        let k = |v, dev, b, e| CellKey { virtual_key: v, dev, block_begin: b, block_end: e };
        assert_eq!(cmp_keys(&k(false, 9, 5, 6), &k(true, 0, 0, 1)), Ordering::Less);
        assert_eq!(cmp_keys(&k(false, 1, 0, 1), &k(false, 2, 0, 1)), Ordering::Less);
        assert_eq!(cmp_keys(&k(false, 0, 0, 4), &k(false, 0, 4, 5)), Ordering::Less);
        assert_eq!(cmp_keys(&k(false, 0, 4, 5), &k(false, 0, 0, 4)), Ordering::Greater);
        assert_eq!(cmp_keys(&k(false, 0, 0, 5), &k(false, 0, 4, 9)), Ordering::Equal);
        assert_eq!(origin_key(7), k(false, 0, 7, 8));
        assert_eq!(lock_level(true), WRITE_LOCK_LEVEL);
        assert_eq!(lock_level(false), READ_WRITE_LOCK_LEVEL);

        // A range key finds the one-block cell it overlaps; other devices and
        // spaces never do.
        let mut t = Table::new();
        let (cell, _, _) = granted(t.get(origin_key(3), 0, 1));
        assert_eq!(t.lookup(&k(false, 0, 0, 8)), Some(cell));
        assert_eq!(t.lookup(&k(false, 1, 3, 4)), None);
        assert_eq!(t.lookup(&k(true, 0, 3, 4)), None);
        assert_eq!(t.lock(k(false, 0, 2, 4), 0).map(|l| (l.cell, l.must_quiesce)), Ok((cell, true)));
    }

    #[test]
    fn shared_lock_on_a_free_cell() {
        let prison = BioPrisonV2::<u32, &str>::new();
        let (a, bio, new_cell) = granted(prison.get(origin_key(1), WRITE_LOCK_LEVEL, 10));
        assert_eq!((bio, new_cell), (10, true));
        let (b, _, new_cell) = granted(prison.get(origin_key(1), READ_WRITE_LOCK_LEVEL, 11));
        assert_eq!((b, new_cell), (a, false));
        assert_eq!(prison.with_table(|t| t.view(a).map(|v| (v.shared, v.exclusive))), Some((2, None)));

        let first = prison.put(a).unwrap();
        assert_eq!(first, PutOutcome { released: false, drained: false, run: None, orphaned: None });
        let last = prison.put(a).unwrap();
        assert_eq!(last, PutOutcome { released: true, drained: false, run: None, orphaned: None });
        assert!(prison.with_table(|t| t.is_empty()));
    }

    #[test]
    fn shared_lock_refused_at_or_below_the_exclusive_level_is_queued() {
        let mut t = Table::new();
        let write_locked = t.lock(origin_key(0), WRITE_LOCK_LEVEL).unwrap();
        assert_eq!((write_locked.new_cell, write_locked.must_quiesce), (true, false));
        assert_eq!(queued(t.get(origin_key(0), WRITE_LOCK_LEVEL, 1)), write_locked.cell);
        let (cell, _, _) = granted(t.get(origin_key(0), READ_WRITE_LOCK_LEVEL, 2));
        assert_eq!(cell, write_locked.cell);

        let all_locked = t.lock(origin_key(5), READ_WRITE_LOCK_LEVEL).unwrap();
        assert_eq!(queued(t.get(origin_key(5), WRITE_LOCK_LEVEL, 3)), all_locked.cell);
        assert_eq!(queued(t.get(origin_key(5), READ_WRITE_LOCK_LEVEL, 4)), all_locked.cell);
        granted(t.get(origin_key(5), 2, 5));

        let v = t.view(all_locked.cell).unwrap();
        assert_eq!((v.exclusive, v.shared, v.queued), (Some(1), 1, 2));
        t.check().unwrap();
    }

    #[test]
    fn exclusive_lock_waits_for_shared_holders_and_the_last_put_runs_the_continuation() {
        let mut t = Table::new();
        let (cell, _, _) = granted(t.get(origin_key(2), WRITE_LOCK_LEVEL, 1));
        granted(t.get(origin_key(2), READ_WRITE_LOCK_LEVEL, 2));
        let l = t.lock(origin_key(2), WRITE_LOCK_LEVEL).unwrap();
        assert_eq!(l, Locked { cell, new_cell: false, must_quiesce: true });
        assert_eq!(t.quiesce(cell, "copy"), Ok(Quiesce::Deferred { replaced: None }));

        let none = PutOutcome { released: false, drained: false, run: None, orphaned: None };
        assert_eq!(t.put(cell), Ok(none));
        let due = PutOutcome { released: false, drained: true, run: Some("copy"), orphaned: None };
        assert_eq!(t.put(cell), Ok(due));
        assert!(!t.view(cell).unwrap().has_continuation);
        assert_eq!(t.unlock(cell), Ok(Unlocked { bios: vec![], released: true }));
        assert!(t.is_empty());
    }

    #[test]
    fn last_put_before_the_quiesce_call_reports_the_drain() {
        // lock said "must quiesce", but the holder left before the caller
        // got to quiesce: the put reports the drain, the quiesce runs now.
        let mut t = Table::new();
        let (cell, _, _) = granted(t.get(origin_key(6), WRITE_LOCK_LEVEL, 1));
        assert!(t.lock(origin_key(6), WRITE_LOCK_LEVEL).unwrap().must_quiesce);
        let drained = PutOutcome { released: false, drained: true, run: None, orphaned: None };
        assert_eq!(t.put(cell), Ok(drained));
        assert_eq!(t.quiesce(cell, "now"), Ok(Quiesce::RunNow("now")));
    }

    #[test]
    fn quiesce_with_no_shared_holders_runs_now() {
        let mut t = Table::new();
        let l = t.lock(origin_key(4), READ_WRITE_LOCK_LEVEL).unwrap();
        assert!(!l.must_quiesce);
        assert_eq!(t.quiesce(l.cell, "go"), Ok(Quiesce::RunNow("go")));
        assert!(!t.view(l.cell).unwrap().has_continuation);
    }

    #[test]
    fn shared_holders_above_the_level_delay_the_continuation() {
        // The kernel's FIXME: reads keep getting in under a level-0 lock and
        // each one delays the quiesce.
        let mut t = Table::new();
        let l = t.lock(origin_key(0), WRITE_LOCK_LEVEL).unwrap();
        let (cell, _, _) = granted(t.get(origin_key(0), READ_WRITE_LOCK_LEVEL, 1));
        assert_eq!(t.quiesce(cell, "after reads"), Ok(Quiesce::Deferred { replaced: None }));
        granted(t.get(origin_key(0), READ_WRITE_LOCK_LEVEL, 2));
        assert_eq!(t.put(cell).unwrap().run, None);
        assert_eq!(t.put(cell).unwrap().run, Some("after reads"));
        assert!(t.unlock(l.cell).unwrap().released);
    }

    #[test]
    fn promote_raises_the_level_and_reports_shared_holders() {
        let mut t = Table::new();
        let l = t.lock(origin_key(0), WRITE_LOCK_LEVEL).unwrap();
        let (cell, _, _) = granted(t.get(origin_key(0), READ_WRITE_LOCK_LEVEL, 1));
        assert_eq!(t.lock_promote(cell, READ_WRITE_LOCK_LEVEL), Ok(true));
        assert_eq!(queued(t.get(origin_key(0), READ_WRITE_LOCK_LEVEL, 2)), cell);
        assert_eq!(t.quiesce(cell, "update"), Ok(Quiesce::Deferred { replaced: None }));
        assert_eq!(t.put(cell).unwrap().run, Some("update"));
        assert_eq!(t.lock_promote(cell, READ_WRITE_LOCK_LEVEL), Ok(false));

        // Lowering the level keeps the queued bio queued.
        assert_eq!(t.lock_promote(cell, WRITE_LOCK_LEVEL), Ok(false));
        assert_eq!(t.view(cell).unwrap().queued, 1);
        assert_eq!(t.unlock(l.cell), Ok(Unlocked { bios: vec![2], released: true }));

        let (plain, _, _) = granted(t.get(origin_key(1), 0, 3));
        let e = t.lock_promote(plain, 1).unwrap_err();
        assert_eq!((e, e.errno()), (PrisonError::NotLocked(plain), Some(Errno::EINVAL)));
    }

    #[test]
    fn unlock_returns_the_queued_bios_in_order() {
        let mut t = Table::new();
        let l = t.lock(origin_key(9), READ_WRITE_LOCK_LEVEL).unwrap();
        for bio in 1..=5 {
            queued(t.get(origin_key(9), bio % 2, bio));
        }
        assert_eq!(t.unlock(l.cell), Ok(Unlocked { bios: vec![1, 2, 3, 4, 5], released: true }));
        assert!(t.is_empty());

        // With a shared holder left the cell stays, unlocked, until its put.
        let l = t.lock(origin_key(9), WRITE_LOCK_LEVEL).unwrap();
        queued(t.get(origin_key(9), WRITE_LOCK_LEVEL, 6));
        let (cell, _, _) = granted(t.get(origin_key(9), READ_WRITE_LOCK_LEVEL, 7));
        assert_eq!(t.unlock(l.cell), Ok(Unlocked { bios: vec![6], released: false }));
        let v = t.view(cell).unwrap();
        assert_eq!((v.exclusive, v.shared, v.queued), (None, 1, 0));
        assert!(t.put(cell).unwrap().released);
        assert!(t.is_empty());
    }

    #[test]
    fn second_exclusive_lock_is_busy() {
        let mut t = Table::new();
        let l = t.lock(origin_key(3), WRITE_LOCK_LEVEL).unwrap();
        queued(t.get(origin_key(3), WRITE_LOCK_LEVEL, 1));
        let e = t.lock(origin_key(3), READ_WRITE_LOCK_LEVEL).unwrap_err();
        assert_eq!((e, e.errno()), (PrisonError::Busy(l.cell), Some(Errno::EBUSY)));
        let v = t.view(l.cell).unwrap();
        assert_eq!((v.exclusive, v.queued), (Some(WRITE_LOCK_LEVEL), 1));
    }

    #[test]
    fn second_quiesce_replaces_the_first() {
        let mut t = Table::new();
        let (cell, _, _) = granted(t.get(origin_key(0), 0, 1));
        t.lock(origin_key(0), 0).unwrap();
        assert_eq!(t.quiesce(cell, "first"), Ok(Quiesce::Deferred { replaced: None }));
        assert_eq!(t.quiesce(cell, "second"), Ok(Quiesce::Deferred { replaced: Some("first") }));
        assert_eq!(t.put(cell).unwrap().run, Some("second"));
    }

    #[test]
    fn continuations_outliving_the_exclusive_lock() {
        // Stored, then the lock is dropped: the last put removes the cell and
        // the continuation is orphaned (the kernel forgets it).
        let mut t = Table::new();
        let l = t.lock(origin_key(0), WRITE_LOCK_LEVEL).unwrap();
        let (cell, _, _) = granted(t.get(origin_key(0), READ_WRITE_LOCK_LEVEL, 1));
        assert!(matches!(t.quiesce(cell, "lost"), Ok(Quiesce::Deferred { .. })));
        assert!(!t.unlock(l.cell).unwrap().released);
        let lost = PutOutcome { released: true, drained: false, run: None, orphaned: Some("lost") };
        assert_eq!(t.put(cell), Ok(lost));

        // Stored, lock dropped, locked again: the new lock inherits it.
        let l = t.lock(origin_key(1), WRITE_LOCK_LEVEL).unwrap();
        let (cell, _, _) = granted(t.get(origin_key(1), READ_WRITE_LOCK_LEVEL, 2));
        assert!(matches!(t.quiesce(cell, "stale"), Ok(Quiesce::Deferred { .. })));
        t.unlock(l.cell).unwrap();
        assert!(t.lock(origin_key(1), READ_WRITE_LOCK_LEVEL).unwrap().must_quiesce);
        assert_eq!(t.put(cell).unwrap().run, Some("stale"));
        t.check().unwrap();
    }

    #[test]
    fn misuse_is_an_error_not_a_panic() {
        let mut t = Table::new();
        let l = t.lock(origin_key(0), 0).unwrap();
        assert_eq!(t.put(l.cell), Err(PrisonError::NoSharedHolders(l.cell)));
        let (shared, _, _) = granted(t.get(origin_key(1), 0, 1));
        assert_eq!(t.unlock(shared), Err(PrisonError::NotLocked(shared)));
        t.put(shared).unwrap();
        for r in [
            t.put(shared).map(|_| ()),
            t.unlock(shared).map(|_| ()),
            t.lock_promote(shared, 1).map(|_| ()),
            t.quiesce(shared, "x").map(|_| ()),
        ] {
            assert_eq!(r, Err(PrisonError::StaleCell(shared)));
        }
        assert_eq!(PrisonError::StaleCell(shared).errno(), None);
        assert_eq!(t.view(shared), None);
        t.check().unwrap();
    }

    // ---- random sequences against a reference model ----

    use proptest::prelude::*;
    use std::collections::BTreeMap;

    type NumTable = CellTable<u32, u32>;

    const BLOCKS: u64 = 3;
    const LEVELS: u32 = 3;

    #[derive(Debug, Clone)]
    enum Op {
        Get { block: u64, level: u32 },
        Reissue(usize),
        Put(usize),
        Lock { block: u64, level: u32 },
        Quiesce(usize),
        Promote { lock: usize, level: u32 },
        Unlock(usize),
        PutStale(usize),
        PutWithoutHolder(usize),
        UnlockUnlocked(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..BLOCKS, 0..LEVELS).prop_map(|(block, level)| Op::Get { block, level }),
            2 => any::<usize>().prop_map(Op::Reissue),
            4 => any::<usize>().prop_map(Op::Put),
            2 => (0..BLOCKS, 0..LEVELS).prop_map(|(block, level)| Op::Lock { block, level }),
            2 => any::<usize>().prop_map(Op::Quiesce),
            1 => (any::<usize>(), 0..LEVELS).prop_map(|(lock, level)| Op::Promote { lock, level }),
            2 => any::<usize>().prop_map(Op::Unlock),
            1 => any::<usize>().prop_map(Op::PutStale),
            1 => any::<usize>().prop_map(Op::PutWithoutHolder),
            1 => any::<usize>().prop_map(Op::UnlockUnlocked),
        ]
    }

    /// The rules, per cell, as plainly as possible.
    #[derive(Debug, Default)]
    struct RefCell {
        id: u64,
        /// Shared holders: (bio, level).
        holders: Vec<(u32, u32)>,
        exclusive: Option<u32>,
        waiting: Vec<u32>,
        continuation: Option<u32>,
    }

    #[derive(Debug, Default)]
    struct Reference {
        cells: BTreeMap<u64, RefCell>,
        next_id: u64,
    }

    impl Reference {
        /// The cell of `block`, created if absent; whether it was created.
        fn find_or_create(&mut self, block: u64) -> (&mut RefCell, bool) {
            let new_cell = !self.cells.contains_key(&block);
            if new_cell {
                self.cells.insert(block, RefCell { id: self.next_id, ..RefCell::default() });
                self.next_id += 1;
            }
            (self.cells.get_mut(&block).unwrap(), new_cell)
        }

        fn get(&mut self, block: u64, level: u32, bio: u32) -> Get<u32> {
            let (c, new_cell) = self.find_or_create(block);
            let cell = CellId(c.id);
            if c.exclusive.is_some_and(|x| level <= x) {
                c.waiting.push(bio);
                return Get::Queued { cell };
            }
            c.holders.push((bio, level));
            Get::Granted { cell, bio, new_cell }
        }

        fn put(&mut self, block: u64, bio: u32) -> PutOutcome<u32> {
            let c = self.cells.get_mut(&block).unwrap();
            let at = c.holders.iter().position(|h| h.0 == bio).unwrap();
            c.holders.remove(at);
            let mut out = PutOutcome { released: false, drained: false, run: None, orphaned: None };
            if c.holders.is_empty() {
                if c.exclusive.is_some() {
                    out.drained = true;
                    out.run = c.continuation.take();
                } else {
                    out.orphaned = self.cells.remove(&block).unwrap().continuation;
                    out.released = true;
                }
            }
            out
        }

        fn lock(&mut self, block: u64, level: u32) -> Result<Locked, PrisonError> {
            let (c, new_cell) = self.find_or_create(block);
            if c.exclusive.is_some() {
                return Err(PrisonError::Busy(CellId(c.id)));
            }
            c.exclusive = Some(level);
            Ok(Locked { cell: CellId(c.id), new_cell, must_quiesce: !c.holders.is_empty() })
        }

        fn quiesce(&mut self, block: u64, k: u32) -> Quiesce<u32> {
            let c = self.cells.get_mut(&block).unwrap();
            if c.holders.is_empty() {
                Quiesce::RunNow(k)
            } else {
                Quiesce::Deferred { replaced: c.continuation.replace(k) }
            }
        }

        fn promote(&mut self, block: u64, level: u32) -> bool {
            let c = self.cells.get_mut(&block).unwrap();
            c.exclusive = Some(level);
            !c.holders.is_empty()
        }

        fn unlock(&mut self, block: u64) -> Unlocked<u32> {
            let c = self.cells.get_mut(&block).unwrap();
            let bios = std::mem::take(&mut c.waiting);
            c.exclusive = None;
            let released = c.holders.is_empty();
            if released {
                self.cells.remove(&block);
            }
            Unlocked { bios, released }
        }

        fn live(&self, block: u64, cell: CellId) -> bool {
            self.cells.get(&block).is_some_and(|c| CellId(c.id) == cell)
        }
    }

    fn pick<T>(v: &[T], i: usize) -> Option<usize> {
        (!v.is_empty()).then(|| i % v.len())
    }

    /// What the test holds: granted shared locks (cell, block, bio), exclusive
    /// locks (cell, block), handles of removed cells, bios handed back by
    /// unlock to re-issue (block, bio, level), and every bio's block and
    /// level.
    #[derive(Default)]
    struct Holds {
        shared: Vec<(CellId, u64, u32)>,
        exclusive: Vec<(CellId, u64)>,
        dead: Vec<CellId>,
        ready: Vec<(u64, u32, u32)>,
        bios: BTreeMap<u32, (u64, u32)>,
    }

    fn issue(
        t: &mut NumTable,
        r: &mut Reference,
        h: &mut Holds,
        block: u64,
        bio: u32,
        level: u32,
    ) -> Result<(), TestCaseError> {
        let got = t.get(origin_key(block), level, bio);
        prop_assert_eq!(&got, &r.get(block, level, bio));
        h.bios.insert(bio, (block, level));
        if let Get::Granted { cell, .. } = got {
            h.shared.push((cell, block, bio));
        }
        Ok(())
    }

    fn step(
        t: &mut NumTable,
        r: &mut Reference,
        h: &mut Holds,
        op: Op,
        serial: u32,
    ) -> Result<(), TestCaseError> {
        match op {
            Op::Get { block, level } => issue(t, r, h, block, serial, level)?,
            Op::Reissue(i) => {
                if let Some(i) = pick(&h.ready, i) {
                    let (block, bio, level) = h.ready.remove(i);
                    issue(t, r, h, block, bio, level)?;
                }
            }
            Op::Put(i) => {
                if let Some(i) = pick(&h.shared, i) {
                    let (cell, block, bio) = h.shared.remove(i);
                    let out = t.put(cell);
                    let want = r.put(block, bio);
                    if want.released {
                        h.dead.push(cell);
                    }
                    prop_assert_eq!(out, Ok(want));
                }
            }
            Op::Lock { block, level } => {
                let out = t.lock(origin_key(block), level);
                prop_assert_eq!(out, r.lock(block, level));
                if let Ok(l) = out {
                    h.exclusive.push((l.cell, block));
                }
            }
            Op::Quiesce(i) => {
                if let Some(i) = pick(&h.exclusive, i) {
                    let (cell, block) = h.exclusive[i];
                    prop_assert_eq!(t.quiesce(cell, serial), Ok(r.quiesce(block, serial)));
                }
            }
            Op::Promote { lock, level } => {
                if let Some(i) = pick(&h.exclusive, lock) {
                    let (cell, block) = h.exclusive[i];
                    prop_assert_eq!(t.lock_promote(cell, level), Ok(r.promote(block, level)));
                }
            }
            Op::Unlock(i) => {
                if let Some(i) = pick(&h.exclusive, i) {
                    let (cell, block) = h.exclusive.remove(i);
                    let out = t.unlock(cell);
                    let want = r.unlock(block);
                    if want.released {
                        h.dead.push(cell);
                    }
                    for &bio in &want.bios {
                        let (b, level) = h.bios[&bio];
                        h.ready.push((b, bio, level));
                    }
                    prop_assert_eq!(out, Ok(want));
                }
            }
            Op::PutStale(i) => {
                if let Some(i) = pick(&h.dead, i) {
                    let cell = h.dead[i];
                    prop_assert_eq!(t.put(cell), Err(PrisonError::StaleCell(cell)));
                    prop_assert_eq!(t.unlock(cell), Err(PrisonError::StaleCell(cell)));
                    prop_assert_eq!(t.lock_promote(cell, 0), Err(PrisonError::StaleCell(cell)));
                    prop_assert_eq!(t.quiesce(cell, 0), Err(PrisonError::StaleCell(cell)));
                }
            }
            Op::PutWithoutHolder(i) => {
                if let Some(i) = pick(&h.exclusive, i) {
                    let (cell, block) = h.exclusive[i];
                    if r.cells[&block].holders.is_empty() {
                        prop_assert_eq!(t.put(cell), Err(PrisonError::NoSharedHolders(cell)));
                    }
                }
            }
            Op::UnlockUnlocked(i) => {
                if let Some(i) = pick(&h.shared, i) {
                    let (cell, block, _) = h.shared[i];
                    if r.cells[&block].exclusive.is_none() {
                        prop_assert_eq!(t.unlock(cell), Err(PrisonError::NotLocked(cell)));
                        prop_assert_eq!(t.lock_promote(cell, 0), Err(PrisonError::NotLocked(cell)));
                    }
                }
            }
        }
        Ok(())
    }

    /// The table and the reference agree cell by cell, the table's own
    /// invariants hold, and every handle the test holds names a live cell.
    fn agree(t: &NumTable, r: &Reference, h: &Holds) -> Result<(), TestCaseError> {
        prop_assert_eq!(t.check(), Ok(()));
        prop_assert_eq!(t.len(), r.cells.len());
        for block in 0..BLOCKS {
            let live = t.lookup(&origin_key(block)).and_then(|id| t.view(id).map(|v| (id, v)));
            match (live, r.cells.get(&block)) {
                (None, None) => {}
                (Some((id, v)), Some(c)) => {
                    prop_assert_eq!(id, CellId(c.id));
                    prop_assert_eq!(v.shared as usize, c.holders.len());
                    prop_assert_eq!(v.exclusive, c.exclusive);
                    prop_assert_eq!(v.queued, c.waiting.len());
                    prop_assert_eq!(v.has_continuation, c.continuation.is_some());
                }
                (t, r) => prop_assert!(false, "block {}: table {:?}, reference {:?}", block, t, r),
            }
        }
        for &(cell, block, _) in &h.shared {
            prop_assert!(r.live(block, cell));
        }
        for &(cell, block) in &h.exclusive {
            prop_assert!(r.live(block, cell));
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_sequences_follow_the_reference(ops in prop::collection::vec(op(), 0..150)) {
            let mut t = NumTable::default();
            let mut r = Reference::default();
            let mut h = Holds::default();
            for (serial, op) in ops.into_iter().enumerate() {
                step(&mut t, &mut r, &mut h, op, serial as u32)?;
                agree(&t, &r, &h)?;
            }
            // Draining: every hold dropped and every lock released leaves an
            // empty prison.
            while let Some((cell, block, bio)) = h.shared.pop() {
                prop_assert_eq!(t.put(cell), Ok(r.put(block, bio)));
            }
            while let Some((cell, block)) = h.exclusive.pop() {
                let out = t.unlock(cell);
                prop_assert_eq!(&out, &Ok(r.unlock(block)));
                prop_assert!(out.unwrap().released);
            }
            prop_assert!(t.is_empty());
            prop_assert_eq!(t.check(), Ok(()));
        }
    }
}
