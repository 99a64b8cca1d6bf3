//! The dm-cache target's I/O paths (dm-cache-target.c of Linux 6.1, spec
//! §4.6, §4.7 and §5.6): the map path, bio prison v2, migrations with their
//! copies as asynchronous data I/O, the committer, the waker, writethrough
//! and passthrough, discards, invalidation.
//!
//! [`Cache`] owns a [`CacheTarget`] (the lifecycle: table, metadata, policy,
//! in-core dirty and discard bits, statistics) and the two data devices.
//! Everything happens in steps the caller chooses, like the thin pool's:
//!
//! - [`Cache::submit`] is the submitter's context: DM core cuts the request
//!   at cache block boundaries and `cache_map` runs on each piece — flushes,
//!   FUA-less discards and flushes go to the deferred list, the rest through
//!   `map_bio` (shared lock on the origin block's cell, policy lookup,
//!   remap);
//! - [`Cache::run_worker`] is one pass of the workqueue: queued
//!   continuations (migration steps), the deferred bios, the migration
//!   worker (`check_migrations`), and the committer (`__commit`: commit if
//!   the metadata changed, then issue the bios and run the continuations
//!   that waited for it);
//! - [`Cache::complete_io`] / [`Cache::fail_io`] perform one data I/O on its
//!   device (remapped bios, kcopyd copies, passdown discards, flushes) and
//!   run its end-io path;
//! - [`Cache::set_time`] runs the waker each second of simulated time
//!   (policy tick, migration worker, commit).
//!
//! The entry points take `&self`: the shared state sits behind
//! [`crate::sync`] locks, one per lock domain of the kernel's (see
//! [`Cache`]), so the simulator single-steps the same code that the loom and
//! shuttle harnesses (`sim/src/cache_concurrency.rs`) run on threads.
//!
//! Deliberate differences from the kernel, invisible to a user of the
//! device: one lock here covers several of the kernel's where they guard
//! state no path touches apart (fewer interleavings, never more); mempools
//! never run dry; suspend needs the caller to have
//! drained every bio first (the kernel's flush suspend), so no bio is ever
//! requeued; bios past the last whole origin block are passed to the origin
//! as the kernel does, but the simulator never sends any.
//!
//! Two candidate fixes for kernel behaviours dmsim found are switchable
//! ([`CacheFixes`]); off, the model is kernel 6.1.

use std::collections::{BTreeMap, VecDeque};

use crate::block_device::{BlockDevice, WriteFlags, SECTOR_SIZE};
use crate::cache::metadata::CacheMetadata;
use crate::cache::policy::smq::DEFAULT_HZ;
use crate::cache::policy::{CachePolicy, DataDir, Nanos, PolicyOp, PolicyWork};
use crate::cache::table::{DeviceSizes, IoMode};
use crate::cache::target::{CacheMode, CacheTarget};
use crate::errno::Errno;
use crate::mutation::Mutations;
use crate::prison_v2::{
    lock_level, origin_key, CellId, CellTable, Get, Quiesce, READ_WRITE_LOCK_LEVEL, WRITE_LOCK_LEVEL,
};
use crate::sync::{get_mut, into_inner, lock, Mutex, MutexGuard};
use crate::thin::pool::TargetError;
pub use crate::thin::pool::{BioId, BioOp, BioRequest};

/// The waker's period (`COMMIT_PERIOD`, one second).
pub const COMMIT_PERIOD: Nanos = 1_000_000_000;

/// Candidate fixes for kernel behaviours dmsim found in the cache target
/// (all off by default: the model behaves as kernel 6.1 does).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheFixes {
    /// After a suspend and resume of the same table, the superblock keeps
    /// CLEAN_SHUTDOWN until the next commit, and a write that dirties a
    /// clean cached block changes no metadata, so its flush commits nothing
    /// (the dm-cache finding shown on the stock kernel). Any write that
    /// reaches the cache device in that window — a write that dirties a
    /// block, but also a writethrough write to a clean block whose origin
    /// half a crash loses — leaves the block recorded clean with newer data
    /// in the cache. The fix: a resume that finds CLEAN_SHUTDOWN on disk
    /// commits at once, clearing it, as a fresh open does.
    pub resume_clears_clean_shutdown: bool,
    /// The cache target commits its metadata without flushing the cache and
    /// origin devices first (`commit` has no pre-commit flush, unlike
    /// dm-thin's), and kcopyd's copies are plain writes. A commit can then
    /// make durable a promotion's mapping whose copy is still in the cache
    /// device's volatile cache, or a demotion's removal whose writeback
    /// copy is still in the origin's. The fix flushes both devices before
    /// every metadata commit. (Shown on the stock kernel: docs/findings.md,
    /// dm-cache finding 1.)
    pub flush_before_commit: bool,
    /// A FUA write promoted by overwrite (writeback mode, a whole-block
    /// write or a discarded block, a free cache block) is completed when its
    /// data reaches the cache block (`mg_complete` ends the bio), but the
    /// mapping that makes the block findable is only inserted, not
    /// committed: the map path returns before its FUA check for such bios.
    /// A crash before the next commit loses the acknowledged FUA write. The
    /// fix completes such a bio only after the next commit.
    pub fua_overwrite_waits_for_commit: bool,
    /// In writethrough mode a write to a clean cached block goes to the
    /// origin and the cache at once, under a shared lock; two overlapping
    /// writes in flight together can land in opposite orders on the two
    /// devices. The block stays clean, so when the cache drops it, reads
    /// change from one write's data to the other's with no new write. The
    /// fix lets one writethrough pair per cache block be in flight; the
    /// next waits for it.
    pub writethrough_pairs_one_at_a_time: bool,
    /// After a metadata failure the cache goes read-only: the abort takes
    /// the metadata back to the last commit, but the cache keeps using the
    /// mappings it made since, and a flush or FUA bio that finds nothing
    /// changed in the (new, empty) transaction completes without a commit
    /// (`dm_cache_changed_this_transaction` is false). A write to a block
    /// whose mapping the abort dropped, then a flush, is acknowledged as
    /// durable, and a crash loses it (the block reads the origin's old
    /// data). dm-thin refuses the same: its commit fails in read-only mode
    /// and the flush and FUA bios waiting for it are errored. The fix does
    /// that: in read-only and fail modes, bios waiting for a commit fail
    /// with EIO.
    pub read_only_flushes_fail: bool,
}

impl CacheFixes {
    /// Every candidate fix on.
    pub const ALL: CacheFixes = CacheFixes {
        resume_clears_clean_shutdown: true,
        flush_before_commit: true,
        fua_overwrite_waits_for_commit: true,
        writethrough_pairs_one_at_a_time: true,
        read_only_flushes_fail: true,
    };
}

/// Knobs that are not part of the table line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheOptions {
    /// Deliberate bugs for detector tests (all off by default).
    pub mutations: Mutations,
    /// Candidate fixes (all off by default).
    pub fixes: CacheFixes,
    /// Time between a table's load and its resume (zero by default). smq
    /// starts its periods at the load, and the resume ticks it; a kernel
    /// replay that follows the kernel's jiffies sets this to what the
    /// kernel took.
    pub resume_delay: Nanos,
    /// Where the waker's next run falls. `None` (the default): exactly one
    /// [`COMMIT_PERIOD`] after its last run. `Some(phase)`: where 6.1's
    /// timer wheel puts a delayed work of `HZ` jiffies (a timer 64 to 511
    /// jiffies away lands in a bucket of 8 jiffies, and fires at the first
    /// multiple of 8 strictly after its due jiffy, `calc_index` in
    /// kernel/time/timer.c), `phase` being the absolute jiffy (mod 8) at
    /// simulated time 0. A kernel replay that follows the kernel's jiffies
    /// sets it.
    pub waker_wheel_phase: Option<u64>,
}

/// One of the target's two data devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CacheDisk {
    /// The fast device holding cache blocks.
    Cache,
    /// The slow origin device.
    Origin,
}

/// Names one data I/O in flight, for [`Cache::complete_io`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CacheIoId(pub u64);

/// What a data I/O in flight does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheIoKind {
    /// A bio remapped to a device, reading.
    Read,
    /// A bio remapped to a device, writing (a writethrough clone included).
    Write,
    /// An empty flush passed to a device.
    Flush,
    /// A passdown discard to the origin.
    Discard,
    /// A kcopyd copy of one block between the devices (`disk` is the
    /// destination).
    Copy,
}

/// A data I/O in flight, as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheIoInfo {
    /// Its id.
    pub id: CacheIoId,
    /// What it does.
    pub kind: CacheIoKind,
    /// The device it touches (the destination of a copy).
    pub disk: CacheDisk,
    /// First sector it touches there.
    pub sector: u64,
    /// Sectors.
    pub nr_sectors: u64,
    /// A FUA write.
    pub fua: bool,
}

/// A finished request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheCompletion {
    /// Which request.
    pub id: BioId,
    /// Success, or the errno it completed with.
    pub result: Result<(), Errno>,
    /// What a successful read returned; empty otherwise.
    pub data: Vec<u8>,
}

/// Counters for reports and coverage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounters {
    /// Migrations started, by kind: promotions, demotions, writebacks.
    pub started: [u64; 3],
    /// Migrations completed successfully, by kind.
    pub succeeded: [u64; 3],
    /// Promotions that used the bio itself (overwrite).
    pub overwrites: u64,
    /// Metadata commits (`commit_count`).
    pub commits: u64,
    /// Cells whose lock made a bio wait.
    pub bios_waited: u64,
    /// Invalidations started by passthrough writes.
    pub invalidations: u64,
}

type PieceId = u64;
type MgId = u64;

/// A bio as the cache target sees it (one cache block at most).
#[derive(Debug)]
struct Piece {
    parent: BioId,
    /// Byte offset in the parent's payload.
    offset: usize,
    op: BioOp,
    sector: u64,
    nr_sectors: u64,
    fua: bool,
    /// The flush clone's number (0: origin, 1: cache).
    req_nr: u8,
    data: Vec<u8>,
    /// The shared lock this bio holds.
    cell: Option<CellId>,
    /// Where it was remapped: device and sector.
    dest: Option<(CacheDisk, u64)>,
    /// Data I/Os of this bio in flight (two for a writethrough pair).
    pending: u32,
    /// `pending` already counts the bio's own I/O (a writethrough pair
    /// counts both halves when the clone is sent, so that the clone's
    /// completion cannot end the bio before the bio itself was issued).
    self_counted: bool,
    status: Result<(), Errno>,
    /// The migration this bio is the overwrite of (`overwrite_endio`).
    hooked: Option<MgId>,
    /// `pb->tick`.
    tick: bool,
    /// The cache block of the writethrough pair this bio is (the
    /// writethrough fix).
    wt_cblock: Option<u32>,
    /// Counted by the I/O tracker.
    accounted: bool,
}

/// A migration step, run as a continuation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Copy,
    UpgradeLock,
    UpdateMetadata,
    UpdateMetadataAfterCopy,
    Success,
    InvalidateRemove,
    InvalidateCommitted,
    InvalidateCompleted,
}

#[derive(Debug)]
struct Migration {
    work: Option<PolicyWork>,
    overwrite: Option<PieceId>,
    cell: Option<CellId>,
    /// `k.input`.
    input: Result<(), Errno>,
    /// (cblock, oblock) of an invalidation.
    invalidate: Option<(u32, u64)>,
}

#[derive(Debug)]
enum DataIo {
    Piece {
        piece: PieceId,
        disk: CacheDisk,
        sector: u64,
        nr_sectors: u64,
        op: BioOp,
        fua: bool,
    },
    /// A writethrough clone nobody waits for (the deliberate bug
    /// `cache-writethrough-acks-before-origin`): it carries its own data.
    Detached {
        disk: CacheDisk,
        sector: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Copy {
        mg: MgId,
        from: (CacheDisk, u64),
        to: (CacheDisk, u64),
        nr_sectors: u64,
    },
}

#[derive(Debug)]
struct UserIo {
    pending: usize,
    result: Result<(), Errno>,
    is_read: bool,
    data: Vec<u8>,
    after_flush: Vec<Piece>,
}

/// A reload whose new table and old table were both refused: the devices
/// come back with the old table's error.
#[derive(Debug)]
pub struct ReloadFailure<M, C, O> {
    /// Metadata, cache and origin devices.
    pub devices: (M, C, O),
    /// Why the old table could not be loaded again.
    pub error: TargetError,
}

/// What [`Cache::reload`] returns: the cache (with the new table, or the
/// old one resumed) and whether the new table was taken; or, if neither
/// table loads, the devices.
pub type ReloadResult<M, C, O> = Result<(Cache<M, C, O>, Result<(), TargetError>), ReloadFailure<M, C, O>>;

/// An active cache target with its data devices: metadata on `M`, cache
/// blocks on `C`, the origin on `O`.
///
/// Its shared state sits behind [`crate::sync`] locks, one per lock domain
/// of the kernel's (see the fields), so that the same code runs
/// single-stepped by the simulator and on the threads of the loom and
/// shuttle harnesses, where the contexts interleave between any two
/// critical sections as the kernel's do. A critical section holds one lock,
/// but for a data I/O, which holds the bio's memory and then its device
/// (lock order: `objs` before `cdev`/`odev`).
#[derive(Debug)]
pub struct Cache<M, C, O> {
    /// The target: table, mode, metadata (its `root_lock`), smq (its
    /// `mq->lock`, which also guards the background tracker), the dirty and
    /// discard bitsets and the statistics (atomic bit operations and
    /// counters in the kernel; one lock here, never held across another).
    t: Mutex<CacheTarget<M>>,
    /// What the table fixes (it changes only with a reload, which builds a
    /// new `Cache`).
    geo: Geometry,
    params: String,
    cdev: Mutex<C>,
    odev: Mutex<O>,
    opts: CacheOptions,
    /// Bio prison v2's spinlock and its cells.
    prison: Mutex<CellTable<PieceId, (MgId, Step)>>,
    /// `cache->lock` (the deferred bios), the committer's batcher lock (the
    /// bios and continuations waiting for a commit), the workqueue's
    /// (continuations ready to run) and the completions DM core reports.
    lists: Mutex<Lists>,
    /// The memory of bios and migrations (per-bio data, `struct
    /// dm_cache_migration`) and of the data I/O in flight: owned by one
    /// context at a time in the kernel, kept in one table here.
    objs: Mutex<Objects>,
    /// The I/O tracker (`iot->lock`), the migration counters (atomics), the
    /// waker's clock and the lifecycle flags.
    state: Mutex<State>,
    /// The first broken precondition of the model's own bookkeeping.
    broken: Mutex<Option<String>>,
}

/// The table's fixed numbers.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    block_sectors: u64,
    origin_blocks: u64,
    discard_block_size: u64,
    io_mode: IoMode,
    discard_passdown: bool,
}

/// What `cache->lock`, the batcher and the workqueue guard.
#[derive(Debug, Default)]
struct Lists {
    deferred: VecDeque<PieceId>,
    ready: VecDeque<(MgId, Step)>,
    commit_scheduled: bool,
    commit_queued: bool,
    commit_bios: Vec<PieceId>,
    commit_work: Vec<(MgId, Step)>,
    /// Bios to complete after the next commit (the FUA overwrite fix).
    commit_ends: Vec<PieceId>,
    /// Writethrough pairs in flight per cache block, and the bios waiting
    /// for them (the writethrough fix).
    wt_pairs: BTreeMap<u32, (PieceId, VecDeque<(PieceId, u64)>)>,
    wake_migrations: bool,
    completions: Vec<CacheCompletion>,
}

/// Bios, migrations and data I/O in flight.
#[derive(Debug, Default)]
struct Objects {
    next_bio: u64,
    next_piece: PieceId,
    next_io: u64,
    next_mg: MgId,
    pieces: BTreeMap<PieceId, Piece>,
    user: BTreeMap<BioId, UserIo>,
    io: BTreeMap<CacheIoId, DataIo>,
    migrations: BTreeMap<MgId, Migration>,
}

impl Objects {
    /// Registers a new migration under the next id.
    fn new_migration(&mut self, m: Migration) -> MgId {
        let mg = self.next_mg;
        self.next_mg += 1;
        self.migrations.insert(mg, m);
        mg
    }

    /// Puts a data I/O in flight under the next id.
    fn new_io(&mut self, io: DataIo) -> CacheIoId {
        let id = CacheIoId(self.next_io);
        self.next_io += 1;
        self.io.insert(id, io);
        id
    }
}

/// Counters, the I/O tracker, the clock and the lifecycle flags.
#[derive(Debug)]
struct State {
    io_migrations: u32,
    background_nr: u32,
    background_allowed: bool,
    now: Nanos,
    next_waker: Nanos,
    in_flight_sectors: u64,
    /// When the I/O tracker last went idle (`idle_time`); None for a new
    /// table, whose tracker starts idle long since (`dm_iot_init` sets
    /// `idle_time` to 0, and jiffies start far above it).
    idle_since: Option<Nanos>,
    need_tick_bio: bool,
    /// Suspended: not yet resumed, or suspended since (I/O waits in dm
    /// core; only a resume or a reload moves on).
    suspended: bool,
    /// The superblock on disk says CLEAN_SHUTDOWN (a suspend wrote it and
    /// no commit has cleared it since).
    clean_on_disk: bool,
    counters: CacheCounters,
}

fn err(errno: Errno, what: impl Into<String>) -> TargetError {
    TargetError { errno, message: what.into() }
}

/// Sizes a target may see on these devices: no larger than they are.
fn fits(sizes: DeviceSizes, cache: &impl BlockDevice, origin: &impl BlockDevice) -> Result<(), TargetError> {
    if sizes.cache_sectors > cache.nr_sectors() || sizes.origin_sectors > origin.nr_sectors() {
        return Err(err(
            Errno::EINVAL,
            format!(
                "device sizes {sizes:?} exceed the devices ({} cache sectors, {} origin sectors)",
                cache.nr_sectors(),
                origin.nr_sectors()
            ),
        ));
    }
    Ok(())
}

impl<M: BlockDevice, C: BlockDevice, O: BlockDevice> Cache<M, C, O> {
    /// Loads the table `params` (see [`CacheTarget::create`]) over the
    /// three devices and resumes it at time `now`.
    pub fn create(
        params: &str,
        metadata: M,
        cache: C,
        origin: O,
        now: Nanos,
        opts: CacheOptions,
    ) -> Result<Self, TargetError> {
        let sizes = DeviceSizes {
            target_len: origin.nr_sectors(),
            cache_sectors: cache.nr_sectors(),
            origin_sectors: origin.nr_sectors(),
        };
        Self::create_sized(params, sizes, metadata, cache, origin, now, opts)
    }

    /// [`Self::create`] with the sizes the target sees: the table's length
    /// (`target_len`, the origin blocks it caches), the cache device's size
    /// and the origin device's. The devices underneath may be larger (as a
    /// dm-linear presents the first part of a larger disk); sizes past
    /// them are an error.
    pub fn create_sized(
        params: &str,
        sizes: DeviceSizes,
        metadata: M,
        cache: C,
        origin: O,
        now: Nanos,
        opts: CacheOptions,
    ) -> Result<Self, TargetError> {
        fits(sizes, &cache, &origin)?;
        let mut t = CacheTarget::create(params, sizes, metadata, now)?;
        t.md.set_mutations(opts.mutations);
        let c = Self::assemble(t, params, cache, origin, now + opts.resume_delay, opts);
        c.resume()?;
        Ok(c)
    }

    fn assemble(t: CacheTarget<M>, params: &str, cdev: C, odev: O, now: Nanos, opts: CacheOptions) -> Self {
        let geo = Geometry {
            block_sectors: t.table().block_sectors,
            origin_blocks: t.geometry().1,
            discard_block_size: t.discard_block_size,
            io_mode: t.table().io_mode,
            discard_passdown: t.table().discard_passdown,
        };
        Cache {
            geo,
            t: Mutex::new(t),
            params: params.to_string(),
            cdev: Mutex::new(cdev),
            odev: Mutex::new(odev),
            opts,
            prison: Mutex::new(CellTable::new()),
            lists: Mutex::new(Lists::default()),
            objs: Mutex::new(Objects::default()),
            state: Mutex::new(State {
                io_migrations: 0,
                background_nr: 0,
                background_allowed: false,
                now,
                next_waker: now,
                in_flight_sectors: 0,
                idle_since: None,
                need_tick_bio: true,
                suspended: true,
                clean_on_disk: false,
                counters: CacheCounters::default(),
            }),
            broken: Mutex::new(None),
        }
    }

    fn t(&self) -> MutexGuard<'_, CacheTarget<M>> {
        lock(&self.t)
    }

    fn prison(&self) -> MutexGuard<'_, CellTable<PieceId, (MgId, Step)>> {
        lock(&self.prison)
    }

    fn lists(&self) -> MutexGuard<'_, Lists> {
        lock(&self.lists)
    }

    fn objs(&self) -> MutexGuard<'_, Objects> {
        lock(&self.objs)
    }

    fn st(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn resume(&self) -> Result<(), TargetError> {
        self.t().preresume()?;
        let (now, clean_on_disk) = {
            let st = self.st();
            (st.now, st.clean_on_disk)
        };
        self.t().resume(now);
        self.st().suspended = false;
        if self.opts.fixes.resume_clears_clean_shutdown && clean_on_disk {
            // The clean-shutdown fix (see CacheFixes).
            self.t().md.mark_changed();
            let _ = self.commit();
        }
        {
            let mut st = self.st();
            st.background_allowed = true;
            st.next_waker = self.waker_due(now);
        }
        self.lists().wake_migrations = true;
        Ok(())
    }

    /// `prevent_background_work` (the presuspend half of a suspend): no new
    /// migration starts from now on (those in flight finish); a resume
    /// allows them again. A migration that keeps failing (a writeback to a
    /// bad origin sector) is retried for ever while the cache is idle, as in
    /// the kernel; only this stops the retries.
    pub fn prevent_background_work(&self) {
        self.st().background_allowed = false;
    }

    /// Suspends (a flush suspend): every request must have completed and
    /// the worker must be idle. Background work stops, then the clean
    /// shutdown is written (in write mode).
    pub fn suspend(&self) -> Result<(), TargetError> {
        if self.st().suspended {
            // dm core refuses to suspend a suspended device (a table whose
            // preresume failed was never resumed); no postsuspend runs.
            return Err(err(Errno::EINVAL, "the device is already suspended"));
        }
        if !self.is_idle() {
            return Err(err(Errno::EBUSY, "suspend with I/O or migrations in flight"));
        }
        {
            let mut st = self.st();
            st.suspended = true;
            st.background_allowed = false;
        }
        if self.opts.fixes.flush_before_commit && self.mode() == CacheMode::Write {
            // An error shows up on the next data I/O.
            let _ = self.flush_data_devices();
        }
        let r = self.t().postsuspend();
        let write = self.mode() == CacheMode::Write;
        let mut st = self.st();
        if r.is_ok() && write {
            st.clean_on_disk = true;
        }
        st.counters.commits += 1;
        Ok(())
    }

    /// Swaps in a new table on the same devices after [`Self::suspend`]
    /// (the metadata object is kept, as the kernel shares it), then
    /// resumes. If the new table is refused (its constructor's error), the
    /// old table stays loaded, as it was, and is resumed; the constructor's
    /// error comes back with it. If the new table's preresume fails, the cache comes
    /// back suspended with the new table and the error (as the kernel
    /// leaves the device: another table must be loaded, with this call,
    /// without a suspend).
    pub fn reload(self, params: &str) -> ReloadResult<M, C, O> {
        let sizes = self.t().sizes();
        self.reload_sized(params, sizes)
    }

    /// [`Self::reload`] with new device sizes (see [`Self::create_sized`]):
    /// a table on a resized cache device (the metadata's mapping array is
    /// resized at preresume; a shrink over a dirty block is refused) or
    /// with a new length (more or fewer origin blocks cached; mappings past
    /// a shorter origin's end are dropped if clean, refused with EFBIG if
    /// dirty). A constructor's refusal resumes the old table at its own
    /// sizes.
    pub fn reload_sized(mut self, params: &str, sizes: DeviceSizes) -> ReloadResult<M, C, O> {
        let checked = fits(sizes, &*lock(&self.cdev), &*lock(&self.odev))
            .and_then(|()| get_mut(&mut self.t).check_reload(params, sizes).map_err(TargetError::from));
        if let Err(e) = checked {
            // The load's error is the one reported; if the old table does
            // not resume either (one whose own preresume failed), the
            // cache stays suspended (see `is_suspended`).
            let _ = self.resume();
            return Ok((self, Err(e)));
        }
        self.swap_table(params, sizes)
    }

    /// Loads `params` on `sizes` as a new target on the same devices and
    /// resumes it (a failed preresume leaves it suspended, see
    /// [`Self::reload`]).
    fn swap_table(self, params: &str, sizes: DeviceSizes) -> ReloadResult<M, C, O> {
        let Cache { t, cdev, odev, opts, state, .. } = self;
        let State { now, clean_on_disk, counters, .. } = into_inner(state);
        let (cdev, odev) = (into_inner(cdev), into_inner(odev));
        let md = into_inner(t).into_metadata();
        let t = match CacheTarget::reload(params, sizes, md, now) {
            Ok(t) => t,
            Err((md, e)) => {
                return Err(ReloadFailure { devices: (md.crash(), cdev, odev), error: TargetError::from(e) })
            }
        };
        let c = Self::assemble(t, params, cdev, odev, now + opts.resume_delay, opts);
        {
            let mut st = c.st();
            st.clean_on_disk = clean_on_disk;
            st.counters = counters;
        }
        let r = c.resume();
        Ok((c, r))
    }

    /// Removes the target after [`Self::suspend`]: the devices.
    pub fn close(self) -> (M, C, O) {
        (into_inner(self.t).close(), into_inner(self.cdev), into_inner(self.odev))
    }

    /// Power cut: the devices as they are (the caller decides what their
    /// volatile caches keep).
    pub fn crash(self) -> (M, C, O) {
        (into_inner(self.t).md.crash(), into_inner(self.cdev), into_inner(self.odev))
    }

    /// Whether the device is suspended: after [`Self::suspend`], or with
    /// a table whose resume failed.
    pub fn is_suspended(&self) -> bool {
        self.st().suspended
    }

    /// The table line the target was loaded with.
    pub fn params(&self) -> &str {
        &self.params
    }

    /// The lifecycle part: table, policy, metadata, in-core bits (under
    /// their lock: drop the guard before the next call).
    pub fn target(&self) -> MutexGuard<'_, CacheTarget<M>> {
        self.t()
    }

    /// The metadata.
    pub fn metadata(&mut self) -> &mut CacheMetadata<M> {
        &mut get_mut(&mut self.t).md
    }

    /// The cache device.
    pub fn cache_device(&mut self) -> &mut C {
        get_mut(&mut self.cdev)
    }

    /// The origin device.
    pub fn origin_device(&mut self) -> &mut O {
        get_mut(&mut self.odev)
    }

    fn mode(&self) -> CacheMode {
        self.t().mode
    }

    /// Counters since creation (kept across reloads).
    pub fn counters(&self) -> CacheCounters {
        self.st().counters
    }

    /// An internal inconsistency the model detected (a bug of the model,
    /// or of a deliberately broken variant), if any.
    pub fn broken(&self) -> Option<String> {
        lock(&self.broken).clone()
    }

    fn bug(&self, what: String) {
        let mut broken = lock(&self.broken);
        if broken.is_none() {
            *broken = Some(what);
        }
    }

    /// The INFO status line (commits as a side effect unless `noflush`).
    pub fn status(&self, noflush: bool) -> String {
        if !noflush && self.opts.fixes.flush_before_commit && self.mode() == CacheMode::Write {
            // An error shows up on the next data I/O.
            let _ = self.flush_data_devices();
        }
        let s = self.t().status(noflush);
        if !noflush && self.mode() == CacheMode::Write {
            let mut st = self.st();
            st.clean_on_disk = false;
            st.counters.commits += 1;
        }
        s
    }

    /// A message: a config key (see [`CacheTarget::message`]) or
    /// `invalidate_cblocks` (passthrough only: every cache block in the
    /// ranges is removed from the policy and the metadata; the next commit
    /// makes it durable).
    pub fn message(&self, words: &[&str]) -> Result<(), Errno> {
        if words.first().is_some_and(|w| w.eq_ignore_ascii_case("invalidate_cblocks")) {
            let ranges = self.t().parse_invalidate(words)?;
            for (begin, end) in ranges {
                for c in begin..end {
                    self.invalidate_cblock(c as u32)?;
                }
            }
            return Ok(());
        }
        self.t().message(words)
    }

    /// Sets [`CacheOptions::resume_delay`] for the next reload.
    pub fn set_resume_delay(&mut self, delay: Nanos) {
        self.opts.resume_delay = delay;
    }

    /// The simulated time.
    pub fn now(&self) -> Nanos {
        self.st().now
    }

    /// Advances simulated time; the waker runs once per elapsed second.
    pub fn set_time(&self, now: Nanos) {
        {
            let mut st = self.st();
            if now < st.now {
                return;
            }
            st.now = now;
            if !st.background_allowed || now < st.next_waker {
                return;
            }
        }
        // do_waker
        self.t().policy.tick(true, now);
        self.lists().wake_migrations = true;
        self.schedule_commit();
        let mut st = self.st();
        if self.opts.waker_wheel_phase.is_some() {
            st.next_waker = self.waker_due(now);
        }
        while st.next_waker <= now {
            st.next_waker += COMMIT_PERIOD;
        }
    }

    /// When the waker queued at `now` runs next (see
    /// [`CacheOptions::waker_wheel_phase`]).
    fn waker_due(&self, now: Nanos) -> Nanos {
        match self.opts.waker_wheel_phase {
            None => now + COMMIT_PERIOD,
            Some(phase) => {
                let period = COMMIT_PERIOD * u64::from(DEFAULT_HZ) / 1_000_000_000;
                crate::timer_wheel::delayed_work_due(now, period, DEFAULT_HZ, phase)
            }
        }
    }

    /// Requests submitted and not yet completed.
    pub fn bios_in_flight(&self) -> usize {
        self.objs().user.len()
    }

    /// Data I/O issued and not yet completed, in issue order.
    pub fn in_flight_io(&self) -> Vec<CacheIoInfo> {
        self.objs()
            .io
            .iter()
            .map(|(id, io)| match io {
                DataIo::Piece { disk, sector, nr_sectors, op, fua, .. } => CacheIoInfo {
                    id: *id,
                    kind: match op {
                        BioOp::Read => CacheIoKind::Read,
                        BioOp::Write => CacheIoKind::Write,
                        BioOp::Flush => CacheIoKind::Flush,
                        BioOp::Discard => CacheIoKind::Discard,
                    },
                    disk: *disk,
                    sector: *sector,
                    nr_sectors: *nr_sectors,
                    fua: *fua,
                },
                DataIo::Detached { disk, sector, data, fua } => CacheIoInfo {
                    id: *id,
                    kind: CacheIoKind::Write,
                    disk: *disk,
                    sector: *sector,
                    nr_sectors: data.len() as u64 / SECTOR_SIZE,
                    fua: *fua,
                },
                DataIo::Copy { to, nr_sectors, .. } => CacheIoInfo {
                    id: *id,
                    kind: CacheIoKind::Copy,
                    disk: to.0,
                    sector: to.1,
                    nr_sectors: *nr_sectors,
                    fua: false,
                },
            })
            .collect()
    }

    /// Whether the worker has anything to do now.
    pub fn worker_wanted(&self) -> bool {
        let (queued, wake) = {
            let l = self.lists();
            (!l.ready.is_empty() || !l.deferred.is_empty() || l.commit_queued, l.wake_migrations)
        };
        queued || (wake && self.st().background_allowed)
    }

    /// No request, data I/O, migration or worker item is pending.
    pub fn is_idle(&self) -> bool {
        let objs_idle = {
            let o = self.objs();
            o.user.is_empty() && o.io.is_empty() && o.migrations.is_empty()
        };
        let l = self.lists();
        objs_idle
            && l.ready.is_empty()
            && l.deferred.is_empty()
            && l.commit_bios.is_empty()
            && l.commit_work.is_empty()
            && l.commit_ends.is_empty()
            && l.wt_pairs.is_empty()
    }

    /// Requests completed since the last call, in completion order.
    pub fn take_completions(&self) -> Vec<CacheCompletion> {
        std::mem::take(&mut self.lists().completions)
    }

    // ------------------------------------------------------------------
    // Submission and the map path

    /// Submits a request: DM core cuts it at cache block boundaries (a
    /// PREFLUSH with data becomes an empty flush first, the data after it
    /// completes; an empty flush becomes two flush bios, one per device);
    /// `cache_map` runs on each piece right here.
    pub fn submit(&self, req: BioRequest) -> Result<BioId, TargetError> {
        let dev_sectors = self.t().sizes().target_len;
        req.validate(dev_sectors).map_err(|e| err(Errno::EINVAL, e))?;
        let id = {
            let mut o = self.objs();
            o.next_bio += 1;
            BioId(o.next_bio - 1)
        };
        let bs = self.block_sectors();
        let is_read = req.op == BioOp::Read;
        let mut data_pieces = Vec::new();
        if matches!(req.op, BioOp::Read | BioOp::Write) {
            let mut s = req.sector;
            let end = req.sector + req.nr_sectors;
            while s < end {
                let next = ((s / bs) + 1) * bs;
                let e = next.min(end);
                let off = ((s - req.sector) * SECTOR_SIZE) as usize;
                let len = ((e - s) * SECTOR_SIZE) as usize;
                let data =
                    if req.op == BioOp::Write { req.data[off..off + len].to_vec() } else { Vec::new() };
                data_pieces.push(self.new_piece(id, off, req.op, s, e - s, req.fua, 0, data));
                s = e;
            }
        } else if req.op == BioOp::Discard {
            data_pieces.push(self.new_piece(
                id,
                0,
                BioOp::Discard,
                req.sector,
                req.nr_sectors,
                false,
                0,
                Vec::new(),
            ));
        }
        let flushes = if req.op == BioOp::Flush || req.preflush {
            vec![
                self.new_piece(id, 0, BioOp::Flush, 0, 0, false, 0, Vec::new()),
                self.new_piece(id, 0, BioOp::Flush, 0, 0, false, 1, Vec::new()),
            ]
        } else {
            Vec::new()
        };
        let (first, after_flush) =
            if flushes.is_empty() { (data_pieces, Vec::new()) } else { (flushes, data_pieces) };
        self.objs().user.insert(
            id,
            UserIo {
                pending: first.len(),
                result: Ok(()),
                is_read,
                data: if is_read { vec![0; (req.nr_sectors * SECTOR_SIZE) as usize] } else { Vec::new() },
                after_flush,
            },
        );
        for p in first {
            self.cache_map(p);
        }
        Ok(id)
    }

    #[allow(clippy::too_many_arguments)]
    fn new_piece(
        &self,
        parent: BioId,
        offset: usize,
        op: BioOp,
        sector: u64,
        nr_sectors: u64,
        fua: bool,
        req_nr: u8,
        data: Vec<u8>,
    ) -> Piece {
        let data = if op == BioOp::Read { vec![0; (nr_sectors * SECTOR_SIZE) as usize] } else { data };
        Piece {
            parent,
            offset,
            op,
            sector,
            nr_sectors,
            fua,
            req_nr,
            data,
            cell: None,
            dest: None,
            pending: 0,
            self_counted: false,
            status: Ok(()),
            hooked: None,
            tick: false,
            wt_cblock: None,
            accounted: false,
        }
    }

    fn block_sectors(&self) -> u64 {
        self.geo.block_sectors
    }

    fn oblock_of(&self, p: &Piece) -> u64 {
        p.sector / self.block_sectors()
    }

    /// `cache_map`.
    fn cache_map(&self, p: Piece) {
        let origin_blocks = self.geo.origin_blocks;
        let block = self.oblock_of(&p);
        let is_flush_or_discard = matches!(p.op, BioOp::Flush | BioOp::Discard);
        let id = {
            let mut o = self.objs();
            let id = o.next_piece;
            o.next_piece += 1;
            o.pieces.insert(id, p);
            id
        };
        if !is_flush_or_discard && block >= origin_blocks {
            self.accounted_begin(id);
            self.remap(id, CacheDisk::Origin, None);
            self.issue(id);
            return;
        }
        if is_flush_or_discard {
            self.lists().deferred.push_back(id);
            return;
        }
        let mut commit_needed = false;
        if self.map_bio(id, block, &mut commit_needed) {
            self.issue(id);
        }
        if commit_needed {
            self.schedule_commit();
        }
    }

    fn is_write(&self, id: PieceId) -> bool {
        self.objs().pieces[&id].op == BioOp::Write
    }

    /// `bio_detain_shared`: true when the shared lock is granted.
    fn detain_shared(&self, id: PieceId, block: u64) -> bool {
        self.detain_shared_as(id, block, true)
    }

    /// [`Self::detain_shared`]; `from_map` is false for an overwrite bio
    /// falling back to a full copy (the deliberate bug below is the map
    /// path's only).
    fn detain_shared_as(&self, id: PieceId, block: u64, from_map: bool) -> bool {
        let write = self.is_write(id);
        let level = lock_level(write);
        if from_map && write && self.opts.mutations.cache_write_ignores_migration_lock {
            // The deliberate bug: writes do not wait for a migration.
            let prison = self.prison();
            let cell = prison.lookup(&origin_key(block));
            if cell.and_then(|c| prison.view(c)).is_some_and(|v| v.exclusive.is_some()) {
                return true;
            }
        }
        let got = self.prison().get(origin_key(block), level, id);
        match got {
            Get::Granted { cell, .. } => {
                self.objs().pieces.get_mut(&id).expect("piece").cell = Some(cell);
                true
            }
            Get::Queued { .. } => {
                self.st().counters.bios_waited += 1;
                false
            }
        }
    }

    fn drop_shared_lock(&self, id: PieceId) {
        let cell = self.objs().pieces.get_mut(&id).and_then(|p| p.cell.take());
        let Some(cell) = cell else { return };
        let put = self.prison().put(cell);
        match put {
            Ok(out) => {
                if let Some(k) = out.run {
                    self.lists().ready.push_back(k);
                }
                if let Some((mg, _)) = out.orphaned {
                    self.bug(format!("migration {mg}'s continuation was orphaned in a freed cell"));
                }
            }
            Err(e) => self.bug(format!("put of a shared lock: {e}")),
        }
    }

    fn writes_complete_block(&self, id: PieceId) -> bool {
        let o = self.objs();
        let p = &o.pieces[&id];
        p.op == BioOp::Write && p.nr_sectors == self.block_sectors()
    }

    fn dblock_of(&self, oblock: u64) -> u64 {
        oblock * self.block_sectors() / self.geo.discard_block_size
    }

    fn is_discarded_oblock(&self, oblock: u64) -> bool {
        let d = self.dblock_of(oblock) as usize;
        self.t().discards.get(d).copied().unwrap_or(false)
    }

    fn clear_discard(&self, oblock: u64) {
        let d = self.dblock_of(oblock) as usize;
        if let Some(b) = self.t().discards.get_mut(d) {
            *b = false;
        }
    }

    fn optimisable(&self, id: PieceId, block: u64) -> bool {
        self.geo.io_mode == IoMode::Writeback
            && (self.is_discarded_oblock(block) || self.writes_complete_block(id))
    }

    /// `map_bio`; true when the bio was remapped and should be issued now.
    fn map_bio(&self, id: PieceId, block: u64, commit_needed: &mut bool) -> bool {
        if !self.detain_shared(id, block) {
            *commit_needed = true;
            return false;
        }
        let write = self.is_write(id);
        let dir = if write { DataDir::Write } else { DataDir::Read };
        let cblock = if self.optimisable(id, block) {
            let l = self.t().policy.lookup_with_work(block, dir, true);
            if l.cblock.is_none() {
                if let Some(work) = l.work {
                    self.drop_shared_lock(id);
                    if work.op != PolicyOp::Promote {
                        self.bug(format!("lookup_with_work handed back {work:?}"));
                    }
                    self.mg_start(work, Some(id));
                    return false;
                }
            }
            l.cblock
        } else {
            let l = self.t().policy.lookup(block, dir, false);
            if l.background_queued {
                self.lists().wake_migrations = true;
            }
            l.cblock
        };
        match cblock {
            None => {
                self.inc_counter(write, false);
                if self.objs().pieces[&id].req_nr != 0 {
                    self.end_piece(id);
                    return false;
                }
                self.accounted_begin(id);
                self.remap_to_origin_clear_discard(id, block);
            }
            Some(cblock) => {
                self.inc_counter(write, true);
                match self.geo.io_mode {
                    IoMode::Passthrough => {
                        if write {
                            self.drop_shared_lock(id);
                            self.st().counters.invalidations += 1;
                            self.invalidate_start(cblock, block, id);
                            return false;
                        }
                        self.remap_to_origin_clear_discard(id, block);
                    }
                    mode => {
                        if write && mode == IoMode::Writethrough && !self.t().is_dirty(cblock) {
                            if self.opts.fixes.writethrough_pairs_one_at_a_time {
                                let parked = {
                                    let mut l = self.lists();
                                    if let Some((_, waiting)) = l.wt_pairs.get_mut(&cblock) {
                                        // Parked with its shared lock until the
                                        // pair in flight on this block is done.
                                        waiting.push_back((id, block));
                                        true
                                    } else {
                                        l.wt_pairs.insert(cblock, (id, VecDeque::new()));
                                        false
                                    }
                                };
                                if parked {
                                    return false;
                                }
                                self.objs().pieces.get_mut(&id).expect("piece").wt_cblock = Some(cblock);
                            }
                            self.remap_to_origin_and_cache(id, block, cblock);
                            self.accounted_begin(id);
                        } else {
                            self.remap_to_cache_dirty(id, block, cblock);
                        }
                    }
                }
            }
        }
        self.fua_waits_for_commit(id, commit_needed)
    }

    /// The end of `map_bio`: a FUA bio is issued after the next commit.
    /// True when the bio should be issued now.
    fn fua_waits_for_commit(&self, id: PieceId, commit_needed: &mut bool) -> bool {
        let fua = self.objs().pieces[&id].fua;
        if fua {
            self.accounted_complete(id);
            self.issue_after_commit(id);
            *commit_needed = true;
            return false;
        }
        true
    }

    /// A writethrough pair finished: the next bio parked on its cache
    /// block goes (the writethrough fix).
    fn writethrough_pair_done(&self, cblock: u32) {
        let (next, block) = {
            let mut l = self.lists();
            let Some((_, mut waiting)) = l.wt_pairs.remove(&cblock) else { return };
            let Some((next, block)) = waiting.pop_front() else { return };
            l.wt_pairs.insert(cblock, (next, waiting));
            (next, block)
        };
        self.objs().pieces.get_mut(&next).expect("piece").wt_cblock = Some(cblock);
        self.remap_to_origin_and_cache(next, block, cblock);
        self.accounted_begin(next);
        let mut commit_needed = false;
        if self.fua_waits_for_commit(next, &mut commit_needed) {
            self.issue(next);
        }
        if commit_needed {
            self.schedule_commit();
        }
    }

    fn inc_counter(&self, write: bool, hit: bool) {
        let mut t = self.t();
        let s = &mut t.stats;
        match (write, hit) {
            (false, true) => s.read_hits += 1,
            (false, false) => s.read_misses += 1,
            (true, true) => s.write_hits += 1,
            (true, false) => s.write_misses += 1,
        }
    }

    fn check_tick_bio(&self, id: PieceId) {
        let eligible = {
            let o = self.objs();
            let p = &o.pieces[&id];
            !p.fua && p.op != BioOp::Discard && p.op != BioOp::Flush
        };
        if eligible && std::mem::replace(&mut self.st().need_tick_bio, false) {
            self.objs().pieces.get_mut(&id).expect("piece").tick = true;
        }
    }

    fn remap(&self, id: PieceId, disk: CacheDisk, cblock: Option<u32>) {
        let bs = self.block_sectors();
        let mut o = self.objs();
        let p = o.pieces.get_mut(&id).expect("piece");
        let sector = match cblock {
            Some(c) => u64::from(c) * bs + p.sector % bs,
            None => p.sector,
        };
        p.dest = Some((disk, sector));
    }

    fn remap_to_origin_clear_discard(&self, id: PieceId, block: u64) {
        self.check_tick_bio(id);
        self.remap(id, CacheDisk::Origin, None);
        if self.is_write(id) {
            self.clear_discard(block);
        }
    }

    fn remap_to_cache_dirty(&self, id: PieceId, block: u64, cblock: u32) {
        self.check_tick_bio(id);
        self.remap(id, CacheDisk::Cache, Some(cblock));
        if self.is_write(id) {
            self.set_dirty(cblock);
            self.clear_discard(block);
        }
    }

    /// Writethrough to a clean block: a clone goes to the origin now, the
    /// bio itself to the cache; it completes when both have.
    fn remap_to_origin_and_cache(&self, id: PieceId, block: u64, cblock: u32) {
        self.clear_discard(block);
        let mut o = self.objs();
        let p = o.pieces.get_mut(&id).expect("piece");
        let (sector, nr, fua) = (p.sector, p.nr_sectors, p.fua);
        if self.opts.mutations.cache_writethrough_acks_before_origin {
            let data = o.pieces[&id].data.clone();
            o.new_io(DataIo::Detached { disk: CacheDisk::Origin, sector, data, fua });
        } else {
            // The bio (`bio_chain`) ends when its clone and itself have.
            let p = o.pieces.get_mut(&id).expect("piece");
            p.pending += 2;
            p.self_counted = true;
            o.new_io(DataIo::Piece {
                piece: id,
                disk: CacheDisk::Origin,
                sector,
                nr_sectors: nr,
                op: BioOp::Write,
                fua,
            });
        }
        drop(o);
        self.remap(id, CacheDisk::Cache, Some(cblock));
    }

    /// `set_dirty`: `test_and_set_bit` on the dirty bitset with the count
    /// (atomics in the kernel, one critical section here), then the policy
    /// (smq's lock).
    fn set_dirty(&self, cblock: u32) {
        let i = cblock as usize;
        let newly = if self.opts.mutations.locking.cache_dirty_test_then_set {
            // The deliberate bug: the test and the set are two critical
            // sections, so two writes to one clean block can both see it
            // clean and both count it.
            let clean = {
                let t = self.t();
                i < t.dirty.len() && !t.dirty[i]
            };
            if clean {
                let mut t = self.t();
                t.dirty[i] = true;
                t.nr_dirty += 1;
            }
            clean
        } else {
            let mut t = self.t();
            let newly = i < t.dirty.len() && !t.dirty[i];
            if newly {
                t.dirty[i] = true;
                t.nr_dirty += 1;
            }
            newly
        };
        if newly && !self.opts.mutations.cache_demote_frees_dirty {
            self.t().policy.set_dirty(cblock);
        }
    }

    fn force_set_dirty(&self, cblock: u32) {
        let i = cblock as usize;
        let mut t = self.t();
        if i < t.dirty.len() && !t.dirty[i] {
            t.dirty[i] = true;
            t.nr_dirty += 1;
        }
        t.policy.set_dirty(cblock);
    }

    fn force_clear_dirty(&self, cblock: u32) {
        let i = cblock as usize;
        let mut t = self.t();
        if i < t.dirty.len() && t.dirty[i] {
            t.dirty[i] = false;
            t.nr_dirty -= 1;
        }
        t.policy.clear_dirty(cblock);
    }

    fn accounted_begin(&self, id: PieceId) {
        let sectors = {
            let mut o = self.objs();
            let p = o.pieces.get_mut(&id).expect("piece");
            if p.op == BioOp::Discard || p.accounted {
                return;
            }
            p.accounted = true;
            p.nr_sectors
        };
        self.st().in_flight_sectors += sectors;
    }

    fn accounted_complete(&self, id: PieceId) {
        let sectors = {
            let mut o = self.objs();
            let p = o.pieces.get_mut(&id).expect("piece");
            if !p.accounted {
                return;
            }
            p.accounted = false;
            p.nr_sectors
        };
        let mut st = self.st();
        st.in_flight_sectors -= sectors;
        if st.in_flight_sectors == 0 {
            st.idle_since = Some(st.now);
        }
    }

    /// Sends a remapped bio to its device (an in-flight data I/O).
    fn issue(&self, id: PieceId) {
        let mut o = self.objs();
        let p = o.pieces.get_mut(&id).expect("piece");
        let Some((disk, sector)) = p.dest else {
            drop(o);
            self.bug(format!("bio {id} issued without a remap"));
            return;
        };
        if p.self_counted {
            p.self_counted = false;
        } else {
            p.pending += 1;
        }
        let (nr_sectors, op, fua) = (p.nr_sectors, p.op, p.fua);
        o.new_io(DataIo::Piece { piece: id, disk, sector, nr_sectors, op, fua });
    }

    /// `accounted_request`: the committer's issue op.
    fn accounted_request(&self, id: PieceId) {
        self.accounted_begin(id);
        self.issue(id);
    }

    // ------------------------------------------------------------------
    // The committer (the batcher)

    fn schedule_commit(&self) {
        let mut l = self.lists();
        l.commit_scheduled = true;
        if !l.commit_bios.is_empty() || !l.commit_work.is_empty() || !l.commit_ends.is_empty() {
            l.commit_queued = true;
        }
    }

    /// `issue_after_commit`: the bio waits for the next commit.
    fn issue_after_commit(&self, id: PieceId) {
        let mut l = self.lists();
        l.commit_bios.push(id);
        if l.commit_scheduled {
            l.commit_queued = true;
        }
    }

    fn continue_after_commit(&self, mg: MgId, step: Step) {
        let mut l = self.lists();
        l.commit_work.push((mg, step));
        if l.commit_scheduled {
            l.commit_queued = true;
        }
    }

    /// The candidate fix's flush of both data devices before a commit.
    fn flush_data_devices(&self) -> Result<(), Errno> {
        let c = lock(&self.cdev).flush();
        let o = lock(&self.odev).flush();
        if c.is_err() || o.is_err() {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// `commit`: refused in read-only and fail modes.
    fn commit(&self) -> Result<(), Errno> {
        if self.mode() >= CacheMode::ReadOnly {
            return Err(Errno::EINVAL);
        }
        self.st().counters.commits += 1;
        if self.opts.fixes.flush_before_commit {
            self.flush_data_devices()?;
        }
        let r = self.t().md.commit(false);
        match r {
            Ok(()) => {
                self.st().clean_on_disk = false;
                Ok(())
            }
            Err(_) => {
                self.t().metadata_failed();
                Err(Errno::EIO)
            }
        }
    }

    /// A bio that was never issued fails (its commit failed). A
    /// writethrough bio's origin clone may still be in flight: as with
    /// `bio_chain`, the bio ends only when the clone has.
    fn fail_unissued(&self, id: PieceId, e: Errno) {
        let done = {
            let mut o = self.objs();
            let Some(p) = o.pieces.get_mut(&id) else {
                drop(o);
                self.bug(format!("a failed commit's bio {id} is gone"));
                return;
            };
            p.status = Err(e);
            if p.self_counted {
                p.self_counted = false;
                p.pending = p.pending.saturating_sub(1);
            }
            p.pending == 0
        };
        if done {
            self.piece_done(id);
        }
    }

    /// `__commit`.
    fn do_commit(&self) {
        let (work, bios, ends) = {
            let mut l = self.lists();
            l.commit_queued = false;
            l.commit_scheduled = false;
            (
                std::mem::take(&mut l.commit_work),
                std::mem::take(&mut l.commit_bios),
                std::mem::take(&mut l.commit_ends),
            )
        };
        let changed = self.t().md.changed_this_transaction();
        let r = if changed { self.commit() } else { Ok(()) };
        // What the bios waiting for the commit learn (the read-only fix:
        // that no commit can make them durable).
        let r_bios = if self.opts.fixes.read_only_flushes_fail && self.mode() >= CacheMode::ReadOnly {
            Err(Errno::EIO)
        } else {
            r.map_err(Errno::as_bio_status)
        };
        for id in ends {
            if let Err(e) = r_bios {
                self.objs().pieces.get_mut(&id).expect("piece").status = Err(e);
            }
            self.end_piece(id);
        }
        for (mg, step) in work {
            if let Some(m) = self.objs().migrations.get_mut(&mg) {
                m.input = r;
            }
            self.lists().ready.push_back((mg, step));
        }
        for id in bios {
            match r_bios {
                Err(e) => self.fail_unissued(id, e),
                Ok(()) => self.accounted_request(id),
            }
        }
    }

    // ------------------------------------------------------------------
    // The worker

    /// One pass of the workqueue: queued continuations, the deferred bios,
    /// the migration worker, then the committer.
    pub fn run_worker(&self) {
        let ready = std::mem::take(&mut self.lists().ready);
        for (mg, step) in ready {
            self.run_step(mg, step);
        }
        let deferred = std::mem::take(&mut self.lists().deferred);
        let mut commit_needed = false;
        for id in deferred {
            let (op, req_nr, block) = {
                let o = self.objs();
                let p = &o.pieces[&id];
                (p.op, p.req_nr, self.oblock_of(p))
            };
            if op == BioOp::Flush {
                let disk = if req_nr == 0 { CacheDisk::Origin } else { CacheDisk::Cache };
                self.objs().pieces.get_mut(&id).expect("piece").dest = Some((disk, 0));
                self.issue_after_commit(id);
                commit_needed = true;
            } else if op == BioOp::Discard {
                self.process_discard(id);
            } else if self.map_bio(id, block, &mut commit_needed) {
                self.issue(id);
            }
        }
        if commit_needed {
            self.schedule_commit();
        }
        if std::mem::replace(&mut self.lists().wake_migrations, false) {
            self.check_migrations();
        }
        // The batcher commits only when something waits for the commit
        // (`schedule_commit` with empty lists just remembers the request).
        let commit_queued = self.lists().commit_queued;
        if commit_queued {
            self.do_commit();
        }
    }

    fn process_discard(&self, id: PieceId) {
        let (sb, se) = {
            let o = self.objs();
            let p = &o.pieces[&id];
            (p.sector, p.sector + p.nr_sectors)
        };
        let dbs = self.geo.discard_block_size;
        let b = sb.div_ceil(dbs);
        let e = if se - sb < dbs { b } else { se / dbs };
        {
            let mut t = self.t();
            for d in b..e {
                if let Some(bit) = t.discards.get_mut(d as usize) {
                    *bit = true;
                }
            }
        }
        if self.geo.discard_passdown {
            self.objs().pieces.get_mut(&id).expect("piece").dest = Some((CacheDisk::Origin, sb));
            self.issue(id);
        } else {
            self.end_piece(id);
        }
    }

    fn spare_bandwidth_idle(&self) -> bool {
        // `dm_iot_idle_for(HZ)`: jiffies after idle_time + HZ.
        let jiffies = |t: Nanos| (u128::from(t) * u128::from(DEFAULT_HZ) / 1_000_000_000) as u64;
        let (idle, io_migrations) = {
            let st = self.st();
            let idle = st.in_flight_sectors == 0
                && st.idle_since.is_none_or(|t| jiffies(st.now) > jiffies(t) + u64::from(DEFAULT_HZ));
            (idle, st.io_migrations)
        };
        let volume = (u64::from(io_migrations) + 1) * self.block_sectors();
        idle && volume <= self.t().table().migration_threshold
    }

    /// `check_migrations`.
    fn check_migrations(&self) {
        loop {
            let idle = self.spare_bandwidth_idle();
            let Some(work) = self.t().policy.get_background_work(idle) else { break };
            if !self.mg_start(work, None) {
                break;
            }
        }
    }

    // ------------------------------------------------------------------
    // Migrations

    fn mg_start(&self, work: PolicyWork, overwrite: Option<PieceId>) -> bool {
        if !self.st().background_allowed {
            self.t().policy.complete_background_work(work, false);
            if let Some(id) = overwrite {
                self.objs().pieces.get_mut(&id).expect("piece").status = Err(Errno::EIO);
                self.end_piece(id);
            }
            return false;
        }
        let k = match work.op {
            PolicyOp::Promote => 0,
            PolicyOp::Demote => 1,
            PolicyOp::Writeback => 2,
        };
        {
            let mut st = self.st();
            st.background_nr += 1;
            st.counters.started[k] += 1;
            if overwrite.is_some() {
                st.counters.overwrites += 1;
            } else {
                st.io_migrations += 1;
            }
        }
        let mg = {
            let mut o = self.objs();
            let mg = o.new_migration(Migration {
                work: Some(work),
                overwrite,
                cell: None,
                input: Ok(()),
                invalidate: None,
            });
            if let Some(id) = overwrite {
                o.pieces.get_mut(&id).expect("piece").hooked = Some(mg);
            }
            mg
        };
        // mg_lock_writes
        let level = if overwrite.is_some() { READ_WRITE_LOCK_LEVEL } else { WRITE_LOCK_LEVEL };
        let locked = self.prison().lock(origin_key(work.oblock), level);
        match locked {
            Err(_) => {
                self.mg_complete(mg, false);
            }
            Ok(l) => {
                self.objs().migrations.get_mut(&mg).expect("mg").cell = Some(l.cell);
                if self.opts.mutations.cache_promote_maps_before_copy
                    && work.op == PolicyOp::Promote
                    && self.t().md.insert_mapping(work.cblock, work.oblock).is_err()
                {
                    self.t().metadata_failed();
                }
                if l.must_quiesce {
                    self.quiesce(mg, Step::Copy);
                } else {
                    self.run_step(mg, Step::Copy);
                }
            }
        }
        true
    }

    fn quiesce(&self, mg: MgId, step: Step) {
        let Some(cell) = self.objs().migrations[&mg].cell else {
            self.bug(format!("migration {mg} quiesces without a cell"));
            return;
        };
        let q = self.prison().quiesce(cell, (mg, step));
        match q {
            Ok(Quiesce::RunNow(k)) => self.lists().ready.push_back(k),
            Ok(Quiesce::Deferred { replaced }) => {
                if let Some((other, _)) = replaced {
                    self.bug(format!("migration {mg}'s quiesce replaced migration {other}'s"));
                }
            }
            Err(e) => self.bug(format!("quiesce: {e}")),
        }
    }

    fn run_step(&self, mg: MgId, step: Step) {
        if !self.objs().migrations.contains_key(&mg) {
            self.bug(format!("continuation {step:?} of finished migration {mg}"));
            return;
        }
        match step {
            Step::Copy => self.mg_copy(mg),
            Step::UpgradeLock => self.mg_upgrade_lock(mg),
            Step::UpdateMetadata => self.mg_update_metadata(mg),
            Step::UpdateMetadataAfterCopy => {
                let failed = self.objs().migrations[&mg].input.is_err();
                if failed {
                    self.mg_complete(mg, false);
                } else {
                    self.mg_update_metadata(mg);
                }
            }
            Step::Success => {
                let ok = self.objs().migrations[&mg].input.is_ok();
                self.mg_complete(mg, ok);
            }
            Step::InvalidateRemove => self.invalidate_remove(mg),
            Step::InvalidateCommitted => self.invalidate_committed(mg),
            Step::InvalidateCompleted => {
                let ok = self.objs().migrations[&mg].input.is_ok();
                self.invalidate_complete(mg, ok);
            }
        }
    }

    fn mg_copy(&self, mg: MgId) {
        let (work, overwrite) = {
            let o = self.objs();
            let m = &o.migrations[&mg];
            (m.work.expect("work"), m.overwrite)
        };
        if let Some(id) = overwrite {
            if !self.optimisable(id, work.oblock) {
                // Fall back to a full copy: the bio waits in the cell.
                if self.detain_shared_as(id, work.oblock, false) {
                    self.bug(format!("overwrite fallback of migration {mg} got a shared lock"));
                }
                {
                    let mut o = self.objs();
                    o.pieces.get_mut(&id).expect("piece").hooked = None;
                    o.migrations.get_mut(&mg).expect("mg").overwrite = None;
                }
                self.st().io_migrations += 1;
                self.mg_full_copy(mg);
                return;
            }
            // overwrite(): the bio itself is the copy.
            self.remap(id, CacheDisk::Cache, Some(work.cblock));
            self.accounted_request(id);
            return;
        }
        self.mg_full_copy(mg);
    }

    fn mg_full_copy(&self, mg: MgId) {
        let work = self.objs().migrations[&mg].work.expect("work");
        let promote = work.op == PolicyOp::Promote;
        let frees_dirty = self.opts.mutations.cache_demote_frees_dirty && work.op == PolicyOp::Demote;
        let skip_clean = !promote && (!self.t().is_dirty(work.cblock) || frees_dirty);
        if skip_clean || self.is_discarded_oblock(work.oblock) {
            self.mg_upgrade_lock(mg);
            return;
        }
        let bs = self.block_sectors();
        let o = (CacheDisk::Origin, work.oblock * bs);
        let c = (CacheDisk::Cache, u64::from(work.cblock) * bs);
        let (from, to) = if promote { (o, c) } else { (c, o) };
        self.objs().new_io(DataIo::Copy { mg, from, to, nr_sectors: bs });
        if self.opts.mutations.cache_writeback_clean_before_copy && work.op == PolicyOp::Writeback {
            // The deliberate bug: the writeback completes at issue; its copy
            // runs on with no migration behind it.
            self.mg_complete(mg, true);
        }
    }

    fn mg_upgrade_lock(&self, mg: MgId) {
        if self.objs().migrations[&mg].input.is_err() {
            self.mg_complete(mg, false);
            return;
        }
        let cell = self.objs().migrations[&mg].cell.expect("cell");
        let promoted = self.prison().lock_promote(cell, READ_WRITE_LOCK_LEVEL);
        match promoted {
            Err(_) => self.mg_complete(mg, false),
            Ok(true) => self.quiesce(mg, Step::UpdateMetadata),
            Ok(false) => self.mg_update_metadata(mg),
        }
    }

    fn mg_update_metadata(&self, mg: MgId) {
        let work = self.objs().migrations[&mg].work.expect("work");
        match work.op {
            PolicyOp::Promote => {
                if !self.opts.mutations.cache_promote_maps_before_copy
                    && self.t().md.insert_mapping(work.cblock, work.oblock).is_err()
                {
                    self.t().metadata_failed();
                    self.mg_complete(mg, false);
                    return;
                }
                self.mg_complete(mg, true);
            }
            PolicyOp::Demote => {
                if self.t().md.remove_mapping(work.cblock).is_err() {
                    self.t().metadata_failed();
                    self.mg_complete(mg, false);
                    return;
                }
                self.continue_after_commit(mg, Step::Success);
                self.schedule_commit();
            }
            PolicyOp::Writeback => self.mg_complete(mg, true),
        }
    }

    fn mg_complete(&self, mg: MgId, success: bool) {
        let Some(m) = self.objs().migrations.remove(&mg) else { return };
        let work = m.work.expect("work");
        let k = match work.op {
            PolicyOp::Promote => 0,
            PolicyOp::Demote => 1,
            PolicyOp::Writeback => 2,
        };
        if success {
            self.st().counters.succeeded[k] += 1;
            let mut t = self.t();
            match work.op {
                PolicyOp::Promote => t.promotions += 1,
                PolicyOp::Demote => t.demotions += 1,
                PolicyOp::Writeback => {}
            }
        }
        match work.op {
            PolicyOp::Promote => {
                self.clear_discard(work.oblock);
                self.t().policy.complete_background_work(work, success);
                if let Some(id) = m.overwrite {
                    if success {
                        self.force_set_dirty(work.cblock);
                    }
                    let fua = {
                        let mut o = self.objs();
                        let p = o.pieces.get_mut(&id).expect("piece");
                        if !success {
                            p.status = Err(m.input.err().unwrap_or(Errno::EIO));
                        }
                        p.hooked = None;
                        p.fua
                    };
                    if success && fua && self.opts.fixes.fua_overwrite_waits_for_commit {
                        self.lists().commit_ends.push(id);
                        self.schedule_commit();
                    } else {
                        self.end_piece(id);
                    }
                } else {
                    if success {
                        self.force_clear_dirty(work.cblock);
                    }
                    self.st().io_migrations -= 1;
                }
            }
            PolicyOp::Demote | PolicyOp::Writeback => {
                if success {
                    self.force_clear_dirty(work.cblock);
                }
                self.t().policy.complete_background_work(work, success);
                self.st().io_migrations -= 1;
            }
        }
        self.release_cell(m.cell);
        self.lists().wake_migrations = true;
        self.st().background_nr -= 1;
    }

    fn release_cell(&self, cell: Option<CellId>) {
        if let Some(cell) = cell {
            let unlocked = self.prison().unlock(cell);
            match unlocked {
                Ok(u) => self.lists().deferred.extend(u.bios),
                Err(e) => self.bug(format!("unlock: {e}")),
            }
        }
    }

    // ------------------------------------------------------------------
    // Invalidation (passthrough)

    fn invalidate_cblock(&self, cblock: u32) -> Result<(), Errno> {
        let invalidated = self.t().policy.invalidate_mapping(cblock);
        match invalidated {
            Ok(()) => {
                if self.t().md.remove_mapping(cblock).is_err() {
                    self.t().metadata_failed();
                    return Err(Errno::EIO);
                }
                Ok(())
            }
            Err(Errno::ENODATA) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn invalidate_start(&self, cblock: u32, oblock: u64, bio: PieceId) {
        if !self.st().background_allowed {
            self.objs().pieces.get_mut(&bio).expect("piece").status = Err(Errno::EIO);
            self.end_piece(bio);
            return;
        }
        self.st().background_nr += 1;
        let mg = self.objs().new_migration(Migration {
            work: None,
            overwrite: Some(bio),
            cell: None,
            input: Ok(()),
            invalidate: Some((cblock, oblock)),
        });
        let locked = self.prison().lock(origin_key(oblock), READ_WRITE_LOCK_LEVEL);
        match locked {
            Err(_) => {
                // Retry the bio later.
                self.objs().migrations.get_mut(&mg).expect("mg").overwrite = None;
                self.lists().deferred.push_back(bio);
                self.invalidate_complete(mg, false);
            }
            Ok(l) => {
                self.objs().migrations.get_mut(&mg).expect("mg").cell = Some(l.cell);
                if l.must_quiesce {
                    self.quiesce(mg, Step::InvalidateRemove);
                } else {
                    self.lists().ready.push_back((mg, Step::InvalidateRemove));
                }
            }
        }
    }

    fn invalidate_remove(&self, mg: MgId) {
        let (cblock, _) = self.objs().migrations[&mg].invalidate.expect("invalidation");
        if self.invalidate_cblock(cblock).is_err() {
            self.invalidate_complete(mg, false);
            return;
        }
        self.t().demotions += 1;
        self.continue_after_commit(mg, Step::InvalidateCommitted);
        self.schedule_commit();
    }

    fn invalidate_committed(&self, mg: MgId) {
        let (failed, (_, oblock), bio) = {
            let o = self.objs();
            let m = &o.migrations[&mg];
            (m.input.is_err(), m.invalidate.expect("invalidation"), m.overwrite.expect("bio"))
        };
        if failed {
            self.invalidate_complete(mg, false);
            return;
        }
        self.remap_to_origin_clear_discard(bio, oblock);
        self.objs().pieces.get_mut(&bio).expect("piece").hooked = Some(mg);
        self.issue(bio);
    }

    fn invalidate_complete(&self, mg: MgId, success: bool) {
        let Some(m) = self.objs().migrations.remove(&mg) else { return };
        self.release_cell(m.cell);
        if let Some(bio) = m.overwrite {
            {
                let mut o = self.objs();
                let p = o.pieces.get_mut(&bio).expect("piece");
                p.hooked = None;
                if !success && p.status.is_ok() {
                    p.status = Err(Errno::EIO);
                }
            }
            self.end_piece(bio);
        }
        self.st().background_nr -= 1;
    }

    // ------------------------------------------------------------------
    // Completions

    /// Completes data I/O `id`: performs it on its device and runs its
    /// end-io path.
    pub fn complete_io(&self, id: CacheIoId) -> Result<(), TargetError> {
        self.finish_io(id, None)
    }

    /// Completes data I/O `id` with an error instead of performing it.
    pub fn fail_io(&self, id: CacheIoId, errno: Errno) -> Result<(), TargetError> {
        self.finish_io(id, Some(errno))
    }

    /// Runs `f` on `disk` under its lock.
    fn with_device<R>(&self, disk: CacheDisk, f: impl FnOnce(&mut dyn BlockDevice) -> R) -> R {
        match disk {
            CacheDisk::Cache => f(&mut *lock(&self.cdev)),
            CacheDisk::Origin => f(&mut *lock(&self.odev)),
        }
    }

    fn finish_io(&self, id: CacheIoId, fault: Option<Errno>) -> Result<(), TargetError> {
        let io = self.objs().io.remove(&id);
        let Some(io) = io else {
            return Err(err(Errno::EINVAL, format!("no data I/O {} in flight", id.0)));
        };
        match io {
            DataIo::Piece { piece, disk, sector, nr_sectors, op, fua } => {
                let done = {
                    // The bio's memory, then its device (the lock order).
                    let mut o = self.objs();
                    let Some(p) = o.pieces.get_mut(&piece) else {
                        drop(o);
                        self.bug(format!("data I/O {} of bio {piece}, which has ended", id.0));
                        return Ok(());
                    };
                    let r = match fault {
                        Some(e) => Err(e),
                        None => {
                            let r = match op {
                                BioOp::Read => {
                                    let mut buf = vec![0; (nr_sectors * SECTOR_SIZE) as usize];
                                    let r = self.with_device(disk, |d| d.read(sector, &mut buf));
                                    if r.is_ok() {
                                        p.data = buf;
                                    }
                                    r
                                }
                                BioOp::Write => {
                                    self.with_device(disk, |d| d.write(sector, &p.data, WriteFlags { fua }))
                                }
                                BioOp::Flush => self.with_device(disk, |d| d.flush()),
                                BioOp::Discard => Ok(()),
                            };
                            r.map_err(|_| Errno::EIO)
                        }
                    };
                    if let Err(e) = r {
                        p.status = Err(e);
                    }
                    if p.pending > 0 {
                        p.pending -= 1;
                    }
                    p.pending == 0
                };
                if done {
                    self.piece_done(piece);
                }
            }
            DataIo::Detached { disk, sector, data, fua } => {
                if fault.is_none() {
                    let _ = self.with_device(disk, |d| d.write(sector, &data, WriteFlags { fua }));
                }
            }
            DataIo::Copy { mg, from, to, nr_sectors } => {
                let r = match fault {
                    Some(e) => Err(e),
                    None => {
                        let mut buf = vec![0; (nr_sectors * SECTOR_SIZE) as usize];
                        let r = self.with_device(from.0, |d| d.read(from.1, &mut buf));
                        r.and_then(|()| {
                            self.with_device(to.0, |d| d.write(to.1, &buf, WriteFlags::default()))
                        })
                        .map_err(|_| Errno::EIO)
                    }
                };
                let live = {
                    let mut o = self.objs();
                    match o.migrations.get_mut(&mg) {
                        Some(m) => {
                            if let Err(e) = r {
                                m.input = Err(e);
                            }
                            true
                        }
                        None => false,
                    }
                };
                if live {
                    self.lists().ready.push_back((mg, Step::UpgradeLock));
                }
            }
        }
        Ok(())
    }

    /// Every data I/O of a bio is done: its hook, or `cache_end_io`.
    fn piece_done(&self, id: PieceId) {
        let (hooked, status) = {
            let o = self.objs();
            let p = &o.pieces[&id];
            (p.hooked, p.status)
        };
        let Some(mg) = hooked else {
            self.end_piece(id);
            return;
        };
        self.accounted_complete(id);
        let step = {
            let mut o = self.objs();
            match o.migrations.get_mut(&mg) {
                None => None,
                Some(m) => {
                    if let Err(e) = status {
                        m.input = Err(e);
                    }
                    Some(if m.invalidate.is_some() {
                        Step::InvalidateCompleted
                    } else {
                        Step::UpdateMetadataAfterCopy
                    })
                }
            }
        };
        match step {
            None => self.bug(format!("overwrite bio of finished migration {mg}")),
            Some(step) => self.lists().ready.push_back((mg, step)),
        }
    }

    /// `cache_end_io` (policy tick, shared lock, I/O tracker), then DM
    /// core's accounting of the piece to its request.
    fn end_piece(&self, id: PieceId) {
        let tick = self.objs().pieces.get(&id).map(|p| p.tick);
        let Some(tick) = tick else { return };
        if tick {
            let now = self.st().now;
            self.t().policy.tick(false, now);
            self.st().need_tick_bio = true;
        }
        self.drop_shared_lock(id);
        self.accounted_complete(id);
        let p = self.objs().pieces.remove(&id).expect("piece");
        let wt = p.wt_cblock;
        self.account(p);
        if let Some(cblock) = wt {
            self.writethrough_pair_done(cblock);
        }
    }

    /// DM core's accounting of an ended piece to its request: the request
    /// completes with its last piece, or its data pieces go after its
    /// flush.
    fn account(&self, p: Piece) {
        let next = {
            let mut o = self.objs();
            let Some(u) = o.user.get_mut(&p.parent) else { return };
            // DM core keeps the last error a piece completes with
            // (`dm_io_set_error`), as for the thin target.
            if let Err(e) = p.status {
                u.result = Err(e);
            }
            if u.is_read && p.op == BioOp::Read && p.status.is_ok() {
                let end = p.offset + p.data.len();
                if end <= u.data.len() {
                    u.data[p.offset..end].copy_from_slice(&p.data);
                }
            }
            u.pending -= 1;
            if u.pending > 0 {
                return;
            }
            if !u.after_flush.is_empty() && u.result.is_ok() {
                let next = std::mem::take(&mut u.after_flush);
                u.pending = next.len();
                Ok(next)
            } else {
                let u = o.user.remove(&p.parent).expect("request");
                let data = if u.result.is_ok() && u.is_read { u.data } else { Vec::new() };
                Err(CacheCompletion { id: p.parent, result: u.result, data })
            }
        };
        match next {
            Ok(pieces) => {
                for piece in pieces {
                    self.cache_map(piece);
                }
            }
            Err(done) => self.lists().completions.push(done),
        }
    }

    /// Checks the in-core state for consistency: no broken precondition
    /// recorded (by the target, the prison or the metadata: a walk past its
    /// bound, a reference count below zero), every dirty count matches its
    /// bits, the prison's own checks.
    pub fn check(&self) -> Result<(), String> {
        if let Some(b) = self.broken() {
            return Err(b);
        }
        {
            let t = self.t();
            if let Some(b) = t.md.broken() {
                return Err(format!("{b} (cache metadata)"));
            }
            let n = t.dirty.iter().filter(|d| **d).count() as u64;
            if n != t.nr_dirty {
                return Err(format!("nr_dirty is {} but {n} dirty bits are set", t.nr_dirty));
            }
        }
        self.prison().check()
    }
}

#[cfg(test)]
mod waker_tests {
    use super::*;
    use crate::block_device::MemDevice;

    /// A cache created (and resumed) at simulated time 0.
    fn cache(phase: Option<u64>) -> Cache<MemDevice, MemDevice, MemDevice> {
        let opts = CacheOptions { waker_wheel_phase: phase, ..CacheOptions::default() };
        let line = "/dev/m /dev/c /dev/o 128 1 writeback smq 0";
        let cache = MemDevice::new(8 * 128);
        Cache::create(line, MemDevice::new(2048), cache, MemDevice::new(32 * 128), 0, opts).expect("loads")
    }

    const JIFFY: Nanos = 4_000_000;

    #[test]
    fn without_a_phase_the_waker_runs_every_second() {
        let c = cache(None);
        assert_eq!(c.st().next_waker, COMMIT_PERIOD);
        c.set_time(COMMIT_PERIOD + 3 * JIFFY);
        assert_eq!(c.st().next_waker, 2 * COMMIT_PERIOD, "periodic, not counted from the late run");
    }

    #[test]
    fn with_a_phase_the_waker_runs_where_the_timer_wheel_puts_it() {
        // Absolute jiffy 3 at time 0: due at 253, the next multiple of 8
        // after it is 256, relative jiffy 253.
        let c = cache(Some(3));
        assert_eq!(c.st().next_waker, 253 * JIFFY);
        // Due exactly on a bucket boundary: the next bucket (8 later).
        let d = cache(Some(6));
        assert_eq!(d.st().next_waker, 258 * JIFFY, "256 + 8 - 6");
        // Counted from when it ran: at relative jiffy 255 (absolute 258),
        // due 508, bucket 512, relative 509.
        c.set_time(255 * JIFFY + JIFFY / 2);
        assert_eq!(c.st().next_waker, 509 * JIFFY);
        d.set_time(258 * JIFFY);
        assert_eq!(d.st().next_waker, 514 * JIFFY, "absolute 264 + 250 = 514, bucket 520");
    }
}
