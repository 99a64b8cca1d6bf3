//! The cache target's I/O paths under loom: every scenario of
//! [`dmsim_sim::cache_concurrency`], every interleaving of its threads up to
//! preemption bound 2 (`LOOM_MAX_PREEMPTIONS` sets another).
//!
//! The cache's state sits behind its own locks, one per kernel lock domain
//! (see the module docs), so loom interleaves the submitters, the worker
//! and the completion context between any two of their critical sections. Idle threads block on a
//! condition variable ([`Idle::Block`]); loom explores thread orders, not
//! values, so the completion context completes the oldest data I/O. The
//! set-up is cheap (no loom object in it) and runs in every execution.
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p dmsim-sim --test cache_concurrency_loom --release --target-dir target/loom`.
#![cfg(loom)]

use std::time::Instant;

use dmsim_model::mutation::{LockingMutations, Mutations};
use dmsim_model::sync::thread;
use dmsim_sim::cache_concurrency::{execute, scenarios, Background, Idle, Run, Scenario};

/// The preemption bound of CI.
const PREEMPTIONS: usize = 2;

fn builder() -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    let bound = std::env::var("LOOM_MAX_PREEMPTIONS").ok().and_then(|v| v.parse().ok());
    b.preemption_bound = Some(bound.unwrap_or(PREEMPTIONS));
    b.max_branches = 100_000;
    b
}

/// Explores `scenario` under `run`; returns how many executions loom ran.
/// The execution runs on a model thread with a large stack (the main
/// thread's is too small for the metadata code); that thread is also the
/// completion context, so a model has at most five threads.
fn explore(scenario: &Scenario, run: Run) -> usize {
    let executions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (s, n) = (scenario.clone(), executions.clone());
    builder().check(move || {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let s = s.clone();
        if let Err(e) = thread::spawn(move || execute(&s, run)).join() {
            std::panic::resume_unwind(e);
        }
    });
    executions.load(std::sync::atomic::Ordering::Relaxed)
}

fn blocking() -> Run {
    Run { idle: Idle::Block, background: Background::Combined, ..Run::new() }
}

fn check(scenario: Scenario) {
    let start = Instant::now();
    let n = explore(&scenario, blocking());
    println!("{}: {n} executions in {:.1?}", scenario.name, start.elapsed());
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

/// Loom finds a failing interleaving of `scenario` with the mutation
/// `name`.
fn detector(scenario: Scenario, name: &str) {
    let mutations = Mutations::by_name(name)
        .or_else(|| LockingMutations::by_name(name))
        .expect("a cache or locking mutation");
    let start = Instant::now();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        explore(&scenario, Run { mutations, ..blocking() })
    }));
    let message = match caught {
        Ok(_) => panic!("{name} was not caught by loom in {}", scenario.name),
        Err(e) => e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
    };
    println!("{name} caught in {:.1?}: {message}", start.elapsed());
}

#[test]
fn detector_write_ignores_migration_lock_in_promotion() {
    detector(scenarios::write_vs_promotion(), "cache-write-ignores-migration-lock");
}

#[test]
fn detector_write_ignores_migration_lock_in_writeback() {
    detector(scenarios::writeback_vs_write(), "cache-write-ignores-migration-lock");
}

/// The broken locking variant: the dirty bit tested and set in two
/// critical sections (see the shuttle test of the same name).
#[test]
fn detector_dirty_test_then_set() {
    detector(scenarios::two_writes_dirty_a_clean_block(), "cache-dirty-test-then-set");
}
