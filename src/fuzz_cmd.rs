//! `dmsim fuzz-to-trace`: an input of the `simulate` fuzz target run as
//! the target runs it (`dmsim_sim::fuzz`), its trace written: what turns
//! a fuzzer's crash into a trace for `replay`, `minimize` and `show`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use dmsim_model::mutation::Mutations;
use dmsim_sim::fuzz::{run_case, FuzzCase, FuzzConfig, FuzzSettings, MAX_INPUT_BYTES};

use crate::check_cmd::parse_mutation;
use crate::exit;
use crate::run_cmd::print_verdict;
use dmsim_traces::file::{self as trace_file, Encoding};

/// Options of `dmsim fuzz-to-trace`.
#[derive(Args, Debug)]
#[command(after_help = crate::exit_help!("\
Status 1: the input's run has a violation, as the fuzz target would \
report it (its trace is still written). Inputs larger than 1 MiB are \
unusable input (2)."))]
pub struct FuzzToTraceArgs {
    /// The input: a file the fuzzer saved (fuzz/artifacts/simulate/crash-…,
    /// or any file of its corpus, fuzz/corpus/simulate/). Any bytes are an
    /// input.
    pub input: PathBuf,
    /// Where to write the trace (text; binary with --binary or a .bin
    /// extension).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Write the trace in the binary encoding.
    #[arg(long)]
    pub binary: bool,
    /// Run with a deliberately broken model (as the fuzz target does not:
    /// for detector tests).
    #[arg(long, hide = true, value_parser = parse_mutation)]
    pub mutation: Option<Mutations>,
    /// Run the model as kernel 6.1 behaves, without the candidate kernel
    /// fixes (the fuzz target runs with them).
    #[arg(long, hide = true)]
    pub kernel_as_is: bool,
}

/// Runs one input and writes its trace; exit 1 on a violation.
pub fn run(args: FuzzToTraceArgs) -> ExitCode {
    if let Err(e) = trace_file::check_output_path(&args.output) {
        eprintln!("dmsim fuzz-to-trace: {e}");
        return ExitCode::from(exit::UNUSABLE);
    }
    let data = match trace_file::read_capped(&args.input, MAX_INPUT_BYTES, "fuzz input") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("dmsim fuzz-to-trace: {e}");
            return ExitCode::from(exit::UNUSABLE);
        }
    };
    let settings =
        FuzzSettings { mutations: args.mutation.unwrap_or_default(), kernel_as_is: args.kernel_as_is };
    let case = FuzzCase::from_bytes(&data, &settings);
    let (target, seed, workload) = match &case.config {
        FuzzConfig::Thin(c) => ("thin", c.seed, c.workload.name()),
        FuzzConfig::Cache(c) => ("cache", c.seed, c.workload.name()),
    };
    println!(
        "dmsim fuzz-to-trace: {} ({} bytes): a {target} run on seed {seed}'s configuration (workload {workload}), {} ops",
        args.input.display(),
        data.len(),
        case.ops.len()
    );
    if settings.mutations.any() {
        println!("  (with a deliberately broken model: {})", settings.mutations.names().join(", "));
    }
    if settings.kernel_as_is {
        println!("  (kernel as is: the candidate kernel fixes are off)");
    }
    let out = run_case(&case);
    if let Some(p) = &out.probes {
        let reached = p.reached();
        println!(
            "  probes reached: {}",
            if reached.is_empty() { "none".to_string() } else { reached.join(", ") }
        );
    }
    let encoding = Encoding::for_output(&args.output, args.binary);
    if let Err(e) = trace_file::write(&args.output, &out.trace, encoding) {
        eprintln!("dmsim fuzz-to-trace: {e}");
        return ExitCode::from(exit::UNUSABLE);
    }
    println!("  trace: {} ({} events, {})", args.output.display(), out.trace.events.len(), encoding.name());
    print_verdict(out.violation.as_ref(), case.ops.len());
    if out.violation.is_some() {
        println!("  replay it: dmsim replay {}", args.output.display());
        println!("  shrink it: dmsim minimize {} -o min.trace", args.output.display());
        ExitCode::from(exit::PROBLEMS)
    } else {
        ExitCode::SUCCESS
    }
}
