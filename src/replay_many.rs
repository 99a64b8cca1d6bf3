//! `dmsim replay --on kernel A.trace B.trace …`: many thin traces replayed
//! in one boot of the kernel shim's VM (up to
//! [`dmsim_kernel_shim::vm::JOBS_PER_BOOT`] a boot), each judged against
//! the serialized simulator as a single replay judges it
//! ([`dmsim_kernel_shim::thin_replay::judge`]); a line per trace and a
//! summary, or JSON.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use dmsim_kernel_shim::equivalence::{simulate_serialized_crashing, simulate_serialized_full};
use dmsim_kernel_shim::thin_replay::{judge, Verdict};
use dmsim_kernel_shim::{Job, KernelShim};
use dmsim_traces::{file as trace_file, Trace};

use crate::exit;
use crate::replay_cmd::ReplayArgs;

/// Traces of a boot running at a time unless `--concurrent` says.
pub const DEFAULT_CONCURRENT: u16 = 8;

/// One trace's outcome.
struct Outcome {
    path: PathBuf,
    /// The verdict's name (`equal`, `explained`, `unexplained`) or
    /// `failed`.
    word: &'static str,
    /// The first difference, the class, or why it failed.
    detail: Option<String>,
    /// The thin_dumps compared (`identical`, `DIFFERS`, or why not).
    l2: String,
    /// When it ran again alone after diverging side by side with other
    /// traces: what that run said (the outcome is the run alone's).
    side_by_side: Option<String>,
}

/// Runs the command (see the module's docs). Exit 0 when every trace is
/// equal or differs in a named class; 1 when one differs unexplained or
/// its run failed; 2 when the options do not fit, a trace cannot be read
/// or run, or the VM cannot be used.
pub fn run(args: &ReplayArgs) -> ExitCode {
    let usage = |why: &str| {
        eprintln!("dmsim replay: {why}");
        ExitCode::from(exit::UNUSABLE)
    };
    if args.on != "kernel" {
        return usage("more than one trace is for `--on kernel` (they share one boot)");
    }
    if args.race.is_some() || args.kernel_answer.is_some() || args.console.is_some() || args.depth > 1 {
        return usage("more than one trace: no --race, --kernel-answer, --console or --depth (one trace at a time has them)");
    }
    let ublk = match args.disks.as_str() {
        "virtio" => false,
        "ublk" => true,
        other => return usage(&format!("unknown --disks {other:?}; use `virtio` or `ublk`")),
    };
    let paths: Vec<&Path> =
        std::iter::once(args.trace.as_path()).chain(args.more.iter().map(PathBuf::as_path)).collect();
    // Every trace is read, and refused before the VM boots if the
    // serialized simulator cannot run it.
    let mut traces: Vec<Trace> = Vec::with_capacity(paths.len());
    for path in &paths {
        let trace = match trace_file::read(path) {
            Ok((t, _)) => t,
            Err(e) => return usage(&e.to_string()),
        };
        if dmsim_sim::cache_run::is_cache_header(&trace.header) {
            return usage(&format!(
                "{}: a cache trace; cache traces replay on the kernel one at a time",
                path.display()
            ));
        }
        let simulated =
            if ublk { simulate_serialized_crashing(&trace) } else { simulate_serialized_full(&trace) };
        if let Err(e) = simulated {
            return usage(&format!("{}: {e}", path.display()));
        }
        traces.push(trace);
    }
    let shim = match if ublk { KernelShim::prepare_with_ublk() } else { KernelShim::prepare() } {
        Ok(s) => s,
        Err(e) => return usage(&format!("the VM cannot be prepared: {e}")),
    };
    let mut boots = traces.len().div_ceil(dmsim_kernel_shim::vm::JOBS_PER_BOOT);
    let concurrent = usize::from(args.concurrent.unwrap_or(DEFAULT_CONCURRENT)).min(traces.len());
    eprintln!(
        "booting the kernel in qemu (software emulation) for {} traces ({boots} boot{}, up to {concurrent} at a time), \
         the pool on {} disks…",
        traces.len(),
        if boots == 1 { "" } else { "s" },
        if ublk { "ublk" } else { "virtio" }
    );
    let jobs: Vec<Job> =
        traces.iter().map(|t| if ublk { Job::Ublk(t.clone()) } else { Job::Replay(t.clone()) }).collect();
    let runs = match shim.run_jobs_concurrent(&jobs, concurrent) {
        Ok(r) if r.len() == jobs.len() => r,
        Ok(r) => return usage(&format!("the VM returned {} results for {} traces", r.len(), jobs.len())),
        Err(e) => return usage(&format!("the VM: {e}")),
    };
    let judge_one = |path: &Path, trace: &Trace, run: &dmsim_kernel_shim::KernelRun| -> Outcome {
        let failed = |why: String| Outcome {
            path: path.to_path_buf(),
            word: "failed",
            detail: Some(why),
            l2: "unknown".into(),
            side_by_side: None,
        };
        if let Some(e) = &run.result.error {
            return failed(format!("the agent failed: {e}"));
        }
        match judge(trace, ublk, run) {
            Ok(r) => Outcome {
                path: path.to_path_buf(),
                word: r.verdict().name(),
                detail: match (r.first_difference(), r.class()) {
                    (Some(d), Some(k)) => Some(format!("{d}; class {}", k.name())),
                    (Some(d), None) => Some(d),
                    _ => None,
                },
                l2: match &r.l2 {
                    Ok(l) => l.label().to_string(),
                    Err(e) => format!("error: {e}"),
                },
                side_by_side: None,
            },
            Err(e) => failed(e.to_string()),
        }
    };
    let mut outcomes: Vec<Outcome> = paths
        .iter()
        .zip(&traces)
        .zip(&runs)
        .map(|((path, trace), run)| judge_one(path, trace, run))
        .collect();
    // A trace that diverged unexplained (or failed) side by side with
    // others runs again alone, in one more boot: the others' load moves
    // the kernel's timers among its ops. Its verdict is that run's.
    let again: Vec<usize> = (0..outcomes.len())
        .filter(|&i| concurrent > 1 && matches!(outcomes[i].word, "unexplained" | "failed"))
        .collect();
    if !again.is_empty() {
        eprintln!(
            "{} trace(s) diverged side by side with others: running them again, one at a time…",
            again.len()
        );
        let alone_jobs: Vec<Job> = again.iter().map(|&i| jobs[i].clone()).collect();
        boots += alone_jobs.len().div_ceil(dmsim_kernel_shim::vm::JOBS_PER_BOOT);
        match shim.run_jobs_concurrent(&alone_jobs, 1) {
            Ok(alone) if alone.len() == again.len() => {
                for (&i, run) in again.iter().zip(&alone) {
                    let then = &outcomes[i];
                    let was = format!(
                        "{}{}",
                        then.word,
                        then.detail.as_deref().map(|d| format!("; first: {d}")).unwrap_or_default()
                    );
                    outcomes[i] = Outcome { side_by_side: Some(was), ..judge_one(paths[i], &traces[i], run) };
                }
            }
            // The side-by-side verdicts stand (they count as divergences).
            Ok(r) => eprintln!(
                "the run alone returned {} results for {} traces: the side-by-side verdicts stand",
                r.len(),
                again.len()
            ),
            Err(e) => eprintln!("the run alone failed ({e}): the side-by-side verdicts stand"),
        }
    }
    let count = |w: &str| outcomes.iter().filter(|o| o.word == w).count();
    let (equal, explained, unexplained, failed) = (
        count(Verdict::Equal.name()),
        count(Verdict::Explained.name()),
        count(Verdict::Unexplained.name()),
        count("failed"),
    );
    if args.json {
        let json = serde_json::json!({
            "on": "kernel",
            "disks": if ublk { "ublk" } else { "virtio" },
            "boots": boots,
            "traces": outcomes.iter().map(|o| serde_json::json!({
                "trace": o.path.display().to_string(),
                "verdict": o.word,
                "first_difference": o.detail,
                "l2": o.l2,
                "side_by_side": o.side_by_side,
            })).collect::<Vec<_>>(),
            "equal": equal,
            "explained": explained,
            "unexplained": unexplained,
            "failed": failed,
        });
        println!("{}", serde_json::to_string_pretty(&json).unwrap_or_default());
    } else {
        for o in &outcomes {
            let detail = o.detail.as_deref().map(|d| format!("; first: {d}")).unwrap_or_default();
            let then = o
                .side_by_side
                .as_deref()
                .map(|t| format!("; run alone after it ran side by side with others, where it was: {t}"))
                .unwrap_or_default();
            println!("{}: {}, L2 {}{detail}{then}", o.path.display(), o.word, o.l2);
        }
        println!(
            "{} traces in {boots} boot{}: {equal} equal, {explained} explained, {unexplained} unexplained, {failed} failed",
            outcomes.len(),
            if boots == 1 { "" } else { "s" }
        );
    }
    if unexplained + failed > 0 {
        ExitCode::from(exit::PROBLEMS)
    } else {
        ExitCode::from(exit::CLEAN)
    }
}
