//! The kernel corpus: simulator-generated traces replayed on Debian's
//! kernel in qemu, many per boot, against the serialized simulator.
//!
//! One boot (shared by every test here through a `OnceLock`) runs:
//! - [`CORPUS_SIZE`] generated traces (fixed seeds, a quiet fault swarm,
//!   pools twice as large as their devices so they never fill), each on a
//!   fresh pool: L1 (stamps and mappings) must be equal for every one; L2
//!   (thin_dump) and L3 (metadata blocks) are compared and reported;
//! - one hand-made trace with partial writes to fresh blocks, compared with
//!   a simulator run with the `skip-zeroing` mutation (a deliberately
//!   broken model): the report must name the first differing block;
//! - activation jobs: the kernel opens pools on the metadata and data
//!   images the model wrote and must read every device as the model does.
//!
//! Kernel → model: the model's checker and Debian's `thin_check` must agree
//! on every metadata image the kernel wrote, and on damaged copies.
//!
//! Needs `qemu-system-x86_64`, `linux-image-amd64` and
//! `thin-provisioning-tools`; without them every test prints SKIPPED, or
//! fails under `CI=true`.

#[path = "common/thin_tools.rs"]
mod thin_tools;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use thin_tools::{in_ci, thin_check_verdict};

use dmsim_kernel_shim::equivalence::{
    compare_l1, compare_l2, compare_l3, kernel_replays, read_images, simulate_following, simulate_serialized,
    simulate_serialized_full, FinalState, SimulatedRun, L2,
};
use dmsim_kernel_shim::{Job, KernelRun, KernelShim, ShimError};
use dmsim_model::block_device::MemDevice;
use dmsim_model::mutation::Mutations;
use dmsim_model::thin::check::{check_thin_metadata, CheckOptions};
use dmsim_sim::run::{generate, CampaignSettings, RunConfig, Workload};
use dmsim_traces::{Event, Op, Trace};

/// Traces in the corpus.
const CORPUS_SIZE: usize = 54;
/// Ops generated per trace (scheduling ops, faults and crashes are then
/// left out).
const OPS: usize = 50;
/// Corpus traces whose final simulator images the kernel activates.
const INTEROP: usize = 6;

const WORKLOADS: [Workload; 6] = [
    Workload::Random,
    Workload::Sequential,
    Workload::SnapshotHeavy,
    Workload::DiscardHeavy,
    Workload::ManySmallDevices,
    Workload::Durability,
];

fn thin_check() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("thin_check")).find(|p| p.is_file())
}

/// One generated trace and the serialized simulator's run of it.
struct Case {
    seed: u64,
    workload: Workload,
    trace: Trace,
    sim: SimulatedRun,
}

struct Corpus {
    cases: Vec<Case>,
    /// One per case.
    runs: Vec<KernelRun>,
    /// The zeroing trace on the kernel.
    zeroing: (Trace, KernelRun),
    /// The metadata-pressure trace ([`pressure_trace`]): the serialized
    /// simulator's run and the kernel's.
    pressure: (SimulatedRun, KernelRun),
    /// Per interop case (the first [`INTEROP`]): the kernel's activation run.
    interop: Vec<KernelRun>,
    prepare: Duration,
    boot: Duration,
}

enum Unavailable {
    Skip(String),
    Fail(String),
}

fn corpus_case(seed: u64, workload: Workload) -> Case {
    let settings = CampaignSettings { workload: Some(workload), ..CampaignSettings::default() };
    let mut cfg = RunConfig::for_seed(seed, OPS, &settings);
    cfg.swarm = dmsim_faults::FaultSwarm::none();
    // Twice the devices' size: freed blocks are reusable only after a
    // commit, which the kernel and the simulator time differently.
    cfg.thin.data_blocks = 2 * cfg.thin.thin_blocks * cfg.thin.max_devices as u64;
    let ops: Vec<Op> = generate(&cfg).into_iter().filter(kernel_replays).collect();
    let trace = Trace { header: cfg.header(), events: ops.iter().map(|op| Event::Op(*op)).collect() };
    let sim = simulate_serialized_full(&trace).unwrap_or_else(|e| panic!("seed {seed}: simulator: {e}"));
    assert!(sim.out_of_space.is_empty(), "seed {seed}: the pool filled: {:?}", sim.out_of_space);
    Case { seed, workload, trace, sim }
}

/// Partial writes to fresh blocks with zeroing on: block 1 partly written,
/// block 2 whole, block 3 partly with FUA.
fn zeroing_trace(mutations: Mutations) -> Trace {
    let mut cfg = RunConfig::for_seed(5, 6, &CampaignSettings::default());
    cfg.swarm = dmsim_faults::FaultSwarm::none();
    cfg.thin.block_sectors = 128;
    cfg.thin.data_blocks = 32;
    cfg.thin.thin_blocks = 8;
    cfg.thin.max_devices = 2;
    cfg.thin.features = Default::default();
    cfg.thin.options.mutations = mutations;
    let w = |sector, nr_sectors, fua| Op::Write { dev: 0, sector, nr_sectors, fua, preflush: false };
    let ops = [Op::CreateThin, w(136, 8, false), w(256, 128, false), w(400, 16, true), Op::Flush { dev: 0 }];
    Trace { header: cfg.header(), events: ops.iter().map(|op| Event::Op(*op)).collect() }
}

/// Seed 181 of the metadata-pressure workload, 120 ops, without its
/// metadata growths (the kernel replay does not grow the metadata device
/// yet): a 49-block metadata device runs out, and a `create_thin` the pool
/// accepts is rolled back when the commit after it fails (the kernel's
/// table load then answers ENODATA; the agent used to fail there).
fn pressure_trace() -> Trace {
    let mut cfg = RunConfig::for_seed(181, 120, &CampaignSettings::default());
    assert_eq!(cfg.workload, Workload::MetadataPressure);
    cfg.swarm = dmsim_faults::FaultSwarm::none();
    let ops: Vec<Op> = generate(&cfg)
        .into_iter()
        .filter(|op| kernel_replays(op) && !matches!(op, Op::GrowMetadata { .. } | Op::AimFault { .. }))
        .collect();
    Trace { header: cfg.header(), events: ops.iter().map(|op| Event::Op(*op)).collect() }
}

fn build() -> Result<Corpus, Unavailable> {
    let t0 = Instant::now();
    let shim = match KernelShim::prepare() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) => return Err(Unavailable::Skip(e.to_string())),
        Err(e) => return Err(Unavailable::Fail(format!("preparing the VM: {e}"))),
    };
    let prepare = t0.elapsed();
    let cases: Vec<Case> =
        (0..CORPUS_SIZE).map(|i| corpus_case(1000 + i as u64, WORKLOADS[i % WORKLOADS.len()])).collect();
    let mut jobs: Vec<Job> = cases.iter().map(|c| Job::Replay(c.trace.clone())).collect();
    let zeroing = zeroing_trace(Mutations::default());
    jobs.push(Job::Replay(zeroing.clone()));
    let pressure = pressure_trace();
    let pressure_sim =
        simulate_serialized_full(&pressure).unwrap_or_else(|e| panic!("seed 181: simulator: {e}"));
    jobs.push(Job::Replay(pressure));
    for c in &cases[..INTEROP] {
        jobs.push(Job::Activate {
            trace: c.trace.clone(),
            ids: c.sim.state.devices.iter().map(|(id, _)| *id).collect(),
            metadata: c.sim.metadata_image.clone(),
            data: c.sim.data_image.clone(),
        });
    }
    let t1 = Instant::now();
    let mut runs = shim.run_jobs(&jobs).map_err(|e| Unavailable::Fail(format!("the kernel runs: {e}")))?;
    let boot = t1.elapsed();
    let interop = runs.split_off(cases.len() + 2);
    let pressure_run = runs.pop().expect("the pressure job's run");
    let zeroing_run = runs.pop().expect("the zeroing job's run");
    Ok(Corpus {
        cases,
        runs,
        zeroing: (zeroing, zeroing_run),
        pressure: (pressure_sim, pressure_run),
        interop,
        prepare,
        boot,
    })
}

fn corpus() -> Option<&'static Corpus> {
    static CORPUS: OnceLock<Result<Corpus, Unavailable>> = OnceLock::new();
    match CORPUS.get_or_init(build) {
        Ok(c) => Some(c),
        Err(Unavailable::Skip(what)) if !in_ci() => {
            eprintln!("SKIPPED: kernel corpus test: {what}");
            None
        }
        Err(Unavailable::Skip(what)) => panic!("CI=true and a prerequisite is missing: {what}"),
        Err(Unavailable::Fail(what)) => panic!("{what}"),
    }
}

fn check_agent(seed: u64, run: &KernelRun) {
    assert_eq!(run.result.error, None, "seed {seed}: the agent failed; console tail:\n{}", {
        let lines: Vec<&str> = run.console.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    });
}

/// What the corpus exercises, summed over its traces.
fn coverage(cases: &[Case]) -> [(&'static str, usize); 7] {
    let mut c = [
        ("snapshots", 0),
        ("discards", 0),
        ("partial writes", 0),
        ("flushes", 0),
        ("FUA", 0),
        ("PREFLUSH", 0),
        ("deletes", 0),
    ];
    for case in cases {
        let block = dmsim_kernel_shim::PoolSpec::from_header(&case.trace.header)
            .map_or(128, |s| s.block_sectors) as u32;
        for op in case.trace.ops() {
            match op {
                Op::CreateSnap { .. } => c[0].1 += 1,
                Op::Discard { .. } => c[1].1 += 1,
                Op::Write { sector, nr_sectors, fua, preflush, .. } => {
                    if sector % block != 0 || u32::from(nr_sectors) % block != 0 {
                        c[2].1 += 1;
                    }
                    if fua {
                        c[4].1 += 1;
                    }
                    if preflush {
                        c[5].1 += 1;
                    }
                }
                Op::Flush { .. } => c[3].1 += 1,
                Op::Delete { .. } => c[6].1 += 1,
                _ => {}
            }
        }
    }
    c
}

/// Every corpus trace is L1-equal on the kernel and on the serialized
/// simulator; L2 and L3 are reported, and L2 must hold up to data block
/// numbers (see docs/kernel-shim.md for why allocation can differ).
#[test]
fn corpus_is_l1_equal_and_l2_l3_are_reported() {
    let Some(corpus) = corpus() else { return };
    let cov = coverage(&corpus.cases);
    eprintln!("corpus: {} traces, {:?}", corpus.cases.len(), cov);
    for (what, n) in cov {
        assert!(n > 0, "the corpus has no {what}");
    }
    eprintln!(
        "{:>5} {:<19} {:>4} {:>4} {:>6} {:<9} {:<11} {:>9} {:>8}  first L2 difference",
        "seed", "workload", "ops", "devs", "ops ms", "L1", "L2", "L3 same", "L3 first"
    );
    let (mut l2_identical, mut l2_allocation, mut l3_identical, mut l3_blocks, mut l3_same) = (0, 0, 0, 0, 0);
    // The same, with the simulator following the kernel's clock.
    let (mut f_l2_identical, mut f_l3_identical, mut f_l3_same) = (0, 0, 0);
    let mut failures = Vec::new();
    for (case, run) in corpus.cases.iter().zip(&corpus.runs) {
        check_agent(case.seed, run);
        let spec = dmsim_kernel_shim::PoolSpec::from_header(&case.trace.header).expect("a valid header");
        assert_eq!(
            read_images(&case.sim.thin_dump, &case.sim.data_image, &spec),
            case.sim.state,
            "seed {}: the model's disks, read through its metadata, say what its read-back said",
            case.seed
        );
        let l1 = compare_l1(&case.sim.state, &FinalState::of_kernel(run));
        let kernel_dump = run.thin_dump.as_ref().unwrap_or_else(|e| panic!("seed {}: dump: {e}", case.seed));
        let l2 = compare_l2(&case.sim.thin_dump, kernel_dump);
        let l3 = compare_l3(&case.sim.metadata_image, &run.metadata_image);
        l2_identical += usize::from(l2.is_identical());
        l2_allocation += usize::from(matches!(l2, L2::SameButDataBlocks { .. }));
        l3_identical += usize::from(l3.is_identical());
        l3_blocks += l3.blocks;
        l3_same += l3.blocks - l3.differing;
        let followed = simulate_following(&case.trace, false, run)
            .unwrap_or_else(|e| panic!("seed {}: following the kernel's clock: {e}", case.seed));
        let f_l3 = compare_l3(&followed.metadata_image, &run.metadata_image);
        f_l2_identical += usize::from(compare_l2(&followed.thin_dump, kernel_dump).is_identical());
        f_l3_identical += usize::from(f_l3.is_identical());
        f_l3_same += f_l3.blocks - f_l3.differing;
        let first = l2.first_difference().map_or(String::new(), |(n, s, k)| format!("line {n}: {s} | {k}"));
        eprintln!(
            "{:>5} {:<19} {:>4} {:>4} {:>6} {:<9} {:<11} {:>4}/{:<4} {:>8}  {}",
            case.seed,
            case.workload.name(),
            case.trace.ops().count(),
            run.result.devices.len(),
            run.result.timings_ms.iter().find(|(w, _)| w == "ops").map_or(0, |(_, ms)| *ms),
            if l1.is_empty() { "equal".to_string() } else { format!("{} diffs", l1.len()) },
            l2.label(),
            l3.blocks - l3.differing,
            l3.blocks,
            l3.first.map_or("-".to_string(), |b| b.to_string())
                + &if l3.superblock_fields.is_empty() {
                    String::new()
                } else {
                    format!(" (superblock: {})", l3.superblock_fields.join(","))
                },
            first.chars().take(140).collect::<String>()
        );
        if !l1.is_empty() {
            failures.push(format!("seed {}: L1 differs, first: {}", case.seed, l1[0]));
        }
        if matches!(l2, L2::Differs { .. } | L2::SameButDataBlocksAndTimes { .. }) {
            failures.push(format!("seed {}: L2 {}: {first}", case.seed, l2.label()));
        }
    }
    let n = corpus.cases.len();
    eprintln!(
        "L1 equal {n}/{n} unless listed below; L2 identical {l2_identical}/{n}, identical but data block numbers {l2_allocation}/{n}; \
         L3 identical images {l3_identical}/{n}, identical 4 KiB blocks {l3_same}/{l3_blocks}"
    );
    eprintln!(
        "following the kernel's clock: L2 identical {f_l2_identical}/{n}; L3 identical images {f_l3_identical}/{n}, \
         identical 4 KiB blocks {f_l3_same}/{l3_blocks}"
    );
    eprintln!(
        "timings: prepare {:?}, one boot for {} jobs {:?} (guest boot {:?}, agent {} ms)",
        corpus.prepare,
        corpus.runs[0].jobs_in_boot,
        corpus.boot,
        corpus.runs[0].boot,
        corpus.runs[0].result.timings_ms.iter().find(|(w, _)| w == "agent").map_or(0, |(_, ms)| *ms)
    );
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// A model that skips zeroing new blocks diverges from the kernel (zeroing
/// on) on partial writes to fresh blocks, and the report names the first
/// block that differs.
#[test]
fn a_model_without_zeroing_diverges_at_the_first_partly_written_block() {
    let Some(corpus) = corpus() else { return };
    let (trace, run) = &corpus.zeroing;
    check_agent(0, run);
    let kernel = FinalState::of_kernel(run);
    let sound = simulate_serialized(trace).expect("the sound model runs");
    assert_eq!(compare_l1(&sound, &kernel), Vec::<String>::new(), "the sound model agrees");
    let broken = zeroing_trace(Mutations::by_name("skip-zeroing").expect("the mutation exists"));
    let broken = simulate_serialized_full(&broken).expect("the broken model runs");
    eprintln!("the broken model's own oracle: {:?}", broken.oracle_violation);
    assert!(broken.oracle_violation.is_some(), "the oracle objects to the broken model");
    let report = compare_l1(&broken.state, &kernel);
    eprintln!("skip-zeroing against the kernel:\n  {}", report.join("\n  "));
    assert_eq!(
        report.first().map(String::as_str),
        Some("dev 0 block 1: simulator reads ?*8 w0*8 ?*112, kernel reads 0*8 w0*8 0*112"),
        "the first divergence is block 1 of device 0, garbage against zeroes"
    );
    assert!(report[1].starts_with("dev 0 block 3: "), "then block 3: {report:?}");
    assert_eq!(report.len(), 2, "block 2 was written whole: {report:?}");
}

/// Model → kernel: the kernel opens pools on the metadata and data the
/// model wrote and reads every device as the model does; thin_check
/// accepts the metadata after the kernel's clean shutdown.
#[test]
fn the_kernel_reads_pools_the_model_wrote() {
    let Some(corpus) = corpus() else { return };
    let Some(tool) = thin_check() else {
        if in_ci() {
            panic!("CI=true and thin_check is missing");
        }
        return eprintln!("SKIPPED: thin_check is not installed");
    };
    for (case, run) in corpus.cases.iter().zip(&corpus.interop) {
        check_agent(case.seed, run);
        let kernel = FinalState::of_kernel(run);
        let diffs = compare_l1(&case.sim.state, &kernel);
        eprintln!(
            "seed {} ({}): the kernel activates {} devices on the model's images: {}",
            case.seed,
            case.workload,
            kernel.devices.len(),
            if diffs.is_empty() { "reads as the model says".to_string() } else { diffs[0].clone() }
        );
        assert!(diffs.is_empty(), "seed {}: {}", case.seed, diffs.join("\n"));
        assert_eq!(thin_check_verdict(&tool, &run.metadata_image), Ok(()), "seed {}", case.seed);
    }
}

fn model_verdict(image: &[u8]) -> Result<(), String> {
    let mut dev = MemDevice::from_bytes(image.to_vec());
    match check_thin_metadata(&mut dev, &CheckOptions::default()) {
        Ok(r) if r.is_clean() => Ok(()),
        Ok(r) => Err(format!("{:?}", r.problems.first())),
        Err(e) => Err(e.to_string()),
    }
}

/// Kernel → model: the model's checker and thin_check agree on every
/// metadata image the kernel wrote (all clean), and on damaged copies of a
/// few (all rejected).
#[test]
fn the_model_checker_agrees_with_thin_check_on_the_kernels_metadata() {
    let Some(corpus) = corpus() else { return };
    let Some(tool) = thin_check() else {
        if in_ci() {
            panic!("CI=true and thin_check is missing");
        }
        return eprintln!("SKIPPED: thin_check is not installed");
    };
    let mut damaged_checked = 0;
    for (case, run) in corpus.cases.iter().zip(&corpus.runs) {
        let image = &run.metadata_image;
        let (model, debian) = (model_verdict(image), thin_check_verdict(&tool, image));
        assert!(
            model.is_ok() && debian.is_ok(),
            "seed {}: model {model:?}, thin_check {debian:?}",
            case.seed
        );
        if case.seed % 9 == 0 {
            // Damage the last non-zero 4 KiB block (a tree or space map
            // node the kernel wrote last): both must object.
            let mut bad = image.clone();
            let Some(last) =
                (1..bad.len() / 4096).rev().find(|&b| bad[b * 4096..(b + 1) * 4096].iter().any(|&x| x != 0))
            else {
                continue;
            };
            bad[last * 4096 + 100] ^= 0x5a;
            let (model, debian) = (model_verdict(&bad), thin_check_verdict(&tool, &bad));
            eprintln!(
                "seed {}: block {last} damaged: model {:?}, thin_check {:?}",
                case.seed,
                model.is_err(),
                debian.is_err()
            );
            assert_eq!(
                model.is_ok(),
                debian.is_ok(),
                "seed {}: model {model:?}, thin_check {debian:?}",
                case.seed
            );
            damaged_checked += 1;
        }
    }
    assert!(damaged_checked >= 3, "only {damaged_checked} damaged images checked");
}

/// Seed 181 runs its 49-block metadata device out of space on the kernel,
/// and the agent answers every op and finishes the job. Where the pool
/// stops taking messages depends on where the kernel's own commits fall
/// (every second of wall time, `COMMIT_PERIOD`, not a parameter: under
/// qemu's emulation, between other ops from run to run): in some runs the
/// pool accepts a `create_thin`, the commit after it fails and aborts
/// (`pool_message` ignores the commit's result), and the device's table
/// load answers ENODATA, which the agent reports as the op's answer
/// ("ok (not activated: ENODATA …)") and replays on, as the simulator goes
/// on without the device (the agent used to stop there); in others the
/// pool has left write mode first and refuses the message (EOPNOTSUPP),
/// or the agent, reading the pool's status first, does not send it
/// ("skipped (the pool's metadata is not writable)"). Either way the
/// replay goes on to the end. The equivalence levels are
/// reported, not asserted, for that reason (docs/campaign.md, "Metadata
/// pressure").
#[test]
fn a_pool_out_of_metadata_space_is_answered_op_by_op_to_the_end() {
    let Some(corpus) = corpus() else { return };
    let (sim, run) = &corpus.pressure;
    check_agent(181, run);
    let ops = pressure_trace().ops().count();
    assert_eq!(run.result.ops.len(), ops, "seed 181: every op has an answer");
    let rolled_back = run.result.ops.iter().filter(|o| o.outcome.contains("not activated: ENODATA")).count();
    let refused = run
        .result
        .ops
        .iter()
        .filter(|o| {
            o.outcome.contains("Operation not supported")
                || o.outcome.contains("the pool's metadata is not writable")
        })
        .count();
    assert!(
        rolled_back + refused > 0,
        "seed 181: the kernel's pool never ran out of metadata space: {:?}",
        run.result.ops
    );
    assert!(
        sim.out_of_space.iter().any(|e| e.contains("out-of-metadata-space") || e.contains("read-only")),
        "the simulator's pool never ran out of metadata space: {:?}",
        sim.out_of_space
    );
    let l1 = compare_l1(&sim.state, &FinalState::of_kernel(run));
    let l2 = compare_l2(&sim.thin_dump, run.thin_dump.as_ref().expect("the kernel's metadata dumps"));
    let followed =
        simulate_following(&pressure_trace(), false, run).expect("the simulator follows the kernel");
    let fl1 = compare_l1(&followed.state, &FinalState::of_kernel(run));
    let fl2 = compare_l2(&followed.thin_dump, run.thin_dump.as_ref().expect("the kernel's metadata dumps"));
    let fl3 = compare_l3(&followed.metadata_image, &run.metadata_image);
    let l3 = compare_l3(&sim.metadata_image, &run.metadata_image);
    eprintln!(
        "seed 181 (metadata pressure): {rolled_back} creates rolled back, {refused} messages refused; L1 {}, L2 {}, \
         L3 {} of {} blocks differ; following the kernel's clock: L1 {}, L2 {}, L3 {} of {} blocks differ",
        if l1.is_empty() { "equal".to_string() } else { format!("{} differences, first {}", l1.len(), l1[0]) },
        l2.label(),
        l3.differing,
        l3.blocks,
        if fl1.is_empty() { "equal".to_string() } else { format!("{} differences", fl1.len()) },
        fl2.label(),
        fl3.differing,
        fl3.blocks
    );
}
