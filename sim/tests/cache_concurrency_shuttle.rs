//! The cache target's I/O paths under shuttle: every scenario of
//! [`dmsim_sim::cache_concurrency`] under shuttle's PCT and random
//! schedulers, the completion context picking which data I/O completes next
//! at random (shuttle's seeded generator, so a schedule replays exactly).
//! The broken locking variants are caught, and the schedule shuttle saved
//! for the failure replays it.
//! The running, saving and replaying of schedules is shared with the
//! pool's shuttle test: `tests/common/shuttle.rs`.
//!
//! The cache's state sits behind its own locks, one per kernel lock domain
//! (see the module docs): the schedules interleave the contexts between
//! any two of their critical sections.
//!
//! Run with `cargo test -p dmsim-sim --features shuttle --test cache_concurrency_shuttle --release`.
//! `DMSIM_SHUTTLE_ITERATIONS` raises the iterations per scenario and
//! scheduler (default 1,000).
#![cfg(feature = "shuttle")]

mod common;

use common::shuttle::{iterations, pick_random, Shuttle};
use dmsim_model::mutation::{LockingMutations, Mutations};
use dmsim_sim::cache_concurrency::{execute, reach, scenarios, Run, Scenario};

/// The schedule folder (this binary's own), and the step bound: a run that
/// has not ended after 100,000 steps is livelocked (a bio waiting in a cell
/// nobody releases); the scenarios need a few hundred.
const SHUTTLE: Shuttle = Shuttle { schedules: "shuttle-schedules-cache", max_steps: 100_000 };

/// `scenario` with `run`, as a shuttle test body.
fn body(scenario: &Scenario, run: Run) -> impl Fn() + Clone + Send + Sync + 'static {
    let scenario = scenario.clone();
    move || execute(&scenario, run)
}

/// Both schedulers, `iterations()` each.
fn check(scenario: Scenario) {
    // The cache's locks are shuttle's: it is built inside an execution.
    let s = scenario.clone();
    shuttle::check_random(move || println!("{}: set-up reaches {:?}", s.name, reach(&s)), 1);
    SHUTTLE.both(iterations(), body(&scenario, Run { pick: pick_random, ..Run::new() }));
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

#[test]
fn two_writes_dirty_a_clean_block() {
    check(scenarios::two_writes_dirty_a_clean_block());
}

/// Catches the mutation `name` (a cache mutation, or a locking one) in
/// `scenario`, and replays the saved schedule to the same failure.
fn detector(scenario: Scenario, name: &str) {
    let mutations = Mutations::by_name(name)
        .or_else(|| LockingMutations::by_name(name))
        .expect("a cache or locking mutation");
    let run = Run { mutations, pick: pick_random, ..Run::new() };
    SHUTTLE.detector(&format!("{name} in {}", scenario.name), body(&scenario, run));
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

/// The broken locking variant: the dirty bit tested and set in two
/// critical sections. Two writes to one clean block both find it clean and
/// both count it, and `Cache::check` finds `nr_dirty` one above the bits.
#[test]
fn detector_dirty_test_then_set() {
    detector(scenarios::two_writes_dirty_a_clean_block(), "cache-dirty-test-then-set");
}
