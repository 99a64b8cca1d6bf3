//! The pool's concurrent core under loom: the harnesses of
//! [`dmsim_sim::concurrency`] in both locking designs, every interleaving of
//! their threads up to a preemption bound (2 unless `LOOM_MAX_PREEMPTIONS`
//! says otherwise; unset it and set `DMSIM_LOOM_UNBOUNDED=1` for the full
//! search). Loom explores thread orders, not values: the completion context
//! completes the oldest data I/O in flight.
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p dmsim-sim --test concurrency_loom --release --target-dir target/loom`.
#![cfg(loom)]

use dmsim_model::mutation::LockingMutations;
use dmsim_model::thin::pool::LockingDesign;
use dmsim_sim::concurrency::{execute, scenarios, Run, Scenario};

/// The preemption bound of CI.
const PREEMPTIONS: usize = 2;

fn builder() -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none()
        && std::env::var_os("DMSIM_LOOM_UNBOUNDED").is_none()
    {
        b.preemption_bound = Some(PREEMPTIONS);
    }
    // Setting up a pool and the spin loops of the harness threads are many
    // scheduling points; loom's default of 1,000 is far too few.
    b.max_branches = 1_000_000;
    b
}

fn check(scenario: Scenario) {
    for locking in LockingDesign::ALL {
        let s = scenario.clone();
        builder().check(move || execute(&s, Run::new(locking)));
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
fn flush_vs_provisioning() {
    check(scenarios::flush_vs_provisioning());
}

#[test]
fn out_of_space_while_bios_are_queued() {
    check(scenarios::out_of_space());
}

/// Loom finds a failing interleaving of `scenario` with the locking mutation
/// `name`, in every design.
fn detector(scenario: Scenario, name: &str) {
    for locking in LockingDesign::ALL {
        let mutations = LockingMutations::by_name(name).expect("a locking mutation");
        let s = scenario.clone();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            builder().check(move || execute(&s, Run { mutations, ..Run::new(locking) }))
        }));
        assert!(caught.is_err(), "{name} ({}) was not caught by loom in {}", locking.name(), scenario.name);
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
