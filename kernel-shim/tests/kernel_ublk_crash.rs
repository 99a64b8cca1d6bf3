//! Power cuts on the controlled disks: one boot replays a campaign trace
//! with crash ops (seed 43's durability workload, no faults) on two ublk
//! disks. At every crash op the agent cuts both disks' power, tears the
//! dead pool down, keeps what `faults::SimDisk::crash_state` chooses for
//! the crash's mode and seed, and rebuilds the pool on it. The kernel's
//! state after every crash, and at the end, must be L1-equal to the
//! serialized simulator's; and a deliberately broken model
//! (`data-not-flushed-before-commit`, `fua-before-commit`) must diverge
//! from the kernel at a crash, the comparison naming the crash and the
//! first differing block.
//!
//! The same boot runs the userland engine (docs/engine.md): the model's
//! pool served over ublk by `dmsim_engine::serve` (the agent started again
//! as `engine …`) on the same controlled disks, the same trace one
//! request at a time, a crash op cutting the disks' power and killing the
//! engine (`SIGKILL`) before a new engine opens what survives. At every
//! crash and at the end the engine reads what the serialized simulator
//! reads (L1), its final thin_dump is the simulator's (L2), and kernel and
//! engine are L1-equal; dmsim's checker finds every image that survived
//! a power cut clean, on both. Then the engine's detector: a write, a FLUSH, a
//! crash — an engine that acknowledges the FLUSH before a commit covers
//! it (`ack-flush-early`, timed commits an hour apart so that only the
//! FLUSH commits) loses the write at the crash, and the comparison names
//! it; the honest engine with the same period is equal. No ublk device
//! outlives any job.
//!
//! Needs `qemu-system-x86_64`, `linux-image-amd64` and, for the module,
//! `linux-source-6.1` and `linux-headers-<release>` (`scripts/test-all`
//! installs them). Without them the test prints SKIPPED, or fails under
//! `CI=true`.

#[path = "common/thin_tools.rs"]
mod thin_tools;
use std::time::Instant;

use thin_tools::skip_or_fail;

use dmsim_kernel_shim::equivalence::{
    compare_crashes, compare_l1, compare_l2, compare_l3, kernel_replays, simulate_following,
    simulate_serialized_crashing, FinalState,
};
use dmsim_kernel_shim::protocol::{EngineJob, ENGINE_RECOVERED_COUNT};
use dmsim_kernel_shim::thin_replay::{compare_runs, crash_checks, judge, Verdict};
use dmsim_kernel_shim::{Job, KernelRun, KernelShim, ShimError};
use dmsim_model::mutation::Mutations;
use dmsim_sim::run::{generate, CampaignSettings, RunConfig};
use dmsim_traces::{CrashMode, Event, Op, Trace};

/// The campaign's seed: durability workload, crash ops, a quiet swarm
/// (`dmsim run --seed 43`).
const SEED: u64 = 43;
/// Crash ops kept (the trace is cut just after the last of them, before
/// the pool comes near full: a full pool is a divergence class of its own).
const CRASHES: usize = 6;

/// Seed 43's ops with the scheduling ops left out (the kernel runs its own
/// worker), up to and including its `CRASHES`th crash op.
fn trace() -> Trace {
    let cfg = RunConfig::for_seed(SEED, 300, &CampaignSettings::default());
    let mut ops = Vec::new();
    let mut crashes = 0;
    for op in generate(&cfg) {
        assert!(
            !matches!(op, Op::Fault { .. } | Op::AimFault { .. } | Op::FailIo { .. }),
            "seed {SEED} now draws faults: {op:?}"
        );
        if matches!(op, Op::Crash { .. }) {
            crashes += 1;
        } else if !kernel_replays(&op) {
            continue;
        }
        ops.push(op);
        if crashes == CRASHES {
            break;
        }
    }
    assert_eq!(crashes, CRASHES, "seed {SEED} has fewer crash ops now");
    Trace { header: cfg.header(), events: ops.iter().map(|op| Event::Op(*op)).collect() }
}

/// `trace` with the model's deliberate bugs `names` on.
fn mutated(trace: &Trace, names: &[&str]) -> Trace {
    let mut cfg = RunConfig::from_header(&trace.header).expect("a valid header");
    cfg.thin.options.mutations = Mutations::from_names(names.iter().copied()).expect("known mutations");
    Trace { header: cfg.header(), events: trace.events.clone() }
}

/// A device, two provisioning writes, a FLUSH, a crash that loses every
/// unflushed write: only what the FLUSH's commit made durable survives.
fn flush_then_crash() -> Trace {
    let cfg = RunConfig::for_seed(SEED, 300, &CampaignSettings::default());
    let ops = [
        Op::CreateThin,
        Op::Write { dev: 0, sector: 0, nr_sectors: 8, fua: false, preflush: false },
        Op::Write { dev: 0, sector: 4096, nr_sectors: 16, fua: false, preflush: false },
        Op::Flush { dev: 0 },
        Op::Crash { mode: CrashMode::LoseAll, seed: 1 },
        Op::Read { dev: 0, sector: 0, nr_sectors: 8 },
    ];
    Trace { header: cfg.header(), events: ops.iter().map(|op| Event::Op(*op)).collect() }
}

fn left_devices(run: &KernelRun) -> Option<u64> {
    run.result.ublk.iter().find(|(n, _)| n == "left-devices").map(|(_, c)| *c)
}

#[test]
fn power_cuts_on_ublk_disks_leave_what_the_model_leaves() {
    let t0 = Instant::now();
    let shim = match KernelShim::prepare_with_ublk() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) => return skip_or_fail("kernel ublk crash test", &e.to_string()),
        Err(e) => panic!("preparing the VM with ublk: {e}"),
    };
    let prepared = t0.elapsed();
    let trace = trace();
    let sim = simulate_serialized_crashing(&trace).expect("the simulator runs the trace");
    assert!(sim.out_of_space.is_empty(), "the pool filled: {:?}", sim.out_of_space);
    assert_eq!(sim.crashes.len(), CRASHES);
    let flush = flush_then_crash();
    let hour = EngineJob { commit_period_ms: 3_600_000, ..EngineJob::serialized() };
    let jobs = [
        Job::Ublk(trace.clone()),
        Job::Engine { trace: trace.clone(), engine: EngineJob::serialized() },
        Job::Engine { trace: flush.clone(), engine: hour },
        Job::Engine { trace: flush.clone(), engine: EngineJob { ack_flush_early: true, ..hour } },
    ];
    let runs = shim.run_jobs(&jobs).unwrap_or_else(|e| panic!("kernel run: {e}"));
    assert_eq!(runs.len(), jobs.len());
    for (k, run) in runs.iter().enumerate().skip(1) {
        assert_eq!(run.result.error, None, "engine job {k} failed; console:\n{}", run.console);
        assert_eq!(left_devices(run), Some(0), "engine job {k}: a ublk device outlived the job");
    }
    let run = &runs[0];
    // The simulator again, following the kernel's clock (its timed commits
    // between the same ops as the kernel's).
    let sim = simulate_following(&trace, true, run).expect("the simulator follows the kernel's clock");
    for line in run.console.lines().filter(|l| {
        ["power cut", "device-mapper", "ublk", "I/O error", "Buffer I/O", "blk_update"]
            .iter()
            .any(|w| l.contains(w))
    }) {
        eprintln!("console: {line}");
    }
    eprintln!(
        "prepare {prepared:?}, VM wall {:?} ({} ops, {CRASHES} crashes); timings {:?}; counts {:?}",
        run.wall,
        trace.ops().count(),
        run.result.timings_ms,
        run.result.ublk
    );
    assert_eq!(run.result.error, None, "the agent failed; console:\n{}", run.console);
    let left = run.result.ublk.iter().find(|(n, _)| n == "left-devices").map(|(_, c)| *c);
    assert_eq!(left, Some(0), "a ublk device outlived the job");
    assert_eq!(run.result.crashes.len(), CRASHES, "a crash record per crash op");

    // At every crash and at the end, the kernel reads what the model reads.
    let crashes = compare_crashes(&sim.crashes, &run.result.crashes);
    for c in &crashes {
        eprintln!(
            "crash {} (op {}): {} differences, metadata identical {}, kept/unflushed sim {:?} kernel {:?}",
            c.crash,
            c.op,
            c.differences.len(),
            c.metadata_identical,
            c.choices[0],
            c.choices[1]
        );
        assert!(c.differences.is_empty(), "crash {} (op {}) diverges: {:#?}", c.crash, c.op, c.differences);
    }
    // The power cuts chose among volatile data writes at least once.
    assert!(
        run.result.crashes.iter().any(|c| c.data.1 > 0),
        "no crash had volatile data writes to choose from: {:?}",
        run.result.crashes.iter().map(|c| (c.op, c.metadata, c.data)).collect::<Vec<_>>()
    );
    let end = compare_l1(&sim.state, &FinalState::of_kernel(run));
    assert!(end.is_empty(), "the end state diverges: {end:#?}");

    // L2 and L3 at the end are reported: the mapping is the same; the
    // metadata blocks' placement varies from run to run on the kernel (see
    // docs/kernel-shim.md, "Divergence classes").
    let l3 = compare_l3(&sim.metadata_image, &run.metadata_image);
    match &run.thin_dump {
        Ok(k) => eprintln!(
            "end: L2 {}; L3: {} of {} metadata blocks differ",
            compare_l2(&sim.thin_dump, k).label(),
            l3.differing,
            l3.blocks
        ),
        Err(e) => eprintln!("end: the kernel's metadata does not dump: {e}"),
    }

    // A model that commits without flushing the data first, or that
    // writes the superblock FUA before the rest of the commit, loses at a
    // crash data its committed metadata maps: the kernel does not. The
    // kernel's run is the same (the mutation is the model's only).
    for mutation in ["data-not-flushed-before-commit", "fua-before-commit"] {
        let broken = mutated(&trace, &[mutation]);
        let broken_sim = simulate_following(&broken, true, run).expect("the broken model runs the trace");
        let cmp = compare_crashes(&broken_sim.crashes, &run.result.crashes);
        let first = cmp
            .iter()
            .find(|c| !c.differences.is_empty())
            .unwrap_or_else(|| panic!("{mutation} does not diverge at any of the {CRASHES} crashes"));
        let what = &first.differences[0];
        eprintln!("{mutation}: first divergence at crash {} (op {}): {what}", first.crash, first.op);
        assert!(what.starts_with("dev ") && what.contains(" block "), "{mutation}: names the block: {what}");
    }
    engine_replays_like_the_simulator_and_the_kernel(&trace, run, &runs[1]);
    a_flush_acknowledged_before_its_commit_is_caught(&flush, &runs[2], &runs[3]);
    eprintln!("kernel ublk crash test: {:?} in all", t0.elapsed());
}

/// The engine's run of the durability trace against the simulator and
/// the kernel's run.
fn engine_replays_like_the_simulator_and_the_kernel(trace: &Trace, kernel: &KernelRun, engine: &KernelRun) {
    let e = judge(trace, true, engine).expect("the engine's run is judged");
    eprintln!(
        "engine: {} ({:?}); L2 {:?}; VM wall for all jobs {:?}",
        e.verdict().name(),
        e.first_difference(),
        e.l2.as_ref().map(|l| l.label()),
        engine.wall
    );
    assert_eq!(engine.result.crashes.len(), CRASHES, "a crash record per crash op on the engine");
    // After each crash the new engine took the dead one's devices over
    // (ublk's user recovery: the same /dev/ublkbN), at most one per device
    // read back.
    let recovered = engine
        .result
        .ublk
        .iter()
        .find(|(n, _)| n == ENGINE_RECOVERED_COUNT)
        .map(|(_, c)| *c)
        .expect("the engine's run counts the devices taken over");
    let read_back: usize = engine.result.crashes.iter().map(|c| c.devices.len()).sum();
    eprintln!("engine: {recovered} devices taken over after the crashes ({read_back} read back)");
    assert!(
        recovered > 0 && recovered as usize <= read_back,
        "{recovered} taken over, {read_back} read back"
    );
    for c in &e.crashes {
        assert!(c.differences.is_empty(), "engine crash {} (op {}): {:#?}", c.crash, c.op, c.differences);
    }
    assert!(e.differences.is_empty(), "the engine's end state: {:#?}", e.differences);
    assert!(e.op_differences.is_empty(), "the engine's ops: {:#?}", e.op_differences);
    let l2 = e.l2.as_ref().expect("the engine's metadata dumps");
    assert!(l2.first_difference().is_none(), "engine L2 {}: {:?}", l2.label(), l2.first_difference());
    // dmsim's checker on every image that survived a power cut, on both.
    for (who, run) in [("kernel", kernel), ("engine", engine)] {
        let checks = crash_checks(run);
        assert_eq!(checks.len(), CRASHES, "{who}: a checker verdict per crash");
        for (op, damage) in checks {
            assert_eq!(damage, None, "{who}: the metadata surviving the crash at op {op} is damaged");
        }
    }
    let pair = compare_runs(kernel, engine);
    eprintln!("kernel–engine: {}", pair.line());
    assert!(pair.l1.is_empty(), "kernel and engine differ: {:#?}", pair.l1);
}

/// The engine's detector: only a broken engine loses the flushed writes.
fn a_flush_acknowledged_before_its_commit_is_caught(trace: &Trace, honest: &KernelRun, broken: &KernelRun) {
    let honest = judge(trace, true, honest).expect("judged");
    assert_eq!(honest.verdict(), Verdict::Equal, "honest engine: {:?}", honest.first_difference());
    assert_eq!(honest.crashes.len(), 1);
    let broken = judge(trace, true, broken).expect("judged");
    let bad = broken.first_bad_crash().expect("the broken engine's crash state differs");
    eprintln!("ack-flush-early engine: crash at op {}: {:?}", bad.op, bad.differences.first());
    assert_eq!(bad.op, 4, "the crash after the FLUSH");
    assert!(bad.differences[0].starts_with("dev 0 block 0"), "{:?}", bad.differences);
}
