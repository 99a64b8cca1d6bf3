//! Kernel finding `unzeroed_mapping_checks_the_mode` on the real kernel: a
//! pool that does not zero new blocks and runs out of metadata space in a
//! block's allocation goes to fail mode, not out-of-metadata-space mode.
//! `alloc_data_block` commits when no metadata block is left; that commit
//! makes the pool out of metadata space (the block manager read-only) and
//! still hands out the block; `schedule_zero` inserts its mapping by a
//! direct call to `process_prepared_mapping`, the insert is refused
//! (`-EPERM`), and the abort cannot set needs_check on the read-only
//! superblock: fail mode, where every read fails and growing the metadata
//! device no longer helps.
//!
//! The kernel campaign's trace of seed 62 (metadata pressure,
//! `skip_block_zeroing`, 7 power cuts), pinned as
//! `sim/tests/fixtures/ooms-without-zeroing-fails.trace`, replayed on stock
//! 6.1 with the pool on controlled disks: the kernel answers the ops
//! where the finding shows as the serialized model (as stock 6.1,
//! following the kernel's clock) does — the write whose allocation runs
//! the metadata out fails (op 175 in most runs) and the pool fails with
//! it, so a read after it (op 183) is EIO — and the console says why. (The whole run is usually equal too, but the
//! kernel's commit timer can put a crash state on either side of a
//! commit; that is not what this test is about.) Judged against the model with the
//! candidate fix (the mapping through the mode's fail variant), the same
//! kernel run differs at that read, which the fixed pool still serves.
//!
//! Needs what `kernel_ublk_crash` needs (qemu, `linux-image-amd64`,
//! `linux-source-6.1`, `linux-headers-<release>`). Without them the test
//! prints SKIPPED, or fails under `CI=true`.

#[path = "common/thin_tools.rs"]
mod thin_tools;

use thin_tools::skip_or_fail;

use dmsim_kernel_shim::equivalence::simulate_following;
use dmsim_kernel_shim::thin_replay::{judge, Verdict};
use dmsim_kernel_shim::{Job, KernelShim, ShimError};
use dmsim_traces::Op;

const FIXTURE: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../sim/tests/fixtures/ooms-without-zeroing-fails.trace");
/// The candidate fix's header parameter.
const FIX: &str = "fix.unzeroed_mapping_checks_the_mode";

#[test]
fn running_out_of_metadata_without_zeroing_fails_the_stock_kernels_pool() {
    let shim = match KernelShim::prepare_with_ublk() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) => {
            return skip_or_fail("out of metadata space without zeroing on the kernel", &e.to_string())
        }
        Err(e) => panic!("preparing the VM: {e}"),
    };
    let text = std::fs::read_to_string(FIXTURE).expect("the fixture");
    let trace = dmsim_traces::text::from_text(&text).expect("a trace");
    assert_eq!(trace.header.param("skip_block_zeroing"), Some("1"));
    assert_eq!(trace.header.param(FIX), None, "the trace runs the model as stock 6.1");
    // Three runs in one boot; the first whose model (following that run's
    // clock) fails the pool is held to the finding (a loaded machine can
    // move the kernel's commit timer so that a run does not get there).
    let runs = shim
        .run_jobs(&[Job::Ublk(trace.clone()), Job::Ublk(trace.clone()), Job::Ublk(trace.clone())])
        .unwrap_or_else(|e| panic!("the VM: {e}"));
    let fails_the_pool = |run: &dmsim_kernel_shim::KernelRun| {
        simulate_following(&trace, true, run)
            .is_ok_and(|sim| sim.ops.iter().any(|o| o.outcome == "EIO" && o.op.starts_with("read")))
    };
    let run =
        runs.iter().find(|r| fails_the_pool(r)).unwrap_or_else(|| panic!("no run of 3 failed the pool"));
    let outcome = |i: usize| {
        run.result.ops.iter().find(|o| o.index == i).map(|o| o.outcome.clone()).unwrap_or_default()
    };
    // Where the finding shows: the stock model, following the kernel's
    // clock, fails the write whose allocation runs the metadata out (op
    // 175 in most runs) and then a read (op 183). Where the kernel's 1 s
    // commit timer falls against the ops moves that by an op or two on a
    // loaded machine (seen in CI: op 175 answered ok), and the simulator
    // following the kernel's clock moves with it.
    let sim = simulate_following(&trace, true, run).unwrap_or_else(|e| panic!("the simulator: {e}"));
    let ops: Vec<Op> = trace.ops().collect();
    let sim_eio = |i: usize, read: bool| {
        matches!((read, ops[i]), (false, Op::Write { .. }) | (true, Op::Read { .. }))
            && sim.ops.iter().any(|o| o.index == i && o.outcome == "EIO")
    };
    // The first read the model fails (its pool failed), and the last write
    // it failed before it (the one whose allocation ran the metadata out).
    let read_at = (0..ops.len()).find(|&i| sim_eio(i, true)).expect("the model's pool fails");
    let write_at = (0..read_at).rev().find(|&i| sim_eio(i, false)).expect("the model fails a write first");
    eprintln!("the write at op {write_at} ran the metadata out; the read at op {read_at} failed");
    assert_eq!(outcome(write_at), "EIO", "the write whose allocation ran the metadata out");
    assert_eq!(outcome(read_at), "EIO", "a read: the pool failed");
    for line in ["No free metadata blocks", "couldn't lock superblock", "failed to set 'needs_check' flag"] {
        assert!(run.console.contains(line), "the console says {line:?}:\n{}", run.console);
    }
    // Against the model as stock 6.1: the same answers at the ops that
    // show the finding. (The whole run is usually equal, but where the
    // kernel's 1 s commit timer falls against the ops varies with the
    // machine's load: in one CI run crash 2 at op 135 differed, the
    // timed commit on either side of it; docs/kernel-shim.md, "Seeds
    // 0..200".)
    let r = judge(&trace, true, run).unwrap_or_else(|e| panic!("judging: {e}"));
    eprintln!("seed 62: {:?}, first difference {:?}", r.verdict(), r.first_difference());
    assert!(r.crashes.len() >= 5, "the trace cuts power");
    let at_finding =
        |d: &&dmsim_kernel_shim::fault_compare::OpDifference| d.index == write_at || d.index == read_at;
    assert!(
        !r.op_differences.iter().any(|d| at_finding(&d)),
        "the stock model answers ops {write_at} and {read_at} as the kernel: {:?}",
        r.op_differences.iter().filter(at_finding).collect::<Vec<_>>()
    );

    // The detector: the same kernel run judged against the model with the
    // candidate fix, whose pool stays out of metadata space and serves
    // the read.
    let fixed = text.replace(
        "param fix.read_only_deferred_bios_take_cells 0",
        &format!("param fix.read_only_deferred_bios_take_cells 0\nparam {FIX} 1"),
    );
    let fixed = dmsim_traces::text::from_text(&fixed).expect("a trace");
    let f = judge(&fixed, true, run).unwrap_or_else(|e| panic!("judging with the fix: {e}"));
    assert_ne!(f.verdict(), Verdict::Equal, "with the fix the model serves op {read_at}");
    assert!(
        f.op_differences.iter().any(|d| d.index == read_at),
        "op {read_at} differs against the fixed model: {:?}",
        f.op_differences.first()
    );
}
