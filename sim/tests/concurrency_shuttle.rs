//! The pool's concurrent core under shuttle: every harness of
//! [`dmsim_sim::concurrency`] in every locking design, under shuttle's PCT and
//! random schedulers, with the completion context picking which data I/O
//! completes next at random (shuttle's seeded generator, so a schedule
//! replays exactly). Each broken locking variant is caught, and the schedule
//! shuttle saved for the failure replays it.
//! The running, saving and replaying of schedules is shared with the
//! cache shuttle test: `tests/common/shuttle.rs`.
//!
//! Run with `cargo test -p dmsim-sim --features shuttle --test concurrency_shuttle --release`.
//! `DMSIM_SHUTTLE_ITERATIONS` raises the iterations per harness and
//! scheduler (default 1,000).
#![cfg(feature = "shuttle")]

mod common;

use common::shuttle::{iterations, pick_random, Shuttle};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;

use dmsim_model::mutation::{LockingMutations, Mutations};
use dmsim_model::thin::pool::{IoInfo, LockingDesign};
use dmsim_sim::concurrency::{execute, execute_counted, scenarios, Outcome, Run, Scenario};

/// The schedule folder, and the step bound: a run that has not ended after
/// 200,000 steps is livelocked (a lost wake-up, a cell never released); the
/// harnesses need a few thousand.
const SHUTTLE: Shuttle = Shuttle { schedules: "shuttle-schedules", max_steps: 200_000 };

/// `scenario` with `run`, as a shuttle test body.
fn body(scenario: &Scenario, run: Run) -> impl Fn() + Clone + Send + Sync + 'static {
    let scenario = scenario.clone();
    move || execute(&scenario, run)
}

/// Both schedulers, `iterations()` each.
fn check(scenario: Scenario) {
    for locking in LockingDesign::ALL {
        let run = Run { pick: pick_random, ..Run::new(locking) };
        SHUTTLE.both(iterations(), body(&scenario, run));
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

#[test]
fn thin_removal_vs_the_worker() {
    check(scenarios::remove_vs_worker());
}

#[test]
fn thin_lifecycle_vs_the_worker() {
    check(scenarios::lifecycle_vs_worker());
}

#[test]
fn writes_vs_a_discard_of_a_whole_prison_region() {
    check(scenarios::writes_vs_discard_of_a_region());
}

#[test]
fn writes_vs_a_discard_of_a_whole_prison_region_without_passdown() {
    check(scenarios::writes_vs_discard_of_a_region_no_passdown());
}

/// Catches `name` in `scenario` under every design, and replays the saved
/// schedule to the same failure.
fn detector(scenario: Scenario, name: &str) {
    detector_in(scenario, name, &LockingDesign::ALL);
}

/// [`detector`] for the designs in `designs`.
fn detector_in(scenario: Scenario, name: &str, designs: &[LockingDesign]) {
    let mutations = LockingMutations::by_name(name).expect("a locking mutation");
    for &locking in designs {
        let run = Run { mutations, pick: pick_random, ..Run::new(locking) };
        SHUTTLE.detector(&format!("{name} ({}) in {}", locking.name(), scenario.name), body(&scenario, run));
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
            SHUTTLE.both(iterations(), body(&scenario, run));
        }
    }
}

/// `thin_dtr` without its wait for `can_destroy`: a worker pass that took
/// the device off the active list before its removal then walks the freed
/// device (a broken model invariant).
#[test]
fn detector_thin_dtr_skips_destroy_wait() {
    detector(scenarios::lifecycle_vs_worker(), "thin-dtr-skips-destroy-wait");
}

/// The worker's walk without `thin_get`: `thin_dtr` sees no reference and
/// frees the device under the worker.
#[test]
fn detector_worker_skips_thin_get() {
    detector(scenarios::lifecycle_vs_worker(), "worker-skips-thin-get");
}

/// `delete` of an open device is not refused.
#[test]
fn detector_delete_ignores_open_count() {
    detector(scenarios::lifecycle_vs_worker(), "delete-ignores-open-count");
}

/// A key's region from its end: the discard's `[0, 1024)` takes region 1's
/// lock, the write's `[5, 6)` region 0's, and the write slips past the
/// discard (regions design only: the others have one prison).
#[test]
fn detector_region_from_block_end() {
    detector_in(
        scenarios::writes_vs_discard_of_a_region_no_passdown(),
        "region-from-block-end",
        &[LockingDesign::Regions],
    );
}

/// The completion context's choice under faults: each data I/O that may
/// fail does so with probability one half, drawn from shuttle's generator
/// so that a saved schedule replays the same faults.
fn fail_random(_: &IoInfo) -> bool {
    use shuttle::rand::{thread_rng, Rng};
    thread_rng().gen_bool(0.5)
}

/// `scenario` with `run`, faults chosen at random, as a shuttle test body
/// that counts, across its executions, what the faults did.
fn counted_body(
    scenario: &Scenario,
    run: Run,
    seen: &'static FaultsSeen,
) -> impl Fn() + Clone + Send + Sync + 'static {
    let scenario = scenario.clone();
    let run = Run { fail: fail_random, ..run };
    move || seen.add(execute_counted(&scenario, run))
}

/// Totals over a test's executions (std atomics: outside the checker).
struct FaultsSeen {
    executions: AtomicUsize,
    faulted: AtomicUsize,
    failed_mappings: AtomicUsize,
    io_errors: AtomicUsize,
}

impl FaultsSeen {
    const fn new() -> Self {
        FaultsSeen {
            executions: AtomicUsize::new(0),
            faulted: AtomicUsize::new(0),
            failed_mappings: AtomicUsize::new(0),
            io_errors: AtomicUsize::new(0),
        }
    }

    fn add(&self, o: Outcome) {
        self.executions.fetch_add(1, Relaxed);
        self.faulted.fetch_add(usize::from(o.faults > 0), Relaxed);
        self.failed_mappings.fetch_add(o.failed_mappings, Relaxed);
        self.io_errors.fetch_add(o.io_errors, Relaxed);
    }
}

/// Runs `scenario` with faults under both schedulers and every design, and
/// checks that the faults did what the scenario is about: some executions
/// failed a mapping's preparation (or, with `own_io`, a request's own
/// write), some requests failed with EIO, and some executions ran without
/// a fault.
fn check_with_faults(scenario: Scenario, seen: &'static FaultsSeen) {
    for locking in LockingDesign::ALL {
        let run = Run { pick: pick_random, ..Run::new(locking) };
        SHUTTLE.both(iterations(), counted_body(&scenario, run, seen));
    }
    let executions = seen.executions.load(Relaxed);
    let faulted = seen.faulted.load(Relaxed);
    let (mappings, errors) = (seen.failed_mappings.load(Relaxed), seen.io_errors.load(Relaxed));
    println!(
        "{}: {executions} executions, {faulted} with a fault, {mappings} failed mappings, {errors} requests \
         failed with EIO",
        scenario.name
    );
    assert!(0 < faulted && faulted < executions, "{}: faults in {faulted} of {executions}", scenario.name);
    assert!(mappings > 0, "{}: no mapping's preparation failed", scenario.name);
    assert!(errors > 0, "{}: no request failed with EIO", scenario.name);
}

#[test]
fn writes_to_unprovisioned_blocks_a_zeroing_failing() {
    static SEEN: FaultsSeen = FaultsSeen::new();
    check_with_faults(scenarios::writes_with_failing_zeroing(), &SEEN);
}

#[test]
fn write_vs_break_sharing_the_copy_failing() {
    static SEEN: FaultsSeen = FaultsSeen::new();
    check_with_faults(scenarios::break_sharing_with_failing_copy(), &SEEN);
}

#[test]
fn discard_vs_failing_writes() {
    static SEEN: FaultsSeen = FaultsSeen::new();
    check_with_faults(scenarios::discard_vs_failing_writes(), &SEEN);
}

/// A failed mapping also errors its device's deferred bios (a test-only
/// mutation of the error path, `Mutations::UNDER_FAULTS`): caught with the
/// zeroing of block 0 or 1 failing while the other block's write waits on
/// the device's deferred list (it fails with EIO, though no failed I/O
/// could reach it), with replay; without faults the same scenario, with the
/// same mutation, passes.
#[test]
fn detector_failed_mapping_errors_deferred_bios() {
    let name = "failed-mapping-errors-deferred-bios";
    let mutations = Mutations::by_name(name).expect("a mutation");
    let scenario = scenarios::writes_with_failing_zeroing();
    for locking in LockingDesign::ALL {
        let run = Run { mutations, pick: pick_random, fail: fail_random, ..Run::new(locking) };
        SHUTTLE.detector(&format!("{name} ({}) in {}", locking.name(), scenario.name), body(&scenario, run));
        let no_faults = Scenario { io_errors: 0, ..scenario.clone() };
        SHUTTLE.both(iterations(), body(&no_faults, run));
    }
}

/// kcopyd's completion of a failed zeroing queues the mapping for the
/// worker before it records the error (`copy-error-after-queueing`, a
/// locking mutation: only a worker pass between the two shows it). Caught
/// with a zeroing failing: the worker inserts the mapping, the block is
/// mapped un-zeroed (the read-back finds the data device's old bytes), and
/// the block the failure should have leaked is mapped. Without faults the
/// same scenario, with the same mutation, passes.
#[test]
fn detector_copy_error_after_queueing() {
    let name = "copy-error-after-queueing";
    let mutations = LockingMutations::by_name(name).expect("a locking mutation");
    let scenario = scenarios::two_writes_one_block_zeroing_fails();
    for locking in LockingDesign::ALL {
        let run = Run { mutations, pick: pick_random, fail: fail_random, ..Run::new(locking) };
        SHUTTLE.detector(&format!("{name} ({}) in {}", locking.name(), scenario.name), body(&scenario, run));
        let no_faults = Scenario { io_errors: 0, ..scenario.clone() };
        SHUTTLE.both(iterations(), body(&no_faults, run));
    }
}
