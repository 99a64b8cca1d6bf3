//! A request whose pieces fail with different errors, on the real kernel.
//!
//! The pinned trace (`sim/tests/fixtures/split-write-eio-enospc.trace`)
//! fills a two-block pool (`error_if_no_space`), arms a permanent bad
//! sector in its second data block, and writes over that block and an
//! unprovisioned one: DM core cuts the write in two, the mapped piece
//! fails EIO on the controlled data disk, the other ENOSPC in the
//! worker. DM core keeps the error of the piece that completes last
//! (`dm_io_set_error`); the model does the same and, serialized, runs the
//! worker first, so it answers EIO. Which piece the kernel completes last
//! the trace does not fix: the report must say equal, or name the
//! difference `piece-error-order`, never leave it unexplained. The trace
//! runs several times in one boot, and every run's answer is printed.
//!
//! Needs what `kernel_ublk_crash` needs (qemu, `linux-image-amd64`,
//! `linux-source-6.1`, `linux-headers-<release>`). Without them the test
//! prints SKIPPED, or fails under `CI=true`.

#[path = "common/thin_tools.rs"]
mod thin_tools;
use thin_tools::skip_or_fail;

use dmsim_kernel_shim::thin_replay::{judge, Verdict};
use dmsim_kernel_shim::{Job, KernelShim, ShimError};

const FIXTURE: &str = "split-write-eio-enospc.trace";
/// Runs of the trace in the one boot.
const RUNS: usize = 3;
/// The split write's op index.
const SPLIT_WRITE: usize = 6;

#[test]
fn a_write_whose_pieces_fail_differently_is_equal_or_piece_error_order() {
    let path = format!("{}/../sim/tests/fixtures/{FIXTURE}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let trace = dmsim_traces::from_text(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let shim = match KernelShim::prepare_with_ublk() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) => return skip_or_fail("kernel piece errors test", &e.to_string()),
        Err(e) => panic!("preparing the VM with ublk: {e}"),
    };
    let runs =
        shim.run_jobs(&vec![Job::Ublk(trace.clone()); RUNS]).unwrap_or_else(|e| panic!("kernel run: {e}"));
    for (k, run) in runs.iter().enumerate() {
        let report = judge(&trace, true, run).unwrap_or_else(|e| panic!("run {k}: judging: {e}"));
        let kernel = run.result.ops.iter().find(|o| o.index == SPLIT_WRITE).map(|o| o.outcome.as_str());
        eprintln!(
            "run {k}: the split write: kernel {kernel:?}; verdict {}, class {:?}; differences {:?}",
            report.verdict().name(),
            report.class().map(|c| c.name()),
            report.op_differences.iter().map(|d| d.to_string()).collect::<Vec<_>>()
        );
        assert!(
            matches!(kernel, Some("EIO" | "ENOSPC")),
            "run {k}: the split write must fail with one of its pieces' errors, got {kernel:?}"
        );
        assert!(report.l1_equal_everywhere(), "run {k}: L1 differs: {:?}", report.differences);
        match report.verdict() {
            Verdict::Equal => assert_eq!(kernel, Some("EIO"), "run {k}: equal means the model's EIO"),
            Verdict::Explained => {
                assert_eq!(report.class().map(|c| c.name()), Some("piece-error-order"), "run {k}");
                assert_eq!(kernel, Some("ENOSPC"), "run {k}");
            }
            Verdict::Unexplained => panic!("run {k}: unexplained: {:?}", report.first_difference()),
        }
    }
}
