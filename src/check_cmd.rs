//! `dmsim check`: the default campaign, in-process, no root.
//!
//! Four campaigns run over the same seeds
//! (`--campaign thin|metadata|cache-metadata|cache|all`, default all):
//!
//! - **thin**: every seed one run of the thin target on simulated disks
//!   (`dmsim_sim::run`): a workload, a pool shape and a swarm of faults all
//!   drawn from the seed, every read judged by the oracle, the metadata
//!   checked after every recovery and at the end (by Debian's `thin_check`
//!   too, when installed). A failing seed's trace is written to the
//!   failures folder and, for the first few, minimized.
//! - **metadata**: the metadata crash campaign of `dmsim_sim::campaign`:
//!   every seed a workload of pool metadata operations, every commit's crash
//!   states judged by the independent checker (and the same for the
//!   cache's metadata: `cache-metadata`).
//! - **cache**: every seed one run of the dm-cache target on three
//!   simulated disks (`dmsim_sim::cache_run`), judged by the oracle, the
//!   model's checks and the cache metadata checker (and Debian's
//!   `cache_check`, when installed: on every final image, and at every
//!   recovery of a share of the seeds); failing seeds' traces are written
//!   and minimized as for thin.
//!
//! Seeds run on `--jobs` threads; results are collected and reported in
//! seed order, so the output does not depend on thread timing (only on the
//! seeds that ran, which `--time` makes depend on the clock).

use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::builder::{RangedU64ValueParser, TypedValueParser};
use clap::{Args, ValueEnum};
use dmsim_faults::FaultCoverage;
use dmsim_model::mutation::Mutations;
use dmsim_model::thin::pool::LockingDesign;
use dmsim_sim::cache_campaign;
use dmsim_sim::cache_run::{self, CacheCampaignSettings, CacheRunConfig, CacheRunOutcome, CacheWorkload};
use dmsim_sim::cache_sim::CacheStats;
use dmsim_sim::campaign::{
    self, CampaignConfig, SeedOutcome, ViolationKind, DEFAULT_CRASHES_PER_POINT, MAX_CRASHES_PER_POINT,
    MAX_OPS_PER_SEED,
};
use dmsim_sim::probes::{ProbeTally, ThinProbes};
use dmsim_sim::run::{
    first_difference, minimize, run_config, CampaignSettings, Checkers, ReplayError, RunConfig, RunOutcome,
    Workload, MAX_OPS,
};
use dmsim_sim::thin::{ThinFailure, ThinStats};
use dmsim_sim::workload::Shape;
use dmsim_traces::error::clip;
use dmsim_traces::text::to_text;
use dmsim_traces::Trace;
use indicatif::{ProgressBar, ProgressStyle};

use crate::exit;
use dmsim_traces::file::{self as trace_file, Encoding};

/// Which campaigns `dmsim check` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CampaignKind {
    /// The thin target on simulated disks, judged by the oracle.
    Thin,
    /// The thin metadata crash campaign.
    Metadata,
    /// The cache metadata crash campaign.
    CacheMetadata,
    /// The dm-cache target on three simulated disks (metadata, cache,
    /// origin), judged by the oracle.
    Cache,
    /// All four.
    All,
}

impl CampaignKind {
    /// Whether the thin campaign runs.
    pub fn thin(self) -> bool {
        matches!(self, CampaignKind::Thin | CampaignKind::All)
    }

    fn metadata(self) -> bool {
        matches!(self, CampaignKind::Metadata | CampaignKind::All)
    }

    fn cache_metadata(self) -> bool {
        matches!(self, CampaignKind::CacheMetadata | CampaignKind::All)
    }

    fn cache(self) -> bool {
        matches!(self, CampaignKind::Cache | CampaignKind::All)
    }
}

/// Options of `dmsim check`.
#[derive(Args, Debug)]
#[command(after_help = crate::exit_help!("\
Status 1: a violation in any seed, or a determinism difference. Under \
CI=true a missing thin_check (thin campaign) or cache_check (cache \
campaign) is unusable input (2). With --time the seeds \
that run, and so the output, depend on the machine's speed; with --seeds \
alone the output (and --json, without --timings) is the same on every \
machine."))]
pub struct CheckArgs {
    /// Which campaigns to run.
    #[arg(long, value_enum, default_value = "all")]
    pub campaign: CampaignKind,
    /// Seeds to run, as A..B (B excluded; default 0..64). Ranges shard a
    /// campaign across machines: every seed is independent and
    /// reproducible. With --time, seeds from A on (up to B if given) until
    /// the time is up.
    #[arg(long, value_parser = parse_seeds)]
    pub seeds: Option<Range<u64>>,
    /// Stop starting new seeds after this wall time (e.g. 90s, 10m, 1h).
    /// The output then depends on the machine's speed: which seeds ran is
    /// printed, so the run can be repeated with --seeds.
    #[arg(long, value_parser = parse_duration)]
    pub time: Option<Duration>,
    /// Ops per seed of the thin and cache campaigns (1 to 1,000,000; a
    /// seed's ops and trace are held in memory, about 2.5 KB per op).
    #[arg(long, default_value_t = 300, value_parser = ops_parser())]
    pub ops: usize,
    /// What model the thin and cache campaigns run.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Worker threads, 1 to 256 (default: all cores). Results do not
    /// depend on it.
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_JOBS as u64))]
    pub jobs: Option<usize>,
    /// Print the summary as JSON on stdout: the same bytes for the same
    /// seeds and code (no timings unless --timings).
    #[arg(long)]
    pub json: bool,
    /// Also report the wall time (on stderr, and as `timings` in the JSON);
    /// output with timings differs between identical runs.
    #[arg(long)]
    pub timings: bool,
    /// Folder for failing seeds' traces (seed-N.trace, cache-seed-N.trace
    /// for the cache campaign) and minimized traces (seed-N.min.trace,
    /// cache-seed-N.min.trace); created when a seed fails. A path that exists
    /// and is not a folder is refused before the campaign starts.
    #[arg(long, default_value = "dmsim-failures")]
    pub failures: PathBuf,
    /// Minimize at most this many failing traces (the first, in seed order;
    /// thin and cache alike).
    #[arg(long, default_value_t = 3)]
    pub minimize_max: usize,
    /// Run every seed twice and compare the runs byte for byte; a
    /// difference is a failure.
    #[arg(long)]
    pub check_determinism: bool,
    /// Metadata operations per seed of the metadata campaign (1 to
    /// 100,000).
    #[arg(long, default_value_t = 60,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_OPS_PER_SEED as u64))]
    pub metadata_ops: usize,
    /// Crash states drawn at each request of every commit (the thin and
    /// cache metadata campaigns; 1 to 64); draws that leave the same bytes
    /// as an earlier one of the commit are judged and counted once.
    #[arg(long, default_value_t = DEFAULT_CRASHES_PER_POINT,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_CRASHES_PER_POINT as u64))]
    pub crashes_per_point: usize,
    /// Force one workload shape on every seed of the metadata campaign
    /// (random, shrink or deep) instead of each seed's own.
    #[arg(long, value_parser = parse_shape)]
    pub metadata_shape: Option<Shape>,
    /// Where the thin campaign's traces run: `sim` (the simulator; every
    /// campaign) or `kernel`: each seed's thin trace replayed on Debian's
    /// kernel in qemu, the pool on controlled (ublk) disks that cut power
    /// at its crash ops and fail requests as its faults say, judged against
    /// the serialized simulator at the end and at every crash (about a
    /// minute a trace; docs/kernel-shim.md, "The campaign on the kernel").
    /// Exit 1 then when a divergence has no named class or a seed fails to
    /// run; the traces of the seeds that diverge go to --failures as
    /// kernel-seed-N.trace, each with the kernel's answer beside it
    /// (kernel-seed-N.kernel: every op's outcome, the status lines, the
    /// faults that fired, where it committed) and its final metadata
    /// (kernel-seed-N.metadata): `dmsim replay --on kernel --disks ublk
    /// --kernel-answer kernel-seed-N.kernel kernel-seed-N.trace` judges
    /// them again without a boot. `engine`: the same traces on the
    /// userland engine (the model's pool served over ublk in the same VM,
    /// docs/engine.md), judged the same way (serialized, on the trace's
    /// clock: `--depth` 1). `all`: each
    /// trace on the kernel and on the engine in the same boot, each judged
    /// against the simulator, and the two held against each other (L1,
    /// L2, L3), with three-way counts in the summary.
    #[arg(long, default_value = "sim", value_parser = ["sim", "kernel", "engine", "all"])]
    pub on: String,
    /// With --on kernel: traces per VM boot (1 to 64).
    #[arg(long, default_value_t = 4, value_parser = RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub per_boot: usize,
    /// With --on kernel, engine or all: how many of a boot's traces run at
    /// a time (1 to 64), each on its own pool and disks; their real-time
    /// waits (ticks, the no-space timeout) overlap. The guest gets 256 MiB
    /// more memory for each past the first. 1 runs them one after the
    /// other.
    #[arg(long, default_value_t = 4, value_parser = RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub concurrent: usize,
    /// With --on kernel: keep every seed's trace, the kernel's answer and
    /// its final metadata in this folder (kernel-seed-N.trace, .kernel,
    /// .metadata; equal seeds too; with --on all the engine's too,
    /// engine-seed-N.kernel and .metadata), so that the whole campaign can
    /// be judged again without a boot after the model or the judge changed
    /// (`dmsim replay --on kernel --disks ublk --kernel-answer …`). About
    /// as large as the pool's metadata device a seed.
    #[arg(long)]
    pub answers: Option<PathBuf>,
    /// With --on engine: requests in flight at once (1: one at a time,
    /// judged against the serialized simulator). Above 1 every trace's
    /// requests go with up to this many in flight and are judged by the
    /// oracle in the VM (crash, fault and growth ops skipped); exit 1 on
    /// any oracle violation.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub depth: u16,
}

/// Parses a metadata workload shape's name.
fn parse_shape(s: &str) -> Result<Shape, String> {
    Shape::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = Shape::ALL.iter().map(|s| s.name()).collect();
        format!("unknown shape {:?}: one of {}", clip(s), names.join(", "))
    })
}

/// The options that choose the model a seed runs on, shared by `check`
/// and `run`.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Force one workload instead of each seed's own choice: a thin
    /// workload forces the thin campaign's, a cache-… one the cache
    /// campaign's (and makes `dmsim run` run a cache seed); the other
    /// campaign keeps each seed's own.
    #[arg(long, value_parser = workload_parser())]
    pub workload: Option<WorkloadChoice>,
    /// The pool's locking design: kernel-6.1 (the kernel's), regions-6.4
    /// or refcount-sharing (a patch under study; see
    /// docs/concurrency.md). Thin only.
    #[arg(long, value_parser = parse_locking, default_value = "kernel-6.1")]
    pub locking: LockingDesign,
    /// Run with a deliberately broken model, to see a detector fire (see
    /// the mutations in model/src/mutation.rs).
    #[arg(long, hide = true, value_parser = parse_mutation)]
    pub mutation: Option<Mutations>,
    /// Run the model as kernel 6.1 behaves, without the candidate kernel
    /// fixes.
    #[arg(long, hide = true)]
    pub kernel_as_is: bool,
}

impl ModelArgs {
    /// The campaign settings these options make.
    pub fn settings(&self) -> CampaignSettings {
        CampaignSettings {
            mutations: self.mutation.unwrap_or_default(),
            kernel_as_is: self.kernel_as_is,
            workload: self.workload.and_then(WorkloadChoice::thin),
            locking: self.locking,
        }
    }

    /// The cache campaign settings these options make.
    pub fn cache_settings(&self) -> CacheCampaignSettings {
        CacheCampaignSettings {
            mutations: self.mutation.unwrap_or_default(),
            kernel_as_is: self.kernel_as_is,
            workload: self.workload.and_then(WorkloadChoice::cache),
        }
    }

    /// The options that are not visible in `--help`, and the design when
    /// it is not the default, as command-line flags (for reproduce lines).
    fn flags(&self, locking: bool) -> String {
        let mut s = String::new();
        if let Some(m) = self.mutation {
            for n in m.names() {
                s.push_str(&format!(" --mutation {n}"));
            }
        }
        if self.kernel_as_is {
            s.push_str(" --kernel-as-is");
        }
        if locking && self.locking != LockingDesign::default() {
            s.push_str(&format!(" --locking {}", self.locking.name()));
        }
        s
    }
}

/// Parses a seed range `A..B` (B excluded, not empty).
pub fn parse_seeds(s: &str) -> Result<Range<u64>, String> {
    let err = || format!("expected a seed range like 0..64, got {:?}", clip(s));
    let (a, b) = s.split_once("..").ok_or_else(err)?;
    let a: u64 = a.trim().parse().map_err(|_| err())?;
    let b: u64 = b.trim().parse().map_err(|_| err())?;
    if a >= b {
        return Err(format!(
            "empty seed range {:?}: the end is excluded, so use {a}..{}",
            clip(s),
            a.saturating_add(1)
        ));
    }
    Ok(a..b)
}

/// The longest `--time`: a year.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// The most threads `--jobs` may ask for.
pub const MAX_JOBS: usize = 256;

/// The parser of `--ops`: 1..=[`MAX_OPS`].
pub fn ops_parser() -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::<usize>::new().range(1..=MAX_OPS as u64)
}

/// Parses a duration such as `90`, `90s`, `10m`, `1h30m`, `500ms`; zero is
/// refused (a campaign of no time judges nothing).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_any_duration(s)?;
    if d.is_zero() {
        return Err(format!("a duration of zero ({:?}) would run nothing; give at least 1s", clip(s)));
    }
    Ok(d)
}

fn parse_any_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("expected a duration like 90s, 10m or 1h30m, got {:?}", clip(s));
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(err());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let secs = |k: u64| Duration::from_secs(n.saturating_mul(k));
        let part = match unit {
            "" | "s" => secs(1),
            "ms" => Duration::from_millis(n),
            "m" | "min" => secs(60),
            "h" => secs(3600),
            _ => return Err(err()),
        };
        total = total
            .checked_add(part)
            .filter(|t| *t <= MAX_DURATION)
            .ok_or_else(|| format!("{:?} is longer than the longest run allowed (a year)", clip(s)))?;
    }
    Ok(total)
}

/// A workload named by `--workload`: one of the thin campaign's or one of
/// the cache campaign's (`cache-…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadChoice {
    /// A thin workload.
    Thin(Workload),
    /// A cache workload.
    Cache(CacheWorkload),
}

impl WorkloadChoice {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            WorkloadChoice::Thin(w) => w.name(),
            WorkloadChoice::Cache(w) => w.name(),
        }
    }

    /// The thin workload, if it is one.
    pub fn thin(self) -> Option<Workload> {
        match self {
            WorkloadChoice::Thin(w) => Some(w),
            WorkloadChoice::Cache(_) => None,
        }
    }

    /// The cache workload, if it is one.
    pub fn cache(self) -> Option<CacheWorkload> {
        match self {
            WorkloadChoice::Cache(w) => Some(w),
            WorkloadChoice::Thin(_) => None,
        }
    }
}

/// What each cache workload does, for `--help`.
fn cache_workload_help(w: CacheWorkload) -> &'static str {
    match w {
        CacheWorkload::Hot => "cache campaign: a hot set that moves now and then (promotions, demotions)",
        CacheWorkload::Scan => "cache campaign: sequential scans over the origin push the hot set out",
        CacheWorkload::Writeback => "cache campaign: bursts of writes to a hot set, writeback under pressure",
        CacheWorkload::Modes => {
            "cache campaign: table reloads between writeback, writethrough, passthrough and the cleaner; \
             invalidations"
        }
        CacheWorkload::Durability => "cache campaign: FUA and PREFLUSH writes with frequent crashes",
        CacheWorkload::Resize => {
            "cache campaign: table reloads on a grown or shrunk cache device and origin (dirty shrinks \
             refused), cleaner reloads"
        }
    }
}

/// The parser of `--workload`: one of the names of [`Workload::ALL`] or of
/// [`CacheWorkload::ALL`] (which `--help` lists).
pub fn workload_parser() -> impl TypedValueParser<Value = WorkloadChoice> {
    use clap::builder::PossibleValue;
    let values: Vec<PossibleValue> = Workload::ALL
        .iter()
        .map(|w| PossibleValue::new(w.name()).help("thin campaign"))
        .chain(CacheWorkload::ALL.iter().map(|w| PossibleValue::new(w.name()).help(cache_workload_help(*w))))
        .collect();
    clap::builder::PossibleValuesParser::new(values).map(|name| {
        Workload::from_name(&name)
            .map(WorkloadChoice::Thin)
            .or_else(|| CacheWorkload::from_name(&name).map(WorkloadChoice::Cache))
            .expect("a possible value names a workload")
    })
}

/// Where a run's violation showed, in words: `at op N`, or `in the final
/// checks` when it showed after the last of its `ops` ops.
pub fn when(step: usize, ops: usize) -> String {
    // Ops count from 1; the final checks come after the last op.
    if step > ops {
        "in the final checks".to_string()
    } else {
        format!("at op {step}")
    }
}

/// Parses a mutation name.
pub fn parse_mutation(s: &str) -> Result<Mutations, String> {
    Mutations::by_name(s).ok_or_else(|| {
        let names: Vec<_> = Mutations::ALL
            .iter()
            .chain(Mutations::CACHE.iter())
            .chain(Mutations::CACHE_TARGET.iter())
            .map(|(n, _)| *n)
            .collect();
        format!("unknown mutation {:?}; known: {}", clip(s), names.join(", "))
    })
}

/// Parses a locking design's name.
pub fn parse_locking(s: &str) -> Result<LockingDesign, String> {
    LockingDesign::from_name(s).ok_or_else(|| {
        let names: Vec<_> = LockingDesign::ALL.iter().map(|d| d.name()).collect();
        format!("unknown locking design {:?}; known: {}", clip(s), names.join(", "))
    })
}

/// Whether the environment says this is a CI run (`CI=true`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// The thread count `--jobs` asks for (default: every core).
pub fn jobs(requested: Option<usize>) -> usize {
    requested.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1)
}

/// One seed of the thin campaign, without its trace unless it failed.
#[derive(Debug, Clone)]
struct ThinSeed {
    workload: Workload,
    ops: usize,
    stats: ThinStats,
    coverage: FaultCoverage,
    thin_checked: bool,
    violation: Option<ThinFailure>,
    /// Kept for failing seeds only.
    trace: Option<Trace>,
    /// The rare states it reached.
    probes: ThinProbes,
}

impl ThinSeed {
    fn of(cfg: &RunConfig, out: RunOutcome) -> ThinSeed {
        let failed = out.violation.is_some();
        ThinSeed {
            workload: cfg.workload,
            ops: out.trace.ops().count(),
            stats: out.stats,
            coverage: out.coverage,
            thin_checked: out.thin_checked,
            violation: out.violation,
            trace: failed.then_some(out.trace),
            probes: out.probes,
        }
    }
}

/// One seed of the cache campaign, without its trace unless it failed.
#[derive(Debug, Clone)]
struct CacheSeed {
    workload: CacheWorkload,
    ops: usize,
    stats: CacheStats,
    coverage: FaultCoverage,
    cache_checked: u64,
    violation: Option<ThinFailure>,
    /// Kept for failing seeds only.
    trace: Option<Trace>,
}

impl CacheSeed {
    fn of(cfg: &CacheRunConfig, out: CacheRunOutcome) -> CacheSeed {
        let failed = out.violation.is_some();
        CacheSeed {
            workload: cfg.workload,
            ops: out.trace.ops().count(),
            stats: out.stats,
            coverage: out.coverage,
            cache_checked: out.cache_checked,
            violation: out.violation,
            trace: failed.then_some(out.trace),
        }
    }
}

/// Two runs of one seed that differ.
#[derive(Debug, Clone)]
struct Difference {
    campaign: &'static str,
    line: usize,
    first: String,
    second: String,
}

/// Everything one seed did.
#[derive(Debug, Clone)]
struct SeedResult {
    seed: u64,
    thin: Option<ThinSeed>,
    cache: Option<CacheSeed>,
    metadata: Option<SeedOutcome>,
    cache_md: Option<SeedOutcome>,
    difference: Option<Difference>,
}

impl SeedResult {
    fn failed(&self) -> bool {
        self.thin.as_ref().is_some_and(|t| t.violation.is_some())
            || self.cache.as_ref().is_some_and(|c| c.violation.is_some())
            || self.metadata.as_ref().is_some_and(|m| !m.violations.is_empty())
            || self.cache_md.as_ref().is_some_and(|m| !m.violations.is_empty())
            || self.difference.is_some()
    }
}

/// The settings the campaign runs seeds with.
struct Plan {
    kind: CampaignKind,
    ops: usize,
    settings: CampaignSettings,
    cache_settings: CacheCampaignSettings,
    metadata: CampaignConfig,
    checkers: Checkers,
    determinism: bool,
}

impl Plan {
    fn run_seed(&self, seed: u64) -> SeedResult {
        let mut difference = None;
        let thin = self.kind.thin().then(|| {
            let cfg = RunConfig::for_seed(seed, self.ops, &self.settings);
            let out = run_config(&cfg, &self.checkers);
            if self.determinism {
                let again = run_config(&cfg, &self.checkers);
                if let Some((line, first, second)) =
                    first_difference(&to_text(&out.trace), &to_text(&again.trace))
                {
                    difference = Some(Difference { campaign: "thin", line, first, second });
                }
            }
            ThinSeed::of(&cfg, out)
        });
        let cache = self.kind.cache().then(|| {
            let cfg = CacheRunConfig::for_seed(seed, self.ops, &self.cache_settings);
            let out = cache_run::run_config(&cfg, &self.checkers);
            if self.determinism && difference.is_none() {
                let again = cache_run::run_config(&cfg, &self.checkers);
                if let Some((line, first, second)) =
                    first_difference(&to_text(&out.trace), &to_text(&again.trace))
                {
                    difference = Some(Difference { campaign: "cache", line, first, second });
                }
            }
            CacheSeed::of(&cfg, out)
        });
        let mut metadata_style = |campaign: &'static str, run: fn(&CampaignConfig, u64) -> SeedOutcome| {
            let out = run(&self.metadata, seed);
            if self.determinism && difference.is_none() {
                let again = run(&self.metadata, seed);
                if again != out {
                    let (a, b) = (format!("{out:#?}"), format!("{again:#?}"));
                    let (line, first, second) =
                        first_difference(&a, &b).unwrap_or((0, "(outcomes differ)".into(), String::new()));
                    difference = Some(Difference { campaign, line, first, second });
                }
            }
            out
        };
        let metadata = self.kind.metadata().then(|| metadata_style("metadata", campaign::run_seed));
        let cache_md =
            self.kind.cache_metadata().then(|| metadata_style("cache-metadata", cache_campaign::run_seed));
        SeedResult { seed, thin, cache, metadata, cache_md, difference }
    }
}

/// Which campaign a failing trace comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TraceCampaign {
    Thin,
    Cache,
    /// The thin metadata campaign: no trace, a minimized list of
    /// operations.
    Metadata,
}

impl TraceCampaign {
    /// The start of its files' names in the failures folder.
    fn file_prefix(self) -> &'static str {
        match self {
            TraceCampaign::Thin => "seed",
            TraceCampaign::Cache => "cache-seed",
            TraceCampaign::Metadata => "metadata-seed",
        }
    }
}

/// The failing traces' files, by campaign and seed.
type Files = Vec<((TraceCampaign, u64), FailureFiles)>;

fn files_of(files: &Files, campaign: TraceCampaign, seed: u64) -> Option<&FailureFiles> {
    files.iter().find(|(k, _)| *k == (campaign, seed)).map(|(_, f)| f)
}

/// A failing thin or cache seed's files and minimization.
#[derive(Debug, Clone, Default)]
struct FailureFiles {
    trace: Option<PathBuf>,
    minimized: Option<MinimizedFile>,
    error: Option<String>,
}

#[derive(Debug, Clone)]
struct MinimizedFile {
    path: PathBuf,
    ops_before: usize,
    ops_after: usize,
    runs: u64,
    signature: String,
}

impl MinimizedFile {
    /// Its `minimized` object in the JSON output.
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.path.display().to_string(),
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "runs": self.runs,
            "signature": self.signature,
        })
    }
}

/// Runs the campaign; exit 1 on any violation.
pub fn run(args: CheckArgs) -> ExitCode {
    if let Err(e) = usable_failures_folder(&args.failures) {
        eprintln!("dmsim check: {e}");
        return ExitCode::from(exit::UNUSABLE);
    }
    if args.depth > 1 && args.on != "engine" {
        eprintln!("dmsim check: --depth is for --on engine");
        return ExitCode::from(exit::UNUSABLE);
    }
    if matches!(args.on.as_str(), "kernel" | "engine" | "all") {
        if let Some(dir) = &args.answers {
            if let Err(e) = usable_folder("--answers", dir) {
                eprintln!("dmsim check: {e}");
                return ExitCode::from(exit::UNUSABLE);
            }
        }
        return crate::kernel_check_cmd::run(&args);
    }
    if args.answers.is_some() {
        eprintln!("dmsim check: --answers keeps the kernel's answers: it goes with --on kernel (or engine)");
        return ExitCode::from(exit::UNUSABLE);
    }
    if let Some(w) = args.model.workload {
        let (runs, campaign) = match w {
            WorkloadChoice::Thin(_) => (args.campaign.thin(), "thin"),
            WorkloadChoice::Cache(_) => (args.campaign.cache(), "cache"),
        };
        if !runs {
            let kind = args.campaign.to_possible_value().map_or(String::new(), |v| v.get_name().to_string());
            eprintln!(
                "dmsim check: --workload {} is a {campaign} workload, and --campaign {kind} does not run \
                 the {campaign} campaign",
                w.name()
            );
            return ExitCode::from(exit::UNUSABLE);
        }
    }
    let checkers = Checkers::from_path();
    for (runs, tool, missing) in [
        (args.campaign.thin(), "thin_check", checkers.thin_check.is_none()),
        (args.campaign.cache(), "cache_check", checkers.cache_check.is_none()),
    ] {
        if !(runs && missing) {
            continue;
        }
        if in_ci() {
            eprintln!(
                "dmsim check: {tool} is not installed (Debian: apt-get install thin-provisioning-tools); \
                 under CI=true a missing prerequisite is an error"
            );
            return ExitCode::from(exit::UNUSABLE);
        }
        let runs = if tool == "thin_check" { "runs" } else { "cache runs" };
        eprintln!("dmsim check: {tool} is not installed; {runs} are judged by the model's checker only");
    }
    let seeds = match (args.seeds.clone(), args.time) {
        (Some(r), _) => r,
        (None, None) => 0..64,
        (None, Some(_)) => 0..u64::MAX,
    };
    let plan = Plan {
        kind: args.campaign,
        ops: args.ops,
        settings: args.model.settings(),
        cache_settings: args.model.cache_settings(),
        metadata: CampaignConfig {
            seeds: seeds.clone(),
            ops_per_seed: args.metadata_ops,
            crashes_per_point: args.crashes_per_point,
            shape: args.metadata_shape,
            mutations: args.model.mutation.unwrap_or_default(),
            ..CampaignConfig::default()
        },
        checkers,
        determinism: args.check_determinism,
    };
    if plan.kind.metadata() || plan.kind.cache_metadata() {
        if let Err(e) = plan.metadata.validate() {
            eprintln!("dmsim check: {e}");
            return ExitCode::from(exit::UNUSABLE);
        }
    }
    let jobs = jobs(args.jobs);
    let deadline = args.time.map(|t| Instant::now() + t);
    let started = Instant::now();

    let bar = match args.time {
        None => ProgressBar::new(seeds.end - seeds.start).with_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} seeds {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        ),
        Some(t) => ProgressBar::new(t.as_secs().max(1)).with_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {prefix} seeds {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        ),
    };
    let next = AtomicU64::new(seeds.start);
    let done = AtomicU64::new(0);
    let failing = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= seeds.end {
                    break;
                }
                let result = plan.run_seed(seed);
                if result.failed() {
                    let n = failing.fetch_add(1, Ordering::Relaxed) + 1;
                    bar.set_message(format!("({n} failing)"));
                }
                results.lock().expect("results lock").push(result);
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                match args.time {
                    None => bar.inc(1),
                    Some(t) => {
                        bar.set_prefix(n.to_string());
                        bar.set_position(started.elapsed().as_secs().min(t.as_secs()));
                    }
                }
            });
        }
    });
    bar.finish_and_clear();
    let wall = started.elapsed();
    let mut results = results.into_inner().expect("results lock");
    results.sort_by_key(|r| r.seed);
    // With --time the seeds that ran are a prefix of the range, except
    // that threads may have stopped at the deadline with later seeds done:
    // keep the longest gap-free prefix so the report names a range.
    let mut end = seeds.start;
    let mut kept = 0;
    for r in &results {
        if r.seed != end {
            break;
        }
        end += 1;
        kept += 1;
    }
    results.truncate(kept);
    let ran = seeds.start..end;

    let files = write_failures(&args, &plan, &results, jobs);
    let summary = Summary::of(&results);
    let ok = !results.iter().any(SeedResult::failed);
    if args.json {
        println!("{}", summary.to_json(&args, &plan, &ran, &results, &files, args.timings.then_some(wall)));
    } else {
        summary.print(&args, &plan, &ran, &results, &files);
    }
    if args.timings {
        eprintln!("wall time: {:.3} s", wall.as_secs_f64());
    }
    let file_errors = files.iter().any(|(_, f)| f.error.is_some());
    if !ok {
        ExitCode::from(exit::PROBLEMS)
    } else if file_errors {
        ExitCode::from(exit::UNUSABLE)
    } else {
        ExitCode::SUCCESS
    }
}

/// Refuses a `--failures` path that exists and is not a folder, before the
/// campaign spends its time (the folder itself is made only when a seed
/// fails).
fn usable_failures_folder(dir: &std::path::Path) -> Result<(), String> {
    usable_folder("--failures", dir)
}

/// Refuses a folder option's path (`option`) that exists and is not a
/// folder.
fn usable_folder(option: &str, dir: &std::path::Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(format!(
            "{option} {}: exists and is not a folder (traces are written into a folder)",
            dir.display()
        )),
        _ => Ok(()),
    }
}

/// Writes every failing thin and cache seed's trace and minimizes the first
/// `--minimize-max` of them (in seed order, thin before cache), in
/// parallel; returns the files by campaign and seed.
fn write_failures(args: &CheckArgs, plan: &Plan, results: &[SeedResult], jobs: usize) -> Files {
    let mut files = write_trace_failures(args, plan, results, jobs);
    files.extend(minimize_metadata_failures(args, plan, results));
    files
}

/// Minimizes the first `--minimize-max` failing seeds of the thin metadata
/// campaign and writes each one's operations, one a line, to
/// metadata-seed-N.min.ops in the failures folder.
fn minimize_metadata_failures(args: &CheckArgs, plan: &Plan, results: &[SeedResult]) -> Files {
    let failing: Vec<u64> = results
        .iter()
        .filter(|r| r.metadata.as_ref().is_some_and(|o| !o.violations.is_empty()))
        .map(|r| r.seed)
        .take(args.minimize_max)
        .collect();
    let mut files = Files::new();
    for seed in failing {
        let path = args.failures.join(format!("{}-{seed}.min.ops", TraceCampaign::Metadata.file_prefix()));
        let f = match campaign::minimize(&plan.metadata, seed) {
            None => FailureFiles {
                error: Some(format!("seed {seed} did not fail again when minimized")),
                ..FailureFiles::default()
            },
            Some(m) => {
                let mut text = format!(
                    "# dmsim metadata campaign, seed {seed}: {} of its {} operations still give: {}\n",
                    m.ops.len(),
                    m.ops_before,
                    m.violation.kind.name()
                );
                for op in &m.ops {
                    text.push_str(&format!("{op:?}\n"));
                }
                let written =
                    std::fs::create_dir_all(&args.failures).and_then(|()| std::fs::write(&path, text));
                match written {
                    Err(e) => FailureFiles {
                        error: Some(format!("cannot write {}: {e}", path.display())),
                        ..FailureFiles::default()
                    },
                    Ok(()) => FailureFiles {
                        minimized: Some(MinimizedFile {
                            path,
                            ops_before: m.ops_before,
                            ops_after: m.ops.len(),
                            runs: m.runs as u64,
                            signature: format!(
                                "{} at operation {}",
                                m.violation.kind.name(),
                                m.violation.op_index
                            ),
                        }),
                        ..FailureFiles::default()
                    },
                }
            }
        };
        files.push(((TraceCampaign::Metadata, seed), f));
    }
    files
}

/// Writes every failing thin and cache seed's trace and minimizes the first
/// `--minimize-max` of them.
fn write_trace_failures(args: &CheckArgs, plan: &Plan, results: &[SeedResult], jobs: usize) -> Files {
    let failing: Vec<(TraceCampaign, u64, &Trace)> = results
        .iter()
        .flat_map(|r| {
            let thin =
                r.thin.as_ref().and_then(|t| t.trace.as_ref()).map(|t| (TraceCampaign::Thin, r.seed, t));
            let cache =
                r.cache.as_ref().and_then(|c| c.trace.as_ref()).map(|t| (TraceCampaign::Cache, r.seed, t));
            thin.into_iter().chain(cache)
        })
        .collect();
    if failing.is_empty() {
        return Vec::new();
    }
    let dir = &args.failures;
    if let Err(e) = std::fs::create_dir_all(dir) {
        let error = format!("cannot create the failures folder {}: {e}", dir.display());
        eprintln!("dmsim check: {error}");
        return failing
            .iter()
            .map(|(c, seed, _)| {
                ((*c, *seed), FailureFiles { error: Some(error.clone()), ..FailureFiles::default() })
            })
            .collect();
    }
    let mut files: Files = failing
        .iter()
        .map(|(c, seed, trace)| {
            let path = dir.join(format!("{}-{seed}.trace", c.file_prefix()));
            let f = match trace_file::write(&path, trace, Encoding::Text) {
                Ok(()) => FailureFiles { trace: Some(path), ..FailureFiles::default() },
                Err(e) => FailureFiles { error: Some(e), ..FailureFiles::default() },
            };
            ((*c, *seed), f)
        })
        .collect();
    let to_minimize = failing.len().min(args.minimize_max);
    if to_minimize == 0 {
        return files;
    }
    let bar = ProgressBar::new(to_minimize as u64).with_style(
        ProgressStyle::with_template("{elapsed_precise} minimizing [{bar:20}] {pos}/{len} traces {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let next = AtomicUsize::new(0);
    let minimized: Mutex<Vec<(usize, Result<MinimizedFile, String>)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.min(to_minimize) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to_minimize {
                    break;
                }
                let (campaign, seed, trace) = failing[i];
                let shrunk = match campaign {
                    TraceCampaign::Thin => minimize(trace, &plan.checkers, |_, _| {}),
                    TraceCampaign::Cache => cache_run::minimize(trace, &plan.checkers, |_, _| {}),
                    TraceCampaign::Metadata => Err(ReplayError("the metadata campaign has no traces".into())),
                };
                let result = shrunk.map_err(|e| e.to_string()).and_then(|m| {
                    let path = dir.join(format!("{}-{seed}.min.trace", campaign.file_prefix()));
                    trace_file::write(&path, &m.trace, Encoding::Text)?;
                    Ok(MinimizedFile {
                        path,
                        ops_before: m.ops_before,
                        ops_after: m.ops_after,
                        runs: m.runs,
                        signature: m.signature,
                    })
                });
                minimized.lock().expect("minimized lock").push((i, result));
                bar.inc(1);
            });
        }
    });
    bar.finish_and_clear();
    for (i, result) in minimized.into_inner().expect("minimized lock") {
        match result {
            Ok(m) => files[i].1.minimized = Some(m),
            Err(e) => files[i].1.error = Some(format!("minimizing seed {}: {e}", files[i].0 .1)),
        }
    }
    files
}

/// Totals over the seeds.
#[derive(Debug, Default)]
struct Summary {
    thin_seeds: usize,
    thin_ops: usize,
    thin: ThinStats,
    coverage: FaultCoverage,
    thin_check_runs: usize,
    workloads: Vec<(Workload, usize)>,
    thin_failing: Vec<u64>,
    probes: ProbeTally,
    cache_seeds: usize,
    cache_ops: usize,
    cache: CacheStats,
    cache_coverage: FaultCoverage,
    cache_check_runs: u64,
    cache_workloads: Vec<(CacheWorkload, usize)>,
    cache_failing: Vec<u64>,
    md: MetadataTotals,
    cache_md: MetadataTotals,
    differences: Vec<u64>,
}

/// Totals of a metadata crash campaign (thin or cache) over the seeds.
#[derive(Debug, Default)]
struct MetadataTotals {
    seeds: usize,
    ops: usize,
    commits: usize,
    mappings: u64,
    crash_states: usize,
    torn_writes: usize,
    out_of_metadata_space: usize,
    /// Seeds of each workload shape, in `Shape::ALL`'s order (thin only).
    shapes: [usize; 3],
    in_core_checks: usize,
    deepest_tree: u32,
    failed_commits: usize,
    /// The btree probes by seed (thin only).
    probes: ProbeTally,
    failing: Vec<u64>,
}

/// Which metadata crash campaign a report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetadataCampaign {
    Thin,
    Cache,
}

impl MetadataCampaign {
    fn title(self) -> &'static str {
        match self {
            MetadataCampaign::Thin => "metadata crash campaign",
            MetadataCampaign::Cache => "cache metadata crash campaign",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            MetadataCampaign::Thin => "metadata",
            MetadataCampaign::Cache => "cache-metadata",
        }
    }

    fn outcome(self, r: &SeedResult) -> Option<&SeedOutcome> {
        match self {
            MetadataCampaign::Thin => r.metadata.as_ref(),
            MetadataCampaign::Cache => r.cache_md.as_ref(),
        }
    }
}

impl MetadataTotals {
    fn add(&mut self, seed: u64, o: &SeedOutcome) {
        self.seeds += 1;
        self.ops += o.ops;
        self.commits += o.commits;
        self.mappings += o.mappings;
        self.crash_states += o.crash_states;
        self.torn_writes += o.torn_writes;
        self.out_of_metadata_space += usize::from(o.out_of_metadata_space);
        if let Some(i) = Shape::ALL.iter().position(|s| s.name() == o.shape) {
            self.shapes[i] += 1;
        }
        self.in_core_checks += o.in_core_checks;
        self.failed_commits += o.failed_commits;
        self.deepest_tree = self.deepest_tree.max(o.deepest_tree);
        if !o.violations.is_empty() {
            self.failing.push(seed);
        }
    }

    fn print(&self, which: MetadataCampaign, plan: &Plan) {
        let row = |k: &str, v: String| println!("  {k:<30} {v:>12}");
        println!("\n{}: {} metadata operations per seed", which.title(), plan.metadata.ops_per_seed);
        row("seeds", self.seeds.to_string());
        row("metadata operations", self.ops.to_string());
        row(
            if which == MetadataCampaign::Thin { "commits" } else { "commits and reopens" },
            self.commits.to_string(),
        );
        row("mappings made", self.mappings.to_string());
        row("crash states judged", self.crash_states.to_string());
        row("  with a torn write", self.torn_writes.to_string());
        row("seeds out of metadata space", self.out_of_metadata_space.to_string());
        if which == MetadataCampaign::Thin {
            let [random, shrink, deep] = self.shapes;
            row("seeds random/shrink/deep", format!("{random}/{shrink}/{deep}"));
            row("open transactions checked", self.in_core_checks.to_string());
            row("deepest mapping tree (levels)", self.deepest_tree.to_string());
            row("commits failed by aimed faults", self.failed_commits.to_string());
            crate::probes_report::print(&self.probes);
        }
        row("violations", self.failing.len().to_string());
    }

    fn to_json(
        &self,
        which: MetadataCampaign,
        args: &CheckArgs,
        plan: &Plan,
        results: &[SeedResult],
        files: &Files,
    ) -> serde_json::Value {
        let failures: Vec<_> = results
            .iter()
            .filter_map(|r| which.outcome(r).and_then(|o| o.violations.first()))
            .map(|v| {
                let minimized = (which == MetadataCampaign::Thin)
                    .then(|| files_of(files, TraceCampaign::Metadata, v.seed))
                    .flatten()
                    .and_then(|f| f.minimized.as_ref())
                    .map(MinimizedFile::to_json);
                serde_json::json!({
                    "seed": v.seed,
                    "op_index": v.op_index,
                    "kind": kind_id(v.kind),
                    "detail": v.detail,
                    "minimized": minimized,
                    "reproduce": reproduce_metadata(args, which, v.seed),
                })
            })
            .collect();
        serde_json::json!({
            "ops_per_seed": plan.metadata.ops_per_seed,
            "crashes_per_point": plan.metadata.crashes_per_point,
            "seeds": self.seeds,
            "operations": self.ops,
            "commits": self.commits,
            "mappings": self.mappings,
            "crash_states": self.crash_states,
            "torn_writes": self.torn_writes,
            "seeds_out_of_metadata_space": self.out_of_metadata_space,
            "seeds_by_shape": Shape::ALL.iter().zip(self.shapes).map(|(s, n)| (s.name().to_string(), serde_json::json!(n))).collect::<serde_json::Map<_, _>>(),
            "open_transactions_checked": self.in_core_checks,
            "deepest_tree_levels": self.deepest_tree,
            "commits_failed_by_aimed_faults": self.failed_commits,
            "probes": (which == MetadataCampaign::Thin).then(|| crate::probes_report::to_json(&self.probes)),
            "violations": self.failing.len(),
            "failing_seeds": self.failing,
            "failures": failures,
        })
    }
}

impl Summary {
    fn of(results: &[SeedResult]) -> Self {
        let mut s = Summary {
            workloads: Workload::ALL.iter().map(|w| (*w, 0)).collect(),
            cache_workloads: CacheWorkload::ALL.iter().map(|w| (*w, 0)).collect(),
            ..Summary::default()
        };
        for r in results {
            if let Some(t) = &r.thin {
                s.thin_seeds += 1;
                s.thin_ops += t.ops;
                s.thin.add(&t.stats);
                s.coverage.add(&t.coverage);
                s.thin_check_runs += usize::from(t.thin_checked);
                s.probes.add(r.seed, &t.probes);
                if let Some(w) = s.workloads.iter_mut().find(|(w, _)| *w == t.workload) {
                    w.1 += 1;
                }
                if t.violation.is_some() {
                    s.thin_failing.push(r.seed);
                }
            }
            if let Some(c) = &r.cache {
                s.cache_seeds += 1;
                s.cache_ops += c.ops;
                s.cache.add(&c.stats);
                s.cache_coverage.add(&c.coverage);
                s.cache_check_runs += c.cache_checked;
                if let Some(w) = s.cache_workloads.iter_mut().find(|(w, _)| *w == c.workload) {
                    w.1 += 1;
                }
                if c.violation.is_some() {
                    s.cache_failing.push(r.seed);
                }
            }
            if let Some(o) = &r.metadata {
                s.md.add(r.seed, o);
                s.md.probes.add(r.seed, &ThinProbes::of_trees(&o.tree_probes));
            }
            if let Some(o) = &r.cache_md {
                s.cache_md.add(r.seed, o);
            }
            if r.difference.is_some() {
                s.differences.push(r.seed);
            }
        }
        s
    }

    fn print(&self, args: &CheckArgs, plan: &Plan, ran: &Range<u64>, results: &[SeedResult], files: &Files) {
        let row = |k: &str, v: String| println!("  {k:<30} {v:>12}");
        let names: Vec<&str> = [
            (plan.kind.thin(), "thin"),
            (plan.kind.metadata(), "metadata"),
            (plan.kind.cache_metadata(), "cache metadata"),
            (plan.kind.cache(), "cache"),
        ]
        .into_iter()
        .filter_map(|(on, n)| on.then_some(n))
        .collect();
        println!(
            "dmsim check: seeds {}..{} ({} seeds), campaigns: {}{}",
            ran.start,
            ran.end,
            ran.end - ran.start,
            names.join(" + "),
            if args.time.is_some() { " (seeds limited by --time)" } else { "" }
        );
        if plan.settings.mutations.any() {
            println!("  (with a deliberately broken model: {})", plan.settings.mutations.names().join(", "));
        }
        if plan.settings.kernel_as_is {
            println!("  (kernel as is: the candidate kernel fixes are off)");
        }
        if plan.settings.locking != LockingDesign::default() {
            println!("  (locking design: {})", plan.settings.locking.name());
        }
        if plan.kind.thin() {
            let workload =
                plan.settings.workload.map_or("each seed's own".to_string(), |w| w.name().to_string());
            println!("\nthin campaign: {} ops per seed, workload {workload}", plan.ops);
            row("seeds", self.thin_seeds.to_string());
            row("ops", self.thin_ops.to_string());
            row("bios", self.thin.bios.to_string());
            row("reads checked", self.thin.reads_checked.to_string());
            row("crashes", self.thin.crashes.to_string());
            row("crash states", self.thin.crash_states.to_string());
            row("ENOSPC", self.thin.enospc.to_string());
            row("EIO", self.thin.io_errors.to_string());
            row("out of metadata space", self.thin.out_of_metadata_space.to_string());
            row("metadata growths", self.thin.metadata_growths.to_string());
            row("read-only rules judged", self.thin.read_only_judged.to_string());
            row("simulated seconds", format!("{:.1}", self.thin.sim_time_ns as f64 / 1e9));
            row(
                "thin_check runs",
                if plan.checkers.thin_check.is_some() {
                    self.thin_check_runs.to_string()
                } else {
                    "not installed".to_string()
                },
            );
            println!("  faults fired");
            for (name, count) in self.coverage.iter() {
                row(&format!("  {name}"), count.to_string());
            }
            println!("  workloads");
            for (w, n) in &self.workloads {
                row(&format!("  {}", w.name()), n.to_string());
            }
            crate::probes_report::print(&self.probes);
            row("violations", self.thin_failing.len().to_string());
        }
        if plan.kind.metadata() {
            self.md.print(MetadataCampaign::Thin, plan);
        }
        if plan.kind.cache_metadata() {
            self.cache_md.print(MetadataCampaign::Cache, plan);
        }
        if plan.kind.cache() {
            let workload =
                plan.cache_settings.workload.map_or("each seed's own".to_string(), |w| w.name().to_string());
            let c = &self.cache;
            println!("\ncache campaign: {} ops per seed, workload {workload}", plan.ops);
            row("seeds", self.cache_seeds.to_string());
            row("ops", self.cache_ops.to_string());
            row("requests", c.bios.to_string());
            row("reads checked", c.reads_checked.to_string());
            row("crashes", c.crashes.to_string());
            row("EIO", c.io_errors.to_string());
            row("reloads", c.reloads.to_string());
            row("  refused", c.reloads_refused.to_string());
            row("resizes", c.resizes.to_string());
            row("  refused", c.resizes_refused.to_string());
            row("  repaired after", c.repairs.to_string());
            row("promotions", c.migrations[0].to_string());
            row("  by overwrite", c.overwrites.to_string());
            row("demotions", c.migrations[1].to_string());
            row("writebacks", c.migrations[2].to_string());
            row("metadata commits", c.commits.to_string());
            row("clean-block checks", c.clean_checks.to_string());
            row("simulated seconds", format!("{:.1}", c.sim_time_ns as f64 / 1e9));
            row(
                "cache_check runs",
                if plan.checkers.cache_check.is_some() {
                    self.cache_check_runs.to_string()
                } else {
                    "not installed".to_string()
                },
            );
            println!("  faults fired");
            for (name, count) in self.cache_coverage.iter() {
                row(&format!("  {name}"), count.to_string());
            }
            println!("  workloads");
            for (w, n) in &self.cache_workloads {
                row(&format!("  {}", w.name()), n.to_string());
            }
            row("violations", self.cache_failing.len().to_string());
        }
        if plan.determinism {
            println!(
                "\ndeterminism: every seed ran twice; {}",
                if self.differences.is_empty() {
                    "the runs are byte-identical".to_string()
                } else {
                    format!("{} seeds differ", self.differences.len())
                }
            );
        }
        for r in results {
            print_failure(args, r, files);
        }
        if results.iter().any(SeedResult::failed) {
            let n = results.iter().filter(|r| r.failed()).count();
            println!("\n{n} failing seeds");
        } else {
            println!("\nno violations");
        }
    }

    fn to_json(
        &self,
        args: &CheckArgs,
        plan: &Plan,
        ran: &Range<u64>,
        results: &[SeedResult],
        files: &Files,
        wall: Option<Duration>,
    ) -> String {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let thin = plan.kind.thin().then(|| {
            let failures: Vec<_> = results
                .iter()
                .filter_map(|r| r.thin.as_ref().and_then(|t| t.violation.as_ref()).map(|v| (r, v)))
                .map(|(r, v)| {
                    let f = files_of(files, TraceCampaign::Thin, r.seed).cloned().unwrap_or_default();
                    serde_json::json!({
                        "seed": r.seed,
                        "workload": r.thin.as_ref().map(|t| t.workload.name()),
                        "step": v.step,
                        "kind": v.kind,
                        "message": v.what,
                        "trace": path(&f.trace),
                        "minimized": f.minimized.as_ref().map(MinimizedFile::to_json),
                        "error": f.error,
                        "reproduce": reproduce_thin(args, r.seed),
                    })
                })
                .collect();
            let faults: serde_json::Map<String, serde_json::Value> =
                self.coverage.iter().map(|(n, c)| (n.to_string(), c.into())).collect();
            let workloads: serde_json::Map<String, serde_json::Value> =
                self.workloads.iter().map(|(w, n)| (w.name().to_string(), (*n).into())).collect();
            serde_json::json!({
                "ops_per_seed": plan.ops,
                "workload": plan.settings.workload.map(Workload::name),
                "seeds": self.thin_seeds,
                "ops": self.thin_ops,
                "bios": self.thin.bios,
                "reads_checked": self.thin.reads_checked,
                "crashes": self.thin.crashes,
                "crash_states": self.thin.crash_states,
                "enospc": self.thin.enospc,
                "eio": self.thin.io_errors,
                "out_of_metadata_space": self.thin.out_of_metadata_space,
                "metadata_growths": self.thin.metadata_growths,
                "read_only_judged": self.thin.read_only_judged,
                "sim_seconds": self.thin.sim_time_ns as f64 / 1e9,
                "thin_check_installed": plan.checkers.thin_check.is_some(),
                "thin_check_runs": self.thin_check_runs,
                "faults_fired": faults,
                "workloads": workloads,
                "probes": crate::probes_report::to_json(&self.probes),
                "violations": self.thin_failing.len(),
                "failing_seeds": self.thin_failing,
                "failures": failures,
            })
        });
        let metadata =
            plan.kind.metadata().then(|| self.md.to_json(MetadataCampaign::Thin, args, plan, results, files));
        let cache_md = plan
            .kind
            .cache_metadata()
            .then(|| self.cache_md.to_json(MetadataCampaign::Cache, args, plan, results, files));
        let cache = plan.kind.cache().then(|| {
            let failures: Vec<_> = results
                .iter()
                .filter_map(|r| r.cache.as_ref().and_then(|c| c.violation.as_ref().map(|v| (r.seed, c, v))))
                .map(|(seed, c, v)| {
                    let f = files_of(files, TraceCampaign::Cache, seed).cloned().unwrap_or_default();
                    serde_json::json!({
                        "seed": seed,
                        "workload": c.workload.name(),
                        "step": v.step,
                        "kind": v.kind,
                        "message": v.what,
                        "trace": path(&f.trace),
                        "minimized": f.minimized.as_ref().map(MinimizedFile::to_json),
                        "error": f.error,
                        "reproduce": reproduce_cache(args, seed, c.workload),
                    })
                })
                .collect();
            let faults: serde_json::Map<String, serde_json::Value> =
                self.cache_coverage.iter().map(|(n, c)| (n.to_string(), c.into())).collect();
            let workloads: serde_json::Map<String, serde_json::Value> =
                self.cache_workloads.iter().map(|(w, n)| (w.name().to_string(), (*n).into())).collect();
            let c = &self.cache;
            serde_json::json!({
                "ops_per_seed": plan.ops,
                "workload": plan.cache_settings.workload.map(CacheWorkload::name),
                "seeds": self.cache_seeds,
                "ops": self.cache_ops,
                "requests": c.bios,
                "reads_checked": c.reads_checked,
                "crashes": c.crashes,
                "eio": c.io_errors,
                "data_ios": c.data_ios,
                "reloads": c.reloads,
                "reloads_refused": c.reloads_refused,
                "resizes": c.resizes,
                "resizes_refused": c.resizes_refused,
                "repairs": c.repairs,
                "promotions": c.migrations[0],
                "overwrites": c.overwrites,
                "demotions": c.migrations[1],
                "writebacks": c.migrations[2],
                "commits": c.commits,
                "clean_checks": c.clean_checks,
                "leaked_after_fault": c.leaked_after_fault,
                "sim_seconds": c.sim_time_ns as f64 / 1e9,
                "cache_check_installed": plan.checkers.cache_check.is_some(),
                "cache_check_runs": self.cache_check_runs,
                "faults_fired": faults,
                "workloads": workloads,
                "violations": self.cache_failing.len(),
                "failing_seeds": self.cache_failing,
                "failures": failures,
            })
        });
        let differences: Vec<_> = results
            .iter()
            .filter_map(|r| r.difference.as_ref().map(|d| (r.seed, d)))
            .map(|(seed, d)| {
                serde_json::json!({
                    "seed": seed, "campaign": d.campaign, "line": d.line, "first": d.first, "second": d.second,
                })
            })
            .collect();
        let failing: Vec<u64> = results.iter().filter(|r| r.failed()).map(|r| r.seed).collect();
        let mut json = serde_json::json!({
            "seeds": { "start": ran.start, "end": ran.end },
            "time_limited": args.time.is_some(),
            "mutations": plan.settings.mutations.names(),
            "kernel_as_is": plan.settings.kernel_as_is,
            "locking": plan.settings.locking.name(),
            "thin": thin,
            "metadata": metadata,
            "cache_metadata": cache_md,
            "cache": cache,
            "determinism": {
                "checked": plan.determinism,
                "differences": differences,
            },
            "violations": self.thin_failing.len()
                + self.cache_failing.len()
                + self.md.failing.len()
                + self.cache_md.failing.len()
                + self.differences.len(),
            "failing_seeds": failing,
            "ok": failing.is_empty(),
        });
        if let Some(wall) = wall {
            json["timings"] = serde_json::json!({ "wall_seconds": wall.as_secs_f64() });
        }
        json.to_string()
    }
}

fn print_failure(args: &CheckArgs, r: &SeedResult, files: &Files) {
    if let Some((t, v)) = r.thin.as_ref().and_then(|t| t.violation.as_ref().map(|v| (t, v))) {
        println!(
            "\nFAILED thin seed {} (workload {}) {}: {}: {}",
            r.seed,
            t.workload.name(),
            when(v.step, t.ops),
            v.kind,
            v.what
        );
        print_files(args, files_of(files, TraceCampaign::Thin, r.seed), t.ops);
        println!("  reproduce: {}", reproduce_thin(args, r.seed));
    }
    if let Some((c, v)) = r.cache.as_ref().and_then(|c| c.violation.as_ref().map(|v| (c, v))) {
        println!(
            "\nFAILED cache seed {} (workload {}) {}: {}: {}",
            r.seed,
            c.workload.name(),
            when(v.step, c.ops),
            v.kind,
            v.what
        );
        print_files(args, files_of(files, TraceCampaign::Cache, r.seed), c.ops);
        println!("  reproduce: {}", reproduce_cache(args, r.seed, c.workload));
    }
    for which in [MetadataCampaign::Thin, MetadataCampaign::Cache] {
        if let Some(v) = which.outcome(r).and_then(|o| o.violations.first()) {
            let name = if which == MetadataCampaign::Thin { "metadata" } else { "cache metadata" };
            println!(
                "\nFAILED {name} seed {} at operation {}: {}\n  {}",
                v.seed,
                v.op_index,
                v.kind.name(),
                v.detail
            );
            if which == MetadataCampaign::Thin {
                print_metadata_files(args, files_of(files, TraceCampaign::Metadata, v.seed));
            }
            println!("  reproduce: {}", reproduce_metadata(args, which, v.seed));
        }
    }
    if let Some(d) = &r.difference {
        println!(
            "\nNOT DETERMINISTIC: seed {} ({} campaign), the two runs first differ at line {}:\n  first:  {}\n  second: {}",
            r.seed, d.campaign, d.line, d.first, d.second
        );
    }
}

/// A failing trace's files, as the lines under its FAILED line.
fn print_files(args: &CheckArgs, files: Option<&FailureFiles>, ops: usize) {
    let Some(f) = files else { return };
    if let Some(p) = &f.trace {
        println!("  trace: {} ({ops} ops)", p.display());
    }
    if let Some(m) = &f.minimized {
        println!(
            "  minimized: {} → {} ops ({} runs): {}",
            m.ops_before,
            m.ops_after,
            m.runs,
            m.path.display()
        );
        println!("  signature: {}", m.signature);
        println!("  replay it: dmsim replay {}", m.path.display());
    } else if f.error.is_none() {
        println!("  not minimized (--minimize-max {})", args.minimize_max);
    }
    if let Some(e) = &f.error {
        println!("  error: {e}");
    }
}

/// A failing metadata seed's minimized operations, under its FAILED line.
fn print_metadata_files(args: &CheckArgs, files: Option<&FailureFiles>) {
    match files {
        Some(FailureFiles { minimized: Some(m), .. }) => println!(
            "  minimized: {} → {} operations ({} runs; {}): {}",
            m.ops_before,
            m.ops_after,
            m.runs,
            m.signature,
            m.path.display()
        ),
        Some(FailureFiles { error: Some(e), .. }) => println!("  error: {e}"),
        _ => println!("  not minimized (--minimize-max {})", args.minimize_max),
    }
}

fn reproduce_thin(args: &CheckArgs, seed: u64) -> String {
    let workload =
        args.model.settings().workload.map_or(String::new(), |w| format!(" --workload {}", w.name()));
    format!(
        "dmsim run --seed {seed} --ops {}{workload}{} --trace seed-{seed}.trace",
        args.ops,
        args.model.flags(true)
    )
}

/// `dmsim run` of a cache seed: the workload named is the seed's own (a
/// seed draws the same shape whether its workload is forced or not).
fn reproduce_cache(args: &CheckArgs, seed: u64, workload: CacheWorkload) -> String {
    format!(
        "dmsim run --seed {seed} --ops {} --workload {}{} --trace cache-seed-{seed}.trace",
        args.ops,
        workload.name(),
        args.model.flags(false)
    )
}

fn reproduce_metadata(args: &CheckArgs, which: MetadataCampaign, seed: u64) -> String {
    format!(
        "dmsim check --campaign {} --seeds {seed}..{} --metadata-ops {} --crashes-per-point {}{}{}",
        which.flag(),
        seed + 1,
        args.metadata_ops,
        args.crashes_per_point,
        args.metadata_shape.map_or(String::new(), |s| format!(" --metadata-shape {}", s.name())),
        args.model.flags(true)
    )
}

fn kind_id(k: ViolationKind) -> &'static str {
    match k {
        ViolationKind::OperationFailed => "operation_failed",
        ViolationKind::ReferenceMismatch => "reference_mismatch",
        ViolationKind::CrashUnopenable => "crash_unopenable",
        ViolationKind::CrashDamaged => "crash_damaged",
        ViolationKind::CrashTorn => "crash_torn",
        ViolationKind::InCoreDamaged => "in_core_damaged",
    }
}
