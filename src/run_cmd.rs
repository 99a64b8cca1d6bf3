//! `dmsim run`: one seed of the thin campaign (or, with a `cache-…`
//! workload, of the cache campaign), its trace written to a file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use dmsim_sim::cache_run::{self, CacheRunConfig, CacheRunOutcome};
use dmsim_sim::run::{run_config, Checkers, RunConfig, RunOutcome};
use dmsim_sim::thin::ThinFailure;
use dmsim_traces::Trace;

use crate::check_cmd::{ops_parser, when, ModelArgs, WorkloadChoice};
use crate::exit;
use dmsim_traces::file::{self as trace_file, Encoding};

/// Options of `dmsim run`.
#[derive(Args, Debug)]
#[command(after_help = crate::exit_help!("\
Status 1: the seed's run has a violation (its trace is still written)."))]
pub struct RunArgs {
    /// The seed: it decides the workload (unless --workload), the pool's
    /// (or cache's) shape, the faults and every op. A cache-… --workload
    /// runs a seed of the cache campaign, as `dmsim check --campaign
    /// cache` does.
    #[arg(long)]
    pub seed: u64,
    /// Ops to generate (1 to 1,000,000).
    #[arg(long, default_value_t = 300, value_parser = ops_parser())]
    pub ops: usize,
    /// What model the seed runs on.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Write the run's trace here (text; binary with --binary or a .bin
    /// extension).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Write the trace in the binary encoding.
    #[arg(long)]
    pub binary: bool,
}

/// Runs one seed; exit 1 on a violation, 2 if the trace cannot be written.
pub fn run(args: RunArgs) -> ExitCode {
    if let Some(Err(e)) = args.trace.as_deref().map(trace_file::check_output_path) {
        eprintln!("dmsim run: {e}");
        return ExitCode::from(exit::UNUSABLE);
    }
    if let Some(WorkloadChoice::Cache(_)) = args.model.workload {
        return run_cache(&args);
    }
    let settings = args.model.settings();
    let cfg = RunConfig::for_seed(args.seed, args.ops, &settings);
    let checkers = Checkers::from_path();
    let out = run_config(&cfg, &checkers);
    println!("dmsim run: seed {}, workload {}, {} ops", cfg.seed, cfg.workload.name(), cfg.ops);
    if settings.mutations.any() {
        println!("  (with a deliberately broken model: {})", settings.mutations.names().join(", "));
    }
    print_outcome(&out, &checkers);
    finish(&args, &out.trace, out.violation.as_ref())
}

/// One seed of the cache campaign.
fn run_cache(args: &RunArgs) -> ExitCode {
    let settings = args.model.cache_settings();
    let cfg = CacheRunConfig::for_seed(args.seed, args.ops, &settings);
    let checkers = Checkers::from_path();
    let out = cache_run::run_config(&cfg, &checkers);
    println!("dmsim run: cache seed {}, workload {}, {} ops", cfg.seed, cfg.workload.name(), cfg.ops);
    if settings.mutations.any() {
        println!("  (with a deliberately broken model: {})", settings.mutations.names().join(", "));
    }
    if settings.kernel_as_is {
        println!("  (kernel as is: the candidate kernel fixes are off)");
    }
    print_cache_outcome(&out, &checkers);
    finish(args, &out.trace, out.violation.as_ref())
}

/// Writes the trace (if asked), prints the verdict, and gives the status.
fn finish(args: &RunArgs, trace: &Trace, violation: Option<&ThinFailure>) -> ExitCode {
    if let Some(path) = &args.trace {
        let encoding = Encoding::for_output(path, args.binary);
        if let Err(e) = trace_file::write(path, trace, encoding) {
            eprintln!("dmsim run: {e}");
            return ExitCode::from(exit::UNUSABLE);
        }
        println!("  trace: {} ({} events, {})", path.display(), trace.events.len(), encoding.name());
    }
    print_verdict(violation, trace.ops().count());
    if violation.is_some() {
        ExitCode::from(exit::PROBLEMS)
    } else {
        ExitCode::SUCCESS
    }
}

/// Prints a cache run's counters, the faults that fired and how many
/// images cache_check checked, indented under a heading.
pub fn print_cache_outcome(out: &CacheRunOutcome, checkers: &Checkers) {
    let s = &out.stats;
    println!(
        "  ops {}, requests {}, reads checked {}, crashes {}, EIO {}, reloads {} ({} refused), resizes {} ({} \
         refused), simulated {:.1} s",
        out.trace.ops().count(),
        s.bios,
        s.reads_checked,
        s.crashes,
        s.io_errors,
        s.reloads,
        s.reloads_refused,
        s.resizes,
        s.resizes_refused,
        s.sim_time_ns as f64 / 1e9
    );
    println!(
        "  promotions {} ({} by overwrite), demotions {}, writebacks {}, metadata commits {}, clean-block checks {}",
        s.migrations[0], s.overwrites, s.migrations[1], s.migrations[2], s.commits, s.clean_checks
    );
    let fired: Vec<String> =
        out.coverage.iter().filter(|(_, c)| *c > 0).map(|(n, c)| format!("{n} {c}")).collect();
    println!("  faults fired: {}", if fired.is_empty() { "none".to_string() } else { fired.join(", ") });
    let cache_check = match (&checkers.cache_check, out.cache_checked) {
        (None, _) => "not installed (judged by the model's checker only)".to_string(),
        (Some(_), 0) if out.violation.is_some() => "not run (the run failed first)".to_string(),
        (Some(_), n) => format!("ran on {n} metadata image{}", if n == 1 { "" } else { "s" }),
    };
    println!("  cache_check: {cache_check}");
}

/// Prints a run's counters, the faults that fired and whether thin_check
/// ran, indented under a heading.
pub fn print_outcome(out: &RunOutcome, checkers: &Checkers) {
    let s = &out.stats;
    println!(
        "  ops {}, bios {}, reads checked {}, crashes {}, crash states {}, ENOSPC {}, EIO {}, simulated {:.1} s",
        out.trace.ops().count(),
        s.bios,
        s.reads_checked,
        s.crashes,
        s.crash_states,
        s.enospc,
        s.io_errors,
        s.sim_time_ns as f64 / 1e9
    );
    if s.out_of_metadata_space > 0 || s.metadata_growths > 0 {
        println!(
            "  out of metadata space {} times, metadata device grown {} times",
            s.out_of_metadata_space, s.metadata_growths
        );
    }
    let fired: Vec<String> =
        out.coverage.iter().filter(|(_, c)| *c > 0).map(|(n, c)| format!("{n} {c}")).collect();
    println!("  faults fired: {}", if fired.is_empty() { "none".to_string() } else { fired.join(", ") });
    let thin_check = if out.thin_checked {
        "ran on the final metadata"
    } else if checkers.thin_check.is_none() {
        "not installed (judged by the model's checker only)"
    } else {
        "not run (the run failed first)"
    };
    println!("  thin_check: {thin_check}");
}

/// Prints the run's violation, or that there was none (`ops`: the ops the
/// run had).
pub fn print_verdict(violation: Option<&ThinFailure>, ops: usize) {
    match violation {
        Some(v) => println!("VIOLATION {}: {}: {}", when(v.step, ops), v.kind, v.what),
        None => println!("no violation"),
    }
}
