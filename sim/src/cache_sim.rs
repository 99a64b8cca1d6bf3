//! The cache target under the oracle: a driver that applies trace ops —
//! reads, writes of any size and alignment, discards, flushes, FUA, worker
//! passes, data I/O completions in any order, simulated time, table reloads
//! (mode and policy switches), resizes of the cache and the origin,
//! invalidations, status queries, injected faults and crashes — to a
//! [`Cache`] on three simulated disks, and feeds the same events to the
//! [`Oracle`], which judges every read of the cache device.
//!
//! Resizes: the table sees the first blocks of its cache and origin disks,
//! as through a dm-linear. The disks grow when a resize asks for more
//! (the cache disk with [`CACHE_GARBAGE`], the origin with zeroes, which
//! the oracle learns) and never shrink: a shorter origin keeps its tail,
//! and a longer one shows it again. A resize the kernel refuses (a dirty
//! block dropped) must be refused with the kernel's errno, and one it takes
//! must be taken; after a refusal the old table is loaded again, after a
//! repair of the metadata if the refusal set NEEDS_CHECK.
//!
//! Beyond the oracle:
//!
//! - after every step, the model's own consistency checks
//!   ([`Cache::check`]);
//! - after every recovery, the cache metadata checker on the recovered
//!   image (the crash state, and after a NEEDS_CHECK repair the repaired
//!   image), and Debian's `cache_check` on the image the cache is loaded
//!   from again, when it is given ([`CacheSim::set_cache_check`]);
//! - after every clean shutdown (a reload, the end of the run) with no fault
//!   injected, the **devices against the metadata**: every block the
//!   metadata records as clean must hold the same bytes on the cache device
//!   and on the origin (a clean block is one the cache may drop);
//! - at the end, every origin block read back through the oracle, a clean
//!   shutdown, and the metadata checker (and `cache_check`, when given) on
//!   the final image.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use dmsim_faults::{FaultCoverage, FiredFault, SimDisk};
use dmsim_model::block_device::{BlockDevice, MemDevice, SECTOR_SIZE};
use dmsim_model::cache::check::{check_cache_metadata, CacheCheckOptions};
use dmsim_model::cache::core::{BioId, BioRequest, Cache, CacheCompletion, CacheOptions};
use dmsim_model::cache::mapping::discard_geometry;
use dmsim_model::cache::superblock::CacheSuperblock;
use dmsim_model::cache::table::DeviceSizes;
use dmsim_model::cache::target::CacheMode;
use dmsim_model::cache::{CacheMetadata, OpenOptions};
use dmsim_model::errno::Errno;
use dmsim_model::pdata::layout::BLOCK_SIZE;
use dmsim_model::thin::check::{Problem, Severity};
use dmsim_traces::op::{CacheIoMode, CachePolicyKind};
use dmsim_traces::stamp::{self, SectorContent};
use dmsim_traces::{CrashMode, DiskId, Event, Op};

use crate::completion::{catching, Pending};
use crate::oracle::{Content, Oracle, OracleConfig};
use crate::run::{run_checker, MAX_DISK_SECTORS};
use crate::thin::{summarize, ThinFailure};

/// The cache device's id in the oracle (the only device).
const DEV: u32 = 0;

/// The byte the cache device starts full of: neither zero nor a stamp, so a
/// cache block read before anything was copied into it shows.
pub const CACHE_GARBAGE: u8 = 0xc5;

/// The shape of one simulated cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSimConfig {
    /// Run id stamped into every written sector.
    pub run: u64,
    /// Cache block size in sectors (a multiple of 64).
    pub block_sectors: u64,
    /// Cache blocks on the cache device.
    pub cache_blocks: u64,
    /// Origin blocks.
    pub origin_blocks: u64,
    /// Metadata device size in sectors.
    pub metadata_sectors: u64,
    /// Metadata format version (1 or 2).
    pub metadata_version: u32,
    /// The first table's I/O mode.
    pub io_mode: CacheIoMode,
    /// The first table's policy.
    pub policy: CachePolicyKind,
    /// Discards passed down to the origin (false: `no_discard_passdown`).
    pub discard_passdown: bool,
    /// `migration_threshold` in sectors.
    pub migration_threshold: u64,
    /// Deliberate bugs and candidate fixes.
    pub options: CacheOptions,
}

impl Default for CacheSimConfig {
    fn default() -> Self {
        CacheSimConfig {
            run: 1,
            block_sectors: 64,
            cache_blocks: 8,
            origin_blocks: 32,
            metadata_sectors: 2048,
            metadata_version: 2,
            io_mode: CacheIoMode::Writeback,
            policy: CachePolicyKind::Smq,
            discard_passdown: true,
            migration_threshold: 2048,
            options: CacheOptions::default(),
        }
    }
}

impl CacheSimConfig {
    /// The table line for a mode and a policy on this shape.
    pub fn table_line(&self, mode: CacheIoMode, policy: CachePolicyKind) -> String {
        let mut features = vec![mode.name()];
        if self.metadata_version == 2 {
            features.push("metadata2");
        }
        if !self.discard_passdown {
            features.push("no_discard_passdown");
        }
        format!(
            "/dev/dmsim-cmeta /dev/dmsim-cache /dev/dmsim-origin {} {} {} {} 2 migration_threshold {}",
            self.block_sectors,
            features.len(),
            features.join(" "),
            policy.name(),
            self.migration_threshold
        )
    }

    /// Origin (and cache device) size in sectors.
    pub fn origin_sectors(&self) -> u64 {
        self.origin_blocks * self.block_sectors
    }
}

/// Counters of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Requests submitted.
    pub bios: u64,
    /// Reads the oracle judged.
    pub reads_checked: u64,
    /// Crashes survived.
    pub crashes: u64,
    /// Data I/Os completed.
    pub data_ios: u64,
    /// Requests that failed with an error after a fault was injected.
    pub io_errors: u64,
    /// Table reloads done.
    pub reloads: u64,
    /// Table reloads the new table refused (passthrough with dirty blocks).
    pub reloads_refused: u64,
    /// Resizes (table reloads on other device sizes) done.
    pub resizes: u64,
    /// Resizes refused as the kernel refuses them (a dirty block dropped)
    /// or after an injected metadata fault.
    pub resizes_refused: u64,
    /// Metadata repairs after a refusal that set NEEDS_CHECK.
    pub repairs: u64,
    /// Promotions, demotions and writebacks that completed.
    pub migrations: [u64; 3],
    /// Promotions by overwrite.
    pub overwrites: u64,
    /// Metadata commits.
    pub commits: u64,
    /// Clean shutdowns whose clean blocks were compared on both devices.
    pub clean_checks: u64,
    /// Quiesces that had to stop background work retrying for ever (see
    /// `CacheSim::quiesce`).
    pub background_stopped: u64,
    /// Metadata blocks the checker found leaked after an injected metadata
    /// fault (see `CacheSim::judge_metadata`).
    pub leaked_after_fault: u64,
    /// Simulated time at the end, in nanoseconds.
    pub sim_time_ns: u64,
}

impl CacheStats {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, o: &CacheStats) {
        self.bios += o.bios;
        self.reads_checked += o.reads_checked;
        self.crashes += o.crashes;
        self.data_ios += o.data_ios;
        self.io_errors += o.io_errors;
        self.reloads += o.reloads;
        self.reloads_refused += o.reloads_refused;
        self.resizes += o.resizes;
        self.resizes_refused += o.resizes_refused;
        self.repairs += o.repairs;
        for i in 0..3 {
            self.migrations[i] += o.migrations[i];
        }
        self.overwrites += o.overwrites;
        self.commits += o.commits;
        self.clean_checks += o.clean_checks;
        self.leaked_after_fault += o.leaked_after_fault;
        self.background_stopped += o.background_stopped;
        self.sim_time_ns += o.sim_time_ns;
    }
}

/// How the simulator runs Debian's `cache_check` (0.9.0): on the final
/// metadata image, and, when `at_recoveries`, on the image of every
/// recovery too (what the cache is loaded from again after a crash: the
/// crash state, or the image its NEEDS_CHECK repair wrote). Each image is
/// judged by the model's checker first; `cache_check` rejecting one that
/// checker accepts is a violation of kind `cache_check`. Whether it runs
/// changes nothing in the trace but that verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheCheck {
    /// Path of `cache_check`.
    pub tool: PathBuf,
    /// Also at every recovery, not only on the final image.
    pub at_recoveries: bool,
}

/// The options `cache_check` runs with: none. 0.9.0 checks the superblock,
/// the mapping array, the hint array and the discard bitset (never the v2
/// dirty bitset, never reference counts), and the model's images pass all
/// of it, NEEDS_CHECK set or not.
pub const CACHE_CHECK_ARGS: [&str; 0] = [];

/// Whether the image's hint array holds another number of entries than
/// its mapping array: what the kernel leaves after a cache grows or
/// shrinks, until the next clean shutdown (`dm_cache_resize` resizes the mapping array and the dirty
/// bitset; the hints are rewritten only at shutdown, and the kernel loads
/// such an image, the blocks past the hints without one). 0.9.0's
/// `cache_check` rejects it ("examining hint array; missing mappings"), so
/// its hints are skipped there: a disagreement between the tools and the
/// kernel (docs/findings.md), not damage.
fn hints_sized_otherwise(image: &[u8]) -> bool {
    let Ok(img) = dmsim_model::cache::inspect::read_image(&mut MemDevice::from_bytes(image.to_vec())) else {
        return false;
    };
    img.hints.as_ref().is_some_and(|h| h.len() != img.mappings.len())
}

type SimCache = Cache<SimDisk, SimDisk, SimDisk>;

/// A cache target and the oracle watching it.
pub struct CacheSim {
    cfg: CacheSimConfig,
    cache: Option<SimCache>,
    oracle: Oracle,
    io_mode: CacheIoMode,
    policy: CachePolicyKind,
    /// The cache blocks and origin blocks the table sees.
    cache_blocks: u64,
    origin_blocks: u64,
    next_write: u64,
    pending: BTreeMap<BioId, Pending>,
    now: u64,
    step: usize,
    stats: CacheStats,
    events: Vec<Event>,
    mode: CacheMode,
    faults_fired: u64,
    metadata_faults_fired: u64,
    coverage: FaultCoverage,
    /// Counters of the caches before the last crash.
    before_crash: [u64; 6],
    /// Debian's `cache_check`, when it is to run.
    cache_check: Option<CacheCheck>,
    /// Images `cache_check` ran on.
    cache_checked: u64,
    /// Each resize's outcome: taken, or the errno it was refused with.
    resize_log: Vec<Result<(), Errno>>,
    /// See [`CacheSim::set_final_read_back`].
    final_read_back: bool,
}

impl CacheSim {
    /// A fresh cache: zeroed origin and metadata, a cache device full of
    /// [`CACHE_GARBAGE`].
    pub fn new(cfg: CacheSimConfig) -> Result<Self, ThinFailure> {
        let metadata = SimDisk::new(cfg.metadata_sectors);
        let cache = SimDisk::filled(cfg.cache_blocks * cfg.block_sectors, CACHE_GARBAGE);
        let origin = SimDisk::new(cfg.origin_sectors());
        let line = cfg.table_line(cfg.io_mode, cfg.policy);
        let c = Cache::create(&line, metadata, cache, origin, 0, cfg.options).map_err(|e| ThinFailure {
            step: 0,
            kind: "load",
            what: format!("a fresh cache does not load ({line}): {e}"),
        })?;
        let (dbs, _) = discard_geometry(cfg.block_sectors, cfg.origin_sectors());
        let mut oracle = Oracle::new(OracleConfig {
            run: cfg.run,
            sectors_per_block: dbs,
            zeroing: true,
            discard_undefined: true,
        });
        oracle.create_thin(DEV, cfg.origin_sectors()).map_err(|e| ThinFailure {
            step: 0,
            kind: "misuse",
            what: e.to_string(),
        })?;
        Ok(CacheSim {
            cfg,
            cache: Some(c),
            oracle,
            io_mode: cfg.io_mode,
            policy: cfg.policy,
            cache_blocks: cfg.cache_blocks,
            origin_blocks: cfg.origin_blocks,
            next_write: 0,
            pending: BTreeMap::new(),
            now: 0,
            step: 0,
            stats: CacheStats::default(),
            events: Vec::new(),
            mode: CacheMode::Write,
            faults_fired: 0,
            metadata_faults_fired: 0,
            coverage: FaultCoverage::default(),
            before_crash: [0; 6],
            cache_check: None,
            cache_checked: 0,
            resize_log: Vec::new(),
            final_read_back: true,
        })
    }

    /// Whether [`Self::finish`] reads every origin block back through the
    /// cache before the clean shutdown (on by default). A replay held
    /// against a kernel that read nothing at the end turns it off: those
    /// reads go through the policy, which may promote on them.
    pub fn set_final_read_back(&mut self, on: bool) {
        self.final_read_back = on;
    }

    /// Runs Debian's `cache_check` as `check` says from now on (`None`:
    /// not at all, the default).
    pub fn set_cache_check(&mut self, check: Option<CacheCheck>) {
        self.cache_check = check;
    }

    /// How many metadata images `cache_check` ran on so far.
    pub fn cache_checked(&self) -> u64 {
        self.cache_checked
    }

    /// The events recorded so far.
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

    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        let mut s = self.stats;
        if let Some(c) = &self.cache {
            let k = c.counters();
            s.migrations = [
                self.before_crash[0] + k.succeeded[0],
                self.before_crash[1] + k.succeeded[1],
                self.before_crash[2] + k.succeeded[2],
            ];
            s.overwrites = self.before_crash[3] + k.overwrites;
            s.commits = self.before_crash[4] + k.commits;
        }
        s
    }

    /// The faults that fired, by kind.
    pub fn coverage(&self) -> &FaultCoverage {
        &self.coverage
    }

    /// The shape of this cache.
    pub fn config(&self) -> &CacheSimConfig {
        &self.cfg
    }

    /// Each resize's outcome so far, in order: taken, or the errno the
    /// model refused it with.
    pub fn resize_log(&self) -> &[Result<(), Errno>] {
        &self.resize_log
    }

    /// The cache blocks and origin blocks the table sees now.
    pub fn geometry(&self) -> (u64, u64) {
        (self.cache_blocks, self.origin_blocks)
    }

    /// The sizes a table of `cache_blocks` and `origin_blocks` sees on an
    /// origin disk of `origin_disk_sectors`.
    fn sizes_on(&self, cache_blocks: u64, origin_blocks: u64, origin_disk_sectors: u64) -> DeviceSizes {
        let bs = self.cfg.block_sectors;
        DeviceSizes {
            target_len: origin_blocks * bs,
            cache_sectors: cache_blocks * bs,
            origin_sectors: origin_disk_sectors,
        }
    }

    /// [`Self::sizes_on`] the live cache's origin disk.
    fn sizes(&mut self, cache_blocks: u64, origin_blocks: u64) -> DeviceSizes {
        let disk = self.cache().origin_device().nr_sectors();
        self.sizes_on(cache_blocks, origin_blocks, disk)
    }

    /// The cache target.
    pub fn cache(&mut self) -> &mut SimCache {
        self.cache.as_mut().expect("cache present between steps")
    }

    /// The metadata device's contents now.
    pub fn metadata_image(&mut self) -> Vec<u8> {
        self.cache().metadata().transaction_manager().block_manager().device().visible().to_vec()
    }

    fn fail_as(&self, kind: &'static str, what: impl Into<String>) -> ThinFailure {
        ThinFailure { step: self.step, kind, what: what.into() }
    }

    fn fail(&self, what: impl Into<String>) -> ThinFailure {
        self.fail_as("cache", what)
    }

    /// Records a violation found outside the driver.
    pub fn record_violation(&mut self, kind: &'static str, what: String) -> ThinFailure {
        let f = self.fail_as(kind, what);
        self.events.push(Event::Violation { kind: kind.to_string(), message: f.what.clone() });
        f
    }

    /// Runs every op, then [`Self::finish`].
    pub fn run(cfg: CacheSimConfig, ops: &[Op]) -> Result<CacheStats, ThinFailure> {
        let mut sim = CacheSim::new(cfg)?;
        for op in ops {
            sim.apply(op)?;
        }
        sim.finish()?;
        Ok(sim.stats())
    }

    /// Applies one op, recording it and what it led to.
    pub fn apply(&mut self, op: &Op) -> Result<(), ThinFailure> {
        self.events.push(Event::Op(*op));
        let r = catching(|| self.apply_inner(op)).unwrap_or_else(|e| Err(self.fail_as("model", e)));
        // A broken invariant is the cause of whatever else the op showed.
        let r = self.check_model().and(r);
        self.observe();
        if let Err(f) = &r {
            self.events.push(Event::Violation { kind: f.kind.to_string(), message: f.what.clone() });
        }
        r
    }

    fn check_model(&mut self) -> Result<(), ThinFailure> {
        match self.cache.as_ref().map(|c| c.check()) {
            Some(Err(e)) => Err(self.fail_as("model", format!("model invariant broken: {e}"))),
            _ => Ok(()),
        }
    }

    /// Records mode changes and the faults that fired.
    fn observe(&mut self) {
        let Some(c) = self.cache.as_mut() else { return };
        let mode = c.target().mode();
        let mut all: Vec<(DiskId, FiredFault)> = Vec::new();
        let md = c.metadata().transaction_manager().block_manager().device_mut().take_fired();
        all.extend(md.into_iter().map(|f| (DiskId::Metadata, f)));
        all.extend(c.cache_device().take_fired().into_iter().map(|f| (DiskId::Cache, f)));
        all.extend(c.origin_device().take_fired().into_iter().map(|f| (DiskId::Origin, f)));
        for (disk, f) in all {
            self.faults_fired += 1;
            if disk == DiskId::Metadata {
                self.metadata_faults_fired += 1;
            }
            self.coverage.record_fired(&f);
            self.events.push(Event::FaultFired { disk, what: f.to_string() });
        }
        if mode != self.mode {
            if mode != CacheMode::Write && self.mode == CacheMode::Write {
                // A metadata failure aborted the transaction: the metadata
                // is back at the last commit, as after a crash (what a crash
                // could lose may now be lost).
                self.oracle.rolled_back();
            }
            self.mode = mode;
            self.events.push(Event::Mode(format!("{mode:?}").to_lowercase()));
        }
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

    fn apply_inner(&mut self, op: &Op) -> Result<(), ThinFailure> {
        self.step += 1;
        let size = self.origin_blocks * self.cfg.block_sectors;
        match *op {
            Op::Write { sector, nr_sectors, fua, preflush, .. } => {
                let sector = u64::from(sector) % size;
                let nr = u64::from(nr_sectors.max(1)).min(size - sector);
                let write = self.next_write;
                self.next_write += 1;
                let mut data = vec![0; (nr * SECTOR_SIZE) as usize];
                stamp::fill(&mut data, self.cfg.run, write, DEV, sector);
                let mut req = BioRequest::write(sector, data);
                req.fua = fua;
                req.preflush = preflush;
                let flush = if preflush { Some(self.oracle_op(|o| o.flush_submitted(DEV))?) } else { None };
                let ticket = self.oracle_op(|o| o.write_submitted(DEV, sector, nr, write, fua))?;
                self.submit(req, Pending::Write(ticket, flush))?;
            }
            Op::Read { sector, nr_sectors, .. } => {
                let sector = u64::from(sector) % size;
                let nr = u64::from(nr_sectors.max(1)).min(size - sector);
                let ticket = self.oracle_op(|o| o.read_submitted(DEV, sector, nr))?;
                self.submit(BioRequest::read(sector, nr), Pending::Read(ticket))?;
            }
            Op::Discard { sector, nr_sectors, .. } => {
                let sector = u64::from(sector) % size;
                let nr = u64::from(nr_sectors.max(1)).min(size - sector);
                let ticket = self.oracle_op(|o| o.discard_submitted(DEV, sector, nr))?;
                self.submit(BioRequest::discard(sector, nr), Pending::Discard(ticket))?;
            }
            Op::Flush { .. } => {
                let ticket = self.oracle_op(|o| o.flush_submitted(DEV))?;
                self.submit(BioRequest::flush(), Pending::Flush(ticket))?;
            }
            Op::CreateThin
            | Op::CreateSnap { .. }
            | Op::Delete { .. }
            | Op::GrowMetadata { .. }
            | Op::AimFault { .. } => {
                return Err(self
                    .fail_as("misuse", format!("op {op:?} belongs to thin traces; this is a cache trace")));
            }
            Op::Worker => {
                self.cache().run_worker();
                self.collect()?;
            }
            Op::Complete { pick } => {
                let io = self.cache().in_flight_io();
                if !io.is_empty() {
                    let id = io[pick as usize % io.len()].id;
                    let r = self.cache().complete_io(id);
                    r.map_err(|e| self.fail(e.to_string()))?;
                    self.stats.data_ios += 1;
                    self.collect()?;
                }
            }
            Op::FailIo { pick } => {
                let io = self.cache().in_flight_io();
                if !io.is_empty() {
                    let id = io[pick as usize % io.len()].id;
                    self.faults_fired += 1;
                    self.coverage.record_failed_io();
                    let r = self.cache().fail_io(id, Errno::EIO);
                    r.map_err(|e| self.fail(e.to_string()))?;
                    self.stats.data_ios += 1;
                    self.collect()?;
                }
            }
            Op::Fault { disk, fault } => {
                let c = self.cache();
                match disk {
                    DiskId::Metadata => {
                        c.metadata().transaction_manager().block_manager().device_mut().arm(fault)
                    }
                    DiskId::Cache => c.cache_device().arm(fault),
                    DiskId::Origin => c.origin_device().arm(fault),
                    DiskId::Data => {
                        return Err(self.fail_as(
                            "misuse",
                            "disk `data` belongs to thin traces; a cache has metadata, cache and origin",
                        ))
                    }
                }
            }
            Op::Tick { millis } => {
                self.now += u64::from(millis) * 1_000_000;
                self.stats.sim_time_ns = self.now;
                let now = self.now;
                self.cache().set_time(now);
                self.collect()?;
            }
            Op::Crash { mode, seed } => self.crash(mode, seed)?,
            Op::Reload { mode, policy } => self.reload(mode, policy)?,
            Op::Resize { cache_blocks, origin_blocks } => self.resize(cache_blocks, origin_blocks)?,
            Op::Invalidate { cblock, nr } => {
                let blocks = self.cache_blocks;
                let begin = u64::from(cblock) % blocks;
                let end = (begin + u64::from(nr.max(1))).min(blocks);
                let words = ["invalidate_cblocks".to_string(), format!("{begin}-{end}")];
                let words: Vec<&str> = words.iter().map(String::as_str).collect();
                let r = self.cache().message(&words);
                self.observe();
                match r {
                    Ok(()) => {}
                    // Refused outside passthrough (EPERM) or in read-only
                    // mode (EOPNOTSUPP); an I/O error after a fault.
                    Err(Errno::EPERM) | Err(Errno::EOPNOTSUPP) => {}
                    Err(_) if self.metadata_faults_fired > 0 => {}
                    Err(e) => return Err(self.fail(format!("invalidate_cblocks {begin}-{end} failed: {e}"))),
                }
            }
            Op::Status => {
                let _ = self.cache().status(false);
                self.collect()?;
            }
        }
        Ok(())
    }

    fn submit(&mut self, req: BioRequest, pending: Pending) -> Result<(), ThinFailure> {
        self.stats.bios += 1;
        let r = self.cache().submit(req);
        let id = r.map_err(|e| self.fail(format!("submit: {e}")))?;
        self.pending.insert(id, pending);
        self.collect()
    }

    fn collect(&mut self) -> Result<(), ThinFailure> {
        for c in self.cache().take_completions() {
            self.completed(c)?;
        }
        Ok(())
    }

    fn completed(&mut self, c: CacheCompletion) -> Result<(), ThinFailure> {
        self.observe();
        let Some(pending) = self.pending.remove(&c.id) else {
            return Err(self.fail(format!("request {:?} completed twice or was never submitted", c.id)));
        };
        let ok = c.result.is_ok();
        // A read's data, decoded once for its summary and the oracle.
        let decoded = if ok && pending.is_read() { stamp::decode(&c.data) } else { Vec::new() };
        self.events.push(pending.done_event(c.id.0, DEV, c.result, &decoded));
        match c.result {
            Ok(()) => {}
            Err(_) if self.faults_fired > 0 => self.stats.io_errors += 1,
            Err(e) => {
                return Err(self.fail(format!(
                    "request {:?} failed with {e} in {:?} mode and no fault injected",
                    c.id, self.mode
                )))
            }
        }
        // A successful flush or FUA is durable in every mode: read-only
        // mode too, where the kernel's cache completed flushes without a
        // commit (CacheFixes::read_only_flushes_fail).
        let durable = ok;
        self.stats.reads_checked += u64::from(ok && pending.is_read());
        let write = matches!(pending, Pending::Write(..));
        pending
            .settle(&mut self.oracle, ok, durable, (c.data.len(), &decoded))
            .map_err(|(kind, what)| self.fail_as(kind, what))?;
        if write && self.io_mode == CacheIoMode::Writethrough {
            // Writethrough keeps every block clean: once a write is
            // acknowledged, the origin must hold what a read of a clean
            // block may return.
            self.check_clean_blocks()?;
        }
        Ok(())
    }

    /// Runs the worker and completes data I/O, oldest first, until nothing
    /// moves.
    pub fn quiesce(&mut self) -> Result<(), ThinFailure> {
        for i in 0..1_000_000 {
            if i == 100_000 && self.pending.is_empty() {
                // Only background work keeps the cache busy: a migration
                // that keeps failing (a writeback to a bad origin sector)
                // is retried for ever. Stop new migrations, as the
                // suspend that follows every quiesce would (its
                // presuspend), and drain what is in flight.
                self.stats.background_stopped += 1;
                self.cache().prevent_background_work();
            }
            self.collect()?;
            let c = self.cache();
            if c.worker_wanted() {
                c.run_worker();
                continue;
            }
            match c.in_flight_io().first() {
                Some(io) => {
                    let id = io.id;
                    let r = self.cache().complete_io(id);
                    r.map_err(|e| self.fail(e.to_string()))?;
                    self.stats.data_ios += 1;
                }
                None => {
                    self.collect()?;
                    if !self.cache().is_idle() {
                        return Err(self.fail("the cache is stuck: work pending with no I/O in flight"));
                    }
                    return self.check_model();
                }
            }
        }
        Err(self.fail("the cache never settled"))
    }

    /// Suspend (clean shutdown), swap the table, resume.
    fn reload(&mut self, mode: CacheIoMode, policy: CachePolicyKind) -> Result<(), ThinFailure> {
        self.quiesce()?;
        let r = self.cache().suspend();
        r.map_err(|e| self.fail(format!("suspend: {e}")))?;
        self.observe();
        self.check_clean_blocks()?;
        let line = self.cfg.table_line(mode, policy);
        let c = self.cache.take().expect("cache");
        let (c, r) = match c.reload(&line) {
            Ok(x) => x,
            Err(f) => {
                return Err(
                    self.fail_as("load", format!("neither the new nor the old table loads: {}", f.error))
                )
            }
        };
        self.cache = Some(c);
        self.stats.reloads += 1;
        match r {
            Ok(()) => {
                self.io_mode = mode;
                self.policy = policy;
            }
            Err(e) if e.message.contains("passthrough") => {
                // 6.1 refuses passthrough over blocks that load dirty at
                // preresume: the old table is loaded again.
                self.stats.reloads_refused += 1;
                let (cache, origin) = (self.cache_blocks, self.origin_blocks);
                self.restore((cache, origin))?;
            }
            Err(_) if self.metadata_faults_fired > 0 => {
                self.stats.reloads_refused += 1;
                // A new table whose preresume failed leaves the device
                // suspended: the old table is loaded again.
                let (cache, origin) = (self.cache_blocks, self.origin_blocks);
                self.restore((cache, origin))?;
            }
            Err(e) => return Err(self.fail_as("load", format!("table reload {line:?} refused: {e}"))),
        }
        Ok(())
    }

    /// Suspend (clean shutdown), present the cache and origin at new sizes
    /// (clamped to 1..=the largest disk), load the table in use on them,
    /// resume. The outcome must be the kernel's: refused with EINVAL when a
    /// dropped cache block is stored dirty (`dm_cache_resize`), with EFBIG
    /// when a mapping past the new origin end loads dirty
    /// (`load_filtered_mapping`), taken otherwise. A refused resize leaves
    /// the device suspended with the new table; the old one is loaded
    /// again ([`Self::restore`]).
    fn resize(&mut self, cache_blocks: u32, origin_blocks: u32) -> Result<(), ThinFailure> {
        let bs = self.cfg.block_sectors;
        let max = MAX_DISK_SECTORS / bs;
        let cache = u64::from(cache_blocks).clamp(1, max);
        let origin = u64::from(origin_blocks).clamp(1, max);
        self.quiesce()?;
        let r = self.cache().suspend();
        r.map_err(|e| self.fail(format!("suspend: {e}")))?;
        self.observe();
        self.check_clean_blocks()?;
        let expected = self.resize_refusal(cache, origin);
        // The disks grow as needed (the discard block size stays the cache
        // block size: MAX_DISK_SECTORS is far below 16384 blocks of 64
        // sectors, so the oracle's discard granularity holds).
        {
            let c = self.cache();
            c.cache_device().grow(cache * bs, CACHE_GARBAGE);
            c.origin_device().grow(origin * bs, 0);
        }
        self.oracle_op(|o| o.grow(DEV, origin * bs))?;
        let old = (self.cache_blocks, self.origin_blocks);
        let line = self.cfg.table_line(self.io_mode, self.policy);
        let sizes = self.sizes(cache, origin);
        let c = self.cache.take().expect("cache");
        let (c, r) = match c.reload_sized(&line, sizes) {
            Ok(x) => x,
            Err(f) => {
                return Err(
                    self.fail_as("load", format!("neither the new nor the old table loads: {}", f.error))
                )
            }
        };
        self.cache = Some(c);
        self.observe();
        self.stats.resizes += 1;
        self.resize_log.push(r.as_ref().map(|_| ()).map_err(|e| e.errno));
        let faulted = self.metadata_faults_fired > 0;
        let what = format!("resize to {cache} cache blocks and {origin} origin blocks");
        match (r, expected) {
            (Ok(()), Some((errno, why))) if !faulted => {
                return Err(
                    self.fail_as("load", format!("{what} was taken; the kernel refuses it ({errno}): {why}"))
                )
            }
            (Ok(()), _) => (self.cache_blocks, self.origin_blocks) = (cache, origin),
            (Err(e), Some((errno, _))) if e.errno == errno => {
                self.stats.resizes_refused += 1;
                self.restore(old)?;
            }
            (Err(_), _) if faulted => {
                self.stats.resizes_refused += 1;
                self.restore(old)?;
            }
            (Err(e), None) => return Err(self.fail_as("load", format!("{what} refused: {e}"))),
            (Err(e), Some((errno, why))) => {
                return Err(self.fail_as(
                    "load",
                    format!("{what} refused with {e}; the kernel refuses it with {errno} ({why})"),
                ))
            }
        }
        Ok(())
    }

    /// Whether the kernel refuses a table on `cache` and `origin` blocks
    /// after the clean shutdown just written, read from the metadata: the
    /// errno and why.
    fn resize_refusal(&mut self, cache: u64, origin: u64) -> Option<(Errno, String)> {
        let blocks = self.cache_blocks as u32;
        let md = self.cache().metadata();
        let clean = md.clean_when_opened();
        let mut past_origin = None;
        for cb in 0..blocks {
            // The stored dirty bits are the in-core ones now (v2: clear for
            // unmapped blocks).
            let Ok(Some((oblock, dirty))) = md.lookup(cb) else { continue };
            if u64::from(cb) >= cache {
                if dirty {
                    return Some((Errno::EINVAL, format!("cache block {cb} is dirty")));
                }
                continue;
            }
            if oblock >= origin && (dirty || !clean) && past_origin.is_none() {
                let how = if dirty { "dirty" } else { "loads dirty (the metadata was opened unclean)" };
                past_origin =
                    Some((Errno::EFBIG, format!("cache block {cb} maps origin block {oblock} and {how}")));
            }
        }
        past_origin
    }

    /// After a refused resize: the old table again, on the old sizes. A
    /// refusal that set NEEDS_CHECK leaves metadata no table loads on:
    /// the device is removed, the flag cleared (as `cache_check
    /// --clear-needs-check-flag` does) and the device created again.
    fn restore(&mut self, (cache, origin): (u64, u64)) -> Result<(), ThinFailure> {
        if !self.cache().is_suspended() {
            // The new table's constructor refused it: the old one resumed.
            return Ok(());
        }
        let sizes = self.sizes(cache, origin);
        let line = self.cfg.table_line(self.io_mode, self.policy);
        let c = self.cache.take().expect("cache");
        let (c, r) = match c.reload_sized(&line, sizes) {
            Ok(x) => x,
            Err(f) => return Err(self.fail_as("load", format!("the old table does not load: {}", f.error))),
        };
        self.cache = Some(c);
        self.observe();
        match r {
            Ok(()) => Ok(()),
            Err(_) if self.metadata_faults_fired > 0 => {
                // Injected faults may keep the metadata unreadable: the
                // device is removed and loaded again from what the disks
                // hold, their writes all kept (a crash that loses nothing;
                // the disks forget their armed faults).
                self.crash(CrashMode::KeepAll, 0)
            }
            Err(e) if e.message.contains("check/repair") => self.recreate(sizes),
            Err(e) => Err(self.fail_as("load", format!("the old table ({line}) does not load again: {e}"))),
        }
    }

    /// Removes the cache, repairs its metadata (NEEDS_CHECK cleared) and
    /// creates it again on the same disks, in writeback mode if
    /// passthrough cannot load (every mapping loads dirty now).
    fn recreate(&mut self, sizes: DeviceSizes) -> Result<(), ThinFailure> {
        self.stats.repairs += 1;
        let c = self.cache.take().expect("cache");
        let (metadata, cd, od) = c.close();
        let opts = OpenOptions::new(self.cfg.block_sectors as u32, self.cfg.metadata_version);
        let repaired = CacheMetadata::open(metadata, opts).and_then(|mut md| {
            md.clear_needs_check();
            md.commit(false)?;
            Ok(md.close())
        });
        let m = repaired.map_err(|e| self.fail_as("load", format!("repairing the metadata: {e}")))?;
        let mut line = self.cfg.table_line(self.io_mode, self.policy);
        let backup = (m.clone(), cd.clone(), od.clone());
        let mut r = Cache::create_sized(&line, sizes, m, cd, od, self.now, self.cfg.options);
        if matches!(&r, Err(e) if e.message.contains("passthrough")) {
            self.io_mode = CacheIoMode::Writeback;
            line = self.cfg.table_line(self.io_mode, self.policy);
            let (m, cd, od) = backup;
            r = Cache::create_sized(&line, sizes, m, cd, od, self.now, self.cfg.options);
        }
        let c =
            r.map_err(|e| self.fail_as("load", format!("the repaired cache does not load ({line}): {e}")))?;
        self.cache = Some(c);
        self.observe();
        Ok(())
    }

    /// After a clean shutdown with no fault injected: every block the
    /// metadata records as clean may be dropped from the cache at any time,
    /// so what the origin holds for it must be what a read may return now.
    /// The origin's bytes are judged by the oracle as a read of the block.
    /// (They need not equal the cache's: two overlapping writes in flight
    /// together may land in opposite orders on the two devices in
    /// writethrough mode, and either result is legal.)
    fn check_clean_blocks(&mut self) -> Result<(), ThinFailure> {
        if self.faults_fired > 0 || self.mode != CacheMode::Write {
            return Ok(());
        }
        let bs = self.cfg.block_sectors;
        let blocks = self.cache_blocks as u32;
        let mut clean = Vec::new();
        {
            let c = self.cache();
            for cb in 0..blocks {
                // Clean on disk and in core (after a crash every block
                // loads dirty while its stored bit may still say clean).
                let dirty_in_core = c.target().is_dirty(cb);
                if let (Ok(Some((oblock, false))), false) = (c.metadata().lookup(cb), dirty_in_core) {
                    let len = (bs * SECTOR_SIZE) as usize;
                    let os = (oblock * bs * SECTOR_SIZE) as usize;
                    let cs = (u64::from(cb) * bs * SECTOR_SIZE) as usize;
                    let origin = c.origin_device().visible().range(os..os + len);
                    let cached = c.cache_device().visible().range(cs..cs + len);
                    if origin != cached {
                        clean.push((cb, oblock, origin, cached));
                    }
                }
            }
        }
        self.stats.clean_checks += 1;
        for (cb, oblock, origin, cached) in clean {
            // Judged without a read: a read would settle the oracle's
            // choice between overlapping writes.
            for (i, content) in stamp::decode(&origin).into_iter().enumerate() {
                let sector = oblock * bs + i as u64;
                let legal = self.oracle.legal(DEV, sector);
                let ok = legal.contains(&Content::Anything)
                    || match content {
                        SectorContent::Zeroes => legal.contains(&Content::Zeroes),
                        SectorContent::Stamp(st) => {
                            st.run == self.cfg.run
                                && st.device == DEV
                                && st.sector == sector
                                && legal.contains(&Content::Write(st.write))
                        }
                        SectorContent::Foreign => false,
                    };
                if !ok {
                    return Err(self.fail_as(
                        "devices",
                        format!(
                            "cache block {cb} is clean for origin block {oblock}, but origin sector {sector} \
                             holds {content:?}, which no read may return (legal: {legal:?}): cache [{}], origin [{}]",
                            summarize(&cached),
                            summarize(&origin)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn crash(&mut self, mode: CrashMode, seed: u32) -> Result<(), ThinFailure> {
        self.stats.crashes += 1;
        let c = self.cache.take().expect("cache");
        let k = c.counters();
        for i in 0..3 {
            self.before_crash[i] += k.succeeded[i];
        }
        self.before_crash[3] += k.overwrites;
        self.before_crash[4] += k.commits;
        let (metadata, cache, origin) = c.crash();
        let (m_image, m) = metadata.crash_state(mode, seed);
        let (c_image, cs) = cache.crash_state(mode, seed ^ 0x9e37_79b9);
        let (o_image, os) = origin.crash_state(mode, seed ^ 0x7f4a_7c15);
        self.coverage.record_crash(mode, &m);
        self.coverage.record_crash(mode, &cs);
        self.coverage.record_crash(mode, &os);
        self.events.push(Event::Crashed {
            metadata: (m.kept, m.unflushed),
            data: (cs.kept + os.kept, cs.unflushed + os.unflushed),
            torn: m.torn || cs.torn || os.torn,
        });
        self.pending.clear();
        self.oracle.crash();
        // The last commit may predate a shortened origin (mappings past
        // its end are dropped at the next one): only the disk bounds them.
        let disk_blocks = o_image.len() as u64 / SECTOR_SIZE / self.cfg.block_sectors;
        self.judge_metadata(m_image.clone(), "the metadata after a crash", true, disk_blocks)?;
        let (m_image, repaired) = self.repair_needs_check(m_image)?;
        if repaired {
            // Its leaks were counted in the crash state.
            self.judge_metadata(
                m_image.clone(),
                "the metadata after its NEEDS_CHECK repair",
                false,
                disk_blocks,
            )?;
        }
        self.debian_check(&m_image, true)?;
        let mut line = self.cfg.table_line(self.io_mode, self.policy);
        let devices = |m: &[u8], c: &[u8], o: &[u8]| {
            (
                SimDisk::from_image(m.to_vec()),
                SimDisk::from_image(c.to_vec()),
                SimDisk::from_image(o.to_vec()),
            )
        };
        let origin_disk = o_image.len() as u64 / SECTOR_SIZE;
        let mut sizes = self.sizes_on(self.cache_blocks, self.origin_blocks, origin_disk);
        let (m, cd, od) = devices(&m_image, &c_image, &o_image);
        let mut r = Cache::create_sized(&line, sizes, m, cd, od, self.now, self.cfg.options);
        if matches!(&r, Err(e) if e.message.contains("passthrough")) {
            // Passthrough needs every block clean on disk; after a crash the
            // stored bits may say otherwise. What a user does: load it in
            // writeback mode (which writes the dirty blocks back).
            self.io_mode = CacheIoMode::Writeback;
            line = self.cfg.table_line(self.io_mode, self.policy);
            let (m, cd, od) = devices(&m_image, &c_image, &o_image);
            r = Cache::create_sized(&line, sizes, m, cd, od, self.now, self.cfg.options);
        }
        if matches!(&r, Err(e) if e.errno == Errno::EFBIG) {
            // A mapping past a shortened origin's end loads dirty after a
            // crash (every mapping does): what a user does is give the
            // table the whole origin disk back.
            self.origin_blocks = origin_disk / self.cfg.block_sectors;
            sizes = self.sizes_on(self.cache_blocks, self.origin_blocks, origin_disk);
            let (m, cd, od) = devices(&m_image, &c_image, &o_image);
            r = Cache::create_sized(&line, sizes, m, cd, od, self.now, self.cfg.options);
        }
        let c = r.map_err(|e| {
            self.fail_as("load", format!("the cache does not load after a crash ({line}): {e}"))
        })?;
        self.cache = Some(c);
        self.mode = CacheMode::Write;
        Ok(())
    }

    /// What an administrator does when a metadata error left NEEDS_CHECK
    /// set: check the metadata (it was, just before this) and clear the
    /// flag (`cache_check --clear-needs-check-flag`), so the cache loads
    /// in write mode again. Returns the image and whether it was repaired.
    fn repair_needs_check(&mut self, image: Vec<u8>) -> Result<(Vec<u8>, bool), ThinFailure> {
        let opts = OpenOptions::new(self.cfg.block_sectors as u32, self.cfg.metadata_version);
        let md = CacheMetadata::open(MemDevice::from_bytes(image.clone()), opts);
        let mut md =
            md.map_err(|e| self.fail_as("load", format!("the metadata after a crash does not open: {e}")))?;
        if !md.needs_check() {
            return Ok((image, false));
        }
        md.clear_needs_check();
        md.commit(false).map_err(|e| self.fail_as("load", format!("clearing needs_check failed: {e}")))?;
        Ok((md.close().into_bytes(), true))
    }

    /// Settles the cache, reads every origin block back through the
    /// oracle, shuts down cleanly, compares clean blocks on both devices,
    /// and checks the final metadata.
    pub fn finish(&mut self) -> Result<(), ThinFailure> {
        let r = catching(|| self.finish_inner()).unwrap_or_else(|e| Err(self.fail_as("model", e)));
        let r = self.check_model().and(r);
        self.observe();
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
            return Err(self.fail(format!("{} requests never completed", self.pending.len())));
        }
        let bs = self.cfg.block_sectors;
        let read_back = if self.final_read_back { self.origin_blocks } else { 0 };
        for b in 0..read_back {
            let ticket = self.oracle_op(|o| o.read_submitted(DEV, b * bs, bs))?;
            self.submit(BioRequest::read(b * bs, bs), Pending::Read(ticket))?;
            self.quiesce()?;
        }
        if !self.pending.is_empty() {
            return Err(self.fail("read-back requests never completed"));
        }
        let r = self.cache().suspend();
        r.map_err(|e| self.fail(format!("suspend: {e}")))?;
        self.observe();
        self.check_clean_blocks()?;
        let image = self.metadata_image();
        // After the clean shutdown no mapping is past the origin's end.
        let origin_blocks = self.origin_blocks;
        self.judge_metadata(image.clone(), "the final metadata", true, origin_blocks)?;
        self.debian_check(&image, false)
    }

    /// Debian's `cache_check` on `image` (a recovery's when `recovery`,
    /// else the final one), if it is to run there; the model's checker has
    /// accepted the image. Not run on an image of 0 cache blocks: 0.9.0
    /// rejects one, and the kernel writes one (a crash before the first
    /// commit after formatting keeps it).
    fn debian_check(&mut self, image: &[u8], recovery: bool) -> Result<(), ThinFailure> {
        let Some(check) = &self.cache_check else { return Ok(()) };
        if recovery && !check.at_recoveries {
            return Ok(());
        }
        let sb = &image[..image.len().min(BLOCK_SIZE)];
        if sb.len() < BLOCK_SIZE || CacheSuperblock::decode(sb).cache_blocks == 0 {
            return Ok(());
        }
        self.run_cache_check(image).map(|_| ())
    }

    /// Debian's `cache_check` on `image`, if it is set
    /// ([`Self::set_cache_check`]), wherever it is to run: `Ok(true)` when
    /// it accepts the image, `Ok(false)` when it is not set, a failure of
    /// kind `cache_check` with its output when it rejects the image (for
    /// the caller to return or record). Recoveries and the end of the run
    /// come here.
    pub fn run_cache_check(&mut self, image: &[u8]) -> Result<bool, ThinFailure> {
        let Some(check) = &self.cache_check else { return Ok(false) };
        let tool = check.tool.clone();
        self.cache_checked += 1;
        let args: &[&str] = if hints_sized_otherwise(image) { &["--skip-hints"] } else { &CACHE_CHECK_ARGS };
        run_checker(&tool, args, image, self.cfg.run).map_err(|e| self.fail_as("cache_check", e))?;
        Ok(true)
    }

    /// The cache metadata checker on an image. After an injected metadata
    /// fault, leaked metadata blocks are counted rather than failed: an
    /// I/O error in the middle of a clean shutdown or a commit can leave
    /// blocks counted that nothing references (whether the kernel's
    /// abort path does the same is not yet shown).
    /// `count_leaks`: add the leaks to the counters (false for an image
    /// whose leaks were counted already); `origin_blocks` bounds the
    /// mappings' origin blocks.
    fn judge_metadata(
        &mut self,
        image: Vec<u8>,
        what: &str,
        count_leaks: bool,
        origin_blocks: u64,
    ) -> Result<(), ThinFailure> {
        let mut dev = MemDevice::from_bytes(image);
        let opts = CacheCheckOptions { origin_blocks: Some(origin_blocks), ..CacheCheckOptions::default() };
        let report = check_cache_metadata(&mut dev, &opts)
            .map_err(|e| self.fail_as("checker", format!("{what} is not readable cache metadata: {e}")))?;
        // Damage fails; so does a leak, unless a metadata fault may explain
        // it. Other non-fatal findings (dirty bits of unmapped blocks, which
        // every unclean shutdown can leave) do not.
        let faulted = self.metadata_faults_fired > 0;
        let leak = |p: &&Problem| p.message.starts_with("leaked");
        let leaks = report.problems.iter().filter(|p| faulted && leak(p)).count();
        let damage: Vec<_> = report
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Damage || (!faulted && leak(p)))
            .collect();
        if count_leaks {
            self.stats.leaked_after_fault += leaks as u64;
        }
        match damage.first() {
            None => Ok(()),
            Some(first) => Err(self.fail_as(
                "checker",
                format!(
                    "{what}: {} problems, first: {} block {:?}: {}",
                    damage.len(),
                    first.structure,
                    first.block,
                    first.message
                ),
            )),
        }
    }
}
