//! Controlled disks under the kernel's pool: one boot runs the same quiet
//! trace twice, once on dm-linear slices of the virtio disks (the normal
//! path) and once on two ublk devices the agent serves from guest RAM
//! (`Job::Ublk`), and holds both against the serialized simulator at L1,
//! L2 and L3. It also checks that the ublk disks saw the kernel's FLUSH
//! and FUA requests and that no ublk device outlives the job.
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
    compare_l1, compare_l2, compare_l3, simulate_serialized_full, FinalState,
};
use dmsim_kernel_shim::{Job, KernelRun, KernelShim, ShimError};
use dmsim_sim::run::{CampaignSettings, RunConfig};
use dmsim_traces::{Event, Op, Trace};

/// The trace of `tests/kernel_vm.rs`: a thin device and a snapshot,
/// whole-block, partial, FUA and PREFLUSH writes, a flush, a discard,
/// reads.
fn trace() -> Trace {
    let w = |dev, sector, nr_sectors, fua, preflush| Op::Write { dev, sector, nr_sectors, fua, preflush };
    let ops = [
        Op::CreateThin,
        w(0, 0, 128, false, false),
        w(0, 300, 8, false, false),
        Op::Flush { dev: 0 },
        Op::CreateSnap { origin: 0 },
        w(0, 0, 8, true, false),
        w(1, 600, 16, false, true),
        Op::Discard { dev: 0, sector: 1024, nr_sectors: 256 },
        Op::Read { dev: 0, sector: 0, nr_sectors: 128 },
        Op::Read { dev: 1, sector: 0, nr_sectors: 128 },
    ];
    let mut cfg = RunConfig::for_seed(7, ops.len(), &CampaignSettings::default());
    cfg.swarm = dmsim_faults::FaultSwarm::none();
    cfg.thin.block_sectors = 128;
    cfg.thin.data_blocks = 32;
    cfg.thin.thin_blocks = 16;
    cfg.thin.max_devices = 4;
    cfg.thin.metadata_sectors = dmsim_sim::thin::ThinSimConfig::default().metadata_sectors;
    cfg.thin.features = Default::default();
    Trace { header: cfg.header(), events: ops.iter().map(|op| Event::Op(*op)).collect() }
}

fn count(run: &KernelRun, name: &str) -> u64 {
    run.result.ublk.iter().find(|(n, _)| n == name).map(|(_, c)| *c).unwrap_or_else(|| {
        panic!("the ublk job reports no {name:?}: {:?}", run.result.ublk);
    })
}

/// The superblock fields a kernel timer commit (one more commit than the
/// simulator's) may change without changing what the metadata says.
const TIMER_COMMIT_FIELDS: [&str; 5] =
    ["csum", "data_space_map_root", "metadata_space_map_root", "data_mapping_root", "device_details_root"];

#[test]
fn a_pool_on_ublk_disks_ends_as_on_virtio_disks() {
    let t0 = Instant::now();
    let shim = match KernelShim::prepare_with_ublk() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) => return skip_or_fail("kernel ublk test", &e.to_string()),
        Err(e) => panic!("preparing the VM with ublk: {e}"),
    };
    let prepared = t0.elapsed();
    let trace = trace();
    let sim = simulate_serialized_full(&trace).expect("the simulator runs the trace");
    // A ublk job that fails half-way (a cache op in a thin trace) before
    // the good one: its devices must go all the same, and the next job
    // gets new ones.
    let mut failing = trace.clone();
    failing.events.truncate(3);
    failing.events.push(Event::Op(Op::Status));
    let runs = shim
        .run_jobs(&[Job::Replay(trace.clone()), Job::Ublk(failing), Job::Ublk(trace.clone())])
        .unwrap_or_else(|e| panic!("kernel run: {e}"));
    let (plain, failed, ublk) = (&runs[0], &runs[1], &runs[2]);
    let error = failed.result.error.as_deref().unwrap_or_default();
    assert!(error.contains("belongs to cache traces"), "the failing ublk job: {:?}", failed.result);
    assert_eq!(count(failed, "left-devices"), 0, "a failed job's ublk device outlived it");
    eprintln!(
        "ublk: module {:?}, prepare {prepared:?}, VM wall {:?}; plain timings {:?}; ublk timings {:?}; counts {:?}",
        shim.ublk_module(),
        ublk.wall,
        plain.result.timings_ms,
        ublk.result.timings_ms,
        ublk.result.ublk
    );
    for line in ublk.console.lines().filter(|l| l.contains("ublk")) {
        eprintln!("console: {line}");
    }
    assert!(ublk.console.contains("ublk_drv"), "the module was not loaded; console:\n{}", ublk.console);
    for (what, run) in [("plain", plain), ("ublk", ublk)] {
        assert_eq!(run.result.error, None, "{what}: the agent failed; console:\n{}", run.console);
        let outcomes: Vec<&str> = run.result.ops.iter().map(|o| o.outcome.as_str()).collect();
        assert_eq!(outcomes, vec!["ok"; trace.ops().count()], "{what}: op results: {:?}", run.result.ops);
    }
    assert_eq!(ublk.result.ops, plain.result.ops, "the same answers on both disks");
    assert_eq!(ublk.result.devices, plain.result.devices, "the same read-back on both disks");

    // L1, L2, L3 against the simulator: the same verdicts on both paths.
    let l1 = |run: &KernelRun| compare_l1(&sim.state, &FinalState::of_kernel(run));
    assert_eq!(l1(plain), Vec::<String>::new(), "plain: L1");
    assert_eq!(l1(ublk), Vec::<String>::new(), "ublk: L1");
    let dump = |run: &KernelRun| run.thin_dump.clone().unwrap_or_else(|e| panic!("dump: {e}"));
    let (l2p, l2u) = (compare_l2(&sim.thin_dump, &dump(plain)), compare_l2(&sim.thin_dump, &dump(ublk)));
    assert_eq!(l2u.label(), l2p.label(), "L2: ublk {l2u:?}, plain {l2p:?}");
    assert!(l2u.is_identical(), "L2 on ublk: {l2u:?}");
    let (l3p, l3u) = (
        compare_l3(&sim.metadata_image, &plain.metadata_image),
        compare_l3(&sim.metadata_image, &ublk.metadata_image),
    );
    eprintln!("L3: plain {l3p:?}, ublk {l3u:?}");
    for (what, l3) in [("plain", &l3p), ("ublk", &l3u)] {
        assert!(
            l3.superblock_fields.iter().all(|f| TIMER_COMMIT_FIELDS.contains(f)),
            "{what}: L3 differs beyond a timer commit: {l3:?}"
        );
    }

    // What the controlled disks saw.
    assert!(count(ublk, "metadata-flushes") > 0, "no FLUSH reached the metadata disk");
    assert!(count(ublk, "data-flushes") > 0, "no FLUSH reached the data disk");
    assert!(count(ublk, "data-fua-writes") > 0, "the trace's FUA write did not reach the data disk as FUA");
    assert_eq!(count(ublk, "metadata-errors") + count(ublk, "data-errors"), 0);
    assert_eq!(count(ublk, "metadata-volatile-at-stop"), 0, "the pool's teardown left metadata unflushed");
    assert_eq!(count(ublk, "left-devices"), 0, "a ublk device outlived the job");
    // 6.1 as a module grants only UBLK_F_URING_CMD_COMP_IN_TASK.
    assert_eq!(count(ublk, "data-granted-flags"), 1 << 1);
    eprintln!("kernel ublk test: {:?} in all", t0.elapsed());
}
