//! Cache campaign traces replayed on the stock kernel's dm-cache
//! (`dmsim_kernel_shim::cache_replay`): the first 56 seeds' traces (no faults, no
//! crashes: a serialized replay cannot place them), one boot, settled
//! (`settled_plan`: the kernel's background work finishes between ops, and
//! the simulator follows the kernel's jiffies). Every read
//! the kernel returns must be one the oracle allows after the same requests
//! (L1); how often the kernel's cache contents after the clean shutdown
//! equal the serialized simulator's (L2: the same cache blocks, origin
//! blocks and dirty bits) and its metadata images are byte-identical (L3)
//! is reported.
//!
//! Needs `qemu-system-x86_64` and `linux-image-amd64`; without them it
//! prints SKIPPED, or fails under `CI=true`.

use dmsim_kernel_shim::cache_replay::{judge, replayable_config, settled_plan};
use dmsim_kernel_shim::{KernelShim, ShimError};
use dmsim_sim::cache_run;
use dmsim_sim::run::Checkers;

const TRACES: u64 = 56;
/// Issue 15's bar: at least this many traces with L1 and L2 equal.
const L2_AT_LEAST: usize = 50;
const OPS: usize = 150;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

#[test]
fn fifty_cache_traces_read_on_the_kernel_what_the_oracle_allows() {
    let shim = match KernelShim::prepare() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) if !in_ci() => {
            eprintln!("SKIPPED: cache traces on the kernel: {e}");
            return;
        }
        Err(e) => panic!("preparing the VM: {e}"),
    };
    let mut plans = Vec::new();
    let seeds: Vec<u64> = match std::env::var("DMSIM_CACHE_REPLAY_SEED") {
        Ok(s) => vec![s.parse().expect("a seed")],
        Err(_) => (0..TRACES).collect(),
    };
    for &seed in &seeds {
        let cfg = replayable_config(seed, OPS);
        let out = cache_run::run_config(&cfg, &Checkers::default());
        assert!(out.violation.is_none(), "seed {seed}: the simulator's own run fails: {:?}", out.violation);
        plans.push(settled_plan(&out.trace).unwrap_or_else(|e| panic!("seed {seed}: {e}")));
    }
    let jobs: Vec<_> = plans.iter().map(|p| p.job.clone()).collect();
    let runs = shim.run_jobs(&jobs).unwrap_or_else(|e| panic!("the cache jobs: {e}"));
    for (p, run) in plans.iter().zip(&runs) {
        if let Some(e) = &run.result.error {
            let n = run.result.ops.len();
            for (i, op) in p.ops.iter().enumerate().take(n) {
                if matches!(
                    op,
                    dmsim_traces::Op::Reload { .. }
                        | dmsim_traces::Op::Invalidate { .. }
                        | dmsim_traces::Op::Status
                ) {
                    eprintln!("op {i} {op:?}: {:?}", run.result.ops[i]);
                }
            }
            eprintln!("console tail: {}", run.console.lines().rev().take(15).collect::<Vec<_>>().join("\n"));
            panic!(
                "the agent failed at op {n} ({:?}) after {:?}: {e}",
                p.ops.get(n),
                &p.ops[n.saturating_sub(4)..n]
            );
        }
    }
    eprintln!("{} cache traces, VM {:?}", runs.len(), runs[0].wall);
    let (mut reads, mut same, mut l2, mut l3, mut blocks) = (0, 0, 0, 0, 0);
    let mut failures = Vec::new();
    // Judged on every core (each trace's judge is independent and
    // deterministic: a search over the kernel's clock readings), in order.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pairs: Vec<_> = seeds.iter().zip(plans.iter().zip(&runs)).collect();
    let reports: Vec<_> = std::thread::scope(|s| {
        let chunk = pairs.len().div_ceil(threads).max(1);
        let handles: Vec<_> = pairs
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|&(&seed, (p, run))| {
                            judge(p, run).unwrap_or_else(|e| panic!("seed {seed}: {e}"))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a judge thread")).collect()
    });
    for (&(&seed, (p, run)), r) in pairs.iter().zip(reports) {
        reads += r.reads;
        same += r.reads_as_simulated;
        l2 += usize::from(r.l2_identical);
        l3 += usize::from(r.l3_identical);
        blocks += usize::from(r.same_blocks);
        if !r.l1_violations.is_empty() || !r.failed_requests.is_empty() {
            failures.push(format!(
                "seed {seed} ({}): L1 {:?}; failed requests {:?}",
                p.cfg.workload, r.l1_violations, r.failed_requests
            ));
        }
        if let Some(d) = &r.l3_difference {
            eprintln!("seed {seed}: L3 differs: {d}");
        }
        if !r.l2_identical {
            eprintln!("seed {seed}: L2 differs: {:?}", r.l2_difference);
            eprintln!("  followed in {} runs over {} windows", r.follow_runs.0, r.follow_runs.1);
            if let Some((i, k, s)) = &r.first_divergence {
                eprintln!("  first divergence after op {i} {:?}:\n  kernel {k}\n  sim    {s}", p.ops[*i]);
                for j in i.saturating_sub(6)..=*i {
                    eprintln!(
                        "    op {j}: {:?} -> {:?}",
                        p.ops[j],
                        run.result.op_status.get(j).map(|x| &x.1)
                    );
                }
            }
        }
    }
    eprintln!(
        "L1: {reads} kernel reads judged, {} traces with a violation; reads identical to the serialized \
         simulator's: {same} of {reads}; L2 identical: {l2} of {n} (the same blocks cached, dirty bits aside: \
         {blocks} of {n}); L3 identical: {l3} of {n}",
        failures.len(),
        n = seeds.len()
    );
    assert!(failures.is_empty(), "L1 violations on the kernel:\n{}", failures.join("\n"));
    // With the waker placed as the kernel's timer wheel places it and no
    // read-back in the simulator, the settled replay gave 62 of 64 (L3 47
    // of 64) on the stock 6.1 kernel; of the first 56 (CI's sample since
    // stop 41), 54 (seeds 6 and 26 differ; L3 53 of 64); fewer than
    // 50 means the model or the replay has drifted from the kernel.
    assert!(
        seeds.len() < TRACES as usize || l2 >= L2_AT_LEAST,
        "L2 identical for only {l2} of {} traces (at least {L2_AT_LEAST} wanted)",
        seeds.len()
    );
    assert!(reads > 20 * seeds.len(), "every trace's read-back was judged");
}
