//! Coverage-guided search beside the seeded swarm: raw bytes in, a whole
//! simulated run out.
//!
//! A fuzzer (the cargo-fuzz target `fuzz/fuzz_targets/simulate.rs`) hands
//! [`run_bytes`] arbitrary bytes; they are read with `arbitrary`'s
//! [`Unstructured`] into a [`FuzzCase`]: which target (the thin pool, or
//! one time in four the cache), its configuration — a campaign seed's own
//! ([`RunConfig::for_seed`], [`CacheRunConfig::for_seed`]), with the
//! thin pool's shape, features and locking design perhaps changed by the
//! bytes, up to pools and devices some hundreds of blocks large — and a
//! sequence of ops that are all valid for that target (a thin run gets no
//! cache ops and faults only on its two disks; faults are those the
//! campaigns arm: no misdirected writes, no bit flips on data; a thin run
//! also gets the swarm's aimed faults, `Op::AimFault`). The case
//! then runs exactly as `dmsim run` and `dmsim replay` run a trace
//! ([`crate::run::run_ops`], [`crate::cache_run::run_ops`]): the oracle
//! judges every read, the checkers every recovery and the end, the model
//! its own invariants; a panic of the model is a violation too.
//!
//! The outcome carries the run's [`Trace`], with the header of its
//! configuration, so a failing input becomes an ordinary trace file
//! (`dmsim fuzz-to-trace INPUT -o TRACE`) that `dmsim replay`,
//! `minimize` and `show` take. The same bytes always give the same case
//! and the same trace.

use arbitrary::{Arbitrary, Unstructured};
use dmsim_model::mutation::Mutations;
use dmsim_model::thin::pool::{LockingDesign, DEFAULT_NO_SPACE_TIMEOUT};
use dmsim_traces::{CacheIoMode, CachePolicyKind, CrashMode, DiskFault, DiskId, FaultAim, Header, Op, Trace};

use crate::cache_run::{self, CacheCampaignSettings, CacheRunConfig};
use crate::probes::ThinProbes;
use crate::run::{self, CampaignSettings, Checkers, RunConfig, MAX_DISK_SECTORS};
use crate::thin::ThinFailure;

/// The most ops a case has (bytes past them are ignored): enough for deep
/// states, few enough that one input runs in milliseconds.
pub const MAX_FUZZ_OPS: usize = 400;

/// The largest input [`run_bytes`] is meant for; `dmsim fuzz-to-trace`
/// refuses larger files (libFuzzer's inputs are 4 KiB by default).
pub const MAX_INPUT_BYTES: u64 = 1 << 20;

/// What model the cases run on: the campaigns' settings that are not
/// decided by the bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FuzzSettings {
    /// Deliberate bugs (detector tests), thin and cache alike.
    pub mutations: Mutations,
    /// Without the candidate kernel fixes (by default they are on, as in
    /// the campaigns).
    pub kernel_as_is: bool,
}

/// The target a case runs on, and its configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum FuzzConfig {
    /// The thin pool.
    Thin(RunConfig),
    /// The cache target.
    Cache(CacheRunConfig),
}

/// One input of the fuzzer, decoded: a configuration and the ops to run
/// on it.
#[derive(Debug, Clone, PartialEq)]
pub struct FuzzCase {
    /// The target and its configuration (its `ops` is the number of ops).
    pub config: FuzzConfig,
    /// The ops, every one valid for the target.
    pub ops: Vec<Op>,
}

/// What running a case did.
#[derive(Debug, Clone)]
pub struct FuzzOutcome {
    /// The run's record: a trace that replays as any other.
    pub trace: Trace,
    /// The first violation, if any (the run stops there).
    pub violation: Option<ThinFailure>,
    /// The rare states a thin run reached (`None` for the cache).
    pub probes: Option<ThinProbes>,
}

impl FuzzCase {
    /// The case `data` decodes to (every byte string decodes to one; bytes
    /// past [`MAX_FUZZ_OPS`] ops are ignored).
    pub fn from_bytes(data: &[u8], settings: &FuzzSettings) -> FuzzCase {
        let mut u = Unstructured::new(data);
        // `Unstructured` answers with defaults once the bytes run out, so
        // decoding does not fail; should it, the empty input's case stands.
        Self::from_unstructured(&mut u, settings).unwrap_or_else(|_| {
            Self::from_unstructured(&mut Unstructured::new(&[]), settings).expect("the empty input decodes")
        })
    }

    /// Reads a case from `u`, taking the rest of its bytes for ops.
    pub fn from_unstructured(u: &mut Unstructured<'_>, settings: &FuzzSettings) -> arbitrary::Result<Self> {
        let target: u8 = u.arbitrary()?;
        let seed = u64::from(u.arbitrary::<u16>()?);
        if target % 4 == 3 {
            let cache_settings = CacheCampaignSettings {
                mutations: settings.mutations,
                kernel_as_is: settings.kernel_as_is,
                workload: None,
            };
            let mut cfg = CacheRunConfig::for_seed(seed, 0, &cache_settings);
            let ops = cache_ops(u, &cfg)?;
            cfg.ops = ops.len();
            return Ok(FuzzCase { config: FuzzConfig::Cache(cfg), ops });
        }
        let campaign = CampaignSettings {
            mutations: settings.mutations,
            kernel_as_is: settings.kernel_as_is,
            workload: None,
            locking: LockingDesign::default(),
        };
        let mut cfg = RunConfig::for_seed(seed, 0, &campaign);
        reshape_thin(u, &mut cfg)?;
        let ops = thin_ops(u, &cfg)?;
        cfg.ops = ops.len();
        Ok(FuzzCase { config: FuzzConfig::Thin(cfg), ops })
    }

    /// The header of the case's trace.
    pub fn header(&self) -> Header {
        match &self.config {
            FuzzConfig::Thin(cfg) => cfg.header(),
            FuzzConfig::Cache(cfg) => cfg.header(),
        }
    }
}

impl<'a> Arbitrary<'a> for FuzzCase {
    /// A case on the default model (all kernel fixes on, no mutation).
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        FuzzCase::from_unstructured(u, &FuzzSettings::default())
    }
}

/// Runs a case as `dmsim replay` runs a trace (without Debian's checkers:
/// a process per run would cost more than the run).
pub fn run_case(case: &FuzzCase) -> FuzzOutcome {
    let none = Checkers::default();
    match &case.config {
        FuzzConfig::Thin(cfg) => {
            let out = run::run_ops(cfg, &case.ops, &none);
            FuzzOutcome { trace: out.trace, violation: out.violation, probes: Some(out.probes) }
        }
        FuzzConfig::Cache(cfg) => {
            let out = cache_run::run_ops(cfg, &case.ops, &none);
            FuzzOutcome { trace: out.trace, violation: out.violation, probes: None }
        }
    }
}

/// Decodes `data` into a case and runs it: the fuzz target's whole work,
/// and what `dmsim fuzz-to-trace` does with a saved input.
pub fn run_bytes(data: &[u8], settings: &FuzzSettings) -> FuzzOutcome {
    run_case(&FuzzCase::from_bytes(data, settings))
}

/// Changes a thin seed's configuration as the bytes say: each of eight
/// bits of one byte picks a knob to change, so that most inputs keep the
/// campaign's shapes and some reach beyond them (larger pools and devices,
/// where trees split; short no-space timeouts; other locking designs).
fn reshape_thin(u: &mut Unstructured<'_>, cfg: &mut RunConfig) -> arbitrary::Result<()> {
    let knobs: u8 = u.arbitrary()?;
    let t = &mut cfg.thin;
    if knobs & 1 != 0 {
        t.block_sectors = [128, 256, 512][u.choose_index(3)?];
    }
    if knobs & 2 != 0 {
        t.data_blocks = u.int_in_range(1..=64)?;
    }
    if knobs & 4 != 0 {
        t.thin_blocks = u.int_in_range(1..=64)?;
    }
    if knobs & 8 != 0 && u.ratio(1u8, 4)? {
        // Large enough for a mapping tree to split its root (a leaf holds
        // 252 mappings), small enough to run in tens of milliseconds (the
        // final read-back reads every block: one input in eight).
        t.block_sectors = 128;
        t.data_blocks = u.int_in_range(240..=300)?;
        t.thin_blocks = u.int_in_range(256..=320)?;
    }
    if knobs & 16 != 0 {
        let features: u8 = u.arbitrary()?;
        t.features.skip_block_zeroing = features & 1 != 0;
        t.features.no_discard_passdown = features & 2 != 0;
        t.features.error_if_no_space = features & 4 != 0;
        t.features.ignore_discard = features & 8 == 8 && features & 16 != 0;
    }
    if knobs & 32 != 0 {
        t.options.no_space_timeout =
            [1_000_000_000, 5_000_000_000, DEFAULT_NO_SPACE_TIMEOUT][u.choose_index(3)?];
    }
    if knobs & 64 != 0 {
        t.max_devices = u.int_in_range(1..=8)?;
    }
    if t.data_blocks * t.block_sectors > 16_384 {
        // Every device of a large pool is read back in full at the end.
        t.max_devices = t.max_devices.min(4);
    }
    if knobs & 128 != 0 {
        t.options.locking = LockingDesign::ALL[u.choose_index(LockingDesign::ALL.len())?];
    }
    // The simulated disks stay within what a trace header may ask for.
    let most_blocks = MAX_DISK_SECTORS / t.block_sectors;
    t.data_blocks = t.data_blocks.clamp(1, most_blocks);
    t.thin_blocks = t.thin_blocks.clamp(1, most_blocks);
    Ok(())
}

/// A length in sectors for I/O on a device of `size` sectors with blocks
/// of `block`: mostly within a block or two, sometimes whole blocks, now
/// and then a run over much of the device.
fn length(u: &mut Unstructured<'_>, block: u64, size: u64) -> arbitrary::Result<u64> {
    Ok(match u.int_in_range(0u8..=7)? {
        0..=3 => u.int_in_range(1..=block * 2)?,
        4..=6 => block * u.int_in_range(1..=4u64)?,
        _ => u.int_in_range(1..=size.max(1))?,
    })
}

/// A fault the campaigns arm on `disk`: read and write errors anywhere,
/// bit flips on metadata reads only (checksummed; a flip in data is
/// corruption no target can see), no misdirected writes.
fn fault(u: &mut Unstructured<'_>, disk: DiskId) -> arbitrary::Result<Op> {
    let permanent = u.ratio(1u8, 4)?;
    let fault = match u.int_in_range(0u8..=2)? {
        0 => DiskFault::ReadError { permanent },
        2 if disk == DiskId::Metadata => DiskFault::BitFlip { bit: u.arbitrary()? },
        _ => DiskFault::WriteError { permanent },
    };
    Ok(Op::Fault { disk, fault })
}

fn crash(u: &mut Unstructured<'_>) -> arbitrary::Result<Op> {
    let mode = CrashMode::ALL[u.choose_index(CrashMode::ALL.len())?];
    Ok(Op::Crash { mode, seed: u32::from(u.arbitrary::<u16>()?) })
}

fn tick(u: &mut Unstructured<'_>) -> arbitrary::Result<Op> {
    // Long steps now and then pass the no-space timeout.
    let millis = if u.ratio(1u8, 8)? { u.int_in_range(10_000..=65_000)? } else { u.int_in_range(1..=1500)? };
    Ok(Op::Tick { millis })
}

/// The ops of a thin case: a thin device first, then one op per few bytes
/// until the bytes or [`MAX_FUZZ_OPS`] run out.
fn thin_ops(u: &mut Unstructured<'_>, cfg: &RunConfig) -> arbitrary::Result<Vec<Op>> {
    let block = cfg.thin.block_sectors;
    let size = cfg.thin.thin_blocks * block;
    let devs = cfg.thin.max_devices.clamp(1, 255) as u8;
    let mut ops = vec![Op::CreateThin];
    while !u.is_empty() && ops.len() < MAX_FUZZ_OPS {
        let dev = u.int_in_range(0..=devs - 1)?;
        let op = match u.int_in_range(0u8..=19)? {
            0..=3 => Op::Write {
                dev,
                sector: u.int_in_range(0..=size - 1)? as u32,
                nr_sectors: length(u, block, size)?.min(u64::from(u16::MAX)) as u16,
                fua: u.ratio(1u8, 8)?,
                preflush: u.ratio(1u8, 16)?,
            },
            4 | 5 => Op::Read {
                dev,
                sector: u.int_in_range(0..=size - 1)? as u32,
                nr_sectors: length(u, block, size)?.min(u64::from(u16::MAX)) as u16,
            },
            6 => Op::Discard {
                dev,
                sector: u.int_in_range(0..=size - 1)? as u32,
                nr_sectors: length(u, block, size)?.min(u64::from(u32::MAX)) as u32,
            },
            7 => Op::Flush { dev },
            8 => Op::CreateThin,
            9 => Op::CreateSnap { origin: dev },
            10 => Op::Delete { dev },
            11 | 12 => Op::Worker,
            13 | 14 => Op::Complete { pick: u.arbitrary()? },
            15 => Op::FailIo { pick: u.arbitrary()? },
            16 => {
                let disk = if u.arbitrary()? { DiskId::Data } else { DiskId::Metadata };
                fault(u, disk)?
            }
            17 => tick(u)?,
            18 => crash(u)?,
            _ => aim(u)?,
        };
        ops.push(op);
    }
    Ok(ops)
}

/// An aimed fault (thin only), as the thin swarm draws them: at a request
/// of the next commit, or at that commit and then its abort.
fn aim(u: &mut Unstructured<'_>) -> arbitrary::Result<Op> {
    let aim =
        if u.ratio(2u8, 3)? { FaultAim::Commit { request: u.int_in_range(0..=3)? } } else { FaultAim::Abort };
    Ok(Op::AimFault { aim })
}

/// The ops of a cache case, until the bytes or [`MAX_FUZZ_OPS`] run out;
/// resizes stay within half and twice the first sizes, as the cache
/// campaign's do.
fn cache_ops(u: &mut Unstructured<'_>, cfg: &CacheRunConfig) -> arbitrary::Result<Vec<Op>> {
    let c = &cfg.cache;
    let block = c.block_sectors;
    let size = c.origin_blocks * block;
    let mut ops = Vec::new();
    while !u.is_empty() && ops.len() < MAX_FUZZ_OPS {
        let op = match u.int_in_range(0u8..=19)? {
            0..=3 => Op::Write {
                dev: 0,
                sector: u.int_in_range(0..=size - 1)? as u32,
                nr_sectors: length(u, block, size)?.min(u64::from(u16::MAX)) as u16,
                fua: u.ratio(1u8, 8)?,
                preflush: u.ratio(1u8, 16)?,
            },
            4 | 5 => Op::Read {
                dev: 0,
                sector: u.int_in_range(0..=size - 1)? as u32,
                nr_sectors: length(u, block, size)?.min(u64::from(u16::MAX)) as u16,
            },
            6 => Op::Discard {
                dev: 0,
                sector: u.int_in_range(0..=size - 1)? as u32,
                nr_sectors: length(u, block, size)?.min(u64::from(u32::MAX)) as u32,
            },
            7 => Op::Flush { dev: 0 },
            8 | 9 => Op::Worker,
            10 | 11 => Op::Complete { pick: u.arbitrary()? },
            12 => Op::FailIo { pick: u.arbitrary()? },
            13 => {
                let disk = [DiskId::Metadata, DiskId::Cache, DiskId::Origin][u.choose_index(3)?];
                fault(u, disk)?
            }
            14 => tick(u)?,
            15 => crash(u)?,
            16 => Op::Reload {
                mode: CacheIoMode::ALL[u.choose_index(CacheIoMode::ALL.len())?],
                policy: CachePolicyKind::ALL[u.choose_index(CachePolicyKind::ALL.len())?],
            },
            17 => Op::Invalidate {
                cblock: u.int_in_range(0..=c.cache_blocks.max(1) - 1)? as u32,
                nr: u.int_in_range(1..=4)?,
            },
            18 => Op::Status,
            _ => Op::Resize {
                cache_blocks: u.int_in_range((c.cache_blocks / 2).max(1)..=c.cache_blocks * 2)? as u32,
                origin_blocks: u.int_in_range((c.origin_blocks / 2).max(1)..=c.origin_blocks * 2)? as u32,
            },
        };
        ops.push(op);
    }
    Ok(ops)
}

/// `len` bytes from a small xorshift generator seeded with `seed`: inputs
/// for tests of the target without a randomness crate, the same on every
/// machine.
pub fn sample_input(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        sample_input(seed, len)
    }

    #[test]
    fn the_empty_input_is_a_thin_device_and_nothing_else() {
        let case = FuzzCase::from_bytes(&[], &FuzzSettings::default());
        assert!(matches!(case.config, FuzzConfig::Thin(_)));
        assert_eq!(case.ops, vec![Op::CreateThin]);
        let out = run_case(&case);
        assert!(out.violation.is_none(), "{:?}", out.violation);
        assert_eq!(out.trace.ops().collect::<Vec<_>>(), vec![Op::CreateThin]);
    }

    #[test]
    fn cases_are_valid_for_their_target_and_their_headers_rebuild_them() {
        let (mut thin, mut cache, mut aims) = (0, 0, 0);
        for seed in 0..300 {
            let data = bytes(seed, 64 + seed as usize * 7);
            let case = FuzzCase::from_bytes(&data, &FuzzSettings::default());
            assert!(case.ops.len() <= MAX_FUZZ_OPS);
            match &case.config {
                FuzzConfig::Thin(cfg) => {
                    thin += 1;
                    assert_eq!(cfg.ops, case.ops.len());
                    assert_eq!(RunConfig::from_header(&case.header()).as_ref(), Ok(cfg), "seed {seed}");
                    aims += case.ops.iter().filter(|op| matches!(op, Op::AimFault { .. })).count();
                    for op in &case.ops {
                        assert_eq!(op.thin_error(), None, "{op:?}");
                        assert!(!matches!(op, Op::Fault { fault: DiskFault::Misdirect { .. }, .. }));
                        assert!(!matches!(
                            op,
                            Op::Fault { disk: DiskId::Data, fault: DiskFault::BitFlip { .. } }
                        ));
                    }
                }
                FuzzConfig::Cache(cfg) => {
                    cache += 1;
                    assert_eq!(cfg.ops, case.ops.len());
                    assert_eq!(CacheRunConfig::from_header(&case.header()).as_ref(), Ok(cfg), "seed {seed}");
                    for op in &case.ops {
                        assert!(!matches!(
                            op,
                            Op::CreateThin
                                | Op::CreateSnap { .. }
                                | Op::Delete { .. }
                                | Op::Fault { disk: DiskId::Data, .. }
                                | Op::AimFault { .. }
                        ));
                    }
                }
            }
        }
        assert!(thin > 150 && cache > 30, "{thin} thin cases, {cache} cache cases");
        // Thin cases draw the swarm's aimed faults too.
        assert!(aims > 100, "{aims} aimed faults");
    }

    #[test]
    fn a_long_input_stops_at_the_most_ops() {
        let case = FuzzCase::from_bytes(&bytes(7, 1 << 16), &FuzzSettings::default());
        assert_eq!(case.ops.len(), MAX_FUZZ_OPS);
    }
}
