//! The pool's concurrent core under shuttle: every harness of
//! [`dmsim_sim::concurrency`] in every locking design, under shuttle's PCT and
//! random schedulers, with the completion context picking which data I/O
//! completes next at random (shuttle's seeded generator, so a schedule
//! replays exactly). Each broken locking variant is caught, and the schedule
//! shuttle saved for the failure replays it.
//!
//! Run with `cargo test -p dmsim-sim --features shuttle --test concurrency_shuttle --release`.
//! `DMSIM_SHUTTLE_ITERATIONS` raises the iterations per harness and
//! scheduler (default 1,000).
#![cfg(feature = "shuttle")]

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use dmsim_model::mutation::LockingMutations;
use dmsim_model::thin::pool::LockingDesign;
use dmsim_sim::concurrency::{execute, scenarios, Run, Scenario};
use shuttle::scheduler::{PctScheduler, RandomScheduler, ReplayScheduler, Scheduler};
use shuttle::{Config, FailurePersistence, MaxSteps, Runner};

/// Iterations per harness, design and scheduler.
fn iterations() -> usize {
    std::env::var("DMSIM_SHUTTLE_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
}

/// PCT's bug depth: the number of priority changes per execution.
const PCT_DEPTH: usize = 3;

/// The completion context's choice: any data I/O in flight, drawn from
/// shuttle's generator so that replaying a schedule draws the same.
fn pick_random(n: usize) -> usize {
    use shuttle::rand::{thread_rng, Rng};
    thread_rng().gen_range(0..n)
}

/// Where shuttle saves failing schedules. Shuttle installs its panic hook,
/// and with it the folder, once per process, so every test shares one.
fn schedule_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("shuttle-schedules");
    std::fs::create_dir_all(&dir).expect("create the schedule folder");
    dir
}

/// The detector tests run one at a time, so that a new file in the
/// schedule folder is theirs.
static DETECTORS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn saved_schedules() -> BTreeSet<PathBuf> {
    std::fs::read_dir(schedule_dir())
        .expect("schedule folder")
        .map(|e| e.expect("folder entry").path())
        .collect()
}

fn config(dir: &Path) -> Config {
    let mut config = Config::new();
    // The metadata code recurses through btrees: more than shuttle's
    // default 60 KiB of stack per thread.
    config.stack_size = 1 << 20;
    config.failure_persistence = FailurePersistence::File(Some(dir.to_path_buf()));
    // A run that has not ended after this many steps is livelocked (a lost
    // wake-up, a cell never released); the harnesses need a few thousand.
    config.max_steps = MaxSteps::FailAfter(200_000);
    config
}

fn run_with<S: Scheduler + 'static>(scheduler: S, scenario: &Scenario, run: Run) {
    let scenario = scenario.clone();
    Runner::new(scheduler, config(&schedule_dir())).run(move || execute(&scenario, run));
}

/// Both schedulers, `iterations()` each.
fn check(scenario: Scenario) {
    for locking in LockingDesign::ALL {
        let run = Run { pick: pick_random, ..Run::new(locking) };
        run_with(PctScheduler::new(PCT_DEPTH, iterations()), &scenario, run);
        run_with(RandomScheduler::new(iterations()), &scenario, run);
    }
}

#[test]
fn two_writes_to_one_unprovisioned_block() {
    check(scenarios::two_writes_one_block());
}

#[test]
fn read_vs_break_sharing() {
    check(scenarios::read_vs_break_sharing());
}

#[test]
fn write_vs_discard_of_the_same_block() {
    check(scenarios::write_vs_discard());
}

#[test]
fn write_vs_snapshot() {
    check(scenarios::write_vs_snapshot());
}

#[test]
fn write_vs_snapshot_delete_during_break_sharing() {
    check(scenarios::write_vs_snapshot_delete());
}

#[test]
fn flush_vs_provisioning() {
    check(scenarios::flush_vs_provisioning());
}

#[test]
fn out_of_space_while_bios_are_queued() {
    check(scenarios::out_of_space());
}

#[test]
fn write_vs_discard_across_a_region_boundary() {
    check(scenarios::write_vs_discard_across_regions());
}

/// Runs `scenario` with the locking mutation `name` under both schedulers
/// until one fails; returns the saved schedule and the failure's message.
fn catch(scenario: &Scenario, name: &str, locking: LockingDesign) -> (PathBuf, String) {
    let mutations = LockingMutations::by_name(name).expect("a locking mutation");
    let run = Run { mutations, pick: pick_random, ..Run::new(locking) };
    let before = saved_schedules();
    let caught = catch_unwind(AssertUnwindSafe(|| {
        run_with(PctScheduler::new(PCT_DEPTH, 10 * iterations()), scenario, run);
        run_with(RandomScheduler::new(10 * iterations()), scenario, run);
    }));
    let message = match caught {
        Ok(()) => panic!("{name} ({}) was not caught by shuttle in {}", locking.name(), scenario.name),
        Err(e) => panic_message(e),
    };
    let new: Vec<PathBuf> = saved_schedules().difference(&before).cloned().collect();
    assert_eq!(new.len(), 1, "one schedule saved for the failure, found {new:?}");
    (new[0].clone(), message)
}

/// Replays `schedule` and returns the failure's message.
fn replay(schedule: &Path, scenario: &Scenario, name: &str, locking: LockingDesign) -> String {
    let mutations = LockingMutations::by_name(name).expect("a locking mutation");
    let run = Run { mutations, pick: pick_random, ..Run::new(locking) };
    let scheduler = ReplayScheduler::new_from_file(schedule).expect("read the saved schedule");
    let caught = catch_unwind(AssertUnwindSafe(|| run_with(scheduler, scenario, run)));
    match caught {
        Ok(()) => panic!("the saved schedule {} did not fail again", schedule.display()),
        Err(e) => panic_message(e),
    }
}

fn panic_message(e: Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// Catches `name` in `scenario` under every design, and replays the saved
/// schedule to the same failure.
fn detector(scenario: Scenario, name: &str) {
    detector_in(scenario, name, &LockingDesign::ALL);
}

/// [`detector`] for the designs in `designs`.
fn detector_in(scenario: Scenario, name: &str, designs: &[LockingDesign]) {
    let _one_at_a_time = DETECTORS.lock().unwrap_or_else(|p| p.into_inner());
    for &locking in designs {
        let (schedule, first) = catch(&scenario, name, locking);
        println!("{name} ({}) caught: {first}\n  schedule saved to {}", locking.name(), schedule.display());
        let before = saved_schedules();
        let again = replay(&schedule, &scenario, name, locking);
        assert_eq!(again, first, "the replay failed differently");
        println!("  replayed: {again}");
        // The replay's own failure saved the same schedule again.
        for extra in saved_schedules().difference(&before) {
            let _ = std::fs::remove_file(extra);
        }
    }
}

#[test]
fn detector_release_cell_before_insert() {
    detector(scenarios::two_writes_one_block(), "release-cell-before-insert");
}

#[test]
fn detector_discard_skips_io_wait() {
    detector(scenarios::write_vs_discard(), "discard-skips-io-wait");
}

/// Caught where sharing is decided by reference counts: once the snapshot
/// is deleted, the origin's block counts as unshared while the copy that
/// began when it was shared still reads it, and only the data cell keeps
/// the second write out of it (without it, the write lands in the old
/// block, which the copy's mapping then replaces: the write is lost).
#[test]
fn detector_fast_path_skips_data_cell() {
    detector_in(
        scenarios::write_vs_snapshot_delete(),
        "fast-path-skips-data-cell",
        &[LockingDesign::RefcountSharing],
    );
}

/// The two mistakes the harnesses found in the first version of the
/// refcount design, kept as mutations: without the worker's data cell a
/// write that waited in the virtual cell lands in the copy's source; without
/// the fast path's second look a copy that finished between its lookup and
/// its detain goes unnoticed. Both lose the write.
#[test]
fn detector_worker_skips_data_cell() {
    detector_in(
        scenarios::write_vs_snapshot_delete(),
        "worker-skips-data-cell",
        &[LockingDesign::RefcountSharing],
    );
}

#[test]
fn detector_fast_path_skips_recheck() {
    detector_in(
        scenarios::write_vs_snapshot_delete(),
        "fast-path-skips-recheck",
        &[LockingDesign::RefcountSharing],
    );
}

/// In the kernel's designs the fast path's data cell guards nothing, and
/// this test keeps that claim honest: with the cell skipped, every harness
/// still passes. Sharing is decided by mapping time — a mapping older than
/// the device's last snapshot stays shared for good — and data cells are
/// keyed by device, so every holder of a data cell without the virtual
/// cell (a break-sharing copy) holds a block the fast path sees as shared
/// and sends to the worker, and every other holder (a passdown discard,
/// the fast path itself) holds the virtual cell too. A design that makes
/// the cell matter fails here, and belongs in the detector above.
#[test]
fn fast_path_data_cell_is_redundant_under_snapshot_time_sharing() {
    let mutations = LockingMutations::by_name("fast-path-skips-data-cell").expect("a locking mutation");
    for scenario in scenarios::all() {
        for locking in [LockingDesign::Kernel61, LockingDesign::Regions] {
            let run = Run { mutations, pick: pick_random, ..Run::new(locking) };
            run_with(PctScheduler::new(PCT_DEPTH, iterations()), &scenario, run);
            run_with(RandomScheduler::new(iterations()), &scenario, run);
        }
    }
}
