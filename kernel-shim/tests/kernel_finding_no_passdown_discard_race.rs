//! Kernel finding `discard_spares_blocks_being_unshared` on the real
//! kernel: without discard passdown, a discard unmaps a block whose
//! sharing a write is breaking, and an acknowledged write is lost.
//!
//! A thin device's block is shared with a snapshot. A partial write to it
//! breaks sharing: the pool allocates a new block and copies the shared
//! one there (kcopyd), the write waiting in the data block's cell; the
//! virtual block's cell is already released. A no-passdown discard of
//! the block takes the virtual cell, does not look at the data cell, and
//! removes the mapping at once. A second write to the block finds it
//! unmapped, provisions another block (zeroed, the write issued there,
//! its mapping inserted) and is acknowledged. Then the copy finishes: its
//! mapping replaces the second write's, and the second write is gone —
//! the device reads the first write over the old data.
//!
//! The trace `sim/tests/fixtures/no-passdown-discard-races-break-sharing.trace`
//! orders this on the simulator with `worker` and `complete` ops. On stock
//! 6.1 it runs as a race job (`Job::Race`): the pool on controlled disks,
//! the data disk's reads held at a gate (the copy starts with a read of
//! the shared block), the first write in the background until the copy's
//! read is held, the discard and the second write, then the gate opened.
//! The kernel's devices are L1-equal to the simulator's run of the trace
//! as stock 6.1, which loses the write; with the candidate fix (blocks
//! whose data cell is busy stay mapped) the model keeps it, and the same
//! kernel run differs from it.
//!
//! Needs what `kernel_ublk_crash` needs (qemu, `linux-image-amd64`,
//! `linux-source-6.1`, `linux-headers-<release>`). Without them the VM
//! part prints SKIPPED, or fails under `CI=true`; the model's part runs
//! everywhere.

#[path = "common/thin_tools.rs"]
mod thin_tools;

use thin_tools::skip_or_fail;

use dmsim_kernel_shim::equivalence::{compare_l1, simulate_as_written, FinalState};
use dmsim_kernel_shim::protocol::RaceStep;
use dmsim_kernel_shim::{Job, KernelShim, ShimError};
use dmsim_traces::{Op, Trace};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../sim/tests/fixtures/no-passdown-discard-races-break-sharing.trace"
);
/// The candidate fix's header parameter.
const FIX: &str = "fix.discard_spares_blocks_being_unshared";
/// The thin device's block the race is on, and the stamp numbers of the
/// three writes (the stamps count writes in trace order).
const BLOCK: usize = 1;
const SECOND_WRITE: &str = "w2";

fn trace(fix: bool) -> Trace {
    let text = std::fs::read_to_string(FIXTURE).expect("the fixture");
    let text = text.replace(&format!("param {FIX} 0"), &format!("param {FIX} {}", u8::from(fix)));
    dmsim_traces::text::from_text(&text).expect("a trace")
}

/// The kernel's order for the trace's race: the first write (op 3) in the
/// background until the pool's copy of the shared block is in flight (its
/// read held), then the discard (op 5) and the second write (op 7), then
/// the copy.
fn steps() -> Vec<RaceStep> {
    use RaceStep::*;
    vec![Op(0), Op(1), Op(2), HoldReads, Background(3), HeldReads(1), Op(5), Op(7), ReleaseReads, Join]
}

fn block(state: &FinalState, id: u32) -> &str {
    let (_, blocks) = state.devices.iter().find(|(d, _)| *d == id).expect("the device");
    &blocks[BLOCK]
}

#[test]
fn a_no_passdown_discard_racing_break_sharing_loses_a_write_on_the_stock_kernel() {
    let stock = trace(false);
    assert_eq!(stock.header.param("no_discard_passdown"), Some("1"));
    let ops: Vec<Op> = stock.ops().collect();
    assert!(matches!(ops[3], Op::Write { dev: 0, nr_sectors: 8, .. }), "{:?}", ops[3]);
    assert!(matches!(ops[5], Op::Discard { dev: 0, .. }), "{:?}", ops[5]);
    assert!(matches!(ops[7], Op::Write { dev: 0, nr_sectors: 1, .. }), "{:?}", ops[7]);

    // The model as stock 6.1 loses the second write; with the fix it keeps it.
    let model = simulate_as_written(&stock).expect("the simulator");
    let lost = model.oracle_violation.as_deref().expect("the model as 6.1 loses a write");
    assert!(lost.contains("wrong data"), "{lost}");
    assert!(!block(&model.state, 0).starts_with(SECOND_WRITE), "{}", block(&model.state, 0));
    let fixed = simulate_as_written(&trace(true)).expect("the simulator with the fix");
    assert_eq!(fixed.oracle_violation, None);
    assert!(block(&fixed.state, 0).starts_with(SECOND_WRITE), "{}", block(&fixed.state, 0));

    let shim = match KernelShim::prepare_with_ublk() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) => {
            return skip_or_fail("a no-passdown discard racing break-sharing on the kernel", &e.to_string())
        }
        Err(e) => panic!("preparing the VM: {e}"),
    };
    let run = shim
        .run_jobs(&[Job::Race { trace: stock.clone(), steps: steps() }])
        .unwrap_or_else(|e| panic!("the VM: {e}"))
        .pop()
        .expect("one run");
    assert_eq!(run.result.error, None, "console:\n{}", run.console);
    for i in [1, 3, 5, 7] {
        let o = run.result.ops.iter().find(|o| o.index == i).expect("every op answered");
        assert_eq!(o.outcome, "ok", "op {i}: every write and the discard were acknowledged");
    }
    let kernel = FinalState::of_kernel(&run);
    eprintln!("kernel: dev 0 block {BLOCK}: {}; model: {}", block(&kernel, 0), block(&model.state, 0));
    // The damage on the kernel: the acknowledged second write is gone.
    assert!(!block(&kernel, 0).starts_with(SECOND_WRITE), "{}", block(&kernel, 0));
    let d = compare_l1(&model.state, &kernel);
    assert!(d.is_empty(), "the kernel agrees with the model as 6.1: {d:?}");

    // The detector: the same kernel run against the model with the fix.
    let d = compare_l1(&fixed.state, &kernel);
    assert!(!d.is_empty(), "the fixed model keeps the write the kernel lost");
}
