//! `dmsim check --on kernel` (and `--on engine`): the thin campaign's
//! traces on the real kernel (`dmsim_kernel_shim::thin_campaign`), each
//! seed's trace replayed on dm-thin — or on the userland engine, the
//! model's pool served over ublk in the same VM — with the pool on
//! controlled (ublk) disks and judged against
//! the serialized simulator at the end and at every crash; a line per
//! seed as it is judged, then a summary.

use std::process::ExitCode;
use std::time::Instant;

use dmsim_kernel_shim::thin_campaign::{self, campaign_trace, SeedOutcome, SeedResult, Summary};
use dmsim_kernel_shim::thin_replay::Verdict;
use dmsim_kernel_shim::KernelShim;
use dmsim_traces::file::{self as trace_file, Encoding};

use crate::check_cmd::CheckArgs;
use crate::exit;

/// The share of seeds that should be L1-equal everywhere (issue 17's bar).
pub const EQUAL_TARGET_PERCENT: f64 = 95.0;

/// Runs `dmsim check --on kernel`. Exit 1 when a divergence has no named
/// class or a seed failed to run; 2 when the VM cannot be prepared.
pub fn run(args: &CheckArgs) -> ExitCode {
    let on = args.on.as_str();
    let serialized = dmsim_kernel_shim::protocol::EngineJob::serialized();
    let target = match on {
        "engine" => thin_campaign::Target::Engine(serialized),
        // The engine commits where the kernel did (issue 18: the pair's
        // metadata identical).
        "all" => thin_campaign::Target::All(dmsim_kernel_shim::protocol::EngineJob::following_kernel()),
        _ => thin_campaign::Target::Kernel,
    };
    if args.time.is_some() {
        eprintln!("dmsim check --on {on}: --time is not supported; give --seeds A..B");
        return ExitCode::from(exit::UNUSABLE);
    }
    if !args.campaign.thin() {
        eprintln!(
            "dmsim check --on {on}: runs the thin campaign's traces; a cache trace replays on the kernel \
             with `dmsim replay --on kernel` (docs/cache.md)"
        );
        return ExitCode::from(exit::UNUSABLE);
    }
    if args.model.locking != dmsim_model::thin::pool::LockingDesign::default() {
        eprintln!(
            "dmsim check --on {on}: the stock kernel is 6.1, its locking design kernel-6.1; --locking {} \
             is a patch the kernel does not run",
            args.model.locking.name()
        );
        return ExitCode::from(exit::UNUSABLE);
    }
    let seeds = args.seeds.clone().unwrap_or(0..64);
    let settings = args.model.settings();
    let mut shim = match KernelShim::prepare_with_ublk() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dmsim check --on {on}: the VM cannot be prepared: {e}");
            return ExitCode::from(exit::UNUSABLE);
        }
    };
    shim.set_concurrent(args.concurrent);
    let started = Instant::now();
    let total = seeds.end - seeds.start;
    if args.depth > 1 {
        return run_concurrent(args, &shim, seeds, &settings, started);
    }
    eprintln!(
        "dmsim check --on {on}: seeds {}..{} ({total}), {} ops each, {} a boot, {} at a time, the pool on \
         ublk disks (software emulation)",
        seeds.start, seeds.end, args.ops, args.per_boot, args.concurrent
    );
    let mut done = 0u64;
    let keep_all = args.answers.is_some();
    let outcomes =
        thin_campaign::run(&shim, seeds.clone(), args.ops, &settings, args.per_boot, keep_all, target, |o| {
            done += 1;
            eprintln!("[{done}/{total}] {}", o.line());
        });
    // The traces of the seeds that are not equal, for `dmsim replay --on
    // kernel --disks ublk`.
    let mut written = Vec::new();
    for o in outcomes.iter().filter(|o| o.verdict() != Some(Verdict::Equal)) {
        match save_seed(&args.failures, o, args.ops, &settings) {
            Ok(path) => written.push((o.seed, path)),
            Err(e) => eprintln!("dmsim check --on {on}: seed {}: cannot write its trace: {e}", o.seed),
        }
    }
    if let Some(dir) = &args.answers {
        let saved = outcomes
            .iter()
            .filter(|o| o.kernel_answer.is_some())
            .filter(|o| match save_seed(dir, o, args.ops, &settings) {
                Ok(_) => true,
                Err(e) => {
                    eprintln!("dmsim check --on {on}: seed {}: cannot keep its answer: {e}", o.seed);
                    false
                }
            })
            .count();
        eprintln!(
            "dmsim check --on {on}: {saved} seeds' traces and kernel answers kept in {}",
            dir.display()
        );
    }
    let summary = Summary::of(&outcomes);
    if args.json {
        let mut json = serde_json::json!({
            "on": on,
            "seeds": [seeds.start, seeds.end],
            "ops": args.ops,
            "summary": summary_json(&summary),
            "outcomes": outcomes.iter().map(outcome_json).collect::<Vec<_>>(),
            "traces": written.iter().map(|(s, p)| serde_json::json!({"seed": s, "path": p.display().to_string()})).collect::<Vec<_>>(),
        });
        if args.timings {
            json["timings"] = serde_json::json!({ "wall_seconds": started.elapsed().as_secs_f64() });
        }
        println!("{json}");
    } else {
        print_summary(on, &summary, &outcomes, &written);
    }
    if args.timings {
        eprintln!("wall time {:.0} s", started.elapsed().as_secs_f64());
    }
    // With --on all, the engine's run counts too.
    let engine_bad = outcomes.iter().filter_map(|o| o.engine.as_ref()).any(|e| match &e.result {
        SeedResult::Judged(r) => r.verdict() == Verdict::Unexplained,
        SeedResult::Failed(_) => true,
        SeedResult::Refused(_) => false,
    });
    if summary.unexplained > 0 || summary.failed > 0 || engine_bad {
        ExitCode::from(exit::PROBLEMS)
    } else {
        ExitCode::SUCCESS
    }
}

/// Writes seed `o`'s trace into `dir` as kernel-seed-N.trace, with the
/// kernel's answer (kernel-seed-N.kernel: every op's outcome, the status
/// lines, the faults that fired, where it committed) and final metadata
/// (kernel-seed-N.metadata) beside it when the outcome carries them: with
/// both, `dmsim replay --on kernel --kernel-answer` judges the seed again
/// without a boot. Returns the trace's path.
fn save_seed(
    dir: &std::path::Path,
    o: &SeedOutcome,
    ops: usize,
    settings: &dmsim_sim::run::CampaignSettings,
) -> Result<std::path::PathBuf, String> {
    let path = dir.join(format!("kernel-seed-{}.trace", o.seed));
    let trace = campaign_trace(o.seed, ops, settings);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    trace_file::write(&path, &trace, Encoding::Text)?;
    if let Some(text) = &o.kernel_answer {
        let answer = path.with_extension("kernel");
        std::fs::write(&answer, text).map_err(|e| format!("{}: {e}", answer.display()))?;
    }
    if let Some(image) = &o.kernel_metadata {
        let file = path.with_extension("metadata");
        std::fs::write(&file, image).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    // With --on all: the engine's answer beside it, as engine-seed-N.kernel
    // and .metadata (the trace is the kernel's).
    if let Some((text, image)) = o.engine.as_ref().and_then(|e| e.answer.as_ref()) {
        let answer = dir.join(format!("engine-seed-{}.kernel", o.seed));
        std::fs::write(&answer, text).map_err(|e| format!("{}: {e}", answer.display()))?;
        let file = answer.with_extension("metadata");
        std::fs::write(&file, image).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    Ok(path)
}

fn print_summary(on: &str, s: &Summary, outcomes: &[SeedOutcome], written: &[(u64, std::path::PathBuf)]) {
    if let Some(t) = &s.three_way {
        println!(
            "three ways, {} seeds run on both: the kernel's metadata L2-identical to the simulator's {}; \
             the engine equal {}, L1-equal {}, L2-identical {}, crash states {} of {} L1-equal; \
             kernel–engine L1-equal {}, L2-identical {}, L3-identical {}; of the {} seeds where both \
             committed after the same ops, kernel–engine L1-equal {}, L2-identical {}, L3-identical {}",
            t.seeds,
            t.kernel_l2_identical,
            t.engine_equal,
            t.engine_l1_equal,
            t.engine_l2_identical,
            t.engine_crash_states_equal,
            t.engine_crash_states,
            t.pair_l1_equal,
            t.pair_l2_identical,
            t.pair_l3_identical,
            t.same_commits,
            t.same_commits_l1_equal,
            t.same_commits_l2_identical,
            t.same_commits_l3_identical
        );
    }
    println!(
        "dmsim check --on {on}: {} seeds: {} L1-equal at the end and at every crash ({:.1}%; target {:.0}%: {}), \
         {} equal at every op too, {} diverge in a named class, {} diverge unexplained, {} refused, {} failed",
        s.seeds,
        s.l1_equal,
        s.l1_equal_percent(),
        EQUAL_TARGET_PERCENT,
        if s.l1_equal_percent() >= EQUAL_TARGET_PERCENT { "met" } else { "not met" },
        s.equal,
        s.explained,
        s.unexplained,
        s.refused,
        s.failed
    );
    println!(
        "crash states: {} of {} L1-equal ({} chosen in the kernel's order of the unflushed data writes)",
        s.crash_states_equal, s.crash_states, s.crash_states_reordered
    );
    for (class, n) in &s.classes {
        println!("class {class}: {n} seeds");
    }
    for o in outcomes.iter().filter(|o| o.verdict() != Some(Verdict::Equal)) {
        println!("  {}", o.line());
    }
    for (seed, path) in written {
        println!(
            "seed {seed}: trace written to {} (dmsim replay --on {} …)",
            path.display(),
            if on == "engine" { "engine" } else { "kernel --disks ublk" }
        );
    }
}

fn summary_json(s: &Summary) -> serde_json::Value {
    let mut v = serde_json::json!({
        "seeds": s.seeds,
        "equal": s.equal,
        "equal_percent": s.equal_percent(),
        "l1_equal": s.l1_equal,
        "l1_equal_percent": s.l1_equal_percent(),
        "explained": s.explained,
        "unexplained": s.unexplained,
        "refused": s.refused,
        "failed": s.failed,
        "crash_states": s.crash_states,
        "crash_states_equal": s.crash_states_equal,
        "crash_states_reordered": s.crash_states_reordered,
        "classes": s.classes,
    });
    if let Some(t) = &s.three_way {
        v["three_way"] = serde_json::json!({
            "seeds": t.seeds,
            "kernel_l2_identical": t.kernel_l2_identical,
            "engine_equal": t.engine_equal,
            "engine_l1_equal": t.engine_l1_equal,
            "engine_l2_identical": t.engine_l2_identical,
            "engine_crash_states": t.engine_crash_states,
            "engine_crash_states_equal": t.engine_crash_states_equal,
            "kernel_engine_l1_equal": t.pair_l1_equal,
            "kernel_engine_l2_identical": t.pair_l2_identical,
            "kernel_engine_l3_identical": t.pair_l3_identical,
            "same_commits": t.same_commits,
            "same_commits_l1_equal": t.same_commits_l1_equal,
            "same_commits_l2_identical": t.same_commits_l2_identical,
            "same_commits_l3_identical": t.same_commits_l3_identical,
        });
    }
    v
}

fn outcome_json(o: &SeedOutcome) -> serde_json::Value {
    let mut v = serde_json::json!({
        "seed": o.seed,
        "workload": o.workload,
        "ops": o.ops,
        "crash_ops": o.crash_ops,
        "faulted": o.faulted,
        "outcome": o.word(),
    });
    if let Some(then) = &o.side_by_side {
        // Run alone after a side-by-side run said this.
        v["side_by_side"] = then.as_str().into();
    }
    match &o.result {
        SeedResult::Judged(r) => {
            v["l1_equal_at_end"] = r.differences.is_empty().into();
            v["crashes"] = r.crashes.len().into();
            v["crashes_l1_equal"] = r.crashes.iter().filter(|c| c.differences.is_empty()).count().into();
            v["op_differences"] = r.op_differences.len().into();
            v["first_difference"] = r.first_difference().into();
            v["class"] = r.class().map(|k| k.name()).into();
            v["l3_differing_blocks"] = r.l3.differing.into();
            v["simulator_crash_point_finding"] = r.crash_point_finding.clone().into();
            v["simulator_end_check_finding"] = r.end_check_finding.clone().into();
            v["kernel_end_check"] = r.kernel_end_check.clone().into();
            v["first_commit_difference"] = r.first_commit_difference.clone().into();
        }
        SeedResult::Refused(why) | SeedResult::Failed(why) => v["why"] = why.clone().into(),
    }
    if let Some(e) = &o.engine {
        v["engine"] = serde_json::json!({ "line": e.line() });
        if let SeedResult::Judged(r) = &e.result {
            v["engine"]["verdict"] = r.verdict().name().into();
            v["engine"]["l2"] = r.l2.as_ref().map_or("unknown", |l| l.label()).into();
        }
        if let Some(p) = &e.pair {
            v["engine"]["kernel_engine"] = serde_json::json!({
                "same_commits": p.same_commits,
                "l1_equal": p.l1.is_empty(),
                "l2": p.l2.as_ref().map_or("unknown", |l| l.label()),
                "l3_differing_blocks": p.l3.differing,
            });
        }
    }
    v
}

/// `dmsim check --on engine --depth N` (N > 1): every seed's trace with up
/// to N requests in flight on the engine, judged by the oracle.
fn run_concurrent(
    args: &CheckArgs,
    shim: &KernelShim,
    seeds: std::ops::Range<u64>,
    settings: &dmsim_sim::run::CampaignSettings,
    started: Instant,
) -> ExitCode {
    let total = seeds.end - seeds.start;
    eprintln!(
        "dmsim check --on engine --depth {}: seeds {}..{} ({total}), {} ops each, {} a boot; traces that grow \
         the metadata device are left out",
        args.depth, seeds.start, seeds.end, args.ops, args.per_boot
    );
    let mut done = 0u64;
    let outcomes = thin_campaign::run_concurrent(
        shim,
        seeds.clone(),
        args.ops,
        settings,
        args.per_boot,
        args.depth,
        |o| {
            done += 1;
            eprintln!("[{done}] {}", o.line());
        },
    );
    let judged: Vec<_> = outcomes.iter().filter_map(|o| o.result.as_ref().ok()).collect();
    let failed = outcomes.len() - judged.len();
    let violating = judged.iter().filter(|r| !r.violations.is_empty()).count();
    let requests: u64 = judged.iter().map(|r| r.requests).sum();
    let overtaken: u64 = judged.iter().map(|r| r.overtaken).sum();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "on": "engine",
                "depth": args.depth,
                "seeds": [seeds.start, seeds.end],
                "ops": args.ops,
                "traces": outcomes.len(),
                "failed": failed,
                "with_violations": violating,
                "requests": requests,
                "overtaken": overtaken,
                "outcomes": outcomes.iter().map(|o| serde_json::json!({
                    "seed": o.seed,
                    "workload": o.workload,
                    "line": o.line(),
                    "violations": o.result.as_ref().map(|r| r.violations.len()).ok(),
                })).collect::<Vec<_>>(),
            })
        );
    } else {
        println!(
            "dmsim check --on engine --depth {}: {} traces, {} with oracle violations, {} failed; {requests} \
             requests, {overtaken} completed before one sent earlier",
            args.depth,
            outcomes.len(),
            violating,
            failed
        );
        for o in outcomes.iter().filter(|o| o.result.as_ref().map_or(true, |r| !r.violations.is_empty())) {
            println!("  {}", o.line());
        }
    }
    if args.timings {
        eprintln!("wall time {:.0} s", started.elapsed().as_secs_f64());
    }
    if violating > 0 || failed > 0 {
        ExitCode::from(exit::PROBLEMS)
    } else {
        ExitCode::SUCCESS
    }
}
