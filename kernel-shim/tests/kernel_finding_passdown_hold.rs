//! Kernel finding `passdown_holds_blocks_in_core` on the real kernel: a
//! passdown discard holds the data blocks it unmapped with an extra count
//! between its two passes; a commit in between makes that count durable,
//! and a power cut before pass two's decrement is committed leaves a block
//! counted twice and mapped once, which nothing will ever free.
//!
//! The thin campaign's trace of seed 78 (fill-to-full: a full pool's
//! allocations commit between the passes; 7 power cuts; faults) replayed
//! on stock 6.1 with the pool on controlled disks, as `dmsim check --on
//! kernel --seeds 78..79` does: it is L1-equal to the serialized simulator
//! (following the kernel's clock) at the end and at every crash, and at
//! the end dmsim's checker finds the same over-counted block in the
//! kernel's metadata as in the model's. Judged against the model with the
//! candidate fix (the hold kept in core), the same kernel run leaves the
//! model's metadata without it. `thin_check` 0.9.0 does not compare data block counts, so
//! only dmsim's checker sees it.
//!
//! Needs what `kernel_ublk_crash` needs (qemu, `linux-image-amd64`,
//! `linux-source-6.1`, `linux-headers-<release>`). Without them the test
//! prints SKIPPED, or fails under `CI=true`.

#[path = "common/thin_tools.rs"]
mod thin_tools;

use thin_tools::skip_or_fail;

use dmsim_kernel_shim::thin_campaign;
use dmsim_kernel_shim::thin_replay::{judge, Verdict};
use dmsim_kernel_shim::{Job, KernelShim, ShimError};
use dmsim_sim::run::CampaignSettings;

const SEED: u64 = 78;
/// The over-counted data block, as the checker says it.
const DAMAGE: &str = "block 4 count on disk 2, expected 1";
/// The candidate fix's header parameter.
const FIX: &str = "fix.passdown_holds_blocks_in_core";

#[test]
fn a_passdown_hold_survives_a_power_cut_on_the_stock_kernel() {
    let shim = match KernelShim::prepare_with_ublk() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) => return skip_or_fail("passdown hold on the kernel", &e.to_string()),
        Err(e) => panic!("preparing the VM: {e}"),
    };
    let trace = thin_campaign::campaign_trace(SEED, 300, &CampaignSettings::default());
    assert_eq!(trace.header.param(FIX), Some("0"), "the trace runs the model as stock 6.1");
    let run = shim
        .run_jobs(&[Job::Ublk(trace.clone())])
        .unwrap_or_else(|e| panic!("the VM: {e}"))
        .pop()
        .expect("one run");
    let r = judge(&trace, true, &run).unwrap_or_else(|e| panic!("judging: {e}"));
    eprintln!("seed {SEED}: {:?}, first difference {:?}", r.verdict(), r.first_difference());
    assert!(r.crashes.len() >= 2, "the trace cuts power");
    assert_eq!(r.verdict(), Verdict::Equal, "{:?}", r.first_difference());
    let model = r.end_check_finding.as_deref().expect("the model's final metadata is damaged");
    assert!(model.contains(DAMAGE), "{model}");
    let kernel = r.kernel_end_check.as_deref().expect("the kernel's final metadata is damaged");
    assert!(kernel.contains(DAMAGE), "the kernel's metadata: {kernel}");

    // The detector: the same kernel run judged against the model with the
    // candidate fix (the hold kept in core): its final metadata is clean.
    let mut fixed = trace.clone();
    for (k, v) in &mut fixed.header.params {
        if k == FIX {
            *v = "1".into();
        }
    }
    let f = judge(&fixed, true, &run).unwrap_or_else(|e| panic!("judging with the fix: {e}"));
    assert_eq!(f.end_check_finding, None, "with the fix");
}
