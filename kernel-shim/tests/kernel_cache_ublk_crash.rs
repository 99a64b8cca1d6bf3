//! The stock kernel's crash states of cache campaign traces on controlled
//! disks (`dmsim_kernel_shim::cache_crash::judge_ublk_crash_states`): 14
//! seeds' traces replayed on dm-cache with its metadata, cache and origin
//! devices each a ublk disk the agent serves (one boot). After every
//! FLUSH, FUA or PREFLUSH write, and after every status query and reload
//! (commits that flush no data device), the agent records what a power
//! cut would keep of each disk. Each state, loaded by the model's cache
//! target as after a power cut, is read back block by block:
//!
//! - after a FLUSH, FUA or PREFLUSH write every read must be one the
//!   oracle allows (L1 at every such mark, every trace);
//! - the serialized simulator, run as the kernel is (no candidate fixes),
//!   must leave the same crash state (mappings, every block's content) at
//!   every mark of at least 10 traces;
//! - the stock kernel's commits without a data flush: at a status or
//!   reload mark of some trace, a durable mapping's cache block holds data
//!   never written to its origin block (`CacheFixes::flush_before_commit`,
//!   docs/findings.md), so a crash there reads it;
//! - a model with that candidate fix on (it flushes the data devices
//!   before every commit) must leave another crash state than the kernel
//!   at some mark, the report naming the trace, the mark and the first
//!   differing block or mapping.
//!
//! Needs `qemu-system-x86_64`, `linux-image-amd64` and, for the ublk
//! module, `linux-source-6.1` and `linux-headers-<release>`; without them
//! it prints SKIPPED, or fails under `CI=true`.

#[path = "common/thin_tools.rs"]
mod thin_tools;
use std::time::{Duration, Instant};

use thin_tools::skip_or_fail;

use dmsim_kernel_shim::cache_crash::{judge_ublk_crash_states, judge_with_crash_states};
use dmsim_kernel_shim::cache_replay::{replayable_config, ublk_plan, CachePlan};
use dmsim_kernel_shim::{KernelResult, KernelRun, KernelShim, ShimError};
use dmsim_model::cache::core::CacheFixes;
use dmsim_sim::cache_run;
use dmsim_sim::run::Checkers;

/// The first seed tried; the traces are the first `TRACES` seeds from here
/// whose traces a replay on controlled disks takes (no resizes).
const FIRST_SEED: u64 = 100;
const TRACES: usize = 14;
const OPS: usize = 120;

/// The first `TRACES` plannable seeds' plans, the model as the kernel is.
fn plans() -> Vec<(u64, CachePlan)> {
    (FIRST_SEED..FIRST_SEED + 10 * TRACES as u64)
        .filter_map(|seed| {
            let out = cache_run::run_config(&replayable_config(seed, OPS), &Checkers::default());
            assert!(out.violation.is_none(), "seed {seed}: {:?}", out.violation);
            let mut plan = ublk_plan(&out.trace).ok()?;
            plan.cfg.cache.options.fixes = CacheFixes::default();
            Some((seed, plan))
        })
        .take(TRACES)
        .collect()
}

/// The kernel's runs of `plans` (one boot). With `DMSIM_UBLK_CRASH_RUNS`
/// set to a directory (diagnosis only), runs saved there by an earlier
/// test are read back instead, and new runs are saved there.
fn kernel_runs(plans: &[(u64, CachePlan)]) -> Option<Vec<KernelRun>> {
    let saved = std::env::var_os("DMSIM_UBLK_CRASH_RUNS").map(std::path::PathBuf::from);
    let path = |dir: &std::path::Path, seed: u64, what: &str| dir.join(format!("{seed}.{what}"));
    if let Some(dir) = &saved {
        let loaded: Option<Vec<KernelRun>> = plans
            .iter()
            .map(|(seed, _)| {
                let text = std::fs::read_to_string(path(dir, *seed, "result")).ok()?;
                Some(KernelRun {
                    result: KernelResult::from_text(&text).ok()?,
                    metadata_image: std::fs::read(path(dir, *seed, "metadata")).ok()?,
                    thin_dump: Err("saved".into()),
                    mapped: Default::default(),
                    console: String::new(),
                    boot: Duration::ZERO,
                    wall: Duration::ZERO,
                    jobs_in_boot: plans.len(),
                    log: None,
                    cache_data: None,
                })
            })
            .collect();
        if loaded.is_some() {
            eprintln!("kernel runs read from {}", dir.display());
            return loaded;
        }
    }
    let shim = match KernelShim::prepare_with_ublk() {
        Ok(s) => s,
        Err(e @ ShimError::Missing(_)) => {
            skip_or_fail("cache crash states on ublk", &e.to_string());
            return None;
        }
        Err(e) => panic!("preparing the VM with ublk: {e}"),
    };
    let jobs: Vec<_> = plans.iter().map(|(_, p)| p.job.clone()).collect();
    let runs = shim.run_jobs(&jobs).unwrap_or_else(|e| panic!("the cache jobs on ublk: {e}"));
    eprintln!("VM wall {:?} for {} traces", runs[0].wall, plans.len());
    for ((seed, _), run) in plans.iter().zip(&runs) {
        assert_eq!(run.result.error, None, "seed {seed}: the agent failed; console:\n{}", run.console);
        let left = run.result.ublk.iter().find(|(n, _)| n == "left-devices").map(|(_, c)| *c);
        assert_eq!(left, Some(0), "seed {seed}: a ublk device outlived the job");
        if let Some(dir) = &saved {
            let _ = std::fs::create_dir_all(dir);
            std::fs::write(path(dir, *seed, "result"), run.result.to_text()).expect("save a run");
            std::fs::write(path(dir, *seed, "metadata"), &run.metadata_image).expect("save a run");
        }
    }
    Some(runs)
}

#[test]
fn the_kernels_crash_states_on_controlled_disks_match_the_models() {
    let t0 = Instant::now();
    let plans = plans();
    assert_eq!(plans.len(), TRACES);
    let Some(runs) = kernel_runs(&plans) else { return };
    let (mut marks, mut commit_marks, mut matching, mut full, mut reads) = (0, 0, 0, 0, 0);
    let (mut l2_diverged, mut failures, mut stock_commits) = (Vec::new(), Vec::new(), Vec::new());
    // Durable mappings whose cache block holds no data of their block.
    let mut unbacked = Vec::new();
    for ((seed, plan), run) in plans.iter().zip(&runs) {
        let (end, r) = judge_with_crash_states(plan, run).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(end.l1_violations.is_empty(), "seed {seed}: L1 {:?}", end.l1_violations);
        eprintln!(
            "seed {seed}: {} marks ({} commits), {} matching, end L2 {}, first difference {:?}, \
             commit marks reading unwritten data {}",
            r.marks,
            r.commit_marks,
            r.matching,
            if end.l2_identical { "same" } else { "differs" },
            r.first_difference,
            r.commit_l1_violations.len()
        );
        marks += r.marks;
        commit_marks += r.commit_marks;
        matching += r.matching;
        reads += r.reads;
        full += usize::from(r.matching == r.marks);
        if !end.l2_identical {
            l2_diverged.push(*seed);
        }
        failures.extend(r.l1_violations.iter().map(|v| format!("seed {seed}: {v}")));
        stock_commits.extend(r.commit_l1_violations.iter().map(|v| format!("seed {seed}: {v}")));
        unbacked.extend(r.unbacked.iter().map(|u| format!("seed {seed}: {u}")));
    }
    eprintln!(
        "{TRACES} traces on controlled disks: {marks} marks ({commit_marks} status/reload commits), {reads} blocks \
         read back; {matching} marks match the model's crash state, {full} traces at every mark; end state \
         differs at L2 in {l2_diverged:?}; {} reads after a commit without a data flush read unwritten data",
        stock_commits.len()
    );
    assert!(
        failures.is_empty(),
        "crash states after a FLUSH or FUA the oracle refuses:\n{}",
        failures.join("\n")
    );
    assert!(full >= 10, "only {full} traces match the model's crash state at every mark");
    // The stock kernel commits without flushing its data devices: some
    // status or reload made a mapping durable whose data was not.
    let first =
        stock_commits.first().expect("no commit without a data flush left a mapping without its data");
    eprintln!("stock kernel, a commit without a data flush: {first}");
    let seed_op =
        format!("{}:", first.split(" (").next().unwrap_or_default().replace(": a crash after", ":"));
    let mapping = unbacked.iter().find(|u| u.starts_with(&seed_op));
    eprintln!("its durable mapping without durable data: {mapping:?}");
    assert!(mapping.is_some(), "{first}: no durable mapping without its data listed for {seed_op:?}");

    // A model with the candidate fix (data flushed before every commit)
    // leaves other crash states than the stock kernel.
    let mut detected = None;
    for ((seed, plan), run) in plans.iter().zip(&runs) {
        let mut fixed = plan.clone();
        fixed.cfg.cache.options.fixes.flush_before_commit = true;
        let r = judge_ublk_crash_states(&fixed, run).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        if let Some((op, what)) = r.first_difference {
            detected = Some((*seed, op, what));
            break;
        }
    }
    let (seed, op, what) =
        detected.expect("a model flushing data before every commit matches the stock kernel");
    eprintln!("flush_before_commit on: seed {seed}, first differing mark op {op}: {what}");
    assert!(what.contains(" block "), "the report names the block: {what}");
    eprintln!("in all {:?}", t0.elapsed());
}
