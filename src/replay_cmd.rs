//! `dmsim replay`: runs a recorded trace's ops again and compares.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use dmsim_sim::run::{replay, violation_signature, Checkers};

use crate::check_cmd::when;
use crate::run_cmd::{encoding_name, print_outcome};
use crate::trace_file;

/// Options of `dmsim replay`.
#[derive(Args, Debug)]
#[command(after_help = "\
Exit status: 0 if the replay runs clean, 1 if a violation occurs on replay \
(with --strict also if the replay is not byte-identical to the recording), \
2 if the trace cannot be read.")]
pub struct ReplayArgs {
    /// The trace file (text or binary; told apart by the binary magic).
    pub trace: PathBuf,
    /// Where to replay: `sim` (the simulator) is the only backend today.
    #[arg(long, default_value = "sim")]
    pub on: String,
    /// Also fail (exit 1) when the replay is not byte-identical to the
    /// recording.
    #[arg(long)]
    pub strict: bool,
}

/// Replays a trace; see [`ReplayArgs`] for the exit status.
pub fn run(args: ReplayArgs) -> ExitCode {
    match args.on.as_str() {
        "sim" => {}
        "kernel" => {
            eprintln!(
                "dmsim replay: --on kernel is not available yet (it comes with the kernel shim); \
                 use --on sim"
            );
            return ExitCode::from(2);
        }
        other => {
            eprintln!("dmsim replay: unknown backend {other:?}; the only backend today is `sim`");
            return ExitCode::from(2);
        }
    }
    let (trace, encoding) = match trace_file::read(&args.trace) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("dmsim replay: {e}");
            return ExitCode::from(2);
        }
    };
    let checkers = Checkers::from_path();
    let replayed = match replay(&trace, &checkers) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dmsim replay: {}: {e}", args.trace.display());
            return ExitCode::from(2);
        }
    };
    println!(
        "dmsim replay: {} ({}, seed {}, workload {}, {} ops) on the simulator",
        args.trace.display(),
        encoding_name(encoding),
        trace.header.seed,
        trace.header.workload,
        trace.ops().count()
    );
    print_outcome(&replayed.outcome, &checkers);
    let identical = match &replayed.first_difference {
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
    let ops = replayed.outcome.trace.ops().count();
    match (&replayed.outcome.violation, &recorded) {
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
    if replayed.outcome.violation.is_some() || (args.strict && !identical) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
