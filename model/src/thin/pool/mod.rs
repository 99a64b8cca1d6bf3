//! The thin-pool target and its thin devices, in the kernel's shape
//! (dm-thin.c of Linux 6.1, spec §3 and §5).
//!
//! The concurrent core is laid out as in the kernel, not as a monolith:
//!
//! - the **map path** ([`Pool::submit`]) runs in the submitter's context: it
//!   detains the virtual cell, looks the block up without blocking, remaps
//!   mapped unshared blocks straight to the data device (the fast path) and
//!   hands everything else to the worker;
//! - the **bio prison** ([`crate::prison`]) holds cells keyed by virtual and
//!   data block; two **deferred sets** ([`crate::deferred_set`]) make
//!   break-sharing wait for older shared reads and discards for older I/O;
//! - the **worker** ([`Pool::run_worker`], one pass of `do_worker`) processes
//!   prepared mappings and discards, then each active device's deferred cells
//!   and bios, then commits when a flush or the commit period asks for it;
//! - **completions** ([`Pool::complete_io`]) run the end-io paths: deferred
//!   set decrements, mapping preparation, passdown.
//!
//! Every piece of shared state sits behind a [`crate::sync`] lock named after
//! the kernel's: `root_lock` (metadata), the prison lock, the deferred sets'
//! locks, `pool->lock` (the pool lists), `tc->lock` (a device's lists). All
//! entry points take `&self`, so the same code runs single-stepped by the
//! simulator — "map submitter k's bio", "run one worker pass", "complete data
//! I/O n" — or on real threads under loom and shuttle.
//!
//! Data I/O is asynchronous: a bio remapped to the data device, a kcopyd zero
//! or copy, a passdown discard each become an in-flight [`IoId`] that reaches
//! the data device only when the caller completes it. Metadata I/O is
//! synchronous, as bufio's is from the worker's point of view.
//!
//! Deliberate differences from the kernel, all invisible to a user of the
//! devices: lookups in the map path never return "would block" (the model's
//! buffer cache holds every block); the mempools never run dry; noflush
//! suspend (requeue mode) and external origins are not modelled; one thin
//! device id can be active once.

mod bio;
mod io;
mod map;
mod worker;

use std::collections::BTreeMap;
use std::fmt;

use bio::Bio;
pub use bio::{BioId, BioOp, BioRequest, Completion};
use io::IoState;
pub use io::{DataIoKind, DataRequest, IoId, IoInfo};

use crate::block_device::{BlockDevice, IoError};
use crate::deferred_set::DeferredSet;
use crate::errno::Errno;
use crate::mutation::Mutations;
use crate::pdata::layout::space_map::MAX_METADATA_BLOCKS;
use crate::pdata::PdataError;
use crate::prison::{BioPrison, CellId};
use crate::probes::PoolProbes;
use crate::sync::{into_inner, lock, Arc, AtomicUsize, Mutex, Ordering};
use crate::thin::message::{MessageError, PoolMessage};
use crate::thin::metadata::{ThinError, ThinId, ThinMetadata};
use crate::thin::mode::PoolMode;
use crate::thin::status::{self, DiscardWord, PoolInfo};
use crate::thin::table::{PoolTable, TableError};

/// Simulated time in nanoseconds, supplied by the caller ([`Pool::set_time`]).
pub type Nanos = u64;

/// How long the pool may go without a commit while devices have changes
/// (`COMMIT_PERIOD`, one second).
pub const COMMIT_PERIOD: Nanos = 1_000_000_000;

/// The `no_space_timeout` module parameter's default: how long bios queue in
/// out-of-data-space mode before they fail with ENOSPC.
pub const DEFAULT_NO_SPACE_TIMEOUT: Nanos = 60_000_000_000;

/// Names a prepared mapping (the kernel's `dm_thin_new_mapping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MappingId(u64);

/// A failure reported to the caller of a message, an activation or a status
/// query: the errno the ioctl returns and the kernel's log text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetError {
    /// The errno.
    pub errno: Errno,
    /// What the kernel logs (or sets as `ti->error`).
    pub message: String,
}

impl TargetError {
    fn new(errno: Errno, message: impl Into<String>) -> Self {
        TargetError { errno, message: message.into() }
    }
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.errno)
    }
}

impl std::error::Error for TargetError {}

impl From<TableError> for TargetError {
    fn from(e: TableError) -> Self {
        TargetError { errno: e.errno, message: e.message }
    }
}

impl From<MessageError> for TargetError {
    fn from(e: MessageError) -> Self {
        TargetError { errno: e.errno, message: e.message }
    }
}

/// Knobs that are not part of the table line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolOptions {
    /// The `no_space_timeout` module parameter; 0 queues for ever.
    pub no_space_timeout: Nanos,
    /// Deliberate bugs for detector tests (all off by default).
    pub mutations: Mutations,
    /// Candidate fixes for kernel bugs dmsim found (all off by default: the
    /// model behaves as kernel 6.1 does).
    pub fixes: KernelFixes,
    /// How the bio prison is locked (the concurrency design; kernel 6.1's
    /// by default). The simulator single-steps the pool, so the design
    /// changes nothing it observes; the concurrency harnesses run each.
    pub locking: LockingDesign,
    /// Where the waker runs. `None` (the default): the worker is woken for
    /// a timed commit as soon as one is due. `Some(phase)`: the waker runs
    /// where 6.1's timer wheel puts a delayed work of `HZ` jiffies
    /// ([`crate::timer_wheel`]; `phase` is the absolute jiffy, mod 8, at
    /// simulated time 0), and a pool's commit clock starts when it is
    /// created ([`Pool::start_clock`]), as `pool_create` sets
    /// `last_commit_jiffies`. A kernel replay that follows the kernel's
    /// jiffies sets it.
    pub waker_wheel_phase: Option<u64>,
    /// Whether the worker commits when the commit period has passed
    /// (`need_commit_due_to_time`; true, the default). False: it commits
    /// a changed transaction only for flushes, messages and
    /// [`Pool::request_commit`] — a kernel replay that places the
    /// kernel's timed commits where the kernel made them sets it.
    pub timed_commits: bool,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            no_space_timeout: DEFAULT_NO_SPACE_TIMEOUT,
            mutations: Mutations::default(),
            fixes: KernelFixes::default(),
            locking: LockingDesign::Kernel61,
            waker_wheel_phase: None,
            timed_commits: true,
        }
    }
}

/// Fixes for kernel 6.1 bugs that dmsim found, each off by default so that
/// the model stays faithful; a test pins each bug and shows its fix.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelFixes {
    /// In read-only and out-of-data-space modes, a read of a block shared
    /// with a snapshot releases its virtual cell by issuing every waiting
    /// bio to the shared block — writes included, so a write that queued
    /// behind the read lands in the snapshot's data
    /// (`__process_bio_read_only` → `inc_remap_and_issue_cell`). The fix
    /// releases such a cell like the write-mode path does: waiting reads go
    /// to the shared block, writes go back to the deferred list (where they
    /// are unserviceable, as a write to a shared block in these modes is).
    pub shared_read_defers_waiting_writes: bool,
    /// Without discard passdown, a discard unmaps its range without taking
    /// the data blocks' cells (`process_discard_cell_no_passdown`), so it
    /// also unmaps a block whose sharing a write is breaking: that write
    /// let go of its virtual cell once the copy was scheduled, and is not
    /// counted in the all-I/O set the discard waits on until the copy is
    /// done. Two ways to lose data follow. A later write finds the block
    /// unmapped and provisions a second one; if that provision finishes
    /// first, the copy's insert replaces its mapping and the acknowledged
    /// later write is gone. Or the copy finishes just before the discard
    /// runs: the breaking write is then in flight to the new block when the
    /// discard frees it, a commit makes it reusable, and the write lands
    /// in whichever device's block reuses it. The fix leaves blocks whose
    /// data cell is busy when the discard is prepared (or when it runs)
    /// mapped, as the passdown path does.
    pub discard_spares_blocks_being_unshared: bool,
    /// A pool message whose metadata operation fails on an I/O or checksum
    /// error only warns (`pool_message`), and the operation's partial
    /// changes stay in the open transaction: a `delete` that removed the
    /// device's details record and then failed to read its mapping tree
    /// leaves a mapping tree without details, which the next commit makes
    /// permanent (`__delete_device` carries the comment "TODO: failure
    /// should mark the transaction invalid"). The fix does what that
    /// comment asks: the failure aborts the transaction (read-only mode,
    /// needs_check), as other metadata failures do. No 6.1 trigger is
    /// known (docs/findings.md): the one the campaign finds fails the
    /// message only with `refcount_errors_fail_the_operation`, whose
    /// companion this fix is.
    pub failed_message_aborts: bool,
    /// In read-only and out-of-data-space modes a read of a shared block
    /// goes straight to it (`__process_bio_read_only`): it neither waits in
    /// the block's data cell, where a break-sharing copy may hold it, nor
    /// counts as a shared read. When that copy finishes, the old block can
    /// lose its last reference; a commit frees it, the pool leaves
    /// out-of-data-space mode, and a new allocation reuses the block while
    /// the read is still in flight — which then returns whatever the new
    /// owner wrote there, possibly another device's data. The fix gives
    /// such reads the write-mode protocol (`process_shared_bio`): wait in
    /// the data cell, else count as a shared read.
    pub read_only_shared_reads_wait_for_copies: bool,
    /// A passdown discard decides which unmapped blocks nobody else uses
    /// by the current transaction's reference counts
    /// (`passdown_double_checking_shared_status` → `dm_pool_block_is_shared`,
    /// which reads the live space map). A block that another device stopped
    /// using in the open transaction — a write broke sharing and remapped
    /// its virtual block to a copy — counts once, so the discard goes down
    /// to the data device; but the last commit still maps the block in
    /// that other device, and after a crash the device reads the discarded
    /// block where it had acknowledged, flushed data. (Allocation already
    /// guards the committed state: `sm_disk_new_block` takes only blocks
    /// free in both the committed and the current counts.) The fix also
    /// counts as shared a block that the last commit reaches from anywhere
    /// but the discarded mapping itself, and leaves it on the data device.
    pub passdown_spares_blocks_the_last_commit_maps: bool,
    /// A passdown discard holds the data blocks it unmapped, between its
    /// two passes, with an extra reference count (pass one's
    /// `dm_pool_inc_data_range`, pass two's `dm_pool_dec_data_range`), so
    /// that they are not reallocated while the discard to the data device
    /// is in flight. A count is metadata: any commit in between (another
    /// device's flush, the commit period, an allocation when the pool is
    /// full) makes the hold durable, and a crash before pass two's commit
    /// leaves every such block counted once more than it is mapped — a
    /// block still mapped by a snapshot counted twice, which no later
    /// unmapping frees (the checkers call it damage), an unshared one
    /// leaked. The fix holds the blocks in core: the allocator passes over
    /// them, the counts do not change, and a crash forgets the hold with
    /// the discard.
    pub passdown_holds_blocks_in_core: bool,
    /// In out-of-data-space and read-only modes the worker handles a bio
    /// the map path deferred (a FUA or PREFLUSH write, a flush) without
    /// its virtual cell (`process_bio_read_only`): it looks the block up
    /// and remaps it past a discard that holds the cell and waits only for
    /// I/O older than itself. Without passdown the discard then unmaps and
    /// frees the block while the write is in flight to it; a commit makes
    /// the block reusable, and the write lands in whichever block reuses
    /// it (another device's data). The fix takes the virtual cell first
    /// for a bio that carries data, as write mode does (`process_bio` →
    /// `process_cell`), so the write waits for the discard (an empty flush
    /// writes nothing and goes on as before).
    pub read_only_deferred_bios_take_cells: bool,
    /// Without zeroing, `schedule_zero` inserts a new block's mapping by
    /// calling `process_prepared_mapping` directly, not through the pool's
    /// function pointer that a mode change sets to the fail variant. When
    /// the block's own allocation committed because no metadata block was
    /// left (`alloc_data_block`), that commit put the pool out of metadata
    /// space and made the block manager read-only; the insert is refused,
    /// the abort cannot set needs_check on the read-only superblock, and
    /// the pool goes to fail mode — every read fails and growing the
    /// metadata device no longer brings it back — where out-of-metadata-
    /// space mode was due. The fix goes through the mode's function (the
    /// write fails, the pool stays out of metadata space).
    pub unzeroed_mapping_checks_the_mode: bool,
    /// 6.1's btree value types return nothing from `inc` and `dec`
    /// (`data_block_inc`/`dec`, `subtree_dec`, `inc_children`): a
    /// reference count the space map failed to update — a metadata I/O
    /// error inside it — is only logged, and the operation goes on. The
    /// space map can be left half-updated: `sm_ll_inc_bitmap` sets a
    /// block's bitmap entry to 3 before it inserts the count into the
    /// overflow tree, so a failed insert leaves a bitmap saying "3 or
    /// more" with no overflow entry, which the next commit persists. The
    /// fix fails the operation instead (the model's behaviour before stop
    /// 34), so that the pool's usual error path (an abort) runs.
    pub refcount_errors_fail_the_operation: bool,
}

impl KernelFixes {
    /// Every fix on.
    pub const ALL: KernelFixes = KernelFixes {
        shared_read_defers_waiting_writes: true,
        discard_spares_blocks_being_unshared: true,
        failed_message_aborts: true,
        read_only_shared_reads_wait_for_copies: true,
        passdown_spares_blocks_the_last_commit_maps: true,
        passdown_holds_blocks_in_core: true,
        read_only_deferred_bios_take_cells: true,
        unzeroed_mapping_checks_the_mode: true,
        refcount_errors_fail_the_operation: true,
    };
}

/// How the pool's concurrent core is built: the concurrency design under
/// test.
///
/// The kernel's two designs give the same cells and the same answers (spec
/// §5.7: "the cell semantics are identical"); they differ in which lock a
/// prison operation takes and in how `cell_defer_no_holder` nests its
/// locks. [`LockingDesign::RefcountSharing`] changes the protocol itself
/// (which blocks count as shared, and the cells that then guard them). The
/// concurrency harnesses and the campaign (`dmsim check --locking`) run
/// every design through the same checks; a new design is a new variant
/// here, its answers in the methods below, and its arms wherever it
/// changes the protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LockingDesign {
    /// Linux 6.1: one prison lock for the pool; `cell_defer_no_holder`
    /// takes the device's `tc->lock` and releases the cell under it, the
    /// prison lock nested inside.
    #[default]
    Kernel61,
    /// The 2023 concurrency series (Linux 6.4): the prison split into
    /// [`PRISON_REGIONS`] regions with a lock each, a key's region being
    /// `(block_begin >> 10) & (regions - 1)`; keys never cross a 1024-block
    /// boundary (discards are split there); `cell_defer_no_holder` releases
    /// into a local list and takes `tc->lock` only if bios waited.
    Regions,
    /// A hypothetical patch on the 6.1 locking: a mapping counts as shared
    /// only while its data block, or a mapping-tree node on the way to it,
    /// has more than one reference (the kernel's rule is the snapshot
    /// time, so a device keeps copying blocks its deleted snapshots once
    /// shared). Writes then go in place as soon as the last snapshot is
    /// gone — and the data cell is what keeps such a write from landing in
    /// a block a break-sharing copy is still reading: the fast path takes
    /// it (as 6.1 does, where it guards nothing) and so must the worker's
    /// path for unshared blocks (which 6.1 does not).
    RefcountSharing,
}

/// Prison regions in the [`LockingDesign::Regions`] design (the series'
/// initial count; a follow-up sizes it from the CPU count, at most this).
pub const PRISON_REGIONS: usize = 64;

impl LockingDesign {
    /// Every design, for harnesses that run them all.
    pub const ALL: [LockingDesign; 3] =
        [LockingDesign::Kernel61, LockingDesign::Regions, LockingDesign::RefcountSharing];

    /// How many prison locks the design has.
    pub fn prison_regions(self) -> usize {
        match self {
            LockingDesign::Kernel61 | LockingDesign::RefcountSharing => 1,
            LockingDesign::Regions => PRISON_REGIONS,
        }
    }

    /// Whether the prison is split into regions (keys and discards never
    /// cross a region boundary).
    pub fn has_regions(self) -> bool {
        self.prison_regions() > 1
    }

    /// Whether sharing is decided by reference counts rather than the
    /// snapshot time.
    pub fn shares_by_refcount(self) -> bool {
        self == LockingDesign::RefcountSharing
    }

    /// The design named `name` (see [`Self::name`]).
    pub fn from_name(name: &str) -> Option<LockingDesign> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// The design's name, as harness output and the command line show it.
    pub fn name(self) -> &'static str {
        match self {
            LockingDesign::Kernel61 => "kernel-6.1",
            LockingDesign::Regions => "regions-6.4",
            LockingDesign::RefcountSharing => "refcount-sharing",
        }
    }
}

/// The bio a mapping finishes with.
#[derive(Debug)]
enum MappingBio {
    /// The holder is still in the cell (zeroing, copying, no zeroing).
    None,
    /// The holder overwrites the whole block; it is in flight until its
    /// write completes, then parked here until the mapping is inserted.
    Overwrite(Option<Bio>),
    /// A discard without passdown: the whole discard bio.
    Discard(Bio),
    /// One run of a passdown discard: the parent's key in
    /// [`PoolLists::discard_parents`].
    DiscardParent(u64),
}

/// A mapping being prepared (`dm_thin_new_mapping`).
#[derive(Debug)]
struct NewMapping {
    thin: ThinId,
    virt_begin: u64,
    virt_end: u64,
    data_block: u64,
    cell: Option<CellId>,
    maybe_shared: bool,
    /// Preparation steps still outstanding (quiesce, copy, zero, the
    /// scheduler's own reference).
    prepare_actions: u32,
    status: Result<(), Errno>,
    bio: MappingBio,
    /// A discard without passdown, with the fix of
    /// [`KernelFixes::discard_spares_blocks_being_unshared`]: the virtual
    /// blocks whose data cell was busy when the discard was prepared.
    spared: Vec<u64>,
    /// The holder of a cell released before the insert (the broken
    /// locking variant `release-cell-before-insert` only).
    early_holder: Option<Bio>,
    /// A passdown discard: the data block runs pass one passed down (kept
    /// for the mutation `passdown-frees-discarded-twice` only).
    passed_down: Vec<(u64, u64)>,
}

/// A passdown discard bio shared by the mappings of its runs
/// (`bio_inc_remaining`).
#[derive(Debug)]
struct DiscardParent {
    bio: Bio,
    remaining: u32,
    result: Result<(), Errno>,
}

/// A change of the pool's mode, as [`Pool::take_mode_changes`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeChange {
    /// The mode before.
    pub from: PoolMode,
    /// The mode after.
    pub to: PoolMode,
    /// Into out-of-data-space mode: what the allocator saw when it gave
    /// up (`None` when the change came from anywhere else, which the
    /// kernel never does).
    pub out_of_data_space: Option<OutOfDataSpace>,
    /// Into read-only or fail mode: the failed metadata operation that
    /// aborted the transaction (`metadata_operation_failed`), if one did.
    pub metadata_failure: Option<MetadataFailure>,
}

/// A metadata operation that failed and aborted the transaction
/// (`metadata_operation_failed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataFailure {
    /// The operation, by the kernel's name (`dm_pool_commit_metadata`, …).
    pub op: String,
    /// Its error.
    pub error: String,
    /// It failed because the metadata space map had no block free in both
    /// the open transaction and the last commit.
    pub metadata_exhausted: bool,
    /// It failed because the metadata was read-only (the block manager
    /// refused the write: the pool had gone out of metadata space or
    /// read-only already).
    pub refused_read_only: bool,
}

/// What `alloc_data_block` saw when it put the pool out of data space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfDataSpace {
    /// Data blocks free in both the open transaction and the last commit
    /// (see [`ThinMetadata::data_blocks_free_in_both`]), or why they could
    /// not be counted.
    pub free_in_both: Result<u64, String>,
    /// The allocation failed for lack of *metadata* space (a bitmap that
    /// needed a new metadata block): the kernel reports that as data
    /// space running out too (`alloc_data_block` sees -ENOSPC).
    pub metadata_exhausted: bool,
}

/// Most mode changes kept for [`Pool::take_mode_changes`]; later ones are
/// dropped until the list is taken (a bound on memory for callers that
/// never take it).
const MAX_MODE_CHANGES: usize = 4096;

/// A provisioning or break-sharing mapping whose zeroing, copy or
/// whole-block write failed and which the worker has not yet processed
/// (it will error its cell), as [`Pool::failed_mappings`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailedMapping {
    /// The thin device.
    pub thin: ThinId,
    /// Its virtual blocks, `begin..end`.
    pub virt_begin: u64,
    /// End of its virtual blocks (excluded).
    pub virt_end: u64,
    /// The data block it was given (left allocated: the kernel frees
    /// nothing when a mapping fails).
    pub data_block: u64,
}

/// State under `pool->lock`.
#[derive(Debug, Default)]
struct PoolLists {
    /// Flush/FUA bios waiting for a commit, with the data sector they were
    /// remapped to.
    deferred_flush_bios: Vec<(Bio, u64)>,
    deferred_flush_completions: Vec<Bio>,
    prepared_mappings: Vec<MappingId>,
    prepared_discards: Vec<MappingId>,
    prepared_discards_pt2: Vec<MappingId>,
    mappings: BTreeMap<MappingId, NewMapping>,
    next_mapping: u64,
    discard_parents: BTreeMap<u64, DiscardParent>,
    next_discard_parent: u64,
    low_water_triggered: bool,
    suspended: bool,
    worker_wanted: bool,
    /// [`Pool::request_commit`] asked for a commit at the worker's next pass.
    commit_requested: bool,
    /// dm events raised (low water mark, mode changes).
    events: u64,
    /// Mode changes not yet taken ([`Pool::take_mode_changes`]).
    mode_changes: Vec<ModeChange>,
    /// What the allocator saw, for the change into out-of-data-space mode
    /// it is about to make.
    out_of_data_space_note: Option<OutOfDataSpace>,
    /// The failed metadata operation, for the change into read-only or
    /// fail mode it is about to make.
    metadata_failure_note: Option<MetadataFailure>,
}

/// State under a thin device's `tc->lock`.
#[derive(Debug, Default)]
struct ThinLists {
    deferred_cells: Vec<CellId>,
    deferred_bios: Vec<Bio>,
    retry_on_resume: Vec<Bio>,
    /// `thin_dtr` freed the device (`kfree(tc)`): any later touch of its
    /// lists is a use after free, reported as a broken invariant.
    destroyed: bool,
}

/// An active thin device (`thin_c`).
#[derive(Debug)]
pub(crate) struct ActiveThin {
    id: ThinId,
    nr_sectors: u64,
    lists: Mutex<ThinLists>,
    /// `tc->refcount`: one for the table, one per worker walk holding the
    /// device (`thin_get`/`thin_put`); `thin_dtr` waits for it to reach
    /// zero (`can_destroy`) before freeing the device.
    refs: AtomicUsize,
}

/// A thin device `thin_dtr` has taken off the pool's active list and whose
/// table reference it has dropped, but which it has not freed yet: see
/// [`Pool::remove_thin`] and [`Pool::try_destroy_thin`].
#[derive(Debug)]
pub struct RemovedThin(Arc<ActiveThin>);

impl RemovedThin {
    /// The device's id.
    pub fn id(&self) -> ThinId {
        self.0.id
    }
}

/// The pool mode and the features that change with it.
#[derive(Debug)]
struct ModeState {
    mode: PoolMode,
    /// In effect now (the no-space timeout can switch it on).
    error_if_no_space: bool,
    out_of_data_space: bool,
    no_space_deadline: Option<Nanos>,
}

#[derive(Debug, Default)]
struct Clock {
    now: Nanos,
    /// Time of the last commit made at the end of a worker pass.
    last_commit: Nanos,
    /// With [`PoolOptions::waker_wheel_phase`]: when the waker runs next.
    next_waker: Nanos,
    /// Timed commits off ([`PoolOptions::timed_commits`],
    /// [`Pool::set_timed_commits`]).
    untimed: bool,
}

/// A thin pool with its active thin devices, over a metadata device `M` and
/// a data device `D`.
pub struct Pool<M, D> {
    table: PoolTable,
    block_sectors: u64,
    passdown: bool,
    options: PoolOptions,
    /// `pmd->root_lock` and what it guards.
    metadata: Mutex<ThinMetadata<M>>,
    data: Mutex<D>,
    /// The prison's locks: one (6.1) or one per region (6.4).
    locking: LockingDesign,
    prisons: Vec<Mutex<BioPrison<Bio>>>,
    shared_read_ds: Mutex<DeferredSet<MappingId>>,
    all_io_ds: Mutex<DeferredSet<MappingId>>,
    lists: Mutex<PoolLists>,
    /// Active thin devices in activation order.
    thins: Mutex<Vec<Arc<ActiveThin>>>,
    mode: Mutex<ModeState>,
    io: Mutex<IoState>,
    clock: Mutex<Clock>,
    /// The first broken precondition of the pool's own bookkeeping (see
    /// [`Pool::invariant_broken`]).
    bug: Mutex<Option<String>>,
    /// Rare states reached (coverage probes; see [`Pool::probes`]). A
    /// plain std lock, held by nobody across another: counting is not part
    /// of the concurrent core that loom and shuttle explore.
    probes: std::sync::Mutex<PoolProbes>,
}

impl<M, D> fmt::Debug for Pool<M, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("table", &self.table).finish_non_exhaustive()
    }
}

/// The errno the kernel returns for a metadata failure.
pub fn errno_of(e: &ThinError) -> Errno {
    match e {
        ThinError::Exists(_) => Errno::EEXIST,
        ThinError::NoSuchDevice(_) => Errno::ENODATA,
        ThinError::Busy(_) | ThinError::SnapshotExists => Errno::EBUSY,
        ThinError::Unformatted | ThinError::ReadOnly => Errno::EPERM,
        ThinError::Pdata(PdataError::NoSpace(_)) => Errno::ENOSPC,
        ThinError::Pdata(PdataError::NoData) => Errno::ENODATA,
        ThinError::Pdata(PdataError::Io { .. }) | ThinError::DataFlush(_) => Errno::EIO,
        _ => Errno::EINVAL,
    }
}

fn io_errno(_: &IoError) -> Errno {
    Errno::EIO
}

impl<M: BlockDevice, D: BlockDevice> Pool<M, D> {
    /// Loads the table `table` of `len_sectors` over the two devices and
    /// resumes the pool: the constructor (open the metadata, formatting a
    /// zeroed device), then preresume (take the mode from the table, grow the
    /// data and metadata space maps to the devices' sizes, commit if they
    /// grew) and resume. The prison is locked as `options.locking`
    /// prescribes.
    pub fn create(
        table: PoolTable,
        len_sectors: u64,
        metadata: M,
        data: D,
        options: PoolOptions,
    ) -> Result<Self, TargetError> {
        let block_sectors = u64::from(table.data_block_size);
        let mut md = ThinMetadata::open(metadata, table.data_block_size, !table.features.read_only)
            .map_err(|e| TargetError::new(errno_of(&e), format!("Error creating metadata object: {e}")))?;
        md.set_mutations(options.mutations);
        md.set_refcount_errors_fail(options.fixes.refcount_errors_fail_the_operation);
        // The model's data devices always accept discards.
        let passdown = DiscardWord::in_effect(&table.features, true) == DiscardWord::DiscardPassdown;
        let error_if_no_space = table.features.error_if_no_space;
        let locking = options.locking;
        let untimed = !options.timed_commits;
        let pool = Pool {
            block_sectors,
            passdown,
            options,
            metadata: Mutex::new(md),
            data: Mutex::new(data),
            locking,
            prisons: (0..locking.prison_regions())
                .map(|r| Mutex::new(BioPrison::for_region(r, locking.prison_regions())))
                .collect(),
            shared_read_ds: Mutex::new(DeferredSet::new()),
            all_io_ds: Mutex::new(DeferredSet::new()),
            lists: Mutex::new(PoolLists { suspended: true, ..PoolLists::default() }),
            thins: Mutex::new(Vec::new()),
            mode: Mutex::new(ModeState {
                mode: PoolMode::Write,
                error_if_no_space,
                out_of_data_space: false,
                no_space_deadline: None,
            }),
            io: Mutex::new(IoState::default()),
            clock: Mutex::new(Clock { untimed, ..Clock::default() }),
            bug: Mutex::new(None),
            probes: std::sync::Mutex::new(PoolProbes::default()),
            table,
        };
        pool.preresume(len_sectors)?;
        pool.resume();
        Ok(pool)
    }

    /// How the pool's prison is locked.
    pub fn locking(&self) -> LockingDesign {
        self.locking
    }

    /// The table the pool was loaded with.
    pub fn table(&self) -> &PoolTable {
        &self.table
    }

    /// Data block size in sectors.
    pub fn block_sectors(&self) -> u64 {
        self.block_sectors
    }

    /// The pool's mode.
    pub fn mode(&self) -> PoolMode {
        lock(&self.mode).mode
    }

    /// dm events raised so far (the low water mark, mode changes).
    pub fn events(&self) -> u64 {
        lock(&self.lists).events
    }

    /// The first broken invariant of the model, if any. These are the
    /// preconditions the kernel `BUG_ON`s on or would corrupt memory over
    /// (a bio prison cell released twice, a deferred-set reference dropped
    /// twice, a completion of a request or a mapping the pool does not
    /// know), checked in every build and recorded instead of panicking;
    /// and the metadata's inconsistencies ([`ThinMetadata::broken`]: a
    /// walk past its bound, a reference count below zero), which the pool
    /// handles as the kernel does (abort, read-only mode) but which sound
    /// metadata never gives. Either is a bug of the model, or damage of
    /// metadata read from outside.
    pub fn invariant_broken(&self) -> Option<String> {
        if let Some(b) = lock(&self.bug).clone() {
            return Some(b);
        }
        // Where it was found goes last: the message up to its first colon
        // is what a minimizer keeps (see `violation_signature` in sim).
        for (region, prison) in self.prisons.iter().enumerate() {
            if let Some(b) = lock(prison).broken() {
                let regions = self.prisons.len();
                let at = if regions > 1 { format!(", region {region} of {regions}") } else { String::new() };
                return Some(format!("{b} (bio prison{at})"));
            }
        }
        if let Some(b) = lock(&self.shared_read_ds).broken() {
            return Some(format!("{b} (shared_read_ds)"));
        }
        if let Some(b) = lock(&self.all_io_ds).broken() {
            return Some(format!("{b} (all_io_ds)"));
        }
        lock(&self.metadata).broken().map(|b| format!("{b} (pool metadata)"))
    }

    /// The rare states this pool reached so far (coverage probes): its
    /// metadata's btree operations, break-sharing copies, passdown second
    /// passes, no-space timeouts, aborts. A pool loaded anew (after a
    /// crash) starts from zero.
    pub fn probes(&self) -> PoolProbes {
        let mut p = *self.probes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        p.tree = lock(&self.metadata).transaction_manager().probes();
        p
    }

    /// Counts a probe.
    pub(crate) fn probe(&self, f: impl FnOnce(&mut PoolProbes)) {
        f(&mut self.probes.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    /// The mode changes since the last call, oldest first, each with what
    /// the allocator saw when it put the pool out of data space. A caller
    /// that judges results by the mode a request lived through (ENOSPC
    /// only while out of data space, EIO while read-only) needs every
    /// change, including those undone within one call.
    pub fn take_mode_changes(&self) -> Vec<ModeChange> {
        std::mem::take(&mut lock(&self.lists).mode_changes)
    }

    /// The mappings whose preparation (zeroing, copy, whole-block write)
    /// failed and that the worker has not yet processed: the bios in their
    /// cells, and any that join them, will fail.
    pub fn failed_mappings(&self) -> Vec<FailedMapping> {
        lock(&self.lists)
            .mappings
            .values()
            .filter(|m| m.status.is_err() && matches!(m.bio, MappingBio::None | MappingBio::Overwrite(_)))
            .map(|m| FailedMapping {
                thin: m.thin,
                virt_begin: m.virt_begin,
                virt_end: m.virt_end,
                data_block: m.data_block,
            })
            .collect()
    }

    /// The request a data I/O in flight is a piece of (a bio remapped to
    /// the data device); `None` for kcopyd's zeroing and copies and for
    /// passdown discards, which serve a mapping.
    pub fn io_request(&self, id: IoId) -> Option<BioId> {
        match lock(&self.io).in_flight.get(&id)? {
            io::DataIo::Bio { bio, .. } => Some(bio.parent),
            _ => None,
        }
    }

    /// The provisioning or break-sharing mapping data I/O `id` in flight
    /// prepares — kcopyd's zeroing or copy, or a whole-block overwrite bio
    /// — as [`Pool::failed_mappings`] will report it if `id` fails; `None`
    /// for other data I/O. Read before failing `id`, it names the mapping
    /// the fault fails even if the worker processes it before the caller
    /// can look at [`Pool::failed_mappings`].
    pub fn io_mapping(&self, id: IoId) -> Option<FailedMapping> {
        let mapping = match lock(&self.io).in_flight.get(&id)? {
            io::DataIo::Bio { bio, .. } => bio.hook.overwrite_mapping?,
            io::DataIo::Zero { mapping, .. } | io::DataIo::Copy { mapping, .. } => *mapping,
            io::DataIo::Discard { .. } => return None,
        };
        let lists = lock(&self.lists);
        let m = lists.mappings.get(&mapping)?;
        Some(FailedMapping {
            thin: m.thin,
            virt_begin: m.virt_begin,
            virt_end: m.virt_end,
            data_block: m.data_block,
        })
    }

    /// Records a broken precondition (the first is kept).
    pub(crate) fn bug(&self, what: String) {
        let mut bug = lock(&self.bug);
        if bug.is_none() {
            *bug = Some(what);
        }
    }

    /// Runs `f` on the metadata under `root_lock` (for tests and tools: the
    /// checker, dumps, counts).
    pub fn with_metadata<T>(&self, f: impl FnOnce(&mut ThinMetadata<M>) -> T) -> T {
        f(&mut lock(&self.metadata))
    }

    /// Runs `f` on the data device (for tests and tools).
    pub fn with_data_device<T>(&self, f: impl FnOnce(&mut D) -> T) -> T {
        f(&mut lock(&self.data))
    }

    // ---- lifecycle ----

    fn preresume(&self, len_sectors: u64) -> Result<(), TargetError> {
        let table_mode = if self.table.features.read_only { PoolMode::ReadOnly } else { PoolMode::Write };
        self.set_pool_mode(table_mode);
        let r = self.resize_devices(len_sectors);
        if r.is_err() && self.mode() == PoolMode::Fail {
            return Ok(());
        }
        r
    }

    fn resize_devices(&self, len_sectors: u64) -> Result<(), TargetError> {
        let data_size = len_sectors / self.block_sectors;
        let mut need_commit = false;
        let (sb_data_size, needs_check) = {
            let mut md = lock(&self.metadata);
            let size = md.data_dev_size().map_err(|e| {
                TargetError::new(errno_of(&e), "failed to retrieve data device size".to_string())
            })?;
            (size, md.needs_check())
        };
        if data_size < sb_data_size {
            return Err(TargetError::new(
                Errno::EINVAL,
                format!("pool target ({data_size} blocks) too small: expected {sb_data_size}"),
            ));
        }
        if data_size > sb_data_size && !needs_check {
            let r = lock(&self.metadata).resize_data_dev(data_size);
            if let Err(e) = r {
                self.metadata_operation_failed("dm_pool_resize_data_dev", &e);
                return Err(TargetError::new(errno_of(&e), e.to_string()));
            }
            need_commit = true;
        }
        let (device_blocks, sm_blocks) = {
            let mut md = lock(&self.metadata);
            let device_blocks = md.transaction_manager().block_manager().nr_blocks().min(MAX_METADATA_BLOCKS);
            let sm_blocks =
                md.metadata_dev_size().map_err(|e| TargetError::new(errno_of(&e), e.to_string()))?;
            (device_blocks, sm_blocks)
        };
        if device_blocks < sm_blocks {
            return Err(TargetError::new(
                Errno::EINVAL,
                format!("metadata device ({device_blocks} blocks) too small: expected {sm_blocks}"),
            ));
        }
        // A grown device with needs_check set is left as it is ("unable to
        // grow the metadata device until repaired"), without an error.
        if device_blocks > sm_blocks && !needs_check {
            // The kernel's order: back to write mode first (the block
            // manager writable again), then the space map grows.
            let swapped = self.options.mutations.metadata_grows_before_write_mode;
            if self.mode() == PoolMode::OutOfMetadataSpace && !swapped {
                self.set_pool_mode(PoolMode::Write);
            }
            let r = lock(&self.metadata).resize_metadata_dev(device_blocks);
            if swapped && r.is_ok() && self.mode() == PoolMode::OutOfMetadataSpace {
                // Broken on purpose: write mode only after the growth.
                self.set_pool_mode(PoolMode::Write);
            }
            if let Err(e) = r {
                self.metadata_operation_failed("dm_pool_resize_metadata_dev", &e);
                return Err(TargetError::new(errno_of(&e), e.to_string()));
            }
            need_commit = true;
        }
        if need_commit {
            let _ = self.commit();
        }
        Ok(())
    }

    fn resume(&self) {
        if self.options.waker_wheel_phase.is_some() {
            // pool_resume calls do_waker, which queues the next run.
            let mut clock = lock(&self.clock);
            clock.next_waker = self.waker_due(clock.now);
        }
        self.requeue_bios();
        let mut lists = lock(&self.lists);
        lists.low_water_triggered = false;
        lists.suspended = false;
        lists.worker_wanted = true;
    }

    /// Suspends the pool (presuspend + postsuspend): runs the worker once
    /// more, requires that no data I/O is in flight (DM core waits for it;
    /// here the caller completes it first), then commits. Bios queued for
    /// a resume stay queued.
    pub fn suspend(&self) -> Result<(), TargetError> {
        lock(&self.lists).suspended = true;
        lock(&self.mode).no_space_deadline = None;
        self.run_worker();
        if !lock(&self.io).in_flight.is_empty() {
            lock(&self.lists).suspended = false;
            return Err(TargetError::new(
                Errno::EBUSY,
                "data I/O still in flight: complete it before suspending",
            ));
        }
        let _ = self.commit();
        Ok(())
    }

    /// Loads the pool's table again, its length `len_sectors`, and resumes
    /// the pool (`pool_ctr` on the pool already bound to the metadata
    /// device, then `pool_preresume` and `pool_resume`): the userland
    /// response to the low water marks, to out-of-data-space and to
    /// out-of-metadata-space. As in the kernel the new table's mode is
    /// requested first (`bind_control_target`: write mode, or read-only
    /// with the `read_only` feature; never write mode while needs_check is
    /// set, never out of fail mode), then the data device grows if it is
    /// larger, then the metadata space map grows to the metadata device's
    /// size if that grew (`maybe_resize_metadata_dev`, leaving
    /// out-of-metadata-space mode), and a commit follows a growth. The
    /// pool must be suspended; on an error it stays suspended (DM core
    /// fails the resume), except in fail mode.
    pub fn reload_and_resume(&self, len_sectors: u64) -> Result<(), TargetError> {
        if !lock(&self.lists).suspended {
            return Err(TargetError::new(Errno::EINVAL, "the pool must be suspended to reload it"));
        }
        self.preresume(len_sectors)?;
        self.resume();
        Ok(())
    }

    /// Resumes the suspended pool with the table it has (a resume without
    /// a reload), `len_sectors` being that table's length. The mode the
    /// pool is in is requested again (`set_pool_mode` keeps the table's
    /// mode in step with the pool's, so `bind_control_target` changes
    /// nothing): an out-of-metadata-space pool stays so unless the
    /// metadata device grew, when `maybe_resize_metadata_dev` takes it back
    /// to write mode and then grows the space map. Otherwise as
    /// [`Self::reload_and_resume`].
    pub fn resume_same_table(&self, len_sectors: u64) -> Result<(), TargetError> {
        if !lock(&self.lists).suspended {
            return Err(TargetError::new(Errno::EINVAL, "the pool must be suspended to resume it"));
        }
        let current = self.mode();
        self.set_pool_mode(current);
        let r = self.resize_devices(len_sectors);
        if r.is_err() && self.mode() != PoolMode::Fail {
            return r;
        }
        self.resume();
        Ok(())
    }

    /// Activates thin device `id` with a table of `len_sectors` (`thin_ctr`).
    pub fn activate_thin(&self, id: ThinId, len_sectors: u64) -> Result<(), TargetError> {
        if lock(&self.lists).suspended {
            return Err(TableError::pool_suspended().into());
        }
        if self.mode() == PoolMode::Fail {
            return Err(TableError::pool_in_fail_mode().into());
        }
        if self.thin(id).is_some() {
            return Err(TargetError::new(Errno::EBUSY, format!("thin device {id} is already active")));
        }
        lock(&self.metadata)
            .open_thin(id)
            .map_err(|e| TargetError { errno: errno_of(&e), ..TableError::no_such_thin_device().into() })?;
        let thin = ActiveThin {
            id,
            nr_sectors: len_sectors,
            lists: Mutex::new(ThinLists::default()),
            refs: AtomicUsize::new(1),
        };
        lock(&self.thins).push(Arc::new(thin));
        Ok(())
    }

    /// Deactivates thin device `id` (`thin_dtr`): [`Pool::remove_thin`],
    /// then [`Pool::try_destroy_thin`] until the worker has let go of the
    /// device (yielding to the other threads meanwhile; single-threaded,
    /// nothing holds it). Refused while the device has requests
    /// outstanding.
    pub fn deactivate_thin(&self, id: ThinId) -> Result<(), TargetError> {
        let removed = self.remove_thin(id)?;
        loop {
            match self.try_destroy_thin(&removed) {
                Some(r) => return r,
                None => crate::sync::thread::yield_now(),
            }
        }
    }

    /// The first half of `thin_dtr`: takes thin device `id` off the active
    /// list (`list_del_rcu` under `pool->lock`; the worker's walks that
    /// begin later no longer see it) and drops the table's reference
    /// (`thin_put`). DM core calls the destructor only once the device is
    /// suspended, its I/O drained; here a device with requests outstanding
    /// is refused with EBUSY and stays active.
    pub fn remove_thin(&self, id: ThinId) -> Result<RemovedThin, TargetError> {
        let Some(thin) = self.thin(id) else {
            return Err(TargetError::new(Errno::ENODATA, format!("thin device {id} is not active")));
        };
        if lock(&self.io).user.values().any(|u| u.thin == id) {
            return Err(TargetError::new(Errno::EBUSY, format!("thin device {id} has requests in flight")));
        }
        lock(&self.thins).retain(|t| t.id != id);
        self.thin_put(&thin);
        Ok(RemovedThin(thin))
    }

    /// The second half of `thin_dtr`: `None` while a worker walk still
    /// holds the device (`wait_for_completion(&tc->can_destroy)` would
    /// block), else frees it (its lists are gone) and closes it in the
    /// metadata (`dm_pool_close_thin_device`). Call it again after `None`;
    /// once it returned `Some`, the device is gone.
    pub fn try_destroy_thin(&self, removed: &RemovedThin) -> Option<Result<(), TargetError>> {
        let thin = &removed.0;
        if thin.refs.load(Ordering::SeqCst) > 0 && !self.options.mutations.locking.thin_dtr_skips_destroy_wait
        {
            return None;
        }
        {
            let mut lists = lock(&thin.lists);
            if lists.destroyed {
                return Some(Err(TargetError::new(
                    Errno::EINVAL,
                    format!("thin device {} freed twice", thin.id),
                )));
            }
            lists.destroyed = true;
        }
        let r = lock(&self.metadata).close_thin(thin.id);
        Some(r.map_err(|e| TargetError::new(errno_of(&e), e.to_string())))
    }

    /// `thin_get`: a walk of the active list takes a reference to `thin`.
    fn thin_get(&self, thin: &ActiveThin) {
        if !self.options.mutations.locking.worker_skips_thin_get {
            thin.refs.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// `thin_put` at the end of a walk: drops the reference
    /// [`Pool::thin_get`] took.
    fn thin_put_walked(&self, thin: &ActiveThin) {
        if !self.options.mutations.locking.worker_skips_thin_get {
            self.thin_put(thin);
        }
    }

    /// `thin_put`: drops a reference (a walk's or the table's).
    fn thin_put(&self, thin: &ActiveThin) {
        if thin.refs.load(Ordering::SeqCst) == 0 {
            self.bug(format!("thin device {} put with no reference left", thin.id));
            return;
        }
        thin.refs.fetch_sub(1, Ordering::SeqCst);
    }

    /// The ids of the active thin devices, in activation order.
    pub fn active_thins(&self) -> Vec<ThinId> {
        lock(&self.thins).iter().map(|t| t.id).collect()
    }

    /// Size of active thin device `id` in sectors.
    pub fn thin_sectors(&self, id: ThinId) -> Option<u64> {
        self.thin(id).map(|t| t.nr_sectors)
    }

    /// Tears the pool down (postsuspend's commit, then closing the
    /// metadata, which commits again unless read-only) and returns the
    /// devices. Active thins are deactivated first; in-flight I/O is
    /// refused.
    // The refusal hands the pool back, hence the large error.
    #[allow(clippy::result_large_err)]
    pub fn close(self) -> Result<(M, D), (Self, TargetError)> {
        if self.bios_in_flight() > 0 || !lock(&self.io).in_flight.is_empty() {
            return Err((self, TargetError::new(Errno::EBUSY, "requests still in flight")));
        }
        for id in self.active_thins() {
            if let Err(e) = self.deactivate_thin(id) {
                return Err((self, e));
            }
        }
        if let Err(e) = self.suspend() {
            return Err((self, e));
        }
        let read_only = self.mode() >= PoolMode::OutOfMetadataSpace;
        let Pool { metadata, data, .. } = self;
        let mut md = into_inner(metadata);
        md.set_read_only(read_only);
        let data = into_inner(data);
        match md.close() {
            Ok(m) => Ok((m, data)),
            Err((_, e)) => panic!("metadata refused to close with no thin device open: {e}"),
        }
    }

    /// Drops everything that was not durable, as a power cut would, and
    /// returns the two devices.
    pub fn crash(self) -> (M, D) {
        let Pool { metadata, data, .. } = self;
        let md = into_inner(metadata);
        (md.crash(), into_inner(data))
    }

    // ---- time ----

    /// Advances simulated time to `now` (never backwards). Fires the
    /// no-space timeout when it is due (`do_no_space_timeout`).
    pub fn set_time(&self, now: Nanos) {
        {
            let mut clock = lock(&self.clock);
            clock.now = clock.now.max(now);
        }
        let due = {
            let mut mode = lock(&self.mode);
            match mode.no_space_deadline {
                Some(deadline) if deadline <= now => {
                    mode.no_space_deadline = None;
                    mode.mode == PoolMode::OutOfDataSpace && !mode.error_if_no_space
                }
                _ => false,
            }
        };
        if due {
            self.probe(|p| p.no_space_timeouts += 1);
            lock(&self.mode).error_if_no_space = true;
            lock(&self.lists).events += 1;
            self.error_retry_list_with(Errno::ENOSPC);
        }
        match self.options.waker_wheel_phase {
            None => {
                if self.commit_due() {
                    lock(&self.lists).worker_wanted = true;
                }
            }
            Some(_) => {
                // do_waker: wake the worker, queue the next run.
                let mut clock = lock(&self.clock);
                if clock.now >= clock.next_waker {
                    clock.next_waker = self.waker_due(clock.now);
                    drop(clock);
                    lock(&self.lists).worker_wanted = true;
                }
            }
        }
    }

    /// Starts the pool's clocks at `now`, as the kernel's `pool_create`
    /// and first resume do: with [`PoolOptions::waker_wheel_phase`], the
    /// last commit is now and the waker queued from now; without, only
    /// the time moves (as [`Self::set_time`]).
    pub fn start_clock(&self, now: Nanos) {
        if self.options.waker_wheel_phase.is_some() {
            let mut clock = lock(&self.clock);
            clock.now = clock.now.max(now);
            clock.last_commit = clock.now;
            clock.next_waker = self.waker_due(clock.now);
        }
        self.set_time(now);
    }

    /// When a waker queued at `now` runs ([`PoolOptions::waker_wheel_phase`]).
    fn waker_due(&self, now: Nanos) -> Nanos {
        let hz = crate::timer_wheel::HZ;
        let period = COMMIT_PERIOD * u64::from(hz) / 1_000_000_000;
        let phase = self.options.waker_wheel_phase.unwrap_or(0);
        crate::timer_wheel::delayed_work_due(now, period, hz, phase)
    }

    /// Simulated time now.
    pub fn now(&self) -> Nanos {
        lock(&self.clock).now
    }

    /// When the no-space timeout fires, if it is armed.
    pub fn no_space_deadline(&self) -> Option<Nanos> {
        lock(&self.mode).no_space_deadline
    }

    fn commit_due(&self) -> bool {
        let clock = lock(&self.clock);
        !clock.untimed && clock.now > clock.last_commit + COMMIT_PERIOD
    }

    /// Turns timed commits on or off from now on ([`PoolOptions::timed_commits`]).
    pub fn set_timed_commits(&self, on: bool) {
        lock(&self.clock).untimed = !on;
    }

    /// Wakes the worker and makes its next pass commit if the transaction
    /// changed, as a timed commit would: how a kernel replay places a
    /// timed commit where the kernel made it
    /// ([`PoolOptions::timed_commits`] off).
    pub fn request_commit(&self) {
        let mut lists = lock(&self.lists);
        lists.commit_requested = true;
        lists.worker_wanted = true;
    }

    // ---- messages and status ----

    /// Sends a pool message (`dmsetup message <pool> 0 <text>`); each
    /// successful message is followed by a commit.
    pub fn message(&self, text: &str) -> Result<(), TargetError> {
        let msg = PoolMessage::parse_in_mode(text, self.mode())?;
        if msg == PoolMessage::ReserveMetadataSnap {
            let _ = self.commit();
        }
        let r = {
            let mut md = lock(&self.metadata);
            match msg {
                PoolMessage::CreateThin(id) => md.create_thin(id),
                PoolMessage::CreateSnap { id, origin } => md.create_snap(id, origin),
                PoolMessage::Delete(id) => md.delete_thin(id),
                PoolMessage::SetTransactionId { current, new } => md.set_transaction_id(current, new),
                PoolMessage::ReserveMetadataSnap => md.reserve_metadata_snap(),
                PoolMessage::ReleaseMetadataSnap => md.release_metadata_snap(),
            }
        };
        match r {
            Ok(()) => {
                let _ = self.commit();
                Ok(())
            }
            Err(e) => {
                // Kernel 6.1 only warns: a metadata operation that failed
                // half-way stays in the transaction, and the next commit
                // persists it (see KernelFixes::failed_message_aborts).
                let storage_error = matches!(&e, ThinError::Pdata(p) if !matches!(p, PdataError::NoSpace(_)));
                if storage_error && self.options.fixes.failed_message_aborts {
                    self.metadata_operation_failed("pool message", &e);
                }
                Err(TargetError::new(errno_of(&e), format!("{msg}: {e}")))
            }
        }
    }

    /// The pool's INFO status line. Unless `noflush` (or the pool is
    /// suspended), producing it commits first, as the kernel does.
    pub fn status(&self, noflush: bool) -> String {
        if self.mode() == PoolMode::Fail {
            return "Fail".to_string();
        }
        if !noflush && !lock(&self.lists).suspended {
            let _ = self.commit();
        }
        let (mode, error_if_no_space) = {
            let m = lock(&self.mode);
            (m.mode, m.error_if_no_space)
        };
        let info = (|| -> Result<PoolInfo, ThinError> {
            let mut md = lock(&self.metadata);
            let total_metadata_blocks = md.metadata_dev_size()?;
            let free_metadata = md.free_metadata_blocks()?;
            let total_data_blocks = md.data_dev_size()?;
            let free_data = md.free_data_blocks()?;
            let held = md.metadata_snap()?;
            Ok(PoolInfo {
                transaction_id: md.transaction_id()?,
                used_metadata_blocks: total_metadata_blocks - free_metadata.min(total_metadata_blocks),
                total_metadata_blocks,
                used_data_blocks: total_data_blocks - free_data.min(total_data_blocks),
                total_data_blocks,
                held_root: (held != 0).then_some(held),
                mode,
                discard: DiscardWord::in_effect(&self.table.features, true),
                error_if_no_space,
                needs_check: md.needs_check(),
                metadata_low_watermark: status::metadata_low_watermark(total_metadata_blocks),
            })
        })();
        match info {
            Ok(info) => status::pool_info_line(&info),
            Err(_) => "Error".to_string(),
        }
    }

    /// Thin device `id`'s INFO status line (mapped sectors, highest mapped
    /// sector). Does not commit.
    pub fn thin_status(&self, id: ThinId) -> Result<String, TargetError> {
        if self.thin(id).is_none() {
            return Err(TargetError::new(Errno::ENODATA, format!("thin device {id} is not active")));
        }
        let failed = self.mode() == PoolMode::Fail;
        let r = (|| -> Result<(u64, Option<u64>), ThinError> {
            let mut md = lock(&self.metadata);
            let mapped = md.mapped_count(id)?;
            let highest = md.highest_mapped_block(id)?;
            Ok((mapped, highest))
        })();
        match r {
            Ok((mapped, highest)) => {
                Ok(status::thin_info_line(mapped, highest, self.table.data_block_size, failed))
            }
            Err(_) if failed => Ok(status::thin_info_line(0, None, self.table.data_block_size, true)),
            Err(_) => Ok("Error".to_string()),
        }
    }

    // ---- modes and commits ----

    /// `commit()`: refused in read-only modes; a failure aborts the
    /// transaction and degrades the pool.
    fn commit(&self) -> Result<(), Errno> {
        if self.mode() >= PoolMode::OutOfMetadataSpace {
            return Err(Errno::EINVAL);
        }
        let r = {
            let mut md = lock(&self.metadata);
            let data = &self.data;
            let flush_data = !self.options.mutations.data_not_flushed_before_commit;
            md.commit_with(
                || if flush_data { lock(data).flush().map_err(ThinError::DataFlush) } else { Ok(()) },
            )
        };
        if let Err(e) = r {
            self.probe(|p| p.failed_commits += 1);
            self.metadata_operation_failed("dm_pool_commit_metadata", &e);
            return Err(errno_of(&e));
        }
        self.check_for_metadata_space();
        self.check_for_data_space();
        Ok(())
    }

    fn check_for_metadata_space(&self) {
        let free = lock(&self.metadata).free_metadata_blocks();
        let short = !matches!(free, Ok(n) if n > 0);
        let mode = self.mode();
        if short && !matches!(mode, PoolMode::OutOfMetadataSpace | PoolMode::ReadOnly) {
            self.set_pool_mode(PoolMode::OutOfMetadataSpace);
        }
    }

    fn check_for_data_space(&self) {
        if self.mode() != PoolMode::OutOfDataSpace {
            return;
        }
        let free = lock(&self.metadata).free_data_blocks();
        if let Ok(free) = free {
            if free > 0 {
                self.set_pool_mode(PoolMode::Write);
                self.requeue_bios();
            }
        }
    }

    fn metadata_operation_failed(&self, op: &str, e: &ThinError) {
        self.probe(|p| p.aborts += 1);
        lock(&self.lists).metadata_failure_note = Some(MetadataFailure {
            op: op.to_string(),
            error: e.to_string(),
            metadata_exhausted: matches!(e, ThinError::Pdata(PdataError::NoSpace(what)) if *what == "metadata"),
            refused_read_only: matches!(e, ThinError::ReadOnly),
        });
        // abort_transaction
        if lock(&self.metadata).abort().is_err() {
            self.set_pool_mode(PoolMode::Fail);
        }
        if lock(&self.metadata).set_needs_check().is_err() {
            self.set_pool_mode(PoolMode::Fail);
        }
        self.set_pool_mode(PoolMode::ReadOnly);
    }

    /// `set_pool_mode`, with its rules: never WRITE while needs_check is
    /// set, never out of FAIL.
    fn set_pool_mode(&self, requested: PoolMode) {
        let needs_check = lock(&self.metadata).needs_check();
        let (old, new) = {
            let mut state = lock(&self.mode);
            let old = state.mode;
            let mut new = requested;
            if new == PoolMode::Write && needs_check {
                new = if old != PoolMode::Write { old } else { PoolMode::ReadOnly };
            }
            if old == PoolMode::Fail {
                new = old;
            }
            match new {
                PoolMode::OutOfDataSpace => {
                    state.out_of_data_space = true;
                    // `queue_delayed_work` does nothing while the timeout
                    // is pending; a suspend cancels it (`pool_postsuspend`),
                    // so a resume in this mode arms it again.
                    if !state.error_if_no_space
                        && self.options.no_space_timeout > 0
                        && state.no_space_deadline.is_none()
                    {
                        state.no_space_deadline = Some(lock(&self.clock).now + self.options.no_space_timeout);
                    }
                }
                PoolMode::Write => {
                    state.no_space_deadline = None;
                    state.out_of_data_space = false;
                    state.error_if_no_space = self.table.features.error_if_no_space;
                }
                _ => {}
            }
            state.mode = new;
            (old, new)
        };
        lock(&self.metadata).set_read_only(new >= PoolMode::OutOfMetadataSpace);
        if new >= PoolMode::OutOfMetadataSpace {
            self.error_retry_list();
        }
        if old != new {
            let mut lists = lock(&self.lists);
            lists.events += 1;
            let note =
                if new == PoolMode::OutOfDataSpace { lists.out_of_data_space_note.take() } else { None };
            let failure = if new >= PoolMode::ReadOnly { lists.metadata_failure_note.take() } else { None };
            if lists.mode_changes.len() < MAX_MODE_CHANGES {
                lists.mode_changes.push(ModeChange {
                    from: old,
                    to: new,
                    out_of_data_space: note,
                    metadata_failure: failure,
                });
            }
        }
    }

    /// Notes what the allocator saw before it puts the pool out of data
    /// space: `free`, the free count it read (none free in the open
    /// transaction: nothing to search), or `None` when the space map's
    /// allocation itself failed (its search has just read every bitmap).
    fn note_out_of_data_space(&self, free: Option<u64>, metadata_exhausted: bool) {
        let free_in_both = match free {
            Some(0) => Ok(0),
            _ => lock(&self.metadata).data_blocks_free_in_both().map_err(|e| e.to_string()),
        };
        lock(&self.lists).out_of_data_space_note = Some(OutOfDataSpace { free_in_both, metadata_exhausted });
    }

    /// The errno for bios the pool cannot service (`get_pool_io_error_code`).
    fn io_error_code(&self) -> Errno {
        let state = lock(&self.mode);
        let no_space = if self.options.mutations.io_error_code_follows_feature {
            state.error_if_no_space
        } else {
            state.out_of_data_space
        };
        if no_space {
            Errno::ENOSPC
        } else {
            Errno::EIO
        }
    }

    fn error_retry_list(&self) {
        let code = self.io_error_code();
        self.error_retry_list_with(code);
    }

    fn error_retry_list_with(&self, code: Errno) {
        for thin in self.thin_list() {
            let bios = std::mem::take(&mut lock(&thin.lists).retry_on_resume);
            for bio in bios {
                self.end_bio(bio, Err(code));
            }
        }
    }

    /// Moves every device's retry list back to its deferred list.
    fn requeue_bios(&self) {
        for thin in self.thin_list() {
            let mut lists = lock(&thin.lists);
            let retry = std::mem::take(&mut lists.retry_on_resume);
            lists.deferred_bios.extend(retry);
        }
        self.wake_worker();
    }

    // ---- small helpers shared by the paths ----

    fn thin(&self, id: ThinId) -> Option<Arc<ActiveThin>> {
        lock(&self.thins).iter().find(|t| t.id == id).cloned()
    }

    fn thin_list(&self) -> Vec<Arc<ActiveThin>> {
        lock(&self.thins).clone()
    }

    /// The active devices, each with a reference taken ([`Pool::thin_get`]
    /// under the list's lock, as `get_first_thin`/`get_next_thin` do under
    /// the RCU read lock); the caller puts each when done with it. The
    /// kernel takes them one at a time as it walks; taking them all at
    /// once only makes `thin_dtr` wait longer.
    fn thin_list_referenced(&self) -> Vec<Arc<ActiveThin>> {
        let thins = lock(&self.thins);
        for t in thins.iter() {
            self.thin_get(t);
        }
        thins.clone()
    }

    fn wake_worker(&self) {
        lock(&self.lists).worker_wanted = true;
    }

    /// Whether the worker has been woken since its last pass.
    pub fn worker_wanted(&self) -> bool {
        lock(&self.lists).worker_wanted
    }

    /// Where DM core splits discards: at prison regions in the 6.4 design
    /// (`max_discard_granularity`, 1024 blocks), nowhere in 6.1.
    fn discard_split(&self) -> Option<u64> {
        self.locking.has_regions().then_some(crate::prison::REGION_BLOCKS * self.block_sectors)
    }

    fn block_of(&self, sector: u64) -> u64 {
        sector / self.block_sectors
    }

    /// The data device sector a bio at `sector` lands on in `data_block`.
    fn remap_sector(&self, sector: u64, data_block: u64) -> u64 {
        data_block * self.block_sectors + sector % self.block_sectors
    }
}
