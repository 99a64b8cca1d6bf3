//! `dmsim replay`: runs a recorded trace's ops again and compares. Thin
//! and cache traces alike (told apart by the header's workload).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use dmsim_sim::cache_run::{self, is_cache_header};
use dmsim_sim::run::{replay, violation_signature, Checkers};
use dmsim_sim::thin::ThinFailure;
use dmsim_traces::file::{self as trace_file, Encoding};
use dmsim_traces::Trace;

use crate::check_cmd::when;
use crate::exit;
use crate::run_cmd::{print_cache_outcome, print_outcome};

/// Options of `dmsim replay`.
#[derive(Args, Debug)]
#[command(after_help = crate::exit_help!("\
Status 1: a violation occurs on replay (with --strict also a replay that is \
not byte-identical to the recording). With --on kernel: 1 if the kernel and \
the simulator end in different states (L1), or, on ublk disks, an op's \
outcome or read differs (with faults armed, also the pool's mode after it); 2 \
also when the VM cannot be used; L2 (thin_dump) and L3 (metadata blocks) are reported, not judged. \
A cache trace (workload cache-…) with --on kernel: its requests on the \
kernel's dm-cache, 1 if a kernel read is one the oracle does not allow \
(L1), 2 for a trace with crashes or faults (a serialized replay cannot \
place them)."))]
pub struct ReplayArgs {
    /// The trace file (text or binary; told apart by the binary magic).
    pub trace: PathBuf,
    /// More thin traces, with `--on kernel`: all of them replayed in one
    /// boot (up to 64 a boot), each judged as if alone; a line per trace
    /// and a summary (docs/kernel-shim.md, "Many traces in one boot").
    #[arg(value_name = "MORE")]
    pub more: Vec<PathBuf>,
    /// Where to replay: `sim` (the simulator), or `kernel` (Debian's kernel
    /// in qemu, compared with the simulator at L1: for a thin trace the same
    /// stamps in every block of every device and the same blocks mapped,
    /// for a cache trace every read one the oracle allows).
    #[arg(long, default_value = "sim")]
    pub on: String,
    /// With `--on kernel`: print the comparison as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also fail (exit 1) when the replay is not byte-identical to the
    /// recording.
    #[arg(long)]
    pub strict: bool,
    /// With `--on kernel`: also report how long the VM took (on stderr,
    /// and as `timings` in the JSON); without it the output is the same
    /// for the same trace and code.
    #[arg(long)]
    pub timings: bool,
    /// With `--on kernel`: the pool's (or the cache's) disks, `virtio`
    /// (dm-linear slices of the VM's disks) or `ublk` (controlled disks the
    /// agent serves from guest RAM through ublk, with a volatile cache and
    /// FUA, which cut power at crash ops and fail requests as the trace's
    /// `fault` and `aim-fault` ops arm them; builds `ublk_drv.ko` first,
    /// docs/kernel-shim.md). A cache trace on `ublk` also has its crash
    /// states judged at every FLUSH, FUA, status and reload (docs/cache.md).
    #[arg(long, default_value = "virtio")]
    pub disks: String,
    /// With `--on kernel`: also write what the VM said to this file: its
    /// serial console (the kernel's messages of warning level and above,
    /// such as dm-thin's errors, and the agent's log), then the kernel's
    /// answer to every op and (on ublk disks) the pool's status line
    /// after each op. For finding out why the kernel answered as it
    /// did; the comparison is unchanged. With `DMSIM_KERNEL_LOGLEVEL=7` in
    /// the environment the console also has the kernel's informational
    /// messages (dm-thin's pool mode changes) and a line before each op.
    #[arg(long, value_name = "FILE")]
    pub console: Option<PathBuf>,
    /// With `--on kernel`: run the trace on controlled disks as a race —
    /// the ops as these comma-separated steps say, some in the background,
    /// a disk's requests held at a gate and served one by one
    /// (`0,1,2,hold-reads,bg3,held=1,5,7,release,join`; the steps are in
    /// docs/kernel-shim.md, "Races on the kernel"). A thin trace is
    /// compared with the simulator running it as written, its `worker` and
    /// `complete` ops included (L1); a cache trace (gate steps name its
    /// `cache:`, `origin:` or `metadata:` disk) has every kernel read
    /// judged by the oracle fed the race as it ran (L1), and its clean
    /// blocks' two copies compared at rest (docs/cache.md).
    #[arg(long, value_name = "STEPS")]
    pub race: Option<String>,
    /// With `--on kernel --disks ublk`, a thin trace: judge the kernel's
    /// answer saved by `dmsim check --on kernel` (kernel-seed-N.kernel,
    /// with kernel-seed-N.metadata beside it: the final metadata image)
    /// instead of booting the VM — the same judgement, in seconds, after
    /// a change to the model or the judge.
    #[arg(long, value_name = "FILE")]
    pub kernel_answer: Option<PathBuf>,
    /// With `--on engine`: requests in flight at once (1, the default:
    /// one at a time, judged against the serialized simulator). Above 1
    /// the trace's reads, writes, discards and flushes go with up to this
    /// many in flight, completing in the order the engine completes them,
    /// every one judged by the oracle as it completes and every block read
    /// back at the end (crash, fault and growth ops are skipped); exit 1
    /// on an oracle violation.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub depth: u16,
    /// With more than one trace `--on kernel`: how many of a boot's traces
    /// run at a time, each on its own pool and disks (their `tick`s are
    /// real time in the guest, so their waits overlap). The guest gets
    /// 256 MiB more memory for each past the first, and starts a trace
    /// only while the disks held in memory by those running leave room.
    /// 1 runs them one after the other. Default: 8.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrent: Option<u16>,
}

/// Writes `run`'s console, op answers and per-op status lines to `path`
/// (`--console`); an error says which file could not be written.
fn write_console(path: &std::path::Path, run: &dmsim_kernel_shim::KernelRun) -> Result<(), String> {
    let mut out = String::new();
    out.push_str("== the VM's serial console\n");
    out.push_str(&run.console);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str("== the kernel's answer to each op\n");
    for o in &run.result.ops {
        out.push_str(&format!("op {}: {}", o.index, o.outcome));
        if let Some(r) = &o.read {
            out.push_str(&format!(" read {r}"));
        }
        out.push('\n');
    }
    if !run.result.op_status.is_empty() {
        out.push_str("== the pool's status after each op (without a commit)\n");
        for (i, line) in &run.result.op_status {
            out.push_str(&format!("op {i}: {line}\n"));
        }
    }
    std::fs::write(path, out).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Replays a trace; see [`ReplayArgs`] for the exit status.
pub fn run(args: ReplayArgs) -> ExitCode {
    if !args.more.is_empty() {
        return crate::replay_many::run(&args);
    }
    if args.concurrent.is_some() {
        eprintln!("dmsim replay: --concurrent is for more than one trace `--on kernel` (they share a boot)");
        return ExitCode::from(exit::UNUSABLE);
    }
    match args.on.as_str() {
        "sim" if args.console.is_some() => {
            eprintln!("dmsim replay: --console is for `--on kernel` (the simulator has no VM console)");
            return ExitCode::from(exit::UNUSABLE);
        }
        "sim" if args.kernel_answer.is_some() => {
            eprintln!("dmsim replay: --kernel-answer is for `--on kernel --disks ublk`");
            return ExitCode::from(exit::UNUSABLE);
        }
        "sim" if args.race.is_some() => {
            eprintln!("dmsim replay: --race is for `--on kernel` (the simulator runs the trace as written)");
            return ExitCode::from(exit::UNUSABLE);
        }
        "sim" => {}
        "kernel" | "engine" => return run_on_kernel(&args),
        "all" => return run_on_all(&args),
        other => {
            eprintln!("dmsim replay: unknown backend {other:?}; use `sim`, `kernel`, `engine` or `all`");
            return ExitCode::from(exit::UNUSABLE);
        }
    }
    let (trace, encoding) = match trace_file::read(&args.trace) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("dmsim replay: {e}");
            return ExitCode::from(exit::UNUSABLE);
        }
    };
    let checkers = Checkers::from_path();
    if is_cache_header(&trace.header) {
        let replayed = match cache_run::replay(&trace, &checkers) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("dmsim replay: {}: {e}", args.trace.display());
                return ExitCode::from(exit::UNUSABLE);
            }
        };
        print_heading(&args, &trace, encoding);
        print_cache_outcome(&replayed.outcome, &checkers);
        let out = &replayed.outcome;
        return judge(
            &args,
            &trace,
            out.violation.as_ref(),
            out.trace.ops().count(),
            &replayed.first_difference,
        );
    }
    let replayed = match replay(&trace, &checkers) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dmsim replay: {}: {e}", args.trace.display());
            return ExitCode::from(exit::UNUSABLE);
        }
    };
    print_heading(&args, &trace, encoding);
    print_outcome(&replayed.outcome, &checkers);
    let out = &replayed.outcome;
    judge(&args, &trace, out.violation.as_ref(), out.trace.ops().count(), &replayed.first_difference)
}

fn print_heading(args: &ReplayArgs, trace: &Trace, encoding: Encoding) {
    println!(
        "dmsim replay: {} ({}, seed {}, workload {}, {} ops) on the simulator",
        args.trace.display(),
        encoding.name(),
        trace.header.seed,
        trace.header.workload,
        trace.ops().count()
    );
}

/// Compares a replay with the recording and gives the status: 1 on a
/// violation (or, with --strict, any difference).
fn judge(
    args: &ReplayArgs,
    trace: &Trace,
    violation: Option<&ThinFailure>,
    ops: usize,
    first_difference: &Option<(usize, String, String)>,
) -> ExitCode {
    let identical = match first_difference {
        None => {
            println!("replay: byte-identical to the recording");
            true
        }
        Some((line, recorded, again)) => {
            println!("replay: DIFFERS from the recording, first at line {line} of the text trace");
            println!("  recorded: {recorded}");
            println!("  replayed: {again}");
            false
        }
    };
    let recorded = trace.violation().map(|(k, m)| (k.to_string(), m.to_string()));
    match &recorded {
        Some((k, m)) => println!("recorded violation: {k}: {m}"),
        None => println!("recorded violation: none"),
    }
    match (violation, &recorded) {
        (Some(v), Some((k, m))) => {
            let same = violation_signature(v.kind, &v.what) == violation_signature(k, m);
            let verdict = if same { "the recorded violation recurs" } else { "a DIFFERENT violation" };
            println!("on replay: {verdict} {}: {}: {}", when(v.step, ops), v.kind, v.what);
        }
        (Some(v), None) => {
            println!("on replay: a NEW violation {}: {}: {}", when(v.step, ops), v.kind, v.what)
        }
        (None, Some(_)) => println!("on replay: no violation (the recorded one does not recur)"),
        (None, None) => println!("on replay: no violation"),
    }
    if violation.is_some() || (args.strict && !identical) {
        ExitCode::from(exit::PROBLEMS)
    } else {
        ExitCode::SUCCESS
    }
}

/// `--on kernel` with a cache trace: its requests one at a time on the
/// kernel's dm-cache, every read judged by the oracle (L1), the cache
/// contents and metadata compared with the serialized simulator's (L2,
/// L3; reported). See `dmsim_kernel_shim::cache_replay`.
fn run_cache_on_kernel(args: &ReplayArgs, trace: &Trace, ublk: bool) -> ExitCode {
    use dmsim_kernel_shim::cache_crash::judge_with_crash_states;
    use dmsim_kernel_shim::cache_replay::{judge, plan, ublk_plan};

    let name = args.trace.display();
    let planned = if ublk { ublk_plan(trace) } else { plan(trace) };
    let plan = match planned {
        Ok(p) => p,
        Err(e) => {
            eprintln!("dmsim replay --on kernel: {name}: {e}");
            return ExitCode::from(exit::UNUSABLE);
        }
    };
    let run = match boot_one(plan.job.clone(), ublk) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dmsim replay --on kernel: {name}: {e}");
            return ExitCode::from(exit::UNUSABLE);
        }
    };
    if let Some(path) = &args.console {
        if let Err(e) = write_console(path, &run) {
            eprintln!("dmsim replay --on kernel: --console: {e}");
            return ExitCode::from(exit::UNUSABLE);
        }
    }
    let judged = if ublk {
        judge_with_crash_states(&plan, &run).map(|(r, c)| (r, Some(c)))
    } else {
        judge(&plan, &run).map(|r| (r, None))
    };
    let (report, crashes) = match judged {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dmsim replay --on kernel: {name}: {e}");
            return ExitCode::from(exit::UNUSABLE);
        }
    };
    let crash_l1 = crashes.as_ref().is_none_or(|c| c.l1_violations.is_empty());
    let l1 = report.l1_violations.is_empty() && report.failed_requests.is_empty() && crash_l1;
    if args.json {
        let mut json = serde_json::json!({
            "trace": name.to_string(),
            "seed": trace.header.seed,
            "target": "cache",
            "level": "L1",
            "equal": l1,
            "reads": report.reads,
            "l1_violations": report.l1_violations,
            "failed_requests": report.failed_requests,
            "reads_as_simulated": report.reads_as_simulated,
            "l2": if report.l2_identical { "identical" } else { "different" },
            "l3": if report.l3_identical { "identical" } else { "different" },
            "kernel_status": report.kernel_status,
        });
        if let Some(c) = &crashes {
            json["crash_states"] = serde_json::json!({
                "marks": c.marks,
                "commit_marks": c.commit_marks,
                "matching": c.matching,
                "reads": c.reads,
                "l1_violations": c.l1_violations,
                "commit_l1_violations": c.commit_l1_violations,
                "first_difference": c.first_difference.as_ref().map(|(op, what)| serde_json::json!({ "op": op, "what": what })),
            });
        }
        if args.timings {
            json["timings"] = serde_json::json!({ "wall_seconds": run.wall.as_secs_f64() });
        }
        println!("{json}");
    } else {
        println!(
            "dmsim replay: {name} (seed {}, a cache trace, {} ops) on the kernel's dm-cache, one request at a time",
            trace.header.seed,
            plan.ops.len()
        );
        println!(
            "  L1 (every read one the oracle allows): {} ({} reads; {} identical to the serialized simulator's)",
            if l1 { "holds" } else { "VIOLATED" },
            report.reads,
            report.reads_as_simulated
        );
        for v in report.l1_violations.iter().chain(&report.failed_requests) {
            println!("    {v}");
        }
        println!(
            "  L2 (the same cache blocks, origin blocks, dirty bits after the clean shutdown): {}",
            if report.l2_identical { "identical" } else { "different (reported, not judged)" }
        );
        println!(
            "  L3 (metadata blocks): {}",
            if report.l3_identical { "identical" } else { "different (reported, not judged)" }
        );
        if let Some(c) = &crashes {
            println!(
                "  crash states on controlled disks: {} marks ({} status/reload commits), L1 after every FLUSH/FUA: {}; \
                 the model's crash state matches at {} marks",
                c.marks,
                c.commit_marks,
                if c.l1_violations.is_empty() { "holds" } else { "VIOLATED" },
                c.matching
            );
            for v in &c.l1_violations {
                println!("    {v}");
            }
            if let Some((_, what)) = &c.first_difference {
                println!("    first difference: {what}");
            }
            for v in &c.commit_l1_violations {
                println!("    after a commit without a data flush (the stock kernel's, reported): {v}");
            }
        }
        if args.timings {
            eprintln!("VM wall time {:.1} s", run.wall.as_secs_f64());
        }
    }
    if l1 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::PROBLEMS)
    }
}

/// `--on kernel`: the trace's requests and messages on the real dm-thin in
/// a VM, one request at a time, against the simulator run the same way.
fn run_on_kernel(args: &ReplayArgs) -> ExitCode {
    use dmsim_kernel_shim::equivalence::{simulate_serialized_crashing, simulate_serialized_full};

    let (trace, _) = match trace_file::read(&args.trace) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("dmsim replay: {e}");
            return ExitCode::from(exit::UNUSABLE);
        }
    };
    // The userland engine: the model's pool served over ublk in the same
    // VM, on the same controlled disks, judged as the kernel is.
    let engine = args.on == "engine";
    let target = if engine { "the engine" } else { "the kernel" };
    if engine && (args.race.is_some() || args.kernel_answer.is_some() || is_cache_header(&trace.header)) {
        eprintln!(
            "dmsim replay --on engine: a thin trace, replayed one request at a time (no --race, no \
             --kernel-answer; the engine serves the thin target only)"
        );
        return ExitCode::from(exit::UNUSABLE);
    }
    if args.depth > 1 {
        if !engine {
            eprintln!("dmsim replay: --depth is for `--on engine`");
            return ExitCode::from(exit::UNUSABLE);
        }
        return run_concurrent_on_engine(args, &trace);
    }
    let ublk = match args.disks.as_str() {
        _ if engine => true,
        "virtio" => false,
        "ublk" => true,
        other => {
            eprintln!("dmsim replay: unknown --disks {other:?}; use `virtio` or `ublk`");
            return ExitCode::from(exit::UNUSABLE);
        }
    };
    if args.kernel_answer.is_some() && (!ublk || args.race.is_some() || is_cache_header(&trace.header)) {
        eprintln!(
            "dmsim replay --kernel-answer: a thin trace's answer from `dmsim check --on kernel`, judged as with \
             --disks ublk (no --race)"
        );
        return ExitCode::from(exit::UNUSABLE);
    }
    if let Some(steps) = &args.race {
        if is_cache_header(&trace.header) {
            return run_cache_race_on_kernel(args, &trace, steps);
        }
        return run_race_on_kernel(args, &trace, steps);
    }
    if is_cache_header(&trace.header) {
        return run_cache_on_kernel(args, &trace, ublk);
    }
    // Only controlled disks can cut power at a crash op.
    let simulated =
        if ublk { simulate_serialized_crashing(&trace) } else { simulate_serialized_full(&trace) };
    // A trace the serialized simulator cannot run is refused before the
    // VM boots.
    if let Err(e) = simulated {
        eprintln!("dmsim replay --on kernel: {}: {e}", args.trace.display());
        return ExitCode::from(exit::UNUSABLE);
    }
    let run = if let Some(answer) = &args.kernel_answer {
        match saved_run(answer) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("dmsim replay --kernel-answer: {e}");
                return ExitCode::from(exit::UNUSABLE);
            }
        }
    } else {
        let job = if engine {
            dmsim_kernel_shim::Job::Engine {
                trace: trace.clone(),
                engine: dmsim_kernel_shim::protocol::EngineJob::serialized(),
            }
        } else if ublk {
            dmsim_kernel_shim::Job::Ublk(trace.clone())
        } else {
            dmsim_kernel_shim::Job::Replay(trace.clone())
        };
        match boot_one(job, ublk) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("dmsim replay --on kernel: {}: {e}", args.trace.display());
                return ExitCode::from(exit::UNUSABLE);
            }
        }
    };
    if let Some(path) = &args.console {
        if let Err(e) = write_console(path, &run) {
            eprintln!("dmsim replay --on kernel: --console: {e}");
            return ExitCode::from(exit::UNUSABLE);
        }
    }
    if let Some(e) = &run.result.error {
        eprintln!("dmsim replay --on {}: {}: the agent failed: {e}", args.on, args.trace.display());
        return ExitCode::from(exit::UNUSABLE);
    }
    // Now that the kernel's clock is known, the simulator runs again
    // following it (timed commits between the same ops as the kernel's),
    // and the two are compared.
    let report = match dmsim_kernel_shim::thin_replay::judge(&trace, ublk, &run) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dmsim replay --on kernel: {}: {e}", args.trace.display());
            return ExitCode::from(exit::UNUSABLE);
        }
    };
    let followed = report.followed_kernel_clock;
    let differences = &report.differences;
    let crashes = &report.crashes;
    let first_bad_crash = report.first_bad_crash();
    let crash_class = report.crash_class.clone();
    let end_class = report.end_class.clone();
    let faulted = report.faulted;
    let op_differences = &report.op_differences;
    let sim_fired = &report.simulator_fired;
    let kernel_fired = &report.kernel_fired;
    let l2 = &report.l2;
    let l3 = &report.l3;
    if args.json {
        let (l2_label, l2_first) = match &l2 {
            Ok(l2) => (
                l2.label().to_string(),
                l2.first_difference()
                    .map(|(line, s, k)| serde_json::json!({ "line": line, "simulator": s, "kernel": k })),
            ),
            Err(e) => (format!("error: {e}"), None),
        };
        let json = serde_json::json!({
            "trace": args.trace.display().to_string(),
            "seed": trace.header.seed,
            "level": "L1",
            "equal": differences.is_empty(),
            "differences": differences,
            "class": end_class.as_ref().map(|k| k.name()),
            "op_class": report.op_class.as_ref().map(|k| k.name()),
            "verdict": report.verdict().name(),
            "l2": l2_label,
            "l2_first_difference": l2_first,
            "l3_blocks": l3.blocks,
            "l3_differing_blocks": l3.differing,
            "l3_first_differing_block": l3.first,
            "simulator_oracle_violation": report.oracle_violation,
            "simulator_crash_point_finding": report.crash_point_finding,
            "simulator_end_check_finding": report.end_check_finding,
            "kernel_end_check": report.kernel_end_check,
            "first_commit_difference": report.first_commit_difference,
            "on": args.on,
            "disks": if engine { "ublk" } else { args.disks.as_str() },
            "followed_kernel_clock": followed,
            "clock": if report.trace_clock {
                "trace"
            } else if report.kernel_commits {
                "kernel-commits"
            } else if followed {
                "kernel"
            } else {
                "none"
            },
            "ublk_counts": run.result.ublk.iter().cloned().collect::<std::collections::BTreeMap<String, u64>>(),
            "crashes": crashes.iter().map(|c| serde_json::json!({
                "crash": c.crash,
                "op": c.op,
                "l1_equal": c.differences.is_empty(),
                "differences": c.differences.iter().take(20).collect::<Vec<_>>(),
                "metadata_identical": c.metadata_identical,
                "simulator_kept_unflushed": [c.choices[0].0, c.choices[0].1],
                "kernel_kept_unflushed": [c.choices[1].0, c.choices[1].1],
                "data_reordered": c.data_reordered,
            })).collect::<Vec<_>>(),
            "op_differences": op_differences.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "faults_fired": { "simulator": sim_fired, "kernel": kernel_fired },
            "first_differing_crash": first_bad_crash.map(|c| serde_json::json!({
                "crash": c.crash, "op": c.op, "first_difference": c.differences.first(),
                "class": crash_class.as_ref().map(|k| k.name()),
            })),
        });
        let mut json = json;
        if args.timings {
            json["timings"] = serde_json::json!({
                "boot_seconds": run.boot.as_secs_f64(),
                "wall_seconds": run.wall.as_secs_f64(),
            });
        }
        println!("{json}");
    } else {
        println!(
            "dmsim replay: {} (seed {}, {} ops) on {target}, one request at a time{}",
            args.trace.display(),
            trace.header.seed,
            trace.ops().count(),
            if engine {
                ": the model's pool as a userland engine over ublk, on ublk disks"
            } else if ublk {
                ", the pool on ublk disks"
            } else {
                ""
            },
        );
        if ublk {
            let c: Vec<String> = run.result.ublk.iter().map(|(n, c)| format!("{n} {c}")).collect();
            println!("ublk disks served: {}", c.join(", "));
        }
        if followed {
            println!("the simulator followed the kernel's clock (its timed commits between the same ops)");
        }
        if report.trace_clock {
            println!(
                "the engine ran on the trace's clock (its tick ops), as the simulator did: nothing followed"
            );
        }
        if report.kernel_commits {
            println!(
                "the engine committed after the ops the kernel committed in (and where its requests commit), as the simulator did"
            );
        }
        if let Some(v) = &report.crash_point_finding {
            println!("the simulator finds a problem at a metadata crash point inside a commit (not judged here): {v}");
        }
        if let Some(v) = &report.end_check_finding {
            println!("the simulator's checker finds its final metadata damaged (a model finding, still judged): {v}");
            match &report.kernel_end_check {
                Some(k) => println!("dmsim's checker on the kernel's final metadata: {k}"),
                None => println!("dmsim's checker on the kernel's final metadata: no damage"),
            }
        }
        if let Some(v) = &report.oracle_violation {
            println!("the simulator's oracle objects ({v}); its state is read from its disks");
        }
        for c in crashes {
            let [(sm, sd), (km, kd)] = c.choices;
            let choice = format!(
                "kept/unflushed metadata {}/{} data {}/{} on the simulator, {}/{} {}/{} on the kernel",
                sm.0, sm.1, sd.0, sd.1, km.0, km.1, kd.0, kd.1
            );
            let l3 = if c.metadata_identical { "metadata identical" } else { "metadata differs" };
            let choice = if c.data_reordered {
                format!("{choice}; the simulator followed the kernel's order of the unflushed data writes")
            } else {
                choice
            };
            if c.differences.is_empty() {
                println!("crash {} (op {}): L1 equal ({l3}; {choice})", c.crash, c.op);
            } else {
                println!(
                    "crash {} (op {}): L1 DIVERGES ({} differences; {l3}; {choice}); first:",
                    c.crash,
                    c.op,
                    c.differences.len()
                );
                for d in c.differences.iter().take(10) {
                    println!("  {d}");
                }
            }
        }
        let checks = dmsim_kernel_shim::thin_replay::crash_checks(&run);
        if !checks.is_empty() {
            let damaged: Vec<String> =
                checks.iter().filter_map(|(op, d)| d.as_ref().map(|d| format!("op {op}: {d}"))).collect();
            if damaged.is_empty() {
                println!(
                    "dmsim's checker on the {} metadata images that survived a power cut: clean",
                    checks.len()
                );
            } else {
                println!(
                    "dmsim's checker on the metadata that survived a power cut: DAMAGED at {}",
                    damaged.join("; ")
                );
            }
        }
        if faulted && ublk {
            println!(
                "faults fired on the simulator: {}",
                if sim_fired.is_empty() { "none".into() } else { sim_fired.join("; ") }
            );
            println!(
                "faults fired on the kernel's disks: {}",
                if kernel_fired.is_empty() { "none".into() } else { kernel_fired.join("; ") }
            );
        }
        if ublk && dmsim_kernel_shim::protocol::commit_ops(&run.result).is_some() {
            match &report.first_commit_difference {
                None => println!("commits: after the same ops on both sides"),
                Some(d) => println!("commits: they part at {d}"),
            }
        }
        if ublk {
            if op_differences.is_empty() {
                let what = if faulted { "outcome, reads and pool mode" } else { "outcome and reads" };
                println!("every op: the same {what} as the serialized model");
            } else {
                println!("{} ops differ from the serialized model:", op_differences.len());
                for d in op_differences.iter().take(20) {
                    println!("  {d}");
                }
                if first_bad_crash.is_none() && differences.is_empty() {
                    print_class(report.op_class.as_ref());
                }
            }
        }
        if let Some(c) = first_bad_crash {
            println!(
                "first divergence at crash {} (op {}): {}",
                c.crash,
                c.op,
                c.differences.first().map_or("", String::as_str)
            );
            print_class(crash_class.as_ref());
        }
        if differences.is_empty() {
            println!("L1 equal: every device reads the same stamps, the same blocks are mapped");
        } else {
            println!("L1 DIVERGES ({} differences); first:", differences.len());
            for d in differences.iter().take(10) {
                println!("  {d}");
            }
            print_class(end_class.as_ref());
        }
        match &l2 {
            Ok(l2) => match l2.first_difference() {
                None => println!("L2 identical: the same thin_dump"),
                Some((line, s, k)) => {
                    let what = match l2.label() {
                        "data-blocks" => "differs only in data block numbers",
                        "data+times" => "differs in data block numbers and mapping times",
                        _ => "DIFFERS",
                    };
                    println!("L2 {what}; first at line {line} of the dump:");
                    println!("  simulator: {s}");
                    println!("  kernel:    {k}");
                }
            },
            Err(e) => println!("L2 unknown: {e}"),
        }
        if l3.is_identical() {
            println!("L3 identical: all {} metadata blocks", l3.blocks);
        } else {
            println!(
                "L3: {} of {} metadata blocks differ, the first is block {}",
                l3.differing,
                l3.blocks,
                l3.first.unwrap_or(0)
            );
        }
    }
    if args.timings {
        eprintln!("VM: boot {:.1} s, whole run {:.1} s", run.boot.as_secs_f64(), run.wall.as_secs_f64());
    }
    if report.verdict() == dmsim_kernel_shim::thin_replay::Verdict::Equal {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::PROBLEMS)
    }
}

/// The kernel's run saved by `dmsim check --on kernel`: the agent's
/// answer in `answer` and the final metadata image beside it (the same
/// name with the extension `metadata`).
fn saved_run(answer: &std::path::Path) -> Result<dmsim_kernel_shim::KernelRun, String> {
    let text = std::fs::read_to_string(answer).map_err(|e| format!("{}: {e}", answer.display()))?;
    let result = dmsim_kernel_shim::KernelResult::from_text(&text)
        .map_err(|e| format!("{}: not a kernel answer: {e}", answer.display()))?;
    let image_path = answer.with_extension("metadata");
    let image = std::fs::read(&image_path).map_err(|e| {
        format!("{}: {e} (the final metadata image saved beside the answer)", image_path.display())
    })?;
    Ok(dmsim_kernel_shim::KernelRun::from_saved(result, image))
}

/// One job in a VM (with the ublk module when `ublk`): its run, or what
/// went wrong.
fn boot_one(job: dmsim_kernel_shim::Job, ublk: bool) -> Result<dmsim_kernel_shim::KernelRun, String> {
    use dmsim_kernel_shim::KernelShim;
    let prepared = if ublk { KernelShim::prepare_with_ublk() } else { KernelShim::prepare() };
    let shim = prepared.map_err(|e| format!("the VM cannot be prepared: {e}"))?;
    eprintln!("booting the kernel in qemu (software emulation; a few seconds)…");
    shim.run_jobs(&[job])
        .and_then(|mut runs| {
            runs.pop()
                .ok_or_else(|| dmsim_kernel_shim::ShimError::Invalid("the VM returned no result".into()))
        })
        .map_err(|e| e.to_string())
}

/// A race's job (`--race`, on controlled disks): its run, its console
/// written where `--console` says; what went wrong otherwise.
fn run_race_job(
    args: &ReplayArgs,
    job: dmsim_kernel_shim::Job,
) -> Result<dmsim_kernel_shim::KernelRun, String> {
    let run = boot_one(job, true)?;
    if let Some(path) = &args.console {
        write_console(path, &run).map_err(|e| format!("--console: {e}"))?;
    }
    Ok(run)
}

/// `dmsim replay --on kernel --race STEPS`: the trace as a race job on
/// controlled disks, judged against the simulator's run as written.
fn run_race_on_kernel(args: &ReplayArgs, trace: &Trace, steps: &str) -> ExitCode {
    use dmsim_kernel_shim::thin_replay::{judge_race, parse_race_steps};

    let fail = |what: String| {
        eprintln!("dmsim replay --on kernel --race: {}: {what}", args.trace.display());
        ExitCode::from(exit::UNUSABLE)
    };
    let steps = match parse_race_steps(steps, trace) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    // A trace the simulator cannot run as written is refused before the
    // VM boots.
    let model = match dmsim_kernel_shim::equivalence::simulate_as_written(trace) {
        Ok(m) => m,
        Err(e) => return fail(e.to_string()),
    };
    let job = dmsim_kernel_shim::Job::Race { trace: trace.clone(), steps: steps.clone() };
    let run = match run_race_job(args, job) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let report = match judge_race(model, &run) {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    };
    let steps_text = dmsim_kernel_shim::protocol::RaceStep::list_text(&steps);
    if args.json {
        let ops: Vec<serde_json::Value> = run
            .result
            .ops
            .iter()
            .map(|o| serde_json::json!({"op": o.index, "outcome": o.outcome, "read": o.read}))
            .collect();
        let out = serde_json::json!({
            "trace": args.trace.display().to_string(),
            "race": steps_text,
            "l1_equal": report.differences.is_empty(),
            "l1_differences": report.differences,
            "model_objection": report.model.oracle_violation,
            "kernel_ops": ops,
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        println!("race on the kernel: {steps_text}");
        for o in &run.result.ops {
            let read = o.read.as_deref().map(|r| format!(" read {r}")).unwrap_or_default();
            println!("  op {}: {}{read}", o.index, o.outcome);
        }
        match &report.model.oracle_violation {
            Some(v) => println!("the simulator (the trace as written) objects: {v}"),
            None => println!("the simulator (the trace as written): no objection"),
        }
        if report.differences.is_empty() {
            println!("L1 equal: every device reads the same stamps, the same blocks are mapped");
        } else {
            println!("L1 DIVERGES ({} differences); first:", report.differences.len());
            for d in report.differences.iter().take(10) {
                println!("  {d}");
            }
        }
    }
    if args.timings {
        eprintln!("VM: boot {:.1} s, whole run {:.1} s", run.boot.as_secs_f64(), run.wall.as_secs_f64());
    }
    if report.differences.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::PROBLEMS)
    }
}

/// `dmsim replay --on kernel --race STEPS` with a cache trace: the trace
/// as a race on the cache's controlled disks
/// (`dmsim_kernel_shim::cache_race`), every kernel read judged by the
/// oracle fed the race as it ran.
fn run_cache_race_on_kernel(args: &ReplayArgs, trace: &Trace, steps: &str) -> ExitCode {
    use dmsim_kernel_shim::cache_race::{judge_race, plan_steps, race_plan};

    let fail = |what: String| {
        eprintln!("dmsim replay --on kernel --race: {}: {what}", args.trace.display());
        ExitCode::from(exit::UNUSABLE)
    };
    let plan = match race_plan(trace, steps) {
        Ok(p) => p,
        Err(e) => return fail(e.to_string()),
    };
    let run = match run_race_job(args, plan.job.clone()) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let report = match judge_race(&plan, trace, &run) {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    };
    let job_steps = dmsim_kernel_shim::protocol::RaceStep::list_text(&plan_steps(&plan).unwrap_or_default());
    let l1 = report.l1_violations.is_empty() && report.failed_requests.is_empty();
    if args.json {
        let ops: Vec<serde_json::Value> = run
            .result
            .ops
            .iter()
            .map(|o| serde_json::json!({"op": o.index, "outcome": o.outcome, "read": o.read}))
            .collect();
        let out = serde_json::json!({
            "trace": args.trace.display().to_string(),
            "target": "cache",
            "race": steps,
            "job_race": job_steps,
            "l1_holds": l1,
            "reads": report.reads,
            "l1_violations": report.l1_violations,
            "failed_requests": report.failed_requests,
            "clean_copies_differ": report.clean_copies_differ,
            "model_objection": report.model_objection,
            "kernel_ops": ops,
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        println!("race on the kernel's dm-cache (the job's ops: the trace's without worker and complete, then the read-back):");
        println!("  {job_steps}");
        for o in &run.result.ops {
            let read = o.read.as_deref().map(|r| format!(" read {r}")).unwrap_or_default();
            println!("  op {}: {}{read}", o.index, o.outcome);
        }
        match &report.model_objection {
            Some(v) => println!("the simulator (the trace as written) objects: {v}"),
            None => println!("the simulator (the trace as written): no objection"),
        }
        println!(
            "L1 (every kernel read one the oracle allows, the race as it ran): {} ({} reads)",
            if l1 { "holds" } else { "VIOLATED" },
            report.reads
        );
        for v in report.l1_violations.iter().chain(&report.failed_requests) {
            println!("  {v}");
        }
        if report.clean_copies_differ.is_empty() {
            println!("at rest: every block recorded clean holds its origin block's data");
        } else {
            println!("at rest: blocks recorded clean whose copies differ:");
            for d in &report.clean_copies_differ {
                println!("  {d}");
            }
        }
    }
    if args.timings {
        eprintln!("VM: boot {:.1} s, whole run {:.1} s", run.boot.as_secs_f64(), run.wall.as_secs_f64());
    }
    if l1 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::PROBLEMS)
    }
}

/// The line naming the class that explains a divergence, or saying none does.
fn print_class(class: Option<&dmsim_kernel_shim::equivalence::DivergenceClass>) {
    match class {
        Some(k) => println!("  divergence class {k}"),
        None => println!("  no named divergence class explains it"),
    }
}

/// `dmsim replay --on all`: a thin trace on the simulator, the kernel and
/// the engine — the kernel's job and the engine's in one boot, both on
/// controlled disks, one request at a time — and L1, L2 and L3 for each
/// pair. Exit 1 when a pair is not L1-equal (the kernel's and the
/// engine's own verdicts against the simulator, explained divergences
/// included, are printed; an explained one is not a failure).
fn run_on_all(args: &ReplayArgs) -> ExitCode {
    use dmsim_kernel_shim::thin_replay::{compare_runs, judge, Verdict};
    let fail = |what: String| {
        eprintln!("dmsim replay --on all: {}: {what}", args.trace.display());
        ExitCode::from(exit::UNUSABLE)
    };
    let (trace, _) = match trace_file::read(&args.trace) {
        Ok(t) => t,
        Err(e) => return fail(e.to_string()),
    };
    if is_cache_header(&trace.header) || args.race.is_some() || args.kernel_answer.is_some() {
        return fail("a thin trace, one request at a time (no --race, no --kernel-answer)".into());
    }
    if let Err(e) = dmsim_kernel_shim::equivalence::simulate_serialized_crashing(&trace) {
        return fail(e.to_string());
    }
    let shim = match dmsim_kernel_shim::KernelShim::prepare_with_ublk() {
        Ok(s) => s,
        Err(e) => return fail(format!("the VM cannot be prepared: {e}")),
    };
    eprintln!("booting the kernel in qemu (software emulation): the kernel's job, then the engine's…");
    // The engine commits where the kernel did, so that their metadata can
    // be held against each other block for block.
    let jobs = [
        dmsim_kernel_shim::Job::Ublk(trace.clone()),
        dmsim_kernel_shim::Job::Engine {
            trace: trace.clone(),
            engine: dmsim_kernel_shim::protocol::EngineJob::following_kernel(),
        },
    ];
    let runs = match shim.run_jobs(&jobs) {
        Ok(r) if r.len() == 2 => r,
        Ok(r) => return fail(format!("the VM returned {} results for 2 jobs", r.len())),
        Err(e) => return fail(e.to_string()),
    };
    let (kernel, engine) = (&runs[0], &runs[1]);
    for (name, run) in [("kernel", kernel), ("engine", engine)] {
        if let Some(e) = &run.result.error {
            return fail(format!("the {name}'s job failed: {e}"));
        }
    }
    let judged = judge(&trace, true, kernel).and_then(|k| judge(&trace, true, engine).map(|e| (k, e)));
    let (k, e) = match judged {
        Ok(p) => p,
        Err(e) => return fail(e.to_string()),
    };
    let pair = compare_runs(kernel, engine);
    let l2_text = |l2: &Result<dmsim_kernel_shim::equivalence::L2, String>| match l2 {
        Ok(l2) => l2.label().to_string(),
        Err(e) => format!("unknown ({e})"),
    };
    let rows = [
        ("simulator–kernel", k.differences.len(), l2_text(&k.l2), k.l3.differing, k.l3.blocks),
        ("simulator–engine", e.differences.len(), l2_text(&e.l2), e.l3.differing, e.l3.blocks),
        ("kernel–engine", pair.l1.len(), l2_text(&pair.l2), pair.l3.differing, pair.l3.blocks),
    ];
    if args.json {
        let json = serde_json::json!({
            "trace": args.trace.display().to_string(),
            "seed": trace.header.seed,
            "kernel_verdict": k.verdict().name(),
            "engine_verdict": e.verdict().name(),
            "pairs": rows.iter().map(|(name, l1, l2, d, b)| serde_json::json!({
                "pair": name, "l1_equal": *l1 == 0, "l1_differences": l1, "l2": l2,
                "l3_differing_blocks": d, "l3_blocks": b,
            })).collect::<Vec<_>>(),
            "kernel_engine_first_l1_difference": pair.l1.first(),
            "kernel_engine_same_commits": pair.same_commits,
        });
        println!("{json}");
    } else {
        println!(
            "dmsim replay: {} (seed {}, {} ops) on the simulator, the kernel and the engine, one request at a time",
            args.trace.display(),
            trace.header.seed,
            trace.ops().count()
        );
        println!("the kernel against the simulator: {}", k.verdict().name());
        println!("the engine against the simulator: {}", e.verdict().name());
        println!("{:<18} {:<14} {:<12} L3", "pair", "L1", "L2");
        for (name, l1, l2, d, b) in &rows {
            let l1 = if *l1 == 0 { "equal".to_string() } else { format!("{l1} differ") };
            let l3 = if *d == 0 { "identical".to_string() } else { format!("{d} of {b} blocks differ") };
            println!("{name:<18} {l1:<14} {l2:<12} {l3}");
        }
        if pair.same_commits == Some(false) {
            println!(
                "the kernel and the engine committed after different ops (each one's commit timer on its own \
                 clock): where a pool fills, that decides which writes get space"
            );
        }
        for d in pair.l1.iter().take(10) {
            println!("  kernel–engine: {d}");
        }
    }
    let l1_equal = rows.iter().all(|r| r.1 == 0);
    let explained = |v: Verdict| v != Verdict::Unexplained;
    if l1_equal && explained(k.verdict()) && explained(e.verdict()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::PROBLEMS)
    }
}

/// `dmsim replay --on engine --depth N` (N > 1): the trace's requests with
/// up to N in flight on the engine in the VM, judged by the oracle.
fn run_concurrent_on_engine(args: &ReplayArgs, trace: &Trace) -> ExitCode {
    use dmsim_kernel_shim::protocol::EngineJob;
    let fail = |what: String| {
        eprintln!("dmsim replay --on engine --depth {}: {}: {what}", args.depth, args.trace.display());
        ExitCode::from(exit::UNUSABLE)
    };
    let job =
        dmsim_kernel_shim::Job::Engine { trace: trace.clone(), engine: EngineJob::at_depth(args.depth) };
    let run = match boot_one(job, true) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if let Some(path) = &args.console {
        if let Err(e) = write_console(path, &run) {
            return fail(format!("--console: {e}"));
        }
    }
    let report = match dmsim_kernel_shim::thin_replay::judge_concurrent(&run) {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "trace": args.trace.display().to_string(),
                "seed": trace.header.seed,
                "on": "engine",
                "depth": args.depth,
                "requests": report.requests,
                "max_in_flight": report.max_in_flight,
                "overtaken": report.overtaken,
                "blocks_read_back": report.blocks_read_back,
                "failed_ops": report.failed_ops,
                "oracle_violations": report.violations,
            })
        );
    } else {
        println!(
            "dmsim replay: {} (seed {}, {} ops) on the engine, up to {} requests in flight, judged by the oracle",
            args.trace.display(),
            trace.header.seed,
            trace.ops().count(),
            args.depth
        );
        println!(
            "{} requests, at most {} in flight at once, {} completed before one sent earlier, {} answered with \
             an error; {} blocks read back at the end",
            report.requests, report.max_in_flight, report.overtaken, report.failed_ops, report.blocks_read_back
        );
        if report.violations.is_empty() {
            println!("oracle: no violation");
        } else {
            println!("oracle: {} VIOLATIONS; first:", report.violations.len());
            for v in report.violations.iter().take(10) {
                println!("  {v}");
            }
        }
    }
    if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::PROBLEMS)
    }
}
