//! The cache target's I/O paths under shuttle: every scenario of
//! [`dmsim_sim::cache_concurrency`] under shuttle's PCT and random
//! schedulers, the completion context picking which data I/O completes next
//! at random (shuttle's seeded generator, so a schedule replays exactly).
//! The broken locking variants are caught, and the schedule shuttle saved
//! for the failure replays it.
//!
//! The cache sits behind one big lock (see the module docs): the schedules
//! interleave whole entry points, not the kernel's finer locks.
//!
//! Run with `cargo test -p dmsim-sim --features shuttle --test cache_concurrency_shuttle --release`.
//! `DMSIM_SHUTTLE_ITERATIONS` raises the iterations per scenario and
//! scheduler (default 1,000).
#![cfg(feature = "shuttle")]

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use dmsim_model::mutation::Mutations;
use dmsim_sim::cache_concurrency::{execute, reach, scenarios, Run, Scenario};
use shuttle::scheduler::{PctScheduler, RandomScheduler, ReplayScheduler, Scheduler};
use shuttle::{Config, FailurePersistence, MaxSteps, Runner};

/// Iterations per scenario and scheduler.
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

/// Where shuttle saves failing schedules: a folder of this test's own, as
/// shuttle installs its panic hook (and with it the folder) once per
/// process.
fn schedule_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("shuttle-schedules-cache");
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
    // The metadata code recurses through btrees.
    config.stack_size = 1 << 20;
    config.failure_persistence = FailurePersistence::File(Some(dir.to_path_buf()));
    // A run that has not ended after this many steps is livelocked (a bio
    // waiting in a cell nobody releases); the scenarios need a few hundred.
    config.max_steps = MaxSteps::FailAfter(100_000);
    config
}

fn run_with<S: Scheduler + 'static>(scheduler: S, scenario: &Scenario, run: Run) {
    let scenario = scenario.clone();
    Runner::new(scheduler, config(&schedule_dir())).run(move || execute(&scenario, run));
}

/// Both schedulers, `iterations()` each.
fn check(scenario: Scenario) {
    println!("{}: set-up reaches {:?}", scenario.name, reach(&scenario));
    let run = Run { pick: pick_random, ..Run::new() };
    run_with(PctScheduler::new(PCT_DEPTH, iterations()), &scenario, run);
    run_with(RandomScheduler::new(iterations()), &scenario, run);
}

#[test]
fn write_vs_promotion() {
    check(scenarios::write_vs_promotion());
}

#[test]
fn writeback_vs_re_dirtying_write() {
    check(scenarios::writeback_vs_write());
}

#[test]
fn flush_during_a_migration() {
    check(scenarios::flush_during_migration());
}

#[test]
fn discard_during_a_migration() {
    check(scenarios::discard_during_migration());
}

#[test]
fn read_vs_demotion() {
    check(scenarios::read_vs_demotion());
}

fn mutated(name: &str) -> Run {
    let mutations = Mutations::by_name(name).expect("a cache mutation");
    Run { mutations, pick: pick_random, ..Run::new() }
}

/// Runs `scenario` with the mutation `name` under both schedulers until
/// one fails; returns the saved schedule and the failure's message.
fn catch(scenario: &Scenario, name: &str) -> (PathBuf, String) {
    let run = mutated(name);
    let before = saved_schedules();
    let caught = catch_unwind(AssertUnwindSafe(|| {
        run_with(PctScheduler::new(PCT_DEPTH, 10 * iterations()), scenario, run);
        run_with(RandomScheduler::new(10 * iterations()), scenario, run);
    }));
    let message = match caught {
        Ok(()) => panic!("{name} was not caught by shuttle in {}", scenario.name),
        Err(e) => panic_message(e),
    };
    let new: Vec<PathBuf> = saved_schedules().difference(&before).cloned().collect();
    assert_eq!(new.len(), 1, "one schedule saved for the failure, found {new:?}");
    (new[0].clone(), message)
}

/// Replays `schedule` and returns the failure's message.
fn replay(schedule: &Path, scenario: &Scenario, name: &str) -> String {
    let scheduler = ReplayScheduler::new_from_file(schedule).expect("read the saved schedule");
    let caught = catch_unwind(AssertUnwindSafe(|| run_with(scheduler, scenario, mutated(name))));
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

/// Catches `name` in `scenario`, and replays the saved schedule to the same
/// failure.
fn detector(scenario: Scenario, name: &str) {
    let _one_at_a_time = DETECTORS.lock().unwrap_or_else(|p| p.into_inner());
    let (schedule, first) = catch(&scenario, name);
    println!("{name} caught in {}: {first}\n  schedule saved to {}", scenario.name, schedule.display());
    let before = saved_schedules();
    let again = replay(&schedule, &scenario, name);
    assert_eq!(again, first, "the replay failed differently");
    println!("  replayed: {again}");
    // The replay's own failure saved the same schedule again.
    for extra in saved_schedules().difference(&before) {
        let _ = std::fs::remove_file(extra);
    }
}

/// A write that ignores the promotion's lock goes to the origin block the
/// copy already read: the promoted block is clean and stale.
#[test]
fn detector_write_ignores_migration_lock_in_promotion() {
    detector(scenarios::write_vs_promotion(), "cache-write-ignores-migration-lock");
}

/// A write that ignores the writeback's lock dirties the cache block after
/// the copy read it: the writeback then marks it clean.
#[test]
fn detector_write_ignores_migration_lock_in_writeback() {
    detector(scenarios::writeback_vs_write(), "cache-write-ignores-migration-lock");
}
