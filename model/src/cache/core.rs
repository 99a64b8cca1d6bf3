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
//! Deliberate differences from the kernel, invisible to a user of the
//! device: the entry points take `&mut self` (the cache's concurrent core is
//! single-stepped here; the prison itself has its own loom and shuttle
//! harnesses); mempools never run dry; suspend needs the caller to have
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
#[derive(Debug)]
pub struct Cache<M, C, O> {
    t: CacheTarget<M>,
    params: String,
    cdev: C,
    odev: O,
    opts: CacheOptions,
    prison: CellTable<PieceId, (MgId, Step)>,
    next_bio: u64,
    next_piece: PieceId,
    next_io: u64,
    next_mg: MgId,
    pieces: BTreeMap<PieceId, Piece>,
    user: BTreeMap<BioId, UserIo>,
    deferred: VecDeque<PieceId>,
    io: BTreeMap<CacheIoId, DataIo>,
    migrations: BTreeMap<MgId, Migration>,
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
    io_migrations: u32,
    background_nr: u32,
    background_allowed: bool,
    completions: Vec<CacheCompletion>,
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
    broken: Option<String>,
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
        let mut c = Self::assemble(t, params, cache, origin, now, opts);
        c.now = now + opts.resume_delay;
        c.resume()?;
        Ok(c)
    }

    fn assemble(t: CacheTarget<M>, params: &str, cdev: C, odev: O, now: Nanos, opts: CacheOptions) -> Self {
        Cache {
            t,
            params: params.to_string(),
            cdev,
            odev,
            opts,
            prison: CellTable::new(),
            next_bio: 0,
            next_piece: 0,
            next_io: 0,
            next_mg: 0,
            pieces: BTreeMap::new(),
            user: BTreeMap::new(),
            deferred: VecDeque::new(),
            io: BTreeMap::new(),
            migrations: BTreeMap::new(),
            ready: VecDeque::new(),
            commit_scheduled: false,
            commit_queued: false,
            commit_bios: Vec::new(),
            commit_work: Vec::new(),
            commit_ends: Vec::new(),
            wt_pairs: BTreeMap::new(),
            wake_migrations: false,
            io_migrations: 0,
            background_nr: 0,
            background_allowed: false,
            completions: Vec::new(),
            now,
            next_waker: now,
            in_flight_sectors: 0,
            idle_since: None,
            need_tick_bio: true,
            suspended: true,
            clean_on_disk: false,
            counters: CacheCounters::default(),
            broken: None,
        }
    }

    fn resume(&mut self) -> Result<(), TargetError> {
        self.t.preresume()?;
        self.t.resume(self.now);
        self.suspended = false;
        if self.opts.fixes.resume_clears_clean_shutdown && self.clean_on_disk {
            // The clean-shutdown fix (see CacheFixes).
            self.t.md.mark_changed();
            let _ = self.commit();
        }
        self.background_allowed = true;
        self.next_waker = self.waker_due(self.now);
        self.wake_migrations = true;
        Ok(())
    }

    /// `prevent_background_work` (the presuspend half of a suspend): no new
    /// migration starts from now on (those in flight finish); a resume
    /// allows them again. A migration that keeps failing (a writeback to a
    /// bad origin sector) is retried for ever while the cache is idle, as in
    /// the kernel; only this stops the retries.
    pub fn prevent_background_work(&mut self) {
        self.background_allowed = false;
    }

    /// Suspends (a flush suspend): every request must have completed and
    /// the worker must be idle. Background work stops, then the clean
    /// shutdown is written (in write mode).
    pub fn suspend(&mut self) -> Result<(), TargetError> {
        if self.suspended {
            // dm core refuses to suspend a suspended device (a table whose
            // preresume failed was never resumed); no postsuspend runs.
            return Err(err(Errno::EINVAL, "the device is already suspended"));
        }
        if !self.is_idle() {
            return Err(err(Errno::EBUSY, "suspend with I/O or migrations in flight"));
        }
        self.suspended = true;
        self.background_allowed = false;
        if self.opts.fixes.flush_before_commit && self.t.mode == CacheMode::Write {
            // An error shows up on the next data I/O.
            let _ = self.flush_data_devices();
        }
        let r = self.t.postsuspend();
        if r.is_ok() && self.t.mode == CacheMode::Write {
            self.clean_on_disk = true;
        }
        self.counters.commits += 1;
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
        let sizes = self.t.sizes();
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
        let checked = fits(sizes, &self.cdev, &self.odev)
            .and_then(|()| self.t.check_reload(params, sizes).map_err(TargetError::from));
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
        let Cache { t, cdev, odev, opts, now, clean_on_disk, counters, .. } = self;
        let md = t.into_metadata();
        let t = match CacheTarget::reload(params, sizes, md, now) {
            Ok(t) => t,
            Err((md, e)) => {
                return Err(ReloadFailure { devices: (md.crash(), cdev, odev), error: TargetError::from(e) })
            }
        };
        let mut c = Self::assemble(t, params, cdev, odev, now, opts);
        c.now = now + opts.resume_delay;
        c.clean_on_disk = clean_on_disk;
        c.counters = counters;
        let r = c.resume();
        Ok((c, r))
    }

    /// Removes the target after [`Self::suspend`]: the devices.
    pub fn close(self) -> (M, C, O) {
        (self.t.close(), self.cdev, self.odev)
    }

    /// Power cut: the devices as they are (the caller decides what their
    /// volatile caches keep).
    pub fn crash(self) -> (M, C, O) {
        (self.t.md.crash(), self.cdev, self.odev)
    }

    /// Whether the device is suspended: after [`Self::suspend`], or with
    /// a table whose resume failed.
    pub fn is_suspended(&self) -> bool {
        self.suspended
    }

    /// The table line the target was loaded with.
    pub fn params(&self) -> &str {
        &self.params
    }

    /// The lifecycle part: table, policy, metadata, in-core bits.
    pub fn target(&self) -> &CacheTarget<M> {
        &self.t
    }

    /// The metadata.
    pub fn metadata(&mut self) -> &mut CacheMetadata<M> {
        &mut self.t.md
    }

    /// The cache device.
    pub fn cache_device(&mut self) -> &mut C {
        &mut self.cdev
    }

    /// The origin device.
    pub fn origin_device(&mut self) -> &mut O {
        &mut self.odev
    }

    /// Counters since creation (kept across reloads).
    pub fn counters(&self) -> CacheCounters {
        self.counters
    }

    /// An internal inconsistency the model detected (a bug of the model,
    /// or of a deliberately broken variant), if any.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    fn bug(&mut self, what: String) {
        if self.broken.is_none() {
            self.broken = Some(what);
        }
    }

    /// The INFO status line (commits as a side effect unless `noflush`).
    pub fn status(&mut self, noflush: bool) -> String {
        if !noflush && self.opts.fixes.flush_before_commit && self.t.mode == CacheMode::Write {
            // An error shows up on the next data I/O.
            let _ = self.flush_data_devices();
        }
        let s = self.t.status(noflush);
        if !noflush && self.t.mode == CacheMode::Write {
            self.clean_on_disk = false;
            self.counters.commits += 1;
        }
        s
    }

    /// A message: a config key (see [`CacheTarget::message`]) or
    /// `invalidate_cblocks` (passthrough only: every cache block in the
    /// ranges is removed from the policy and the metadata; the next commit
    /// makes it durable).
    pub fn message(&mut self, words: &[&str]) -> Result<(), Errno> {
        if words.first().is_some_and(|w| w.eq_ignore_ascii_case("invalidate_cblocks")) {
            let ranges = self.t.parse_invalidate(words)?;
            for (begin, end) in ranges {
                for c in begin..end {
                    self.invalidate_cblock(c as u32)?;
                }
            }
            return Ok(());
        }
        self.t.message(words)
    }

    /// Sets [`CacheOptions::resume_delay`] for the next reload.
    pub fn set_resume_delay(&mut self, delay: Nanos) {
        self.opts.resume_delay = delay;
    }

    /// The simulated time.
    pub fn now(&self) -> Nanos {
        self.now
    }

    /// Advances simulated time; the waker runs once per elapsed second.
    pub fn set_time(&mut self, now: Nanos) {
        if now < self.now {
            return;
        }
        self.now = now;
        if !self.background_allowed {
            return;
        }
        if now >= self.next_waker {
            // do_waker
            self.t.policy.tick(true, now);
            self.wake_migrations = true;
            self.schedule_commit();
            if self.opts.waker_wheel_phase.is_some() {
                self.next_waker = self.waker_due(now);
            }
            while self.next_waker <= now {
                self.next_waker += COMMIT_PERIOD;
            }
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
        self.user.len()
    }

    /// Data I/O issued and not yet completed, in issue order.
    pub fn in_flight_io(&self) -> Vec<CacheIoInfo> {
        self.io
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
        !self.ready.is_empty()
            || !self.deferred.is_empty()
            || self.commit_queued
            || (self.wake_migrations && self.background_allowed)
    }

    /// No request, data I/O, migration or worker item is pending.
    pub fn is_idle(&self) -> bool {
        self.user.is_empty()
            && self.io.is_empty()
            && self.migrations.is_empty()
            && self.ready.is_empty()
            && self.deferred.is_empty()
            && self.commit_bios.is_empty()
            && self.commit_work.is_empty()
            && self.commit_ends.is_empty()
            && self.wt_pairs.is_empty()
    }

    /// Requests completed since the last call, in completion order.
    pub fn take_completions(&mut self) -> Vec<CacheCompletion> {
        std::mem::take(&mut self.completions)
    }

    // ------------------------------------------------------------------
    // Submission and the map path

    /// Submits a request: DM core cuts it at cache block boundaries (a
    /// PREFLUSH with data becomes an empty flush first, the data after it
    /// completes; an empty flush becomes two flush bios, one per device);
    /// `cache_map` runs on each piece right here.
    pub fn submit(&mut self, req: BioRequest) -> Result<BioId, TargetError> {
        let dev_sectors = self.t.sizes().target_len;
        req.validate(dev_sectors).map_err(|e| err(Errno::EINVAL, e))?;
        let id = BioId(self.next_bio);
        self.next_bio += 1;
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
        self.user.insert(
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
        &mut self,
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
        self.t.table().block_sectors
    }

    fn oblock_of(&self, p: &Piece) -> u64 {
        p.sector / self.block_sectors()
    }

    /// `cache_map`.
    fn cache_map(&mut self, p: Piece) {
        let id = self.next_piece;
        self.next_piece += 1;
        let (_, origin_blocks) = self.t.geometry();
        let block = self.oblock_of(&p);
        let is_flush_or_discard = matches!(p.op, BioOp::Flush | BioOp::Discard);
        self.pieces.insert(id, p);
        if !is_flush_or_discard && block >= origin_blocks {
            self.accounted_begin(id);
            self.remap(id, CacheDisk::Origin, None);
            self.issue(id);
            return;
        }
        if is_flush_or_discard {
            self.deferred.push_back(id);
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
        self.pieces[&id].op == BioOp::Write
    }

    /// `bio_detain_shared`: true when the shared lock is granted.
    fn detain_shared(&mut self, id: PieceId, block: u64) -> bool {
        self.detain_shared_as(id, block, true)
    }

    /// [`Self::detain_shared`]; `from_map` is false for an overwrite bio
    /// falling back to a full copy (the deliberate bug below is the map
    /// path's only).
    fn detain_shared_as(&mut self, id: PieceId, block: u64, from_map: bool) -> bool {
        let write = self.is_write(id);
        let level = lock_level(write);
        if from_map && write && self.opts.mutations.cache_write_ignores_migration_lock {
            // The deliberate bug: writes do not wait for a migration.
            if let Some(c) = self.prison.lookup(&origin_key(block)) {
                if self.prison.view(c).is_some_and(|v| v.exclusive.is_some()) {
                    return true;
                }
            }
        }
        match self.prison.get(origin_key(block), level, id) {
            Get::Granted { cell, .. } => {
                self.pieces.get_mut(&id).expect("piece").cell = Some(cell);
                true
            }
            Get::Queued { .. } => {
                self.counters.bios_waited += 1;
                false
            }
        }
    }

    fn drop_shared_lock(&mut self, id: PieceId) {
        let Some(cell) = self.pieces.get_mut(&id).and_then(|p| p.cell.take()) else { return };
        match self.prison.put(cell) {
            Ok(out) => {
                if let Some(k) = out.run {
                    self.ready.push_back(k);
                }
                if let Some((mg, _)) = out.orphaned {
                    self.bug(format!("migration {mg}'s continuation was orphaned in a freed cell"));
                }
            }
            Err(e) => self.bug(format!("put of a shared lock: {e}")),
        }
    }

    fn writes_complete_block(&self, id: PieceId) -> bool {
        let p = &self.pieces[&id];
        p.op == BioOp::Write && p.nr_sectors == self.block_sectors()
    }

    fn dblock_of(&self, oblock: u64) -> u64 {
        oblock * self.block_sectors() / self.t.discard_block_size
    }

    fn is_discarded_oblock(&self, oblock: u64) -> bool {
        let d = self.dblock_of(oblock) as usize;
        self.t.discards.get(d).copied().unwrap_or(false)
    }

    fn clear_discard(&mut self, oblock: u64) {
        let d = self.dblock_of(oblock) as usize;
        if let Some(b) = self.t.discards.get_mut(d) {
            *b = false;
        }
    }

    fn optimisable(&self, id: PieceId, block: u64) -> bool {
        self.t.table().io_mode == IoMode::Writeback
            && (self.is_discarded_oblock(block) || self.writes_complete_block(id))
    }

    /// `map_bio`; true when the bio was remapped and should be issued now.
    fn map_bio(&mut self, id: PieceId, block: u64, commit_needed: &mut bool) -> bool {
        if !self.detain_shared(id, block) {
            *commit_needed = true;
            return false;
        }
        let write = self.is_write(id);
        let dir = if write { DataDir::Write } else { DataDir::Read };
        let cblock = if self.optimisable(id, block) {
            let l = self.t.policy.lookup_with_work(block, dir, true);
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
            let l = self.t.policy.lookup(block, dir, false);
            if l.background_queued {
                self.wake_migrations = true;
            }
            l.cblock
        };
        match cblock {
            None => {
                self.inc_counter(write, false);
                if self.pieces[&id].req_nr != 0 {
                    self.end_piece(id);
                    return false;
                }
                self.accounted_begin(id);
                self.remap_to_origin_clear_discard(id, block);
            }
            Some(cblock) => {
                self.inc_counter(write, true);
                match self.t.table().io_mode {
                    IoMode::Passthrough => {
                        if write {
                            self.drop_shared_lock(id);
                            self.counters.invalidations += 1;
                            self.invalidate_start(cblock, block, id);
                            return false;
                        }
                        self.remap_to_origin_clear_discard(id, block);
                    }
                    mode => {
                        if write && mode == IoMode::Writethrough && !self.t.is_dirty(cblock) {
                            if self.opts.fixes.writethrough_pairs_one_at_a_time {
                                if let Some((_, waiting)) = self.wt_pairs.get_mut(&cblock) {
                                    // Parked with its shared lock until the
                                    // pair in flight on this block is done.
                                    waiting.push_back((id, block));
                                    return false;
                                }
                                self.wt_pairs.insert(cblock, (id, VecDeque::new()));
                                self.pieces.get_mut(&id).expect("piece").wt_cblock = Some(cblock);
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
    fn fua_waits_for_commit(&mut self, id: PieceId, commit_needed: &mut bool) -> bool {
        if self.pieces[&id].fua {
            self.accounted_complete(id);
            self.commit_bios.push(id);
            self.issue_after_commit_queued();
            *commit_needed = true;
            return false;
        }
        true
    }

    /// A writethrough pair finished: the next bio parked on its cache
    /// block goes (the writethrough fix).
    fn writethrough_pair_done(&mut self, cblock: u32) {
        let Some((_, mut waiting)) = self.wt_pairs.remove(&cblock) else { return };
        let Some((next, block)) = waiting.pop_front() else { return };
        self.wt_pairs.insert(cblock, (next, waiting));
        self.pieces.get_mut(&next).expect("piece").wt_cblock = Some(cblock);
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

    fn inc_counter(&mut self, write: bool, hit: bool) {
        let s = &mut self.t.stats;
        match (write, hit) {
            (false, true) => s.read_hits += 1,
            (false, false) => s.read_misses += 1,
            (true, true) => s.write_hits += 1,
            (true, false) => s.write_misses += 1,
        }
    }

    fn check_tick_bio(&mut self, id: PieceId) {
        if self.need_tick_bio {
            let p = self.pieces.get_mut(&id).expect("piece");
            if !p.fua && p.op != BioOp::Discard && p.op != BioOp::Flush {
                p.tick = true;
                self.need_tick_bio = false;
            }
        }
    }

    fn remap(&mut self, id: PieceId, disk: CacheDisk, cblock: Option<u32>) {
        let bs = self.block_sectors();
        let p = self.pieces.get_mut(&id).expect("piece");
        let sector = match cblock {
            Some(c) => u64::from(c) * bs + p.sector % bs,
            None => p.sector,
        };
        p.dest = Some((disk, sector));
    }

    fn remap_to_origin_clear_discard(&mut self, id: PieceId, block: u64) {
        self.check_tick_bio(id);
        self.remap(id, CacheDisk::Origin, None);
        if self.is_write(id) {
            self.clear_discard(block);
        }
    }

    fn remap_to_cache_dirty(&mut self, id: PieceId, block: u64, cblock: u32) {
        self.check_tick_bio(id);
        self.remap(id, CacheDisk::Cache, Some(cblock));
        if self.is_write(id) {
            self.set_dirty(cblock);
            self.clear_discard(block);
        }
    }

    /// Writethrough to a clean block: a clone goes to the origin now, the
    /// bio itself to the cache; it completes when both have.
    fn remap_to_origin_and_cache(&mut self, id: PieceId, block: u64, cblock: u32) {
        self.clear_discard(block);
        let (sector, nr, fua) = {
            let p = &self.pieces[&id];
            (p.sector, p.nr_sectors, p.fua)
        };
        let io = self.new_io_id();
        if self.opts.mutations.cache_writethrough_acks_before_origin {
            let data = self.pieces[&id].data.clone();
            self.io.insert(io, DataIo::Detached { disk: CacheDisk::Origin, sector, data, fua });
        } else {
            // The bio (`bio_chain`) ends when its clone and itself have.
            let p = self.pieces.get_mut(&id).expect("piece");
            p.pending += 2;
            p.self_counted = true;
            self.io.insert(
                io,
                DataIo::Piece {
                    piece: id,
                    disk: CacheDisk::Origin,
                    sector,
                    nr_sectors: nr,
                    op: BioOp::Write,
                    fua,
                },
            );
        }
        self.remap(id, CacheDisk::Cache, Some(cblock));
    }

    /// `set_dirty`.
    fn set_dirty(&mut self, cblock: u32) {
        let i = cblock as usize;
        if i < self.t.dirty.len() && !self.t.dirty[i] {
            self.t.dirty[i] = true;
            self.t.nr_dirty += 1;
            if !self.opts.mutations.cache_demote_frees_dirty {
                self.t.policy.set_dirty(cblock);
            }
        }
    }

    fn force_set_dirty(&mut self, cblock: u32) {
        let i = cblock as usize;
        if i < self.t.dirty.len() && !self.t.dirty[i] {
            self.t.dirty[i] = true;
            self.t.nr_dirty += 1;
        }
        self.t.policy.set_dirty(cblock);
    }

    fn force_clear_dirty(&mut self, cblock: u32) {
        let i = cblock as usize;
        if i < self.t.dirty.len() && self.t.dirty[i] {
            self.t.dirty[i] = false;
            self.t.nr_dirty -= 1;
        }
        self.t.policy.clear_dirty(cblock);
    }

    fn accounted_begin(&mut self, id: PieceId) {
        let p = self.pieces.get_mut(&id).expect("piece");
        if p.op != BioOp::Discard && !p.accounted {
            p.accounted = true;
            self.in_flight_sectors += p.nr_sectors;
        }
    }

    fn accounted_complete(&mut self, id: PieceId) {
        let p = self.pieces.get_mut(&id).expect("piece");
        if p.accounted {
            p.accounted = false;
            self.in_flight_sectors -= p.nr_sectors;
            if self.in_flight_sectors == 0 {
                self.idle_since = Some(self.now);
            }
        }
    }

    fn new_io_id(&mut self) -> CacheIoId {
        let id = CacheIoId(self.next_io);
        self.next_io += 1;
        id
    }

    /// Sends a remapped bio to its device (an in-flight data I/O).
    fn issue(&mut self, id: PieceId) {
        let io = self.new_io_id();
        let p = self.pieces.get_mut(&id).expect("piece");
        let Some((disk, sector)) = p.dest else {
            self.bug(format!("bio {id} issued without a remap"));
            return;
        };
        if p.self_counted {
            p.self_counted = false;
        } else {
            p.pending += 1;
        }
        let (nr_sectors, op, fua) = (p.nr_sectors, p.op, p.fua);
        self.io.insert(io, DataIo::Piece { piece: id, disk, sector, nr_sectors, op, fua });
    }

    /// `accounted_request`: the committer's issue op.
    fn accounted_request(&mut self, id: PieceId) {
        self.accounted_begin(id);
        self.issue(id);
    }

    // ------------------------------------------------------------------
    // The committer (the batcher)

    fn schedule_commit(&mut self) {
        self.commit_scheduled = true;
        if !self.commit_bios.is_empty() || !self.commit_work.is_empty() || !self.commit_ends.is_empty() {
            self.commit_queued = true;
        }
    }

    fn issue_after_commit_queued(&mut self) {
        if self.commit_scheduled {
            self.commit_queued = true;
        }
    }

    fn continue_after_commit(&mut self, mg: MgId, step: Step) {
        self.commit_work.push((mg, step));
        if self.commit_scheduled {
            self.commit_queued = true;
        }
    }

    /// The candidate fix's flush of both data devices before a commit.
    fn flush_data_devices(&mut self) -> Result<(), Errno> {
        let c = self.cdev.flush();
        let o = self.odev.flush();
        if c.is_err() || o.is_err() {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// `commit`: refused in read-only and fail modes.
    fn commit(&mut self) -> Result<(), Errno> {
        if self.t.mode >= CacheMode::ReadOnly {
            return Err(Errno::EINVAL);
        }
        self.counters.commits += 1;
        if self.opts.fixes.flush_before_commit {
            self.flush_data_devices()?;
        }
        match self.t.md.commit(false) {
            Ok(()) => {
                self.clean_on_disk = false;
                Ok(())
            }
            Err(_) => {
                self.t.metadata_failed();
                Err(Errno::EIO)
            }
        }
    }

    /// A bio that was never issued fails (its commit failed). A
    /// writethrough bio's origin clone may still be in flight: as with
    /// `bio_chain`, the bio ends only when the clone has.
    fn fail_unissued(&mut self, id: PieceId, e: Errno) {
        let Some(p) = self.pieces.get_mut(&id) else {
            self.bug(format!("a failed commit's bio {id} is gone"));
            return;
        };
        p.status = Err(e);
        if p.self_counted {
            p.self_counted = false;
            p.pending = p.pending.saturating_sub(1);
        }
        if p.pending == 0 {
            self.piece_done(id);
        }
    }

    /// `__commit`.
    fn do_commit(&mut self) {
        self.commit_queued = false;
        self.commit_scheduled = false;
        let work = std::mem::take(&mut self.commit_work);
        let bios = std::mem::take(&mut self.commit_bios);
        let ends = std::mem::take(&mut self.commit_ends);
        let r = if self.t.md.changed_this_transaction() { self.commit() } else { Ok(()) };
        // What the bios waiting for the commit learn (the read-only fix:
        // that no commit can make them durable).
        let r_bios = if self.opts.fixes.read_only_flushes_fail && self.t.mode >= CacheMode::ReadOnly {
            Err(Errno::EIO)
        } else {
            r
        };
        for id in ends {
            if let Err(e) = r_bios {
                self.pieces.get_mut(&id).expect("piece").status = Err(e);
            }
            self.end_piece(id);
        }
        for (mg, step) in work {
            if let Some(m) = self.migrations.get_mut(&mg) {
                m.input = r;
            }
            self.ready.push_back((mg, step));
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
    pub fn run_worker(&mut self) {
        let ready: Vec<_> = self.ready.drain(..).collect();
        for (mg, step) in ready {
            self.run_step(mg, step);
        }
        let deferred: Vec<_> = self.deferred.drain(..).collect();
        let mut commit_needed = false;
        for id in deferred {
            let (op, req_nr, block) = {
                let p = &self.pieces[&id];
                (p.op, p.req_nr, self.oblock_of(p))
            };
            if op == BioOp::Flush {
                let disk = if req_nr == 0 { CacheDisk::Origin } else { CacheDisk::Cache };
                self.pieces.get_mut(&id).expect("piece").dest = Some((disk, 0));
                self.commit_bios.push(id);
                self.issue_after_commit_queued();
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
        if self.wake_migrations {
            self.wake_migrations = false;
            self.check_migrations();
        }
        // The batcher commits only when something waits for the commit
        // (`schedule_commit` with empty lists just remembers the request).
        if self.commit_queued {
            self.do_commit();
        }
    }

    fn process_discard(&mut self, id: PieceId) {
        let (sb, se) = {
            let p = &self.pieces[&id];
            (p.sector, p.sector + p.nr_sectors)
        };
        let dbs = self.t.discard_block_size;
        let b = sb.div_ceil(dbs);
        let e = if se - sb < dbs { b } else { se / dbs };
        for d in b..e {
            if let Some(bit) = self.t.discards.get_mut(d as usize) {
                *bit = true;
            }
        }
        if self.t.table().discard_passdown {
            self.pieces.get_mut(&id).expect("piece").dest = Some((CacheDisk::Origin, sb));
            self.issue(id);
        } else {
            self.end_piece(id);
        }
    }

    fn spare_bandwidth_idle(&self) -> bool {
        // `dm_iot_idle_for(HZ)`: jiffies after idle_time + HZ.
        let jiffies = |t: Nanos| (u128::from(t) * u128::from(DEFAULT_HZ) / 1_000_000_000) as u64;
        let idle = self.in_flight_sectors == 0
            && self.idle_since.is_none_or(|t| jiffies(self.now) > jiffies(t) + u64::from(DEFAULT_HZ));
        let volume = (u64::from(self.io_migrations) + 1) * self.block_sectors();
        idle && volume <= self.t.table().migration_threshold
    }

    /// `check_migrations`.
    fn check_migrations(&mut self) {
        loop {
            let idle = self.spare_bandwidth_idle();
            let Some(work) = self.t.policy.get_background_work(idle) else { break };
            if !self.mg_start(work, None) {
                break;
            }
        }
    }

    // ------------------------------------------------------------------
    // Migrations

    fn mg_start(&mut self, work: PolicyWork, overwrite: Option<PieceId>) -> bool {
        if !self.background_allowed {
            self.t.policy.complete_background_work(work, false);
            if let Some(id) = overwrite {
                self.pieces.get_mut(&id).expect("piece").status = Err(Errno::EIO);
                self.end_piece(id);
            }
            return false;
        }
        self.background_nr += 1;
        let mg = self.next_mg;
        self.next_mg += 1;
        let k = match work.op {
            PolicyOp::Promote => 0,
            PolicyOp::Demote => 1,
            PolicyOp::Writeback => 2,
        };
        self.counters.started[k] += 1;
        if overwrite.is_some() {
            self.counters.overwrites += 1;
        } else {
            self.io_migrations += 1;
        }
        self.migrations.insert(
            mg,
            Migration { work: Some(work), overwrite, cell: None, input: Ok(()), invalidate: None },
        );
        if let Some(id) = overwrite {
            self.pieces.get_mut(&id).expect("piece").hooked = Some(mg);
        }
        // mg_lock_writes
        let level = if overwrite.is_some() { READ_WRITE_LOCK_LEVEL } else { WRITE_LOCK_LEVEL };
        match self.prison.lock(origin_key(work.oblock), level) {
            Err(_) => {
                self.mg_complete(mg, false);
            }
            Ok(l) => {
                self.migrations.get_mut(&mg).expect("mg").cell = Some(l.cell);
                if self.opts.mutations.cache_promote_maps_before_copy
                    && work.op == PolicyOp::Promote
                    && self.t.md.insert_mapping(work.cblock, work.oblock).is_err()
                {
                    self.t.metadata_failed();
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

    fn quiesce(&mut self, mg: MgId, step: Step) {
        let Some(cell) = self.migrations[&mg].cell else {
            self.bug(format!("migration {mg} quiesces without a cell"));
            return;
        };
        match self.prison.quiesce(cell, (mg, step)) {
            Ok(Quiesce::RunNow(k)) => self.ready.push_back(k),
            Ok(Quiesce::Deferred { replaced }) => {
                if let Some((other, _)) = replaced {
                    self.bug(format!("migration {mg}'s quiesce replaced migration {other}'s"));
                }
            }
            Err(e) => self.bug(format!("quiesce: {e}")),
        }
    }

    fn run_step(&mut self, mg: MgId, step: Step) {
        if !self.migrations.contains_key(&mg) {
            self.bug(format!("continuation {step:?} of finished migration {mg}"));
            return;
        }
        match step {
            Step::Copy => self.mg_copy(mg),
            Step::UpgradeLock => self.mg_upgrade_lock(mg),
            Step::UpdateMetadata => self.mg_update_metadata(mg),
            Step::UpdateMetadataAfterCopy => {
                if self.migrations[&mg].input.is_err() {
                    self.mg_complete(mg, false);
                } else {
                    self.mg_update_metadata(mg);
                }
            }
            Step::Success => {
                let ok = self.migrations[&mg].input.is_ok();
                self.mg_complete(mg, ok);
            }
            Step::InvalidateRemove => self.invalidate_remove(mg),
            Step::InvalidateCommitted => self.invalidate_committed(mg),
            Step::InvalidateCompleted => {
                let ok = self.migrations[&mg].input.is_ok();
                self.invalidate_complete(mg, ok);
            }
        }
    }

    fn mg_copy(&mut self, mg: MgId) {
        let (work, overwrite) = {
            let m = &self.migrations[&mg];
            (m.work.expect("work"), m.overwrite)
        };
        if let Some(id) = overwrite {
            if !self.optimisable(id, work.oblock) {
                // Fall back to a full copy: the bio waits in the cell.
                if self.detain_shared_as(id, work.oblock, false) {
                    self.bug(format!("overwrite fallback of migration {mg} got a shared lock"));
                }
                self.pieces.get_mut(&id).expect("piece").hooked = None;
                let m = self.migrations.get_mut(&mg).expect("mg");
                m.overwrite = None;
                self.io_migrations += 1;
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

    fn mg_full_copy(&mut self, mg: MgId) {
        let work = self.migrations[&mg].work.expect("work");
        let promote = work.op == PolicyOp::Promote;
        let frees_dirty = self.opts.mutations.cache_demote_frees_dirty && work.op == PolicyOp::Demote;
        let skip_clean = !promote && (!self.t.is_dirty(work.cblock) || frees_dirty);
        if skip_clean || self.is_discarded_oblock(work.oblock) {
            self.mg_upgrade_lock(mg);
            return;
        }
        let bs = self.block_sectors();
        let o = (CacheDisk::Origin, work.oblock * bs);
        let c = (CacheDisk::Cache, u64::from(work.cblock) * bs);
        let (from, to) = if promote { (o, c) } else { (c, o) };
        let io = self.new_io_id();
        self.io.insert(io, DataIo::Copy { mg, from, to, nr_sectors: bs });
        if self.opts.mutations.cache_writeback_clean_before_copy && work.op == PolicyOp::Writeback {
            // The deliberate bug: the writeback completes at issue; its copy
            // runs on with no migration behind it.
            self.mg_complete(mg, true);
        }
    }

    fn mg_upgrade_lock(&mut self, mg: MgId) {
        if self.migrations[&mg].input.is_err() {
            self.mg_complete(mg, false);
            return;
        }
        let cell = self.migrations[&mg].cell.expect("cell");
        match self.prison.lock_promote(cell, READ_WRITE_LOCK_LEVEL) {
            Err(_) => self.mg_complete(mg, false),
            Ok(true) => self.quiesce(mg, Step::UpdateMetadata),
            Ok(false) => self.mg_update_metadata(mg),
        }
    }

    fn mg_update_metadata(&mut self, mg: MgId) {
        let work = self.migrations[&mg].work.expect("work");
        match work.op {
            PolicyOp::Promote => {
                if !self.opts.mutations.cache_promote_maps_before_copy
                    && self.t.md.insert_mapping(work.cblock, work.oblock).is_err()
                {
                    self.t.metadata_failed();
                    self.mg_complete(mg, false);
                    return;
                }
                self.mg_complete(mg, true);
            }
            PolicyOp::Demote => {
                if self.t.md.remove_mapping(work.cblock).is_err() {
                    self.t.metadata_failed();
                    self.mg_complete(mg, false);
                    return;
                }
                self.continue_after_commit(mg, Step::Success);
                self.schedule_commit();
            }
            PolicyOp::Writeback => self.mg_complete(mg, true),
        }
    }

    fn mg_complete(&mut self, mg: MgId, success: bool) {
        let Some(m) = self.migrations.remove(&mg) else { return };
        let work = m.work.expect("work");
        let k = match work.op {
            PolicyOp::Promote => 0,
            PolicyOp::Demote => 1,
            PolicyOp::Writeback => 2,
        };
        if success {
            self.counters.succeeded[k] += 1;
            match work.op {
                PolicyOp::Promote => self.t.promotions += 1,
                PolicyOp::Demote => self.t.demotions += 1,
                PolicyOp::Writeback => {}
            }
        }
        match work.op {
            PolicyOp::Promote => {
                self.clear_discard(work.oblock);
                self.t.policy.complete_background_work(work, success);
                if let Some(id) = m.overwrite {
                    if success {
                        self.force_set_dirty(work.cblock);
                    } else {
                        let p = self.pieces.get_mut(&id).expect("piece");
                        p.status = Err(m.input.err().unwrap_or(Errno::EIO));
                    }
                    let p = self.pieces.get_mut(&id).expect("piece");
                    p.hooked = None;
                    if success && p.fua && self.opts.fixes.fua_overwrite_waits_for_commit {
                        self.commit_ends.push(id);
                        self.schedule_commit();
                    } else {
                        self.end_piece(id);
                    }
                } else {
                    if success {
                        self.force_clear_dirty(work.cblock);
                    }
                    self.io_migrations -= 1;
                }
            }
            PolicyOp::Demote | PolicyOp::Writeback => {
                if success {
                    self.force_clear_dirty(work.cblock);
                }
                self.t.policy.complete_background_work(work, success);
                self.io_migrations -= 1;
            }
        }
        self.release_cell(m.cell);
        self.wake_migrations = true;
        self.background_nr -= 1;
    }

    fn release_cell(&mut self, cell: Option<CellId>) {
        if let Some(cell) = cell {
            match self.prison.unlock(cell) {
                Ok(u) => self.deferred.extend(u.bios),
                Err(e) => self.bug(format!("unlock: {e}")),
            }
        }
    }

    // ------------------------------------------------------------------
    // Invalidation (passthrough)

    fn invalidate_cblock(&mut self, cblock: u32) -> Result<(), Errno> {
        match self.t.policy.invalidate_mapping(cblock) {
            Ok(()) => {
                if self.t.md.remove_mapping(cblock).is_err() {
                    self.t.metadata_failed();
                    return Err(Errno::EIO);
                }
                Ok(())
            }
            Err(Errno::ENODATA) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn invalidate_start(&mut self, cblock: u32, oblock: u64, bio: PieceId) {
        if !self.background_allowed {
            self.pieces.get_mut(&bio).expect("piece").status = Err(Errno::EIO);
            self.end_piece(bio);
            return;
        }
        self.background_nr += 1;
        let mg = self.next_mg;
        self.next_mg += 1;
        self.migrations.insert(
            mg,
            Migration {
                work: None,
                overwrite: Some(bio),
                cell: None,
                input: Ok(()),
                invalidate: Some((cblock, oblock)),
            },
        );
        match self.prison.lock(origin_key(oblock), READ_WRITE_LOCK_LEVEL) {
            Err(_) => {
                // Retry the bio later.
                self.migrations.get_mut(&mg).expect("mg").overwrite = None;
                self.deferred.push_back(bio);
                self.invalidate_complete(mg, false);
            }
            Ok(l) => {
                self.migrations.get_mut(&mg).expect("mg").cell = Some(l.cell);
                if l.must_quiesce {
                    self.quiesce(mg, Step::InvalidateRemove);
                } else {
                    self.ready.push_back((mg, Step::InvalidateRemove));
                }
            }
        }
    }

    fn invalidate_remove(&mut self, mg: MgId) {
        let (cblock, _) = self.migrations[&mg].invalidate.expect("invalidation");
        if self.invalidate_cblock(cblock).is_err() {
            self.invalidate_complete(mg, false);
            return;
        }
        self.t.demotions += 1;
        self.continue_after_commit(mg, Step::InvalidateCommitted);
        self.schedule_commit();
    }

    fn invalidate_committed(&mut self, mg: MgId) {
        if self.migrations[&mg].input.is_err() {
            self.invalidate_complete(mg, false);
            return;
        }
        let (_, oblock) = self.migrations[&mg].invalidate.expect("invalidation");
        let bio = self.migrations[&mg].overwrite.expect("bio");
        self.remap_to_origin_clear_discard(bio, oblock);
        self.pieces.get_mut(&bio).expect("piece").hooked = Some(mg);
        self.issue(bio);
    }

    fn invalidate_complete(&mut self, mg: MgId, success: bool) {
        let Some(m) = self.migrations.remove(&mg) else { return };
        self.release_cell(m.cell);
        if let Some(bio) = m.overwrite {
            let p = self.pieces.get_mut(&bio).expect("piece");
            p.hooked = None;
            if !success && p.status.is_ok() {
                p.status = Err(Errno::EIO);
            }
            self.end_piece(bio);
        }
        self.background_nr -= 1;
    }

    // ------------------------------------------------------------------
    // Completions

    /// Completes data I/O `id`: performs it on its device and runs its
    /// end-io path.
    pub fn complete_io(&mut self, id: CacheIoId) -> Result<(), TargetError> {
        self.finish_io(id, None)
    }

    /// Completes data I/O `id` with an error instead of performing it.
    pub fn fail_io(&mut self, id: CacheIoId, errno: Errno) -> Result<(), TargetError> {
        self.finish_io(id, Some(errno))
    }

    fn device(&mut self, disk: CacheDisk) -> &mut dyn BlockDevice {
        match disk {
            CacheDisk::Cache => &mut self.cdev,
            CacheDisk::Origin => &mut self.odev,
        }
    }

    fn finish_io(&mut self, id: CacheIoId, fault: Option<Errno>) -> Result<(), TargetError> {
        let Some(io) = self.io.remove(&id) else {
            return Err(err(Errno::EINVAL, format!("no data I/O {} in flight", id.0)));
        };
        match io {
            DataIo::Piece { piece, disk, sector, nr_sectors, op, fua } => {
                if !self.pieces.contains_key(&piece) {
                    self.bug(format!("data I/O {} of bio {piece}, which has ended", id.0));
                    return Ok(());
                }
                let r = match fault {
                    Some(e) => Err(e),
                    None => {
                        let p = self.pieces.get(&piece).expect("piece");
                        let data = if op == BioOp::Write { p.data.clone() } else { Vec::new() };
                        let dev = self.device(disk);
                        let r = match op {
                            BioOp::Read => {
                                let mut buf = vec![0; (nr_sectors * SECTOR_SIZE) as usize];
                                let r = dev.read(sector, &mut buf);
                                if r.is_ok() {
                                    self.pieces.get_mut(&piece).expect("piece").data = buf;
                                }
                                r
                            }
                            BioOp::Write => dev.write(sector, &data, WriteFlags { fua }),
                            BioOp::Flush => dev.flush(),
                            BioOp::Discard => Ok(()),
                        };
                        r.map_err(|_| Errno::EIO)
                    }
                };
                let p = self.pieces.get_mut(&piece).expect("piece");
                if let Err(e) = r {
                    p.status = Err(e);
                }
                if p.pending > 0 {
                    p.pending -= 1;
                }
                if p.pending == 0 {
                    self.piece_done(piece);
                }
            }
            DataIo::Detached { disk, sector, data, fua } => {
                if fault.is_none() {
                    let _ = self.device(disk).write(sector, &data, WriteFlags { fua });
                }
            }
            DataIo::Copy { mg, from, to, nr_sectors } => {
                let r = match fault {
                    Some(e) => Err(e),
                    None => {
                        let mut buf = vec![0; (nr_sectors * SECTOR_SIZE) as usize];
                        let r = self.device(from.0).read(from.1, &mut buf);
                        r.and_then(|()| self.device(to.0).write(to.1, &buf, WriteFlags::default()))
                            .map_err(|_| Errno::EIO)
                    }
                };
                if let Some(m) = self.migrations.get_mut(&mg) {
                    if let Err(e) = r {
                        m.input = Err(e);
                    }
                    self.ready.push_back((mg, Step::UpgradeLock));
                }
            }
        }
        Ok(())
    }

    /// Every data I/O of a bio is done: its hook, or `cache_end_io`.
    fn piece_done(&mut self, id: PieceId) {
        if let Some(mg) = self.pieces[&id].hooked {
            let status = self.pieces[&id].status;
            self.accounted_complete(id);
            let Some(m) = self.migrations.get_mut(&mg) else {
                self.bug(format!("overwrite bio of finished migration {mg}"));
                return;
            };
            if let Err(e) = status {
                m.input = Err(e);
            }
            let step = if m.invalidate.is_some() {
                Step::InvalidateCompleted
            } else {
                Step::UpdateMetadataAfterCopy
            };
            self.ready.push_back((mg, step));
            return;
        }
        self.end_piece(id);
    }

    /// `cache_end_io` (policy tick, shared lock, I/O tracker), then DM
    /// core's accounting of the piece to its request.
    fn end_piece(&mut self, id: PieceId) {
        if !self.pieces.contains_key(&id) {
            return;
        }
        if self.pieces[&id].tick {
            self.t.policy.tick(false, self.now);
            self.need_tick_bio = true;
        }
        self.drop_shared_lock(id);
        self.accounted_complete(id);
        let p = self.pieces.remove(&id).expect("piece");
        let wt = p.wt_cblock;
        self.account(p);
        if let Some(cblock) = wt {
            self.writethrough_pair_done(cblock);
        }
    }

    fn account(&mut self, p: Piece) {
        let Some(u) = self.user.get_mut(&p.parent) else { return };
        if let Err(e) = p.status {
            if u.result.is_ok() {
                u.result = Err(e);
            }
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
            for piece in next {
                self.cache_map(piece);
            }
            return;
        }
        let u = self.user.remove(&p.parent).expect("request");
        let data = if u.result.is_ok() && u.is_read { u.data } else { Vec::new() };
        self.completions.push(CacheCompletion { id: p.parent, result: u.result, data });
    }

    /// Checks the in-core state for consistency: no broken precondition
    /// recorded (by the target, the prison or the metadata: a walk past its
    /// bound, a reference count below zero), every dirty count matches its
    /// bits, the prison's own checks.
    pub fn check(&self) -> Result<(), String> {
        if let Some(b) = &self.broken {
            return Err(b.clone());
        }
        if let Some(b) = self.t.md.broken() {
            return Err(format!("{b} (cache metadata)"));
        }
        let n = self.t.dirty.iter().filter(|d| **d).count() as u64;
        if n != self.t.nr_dirty {
            return Err(format!("nr_dirty is {} but {n} dirty bits are set", self.t.nr_dirty));
        }
        self.prison.check()
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
        let mut c = cache(None);
        assert_eq!(c.next_waker, COMMIT_PERIOD);
        c.set_time(COMMIT_PERIOD + 3 * JIFFY);
        assert_eq!(c.next_waker, 2 * COMMIT_PERIOD, "periodic, not counted from the late run");
    }

    #[test]
    fn with_a_phase_the_waker_runs_where_the_timer_wheel_puts_it() {
        // Absolute jiffy 3 at time 0: due at 253, the next multiple of 8
        // after it is 256, relative jiffy 253.
        let mut c = cache(Some(3));
        assert_eq!(c.next_waker, 253 * JIFFY);
        // Due exactly on a bucket boundary: the next bucket (8 later).
        let mut d = cache(Some(6));
        assert_eq!(d.next_waker, 258 * JIFFY, "256 + 8 - 6");
        // Counted from when it ran: at relative jiffy 255 (absolute 258),
        // due 508, bucket 512, relative 509.
        c.set_time(255 * JIFFY + JIFFY / 2);
        assert_eq!(c.next_waker, 509 * JIFFY);
        d.set_time(258 * JIFFY);
        assert_eq!(d.next_waker, 514 * JIFFY, "absolute 264 + 250 = 514, bucket 520");
    }
}
