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

use std::collections::BTreeMap;
use std::fmt;

use dmsim_faults::SimDisk;
use dmsim_model::block_device::{MemDevice, SECTOR_SIZE};
use dmsim_model::errno::Errno;
use dmsim_model::thin::check::{check_thin_metadata, CheckOptions, Structure};
use dmsim_model::thin::metadata::ThinId;
use dmsim_model::thin::mode::PoolMode;
use dmsim_model::thin::pool::{BioId, BioRequest, Completion, Pool, PoolOptions};
use dmsim_model::thin::table::{PoolFeatures, PoolTable};
use dmsim_traces::stamp;
use rand::Rng;

use crate::oracle::{DevId, IoTicket, Oracle, OracleConfig};

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

/// One step of a workload. Device and position fields are taken modulo
/// what exists, so every value is meaningful.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThinOp {
    /// Write `nr_sectors` (at least 1) at `sector` of a device.
    Write {
        /// Index into the live devices.
        dev: u8,
        /// First sector (modulo the device size).
        sector: u32,
        /// Length (clamped to the device end).
        nr_sectors: u16,
        /// REQ_FUA.
        fua: bool,
        /// REQ_PREFLUSH.
        preflush: bool,
    },
    /// Read a range of a device.
    Read {
        /// Index into the live devices.
        dev: u8,
        /// First sector.
        sector: u32,
        /// Length.
        nr_sectors: u16,
    },
    /// Discard a range of a device.
    Discard {
        /// Index into the live devices.
        dev: u8,
        /// First sector.
        sector: u32,
        /// Length.
        nr_sectors: u32,
    },
    /// An empty flush to a device.
    Flush {
        /// Index into the live devices.
        dev: u8,
    },
    /// `create_thin` with the next id, then activate it.
    CreateThin,
    /// Quiesce, then `create_snap` of a live device with the next id.
    CreateSnap {
        /// Index into the live devices.
        origin: u8,
    },
    /// Quiesce, deactivate and `delete` a device.
    Delete {
        /// Index into the live devices.
        dev: u8,
    },
    /// One worker pass.
    Worker,
    /// Complete one in-flight data I/O (index modulo the number in flight).
    Complete {
        /// Which one.
        pick: u8,
    },
    /// Advance simulated time.
    Tick {
        /// By this many milliseconds.
        millis: u16,
    },
    /// Power cut: only durable data survives; the pool is reloaded.
    Crash,
}

/// What went wrong in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinFailure {
    /// Index of the operation during which it showed (`ops.len()` for
    /// the final checks).
    pub step: usize,
    /// What happened.
    pub what: String,
}

impl fmt::Display for ThinFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {}: {}", self.step, self.what)
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
    /// Data blocks the final check found leaked by a crash (expected:
    /// see [`ThinSim::check_metadata`]).
    pub leaked_after_crash: u64,
    /// Data blocks the final check found counted more often than mapped
    /// (but mapped) after a crash (expected: see [`ThinSim::check_metadata`]).
    pub over_counted_after_crash: u64,
}

enum Pending {
    Write(IoTicket, Option<IoTicket>),
    Read(IoTicket),
    Discard(IoTicket),
    Flush(IoTicket),
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
    stats: ThinStats,
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

impl ThinSim {
    /// A fresh pool with no thin devices; the data device is full of
    /// [`DATA_GARBAGE`].
    pub fn new(cfg: ThinSimConfig) -> Self {
        let metadata = SimDisk::new(cfg.metadata_sectors);
        let data_bytes = (cfg.data_blocks * cfg.block_sectors * SECTOR_SIZE) as usize;
        let data = SimDisk::from_image(vec![DATA_GARBAGE; data_bytes]);
        let pool =
            Pool::create(table(&cfg), cfg.data_blocks * cfg.block_sectors, metadata, data, cfg.options)
                .expect("a fresh pool loads");
        let oracle = Oracle::new(OracleConfig {
            run: cfg.run,
            sectors_per_block: cfg.block_sectors,
            zeroing: !cfg.features.skip_block_zeroing,
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
        }
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
        ThinFailure { step: self.step, what: what.into() }
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

    /// Applies one operation.
    pub fn apply(&mut self, op: &ThinOp) -> Result<(), ThinFailure> {
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
                self.message(&format!("create_thin {id}"))?;
                self.next_id += 1;
                self.oracle_op(|o| o.create_thin(id as DevId, size))?;
                self.activate(id)?;
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
                self.message(&format!("create_snap {id} {origin}"))?;
                self.next_id += 1;
                self.oracle_op(|o| o.create_snap(id as DevId, origin as DevId))?;
                self.activate(id)?;
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
                self.message(&format!("delete {dev}"))?;
                self.devices.retain(|&d| d != dev);
                self.oracle_op(|o| o.delete(dev as DevId))?;
            }
            ThinOp::Worker => {
                self.pool().run_worker();
                self.collect()?;
            }
            ThinOp::Complete { pick } => {
                let io = self.pool().in_flight_io();
                if !io.is_empty() {
                    let id = io[pick as usize % io.len()].id;
                    self.pool().complete_io(id).map_err(|e| self.fail(e.to_string()))?;
                    self.stats.data_ios += 1;
                    self.collect()?;
                }
            }
            ThinOp::Tick { millis } => {
                self.now += u64::from(millis) * 1_000_000;
                self.pool().set_time(self.now);
                self.collect()?;
            }
            ThinOp::Crash => self.crash()?,
        }
        Ok(())
    }

    fn metadata_writable(&self) -> bool {
        self.pool().mode() < PoolMode::OutOfMetadataSpace
    }

    fn oracle_op<T, E: fmt::Display>(
        &mut self,
        f: impl FnOnce(&mut Oracle) -> Result<T, E>,
    ) -> Result<T, ThinFailure> {
        f(&mut self.oracle).map_err(|e| ThinFailure { step: self.step, what: format!("oracle misuse: {e}") })
    }

    fn message(&mut self, text: &str) -> Result<(), ThinFailure> {
        self.stats.messages += 1;
        self.pool().message(text).map_err(|e| self.fail(format!("message {text:?} failed: {e}")))
    }

    fn activate(&mut self, id: ThinId) -> Result<(), ThinFailure> {
        let size = self.thin_sectors();
        self.pool().activate_thin(id, size).map_err(|e| self.fail(format!("activate {id}: {e}")))?;
        self.devices.push(id);
        Ok(())
    }

    fn submit(&mut self, dev: ThinId, req: BioRequest, pending: Pending) -> Result<(), ThinFailure> {
        self.stats.bios += 1;
        let id = self.pool().submit(dev, req).map_err(|e| self.fail(format!("submit to {dev}: {e}")))?;
        self.pending.insert(id, pending);
        self.collect()
    }

    /// Hands finished requests to the oracle.
    fn collect(&mut self) -> Result<(), ThinFailure> {
        for c in self.pool().take_completions() {
            self.completed(c)?;
        }
        Ok(())
    }

    fn completed(&mut self, c: Completion) -> Result<(), ThinFailure> {
        let Some(pending) = self.pending.remove(&c.id) else {
            return Err(self.fail(format!("request {:?} completed twice or was never submitted", c.id)));
        };
        let ok = c.result.is_ok();
        match c.result {
            Ok(()) => {}
            Err(Errno::ENOSPC) => self.stats.enospc += 1,
            Err(e) if self.pool().mode() >= PoolMode::OutOfMetadataSpace => {
                let _ = e;
            }
            Err(e) => {
                return Err(self.fail(format!(
                    "request {:?} on device {} failed with {e} in {} mode and no fault injected",
                    c.id,
                    c.thin,
                    self.pool().mode()
                )))
            }
        }
        match pending {
            Pending::Write(write, flush) => {
                if let Some(flush) = flush {
                    self.oracle_op(|o| o.flush_completed(flush, ok))?;
                }
                self.oracle_op(|o| o.write_completed(write, ok))?;
            }
            Pending::Read(ticket) => {
                self.stats.reads_checked += u64::from(ok);
                let r = self.oracle.read_completed(ticket, ok, &c.data);
                if let Err(e) = r {
                    return Err(self.fail(format!("oracle: {e}")));
                }
            }
            Pending::Discard(ticket) => self.oracle_op(|o| o.discard_completed(ticket, ok))?,
            Pending::Flush(ticket) => self.oracle_op(|o| o.flush_completed(ticket, ok))?,
        }
        Ok(())
    }

    /// Runs the worker and completes data I/O, oldest first, until nothing
    /// moves. Requests waiting for data space stay queued.
    pub fn quiesce(&mut self) -> Result<(), ThinFailure> {
        for _ in 0..1_000_000 {
            self.collect()?;
            let pool = self.pool();
            if pool.worker_wanted() {
                pool.run_worker();
                continue;
            }
            match pool.in_flight_io().first() {
                Some(io) => {
                    let id = io.id;
                    pool.complete_io(id).map_err(|e| self.fail(e.to_string()))?;
                    self.stats.data_ios += 1;
                }
                None => return self.collect(),
            }
        }
        Err(self.fail("the pool never settled"))
    }

    fn crash(&mut self) -> Result<(), ThinFailure> {
        self.stats.crashes += 1;
        let pool = self.pool.take().expect("pool present");
        let (metadata, data) = pool.crash();
        let metadata = SimDisk::from_image(metadata.durable().to_vec());
        let data = SimDisk::from_image(data.durable().to_vec());
        let len = self.cfg.data_blocks * self.cfg.block_sectors;
        let pool = Pool::create(table(&self.cfg), len, metadata, data, self.cfg.options)
            .map_err(|e| self.fail(format!("the pool does not load after a crash: {e}")))?;
        pool.set_time(self.now);
        self.pool = Some(pool);
        self.pending.clear();
        self.oracle.crash();
        let size = self.thin_sectors();
        for &dev in &self.devices {
            self.pool.as_ref().expect("just set").activate_thin(dev, size).map_err(|e| ThinFailure {
                step: self.step,
                what: format!("device {dev} lost in a crash: {e}"),
            })?;
        }
        Ok(())
    }

    /// Settles the pool (past the no-space timeout if requests still wait
    /// for space), reads every live device back in full through the
    /// oracle, and checks the committed metadata.
    pub fn finish(&mut self) -> Result<(), ThinFailure> {
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

    /// Commits (through a status query, as `dmsetup status` would) and runs
    /// the independent checker on the metadata image.
    pub fn check_metadata(&mut self) -> Result<(), ThinFailure> {
        let pool = self.pool();
        let _ = pool.status(false);
        let image =
            pool.with_metadata(|md| md.transaction_manager().block_manager().device().visible().to_vec());
        let mut dev = MemDevice::from_bytes(image);
        let crashed = self.stats.crashes > 0;
        match check_thin_metadata(&mut dev, &CheckOptions::default()) {
            Ok(report) => {
                // A data block allocated for a mapping still being prepared
                // is counted by any commit that happens meanwhile (a message,
                // the timer); a crash before the mapping's own commit leaves
                // it leaked. The kernel does the same, and thin_check calls
                // leaks non-fatal: allowed after a crash, nothing else is.
                //
                // Likewise a passdown discard holds an extra count on its data
                // blocks between its two passes; a commit in between (another
                // device's flush, the timer, an allocation) persists it, and a
                // crash before the second pass's commit leaves the blocks
                // counted once too often: a leak thin_check calls damage.
                let (leaks, other): (Vec<_>, Vec<_>) = report.problems.iter().partition(|p| {
                    crashed && p.structure == Structure::DataSpaceMap && over_counted(&p.message)
                });
                for p in &leaks {
                    if p.message.ends_with("expected 0") {
                        self.stats.leaked_after_crash += 1;
                    } else {
                        self.stats.over_counted_after_crash += 1;
                    }
                }
                if other.is_empty() {
                    Ok(())
                } else {
                    Err(self.fail(format!("metadata checker: {other:?}")))
                }
            }
            Err(e) => Err(self.fail(format!("metadata checker could not read the image: {e}"))),
        }
    }
}

/// Whether a checker problem says a data block is counted more often than
/// it is referenced ("block B count on disk N, expected M" with N > M).
fn over_counted(message: &str) -> bool {
    let number_after = |tag: &str| -> Option<u64> {
        let rest = &message[message.find(tag)? + tag.len()..];
        rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    matches!((number_after("count on disk "), number_after("expected ")), (Some(n), Some(m)) if n > m)
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
            _ if crashes => ThinOp::Crash,
            _ => ThinOp::Worker,
        };
        ops.push(op);
    }
    ops
}
