//! `dmsim minimize`: shrinks a failing trace (thin or cache) while its
//! violation recurs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use dmsim_sim::cache_run::{self, is_cache_header};
use dmsim_sim::run::{minimize, Checkers};
use indicatif::{ProgressBar, ProgressStyle};

use crate::exit;
use dmsim_traces::file::{self as trace_file, Encoding};

/// Options of `dmsim minimize`.
#[derive(Args, Debug)]
#[command(after_help = crate::exit_help!("\
Status 0: the minimized trace is written. 1 is not used: a trace that \
records no violation, or whose violation does not recur, is unusable input \
(2)."))]
pub struct MinimizeArgs {
    /// The failing trace (text or binary; thin or cache, told apart by its
    /// workload).
    pub trace: PathBuf,
    /// Where to write the minimized trace (text; binary with --binary or a
    /// .bin extension).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Write the minimized trace in the binary encoding.
    #[arg(long)]
    pub binary: bool,
}

/// Minimizes a trace.
pub fn run(args: MinimizeArgs) -> ExitCode {
    if let Err(e) = trace_file::check_output_path(&args.output) {
        eprintln!("dmsim minimize: {e}");
        return ExitCode::from(exit::UNUSABLE);
    }
    let (trace, _) = match trace_file::read(&args.trace) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("dmsim minimize: {e}");
            return ExitCode::from(exit::UNUSABLE);
        }
    };
    let bar = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{elapsed_precise} {spinner} minimizing: {msg}")
            .expect("valid template"),
    );
    let progress = |runs: u64, len: usize| {
        bar.set_message(format!("{runs} runs, current length {len} ops"));
        bar.tick();
    };
    let result = if is_cache_header(&trace.header) {
        cache_run::minimize(&trace, &Checkers::from_path(), progress)
    } else {
        minimize(&trace, &Checkers::from_path(), progress)
    };
    bar.finish_and_clear();
    let m = match result {
        Ok(m) => m,
        Err(e) => {
            eprintln!("dmsim minimize: {}: {e}", args.trace.display());
            return ExitCode::from(exit::UNUSABLE);
        }
    };
    let encoding = Encoding::for_output(&args.output, args.binary);
    if let Err(e) = trace_file::write(&args.output, &m.trace, encoding) {
        eprintln!("dmsim minimize: {e}");
        return ExitCode::from(exit::UNUSABLE);
    }
    println!("minimized: {} → {} ops ({} runs)", m.ops_before, m.ops_after, m.runs);
    println!("violation: {}", m.signature);
    if let Some((kind, message)) = m.trace.violation() {
        println!("  as it now reads: {kind}: {message}");
    }
    println!("wrote {} ({} events, {})", args.output.display(), m.trace.events.len(), encoding.name());
    ExitCode::SUCCESS
}
