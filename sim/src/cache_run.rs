//! One seed of the cache campaign, recorded as a trace; replay and
//! minimization of cache traces.
//!
//! As for the thin campaign ([`crate::run`]), a seed decides everything:
//! the workload, the cache's shape (block size, cache and origin sizes,
//! metadata version, the first table's mode and policy, discard passdown,
//! migration threshold), the fault swarm, and every op. The ops run through
//! [`CacheSim`]; the trace header carries the settings, so a trace replays
//! and minimizes alone. Cache traces are told from thin traces by their
//! workload's name (`cache-…`).

use std::fmt;

use dmsim_faults::{FaultCoverage, FaultSwarm};
use dmsim_model::cache::core::{CacheFixes, CacheOptions};
use dmsim_model::mutation::Mutations;
use dmsim_traces::minimize::minimize_ops;
use dmsim_traces::op::{CacheIoMode, CachePolicyKind};
use dmsim_traces::text::to_text;
use dmsim_traces::{DiskFault, DiskId, Header, Op, Trace};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cache_sim::{CacheCheck, CacheSim, CacheSimConfig, CacheStats};
use crate::header_params::{within, HeaderParams};
use crate::run::{first_difference, violation_signature, Checkers, Minimized, ReplayError, MAX_DISK_SECTORS};
use crate::thin::ThinFailure;

/// The shapes of cache workload a seed can get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CacheWorkload {
    /// A hot set that moves now and then: promotions, then demotions.
    Hot,
    /// Sequential scans over the whole origin: the hot set is pushed out.
    Scan,
    /// Writes to a hot set with idle time between bursts: writeback under
    /// pressure.
    Writeback,
    /// Table reloads between writeback, writethrough and passthrough, the
    /// cleaner policy, invalidations.
    Modes,
    /// FUA and PREFLUSH writes with frequent crashes, whatever the swarm
    /// says.
    Durability,
    /// Table reloads on a grown or shrunk cache device and origin (shrinks
    /// over dirty blocks are refused), with cleaner reloads that make
    /// shrinks possible.
    Resize,
}

impl CacheWorkload {
    /// Every cache workload.
    pub const ALL: [CacheWorkload; 6] = [
        CacheWorkload::Hot,
        CacheWorkload::Scan,
        CacheWorkload::Writeback,
        CacheWorkload::Modes,
        CacheWorkload::Durability,
        CacheWorkload::Resize,
    ];

    /// Its name in traces and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CacheWorkload::Hot => "cache-hot",
            CacheWorkload::Scan => "cache-scan",
            CacheWorkload::Writeback => "cache-writeback",
            CacheWorkload::Modes => "cache-modes",
            CacheWorkload::Durability => "cache-durability",
            CacheWorkload::Resize => "cache-resize",
        }
    }

    /// The workload called `name`.
    pub fn from_name(name: &str) -> Option<CacheWorkload> {
        CacheWorkload::ALL.into_iter().find(|w| w.name() == name)
    }
}

impl fmt::Display for CacheWorkload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a trace header names a cache workload.
pub fn is_cache_header(h: &Header) -> bool {
    h.workload.starts_with("cache-")
}

/// Everything a cache run depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheRunConfig {
    /// The seed (also the stamps' run id).
    pub seed: u64,
    /// The workload generator.
    pub workload: CacheWorkload,
    /// Ops to generate.
    pub ops: usize,
    /// The cache's shape and options.
    pub cache: CacheSimConfig,
    /// The faults this seed may inject.
    pub swarm: FaultSwarm,
}

/// Knobs of a cache campaign that are not per seed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCampaignSettings {
    /// Deliberate bugs (detector tests).
    pub mutations: Mutations,
    /// Run the model as kernel 6.1 behaves, without the candidate fixes.
    pub kernel_as_is: bool,
    /// Force one workload instead of the seed's choice.
    pub workload: Option<CacheWorkload>,
}

impl CacheRunConfig {
    /// The run seed `seed` makes.
    pub fn for_seed(seed: u64, ops: usize, settings: &CacheCampaignSettings) -> CacheRunConfig {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6361_6368_655f_7275);
        // The workloads older than resizes first; a seed's draws keep the
        // order they had then, so that its run is the one it was.
        let workload = settings.workload.unwrap_or(CacheWorkload::ALL[rng.gen_range(0..5)]);
        let block_sectors = [64, 128][rng.gen_range(0..2)];
        let cache_blocks = rng.gen_range(4..12);
        let origin_blocks = rng.gen_range(cache_blocks * 2..cache_blocks * 6);
        let io_mode = match workload {
            CacheWorkload::Modes => CacheIoMode::ALL[rng.gen_range(0..2)],
            _ if rng.gen_bool(0.2) => CacheIoMode::Writethrough,
            _ => CacheIoMode::Writeback,
        };
        let fixes = if settings.kernel_as_is { CacheFixes::default() } else { CacheFixes::ALL };
        let metadata_version = if rng.gen_bool(0.5) { 2 } else { 1 };
        let discard_passdown = rng.gen_bool(0.7);
        let migration_threshold = [block_sectors, 2048, 1 << 20][rng.gen_range(0..3)];
        // One seed in six resizes: drawn last, so the others keep their runs.
        let resize = rng.gen_ratio(1, 6);
        let workload = if settings.workload.is_none() && resize { CacheWorkload::Resize } else { workload };
        CacheRunConfig {
            seed,
            workload,
            ops,
            cache: CacheSimConfig {
                run: seed,
                block_sectors,
                cache_blocks,
                origin_blocks,
                metadata_sectors: 2048,
                metadata_version,
                io_mode,
                policy: CachePolicyKind::Smq,
                discard_passdown,
                migration_threshold,
                options: CacheOptions { mutations: settings.mutations, fixes, ..CacheOptions::default() },
            },
            swarm: FaultSwarm::from_seed(seed),
        }
    }

    /// The trace header that rebuilds this configuration.
    pub fn header(&self) -> Header {
        let c = &self.cache;
        let flag = |b: bool| if b { "1" } else { "0" }.to_string();
        let mut params = vec![
            ("ops".to_string(), self.ops.to_string()),
            ("run".to_string(), c.run.to_string()),
            ("block_sectors".to_string(), c.block_sectors.to_string()),
            ("cache_blocks".to_string(), c.cache_blocks.to_string()),
            ("origin_blocks".to_string(), c.origin_blocks.to_string()),
            ("metadata_sectors".to_string(), c.metadata_sectors.to_string()),
            ("metadata_version".to_string(), c.metadata_version.to_string()),
            ("io_mode".to_string(), c.io_mode.name().to_string()),
            ("policy".to_string(), c.policy.name().to_string()),
            ("discard_passdown".to_string(), flag(c.discard_passdown)),
            ("migration_threshold".to_string(), c.migration_threshold.to_string()),
            ("mutations".to_string(), c.options.mutations.names().join(",")),
            (
                "fix.resume_clears_clean_shutdown".to_string(),
                flag(c.options.fixes.resume_clears_clean_shutdown),
            ),
            ("fix.flush_before_commit".to_string(), flag(c.options.fixes.flush_before_commit)),
            (
                "fix.fua_overwrite_waits_for_commit".to_string(),
                flag(c.options.fixes.fua_overwrite_waits_for_commit),
            ),
            (
                "fix.writethrough_pairs_one_at_a_time".to_string(),
                flag(c.options.fixes.writethrough_pairs_one_at_a_time),
            ),
            ("fix.read_only_flushes_fail".to_string(), flag(c.options.fixes.read_only_flushes_fail)),
        ];
        params.extend(self.swarm.params().into_iter().map(|(k, v)| (format!("swarm.{k}"), v)));
        Header { seed: self.seed, workload: self.workload.name().to_string(), params }
    }

    /// The configuration a cache trace header describes.
    pub fn from_header(h: &Header) -> Result<CacheRunConfig, String> {
        let p = HeaderParams(h);
        let workload = CacheWorkload::from_name(&h.workload)
            .ok_or_else(|| format!("unknown cache workload {:?} in the trace header", h.workload))?;
        let io_mode_name = p.get("io_mode")?;
        let io_mode = CacheIoMode::from_name(io_mode_name)
            .ok_or_else(|| format!("trace header: unknown io_mode {io_mode_name:?}"))?;
        let policy_name = p.get("policy")?;
        let policy = CachePolicyKind::from_name(policy_name)
            .ok_or_else(|| format!("trace header: unknown policy {policy_name:?}"))?;
        let cache = CacheSimConfig {
            run: p.num("run")?,
            block_sectors: p.num("block_sectors")?,
            cache_blocks: p.num("cache_blocks")?,
            origin_blocks: p.num("origin_blocks")?,
            metadata_sectors: p.num("metadata_sectors")?,
            metadata_version: p.num("metadata_version")?,
            io_mode,
            policy,
            discard_passdown: p.flag("discard_passdown")?,
            migration_threshold: p.num("migration_threshold")?,
            options: CacheOptions {
                mutations: p.mutations()?,
                fixes: CacheFixes {
                    resume_clears_clean_shutdown: p.flag("fix.resume_clears_clean_shutdown")?,
                    flush_before_commit: p.flag("fix.flush_before_commit")?,
                    fua_overwrite_waits_for_commit: p.flag("fix.fua_overwrite_waits_for_commit")?,
                    writethrough_pairs_one_at_a_time: p.flag("fix.writethrough_pairs_one_at_a_time")?,
                    // A trace recorded before this fix existed ran without it.
                    read_only_flushes_fail: p.flag_or_off("fix.read_only_flushes_fail")?,
                },
                ..CacheOptions::default()
            },
        };
        within("block_sectors", cache.block_sectors, 64, 1 << 12)?;
        if !cache.block_sectors.is_multiple_of(64) {
            return Err(format!(
                "trace header: block_sectors {} is not a multiple of 64",
                cache.block_sectors
            ));
        }
        within("cache_blocks", cache.cache_blocks, 1, 1 << 12)?;
        within("origin_blocks", cache.origin_blocks, 1, 1 << 16)?;
        within("metadata_sectors", cache.metadata_sectors, 512, MAX_DISK_SECTORS)?;
        within("metadata_version", u64::from(cache.metadata_version), 1, 2)?;
        within("migration_threshold", cache.migration_threshold, 0, 1 << 40)?;
        within("origin size in sectors", cache.origin_blocks * cache.block_sectors, 1, MAX_DISK_SECTORS)?;
        within("cache size in sectors", cache.cache_blocks * cache.block_sectors, 1, MAX_DISK_SECTORS)?;
        Ok(CacheRunConfig { seed: h.seed, workload, ops: p.num("ops")?, cache, swarm: p.swarm()? })
    }
}

/// The ops seed `cfg` generates.
pub fn generate(cfg: &CacheRunConfig) -> Vec<Op> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let c = &cfg.cache;
    let bs = c.block_sectors;
    let swarm = &cfg.swarm;
    let w = cfg.workload;
    // (write, read, discard, flush, worker, complete, tick, reload,
    //  invalidate, status, resize)
    let (write, read, discard, flush, worker, complete, tick, reload, invalidate, status, resize) = match w {
        // No resizes in the older workloads: their seeds keep their runs.
        CacheWorkload::Hot => (250, 250, 30, 25, 150, 220, 40, 4, 2, 8, 0),
        CacheWorkload::Scan => (150, 350, 20, 20, 150, 220, 30, 4, 2, 8, 0),
        CacheWorkload::Writeback => (350, 150, 30, 25, 150, 220, 60, 4, 2, 8, 0),
        CacheWorkload::Modes => (250, 200, 30, 25, 150, 220, 40, 40, 20, 10, 0),
        CacheWorkload::Durability => (300, 150, 20, 60, 150, 220, 20, 8, 4, 8, 0),
        CacheWorkload::Resize => (250, 200, 30, 25, 150, 220, 50, 15, 4, 8, 30),
    };
    let crash_weight =
        if w == CacheWorkload::Durability { swarm.crash_weight.max(40) } else { swarm.crash_weight };
    let (fua, preflush) = if w == CacheWorkload::Durability { (0.3, 0.1) } else { (0.08, 0.04) };
    let table: [(u32, u8); 14] = [
        (resize, 13),
        (write, 0),
        (read, 1),
        (discard, 2),
        (flush, 3),
        (worker, 4),
        (complete, 5),
        (tick, 6),
        (reload, 7),
        (invalidate, 8),
        (status, 9),
        (crash_weight, 10),
        (swarm.fail_io_weight, 11),
        (swarm.metadata_fault_weight + swarm.data_fault_weight, 12),
    ];
    let total: u32 = table.iter().map(|(w, _)| w).sum();
    // The sizes the table has if every resize so far was taken (a refused
    // one leaves the old sizes; ops past the end wrap around in the
    // simulator).
    let (mut cache_blocks, mut origin_blocks) = (c.cache_blocks, c.origin_blocks);
    let mut hot_size = (cache_blocks + cache_blocks / 2).max(1);
    let mut hot_base = 0u64;
    let mut cursor = 0u64;
    let mut out = Vec::with_capacity(cfg.ops);
    while out.len() < cfg.ops {
        let mut roll = rng.gen_range(0..total);
        let mut kind = 4;
        for (weight, k) in table {
            if roll < weight {
                kind = k;
                break;
            }
            roll -= weight;
        }
        // The hot set moves now and then.
        if rng.gen_bool(0.01) {
            hot_base = rng.gen_range(0..origin_blocks);
        }
        let op = match kind {
            0..=2 => {
                let block = match w {
                    CacheWorkload::Scan if rng.gen_bool(0.6) => {
                        cursor = (cursor + 1) % origin_blocks;
                        cursor
                    }
                    _ if rng.gen_bool(0.75) => (hot_base + rng.gen_range(0..hot_size)) % origin_blocks,
                    _ => rng.gen_range(0..origin_blocks),
                };
                let whole = rng.gen_bool(0.5);
                let sector = if whole { block * bs } else { block * bs + rng.gen_range(0..bs) };
                let nr = match kind {
                    2 if rng.gen_bool(0.5) => bs * rng.gen_range(1..4),
                    2 => rng.gen_range(1..bs * 4),
                    _ if whole && rng.gen_bool(0.7) => bs,
                    _ if rng.gen_bool(0.2) => bs * 2,
                    _ => rng.gen_range(1..bs.min(200)),
                };
                match kind {
                    0 => Op::Write {
                        dev: 0,
                        sector: sector as u32,
                        nr_sectors: nr as u16,
                        fua: rng.gen_bool(fua),
                        preflush: rng.gen_bool(preflush),
                    },
                    1 => Op::Read { dev: 0, sector: sector as u32, nr_sectors: nr as u16 },
                    _ => Op::Discard { dev: 0, sector: sector as u32, nr_sectors: nr as u32 },
                }
            }
            3 => Op::Flush { dev: 0 },
            4 => Op::Worker,
            5 => Op::Complete { pick: rng.gen() },
            6 => {
                let millis =
                    if rng.gen_bool(0.3) { rng.gen_range(1000..3000) } else { rng.gen_range(1..800) };
                Op::Tick { millis }
            }
            7 => {
                let mode = match rng.gen_range(0..10) {
                    0..=4 => CacheIoMode::Writeback,
                    5..=7 => CacheIoMode::Writethrough,
                    _ => CacheIoMode::Passthrough,
                };
                let cleaner = if w == CacheWorkload::Resize { 0.5 } else { 0.25 };
                let policy =
                    if rng.gen_bool(cleaner) { CachePolicyKind::Cleaner } else { CachePolicyKind::Smq };
                Op::Reload { mode, policy }
            }
            8 => Op::Invalidate { cblock: rng.gen_range(0..cache_blocks as u32), nr: rng.gen_range(1..4) },
            9 => Op::Status,
            10 => Op::Crash { mode: swarm.pick_crash_mode(&mut rng), seed: rng.gen() },
            11 => Op::FailIo { pick: rng.gen() },
            13 => {
                // Between half and twice the first sizes; now and then one
                // of them unchanged.
                let pick = |rng: &mut ChaCha8Rng, first: u64, now: u64| match rng.gen_range(0..4) {
                    0 => now,
                    _ => rng.gen_range((first / 2).max(1)..=first * 2),
                };
                cache_blocks = pick(&mut rng, c.cache_blocks, cache_blocks);
                origin_blocks = pick(&mut rng, c.origin_blocks, origin_blocks);
                hot_size = (cache_blocks + cache_blocks / 2).max(1);
                Op::Resize { cache_blocks: cache_blocks as u32, origin_blocks: origin_blocks as u32 }
            }
            _ => match swarm.pick_fault(&mut rng) {
                Some((DiskId::Data, fault)) if data_fault(&fault) => {
                    let disk = if rng.gen_bool(0.5) { DiskId::Cache } else { DiskId::Origin };
                    Op::Fault { disk, fault }
                }
                Some((DiskId::Metadata, fault)) => Op::Fault { disk: DiskId::Metadata, fault },
                _ => Op::Worker,
            },
        };
        out.push(op);
    }
    out
}

/// Data faults the cache campaign injects: I/O errors (a bit flip or a
/// misdirected write on a data device is corruption no cache can see).
fn data_fault(f: &DiskFault) -> bool {
    matches!(f, DiskFault::ReadError { .. } | DiskFault::WriteError { .. })
}

/// What one cache run did.
#[derive(Debug, Clone)]
pub struct CacheRunOutcome {
    /// Its record.
    pub trace: Trace,
    /// Its counters.
    pub stats: CacheStats,
    /// The faults that fired, by kind.
    pub coverage: FaultCoverage,
    /// The first violation, if any.
    pub violation: Option<ThinFailure>,
    /// Metadata images Debian's `cache_check` ran on.
    pub cache_checked: u64,
}

/// One seed in this many runs Debian's `cache_check` at every recovery;
/// every seed runs it on its final image (when it is installed). A
/// `cache_check` costs a process, about 3 ms of CPU and, in 0.9.0's
/// `io_destroy` at exit, about 35 ms of wall time: at every recovery of
/// every seed it would double the campaign's CPU time and multiply its
/// wall time by 15 (docs/cache.md, "The cache campaign").
pub const CACHE_CHECK_RECOVERIES_EVERY: u64 = 4;

/// Whether seed `seed` runs `cache_check` at every recovery, not only on
/// its final image: the multiples of [`CACHE_CHECK_RECOVERIES_EVERY`]. A
/// function of the seed alone (kept in every trace header), so a replay
/// or a minimization checks where the run did; not a trace parameter,
/// since the trace does not depend on it.
pub fn cache_check_at_recoveries(seed: u64) -> bool {
    seed.is_multiple_of(CACHE_CHECK_RECOVERIES_EVERY)
}

/// Generates the ops of `cfg` and runs them.
pub fn run_config(cfg: &CacheRunConfig, checkers: &Checkers) -> CacheRunOutcome {
    run_ops(cfg, &generate(cfg), checkers)
}

/// Runs `ops` on `cfg`, recording the trace; `cache_check` runs as
/// [`cache_check_at_recoveries`] says when `checkers` has it.
pub fn run_ops(cfg: &CacheRunConfig, ops: &[Op], checkers: &Checkers) -> CacheRunOutcome {
    let header = cfg.header();
    let mut sim = match CacheSim::new(cfg.cache) {
        Ok(s) => s,
        Err(f) => {
            let events =
                vec![dmsim_traces::Event::Violation { kind: f.kind.to_string(), message: f.what.clone() }];
            return CacheRunOutcome {
                trace: Trace { header, events },
                stats: CacheStats::default(),
                coverage: FaultCoverage::default(),
                violation: Some(f),
                cache_checked: 0,
            };
        }
    };
    sim.set_cache_check(
        checkers.cache_check.as_ref().map(|tool| CacheCheck {
            tool: tool.clone(),
            at_recoveries: cache_check_at_recoveries(cfg.seed),
        }),
    );
    let mut violation = None;
    for op in ops {
        if let Err(f) = sim.apply(op) {
            violation = Some(f);
            break;
        }
    }
    if violation.is_none() {
        violation = sim.finish().err();
    }
    let trace = Trace { header, events: sim.take_events() };
    CacheRunOutcome {
        trace,
        stats: sim.stats(),
        coverage: sim.coverage().clone(),
        violation,
        cache_checked: sim.cache_checked(),
    }
}

/// A replay of a cache trace and how it compares with the recording.
#[derive(Debug, Clone)]
pub struct CacheReplay {
    /// The new run.
    pub outcome: CacheRunOutcome,
    /// The first differing line of the two traces' text, if any.
    pub first_difference: Option<(usize, String, String)>,
}

/// Runs a cache trace's ops again on its header's configuration.
pub fn replay(trace: &Trace, checkers: &Checkers) -> Result<CacheReplay, ReplayError> {
    let cfg = CacheRunConfig::from_header(&trace.header).map_err(ReplayError)?;
    let ops: Vec<Op> = trace.ops().collect();
    let outcome = run_ops(&cfg, &ops, checkers);
    let first_difference = first_difference(&to_text(trace), &to_text(&outcome.trace));
    Ok(CacheReplay { outcome, first_difference })
}

/// Shrinks a failing cache trace while the same violation still occurs.
/// `checkers` matter only to a `cache_check` violation (they cost a
/// process per recovery of every run).
pub fn minimize(
    trace: &Trace,
    checkers: &Checkers,
    mut progress: impl FnMut(u64, usize),
) -> Result<Minimized, ReplayError> {
    let (kind, message) =
        trace.violation().ok_or_else(|| ReplayError("the trace records no violation to preserve".into()))?;
    let signature = violation_signature(kind, message);
    let cfg = CacheRunConfig::from_header(&trace.header).map_err(ReplayError)?;
    let ops: Vec<Op> = trace.ops().collect();
    let no_checkers = Checkers::default();
    let checkers = if kind == "cache_check" { checkers } else { &no_checkers };
    let mut runs = 0u64;
    let mut still_fails = |candidate: &[Op]| {
        runs += 1;
        progress(runs, candidate.len());
        let out = run_ops(&cfg, candidate, checkers);
        out.violation.is_some_and(|v| violation_signature(v.kind, &v.what) == signature)
    };
    if !still_fails(&ops) {
        return Err(ReplayError(format!("the trace's violation ({signature}) does not recur on replay")));
    }
    let (shrunk, _) = minimize_ops(&ops, &mut still_fails);
    let outcome = run_ops(&cfg, &shrunk, checkers);
    Ok(Minimized { ops_after: shrunk.len(), ops_before: ops.len(), trace: outcome.trace, runs, signature })
}
