//! Replay of cache campaign traces on the kernel's dm-cache, judged by the
//! oracle and held against the serialized simulator.
//!
//! A cache trace (`dmsim_sim::cache_run`, workload `cache-…`) becomes a
//! cache job ([`plan`]): the trace header's cache (block size, cache and
//! origin sizes, metadata version, first mode, migration threshold), a
//! fresh metadata device, the cache device full of the simulator's garbage
//! byte, a zeroed origin; the trace's requests one at a time (reads,
//! writes with FUA and PREFLUSH, discards, flushes), its ticks as plain
//! sleeps (at most [`MAX_TICK_MS`]), its reloads (a table swap on the same devices), invalidations
//! and status queries; then every origin block read back. The simulator's
//! scheduling ops (worker passes, completions) are dropped: the kernel
//! schedules itself. Crashes and injected faults are refused: a serialized
//! replay cannot place them. The crash states of a trace come from a
//! replay on controlled disks instead ([`ublk_plan`],
//! [`crate::cache_crash`]).
//!
//! [`judge`] holds the kernel's run at three levels:
//!
//! - **L1**: every read the kernel returned (during the ops and the final
//!   read-back) is one the oracle allows after the same requests, one at a
//!   time — the data is the user's to see, whatever the cache decided;
//!   also counted: the reads identical to the serialized simulator's;
//! - **L2**: the same cache contents on disk after the clean shutdown —
//!   the same cache blocks mapping the same origin blocks with the same
//!   dirty bits (what `cache_dump` prints), kernel against simulator;
//! - **L3**: byte-identical metadata images.
//!
//! L1 must hold; L2 and L3 are reported. The kernel's smq runs on real
//! time (its periods, the waker, the idle rule for writeback); the
//! serialized simulator follows the kernel's clock (the agent reports when
//! each op ended), but its worker, migrations and waker still run at other
//! moments than the kernel's, so their promotion and demotion decisions may
//! part; L2 measures how often they do not.

use std::collections::BTreeMap;

use dmsim_faults::FaultSwarm;
use dmsim_model::block_device::MemDevice;
use dmsim_model::cache::inspect::read_image;
use dmsim_model::cache::mapping::discard_geometry;
use dmsim_sim::cache_run::CacheRunConfig;
use dmsim_sim::cache_sim::{CacheSim, CACHE_GARBAGE};
use dmsim_sim::oracle::{IoTicket, Oracle, OracleConfig};
use dmsim_sim::run::MAX_DISK_SECTORS;
use dmsim_traces::op::CachePolicyKind;
use dmsim_traces::{stamp, Event, Op, Trace};

use crate::error::ShimError;
use crate::protocol::{
    cache_status_field, CacheSpec, KernelResult, CACHE_SETTLE_PARAM, CACHE_TICKS_SLEEP_ONLY_PARAM,
    JIFFY_PHASE, OP_END_PREFIX,
};
use crate::vm::{Job, KernelRun};

/// The longest sleep a replayed tick becomes, in milliseconds.
pub const MAX_TICK_MS: u16 = 100;

/// A cache trace made into a kernel job.
#[derive(Debug, Clone)]
pub struct CachePlan {
    /// The trace's configuration.
    pub cfg: CacheRunConfig,
    /// The job's ops (the trace's requests and table operations, then the
    /// read-back), in order; the kernel's results come back per op.
    pub ops: Vec<Op>,
    /// The job.
    pub job: Job,
}

/// The kernel job of a cache trace; an error saying why for a trace the
/// serialized replay cannot take (a crash or a fault op, a block size the
/// shim's layout does not take, the cleaner as first policy,
/// `no_discard_passdown`).
pub fn plan(trace: &Trace) -> Result<CachePlan, ShimError> {
    plan_with(trace, false, false)
}

/// [`plan`], with the kernel's background work settled after every op
/// ([`CACHE_SETTLE_PARAM`]): its migrations then happen between ops, as
/// the serialized simulator's do, and [`judge`] follows the kernel's
/// counters op by op ([`CacheReplayReport::first_divergence`]).
pub fn settled_plan(trace: &Trace) -> Result<CachePlan, ShimError> {
    plan_with(trace, true, false)
}

/// [`plan`]; with `settle`, see [`settled_plan`]; with `faults`, the
/// trace's `fault` ops on the metadata, cache and origin disks are taken
/// (armed on controlled disks: [`ublk_plan`]).
fn plan_with(trace: &Trace, settle: bool, faults: bool) -> Result<CachePlan, ShimError> {
    let cfg = CacheRunConfig::from_header(&trace.header).map_err(ShimError::Invalid)?;
    let c = &cfg.cache;
    if !c.block_sectors.is_multiple_of(128) {
        return Err(ShimError::Invalid(format!(
            "cache block size {} sectors: kernel replay needs a multiple of 128 (the shim's disk layout)",
            c.block_sectors
        )));
    }
    if !c.discard_passdown {
        return Err(ShimError::Invalid(
            "kernel replay of no_discard_passdown caches is not available yet".into(),
        ));
    }
    if c.policy != CachePolicyKind::Smq {
        return Err(ShimError::Invalid("kernel replay needs smq as the first policy".into()));
    }
    let mut ops = Vec::new();
    let bs = c.block_sectors;
    // The largest cache and origin the trace's resizes ask for (clamped as
    // the simulator clamps them): the job's disks.
    let max = MAX_DISK_SECTORS / bs;
    let (mut cache_disk, mut origin_disk) = (c.cache_blocks, c.origin_blocks);
    for (i, op) in trace.ops().enumerate() {
        match op {
            // Ticks are real sleeps in the VM, capped at a tenth of a
            // second so a replay takes seconds, not minutes (the kernel's
            // smq then sees less time pass than the simulator's: one
            // reason L2 may differ).
            Op::Tick { millis } => ops.push(Op::Tick { millis: millis.min(MAX_TICK_MS) }),
            Op::Read { .. }
            | Op::Write { .. }
            | Op::Discard { .. }
            | Op::Flush { .. }
            | Op::Reload { .. }
            | Op::Invalidate { .. }
            | Op::Status => ops.push(op),
            Op::Worker | Op::Complete { .. } => {}
            Op::Resize { cache_blocks, origin_blocks } => {
                cache_disk = cache_disk.max(u64::from(cache_blocks).clamp(1, max));
                origin_disk = origin_disk.max(u64::from(origin_blocks).clamp(1, max));
                ops.push(op);
            }
            Op::Fault { disk, .. } if faults && disk != dmsim_traces::DiskId::Data => ops.push(op),
            Op::Crash { .. } | Op::Fault { .. } | Op::FailIo { .. } => {
                return Err(ShimError::Invalid(format!(
                    "op {i} ({}): the serialized kernel replay of cache traces takes no crashes or faults{}",
                    op.name(),
                    if faults {
                        " but faults on its metadata, cache or origin disk"
                    } else {
                        " (faults: on controlled disks only)"
                    }
                )))
            }
            Op::CreateThin
            | Op::CreateSnap { .. }
            | Op::Delete { .. }
            | Op::GrowMetadata { .. }
            | Op::AimFault { .. } => {
                return Err(ShimError::Invalid(format!("op {i} ({}) belongs to thin traces", op.name())))
            }
        }
    }
    // Every block read back (of the largest origin: a smaller last one
    // wraps around, as every op's sector does).
    for b in 0..origin_disk {
        ops.push(Op::Read { dev: 0, sector: (b * bs) as u32, nr_sectors: bs as u16 });
    }
    let spec = CacheSpec {
        run: c.run,
        block_sectors: bs,
        cache_blocks: c.cache_blocks,
        origin_blocks: c.origin_blocks,
        metadata_sectors: c.metadata_sectors.max(2048),
        metadata2: c.metadata_version == 2,
        mode: c.io_mode.name().to_string(),
        migration_threshold: Some(c.migration_threshold),
        disk_blocks: ((cache_disk, origin_disk) != (c.cache_blocks, c.origin_blocks))
            .then_some((cache_disk, origin_disk)),
    };
    let mut job = Job::cache(
        &spec,
        ops.clone(),
        vec![0; (spec.metadata_sectors * 512) as usize],
        vec![CACHE_GARBAGE; (spec.cache_disk_sectors() * 512) as usize],
        vec![0; (spec.origin_disk_sectors() * 512) as usize],
    );
    if let Job::Cache { trace, .. } = &mut job {
        trace.header.params.push((CACHE_TICKS_SLEEP_ONLY_PARAM.into(), "1".into()));
        if settle {
            trace.header.params.push((CACHE_SETTLE_PARAM.into(), "1".into()));
        }
    }
    Ok(CachePlan { cfg, ops, job })
}

/// How a kernel run of a cache trace compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheReplayReport {
    /// Reads judged (the trace's and the read-back's).
    pub reads: usize,
    /// L1: the kernel's reads the oracle does not allow (empty: L1 holds).
    pub l1_violations: Vec<String>,
    /// Reads identical to the serialized simulator's.
    pub reads_as_simulated: usize,
    /// Requests the kernel failed (every one should succeed).
    pub failed_requests: Vec<String>,
    /// L2: the same (cache block, origin block, dirty) triples on disk.
    pub l2_identical: bool,
    /// L2's difference, if any: (kernel, simulator) mappings.
    pub l2_difference: Option<(String, String)>,
    /// Whether the two caches hold the same (cache block, origin block)
    /// mappings, dirty bits aside (an L2 difference only in what was
    /// written back).
    pub same_blocks: bool,
    /// L3: byte-identical metadata images.
    pub l3_identical: bool,
    /// When L3 is not identical: what differs, decoded (statistics, flags,
    /// hints, bits, mappings), or the blocks where only the layout does.
    pub l3_difference: Option<String>,
    /// The kernel's last status line.
    pub kernel_status: String,
    /// In a settled run: the first op after which the kernel's counters
    /// (residency, hits, misses, demotions, promotions, dirty blocks)
    /// differ from the serialized simulator's, with both status lines.
    pub first_divergence: Option<(usize, String, String)>,
    /// How many serialized runs following the kernel took, and over how
    /// many tick-straddling windows they chose.
    pub follow_runs: (usize, usize),
    /// Each resize's outcome on the kernel and on the serialized simulator
    /// (`ok` or the errno name), in order; with the agent's note when the
    /// kernel's refusal also refused the old table (NEEDS_CHECK set: the
    /// metadata was repaired), as `EINVAL (note)`.
    pub resizes: Vec<(String, String)>,
}

/// The counters of a cache INFO status line that L2 follows: residency,
/// read hits and misses, write hits and misses, demotions, promotions,
/// dirty blocks.
fn counters(line: &str) -> Vec<Option<&str>> {
    (3..=10).map(|i| cache_status_field(line, i)).collect()
}

/// Every sector's bytes as a read summary describes them (see
/// [`crate::protocol::summarize`]): stamps rebuilt exactly, zeroes, foreign bytes for `?`,
/// a stamp of another run for `x`.
pub(crate) fn expand(summary: &str, run: u64, first_sector: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut sector = first_sector;
    for token in summary.split_whitespace() {
        let (what, n) = token.rsplit_once('*').ok_or_else(|| format!("bad read summary token {token:?}"))?;
        let n: u64 = n.parse().map_err(|_| format!("bad read summary token {token:?}"))?;
        for _ in 0..n {
            let mut buf = vec![0u8; 512];
            match what {
                "0" => {}
                "?" => buf.fill(CACHE_GARBAGE),
                "x" => stamp::fill(&mut buf, run.wrapping_add(1), 0, 0, sector),
                w => {
                    let w = w.strip_prefix('w').ok_or_else(|| format!("bad read summary token {token:?}"))?;
                    let (write, at) = match w.split_once("@s") {
                        Some((a, b)) => (a, b.parse().map_err(|_| format!("bad token {token:?}"))?),
                        None => (w, sector),
                    };
                    let write: u64 =
                        write.parse().map_err(|_| format!("bad read summary token {token:?}"))?;
                    stamp::fill(&mut buf, run, write, 0, at);
                }
            }
            out.extend_from_slice(&buf);
            sector += 1;
        }
    }
    Ok(out)
}

/// The (cache block → (origin block, dirty)) mappings of a cache image.
pub(crate) fn mappings(image: &[u8]) -> Result<BTreeMap<u32, (u64, bool)>, String> {
    let img = read_image(&mut MemDevice::from_bytes(image.to_vec())).map_err(|e| e.to_string())?;
    Ok(img
        .mappings
        .iter()
        .enumerate()
        .filter(|(_, m)| m.valid())
        .map(|(c, m)| (c as u32, (m.oblock, img.is_dirty(c))))
        .collect())
}

/// What feeding one op to the oracle showed.
pub(crate) struct Fed {
    /// A successful read's bytes (rebuilt from the kernel's summary).
    pub(crate) read: Option<Vec<u8>>,
    /// The oracle's objection to that read.
    pub(crate) violation: Option<String>,
    /// A request (read, write, discard, flush) the kernel failed:
    /// `op <i> (<name>): <outcome>`.
    pub(crate) failed: Option<String>,
}

/// The oracle of a cache trace's serialized replay, fed the kernel's
/// results op by op.
pub(crate) struct Feeder {
    pub(crate) oracle: Oracle,
    next_write: u64,
    run: u64,
    /// The table's length now (the resizes the kernel took change it).
    size: u64,
    block_sectors: u64,
}

pub(crate) fn misuse(e: dmsim_sim::oracle::UsageError) -> ShimError {
    ShimError::Invalid(format!("oracle: {e}"))
}

impl Feeder {
    pub(crate) fn new(cfg: &CacheRunConfig) -> Result<Self, ShimError> {
        let c = &cfg.cache;
        let (dbs, _) = discard_geometry(c.block_sectors, c.origin_sectors());
        let mut oracle = Oracle::new(OracleConfig {
            run: c.run,
            sectors_per_block: dbs,
            zeroing: true,
            discard_undefined: true,
        });
        oracle.create_thin(0, c.origin_sectors()).map_err(misuse)?;
        Ok(Feeder {
            oracle,
            next_write: 0,
            run: c.run,
            size: c.origin_sectors(),
            block_sectors: c.block_sectors,
        })
    }

    fn clamp(&self, sector: u32, nr: u64) -> (u64, u64) {
        let sector = u64::from(sector) % self.size;
        (sector, nr.max(1).min(self.size - sector))
    }

    /// Op `i` with the kernel's result `r`: requests submitted and
    /// completed; a read judged with the bytes the kernel returned.
    pub(crate) fn feed(
        &mut self,
        i: usize,
        op: &Op,
        r: &crate::protocol::OpResult,
    ) -> Result<Fed, ShimError> {
        let write = self.next_write;
        let submitted = self.submit(op, write, r.outcome == "ok")?;
        self.complete(i, op, submitted, r)
    }

    /// Op `op` submitted (a write as write number `write`; `ok`: whether
    /// the kernel's answer, known or not yet, is `ok`, for the PREFLUSH a
    /// write carries). `None` for an op that is not a request.
    pub(crate) fn submit(&mut self, op: &Op, write: u64, ok: bool) -> Result<Option<IoTicket>, ShimError> {
        Ok(match *op {
            Op::Write { sector, nr_sectors, fua, preflush, .. } => {
                let (sector, nr) = self.clamp(sector, u64::from(nr_sectors));
                let o = &mut self.oracle;
                self.next_write = self.next_write.max(write + 1);
                if preflush {
                    let t = o.flush_submitted(0).map_err(misuse)?;
                    o.flush_completed(t, ok).map_err(misuse)?;
                }
                Some(o.write_submitted(0, sector, nr, write, fua).map_err(misuse)?)
            }
            Op::Read { sector, nr_sectors, .. } => {
                let (sector, nr) = self.clamp(sector, u64::from(nr_sectors));
                Some(self.oracle.read_submitted(0, sector, nr).map_err(misuse)?)
            }
            Op::Discard { sector, nr_sectors, .. } => {
                let (sector, nr) = self.clamp(sector, u64::from(nr_sectors));
                Some(self.oracle.discard_submitted(0, sector, nr).map_err(misuse)?)
            }
            Op::Flush { .. } => Some(self.oracle.flush_submitted(0).map_err(misuse)?),
            _ => None,
        })
    }

    /// Op `i` (`op`, submitted as `ticket`) completed with the kernel's
    /// result `r`; a read judged with the bytes the kernel returned.
    pub(crate) fn complete(
        &mut self,
        i: usize,
        op: &Op,
        ticket: Option<IoTicket>,
        r: &crate::protocol::OpResult,
    ) -> Result<Fed, ShimError> {
        let ok = r.outcome == "ok";
        let is_request =
            matches!(op, Op::Read { .. } | Op::Write { .. } | Op::Discard { .. } | Op::Flush { .. });
        let failed = (is_request && !ok).then(|| format!("op {i} ({}): {}", op.name(), r.outcome));
        let mut fed = Fed { read: None, violation: None, failed };
        let o = &mut self.oracle;
        match (*op, ticket) {
            (Op::Write { .. }, Some(t)) => o.write_completed(t, ok).map_err(misuse)?,
            (Op::Read { sector, nr_sectors, .. }, Some(t)) => {
                let (sector, nr) = self.clamp(sector, u64::from(nr_sectors));
                let summary = r.read.clone().unwrap_or_default();
                let bytes = if ok {
                    expand(&summary, self.run, sector).map_err(ShimError::Invalid)?
                } else {
                    Vec::new()
                };
                if ok && bytes.len() as u64 != nr * 512 {
                    return Err(ShimError::Invalid(format!(
                        "op {i}: the read summary {summary:?} is not {nr} sectors"
                    )));
                }
                if let Err(e) = self.oracle.read_completed(t, ok, &bytes) {
                    fed.violation =
                        Some(format!("op {i} (read {sector}+{nr}): kernel read [{summary}]: {e}"));
                }
                if ok {
                    fed.read = Some(bytes);
                }
            }
            (Op::Discard { .. }, Some(t)) => o.discard_completed(t, ok).map_err(misuse)?,
            (Op::Flush { .. }, Some(t)) => o.flush_completed(t, ok).map_err(misuse)?,
            (Op::Resize { origin_blocks, .. }, _) if ok => {
                // The origin disk past the old end holds zeroes or what it
                // held before a shrink; the oracle never forgets it.
                let bs = self.block_sectors;
                self.size = u64::from(origin_blocks).clamp(1, MAX_DISK_SECTORS / bs) * bs;
                self.oracle.grow(0, self.size).map_err(misuse)?;
            }
            _ => {}
        }
        Ok(fed)
    }
}

/// Judges a kernel run of `plan` (see the module's documentation).
pub fn judge(plan: &CachePlan, run: &KernelRun) -> Result<CacheReplayReport, ShimError> {
    check_run(plan, run)?;
    judge_followed(plan, run, follow_the_kernel(plan, run)?)
}

/// The run's result covers the plan: no agent error, every op answered.
fn check_run(plan: &CachePlan, run: &KernelRun) -> Result<(), ShimError> {
    let results = &run.result.ops;
    if let Some(e) = &run.result.error {
        return Err(ShimError::Invalid(format!("the agent failed: {e}")));
    }
    if results.len() != plan.ops.len() {
        return Err(ShimError::Invalid(format!(
            "the kernel ran {} ops of {}",
            results.len(),
            plan.ops.len()
        )));
    }
    Ok(())
}

/// [`judge`] with the serialized run that follows the kernel best
/// (`follow_the_kernel`'s) already found.
pub(crate) fn judge_followed(
    plan: &CachePlan,
    run: &KernelRun,
    best: SimRun,
) -> Result<CacheReplayReport, ShimError> {
    check_run(plan, run)?;
    let results = &run.result.ops;
    if let Some(f) = best.end_failure {
        return Err(ShimError::Invalid(f));
    }
    let follow_runs = best.runs;
    let sim_resizes = best.resizes.into_iter();
    let (sim_reads, sim_image, first_divergence) = (best.reads, best.image, best.first_divergence);

    // L1: the oracle, fed the same requests one at a time.
    let mut feeder = Feeder::new(&plan.cfg)?;
    let mut report = CacheReplayReport {
        reads: 0,
        l1_violations: Vec::new(),
        reads_as_simulated: 0,
        failed_requests: Vec::new(),
        l2_identical: false,
        l2_difference: None,
        same_blocks: false,
        l3_identical: false,
        l3_difference: None,
        kernel_status: run.result.pool_status.clone(),
        first_divergence,
        follow_runs,
        resizes: Vec::new(),
    };
    let kernel_resizes =
        plan.ops.iter().zip(results).filter(|(op, _)| matches!(op, Op::Resize { .. })).map(|(_, r)| match &r
            .read
        {
            Some(note) => format!("{} ({note})", r.outcome),
            None => r.outcome.clone(),
        });
    report.resizes = kernel_resizes.zip(sim_resizes.chain(std::iter::repeat(String::new()))).collect();
    for (i, (op, r)) in plan.ops.iter().zip(results).enumerate() {
        let fed = feeder.feed(i, op, r)?;
        report.failed_requests.extend(fed.failed);
        if let Some(bytes) = fed.read {
            report.reads += 1;
            let sim = sim_reads[i].as_deref().unwrap_or("");
            if dmsim_sim::thin::summarize(&bytes) == sim {
                report.reads_as_simulated += 1;
            }
        }
        report.l1_violations.extend(fed.violation);
    }

    // L2 and L3.
    let kernel =
        mappings(&run.metadata_image).map_err(|e| ShimError::Invalid(format!("the kernel's image: {e}")))?;
    let ours = mappings(&sim_image).map_err(|e| ShimError::Invalid(format!("the simulator's image: {e}")))?;
    report.l2_identical = kernel == ours;
    let blocks = |m: &BTreeMap<u32, (u64, bool)>| m.iter().map(|(c, (o, _))| (*c, *o)).collect::<Vec<_>>();
    report.same_blocks = blocks(&kernel) == blocks(&ours);
    if !report.l2_identical {
        report.l2_difference = Some((format!("{kernel:?}"), format!("{ours:?}")));
    }
    report.l3_identical = run.metadata_image.len() >= sim_image.len()
        && run.metadata_image[..sim_image.len()] == sim_image[..]
        && run.metadata_image[sim_image.len()..].iter().all(|&b| b == 0);
    if !report.l3_identical {
        report.l3_difference = Some(l3_difference(&run.metadata_image, &sim_image));
    }
    Ok(report)
}

/// The serialized simulator's durable disks (metadata, cache device,
/// origin) after every op of `plan` that [`crate::durable::is_mark`]
/// names, by op index: the run that follows the kernel's clock best (the search of
/// [`judge`]), run again capturing them. A model whose end the simulator
/// refuses (a deliberate bug its read-back catches) still has its crash
/// states up to there.
pub(crate) fn model_durable_states(
    plan: &CachePlan,
    run: &KernelRun,
    best: &SimRun,
) -> Result<BTreeMap<usize, [Vec<u8>; 3]>, ShimError> {
    let jiffies = Jiffies::of(&run.result);
    Ok(serialized(plan, run, jiffies.as_ref(), &best.choices, true)?.durable)
}

/// [`settled_plan`] on controlled disks ([`crate::protocol::CACHE_UBLK_PARAM`]):
/// the cache's three devices served by the agent through ublk, their
/// durable state recorded after every FLUSH, FUA or PREFLUSH write;
/// [`crate::cache_crash::judge_ublk_crash_states`] judges them. Needs a
/// shim prepared with the ublk module; takes no resizes (the crash states
/// are loaded on the first table's sizes). A `fault` op on the metadata,
/// cache or origin disk is armed on that controlled disk as the simulator
/// arms its own (the disk's next request of the fault's kind); the faults
/// that fired are the run's `fired.<op>` notes.
pub fn ublk_plan(trace: &Trace) -> Result<CachePlan, ShimError> {
    if let Some(i) = trace.ops().position(|op| matches!(op, Op::Resize { .. })) {
        return Err(ShimError::Invalid(format!(
            "op {i} (resize): replays on controlled disks take no resizes yet"
        )));
    }
    let mut p = plan_with(trace, true, true)?;
    if let Job::Cache { trace, .. } = &mut p.job {
        trace.header.params.push((crate::protocol::CACHE_UBLK_PARAM.into(), "1".into()));
    }
    Ok(p)
}

/// What differs between the kernel's metadata image and the simulator's,
/// decoded: the superblock's statistics and flags, the hints, the dirty
/// and discard bits, the mappings (each the first differing entry), or,
/// when all of those agree, where the bytes do (block layout).
fn l3_difference(kernel: &[u8], ours: &[u8]) -> String {
    let decode = |b: &[u8]| read_image(&mut MemDevice::from_bytes(b.to_vec()));
    let (k, o) = match (decode(kernel), decode(ours)) {
        (Ok(k), Ok(o)) => (k, o),
        (k, o) => return format!("an image does not decode: kernel {:?}, simulator {:?}", k.err(), o.err()),
    };
    let mut out = Vec::new();
    let (ks, os) = (&k.superblock, &o.superblock);
    if ks.stats != os.stats {
        out.push(format!("statistics: kernel {:?}, simulator {:?}", ks.stats, os.stats));
    }
    if ks.flags != os.flags {
        out.push(format!("flags: kernel {:#x}, simulator {:#x}", ks.flags, os.flags));
    }
    fn first<T: PartialEq + std::fmt::Debug>(what: &str, a: &[T], b: &[T], out: &mut Vec<String>) {
        if a.len() != b.len() {
            out.push(format!("{what}: {} entries in the kernel's, {} in the simulator's", a.len(), b.len()));
        } else if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
            let n = (0..a.len()).filter(|&i| a[i] != b[i]).count();
            out.push(format!(
                "{what}: {n} entries differ, the first at {i} (kernel {:?}, simulator {:?})",
                a[i], b[i]
            ));
        }
    }
    match (&k.hints, &o.hints) {
        (Some(a), Some(b)) => first("hints", a, b, &mut out),
        (a, b) if a.is_some() != b.is_some() => out.push("a hint array in only one image".into()),
        _ => {}
    }
    first("mappings", &k.mappings, &o.mappings, &mut out);
    first("discard bits", &k.discards, &o.discards, &mut out);
    if let (Some(a), Some(b)) = (&k.dirty, &o.dirty) {
        first("dirty bits", a, b, &mut out);
    }
    if out.is_empty() {
        let block = 4096;
        let n = kernel.len().max(ours.len()).div_ceil(block);
        let at = |img: &[u8], b: usize| {
            img.get(b * block..((b + 1) * block).min(img.len())).unwrap_or(&[]).to_vec()
        };
        let differ: Vec<usize> = (0..n).filter(|&b| at(kernel, b) != at(ours, b)).collect();
        out.push(format!(
            "the decoded contents agree; {} metadata blocks differ (the first: {:?}): block placement",
            differ.len(),
            &differ[..differ.len().min(8)]
        ));
    }
    out.join("; ")
}

/// A cache campaign configuration the serialized kernel replay takes:
/// `seed`'s, with 128-sector blocks, discard passdown, no faults and no
/// forced crashes (not the durability workload).
pub fn replayable_config(seed: u64, ops: usize) -> CacheRunConfig {
    use dmsim_sim::cache_run::{CacheCampaignSettings, CacheWorkload};
    let workloads = [CacheWorkload::Hot, CacheWorkload::Scan, CacheWorkload::Writeback, CacheWorkload::Modes];
    let settings = CacheCampaignSettings {
        workload: Some(workloads[(seed % workloads.len() as u64) as usize]),
        ..CacheCampaignSettings::default()
    };
    let mut cfg = CacheRunConfig::for_seed(seed, ops, &settings);
    cfg.cache.block_sectors = 128;
    cfg.cache.discard_passdown = true;
    cfg.swarm = FaultSwarm::none();
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::summarize;

    #[test]
    fn the_coarse_clock_gives_jiffies_and_the_windows_that_span_a_tick() {
        let t = |k: &str, us: u64| (format!("{}{k}", crate::protocol::COARSE_PREFIX), us);
        let result = KernelResult {
            timings_ms: vec![
                t("res", 4000),
                // The load spans a tick (jiffies 0 and 1), the resume not.
                t("load-a", 0),
                t("load-b", 3900),
                t("resume-a", 4100),
                t("resume-b", 5000),
                // Op 0 in one jiffy; op 1, a reload, whose load and whole
                // span a tick, its resume not.
                t("op-a-0", 8000),
                t("op-b-0", 9000),
                t("op-a-1", 12000),
                t("op-load-a-1", 12000),
                t("op-load-b-1", 14000),
                t("op-resume-a-1", 14100),
                t("op-resume-b-1", 15000),
                t("op-b-1", 16200),
            ],
            ..KernelResult::default()
        };
        let j = Jiffies::of(&result).unwrap();
        assert_eq!(j.ms, 4);
        let w = j.windows();
        assert_eq!(w.len(), 6);
        assert_eq!((w[0].0, w[0].1, w[0].2.before, w[0].2.after), (0, Timed::Load, 0, 1));
        assert_eq!((w[2].0, w[2].1, w[2].2.before, w[2].2.after), (0, Timed::Op, 2, 2));
        let d: Vec<_> = j.decisions().iter().map(|(i, w)| (*i, w.before, w.after)).collect();
        assert_eq!(d, [(0, 0, 1), (1, 3, 4), (1, 3, 4)]);
        assert!(Jiffies::of(&KernelResult::default()).is_none(), "no coarse clock: none");
    }

    #[test]
    fn status_fields_are_read_before_their_slash() {
        let line = "8 10/256 128 7/10 1 17 10 26 0 2 3 1 writeback";
        assert_eq!(cache_status_field(line, 3), Some("7"));
        assert_eq!(cache_status_field(line, 9), Some("2"));
        assert_eq!(cache_status_field(line, 40), None);
        assert_eq!(counters(line)[0], Some("7"));
    }

    #[test]
    fn a_summary_expands_to_what_it_summarizes() {
        let mut data = vec![0u8; 512 * 6];
        stamp::fill(&mut data[..1024], 9, 3, 0, 10);
        stamp::fill(&mut data[1024..1536], 9, 4, 0, 99);
        data[2048..2560].fill(CACHE_GARBAGE);
        let s = summarize(&data, 9, 10);
        let back = expand(&s, 9, 10).unwrap();
        assert_eq!(summarize(&back, 9, 10), s);
        assert_eq!(back[..1536], data[..1536]);
        assert!(expand("w1*x", 9, 0).is_err() && expand("q*1", 9, 0).is_err());
    }

    #[test]
    fn crashes_and_faults_are_refused() {
        let cfg = replayable_config(3, 50);
        let mut trace = Trace { header: cfg.header(), events: vec![Event::Op(Op::CRASH)] };
        assert!(plan(&trace).unwrap_err().to_string().contains("crashes or faults"));
        trace.events = vec![Event::Op(Op::Worker), Event::Op(Op::Status)];
        let p = plan(&trace).unwrap();
        assert_eq!(p.ops[0], Op::Status, "scheduling ops are dropped");
        assert_eq!(p.ops.len(), 1 + cfg.cache.origin_blocks as usize, "then the read-back");
    }

    #[test]
    fn resizes_size_the_disks_and_the_read_back() {
        let cfg = replayable_config(3, 50);
        let (c, o) = (cfg.cache.cache_blocks as u32, cfg.cache.origin_blocks as u32);
        let ops = [
            Op::Resize { cache_blocks: c + 5, origin_blocks: 1 },
            Op::Resize { cache_blocks: 0, origin_blocks: o * 2 },
        ];
        let trace = Trace { header: cfg.header(), events: ops.map(Event::Op).to_vec() };
        let p = plan(&trace).unwrap();
        let spec = CacheSpec::from_header(&p.job.trace().header).unwrap();
        assert_eq!(spec.disk_blocks, Some((u64::from(c) + 5, u64::from(o) * 2)));
        assert_eq!((spec.cache_blocks, spec.origin_blocks), (u64::from(c), u64::from(o)), "the first table");
        assert_eq!(p.ops.len(), 2 + 2 * o as usize, "every block of the largest origin read back");
        let Job::Cache { cache, origin, .. } = &p.job else { panic!("a cache job") };
        assert_eq!(cache.len() as u64, spec.cache_disk_sectors() * 512);
        assert_eq!(origin.len() as u64, spec.origin_disk_sectors() * 512);
        assert!(ublk_plan(&trace).unwrap_err().to_string().contains("take no resizes"));
        // Without resizes, the disks are the devices.
        let plain = Trace { header: cfg.header(), events: vec![Event::Op(Op::Status)] };
        let p = plan(&plain).unwrap();
        assert_eq!(CacheSpec::from_header(&p.job.trace().header).unwrap().disk_blocks, None);
    }
}

/// The serialized simulator's run of a plan, held against the kernel's.
pub(crate) struct SimRun {
    /// What each op read in the simulator (None for other ops).
    reads: Vec<Option<String>>,
    /// The simulator's metadata after the clean shutdown.
    image: Vec<u8>,
    /// See [`CacheReplayReport::first_divergence`].
    first_divergence: Option<(usize, String, String)>,
    /// See [`CacheReplayReport::follow_runs`].
    runs: (usize, usize),
    /// Each resize's outcome in the simulator (`ok` or the errno name).
    resizes: Vec<String>,
    /// The tick choices the run made (see [`serialized`]).
    choices: Vec<bool>,
    /// With capture on: after every op [`crate::durable::is_mark`] names
    /// (by op index), the durable images of the metadata, cache and origin
    /// devices.
    durable: BTreeMap<usize, [Vec<u8>; 3]>,
    /// What the simulator's end (settle, read-back through its oracle,
    /// clean shutdown, checks) refused, if anything.
    end_failure: Option<String>,
}

/// When something happened in the kernel, as a jiffy it may have seen:
/// read before and after (they differ when a tick came in between).
#[derive(Debug, Clone, Copy)]
struct Window {
    before: u64,
    after: u64,
}

/// The jiffies of a settled run (see [`COARSE_PREFIX`](crate::protocol::COARSE_PREFIX)): the first
/// table's load and resume, each op's, each reload's load and resume.
#[derive(Debug, Default)]
struct Jiffies {
    load: Option<Window>,
    resume: Option<Window>,
    ops: BTreeMap<usize, Window>,
    reload_load: BTreeMap<usize, Window>,
    reload_resume: BTreeMap<usize, Window>,
    /// Milliseconds per jiffy.
    ms: u64,
    /// The absolute jiffy (mod 8) at the clock's 0 ([`JIFFY_PHASE`]), if
    /// the agent could read it.
    phase: Option<u64>,
}

impl Jiffies {
    /// The jiffies of a run's result, None when it carries no coarse
    /// clock.
    fn of(result: &KernelResult) -> Option<Jiffies> {
        let (t, res) = crate::protocol::coarse_readings(result)?;
        let j = |v: u64| (v + res / 2) / res;
        let win = |a: &str, b: &str| Some(Window { before: j(*t.get(a)?), after: j(*t.get(b)?) });
        let mut out = Jiffies {
            load: win("load-a", "load-b"),
            resume: win("resume-a", "resume-b"),
            ms: res / 1000,
            phase: result.timings_ms.iter().find(|(k, _)| k == JIFFY_PHASE).map(|(_, v)| v % 8),
            ..Jiffies::default()
        };
        for k in t.keys() {
            let Some(i) = k.strip_prefix("op-a-").and_then(|i| i.parse::<usize>().ok()) else { continue };
            if let Some(w) = win(&format!("op-a-{i}"), &format!("op-b-{i}")) {
                out.ops.insert(i, w);
            }
            if let Some(w) = win(&format!("op-load-a-{i}"), &format!("op-load-b-{i}")) {
                out.reload_load.insert(i, w);
            }
            if let Some(w) = win(&format!("op-resume-a-{i}"), &format!("op-resume-b-{i}")) {
                out.reload_resume.insert(i, w);
            }
        }
        Some(out)
    }

    /// Every window, in the order the kernel went through them, each with
    /// the op it belongs to (the first table's load and resume belong to
    /// op 0) and what it times.
    fn windows(&self) -> Vec<(usize, Timed, Window)> {
        let mut d = Vec::new();
        d.extend(self.load.map(|w| (0, Timed::Load, w)));
        d.extend(self.resume.map(|w| (0, Timed::Resume, w)));
        for (&i, w) in &self.ops {
            d.extend(self.reload_load.get(&i).map(|w| (i, Timed::ReloadLoad, *w)));
            d.extend(self.reload_resume.get(&i).map(|w| (i, Timed::ReloadResume, *w)));
            d.push((i, Timed::Op, *w));
        }
        d
    }

    /// The windows that span a tick (see [`Self::windows`]): the choices
    /// a run makes.
    fn decisions(&self) -> Vec<(usize, Window)> {
        self.windows().into_iter().filter(|(_, _, w)| w.before != w.after).map(|(i, _, w)| (i, w)).collect()
    }
}

/// What a [`Window`] times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timed {
    /// The first table's load.
    Load,
    /// The first table's resume.
    Resume,
    /// A reload op's table load.
    ReloadLoad,
    /// A reload op's resume.
    ReloadResume,
    /// An op (its start and end).
    Op,
}

/// How many serialized runs [`follow_the_kernel`] tries at most.
const MAX_FOLLOW_RUNS: usize = 256;

/// The serialized simulator, run so that it sees what the kernel's smq
/// saw: each op, then its background work settled (the kernel's run was
/// settled too, see [`CACHE_SETTLE_PARAM`]), at the jiffy the kernel's
/// clock read for it. Where a tick came during an op or a table load (its
/// two clock readings differ), either jiffy may be the one smq saw: the
/// runs search those choices, depth first, for one whose counters follow
/// the kernel's op by op, and the run that followed longest is returned.
/// Without a coarse clock (an unsettled run), one run follows the ops'
/// end times.
pub(crate) fn follow_the_kernel(plan: &CachePlan, run: &KernelRun) -> Result<SimRun, ShimError> {
    let Some(jiffies) = Jiffies::of(&run.result) else {
        return serialized(plan, run, None, &[], false);
    };
    let decisions = jiffies.decisions();
    let mut best: Option<SimRun> = None;
    let mut stack: Vec<Vec<bool>> = vec![Vec::new()];
    let mut runs = 0;
    let reach = |r: &SimRun| r.first_divergence.as_ref().map_or(usize::MAX, |d| d.0);
    while let Some(mut prefix) = stack.pop() {
        if runs == MAX_FOLLOW_RUNS {
            break;
        }
        runs += 1;
        let mut r = serialized(plan, run, Some(&jiffies), &prefix, false)?;
        r.runs = (runs, decisions.len());
        let d = reach(&r);
        if d == usize::MAX {
            return Ok(r);
        }
        // Later choices (all "before" in this run) up to the divergence:
        // each may be the one to flip.
        while let Some(&(op, _)) = decisions.get(prefix.len()) {
            if op > d {
                break;
            }
            let mut flipped = prefix.clone();
            flipped.push(true);
            stack.push(flipped);
            prefix.push(false);
        }
        if best.as_ref().is_none_or(|b| reach(b) < d) {
            best = Some(r);
        }
    }
    let mut best = best.ok_or_else(|| ShimError::Invalid("the serialized simulator never ran".into()))?;
    best.runs = (runs, decisions.len());
    Ok(best)
}

/// One serialized run: with `jiffies`, op times from the kernel's coarse
/// clock, `choices[k]` saying whether window `k` of the decisions is read
/// at its later jiffy (beyond the choices, the earlier); without, the ops'
/// end times.
fn serialized(
    plan: &CachePlan,
    run: &KernelRun,
    jiffies: Option<&Jiffies>,
    choices: &[bool],
    capture: bool,
) -> Result<SimRun, ShimError> {
    let mut cfg = plan.cfg.cache;
    let sim_err =
        |f: dmsim_sim::thin::ThinFailure| ShimError::Invalid(format!("the serialized simulator: {f}"));
    // Which jiffy each window stands for in this run: the later one of a
    // window that spans a tick when its choice says so.
    let mut picked: BTreeMap<(usize, Timed), u64> = BTreeMap::new();
    let mut origin = 0;
    let mut ms_per_jiffy = 1;
    if let Some(j) = jiffies {
        ms_per_jiffy = j.ms;
        let mut k = 0;
        for (i, what, w) in j.windows() {
            let jiffy = if w.before == w.after {
                w.before
            } else {
                k += 1;
                if choices.get(k - 1).copied().unwrap_or(false) {
                    w.after
                } else {
                    w.before
                }
            };
            picked.insert((i, what), jiffy);
        }
        origin = picked.get(&(0, Timed::Load)).copied().unwrap_or(0);
        let resume = picked.get(&(0, Timed::Resume)).copied().unwrap_or(origin);
        cfg.options.resume_delay = resume.saturating_sub(origin) * ms_per_jiffy * 1_000_000;
        cfg.options.waker_wheel_phase = j.phase.map(|p| (origin + p) % 8);
    }
    // The simulator's milliseconds for a kernel jiffy: its middle, counted
    // from the first table's load (the simulator's time 0).
    let at = |jiffy: u64| jiffy.saturating_sub(origin) * ms_per_jiffy + ms_per_jiffy / 2;
    let mut sim =
        CacheSim::new(cfg).map_err(|f| ShimError::Invalid(format!("the simulator does not start: {f}")))?;
    // The kernel's job reads nothing after the last op, and a read goes
    // through the policy.
    sim.set_final_read_back(false);
    // Without a coarse clock: when each op ended, from the first op's start.
    let ends: BTreeMap<usize, u64> = run
        .result
        .timings_ms
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(OP_END_PREFIX)?.parse().ok().map(|i: usize| (i, *v)))
        .collect();
    let kernel_status: BTreeMap<usize, &str> =
        run.result.op_status.iter().map(|(i, l)| (*i, l.as_str())).collect();
    let mut first_divergence = None;
    let mut sim_ms = 0u64;
    let mut reads = Vec::new();
    let mut durable = BTreeMap::new();
    // Time moves a jiffy at a time, so that the waker runs in the jiffy
    // it ran in the kernel.
    let advance = |sim: &mut CacheSim, to: u64, sim_ms: &mut u64| -> Result<(), ShimError> {
        while to > *sim_ms {
            let step = (to - *sim_ms).min(if jiffies.is_some() { ms_per_jiffy } else { u64::from(u16::MAX) });
            sim.apply(&Op::Tick { millis: step as u16 }).map_err(sim_err)?;
            sim.quiesce().map_err(sim_err)?;
            *sim_ms += step;
        }
        Ok(())
    };
    for (i, op) in plan.ops.iter().enumerate() {
        let timed = jiffies.is_some() || !ends.is_empty();
        if jiffies.is_some() {
            if let (Some(l), Some(r)) =
                (picked.get(&(i, Timed::ReloadLoad)), picked.get(&(i, Timed::ReloadResume)))
            {
                advance(&mut sim, at(*l), &mut sim_ms)?;
                sim.cache().set_resume_delay(r.saturating_sub(*l) * ms_per_jiffy * 1_000_000);
            } else if let Some(j) = picked.get(&(i, Timed::Op)) {
                advance(&mut sim, at(*j), &mut sim_ms)?;
            }
        } else if !ends.is_empty() {
            let start = if i == 0 { 0 } else { ends.get(&(i - 1)).copied().unwrap_or(sim_ms) };
            advance(&mut sim, start, &mut sim_ms)?;
        }
        if timed && matches!(op, Op::Tick { .. }) {
            reads.push(None);
            continue;
        }
        let before = sim.events().len();
        sim.apply(op).map_err(sim_err)?;
        sim.quiesce().map_err(sim_err)?;
        if let (true, Op::Write { dev, fua: true, .. }) = (capture, op) {
            // The agent's FUA write is a RWF_DSYNC write: on 6.1 a FUA
            // bio, then a flush of the whole device (`blkdev_write_iter`
            // ends with `generic_write_sync`). The crash states follow.
            sim.apply(&Op::Flush { dev: *dev }).map_err(sim_err)?;
            sim.quiesce().map_err(sim_err)?;
        }
        if let (None, Some(k)) = (&first_divergence, kernel_status.get(&i)) {
            let ours = sim.cache().status(true);
            if counters(k) != counters(&ours) {
                first_divergence = Some((i, k.to_string(), ours));
            }
        }
        let read = sim.events()[before..].iter().find_map(|e| match e {
            Event::Done { read: Some(r), .. } => Some(r.clone()),
            _ => None,
        });
        reads.push(read);
        if capture && crate::durable::is_mark(op) {
            let c = sim.cache();
            let m = c.metadata().transaction_manager().block_manager().device().durable().to_vec();
            let images = [m, c.cache_device().durable().to_vec(), c.origin_device().durable().to_vec()];
            durable.insert(i, images);
        }
    }
    let resizes = sim
        .resize_log()
        .iter()
        .map(|r| match r {
            Ok(()) => "ok".to_string(),
            Err(e) => e.to_string(),
        })
        .collect();
    let end_failure = sim.finish().err().map(|f| format!("the serialized simulator's end: {f}"));
    Ok(SimRun {
        reads,
        image: sim.metadata_image(),
        first_divergence,
        runs: (1, 0),
        resizes,
        choices: choices.to_vec(),
        durable,
        end_failure,
    })
}
