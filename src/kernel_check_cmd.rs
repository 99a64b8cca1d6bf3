//! `dmsim check --on kernel`: the thin campaign's traces on the real
//! kernel (`dmsim_kernel_shim::thin_campaign`), each seed's trace replayed
//! on dm-thin with the pool on controlled (ublk) disks and judged against
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
    if args.time.is_some() {
        eprintln!("dmsim check --on kernel: --time is not supported; give --seeds A..B");
        return ExitCode::from(exit::UNUSABLE);
    }
    if !args.campaign.thin() {
        eprintln!(
            "dmsim check --on kernel: runs the thin campaign's traces; a cache trace replays on the kernel \
             with `dmsim replay --on kernel` (docs/cache.md)"
        );
        return ExitCode::from(exit::UNUSABLE);
    }
    if args.model.locking != dmsim_model::thin::pool::LockingDesign::default() {
        eprintln!(
            "dmsim check --on kernel: the stock kernel is 6.1, its locking design kernel-6.1; --locking {} \
             is a patch the kernel does not run",
            args.model.locking.name()
        );
        return ExitCode::from(exit::UNUSABLE);
    }
    let seeds = args.seeds.clone().unwrap_or(0..64);
    let settings = args.model.settings();
    let shim = match KernelShim::prepare_with_ublk() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dmsim check --on kernel: the VM cannot be prepared: {e}");
            return ExitCode::from(exit::UNUSABLE);
        }
    };
    let started = Instant::now();
    let total = seeds.end - seeds.start;
    eprintln!(
        "dmsim check --on kernel: seeds {}..{} ({total}), {} ops each, {} a boot, the pool on ublk disks \
         (software emulation: about a minute a trace)",
        seeds.start, seeds.end, args.ops, args.per_boot
    );
    let mut done = 0u64;
    let keep_all = args.answers.is_some();
    let outcomes =
        thin_campaign::run(&shim, seeds.clone(), args.ops, &settings, args.per_boot, keep_all, |o| {
            done += 1;
            eprintln!("[{done}/{total}] {}", o.line());
        });
    // The traces of the seeds that are not equal, for `dmsim replay --on
    // kernel --disks ublk`.
    let mut written = Vec::new();
    for o in outcomes.iter().filter(|o| o.verdict() != Some(Verdict::Equal)) {
        match save_seed(&args.failures, o, args.ops, &settings) {
            Ok(path) => written.push((o.seed, path)),
            Err(e) => eprintln!("dmsim check --on kernel: seed {}: cannot write its trace: {e}", o.seed),
        }
    }
    if let Some(dir) = &args.answers {
        let saved = outcomes
            .iter()
            .filter(|o| o.kernel_answer.is_some())
            .filter(|o| match save_seed(dir, o, args.ops, &settings) {
                Ok(_) => true,
                Err(e) => {
                    eprintln!("dmsim check --on kernel: seed {}: cannot keep its answer: {e}", o.seed);
                    false
                }
            })
            .count();
        eprintln!(
            "dmsim check --on kernel: {saved} seeds' traces and kernel answers kept in {}",
            dir.display()
        );
    }
    let summary = Summary::of(&outcomes);
    if args.json {
        let mut json = serde_json::json!({
            "on": "kernel",
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
        print_summary(&summary, &outcomes, &written);
    }
    if args.timings {
        eprintln!("wall time {:.0} s", started.elapsed().as_secs_f64());
    }
    if summary.unexplained > 0 || summary.failed > 0 {
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
    Ok(path)
}

fn print_summary(s: &Summary, outcomes: &[SeedOutcome], written: &[(u64, std::path::PathBuf)]) {
    println!(
        "dmsim check --on kernel: {} seeds: {} L1-equal at the end and at every crash ({:.1}%; target {:.0}%: {}), \
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
            "seed {seed}: trace written to {} (dmsim replay --on kernel --disks ublk …)",
            path.display()
        );
    }
}

fn summary_json(s: &Summary) -> serde_json::Value {
    serde_json::json!({
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
    })
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
    v
}
