//! Kernel finding `passdown_holds_blocks_in_core` on the real kernel: a
//! passdown discard holds the data blocks it unmapped with an extra count
//! between its two passes; a commit in between makes that count durable,
//! and a power cut before pass two's decrement is committed leaves a block
//! counted twice and mapped once, which nothing will ever free.
//!
//! The thin campaign's trace of seed 78 (fill-to-full: a full pool's
//! allocations commit between the passes; 7 power cuts; faults) replayed
//! on stock 6.1 with the pool on controlled disks, as `dmsim check --on
//! kernel --seeds 78..79` does, three times in one boot: every run is
//! L1-equal to the serialized simulator (following the kernel's clock) at
//! the end and at every crash, leaves the same over-counted block in the
//! kernel's metadata as in the model's or neither (where the kernel's
//! commit timer fell decides), and at least one leaves it. Judged against the model with the
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
/// Runs of the trace in the boot.
const RUNS: usize = 3;

#[test]
fn a_passdown_hold_survives_a_power_cut_on_the_stock_kernel() {
    let shim = match KernelShim::prepare_with_ublk() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) => return skip_or_fail("passdown hold on the kernel", &e.to_string()),
        Err(e) => panic!("preparing the VM: {e}"),
    };
    let trace = thin_campaign::campaign_trace(SEED, 300, &CampaignSettings::default());
    assert_eq!(trace.header.param(FIX), Some("0"), "the trace runs the model as stock 6.1");
    // Whether a commit lands between the passes depends on where the
    // kernel's 1 s commit timer falls against the ops, which a loaded
    // machine moves (a CI run once had no commit there: kernel and model
    // equal, neither damaged). So the trace runs RUNS times in one boot:
    // every run equal to the model following it, with the same damage or
    // none on both sides, and the damage shown in at least one.
    let jobs: Vec<Job> = (0..RUNS).map(|_| Job::Ublk(trace.clone())).collect();
    let runs = shim.run_jobs(&jobs).unwrap_or_else(|e| panic!("the VM: {e}"));
    let damaged = |finding: &Option<String>| finding.as_deref().is_some_and(|f| f.contains(DAMAGE));
    let mut shown = None;
    for (k, run) in runs.iter().enumerate() {
        let r = judge(&trace, true, run).unwrap_or_else(|e| panic!("run {k}: judging: {e}"));
        eprintln!(
            "seed {SEED}, run {k}: {:?}, first difference {:?}; damage: model {:?}, kernel {:?}",
            r.verdict(),
            r.first_difference(),
            r.end_check_finding,
            r.kernel_end_check
        );
        if damaged(&r.end_check_finding) != damaged(&r.kernel_end_check) {
            keep_answer(&trace, k, run);
        }
        assert!(r.crashes.len() >= 2, "the trace cuts power");
        assert_eq!(r.verdict(), Verdict::Equal, "run {k}: {:?}", r.first_difference());
        assert_eq!(
            damaged(&r.end_check_finding),
            damaged(&r.kernel_end_check),
            "run {k}: the same damage or none"
        );
        if damaged(&r.kernel_end_check) && shown.is_none() {
            shown = Some(k);
        }
    }
    let shown = shown.unwrap_or_else(|| panic!("no run of {RUNS} left the over-counted block"));
    let run = &runs[shown];

    // The detector: the same kernel run judged against the model with the
    // candidate fix (the hold kept in core): its final metadata is clean.
    let mut fixed = trace.clone();
    for (k, v) in &mut fixed.header.params {
        if k == FIX {
            *v = "1".into();
        }
    }
    let f = judge(&fixed, true, run).unwrap_or_else(|e| panic!("judging with the fix: {e}"));
    assert_eq!(f.end_check_finding, None, "with the fix");
}

/// Writes run `k`'s trace, answer and final metadata under
/// `target/dmsim-test-answers/` for `dmsim replay --on kernel --disks ublk
/// --kernel-answer` to judge again without a boot.
fn keep_answer(trace: &dmsim_traces::Trace, k: usize, run: &dmsim_kernel_shim::KernelRun) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dmsim-test-answers");
    let _ = std::fs::create_dir_all(&dir);
    let base = dir.join(format!("passdown-hold-seed-{SEED}-run-{k}"));
    let _ =
        dmsim_traces::file::write(&base.with_extension("trace"), trace, dmsim_traces::file::Encoding::Text);
    let _ = std::fs::write(base.with_extension("kernel"), run.result.to_text());
    let _ = std::fs::write(base.with_extension("metadata"), &run.metadata_image);
    eprintln!("run {k}: its answer is in {}.kernel", base.display());
}
