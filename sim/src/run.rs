//! One seed of the thin campaign, recorded as a trace; replay and
//! minimization of such traces.
//!
//! A seed decides everything: the workload generator, the pool's shape and
//! features, the swarm of faults it may inject ([`FaultSwarm`]), and then
//! every op. The ops run through [`ThinSim`] (the pool on simulated disks,
//! judged by the oracle after every read, by the metadata checker after
//! every recovery and at the end, and by Debian's `thin_check` when given),
//! and everything that happens is recorded as a [`Trace`]. A trace carries
//! its settings in its header, so [`replay`] needs nothing else, and
//! [`minimize`] shrinks a failing one while the same violation still
//! occurs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use dmsim_faults::{FaultCoverage, FaultSwarm};
use dmsim_model::mutation::Mutations;
use dmsim_model::prison::REGION_BLOCKS;
use dmsim_model::thin::pool::{KernelFixes, LockingDesign, PoolOptions};
use dmsim_model::thin::table::PoolFeatures;
use dmsim_traces::minimize::minimize_ops;
use dmsim_traces::text::to_text;
use dmsim_traces::{Header, Op, Trace};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::header_params::{within, HeaderParams};
use crate::probes::ThinProbes;
use crate::thin::{ThinFailure, ThinSim, ThinSimConfig, ThinStats};

/// The shapes of workload a seed can get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Workload {
    /// A mix of everything, sectors clustered so that requests collide.
    Random,
    /// Writes marching through the devices, mostly block-sized.
    Sequential,
    /// Many snapshots (of snapshots), writes that break sharing.
    SnapshotHeavy,
    /// Many discards, whole-block and partial, with and without sharing.
    DiscardHeavy,
    /// A small pool written until it is full: queueing, ENOSPC, timeouts.
    FillToFull,
    /// Many small thin devices created and deleted.
    ManySmallDevices,
    /// FUA and PREFLUSH writes with frequent crashes, whatever the fault
    /// swarm says: the durability promises under test.
    Durability,
    /// A metadata device a few dozen blocks long, many devices and
    /// snapshots writing apart: the pool runs into its metadata reserve
    /// and out of metadata space (out-of-metadata-space mode, or a
    /// metadata allocation that fails), and the administrator grows the
    /// metadata device now and then ([`Op::GrowMetadata`]).
    MetadataPressure,
    /// Devices longer than one prison region of the regions design
    /// ([`REGION_CROSSING_BLOCKS`] virtual blocks, provisioned only where
    /// written), run under [`LockingDesign::Regions`] unless the campaign
    /// names another design: I/O gathers around the region boundary at
    /// virtual block 1,024, discards cross it (DM core splits them there)
    /// or cover most of a region up to it. One seed in sixteen
    /// ([`Workload::of_seed`]) when no workload is forced.
    RegionCrossing,
}

/// Virtual blocks of a [`Workload::RegionCrossing`] device: one prison
/// region of the regions design and a few blocks of the next.
pub const REGION_CROSSING_BLOCKS: u64 = REGION_BLOCKS + 16;

impl Workload {
    /// Every workload: [`Workload::DRAWN`], then
    /// [`Workload::RegionCrossing`].
    pub const ALL: [Workload; 9] = {
        let mut all = [Workload::RegionCrossing; 9];
        let mut i = 0;
        while i < Self::DRAWN.len() {
            all[i] = Self::DRAWN[i];
            i += 1;
        }
        all
    };

    /// The workloads a seed draws from (every one but
    /// [`Workload::RegionCrossing`], which [`Workload::of_seed`] picks by
    /// the seed's number, so that the other seeds keep their draws).
    pub const DRAWN: [Workload; 8] = [
        Workload::Random,
        Workload::Sequential,
        Workload::SnapshotHeavy,
        Workload::DiscardHeavy,
        Workload::FillToFull,
        Workload::ManySmallDevices,
        Workload::Durability,
        Workload::MetadataPressure,
    ];

    /// The workload of `seed`, given its draw from [`Workload::DRAWN`]:
    /// [`Workload::RegionCrossing`] for the seeds 13 modulo 16, the draw
    /// otherwise.
    pub fn of_seed(seed: u64, drawn: Workload) -> Workload {
        if seed % 16 == 13 {
            Workload::RegionCrossing
        } else {
            drawn
        }
    }

    /// Its name in traces and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Random => "random",
            Workload::Sequential => "sequential",
            Workload::SnapshotHeavy => "snapshot-heavy",
            Workload::DiscardHeavy => "discard-heavy",
            Workload::FillToFull => "fill-to-full",
            Workload::ManySmallDevices => "many-small-devices",
            Workload::Durability => "durability",
            Workload::MetadataPressure => "metadata-pressure",
            Workload::RegionCrossing => "region-crossing",
        }
    }

    /// The workload called `name`.
    pub fn from_name(name: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == name)
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything a run depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// The seed (also the stamps' run id).
    pub seed: u64,
    /// The workload generator.
    pub workload: Workload,
    /// Ops to generate.
    pub ops: usize,
    /// The pool's shape, features, options.
    pub thin: ThinSimConfig,
    /// The faults this seed may inject.
    pub swarm: FaultSwarm,
}

/// Sectors of a 4 KiB metadata block.
const METADATA_BLOCK_SECTORS: u64 = 8;

/// The metadata device sizes, in 4 KiB blocks, of the metadata-pressure
/// workload: a fresh pool uses a handful of them, and each device with a
/// mapping tree of its own a few more.
const PRESSURE_METADATA_BLOCKS: std::ops::Range<u64> = 36..60;

/// Knobs of a campaign that are not per seed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CampaignSettings {
    /// Deliberate bugs (detector tests).
    pub mutations: Mutations,
    /// Run the model exactly as kernel 6.1 behaves, without the candidate
    /// fixes for the kernel bugs dmsim found; by default the fixes are on,
    /// so that a campaign reports new problems, not the known ones.
    pub kernel_as_is: bool,
    /// Force one workload instead of the seed's choice.
    pub workload: Option<Workload>,
    /// The pool's locking design (the kernel's by default).
    pub locking: LockingDesign,
}

/// Seed `seed`'s fault swarm ([`FaultSwarm::from_seed`]), with aimed
/// faults ([`FaultSwarm::aimed_percent`]) for one seed in two of those
/// whose swarm arms metadata faults: before 15 or 30 percent of its
/// flushes and pool messages. Drawn from a stream of its own, so the
/// swarm's other settings are those of `from_seed`.
pub fn swarm_for_seed(seed: u64) -> FaultSwarm {
    let mut swarm = FaultSwarm::from_seed(seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6169_6d65_645f_7365);
    if swarm.metadata_fault_weight > 0 || swarm.crash_weight > 0 {
        swarm.aimed_percent = [15, 30, 50][rng.gen_range(0..3)];
    }
    swarm
}

impl RunConfig {
    /// The run seed `seed` makes: workload, pool shape, features and fault
    /// swarm all drawn from it.
    pub fn for_seed(seed: u64, ops: usize, settings: &CampaignSettings) -> RunConfig {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x646d_7369_6d5f_7275);
        let drawn = Workload::DRAWN[rng.gen_range(0..Workload::DRAWN.len())];
        let workload = settings.workload.unwrap_or(Workload::of_seed(seed, drawn));
        let block_sectors = if rng.gen_bool(0.5) { 128 } else { 256 };
        // The oracle keeps state per sector: the long devices get the
        // small block size.
        let block_sectors = if workload == Workload::RegionCrossing { 128 } else { block_sectors };
        let (data_blocks, thin_blocks, max_devices) = match workload {
            Workload::RegionCrossing => (rng.gen_range(12..48), REGION_CROSSING_BLOCKS, 3),
            Workload::FillToFull => (rng.gen_range(6..16), 16, 4),
            Workload::ManySmallDevices => (rng.gen_range(16..40), 4, 8),
            Workload::MetadataPressure => (rng.gen_range(64..128), 4, 64),
            _ => (rng.gen_range(12..48), 16, 4),
        };
        let metadata_sectors = match workload {
            Workload::MetadataPressure => METADATA_BLOCK_SECTORS * rng.gen_range(PRESSURE_METADATA_BLOCKS),
            _ => ThinSimConfig::default().metadata_sectors,
        };
        let features = PoolFeatures {
            skip_block_zeroing: rng.gen_bool(0.25),
            no_discard_passdown: rng.gen_bool(0.3),
            error_if_no_space: rng.gen_bool(0.3),
            ..PoolFeatures::default()
        };
        let fixes = if settings.kernel_as_is { KernelFixes::default() } else { KernelFixes::ALL };
        let options = PoolOptions {
            mutations: settings.mutations,
            fixes,
            locking: match workload {
                Workload::RegionCrossing if settings.locking == LockingDesign::default() => {
                    LockingDesign::Regions
                }
                _ => settings.locking,
            },
            ..PoolOptions::default()
        };
        RunConfig {
            seed,
            workload,
            ops,
            thin: ThinSimConfig {
                run: seed,
                block_sectors,
                data_blocks,
                thin_blocks,
                features,
                options,
                max_devices,
                metadata_sectors,
            },
            swarm: {
                let mut swarm = swarm_for_seed(seed);
                // A metadata-pressure seed is there to run out of metadata
                // space: an aimed fault would turn its pool read-only first.
                if workload == Workload::MetadataPressure {
                    swarm.aimed_percent = 0;
                }
                swarm
            },
        }
    }

    /// The trace header that rebuilds this configuration.
    pub fn header(&self) -> Header {
        let t = &self.thin;
        let f = &t.features;
        let flag = |b: bool| if b { "1" } else { "0" }.to_string();
        let mut params = vec![
            ("ops".to_string(), self.ops.to_string()),
            ("run".to_string(), t.run.to_string()),
            ("block_sectors".to_string(), t.block_sectors.to_string()),
            ("data_blocks".to_string(), t.data_blocks.to_string()),
            ("thin_blocks".to_string(), t.thin_blocks.to_string()),
            ("metadata_sectors".to_string(), t.metadata_sectors.to_string()),
            ("max_devices".to_string(), t.max_devices.to_string()),
            ("skip_block_zeroing".to_string(), flag(f.skip_block_zeroing)),
            ("ignore_discard".to_string(), flag(f.ignore_discard)),
            ("no_discard_passdown".to_string(), flag(f.no_discard_passdown)),
            ("read_only".to_string(), flag(f.read_only)),
            ("error_if_no_space".to_string(), flag(f.error_if_no_space)),
            ("no_space_timeout_ns".to_string(), t.options.no_space_timeout.to_string()),
            ("mutations".to_string(), t.options.mutations.names().join(",")),
            (
                "fix.shared_read_defers_waiting_writes".to_string(),
                flag(t.options.fixes.shared_read_defers_waiting_writes),
            ),
            (
                "fix.discard_spares_blocks_being_unshared".to_string(),
                flag(t.options.fixes.discard_spares_blocks_being_unshared),
            ),
            ("fix.failed_message_aborts".to_string(), flag(t.options.fixes.failed_message_aborts)),
            (
                "fix.read_only_shared_reads_wait_for_copies".to_string(),
                flag(t.options.fixes.read_only_shared_reads_wait_for_copies),
            ),
            (
                "fix.passdown_spares_blocks_the_last_commit_maps".to_string(),
                flag(t.options.fixes.passdown_spares_blocks_the_last_commit_maps),
            ),
            (
                "fix.passdown_holds_blocks_in_core".to_string(),
                flag(t.options.fixes.passdown_holds_blocks_in_core),
            ),
            (
                "fix.read_only_deferred_bios_take_cells".to_string(),
                flag(t.options.fixes.read_only_deferred_bios_take_cells),
            ),
            (
                "fix.unzeroed_mapping_checks_the_mode".to_string(),
                flag(t.options.fixes.unzeroed_mapping_checks_the_mode),
            ),
            (
                "fix.refcount_errors_fail_the_operation".to_string(),
                flag(t.options.fixes.refcount_errors_fail_the_operation),
            ),
        ];
        // Only a design other than the kernel's is recorded, so traces of
        // the default runs keep their bytes.
        if t.options.locking != LockingDesign::default() {
            params.push(("locking".to_string(), t.options.locking.name().to_string()));
        }
        params.extend(self.swarm.params().into_iter().map(|(k, v)| (format!("swarm.{k}"), v)));
        Header { seed: self.seed, workload: self.workload.name().to_string(), params }
    }

    /// The configuration a trace header describes.
    pub fn from_header(h: &Header) -> Result<RunConfig, String> {
        let p = HeaderParams(h);
        let workload = Workload::from_name(&h.workload)
            .ok_or_else(|| format!("unknown workload {:?} in the trace header", h.workload))?;
        let mutations = p.mutations()?;
        let swarm = p.swarm()?;
        let block_sectors: u64 = p.num("block_sectors")?;
        if block_sectors == 0 || !block_sectors.is_multiple_of(128) {
            return Err(format!("block_sectors {block_sectors} is not a positive multiple of 128"));
        }
        // A trace recorded before a fix existed ran without it.
        let fix = |name: &str| p.flag_or_off(name);
        let thin = ThinSimConfig {
            run: p.num("run")?,
            block_sectors,
            data_blocks: p.num("data_blocks")?,
            thin_blocks: p.num("thin_blocks")?,
            metadata_sectors: p.num("metadata_sectors")?,
            max_devices: p.num("max_devices")?,
            features: PoolFeatures {
                skip_block_zeroing: p.flag("skip_block_zeroing")?,
                ignore_discard: p.flag("ignore_discard")?,
                no_discard_passdown: p.flag("no_discard_passdown")?,
                read_only: p.flag("read_only")?,
                error_if_no_space: p.flag("error_if_no_space")?,
            },
            options: PoolOptions {
                no_space_timeout: p.num("no_space_timeout_ns")?,
                mutations,
                fixes: KernelFixes {
                    shared_read_defers_waiting_writes: fix("fix.shared_read_defers_waiting_writes")?,
                    discard_spares_blocks_being_unshared: fix("fix.discard_spares_blocks_being_unshared")?,
                    failed_message_aborts: fix("fix.failed_message_aborts")?,
                    read_only_shared_reads_wait_for_copies: fix(
                        "fix.read_only_shared_reads_wait_for_copies",
                    )?,
                    passdown_spares_blocks_the_last_commit_maps: fix(
                        "fix.passdown_spares_blocks_the_last_commit_maps",
                    )?,
                    passdown_holds_blocks_in_core: fix("fix.passdown_holds_blocks_in_core")?,
                    read_only_deferred_bios_take_cells: fix("fix.read_only_deferred_bios_take_cells")?,
                    unzeroed_mapping_checks_the_mode: fix("fix.unzeroed_mapping_checks_the_mode")?,
                    refcount_errors_fail_the_operation: fix("fix.refcount_errors_fail_the_operation")?,
                },
                locking: match h.param("locking") {
                    None => LockingDesign::default(),
                    Some(name) => LockingDesign::from_name(name)
                        .ok_or_else(|| format!("trace header: unknown locking design {name:?}"))?,
                },
                // Not a trace parameter: a kernel replay sets it from the
                // kernel's clock.
                waker_wheel_phase: None,
                timed_commits: true,
            },
        };
        within("data_blocks", thin.data_blocks, 1, 1 << 16)?;
        within("thin_blocks", thin.thin_blocks, 1, 1 << 16)?;
        within("metadata_sectors", thin.metadata_sectors, MIN_METADATA_SECTORS, MAX_DISK_SECTORS)?;
        within("max_devices", thin.max_devices as u64, 1, 1 << 10)?;
        within("block_sectors", thin.block_sectors, 128, 1 << 21)?;
        // The simulated disks are held in memory (twice: what reads see and
        // what is durable), so their sizes are bounded together.
        within(
            "data device size in sectors (data_blocks * block_sectors)",
            thin.data_blocks * thin.block_sectors,
            1,
            MAX_DISK_SECTORS,
        )?;
        within(
            "thin device size in sectors (thin_blocks * block_sectors)",
            thin.thin_blocks * thin.block_sectors,
            1,
            MAX_DISK_SECTORS,
        )?;
        Ok(RunConfig { seed: h.seed, workload, ops: p.num("ops")?, thin, swarm })
    }
}

/// Where Debian's checkers are: `thin_check`, run on every final thin
/// metadata image, and `cache_check`, run on the cache campaign's metadata
/// after recoveries and at the end (see [`crate::cache_run`]). A missing
/// one is not run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkers {
    /// Path of `thin_check`.
    pub thin_check: Option<PathBuf>,
    /// Path of `cache_check`.
    pub cache_check: Option<PathBuf>,
}

impl Checkers {
    /// `thin_check` and `cache_check` from `PATH`, those installed.
    pub fn from_path() -> Checkers {
        Checkers { thin_check: find_on_path("thin_check"), cache_check: find_on_path("cache_check") }
    }
}

/// The file `name` in the first folder of `PATH` that has it.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// What one run did.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// Its record.
    pub trace: Trace,
    /// Its counters.
    pub stats: ThinStats,
    /// The faults that fired, by kind.
    pub coverage: FaultCoverage,
    /// The first violation, if any (the run stops there).
    pub violation: Option<ThinFailure>,
    /// Whether `thin_check` ran on the final image.
    pub thin_checked: bool,
    /// The rare states it reached (coverage probes).
    pub probes: ThinProbes,
}

/// The largest simulated disk (and thin device) a trace header may ask
/// for: 2^18 sectors, 128 MiB. Simulated disks live in memory, twice over
/// (what reads see and what is durable).
pub const MAX_DISK_SECTORS: u64 = 1 << 18;

/// The smallest metadata device a trace header may ask for: 256 sectors,
/// 32 blocks of 4 KiB (a pool formats on 10; the metadata-pressure
/// workload uses 40 and more).
pub const MIN_METADATA_SECTORS: u64 = 256;

/// The most ops one run may have. Ops are generated up front and the run
/// keeps its whole trace (a failing seed's trace is written out), at about
/// 2.5 KB of memory per op: a run at this limit needs about 2.5 GB.
pub const MAX_OPS: usize = 1_000_000;

/// The ops seed `cfg` generates.
pub fn generate(cfg: &RunConfig) -> Vec<Op> {
    crate::generate::ops(cfg)
}

/// Generates the ops of `cfg` and runs them.
pub fn run_config(cfg: &RunConfig, checkers: &Checkers) -> RunOutcome {
    run_ops(cfg, &generate(cfg), checkers)
}

/// Runs `ops` on the configuration `cfg`, recording the trace.
pub fn run_ops(cfg: &RunConfig, ops: &[Op], checkers: &Checkers) -> RunOutcome {
    let mut sim = ThinSim::new(cfg.thin);
    let mut violation = None;
    for op in ops {
        if let Err(f) = sim.apply(op) {
            violation = Some(f);
            break;
        }
    }
    let mut thin_checked = false;
    if violation.is_none() {
        violation = sim.finish().err();
    }
    if violation.is_none() {
        if let Some(tool) = &checkers.thin_check {
            // Every final image, leaked data blocks or not: thin_check 0.9.0
            // does not compare data block counts.
            thin_checked = true;
            if let Err(e) = run_checker(tool, &[], &sim.metadata_image(), cfg.seed) {
                violation = Some(sim.record_violation("thin_check", e));
            }
        }
    }
    let trace = Trace { header: cfg.header(), events: sim.take_events() };
    let probes = ThinProbes::of_run(&sim.pool_probes(), &sim.stats(), sim.coverage(), &trace.events);
    RunOutcome {
        trace,
        stats: sim.stats(),
        coverage: sim.coverage().clone(),
        violation,
        thin_checked,
        probes,
    }
}

/// The prefix of this process's temporary images for Debian's checkers.
fn checker_image_prefix() -> String {
    format!("dmsim-check-{}-", std::process::id())
}

/// Removes this process's temporary images for Debian's checkers (for a
/// signal handler: a run removes its own as soon as its checker is done).
/// Returns how many were removed.
pub fn remove_temporary_files() -> usize {
    let prefix = checker_image_prefix();
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return 0 };
    entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)))
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// Runs one of Debian's checkers, `tool` with `args`, on `image` (written
/// to a temporary file of this process's prefix, removed again at once, or
/// by [`remove_temporary_files`] on a signal); `tag` names the file (a
/// seed). `Err` with the checker's output if it rejects the image (or
/// cannot run).
pub fn run_checker(tool: &Path, args: &[&str], image: &[u8], tag: u64) -> Result<(), String> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = tool.file_name().map_or_else(|| "checker".into(), |n| n.to_string_lossy().into_owned());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("{}{name}-{tag}-{n}.img", checker_image_prefix()));
    write_sparse(&path, image).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let out =
        std::process::Command::new(tool).args(args).arg(&path).stdin(std::process::Stdio::null()).output();
    let _ = std::fs::remove_file(&path);
    let out = out.map_err(|e| format!("cannot run {}: {e}", tool.display()))?;
    if out.status.success() {
        return Ok(());
    }
    // Its output on one line: stdout, then stderr.
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let said: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    Err(format!("{name} rejects a metadata image the model's checker accepts: {}", said.join("; ")))
}

/// Writes `image` to a new file at `path`, leaving its all-zero 4 KiB
/// pieces as holes (they read back as zeroes): a metadata disk is mostly
/// never written, and this runs once a seed.
fn write_sparse(path: &Path, image: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const PIECE: usize = 4096;
    let zero = |piece: &[u8]| {
        let words = piece.chunks_exact(8);
        let tail = words.remainder().iter().fold(0, |acc, &b| acc | b);
        words.fold(0, |acc, w| acc | u64::from_ne_bytes(w.try_into().expect("8-byte word"))) == 0 && tail == 0
    };
    let file = std::fs::File::create(path)?;
    file.set_len(image.len() as u64)?;
    // Neighbouring pieces that hold data are written together.
    let pieces: Vec<bool> = image.chunks(PIECE).map(|p| !zero(p)).collect();
    let mut i = 0;
    while i < pieces.len() {
        if !pieces[i] {
            i += 1;
            continue;
        }
        let end = (i..pieces.len()).find(|&j| !pieces[j]).unwrap_or(pieces.len());
        let bytes = &image[i * PIECE..(end * PIECE).min(image.len())];
        file.write_all_at(bytes, (i * PIECE) as u64)?;
        i = end;
    }
    Ok(())
}

/// Why a trace cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayError(pub String);

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ReplayError {}

/// A replay and how it compares with the recording.
#[derive(Debug, Clone)]
pub struct Replay {
    /// The new run.
    pub outcome: RunOutcome,
    /// The first line where the new trace's text differs from the
    /// recorded one: (1-based line, recorded, replayed); `None` when the
    /// two are byte-identical.
    pub first_difference: Option<(usize, String, String)>,
}

/// The ops of a thin trace; an error naming the first op that belongs to
/// cache traces (a cache op, or a fault on a cache trace's disk).
pub fn thin_ops(trace: &Trace) -> Result<Vec<Op>, ReplayError> {
    let ops: Vec<Op> = trace.ops().collect();
    match ops.iter().enumerate().find_map(|(i, op)| op.thin_error().map(|e| (i, e))) {
        Some((i, e)) => Err(ReplayError(format!("op {} of the trace: {e}", i + 1))),
        None => Ok(ops),
    }
}

/// Runs a trace's ops again on its header's configuration. A trace with
/// ops of cache traces is an error ([`thin_ops`]).
pub fn replay(trace: &Trace, checkers: &Checkers) -> Result<Replay, ReplayError> {
    let cfg = RunConfig::from_header(&trace.header).map_err(ReplayError)?;
    let ops = thin_ops(trace)?;
    let outcome = run_ops(&cfg, &ops, checkers);
    let first_difference = first_difference(&to_text(trace), &to_text(&outcome.trace));
    Ok(Replay { outcome, first_difference })
}

/// The first differing line of two texts (1-based), or `None` if equal.
pub fn first_difference(a: &str, b: &str) -> Option<(usize, String, String)> {
    if a == b {
        return None;
    }
    let mut la = a.lines();
    let mut lb = b.lines();
    let mut n = 0;
    loop {
        n += 1;
        match (la.next(), lb.next()) {
            (Some(x), Some(y)) if x == y => continue,
            (None, None) => return Some((n, "(line endings differ)".into(), String::new())),
            (x, y) => {
                let show = |l: Option<&str>| l.map_or("(end of trace)".to_string(), str::to_string);
                return Some((n, show(x), show(y)));
            }
        }
    }
}

/// What makes two violations "the same" for the minimizer: the detector,
/// and the message with its numbers blanked, cut at the second colon (an
/// oracle message keeps "dev # sector #: wrong data").
pub fn violation_signature(kind: &str, message: &str) -> String {
    let blank = |text: &str| -> String {
        let mut out = String::new();
        for c in text.chars() {
            let c = if c.is_ascii_digit() { '#' } else { c };
            if !(c == '#' && out.ends_with('#')) {
                out.push(c);
            }
        }
        out
    };
    // A checker report: its first problem's own message says what broke.
    if let Some(at) = message.find("message: \"") {
        let rest = &message[at + 10..];
        let end = rest.find('"').unwrap_or(rest.len());
        return format!("{kind}: {}", blank(&rest[..end]));
    }
    let blanked = blank(message);
    let cut = blanked.match_indices(':').nth(1).map_or(blanked.len(), |(i, _)| i);
    format!("{kind}: {}", &blanked[..cut])
}

/// A minimized trace and what it took.
#[derive(Debug, Clone)]
pub struct Minimized {
    /// The shrunk trace (recorded afresh from its ops, so it replays).
    pub trace: Trace,
    /// Ops before.
    pub ops_before: usize,
    /// Ops after.
    pub ops_after: usize,
    /// Runs tried.
    pub runs: u64,
    /// The violation both fail with (see [`violation_signature`]).
    pub signature: String,
}

/// Shrinks a failing trace: delta debugging over its ops (the faults and
/// crashes are ops too), then each remaining op made as simple as it can
/// be, while the same violation still occurs. `progress` hears the number of
/// runs so far and the current length.
pub fn minimize(
    trace: &Trace,
    checkers: &Checkers,
    mut progress: impl FnMut(u64, usize),
) -> Result<Minimized, ReplayError> {
    let (kind, message) =
        trace.violation().ok_or_else(|| ReplayError("the trace records no violation to preserve".into()))?;
    let signature = violation_signature(kind, message);
    let cfg = RunConfig::from_header(&trace.header).map_err(ReplayError)?;
    let ops = thin_ops(trace)?;
    // thin_check costs a process per run: only worth it when it is the
    // detector that fired.
    let no_checkers = Checkers::default();
    let checkers = if kind == "thin_check" { checkers } else { &no_checkers };
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

#[cfg(test)]
mod tests {
    use dmsim_traces::{CacheIoMode, CachePolicyKind, DiskFault, DiskId, Event};

    use super::*;

    /// The checkers' image files read back as the image, holes and all:
    /// data at the start, in the middle and in a short last piece, zero
    /// pieces between, and an image of zeroes only.
    #[test]
    fn sparse_image_files_read_back_whole() {
        let dir = std::env::temp_dir().join(format!("dmsim-sparse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut image = vec![0u8; 5 * 4096 + 100];
        image[7] = 1;
        image[4096..8192].fill(0xa5);
        image[3 * 4096 + 4095] = 2;
        image[5 * 4096 + 99] = 3;
        for image in [image, vec![0u8; 3 * 4096]] {
            let path = dir.join("image");
            write_sparse(&path, &image).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), image);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A short thin run of seed 1 with `extra` spliced in after its first
    /// few ops.
    fn with(extra: Op) -> (RunConfig, Vec<Op>) {
        let cfg = RunConfig::for_seed(1, 20, &CampaignSettings::default());
        let mut ops = generate(&cfg);
        ops.insert(3, extra);
        (cfg, ops)
    }

    fn cache_ops() -> Vec<Op> {
        vec![
            Op::Reload { mode: CacheIoMode::Writethrough, policy: CachePolicyKind::Cleaner },
            Op::Invalidate { cblock: 5, nr: 2 },
            Op::Status,
            Op::Resize { cache_blocks: 8, origin_blocks: 64 },
            Op::Fault { disk: DiskId::Cache, fault: DiskFault::ReadError { permanent: false } },
            Op::Fault { disk: DiskId::Origin, fault: DiskFault::WriteError { permanent: true } },
        ]
    }

    #[test]
    fn a_thin_run_rejects_cache_ops_and_disks_as_a_trace_violation() {
        for op in cache_ops() {
            let (cfg, ops) = with(op);
            let out = run_ops(&cfg, &ops, &Checkers::default());
            let v = out.violation.unwrap_or_else(|| panic!("{op:?} was accepted"));
            assert_eq!(v.kind, "trace", "{op:?}: {v}");
            assert_eq!(v.step, 4, "{op:?}: {v}");
            assert!(v.what.contains("belongs to cache traces; this is a thin trace"), "{v}");
            assert!(v.what.contains(&format!("`{}`", op.name())) || v.what.contains("disk `"), "{v}");
            // Recorded: the op, then the violation, and nothing after.
            let n = out.trace.events.len();
            assert_eq!(out.trace.events[n - 2], Event::Op(op));
            assert!(matches!(&out.trace.events[n - 1], Event::Violation { kind, .. } if kind == "trace"));
        }
    }

    #[test]
    fn replay_and_minimize_refuse_a_trace_with_cache_ops() {
        let (cfg, ops) = with(Op::Status);
        let trace = Trace { header: cfg.header(), events: ops.into_iter().map(Event::Op).collect() };
        let e = replay(&trace, &Checkers::default()).unwrap_err();
        assert_eq!(e.0, "op 4 of the trace: op `status` belongs to cache traces; this is a thin trace");
        let (cfg, ops) = with(Op::Reload { mode: CacheIoMode::Writeback, policy: CachePolicyKind::Smq });
        let mut events: Vec<Event> = ops.into_iter().map(Event::Op).collect();
        events.push(Event::Violation { kind: "oracle".into(), message: "x".into() });
        let trace = Trace { header: cfg.header(), events };
        let e = minimize(&trace, &Checkers::default(), |_, _| {}).unwrap_err();
        assert!(e.0.contains("op `reload` belongs to cache traces"), "{e}");
        assert_eq!(thin_ops(&Trace { header: cfg.header(), events: Vec::new() }), Ok(Vec::new()));
    }

    #[test]
    fn a_cache_run_refuses_thin_ops_and_a_growing_metadata_device() {
        use crate::cache_run::{self, CacheCampaignSettings, CacheRunConfig};
        for op in [Op::GrowMetadata { blocks: 4, reload: true }, Op::CreateThin, Op::Delete { dev: 0 }] {
            let cfg = CacheRunConfig::for_seed(1, 20, &CacheCampaignSettings::default());
            let mut ops = cache_run::generate(&cfg);
            ops.insert(3, op);
            let out = cache_run::run_ops(&cfg, &ops, &Checkers::default());
            let v = out.violation.unwrap_or_else(|| panic!("{op:?} was accepted"));
            assert_eq!(v.kind, "misuse", "{op:?}: {v}");
            assert!(v.what.contains("belongs to thin traces; this is a cache trace"), "{v}");
        }
    }

    #[test]
    fn the_smallest_metadata_device_a_header_may_ask_for_formats() {
        let mut cfg = RunConfig::for_seed(3, 10, &CampaignSettings::default());
        cfg.thin.metadata_sectors = MIN_METADATA_SECTORS;
        // The largest data device: the most data space map the metadata holds.
        cfg.thin.block_sectors = 128;
        cfg.thin.data_blocks = MAX_DISK_SECTORS / 128;
        assert_eq!(RunConfig::from_header(&cfg.header()), Ok(cfg.clone()));
        let out = run_config(&cfg, &Checkers::default());
        assert!(out.violation.is_none(), "{}", out.violation.unwrap());
        cfg.thin.metadata_sectors = MIN_METADATA_SECTORS - 8;
        let e = RunConfig::from_header(&cfg.header()).unwrap_err();
        assert_eq!(e, "trace header: metadata_sectors 248 is outside 256..=262144");
    }

    #[test]
    fn the_metadata_pressure_workload_is_drawn_and_its_metadata_device_is_small() {
        let settings = CampaignSettings::default();
        let drawn: Vec<RunConfig> = (0..64)
            .map(|seed| RunConfig::for_seed(seed, 300, &settings))
            .filter(|cfg| cfg.workload == Workload::MetadataPressure)
            .collect();
        assert!(!drawn.is_empty(), "the default seeds draw it");
        for cfg in &drawn {
            let blocks = cfg.thin.metadata_sectors / METADATA_BLOCK_SECTORS;
            assert!(PRESSURE_METADATA_BLOCKS.contains(&blocks), "seed {}: {blocks}", cfg.seed);
            assert!(
                generate(cfg).iter().any(|op| matches!(op, Op::GrowMetadata { .. })),
                "seed {}",
                cfg.seed
            );
        }
        // Other workloads keep the large device and never grow it.
        let other =
            RunConfig::for_seed(0, 300, &CampaignSettings { workload: Some(Workload::Random), ..settings });
        assert_eq!(other.thin.metadata_sectors, ThinSimConfig::default().metadata_sectors);
        assert!(!generate(&other).iter().any(|op| matches!(op, Op::GrowMetadata { .. })));
        assert_eq!(Workload::from_name("metadata-pressure"), Some(Workload::MetadataPressure));
    }

    #[test]
    fn thin_generators_make_no_cache_ops() {
        for seed in 0..32 {
            let cfg = RunConfig::for_seed(seed, 200, &CampaignSettings::default());
            for op in generate(&cfg) {
                assert_eq!(op.thin_error(), None, "seed {seed}: {op:?}");
            }
        }
    }
}
