//! Concurrent replay on the userland engine (docs/engine.md): the
//! campaign's traces with up to eight requests in flight on the engine's
//! ublk devices in the VM, completing in whatever order the engine
//! completes them, every request fed to the oracle as it is sent and as
//! it completes, every read judged, every block read back at the end.
//! [`TRACES`] traces of seeds from 0 on (those that grow the metadata
//! device left out), 80 ops each, in one boot: no oracle violation, and
//! requests really overtook one another. The detector, in the same boot:
//! an engine that acknowledges every eighth write without doing it is
//! caught by the oracle on the first of the same traces.
//!
//! Needs what `kernel_ublk_crash` needs. Without it the test prints
//! SKIPPED, or fails under `CI=true`.

#[path = "common/thin_tools.rs"]
mod thin_tools;
use std::time::Instant;

use thin_tools::skip_or_fail;

use dmsim_kernel_shim::protocol::EngineJob;
use dmsim_kernel_shim::thin_campaign::campaign_trace;
use dmsim_kernel_shim::thin_replay::judge_concurrent;
use dmsim_kernel_shim::{Job, KernelShim, ShimError};
use dmsim_sim::run::CampaignSettings;
use dmsim_traces::{Op, Trace};

/// Traces replayed concurrently (the bar: 20).
const TRACES: usize = 20;
/// Ops per trace.
const OPS: usize = 80;
/// Requests in flight at most.
const DEPTH: u16 = 8;
/// Traces run again on the broken engine.
const BROKEN: usize = 3;

#[test]
fn concurrent_replay_on_the_engine_satisfies_the_oracle() {
    let t0 = Instant::now();
    let shim = match KernelShim::prepare_with_ublk() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) => {
            return skip_or_fail("kernel engine concurrency test", &e.to_string())
        }
        Err(e) => panic!("preparing the VM with ublk: {e}"),
    };
    let settings = CampaignSettings::default();
    let traces: Vec<(u64, Trace)> = (0..)
        .map(|s| (s, campaign_trace(s, OPS, &settings)))
        .filter(|(_, t)| !t.ops().any(|op| matches!(op, Op::GrowMetadata { .. })))
        .take(TRACES)
        .collect();
    let honest = EngineJob { depth: DEPTH, ..EngineJob::serialized() };
    let broken = EngineJob { drop_writes: true, ..honest };
    // One boot: every trace on the honest engine, then the first few on
    // the broken one.
    let mut jobs: Vec<Job> =
        traces.iter().map(|(_, t)| Job::Engine { trace: t.clone(), engine: honest }).collect();
    jobs.extend(traces.iter().take(BROKEN).map(|(_, t)| Job::Engine { trace: t.clone(), engine: broken }));
    let runs = shim.run_jobs(&jobs).unwrap_or_else(|e| panic!("the VM: {e}"));
    assert_eq!(runs.len(), jobs.len());
    let (mut overtaken, mut most) = (0, 0);
    for ((seed, trace), run) in traces.iter().zip(&runs) {
        let r = judge_concurrent(run).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        eprintln!(
            "seed {seed} {}: {} requests, at most {} in flight, {} overtaken, {} failed ops, {} blocks read back",
            trace.header.workload, r.requests, r.max_in_flight, r.overtaken, r.failed_ops, r.blocks_read_back
        );
        assert!(r.violations.is_empty(), "seed {seed}: {:#?}", r.violations);
        assert!(r.requests > 0, "seed {seed}: nothing ran");
        overtaken += r.overtaken;
        most = most.max(r.max_in_flight);
    }
    eprintln!(
        "{TRACES} traces: {overtaken} requests overtaken, at most {most} in flight; {:?}",
        t0.elapsed()
    );
    assert!(most >= 2, "requests were never in flight together");
    assert!(overtaken > 0, "no request ever completed before one sent earlier");

    // The detector.
    let caught = runs[TRACES..]
        .iter()
        .map(|run| judge_concurrent(run).expect("judged").violations)
        .inspect(|v| eprintln!("drop-writes engine: {} oracle violations; first {:?}", v.len(), v.first()))
        .filter(|v| !v.is_empty())
        .count();
    assert!(caught > 0, "no oracle violation on an engine that loses every eighth write");
}
