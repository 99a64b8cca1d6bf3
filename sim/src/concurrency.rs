//! Harnesses for the pool's concurrent core on real threads, for loom
//! (`RUSTFLAGS="--cfg loom"`, exhaustive up to a preemption bound) and
//! shuttle (the `shuttle` feature, randomized and PCT schedules).
//!
//! A [`Scenario`] sets a pool up single-threaded, then races a few
//! *submitter* threads (each runs its program of requests and messages)
//! against the pool's own contexts, each on its own thread:
//!
//! - the **worker** runs [`Pool::run_worker`] whenever it has been woken;
//! - the **completion context** completes data I/O in flight (which one is
//!   the checker's choice, see [`Run::pick`]) and drains finished requests;
//!   where the scenario allows faults ([`Scenario::io_errors`]) it may fail
//!   an I/O with EIO instead (the checker's choice too, [`Run::fail`]);
//! - where the scenario asks, the worker's thread also plays the **timer**:
//!   when the worker is idle it advances simulated time to the no-space
//!   deadline, so that bios queued out of space fail instead of waiting for
//!   ever (the kernel runs both on one ordered workqueue).
//!
//! Every thread loops until the run is over — all submitters done, no
//! request and no data I/O in flight, the worker not woken — and yields to
//! the checker ([`dmsim_model::sync::thread::yield_now`]) when it has
//! nothing to do, so a lost wake-up or a cell never released shows as a
//! run that never ends (loom's branch bound, shuttle's step bound) and a
//! lock cycle as a deadlock, both reported by the checker.
//!
//! # What each execution checks
//!
//! - The oracle ([`crate::oracle`]) sees every submission before the pool
//!   does and every completion after the pool reports it (that widens each
//!   window, which only makes the oracle more permissive, never wrong), and
//!   judges every read, those of the race and a read-back of every touched
//!   block at the end: a lost write, a write applied to the old block of a
//!   break-sharing copy (the new block then misses it), or stale data after
//!   a discard show here.
//! - Every request completes exactly once, successfully unless the
//!   scenario expects out-of-space errors, or a data I/O fault the harness
//!   injected could reach it (its own data I/O failed, or the zeroing,
//!   copy or overwrite of a mapping on its device and blocks failed while
//!   it was in flight: [`crate::oracle::faults`]).
//! - No lost or duplicated provision: the data blocks in use at the end are
//!   exactly what the scenario expects; with faults, the blocks mapped and
//!   exactly the blocks failed preparations left allocated, which the
//!   metadata checker must find leaked (as 6.1 leaves them).
//! - A discard never frees a block with I/O in flight: whenever the
//!   completion context looks, no passdown discard overlaps a read or write
//!   in flight, and every read or write it completes lands in a data block
//!   that is still allocated.
//! - A provisioned block is not mapped while its preparation (zeroing or
//!   copying) is in flight, so no commit can publish such a mapping.
//! - Nothing is left in flight when the threads end.
//!
//! A failed check panics with the scenario's name and what went wrong; loom
//! and shuttle report the panic with the schedule that led to it.

use std::collections::BTreeMap;
use std::sync::Mutex as StdMutex;

use dmsim_model::block_device::MemDevice;
use dmsim_model::errno::Errno;
use dmsim_model::mutation::Mutations;
use dmsim_model::sync::{lock, thread, wait, Arc, AtomicUsize, Condvar, Mutex, Ordering};
use dmsim_model::thin::check::{check_thin_metadata, CheckOptions};
use dmsim_model::thin::pool::{
    BioId, BioRequest, Completion, DataIoKind, FailedMapping, IoInfo, LockingDesign, Pool, PoolOptions,
};
use dmsim_model::thin::table::{PoolFeatures, PoolTable};
use dmsim_traces::stamp;

use crate::oracle::faults::{is_leak, RequestSpan};
use crate::oracle::{DevId, IoTicket, Oracle, OracleConfig};

/// Data block size of every harness pool, in sectors (the smallest the
/// kernel allows).
pub const BLOCK: u64 = 128;

/// The run id stamped into every write.
const RUN: u64 = 0xc0c0_2023;

/// What the data device holds before anything is written, so that a block
/// neither zeroed nor copied reads as foreign data.
const GARBAGE: u8 = 0xa7;

/// Metadata device size in sectors.
const META_SECTORS: u64 = 1024;

/// The pool type the harnesses run.
pub type HarnessPool = Pool<MemDevice, MemDevice>;

/// One step of a submitter's program (or of the set-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `create_thin dev`, then activate it.
    CreateThin(DevId),
    /// `create_snap dev origin`, then activate it.
    CreateSnap {
        /// The new snapshot.
        dev: DevId,
        /// Its origin.
        origin: DevId,
    },
    /// Remove `dev` ([`Step::Remove`]), then send `delete dev`.
    Delete(DevId),
    /// Activate existing, inactive thin device `dev` (`thin_ctr`: open it
    /// in the metadata, add it to the pool's active list).
    Activate(DevId),
    /// Remove active thin device `dev` as DM does: suspend it (new I/O
    /// held back, its requests drained), then `thin_dtr` (off the active
    /// list, wait until no worker walk holds it, close it). From then on
    /// no request of `dev` may complete.
    Remove(DevId),
    /// Send `delete dev` while `dev` is active: the pool must refuse it
    /// with EBUSY and keep the device whole.
    DeleteOpen(DevId),
    /// A write of `nr` sectors at `sector`, stamped with a fresh write
    /// number.
    Write {
        /// Device.
        dev: DevId,
        /// First sector.
        sector: u64,
        /// Sectors.
        nr: u64,
        /// REQ_FUA.
        fua: bool,
    },
    /// A read, judged by the oracle when it completes.
    Read {
        /// Device.
        dev: DevId,
        /// First sector.
        sector: u64,
        /// Sectors.
        nr: u64,
    },
    /// A discard.
    Discard {
        /// Device.
        dev: DevId,
        /// First sector.
        sector: u64,
        /// Sectors.
        nr: u64,
    },
    /// An empty flush (PREFLUSH).
    Flush(DevId),
    /// Wait until every request this submitter sent has completed.
    WaitMine,
}

/// A write of `nr` sectors at `sector` of `dev`.
pub fn write(dev: DevId, sector: u64, nr: u64) -> Step {
    Step::Write { dev, sector, nr, fua: false }
}

/// A read of `nr` sectors at `sector` of `dev`.
pub fn read(dev: DevId, sector: u64, nr: u64) -> Step {
    Step::Read { dev, sector, nr }
}

/// A discard of `nr` sectors at `sector` of `dev`.
pub fn discard(dev: DevId, sector: u64, nr: u64) -> Step {
    Step::Discard { dev, sector, nr }
}

/// A race to check.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Shown in every failure.
    pub name: &'static str,
    /// The pool's table features.
    pub features: PoolFeatures,
    /// Data blocks in the pool.
    pub data_blocks: u64,
    /// Size of every thin device, in blocks.
    pub thin_blocks: u64,
    /// Run to completion, single-threaded, before the race.
    pub setup: Vec<Step>,
    /// One program per submitter thread.
    pub submitters: Vec<Vec<Step>>,
    /// Data blocks in use when everything settled (`None`: not checked).
    pub blocks_used: Option<u64>,
    /// Requests may fail with ENOSPC (the pool runs out of space).
    pub out_of_space: bool,
    /// The worker's thread also plays the timer: when the worker is idle it
    /// advances time to the no-space deadline, if armed.
    pub timer: bool,
    /// `(device, sector, sectors)` read back and judged at the end.
    pub read_back: Vec<(DevId, u64, u64)>,
    /// At the end, commit and run the metadata checker on the pool's
    /// metadata device: it must find nothing wrong (but the leaks failed
    /// data I/O leaves, see [`Scenario::io_errors`]).
    pub check_metadata: bool,
    /// Data I/O faults: at most this many data I/Os of the kinds in
    /// [`Scenario::io_error_kinds`] fail with EIO (`Pool::fail_io`) in the
    /// completion context instead of completing, each where [`Run::fail`]
    /// chooses. Requests then may fail with EIO only where a failed data
    /// I/O could reach them, and data blocks may leak only where a failed
    /// preparation left them ([`crate::oracle::faults`]).
    pub io_errors: usize,
    /// The kinds of data I/O that may fail (see [`Scenario::io_errors`]).
    pub io_error_kinds: &'static [DataIoKind],
}

impl Scenario {
    /// A scenario with the usual pool (16 data blocks, 4-block devices,
    /// default features) and nothing in it yet.
    pub fn new(name: &'static str) -> Self {
        Scenario {
            name,
            features: PoolFeatures::default(),
            data_blocks: 16,
            thin_blocks: 4,
            setup: Vec::new(),
            submitters: Vec::new(),
            blocks_used: None,
            out_of_space: false,
            timer: false,
            read_back: Vec::new(),
            check_metadata: true,
            io_errors: 0,
            io_error_kinds: &[],
        }
    }

    /// The virtual blocks any step or read-back touches: no other block
    /// can be mapped.
    pub fn touched_blocks(&self) -> std::collections::BTreeSet<u64> {
        let steps = self.setup.iter().chain(self.submitters.iter().flatten());
        let ranges = steps
            .filter_map(|step| match *step {
                Step::Write { sector, nr, .. }
                | Step::Read { sector, nr, .. }
                | Step::Discard { sector, nr, .. } => Some((sector, nr)),
                _ => None,
            })
            .chain(self.read_back.iter().map(|&(_, sector, nr)| (sector, nr)));
        ranges.flat_map(|(sector, nr)| sector / BLOCK..(sector + nr).div_ceil(BLOCK)).collect()
    }

    /// Threads one execution spawns (loom models at most four besides the
    /// main thread).
    pub fn threads(&self) -> usize {
        self.submitters.len() + 2
    }
}

/// The oracle's view of a scenario's devices: only the virtual blocks a
/// write, a read or a read-back touches, packed in order (block `b` of the
/// device is the oracle's block `i` when `b` is the `i`-th such block). A
/// device two prison regions long then costs the oracle a few blocks, not
/// 2,048 blocks of per-sector state. Blocks only discards reach are never
/// read, so the oracle need not keep them: a discard's range keeps the
/// blocks it covers that the oracle keeps. Writes are stamped with the
/// oracle's sector numbers, so the reads it judges match. The pool itself
/// sees the real sectors.
#[derive(Debug, Clone)]
struct Compact {
    blocks: BTreeMap<u64, u64>,
}

impl Compact {
    fn new(scenario: &Scenario) -> Self {
        let steps = scenario.setup.iter().chain(scenario.submitters.iter().flatten());
        let ranges = steps
            .filter_map(|step| match *step {
                Step::Write { sector, nr, .. } | Step::Read { sector, nr, .. } => Some((sector, nr)),
                _ => None,
            })
            .chain(scenario.read_back.iter().map(|&(_, sector, nr)| (sector, nr)));
        let kept: std::collections::BTreeSet<u64> =
            ranges.flat_map(|(sector, nr)| sector / BLOCK..(sector + nr).div_ceil(BLOCK)).collect();
        Compact { blocks: kept.into_iter().zip(0..).collect() }
    }

    /// The oracle's device size in sectors.
    fn sectors(&self) -> u64 {
        self.blocks.len() as u64 * BLOCK
    }

    /// The oracle's `(sector, sectors)` for the device's `[sector, sector +
    /// nr)`, trimmed to the blocks it keeps; `None` if it keeps none of
    /// them.
    fn range(&self, sector: u64, nr: u64) -> Option<(u64, u64)> {
        let end = sector + nr;
        let (&first, &first_at) = self.blocks.range(sector / BLOCK..end.div_ceil(BLOCK)).next()?;
        let (&last, &last_at) = self.blocks.range(..end.div_ceil(BLOCK)).next_back()?;
        let begin =
            if first == sector / BLOCK { first_at * BLOCK + sector % BLOCK } else { first_at * BLOCK };
        let stop = if last == (end - 1) / BLOCK {
            last_at * BLOCK + (end - 1) % BLOCK + 1
        } else {
            (last_at + 1) * BLOCK
        };
        Some((begin, stop - begin))
    }

    /// [`Compact::range`] for a write or read, whose blocks it always keeps.
    fn io(&self, sector: u64, nr: u64) -> (u64, u64) {
        self.range(sector, nr).expect("the oracle keeps every block a write or read touches")
    }
}

/// How one execution runs: the design, the broken locking in force and the
/// checker's choice of which data I/O completes next.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// The locking design under test.
    pub locking: LockingDesign,
    /// Deliberate bugs (the locking ones are what the harnesses catch).
    pub mutations: Mutations,
    /// Given how many data I/Os are in flight, which one completes next.
    /// Loom explores thread orders, not values, so its runs complete the
    /// oldest; shuttle's pick at random from its own seeded generator.
    pub pick: fn(usize) -> usize,
    /// How the pool's own contexts are laid out on threads.
    pub background: Background,
    /// Given a data I/O about to complete that may fail (the scenario's
    /// [`Scenario::io_errors`] not spent, its kind one of
    /// [`Scenario::io_error_kinds`]), whether it fails instead. Loom's runs
    /// fail every such I/O (the first ones: deterministic); shuttle's toss
    /// a coin from its seeded generator. Never asked without faults.
    pub fail: fn(&IoInfo) -> bool,
}

impl Run {
    /// `locking`, no mutations, oldest I/O first, a worker thread and a
    /// completion thread, every data I/O that may fail failing.
    pub fn new(locking: LockingDesign) -> Self {
        Run {
            locking,
            mutations: Mutations::default(),
            pick: |_| 0,
            background: Background::Separate,
            fail: |_| true,
        }
    }
}

/// What one execution did, for the tests that check a scenario reaches
/// what it is about (see [`execute_counted`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Data I/Os failed by the harness.
    pub faults: usize,
    /// Of those, the ones that failed a mapping's preparation (zeroing,
    /// copy, whole-block overwrite): each leaves its data block leaked.
    pub failed_mappings: usize,
    /// Requests that completed with EIO.
    pub io_errors: usize,
}

/// Which threads run the pool's own contexts beside the submitters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Background {
    /// A worker thread (the timer too, where the scenario asks) and a
    /// completion thread, both running until the whole run is over
    /// (shuttle's models).
    Separate,
    /// One thread that runs worker passes, completes data I/O and fires the
    /// timer, and ends once every submitter has finished; the main thread
    /// then settles what is left, single-threaded, before the checks
    /// (loom's models: one thread fewer and no idle tail to interleave).
    /// Completions still race the submitters' map path; what this drops is
    /// a completion landing in the middle of a worker pass.
    Combined,
    /// A worker thread (and timer) and a completion thread, both running
    /// until the whole run is over, blocking while there is nothing to do.
    /// For loom models that need a completion in the middle of a worker
    /// pass (with one submitter, to stay within loom's budget).
    Split,
}

/// The pool's devices after a scenario's set-up, closed: built once
/// ([`prepare`]) and loaded by every execution of a model, instead of
/// formatting the metadata and running the set-up each time.
#[derive(Clone)]
pub struct Image {
    metadata: Vec<u8>,
    data: Vec<u8>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image({} + {} bytes)", self.metadata.len(), self.data.len())
    }
}

/// Runs `scenario`'s set-up single-threaded and returns the closed pool's
/// devices. Must run inside a checker execution (a `loom::model` with one
/// thread does), as every pool lock belongs to the checker.
pub fn prepare(scenario: &Scenario, run: Run) -> Image {
    let shared = build(scenario, run, None);
    for &step in &scenario.setup {
        shared.step(step);
        settle(&shared);
    }
    let failures = std::mem::take(&mut shared.books().failures);
    assert!(failures.is_empty(), "{}: the set-up failed: {}", scenario.name, failures.join("; "));
    match shared.pool.close() {
        Ok((metadata, data)) => Image { metadata: metadata.into_bytes(), data: data.into_bytes() },
        Err((_, e)) => panic!("{}: the pool did not close after the set-up: {e}", scenario.name),
    }
}

/// A request the oracle knows about.
#[derive(Debug, Clone, Copy)]
enum Sent {
    Write(IoTicket),
    Read(IoTicket),
    Discard(IoTicket),
    Flush(IoTicket),
}

/// Harness state shared by the threads. It is a std mutex, invisible to the
/// checkers: it is never held across a pool call, so no schedule can block
/// on it, and keeping it out of the model keeps loom's state space to the
/// pool's own locks.
#[derive(Debug)]
struct Books {
    oracle: Oracle,
    next_write: u64,
    /// Requests submitted, with their oracle tickets.
    sent: BTreeMap<BioId, Sent>,
    /// Completions that arrived before their submitter registered them,
    /// with how many faults had been noted when they arrived.
    early: BTreeMap<BioId, (Completion, usize)>,
    /// The device of every request submitted.
    devs: BTreeMap<BioId, DevId>,
    /// Requests completed, with how many times.
    completed: BTreeMap<BioId, usize>,
    /// Devices whose removal ([`Step::Remove`]) has returned, and not
    /// activated again since.
    removed: std::collections::BTreeSet<DevId>,
    /// The books' logical clock: a tick per submission and per failed
    /// mapping the worker errored ([`Fault::closed`]).
    clock: u64,
    /// Per request: where it sits, and the tick just before its submission.
    spans: BTreeMap<BioId, (RequestSpan, u64)>,
    /// The data I/O faults injected, in order.
    faults: Vec<Fault>,
    /// Requests that completed with EIO.
    io_errors: usize,
    failures: Vec<String>,
}

/// A data I/O the completion context failed, noted before it fails it.
#[derive(Debug, Clone, Copy)]
struct Fault {
    /// The request whose own piece it was (a bio remapped to the data
    /// device): that request may fail with EIO.
    request: Option<BioId>,
    /// The mapping whose preparation it was (a zeroing, a copy, a
    /// whole-block overwrite): the requests of its device that touch its
    /// blocks may fail with EIO until the worker errored its cell, and its
    /// data block leaks.
    mapping: Option<FailedMapping>,
    /// `Pool::fail_io` has returned: the mapping is failed, and listed in
    /// `Pool::failed_mappings` until the worker errors its cell.
    applied: bool,
    /// The tick at which the mapping was seen gone from the failed ones
    /// (the worker errored its cell): a request submitted later cannot
    /// have met it.
    closed: Option<u64>,
}

impl Books {
    fn fail(&mut self, what: String) {
        self.failures.push(what);
    }

    /// Whether a failed data I/O among the first `n_faults` could reach
    /// request `id` (see [`crate::oracle::faults`]): its own piece failed,
    /// or a mapping whose preparation failed on its device and blocks was
    /// waiting for the worker at some moment after its submission.
    fn reached(&self, id: BioId, n_faults: usize) -> bool {
        let Some(&(span, submitted)) = self.spans.get(&id) else { return false };
        self.faults[..n_faults].iter().any(|f| {
            f.request == Some(id)
                || f.mapping.is_some_and(|m| span.reached_by(&m) && f.closed.is_none_or(|c| submitted < c))
        })
    }

    /// Feeds one completion to the oracle; `n_faults` faults had been
    /// noted when it arrived.
    fn complete(&mut self, c: Completion, sent: Sent, out_of_space: bool, n_faults: usize) {
        *self.completed.entry(c.id).or_default() += 1;
        if let Some(dev) = self.devs.get(&c.id).filter(|d| self.removed.contains(d)) {
            let what = format!("request {:?} of device {dev} completed after the device was removed", c.id);
            self.fail(what);
        }
        let ok = c.result.is_ok();
        if let Err(e) = c.result {
            self.io_errors += usize::from(e == Errno::EIO);
            if e == Errno::EIO && self.reached(c.id, n_faults) {
                // A failed data I/O reached it.
            } else if !(out_of_space && e == Errno::ENOSPC) {
                let why = if self.faults.is_empty() { "" } else { ": no failed data I/O could reach it" };
                self.fail(format!("request {:?} failed: {e}{why}", c.id));
            }
        }
        let r = match sent {
            Sent::Write(t) => self.oracle.write_completed(t, ok).map_err(|e| e.to_string()),
            Sent::Discard(t) => self.oracle.discard_completed(t, ok).map_err(|e| e.to_string()),
            Sent::Flush(t) => self.oracle.flush_completed(t, ok).map_err(|e| e.to_string()),
            Sent::Read(t) => self.oracle.read_completed(t, ok, &c.data).map_err(|e| e.to_string()),
        };
        if let Err(e) = r {
            self.fail(format!("oracle: {e}"));
        }
    }

    fn arrived(&mut self, c: Completion, out_of_space: bool) {
        let n_faults = self.faults.len();
        match self.sent.get(&c.id) {
            Some(&sent) => self.complete(c, sent, out_of_space, n_faults),
            None => {
                self.early.insert(c.id, (c, n_faults));
            }
        }
    }
}

/// Which devices are suspended, and how many submissions are under way.
#[derive(Debug, Default)]
struct Gate {
    suspended: Vec<DevId>,
    submitting: usize,
}

/// Everything the threads of one execution share.
struct Shared {
    scenario: Scenario,
    compact: Compact,
    run: Run,
    pool: HarnessPool,
    books: StdMutex<Books>,
    /// Submitters that finished their program.
    submitters_done: AtomicUsize,
    /// The origin's suspension around a snapshot, in the model's locks so
    /// that the checkers see the waiting.
    gate: Mutex<Gate>,
    /// Counts the harness's changes to the pool and the books; with
    /// [`Self::changed`], what an idle thread blocks on (all but
    /// [`Background::Separate`], whose threads spin with yields).
    events: Mutex<u64>,
    changed: Condvar,
}

impl Shared {
    /// The change count now, read before checking a condition to wait on.
    fn seen(&self) -> u64 {
        *lock(&self.events)
    }

    /// Something changed: wakes the threads waiting in [`Self::idle`].
    fn bump(&self) {
        if self.run.background != Background::Separate {
            *lock(&self.events) += 1;
            self.changed.notify_all();
        }
    }

    /// Nothing to do since the change count was `seen`: yields (spinning
    /// designs) or blocks until the next change.
    fn idle(&self, seen: u64) {
        if self.run.background == Background::Separate {
            thread::yield_now();
            return;
        }
        let mut events = lock(&self.events);
        while *events == seen {
            events = wait(&self.changed, events);
        }
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the run is over: nothing more can happen.
    fn finished(&self) -> bool {
        self.submitters_done.load(Ordering::SeqCst) == self.scenario.submitters.len()
            && self.pool.bios_in_flight() == 0
            && self.pool.in_flight_io().is_empty()
            && !self.pool.worker_wanted()
    }

    /// Runs one step of a submitter's program; returns the request sent.
    fn step(&self, step: Step) -> Option<BioId> {
        let pool = &self.pool;
        let fail = |what: String| self.books().fail(format!("{step:?}: {what}"));
        let (sent, req, dev) = match step {
            Step::CreateThin(dev) => {
                let r = pool.message(&format!("create_thin {dev}"));
                let r = r.and_then(|()| pool.activate_thin(u64::from(dev), self.thin_sectors()));
                match r {
                    Ok(()) => {
                        let r = self.books().oracle.create_thin(dev, self.compact.sectors());
                        r.unwrap_or_else(|e| fail(e.to_string()));
                    }
                    Err(e) => fail(e.to_string()),
                }
                return None;
            }
            Step::CreateSnap { dev, origin } => {
                // dm-thin requires the origin to be suspended while the
                // snapshot is made (DM core drains its I/O and holds new
                // I/O back); a write still in flight could otherwise land
                // in the block the snapshot now shares.
                lock(&self.gate).suspended.push(origin);
                self.bump();
                loop {
                    let seen = self.seen();
                    if self.drained(origin) {
                        break;
                    }
                    self.idle(seen);
                }
                let r = pool.message(&format!("create_snap {dev} {origin}"));
                let r = r.and_then(|()| pool.activate_thin(u64::from(dev), self.thin_sectors()));
                // Recorded once the snapshot exists: writes the oracle saw
                // submitted before are allowed on it, later ones are not.
                match r {
                    Ok(()) => {
                        let r = self.books().oracle.create_snap(dev, origin);
                        r.unwrap_or_else(|e| fail(e.to_string()));
                    }
                    Err(e) => fail(e.to_string()),
                }
                lock(&self.gate).suspended.retain(|d| *d != origin);
                self.bump();
                return None;
            }
            Step::Delete(dev) => {
                let r = self.remove(dev).and_then(|()| pool.message(&format!("delete {dev}")));
                match r {
                    Ok(()) => {
                        let r = self.books().oracle.delete(dev);
                        r.unwrap_or_else(|e| fail(e.to_string()));
                    }
                    Err(e) => fail(e.to_string()),
                }
                return None;
            }
            Step::Activate(dev) => {
                match pool.activate_thin(u64::from(dev), self.thin_sectors()) {
                    Ok(()) => {
                        self.books().removed.remove(&dev);
                    }
                    Err(e) => fail(e.to_string()),
                }
                return None;
            }
            Step::Remove(dev) => {
                if let Err(e) = self.remove(dev) {
                    fail(e.to_string());
                }
                return None;
            }
            Step::DeleteOpen(dev) => {
                match pool.message(&format!("delete {dev}")) {
                    Err(e) if e.errno == Errno::EBUSY => {}
                    Err(e) => fail(format!("delete of an open device failed, but not with EBUSY: {e}")),
                    Ok(()) => fail("delete of an open device succeeded".to_string()),
                }
                return None;
            }
            Step::WaitMine => return None,
            Step::Write { dev, sector, nr, fua } => {
                self.enter(dev);
                let mut books = self.books();
                books.next_write += 1;
                let w = books.next_write;
                let mut data = vec![0; nr as usize * 512];
                let (at, _) = self.compact.io(sector, nr);
                stamp::fill(&mut data, RUN, w, dev, at);
                let t = books.oracle.write_submitted(dev, at, nr, w, fua);
                let mut req = BioRequest::write(sector, data);
                if fua {
                    req = req.with_fua();
                }
                (t.map(Sent::Write), req, dev)
            }
            Step::Read { dev, sector, nr } => {
                self.enter(dev);
                let (at, _) = self.compact.io(sector, nr);
                let t = self.books().oracle.read_submitted(dev, at, nr);
                (t.map(Sent::Read), BioRequest::read(sector, nr), dev)
            }
            Step::Discard { dev, sector, nr } => {
                self.enter(dev);
                let (at, n) =
                    self.compact.range(sector, nr).expect("a discard reaches a block the oracle keeps");
                let t = self.books().oracle.discard_submitted(dev, at, n);
                (t.map(Sent::Discard), BioRequest::discard(sector, nr), dev)
            }
            Step::Flush(dev) => {
                self.enter(dev);
                let t = self.books().oracle.flush_submitted(dev);
                (t.map(Sent::Flush), BioRequest::flush(), dev)
            }
        };
        let sent = match sent {
            Ok(s) => s,
            Err(e) => {
                lock(&self.gate).submitting -= 1;
                fail(format!("oracle refused the submission: {e}"));
                return None;
            }
        };
        let span = RequestSpan::new(u64::from(dev), req.sector, req.nr_sectors, req.preflush, BLOCK);
        let start = {
            let mut books = self.books();
            books.clock += 1;
            books.clock
        };
        let submitted = pool.submit(u64::from(dev), req);
        lock(&self.gate).submitting -= 1;
        match submitted {
            Ok(id) => {
                let mut books = self.books();
                books.sent.insert(id, sent);
                books.devs.insert(id, dev);
                books.spans.insert(id, (span, start));
                if let Some((c, n_faults)) = books.early.remove(&id) {
                    books.complete(c, sent, self.scenario.out_of_space, n_faults);
                }
                Some(id)
            }
            Err(e) => {
                fail(format!("submit refused: {e}"));
                None
            }
        }
    }

    /// Removes active device `dev` ([`Step::Remove`]): DM suspends it
    /// (new submissions wait, its requests drain), then `thin_dtr` takes it
    /// off the active list and waits, idle, until no worker walk holds it
    /// before closing it.
    fn remove(&self, dev: DevId) -> Result<(), dmsim_model::thin::pool::TargetError> {
        // Nobody waits for a suspension to begin: no bump here.
        lock(&self.gate).suspended.push(dev);
        loop {
            let seen = self.seen();
            if self.drained(dev) {
                break;
            }
            self.idle(seen);
        }
        let r = self.pool.remove_thin(u64::from(dev)).and_then(|removed| loop {
            let seen = self.seen();
            match self.pool.try_destroy_thin(&removed) {
                Some(r) => break r,
                // The worker still walks the device: it bumps the change
                // count when its pass ends.
                None => self.idle(seen),
            }
        });
        if r.is_ok() {
            self.books().removed.insert(dev);
        }
        lock(&self.gate).suspended.retain(|d| *d != dev);
        self.bump();
        r
    }

    /// Waits while `dev` is suspended, then counts a submission under way.
    fn enter(&self, dev: DevId) {
        loop {
            let seen = self.seen();
            let mut gate = lock(&self.gate);
            if !gate.suspended.contains(&dev) {
                gate.submitting += 1;
                return;
            }
            drop(gate);
            self.idle(seen);
        }
    }

    /// Whether no submission is under way and every request sent to `dev`
    /// has completed.
    fn drained(&self, dev: DevId) -> bool {
        if lock(&self.gate).submitting > 0 {
            return false;
        }
        let books = self.books();
        books.devs.iter().all(|(id, d)| *d != dev || books.completed.contains_key(id))
    }

    fn thin_sectors(&self) -> u64 {
        self.scenario.thin_blocks * BLOCK
    }

    fn drain_completions(&self) {
        let done = self.pool.take_completions();
        if done.is_empty() {
            return;
        }
        let mut books = self.books();
        for c in done {
            books.arrived(c, self.scenario.out_of_space);
        }
    }

    /// The completion context's checks on what is in flight now.
    fn check_in_flight(&self, ios: &[IoInfo]) {
        let overlaps =
            |a: &IoInfo, b: &IoInfo| a.sector < b.sector + b.nr_sectors && b.sector < a.sector + a.nr_sectors;
        for d in ios.iter().filter(|io| io.kind == DataIoKind::Discard) {
            for io in ios.iter().filter(|io| matches!(io.kind, DataIoKind::Read | DataIoKind::Write)) {
                if overlaps(d, io) {
                    self.books().fail(format!("passdown discard {d:?} issued while {io:?} is in flight"));
                }
            }
        }
        // A block being zeroed or copied must not be mapped yet.
        for io in ios.iter().filter(|io| matches!(io.kind, DataIoKind::Zero | DataIoKind::Copy)) {
            let block = io.sector / BLOCK;
            for (dev, vblock) in self.mapped_to(block) {
                self.books().fail(format!(
                    "device {dev} block {vblock} maps data block {block} while its {:?} is in flight",
                    io.kind
                ));
            }
        }
    }

    /// The (device, virtual block) pairs of active devices that map `block`.
    fn mapped_to(&self, block: u64) -> Vec<(u64, u64)> {
        let devs = self.pool.active_thins();
        self.pool.with_metadata(|md| {
            let mut found = Vec::new();
            for dev in devs {
                for v in self.scenario.touched_blocks() {
                    if let Ok(Some(r)) = md.find_block(dev, v) {
                        if r.block == block {
                            found.push((dev, v));
                        }
                    }
                }
            }
            found
        })
    }

    /// Checks before completing `io`: a read or write must land in a data
    /// block that is still allocated.
    fn check_completing(&self, io: &IoInfo) {
        if !matches!(io.kind, DataIoKind::Read | DataIoKind::Write) || io.nr_sectors == 0 {
            return;
        }
        let block = io.sector / BLOCK;
        let count = self.pool.with_metadata(|md| md.data_block_count(block));
        if let Ok(0) = count {
            self.books().fail(format!("{io:?} lands in data block {block}, which is free"));
        }
    }
}

/// Runs the worker until the run is over; where the scenario asks, also
/// fires the no-space timeout when the worker is idle. The kernel runs that
/// timeout on the worker's ordered workqueue, never beside a worker pass:
/// from another thread it races `retry_bios_on_resume`, which may queue a
/// bio for a resume just after the timeout failed the queue, and that bio
/// then waits for ever.
fn worker_thread(shared: &Shared) {
    loop {
        if shared.pool.worker_wanted() {
            shared.pool.run_worker();
            shared.close_faults();
        } else if let Some(deadline) = shared.pool.no_space_deadline().filter(|_| shared.scenario.timer) {
            shared.pool.set_time(deadline);
        } else if shared.finished() {
            return;
        } else {
            thread::yield_now();
        }
    }
}

/// Completes data I/O and drains finished requests until the run is over.
fn completion_thread(shared: &Shared) {
    loop {
        shared.drain_completions();
        let ios = shared.pool.in_flight_io();
        shared.check_in_flight(&ios);
        if !ios.is_empty() {
            let io = ios[(shared.run.pick)(ios.len()) % ios.len()];
            shared.finish_io(&io);
        } else if shared.finished() {
            shared.drain_completions();
            return;
        } else {
            thread::yield_now();
        }
    }
}

/// The worker, the completion context and the timer on one thread, until
/// every submitter has finished (see [`Background::Combined`]).
fn background_thread(shared: &Shared) {
    let pool = &shared.pool;
    loop {
        let seen = shared.seen();
        if pool.worker_wanted() {
            pool.run_worker();
            shared.close_faults();
            shared.drain_completions();
            shared.bump();
        } else if shared.complete_one() {
            shared.bump();
        } else if let Some(deadline) = pool.no_space_deadline().filter(|_| shared.scenario.timer) {
            pool.set_time(deadline);
            shared.drain_completions();
            shared.bump();
        } else if shared.submitters_done() {
            return;
        } else {
            shared.idle(seen);
        }
    }
}

impl Shared {
    /// Whether every submitter has finished its program.
    fn submitters_done(&self) -> bool {
        self.submitters_done.load(Ordering::SeqCst) == self.scenario.submitters.len()
    }

    /// Completes one data I/O in flight, if any, with the checks around it.
    fn complete_one(&self) -> bool {
        let ios = self.pool.in_flight_io();
        self.check_in_flight(&ios);
        if ios.is_empty() {
            return false;
        }
        let io = ios[(self.run.pick)(ios.len()) % ios.len()];
        self.finish_io(&io);
        self.drain_completions();
        true
    }

    /// Completes `io`, or fails it with EIO where the scenario allows a
    /// fault and the run chooses one; the checks before it.
    fn finish_io(&self, io: &IoInfo) {
        self.check_completing(io);
        let may_fail = self.scenario.io_error_kinds.contains(&io.kind)
            && self.books().faults.len() < self.scenario.io_errors;
        if !(may_fail && (self.run.fail)(io)) {
            if let Err(e) = self.pool.complete_io(io.id) {
                self.books().fail(format!("complete_io: {e}"));
            }
            return;
        }
        // Noted before the pool fails it: whatever the failure reaches
        // completes after this.
        let fault = Fault {
            request: self.pool.io_request(io.id),
            mapping: self.pool.io_mapping(io.id),
            applied: false,
            closed: None,
        };
        let at = {
            let mut books = self.books();
            books.faults.push(fault);
            books.faults.len() - 1
        };
        if let Err(e) = self.pool.fail_io(io.id, Errno::EIO) {
            self.books().fail(format!("fail_io: {e}"));
        }
        self.books().faults[at].applied = true;
    }

    /// After a worker pass: the failed mappings it errored are closed
    /// (requests submitted from now on cannot meet them). Asks the pool
    /// only while a fault is open, so runs without faults see no extra
    /// scheduling point.
    fn close_faults(&self) {
        let open: Vec<usize> = {
            let books = self.books();
            let open = |f: &Fault| f.applied && f.closed.is_none() && f.mapping.is_some();
            books.faults.iter().enumerate().filter(|(_, f)| open(f)).map(|(i, _)| i).collect()
        };
        if open.is_empty() {
            return;
        }
        // Only faults applied before this look: their mappings were failed
        // by then, so one missing now has been processed.
        let failed = self.pool.failed_mappings();
        let mut books = self.books();
        books.clock += 1;
        let now = books.clock;
        for i in open {
            let f = &mut books.faults[i];
            if f.mapping.is_some_and(|m| !failed.contains(&m)) {
                f.closed = Some(now);
            }
        }
    }
}

/// The worker (and timer) of [`Background::Split`].
fn split_worker_thread(shared: &Shared) {
    let pool = &shared.pool;
    loop {
        let seen = shared.seen();
        if pool.worker_wanted() {
            pool.run_worker();
            shared.close_faults();
            shared.drain_completions();
            shared.bump();
        } else if let Some(deadline) = pool.no_space_deadline().filter(|_| shared.scenario.timer) {
            pool.set_time(deadline);
            shared.drain_completions();
            shared.bump();
        } else if shared.finished() {
            return;
        } else {
            shared.idle(seen);
        }
    }
}

/// The completion context of [`Background::Split`].
fn split_completion_thread(shared: &Shared) {
    loop {
        let seen = shared.seen();
        if shared.complete_one() {
            shared.bump();
        } else if shared.finished() {
            return;
        } else {
            shared.idle(seen);
        }
    }
}

fn submitter_thread(shared: &Shared, program: &[Step]) {
    let mut mine = Vec::new();
    for &step in program {
        if step == Step::WaitMine {
            loop {
                let seen = shared.seen();
                if mine.iter().all(|id| shared.books().completed.contains_key(id)) {
                    break;
                }
                shared.idle(seen);
            }
        }
        mine.extend(shared.step(step));
        shared.bump();
    }
    shared.submitters_done.fetch_add(1, Ordering::SeqCst);
    shared.bump();
}

/// Single-threaded: runs the worker and completes I/O, oldest first, until
/// the pool is quiet.
fn settle(shared: &Shared) {
    for _ in 0..10_000 {
        shared.drain_completions();
        if shared.pool.worker_wanted() {
            shared.pool.run_worker();
            shared.close_faults();
        } else if let Some(io) = shared.pool.in_flight_io().first() {
            let _ = shared.pool.complete_io(io.id);
        } else if let Some(deadline) = shared.pool.no_space_deadline().filter(|_| shared.scenario.timer) {
            shared.pool.set_time(deadline);
        } else {
            return;
        }
    }
    shared.books().fail("the pool never settled".to_string());
}

fn build(scenario: &Scenario, run: Run, image: Option<&Image>) -> Shared {
    let table = PoolTable {
        metadata_dev: "/dev/meta".into(),
        data_dev: "/dev/data".into(),
        data_block_size: BLOCK as u32,
        low_water_mark: 0,
        features: scenario.features,
    };
    let (metadata, data) = match image {
        Some(image) => {
            (MemDevice::from_bytes(image.metadata.clone()), MemDevice::from_bytes(image.data.clone()))
        }
        None => (
            MemDevice::new(META_SECTORS),
            MemDevice::from_bytes(vec![GARBAGE; (scenario.data_blocks * BLOCK * 512) as usize]),
        ),
    };
    let options = PoolOptions { mutations: run.mutations, locking: run.locking, ..PoolOptions::default() };
    let len = scenario.data_blocks * BLOCK;
    let pool = Pool::create(table, len, metadata, data, options)
        .unwrap_or_else(|e| panic!("{}: the pool did not load: {e}", scenario.name));
    let oracle = Oracle::new(OracleConfig::new(RUN, BLOCK));
    let shared = Shared {
        scenario: scenario.clone(),
        compact: Compact::new(scenario),
        run,
        pool,
        books: StdMutex::new(Books {
            oracle,
            next_write: 0,
            sent: BTreeMap::new(),
            devs: BTreeMap::new(),
            early: BTreeMap::new(),
            completed: BTreeMap::new(),
            removed: std::collections::BTreeSet::new(),
            clock: 0,
            spans: BTreeMap::new(),
            faults: Vec::new(),
            io_errors: 0,
            failures: Vec::new(),
        }),
        submitters_done: AtomicUsize::new(0),
        gate: Mutex::new(Gate::default()),
        events: Mutex::new(0),
        changed: Condvar::new(),
    };
    if image.is_some() {
        shared.restore_setup();
    }
    shared
}

impl Shared {
    /// With the set-up already in the image: activates the devices it left
    /// and tells the oracle what it did (the same write numbers, so the
    /// stamps on the data device match).
    fn restore_setup(&self) {
        let mut active: Vec<DevId> = Vec::new();
        let mut books = self.books();
        let books = &mut *books;
        for &step in &self.scenario.setup {
            let r = match step {
                Step::CreateThin(dev) => {
                    active.push(dev);
                    books.oracle.create_thin(dev, self.compact.sectors()).map_err(|e| e.to_string())
                }
                Step::CreateSnap { dev, origin } => {
                    active.push(dev);
                    books.oracle.create_snap(dev, origin).map_err(|e| e.to_string())
                }
                Step::Delete(dev) => {
                    active.retain(|d| *d != dev);
                    books.oracle.delete(dev).map_err(|e| e.to_string())
                }
                Step::Activate(dev) => {
                    active.push(dev);
                    Ok(())
                }
                Step::Remove(dev) => {
                    active.retain(|d| *d != dev);
                    Ok(())
                }
                Step::Write { dev, sector, nr, fua } => {
                    books.next_write += 1;
                    let w = books.next_write;
                    let (at, _) = self.compact.io(sector, nr);
                    books
                        .oracle
                        .write_submitted(dev, at, nr, w, fua)
                        .and_then(|t| books.oracle.write_completed(t, true))
                        .map_err(|e| e.to_string())
                }
                Step::Discard { dev, sector, nr } => {
                    let (at, n) = self.compact.range(sector, nr).expect("a discard reaches a kept block");
                    books.oracle.discard_submitted(dev, at, n)
                }
                .and_then(|t| books.oracle.discard_completed(t, true))
                .map_err(|e| e.to_string()),
                Step::Flush(dev) => books
                    .oracle
                    .flush_submitted(dev)
                    .and_then(|t| books.oracle.flush_completed(t, true))
                    .map_err(|e| e.to_string()),
                // A read or a refused delete changes nothing the oracle
                // keeps.
                Step::Read { .. } | Step::DeleteOpen(_) | Step::WaitMine => Ok(()),
            };
            if let Err(e) = r {
                books.fail(format!("set-up {step:?}: {e}"));
            }
        }
        for dev in active {
            if let Err(e) = self.pool.activate_thin(u64::from(dev), self.thin_sectors()) {
                books.fail(format!("activating {dev} from the image: {e}"));
            }
        }
    }
}

/// One execution of `scenario`: the body of a `loom::model` or a shuttle
/// check. Panics with every failed check.
pub fn execute(scenario: &Scenario, run: Run) {
    execute_on(scenario, run, None);
}

/// [`execute`], and what the execution did (faults injected, requests
/// failed).
pub fn execute_counted(scenario: &Scenario, run: Run) -> Outcome {
    execute_outcome(scenario, run, None)
}

/// [`execute`], starting from `image` (the scenario's set-up done, see
/// [`prepare`]) when given.
pub fn execute_on(scenario: &Scenario, run: Run, image: Option<&Image>) {
    execute_outcome(scenario, run, image);
}

/// [`execute_on`], and what the execution did.
pub fn execute_outcome(scenario: &Scenario, run: Run, image: Option<&Image>) -> Outcome {
    let shared = Arc::new(build(scenario, run, image));
    if image.is_none() {
        for &step in &scenario.setup {
            shared.step(step);
            settle(&shared);
        }
    }
    let mut threads = Vec::new();
    for program in scenario.submitters.clone() {
        let s = shared.clone();
        threads.push(thread::spawn(move || submitter_thread(&s, &program)));
    }
    match run.background {
        Background::Separate => {
            let s = shared.clone();
            threads.push(thread::spawn(move || worker_thread(&s)));
            let s = shared.clone();
            threads.push(thread::spawn(move || completion_thread(&s)));
        }
        Background::Combined => {
            let s = shared.clone();
            threads.push(thread::spawn(move || background_thread(&s)));
        }
        Background::Split => {
            let s = shared.clone();
            threads.push(thread::spawn(move || split_worker_thread(&s)));
            let s = shared.clone();
            threads.push(thread::spawn(move || split_completion_thread(&s)));
        }
    }
    for t in threads {
        t.join().expect("a harness thread panicked");
    }
    if run.background != Background::Separate {
        settle(&shared);
    }
    finish(&shared)
}

/// The checks once the threads have ended.
fn finish(shared: &Shared) -> Outcome {
    let scenario = &shared.scenario;
    if shared.pool.bios_in_flight() > 0 || !shared.pool.in_flight_io().is_empty() {
        shared.books().fail(format!(
            "{} requests and {} data I/Os left in flight",
            shared.pool.bios_in_flight(),
            shared.pool.in_flight_io().len()
        ));
    }
    {
        let books = shared.books();
        let unfinished: Vec<_> = books.sent.keys().filter(|id| books.completed.get(id) != Some(&1)).collect();
        if !unfinished.is_empty() {
            let what = format!("requests not completed exactly once: {unfinished:?}");
            drop(books);
            shared.books().fail(what);
        }
    }
    for &(dev, sector, nr) in &scenario.read_back {
        shared.step(read(dev, sector, nr));
        settle(shared);
    }
    let used = shared.pool.with_metadata(|md| {
        let total = md.data_dev_size().unwrap_or(0);
        total - md.free_data_blocks().unwrap_or(total)
    });
    let leaked = shared.leaked();
    if shared.books().faults.is_empty() {
        if let Some(expected) = scenario.blocks_used.filter(|&e| e != used) {
            shared.books().fail(format!("{used} data blocks in use, expected {expected}"));
        }
    } else {
        // Under faults: the blocks mapped, and exactly the blocks failed
        // preparations left allocated (`process_prepared_mapping` frees
        // nothing on an error) — no other lost or duplicated provision.
        let mapped = shared.mapped_blocks();
        if used != mapped.len() as u64 + leaked.len() as u64 {
            shared.books().fail(format!(
                "{used} data blocks in use, expected {} mapped ({mapped:?}) and {} left by failed \
                 preparations ({leaked:?})",
                mapped.len(),
                leaked.len()
            ));
        }
    }
    if scenario.check_metadata {
        check_metadata(shared, &leaked);
    }
    if let Some(b) = shared.pool.invariant_broken() {
        shared.books().fail(format!("model invariant broken: {b}"));
    }
    let failures = std::mem::take(&mut shared.books().failures);
    if !failures.is_empty() {
        panic!(
            "{} ({}, {}): {}",
            scenario.name,
            shared.run.locking.name(),
            dmsim_model::sync::SUBSTRATE,
            failures.join("; ")
        );
    }
    let books = shared.books();
    Outcome {
        faults: books.faults.len(),
        failed_mappings: books.faults.iter().filter(|f| f.mapping.is_some()).count(),
        io_errors: books.io_errors,
    }
}

impl Shared {
    /// The data blocks of the mappings whose preparation the harness
    /// failed: each stays allocated and unmapped (a leak).
    fn leaked(&self) -> std::collections::BTreeSet<u64> {
        self.books().faults.iter().filter_map(|f| f.mapping).map(|m| m.data_block).collect()
    }

    /// The data blocks the active devices map, at the blocks the scenario
    /// touches (no other block can be mapped).
    fn mapped_blocks(&self) -> std::collections::BTreeSet<u64> {
        let devs = self.pool.active_thins();
        let touched = self.scenario.touched_blocks();
        self.pool.with_metadata(|md| {
            let mut found = std::collections::BTreeSet::new();
            for dev in devs {
                for &v in &touched {
                    if let Ok(Some(r)) = md.find_block(dev, v) {
                        found.insert(r.block);
                    }
                }
            }
            found
        })
    }
}

/// Commits and runs the metadata checker on the pool's metadata device. It
/// must find nothing wrong but the leaks of the blocks in `leaked` (left by
/// failed preparations), and each of those.
fn check_metadata(shared: &Shared, leaked: &std::collections::BTreeSet<u64>) {
    let image = shared.pool.with_metadata(|md| {
        md.commit().map_err(|e| e.to_string())?;
        Ok::<_, String>(md.transaction_manager().block_manager().device().as_bytes().to_vec())
    });
    let what = match image {
        Err(e) => Some(format!("the final commit failed: {e}")),
        Ok(image) => {
            let mut dev = MemDevice::from_bytes(image);
            match check_thin_metadata(&mut dev, &CheckOptions::default()) {
                Ok(report) => {
                    let left = |p: &dmsim_model::thin::check::Problem| {
                        is_leak(p) && p.block.is_some_and(|b| leaked.contains(&b))
                    };
                    let (leaks, other): (Vec<_>, Vec<_>) = report.problems.iter().partition(|p| left(p));
                    let found: std::collections::BTreeSet<u64> =
                        leaks.iter().filter_map(|p| p.block).collect();
                    if !other.is_empty() {
                        Some(format!("the metadata checker found {other:?}"))
                    } else if found != *leaked {
                        Some(format!(
                            "failed preparations left data blocks {leaked:?} allocated, but the metadata \
                             checker finds {found:?} leaked"
                        ))
                    } else {
                        None
                    }
                }
                Err(e) => Some(format!("the metadata checker could not read the metadata: {e}")),
            }
        }
    };
    if let Some(what) = what {
        shared.books().fail(what);
    }
}

/// The scenarios of issue 7, small enough for loom at preemption bound 2.
pub mod scenarios {
    use super::*;

    /// Two writes to different halves of one unprovisioned block: one
    /// provision, both writes kept.
    pub fn two_writes_one_block() -> Scenario {
        Scenario {
            setup: vec![Step::CreateThin(0)],
            submitters: vec![vec![write(0, 0, 8)], vec![write(0, 64, 8)]],
            blocks_used: Some(1),
            read_back: vec![(0, 0, BLOCK)],
            ..Scenario::new("two writes to one unprovisioned block")
        }
    }

    /// A write of the origin breaks sharing with a snapshot while a reader
    /// of the origin reads the same block.
    pub fn read_vs_break_sharing() -> Scenario {
        Scenario {
            setup: vec![Step::CreateThin(0), write(0, 0, BLOCK), Step::CreateSnap { dev: 1, origin: 0 }],
            submitters: vec![vec![write(0, 8, 8)], vec![read(0, 0, 16)]],
            blocks_used: Some(2),
            read_back: vec![(0, 0, BLOCK), (1, 0, BLOCK)],
            ..Scenario::new("read vs. break sharing")
        }
    }

    /// A write to a mapped block races a discard of the same block.
    pub fn write_vs_discard() -> Scenario {
        Scenario {
            setup: vec![Step::CreateThin(0), write(0, 0, BLOCK)],
            submitters: vec![vec![write(0, 8, 8)], vec![discard(0, 0, BLOCK)]],
            read_back: vec![(0, 0, BLOCK)],
            ..Scenario::new("write vs. discard of the same block")
        }
    }

    /// A write breaking sharing races the snapshot's deletion and a second
    /// write to the origin's block, which must not go to the old block.
    pub fn write_vs_snapshot_delete() -> Scenario {
        Scenario {
            setup: vec![Step::CreateThin(0), write(0, 0, BLOCK), Step::CreateSnap { dev: 1, origin: 0 }],
            submitters: vec![vec![write(0, 0, 8)], vec![Step::Delete(1), write(0, 64, 8)]],
            blocks_used: Some(1),
            read_back: vec![(0, 0, BLOCK)],
            ..Scenario::new("write vs. snapshot delete during break sharing")
        }
    }

    /// Writes race the creation of a snapshot: a write sent after the
    /// snapshot exists must not show in it.
    pub fn write_vs_snapshot() -> Scenario {
        Scenario {
            setup: vec![Step::CreateThin(0), write(0, 0, BLOCK)],
            submitters: vec![
                vec![write(0, 0, 8)],
                vec![Step::CreateSnap { dev: 1, origin: 0 }, write(0, 64, 8)],
            ],
            read_back: vec![(0, 0, BLOCK), (1, 0, BLOCK)],
            ..Scenario::new("write vs. snapshot")
        }
    }

    /// A FUA write provisioning a block races an empty flush.
    pub fn flush_vs_provisioning() -> Scenario {
        Scenario {
            setup: vec![Step::CreateThin(0)],
            submitters: vec![vec![Step::Write { dev: 0, sector: 0, nr: 8, fua: true }], vec![Step::Flush(0)]],
            blocks_used: Some(1),
            read_back: vec![(0, 0, BLOCK)],
            ..Scenario::new("FLUSH vs. provisioning")
        }
    }

    /// Two writes to two blocks of a one-block pool: one queues out of
    /// space until the no-space timeout fails it.
    pub fn out_of_space() -> Scenario {
        Scenario {
            data_blocks: 1,
            setup: vec![Step::CreateThin(0)],
            submitters: vec![vec![write(0, 0, 8)], vec![write(0, BLOCK, 8)]],
            blocks_used: Some(1),
            out_of_space: true,
            timer: true,
            read_back: vec![(0, 0, 2 * BLOCK)],
            ..Scenario::new("out of space while bios are queued")
        }
    }

    /// The first virtual block of the second prison region of the
    /// regions design.
    pub const REGION_EDGE: u64 = 1024;

    /// A write straddling virtual blocks 1023 and 1024 races a discard of
    /// both: in the regions design their cells live in two prison regions
    /// (two locks) and the discard is split at the boundary, so this is
    /// where the designs' locking really differs.
    pub fn write_vs_discard_across_regions() -> Scenario {
        let edge = REGION_EDGE * BLOCK;
        Scenario {
            thin_blocks: REGION_EDGE + 1,
            setup: vec![Step::CreateThin(0), write(0, edge - BLOCK, 2 * BLOCK)],
            submitters: vec![vec![write(0, edge - 8, 16)], vec![discard(0, edge - BLOCK, 2 * BLOCK)]],
            read_back: vec![(0, edge - BLOCK, 2 * BLOCK)],
            ..Scenario::new("write vs. discard across a prison region boundary")
        }
    }

    /// The smallest lifecycle race, for loom: device 0's write sends the
    /// worker walking the active devices while device 1, active and idle,
    /// is removed (`thin_dtr` must wait until the walk lets go of it).
    pub fn remove_vs_worker() -> Scenario {
        Scenario {
            setup: vec![Step::CreateThin(0), Step::CreateThin(1)],
            submitters: vec![vec![write(0, 0, 8)], vec![Step::Remove(1)]],
            blocks_used: Some(1),
            read_back: vec![(0, 0, BLOCK)],
            ..Scenario::new("thin removal vs. the worker")
        }
    }

    /// Virtual size of the devices of the scenarios that cross prison
    /// regions: two whole regions (unprovisioned blocks cost nothing).
    pub const TWO_REGIONS: u64 = 2 * REGION_EDGE;

    /// Thin device lifecycle against the worker, completions and other
    /// devices' I/O, on devices two prison regions long. Device 0 takes a
    /// write to a mapped block and a write provisioning the two blocks on
    /// the region boundary (worker passes walking the active devices),
    /// then a `delete` of itself that must be refused while it is open.
    /// Device 1, inactive after the set-up, is activated, written and read,
    /// then removed and deleted; device 2, active and idle, is removed and
    /// deleted while the worker runs. Checks, besides the usual: no worker
    /// pass touches a device after `thin_dtr` freed it (a broken model
    /// invariant), no request of a removed device completes after its
    /// removal, the deleted devices' blocks are free again, and the
    /// committed metadata passes the checker.
    pub fn lifecycle_vs_worker() -> Scenario {
        let edge = REGION_EDGE * BLOCK;
        Scenario {
            thin_blocks: TWO_REGIONS,
            setup: vec![
                Step::CreateThin(0),
                write(0, 0, BLOCK),
                Step::CreateThin(1),
                write(1, 0, BLOCK),
                Step::Remove(1),
                Step::CreateThin(2),
            ],
            submitters: vec![
                vec![write(0, 8, 8), write(0, edge - 8, 16), Step::DeleteOpen(0)],
                vec![Step::Activate(1), write(1, 64, 8), read(1, 0, 16), Step::WaitMine, Step::Delete(1)],
                vec![Step::Delete(2)],
            ],
            blocks_used: Some(3),
            read_back: vec![(0, 0, BLOCK), (0, edge - BLOCK, 2 * BLOCK)],
            check_metadata: true,
            ..Scenario::new("thin lifecycle vs. the worker")
        }
    }

    /// A discard of a whole prison region and one block past it (split by
    /// DM core at the boundary: virtual blocks 0..1024 and 1024) races
    /// writes to a mapped block inside the region (block 5) and across the
    /// boundary (blocks 1023 and 1024), on a device two regions long. In
    /// the regions design the discard's range key `[0, 1024)` ends on the
    /// boundary and must share its region's lock with the write's key
    /// `[5, 6)`.
    pub fn writes_vs_discard_of_a_region() -> Scenario {
        let edge = REGION_EDGE * BLOCK;
        Scenario {
            thin_blocks: TWO_REGIONS,
            setup: vec![Step::CreateThin(0), write(0, 5 * BLOCK, BLOCK), write(0, edge - BLOCK, 2 * BLOCK)],
            submitters: vec![
                vec![discard(0, 0, edge + BLOCK)],
                vec![write(0, 5 * BLOCK + 8, 8), write(0, edge - 8, 16)],
            ],
            read_back: vec![(0, 5 * BLOCK, BLOCK), (0, edge - BLOCK, 2 * BLOCK)],
            check_metadata: true,
            ..Scenario::new("writes vs. a discard of a whole prison region")
        }
    }

    /// [`writes_vs_discard_of_a_region`] without discard passdown: no data
    /// cells, so the discard's virtual range cell alone keeps the write to
    /// block 5 from looking the block up between the discard's wait for
    /// older I/O and its unmapping (with passdown, the data cell narrows
    /// that window to nearly nothing).
    pub fn writes_vs_discard_of_a_region_no_passdown() -> Scenario {
        Scenario {
            name: "writes vs. a discard of a whole prison region, no passdown",
            features: PoolFeatures { no_discard_passdown: true, ..PoolFeatures::default() },
            ..writes_vs_discard_of_a_region()
        }
    }

    /// Two writes to different halves of unprovisioned block 0 and a FUA
    /// write to unprovisioned block 1, the zeroing of one of the new blocks
    /// failing (`copy_complete` with an error: `process_prepared_mapping`
    /// errors the mapping's cell). The writes waiting in that cell, or
    /// joining it before the worker gets there, fail with EIO; a write
    /// arriving after provisions the block anew; the write to the other
    /// block never meets the failure — the FUA write waits on the device's
    /// deferred list (`thin_bio_map` defers flush and FUA bios), where a
    /// failed mapping must not reach it. The failed mapping's block stays
    /// allocated: without faults 2 blocks are in use, with one 2 or 3 (one
    /// leaked).
    pub fn writes_with_failing_zeroing() -> Scenario {
        Scenario {
            setup: vec![Step::CreateThin(0)],
            submitters: vec![
                vec![write(0, 0, 8)],
                vec![write(0, 64, 8)],
                vec![Step::Write { dev: 0, sector: BLOCK, nr: 8, fua: true }],
            ],
            blocks_used: Some(2),
            read_back: vec![(0, 0, 2 * BLOCK)],
            io_errors: 1,
            io_error_kinds: &[DataIoKind::Zero],
            ..Scenario::new("writes to unprovisioned blocks, a zeroing failing")
        }
    }

    /// [`writes_with_failing_zeroing`] without the FUA write to block 1: two
    /// writes to one unprovisioned block, its zeroing failing (small enough
    /// for loom).
    pub fn two_writes_one_block_zeroing_fails() -> Scenario {
        Scenario {
            submitters: vec![vec![write(0, 0, 8)], vec![write(0, 64, 8)]],
            blocks_used: Some(1),
            read_back: vec![(0, 0, BLOCK)],
            ..Scenario {
                name: "two writes to one unprovisioned block, the zeroing failing",
                ..writes_with_failing_zeroing()
            }
        }
    }

    /// Two writes break sharing of the origin's block 0 with a snapshot
    /// while a reader reads it, the copy failing (`copy_complete` with an
    /// error): the writes in the copy's cell fail with EIO, the reader and
    /// the snapshot keep the old data, and the copy's destination leaks.
    pub fn break_sharing_with_failing_copy() -> Scenario {
        Scenario {
            setup: vec![Step::CreateThin(0), write(0, 0, BLOCK), Step::CreateSnap { dev: 1, origin: 0 }],
            submitters: vec![vec![write(0, 8, 8)], vec![read(0, 0, 16), write(0, 64, 8)]],
            blocks_used: Some(2),
            read_back: vec![(0, 0, BLOCK), (1, 0, BLOCK)],
            io_errors: 1,
            io_error_kinds: &[DataIoKind::Copy],
            ..Scenario::new("write vs. break sharing, the copy failing")
        }
    }

    /// A discard of blocks 0 and 1 races a write to mapped block 0 and a
    /// whole-block write provisioning block 1 (an overwrite: no zeroing),
    /// one of the writes' data I/O failing: a failed write to block 0 fails
    /// that write alone; a failed overwrite fails its mapping
    /// (`overwrite_endio` sets its status), whose cell the discard of block
    /// 1 may wait in, and leaks its block.
    pub fn discard_vs_failing_writes() -> Scenario {
        Scenario {
            setup: vec![Step::CreateThin(0), write(0, 0, BLOCK)],
            submitters: vec![
                vec![write(0, 8, 8)],
                vec![write(0, BLOCK, BLOCK)],
                vec![discard(0, 0, 2 * BLOCK)],
            ],
            read_back: vec![(0, 0, 2 * BLOCK)],
            io_errors: 1,
            io_error_kinds: &[DataIoKind::Write],
            ..Scenario::new("discard vs. failing writes")
        }
    }

    /// The scenarios with data I/O faults.
    pub fn with_faults() -> Vec<Scenario> {
        vec![
            writes_with_failing_zeroing(),
            two_writes_one_block_zeroing_fails(),
            break_sharing_with_failing_copy(),
            discard_vs_failing_writes(),
        ]
    }

    /// Every scenario.
    pub fn all() -> Vec<Scenario> {
        vec![
            two_writes_one_block(),
            read_vs_break_sharing(),
            write_vs_discard(),
            write_vs_snapshot(),
            write_vs_snapshot_delete(),
            flush_vs_provisioning(),
            out_of_space(),
            write_vs_discard_across_regions(),
            remove_vs_worker(),
            lifecycle_vs_worker(),
            writes_vs_discard_of_a_region(),
            writes_vs_discard_of_a_region_no_passdown(),
        ]
    }
}
