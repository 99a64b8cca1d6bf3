//! The thin target under the oracle: a driver that applies a sequence of
//! user-level operations — messages, reads, writes of any size and
//! alignment, discards, flushes, FUA, worker passes, data I/O completions in
//! any order, simulated time, crashes — to a [`Pool`] on simulated disks and
//! feeds the same events to the [`Oracle`], which judges every read.
//!
//! The operations are plain data ([`ThinOp`]), so proptest, a seeded
//! generator or an exhaustive enumerator can all produce them; the driver
//! is deterministic: the same operations give the same run.
//!
//! Beyond the oracle, [`ThinSim::finish`] settles the pool (the no-space
//! timeout fails what still waits for space), reads every device back in
//! full, and runs the independent metadata checker on the committed image.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fmt::Write as _;

use dmsim_faults::{CrashOverlay, CrashPoint, DiskEvent, Image, JudgedStates, SimDisk, TearMode};
use dmsim_faults::{FaultCoverage, FiredFault};
use dmsim_model::block_device::{BlockDevice, MemDevice, SECTOR_SIZE};
use dmsim_model::errno::Errno;
use dmsim_model::pdata::layout::thin::NEEDS_CHECK;
use dmsim_model::probes::PoolProbes;
use dmsim_model::thin::check::{check_thin_metadata, CheckOptions, Problem, Severity, Structure};
use dmsim_model::thin::dump::{read_devices, DeviceMappings};
use dmsim_model::thin::metadata::ThinId;
use dmsim_model::thin::metadata::ThinMetadata;
use dmsim_model::thin::mode::PoolMode;
use dmsim_model::thin::pool::{
    BioId, BioOp, BioRequest, Completion, DataIoKind, IoInfo, ModeChange, Pool, PoolOptions,
};
use dmsim_model::thin::superblock::Superblock;
use dmsim_model::thin::table::{PoolFeatures, PoolTable};
use dmsim_traces::stamp::{self, SectorContent};
use dmsim_traces::{CrashMode, DiskFault, DiskId, Event, FaultAim};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::completion::{catching, Pending};
use crate::oracle::faults::{is_leak, RequestSpan};
use crate::oracle::{DevId, Oracle, OracleConfig};
use crate::run::MAX_DISK_SECTORS;

/// A metadata block counted and not referenced: a leak, which a pool run
/// as 6.1 is (`KernelFixes::refcount_errors_fail_the_operation` off)
/// leaves after a metadata fault — a subtree whose deletion met an error
/// keeps the counts of the blocks it did not reach.
fn is_metadata_leak(p: &Problem) -> bool {
    p.structure == Structure::MetadataSpaceMap && p.severity == Severity::NonFatal
}

/// Sectors of a 4 KiB metadata block.
const BLOCK_SECTORS: u64 = 8;

/// Metadata crash states judged at every crash (see
/// `ThinSim::check_metadata_crash_states`).
pub const METADATA_CRASH_STATES: usize = 8;

/// Epochs of at most this many unflushed metadata writes are judged in every
/// subset at the first of those points.
pub const EXHAUSTIVE_EPOCH: usize = 5;

/// The byte the data device starts full of: neither zero nor a stamp, so a
/// block that was not zeroed shows.
pub const DATA_GARBAGE: u8 = 0xa7;

/// The shape of one simulated pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinSimConfig {
    /// Run id stamped into every written sector.
    pub run: u64,
    /// Data block size in sectors (a multiple of 128).
    pub block_sectors: u64,
    /// Data blocks in the pool.
    pub data_blocks: u64,
    /// Size of every thin device in blocks.
    pub thin_blocks: u64,
    /// Metadata device size in sectors.
    pub metadata_sectors: u64,
    /// The pool's table features.
    pub features: PoolFeatures,
    /// Module parameters and deliberate bugs.
    pub options: PoolOptions,
    /// Most thin devices alive at once.
    pub max_devices: usize,
}

impl Default for ThinSimConfig {
    fn default() -> Self {
        ThinSimConfig {
            run: 1,
            block_sectors: 128,
            data_blocks: 24,
            thin_blocks: 16,
            metadata_sectors: 4096,
            features: PoolFeatures::default(),
            options: PoolOptions::default(),
            max_devices: 4,
        }
    }
}

/// One step of a workload: the trace schema's [`Op`](dmsim_traces::Op).
/// Device and position fields are taken modulo what exists, so every value
/// is meaningful.
pub use dmsim_traces::op::Op as ThinOp;

/// What went wrong in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinFailure {
    /// Index of the operation during which it showed (`ops.len()` for
    /// the final checks).
    pub step: usize,
    /// Which detector: `oracle`, `checker`, `pool` (an unexpected error or
    /// a hang), `model` (a broken invariant of the model: see
    /// [`Pool::invariant_broken`]), `load` (the pool did not load after a
    /// crash), `misuse` (the driver fed the oracle something impossible),
    /// `trace` (the op belongs to cache traces: see [`ThinOp::thin_error`]).
    pub kind: &'static str,
    /// What happened.
    pub what: String,
}

impl fmt::Display for ThinFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {}: {}: {}", self.step, self.kind, self.what)
    }
}

/// Counters of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThinStats {
    /// Requests submitted.
    pub bios: u64,
    /// Reads the oracle judged.
    pub reads_checked: u64,
    /// Requests that failed with ENOSPC.
    pub enospc: u64,
    /// Crashes survived.
    pub crashes: u64,
    /// Pool messages sent.
    pub messages: u64,
    /// Data I/Os completed.
    pub data_ios: u64,
    /// Data blocks the final check found leaked by a crash or a failed
    /// data I/O (counted, unmapped; see [`ThinSim::check_metadata`]).
    pub leaked_after_crash: u64,
    /// Requests that failed with EIO after a fault was injected.
    pub io_errors: u64,
    /// Crash states the pool was reloaded from.
    pub crash_states: u64,
    /// Simulated time at the end, in nanoseconds.
    pub sim_time_ns: u64,
    /// Metadata device growths (pool table reloads on a grown device).
    pub metadata_growths: u64,
    /// Times the pool went into out-of-metadata-space mode.
    pub out_of_metadata_space: u64,
    /// Requests whose result the kernel's read-only rules decided and
    /// checked ([`ReadOnlyRules`]).
    pub read_only_judged: u64,
}

impl ThinStats {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &ThinStats) {
        self.bios += other.bios;
        self.reads_checked += other.reads_checked;
        self.enospc += other.enospc;
        self.crashes += other.crashes;
        self.messages += other.messages;
        self.data_ios += other.data_ios;
        self.leaked_after_crash += other.leaked_after_crash;
        self.io_errors += other.io_errors;
        self.crash_states += other.crash_states;
        self.sim_time_ns += other.sim_time_ns;
        self.metadata_growths += other.metadata_growths;
        self.out_of_metadata_space += other.out_of_metadata_space;
        self.read_only_judged += other.read_only_judged;
    }
}

type SimPool = Pool<SimDisk, SimDisk>;

/// A pool, its live thin devices and the oracle watching them.
pub struct ThinSim {
    cfg: ThinSimConfig,
    pool: Option<SimPool>,
    oracle: Oracle,
    /// Live devices in creation order.
    devices: Vec<ThinId>,
    next_id: ThinId,
    next_write: u64,
    pending: BTreeMap<BioId, Pending>,
    now: u64,
    step: usize,
    /// A commit to request once this many data I/Os completed since
    /// [`ThinSim::plan_commit`] ([`Pool::request_commit`]).
    commit_plan: Option<usize>,
    /// A commit to make once this many pieces of the next request split
    /// into more are mapped ([`ThinSim::plan_commit_after_pieces`]).
    piece_plan: Option<usize>,
    /// Commits made between a request's pieces since
    /// [`ThinSim::plan_commit`].
    piece_commits: usize,
    /// A commit to request just before this worker pass since
    /// [`ThinSim::plan_commit`] ([`ThinSim::plan_commit_in_pass`]).
    pass_plan: Option<usize>,
    /// Worker passes since [`ThinSim::plan_commit`].
    passes: usize,
    /// Data I/Os [`ThinSim::quiesce`] completed since
    /// [`ThinSim::plan_commit`].
    data_completions: usize,
    /// Data-device sectors of writes to complete in this order when in
    /// flight together ([`ThinSim::follow_data_writes`]).
    write_order: Vec<u64>,
    stats: ThinStats,
    /// Everything that happened, for the trace.
    events: Vec<Event>,
    /// The pool mode last recorded.
    mode: PoolMode,
    /// Faults fired so far (injected I/O failures included): from the first
    /// one on, EIO is a legal result.
    faults_fired: u64,
    /// Faults fired on the metadata disk: from the first one on, pool
    /// messages and activations may fail.
    metadata_faults_fired: u64,
    coverage: FaultCoverage,
    /// The metadata disk's durable image when its request log started (at
    /// load and at every recovery): crash states between two crashes are
    /// rebuilt from it.
    metadata_base: Image,
    /// The probes of the pools that crashed (see [`ThinSim::pool_probes`]).
    crashed_pool_probes: PoolProbes,
    /// The metadata crash points sampled inside commits are checked
    /// without being judged ([`ThinSim::report_metadata_crash_points`]).
    crash_points_reported: bool,
    /// With `crash_points_reported`: the first problem found there.
    crash_point_finding: Option<String>,
    /// Counts the pool mode changes seen, crashes and metadata growths:
    /// what a request was submitted under (see [`ReadOnlyRules`]).
    epoch: u64,
    /// Per request in flight: the epoch it was submitted in, and what the
    /// kernel's read-only rules say it must return, if they apply.
    expected: BTreeMap<BioId, (u64, Option<Result<(), Errno>>)>,
    /// The committed devices and mappings as of an epoch in which the pool
    /// was read-only for metadata (they cannot change then).
    frozen: Option<(u64, BTreeMap<u64, DeviceMappings>)>,
    /// The pool has been in out-of-metadata-space, read-only or fail mode:
    /// a mapping in preparation then fails and keeps its data block,
    /// which a commit may have counted (a leak, as after a crash).
    degraded: bool,
    /// Per request in flight: what could have made it fail (see
    /// [`Reach`]).
    reach: BTreeMap<BioId, Reach>,
    /// The pool is out of data space (the kernel's `out_of_data_space`:
    /// set on entering out-of-data-space mode, cleared only by write
    /// mode), as the pool's mode changes tell.
    out_of_data_space: bool,
    /// Data faults (armed data-disk faults and failed data I/O) since the
    /// pool was loaded: the failed mappings are looked for only then.
    data_faults_since_load: u64,
    /// Data blocks a failed data I/O may have left allocated and unmapped:
    /// the destinations of failed zeroing, copies and writes, and the
    /// blocks of mappings whose preparation failed.
    leak_candidates: BTreeSet<u64>,
    /// The first out-of-data-space or read-only mode the pool had no
    /// reason for (see [`ThinSim::note_mode_changes`]).
    mode_violation: Option<String>,
    /// Fail mode came, with no metadata fault, the way stock 6.1 goes
    /// there when a block allocation's commit finds no metadata block
    /// free and the pool does not zero new blocks ([`Self::check_fail_mode`]).
    fail_without_fault: bool,
    /// Metadata faults fired since the pool was loaded.
    metadata_faults_since_load: u64,
    /// How many of the metadata faults fired and not yet taken have been
    /// attributed to the requests they could reach (see
    /// [`ThinSim::settle_metadata_faults`]).
    metadata_faults_attributed: usize,
    /// An aimed fault ([`FaultAim::Passdown`]) waits for the next passdown
    /// discard the data device completes, to fail it instead. It is the
    /// simulator's, not armed on a disk, so it waits across crashes; two
    /// aims before that discard are one.
    aimed_passdown: bool,
}

/// What could have reached a request in flight, from its submission to its
/// completion: what makes an error legal for it (see
/// [`ThinSim::completed`] and docs/campaign.md, "The oracle under
/// faults").
#[derive(Debug, Clone, Copy, Default)]
struct Reach {
    /// Its device and virtual blocks: what a failed mapping reaches.
    span: RequestSpan,
    /// A data fault failed one of its own pieces' data I/O, or the
    /// preparation of a mapping of a block it touches (whose cell it
    /// waits in, or may join).
    data_fault: bool,
    /// A metadata fault fired while it was in flight.
    metadata_fault: bool,
    /// The pool was in out-of-metadata-space, read-only or fail mode while
    /// it was in flight.
    degraded: bool,
    /// The pool was out of data space while it was in flight.
    out_of_data_space: bool,
}

fn table(cfg: &ThinSimConfig) -> PoolTable {
    PoolTable {
        metadata_dev: "/dev/dmsim-meta".into(),
        data_dev: "/dev/dmsim-data".into(),
        data_block_size: cfg.block_sectors as u32,
        low_water_mark: 2,
        features: cfg.features,
    }
}

/// Whether `io` writes the data device (a remapped write, a zeroing, a
/// copy's write): what [`ThinSim::follow_data_writes`] orders.
fn writes_data(io: &IoInfo) -> bool {
    matches!(io.kind, DataIoKind::Write | DataIoKind::Zero | DataIoKind::Copy)
}

impl ThinSim {
    /// A fresh pool with no thin devices; the data device is full of
    /// [`DATA_GARBAGE`].
    pub fn new(cfg: ThinSimConfig) -> Self {
        let metadata = SimDisk::new(cfg.metadata_sectors);
        let data = SimDisk::filled(cfg.data_blocks * cfg.block_sectors, DATA_GARBAGE);
        let pool =
            Pool::create(table(&cfg), cfg.data_blocks * cfg.block_sectors, metadata, data, cfg.options)
                .expect("a fresh pool loads");
        pool.start_clock(0);
        let oracle = Oracle::new(OracleConfig {
            run: cfg.run,
            sectors_per_block: cfg.block_sectors,
            zeroing: !cfg.features.skip_block_zeroing,
            discard_undefined: false,
        });
        ThinSim {
            cfg,
            pool: Some(pool),
            oracle,
            devices: Vec::new(),
            next_id: 0,
            next_write: 0,
            pending: BTreeMap::new(),
            now: 0,
            step: 0,
            stats: ThinStats::default(),
            events: Vec::new(),
            mode: PoolMode::Write,
            faults_fired: 0,
            metadata_faults_fired: 0,
            coverage: FaultCoverage::default(),
            metadata_base: Image::filled(0, 0),
            crashed_pool_probes: PoolProbes::default(),
            crash_points_reported: false,
            crash_point_finding: None,
            epoch: 0,
            commit_plan: None,
            piece_plan: None,
            piece_commits: 0,
            pass_plan: None,
            passes: 0,
            write_order: Vec::new(),
            data_completions: 0,
            expected: BTreeMap::new(),
            frozen: None,
            degraded: false,
            reach: BTreeMap::new(),
            out_of_data_space: false,
            data_faults_since_load: 0,
            leak_candidates: BTreeSet::new(),
            mode_violation: None,
            fail_without_fault: false,
            metadata_faults_attributed: 0,
            metadata_faults_since_load: 0,
            aimed_passdown: false,
        }
        .recording()
    }

    /// Starts the metadata disk's request log.
    fn recording(mut self) -> Self {
        self.start_metadata_log();
        self
    }

    fn start_metadata_log(&mut self) {
        self.metadata_base = self
            .pool()
            .with_metadata(|md| md.transaction_manager().block_manager().device_mut().start_recording());
    }

    /// The events recorded so far: every op applied and what was observed.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Takes the recorded events.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// The oracle.
    pub fn oracle(&self) -> &Oracle {
        &self.oracle
    }

    /// The faults that fired so far, by kind.
    pub fn coverage(&self) -> &FaultCoverage {
        &self.coverage
    }

    /// The rare states the model reached so far (coverage probes), over
    /// every pool of the run: those that crashed and the one loaded now.
    pub fn pool_probes(&self) -> PoolProbes {
        let mut p = self.crashed_pool_probes;
        if let Some(pool) = &self.pool {
            p.add(&pool.probes());
        }
        p
    }

    /// The counters so far.
    pub fn stats(&self) -> ThinStats {
        self.stats
    }

    /// The pool.
    pub fn pool(&self) -> &SimPool {
        self.pool.as_ref().expect("pool present between steps")
    }

    fn fail(&self, what: impl Into<String>) -> ThinFailure {
        self.fail_as("pool", what)
    }

    fn fail_as(&self, kind: &'static str, what: impl Into<String>) -> ThinFailure {
        ThinFailure { step: self.step, kind, what: what.into() }
    }

    /// Records pool mode changes and the faults that fired.
    fn observe(&mut self) {
        self.note_mode_changes();
        if self.pool.is_none() {
            return;
        }
        self.settle_metadata_faults();
        self.metadata_faults_attributed = 0;
        let Some(pool) = self.pool.as_ref() else { return };
        let mode = pool.mode();
        let mut fired =
            pool.with_metadata(|md| md.transaction_manager().block_manager().device_mut().take_fired());
        let data_fired = pool.with_data_device(|d| d.take_fired());
        let mut all: Vec<(DiskId, FiredFault)> = fired.drain(..).map(|f| (DiskId::Metadata, f)).collect();
        all.extend(data_fired.into_iter().map(|f| (DiskId::Data, f)));
        for (disk, f) in all {
            self.faults_fired += 1;
            if disk == DiskId::Metadata {
                self.metadata_faults_fired += 1;
                self.metadata_faults_since_load += 1;
            }
            self.coverage.record_fired(&f);
            self.events.push(Event::FaultFired { disk, what: f.to_string() });
        }
        if mode != self.mode {
            if mode == PoolMode::OutOfMetadataSpace {
                self.stats.out_of_metadata_space += 1;
            }
            if mode > PoolMode::OutOfMetadataSpace && self.mode <= PoolMode::OutOfMetadataSpace {
                // A metadata failure aborted the transaction: the mappings
                // are back at the last commit, as after a crash, while the
                // requests in flight go on. (Out-of-metadata-space mode
                // comes after a commit that succeeded: nothing is rolled
                // back, and an abort from it finds the transaction empty.)
                self.oracle.rolled_back();
            }
            self.degraded |= mode >= PoolMode::OutOfMetadataSpace;
            self.epoch += 1;
            self.mode = mode;
            self.events.push(Event::Mode(mode.to_string()));
        }
    }

    fn thin_sectors(&self) -> u64 {
        self.cfg.thin_blocks * self.cfg.block_sectors
    }

    fn device(&self, index: u8) -> Option<ThinId> {
        if self.devices.is_empty() {
            None
        } else {
            Some(self.devices[index as usize % self.devices.len()])
        }
    }

    /// Runs every operation, then [`Self::finish`].
    pub fn run(cfg: ThinSimConfig, ops: &[ThinOp]) -> Result<ThinStats, ThinFailure> {
        let mut sim = ThinSim::new(cfg);
        for op in ops {
            sim.apply(op)?;
        }
        sim.finish()?;
        Ok(sim.stats)
    }

    /// Applies one operation, recording it and what it led to.
    pub fn apply(&mut self, op: &ThinOp) -> Result<(), ThinFailure> {
        let start = self.events.len();
        self.events.push(Event::Op(*op));
        let r = catching(|| self.apply_inner(op)).unwrap_or_else(|e| Err(self.fail_as("model", e)));
        self.observe();
        // A broken invariant, or the pool failing for no reason, is the
        // cause of whatever else the op showed.
        let r = self
            .check_invariants()
            .and(self.check_fail_mode())
            .and(self.check_modes())
            .and(self.check_failed_abort(start))
            .and(r);
        if let Err(f) = &r {
            self.events.push(Event::Violation { kind: f.kind.to_string(), message: f.what.clone() });
        }
        r
    }

    fn apply_inner(&mut self, op: &ThinOp) -> Result<(), ThinFailure> {
        self.step += 1;
        let size = self.thin_sectors();
        match *op {
            ThinOp::Write { dev, sector, nr_sectors, fua, preflush } => {
                let Some(dev) = self.device(dev) else { return Ok(()) };
                let sector = u64::from(sector) % size;
                let nr = u64::from(nr_sectors.max(1)).min(size - sector);
                let write = self.next_write;
                self.next_write += 1;
                let mut data = vec![0; (nr * SECTOR_SIZE) as usize];
                stamp::fill(&mut data, self.cfg.run, write, dev as u32, sector);
                let mut req = BioRequest::write(sector, data);
                req.fua = fua;
                req.preflush = preflush;
                let flush_ticket =
                    if preflush { Some(self.oracle_op(|o| o.flush_submitted(dev as DevId))?) } else { None };
                let ticket = self.oracle_op(|o| o.write_submitted(dev as DevId, sector, nr, write, fua))?;
                self.submit(dev, req, Pending::Write(ticket, flush_ticket))?;
            }
            ThinOp::Read { dev, sector, nr_sectors } => {
                let Some(dev) = self.device(dev) else { return Ok(()) };
                let sector = u64::from(sector) % size;
                let nr = u64::from(nr_sectors.max(1)).min(size - sector);
                let ticket = self.oracle_op(|o| o.read_submitted(dev as DevId, sector, nr))?;
                self.submit(dev, BioRequest::read(sector, nr), Pending::Read(ticket))?;
            }
            ThinOp::Discard { dev, sector, nr_sectors } => {
                if self.cfg.features.ignore_discard {
                    return Ok(());
                }
                let Some(dev) = self.device(dev) else { return Ok(()) };
                let sector = u64::from(sector) % size;
                let nr = u64::from(nr_sectors.max(1)).min(size - sector);
                let ticket = self.oracle_op(|o| o.discard_submitted(dev as DevId, sector, nr))?;
                self.submit(dev, BioRequest::discard(sector, nr), Pending::Discard(ticket))?;
            }
            ThinOp::Flush { dev } => {
                let Some(dev) = self.device(dev) else { return Ok(()) };
                let ticket = self.oracle_op(|o| o.flush_submitted(dev as DevId))?;
                self.submit(dev, BioRequest::flush(), Pending::Flush(ticket))?;
            }
            ThinOp::CreateThin => {
                if self.devices.len() >= self.cfg.max_devices || !self.metadata_writable() {
                    return Ok(());
                }
                let id = self.next_id;
                if !self.try_message(&format!("create_thin {id}"))? {
                    return Ok(());
                }
                self.next_id += 1;
                self.oracle_op(|o| o.create_thin(id as DevId, size))?;
                self.activate_new(id)?;
            }
            ThinOp::CreateSnap { origin } => {
                if self.devices.len() >= self.cfg.max_devices || !self.metadata_writable() {
                    return Ok(());
                }
                let Some(origin) = self.device(origin) else { return Ok(()) };
                // Like a user who suspends the origin first: nothing of it
                // in flight while the snapshot is taken.
                self.quiesce()?;
                let id = self.next_id;
                if !self.try_message(&format!("create_snap {id} {origin}"))? {
                    return Ok(());
                }
                self.next_id += 1;
                self.oracle_op(|o| o.create_snap(id as DevId, origin as DevId))?;
                self.activate_new(id)?;
            }
            ThinOp::Delete { dev } => {
                if !self.metadata_writable() {
                    return Ok(());
                }
                let Some(dev) = self.device(dev) else { return Ok(()) };
                self.quiesce()?;
                match self.pool().deactivate_thin(dev) {
                    Ok(()) => {}
                    // Requests still wait for data space: a device with
                    // queued I/O cannot be removed.
                    Err(e) if e.errno == Errno::EBUSY => return Ok(()),
                    Err(e) => return Err(self.fail(format!("deactivate {dev}: {e}"))),
                }
                if !self.try_message(&format!("delete {dev}"))? {
                    // Refused (the pool lost its metadata meanwhile): the
                    // device stays, active again.
                    let size = self.thin_sectors();
                    if self.pool().activate_thin(dev, size).is_err() {
                        // In fail mode nothing opens: the device is gone
                        // for the workload.
                        self.devices.retain(|&d| d != dev);
                        self.oracle_op(|o| o.delete(dev as DevId))?;
                    }
                    return Ok(());
                }
                self.devices.retain(|&d| d != dev);
                self.oracle_op(|o| o.delete(dev as DevId))?;
            }
            ThinOp::Worker => {
                self.worker_pass();
                self.collect()?;
            }
            ThinOp::Complete { pick } => {
                let io = self.pool().in_flight_io();
                if !io.is_empty() {
                    self.complete_data_io(io[pick as usize % io.len()], false)?;
                    self.stats.data_ios += 1;
                    self.collect()?;
                }
            }
            ThinOp::FailIo { pick } => {
                let io = self.pool().in_flight_io();
                if !io.is_empty() {
                    self.faults_fired += 1;
                    self.coverage.record_failed_io();
                    self.complete_data_io(io[pick as usize % io.len()], true)?;
                    self.stats.data_ios += 1;
                    self.collect()?;
                }
            }
            ThinOp::Fault { disk, fault } => match disk {
                DiskId::Metadata => self
                    .pool()
                    .with_metadata(|md| md.transaction_manager().block_manager().device_mut().arm(fault)),
                DiskId::Data => self.pool().with_data_device(|d| d.arm(fault)),
                DiskId::Cache | DiskId::Origin => return Err(self.not_thin(op)),
            },
            ThinOp::AimFault { aim: FaultAim::Passdown } => self.aimed_passdown = true,
            ThinOp::AimFault { aim } => {
                let transient_write = DiskFault::WriteError { permanent: false };
                self.pool().with_metadata(|md| {
                    let disk = md.transaction_manager().block_manager().device_mut();
                    match aim {
                        FaultAim::Commit { request } => {
                            disk.arm_after_writes(request.into(), transient_write)
                        }
                        FaultAim::Abort => {
                            disk.arm_after_writes(0, transient_write);
                            disk.arm_after_write_error(DiskFault::ReadError { permanent: false });
                        }
                        FaultAim::Passdown => {}
                    }
                })
            }
            ThinOp::Tick { millis } => {
                self.now += u64::from(millis) * 1_000_000;
                self.stats.sim_time_ns = self.now;
                self.pool().set_time(self.now);
                self.collect()?;
            }
            ThinOp::Crash { mode, seed } => self.crash(mode, seed)?,
            ThinOp::GrowMetadata { blocks, reload } => self.grow_metadata(blocks, reload)?,
            ThinOp::Reload { .. } | ThinOp::Resize { .. } | ThinOp::Invalidate { .. } | ThinOp::Status => {
                return Err(self.not_thin(op))
            }
        }
        Ok(())
    }

    /// Grows the metadata device by `blocks` 4 KiB blocks (to at most
    /// [`MAX_DISK_SECTORS`]) the way an administrator does: the data I/O in
    /// flight completes, the pool is suspended, the device grows, and the
    /// pool resumes, its table loaded again if `reload`
    /// ([`Pool::reload_and_resume`], [`Pool::resume_same_table`]: the
    /// kernel grows the metadata space map at preresume). The metadata
    /// disk's request log so far is judged first, as at a crash (its crash
    /// states are of the smaller device), and starts again on the grown
    /// one.
    ///
    /// When the resume fails (a metadata error while growing: the pool
    /// aborts, sets needs_check and goes read-only), DM core leaves the
    /// pool suspended; the administrator resumes again, which must succeed
    /// (needs_check now stops the growth). With no metadata fault
    /// injected, a failed resume is a violation.
    fn grow_metadata(&mut self, blocks: u32, reload: bool) -> Result<(), ThinFailure> {
        self.quiesce()?;
        self.stats.metadata_growths += 1;
        if let Err(e) = self.pool().suspend() {
            return Err(self.fail(format!("suspend for a metadata growth: {e}")));
        }
        self.observe();
        let log =
            self.pool().with_metadata(|md| md.transaction_manager().block_manager().device_mut().take_log());
        // The step seeds the choice of crash points (a growth has no seed
        // of its own).
        self.check_metadata_crash_states(&log, self.step as u32)?;
        let sectors = {
            let now = self
                .pool()
                .with_metadata(|md| md.transaction_manager().block_manager().device().nr_sectors());
            now.saturating_add(u64::from(blocks) * BLOCK_SECTORS).min(MAX_DISK_SECTORS).max(now)
        };
        self.pool()
            .with_metadata(|md| md.transaction_manager().block_manager().device_mut().grow(sectors, 0));
        self.start_metadata_log();
        let len = self.cfg.data_blocks * self.cfg.block_sectors;
        let resume = |pool: &SimPool| {
            if reload {
                pool.reload_and_resume(len)
            } else {
                pool.resume_same_table(len)
            }
        };
        let r = resume(self.pool());
        self.epoch += 1;
        self.observe();
        if let Err(e) = r {
            if self.metadata_faults_fired == 0 {
                return Err(self.fail(format!("resume on a metadata device of {sectors} sectors: {e}")));
            }
            let again = resume(self.pool());
            self.observe();
            again.map_err(|e2| {
                self.fail(format!("resume on a grown metadata device failed ({e}), and again: {e2}"))
            })?;
        }
        self.collect()
    }

    /// The model's own invariants, checked after every op and at the end:
    /// a broken one (a precondition the kernel `BUG_ON`s on, a metadata
    /// walk past its bound, a reference count below zero) is a violation,
    /// whatever the pool then did about it (an EIO, read-only mode) and
    /// whatever the oracle would accept.
    fn check_invariants(&self) -> Result<(), ThinFailure> {
        match self.pool.as_ref().and_then(|p| p.invariant_broken()) {
            Some(b) => Err(self.fail_as("model", format!("model invariant broken: {b}"))),
            None => Ok(()),
        }
    }

    /// Fail mode only follows an injected metadata fault: the pool goes
    /// there when an abort cannot reread the last commit, or when setting
    /// needs_check after a failed metadata operation fails — an I/O error,
    /// or the block manager refusing the write because the pool was
    /// already read-only for metadata (in kernel 6.1 an abort keeps that
    /// flag, so a metadata operation that fails in out-of-metadata-space
    /// or read-only mode ends in fail mode). With no fault injected, a
    /// metadata operation attempted in those modes is the cause — except
    /// the one stock 6.1 attempts itself: a mapping inserted directly
    /// after its block's allocation ran the pool out of metadata space
    /// (`fail_without_fault`, [`Self::note_mode_changes`]).
    fn check_fail_mode(&self) -> Result<(), ThinFailure> {
        match self.pool.as_ref() {
            Some(p)
                if p.mode() == PoolMode::Fail
                    && self.metadata_faults_fired == 0
                    && !self.fail_without_fault =>
            {
                Err(self.fail("fail mode with no metadata fault injected"))
            }
            _ => Ok(()),
        }
    }

    /// An abort that cannot reread the superblock ends in fail mode: when,
    /// in the events since `since` (one op's), a metadata write error
    /// (the failed commit) is followed by a read error of the superblock
    /// (the abort's first read: `dm_pool_abort_metadata` reopens the
    /// metadata from it), `abort_transaction` sets fail mode, which the
    /// pool never leaves. A crash in between starts a new pool.
    fn check_failed_abort(&self, since: usize) -> Result<(), ThinFailure> {
        let mut commit_failed = false;
        let mut abort_failed = false;
        for e in &self.events[since..] {
            match e {
                Event::FaultFired { disk: DiskId::Metadata, what } if what.starts_with("write-error") => {
                    commit_failed = true;
                }
                Event::FaultFired { disk: DiskId::Metadata, what }
                    if commit_failed && what.starts_with("read-error sector 0 ") =>
                {
                    abort_failed = true;
                }
                Event::Crashed { .. } => (commit_failed, abort_failed) = (false, false),
                _ => {}
            }
        }
        match self.pool.as_ref() {
            Some(p) if abort_failed && p.mode() != PoolMode::Fail => Err(self.fail(format!(
                "{} mode after the abort of a failed commit could not reread the superblock, not fail mode",
                p.mode()
            ))),
            _ => Ok(()),
        }
    }

    /// The failure of an op a thin pool cannot take (a cache trace's op or
    /// disk): kind `trace`, never a panic and never skipped.
    fn not_thin(&self, op: &ThinOp) -> ThinFailure {
        let what = op.thin_error().unwrap_or_else(|| format!("op `{}` is not a thin-pool op", op.name()));
        self.fail_as("trace", what)
    }

    fn metadata_writable(&self) -> bool {
        self.pool().mode() < PoolMode::OutOfMetadataSpace
    }

    fn oracle_op<T, E: fmt::Display>(
        &mut self,
        f: impl FnOnce(&mut Oracle) -> Result<T, E>,
    ) -> Result<T, ThinFailure> {
        f(&mut self.oracle).map_err(|e| ThinFailure {
            step: self.step,
            kind: "misuse",
            what: format!("oracle misuse: {e}"),
        })
    }

    /// Sends a pool message. `Ok(false)`: refused or failed as the kernel
    /// may: after an injected metadata fault (the metadata operation hit
    /// it, or the pool refuses messages in read-only and fail modes); in
    /// out-of-metadata-space, read-only and fail modes, where the kernel
    /// refuses every message with EOPNOTSUPP (`pool_message`); or with
    /// ENOSPC when the metadata space map has no free block left (a block
    /// freed in the open transaction is not free until it commits). Any
    /// other refusal, and a message accepted in those modes, is a
    /// violation.
    fn try_message(&mut self, text: &str) -> Result<bool, ThinFailure> {
        self.stats.messages += 1;
        let mode = self.pool().mode();
        let r = self.pool().message(text);
        self.observe();
        let read_only = mode >= PoolMode::OutOfMetadataSpace;
        match r {
            Ok(()) if read_only && self.metadata_faults_fired == 0 => {
                Err(self.fail(format!("message {text:?} accepted in {mode} mode")))
            }
            Ok(()) => Ok(true),
            // A metadata error makes the message fail (a checksum error, an
            // I/O error) or the pool refuse messages (read-only, fail mode).
            Err(_) if self.metadata_faults_fired > 0 => Ok(false),
            Err(e) if read_only && e.errno == Errno::EOPNOTSUPP => Ok(false),
            Err(e) if e.errno == Errno::ENOSPC && !read_only => {
                let free = self.pool().with_metadata(|md| md.transaction_manager().metadata_sm_nr_free());
                if free == 0 {
                    Ok(false)
                } else {
                    Err(self.fail(format!(
                        "message {text:?} failed with ENOSPC with {free} metadata blocks free"
                    )))
                }
            }
            Err(e) => Err(self.fail(format!("message {text:?} failed in {mode} mode: {e}"))),
        }
    }

    /// Activates a device just created. The kernel reports a create message
    /// as done even when the commit after it fails (`pool_message` ignores
    /// the commit's result), and the abort then drops the device; in fail
    /// mode nothing opens. After an injected metadata fault, a device that
    /// cannot be opened never existed. When the commit after the message
    /// failed (an injected fault, or no metadata space left), the pool
    /// aborted (read-only or fail mode now) and the device is not used: it
    /// never reached a commit and is gone after a restart, though the pool
    /// may still open it (the abort keeps device records in core, as the
    /// kernel's does; which records depends on where the commit failed).
    fn activate_new(&mut self, id: ThinId) -> Result<(), ThinFailure> {
        let size = self.thin_sectors();
        self.observe();
        if self.pool().mode() > PoolMode::OutOfMetadataSpace {
            return self.oracle_op(|o| o.delete(id as DevId));
        }
        match self.pool().activate_thin(id, size) {
            Ok(()) => {
                self.devices.push(id);
                Ok(())
            }
            Err(_) if self.metadata_faults_fired > 0 => {
                self.oracle_op(|o| o.delete(id as DevId))?;
                Ok(())
            }
            Err(e) => Err(self.fail(format!("activate {id}: {e}"))),
        }
    }

    fn submit(&mut self, dev: ThinId, req: BioRequest, pending: Pending) -> Result<(), ThinFailure> {
        self.stats.bios += 1;
        let expect = self.read_only_expectation(dev, &req);
        let span = RequestSpan::new(dev, req.sector, req.nr_sectors, req.preflush, self.cfg.block_sectors);
        self.note_mode_changes();
        self.settle_metadata_faults();
        let before = self.metadata_faults_pending();
        let mapped = self.piece_plan.unwrap_or(usize::MAX);
        let (id, held) = self
            .pool()
            .submit_in_part(dev, req, mapped)
            .map_err(|e| self.fail(format!("submit to {dev}: {e}")))?;
        // A metadata fault in the map path (its lookup) reaches this
        // request alone.
        let after = self.metadata_faults_pending();
        self.metadata_faults_attributed = after;
        // What the pool was in when the request came (its own submission
        // may have changed nothing: the map path allocates nothing).
        let reach = Reach {
            span,
            metadata_fault: after > before || self.metadata_poisoned(),
            degraded: self.pool().mode() >= PoolMode::OutOfMetadataSpace,
            out_of_data_space: self.out_of_data_space,
            ..Reach::default()
        };
        self.reach.insert(id, reach);
        self.pending.insert(id, pending);
        self.expected.insert(id, (self.epoch, expect));
        self.collect()?;
        if held > 0 {
            // The planned commit between the request's pieces: the
            // worker's pass takes the pieces mapped so far and commits,
            // and then the rest are mapped.
            self.piece_plan = None;
            self.piece_commits += 1;
            self.commit_pass();
            self.collect()?;
            self.note_mode_changes();
            self.settle_metadata_faults();
            let before = self.metadata_faults_pending();
            self.pool().map_held_pieces(id);
            let after = self.metadata_faults_pending();
            self.metadata_faults_attributed = after;
            if after > before {
                if let Some(r) = self.reach.get_mut(&id) {
                    r.metadata_fault = true;
                }
            }
            self.collect()?;
        }
        Ok(())
    }

    /// Whether the pool's block manager caches a metadata block that
    /// failed validation (a bit flipped on its way from the disk): dm-bufio
    /// keeps it and every read of it fails until an abort, so a fault that
    /// fired long ago may fail a request now.
    fn metadata_poisoned(&self) -> bool {
        self.pool().with_metadata(|md| md.transaction_manager().block_manager().holds_invalid_blocks())
    }

    /// Whether the metadata disk may fire a fault at its next requests:
    /// one is armed, or a sector is bad.
    fn metadata_fault_may_fire(&self) -> bool {
        self.pool().with_metadata(|md| {
            let disk = md.transaction_manager().block_manager().device();
            disk.armed() > 0 || disk.bad_sectors().next().is_some()
        })
    }

    /// Metadata faults the metadata disk has fired and not yet reported.
    fn metadata_faults_pending(&self) -> usize {
        self.pool().with_metadata(|md| md.transaction_manager().block_manager().device().fired().len())
    }

    /// Metadata faults that fired where the simulator did not attribute
    /// them more narrowly (a message, a status commit, a growth, a data
    /// I/O completion that maps a PREFLUSH's data): each may have reached
    /// every request in flight (a lookup, a commit it waits for, an abort
    /// and the mode change that fails it).
    fn settle_metadata_faults(&mut self) {
        let n = self.metadata_faults_pending();
        if n > self.metadata_faults_attributed {
            for r in self.reach.values_mut() {
                r.metadata_fault = true;
            }
            self.metadata_faults_attributed = n;
        }
    }

    /// One worker pass. A metadata fault that fires in it reaches the
    /// requests the pool still holds a piece of (a lookup, an allocation,
    /// an insert, the commit a FLUSH or FUA waits for); one whose pieces
    /// are all in flight to blocks already mapped ends with what the data
    /// device returns, unless the fault changes the pool's mode (see
    /// [`Self::note_mode_changes`]).
    ///
    /// Held at the pass's start or at its end: a piece the fault fails
    /// (a lookup's read error ends it with EIO at once) is no longer held
    /// when the pass is over.
    fn worker_pass(&mut self) {
        self.settle_metadata_faults();
        let before = self.metadata_faults_pending();
        // Asked only when a fault can fire in the pass (the worker runs
        // often; the question walks the data I/O in flight per request).
        let held_before: BTreeSet<BioId> = if self.metadata_fault_may_fire() {
            let pool = self.pool.as_ref().expect("pool present between steps");
            self.reach.keys().copied().filter(|id| pool.request_awaits_pool(*id)).collect()
        } else {
            BTreeSet::new()
        };
        self.passes += 1;
        if self.pass_plan == Some(self.passes) {
            self.pass_plan = None;
            self.pool().request_commit();
        }
        self.pool().run_worker();
        let after = self.metadata_faults_pending();
        if after > before {
            let pool = self.pool.as_ref().expect("pool present between steps");
            for (id, r) in self.reach.iter_mut() {
                if held_before.contains(id) || pool.request_awaits_pool(*id) {
                    r.metadata_fault = true;
                }
            }
        }
        self.metadata_faults_attributed = after;
    }

    /// Completes (or, `fail`, fails as an injected fault) the data I/O
    /// `io`. When it failed — `fail`, or an armed fault of the data disk
    /// fired on it — the request it is a piece of may fail with EIO, and
    /// the block it zeroes, copies to or writes may be left allocated.
    ///
    /// A passdown discard (pass one of a user's discard: it serves no
    /// request directly) fails instead of completing when a
    /// [`FaultAim::Passdown`] waits for it. Its failure excuses nothing and
    /// leaks nothing: kernel 6.1 ignores it (`passdown_endio` queues pass
    /// two all the same), so the user's discard succeeds and pass two
    /// drops the blocks' hold as after a discard that reached the device.
    fn complete_data_io(&mut self, io: IoInfo, fail: bool) -> Result<(), ThinFailure> {
        let request = self.pool().io_request(io.id);
        let passdown = io.kind == DataIoKind::Discard && request.is_none();
        let fail = if passdown && !fail && self.aimed_passdown {
            self.aimed_passdown = false;
            self.faults_fired += 1;
            self.events.push(Event::FaultFired {
                disk: DiskId::Data,
                what: format!("aimed passdown discard error sector {} nr {}: EIO", io.sector, io.nr_sectors),
            });
            true
        } else {
            fail
        };
        let fired = |sim: &Self| sim.pool().with_data_device(|d| d.fired().len());
        let before = fired(self);
        let r = if fail { self.pool().fail_io(io.id, Errno::EIO) } else { self.pool().complete_io(io.id) };
        r.map_err(|e| self.fail(e.to_string()))?;
        if fail || fired(self) > before {
            self.data_faults_since_load += 1;
            // A passdown discard serves no request (`request` is `None`):
            // its failure reaches none.
            if let Some(r) = request.and_then(|r| self.reach.get_mut(&r)) {
                r.data_fault = true;
            }
            if matches!(io.kind, DataIoKind::Zero | DataIoKind::Copy | DataIoKind::Write) {
                self.leak_candidates.insert(io.sector / self.cfg.block_sectors);
            }
        }
        Ok(())
    }

    /// Marks the requests in flight that a failed mapping reaches: those
    /// of its device that touch its blocks (they wait in its cell, or
    /// join it before the worker errors it). Its data block stays
    /// allocated.
    fn note_failed_mappings(&mut self) {
        if self.data_faults_since_load == 0 {
            return;
        }
        for m in self.pool().failed_mappings() {
            self.leak_candidates.insert(m.data_block);
            for r in self.reach.values_mut() {
                if r.span.reached_by(&m) {
                    r.data_fault = true;
                }
            }
        }
    }

    /// Takes the pool's mode changes: the requests in flight lived through
    /// each mode (read-only modes make EIO legal, out-of-data-space mode
    /// ENOSPC). The kernel goes out of data space only from its allocator
    /// (`alloc_data_block`), when no data block is free in both the open
    /// transaction and the last commit (`sm_disk_new_block`; the free count
    /// it reads first is the open transaction's), or when the allocation
    /// needed a metadata block and found none; and read-only only after a
    /// failed metadata operation that a metadata fault, or a metadata
    /// space map with no block free, explains. Any other entry is noted
    /// as a violation ([`Self::check_modes`]).
    fn note_mode_changes(&mut self) {
        if self.pool.is_none() {
            return;
        }
        // Those fired and not yet taken count too: the change may be
        // theirs.
        let metadata_faults = self.metadata_faults_since_load + self.metadata_faults_pending() as u64;
        let Some(pool) = self.pool.as_ref() else { return };
        for ModeChange { from, to, out_of_data_space, metadata_failure } in pool.take_mode_changes() {
            if to >= PoolMode::OutOfMetadataSpace {
                for r in self.reach.values_mut() {
                    r.degraded = true;
                }
            }
            match to {
                PoolMode::Write => self.out_of_data_space = false,
                // Read-only mode follows a failed metadata operation
                // (`metadata_operation_failed`): with no metadata fault
                // injected since the pool was loaded, only one that found
                // no metadata block free (metadata pressure), or the
                // table's `read_only` feature. (Fail mode with no metadata
                // fault is `check_fail_mode`'s.)
                PoolMode::ReadOnly if metadata_faults == 0 => {
                    let why = match metadata_failure {
                        Some(f) if f.metadata_exhausted => None,
                        Some(f) => Some(format!(
                            "read-only mode with no metadata fault injected and metadata space left: {} \
                             failed: {}",
                            f.op, f.error
                        )),
                        None if self.cfg.features.read_only => None,
                        None => {
                            Some(format!("{from} mode to read-only mode with no metadata operation failed"))
                        }
                    };
                    if self.mode_violation.is_none() {
                        self.mode_violation = why;
                    }
                }
                // `alloc_data_block` commits when no metadata block is
                // left; that commit puts the pool out of metadata space
                // (the block manager read-only) and still hands out the
                // block. Without zeroing, `schedule_zero` then inserts the
                // mapping directly, not through the mode's fail variant:
                // the insert is refused, the abort cannot set needs_check
                // on the read-only superblock, and the pool fails (seen on
                // stock 6.1: seed 62 of the kernel campaign).
                PoolMode::Fail
                    if from == PoolMode::OutOfMetadataSpace
                        && self.cfg.features.skip_block_zeroing
                        && !self.cfg.options.fixes.unzeroed_mapping_checks_the_mode
                        && metadata_failure
                            .as_ref()
                            .is_some_and(|f| f.op == "dm_thin_insert_block" && f.refused_read_only) =>
                {
                    self.fail_without_fault = true;
                }
                PoolMode::OutOfDataSpace => {
                    self.out_of_data_space = true;
                    for r in self.reach.values_mut() {
                        r.out_of_data_space = true;
                    }
                    let why = match out_of_data_space {
                        None => Some(format!("{from} mode to out-of-data-space mode outside the allocator")),
                        Some(n) if n.metadata_exhausted => None,
                        Some(n) => match n.free_in_both {
                            Ok(0) => None,
                            Ok(free) => Some(format!(
                                "out-of-data-space mode with {free} data block(s) free in both the open \
                                 transaction and the last commit"
                            )),
                            Err(_) if metadata_faults > 0 => None,
                            Err(e) => Some(format!(
                                "out-of-data-space mode, the free data blocks unreadable with no metadata \
                                 fault injected: {e}"
                            )),
                        },
                    };
                    if self.mode_violation.is_none() {
                        self.mode_violation = why;
                    }
                }
                _ => {}
            }
        }
    }

    /// Out-of-data-space and read-only modes only for the kernel's reasons
    /// (see [`Self::note_mode_changes`]).
    fn check_modes(&self) -> Result<(), ThinFailure> {
        match &self.mode_violation {
            Some(what) => Err(self.fail(what.clone())),
            None => Ok(()),
        }
    }

    /// What a request to device `dev` must return under the kernel's rules
    /// for a pool that is read-only for metadata, when they decide it
    /// (see [`ReadOnlyRules`]); `None` when they do not apply.
    fn read_only_expectation(&mut self, dev: ThinId, req: &BioRequest) -> Option<Result<(), Errno>> {
        let mode = self.pool().mode();
        let applies = self.faults_fired == 0
            && mode == self.mode
            && matches!(mode, PoolMode::OutOfMetadataSpace | PoolMode::ReadOnly)
            && self.expected.values().all(|&(epoch, _)| epoch == self.epoch);
        if !applies {
            return None;
        }
        if self.frozen.as_ref().is_none_or(|(epoch, _)| *epoch != self.epoch) {
            let mut image = MemDevice::from_bytes(self.metadata_image());
            self.frozen = Some((self.epoch, read_devices(&mut image).ok()?));
        }
        let devices = &self.frozen.as_ref()?.1;
        let rules = ReadOnlyRules { by_snapshot_time: !self.cfg.options.locking.shares_by_refcount() };
        rules.expect(mode, req, devices.get(&dev), self.cfg.block_sectors)
    }

    /// Hands finished requests to the oracle.
    fn collect(&mut self) -> Result<(), ThinFailure> {
        self.note_failed_mappings();
        for c in self.pool().take_completions() {
            self.completed(c)?;
        }
        Ok(())
    }

    fn completed(&mut self, c: Completion) -> Result<(), ThinFailure> {
        self.observe();
        let Some(pending) = self.pending.remove(&c.id) else {
            return Err(self.fail(format!("request {:?} completed twice or was never submitted", c.id)));
        };
        let ok = c.result.is_ok();
        // A read's data, decoded once for its summary and the oracle.
        let decoded = if ok && pending.is_read() { stamp::decode(&c.data) } else { Vec::new() };
        self.events.push(pending.done_event(c.id.0, c.thin as u32, c.result, &decoded));
        if let Some((epoch, Some(want))) = self.expected.remove(&c.id) {
            let mode = self.pool().mode();
            let judged = epoch == self.epoch && mode == self.mode && self.faults_fired == 0;
            self.stats.read_only_judged += u64::from(judged);
            if judged && c.result != want {
                let show = |r: Result<(), Errno>| r.map_or_else(|e| e.to_string(), |()| "ok".to_string());
                return Err(self.fail_as(
                    "oracle",
                    format!(
                        "{mode} mode: a {} returned {}, the kernel returns {}: request {} on device {}",
                        pending.kind(),
                        show(c.result),
                        show(want),
                        c.id.0,
                        c.thin
                    ),
                ));
            }
        }
        let reach = self.reach.remove(&c.id).unwrap_or_default();
        let mode = self.pool().mode();
        match c.result {
            Ok(()) => {}
            // ENOSPC comes only from a pool out of data space
            // (`get_pool_io_error_code`, `should_error_unserviceable_bio`,
            // the no-space timeout).
            Err(Errno::ENOSPC) if reach.out_of_data_space || self.out_of_data_space => self.stats.enospc += 1,
            Err(Errno::ENOSPC) => {
                return Err(self.fail_as(
                    "oracle",
                    format!(
                        "a {} failed with ENOSPC in {mode} mode: the pool was never out of data space while \
                         it was in flight: request {} on device {}",
                        pending.kind(),
                        c.id.0,
                        c.thin
                    ),
                ))
            }
            Err(Errno::EIO) if reach.data_fault || reach.metadata_fault || self.metadata_poisoned() => {
                self.stats.io_errors += 1
            }
            Err(e) if reach.degraded || mode >= PoolMode::OutOfMetadataSpace => {
                self.stats.io_errors += u64::from(e == Errno::EIO && self.faults_fired > 0);
            }
            Err(e) => {
                let faults =
                    if self.faults_fired > 0 { "no fault could reach it" } else { "no fault injected" };
                return Err(self.fail_as(
                    "oracle",
                    format!(
                        "a {} failed with {e} in {mode} mode: {faults}: request {} on device {}",
                        pending.kind(),
                        c.id.0,
                        c.thin
                    ),
                ));
            }
        }
        self.stats.reads_checked += u64::from(ok && pending.is_read());
        pending
            .settle(&mut self.oracle, ok, ok, (c.data.len(), &decoded))
            .map_err(|(kind, what)| self.fail_as(kind, what))
    }

    /// Plans a commit ([`Pool::request_commit`]) for when the next
    /// [`Self::quiesce`] has completed `after` data I/Os and the worker has
    /// settled (at once when it completes fewer), and starts counting data
    /// completions ([`Self::data_completions`]) from here. `None` plans
    /// none and only restarts the count. A kernel replay places the
    /// kernel's timed commits so.
    pub fn plan_commit(&mut self, after: Option<usize>) {
        self.commit_plan = after;
        self.piece_plan = None;
        self.piece_commits = 0;
        self.pass_plan = None;
        self.passes = 0;
        self.data_completions = 0;
    }

    /// Plans a commit in the `k`-th worker pass (from 1) after
    /// [`Self::plan_commit`]: the pass commits a changed transaction at its
    /// end, as the kernel's worker does when its commit timer is due
    /// ([`Pool::request_commit`]), whatever the pass did before — for a
    /// passdown discard, after its first pass and before its second. A
    /// kernel replay places so a timed commit that came while the worker
    /// was busy with an op.
    pub fn plan_commit_in_pass(&mut self, k: usize) {
        self.pass_plan = Some(k);
    }

    /// Worker passes since [`Self::plan_commit`].
    pub fn passes(&self) -> usize {
        self.passes
    }

    /// Plans a commit between two pieces of the next request DM core
    /// splits into more than `k`: the target maps its first `k` pieces,
    /// the worker's pass takes them and commits a changed transaction
    /// ([`Pool::request_commit`]), and then the other pieces are mapped
    /// ([`Pool::submit_in_part`]). A request of `k` pieces or fewer is
    /// submitted whole and leaves the plan for the next one;
    /// [`Self::plan_commit`] drops it. A kernel replay places the kernel's
    /// timed commit so when its worker committed while the submitter was
    /// still mapping a request's pieces.
    pub fn plan_commit_after_pieces(&mut self, k: usize) {
        self.piece_plan = Some(k);
    }

    /// Commits made between two pieces of a request since
    /// [`Self::plan_commit`] ([`Self::plan_commit_after_pieces`]).
    pub fn piece_commits(&self) -> usize {
        self.piece_commits
    }

    /// Makes the pool commit now if its transaction changed
    /// ([`Pool::request_commit`]; the worker's pass, then
    /// [`Self::quiesce`]), its faults and mode changes recorded as events.
    pub fn commit_now(&mut self) -> Result<(), ThinFailure> {
        self.commit_pass();
        self.quiesce()
    }

    /// A worker pass that commits a changed transaction, its faults and
    /// mode changes recorded.
    fn commit_pass(&mut self) {
        self.pool().request_commit();
        self.worker_pass();
        self.observe();
    }

    /// Makes [`Self::quiesce`] complete data writes in the order of
    /// `sectors` (each the first data-device sector a write, zeroing or
    /// copy writes) rather than oldest first: when the oldest data I/O in
    /// flight is a write, the first write in flight the list names
    /// completes instead, and each sector is used once. Everything else
    /// completes oldest first. A kernel replay follows the order in which
    /// the kernel's data disk served its writes so.
    pub fn follow_data_writes(&mut self, sectors: Vec<u64>) {
        self.write_order = sectors;
    }

    /// The in-flight data I/O [`Self::quiesce`] completes next: the
    /// oldest, or when that is a write, the first write the followed
    /// order names (only writes change places, among themselves).
    fn next_data_io(&self) -> Option<IoInfo> {
        let in_flight = self.pool().in_flight_io();
        let oldest = *in_flight.first()?;
        if !writes_data(&oldest) {
            return Some(oldest);
        }
        let followed = self
            .write_order
            .iter()
            .find_map(|&s| in_flight.iter().find(|io| writes_data(io) && io.sector == s));
        Some(followed.copied().unwrap_or(oldest))
    }

    /// Data I/Os completed since the last [`Self::plan_commit`].
    pub fn data_completions(&self) -> usize {
        self.data_completions
    }

    /// Runs the worker and completes data I/O, oldest first, until nothing
    /// moves. Requests waiting for data space stay queued.
    pub fn quiesce(&mut self) -> Result<(), ThinFailure> {
        for _ in 0..1_000_000 {
            self.collect()?;
            if self.pool().worker_wanted() {
                self.worker_pass();
                continue;
            }
            let io = self.next_data_io();
            // A planned commit comes once the worker has settled, before
            // the next data I/O completes (or when none is left).
            if self.commit_plan.is_some_and(|k| io.is_none() || k <= self.data_completions) {
                self.commit_plan = None;
                self.commit_pass();
                continue;
            }
            match io {
                Some(io) => {
                    if writes_data(&io) {
                        if let Some(k) = self.write_order.iter().position(|&s| s == io.sector) {
                            self.write_order.remove(k);
                        }
                    }
                    self.complete_data_io(io, false)?;
                    self.stats.data_ios += 1;
                    self.data_completions += 1;
                }
                None => return self.collect(),
            }
        }
        Err(self.fail("the pool never settled"))
    }

    fn crash(&mut self, mode: CrashMode, seed: u32) -> Result<(), ThinFailure> {
        self.stats.crashes += 1;
        let pool = self.pool.take().expect("pool present");
        self.crashed_pool_probes.add(&pool.probes());
        let (mut metadata, data) = pool.crash();
        let log = metadata.take_log();
        self.check_metadata_crash_states(&log, seed)?;
        let (metadata_image, m) = metadata.crash_image_state(mode, seed);
        // The two disks have independent caches: independent choices.
        let (data_image, d) = data.crash_image_state(mode, seed ^ 0x9e37_79b9);
        self.coverage.record_crash(mode, &m);
        self.coverage.record_crash(mode, &d);
        self.stats.crash_states += 1;
        self.events.push(Event::Crashed {
            metadata: (m.kept, m.unflushed),
            data: (d.kept, d.unflushed),
            torn: m.torn || d.torn,
        });
        self.pending.clear();
        self.expected.clear();
        self.reach.clear();
        self.metadata_faults_attributed = 0;
        self.metadata_faults_since_load = 0;
        self.fail_without_fault = false;
        self.out_of_data_space = false;
        self.data_faults_since_load = 0;
        self.epoch += 1;
        self.oracle.crash();
        let metadata_image = self.recover_metadata(metadata_image)?;
        let len = self.cfg.data_blocks * self.cfg.block_sectors;
        let pool = Pool::create(
            table(&self.cfg),
            len,
            SimDisk::from_image(metadata_image),
            SimDisk::from_image(data_image),
            self.cfg.options,
        )
        .map_err(|e| self.fail_as("load", format!("the pool does not load after a crash: {e}")))?;
        pool.start_clock(self.now);
        self.pool = Some(pool);
        self.start_metadata_log();
        let size = self.thin_sectors();
        for &dev in &self.devices {
            self.pool.as_ref().expect("just set").activate_thin(dev, size).map_err(|e| ThinFailure {
                step: self.step,
                kind: "load",
                what: format!("device {dev} lost in a crash: {e}"),
            })?;
        }
        Ok(())
    }

    /// From now on the metadata crash points sampled inside commits (and
    /// at growths) are still checked, but a problem there no longer stops
    /// the run: the first one is kept ([`ThinSim::metadata_crash_point_finding`]).
    /// The kernel comparison runs so: it holds the states at the trace's
    /// crash ops against the kernel's, and the model run as the stock
    /// kernel (without the candidate fixes) meets the known findings at
    /// those inner points.
    pub fn report_metadata_crash_points(&mut self) {
        self.crash_points_reported = true;
    }

    /// The first problem at a metadata crash point, when
    /// [`ThinSim::report_metadata_crash_points`] is on.
    pub fn metadata_crash_point_finding(&self) -> Option<&str> {
        self.crash_point_finding.as_deref()
    }

    /// The metadata crash states the run passed through since the last
    /// crash (or the start): power cuts at seeded points of the metadata
    /// disk's request log — inside commits too, which the pool's own crash
    /// (between ops) never lands in — each keeping a random subset of the
    /// unflushed writes, one perhaps torn. Every one must be readable and
    /// free of damage (data blocks leaked are allowed, as after any crash:
    /// see [`ThinSim::check_metadata`]); with
    /// [`ThinSim::report_metadata_crash_points`] the first problem is kept
    /// instead.
    fn check_metadata_crash_states(&mut self, log: &[DiskEvent], seed: u32) -> Result<(), ThinFailure> {
        match self.check_metadata_crash_states_judged(log, seed) {
            Err(f) if self.crash_points_reported => {
                self.crash_point_finding.get_or_insert(f.to_string());
                Ok(())
            }
            r => r,
        }
    }

    fn check_metadata_crash_states_judged(
        &mut self,
        log: &[DiskEvent],
        seed: u32,
    ) -> Result<(), ThinFailure> {
        if log.is_empty() {
            return Ok(());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(u64::from(seed) ^ 0x6d65_7461);
        let mut memo = JudgedStates::new(16);
        // Half just before a flush (the end of a commit, where the most
        // writes are unflushed), half anywhere.
        let flushes: Vec<usize> =
            log.iter().enumerate().filter(|(_, e)| **e == DiskEvent::Flush).map(|(i, _)| i).collect();
        for k in 0..METADATA_CRASH_STATES {
            let after = if k % 2 == 0 && !flushes.is_empty() {
                flushes[rng.gen_range(0..flushes.len())]
            } else {
                rng.gen_range(0..=log.len())
            };
            let point = CrashPoint::random(log, after, TearMode::Sectors, &mut rng);
            let n = point.kept.len();
            // Bounded-exhaustive for a small epoch at the first point: every
            // subset of its unflushed writes.
            let points: Vec<CrashPoint> = if k == 0 && n <= EXHAUSTIVE_EPOCH {
                (0..1u32 << n)
                    .map(|mask| CrashPoint {
                        after_events: after,
                        kept: (0..n).map(|i| mask & (1 << i) != 0).collect(),
                        torn: None,
                    })
                    .collect()
            } else {
                vec![point]
            };
            for point in points {
                self.check_metadata_crash_state(log, &point, &mut memo)?;
            }
        }
        Ok(())
    }

    /// Checks the metadata a power cut at `point` leaves, or answers from
    /// `memo` (the states of one log; [`JudgedStates`]).
    fn check_metadata_crash_state(
        &mut self,
        log: &[DiskEvent],
        point: &CrashPoint,
        memo: &mut JudgedStates<Result<Vec<Problem>, String>>,
    ) -> Result<(), ThinFailure> {
        let after = point.after_events;
        self.stats.crash_states += 1;
        let base = &self.metadata_base;
        let (checked, _) = memo.judge(base, CrashOverlay::of_crash(base, log, point), |mut dev| {
            check_thin_metadata(&mut dev, &CheckOptions::default())
                .map(|report| report.problems)
                .map_err(|e| e.to_string())
        });
        let problems = checked.map_err(|e| {
            self.fail_as(
                "checker",
                format!(
                    "a crash after metadata request {after} of {} leaves unreadable metadata: {e}",
                    log.len()
                ),
            )
        })?;
        let metadata_leaks = self.metadata_may_leak();
        let damage: Vec<_> =
            problems.iter().filter(|p| !(is_leak(p) || metadata_leaks && is_metadata_leak(p))).collect();
        if !damage.is_empty() {
            return Err(self.fail_as(
                "checker",
                format!(
                    "a crash after metadata request {after} of {} leaves damaged metadata: {damage:?}",
                    log.len()
                ),
            ));
        }
        Ok(())
    }

    /// What an administrator does after a metadata error left the
    /// needs-check flag set: check the metadata (here with the independent
    /// checker), and if it is sound clear the flag (`thin_check
    /// --clear-needs-check-flag`), so the pool comes back writable. Damage
    /// is a violation: an I/O error must abort to the last commit, never
    /// leave a broken one.
    fn recover_metadata(&mut self, image: Image) -> Result<Image, ThinFailure> {
        if !needs_check_set(image.block(0)) {
            return Ok(image);
        }
        let mut dev = image.clone();
        match check_thin_metadata(&mut dev, &CheckOptions::default()) {
            Ok(report) => {
                let damage: Vec<_> = report.problems.iter().filter(|p| !is_leak(p)).collect();
                if !damage.is_empty() {
                    return Err(self.fail_as(
                        "checker",
                        format!("needs_check set and the metadata is damaged: {damage:?}"),
                    ));
                }
            }
            Err(e) => {
                return Err(self.fail_as(
                    "checker",
                    format!("needs_check set and the checker cannot read the metadata: {e}"),
                ))
            }
        }
        clear_needs_check(image.to_vec(), self.cfg.block_sectors as u32)
            .map(Image::from)
            .map_err(|e| self.fail_as("load", format!("clearing needs_check failed: {e}")))
    }

    /// When requests still wait in the settled pool — for data space, with
    /// the no-space timeout armed — moves time to the timeout's deadline
    /// (which fails them, as the kernel's `do_no_space_timeout` does) and
    /// settles again; whether time moved. A serialized replay whose
    /// requests block the caller (the kernel shim's agent on an engine on
    /// the trace's clock) meets the timeout within the op that waits.
    pub fn outwait_no_space(&mut self) -> Result<bool, ThinFailure> {
        self.quiesce()?;
        if self.pending.is_empty() {
            return Ok(false);
        }
        let Some(deadline) = self.pool().no_space_deadline() else { return Ok(false) };
        self.now = self.now.max(deadline);
        self.stats.sim_time_ns = self.now;
        self.pool().set_time(self.now);
        self.settle()?;
        Ok(true)
    }

    /// [`Self::quiesce`], then the pool's mode changes and the faults that
    /// fired recorded as events now (a worker pass's commit can end
    /// out-of-data-space mode, and `quiesce` alone records that only at the
    /// next op): what a caller that reads the pool's status right after
    /// needs.
    pub fn settle(&mut self) -> Result<(), ThinFailure> {
        self.quiesce()?;
        self.observe();
        Ok(())
    }

    /// Settles the pool (past the no-space timeout if requests still wait
    /// for space), reads every live device back in full through the
    /// oracle, and checks the committed metadata.
    pub fn finish(&mut self) -> Result<(), ThinFailure> {
        let r = catching(|| self.finish_inner()).unwrap_or_else(|e| Err(self.fail_as("model", e)));
        self.observe();
        let r = self.check_invariants().and(self.check_fail_mode()).and(self.check_modes()).and(r);
        self.stats.sim_time_ns = self.now;
        if let Err(f) = &r {
            self.events.push(Event::Violation { kind: f.kind.to_string(), message: f.what.clone() });
        }
        r
    }

    fn finish_inner(&mut self) -> Result<(), ThinFailure> {
        self.step += 1;
        self.quiesce()?;
        if !self.pending.is_empty() {
            self.now += self.cfg.options.no_space_timeout.max(1) + 1;
            self.pool().set_time(self.now);
            self.quiesce()?;
        }
        if !self.pending.is_empty() {
            return Err(self.fail(format!("{} requests never completed", self.pending.len())));
        }
        let block = self.cfg.block_sectors;
        for dev in self.devices.clone() {
            for b in 0..self.cfg.thin_blocks {
                let ticket = self.oracle_op(|o| o.read_submitted(dev as DevId, b * block, block))?;
                self.submit(dev, BioRequest::read(b * block, block), Pending::Read(ticket))?;
                self.quiesce()?;
            }
        }
        if !self.pending.is_empty() {
            return Err(self.fail("read-back requests never completed"));
        }
        self.check_metadata()
    }

    /// Tears the pool down as removing it does (thin devices deactivated,
    /// the pool suspended, its metadata closed: commits unless read-only,
    /// then what is still dirty written back) and returns the metadata and
    /// data devices' contents (what reads of them return).
    pub fn close(mut self) -> Result<(Vec<u8>, Vec<u8>), String> {
        let pool = self.pool.take().expect("pool present between steps");
        let (md, data) = pool.close().map_err(|(_, e)| format!("closing the pool: {e}"))?;
        Ok((md.visible().to_vec(), data.visible().to_vec()))
    }

    /// The metadata device's contents now (what reads of it return).
    pub fn metadata_image(&self) -> Vec<u8> {
        self.pool().with_metadata(|md| md.transaction_manager().block_manager().device().visible().to_vec())
    }

    /// The shape of this pool.
    pub fn config(&self) -> &ThinSimConfig {
        &self.cfg
    }

    /// Records a violation found outside the driver (e.g. by `thin_check`).
    pub fn record_violation(&mut self, kind: &'static str, what: String) -> ThinFailure {
        let f = self.fail_as(kind, what);
        self.events.push(Event::Violation { kind: kind.to_string(), message: f.what.clone() });
        f
    }

    /// Whether the metadata space map may count blocks nothing references:
    /// after a metadata fault, when reference-count errors are skipped as
    /// 6.1 skips them (`KernelFixes::refcount_errors_fail_the_operation`
    /// off).
    fn metadata_may_leak(&self) -> bool {
        self.metadata_faults_fired > 0 && !self.cfg.options.fixes.refcount_errors_fail_the_operation
    }

    /// Commits (through a status query, as `dmsetup status` would) and runs
    /// the independent checker on the metadata image.
    pub fn check_metadata(&mut self) -> Result<(), ThinFailure> {
        let _ = self.pool().status(false);
        // That commit may hit an armed fault.
        self.observe();
        let pool = self.pool();
        let image =
            pool.with_metadata(|md| md.transaction_manager().block_manager().device().visible().to_vec());
        let mut dev = MemDevice::from_bytes(image);
        // Leaks are also expected after a data I/O error: a mapping whose
        // zeroing or copy failed keeps its block allocated
        // (`process_prepared_mapping` errors the cell and frees nothing);
        // and after the pool was read-only for metadata, where a mapping in
        // preparation fails the same way
        // (`process_prepared_mapping_fail`).
        //
        // Exactly: any leak after a crash, a metadata fault (its abort goes
        // back to a commit that may have counted blocks of mappings still
        // being prepared) or a read-only mode; after data faults alone,
        // only the blocks a failed data I/O left (`leak_candidates`).
        //
        // A metadata block leaks only after a metadata fault in a pool run
        // as 6.1 is ([`Self::metadata_may_leak`]).
        let crashed = self.stats.crashes > 0 || self.metadata_faults_fired > 0 || self.degraded;
        let metadata_leaks = self.metadata_may_leak();
        let candidates = &self.leak_candidates;
        let legal_leak = |p: &Problem| {
            (is_leak(p) && (crashed || p.block.is_some_and(|b| candidates.contains(&b))))
                || (metadata_leaks && is_metadata_leak(p))
        };
        match check_thin_metadata(&mut dev, &CheckOptions::default()) {
            Ok(report) => {
                // A data block allocated for a mapping still being prepared
                // is counted by any commit that happens meanwhile (a message,
                // the timer); a crash before the mapping's own commit leaves
                // it counted and unmapped: leaked, which the checkers call
                // non-fatal (thin_check's classification; thin_check 0.9.0
                // does not compare data block counts at all). Allowed after
                // a crash or a fault; nothing else is. A block counted more
                // often than it is mapped is damage, whatever the kernel
                // does (a passdown discard's hold made durable by a commit
                // was: see KernelFixes::passdown_holds_blocks_in_core).
                let (leaks, other): (Vec<_>, Vec<_>) = report.problems.iter().partition(|p| legal_leak(p));
                self.stats.leaked_after_crash += leaks.len() as u64;
                if other.is_empty() {
                    Ok(())
                } else {
                    Err(self.fail_as("checker", format!("metadata checker: {other:?}")))
                }
            }
            Err(e) => Err(self.fail_as("checker", format!("metadata checker could not read the image: {e}"))),
        }
    }
}

/// The kernel's rules for requests to a pool that is read-only for
/// metadata: out-of-metadata-space mode (a commit found no free metadata
/// block beyond the reserve) and read-only mode (a metadata operation
/// failed and the transaction was aborted). In both `set_pool_mode`
/// installs the same handlers (`process_bio_read_only`, and
/// `process_bio_success` for discards) and `commit` refuses to run. With
/// nothing from before the mode change still in flight (no prepared
/// mapping or copy whose failure ends requests queued behind it) and no
/// fault injected, a request's result then follows from the committed
/// mappings, which cannot change in these modes:
///
/// - a read succeeds (an unmapped block reads zeroes);
/// - a discard succeeds and unmaps nothing;
/// - out-of-metadata-space mode only: a write without PREFLUSH succeeds
///   if every block it touches is mapped and not shared, and fails with
///   EIO otherwise (`handle_unserviceable_bio`); "shared" is the kernel's
///   test (`__snapshotted_since`), a mapping older than the device's last
///   snapshot. With FUA too: the commit that started the mode left no
///   device with changes, so the write is issued without a commit
///   (`bio_triggers_commit`). An empty flush is about block 0, its sector,
///   and only needs it mapped (it carries no data).
///
/// Not judged: in read-only mode, writes and flushes, because the abort
/// keeps the devices' records in core (as the kernel's does): a snapshot
/// time or a change flag of the aborted transaction, which no user sees,
/// decides them (`__snapshotted_since`, `dm_thin_aborted_changes`). A
/// PREFLUSH write in either mode: DM core sends its flush first and then
/// its data whatever the flush returned (`__dm_io_complete`), which the
/// model does not follow (it fails the request with its flush).
///
/// Under `LockingDesign::RefcountSharing`, which is not the kernel's and
/// decides sharing by reference counts, writes are not judged either.
///
/// The mappings are read from the committed image with the dump's
/// reader ([`read_devices`]), not through the model. The oracle still
/// judges what a read returns and what a write leaves.
#[derive(Debug, Clone, Copy)]
pub struct ReadOnlyRules {
    /// Sharing is the kernel's (`__snapshotted_since`): writes are judged.
    pub by_snapshot_time: bool,
}

impl ReadOnlyRules {
    /// What `req` must return in `mode` on a device with the committed
    /// mappings `device` (blocks of `block_sectors`); `None` where the
    /// rules decide nothing (another mode, a device without committed
    /// trees, the cases above).
    pub fn expect(
        self,
        mode: PoolMode,
        req: &BioRequest,
        device: Option<&DeviceMappings>,
        block_sectors: u64,
    ) -> Option<Result<(), Errno>> {
        let device = device?;
        let committed_in_core = match mode {
            PoolMode::OutOfMetadataSpace => true,
            PoolMode::ReadOnly => false,
            _ => return None,
        };
        let all_writable = |sector: u64, nr: u64| {
            let first = sector / block_sectors;
            let last = (sector + nr.max(1) - 1) / block_sectors;
            (first..=last).all(|b| device.writable_in_place(b))
        };
        let eio_unless = |ok: bool| if ok { Ok(()) } else { Err(Errno::EIO) };
        match req.op {
            BioOp::Read | BioOp::Discard => Some(Ok(())),
            _ if !committed_in_core => None,
            BioOp::Flush => Some(eio_unless(device.mappings.contains_key(&0))),
            BioOp::Write if req.preflush || !self.by_snapshot_time => None,
            BioOp::Write => Some(eio_unless(all_writable(req.sector, req.nr_sectors))),
        }
    }
}

/// A random workload of `len` operations: first a thin device, then a mix
/// weighted towards I/O, with worker passes and completions in random order
/// interleaved, occasional snapshots, deletes, time steps and crashes
/// (`crashes` false leaves crashes out).
pub fn generate_ops(rng: &mut impl Rng, len: usize, crashes: bool) -> Vec<ThinOp> {
    let mut ops = vec![ThinOp::CreateThin];
    while ops.len() < len {
        let dev = rng.gen_range(0..4u8);
        // Sectors cluster in the first blocks so that operations collide.
        let sector = if rng.gen_bool(0.7) { rng.gen_range(0..1024u32) } else { rng.gen() };
        let op = match rng.gen_range(0..100u32) {
            0..=27 => ThinOp::Write {
                dev,
                sector,
                nr_sectors: if rng.gen_bool(0.2) {
                    128 * rng.gen_range(1..3u16)
                } else {
                    rng.gen_range(1..300u16)
                },
                fua: rng.gen_bool(0.1),
                preflush: rng.gen_bool(0.05),
            },
            28..=45 => ThinOp::Read { dev, sector, nr_sectors: rng.gen_range(1..400u16) },
            46..=52 => ThinOp::Discard { dev, sector, nr_sectors: rng.gen_range(1..1200u32) },
            53..=55 => ThinOp::Flush { dev },
            56..=57 => ThinOp::CreateThin,
            58..=60 => ThinOp::CreateSnap { origin: dev },
            61 => ThinOp::Delete { dev },
            62..=75 => ThinOp::Worker,
            76..=95 => ThinOp::Complete { pick: rng.gen() },
            96..=97 => ThinOp::Tick { millis: rng.gen_range(1..1500u16) },
            _ if crashes => ThinOp::CRASH,
            _ => ThinOp::Worker,
        };
        ops.push(op);
    }
    ops
}

/// A read's data in short: runs of sectors from the same write (`w3*8`),
/// of zeroes (`0*4`), of anything else (`?*2`).
pub fn summarize(data: &[u8]) -> String {
    summarize_decoded(&stamp::decode(data))
}

/// [`summarize`] of sectors already decoded (a read's data is decoded once,
/// for its summary and for the oracle).
pub fn summarize_decoded(decoded: &[SectorContent]) -> String {
    // A sector's token: zeroes, a write's number, anything else.
    let token = |c: &SectorContent| match c {
        SectorContent::Zeroes => (0, 0),
        SectorContent::Stamp(st) => (1, st.write),
        SectorContent::Foreign => (2, 0),
    };
    let mut runs: Vec<((u8, u64), u32)> = Vec::new();
    for content in decoded {
        let t = token(content);
        match runs.last_mut() {
            Some((last, n)) if *last == t => *n += 1,
            _ => runs.push((t, 1)),
        }
    }
    let mut out = String::new();
    for (i, ((kind, write), n)) in runs.into_iter().enumerate() {
        let sep = if i == 0 { "" } else { " " };
        let _ = match kind {
            0 => write!(out, "{sep}0*{n}"),
            1 => write!(out, "{sep}w{write}*{n}"),
            _ => write!(out, "{sep}?*{n}"),
        };
    }
    out
}

/// Whether the metadata image's superblock has needs_check set (bit 0 of
/// its flags); a damaged superblock is the pool's load to report.
pub fn needs_check_set(image: &[u8]) -> bool {
    image.len() >= 4096 && Superblock::decode(&image[..4096]).flags & NEEDS_CHECK != 0
}

/// Clears needs_check in a metadata image and commits.
pub fn clear_needs_check(image: Vec<u8>, data_block_size: u32) -> Result<Vec<u8>, String> {
    let mut md = ThinMetadata::open(MemDevice::from_bytes(image), data_block_size, false)
        .map_err(|e| e.to_string())?;
    md.clear_needs_check().map_err(|e| e.to_string())?;
    md.commit().map_err(|e| e.to_string())?;
    let dev = md.close().map_err(|(_, e)| e.to_string())?;
    Ok(dev.into_bytes())
}

#[cfg(test)]
mod tests {
    use dmsim_model::pdata::layout::thin::DeviceDetails;

    use super::*;

    /// A model that writes the superblock before the flush breaks the
    /// metadata crash points inside its commits: judged, the run stops at
    /// the first; reported, it goes on and keeps that problem.
    #[test]
    fn reported_crash_points_keep_the_first_problem_and_go_on() {
        use crate::run::{generate, CampaignSettings, RunConfig};
        let settings = CampaignSettings {
            mutations: dmsim_model::mutation::Mutations::from_names(["superblock-before-flush"])
                .expect("a known mutation"),
            ..CampaignSettings::default()
        };
        let is_crash_point =
            |f: &ThinFailure| f.kind == "checker" && f.what.contains("a crash after metadata request");
        let (cfg, ops, judged) = (0..32)
            .find_map(|seed| {
                let cfg = RunConfig::for_seed(seed, 200, &settings);
                let ops = generate(&cfg);
                let mut sim = ThinSim::new(cfg.thin);
                let failure = ops.iter().find_map(|op| sim.apply(op).err())?;
                is_crash_point(&failure).then_some((cfg, ops, failure))
            })
            .expect("a seed whose broken commits fail a crash point");
        let mut sim = ThinSim::new(cfg.thin);
        sim.report_metadata_crash_points();
        for op in &ops {
            if let Err(f) = sim.apply(op) {
                assert!(!is_crash_point(&f), "a crash point stopped the reported run: {f}");
                break;
            }
        }
        assert!(sim.step > judged.step, "the reported run went past step {}", judged.step);
        let finding = sim.metadata_crash_point_finding().expect("the first problem is kept");
        assert_eq!(finding, judged.to_string(), "the same first problem");
    }

    /// Two zeroings in flight together complete oldest first, or in the
    /// order [`ThinSim::follow_data_writes`] names (a kernel's data disk
    /// served them the other way round), each sector used once.
    #[test]
    fn data_writes_complete_in_the_followed_order() {
        let order_of_zeroing = |follow: Vec<u64>| {
            let mut sim = ThinSim::new(ThinSimConfig::default());
            sim.apply(&ThinOp::CreateThin).expect("created");
            sim.follow_data_writes(follow);
            // Half of virtual block 0 and half of block 1: both zeroed.
            let write = ThinOp::Write { dev: 0, sector: 64, nr_sectors: 128, fua: false, preflush: false };
            sim.apply(&write).expect("written");
            sim.quiesce().expect("settled");
            assert!(sim.write_order.iter().all(|s| ![0, 128].contains(s)), "used: {:?}", sim.write_order);
            let pending =
                sim.pool().with_data_device(|d| d.since_flush().iter().map(|w| w.key()).collect::<Vec<_>>());
            // The zeroing writes, whole blocks, in the order they came.
            pending.iter().filter(|k| k.nr_sectors == 128).map(|k| k.sector).collect::<Vec<_>>()
        };
        assert_eq!(order_of_zeroing(Vec::new()), vec![0, 128]);
        assert_eq!(order_of_zeroing(vec![128, 0]), vec![128, 0]);
        // A sector nothing writes is passed over.
        assert_eq!(order_of_zeroing(vec![999, 128]), vec![128, 0]);
    }

    /// A full pool whose one free data block was freed in the open
    /// transaction (a discard: not allocatable before a commit) meets a
    /// write over two unmapped blocks, with error_if_no_space. Whole, both
    /// pieces fail with ENOSPC and the block stays free. With a commit
    /// planned after the first piece, the worker's pass fails that piece,
    /// and its commit makes the freed block allocatable (the pool leaves
    /// out-of-data-space): the second piece takes it. A plan for more
    /// pieces than the request has is left unused.
    #[test]
    fn a_commit_between_a_requests_pieces_lets_the_later_pieces_allocate() {
        let run = |plan: Option<usize>| {
            let features = PoolFeatures { error_if_no_space: true, ..PoolFeatures::default() };
            let cfg = ThinSimConfig { data_blocks: 4, thin_blocks: 8, features, ..ThinSimConfig::default() };
            let mut sim = ThinSim::new(cfg);
            let step = |sim: &mut ThinSim, op: ThinOp| {
                sim.apply(&op).expect("applied");
                sim.quiesce().expect("settled");
            };
            step(&mut sim, ThinOp::CreateThin);
            for b in 0..4 {
                step(
                    &mut sim,
                    ThinOp::Write { dev: 0, sector: b * 128, nr_sectors: 128, fua: false, preflush: false },
                );
            }
            step(&mut sim, ThinOp::Flush { dev: 0 });
            step(&mut sim, ThinOp::Discard { dev: 0, sector: 0, nr_sectors: 128 });
            sim.plan_commit(None);
            if let Some(k) = plan {
                sim.plan_commit_after_pieces(k);
            }
            let at = sim.events().len();
            step(
                &mut sim,
                ThinOp::Write { dev: 0, sector: 4 * 128, nr_sectors: 256, fua: false, preflush: false },
            );
            let result = sim.events()[at..].iter().find_map(|e| match e {
                Event::Done { result, .. } => Some(result.clone()),
                _ => None,
            });
            let free = sim.pool().with_metadata(|md| md.free_data_blocks_in_core());
            (sim.piece_commits(), free, sim.pool().mode(), result)
        };
        let enospc = Some("ENOSPC".to_string());
        assert_eq!(run(None), (0, Some(1), PoolMode::OutOfDataSpace, enospc.clone()));
        assert_eq!(run(Some(1)), (1, Some(0), PoolMode::Write, enospc.clone()));
        assert_eq!(run(Some(2)), run(None), "two pieces: nothing to commit between");
    }

    /// A device whose last snapshot was at time 2, mapping virtual block 0
    /// at time 1 (shared since), 1 and 2 at time 2 (not shared), block 3
    /// unmapped. Blocks of 128 sectors.
    fn device() -> DeviceMappings {
        let details = DeviceDetails { snapshotted_time: 2, ..DeviceDetails::default() };
        let mappings = [(0, (10, 1)), (1, (11, 2)), (2, (12, 2))].into_iter().collect();
        DeviceMappings { details, mappings }
    }

    fn write(sector: u64, nr: u64) -> BioRequest {
        BioRequest::write(sector, vec![0; (nr * SECTOR_SIZE) as usize])
    }

    #[test]
    fn read_only_rules_follow_the_committed_mappings() {
        let d = device();
        let rules = ReadOnlyRules { by_snapshot_time: true };
        let oom = |req: &BioRequest| rules.expect(PoolMode::OutOfMetadataSpace, req, Some(&d), 128);
        let eio = Some(Err(Errno::EIO));
        assert_eq!(oom(&BioRequest::read(0, 512)), Some(Ok(())));
        assert_eq!(oom(&BioRequest::discard(0, 512)), Some(Ok(())));
        // In place only into mapped blocks not shared since a snapshot.
        assert_eq!(oom(&write(128, 256)), Some(Ok(())));
        assert_eq!(oom(&write(130, 1).with_fua()), Some(Ok(())));
        assert_eq!(oom(&write(0, 1)), eio, "shared with a snapshot");
        assert_eq!(oom(&write(300, 200)), eio, "block 3 is unmapped");
        assert_eq!(oom(&write(255, 2)), Some(Ok(())));
        assert_eq!(oom(&write(127, 2)), eio, "crosses into block 1 from the shared block 0");
        // An empty flush is about block 0, mapped here (shared or not).
        assert_eq!(oom(&BioRequest::flush()), Some(Ok(())));
        let unmapped = DeviceMappings::default();
        assert_eq!(
            rules.expect(PoolMode::OutOfMetadataSpace, &BioRequest::flush(), Some(&unmapped), 128),
            eio
        );
        // Not judged: a PREFLUSH write; a device without committed trees.
        assert_eq!(oom(&write(128, 1).with_preflush()), None);
        assert_eq!(rules.expect(PoolMode::OutOfMetadataSpace, &write(128, 1), None, 128), None);
        // Read-only mode: reads and discards only; other modes: nothing.
        let ro = |req: &BioRequest| rules.expect(PoolMode::ReadOnly, req, Some(&d), 128);
        assert_eq!(ro(&BioRequest::read(0, 1)), Some(Ok(())));
        assert_eq!(ro(&BioRequest::discard(0, 1)), Some(Ok(())));
        assert_eq!(ro(&write(128, 1)), None);
        assert_eq!(ro(&BioRequest::flush()), None);
        for mode in [PoolMode::Write, PoolMode::OutOfDataSpace, PoolMode::Fail] {
            assert_eq!(rules.expect(mode, &BioRequest::read(0, 1), Some(&d), 128), None, "{mode}");
        }
        // Sharing by reference counts (not the kernel's): writes not judged.
        let refcounts = ReadOnlyRules { by_snapshot_time: false };
        assert_eq!(refcounts.expect(PoolMode::OutOfMetadataSpace, &write(128, 1), Some(&d), 128), None);
        assert_eq!(refcounts.expect(PoolMode::OutOfMetadataSpace, &write(0, 1), Some(&d), 128), None);
        assert_eq!(
            refcounts.expect(PoolMode::OutOfMetadataSpace, &BioRequest::read(0, 1), Some(&d), 128),
            Some(Ok(()))
        );
    }
}
