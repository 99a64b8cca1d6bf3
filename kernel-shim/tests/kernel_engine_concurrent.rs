//! Serialized and concurrent replay on the userland engine
//! (docs/engine.md), in one boot.
//!
//! Serialized: [`SERIAL`] campaign traces (seeds from 0 on, those that
//! grow the metadata device left out, [`SERIAL_OPS`] ops each, with their
//! crashes and faults) one request at a time on the engine on the
//! trace's clock, each judged against the serialized simulator on the
//! same clock: L1 equal at the end and at every crash (a power cut and a
//! `SIGKILL` of the engine; at least [`CRASHES_AT_LEAST`] of them in
//! all), every image that survived a crash clean under dmsim's checker,
//! every op's outcome the same (or a difference of a named class), and
//! the final metadata L2-identical to the simulator's.
//!
//! Concurrent: the
//! campaign's traces with up to eight requests in flight on the engine's
//! ublk devices in the VM, completing in whatever order the engine
//! completes them, every request fed to the oracle as it is sent and as
//! it completes, every read judged, every block read back at the end.
//! [`TRACES`] traces of seeds from 0 on (those that grow the metadata
//! device left out), [`OPS`] ops each, in one boot: no oracle violation, and
//! requests really overtook one another. The detector, in the same boot:
//! an engine that acknowledges every eighth write without doing it is
//! caught by the oracle on the first three campaign traces of
//! [`BROKEN_OPS`] ops (on one of them at least).
//!
//! Needs what `kernel_ublk_crash` needs. Without it the test prints
//! SKIPPED, or fails under `CI=true`.

#[path = "common/thin_tools.rs"]
mod thin_tools;
use std::time::Instant;

use thin_tools::skip_or_fail;

use dmsim_kernel_shim::protocol::EngineJob;
use dmsim_kernel_shim::thin_campaign::campaign_trace;
use dmsim_kernel_shim::thin_replay::{crash_checks, judge, judge_concurrent, Verdict};
use dmsim_kernel_shim::{Job, KernelShim, ShimError};
use dmsim_sim::run::CampaignSettings;
use dmsim_traces::{Op, Trace};

/// Traces replayed serialized (the bar: 50).
const SERIAL: usize = 50;
/// Ops per serialized trace.
const SERIAL_OPS: usize = 50;
/// Engine crashes the serialized traces must hold in all (the issue's
/// bar: 20).
const CRASHES_AT_LEAST: usize = 20;
/// Traces replayed concurrently (the bar: 20).
const TRACES: usize = 20;
/// Ops per trace.
const OPS: usize = 60;
/// Requests in flight at most.
const DEPTH: u16 = 8;
/// Traces run on the broken engine.
const BROKEN: usize = 3;
/// Ops per trace on the broken engine.
const BROKEN_OPS: usize = 100;

/// The campaign's traces of `ops` ops from seed 0 on, without those
/// that grow the metadata device (the engine does not yet).
fn campaign_traces(count: usize, ops: usize) -> Vec<(u64, Trace)> {
    let settings = CampaignSettings::default();
    (0..)
        .map(|s| (s, campaign_trace(s, ops, &settings)))
        .filter(|(_, t)| !t.ops().any(|op| matches!(op, Op::GrowMetadata { .. })))
        .take(count)
        .collect()
}

#[test]
fn serialized_and_concurrent_replay_on_the_engine() {
    let t0 = Instant::now();
    let shim = match KernelShim::prepare_with_ublk() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) => {
            return skip_or_fail("kernel engine concurrency test", &e.to_string())
        }
        Err(e) => panic!("preparing the VM with ublk: {e}"),
    };
    let serial = campaign_traces(SERIAL, SERIAL_OPS);
    let traces = campaign_traces(TRACES, OPS);
    let honest = EngineJob::at_depth(DEPTH);
    let broken = EngineJob { drop_writes: true, ..honest };
    // One boot: every trace on the honest engine, then the first few on
    // the broken one; before them the serialized traces.
    let mut jobs: Vec<Job> = serial
        .iter()
        .map(|(_, t)| Job::Engine { trace: t.clone(), engine: EngineJob::serialized() })
        .collect();
    jobs.extend(traces.iter().map(|(_, t)| Job::Engine { trace: t.clone(), engine: honest }));
    // The broken engine on longer traces, so that each has more than
    // eight writes to lose (and a read-back to find them).
    let broken_traces = campaign_traces(BROKEN, BROKEN_OPS);
    jobs.extend(broken_traces.iter().map(|(_, t)| Job::Engine { trace: t.clone(), engine: broken }));
    let all_runs = shim.run_jobs(&jobs).unwrap_or_else(|e| panic!("the VM: {e}"));
    assert_eq!(all_runs.len(), jobs.len());
    eprintln!("{} jobs in one boot: {:?}", jobs.len(), t0.elapsed());
    serialized_runs_equal_the_simulator(&serial, &all_runs[..SERIAL]);
    let runs = &all_runs[SERIAL..];
    let (mut overtaken, mut most) = (0, 0);
    for ((seed, trace), run) in traces.iter().zip(runs) {
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

/// The serialized runs against the simulator on the trace's clock (see
/// the module's docs).
fn serialized_runs_equal_the_simulator(serial: &[(u64, Trace)], runs: &[dmsim_kernel_shim::KernelRun]) {
    let (mut crashes, mut explained, mut l2, mut l3) = (0, 0, 0, 0);
    for ((seed, trace), run) in serial.iter().zip(runs) {
        assert_eq!(run.result.error, None, "seed {seed}: the agent failed");
        let r = judge(trace, true, run).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(r.trace_clock, "seed {seed}: the engine was not on the trace's clock");
        let checks = crash_checks(run);
        eprintln!(
            "seed {seed} {}: {}, {} crashes, L2 {}{}",
            trace.header.workload,
            r.verdict().name(),
            r.crashes.len(),
            r.l2.as_ref().map_or("unknown", |l| l.label()),
            r.first_difference().map(|d| format!("; first: {d}")).unwrap_or_default()
        );
        assert!(r.l1_equal_everywhere(), "seed {seed}: {:?}", r.first_difference());
        assert_ne!(r.verdict(), Verdict::Unexplained, "seed {seed}: {:?}", r.first_difference());
        if r.verdict() == Verdict::Explained {
            explained += 1;
        }
        assert_eq!(checks.len(), r.crashes.len(), "seed {seed}: a checker verdict per crash");
        for (op, bad) in &checks {
            assert_eq!(bad, &None, "seed {seed}: the image that survived the crash at op {op}");
        }
        crashes += r.crashes.len();
        let dumps = r.l2.as_ref().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(
            dumps.first_difference().is_none(),
            "seed {seed}: L2 {}: {:?}",
            dumps.label(),
            dumps.first_difference()
        );
        l2 += 1;
        if r.l3.differing == 0 {
            l3 += 1;
        }
    }
    eprintln!(
        "{} serialized traces: L1 equal everywhere, L2 identical {l2}, L3 identical {l3}, {explained} with op differences of a named class, {crashes} engine crashes",
        serial.len()
    );
    assert!(crashes >= CRASHES_AT_LEAST, "only {crashes} engine crashes in {} traces", serial.len());
}
